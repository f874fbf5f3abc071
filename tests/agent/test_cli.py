"""Tests for `gpuattest agent` and the console-script entry, against a real verifier.

The verifier runs in-process on 127.0.0.1:0 with a real SQLite file, on its own event loop
in a background thread: the CLI under test calls asyncio.run itself, so it cannot share
the test's loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent.identity import IDENTITY_FILE, KEY_FILE, load_identity
from gpuattest.cli import cli, main
from gpuattest.settings import load_settings
from server.serve import start_verifier
from server.settings import VerifierSettings
from server.store import Store

SECOND = 1_000_000_000


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's own GPUATTEST_* variables out of every test."""
    for name in list(os.environ):
        if name.startswith("GPUATTEST_"):
            monkeypatch.delenv(name)


@dataclass
class ThreadedVerifier:
    """A verifier serving on a loopback port from a background thread, and its store."""

    address: str
    store: Store

    def new_token(self, hostname: str = "") -> str:
        token = f"synthetic-token-{hostname}-{time.time_ns()}"
        now = time.time_ns()
        self.store.add_enrol_token(
            hashlib.sha256(token.encode()).digest(), hostname, now + 60 * SECOND, now
        )
        return token


@pytest.fixture
def verifier(tmp_path: Path) -> Iterator[ThreadedVerifier]:
    db_url = f"sqlite:///{tmp_path / 'verifier.db'}"
    settings = load_settings(
        VerifierSettings,
        None,
        {"listen": "127.0.0.1:0", "db_url": db_url, "insecure_plaintext": True},
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="verifier-loop", daemon=True)
    thread.start()
    store = Store.open(db_url)
    try:
        running = asyncio.run_coroutine_threadsafe(start_verifier(settings, store), loop).result(
            timeout=30
        )
        try:
            yield ThreadedVerifier(f"127.0.0.1:{running.port}", store)
        finally:
            asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        store.close()


def _enroll(address: str, state_dir: Path, token: str, hostname: str = "host-a") -> Result:
    return CliRunner().invoke(
        cli,
        [
            "agent",
            "enroll",
            "--verifier",
            address,
            "--insecure-plaintext",
            "--state-dir",
            str(state_dir),
            "--hostname",
            hostname,
            "--token",
            token,
        ],
    )


