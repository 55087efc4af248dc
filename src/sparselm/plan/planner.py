"""``plan(cfg, world_size, hardware)``: the dry run of a layout on a fake world, and its step-time estimate.

Fake tensors cost no memory but each op costs tens of microseconds of Python, so a plan does not run all the
layers of a deep model: it runs two shallow copies, two and three *periods* deep (a period is the repeating unit of
layers: one block for a dense model, ``moe.moe_every`` blocks for an MoE), and extends every count linearly to the
full depth. Each block of a period holds, sends and computes exactly what the same block of every other period
does, so bytes, calls and FLOPs come out as a full run's; the peak of live bytes is extended segment by segment
(``extend_peak``; ``tests/test_plan.py`` compares both with full runs). ``full=True`` runs every layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace

from sparselm.config import Config
from sparselm.plan.dryrun import Collective, Measurement, dry_run, resting_parameter_bytes
from sparselm.plan.estimate import Estimate, estimate
from sparselm.plan.fake import fake_world
from sparselm.plan.hardware import Hardware

DEFAULT_EFFICIENCY = 0.5
ACCELERATOR_EXPERT_KERNEL = "grouped_mm"


@dataclass
class Plan:
    cfg: Config
    hardware: Hardware
    measurement: Measurement
    estimate: Estimate
    extrapolated_from: tuple[int, int] | None = None  # probe depths, when the counts were extended

    def to_dict(self) -> dict:
        return {
            "hardware": self.hardware.key,
            "measurement": self.measurement.to_dict(),
            "estimate": self.estimate.to_dict(),
            "extrapolated_from_layers": list(self.extrapolated_from) if self.extrapolated_from else None,
        }


def plan_config(cfg: Config, hardware: Hardware) -> Config:
    """The config the dry run lays out: precision resolved for the device (``auto``: bf16 where it has it)."""
    precision = hardware.resolve_precision(cfg.train.precision)
    return replace(cfg, train=replace(cfg.train, precision=precision))


def measure(
    cfg: Config, world_size: int, both_checkpointing: bool = True, expert_kernel: str | None = None
) -> Measurement:
    with fake_world(world_size) as env:
        return dry_run(cfg, env, both_checkpointing, expert_kernel)


def plan(
    cfg: Config,
    world_size: int,
    hardware: Hardware,
    efficiency: float = DEFAULT_EFFICIENCY,
    full: bool = False,
    both_checkpointing: bool = True,
) -> Plan:
    """Dry-run ``cfg`` on ``world_size`` fake ranks and estimate its step on ``hardware``: on two shallow copies
    extended to the full depth, or with ``full`` on every layer."""
    cfg = plan_config(cfg, hardware)
    depths = None if full else probe_depths(cfg)
    # Accelerators run the MoE experts through grouped_mm (the dry run's fake tensors live on "cpu", where the model
    # would pick its CPU loop kernel): plan the code path the device will run.
    kernel = ACCELERATOR_EXPERT_KERNEL if cfg.train.precision == "bf16" else None  # grouped_mm is bf16-only
    args = (world_size, both_checkpointing, kernel)
    if depths is None:
        m = measure(cfg, *args)
    else:
        small, large = (measure(_with_layers(cfg, n), *args) for n in depths)
        period = depths[1] - depths[0]
        m = extend(small, large, period, cfg.model.n_layers // period)
    return Plan(cfg, hardware, m, estimate(m, cfg, hardware, efficiency), depths)


def resting_bytes(cfg: Config, world_size: int) -> float:
    """This rank's parameters between steps (``dryrun.resting_parameter_bytes``), for the full depth."""
    depths = probe_depths(cfg)
    sizes = [_with_layers(cfg, n) for n in depths] if depths else [cfg]
    measured = []
    for c in sizes:
        with fake_world(world_size) as env:
            measured.append(resting_parameter_bytes(c, env))
    if depths is None:
        return measured[0]
    return _line(*measured, (cfg.model.n_layers - depths[0]) / (depths[1] - depths[0]))


def probe_depths(cfg: Config) -> tuple[int, int] | None:
    """Two and three periods of layers (first and last blocks apart, one between), when the model is a whole
    number of periods and deeper than three."""
    period = cfg.moe.moe_every if cfg.moe.enabled else 1
    n = cfg.model.n_layers
    if n % period or n <= 3 * period:
        return None
    return 2 * period, 3 * period


def _with_layers(cfg: Config, n_layers: int) -> Config:
    return replace(cfg, model=replace(cfg.model, n_layers=n_layers))


def _line(a: float, b: float, periods: float) -> float:
    return a + (b - a) * periods


def extend(small: Measurement, large: Measurement, period: int, periods: int) -> Measurement:
    """The measurement of ``periods`` periods from those of two (``small``) and three (``large``): every count is a
    linear function of depth, and the peak is the largest of the step's segments extended one by one."""
    out = copy.deepcopy(large)
    steps = periods - 2  # periods beyond ``small``'s two
    for name in ("state", "activations"):
        a, b = getattr(small, name), getattr(large, name)
        setattr(out, name, {k: round(_line(a[k], b[k], steps)) for k in b})
    out.peak = {k: extend_peak(small.peak_segments[k], large.peak_segments[k], period, periods) for k in large.peak}
    out.flops = _line(small.flops, large.flops, steps)
    out.flops_micro_batch = _line(small.flops_micro_batch, large.flops_micro_batch, steps)
    by_key = {(c.kind, c.group, c.phase): c for c in small.collectives}
    out.collectives = []
    for c in large.collectives:
        s = by_key.get((c.kind, c.group, c.phase), Collective(c.kind, c.group, c.ranks, c.phase, 0, 0, 0, 0))
        numbers = {f.name: _line(getattr(s, f.name), getattr(c, f.name), steps)
                   for f in fields(Collective) if f.name in ("calls", "payload", "volume", "wire")}  # fmt: skip
        out.collectives.append(replace(c, **numbers))
    out.seconds = small.seconds + large.seconds
    return out


def extend_peak(small: dict[tuple, int], large: dict[tuple, int], period: int, periods: int) -> int:
    """Peak of live bytes at ``periods`` periods deep from the segment peaks of copies two (``small``) and three
    (``large``) periods deep.

    Every segment's peak grows linearly with depth when it keeps its place relative to the start (before the first
    block, the first period's blocks: the embedding's backward closes the step) or to the end (the last period's
    blocks: the head and the top of the backward follow them). Blocks in between hold fewer live activations than
    the last ones in forward and the top ones in backward, so the peak is one of those extended."""
    best = 0.0
    for key, value in large.items():
        micro, kind, *index = key
        if not index or index[0] < period:
            before = small.get(key, value)  # the same place from the start
        elif index[0] >= 2 * period:
            before = small.get((micro, kind, index[0] - period), value)  # the same place from the end
        else:
            continue
        best = max(best, _line(before, value, periods - 2))
    return round(best)
