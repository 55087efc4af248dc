"""``sparselm plan --search``: which layouts of N devices fit, ranked by estimated step time, and why the rest don't.

The search space: tensor parallel degree (divisors of N up to one node: Megatron keeps TP on NVLink), expert
parallel degree (divisors of the expert count), ZeRO stage 0-3, HSDP (ZeRO-2/3 sharded inside each node and
replicated across nodes, next to plain sharding over all ranks), micro-batch size (powers of two dividing the
per-rank batch) and activation checkpointing. Any of them given with ``--set`` stays fixed. With bf16 compute,
ZeRO-0/2/3 gather parameters in bf16 (``parallel.param_dtype=bf16``, FSDP's mixed precision: half the memory and
traffic of fp32 gathers) unless ``--set`` says otherwise.

Each layout is first checked by the launcher's own ``resolve_layout`` (the error it would stop with is the reason
given), then by the bytes of the parameter shards ``parallelize`` leaves on each rank (no step needed to rule out a
layout whose parameters alone do not fit). Then a dry run on shallow copies of the model (``planner``) measures
it. Memory only grows with the micro batch, so for each layout and checkpointing setting the largest micro batch
that fits is found by bisection; when a layout fits without checkpointing at its largest micro batch, checkpointing
(only slower) is not tried.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from sparselm.config import Config, apply_overrides
from sparselm.errors import ConfigError
from sparselm.parallel.layout import resolve_layout
from sparselm.plan.hardware import Hardware
from sparselm.plan.planner import DEFAULT_EFFICIENCY, Plan, plan, resting_bytes

SEARCHED = (
    "parallel.dp_replicate",
    "parallel.dp_shard",
    "parallel.tp",
    "parallel.ep",
    "parallel.zero_stage",
    "parallel.param_dtype",
    "train.micro_batch_size",
    "train.activation_checkpointing",
)


def fixed_settings(overrides: list[str]) -> dict[str, object]:
    """The searched fields an override list (``--set``) pins, typed as the search uses them."""
    out: dict[str, object] = {}
    for item in overrides:
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in SEARCHED:
            continue
        if key == "train.activation_checkpointing":
            out[key] = value.lower() == "true"
        elif key == "parallel.param_dtype":
            out[key] = value.strip('"')
        else:
            out[key] = int(value)
    return out


@dataclass
class Trial:
    settings: dict[str, object]
    plan: Plan | None = None
    reason: str = ""  # empty: it fits

    @property
    def fits(self) -> bool:
        return self.plan is not None and not self.reason

    def label(self) -> str:
        s = self.settings
        parts = [f"tp={s['parallel.tp']}", f"ep={s['parallel.ep']}", f"zero={s['parallel.zero_stage']}"]
        if s.get("parallel.dp_replicate", 1) != 1:
            parts.append(f"dp_replicate={s['parallel.dp_replicate']}")
        parts.append(f"micro={s['train.micro_batch_size']}")
        parts.append("ckpt=" + ("on" if s["train.activation_checkpointing"] else "off"))
        if s.get("parallel.param_dtype", "fp32") != "fp32":
            parts.append(f"params={s['parallel.param_dtype']}")
        return " ".join(parts)


@dataclass
class SearchResult:
    world_size: int
    hardware: Hardware
    ranked: list[Trial] = field(default_factory=list)  # fitting, fastest first
    rejected: list[Trial] = field(default_factory=list)
    measured: int = 0  # dry runs made


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _overrides(settings: dict[str, object]) -> list[str]:
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]


def _with(cfg: Config, settings: dict[str, object]) -> Config:
    return apply_overrides(copy.deepcopy(cfg), _overrides(settings))


def layouts(cfg: Config, world: int, hw: Hardware, fixed: dict[str, object]) -> list[dict[str, object]]:
    """Every combination of the structural fields (micro batch and checkpointing are chosen per layout)."""
    nodes = world // hw.devices_per_node if world % hw.devices_per_node == 0 else 1
    tps = [d for d in _divisors(world) if d <= hw.devices_per_node]
    eps = _divisors(cfg.moe.num_experts) if cfg.moe.enabled else [1]
    out = []
    for tp in [fixed["parallel.tp"]] if "parallel.tp" in fixed else tps:
        for ep in [fixed["parallel.ep"]] if "parallel.ep" in fixed else eps:
            for zero in [fixed["parallel.zero_stage"]] if "parallel.zero_stage" in fixed else [0, 1, 2, 3]:
                replicas = [1, nodes] if zero in (2, 3) and nodes > 1 else [1]
                for dp_replicate in [fixed["parallel.dp_replicate"]] if "parallel.dp_replicate" in fixed else replicas:
                    bf16 = cfg.train.precision == "bf16" and zero != 1
                    settings = {
                        "parallel.tp": tp,
                        "parallel.ep": ep,
                        "parallel.zero_stage": zero,
                        "parallel.dp_replicate": dp_replicate,
                        "parallel.dp_shard": fixed.get("parallel.dp_shard", -1),
                        "parallel.param_dtype": fixed.get("parallel.param_dtype", "bf16" if bf16 else "fp32"),
                    }
                    out.append(settings)
    return out


def micro_batches(cfg: Config, dp: int, fixed: dict[str, object]) -> list[int]:
    if "train.micro_batch_size" in fixed:
        return [int(fixed["train.micro_batch_size"])]
    per_rank = cfg.train.global_batch_size // dp if cfg.train.global_batch_size % dp == 0 else 0
    return [m for m in (2**i for i in range(16)) if m <= per_rank and per_rank % m == 0] or [1]


def search(
    cfg: Config,
    world: int,
    hw: Hardware,
    fixed: dict[str, object],
    efficiency: float = DEFAULT_EFFICIENCY,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Try the layouts of ``world`` devices for ``cfg`` (precision already resolved for ``hw``)."""
    result = SearchResult(world, hw)
    candidates = layouts(cfg, world, hw, fixed)
    for i, settings in enumerate(candidates):
        if progress:
            progress(f"layout {i + 1}/{len(candidates)}")
        _try_layout(cfg, world, hw, fixed, settings, efficiency, result)
    result.ranked.sort(key=lambda t: t.plan.estimate.step_s)
    return result