def _main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run gpuattest.cli.main with ``args``; return its exit status."""
    monkeypatch.setattr(sys, "argv", ["gpuattest", *args])
    try:
        main()
    except SystemExit as exit_:
        # sys.exit("text") exits with status 1, as the shell would see it.
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def _closed_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- enroll --------------------------------------------------------------------------------


def test_enroll_writes_the_identity_and_a_private_key(
    verifier: ThreadedVerifier, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"

    result = _enroll(verifier.address, state_dir, verifier.new_token("host-a"))

    assert result.exit_code == 0, result.output
    identity = json.loads((state_dir / IDENTITY_FILE).read_text())
    assert identity["hostname"] == "host-a"
    assert identity["verifier"] == verifier.address
    assert result.stdout == f"enrolled as {identity['agent_id']}; key and identity in {state_dir}\n"
    key_mode = stat.S_IMODE((state_dir / KEY_FILE).stat().st_mode)
    assert key_mode == 0o600
    loaded, signer = load_identity(state_dir)
    assert loaded.agent_id == identity["agent_id"]
    key = verifier.store.key(signer.key_id)
    assert key is not None
    assert (key.agent_id, key.revoked) == (identity["agent_id"], False)


def test_enroll_with_a_used_token_fails_clearly_and_writes_nothing(
    verifier: ThreadedVerifier,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = verifier.new_token()
    assert _enroll(verifier.address, tmp_path / "first", token).exit_code == 0
    second = tmp_path / "second"

    status = _main(
        monkeypatch,
        "agent",
        "enroll",
        "--verifier",
        verifier.address,
        "--insecure-plaintext",
        "--state-dir",
        str(second),
        "--token",
        token,
    )

    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("gpuattest: ")
    assert "token_used" in err
    assert err.count("\n") == 1
    assert not (second / IDENTITY_FILE).exists()
    assert not (second / KEY_FILE).exists()


def test_enroll_with_a_used_token_fails_under_click_too(
    verifier: ThreadedVerifier, tmp_path: Path
) -> None:
    token = verifier.new_token()
    assert _enroll(verifier.address, tmp_path / "first", token).exit_code == 0

    result = _enroll(verifier.address, tmp_path / "second", token)

    assert result.exit_code != 0
    assert "token_used" in str(result.exception)


def test_a_token_refused_for_another_host_stays_usable_by_its_own(
    verifier: ThreadedVerifier, tmp_path: Path
) -> None:
    token = verifier.new_token("host-a")

    refused = _enroll(verifier.address, tmp_path / "b", token, hostname="host-b")
    accepted = _enroll(verifier.address, tmp_path / "a", token, hostname="host-a")

    assert refused.exit_code != 0
    assert "host_mismatch" in str(refused.exception)
    assert accepted.exit_code == 0, accepted.output


def test_enroll_with_no_verifier_listening_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{_closed_loopback_port()}"

    status = _main(
        monkeypatch,
        "agent",
        "enroll",
        "--verifier",
        address,
        "--insecure-plaintext",
        "--state-dir",
        str(tmp_path / "state"),
        "--token",
        "synthetic-token",
    )

    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("gpuattest: ")
    assert "UNAVAILABLE" in err
    assert err.count("\n") == 1


def test_enroll_refuses_plaintext_to_a_remote_verifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _main(
        monkeypatch,
        "agent",
        "enroll",
        "--verifier",
        "192.0.2.1:50051",
        "--insecure-plaintext",
        "--state-dir",
        str(tmp_path / "state"),
        "--token",
        "synthetic-token",
    )

    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("gpuattest: plaintext gRPC is only allowed on loopback")
    assert not (tmp_path / "state").exists()


def test_enroll_requires_a_token(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["agent", "enroll", "--state-dir", str(tmp_path)])

    assert result.exit_code == 2
    assert "--token" in result.stderr


# -- run, through the console-script entry --------------------------------------------------


def test_run_without_enrolment_is_one_line_and_status_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "state"
    empty.mkdir()

    status = _main(
        monkeypatch, "agent", "run", "--state-dir", str(empty), "--verifier", "127.0.0.1:1"
    )

    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    assert captured.err == (
        f"gpuattest: no {IDENTITY_FILE} in {empty}: run `gpuattest agent enroll`\n"
    )


def test_run_with_an_invalid_window_names_it_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _main(monkeypatch, "agent", "run", "--state-dir", str(tmp_path), "--window", "11")

    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("gpuattest: invalid AgentSettings: window_s")
    assert err.count("\n") == 1


def test_run_with_a_settings_file_lacking_the_agent_table_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gpuattest.toml"
    config.write_text('[verifier]\nlisten = "127.0.0.1:1"\n')

    status = _main(monkeypatch, "agent", "run", "--config", str(config))

    assert status == 1
    assert capsys.readouterr().err == (f"gpuattest: settings file {config} has no [agent] table\n")


def test_an_unknown_command_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _main(monkeypatch, "agent", "fly")

    assert status == 2
    assert "No such command 'fly'" in capsys.readouterr().err


HELP = {
    "gpuattest": ("--help",),
    "agent": ("agent", "--help"),
    "agent enroll": ("agent", "enroll", "--help"),
    "agent run": ("agent", "run", "--help"),
}


@pytest.mark.parametrize("args", HELP.values(), ids=HELP.keys())
def test_help_of_the_top_level_and_agent_commands(
    args: tuple[str, ...], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _main(monkeypatch, *args)

    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith(" ".join(("Usage: gpuattest", *args[:-1], "[OPTIONS]")))
