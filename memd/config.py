"""Settings (SPEC §9), built with pydantic-settings.

Sources in priority order: command-line flags (passed as ``overrides``) > environment (``MEMD_``
prefix, nested with ``__``, e.g. ``MEMD_LLM__MODEL``; ``MEMD_SESSIONS`` is ``:``-separated) >
TOML file (``--config``, ``MEMD_CONFIG``, else ``$XDG_CONFIG_HOME/memd/config.toml``) > defaults.
``OPENAI_API_KEY`` and ``OPENAI_BASE_URL`` fill ``[llm].api_key`` / ``[llm].base_url`` when no
other source set them.

Opt-in to a model (SPEC §9, §14): ``extractor = "auto"`` selects the model extractor only when memd's
own configuration holds a key (``[llm].api_key`` in the file, ``MEMD_LLM__API_KEY``, a flag). A bare
``OPENAI_API_KEY`` in the environment never opts in by itself: it only supplies the key once
``extractor = "openai"`` (``MEMD_EXTRACTOR=openai``).

A named config file that is missing, a TOML syntax error, or any invalid value raises
:class:`~memd.errors.ConfigError` (exit 78) whose message names the key and never the value.
"""

from __future__ import annotations

import contextvars
import os
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from memd.errors import ConfigError

#: The TOML file the next :class:`Settings` construction reads (set by :func:`load_settings`).
_TOML_PATH: contextvars.ContextVar[Path | None] = contextvars.ContextVar("memd_toml", default=None)


def _env_path(name: str, fallback: str) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else Path(fallback).expanduser()


def codex_home() -> Path:
    """``$CODEX_HOME``, default ``~/.codex`` (Codex CLI convention)."""
    return _env_path("CODEX_HOME", "~/.codex")


def claude_project_roots() -> list[Path]:
    """Where Claude Code writes its session transcripts (SPEC §3.4): ``<dir>/projects`` for each
    comma-separated entry of ``$CLAUDE_CONFIG_DIR``, else ``~/.claude/projects`` and
    ``~/.config/claude/projects`` (the two default configuration folders of Claude Code)."""
    configured = [part.strip() for part in os.environ.get("CLAUDE_CONFIG_DIR", "").split(",") if part.strip()]
    if configured:
        return [Path(part).expanduser() / "projects" for part in configured]
    return [Path("~/.claude/projects").expanduser(), Path("~/.config/claude/projects").expanduser()]


def default_sessions() -> list[Path]:
    """The default transcript roots: Codex's ``$CODEX_HOME/sessions`` and
    ``$CODEX_HOME/archived_sessions``, then Claude Code's (:func:`claude_project_roots`)."""
    home = codex_home()
    return [home / "sessions", home / "archived_sessions", *claude_project_roots()]


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/memd`` (default ``~/.local/state/memd``): the database lives here."""
    return _env_path("XDG_STATE_HOME", "~/.local/state") / "memd"


def default_memory_dir() -> Path:
    """``$XDG_DATA_HOME/memd/projects`` (default ``~/.local/share/memd/projects``)."""
    return _env_path("XDG_DATA_HOME", "~/.local/share") / "memd" / "projects"


def default_config_path() -> Path:
    """``$XDG_CONFIG_HOME/memd/config.toml`` (default ``~/.config/memd/config.toml``)."""
    return _env_path("XDG_CONFIG_HOME", "~/.config") / "memd" / "config.toml"


def default_consolidation_command() -> list[str]:
    """memd's own consolidator, run by this interpreter so it works inside any virtualenv."""
    return [sys.executable, "-m", "memd", "consolidate", "--root", "{memory_root}"]


class LLMSettings(BaseModel):
    """``[llm]``: the OpenAI-compatible model used by ``extractor = "openai"``."""

    model_config = ConfigDict(extra="forbid")

    api: Literal["chat", "responses"] = "chat"
    base_url: str | None = None
    model: str = "gpt-5-mini"
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=120.0, gt=0)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    max_input_tokens: int = Field(default=120_000, ge=1_000)
    max_attempts: int = Field(default=4, ge=1, le=10)
    stream: bool = False


