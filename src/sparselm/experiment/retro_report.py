"""The RETRO experiment's results (``results.json``) and report (Markdown + PNG plots), every verdict derived from
the numbers: the first lines say what was found, whichever way it came out."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import numpy as np

from sparselm.retro.evaluate import OVERLAP_BUCKETS, bits_per_byte, bootstrap_difference, served_mask

# Issue 17: the whole experiment in at most 90 minutes on 2 cores, and --quick in at most 10.
BUDGET_MINUTES = {"full": 90.0, "quick": 10.0}


def eval_key(run: str, db: str | None, k: int, shuffle: bool) -> str:
    """The name of one evaluation: run, database (or none), k and whether the neighbours were shuffled."""
    return f"{run}|{db or 'none'}|k{k}" + ("|shuffled" if shuffle else "")


def tokens_per_run(scale) -> int:
    """Training tokens of one run at an experiment ``Scale``."""
    return scale.steps * scale.batch * scale.seq_len


def _cpu_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]


def collect(opts, shards: Path, dbs: dict[str, Path], runs: dict[str, Path], evals: dict, wall: dict) -> dict:
    """Everything the report shows; ``wall``: the experiment clock's record (stage seconds, invocations, load)."""
    from sparselm.checkpoint.files import load_config_from_checkpoint
    from sparselm.experiment.moe_vs_dense import machine_description
    from sparselm.params.counting import count_params
    from sparselm.retro.evaluate import eval_windows
    from sparselm.retro.store import Database

    s = opts.scale
    meta = json.loads((shards / "meta.json").read_text())
    databases = {}
    for name, path in dbs.items():
        db = Database(path, verify=False)
        databases[name] = {
            "chunks": db.size,
            "tokens": db.size * db.chunk_size,
            "index": db.meta["index"]["kind"],
            "includes_training_set": any(src.data_dir == str(shards) and src.split == "train" for src in db.sources),
            "build": db.meta["build"],
        }
    models = {}
    for name, run in runs.items():
        cfg = load_config_from_checkpoint(run)
        counts = count_params(cfg)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        speeds = [m["tokens_per_sec"] for m in metrics if "tokens_per_sec" in m]
        models[name] = {
            "params": counts.total,
            "retro_params": counts.breakdown.get("retro_cca", 0) + counts.breakdown.get("retro_encoder", 0),
            "steps": cfg.train.max_steps,
            "tokens": cfg.train.max_steps * cfg.train.global_batch_size * cfg.data.seq_len,
            "trainable": "encoder + cross-attention" if cfg.retro.freeze_base else "all",
            "final_train_loss": next((m["loss"] for m in reversed(metrics) if "loss" in m), None),
            "tokens_per_sec": float(np.median(speeds)) if speeds else None,
            "train_seconds": next((m["train_seconds"] for m in reversed(metrics) if "train_seconds" in m), None),
        }
    ev = eval_windows(shards, "val", s.seq_len, s.eval_windows)
    analysis = analyse(opts.out / "nll", ev)
    return {
        "command": opts.command,
        "quick": opts.quick,
        "machine": {**machine_description(), "flags": _cpu_flags(), "platform": platform.platform()},
        "seconds": wall["stages"],
        "wall": {"invocations": wall["invocations"], "load_at_end": wall["load_at_end"]},
        "scale": {**vars(s)},
        "tokens_per_run": tokens_per_run(s),
        "dataset": {
            "train_tokens": meta["splits"]["train"]["tokens"],
            "train_documents": meta["splits"]["train"]["documents"],
            "val_tokens": meta["splits"]["val"]["tokens"],
            "val_documents": meta["splits"]["val"]["documents"],
            "eval": evals.get("_windows"),
        },
        "databases": databases,
        "models": models,
        "evals": {k: v for k, v in evals.items() if not k.startswith("_")},
        "analysis": analysis,
    }


