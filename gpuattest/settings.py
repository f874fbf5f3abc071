"""Load a settings object from defaults, a TOML file, the environment and CLI flags.

Precedence, highest first: CLI flags, environment (``GPUATTEST_AGENT_*`` /
``GPUATTEST_VERIFIER_*``), the TOML file's ``[agent]`` / ``[verifier]`` table, defaults.
The loaded object is passed to the code that needs it; nothing reads settings globally.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, TypeVar, cast

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

from proto.errors import GpuattestError


class SettingsError(GpuattestError):
    """A settings file or value is invalid."""


class TableSettings(BaseSettings):
    """Base of the agent's and the verifier's settings: names its TOML table."""

    toml_table: ClassVar[str] = ""


SettingsT = TypeVar("SettingsT", bound=TableSettings)


def load_settings(
    settings_cls: type[SettingsT],
    toml_file: Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> SettingsT:
    """Build ``settings_cls`` from the layered sources; ``None`` overrides are ignored."""
    if toml_file is not None:
        _require_table(toml_file, settings_cls.toml_table)
    flags = {name: value for name, value in (overrides or {}).items() if value is not None}

    class _Layered(settings_cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if toml_file is not None:
                sources.append(
                    TomlConfigSettingsSource(
                        settings_cls, toml_file=toml_file, toml_table_header=(cls.toml_table,)
                    )
                )
            return tuple(sources)

    try:
        layered = _Layered(**flags)
    except ValidationError as exc:
        raise SettingsError(_describe(settings_cls, exc)) from exc
    except ValueError as exc:  # a source that could not parse a value (e.g. from the env)
        raise SettingsError(str(exc)) from exc
    # Hand back the declared class, not the throw-away subclass.
    # model_construct skips validation, which the layered instance has just done.
    return cast(SettingsT, settings_cls.model_construct(**layered.model_dump()))


def _require_table(toml_file: Path, table: str) -> None:
    """Refuse a file that is missing, is not TOML, or has no ``[table]`` table.

    pydantic-settings would raise a bare KeyError (no table) or AttributeError (a value
    where the table should be); a missing table is more likely a typo in its name than
    a wish for defaults, so it is refused like an unknown key.
    """
    if not toml_file.is_file():
        raise SettingsError(f"settings file {toml_file} does not exist")
    try:
        content = tomllib.loads(toml_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"settings file {toml_file} is not valid TOML: {exc}") from exc
    if not isinstance(content.get(table), dict):
        raise SettingsError(f"settings file {toml_file} has no [{table}] table")


def _describe(settings_cls: type[TableSettings], error: ValidationError) -> str:
    """One line, as the CLI prints errors, naming the declared class rather than _Layered.

    The offending values are left out: a mistyped key could hold a database password.
    """
    problems = "; ".join(
        f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()
    )
    return f"invalid {settings_cls.__name__}: {problems}"
