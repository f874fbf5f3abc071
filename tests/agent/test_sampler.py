"""The sampling daemon's process: what it keeps resident, and how it fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.sampler import exec_argv
from agent.settings import AgentSettings

# Resident for the daemon's lifetime if imported: the settings library and the CLI parser
# belong to the launcher (`gpuattest agent run`), torch to the probe worker.
LAUNCHER_ONLY = ("pydantic", "pydantic_settings", "click", "torch", "server")


def test_daemon_process_does_not_import_launcher_libraries() -> None:
    code = (
        "import sys, agent.sampler; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({LAUNCHER_ONLY!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_unreadable_configuration_is_one_line_and_status_1() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.sampler", "{not json"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.startswith("gpuattest: agent configuration is not JSON")
    assert result.stderr.count("\n") == 1


def test_missing_enrolment_is_reported_by_the_daemon_too(tmp_path: Path) -> None:
    argv = exec_argv(AgentSettings(state_dir=tmp_path, insecure_plaintext=True).config(), 30)
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("gpuattest: no ")
    assert str(tmp_path) in result.stderr
