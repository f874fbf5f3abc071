"""Tests for `gpuattest verifier` operator commands, on a real SQLite file under tmp_path.

The database is filled through :class:`server.store.Store` with hand-built, clearly synthetic
:mod:`server.records` values; the commands are run through click's CliRunner, and the error
path through the console-script entry :func:`gpuattest.cli.main`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from gpuattest.cli import cli, main
from gpuattest.settings import SettingsError
from server.records import AcceptedEnvelope, GpuVerdict
from server.store import EnrolmentRefused, Store

SECOND = 1_000_000_000
HOUR = 3600 * SECOND
T0 = 1_700_000_000 * SECOND
EVIDENCE_TYPE = "application/vnd.gpuattest.evidence.v1+protobuf"
GAP_TYPE = "application/vnd.gpuattest.gap.v1+protobuf"
AGENT_FIELDS = {
    "agent_id",
    "hostname",
    "key_id",
    "revoked",
    "acked_sequence",
    "windows_stored",
    "gaps",
    "last_seen_unix_ns",
}
WINDOW_FIELDS = {
    "agent_id",
    "sequence",
    "gpu_index",
    "gpu_uuid",
    "start_unix_ns",
    "end_unix_ns",
    "verdict",
    "confidence",
    "model_version",
    "source",
    "features",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's own GPUATTEST_* variables out of every test."""
    for name in list(os.environ):
        if name.startswith("GPUATTEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'verifier.db'}"


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store.open(db_url) as opened:
        yield opened


def _verifier(*args: str) -> Result:
    return CliRunner().invoke(cli, ["verifier", *args])


def _token_hash(token: str) -> bytes:
    # What the CLI stores and what the Enrolment service looks up.
    return hashlib.sha256(token.encode()).digest()


def _enrol(store: Store, agent_id: str, hostname: str, key_id: str) -> None:
    token = f"synthetic-token-{key_id}"
    store.add_enrol_token(_token_hash(token), hostname, T0 + HOUR, T0)
    public_key = hashlib.sha256(f"synthetic-key/{key_id}".encode()).digest()
    store.enroll(_token_hash(token), hostname, agent_id, public_key, key_id, T0)


def _verdict(gpu_index: int, start: int, verdict: str, confidence: float) -> GpuVerdict:
    return GpuVerdict(
        gpu_index=gpu_index,
        gpu_uuid=f"GPU-synthetic-{gpu_index}",
        start_unix_ns=start,
        end_unix_ns=start + 10 * SECOND,
        sample_count=100,
        features={"power_mean_w": 250.0 + gpu_index},
        verdict=verdict,
        confidence=confidence,
        model_version="synthetic-rule-1",
    )


def _evidence(agent_id: str, sequence: int, *gpus: GpuVerdict) -> AcceptedEnvelope:
    start = T0 + (sequence - 1) * 10 * SECOND
    envelope = f"synthetic-envelope/{agent_id}/{sequence}".encode()
    return AcceptedEnvelope(
        agent_id=agent_id,
        sequence=sequence,
        envelope=envelope,
        envelope_sha256=hashlib.sha256(envelope).digest(),
        chain_head_sha256=hashlib.sha256(envelope).digest(),
        payload_type=EVIDENCE_TYPE,
        received_unix_ns=start + 11 * SECOND,
        window_start_unix_ns=start,
        window_end_unix_ns=start + 10 * SECOND,
        source="replay",
        nonce=b"",
        gpus=gpus,
    )


def _gap_notice(agent_id: str, first_missing: int, last_missing: int) -> AcceptedEnvelope:
    envelope = f"synthetic-gap/{agent_id}/{last_missing}".encode()
    return AcceptedEnvelope(
        agent_id=agent_id,
        sequence=last_missing,
        envelope=envelope,
        envelope_sha256=hashlib.sha256(envelope).digest(),
        chain_head_sha256=hashlib.sha256(b"lost").digest(),
        payload_type=GAP_TYPE,
        received_unix_ns=T0 + HOUR,
        window_start_unix_ns=0,
        window_end_unix_ns=0,
        source="replay",
        nonce=b"",
        declared_gap=(first_missing, last_missing),
    )


@pytest.fixture
def populated(store: Store) -> Store:
    """agt-a: windows on GPUs 0 and 1 at sequence 1, then a gap notice for 2..3; agt-b: one."""
    _enrol(store, "agt-a", "host-a", "key-a")
    _enrol(store, "agt-b", "host-b", "key-b")
    store.store_accepted(
        [
            _evidence("agt-a", 1, _verdict(0, T0, "training", 0.9), _verdict(1, T0, "idle", 0.5)),
            _gap_notice("agt-a", 2, 3),
            _evidence("agt-b", 1, _verdict(0, T0, "inference", 0.75)),
        ]
    )
    return store


def _json(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


# -- enroll-token ----------------------------------------------------------------------------


def test_enroll_token_prints_one_token_the_store_accepts_once(db_url: str, store: Store) -> None:
    result = _verifier("enroll-token", "--db", db_url, "--host", "h")

    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert result.stdout == f"{token}\n"
    assert len(token) >= 32
    store.enroll(_token_hash(token), "h", "agt-1", b"k" * 32, "key-1", time.time_ns())
    with pytest.raises(EnrolmentRefused) as refused:
        store.enroll(_token_hash(token), "h", "agt-2", b"j" * 32, "key-2", time.time_ns())
    assert refused.value.reason == "token_used"


def test_enroll_token_is_stored_only_as_a_hash(db_url: str, store: Store) -> None:
    token = _verifier("enroll-token", "--db", db_url).stdout.strip()

    with pytest.raises(EnrolmentRefused) as refused:
        # The printed text itself is not a stored key: only its SHA-256 is.
        store.enroll(token.encode(), "h", "agt-1", b"k" * 32, "key-1", time.time_ns())
    assert refused.value.reason == "unknown_token"


def test_enroll_token_is_bound_to_its_host(db_url: str, store: Store) -> None:
    token = _verifier("enroll-token", "--db", db_url, "--host", "h").stdout.strip()

    with pytest.raises(EnrolmentRefused) as refused:
        store.enroll(_token_hash(token), "other", "agt-1", b"k" * 32, "key-1", time.time_ns())
    assert refused.value.reason == "host_mismatch"


def test_enroll_token_each_call_makes_a_new_token(db_url: str) -> None:
    first = _verifier("enroll-token", "--db", db_url).stdout
    second = _verifier("enroll-token", "--db", db_url).stdout

    assert first != second


def test_enroll_token_expires_after_its_ttl(db_url: str, store: Store) -> None:
    token = _verifier("enroll-token", "--db", db_url, "--ttl", "60").stdout.strip()
    later = time.time_ns() + 61 * SECOND

    with pytest.raises(EnrolmentRefused) as refused:
        store.enroll(_token_hash(token), "h", "agt-1", b"k" * 32, "key-1", later)
    assert refused.value.reason == "token_expired"


def test_enroll_token_uses_the_database_of_the_settings_file(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'from-config.db'}"
    config = tmp_path / "gpuattest.toml"
    config.write_text(f'[verifier]\ndb_url = "{db_url}"\n')

    token = _verifier("enroll-token", "--config", str(config)).stdout.strip()

    with Store.open(db_url) as store:
        store.enroll(_token_hash(token), "h", "agt-1", b"k" * 32, "key-1", time.time_ns())


@pytest.mark.parametrize("ttl", ["0", "-5"], ids=["zero", "negative"])
def test_enroll_token_refuses_a_ttl_that_is_not_positive(db_url: str, ttl: str) -> None:
    result = _verifier("enroll-token", "--db", db_url, "--ttl", ttl)

    assert result.exit_code != 0
    assert isinstance(result.exception, SettingsError)
    assert "enrol_token_ttl_s" in str(result.exception)


# -- agents --------------------------------------------------------------------------------


def test_agents_json_lists_every_agent_with_its_counts(db_url: str, populated: Store) -> None:
    rows = _json(_verifier("agents", "--db", db_url, "--json"))

    assert [set(row) for row in rows] == [AGENT_FIELDS, AGENT_FIELDS]
    assert rows == [
        {
            "agent_id": "agt-a",
            "hostname": "host-a",
            "key_id": "key-a",
            "revoked": False,
            "acked_sequence": 3,
            "windows_stored": 2,
            "gaps": 1,
            "last_seen_unix_ns": T0 + HOUR,
        },
        {
            "agent_id": "agt-b",
            "hostname": "host-b",
            "key_id": "key-b",
            "revoked": False,
            "acked_sequence": 1,
            "windows_stored": 1,
            "gaps": 0,
            "last_seen_unix_ns": T0 + 11 * SECOND,
        },
    ]


def test_agents_json_of_an_empty_database_is_an_empty_list(db_url: str) -> None:
    assert _json(_verifier("agents", "--db", db_url, "--json")) == []


def test_agents_table_names_each_agent_and_host(db_url: str, populated: Store) -> None:
    result = _verifier("agents", "--db", db_url)

    assert result.exit_code == 0, result.output
    for text in ("agt-a", "host-a", "agt-b", "host-b", "2023-11-14 22:13:31.000"):
        assert text in result.stdout


def test_agents_table_shows_never_seen_as_a_dash(db_url: str, store: Store) -> None:
    _enrol(store, "agt-quiet", "host-q", "key-q")

    result = _verifier("agents", "--db", db_url)

    assert result.exit_code == 0, result.output
    quiet_line = next(line for line in result.stdout.splitlines() if "agt-quiet" in line)
    assert quiet_line.rstrip(" │|").endswith("-")


# -- windows -------------------------------------------------------------------------------


def test_windows_json_lists_every_gpu_window_in_order(db_url: str, populated: Store) -> None:
    rows = _json(_verifier("windows", "--db", db_url, "--json"))

    assert all(set(row) == WINDOW_FIELDS for row in rows)
    summary = [
        (row["agent_id"], row["sequence"], row["gpu_index"], row["verdict"], row["confidence"])
        for row in rows
    ]
    assert summary == [
        ("agt-a", 1, 0, "training", 0.9),
        ("agt-a", 1, 1, "idle", 0.5),
        ("agt-b", 1, 0, "inference", 0.75),
    ]
    assert rows[0] == {
        "agent_id": "agt-a",
        "sequence": 1,
        "gpu_index": 0,
        "gpu_uuid": "GPU-synthetic-0",
        "start_unix_ns": T0,
        "end_unix_ns": T0 + 10 * SECOND,
        "verdict": "training",
        "confidence": 0.9,
        "model_version": "synthetic-rule-1",
        "source": "replay",
        "features": {"power_mean_w": 250.0},
    }


def test_windows_json_filters_by_agent_and_limits(db_url: str, populated: Store) -> None:
    only_b = _json(_verifier("windows", "--db", db_url, "--json", "--agent", "agt-b"))
    first = _json(_verifier("windows", "--db", db_url, "--json", "--limit", "1"))

    assert [(row["agent_id"], row["verdict"]) for row in only_b] == [("agt-b", "inference")]
    assert [(row["agent_id"], row["gpu_index"]) for row in first] == [("agt-a", 0)]


def test_windows_table_names_agents_and_verdicts(db_url: str, populated: Store) -> None:
    result = _verifier("windows", "--db", db_url)

    assert result.exit_code == 0, result.output
    for text in ("agt-a", "agt-b", "training", "inference", "0.50", "synthetic-rule-1"):
        assert text in result.stdout


# -- revoke --------------------------------------------------------------------------------


def test_revoke_of_an_unknown_key_fails_and_says_so(db_url: str, populated: Store) -> None:
    result = _verifier("revoke", "--db", db_url, "key-nonexistent")

    assert result.exit_code != 0
    assert "no key key-nonexistent" in result.stderr
    assert all(not agent.revoked for agent in populated.list_agents())


def test_revoke_marks_the_key_revoked_and_agents_shows_it(db_url: str, populated: Store) -> None:
    result = _verifier("revoke", "--db", db_url, "key-a")

    assert result.exit_code == 0, result.output
    assert result.stdout == "revoked key-a\n"
    revoked = populated.key("key-a")
    assert revoked is not None
    assert revoked.revoked
    other = populated.key("key-b")
    assert other is not None
    assert not other.revoked
    rows = _json(_verifier("agents", "--db", db_url, "--json"))
    assert {row["agent_id"]: row["revoked"] for row in rows} == {"agt-a": True, "agt-b": False}


# -- through the console-script entry --------------------------------------------------------


def _main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run gpuattest.cli.main with ``args``; return its exit status."""
    monkeypatch.setattr(sys, "argv", ["gpuattest", *args])
    try:
        main()
    except SystemExit as exit_:
        # sys.exit("text") exits with status 1, as the shell would see it.
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def test_a_settings_error_becomes_one_line_on_stderr_and_status_1(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _main(monkeypatch, "verifier", "enroll-token", "--db", db_url, "--ttl", "-1")

    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    assert captured.err.startswith("gpuattest: invalid VerifierSettings: enrol_token_ttl_s")
    assert captured.err.count("\n") == 1


def test_revoke_of_an_unknown_key_through_main_exits_non_zero(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _main(monkeypatch, "verifier", "revoke", "--db", db_url, "key-nonexistent")

    assert status == 1
    assert "no key key-nonexistent" in capsys.readouterr().err


HELP = {
    "verifier": ("verifier", "--help"),
    "verifier serve": ("verifier", "serve", "--help"),
    "verifier enroll-token": ("verifier", "enroll-token", "--help"),
    "verifier revoke": ("verifier", "revoke", "--help"),
    "verifier agents": ("verifier", "agents", "--help"),
    "verifier windows": ("verifier", "windows", "--help"),
}


@pytest.mark.parametrize("args", HELP.values(), ids=HELP.keys())
def test_help_of_the_verifier_commands(
    args: tuple[str, ...], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _main(monkeypatch, *args)

    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith(f"Usage: gpuattest {' '.join(args[:-1])} [OPTIONS]")