class ConsolidationSettings(BaseModel):
    """``[consolidation]``: phase 2 (SPEC §7)."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(default_factory=default_consolidation_command, min_length=1)
    delay_s: float = Field(default=120.0, ge=0)
    min_interval_s: float = Field(default=600.0, ge=0)
    lease_s: float = Field(default=600.0, gt=0)
    timeout_s: float = Field(default=900.0, gt=0)
    kill_grace_s: float = Field(default=10.0, ge=0)
    max_traces_per_project: int = Field(default=10, ge=1)
    #: Consolidation commands run at once (memd's own consolidator takes several projects each).
    concurrency: int = Field(default=2, ge=1, le=16)
    model: str | None = None
    env: list[str] = Field(default_factory=list)
    #: MEMORY.md entries unused for this many days (on the project's own timeline) may fall out (SPEC §18).
    max_unused_days: float = Field(default=90.0, gt=0)


class ContextSettings(BaseModel):
    """``[context]``: what ``memd context`` gives a new session (SPEC §18).

    ``memd context`` reads these two keys without pydantic (``memd.read.context.load_context_settings``,
    held equal to this model by a test) to start fast.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    budget_tokens: int = Field(default=1_500, ge=200, le=2_000)


class Settings(BaseSettings):
    """Every memd setting. Paths have ``~`` expanded. See ``config.example.toml`` for comments."""

    model_config = SettingsConfigDict(
        env_prefix="MEMD_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    sessions: Annotated[list[Path], NoDecode] = Field(default_factory=default_sessions)
    state_dir: Path = Field(default_factory=default_state_dir)
    memory_dir: Path = Field(default_factory=default_memory_dir)
    min_idle_s: float = Field(default=3600.0, ge=0)
    max_age_days: float = Field(default=30.0, ge=0)
    extract_concurrency: int = Field(default=4, ge=1, le=64)
    extractor: Literal["auto", "offline", "openai"] = "auto"
    daily_token_budget: int = Field(default=0, ge=0)

    include_sources: list[str] = Field(default_factory=lambda: ["cli", "vscode", "unknown", "custom"])
    project_key: Literal["git", "cwd"] = "git"
    rescan_interval_s: float = Field(default=300.0, gt=0)
    force_polling: bool = False
    max_line_bytes: int = Field(default=64 << 20, ge=1024)
    tool_output_cap_bytes: int = Field(default=4096, ge=256)
    extract_lease_s: float = Field(default=900.0, gt=0)
    retry_base_s: float = Field(default=60.0, gt=0)
    retry_cap_s: float = Field(default=6 * 3600.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    llm: LLMSettings = Field(default_factory=LLMSettings)
    consolidation: ConsolidationSettings = Field(default_factory=ConsolidationSettings)
    context: ContextSettings = Field(default_factory=ContextSettings)

    # Where ``llm.api_key`` came from: "memd" (file, MEMD_LLM__API_KEY, flag), "OPENAI_API_KEY"
    # (the environment fallback, which never opts in by itself) or None. Set by load_settings.
    _api_key_source: str | None = PrivateAttr(default=None)

    @field_validator("sessions", mode="before")
    @classmethod
    def _split_sessions(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part for part in value.split(":") if part]
        return value

    @field_validator("sessions", mode="after")
    @classmethod
    def _expand_sessions(cls, value: list[Path]) -> list[Path]:
        return [Path(os.path.expanduser(p)) for p in value]

    @field_validator("state_dir", "memory_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return Path(os.path.expanduser(value))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags > environment > TOML file > defaults (SPEC §9)."""
        toml_path = _TOML_PATH.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @property
    def db_path(self) -> Path:
        """The SQLite state database: ``state_dir/memd.sqlite3``."""
        return self.state_dir / "memd.sqlite3"

    @property
    def api_key_source(self) -> str | None:
        """Where ``llm.api_key`` came from: ``"memd"`` (the config file, ``MEMD_LLM__API_KEY`` or a
        flag), ``"OPENAI_API_KEY"`` (the environment fallback), or ``None`` (no key)."""
        if self.llm.api_key is None or not self.llm.api_key.get_secret_value():
            return None
        return self._api_key_source or "memd"

    def resolved_extractor(self) -> tuple[str, str]:
        """Which extractor runs and why: ``("openai"|"offline", reason)`` (SPEC §9).

        ``auto`` means ``openai`` only when memd's own configuration holds a key; an
        ``OPENAI_API_KEY`` that is merely present in the environment does not opt in.
        """
        source = self.api_key_source
        if self.extractor == "offline":
            return "offline", "extractor = offline in the configuration"
        if self.extractor == "openai":
            return "openai", "extractor = openai in the configuration"
        if source == "memd":
            return "openai", "extractor = auto and memd's configuration holds an API key (llm.api_key)"
        if source == "OPENAI_API_KEY":
            return "offline", (
                "extractor = auto; OPENAI_API_KEY in the environment does not opt in "
                '(set extractor = "openai" or MEMD_EXTRACTOR=openai to send sessions to a model)'
            )
        return "offline", "extractor = auto and no API key is configured"


def _config_path(explicit: Path | None, environ: Mapping[str, str]) -> tuple[Path | None, bool]:
    """Return (path, named): the TOML file to read and whether the user named it."""
    if explicit is not None:
        return Path(os.path.expanduser(explicit)), True
    if environ.get("MEMD_CONFIG"):
        return Path(os.path.expanduser(environ["MEMD_CONFIG"])), True
    path = default_config_path()
    return (path if path.is_file() else None), False


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        key = ".".join(str(part) for part in item.get("loc", ())) or "(root)"
        lines.append(f"{key}: {item.get('msg', 'invalid value')}")
    return "; ".join(lines)


def load_settings(
    config_path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from flags, environment, TOML file and defaults.

    Args:
        config_path: ``--config`` value, or ``None`` to use ``MEMD_CONFIG`` or the XDG default.
        overrides: values from command-line flags, keyed by setting name (highest priority).
        environ: the environment (default ``os.environ``); only used to find the config file and
            the ``OPENAI_*`` fallbacks — pydantic-settings reads ``MEMD_*`` from ``os.environ``.

    Returns:
        The validated :class:`Settings`.

    Raises:
        ConfigError: the named file is missing or unreadable, its TOML is invalid, or a value is
            invalid. The message names the key and never prints a value.
    """
    env = os.environ if environ is None else environ
    path, named = _config_path(config_path, env)
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            with path.open("rb") as handle:
                tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    token = _TOML_PATH.set(path)
    try:
        settings = Settings(**dict(overrides or {}))
    except ValidationError as exc:
        where = f" (config file {path})" if path is not None and named else ""
        raise ConfigError(f"invalid configuration{where}: {_describe(exc)}") from None
    finally:
        _TOML_PATH.reset(token)
    if settings.llm.api_key is not None:
        settings._api_key_source = "memd"
    elif env.get("OPENAI_API_KEY"):
        settings.llm.api_key = SecretStr(env["OPENAI_API_KEY"])
        settings._api_key_source = "OPENAI_API_KEY"
    if settings.llm.base_url is None and env.get("OPENAI_BASE_URL"):
        settings.llm.base_url = env["OPENAI_BASE_URL"]
    if settings.extractor == "openai" and settings.llm.api_key is None and not settings.llm.base_url:
        raise ConfigError(
            "llm.api_key: extractor = openai needs an API key (llm.api_key, MEMD_LLM__API_KEY "
            "or OPENAI_API_KEY) or a local llm.base_url"
        )
    return settings
