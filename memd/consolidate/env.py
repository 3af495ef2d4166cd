"""The consolidation command's environment: an allow-list (SPEC §14).

The command gets PATH, HOME, USER, LOGNAME, SHELL, LANG, LANGUAGE, ``LC_*``, TZ, TMPDIR, every
``XDG_*``, CODEX_HOME, CLAUDE_CONFIG_DIR, VIRTUAL_ENV and PYTHONPATH (so ``python -m memd`` finds
the same installation), memd's non-secret settings (``MEMD_*`` in any case, except the API key and the
``MEMD_LLM`` table that can hold it, and for memd's
own consolidator ``OPENAI_BASE_URL``), the model key only when the command is memd's own
consolidator and the model extractor is configured, and the
names the user lists in ``[consolidation] env``. Nothing else of the daemon's environment reaches
it: ``GITHUB_TOKEN``, AWS keys and the like never do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

#: Variables always passed through when set.
ALLOWED_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR",
        "CODEX_HOME", "CLAUDE_CONFIG_DIR", "VIRTUAL_ENV", "PYTHONPATH",
    }
)  # fmt: skip
#: Prefixes of variables always passed through.
ALLOWED_PREFIXES = ("LC_", "XDG_")
#: memd's own settings are passed (the child reads the same configuration), except these, which can
#: carry the model key: ``MEMD_LLM`` is the whole ``[llm]`` table as JSON (pydantic-settings parses it).
#: Compared upper-cased: pydantic-settings reads ``MEMD_*`` names in any case (``MEMD_llm__api_key``).
SECRET_MEMD_NAMES = frozenset({"MEMD_LLM__API_KEY", "MEMD_LLM"})
#: The model key names, passed only to memd's own consolidator when it uses the model (``MEMD_*``
#: ones in any case).
MODEL_KEY_NAMES = ("OPENAI_API_KEY", "MEMD_LLM__API_KEY", "MEMD_LLM")
#: Settings memd reads under other names (SPEC §9), passed to memd's own consolidator.
OWN_SETTING_NAMES = frozenset({"OPENAI_BASE_URL", "MEMD_CONFIG"})


def is_own_consolidator(argv: Sequence[str]) -> bool:
    """Whether ``argv`` runs memd's own consolidator (``python -m memd ...`` or ``.../memd ...``)."""
    return list(argv[1:3]) == ["-m", "memd"] or (bool(argv) and Path(argv[0]).name == "memd")


def consolidation_env(
    argv: Sequence[str],
    *,
    uses_model: bool,
    extra_names: Iterable[str] = (),
    source: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Return the environment the consolidation command runs with.

    Args:
        argv: the configured command (before placeholder substitution).
        uses_model: the model extractor is configured (memd's own consolidator then consolidates
            with the model and needs the key).
        extra_names: ``[consolidation] env``: more variable names to pass when set.
        source: the environment to filter (default ``os.environ``).

    Returns:
        The allow-listed subset of ``source``.
    """
    source = os.environ if source is None else source
    extra = set(extra_names)
    own = is_own_consolidator(argv)
    key_names = set(MODEL_KEY_NAMES) if uses_model and own else set()
    if own:
        key_names |= OWN_SETTING_NAMES
    env: dict[str, str] = {}
    for name, value in source.items():
        memd_name = name.upper() if name.upper().startswith("MEMD_") else None  # read in any case
        if (
            name in ALLOWED_NAMES
            or name.startswith(ALLOWED_PREFIXES)
            or (memd_name is not None and memd_name not in SECRET_MEMD_NAMES)
            or name in extra
            or name in key_names
            or memd_name in key_names
        ):
            env[name] = value
    return env
