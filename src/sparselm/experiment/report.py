"""The MoE-vs-dense report, rendered from ``results.json`` alone: every number and every verdict sentence is derived
from the results (``cells.analyse``), nothing is written by hand. ``python -m sparselm.experiment.report
OUT/results.json REPORT.md`` re-renders it (the test suite does so for the committed report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sparselm.experiment.analysis import Factor
from sparselm.experiment.cells import GOAL, GOAL_LOW, Analysis, MoECell, analyse, runs_of, search_table
from sparselm.experiment.plots import plot_cells, plot_curves, plot_expert_load


def _human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def _loss(cell, noise) -> str:
    h = noise.half_width(cell.n)
    return f"{cell.loss:.3f} ± {h:.3f}" if h != float("inf") else f"{cell.loss:.3f}"


def _factor(f: Factor | None) -> str:
    return f.format() if f is not None else "-"


def _meets_goal(f: Factor) -> bool:
    return f.mid.value >= GOAL and f.mid.bound in ("=", ">") and f.low.value > GOAL_LOW and f.low.bound in ("=", ">")


def _trend(factors: list[Factor]) -> str:
    """How the factors' point estimates move, and whether any of them is told apart from 1 by its interval."""
    values = [f.mid.value for f in factors]
    if len(values) < 2:
        return "one point only"
    if all(b > a for a, b in zip(values, values[1:], strict=False)):
        trend = "its point estimate grows"
    elif all(b < a for a, b in zip(values, values[1:], strict=False)):
        trend = "its point estimate falls"
    else:
        trend = "its point estimate moves without a clear direction"
    return trend if any(f.measurable for f in factors) else f"{trend}, but every interval includes 1"


def _tokens(results: dict[str, Any], steps: int) -> int:
    regime = _regime(results)
    return steps * regime["seq_len"] * regime["batch_size"]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _regime(results: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in results["regimes"] if r["name"] == results["plan"]["regime"])


# ---------------------------------------------------------------------------------------------------------- verdict


def verdict_lines(a: Analysis, results: dict[str, Any]) -> list[str]:
    """The report's first lines: what the numbers support, whichever way it goes."""
    best = a.best
    if best is None or best.flops_factor is None:
        return ["**Verdict: no MoE run finished**, so there is nothing to compare."]
    f = best.flops_factor
    if _meets_goal(f):
        phrase = f"the experts save compute: the dense frontier needs {f.mid.format()} the FLOPs"
    elif f.saving:
        phrase = f"a measurable saving of {f.mid.format()}, short of the {GOAL:.0f}x goal"
    elif f.costs_more:
        phrase = "the MoE costs more training compute than dense"
    else:
        phrase = "no measurable saving"
    n_tokens = _tokens(results, best.cell.steps)
    lines = [
        f"**Verdict: {phrase}.** The best MoE, {best.cell.name} ({best.cell.n} seeds, {n_tokens:,} training tokens "
        f"each), ends at validation loss {_loss(best.cell, a.noise)}; the dense frontier needs "
        f"{f.mid.format()} its training FLOPs to reach that loss, 95% interval [{f.low.format(suffix='')}, "
        f"{f.high.format()}] (goal: >= {GOAL:.0f}x with the interval's lower end above {GOAL_LOW}x: "
        f"**{'met' if _meets_goal(f) else 'not met'}**).",
        "",
    ]
    t = best.time_factor
    if t is not None:
        lines.append(f"- **Wall clock on this CPU**: {t.format()}, {t.verdict()} (same frontier on training seconds).")
    if best.delta is not None:
        worth = f", worth {best.s_factor.format()} of dense-S's compute" if best.s_factor else ""
        sign = "below" if best.delta < 0 else "above"
        within = abs(best.delta) <= best.delta_half_width
        lines.append(
            f"- **Equal steps**: {abs(best.delta):.3f} ± {best.delta_half_width:.3f} nats {sign} dense-S trained for "
            f"the same {best.cell.steps} steps ({best.dense_s.n} seeds){worth}" + ("; within noise." if within else ".")
        )
    if len(a.by_experts) > 1:
        parts = [f"E={m.num_experts} {_factor(m.flops_factor)}" for m in a.by_experts]
        trend = _trend([m.flops_factor for m in a.by_experts if m.flops_factor])
        lines.append(
            f"- **Number of experts** ({best.cell.name.split(' ', 1)[1]}, full budget): {'; '.join(parts)}: {trend}."
        )
    if len(a.by_budget) > 1:
        parts = [f"{_tokens(results, m.cell.steps):,} tokens {_factor(m.flops_factor)}" for m in a.by_budget]
        trend = _trend([m.flops_factor for m in a.by_budget if m.flops_factor])
        line = f"- **Token budget** ({best.cell.name}): {'; '.join(parts)}: {trend}"
        if a.budget_for_goal is not None:
            line += (
                f"; a straight line through the point estimates that are not bounds, in log budget, reaches "
                f"{GOAL:.0f}x at about "
                f"{_human(a.budget_for_goal)} tokens per run (an extrapolation, not a measurement)."
            )
        else:
            line += f"; no budget at which it would reach {GOAL:.0f}x follows from these points."
        lines.append(line)
    others = [m for m in a.moe if m.cell.steps == a.full_steps and m is not best and m.flops_factor]
    if others:
        parts = [f"{m.cell.name} {m.flops_factor.format()} ({m.flops_factor.verdict()})" for m in others]
        lines.append(f"- **Other MoE runs at the full budget**: {'; '.join(parts)}.")
    lines += _limits(results, best)
    return lines + [""]


