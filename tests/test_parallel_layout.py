"""Layout checks of the [parallel] section: every impossible layout fails before any compute, with one line that
names the fields; and a single process ignores the section. No process group is needed for any of this."""

from __future__ import annotations

import pytest

from sparselm.config import Config, apply_overrides, validate
from sparselm.errors import ConfigError
from sparselm.parallel.layout import resolve_layout, validate_parallel


def cfg_with(*overrides: str) -> Config:
    base = [
        "model.d_model=32",
        "model.n_heads=4",
        "model.d_ff=64",
        "moe.num_experts=4",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
    ]
    cfg = apply_overrides(Config(), [*base, *overrides])
    validate(cfg)
    return cfg


def test_layouts_that_factor() -> None:
    layout = resolve_layout(cfg_with("parallel.dp_shard=2", "parallel.tp=2"), 4)
    assert (layout.dp_replicate, layout.dp_shard, layout.tp, layout.ep, layout.dp) == (1, 2, 2, 1, 2)
    auto = resolve_layout(cfg_with("parallel.tp=2"), 8)  # dp_shard=-1 takes what is left
    assert (auto.dp_shard, auto.dp) == (4, 4)
    ep = resolve_layout(cfg_with("parallel.ep=2", "parallel.zero_stage=3"), 4)
    assert (ep.dp_shard_mod_ep, ep.expert_dp, ep.dp) == (2, 2, 4)
    hsdp = resolve_layout(cfg_with("parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2"), 4)
    assert (hsdp.dp, hsdp.expert_dp) == (4, 2)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (
            ["parallel.tp=3", "model.n_heads=6", "model.d_model=48", "model.d_ff=66", "moe.num_experts=0"],
            4,
            "world size 4 is not divisible by parallel.dp_replicate=1 x parallel.tp=3",
        ),
        (["parallel.dp_shard=3", "parallel.tp=2"], 4, "= 6 ranks, but the world size is 4"),
        (["parallel.dp_shard=4", "parallel.ep=4", "moe.num_experts=8", "parallel.dp_replicate=2"], 4, "= 8 ranks"),
        (["parallel.ep=2", "parallel.dp_shard=3"], 3, "parallel.dp_shard=3 is not divisible by parallel.ep=2"),
        (["train.micro_batch_size=4"], 4, "train.global_batch_size=8 is not divisible by 4 data-parallel ranks"),
    ],
)
def test_world_size_errors(overrides: list[str], world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_layout(cfg_with(*overrides), world)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tp=8"], "model.n_heads=4 is not divisible by parallel.tp=8"),
        (["parallel.tp=2", "moe.d_ff_expert=33"], "moe.d_ff_expert=33 is not divisible by parallel.tp=2"),
        (["parallel.tp=2", "model.position=xl"], "supports model.position rope, absolute or none"),
        (["parallel.tp=2", "model.qk_norm=true"], "does not support model.qk_norm"),
        (["parallel.ep=3"], "moe.num_experts=4 is not divisible by parallel.ep=3"),
        (["parallel.ep=2", "moe.num_experts=0"], "needs an MoE model"),
        (["parallel.ep=2", "parallel.tp=2"], "is not supported"),
        (["parallel.zero_stage=4"], "parallel.zero_stage must be 0, 1, 2 or 3"),
        (["parallel.zero_stage=1", "parallel.param_dtype=bf16"], "needs parallel.zero_stage 0, 2 or 3"),
        (["parallel.cpu_offload=true"], "parallel.cpu_offload needs parallel.zero_stage 2 or 3"),
        (["parallel.sequence_parallel=true"], "needs parallel.tp > 1"),
        (["parallel.dp_shard=0"], "parallel.dp_shard must be >= 1 or -1"),
    ],
)
def test_static_errors(overrides: list[str], message: str) -> None:
    cfg = cfg_with(*overrides)  # a valid config for one process: the [parallel] section is checked by the launcher
    with pytest.raises(ConfigError, match=message):
        validate_parallel(cfg)
    with pytest.raises(ConfigError, match=message):
        resolve_layout(cfg, 8)
