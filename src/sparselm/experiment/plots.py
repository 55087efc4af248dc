"""The MoE-vs-dense report's plots: final losses against training FLOPs or seconds with the dense frontier, the
full-budget runs' validation curves against steps, and the expert load over training as heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparselm.experiment.cells import Analysis, runs_of

DENSE_COLORS = {"dense-XS": "#bdbdbd", "dense-S": "#757575", "dense-M": "#212121"}
RECIPE_COLORS = {"switch": "#1f77b4", "gshard": "#2ca02c", "deepspeed": "#d62728"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(name: str, recipe: str | None) -> str:
    return DENSE_COLORS.get(name.split(" [")[0], "#9e9e9e") if recipe is None else RECIPE_COLORS.get(recipe, "C4")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_cells(results: dict[str, Any], a: Analysis, path: Path, axis: str) -> Path:
    """Every cell's mean final loss with its 95% interval against its cost; the dense frontier as a line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10.5, 5.0))
    env = a.flops_frontier if axis == "flops" else a.time_frontier
    if env:
        ax.plot([p.cost for p in env], [p.loss for p in env], color="black", linewidth=1, label="dense frontier")
    labelled = set()
    for cell in a.cells:
        run = runs_of(results, cell)[0]
        cost = cell.cost(axis)
        if cost is None:
            continue
        h = a.noise.half_width(cell.n)
        label = cell.name if cell.name not in labelled else None
        labelled.add(cell.name)
        moe = cell.kind == "moe"
        ax.errorbar(
            cost,
            cell.loss,
            yerr=h if h != float("inf") else None,
            fmt="^" if moe else "o",
            color=_color(cell.name, run["recipe"]),
            markersize=6 if moe else 5,
            capsize=3,
            label=label,
            alpha=0.6 if run["overrides"] else 1.0,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs" if axis == "flops" else "training time on this CPU (s)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title("finished runs, mean over seeds with 95% intervals", fontsize=9)
    return _save(fig, path)


def plot_curves(results: dict[str, Any], a: Analysis, path: Path) -> Path:
    """Validation curves of the first seed of every full-budget cell against steps (the equal-steps view)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10.5, 4.6))
    regime_experts = next(r["experts"] for r in results["regimes"] if r["name"] == results["plan"]["regime"])
    for cell in a.cells:
        if cell.steps != a.full_steps:
            continue
        run = runs_of(results, cell)[0]
        points = [(p["step"], p["val_loss"]) for p in run["curve"]]
        if points:
            xs, ys = zip(*points, strict=True)
            # dense solid; the regime's number of experts dashed; the sweep over experts and variants dotted
            plain = run["num_experts"] == regime_experts and not run["overrides"]
            style = "-" if cell.kind == "dense" else ("--" if plain else ":")
            ax.plot(xs, ys, style, marker="o", markersize=3, color=_color(cell.name, run["recipe"]), label=cell.name)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title(f"runs trained for the full budget ({a.full_steps} steps), first seed", fontsize=9)
    return _save(fig, path)


def plot_expert_load(results: dict[str, Any], a: Analysis, path: Path) -> Path | None:
    """Per full-budget MoE cell (first seed) and MoE layer: each expert's share of tokens x E over training."""
    runs = [runs_of(results, m.cell)[0] for m in a.moe if m.cell.steps == a.full_steps]
    runs = [r for r in runs if r["expert_load"]]
    if not runs:
        return None
    plt = _plt()
    layers = max(len(r["expert_load"][0]["load"]) for r in runs)
    fig, axes = plt.subplots(len(runs), layers, figsize=(4.2 * layers, 1.9 * len(runs)), squeeze=False)
    image = None
    for row, run in enumerate(runs):
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
            ax.set_title(f"{run['model']}, MoE layer {layer}", fontsize=8)
            ax.tick_params(labelsize=7)
            if layer == 0:
                ax.set_ylabel("expert", fontsize=7)
            if row == len(runs) - 1:
                ax.set_xlabel("training step", fontsize=7)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="share of tokens x E (1 = balanced)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
