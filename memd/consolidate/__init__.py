"""Phase 2, consolidation (SPEC §7): the runner (lease, subprocess) and the built-in consolidator.

``runner`` runs the configured command for one project under its lease; ``builtin`` is the
default command's implementation (``memd consolidate --root DIR``); ``gitlog`` records each
successful consolidation as a commit in the memory root.
"""
