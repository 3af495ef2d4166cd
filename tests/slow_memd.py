"""``python -m tests.slow_memd ARGS...``: the real ``memd`` command line with a slow extractor.

A test helper for the fault-injection suites (``tests/test_faults*.py``); production code and
configuration are untouched. When ``MEMD_TEST_EXTRACT_DELAY_S`` (seconds, float) is set, every
offline extraction first sleeps that long, so that jobs are in flight when a test kills or stops
memd. Then :func:`memd.cli.main` runs with ``ARGS``. Run it with ``PYTHONPATH`` set to the
repository root.
"""

from __future__ import annotations

import asyncio
import os
import sys

from memd import cli
from memd.extract.base import ExtractionRequest, ExtractionResult
from memd.extract.offline import OfflineExtractor


def install_delay(delay_s: float) -> None:
    """Make :meth:`OfflineExtractor.extract` sleep ``delay_s`` seconds before extracting."""
    real_extract = OfflineExtractor.extract

    async def slow_extract(self: OfflineExtractor, request: ExtractionRequest) -> ExtractionResult:
        await asyncio.sleep(delay_s)
        return await real_extract(self, request)

    OfflineExtractor.extract = slow_extract  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    """Install the delay the environment asks for, then run ``memd`` with ``argv``."""
    delay = os.environ.get("MEMD_TEST_EXTRACT_DELAY_S")
    if delay:
        install_delay(float(delay))
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