def analyse(nll_dir: Path, ev) -> dict[str, Any]:
    """From the saved per-token NLLs of seed 1: bits/byte by leakage bucket, and paired 95% bootstrap intervals
    (over evaluation windows) of RETRO against the baseline and, inside the RETRO model, of real neighbours against
    no retrieval, shuffled neighbours and the 10% database."""

    def nll(run: str, db: str | None, k: int, shuffle: bool = False) -> np.ndarray:
        return np.load(nll_dir / f"{eval_key(run, db, k, shuffle).replace('|', '__')}.npy")

    analysis: dict[str, Any] = {"leakage": {}, "intervals": {}, "retrieval": {}}
    for kind in ("dense", "moe"):
        base, retro = nll(f"{kind}-base-s1", None, 0), nll(f"{kind}-retro-s1", "db100", 2)
        overlap = np.load(nll_dir / f"{eval_key(f'{kind}-retro-s1', 'db100', 2, False).replace('|', '__')}.overlap.npy")
        rows = []
        for limit in OVERLAP_BUCKETS:
            mask = served_mask(ev, 64, overlap, limit)
            rows.append(
                {
                    "max_overlap": limit,
                    "chunks": int((overlap <= limit).sum()),
                    "baseline": bits_per_byte(base, ev.target_bytes, mask),
                    "retro": bits_per_byte(retro, ev.target_bytes, mask),
                }
            )
        analysis["leakage"][kind] = rows
        analysis["intervals"][kind] = bootstrap_difference(retro, base, ev.target_bytes)
        others = {
            "no_retrieval": nll(f"{kind}-retro-s1", None, 0),
            "shuffled": nll(f"{kind}-retro-s1", "db100", 2, True),
            "db10": nll(f"{kind}-retro-s1", "db10", 2),
        }
        analysis["retrieval"][kind] = {
            name: bootstrap_difference(retro, other, ev.target_bytes) for name, other in others.items()
        }
    return analysis


# ------------------------------------------------------------------------------------------------------------ report
def bpb(results: dict, run: str, db: str | None = None, k: int = 0, shuffled: bool = False) -> float:

    return results["evals"][eval_key(run, db, k, shuffled)]["bpb"]


NO_GAIN = 0.002  # bits/byte: a smaller difference between real and shuffled neighbours counts as none
KINDS = (("dense", "dense"), ("moe", "MoE"))


def compared(delta: float) -> str:
    """A bits/byte difference (this minus that) in words: lower is better."""
    if delta < 0:
        return f"{-delta:.4f} lower (better)"
    return f"{delta:.4f} higher (worse)" if delta > 0 else "equal"


def retrieval_interval(r: dict, kind: str, against: str) -> tuple[float, float] | None:
    """Seed 1's paired 95% interval of RETRO with real neighbours minus ``against`` (results before it was kept:
    None)."""
    found = r["analysis"].get("retrieval", {}).get(kind, {}).get(against)
    return tuple(found) if found is not None else None


def _beyond_windows(r: dict, kind: str, against: str) -> bool:
    """Whether real neighbours beat ``against`` over the evaluation windows (results without the interval: the point
    estimate alone decides)."""
    found = retrieval_interval(r, kind, against)
    return found is None or found[1] < 0


def _interval(r: dict, kind: str, against: str, what: str) -> str:
    found = retrieval_interval(r, kind, against)
    return (
        f" ({what}, seed 1, 95% interval over evaluation windows [{found[0]:+.4f}, {found[1]:+.4f}])" if found else ""
    )


def against_baseline(r: dict, kind: str) -> dict[str, Any]:
    """RETRO (db100, k = 2) against the plain baseline over the seeds run, and whether the difference beats the seed
    spread: the largest difference between two seeds of one model (a decoder run with one seed is read against the
    dense pair's spread, the only one measured)."""
    seeds = ("s1", "s2") if eval_key(f"{kind}-base-s2", None, 0, False) in r["evals"] else ("s1",)
    base = [bpb(r, f"{kind}-base-{s}") for s in seeds]
    retro = [bpb(r, f"{kind}-retro-{s}", "db100", 2) for s in seeds]
    dense_base = [bpb(r, f"dense-base-{s}") for s in ("s1", "s2")]
    dense_retro = [bpb(r, f"dense-retro-{s}", "db100", 2) for s in ("s1", "s2")]
    noise = max(max(dense_base) - min(dense_base), max(dense_retro) - min(dense_retro))
    difference = float(np.mean(retro) - np.mean(base))
    high = r["analysis"]["intervals"][kind][1]
    beyond = difference < 0 and -difference > noise and high < 0
    return {"seeds": len(seeds), "base": float(np.mean(base)), "retro": float(np.mean(retro)),
            "difference": difference, "noise": noise, "beyond": beyond}  # fmt: skip


