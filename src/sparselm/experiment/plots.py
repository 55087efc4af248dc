"""The MoE-vs-dense report's plots: validation loss against training FLOPs or wall time for every run, and each
MoE run's expert load over training as heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparselm.experiment.analysis import run_curve


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(run: dict[str, Any], index: int) -> dict[str, Any]:
    if run["kind"] == "dense":
        greys = {"dense-s": "#9e9e9e", "dense-m": "#616161", "dense-l": "#212121"}
        color = greys.get(run.get("variant_of") or run["slug"], "#9e9e9e")  # a variant takes its base's grey
        return {"color": color, "linestyle": ":" if run.get("variant_of") else "-", "linewidth": 2.2, "marker": "o"}
    palette = {4: "#1f77b4", 16: "#2ca02c", 64: "#d62728", 8: "#9467bd", 32: "#ff7f0e", 128: "#8c564b"}
    color = palette.get(run["num_experts"], f"C{index % 10}")
    return {
        "color": color,
        "linestyle": ":" if run.get("variant_of") else ("-" if run["top_k"] == 1 else "--"),
        "linewidth": 1.5,
        "marker": "^" if run["top_k"] == 1 else "v",
    }


def plot_curves(results: dict[str, Any], path: Path, x: str, xlabel: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    for i, run in enumerate(results["runs"]):
        points = run_curve(run, x)
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, label=run["name"], markersize=3, **_style(run, i))
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(True, which="both", alpha=0.3)
    # outside the axes, so that the curves stay visible however many runs there are
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    longer = any(r["steps"] != results["steps"] for r in results["runs"])
    title = f"{results['tokens_per_run']:,} training tokens per run"
    ax.set_title(title + (" (variants setting train.max_steps: more)" if longer else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_load(results: dict[str, Any], path: Path) -> Path | None:
    """Per MoE run and MoE layer: a heatmap of each expert's share of tokens x E over training (1 = balanced)."""
    moe_runs = [r for r in results["runs"] if r["kind"] == "moe" and r["expert_load"]]
    if not moe_runs:
        return None
    plt = _plt()
    layers = max(len(r["expert_load"][0]["load"]) for r in moe_runs)
    fig, axes = plt.subplots(len(moe_runs), layers, figsize=(4.2 * layers, 1.9 * len(moe_runs)), squeeze=False)
    image = None
    for row, run in enumerate(moe_runs):
        steps = [p["step"] for p in run["expert_load"]]
        e = run["num_experts"]
        for layer in range(layers):
            ax = axes[row][layer]
            matrix = [[p["load"][layer][i] * e for p in run["expert_load"]] for i in range(e)]
            image = ax.imshow(
                matrix,
                aspect="auto",
                cmap="viridis",
                vmin=0,
                vmax=3,
                extent=(steps[0], steps[-1], e - 0.5, -0.5),
                interpolation="nearest",
            )
            ax.set_title(f"{run['name']}, MoE layer {layer}", fontsize=8)
            ax.tick_params(labelsize=7)
            if layer == 0:
                ax.set_ylabel("expert", fontsize=7)
            if row == len(moe_runs) - 1:
                ax.set_xlabel("training step", fontsize=7)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="share of tokens x E (1 = balanced)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
