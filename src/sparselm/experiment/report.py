"""The MoE-vs-dense report: Markdown tables and PNG plots, generated from ``results.json`` only (no hand-edited
figures). ``python -m sparselm.experiment.report OUT/results.json REPORT.md`` re-renders it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from sparselm.experiment.analysis import compute_saving, flops_to_reach, loss_at_flops, run_curve
from sparselm.experiment.family import override_key
from sparselm.experiment.plots import plot_curves, plot_expert_load

TASK_LABELS = {
    "lambada": "LAMBADA",
    "piqa": "PIQA",
    "boolq": "BoolQ",
    "arc_easy": "ARC-E",
    "winogrande": "WinoGrande",
}
CHANCE = {"lambada": 0.0, "piqa": 0.5, "boolq": 0.5, "arc_easy": 0.25, "winogrande": 0.5}


def _human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _load_imbalance(load: list[float]) -> float:
    mean = sum(load) / len(load)
    return max(load) / mean if mean > 0 else float("nan")


# -------------------------------------------------------------------------------------------------------- markdown


def _saving_rows(results: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    family = _dense_family(results)
    dense = {r["name"]: run_curve(r) for r in family}
    dense_time = {r["name"]: run_curve(r, "train_seconds") for r in family}
    lines, rows = [], []
    lines.append(
        "| model | final val loss | training FLOPs | dense FLOPs to reach it | compute-saving factor | FLOPs to reach "
        "dense-M's final loss | saving vs dense-M | loss at dense-S's FLOPs (S: {s}) | time-saving factor |".format(
            s=_fmt(dense["dense-S"][-1][1]) if dense.get("dense-S") else "-"
        )
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in results["runs"]:
        if run["kind"] != "moe" or not run["curve"]:
            continue
        s = compute_saving(run_curve(run), dense)
        time_curve = run_curve(run, "train_seconds")
        time_factor = None
        time_bound = None
        if time_curve:
            best_time = None
            for curve in dense_time.values():
                t = flops_to_reach(curve, s.final_loss)  # the same crossing, on the time axis
                if t is not None and (best_time is None or t < best_time):
                    best_time = t
            if best_time is not None:
                time_factor = best_time / time_curve[-1][0]
            else:
                most = max((c[-1][0] for c in dense_time.values() if c), default=0.0)
                time_bound = most / time_curve[-1][0] if time_curve[-1][0] else None
        factor = f"**{s.factor:.2f}x** ({s.dense_run})" if s.factor is not None else f"> {s.factor_lower_bound:.1f}x"
        time_cell = (
            f"{time_factor:.2f}x" if time_factor is not None else (f"> {time_bound:.1f}x" if time_bound else "-")
        )
        lines.append(
            f"| {run['name']} | {s.final_loss:.3f} | {_human(s.final_flops)} | {_human(s.dense_flops)} | {factor} | "
            f"{_human(s.flops_to_m_final) if s.flops_to_m_final else 'not reached'} | "
            f"{_fmt(s.factor_vs_m, '.2f') + 'x' if s.factor_vs_m else '-'} | {_fmt(s.loss_at_s_flops)} | {time_cell} |"
        )
        rows.append({"run": run, "saving": s, "time_factor": time_factor})
    return lines, rows


def _verdict(rows: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    """The target, judged for the best family run and, when a recipe variant does better, for that variant too."""
    if not rows:
        return ["No MoE run finished."]
    family = [r for r in rows if not r["run"].get("variant_of")]
    lines = []
    if family:
        best = min(family, key=lambda r: r["saving"].final_loss)
        lines += _target_lines("Best MoE run of the family", best)
    best_any = min(rows, key=lambda r: r["saving"].final_loss)
    if not family or best_any["run"].get("variant_of"):
        lines += _target_lines("Best MoE run including the recipe variants", best_any)
    lines += _dense_controls(results)
    return lines


def _same_recipe_at_family_steps(run: dict[str, Any], results: dict[str, Any]) -> dict[str, Any] | None:
    """The run with ``run``'s recipe but the family's number of steps: its base run, or a variant of the same base
    with the same overrides apart from ``train.max_steps``."""
    recipe = [o for o in run["overrides"] if override_key(o) != "train.max_steps"]
    for other in results["runs"]:
        if other["steps"] != results["steps"]:
            continue
        if (other["slug"] == run["variant_of"] and not recipe) or (
            other.get("variant_of") == run["variant_of"] and other["overrides"] == recipe
        ):
            return other
    return None


def _dense_controls(results: dict[str, Any]) -> list[str]:
    """Dense variants trained for more steps than the family, held to the same dense-M target as the MoE runs: if
    a longer dense-S also gets there, the saving is not the experts' alone."""
    m = next((r for r in _dense_family(results) if r["name"] == "dense-M" and r["final_val_loss"] is not None), None)
    if m is None:
        return []
    lines = []
    for run in results["runs"]:
        if run["kind"] != "dense" or not run.get("variant_of") or run["steps"] == results["steps"]:
            continue
        flops = flops_to_reach(run_curve(run), m["final_val_loss"])
        if flops is None:
            lines.append(f"- Control: {run['name']} does not reach dense-M's final loss within its run.")
        else:
            lines.append(
                f"- Control: {run['name']}, a dense model with no experts, reaches dense-M's final loss after "
                f"{_human(flops)} training FLOPs, {m['train_flops'] / flops:.2f}x fewer than dense-M used; the part "
                "of an MoE run's saving vs dense-M beyond that comes from its experts."
            )
    return lines + [""] if lines else []


