"""Tests for load_settings: which layer wins, what is refused, and how it is reported.

Precedence, highest first: CLI flags, environment, the TOML file's own table, defaults.
Every value below is synthetic; each test writes its own TOML file under tmp_path.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.settings import AgentSettings
from gpuattest.settings import SettingsError, TableSettings, load_settings
from proto.errors import GpuattestError
from server.settings import VerifierSettings

LAYERS = ("toml", "env", "flag")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's own GPUATTEST_* variables out of every test."""
    for name in list(os.environ):
        if name.startswith("GPUATTEST_"):
            monkeypatch.delenv(name)


def _write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gpuattest.toml"
    path.write_text(text)
    return path


# -- precedence ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayeredField:
    """One setting and a distinct value for it in each layer."""

    settings_cls: type[TableSettings]
    name: str
    default: object
    toml_literal: str
    toml_value: object
    env_text: str
    env_value: object
    flag_value: object

    @property
    def env_name(self) -> str:
        prefix = self.settings_cls.model_config.get("env_prefix", "")
        return f"{prefix}{self.name.upper()}"

    def value_from(self, layer: str) -> object:
        return {"toml": self.toml_value, "env": self.env_value, "flag": self.flag_value}[layer]


FIELDS = {
    "agent.window_s": LayeredField(AgentSettings, "window_s", 10.0, "5.0", 5.0, "3", 3.0, 2.0),
    "agent.verifier": LayeredField(
        AgentSettings,
        "verifier",
        "127.0.0.1:50051",
        '"toml-host:1"',
        "toml-host:1",
        "env-host:2",
        "env-host:2",
        "flag-host:3",
    ),
    "agent.state_dir": LayeredField(
        AgentSettings,
        "state_dir",
        Path("gpuattest-agent"),
        '"/toml/state"',
        Path("/toml/state"),
        "/env/state",
        Path("/env/state"),
        Path("/flag/state"),
    ),
    "verifier.nonce_ttl_s": LayeredField(
        VerifierSettings, "nonce_ttl_s", 60.0, "30", 30.0, "20.5", 20.5, 10.0
    ),
    "verifier.db_url": LayeredField(
        VerifierSettings,
        "db_url",
        "sqlite:///gpuattest-verifier.db",
        '"sqlite:///toml.db"',
        "sqlite:///toml.db",
        "sqlite:///env.db",
        "sqlite:///env.db",
        "sqlite:///flag.db",
    ),
    "verifier.insecure_plaintext": LayeredField(
        VerifierSettings, "insecure_plaintext", False, "true", True, "false", False, True
    ),
}
# Every subset of the three layers: the highest one present must win.
LAYER_SETS = [
    combination for size in range(4) for combination in itertools.combinations(LAYERS, size)
]


