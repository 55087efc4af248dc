"""Arithmetic of the MoE-vs-dense experiment: pure functions over the *final* losses of finished runs.

A **cell** is one model trained to one budget with its own full schedule, repeated over seeds. Its loss is the mean
over seeds with a 95% Student-t interval; the seed standard deviation is pooled over every cell with two or more
seeds (the runs differ in size and budget, not in how noisy a seed is), which gives small cells a usable estimate.

The **dense frontier** is the lower envelope of the dense cells' mean final losses against a cost (training FLOPs or
training seconds): the cells no cheaper cell beats, joined by straight lines in (log cost, loss). The cost to reach a
loss is read off it; below the cheapest point or past the best one only a bound is known. An intermediate point of a
longer run is never a frontier point: its learning rate has not decayed, so it says nothing about a run of that length.

A **factor** is dense frontier cost / MoE cost at the MoE cell's mean loss. Its interval comes from the loss interval
of the difference between the MoE cell and the frontier (both noisy): the factor at mean + h and at mean - h, where
h = t * sd * sqrt(1/n_moe + 1/n_dense) and n_dense is the seeds of the frontier cells next to that loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Curve = list[tuple[float, float]]


def run_curve(run: dict, x: str = "flops") -> Curve:
    """A run record's validation curve from ``results.json`` against ``x`` (flops, tokens or train_seconds)."""
    return [(p[x], p["val_loss"]) for p in run["curve"] if p.get(x)]


# Two-sided 95% Student-t quantiles (t_0.975) for 1..30 degrees of freedom, from the standard table.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964


def t_quantile(df: int) -> float:
    """The 97.5% Student-t quantile (a two-sided 95% interval); the normal's for no degrees of freedom. Past the
    table, the Cornish-Fisher expansion in 1/df (within 1e-4 of the exact value from 30 degrees of freedom on)."""
    if df <= 0:
        return _Z975
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass
class Cell:
    """One model at one budget, over seeds: what the report calls a run."""

    name: str  # "dense-S", "MoE-16 top-1 + shared", ...
    kind: str  # dense | moe
    steps: int
    flops: float  # training FLOPs of one run
    losses: list[float] = field(default_factory=list)  # final validation loss of each seed
    seconds: list[float] = field(default_factory=list)  # training wall time of each seed

    @property
    def n(self) -> int:
        return len(self.losses)

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses)

    @property
    def mean_seconds(self) -> float | None:
        return sum(self.seconds) / len(self.seconds) if self.seconds else None

    def cost(self, axis: str) -> float | None:
        return self.flops if axis == "flops" else self.mean_seconds


@dataclass
class Noise:
    """The pooled seed standard deviation of final losses and its degrees of freedom."""

    sd: float
    df: int

    def half_width(self, *ns: int) -> float:
        """95% half-width of a mean over ``ns[0]`` seeds, or of a difference of means over ``ns`` seeds."""
        if self.df == 0:
            return math.inf
        return t_quantile(self.df) * self.sd * math.sqrt(sum(1 / n for n in ns))


def pooled_noise(cells: list[Cell]) -> Noise:
    squares, df = 0.0, 0
    for c in cells:
        if c.n >= 2:
            mean = c.loss
            squares += sum((x - mean) ** 2 for x in c.losses)
            df += c.n - 1
    return Noise(math.sqrt(squares / df) if df else math.nan, df)


@dataclass
class Point:
    cost: float
    loss: float
    n: int
    name: str


def frontier(cells: list[Cell], axis: str = "flops") -> list[Point]:
    """The lower envelope of the cells' mean final losses against ``axis`` (flops or seconds), cheapest first."""
    points = sorted(
        (Point(c.cost(axis), c.loss, c.n, f"{c.name}@{c.steps}") for c in cells if c.cost(axis)),
        key=lambda p: (p.cost, p.loss),
    )
    envelope: list[Point] = []
    for p in points:
        if not envelope or p.loss < envelope[-1].loss:
            envelope.append(p)
    return envelope


