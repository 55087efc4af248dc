"""Where training numbers go: a JSONL file (one record per logging step), TensorBoard, and the console."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


class MetricsLogger:
    """Appends records to ``RUN_DIR/metrics.jsonl`` and mirrors scalars (and expert-load histograms) to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is None:
            return
        step = int(record["step"])
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        for layer, load in enumerate(record.get("expert_load", [])):
            # A histogram per MoE layer: the distribution of per-expert token fractions.
            self._tb.add_histogram(f"expert_load/moe_layer_{layer}", torch.tensor(load), step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expert_load_summary(load: list[float]) -> dict[str, float]:
    """Balance of one layer's per-expert token fractions: max/mean (1 = perfect) and coefficient of variation."""
    t = torch.tensor(load)
    mean = t.mean().item()
    return {
        "max_over_mean": (t.max().item() / mean) if mean > 0 else float("nan"),
        "cv": (t.std(unbiased=False).item() / mean) if mean > 0 else float("nan"),
        "min": t.min().item(),
        "max": t.max().item(),
    }


_BARS = " ▁▂▃▄▅▆▇█"


def format_expert_load(loads: list[list[float]], dropped_fraction: float | None = None) -> str:
    """One line per MoE layer: a bar per expert (height = share of tokens relative to the busiest expert)."""
    lines = []
    for i, load in enumerate(loads):
        top = max(load) if load and max(load) > 0 else 1.0
        bars = "".join(_BARS[min(len(_BARS) - 1, round(x / top * (len(_BARS) - 1)))] for x in load)
        s = expert_load_summary(load)
        lines.append(f"  moe layer {i}: |{bars}| max/mean {s['max_over_mean']:.2f}  cv {s['cv']:.2f}")
    if dropped_fraction is not None:
        lines.append(f"  dropped token fraction: {dropped_fraction:.4f}")
    return "\n".join(lines)
