"""Compare evaluated checkpoints: one table across runs (Markdown + terminal) and a bar plot (PNG, matplotlib)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from sparselm.eval.harness import TaskResult, _fmt, read_results, results_filename

# Lower is better for these; the plot title says so.
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "token_perplexity", "byte_perplexity", "bits_per_byte"}


def find_results(item: str | Path, shots: int) -> Path:
    """A results JSON file as given, or the one for ``shots`` under RUN/eval/ (or CHECKPOINT/eval/)."""
    path = Path(item)
    if path.is_file():
        return path
    name = results_filename(shots) + ".json"
    for candidate in (path / "eval" / name, path / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {name} under {path}/eval: run `sparselm eval --ckpt {path} --shots {shots}` first")


def _label(meta: dict, path: Path, taken: set[str]) -> str:
    ckpt = Path(meta.get("checkpoint", str(path)))
    run = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name
    label = run if meta.get("step") is None else f"{run}@{meta['step']}"
    while label in taken:  # two runs with the same folder name in different places
        label += "'"
    taken.add(label)
    return label


def load_runs(items: list[str], shots: int) -> list[tuple[str, list[TaskResult]]]:
    runs, taken = [], set()
    for item in items:
        path = find_results(item, shots)
        meta, results = read_results(path)
        runs.append((_label(meta, path, taken), results))
    return runs


def comparison_rows(runs: list[tuple[str, list[TaskResult]]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per (task, metric) found in any run; a run without it shows '-'."""
    keys: list[tuple[str, str]] = []
    values: dict[tuple[str, str, str], dict] = {}
    for label, results in runs:
        for r in results:
            for metric, m in r.metrics.items():
                if (r.task, metric) not in keys:
                    keys.append((r.task, metric))
                values[(label, r.task, metric)] = {**m, "n": r.n}
    header = ["task", "metric", *[label for label, _ in runs]]
    rows = []
    for task, metric in keys:
        cells = []
        for label, _ in runs:
            m = values.get((label, task, metric))
            if m is None:
                cells.append("-")
            elif m["stderr"] is None:
                cells.append(f"{_fmt(m['value'])} (n={m['n']})")
            else:
                cells.append(f"{_fmt(m['value'])} ± {_fmt(m['stderr'])} (n={m['n']})")
        rows.append([task, metric, *cells])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def plot(runs: list[tuple[str, list[TaskResult]]], path: Path) -> Path:
    """One small panel per (task, metric), one bar per run, with standard-error whiskers where known."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the comparison plot needs matplotlib: pip install 'sparselm[eval]'") from exc
    _, rows = comparison_rows(runs)
    panels = [(row[0], row[1]) for row in rows]
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    by_run = [{(r.task, m): v for r in results for m, v in r.metrics.items()} for _, results in runs]
    for ax, (task, metric) in zip(axes.flat, panels, strict=False):
        for i, ((label, _), metrics) in enumerate(zip(runs, by_run, strict=True)):
            m = metrics.get((task, metric))
            if m is None or m["value"] is None or not math.isfinite(m["value"]):
                continue
            err = m["stderr"] if m["stderr"] is not None and math.isfinite(m["stderr"]) else None
            ax.bar(i, m["value"], yerr=err, color=colors[i % len(colors)], label=label, capsize=3)
        arrow = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
        ax.set_title(f"{task}\n{metric} ({arrow})", fontsize=9)
        ax.set_xticks(range(len(runs)), [label for label, _ in runs], rotation=30, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_compare(items: list[str], shots: int, out_dir: str | Path, as_json: bool = False) -> int:
    runs = load_runs(items, shots)
    header, rows = comparison_rows(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(header, rows)
    (out_dir / "compare.md").write_text(table, encoding="utf-8")
    if as_json:
        print(json.dumps({"header": header, "rows": rows}))
    else:
        print(table, end="")
    try:
        png = plot(runs, out_dir / "compare.png")
        print(f"wrote {out_dir / 'compare.md'} and {png}", file=sys.stderr)
    except ImportError as exc:
        print(f"wrote {out_dir / 'compare.md'}; no plot: {exc}", file=sys.stderr)
    return 0
