"""Typed configuration: dataclasses loaded from TOML, overridable with ``--set section.field=value``.

Every field lives in exactly one section. Loading (``sparselm.config_loader``, shared with the data pipeline's
config) checks each value against its field's annotation: ``true``/``false`` for booleans, numbers for numbers (a
quoted "1e-3" is a string, not a number), and a choice field (a ``Literal``) only takes its listed values. A
``--set`` value is read as TOML, so ``--set optim.lr=1e-3`` is a number, and text that is not TOML (``--set
data.path=runs/x``) is an unquoted string. ``validate`` then checks ranges and relations between fields. Every
problem raises ``ConfigError`` with a one-line message that names the field, so a typo in a 200-step run fails in
milliseconds, not minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sparselm import config_loader
from sparselm.errors import ConfigError

Norm = Literal["rmsnorm", "layernorm"]  # rmsnorm (Gopher) | layernorm
# rope | relative (T5 learned bias) | xl (Transformer-XL, Gopher) | absolute | none
Position = Literal["rope", "relative", "xl", "absolute", "none"]
FFN = Literal["swiglu", "gelu"]
# auto: bf16 where the device computes in it natively, else fp32 (see sparselm/precision.py) | bf16 (autocast, fp32
# master weights) | fp32
Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS = config_loader.choices(Precision)
DType = Literal["fp32", "bf16"]
# probability: the chosen expert's output times its router probability (Switch) | straight_through: times 1, with the
# probability's gradient, so the router still learns from the task loss
Top1Gate = Literal["probability", "straight_through"]
LayerLosses = Literal["mean", "sum"]  # mean over MoE layers | sum (Switch, GShard, GLaM)
# auto: torch's fused AdamW kernel where every parameter is a floating-point CPU/CUDA tensor (or DTensor), else
# foreach | fused (an error where it cannot run) | foreach (the multi-tensor loop)
AdamImplementation = Literal["auto", "fused", "foreach"]


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    d_ff: int = 2048  # hidden size of the dense FFN (per branch for SwiGLU)
    max_seq_len: int = 512
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-5
    position: Position = "rope"
    rope_theta: float = 10000.0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    ffn: FFN = "swiglu"
    tie_embeddings: bool = True
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3, OLMoE)
    bias: bool = False
    dropout: float = 0.0
    init_std: float = 0.02


@dataclass
class MoEConfig:
    """The seed systems' recipes (what each choice cost in training is measured in docs/moe-recipes.md):

    - Switch: ``top_k = 1``, experts as wide as the dense FFN, ``top1_gate = "probability"``.
    - GShard / GLaM: ``top_k = 2``, gates renormalised; half-width experts spend the dense FFN's FLOPs.
    - DeepSpeed-MoE Residual-MoE: ``top_k = 1`` with ``shared_expert``.
    - All three add every MoE layer's balancing and z-losses (``layer_losses = "sum"``). The default, ``"mean"``,
      averages them, so a coefficient acts as coefficient / number of MoE layers on each layer.
    """

    num_experts: int = 0  # 0 means a dense model
    top_k: int = 2  # 1: Switch / DeepSpeed-MoE, 2: GLaM / GShard
    moe_every: int = 2  # every moe_every-th layer (1-based) gets an MoE FFN; 2 = every other layer (GLaM)
    d_ff_expert: int = 0  # 0 means model.d_ff
    dropless: bool = True  # False: capacity_factor bounds tokens per expert and overflow tokens are dropped
    capacity_factor: float = 1.25  # used only when dropless is False (training)
    eval_capacity_factor: float = 2.0  # used only when dropless is False (eval / generation)
    renormalize: bool = True  # renormalise the top-k gate weights to sum to one (top_k > 1)
    top1_gate: Top1Gate = "probability"  # what scales a top-1 expert's output
    jitter: float = 0.0  # multiplicative uniform noise on router inputs during training (Switch), 0 = off
    aux_loss_coef: float = 0.01  # Switch load-balancing loss coefficient
    z_loss_coef: float = 0.001  # router z-loss coefficient (ST-MoE)
    layer_losses: LayerLosses = "mean"  # how the MoE layers' balancing and z-losses combine
    shared_expert: bool = False  # Residual-MoE: a dense FFN in parallel with the routed experts
    router_init_std: float = 0.02
    expert_init_scale: float = 1.0  # multiple of the dense init for expert weights (Switch: smaller is stabler)

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def placement(self, n_layers: int) -> list[int]:
        """0-based indices of the layers an MoE at ``moe_every`` replaces: every moe_every-th layer, 1-based."""
        return [i for i in range(n_layers) if (i + 1) % self.moe_every == 0]

    def layer_indices(self, n_layers: int) -> list[int]:
        """0-based indices of the layers that hold an MoE FFN (none for a dense model)."""
        return self.placement(n_layers) if self.enabled else []


@dataclass
class DataConfig:
    path: str = ""  # directory written by `sparselm prepare` (token shards + meta.json)
    seq_len: int = 256
    seed: int = -1  # order of the training batches; -1 follows train.seed (set it to vary init and data apart)


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak (Gopher: 10%)
    warmup_steps: int = 100
    decay_steps: int = 0  # 0 means train.max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    expert_lr_scale: float = 1.0  # learning-rate multiplier for routed expert weights, which see a fraction of tokens
    implementation: AdamImplementation = "auto"  # AdamW kernel (sparselm/optim.py); same update up to rounding


@dataclass
class TrainConfig:
    max_steps: int = 1000
    global_batch_size: int = 16  # sequences per optimizer step (Megatron's global_batch_size)
    micro_batch_size: int = 8  # sequences per forward/backward; the rest is gradient accumulation
    precision: Precision = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 1234
    eval_every: int = 100  # 0 disables periodic validation
    eval_batches: int = 8
    max_bad_steps: int = 5  # consecutive non-finite steps before training stops
    threads: int = 0  # torch intra-op threads, 0 = leave torch's default
    keep_freed_memory: bool = True  # CPU: malloc keeps freed blocks for the next step (sparselm.host_memory)


@dataclass
class CheckpointConfig:
    every: int = 200  # 0 saves only at the end
    keep_last: int = 3


@dataclass
class LoggingConfig:
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    mfu: bool = True  # log MFU; false logs the model's FLOP/s only and measures no peak
    peak_flops: float = 0.0  # attainable FLOP/s per device that MFU divides by; 0 measures a matmul peak at start-up


@dataclass
class ParallelConfig:
    """Layout of a torchrun job (ignored by a single process). world size = dp_replicate x dp_shard x tp; ep ranks
    are taken out of dp_shard. See docs/parallelism.md."""

    dp_replicate: int = 1  # data-parallel groups holding full copies of the (ZeRO-sharded) state (HSDP's outer dim)
    dp_shard: int = -1  # data-parallel ranks that split ZeRO state among themselves; -1 = what the world size leaves
    tp: int = 1  # tensor (Megatron) parallel degree: heads and FFN width split over tp ranks
    ep: int = 1  # expert-parallel degree, carved out of dp_shard: each of ep ranks holds num_experts / ep experts
    zero_stage: int = 0  # 0 replicated (DDP), 1 + sharded optimizer state, 2 + sharded grads, 3 + sharded params
    sequence_parallel: bool = False  # with tp > 1: norms and the residual stream split along the sequence
    param_dtype: DType = "fp32"  # dtype parameters are gathered and computed in (FSDP2 mixed precision)
    reduce_dtype: DType = "fp32"  # dtype gradients are reduced in
    cpu_offload: bool = False  # zero_stage 2/3 on GPUs: sharded params, grads and optimizer state stay in CPU memory


@dataclass
class RetroConfig:
    """RETRO (Borgeaud et al. 2021): a neighbour encoder and chunked cross-attention on top of the decoder, fed with
    neighbours from a chunk database (``sparselm retro build-db``). ``enabled = false`` is exactly the plain model."""

    enabled: bool = False
    chunk_size: int = 64  # m: tokens per retrieval chunk; a neighbour is a chunk plus its continuation (2m tokens)
    neighbours: int = 2  # k: neighbours per chunk in training (and the default in evaluation)
    cca_start: int = 6  # 1-based decoder layer of the first chunked cross-attention (the paper: 6)
    cca_every: int = 3  # then every cca_every-th layer after it (the paper: 3)
    encoder_layers: int = 2  # bidirectional neighbour-encoder layers
    encoder_d_model: int = 0  # 0 = model.d_model
    encoder_heads: int = 0  # 0 = model.n_heads
    encoder_d_ff: int = 0  # 0 = model.d_ff
    encoder_moe: bool = False  # MoE FFNs in the encoder too, placed by moe.moe_every (needs moe.num_experts > 0)
    db: str = ""  # training: database directory holding precomputed neighbours for data.path's train split
    init_from: str = ""  # RETRO-fitting: a trained checkpoint (run or checkpoint dir) without retrieval to start from
    freeze_base: bool = False  # RETRO-fitting: train only the encoder and the cross-attention, the rest stays frozen

    def cca_layers(self, n_layers: int) -> list[int]:
        """0-based decoder layers holding a chunked cross-attention (none when retrieval is off)."""
        return list(range(self.cca_start - 1, n_layers, self.cca_every)) if self.enabled else []

    def encoder_moe_layers(self, moe: MoEConfig) -> list[int]:
        """0-based encoder layers holding an MoE FFN."""
        return moe.layer_indices(self.encoder_layers) if (self.enabled and self.encoder_moe) else []


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    retro: RetroConfig = field(default_factory=RetroConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from nested dicts (as parsed from TOML); unknown sections or keys are errors."""
    return config_loader.fill(base if base is not None else Config(), raw)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (from ``--set``) in order."""
    return config_loader.apply_overrides(cfg, overrides)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML file (or the defaults), apply overrides, validate."""
    cfg = Config()
    if path is not None:
        config_from_dict(config_loader.read_toml(path), cfg)
    if overrides:
        apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config, require_data: bool = False) -> None:
    """Check every field and every relation between fields; raise ConfigError naming the first problem."""
    config_loader.check(cfg)  # types and choice fields, as the loader checks them
    m, e, d, o, t = cfg.model, cfg.moe, cfg.data, cfg.optim, cfg.train
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
        _check(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    _check(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if m.position == "rope":
        _check((m.d_model // m.n_heads) % 2 == 0, "model.position=rope needs an even head dimension")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _check(m.relative_buckets > 0, "model.relative_buckets must be positive")

    _check(e.num_experts >= 0, f"moe.num_experts must be >= 0, got {e.num_experts}")
    if e.enabled:
        _check(e.top_k >= 1, f"moe.top_k must be >= 1, got {e.top_k}")
        _check(e.top_k <= e.num_experts, f"moe.top_k={e.top_k} is larger than moe.num_experts={e.num_experts}")
        _check(e.moe_every >= 1, f"moe.moe_every must be >= 1, got {e.moe_every}")
        _check(e.moe_every <= m.n_layers, f"moe.moe_every={e.moe_every} exceeds model.n_layers={m.n_layers}")
        _check(e.d_ff_expert >= 0, f"moe.d_ff_expert must be >= 0, got {e.d_ff_expert}")
        if not e.dropless:
            _check(e.capacity_factor > 0, f"moe.capacity_factor must be > 0, got {e.capacity_factor}")
            _check(e.eval_capacity_factor > 0, f"moe.eval_capacity_factor must be > 0, got {e.eval_capacity_factor}")
        _check(e.jitter >= 0, f"moe.jitter must be >= 0, got {e.jitter}")
        _check(e.aux_loss_coef >= 0, f"moe.aux_loss_coef must be >= 0, got {e.aux_loss_coef}")
        _check(e.expert_init_scale > 0, f"moe.expert_init_scale must be positive, got {e.expert_init_scale}")
        _check(e.z_loss_coef >= 0, f"moe.z_loss_coef must be >= 0, got {e.z_loss_coef}")

    _check(d.seq_len > 0, f"data.seq_len must be positive, got {d.seq_len}")
    _check(d.seed >= -1, f"data.seed must be -1 (follow train.seed) or a seed >= 0, got {d.seed}")
    _check(d.seq_len <= m.max_seq_len, f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if require_data:
        _check(bool(d.path), "data.path is not set (run `sparselm prepare` and point data.path at its output)")
        _check(Path(d.path).is_dir(), f"data.path={d.path!r} does not exist")
        _check(
            (Path(d.path) / "meta.json").is_file(), f"data.path={d.path!r} has no meta.json (not a prepared dataset)"
        )

    _check(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check(o.decay_steps >= 0, f"optim.decay_steps must be >= 0, got {o.decay_steps}")
    _check(0.0 <= o.beta1 < 1.0, f"optim.beta1 must be in [0, 1), got {o.beta1}")
    _check(0.0 <= o.beta2 < 1.0, f"optim.beta2 must be in [0, 1), got {o.beta2}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(o.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {o.grad_clip}")
    _check(o.expert_lr_scale > 0, f"optim.expert_lr_scale must be positive, got {o.expert_lr_scale}")

    _check(t.max_steps > 0, f"train.max_steps must be positive, got {t.max_steps}")
    _check(t.global_batch_size > 0, f"train.global_batch_size must be positive, got {t.global_batch_size}")
    _check(t.micro_batch_size > 0, f"train.micro_batch_size must be positive, got {t.micro_batch_size}")
    _check(
        t.global_batch_size % t.micro_batch_size == 0,
        f"train.global_batch_size={t.global_batch_size} is not a multiple of "
        f"train.micro_batch_size={t.micro_batch_size}",
    )
    _check(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
    _check(t.eval_batches > 0, f"train.eval_batches must be positive, got {t.eval_batches}")
    _check(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    _check(t.threads >= 0, f"train.threads must be >= 0, got {t.threads}")

    if cfg.retro.enabled:
        _validate_retro(cfg)

    _check(cfg.checkpoint.every >= 0, f"checkpoint.every must be >= 0, got {cfg.checkpoint.every}")
    _check(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    _check(cfg.logging.log_every >= 1, f"logging.log_every must be >= 1, got {cfg.logging.log_every}")
    _check(cfg.logging.peak_flops >= 0, f"logging.peak_flops must be >= 0, got {cfg.logging.peak_flops}")


def _validate_retro(cfg: Config) -> None:
    r, m = cfg.retro, cfg.model
    _check(r.chunk_size >= 1, f"retro.chunk_size must be >= 1, got {r.chunk_size}")
    _check(r.neighbours >= 1, f"retro.neighbours must be >= 1, got {r.neighbours}")
    _check(
        1 <= r.cca_start <= m.n_layers,
        f"retro.cca_start={r.cca_start} must be a layer of the decoder (1 to model.n_layers={m.n_layers})",
    )
    _check(r.cca_every >= 1, f"retro.cca_every must be >= 1, got {r.cca_every}")
    _check(r.encoder_layers >= 1, f"retro.encoder_layers must be >= 1, got {r.encoder_layers}")
    for name in ("encoder_d_model", "encoder_heads", "encoder_d_ff"):
        _check(getattr(r, name) >= 0, f"retro.{name} must be >= 0 (0 = the decoder's), got {getattr(r, name)}")
    d_enc, heads = r.encoder_d_model or m.d_model, r.encoder_heads or m.n_heads
    _check(d_enc % heads == 0, f"retro.encoder_d_model={d_enc} is not divisible by retro.encoder_heads={heads}")
    _check((d_enc // heads) % 2 == 0, "the neighbour encoder uses rotary positions: it needs an even head dimension")
    _check(not r.encoder_moe or cfg.moe.enabled, "retro.encoder_moe needs an MoE recipe (moe.num_experts > 0)")
    _check(
        not r.encoder_moe or cfg.moe.moe_every <= r.encoder_layers,
        f"retro.encoder_moe: moe.moe_every={cfg.moe.moe_every} leaves the {r.encoder_layers} encoder layers dense",
    )
    _check(not r.freeze_base or bool(r.init_from), "retro.freeze_base needs retro.init_from (the model to freeze)")
    _check(not cfg.train.compile, "train.compile is not supported with [retro] yet (set train.compile = false)")


def to_toml(cfg: Config) -> str:
    """Serialise a Config to TOML (flat tables of scalars; enough for our own files)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)
