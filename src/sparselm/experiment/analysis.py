"""Compute-saving arithmetic of the MoE-vs-dense experiment: pure functions over (FLOPs, loss) curves.

A curve is a list of ``(training FLOPs, validation loss)`` points in training order. Between two points the loss
is interpolated linearly in log-FLOPs (the x axis of every scaling plot). "FLOPs to reach a loss" is the first
crossing; a curve that never gets that low has no answer (``None``), which the report shows as a bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Curve = list[tuple[float, float]]


def run_curve(run: dict, x: str = "flops") -> Curve:
    """A run record's validation curve from ``results.json`` against ``x`` (flops, tokens or train_seconds)."""
    return [(p[x], p["val_loss"]) for p in run["curve"] if p.get(x)]


def flops_to_reach(curve: Curve, target: float) -> float | None:
    """The training FLOPs at which ``curve`` first reaches ``target`` loss, or None if it never does."""
    previous = None
    for flops, loss in curve:
        if loss <= target:
            if previous is None:
                return flops
            (f0, l0) = previous
            if l0 == loss:
                return flops
            t = (l0 - target) / (l0 - loss)  # fraction of the way from previous to this point
            return math.exp(math.log(f0) + t * (math.log(flops) - math.log(f0)))
        previous = (flops, loss)
    return None


def loss_at_flops(curve: Curve, flops: float) -> float | None:
    """The loss of ``curve`` at ``flops`` (interpolated in log-FLOPs), or None outside the curve's range."""
    if not curve or flops < curve[0][0] or flops > curve[-1][0] * (1 + 1e-9):
        return None
    for (f0, l0), (f1, l1) in zip(curve, curve[1:], strict=False):
        if f0 <= flops <= f1:
            if f1 == f0:
                return l1
            t = (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return l0 + t * (l1 - l0)
    return curve[-1][1]


def family_flops_to_reach(curves: dict[str, Curve], target: float) -> tuple[float | None, str | None]:
    """The fewest FLOPs any member of a family needs to reach ``target``, and which member that is."""
    best: tuple[float | None, str | None] = (None, None)
    for name, curve in curves.items():
        flops = flops_to_reach(curve, target)
        if flops is not None and (best[0] is None or flops < best[0]):
            best = (flops, name)
    return best


@dataclass
class Saving:
    """How one MoE run compares with the dense family."""

    final_loss: float
    final_flops: float
    dense_flops: float | None  # dense family FLOPs to reach final_loss (None: no dense run got that low)
    dense_run: str | None
    factor: float | None  # dense_flops / final_flops
    factor_lower_bound: float  # largest dense FLOPs / final_flops: the factor is at least this when factor is None
    flops_to_m_final: float | None  # this run's FLOPs to reach dense-M's final loss
    factor_vs_m: float | None  # dense-M's total FLOPs / flops_to_m_final (target: >= 2)
    s_final_loss: float | None
    loss_at_s_flops: float | None  # this run's loss at dense-S's final FLOPs (both ~equal FLOPs per token)


def compute_saving(moe: Curve, dense: dict[str, Curve], m_name: str = "dense-M", s_name: str = "dense-S") -> Saving:
    final_flops, final_loss = moe[-1]
    dense_flops, dense_run = family_flops_to_reach(dense, final_loss)
    most = max((c[-1][0] for c in dense.values() if c), default=0.0)
    m_curve, s_curve = dense.get(m_name), dense.get(s_name)
    to_m = flops_to_reach(moe, m_curve[-1][1]) if m_curve else None
    s_final = s_curve[-1] if s_curve else None
    at_s = None
    if s_final is not None:
        at_s = loss_at_flops(moe, s_final[0])
        if at_s is None and moe[-1][0] < s_final[0]:
            # The MoE run's router FLOPs make it ~1% costlier, so dense-S ends a little further right; the MoE
            # curve ends just short of it, and its final point is the fair comparison.
            at_s = moe[-1][1] if moe[-1][0] >= 0.97 * s_final[0] else None
    return Saving(
        final_loss=final_loss,
        final_flops=final_flops,
        dense_flops=dense_flops,
        dense_run=dense_run,
        factor=dense_flops / final_flops if dense_flops is not None else None,
        factor_lower_bound=most / final_flops if final_flops else 0.0,
        flops_to_m_final=to_m,
        factor_vs_m=(m_curve[-1][0] / to_m) if (m_curve and to_m) else None,
        s_final_loss=s_final[1] if s_final else None,
        loss_at_s_flops=at_s,
    )
