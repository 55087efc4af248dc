"""The layout of a job: how its ranks split the work, checked against the config before anything is built.

world size = dp_replicate x dp_shard x tp, and expert parallelism borrows its ranks from dp_shard
(dp_shard = dp_shard_mod_ep x ep), as in torchtitan. Every check raises ``ConfigError`` with one line naming the
fields. Nothing here needs a process group, so a dry run can check a layout of any size.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparselm.config import Config
from sparselm.errors import ConfigError


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_parallel(cfg: Config) -> None:
    """Checks of [parallel] against the model and batch that do not need the world size (``resolve_layout`` adds
    the ones that do)."""
    p, m, e = cfg.parallel, cfg.model, cfg.moe
    for name in ("dp_replicate", "tp", "ep"):
        _check(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    _check(p.dp_shard == -1 or p.dp_shard >= 1, f"parallel.dp_shard must be >= 1 or -1 (auto), got {p.dp_shard}")
    _check(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    if p.tp > 1:
        _check(m.n_heads % p.tp == 0, f"model.n_heads={m.n_heads} is not divisible by parallel.tp={p.tp}")
        _check(m.d_ff % p.tp == 0, f"model.d_ff={m.d_ff} is not divisible by parallel.tp={p.tp}")
        if e.enabled:
            d_ff_expert = e.d_ff_expert or m.d_ff
            _check(d_ff_expert % p.tp == 0, f"moe.d_ff_expert={d_ff_expert} is not divisible by parallel.tp={p.tp}")
        # relative/xl keep per-head tables ([buckets, n_heads], u/v [n_heads, hd]) that the TP plan does not split.
        _check(
            m.position in ("rope", "absolute", "none"),
            f"parallel.tp={p.tp} supports model.position rope, absolute or none, not {m.position!r}",
        )
        # Each TP rank would see only its own heads in q_norm/k_norm's gradient, and the plan does not sum them.
        _check(not m.qk_norm, f"parallel.tp={p.tp} does not support model.qk_norm")
    if p.sequence_parallel:
        _check(p.tp > 1, "parallel.sequence_parallel needs parallel.tp > 1")
        seq = cfg.data.seq_len
        _check(seq % p.tp == 0, f"data.seq_len={seq} is not divisible by parallel.tp={p.tp} (sequence parallel)")
    if p.ep > 1:
        _check(e.enabled, f"parallel.ep={p.ep} needs an MoE model (moe.num_experts > 0)")
        _check(
            e.num_experts % p.ep == 0,
            f"moe.num_experts={e.num_experts} is not divisible by parallel.ep={p.ep}",
        )
        _check(p.tp == 1, f"parallel.ep={p.ep} with parallel.tp={p.tp} is not supported (choose one for the experts)")
        if p.dp_shard != -1:
            _check(p.dp_shard % p.ep == 0, f"parallel.dp_shard={p.dp_shard} is not divisible by parallel.ep={p.ep}")
    if cfg.retro.enabled:
        # Data parallelism and ZeRO apply to RETRO as to any model; the TP and EP plans know nothing of its encoder
        # and cross-attention yet.
        _check(
            p.tp == 1 and p.ep == 1,
            f"[retro] runs with data parallelism / ZeRO only, not parallel.tp={p.tp} / parallel.ep={p.ep}",
        )
    if p.zero_stage == 1:
        _check(p.param_dtype == "fp32", "parallel.param_dtype=bf16 needs parallel.zero_stage 0, 2 or 3")
    if p.cpu_offload:
        _check(p.zero_stage in (2, 3), f"parallel.cpu_offload needs parallel.zero_stage 2 or 3, got {p.zero_stage}")


@dataclass(frozen=True)
class Layout:
    world_size: int
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int
    zero_stage: int

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ways the global batch is split."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_mod_ep(self) -> int:
        return self.dp_shard // self.ep

    @property
    def expert_dp(self) -> int:
        """Copies of each expert: the data-parallel ranks that do not split the experts among themselves."""
        return self.dp_replicate * self.dp_shard_mod_ep

    def describe(self) -> str:
        parts = [f"dp_replicate={self.dp_replicate}", f"dp_shard={self.dp_shard}", f"tp={self.tp}", f"ep={self.ep}"]
        return f"{self.world_size} ranks: " + " x ".join(parts[:3]) + f", {parts[3]}, zero_stage={self.zero_stage}"


def resolve_layout(cfg: Config, world_size: int) -> Layout:
    """Check ``[parallel]`` (``validate_parallel``), fill in ``dp_shard=-1`` and check that the world size factors
    into the requested layout."""
    validate_parallel(cfg)
    p, t = cfg.parallel, cfg.train
    if world_size % (p.dp_replicate * p.tp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.dp_replicate={p.dp_replicate} x parallel.tp={p.tp}"
        )
    dp_shard = p.dp_shard if p.dp_shard != -1 else world_size // (p.dp_replicate * p.tp)
    if p.dp_replicate * dp_shard * p.tp != world_size:
        raise ConfigError(
            f"parallel.dp_replicate={p.dp_replicate} x parallel.dp_shard={dp_shard} x parallel.tp={p.tp} = "
            f"{p.dp_replicate * dp_shard * p.tp} ranks, but the world size is {world_size}"
        )
    if dp_shard % p.ep != 0:
        raise ConfigError(
            f"parallel.ep={p.ep} does not divide parallel.dp_shard={dp_shard} (expert parallelism uses dp_shard ranks)"
        )
    layout = Layout(world_size, p.dp_replicate, dp_shard, p.tp, p.ep, p.zero_stage)
    if t.global_batch_size % (layout.dp * t.micro_batch_size) != 0:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by {layout.dp} data-parallel ranks x "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    return layout
