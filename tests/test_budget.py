"""Token estimate calibration and the daily token budget (SPEC §6.2, §9 ``daily_token_budget``)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from memd.clock import FakeClock
from memd.errors import BudgetExhausted, ExtractorError
from memd.llm.budget import DailyBudget, TokenEstimator, next_utc_midnight, utc_day_start

# FakeClock's default start, 2026-01-01T00:00:00Z (20454 days × 86400 s).
DAY1 = 1_767_225_600.0


def test_fake_clock_starts_at_a_utc_midnight():
    assert FakeClock().now() == DAY1
    assert utc_day_start(DAY1) == DAY1
    assert utc_day_start(DAY1 + 86_399.5) == DAY1
    assert next_utc_midnight(DAY1) == DAY1 + 86_400
    assert next_utc_midnight(DAY1 + 13.5 * 3600) == DAY1 + 86_400


# -- TokenEstimator ---------------------------------------------------------------------------


def test_default_estimate_is_bytes_over_four_rounded_up():
    est = TokenEstimator()
    assert est.estimate(0) == 0
    assert est.estimate(1) == 1
    assert est.estimate(4000) == 1000
    assert est.estimate(4001) == 1001


def test_first_observation_replaces_the_start_ratio_then_it_moves_by_moving_average():
    est = TokenEstimator()
    est.observe(30_000, 10_000)
    assert est.bytes_per_token == pytest.approx(3.0)
    assert est.estimate(30_000) == 10_000
    est.observe(60_000, 10_000)  # ratio 6
    assert est.bytes_per_token == pytest.approx(0.8 * 3.0 + 0.2 * 6.0)
    assert est.samples == 2


def test_repeated_observations_converge():
    est = TokenEstimator(6.0, samples=5)
    for _ in range(60):
        est.observe(32_000, 10_000)
    assert est.bytes_per_token == pytest.approx(3.2, abs=1e-3)


@pytest.mark.parametrize(
    ("text_bytes", "tokens", "expected"),
    [(100_000, 1_000, 8.0), (1_000, 1_000, 1.5), (5_000, 10_000, 1.5)],
)
def test_the_ratio_is_clamped(text_bytes, tokens, expected):
    est = TokenEstimator()
    est.observe(text_bytes, tokens)
    assert est.bytes_per_token == expected
    assert TokenEstimator(50.0).bytes_per_token == 8.0
    assert TokenEstimator(0.1).bytes_per_token == 1.5


@pytest.mark.parametrize(("text_bytes", "tokens"), [(100, 30), (10_000, 0), (10_000, -5)])
def test_tiny_or_tokenless_observations_are_ignored(text_bytes, tokens):
    est = TokenEstimator()
    est.observe(text_bytes, tokens)
    assert est.bytes_per_token == 4.0
    assert est.samples == 0


def test_json_round_trip():
    est = TokenEstimator()
    est.observe(35_000, 10_000)
    again = TokenEstimator.from_json(est.to_json())
    assert again.bytes_per_token == pytest.approx(3.5)
    assert again.samples == 1
    again.observe(70_000, 10_000)  # not the first sample any more: averaged, not replaced
    assert again.bytes_per_token == pytest.approx(0.8 * 3.5 + 0.2 * 7.0)


@pytest.mark.parametrize(
    "text", ["not json", '{"samples": 3}', '{"bytes_per_token": "NaN"}', "[1, 2]"]
)
def test_unreadable_json_gives_the_default_with_one_warning(text):
    with capture_logs() as logs:
        est = TokenEstimator.from_json(text)
    assert (est.bytes_per_token, est.samples) == (4.0, 0)
    assert [entry["event"] for entry in logs] == ["token_estimator_reset"]


def test_missing_json_gives_the_default_silently():
    with capture_logs() as logs:
        est = TokenEstimator.from_json(None)
    assert (est.bytes_per_token, est.samples) == (4.0, 0)
    assert logs == []


async def test_the_estimator_persists_in_the_store_meta_table(tmp_path):
    from memd.store.store import Store

    store = await Store.open(tmp_path / "memd.sqlite3", clock=FakeClock())
    try:
        est = TokenEstimator()
        est.observe(27_000, 10_000)
        await store.meta.set("token_estimator", est.to_json())
        restored = TokenEstimator.from_json(await store.meta.get("token_estimator"))
        assert restored.bytes_per_token == pytest.approx(2.7)
        assert restored.samples == 1
    finally:
        await store.close()


# -- DailyBudget ------------------------------------------------------------------------------


class FixedSource:
    def __init__(self, spent: int) -> None:
        self.spent = spent
        self.asked: list[float] = []

    async def tokens_since(self, since: float) -> int:
        self.asked.append(since)
        return self.spent


async def test_zero_limit_is_unlimited():
    source = FixedSource(10**12)
    budget = DailyBudget(0, source, FakeClock())
    assert await budget.remaining() is None
    await budget.check()


async def test_remaining_counts_from_utc_midnight():
    clock = FakeClock()
    clock.advance(13.5 * 3600)
    source = FixedSource(400)
    budget = DailyBudget(1000, source, clock)
    assert await budget.remaining() == 600
    await budget.check()
    assert source.asked == [DAY1, DAY1]


async def test_check_raises_with_resume_at_next_utc_midnight():
    clock = FakeClock()
    clock.advance(20 * 3600)
    budget = DailyBudget(1000, FixedSource(1001), clock)
    assert await budget.remaining() == 0
    with pytest.raises(BudgetExhausted, match="2026-01-02T00:00:00Z") as info:
        await budget.check()
    assert info.value.resume_at == DAY1 + 86_400
    assert isinstance(info.value, ExtractorError)


async def test_budget_with_the_real_store_resets_at_the_day_boundary(tmp_path):
    from memd.store.store import Store

    clock = FakeClock()
    store = await Store.open(tmp_path / "memd.sqlite3", clock=clock)
    try:
        budget = DailyBudget(1000, store.usage, clock)
        clock.advance(23 * 3600)  # 2026-01-01 23:00Z
        await store.usage.record_usage("extract", "m", 900, 100, 0)
        assert await budget.remaining() == 0
        with pytest.raises(BudgetExhausted):
            await budget.check()
        clock.advance(2 * 3600)  # 2026-01-02 01:00Z: a new UTC day
        await store.usage.record_usage("extract", "m", 40, 10, 0)
        assert await budget.remaining() == 950
        await budget.check()
    finally:
        await store.close()
