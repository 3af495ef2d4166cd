"""Prompt templates (Jinja2, ``StrictUndefined``), SPEC §1 and §6.4.

Templates are the files of the repository's ``templates/`` directory. An installed wheel carries
them as ``memd/templates`` (hatch ``force-include``); a source checkout reads the top-level
directory.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2


def templates_dir() -> Path:
    """The directory templates are loaded from: the packaged copy, else the checkout's."""
    packaged = resources.files("memd") / "templates"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "templates"


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )


def render(name: str, **context: Any) -> str:
    """Render the template file ``name`` (e.g. ``extract_system.md.j2``) with ``context``.

    Raises:
        jinja2.TemplateNotFound: no such template.
        jinja2.UndefinedError: the template uses a variable ``context`` does not give.
    """
    return _environment().get_template(name).render(**context)