def verdict(r: dict) -> str:
    """The lead sentences: does a RETRO model beat its plain baseline beyond seed noise, and does the retrieved text
    itself matter (real neighbours against shuffled ones, same model)?"""
    rows = {label: against_baseline(r, kind) for kind, label in KINDS}
    winners = [label for label, row in rows.items() if row["beyond"]]
    each = "; ".join(
        f"{label} {compared(row['difference'])}, {row['seeds']} seed{'s' if row['seeds'] > 1 else ''}"
        for label, row in rows.items()
    )
    lead = (
        f"**Verdict: RETRO beats its plain baseline beyond seed noise for the {' and '.join(winners)} decoder"
        f"{'s' if len(winners) > 1 else ''}**"
        if winners
        else "**Verdict: no RETRO model beats its plain baseline beyond seed noise**"
    )
    lead += f" (bits/byte with retrieval against the baseline: {each}; seed spread {rows['dense']['noise']:.4f})."
    saved = {
        label: bpb(r, f"{kind}-retro-s1", "db100", 2, True) - bpb(r, f"{kind}-retro-s1", "db100", 2)
        for kind, label in KINDS
    }
    parts = ", ".join(f"{label} {value:+.4f}" for label, value in saved.items())
    helped = [label for kind, label in KINDS if saved[label] > NO_GAIN and _beyond_windows(r, kind, "shuffled")]
    if helped:
        return (
            f"{lead} Inside the RETRO model the retrieved text itself does matter for the {' and '.join(helped)} "
            f"decoder: real neighbours against shuffled ones save {parts} bits/byte (under {NO_GAIN} counts as none)."
        )
    return (
        f"{lead} The retrieved text itself changes nothing measurable: real neighbours against shuffled ones in the "
        f"same model save {parts} bits/byte (under {NO_GAIN} counts as none), so the differences from the plain "
        "baselines come from the RETRO model itself, not from what it retrieved."
    )


def findings(r: dict) -> list[str]:
    """The verdicts, each from the numbers."""
    lines = []
    for kind, label in KINDS:
        row = against_baseline(r, kind)
        low, high = r["analysis"]["intervals"][kind]
        sizes = [bpb(r, f"{kind}-retro-s1", db, 2) for db in ("db10", "db30", "db100")]
        falling = sizes[0] > sizes[1] > sizes[2]
        real, shuffled = sizes[2], bpb(r, f"{kind}-retro-s1", "db100", 2, True)
        off = bpb(r, f"{kind}-retro-s1")
        base1 = bpb(r, f"{kind}-base-s1")
        fit = bpb(r, f"{kind}-fit", "db100", 2)
        side = "below" if row["difference"] < 0 else "above"
        quality = "better" if row["difference"] < 0 else "worse"
        noise = (
            f"seed spread (largest difference between two seeds of one model) {row['noise']:.4f}"
            if row["seeds"] > 1
            else f"one seed, read against the dense pair's seed spread of {row['noise']:.4f}"
        )
        lines.append(
            f"- **{label}: RETRO with retrieval is {abs(row['difference']):.4f} bits/byte {side} the baseline "
            f"({quality})** ({row['retro']:.4f} vs {row['base']:.4f}, mean of {row['seeds']} seed(s); RETRO minus "
            f"baseline for seed 1, 95% bootstrap interval over evaluation windows [{low:+.4f}, {high:+.4f}]); "
            f"{noise}: the difference is {'beyond' if row['beyond'] else 'not beyond'} seed noise."
        )
        lines.append(
            f"  Database size: {sizes[0]:.4f} / {sizes[1]:.4f} / {sizes[2]:.4f} bits/byte at 10% / 30% / 100% of the "
            f"training set: {'falling as the database grows' if falling else 'not falling monotonically'}"
            f"{_interval(r, kind, 'db10', 'db100 minus db10')}. Real neighbours against none in the same model: "
            f"{compared(real - off)}{_interval(r, kind, 'no_retrieval', 'real minus none')}. "
            f"Shuffled neighbours: {shuffled:.4f}, {compared(shuffled - off)} than the same model without retrieval "
            f"({'a gain from any text' if off - shuffled > NO_GAIN else 'no gain'}) and {compared(shuffled - real)} "
            f"than its real neighbours{_interval(r, kind, 'shuffled', 'real minus shuffled')}. "
            f"RETRO-fit (frozen base, {r['models'][f'{kind}-fit']['steps']} steps): "
            f"{fit:.4f}, {compared(fit - base1)} than its base; RETRO trained from scratch (seed 1): "
            f"{compared(bpb(r, f'{kind}-retro-s1', 'db100', 2) - base1)} than the same base."
        )
    for kind, label in KINDS:
        leak, everything = r["analysis"]["leakage"][kind][0], r["analysis"]["leakage"][kind][-1]
        lines.append(
            f"- Leakage ({label}): {leak['chunks']} of {everything['chunks']} evaluation chunks share at most 12.5% of "
            f"their tokens with their neighbours; on them RETRO scores {leak['retro']:.4f}, "
            f"{compared(leak['retro'] - leak['baseline'])} than the baseline's {leak['baseline']:.4f}."
        )
    return lines


