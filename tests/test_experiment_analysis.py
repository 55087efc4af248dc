"""The MoE-vs-dense arithmetic by hand: pooled seed noise, the dense frontier of final losses, the cost to reach a
loss on it, factors with intervals and their verdicts, and the budget at which a growing factor would reach 2x."""

from __future__ import annotations

import math

import pytest

from sparselm.experiment.analysis import (
    Cell,
    Noise,
    budget_for_factor,
    cost_to_reach,
    factor,
    frontier,
    loss_at_cost,
    pooled_noise,
    t_quantile,
)


def test_t_quantile_matches_the_table() -> None:
    assert t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile(0) == pytest.approx(1.960, abs=1e-3)  # no degrees of freedom: the normal's
    assert t_quantile(30) == pytest.approx(2.042, abs=1e-3) and t_quantile(31) == pytest.approx(2.040, abs=1e-3)
    assert t_quantile(60) == pytest.approx(2.000, abs=1e-3) and t_quantile(120) == pytest.approx(1.980, abs=1e-3)


def test_pooled_noise_uses_every_cell_with_two_or_more_seeds() -> None:
    cells = [
        Cell("a", "dense", 10, 1.0, [4.0, 4.2]),  # squares 0.02, df 1
        Cell("b", "dense", 10, 1.0, [3.0, 3.1, 3.2]),  # squares 0.02, df 2
        Cell("c", "moe", 10, 1.0, [5.0]),  # one seed: no information about noise
    ]
    noise = pooled_noise(cells)
    assert noise.df == 3 and noise.sd == pytest.approx(math.sqrt(0.04 / 3))
    # half-width of a mean over 2 seeds and of a difference of means over 3 and 2 seeds
    assert noise.half_width(2) == pytest.approx(t_quantile(3) * noise.sd / math.sqrt(2))
    assert noise.half_width(3, 2) == pytest.approx(t_quantile(3) * noise.sd * math.sqrt(1 / 3 + 1 / 2))
    assert pooled_noise([cells[2]]).df == 0 and math.isinf(pooled_noise([cells[2]]).half_width(1))


def dense_cells() -> list[Cell]:
    # A made-up family: the small model wins at low budgets, the big one at high budgets; one cell is dominated.
    return [
        Cell("XS", "dense", 100, 1e12, [5.0, 5.0], [10.0, 12.0]),
        Cell("XS", "dense", 200, 2e12, [4.6, 4.6], [20.0, 22.0]),
        Cell("S", "dense", 100, 2e12, [4.8, 4.8], [15.0, 15.0]),  # dominated by XS@200 (same cost, higher loss)
        Cell("S", "dense", 200, 4e12, [4.2, 4.2, 4.2], [30.0, 30.0, 30.0]),
        Cell("M", "dense", 200, 16e12, [3.8, 3.8], [90.0, 90.0]),
    ]


def test_frontier_keeps_the_lower_envelope_in_cost_order() -> None:
    env = frontier(dense_cells())
    assert [(p.name, p.cost, p.loss) for p in env] == [
        ("XS@100", 1e12, 5.0),
        ("XS@200", 2e12, 4.6),
        ("S@200", 4e12, 4.2),
        ("M@200", 16e12, 3.8),
    ]
    on_time = frontier(dense_cells(), "seconds")
    assert [p.name for p in on_time] == ["XS@100", "S@100", "XS@200", "S@200", "M@200"]  # S@100 is cheaper in time


def test_cost_to_reach_interpolates_in_log_cost_and_bounds_outside() -> None:
    env = frontier(dense_cells())
    assert cost_to_reach(env, 4.4).cost == pytest.approx(math.sqrt(2e12 * 4e12))  # halfway in loss
    assert cost_to_reach(env, 4.4).bound == "=" and cost_to_reach(env, 4.4).n == 2  # min(2, 3) seeds
    assert cost_to_reach(env, 4.0).cost == pytest.approx(8e12)
    assert (cost_to_reach(env, 5.3).bound, cost_to_reach(env, 5.3).cost) == ("<", 1e12)
    assert (cost_to_reach(env, 3.5).bound, cost_to_reach(env, 3.5).cost) == (">", 16e12)
    assert loss_at_cost(env, 8e12) == pytest.approx(4.0)
    assert loss_at_cost(env, 0.5e12) is None and loss_at_cost(env, 20e12) is None


def test_factor_and_its_interval_and_verdicts() -> None:
    env = frontier(dense_cells())
    noise = Noise(sd=0.05, df=6)
    h = t_quantile(6) * 0.05 * math.sqrt(1 / 3 + 1 / 2)
    moe = Cell("MoE", "moe", 200, 2e12, [4.0, 4.0, 4.0], [40.0, 40.0, 40.0])
    f = factor(moe, env, noise)
    assert f.mid.value == pytest.approx(4.0) and f.half_width == pytest.approx(h)
    # low end: the loss mean + h read on the S@200 -> M@200 segment (min seeds 2)
    low = math.exp(math.log(4e12) + (4.2 - (4.0 + h)) / 0.4 * math.log(4)) / 2e12
    assert f.low.value == pytest.approx(low) and f.low.value > 1
    assert f.verdict() == "saving" and f.measurable
    assert "4.00x [" in f.format()
    # On the wall clock the MoE run is slow: 40 s against S@200's 30 s for the same loss.
    slow = factor(moe, frontier(dense_cells(), "seconds"), noise, axis="seconds")
    assert slow.mid.value == pytest.approx(math.sqrt(30.0 * 90.0) / 40.0)
    # Within noise of the frontier: the interval includes 1.
    near = factor(Cell("MoE", "moe", 200, 4e12, [4.2, 4.21, 4.19], [1.0] * 3), env, noise)
    assert near.low.value < 1 < near.high.value and near.verdict() == "no measurable saving"
    # Clearly worse than the frontier at its own cost.
    worse = factor(Cell("MoE", "moe", 200, 4e12, [4.55, 4.55, 4.55], [1.0] * 3), env, Noise(0.01, 6))
    assert worse.high.value < 1 and worse.verdict() == "costs more"
    # Better than every dense cell: only a lower bound.
    best = factor(Cell("MoE", "moe", 200, 4e12, [3.5, 3.5, 3.5], [1.0] * 3), env, Noise(0.01, 6))
    assert best.mid.bound == ">" and best.mid.value == pytest.approx(4.0) and best.verdict() == "saving"
    assert best.format().startswith("> 4.00x")
    # No noise estimate at all: nothing is measurable.
    assert factor(moe, env, Noise(math.nan, 0)).verdict() == "no measurable saving"


def test_budget_for_factor_extrapolates_a_growing_factor_only() -> None:
    # factor 1.0 at 1M tokens, 1.5 at 10M: a straight line in log budget reaches 2.0 at 100M
    assert budget_for_factor([1e6, 1e7], [1.0, 1.5], 2.0) == pytest.approx(1e8)
    assert budget_for_factor([1e6, 1e7], [1.5, 1.0], 2.0) is None
    assert budget_for_factor([1e6], [1.5], 2.0) is None