@pytest.mark.parametrize("field", FIELDS.values(), ids=FIELDS.keys())
@pytest.mark.parametrize(
    "present", LAYER_SETS, ids=["+".join(layers) or "defaults" for layers in LAYER_SETS]
)
def test_highest_layer_present_wins(
    field: LayeredField,
    present: tuple[str, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = field.settings_cls.toml_table
    toml_line = f"{field.name} = {field.toml_literal}\n" if "toml" in present else ""
    toml_file = _write_toml(tmp_path, f"[{table}]\n{toml_line}")
    if "env" in present:
        monkeypatch.setenv(field.env_name, field.env_text)
    flags = {field.name: field.flag_value} if "flag" in present else {}

    settings = load_settings(field.settings_cls, toml_file, flags)

    expected = field.value_from(present[-1]) if present else field.default
    assert getattr(settings, field.name) == expected


@pytest.mark.parametrize(
    "settings_cls", [AgentSettings, VerifierSettings], ids=["agent", "verifier"]
)
def test_no_file_no_env_no_flags_gives_the_declared_defaults(
    settings_cls: type[TableSettings],
) -> None:
    settings = load_settings(settings_cls)

    assert type(settings) is settings_cls
    assert settings == settings_cls()


def test_none_flags_are_ignored_so_lower_layers_show_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml_file = _write_toml(tmp_path, '[agent]\nhostname = "toml-host"\n')
    monkeypatch.setenv("GPUATTEST_AGENT_WINDOW_S", "4")

    settings = load_settings(
        AgentSettings,
        toml_file,
        {"window_s": None, "hostname": None, "insecure_plaintext": None, "tls_ca": None},
    )

    assert (settings.window_s, settings.hostname) == (4.0, "toml-host")
    assert settings.insecure_plaintext is False
    assert settings.tls_ca is None


def test_a_false_flag_is_a_value_not_an_absence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml_file = _write_toml(tmp_path, "[verifier]\ninsecure_plaintext = true\n")
    monkeypatch.setenv("GPUATTEST_VERIFIER_INSECURE_PLAINTEXT", "true")

    settings = load_settings(VerifierSettings, toml_file, {"insecure_plaintext": False})

    assert settings.insecure_plaintext is False


def test_the_loaded_object_is_the_declared_class_not_a_layered_subclass(tmp_path: Path) -> None:
    toml_file = _write_toml(tmp_path, "[agent]\nbatch_size = 8\n")

    settings = load_settings(AgentSettings, toml_file)

    assert type(settings) is AgentSettings
    assert settings.batch_size == 8


# -- one file, two tables --------------------------------------------------------------------

BOTH_TABLES = """\
[agent]
verifier = "verifier.example:443"
tls_cert = "/etc/agent/cert.pem"
window_s = 5

[verifier]
listen = "0.0.0.0:443"
tls_cert = "/etc/verifier/cert.pem"
metrics_port = 9400
"""


def test_each_class_reads_only_its_own_table(tmp_path: Path) -> None:
    toml_file = _write_toml(tmp_path, BOTH_TABLES)

    agent = load_settings(AgentSettings, toml_file)
    verifier = load_settings(VerifierSettings, toml_file)

    assert (agent.verifier, agent.tls_cert, agent.window_s) == (
        "verifier.example:443",
        Path("/etc/agent/cert.pem"),
        5.0,
    )
    assert (verifier.listen, verifier.tls_cert, verifier.metrics_port) == (
        "0.0.0.0:443",
        Path("/etc/verifier/cert.pem"),
        9400,
    )


def test_each_class_reads_only_its_own_environment_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPUATTEST_VERIFIER_TLS_CERT", "/verifier/cert.pem")
    monkeypatch.setenv("GPUATTEST_AGENT_TLS_CERT", "/agent/cert.pem")

    assert load_settings(AgentSettings).tls_cert == Path("/agent/cert.pem")
    assert load_settings(VerifierSettings).tls_cert == Path("/verifier/cert.pem")


# -- refusals --------------------------------------------------------------------------------

BAD_FILES = {
    "unknown key in own table": ("[agent]\nwindow_seconds = 5\n", "window_seconds"),
    "verifier key in agent table": ('[agent]\nlisten = "0.0.0.0:1"\n', "listen"),
    "no agent table": ('[verifier]\nlisten = "127.0.0.1:1"\n', "no [agent] table"),
    "misspelt table name": ("[agnet]\nwindow_s = 5\n", "no [agent] table"),
    "empty file": ("", "no [agent] table"),
    "agent is a value, not a table": ("agent = 5\n", "no [agent] table"),
    "not TOML": ("[agent\nwindow_s = 5\n", "not valid TOML"),
}


@pytest.mark.parametrize(("text", "complaint"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_settings_files_are_refused_with_a_settings_error(
    text: str, complaint: str, tmp_path: Path
) -> None:
    toml_file = _write_toml(tmp_path, text)

    with pytest.raises(SettingsError, match=complaint.replace("[", r"\[")):
        load_settings(AgentSettings, toml_file)


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    toml_file = tmp_path / "binary.toml"
    toml_file.write_bytes(b"[agent]\nhostname = \xff\n")

    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(AgentSettings, toml_file)


@pytest.mark.parametrize("name", ["missing.toml", "."], ids=["missing file", "a directory"])
def test_a_settings_path_that_is_not_a_file_is_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(VerifierSettings, tmp_path / name)


@dataclass(frozen=True)
class BadValue:
    """An invalid value for one setting, given through one layer."""

    settings_cls: type[TableSettings]
    layer: str
    name: str
    value: object  # a TOML literal, an environment string or a flag value, per layer


BAD_VALUES = {
    "window_s over 10 s (toml)": BadValue(AgentSettings, "toml", "window_s", "11"),
    "window_s over 10 s (env)": BadValue(AgentSettings, "env", "window_s", "11"),
    "window_s over 10 s (flag)": BadValue(AgentSettings, "flag", "window_s", 11.0),
    "window_s zero": BadValue(AgentSettings, "flag", "window_s", 0.0),
    "negative replay speed (flag)": BadValue(AgentSettings, "flag", "replay_speed", -1.0),
    "negative replay speed (env)": BadValue(AgentSettings, "env", "replay_speed", "-0.5"),
    "sample_hz over 10": BadValue(AgentSettings, "toml", "sample_hz", "20"),
    "batch_size over 64": BadValue(AgentSettings, "toml", "batch_size", "65"),
    "collector not a known kind (flag)": BadValue(AgentSettings, "flag", "collector", "gpu"),
    "collector not a known kind (toml)": BadValue(AgentSettings, "toml", "collector", '"dcgm"'),
    "window_s not a number (env)": BadValue(AgentSettings, "env", "window_s", "ten"),
    "insecure_plaintext not a bool (env)": BadValue(
        AgentSettings, "env", "insecure_plaintext", "perhaps"
    ),
    "metrics_port over 65535": BadValue(VerifierSettings, "toml", "metrics_port", "70000"),
    "negative nonce ttl": BadValue(VerifierSettings, "env", "nonce_ttl_s", "-1"),
    "zero token ttl": BadValue(VerifierSettings, "flag", "enrol_token_ttl_s", 0.0),
    "unknown flag": BadValue(VerifierSettings, "flag", "listen_address", "127.0.0.1:1"),
}


@pytest.mark.parametrize("bad", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_invalid_values_are_refused_naming_the_setting_on_one_line(
    bad: BadValue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = bad.settings_cls.toml_table
    toml_line = f"{bad.name} = {bad.value}\n" if bad.layer == "toml" else ""
    toml_file = _write_toml(tmp_path, f"[{table}]\n{toml_line}")
    if bad.layer == "env":
        prefix = bad.settings_cls.model_config.get("env_prefix", "")
        monkeypatch.setenv(f"{prefix}{bad.name.upper()}", str(bad.value))
    flags = {bad.name: bad.value} if bad.layer == "flag" else {}

    with pytest.raises(SettingsError) as raised:
        load_settings(bad.settings_cls, toml_file, flags)

    message = str(raised.value)
    assert bad.name in message
    assert bad.settings_cls.__name__ in message
    assert "\n" not in message


def test_several_invalid_values_are_all_named(tmp_path: Path) -> None:
    toml_file = _write_toml(tmp_path, '[agent]\nwindow_s = 11\ncollector = "gpu"\n')

    with pytest.raises(SettingsError, match="window_s") as raised:
        load_settings(AgentSettings, toml_file, {"batch_size": 0})

    assert "collector" in str(raised.value)
    assert "batch_size" in str(raised.value)


def test_an_invalid_value_is_not_echoed_back(tmp_path: Path) -> None:
    # A mistyped key may hold a database password; the message must not repeat it.
    toml_file = _write_toml(tmp_path, '[verifier]\ndb_ulr = "postgresql://u:s3cret@db/x"\n')

    with pytest.raises(SettingsError, match="db_ulr") as raised:
        load_settings(VerifierSettings, toml_file)

    assert "s3cret" not in str(raised.value)


def test_a_settings_error_is_a_gpuattest_error() -> None:
    # gpuattest.cli.main turns exactly this family into one line and exit status 1.
    assert issubclass(SettingsError, GpuattestError)


# -- the window bound, over open inputs ---------------------------------------------------------


@given(window_s=st.floats(min_value=0.0, max_value=10.0, exclude_min=True))
def test_any_window_up_to_ten_seconds_is_accepted(window_s: float) -> None:
    assert load_settings(AgentSettings, None, {"window_s": window_s}).window_s == window_s


@given(window_s=st.floats(min_value=10.0, exclude_min=True, allow_nan=False))
def test_any_window_over_ten_seconds_is_refused(window_s: float) -> None:
    with pytest.raises(SettingsError, match="window_s"):
        load_settings(AgentSettings, None, {"window_s": window_s})
