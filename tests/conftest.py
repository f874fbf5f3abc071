"""A throwaway PostgreSQL server for the whole test session, and a fresh database per test.

The server is started once (``initdb`` + ``pg_ctl`` in a temporary directory, listening on
127.0.0.1 and a free port, as the ``postgres`` user when the tests run as root, since the
server refuses to run as root) and stopped when the session ends. Tests ask for
``postgres_url`` (an empty database of their own), ``postgres_store_url`` (one already
migrated to head, cloned from a template: faster) or ``postgres_server`` (to restart the
server, or to create databases themselves). Without the PostgreSQL server binaries those
tests skip and say how to install them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from server.store import Store

INSTALL_HINT = "PostgreSQL server binaries not found; install them with: apt-get install postgresql"
SUPERUSER = "postgres"
# Durability settings that only an OS crash could defeat: the tests kill the server
# process (``-m immediate``), never the machine, and WAL still replays after that.
SERVER_OPTIONS = (
    "-c fsync=off -c full_page_writes=off -c max_connections=200 -c shared_buffers=64MB"
)
_START_ATTEMPTS = 3


def find_postgres_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` live: ``pg_config --bindir``, Debian's tree, or PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        reported = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if reported:
            candidates.append(Path(reported))
    # Debian installs each major version side by side; prefer the newest.
    candidates.extend(
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_major_version, reverse=True)
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def _major_version(bindir: Path) -> int:
    match = re.fullmatch(r"\d+", bindir.parent.name)
    return int(match.group()) if match else -1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    """A PostgreSQL server the tests own: its binaries, data directory and port."""

    bindir: Path
    root: Path  # holds data/ and the server log; owned by the server's OS user
    port: int
    run_as: list[str] = field(default_factory=list)  # e.g. ["runuser", "-u", "postgres", "--"]

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this server (psycopg 3 driver)."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str = "postgres") -> str:
        """libpq connection string of ``database`` on this server."""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"

    def initdb(self) -> None:
        """Create the cluster: trust authentication, since it only listens on loopback."""
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories='{self.root}' {SERVER_OPTIONS}"
        )
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-o", options, "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" rolls back open transactions, "immediate" is a crash."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def is_running(self) -> bool:
        """True while the server's postmaster is alive."""
        status = subprocess.run(
            [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status"],
            capture_output=True,
            check=False,
        )
        return status.returncode == 0

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port (every open connection breaks)."""
        self.stop(mode)
        self.start()

    def create_database(self, name: str | None = None, template: str = "template1") -> str:
        """Create a database (a fresh name unless given) as a copy of ``template``; return
        its SQLAlchemy URL."""
        name = name or f"test_{uuid.uuid4().hex[:16]}"
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
        with psycopg.connect(self.conninfo(), autocommit=True) as admin:
            admin.execute(statement)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever still uses it."""
        with psycopg.connect(self.conninfo(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def stop_when_gone(self, pid: int) -> subprocess.Popen[bytes]:
        """Start a watchdog that stops the server and deletes its files once process ``pid``
        is gone: a test run killed before its teardown (a CI timeout) leaves nothing behind.
        """
        pg_ctl = " ".join([*self.run_as, str(self.bindir / "pg_ctl")])
        script = (
            f"while kill -0 {pid} 2>/dev/null; do sleep 1; done; "
            f"{pg_ctl} -D '{self.datadir}' -m immediate -w stop >/dev/null 2>&1; "
            f"rm -rf '{self.root}'"
        )
        # Its own session, so that killing the test run's process group spares it.
        return subprocess.Popen(["sh", "-c", script], start_new_session=True)

    def _run(self, program: str, *arguments: str) -> None:
        command = [*self.run_as, str(self.bindir / program), *arguments]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}\n{log[-4000:]}"
            )


def _server_user_prefix() -> tuple[list[str], int | None]:
    """The command prefix that runs as the server's user, and that user's uid (root only)."""
    if os.geteuid() != 0:
        return [], None
    import pwd  # POSIX only, and only needed when running as root

    try:
        uid = pwd.getpwnam(SUPERUSER).pw_uid
    except KeyError:
        pytest.skip(f"running as root but there is no '{SUPERUSER}' user; {INSTALL_HINT}")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser to drop to the postgres user")
    return [runuser, "-u", SUPERUSER, "--"], uid


def _start_on_a_free_port(bindir: Path, root: Path, run_as: list[str]) -> PostgresServer:
    server = PostgresServer(bindir, root, _free_port(), run_as)
    server.initdb()
    for attempt in range(_START_ATTEMPTS):
        try:
            server.start()
            return server
        except RuntimeError:
            # Another process took the port between probing and binding: try another.
            if attempt == _START_ATTEMPTS - 1:
                raise
            server.port = _free_port()
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session; skips when its binaries are absent."""
    bindir = find_postgres_bindir()
    if bindir is None:
        pytest.skip(INSTALL_HINT)
    run_as, uid = _server_user_prefix()
    # Not under pytest's tmp_path: that tree is private to the test user (mode 0700), and
    # the server's user must reach its data directory.
    root = Path(tempfile.mkdtemp(prefix="gpuattest-pg-"))
    if uid is not None:
        os.chown(root, uid, -1)
    server: PostgresServer | None = None
    watchdog: subprocess.Popen[bytes] | None = None
    try:
        server = _start_on_a_free_port(bindir, root, run_as)
        watchdog = server.stop_when_gone(os.getpid())
        yield server
    finally:
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
        if server is not None and server.is_running():
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_migrated_template(postgres_server: PostgresServer) -> str:
    """Name of a database migrated to head once, for tests to clone (cheaper than migrating)."""
    name = "gpuattest_migrated_template"
    Store.open(postgres_server.create_database(name)).close()
    return name


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """An empty database of this test's own on the session's server (dropped afterwards)."""
    yield from _database_of_its_own(postgres_server, "template1")


@pytest.fixture
def postgres_store_url(
    postgres_server: PostgresServer, postgres_migrated_template: str
) -> Iterator[str]:
    """A database of this test's own, already at the head migration (dropped afterwards)."""
    yield from _database_of_its_own(postgres_server, postgres_migrated_template)


def _database_of_its_own(server: PostgresServer, template: str) -> Iterator[str]:
    if not server.is_running():
        # A test that stopped the server and failed before starting it again.
        server.start()
    url = server.create_database(template=template)
    yield url
    server.drop_database(url.rsplit("/", 1)[1])