@dataclass
class Reach:
    """The frontier cost to reach a loss: exact (``bound`` "="), or only a bound ("<": cheaper than the frontier's
    cheapest point, ">": beyond its best point)."""

    cost: float
    bound: str
    n: int  # seeds of the frontier cells it was read between (the fewer of the two)


def cost_to_reach(envelope: list[Point], loss: float) -> Reach:
    if not envelope:
        raise ValueError("empty frontier")
    if loss >= envelope[0].loss:
        return Reach(envelope[0].cost, "=" if loss == envelope[0].loss else "<", envelope[0].n)
    for a, b in zip(envelope, envelope[1:], strict=False):
        if b.loss <= loss:
            t = (a.loss - loss) / (a.loss - b.loss)
            cost = math.exp(math.log(a.cost) + t * (math.log(b.cost) - math.log(a.cost)))
            return Reach(cost, "=", min(a.n, b.n))
    return Reach(envelope[-1].cost, ">", envelope[-1].n)


def loss_at_cost(envelope: list[Point], cost: float) -> float | None:
    """The frontier's loss at ``cost`` (interpolated in log cost), or None outside its range."""
    if not envelope or cost < envelope[0].cost or cost > envelope[-1].cost:
        return None
    for a, b in zip(envelope, envelope[1:], strict=False):
        if a.cost <= cost <= b.cost:
            t = (math.log(cost) - math.log(a.cost)) / (math.log(b.cost) - math.log(a.cost))
            return a.loss + t * (b.loss - a.loss)
    return envelope[-1].loss


@dataclass
class Bounded:
    """A number that may be known only as a bound: ``bound`` is "=", "<" (at most) or ">" (at least)."""

    value: float
    bound: str = "="

    def format(self, spec: str = ".2f", suffix: str = "x") -> str:
        prefix = {"=": "", "<": "< ", ">": "> "}[self.bound]
        return f"{prefix}{self.value:{spec}}{suffix}"


@dataclass
class Factor:
    """Dense frontier cost / MoE cost, with its 95% interval (``low`` from mean + h, ``high`` from mean - h)."""

    mid: Bounded
    low: Bounded
    high: Bounded
    loss: float
    half_width: float

    @property
    def measurable(self) -> bool:
        """True when the whole interval is above 1 (a saving) or below 1 (a loss): it excludes 1."""
        return self.saving or self.costs_more

    @property
    def saving(self) -> bool:
        return self.low.value > 1 and self.low.bound in ("=", ">")

    @property
    def costs_more(self) -> bool:
        return self.high.value < 1 and self.high.bound in ("=", "<")

    def format(self) -> str:
        return f"{self.mid.format()} [{self.low.format(suffix='')}, {self.high.format()}]"

    def verdict(self) -> str:
        if self.saving:
            return "saving"
        if self.costs_more:
            return "costs more"
        return "no measurable saving"


def factor(moe: Cell, envelope: list[Point], noise: Noise, axis: str = "flops") -> Factor | None:
    """How many times its own cost the dense frontier needs to reach ``moe``'s mean final loss, with an interval."""
    cost = moe.cost(axis)
    if cost is None or not envelope:
        return None
    mid = cost_to_reach(envelope, moe.loss)
    h = noise.half_width(moe.n, max(mid.n, 1))
    low = cost_to_reach(envelope, moe.loss + h) if math.isfinite(h) else Reach(0.0, "<", 0)
    high = cost_to_reach(envelope, moe.loss - h) if math.isfinite(h) else Reach(math.inf, ">", 0)
    return Factor(
        mid=Bounded(mid.cost / cost, mid.bound),
        low=Bounded(low.cost / cost, low.bound),
        high=Bounded(high.cost / cost, high.bound),
        loss=moe.loss,
        half_width=h,
    )


def budget_for_factor(budgets: list[float], factors: list[float], target: float) -> float | None:
    """Least-squares line of factor against log budget; the budget where it reaches ``target`` (None if the factor
    does not grow). An extrapolation, and the report says so."""
    if len(budgets) < 2:
        return None
    xs = [math.log(b) for b in budgets]
    mx, my = sum(xs) / len(xs), sum(factors) / len(factors)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, factors, strict=True)) / sxx
    if slope <= 0:
        return None
    return math.exp(mx + (target - my) / slope)
