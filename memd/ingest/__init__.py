"""Ingest (SPEC §2, §3): find rollout files, read them incrementally, watch for changes, index threads.

``files`` opens and stats one file, ``scan`` walks the roots, ``reader`` does the bounded head read and the
watermark-based tail read, ``watch`` wraps :func:`watchfiles.awatch`, and ``indexer`` turns what they return into
thread and file rows in the store. Only the indexer touches the store.
"""