def _try_layout(cfg, world, hw, fixed, settings, efficiency, result: SearchResult) -> None:
    first = {**settings, "train.micro_batch_size": 1, "train.activation_checkpointing": False}
    try:
        layout = resolve_layout(_with(cfg, first), world)
    except ConfigError as e:
        result.rejected.append(Trial(first, reason=str(e)))
        return
    resting = resting_bytes(_with(cfg, first), world)
    if resting > hw.usable_bytes:  # no step needed to know
        gib = 2**30
        result.rejected.append(Trial(first, reason=f"its parameters alone take {resting / gib:,.3g} GiB per device "
                                                   f"between steps, {hw.usable_bytes / gib:,.3g} usable"))  # fmt: skip
        return
    micros = micro_batches(cfg, layout.dp, fixed)
    ckpts = [fixed["train.activation_checkpointing"]] if "train.activation_checkpointing" in fixed else [False, True]

    def attempt(micro: int, ckpt: bool) -> Trial:
        s = {**settings, "train.micro_batch_size": micro, "train.activation_checkpointing": ckpt}
        trial = Trial(s)
        try:
            trial.plan = plan(_with(cfg, s), world, hw, efficiency, both_checkpointing=False)
        except ConfigError as e:  # e.g. the batch does not split into this micro batch
            trial.reason = str(e)
            return trial
        result.measured += 1
        if not trial.plan.estimate.fits:
            peak = trial.plan.measurement.peak_bytes / 2**30
            trial.reason = f"needs {peak:,.3g} GiB per device, {hw.usable_bytes / 2**30:,.3g} usable"
        return trial

    for ckpt in ckpts:
        smallest = attempt(micros[0], ckpt)
        if not smallest.fits:
            result.rejected.append(smallest)
            continue
        best, lo, hi = smallest, 1, len(micros) - 1
        while lo <= hi:  # the largest micro batch that fits
            mid = (lo + hi) // 2
            trial = attempt(micros[mid], ckpt)
            if trial.fits:
                best, lo = trial, mid + 1
            else:
                hi = mid - 1
        result.ranked.append(best)
        if best.settings["train.micro_batch_size"] == micros[-1]:
            break  # fits at the largest micro batch: checkpointing would only add recomputation
