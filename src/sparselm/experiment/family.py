"""The models of the MoE-vs-dense experiment: candidate regimes, their dense sizes, the seeds' MoE recipes, and the
runs (model x budget x seed) that the experiment trains.

A **regime** fixes everything but the model: context, batch, vocabulary (the experiment's), which FFNs become MoE,
and dense sizes XS < S < M of one width-and-depth recipe (SwiGLU, RoPE, RMSNorm, an output layer of its own). S is
the model every MoE run is built on. A **recipe** is one seed system's MoE, always spending S's FFN FLOPs per token
so that only the router is extra: Switch (top-1, experts as wide as S's FFN), GShard/GLaM (top-2 of half-width
experts, gates renormalised) and DeepSpeed-MoE (top-1 of half-width experts plus a half-width shared expert,
Residual-MoE).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from sparselm.config import Config, apply_overrides, validate
from sparselm.params.counting import count_params, flops_per_token


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    lr: float  # peak learning rate; smaller models take a larger one (GPT-3 / Gopher tables)


@dataclass(frozen=True)
class Regime:
    name: str
    about: str  # one line for the report: what this regime changes
    seq_len: int
    batch_size: int
    moe_every: int  # 1: every FFN is an MoE; 2: every other one (GLaM / DeepSpeed-MoE placement)
    experts: int  # E of the recipe comparison
    sizes: dict[str, Shape]  # dense frontier sizes, smallest first; "S" is the MoE base


# Every named regime; the search tries SEARCHED unless --regimes names others. The first three were the candidates
# of the tied-embedding runs of 2026-12-06 (deep-ctx256 won); the small ones give each expert more tokens in the
# same minutes, which is where the experts' gain was measured to grow (docs/moe-vs-dense-design.md).
REGIMES = {
    r.name: r
    for r in (
        Regime(
            "small-ctx128",
            "small and long: d_model 64, 2 layers, FFN 4x d_model, MoE in every layer, context 128",
            seq_len=128,
            batch_size=32,
            moe_every=1,
            experts=16,
            sizes={
                "XS": Shape(48, 2, 2, 192, 3e-3),
                "S": Shape(64, 2, 2, 256, 3e-3),
                "M": Shape(96, 3, 3, 384, 3e-3),
            },
        ),
        Regime(
            "small-deep-ctx128",
            "small and deeper: d_model 64, 4 layers, FFN 4x d_model, MoE in every other layer, context 128",
            seq_len=128,
            batch_size=32,
            moe_every=2,
            experts=16,
            sizes={
                "XS": Shape(48, 3, 2, 192, 3e-3),
                "S": Shape(64, 4, 2, 256, 3e-3),
                "M": Shape(96, 5, 3, 384, 3e-3),
            },
        ),
        Regime(
            "deep-ctx256",
            "the previous family's S: 4 layers, FFN 3x d_model, MoE in every other layer, context 256",
            seq_len=256,
            batch_size=16,
            moe_every=2,
            experts=16,
            sizes={
                "XS": Shape(96, 3, 3, 288, 3e-3),
                "S": Shape(128, 4, 4, 384, 3e-3),
                "M": Shape(192, 5, 6, 576, 2e-3),
            },
        ),
        Regime(
            "ffn-ctx128",
            "FFN-dominated: 2 layers, FFN 4x d_model, MoE in every layer, context 128",
            seq_len=128,
            batch_size=32,
            moe_every=1,
            experts=16,
            sizes={
                "XS": Shape(128, 2, 4, 512, 3e-3),
                "S": Shape(192, 2, 6, 768, 2e-3),
                "M": Shape(256, 3, 4, 1024, 2e-3),
            },
        ),
        Regime(
            "wide-ffn-ctx128",
            "wider FFN: 2 layers, FFN 8x d_model, MoE in every layer, context 128",
            seq_len=128,
            batch_size=32,
            moe_every=1,
            experts=16,
            sizes={
                "XS": Shape(96, 2, 3, 768, 3e-3),
                "S": Shape(128, 2, 4, 1024, 3e-3),
                "M": Shape(192, 3, 6, 1536, 2e-3),
            },
        ),
    )
}
SEARCHED = ("small-ctx128", "small-deep-ctx128")
QUICK_REGIMES = {  # --quick: the same experiment (search included) on tiny models
    r.name: r
    for r in (
        Regime(
            "tiny",
            "tiny, MoE in every layer",
            seq_len=64,
            batch_size=16,
            moe_every=1,
            experts=4,
            sizes={"XS": Shape(32, 1, 2, 128, 3e-3), "S": Shape(48, 1, 2, 192, 3e-3), "M": Shape(64, 2, 2, 256, 3e-3)},
        ),
        Regime(
            "tiny-deep",
            "tiny, MoE in every other layer",
            seq_len=64,
            batch_size=16,
            moe_every=2,
            experts=4,
            sizes={"XS": Shape(32, 2, 2, 96, 3e-3), "S": Shape(48, 2, 2, 144, 3e-3), "M": Shape(64, 3, 2, 192, 3e-3)},
        ),
    )
}


@dataclass(frozen=True)
class Recipe:
    key: str
    label: str
    top_k: int
    shared: bool
    settings: tuple[str, ...] = ()  # further moe.* overrides of the seed system's recipe

    def expert_width(self, d_ff: int) -> int:
        """Routed-expert width that spends ``d_ff``'s FLOPs per token over top_k experts and the shared one."""
        return d_ff // (self.top_k + int(self.shared))


