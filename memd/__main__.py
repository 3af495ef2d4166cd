"""``python -m memd`` and the ``memd`` console script.

``memd context`` runs as a fresh process at every agent session start (a SessionStart hook), so it is
dispatched here before :mod:`memd.cli` (structlog, pydantic settings) is imported.
"""

from __future__ import annotations

import sys

#: Global options that take a value (they may precede the command).
_VALUED = ("--config", "--log-level")


def _command(argv: list[str]) -> str | None:
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUED:
            skip = True
        elif arg.startswith("-"):
            continue
        else:
            return arg
    return None


def entry() -> None:
    """Run ``memd``: ``context`` on the fast path, everything else through :func:`memd.cli.main`."""
    argv = sys.argv[1:]
    if _command(argv) == "context" and "-h" not in argv and "--help" not in argv:
        from memd.read.context import main as context_main

        sys.exit(context_main(argv))
    from memd.cli import main

    sys.exit(main(argv))


if __name__ == "__main__":
    entry()