def _target_lines(label: str, row: dict[str, Any]) -> list[str]:
    s = row["saving"]
    lines = [f"{label} by final validation loss: **{row['run']['name']}** ({s.final_loss:.3f}).", ""]
    if s.factor_vs_m is not None:
        met = "met" if s.factor_vs_m >= 2 else "not met"
        lines.append(
            f"- It reaches dense-M's final loss after {_human(s.flops_to_m_final)} training FLOPs: "
            f"{s.factor_vs_m:.2f}x fewer than dense-M used (target >= 2x: **{met}**)."
        )
    else:
        lines.append("- It does not reach dense-M's final loss within its run (target >= 2x saving vs M: **not met**).")
    if s.loss_at_s_flops is not None and s.s_final_loss is not None:
        beats = s.loss_at_s_flops < s.s_final_loss
        lines.append(
            f"- At dense-S's training FLOPs its loss is {s.loss_at_s_flops:.3f} against dense-S's {s.s_final_loss:.3f} "
            f"(beats dense-S at equal FLOPs: **{'yes' if beats else 'no'}**)."
        )
    return lines + [""]


def _task_table(results: dict[str, Any]) -> list[str]:
    tasks = list(results["options"].get("tasks") or [])
    header = "| model | total params | active params | train FLOPs/token | val loss | val ppl | "
    header += "".join(f"{TASK_LABELS.get(t, t)} | " for t in tasks) + "tokens/s |"
    lines = [header, "|---|" + "---:|" * (5 + len(tasks) + 1)]
    for run in results["runs"]:
        cells = [
            run["name"],
            _human(run["total_params"]),
            _human(run["active_params"]),
            _human(run["train_flops_per_token"]),
            _fmt(run["final_val_loss"]),
            _fmt(run["final_val_ppl"], ".1f"),
        ]
        for t in tasks:
            m = (run.get("tasks") or {}).get(t)
            if m is None or m.get("value") is None:
                cells.append("-")
            else:
                err = f" ± {m['stderr'] * 100:.1f}" if m.get("stderr") is not None else ""
                cells.append(f"{m['value'] * 100:.1f}{err}")
        cells.append(_fmt(run["tokens_per_sec"], ",.0f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _load_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| model | max/mean load, first logging window (per MoE layer) | max/mean load, last window | "
        "mean dropped-token fraction |",
        "|---|---|---|---:|",
    ]
    for run in results["runs"]:
        if run["kind"] != "moe" or not run["expert_load"]:
            continue
        first = ", ".join(f"{_load_imbalance(x):.2f}" for x in run["expert_load"][0]["load"])
        last = ", ".join(f"{_load_imbalance(x):.2f}" for x in run["expert_load"][-1]["load"])
        lines.append(f"| {run['name']} | {first} | {last} | {_fmt(run['dropped_fraction'], '.4f')} |")
    return lines


def _dense_family(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The dense runs the MoE runs are measured against (recipe variants of them excluded)."""
    return [r for r in results["runs"] if r["kind"] == "dense" and not r.get("variant_of")]


def _variant_table(results: dict[str, Any]) -> list[str]:
    runs = {r["slug"]: r for r in results["runs"]}
    variants = [r for r in results["runs"] if r.get("variant_of")]
    if not variants:
        return []
    dense = {r["name"]: run_curve(r) for r in _dense_family(results)}
    lines = [
        "## Recipe variants",
        "",
        "Copies of a family run with one change (`--variant`), trained on the same tokens for the same steps "
        "unless the change sets `train.max_steps` (then on the same token stream for that many steps, with warmup "
        "and cosine stretched to match). Negative change = lower validation loss than the base run.",
        "",
        "| variant of | change | training tokens | final val loss | base final loss | change in loss | "
        "compute-saving factor | max/mean load, last window |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for run in variants:
        base = runs.get(run["variant_of"])
        if not run["curve"] or base is None or not base["curve"]:
            continue
        s = compute_saving(run_curve(run), dense)
        factor = f"{s.factor:.2f}x" if s.factor is not None else f"> {s.factor_lower_bound:.1f}x"
        load = (
            ", ".join(f"{_load_imbalance(x):.2f}" for x in run["expert_load"][-1]["load"])
            if run["expert_load"]
            else "-"
        )
        delta = run["final_val_loss"] - base["final_val_loss"]
        lines.append(
            f"| {base['name']} | `{' '.join(run['overrides'])}` | {_human(run['tokens'])} | "
            f"{run['final_val_loss']:.3f} | {base['final_val_loss']:.3f} | {delta:+.3f} | {factor} | {load} |"
        )
    return lines + [""]


def _command_lines(results: dict[str, Any]) -> list[str]:
    commands = results.get("commands") or [results["command"]]
    lines = [f"- **Command**: `{commands[0]}`"]
    lines += [f"- **Then**: `{c}`" for c in commands[1:]]
    return lines


def _warmup_words(results: dict) -> str:
    """The family's warmup; reports written before it was recorded (5% of the steps then) say only "warmup"."""
    if "warmup_steps" not in results:
        return "warmup"
    n = results["warmup_steps"]
    return f"warmup {n} step{'s' if n != 1 else ''} ({n / results['steps']:.0%})"


def _wall_time_line(w: dict[str, float]) -> str:
    line = (
        f"- **Wall time**: {w['total']:.1f} min in all: data {w['data']:.1f}, timing/plan {w['plan']:.1f}, "
        f"training {w['train']:.1f}, zero-shot evaluation {w['eval']:.1f} (summed over invocations)"
    )
    if w.get("variants"):
        line += (
            f"; the family alone (the default command) {w['family_total']:.1f} min, "
            f"the recipe variants {w['variants']:.1f} min"
        )
    return line


def _gflops(flops: float) -> str:
    return f"{flops / 1e9:.0f}" if flops >= 10e9 else f"{flops / 1e9:.1f}"  # emulated bf16 runs at ~1 GFLOP/s


def _precision_words(results: dict[str, Any]) -> str:
    precision = results.get("precision", "bf16")  # results from before precision was recorded were bf16
    words = "bf16 autocast" if precision == "bf16" else "fp32"
    if results.get("options", {}).get("precision") == "auto":
        speed = "at least as fast as" if precision == "bf16" else "slower than"
        words += f" (auto: bf16 matmuls measured {speed} fp32)"
    return words


def _dense_s_by_steps(results: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """dense-S trained to its own budget: the family's run and the variants of it that change only the number of
    steps, keyed by steps. Each ends with its learning rate decayed, unlike the intermediate points of a curve."""
    s = next((r for r in _dense_family(results) if r["name"] == "dense-S" and r["final_val_loss"] is not None), None)
    if s is None:
        return {}
    out = {s["steps"]: s}
    for run in results["runs"]:
        keys = {override_key(o) for o in run.get("overrides", [])}
        if run.get("variant_of") == s["slug"] and keys == {"train.max_steps"} and run["final_val_loss"] is not None:
            out.setdefault(run["steps"], run)
    return out


def _experts_alone(results: dict[str, Any]) -> list[str]:
    """Each MoE run against dense-S trained for the same steps: same FLOPs per token, same schedule, so the
    difference is what the experts add. Where dense-S was trained at two or more budgets, the MoE loss is also
    read as dense-S compute, interpolating between those end points in log-FLOPs."""
    dense_s = _dense_s_by_steps(results)
    if not dense_s:
        return []
    ends = sorted((r["train_flops"], r["final_val_loss"]) for r in dense_s.values())
    parts = []
    for steps in sorted(dense_s):
        cells = []
        for run in results["runs"]:
            if run["kind"] != "moe" or run["steps"] != steps or run["final_val_loss"] is None:
                continue
            cell = f"{run['name']} {run['final_val_loss'] - dense_s[steps]['final_val_loss']:+.3f}"
            if len(ends) > 1:
                if run["final_val_loss"] > ends[0][1]:
                    cell += " (< 1x)"
                else:
                    flops = flops_to_reach(ends, run["final_val_loss"])
                    factor = (flops if flops is not None else ends[-1][0]) / run["train_flops"]
                    cell += f" ({'> ' if flops is None else ''}{factor:.2f}x)"
            cells.append(cell)
        if cells:
            parts.append(f"at {steps} steps (dense-S {dense_s[steps]['final_val_loss']:.3f}): {'; '.join(cells)}")
    if not parts:
        return []
    line = (
        "- **Experts alone**: final loss of each MoE run minus that of dense-S trained for the same steps (same "
        "FLOPs per token, both learning rates decayed; negative = the experts help)"
    )
    if len(ends) > 1:
        line += (
            ", and in brackets the dense-S compute that loss is worth, interpolated in log-FLOPs between dense-S's "
            "end points over the MoE run's FLOPs ('>': below every dense-S end point)"
        )
    lines = [line + ": " + "; ".join(parts) + "."]
    s_slug = dense_s[min(dense_s)]["slug"]
    for run in results["runs"]:
        keys = {override_key(o) for o in run.get("overrides", [])}
        if run.get("variant_of") == s_slug and keys == {"train.seed"} and run["final_val_loss"] is not None:
            base = dense_s.get(run["steps"])
            if base is not None:
                lines.append(
                    f"- **Seed noise**: {run['name']} ends {abs(run['final_val_loss'] - base['final_val_loss']):.3f} "
                    "nats from dense-S; differences of that size between single runs are not evidence."
                )
    return lines


def _diagnosis(results: dict[str, Any]) -> list[str]:
    """What the runs' own statistics say about why MoE does or does not pay off at this scale."""
    runs = [r for r in results["runs"] if not r.get("variant_of")]
    dense = {r["name"]: r for r in _dense_family(results) if r["final_val_loss"] is not None}
    s, m, big = dense.get("dense-S"), dense.get("dense-M"), dense.get("dense-L")
    if s is None:
        return []
    lines = ["## What limits the MoE runs here", "", "Read from this run's own numbers:", ""]
    for other in (m, big):
        if other is not None:
            ratio = other["train_flops_per_token"] / s["train_flops_per_token"]
            lines.append(
                f"- **Capacity headroom**: {other['name']} spends {ratio:.1f}x dense-S's FLOPs per token and ends "
                f"{s['final_val_loss'] - other['final_val_loss']:.3f} nats below it."
            )
    curve = s["curve"]
    if len(curve) >= 4:
        q = curve[-(len(curve) // 4 + 1)]
        lines.append(
            f"- **Still learning**: dense-S's validation loss fell {q['val_loss'] - curve[-1]['val_loss']:.3f} nats "
            f"in its last quarter ({q['tokens']:,} -> {curve[-1]['tokens']:,} tokens): the runs end far from "
            "convergence, where more tokens, not more parameters, lower the loss most."
        )
    for run in results["runs"]:
        if run.get("variant_of") and run["steps"] != results["steps"] and run["final_val_loss"] is not None:
            line = (
                f"- **Longer run**: {run['name']} trains on {run['tokens']:,} tokens "
                f"({run['steps'] / results['steps']:.2g}x the family's) for {_human(run['train_flops'])} FLOPs and "
                f"ends at {run['final_val_loss']:.3f}"
            )
            if m is not None:
                line += f" (dense-M: {m['final_val_loss']:.3f} for {_human(m['train_flops'])} FLOPs)"
            base = _same_recipe_at_family_steps(run, results)
            mid = loss_at_flops(run_curve(run), base["train_flops"]) if base and base["final_val_loss"] else None
            if mid is not None and run["steps"] > results["steps"]:
                line += (
                    f". At the family's {base['tokens']:,} tokens, with its learning rate not yet decayed, it was at "
                    f"{mid:.3f} against {base['name']}'s {base['final_val_loss']:.3f} at the end of its schedule"
                )
                if mid < base["final_val_loss"]:
                    line += ": the family's schedule (warmup, peak learning rate, decay), not only size, limits it"
            lines.append(line + ".")
    share = s.get("flops_share")
    if share:
        lines.append(
            f"- **Where the compute goes**: in dense-S the {share['replaced_ffn_layers']} FFNs that the MoE runs "
            f"replace take {share['replaced_ffns']:.0%} of the training FLOPs per token and the output layer "
            f"(vocabulary {share['vocab_size']:,}) {share['output_layer']:.0%}; the experts can only improve that "
            "part of the model."
        )
    tokens = results["tokens_per_run"]
    moe = [r for r in runs if r["kind"] == "moe"]
    if moe:
        per_expert = ", ".join(
            f"E={r['num_experts']} top-{r['top_k']}: {tokens * r['top_k'] // r['num_experts']:,}"
            for r in sorted(moe, key=lambda r: (r["top_k"], r["num_experts"]))
        )
        lines.append(f"- **Data per expert**: tokens each expert of one MoE layer sees over the run ({per_expert}).")
    lines += _experts_alone(results)
    return lines + [""]


def render_markdown(results: dict[str, Any], plots: dict[str, Path | None], report: Path) -> str:
    m, d, o = results["machine"], results["dataset"], results["options"]

    def rel(p: Path | None) -> str:
        return p.relative_to(report.parent).as_posix() if p is not None else ""

    splits = d["splits"]
    lines = [
        "# MoE vs dense at laptop scale",
        "",
        "Generated by `sparselm experiment moe-vs-dense` from `results.json`; every figure below comes from that run.",
        "",
        *_command_lines(results),
        f"- **Date**: {results['created']} (UTC)",
        f"- **Machine**: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, torch {m['torch']} on CPU, "
        f"{m['torch_threads']} threads; matmul peak measured {_gflops(results['matmul_peak_flops']['bf16'])} "
        f"GFLOP/s bf16, {_gflops(results['matmul_peak_flops']['fp32'])} GFLOP/s fp32",
        f"- **Data**: {', '.join(o['data'])}: {d['extract']['documents'] if d.get('extract') else '?'} documents; "
        f"SentencePiece BPE vocabulary {d['vocab_size']:,}; train {splits['train']['tokens']:,} tokens "
        f"({splits['train']['documents']} documents), validation {splits['val']['tokens']:,} tokens "
        f"({splits['val']['documents']} documents, held out by document)",
        f"- **Training**: every family run sees the same {results['tokens_per_run']:,} tokens "
        f"({results['steps']} steps of "
        f"{o['batch_size']} x {o['seq_len']}), AdamW, {_warmup_words(results)} then cosine to 10%, "
        f"{_precision_words(results)}; "
        "validation loss "
        f"on the first {o['eval_batches']} validation batches ({o['eval_batches'] * o['batch_size'] * o['seq_len']:,} "
        f"tokens) at {results.get('eval_points', 16)} points per run",
        _wall_time_line(results["wall_minutes"]),
        "",
        "## Validation loss against training compute",
        "",
        f"![validation loss vs training FLOPs]({rel(plots['flops'])})",
        "",
        "Training FLOPs = tokens x (6 x active matmul parameters + attention + router), from `sparselm params`.",
        "",
        "## Models and zero-shot results",
        "",
        "In the form of DeepSpeed-MoE's Table 1. Task accuracy (%) ± standard error on the first "
        f"{o['eval_limit']} examples of each task, zero-shot, scored by the evaluation harness; at this scale "
        "accuracy is expected near chance (LAMBADA 0, PIQA/BoolQ/WinoGrande 50, ARC-E 25; BoolQ's majority class "
        "is 62). tokens/s = training tokens / wall time spent in training steps on this machine.",
        "",
        *_task_table(results),
        "",
        "## Compute-saving factor",
        "",
        "For each MoE run: the training FLOPs the dense family needs to reach the MoE run's final validation loss "
        "(the first crossing on any dense curve, interpolated in log-FLOPs), divided by the MoE run's FLOPs. "
        "'> x' means no dense run got that low, so the factor is at least the largest dense budget over the MoE "
        "budget. The time-saving factor is the same ratio on the wall-clock axis. Caveat: intermediate points of a "
        "dense run are taken before its learning rate has decayed, which flatters the MoE runs a little "
        "(a dense run trained to that budget would end lower).",
        "",
    ]
    saving_lines, rows = _saving_rows(results)
    lines += saving_lines + ["", *_verdict(rows, results), ""]
    lines += [
        "## Wall-clock time",
        "",
        f"![validation loss vs training time]({rel(plots['time'])})",
        "",
        "## Expert load",
        "",
        "Max/mean share of routed tokens (1.00 = perfectly balanced) in the first and last logging windows. "
        "Runs are dropless unless the MoE recipe sets `moe.dropless=false`, so the dropped fraction is 0 there.",
        "",
        *_load_table(results),
        "",
    ]
    if plots.get("load"):
        lines += [f"![expert load over training]({rel(plots['load'])})", ""]
    lines += _diagnosis(results)
    lines += _variant_table(results)
    if o.get("moe_overrides"):
        lines += [f"MoE recipe overrides: `{' '.join(o['moe_overrides'])}`", ""]
    plan = results["plan"]
    if plan.get("step_seconds"):
        lines += [
            "## Plan",
            "",
            f"Seconds per training step measured before training (random tokens), which set {results['steps']} "
            f"steps for a {o['budget_minutes']:.0f}-minute budget:",
            "",
            "| run | s/step |",
            "|---|---:|",
            *[f"| {k} | {v:.3f} |" for k, v in plan["step_seconds"].items()],
            "",
        ]
    return "\n".join(lines)


def write_report(results: dict[str, Any], report: Path) -> Path:
    report = Path(report)
    asset_dir = report.parent / report.stem
    asset_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "flops": plot_curves(results, asset_dir / "loss-vs-flops.png", "flops", "training FLOPs"),
        "time": plot_curves(results, asset_dir / "loss-vs-time.png", "train_seconds", "training wall time (s)"),
        "load": plot_expert_load(results, asset_dir / "expert-load.png"),
    }
    report.write_text(render_markdown(results, plots, report) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m sparselm.experiment.report OUT/results.json REPORT.md")
    print(write_report(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])))
