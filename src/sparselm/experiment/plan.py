"""What the MoE-vs-dense experiment trains and for how long: the regime search, the main layout (dense frontier,
recipes, seeds, the sweeps over experts and budget) and the number of steps that fits the wall-time budget.

Every run's steps are set here and its schedule follows from them (warmup 10%, cosine to 10% ending at its own last
step), so a run trained to a quarter of the budget is a finished run of that length, not a checkpoint of a longer one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sparselm.experiment.family import RECIPES, Regime, RunSpec, dense_run, moe_run, with_overrides

FIRST_SEED = 1234
BUDGET_FRACTIONS = (0.25, 0.5, 1.0)  # each dense size and the best recipe are trained to these fractions of B
SEARCH_RECIPE = "deepspeed"  # the recipe that the search trains in every candidate regime (see the report)
SEARCH_SHARE = 0.15  # of the budget spent on the regime search
EVAL_POINTS = 4  # validation points per run: the last one is the run's final loss
# Real training is slower than the random-token timing: routing on real text is unbalanced early on, and validation,
# checkpoints and logging take time (docs/moe-vs-dense-design.md).
PLAN_SLACK = 1.25


@dataclass
class Layout:
    """How many seeds and which sweeps the main stage trains."""

    seeds: int = 3  # dense-S and the best recipe at the full budget
    other_seeds: int = 2  # every other cell
    recipes: tuple[str, ...] = ("switch", "gshard", "deepspeed")
    sweep_experts: tuple[int, ...] = (4, 64)  # numbers of experts for the best recipe besides the regime's
    variants: list[str] = field(default_factory=list)  # BASE:section.key=value,... (see parse_variant)
    moe_overrides: list[str] = field(default_factory=list)


def seeds(n: int) -> list[int]:
    return [FIRST_SEED + i for i in range(n)]


def budgets(steps: int) -> list[int]:
    return [max(1, round(steps * f)) for f in BUDGET_FRACTIONS]


def search_runs(regimes: list[Regime], vocab_size: int, steps: int) -> list[RunSpec]:
    """dense-S and the search recipe in every candidate regime, one seed, ``steps`` each."""
    runs = []
    for regime in regimes:
        runs.append(dense_run(regime, vocab_size, "S", steps, FIRST_SEED, group=f"search-{regime.name}"))
        runs.append(
            moe_run(regime, vocab_size, SEARCH_RECIPE, regime.experts, steps, FIRST_SEED, f"search-{regime.name}")
        )
    return runs


def main_runs(regime: Regime, vocab_size: int, steps: int, layout: Layout, best: str | None) -> list[RunSpec]:
    """The main stage in training order. Without ``best`` (not known until the recipes have been trained) only the
    dense frontier, the recipes at the full budget and the variants; with it, also the best recipe's third seed,
    its sweep over the number of experts and its shorter budgets."""
    full = budgets(steps)[-1]
    e = regime.experts
    runs: list[RunSpec] = []
    runs += [dense_run(regime, vocab_size, "S", full, s) for s in seeds(layout.seeds)]
    for key in layout.recipes:
        runs += [moe_run(regime, vocab_size, key, e, full, s, moe_overrides=layout.moe_overrides) for s in seeds(2)]
    for size in regime.sizes:
        for b in budgets(steps):
            if not (size == "S" and b == full):
                runs += [dense_run(regime, vocab_size, size, b, s) for s in seeds(layout.other_seeds)]
    runs += [r for text in layout.variants for r in parse_variant(text, regime, vocab_size, full, layout)]
    if best is not None:
        runs += [
            moe_run(regime, vocab_size, best, e, full, s, moe_overrides=layout.moe_overrides)
            for s in seeds(layout.seeds)[2:]
        ]
        for n in layout.sweep_experts:
            if n != e:
                runs += [
                    moe_run(regime, vocab_size, best, n, full, s, moe_overrides=layout.moe_overrides)
                    for s in seeds(layout.other_seeds)
                ]
        for b in budgets(steps)[:-1]:
            runs += [
                moe_run(regime, vocab_size, best, e, b, s, moe_overrides=layout.moe_overrides)
                for s in seeds(layout.other_seeds)
            ]
    slugs = [r.slug for r in runs]
    if len(set(slugs)) != len(slugs):
        from sparselm.errors import InputError

        raise InputError("two runs of the experiment would share a directory (a --variant repeats a run?)")
    return runs


def parse_variant(text: str, regime: Regime, vocab_size: int, steps: int, layout: Layout) -> list[RunSpec]:
    """``BASE:section.key=value[,...]`` -> the runs of a recipe variant: BASE (a recipe key such as ``switch``, or a
    dense size such as ``dense-S``) at the full budget with the changes, over ``layout.other_seeds`` seeds."""
    from sparselm.errors import ConfigError

    base, sep, rest = text.partition(":")
    overrides = [item.strip() for item in rest.split(",") if item.strip()]
    if not sep or not overrides:
        raise ConfigError(f"--variant {text!r}: expected BASE:section.key=value[,section.key=value...]")
    sizes = {f"dense-{s}": s for s in regime.sizes}
    if base in RECIPES:
        make = lambda s: moe_run(  # noqa: E731
            regime, vocab_size, base, regime.experts, steps, s, moe_overrides=layout.moe_overrides
        )
    elif base in sizes:
        make = lambda s: dense_run(regime, vocab_size, sizes[base], steps, s)  # noqa: E731
    else:
        known = ", ".join([*RECIPES, *sizes])
        raise ConfigError(f"--variant {text!r}: unknown base {base!r} (one of {known})")
    return [with_overrides(make(s), overrides) for s in seeds(layout.other_seeds)]


# ---------------------------------------------------------------------------------------------------------- timing


def time_steps(run: RunSpec, warmup: int = 2, steps: int = 3) -> float:
    """Median seconds per optimizer step of ``run`` on random tokens, after ``warmup`` untimed steps (the first
    steps pay for allocation and are slower than the rest)."""
    from sparselm.parallel.runtime import Runtime
    from sparselm.train.trainer import build_model, forward_backward

    cfg = run.cfg
    runtime = Runtime(cfg, torch.device("cpu"))
    model = runtime.parallelize(build_model(cfg))
    model.train()
    optimizer, _ = runtime.build_optimizer(model)
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.train.global_batch_size, cfg.data.seq_len)
    x = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
    y = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, cfg, x, y, 1, runtime)
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def step_seconds(runs: list[RunSpec], known: dict[str, float], progress: bool = True) -> dict[str, float]:
    """Seconds per step of every distinct model among ``runs`` (by ``timing_key``), measuring only the ones not in
    ``known``."""
    from tqdm import tqdm

    todo = {r.timing_key: r for r in runs if r.timing_key not in known}
    out = dict(known)
    for name, run in tqdm(todo.items(), desc="timing", unit="model", disable=not progress, dynamic_ncols=True):
        out[name] = time_steps(run)
    return out


def run_seconds(run: RunSpec, seconds_per_step: float, eval_batches: int) -> float:
    """Planned wall time of one run: its steps plus EVAL_POINTS validations (a forward is ~1/3 of a step)."""
    return (run.steps + EVAL_POINTS * eval_batches / 3) * seconds_per_step * PLAN_SLACK


def fit_steps(cost_of: callable, seconds: float, minimum: int = 8) -> int:
    """The largest full budget B (a multiple of 4, at least ``minimum``) whose runs fit in ``seconds``:
    ``cost_of(B)`` is the planned wall time of the runs at B, which grows with B."""
    lo, hi = minimum, minimum
    if cost_of(lo) > seconds:
        return minimum
    while cost_of(hi * 2) <= seconds and hi < 1_000_000:
        hi *= 2
    hi *= 2
    while hi - lo > 4:
        mid = (lo + hi) // 2 // 4 * 4
        if mid <= lo:
            break
        if cost_of(mid) <= seconds:
            lo = mid
        else:
            hi = mid
    return lo