def budget(r: dict) -> float:
    return r["scale"].get("budget_minutes") or BUDGET_MINUTES["quick" if r["quick"] else "full"]


def over_budget(r: dict) -> bool:
    return sum(r["seconds"].values()) / 60 > budget(r)


def wall_time(r: dict) -> str:
    """Per-stage and total wall time, against the budget of this scale, and how busy the machine was."""
    total = sum(r["seconds"].values()) / 60
    stages = ", ".join(f"{k} {v / 60:.1f} min" if v >= 60 else f"{k} {v:.0f} s" for k, v in r["seconds"].items())
    wall = r.get("wall", {})
    invocations = wall.get("invocations", [])
    text = f"{stages}; {total:.1f} min in all"
    if len(invocations) > 1 or "wall" not in r:  # results written before invocations were counted: unknown
        text += f" (summed over {len(invocations) or 'its'} invocations)"
    scale, limit = "--quick" if r["quick"] else "the full run", budget(r)
    if total > limit:
        text += f", **{total - limit:.1f} min over the {limit:.0f}-minute budget of {scale}**"
    else:
        text += f", within the {limit:.0f}-minute budget of {scale}"
    loads = [i["load"] for i in invocations if i.get("load") is not None]
    if loads:
        text += f"; 1-minute load average {max(loads):.1f} when it started"
        if wall.get("load_at_end") is not None:
            text += f", {wall['load_at_end']:.1f} at the end (its own threads included)"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def _plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, color in (("dense", "C0"), ("moe", "C3")):
        sizes = [results["databases"][db]["tokens"] for db in ("db10", "db30", "db100")]
        values = [bpb(results, f"{kind}-retro-s1", db, 2) for db in ("db10", "db30", "db100")]
        left.plot(sizes, values, "o-", color=color, label=f"{kind} RETRO (k=2)")
        left.axhline(bpb(results, f"{kind}-base-s1"), color=color, linestyle=":", label=f"{kind} baseline")
        ks = [1, 2, 4, 10]
        right.plot(ks, [bpb(results, f"{kind}-retro-s1", "db100", k) for k in ks], "o-", color=color, label=kind)
        right.axhline(bpb(results, f"{kind}-base-s1"), color=color, linestyle=":")
    left.set_xscale("log")
    left.set_xlabel("database tokens")
    left.set_ylabel("bits per byte (held-out documents)")
    left.legend(fontsize=8)
    right.set_xlabel("neighbours at evaluation (trained with 2)")
    right.set_xscale("log")
    right.set_xticks([1, 2, 4, 10], ["1", "2", "4", "10"])
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(r: dict, plot: Path | None, report: Path) -> str:
    s, d, m = r["scale"], r["dataset"], r["machine"]
    lines = ["# RETRO at laptop scale: retrieval from a chunk database, dense and MoE decoders", ""]
    lines += [verdict(r), ""]
    if over_budget(r):
        total, scale = sum(r["seconds"].values()) / 60, "--quick" if r["quick"] else "the full run"
        lines += [f"**Over budget: this run took {total:.1f} min; {scale} may take {budget(r):.0f} min** (stages and "
                  "machine load under Setup).", ""]  # fmt: skip
    lines += ["Generated by `sparselm experiment retro` from `results.json`; every figure comes from that run.", ""]
    lines += ["## What was found", "", *findings(r), ""]
    lines += [
        "## Setup",
        "",
        f"- **Command**: `{r['command']}`" + (" (--quick: a pipeline check, not a result)" if r["quick"] else ""),
        f"- **Machine**: {m['cpu']} ({', '.join(m['flags']) or 'no bf16 flags'}), {m['cores']} cores, "
        f"{m['memory_gib']} GiB, torch {m['torch']}, {m['torch_threads']} threads",
        f"- **Wall time**: {wall_time(r)}",
        f"- **Data**: {d['train_tokens']:,} training tokens ({d['train_documents']} documents), held-out "
        f"{d['val_tokens']:,} tokens ({d['val_documents']} documents, by document); evaluation on "
        f"{d['eval']['count']} evenly spaced windows of {s['seq_len']} tokens ({d['eval']['tokens']:,} tokens, "
        f"{d['eval']['bytes']:,} bytes)",
        f"- **Models**: d_model {s['d_model']}, {s['n_layers']} layers, chunked cross-attention from layer "
        f"{s['cca_start']} every 3rd; encoder 2 layers of width {s['encoder_d_model']}; chunks of 64 tokens, "
        f"k = 2 neighbours (chunk + continuation, 128 tokens) in training; MoE: {s['experts']} experts, top-2, "
        f"every 2nd layer (and the encoder's 2nd); {r['tokens_per_run']:,} training tokens per run "
        f"({s['steps']} steps of {s['batch']} x {s['seq_len']}), the same batches for baseline and RETRO",
        "",
        "## Bits per byte against the database",
        "",
    ]
    rows = []
    dbs = r["databases"]
    for run in [k for k in r["models"] if "base" not in k]:
        row = [run, f"{bpb(r, run):.4f}"]
        for db in ("db10", "db30", "db100", "other"):
            key = f"{run}|{db}|k2"
            row.append(f"{r['evals'][key]['bpb']:.4f}" if key in r["evals"] else "")
        rows.append(row)
    for run in [k for k in r["models"] if "base" in k]:
        rows.append([run, f"{bpb(r, run):.4f}", "", "", "", ""])
    header = ["model", "no retrieval"] + [
        f"{db} ({dbs[db]['tokens'] / 1e6:.2f}M tokens{', excl. training set' if db == 'other' else ''})"
        for db in ("db10", "db30", "db100", "other")
    ]
    lines += _table(header, rows)
    if plot is not None:
        lines += ["", f"![bits per byte vs database size and neighbours]({Path(plot).relative_to(report.parent)})"]
    lines += ["", "## Neighbours at evaluation (trained with k = 2, database db100)", ""]
    lines += _table(
        ["model", "k=1", "k=2", "k=4", "k=10", "shuffled (k=2)"],
        [
            [run, *(f"{bpb(r, run, 'db100', k):.4f}" for k in (1, 2, 4, 10)), f"{bpb(r, run, 'db100', 2, True):.4f}"]
            for run in ("dense-retro-s1", "moe-retro-s1")
        ],
    )
    lines += ["", "## Leakage: bits per byte over chunks by overlap with their neighbours (db100, k = 2)", ""]
    leak_rows = []
    for kind, rows_ in r["analysis"]["leakage"].items():
        for row in rows_:
            leak_rows.append(
                [kind, f"<= {row['max_overlap']:.1%}", str(row["chunks"]), f"{row['baseline']:.4f}",
                 f"{row['retro']:.4f}", f"{row['baseline'] - row['retro']:+.4f}"]
            )  # fmt: skip
    lines += _table(["decoder", "overlap", "chunks", "baseline", "RETRO", "gain"], leak_rows)
    lines += ["", "## Models and training", ""]
    lines += _table(
        ["run", "params", "RETRO params", "trained", "steps", "final train loss", "tokens/s", "training s"],
        [
            [name, f"{v['params']:,}", f"{v['retro_params']:,}", v["trainable"], str(v["steps"]),
             f"{v['final_train_loss']:.3f}", f"{v['tokens_per_sec']:,.0f}" if v["tokens_per_sec"] else "",
             f"{v['train_seconds']:.0f}" if v.get("train_seconds") else ""]
            for name, v in r["models"].items()
        ],
    )  # fmt: skip
    lines += ["", "## Databases", ""]
    lines += _table(
        ["database", "chunks", "tokens", "index", "key encoding", "build (chunks / index)"],
        [
            [name, f"{v['chunks']:,}", f"{v['tokens']:,}", v["index"],
             f"{v['build']['chunks_per_second']:,.0f} chunks/s" if v["build"]["chunks_per_second"] else "copied",
             f"{v['build']['chunk_seconds']:.0f} s / {v['build']['index_seconds']:.0f} s"]
            for name, v in dbs.items()
        ],
    )  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(results: dict, report: Path) -> Path:
    report.parent.mkdir(parents=True, exist_ok=True)
    plot = _plot(results, report.parent / report.stem / "bpb.png")
    report.write_text(render(results, plot, report), encoding="utf-8")
    return report
