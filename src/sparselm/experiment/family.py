"""The models of the MoE-vs-dense experiment: a dense family S, M (~4x S's FLOPs), L (~16x), and S+MoE-E variants.

Dense sizes follow one recipe: width and depth grow together (d_model doubles, one more layer), SwiGLU with
d_ff = 3 x d_model, head dimension 32 or 64, RoPE, RMSNorm, tied embeddings. The MoE models are S with every other
FFN (layers 2, 4, ...) replaced by E routed experts (DeepSpeed-MoE / GLaM placement). Top-1 experts have S's FFN
width and top-2 experts half of it, so every MoE model spends S's matmul FLOPs per token; only the router is extra.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from sparselm.config import Config, validate
from sparselm.params.counting import count_params, flops_per_token

# name -> (d_model, n_layers, n_heads, peak learning rate). Smaller models take a larger learning rate, as in the
# GPT-3 / Gopher tables; the MoE models use S's.
DENSE_SIZES = {
    "S": (128, 4, 4, 3e-3),
    "M": (256, 5, 4, 2e-3),  # 3.95x S's training FLOPs per token at vocabulary 2,048
    "L": (512, 6, 8, 1e-3),  # 16.8x
}
QUICK_SIZES = {  # --quick: the same shape of experiment, smaller
    "S": (64, 2, 2, 3e-3),
    "M": (128, 3, 4, 3e-3),
    "L": (256, 4, 4, 2e-3),
}


def override_key(override: str) -> str:
    """``"section.key=value"`` -> ``"section.key"``."""
    return override.split("=", 1)[0].strip()


@dataclass
class RunSpec:
    name: str  # "dense-S", "S+MoE-16 top-2", ...
    slug: str  # directory name: dense-s, s-moe16-top2
    kind: str  # dense | moe
    cfg: Config
    num_experts: int = 0
    top_k: int = 0
    variant_of: str | None = None  # slug of the run this one changes (a recipe variant)
    overrides: list[str] = field(default_factory=list)

    @property
    def pinned(self) -> set[str]:
        """The settings this run's overrides fix, which the experiment must not replace with its defaults."""
        return {override_key(o) for o in self.overrides}

    @property
    def steps(self) -> int | None:
        """Its own number of training steps (a variant setting train.max_steps); None: the plan's."""
        return self.cfg.train.max_steps if "train.max_steps" in self.pinned else None

    @property
    def train_flops_per_token(self) -> int:
        return flops_per_token(self.cfg).train

    @property
    def total_params(self) -> int:
        return count_params(self.cfg).total

    @property
    def active_params(self) -> int:
        return count_params(self.cfg).active


def base_config(vocab_size: int, seq_len: int, batch_size: int, seed: int) -> Config:
    cfg = Config()
    cfg.model.vocab_size = vocab_size
    cfg.model.max_seq_len = seq_len
    cfg.model.norm, cfg.model.position, cfg.model.ffn, cfg.model.tie_embeddings = "rmsnorm", "rope", "swiglu", True
    cfg.data.seq_len = seq_len
    cfg.optim.weight_decay = 0.1
    cfg.optim.grad_clip = 1.0
    cfg.optim.min_lr_ratio = 0.1  # Gopher: cosine to 10% of the peak
    cfg.train.global_batch_size = batch_size
    cfg.train.micro_batch_size = batch_size
    cfg.train.precision = "auto"  # the experiment sets the precision it resolved for this machine
    cfg.train.seed = seed
    cfg.checkpoint.keep_last = 1
    cfg.logging.tensorboard = False
    return cfg


def dense_config(base: Config, size: tuple[int, int, int, float]) -> Config:
    d_model, n_layers, n_heads, lr = size
    cfg = copy.deepcopy(base)
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = d_model, n_layers, n_heads
    cfg.model.d_ff = 3 * d_model
    cfg.optim.lr = lr
    return cfg


def moe_config(dense_s: Config, num_experts: int, top_k: int) -> Config:
    cfg = copy.deepcopy(dense_s)
    cfg.moe.num_experts = num_experts
    cfg.moe.top_k = top_k
    cfg.moe.moe_every = 2
    cfg.moe.d_ff_expert = cfg.model.d_ff // top_k  # same matmul FLOPs per token as dense S
    cfg.moe.dropless = True
    cfg.moe.aux_loss_coef = 0.01
    cfg.moe.z_loss_coef = 0.001
    return cfg


def build_family(
    vocab_size: int,
    seq_len: int = 256,
    batch_size: int = 16,
    experts: tuple[int, ...] = (4, 16, 64),
    top_ks: tuple[int, ...] = (1, 2),
    quick: bool = False,
    seed: int = 1234,
    moe_overrides: list[str] | None = None,
) -> list[RunSpec]:
    """Every run of the experiment, dense first. ``moe_overrides`` (``section.key=value``) change the MoE recipe."""
    from sparselm.config import apply_overrides

    base = base_config(vocab_size, seq_len, batch_size, seed)
    sizes = QUICK_SIZES if quick else DENSE_SIZES
    runs = [RunSpec(f"dense-{n}", f"dense-{n.lower()}", "dense", dense_config(base, s)) for n, s in sizes.items()]
    dense_s = runs[0].cfg
    for top_k in top_ks:
        for e in experts:
            cfg = moe_config(dense_s, e, top_k)
            if moe_overrides:
                apply_overrides(cfg, moe_overrides)
            runs.append(RunSpec(f"S+MoE-{e} top-{top_k}", f"s-moe{e}-top{top_k}", "moe", cfg, e, top_k))
    for run in runs:
        validate(run.cfg)
    return runs


def parse_variant(text: str, runs: list[RunSpec]) -> RunSpec:
    """``BASE_SLUG:section.key=value[,section.key=value...]`` -> a copy of run BASE_SLUG with the overrides.

    A variant trains on the same tokens for the same number of steps as the family, so its curve and final loss
    compare directly with its base run's: how a recipe change (balancing loss, z-loss, learning rate, capacity)
    moves an MoE model against the dense family. The one exception is ``train.max_steps``: a variant that sets it
    trains that many steps (warmup and cosine stretched to match) on the same token stream, e.g. to see whether an
    MoE model reaches dense-M's loss within half of dense-M's FLOPs, which the family's equal-token runs cannot.
    ``optim.warmup_steps``, which the experiment otherwise sets to 10% of the steps, is also kept if a variant sets it.
    """
    from sparselm.config import apply_overrides
    from sparselm.errors import ConfigError

    base_slug, sep, rest = text.partition(":")
    overrides = [item.strip() for item in rest.split(",") if item.strip()]
    if not sep or not overrides:
        raise ConfigError(f"--variant {text!r}: expected BASE:section.key=value[,section.key=value...]")
    by_slug = {r.slug: r for r in runs}
    if base_slug not in by_slug:
        raise ConfigError(f"--variant {text!r}: unknown base run {base_slug!r} (runs: {', '.join(by_slug)})")
    base = by_slug[base_slug]
    cfg = apply_overrides(copy.deepcopy(base.cfg), overrides)
    validate(cfg)
    suffix = "-".join(o.split(".", 1)[-1].replace("=", "").replace("_", "") for o in overrides)
    return RunSpec(
        name=f"{base.name} [{', '.join(overrides)}]",
        slug=f"{base.slug}--{suffix}"[:120],
        kind=base.kind,
        cfg=cfg,
        num_experts=cfg.moe.num_experts,
        top_k=cfg.moe.top_k,
        variant_of=base.slug,
        overrides=overrides,
    )