SEED_CONVENTIONS = ("moe.layer_losses=sum",)  # Switch, GShard and GLaM add every MoE layer's balancing loss
RECIPES = {
    r.key: r
    for r in (
        Recipe("switch", "Switch top-1", 1, False, SEED_CONVENTIONS),
        Recipe("gshard", "GShard top-2", 2, False, SEED_CONVENTIONS),
        Recipe("deepspeed", "DeepSpeed top-1 + shared", 1, True, SEED_CONVENTIONS),
    )
}


def override_key(override: str) -> str:
    """``"section.key=value"`` -> ``"section.key"``."""
    return override.split("=", 1)[0].strip()


@dataclass
class RunSpec:
    """One training run: a model (dense size or recipe over S) at one budget and seed."""

    model: str  # "dense-S", "MoE-16 Switch top-1", ...
    kind: str  # dense | moe
    cfg: Config
    steps: int
    seed: int
    recipe: str | None = None
    num_experts: int = 0
    group: str = "main"  # search | main
    overrides: list[str] = field(default_factory=list)  # --variant changes, part of the model's name

    @property
    def slug(self) -> str:
        name = self.model.lower().replace("+", "").replace(" ", "-").replace("[", "").replace("]", "")
        name = "".join(ch for ch in name if ch.isalnum() or ch in "-.=")
        return f"{self.group}/{name}/steps{self.steps}-seed{self.seed}"[:180]

    @property
    def timing_key(self) -> str:
        """The planner's name for this run's model: the regimes of the search share model names."""
        return f"{self.group}/{self.model}"

    @property
    def train_flops_per_token(self) -> int:
        return flops_per_token(self.cfg).train

    @property
    def total_params(self) -> int:
        return count_params(self.cfg).total

    @property
    def active_params(self) -> int:
        return count_params(self.cfg).active


def base_config(regime: Regime, vocab_size: int) -> Config:
    cfg = Config()
    cfg.model.vocab_size = vocab_size
    cfg.model.max_seq_len = regime.seq_len
    cfg.model.norm, cfg.model.position, cfg.model.ffn = "rmsnorm", "rope", "swiglu"
    # Untied: tied runs of these sizes scatter by 0.12 nats from a rounding-level change (docs/moe-vs-dense-design.md)
    cfg.model.tie_embeddings = False
    cfg.data.seq_len = regime.seq_len
    cfg.optim.weight_decay = 0.1
    cfg.optim.grad_clip = 1.0
    cfg.optim.min_lr_ratio = 0.1  # Gopher: cosine to 10% of the peak
    cfg.train.global_batch_size = regime.batch_size
    cfg.train.micro_batch_size = regime.batch_size
    cfg.train.precision = "auto"  # the experiment sets the precision it resolved for this machine
    cfg.checkpoint.keep_last = 1
    cfg.logging.tensorboard = False
    cfg.logging.mfu = False  # MFU is not this experiment's subject: no per-run peak measurement
    return cfg


def dense_config(regime: Regime, vocab_size: int, size: str) -> Config:
    shape = regime.sizes[size]
    cfg = base_config(regime, vocab_size)
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = shape.d_model, shape.n_layers, shape.n_heads
    cfg.model.d_ff = shape.d_ff
    cfg.moe.moe_every = regime.moe_every  # no experts: only says which FFNs an MoE would replace (flops_share)
    cfg.optim.lr = shape.lr
    return cfg


def moe_config(regime: Regime, vocab_size: int, recipe: Recipe, num_experts: int) -> Config:
    cfg = dense_config(regime, vocab_size, "S")
    cfg.moe.num_experts = num_experts
    cfg.moe.top_k = recipe.top_k
    cfg.moe.d_ff_expert = recipe.expert_width(cfg.model.d_ff)
    cfg.moe.shared_expert = recipe.shared
    cfg.moe.dropless = True
    apply_overrides(cfg, list(recipe.settings))
    return cfg


def moe_name(recipe: Recipe, num_experts: int) -> str:
    return f"MoE-{num_experts} {recipe.label}"


def dense_run(regime: Regime, vocab_size: int, size: str, steps: int, seed: int, group: str = "main") -> RunSpec:
    cfg = dense_config(regime, vocab_size, size)
    return _finish(RunSpec(f"dense-{size}", "dense", cfg, steps, seed, group=group))


def moe_run(
    regime: Regime,
    vocab_size: int,
    recipe: str,
    num_experts: int,
    steps: int,
    seed: int,
    group: str = "main",
    moe_overrides: list[str] | None = None,
) -> RunSpec:
    r = RECIPES[recipe]
    cfg = moe_config(regime, vocab_size, r, num_experts)
    if moe_overrides:
        apply_overrides(cfg, moe_overrides)
    return _finish(RunSpec(moe_name(r, num_experts), "moe", cfg, steps, seed, recipe, num_experts, group))


def _finish(run: RunSpec) -> RunSpec:
    run.cfg.train.seed = run.seed
    run.cfg.train.max_steps = run.steps
    validate(run.cfg)
    return run


def with_overrides(run: RunSpec, overrides: list[str]) -> RunSpec:
    """A copy of ``run`` with ``section.key=value`` changes (a recipe variant); its name lists them."""
    cfg = apply_overrides(copy.deepcopy(run.cfg), overrides)
    variant = copy.copy(run)
    variant.cfg = cfg
    variant.model = f"{run.model} [{', '.join(overrides)}]"
    variant.overrides = list(overrides)
    return _finish(variant)