def _limits(results: dict[str, Any], best: MoECell) -> list[str]:
    run = runs_of(results, best.cell)[0]
    share = run["flops_share"]
    regime = _regime(results)
    per_step = regime["seq_len"] * regime["batch_size"] * run["top_k"] // run["num_experts"]
    return [
        f"- **What the experts can change**: the FFNs they replace are {share['replaced_ffns']:.0%} of a token's "
        f"training FLOPs in dense-S (the output layer {share['output_layer']:.0%}); each routed expert sees about "
        f"{per_step:,} tokens per step and {per_step * best.cell.steps:,} over the run."
    ]


# --------------------------------------------------------------------------------------------------------- sections


def _setup_lines(results: dict[str, Any], a: Analysis) -> list[str]:
    m, d, w = results["machine"], results["dataset"], results["wall_minutes"]
    regime = _regime(results)
    load = results["load_average"]["max"]
    jobs = results["options"].get("jobs", 1)
    per_run = results["options"].get("threads_per_run", m["torch_threads"])
    ours = jobs * per_run
    shared = (
        f"the machine was shared (1-minute load average up to {load:.1f} with {ours} of our threads)"
        if load is not None and load > ours + 0.5
        else f"the machine was not shared (1-minute load average at most {load:.1f})"
        if load is not None
        else "machine load not recorded"
    )
    threads = _plural(per_run, "thread") + (f" each, {jobs} runs at a time" if jobs > 1 else "")
    splits = d["splits"]
    full = a.full_steps
    budgets = sorted({c.steps for c in a.dense})
    return [
        f"- **Command**: `{results['command']}`",
        f"- **Date**: {results['created']} (UTC)",
        f"- **Machine**: {m['cpu']} ({', '.join(m['flags']) or 'no avx2/avx512 flags'}), {m['cores']} cores, "
        f"{m['memory_gib']} GiB, torch {m['torch']}, {threads}; matmul peak measured "
        f"{results['matmul_peak_flops']['bf16'] / 1e9:.0f} GFLOP/s bf16, "
        f"{results['matmul_peak_flops']['fp32'] / 1e9:.0f} GFLOP/s fp32; {shared}",
        f"- **Data**: {', '.join(results['options']['data'])}; SentencePiece BPE vocabulary {d['vocab_size']:,}; "
        f"train {splits['train']['tokens']:,} tokens, validation {splits['val']['tokens']:,} tokens "
        f"({splits['val']['documents']} documents, held out by document)",
        f"- **Regime**: {regime['name']}: {regime['about']}; {regime['batch_size']} x {regime['seq_len']} tokens per "
        f"step; " + ("chosen by the search below" if search_table(results) else "given by `--regimes` (no search)"),
        f"- **Training**: every run has its own schedule (AdamW, warmup {results['warmup_fraction']:.0%} of its "
        f"steps, cosine to 10% at its last step), {results['precision']}; full budget B = {full} steps "
        f"({_tokens(results, full):,} tokens); dense sizes at {', '.join(map(str, budgets))} steps; the final "
        f"validation loss is measured on the first {results['options']['eval_batches']} validation batches",
        f"- **Seeds**: pooled seed standard deviation of final losses {a.noise.sd:.4f} ({a.noise.df} degrees of "
        "freedom); every ± is a 95% Student-t half-width, every [a, b] a 95% interval",
        f"- **Wall time**: {w['total']:.1f} min: data {w['data']:.1f}, timing {w['plan']:.1f}, search "
        f"{w['search']:.1f}, main {w['main']:.1f} (summed over invocations)",
    ]


