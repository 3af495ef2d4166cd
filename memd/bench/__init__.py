"""Benchmarks (SPEC §15): a synthetic Codex rollout corpus and the ``memd bench`` harness.

* :mod:`memd.bench.corpus` — deterministic generator of realistic rollouts with the facts each
  file holds by construction.
* :mod:`memd.bench.harness` — measures each §15 figure beside a naive baseline.
"""