def _search_lines(results: dict[str, Any]) -> list[str]:
    rows = search_table(results)
    if not rows:
        return []
    steps = results["plan"].get("search_steps")
    lines = [
        "## Regime search",
        "",
        f"dense-S and MoE-E {rows[0]['moe']['model'].split(' ', 1)[1]} trained for {steps} steps in every candidate "
        "regime (one seed); the regime where the MoE ends furthest below dense-S is the one the experiment runs in.",
        "",
        "| regime | what it is | replaced FFNs / output layer (share of FLOPs) | tokens per expert per step | dense-S "
        "| MoE | MoE gain (nats) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    chosen = results["plan"]["regime"]
    for row in rows:
        r, share = row["regime"], row["dense"]["flops_share"]
        name = f"**{r['name']}**" if r["name"] == chosen else r["name"]
        lines.append(
            f"| {name} | {r['about']} | {share['replaced_ffns']:.0%} / {share['output_layer']:.0%} | "
            f"{row['tokens_per_expert_step']:,} | {row['dense']['final_val_loss']:.3f} | "
            f"{row['moe']['final_val_loss']:.3f} | {row['gain']:+.3f} |"
        )
    return lines + [""]


def _dense_lines(results: dict[str, Any], a: Analysis, plots: dict[str, str]) -> list[str]:
    on = {p.name for p in a.flops_frontier}
    lines = [
        "## The dense frontier",
        "",
        f"![final validation loss against training FLOPs]({plots['cells']})",
        "",
        "Every point is a finished run (its own warmup and decay), mean over seeds; the line is the frontier, the "
        "lower envelope of the dense points, which an MoE run is read against. Training FLOPs = tokens x (6 x active "
        "matmul parameters + attention + router), from `sparselm params`.",
        "",
        "| model | d_model x layers, FFN | steps | tokens | training FLOPs | final loss | seeds | training time | "
        "on the frontier |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    sizes = list(_regime(results)["sizes"])
    for c in sorted(
        a.dense,
        key=lambda c: (
            sizes.index(c.name.removeprefix("dense-")) if c.name.removeprefix("dense-") in sizes else len(sizes),
            c.steps,
        ),
    ):
        shape = runs_of(results, c)[0]["shape"]
        lines.append(
            f"| {c.name} | {shape['d_model']} x {shape['n_layers']}, {shape['d_ff']} | {c.steps} | "
            f"{_human(_tokens(results, c.steps))} | {_human(c.flops)} | {_loss(c, a.noise)} | {c.n} | "
            f"{c.mean_seconds:.0f} s | {'yes' if f'{c.name}@{c.steps}' in on else ''} |"
        )
    return lines + [""]


def _moe_lines(results: dict[str, Any], a: Analysis) -> list[str]:
    lines = [
        "## MoE runs",
        "",
        "Factor = the dense frontier's cost to reach the run's mean final loss / the run's cost, with its 95% "
        "interval from the seed noise of both ('>': beyond the best dense point, '<': below the cheapest); an "
        "interval that includes 1 is no measurable saving. Equal steps: the mean loss minus dense-S's at the same "
        "steps, and the same loss read on dense-S's own budgets as a compute factor.",
        "",
        "| model | total / active params | steps | final loss | seeds | vs dense-S, equal steps | as dense-S compute "
        "| FLOPs factor | wall-clock factor | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in a.moe:
        run = runs_of(results, m.cell)[0]
        delta = f"{m.delta:+.3f} ± {m.delta_half_width:.3f}" if m.delta is not None else "-"
        verdict = m.flops_factor.verdict() if m.flops_factor else "-"
        lines.append(
            f"| {m.cell.name} | {_human(run['total_params'])} / {_human(run['active_params'])} | {m.cell.steps} | "
            f"{_loss(m.cell, a.noise)} | {m.cell.n} | {delta} | {_factor(m.s_factor)} | {_factor(m.flops_factor)} | "
            f"{_factor(m.time_factor)} | {verdict} |"
        )
    return lines + [""]


def _load_lines(results: dict[str, Any], a: Analysis, plots: dict[str, str]) -> list[str]:
    lines = [
        "## Expert load",
        "",
        "Max/mean share of routed tokens per MoE layer (1.00 = balanced) in the last logging window of each run's "
        "first seed; runs are dropless, so nothing is dropped.",
        "",
        "| model | steps | max/mean load, last window |",
        "|---|---:|---|",
    ]
    for m in a.moe:
        run = runs_of(results, m.cell)[0]
        if run["expert_load"]:
            last = run["expert_load"][-1]["load"]
            cells = ", ".join(f"{max(x) * len(x) / sum(x):.2f}" for x in last if sum(x) > 0)
            lines.append(f"| {m.cell.name} | {m.cell.steps} | {cells} |")
    if plots.get("load"):
        lines += ["", f"![expert load over training]({plots['load']})"]
    return lines + [""]


def _plan_lines(results: dict[str, Any]) -> list[str]:
    plan = results["plan"]
    if not plan.get("step_seconds"):
        return []
    lines = [
        "## Plan",
        "",
        f"Seconds per training step measured before training (random tokens); with them the planner chose "
        f"{plan.get('search_steps', '-')} steps per search run and B = {plan['steps']} steps for a "
        f"{results['options']['budget_minutes']:.0f}-minute budget.",
        "",
        "| model | s/step |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in plan["step_seconds"].items()]
    return lines + [""]


def render_markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    a = analyse(results)
    lines = [
        "# MoE vs dense at laptop scale",
        "",
        *verdict_lines(a, results),
        "Generated by `sparselm experiment moe-vs-dense` from `results.json`; every figure and sentence comes from it.",
        "",
        *_setup_lines(results, a),
        "",
        *_search_lines(results),
        *_dense_lines(results, a, plots),
        *_moe_lines(results, a),
        "## Training curves at the full budget",
        "",
        f"![validation loss against steps]({plots['steps']})",
        "",
        f"![final validation loss against training time]({plots['time']})",
        "",
        *_load_lines(results, a, plots),
        *_plan_lines(results),
    ]
    return "\n".join(lines)


def write_report(results: dict[str, Any], report: Path) -> Path:
    report = Path(report)
    assets = report.parent / report.stem
    assets.mkdir(parents=True, exist_ok=True)
    a = analyse(results)
    paths = {
        "cells": plot_cells(results, a, assets / "loss-vs-flops.png", "flops"),
        "time": plot_cells(results, a, assets / "loss-vs-time.png", "seconds"),
        "steps": plot_curves(results, a, assets / "curves.png"),
        "load": plot_expert_load(results, a, assets / "expert-load.png"),
    }
    plots = {k: p.relative_to(report.parent).as_posix() if p is not None else "" for k, p in paths.items()}
    # Beside the plots, so that a report committed elsewhere keeps the numbers it was rendered from
    (assets / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    report.write_text(render_markdown(results, plots) + "\n", encoding="utf-8")
    return report


def plot_names(report: Path) -> dict[str, str]:
    """The plot paths a report at ``report`` links to (what write_report writes), for re-rendering the text only."""
    stem = Path(report).stem
    names = {"cells": "loss-vs-flops.png", "time": "loss-vs-time.png", "steps": "curves.png", "load": "expert-load.png"}
    return {k: f"{stem}/{v}" for k, v in names.items()}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m sparselm.experiment.report OUT/results.json REPORT.md")
    print(write_report(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])))
