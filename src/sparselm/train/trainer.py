"""The training loop: global batch -> micro-batches -> autocast forward/backward -> reduce and clip -> AdamW step.

Where it runs is the runtime's business (``sparselm.parallel.runtime``): one process, or one rank of a torchrun job
whose ``[parallel]`` layout (ZeRO, TP, EP) the runtime applies to the model. Either way each data-parallel rank
trains on its rows of the same global batch, ``train.global_batch_size`` sequences per optimizer step in
micro-batches of ``train.micro_batch_size``, and the logged numbers are reduced over the data-parallel ranks: a
layout changes where the arithmetic runs, not what is trained, so the same config gives the same losses on 1
process and on N.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sparselm.checkpoint.files import checkpoint_info, latest_checkpoint, load_training_state, save_checkpoint
from sparselm.config import Config, to_toml, validate
from sparselm.data.loader import BatchSampler, TokenShards, eval_batches
from sparselm.errors import ConfigError, TrainingStopped
from sparselm.host_memory import keep_freed_memory
from sparselm.model.transformer import Transformer
from sparselm.optim import implementation_of
from sparselm.parallel.runtime import Runtime, create_runtime
from sparselm.params.counting import flops_per_token
from sparselm.precision import autocast, measure_matmul_flops
from sparselm.train.metrics import MetricsLogger, format_expert_load


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    losses: list[float] = field(default_factory=list)  # training loss at every step run in this call
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    expert_load: list[list[float]] = field(default_factory=list)  # last logging window, one list per MoE layer
    dropped_fraction: float = 0.0
    skipped_steps: int = 0


# Test seam: called after backward with (step, model); a test can poison gradients to exercise the NaN guard.
AfterBackward = Callable[[int, torch.nn.Module], None]


def build_model(cfg: Config) -> Transformer:
    """The seeded single-device model, before any runtime lays it out."""
    torch.manual_seed(cfg.train.seed)
    return Transformer(cfg.model, cfg.moe, cfg.retro)


# Validation batches of a split: (shards, seq_len, batch_size, max_batches) -> batches as the sampler gives them.
EvalBatches = Callable[[TokenShards, int, int, int | None], Iterator[tuple[torch.Tensor, ...]]]


class DataSource:
    """Where a run's batches come from: (inputs, targets) token windows. A job that feeds the model more plugs in
    a subclass (RETRO: ``sparselm.retro.training.RetroSource``, whose batches add each window's neighbours), and
    may prepare the built model first (RETRO-fitting loads and freezes its base)."""

    def prepare(self, model: Transformer) -> Transformer:
        return model

    def sampler(self, shards: TokenShards, seq_len: int, global_batch_size: int, seed: int, rank: int, size: int):
        return BatchSampler(shards, seq_len, global_batch_size, seed, rank, size)

    def eval_batches(self, shards: TokenShards, seq_len: int, batch_size: int, max_batches: int | None):
        return eval_batches(shards, seq_len, batch_size, max_batches)


def on_device(batch: tuple[torch.Tensor, ...], device: torch.device):
    """(inputs, targets, neighbours or None) on ``device``."""
    x, y, *neighbours = (b.to(device) for b in batch)
    return x, y, (neighbours[0] if neighbours else None)


@dataclass
class StepStats:
    loss: float  # LM loss, mean over micro-batches
    aux_loss: float
    z_loss: float
    tokens_per_expert: torch.Tensor  # [num_moe_layers, E] float64 assignments, summed over micro-batches
    dropped: int


def forward_backward(
    model: Transformer,
    cfg: Config,
    x: torch.Tensor,
    y: torch.Tensor,
    micro_steps: int,
    runtime: Runtime,
    neighbours: torch.Tensor | None = None,
) -> StepStats:
    """Accumulate gradients of ``LM loss + aux_coef * aux + z_coef * z`` over ``micro_steps`` equal micro-batches.

    Each micro-batch's objective is divided by ``micro_steps`` so the gradient equals that of the mean over the
    global batch (data parallelism then averages over ranks); the MoE losses are computed per micro-batch, as each
    micro-batch is routed on its own, whatever the layout. ``neighbours`` (RETRO) are split with the rows.
    """
    loss_sum, aux_sum, z_sum, dropped = 0.0, 0.0, 0.0, 0
    per_expert: list[torch.Tensor] = []
    retrieved = neighbours.chunk(micro_steps) if neighbours is not None else [None] * micro_steps
    chunks = list(zip(x.chunk(micro_steps), y.chunk(micro_steps), retrieved, strict=True))
    for i, (xm, ym, nm) in enumerate(chunks):
        runtime.before_micro_batch(model, i, len(chunks))
        with autocast(cfg.train.precision, xm.device):
            out = model(xm, ym, neighbours=nm)
            objective = out.loss + cfg.moe.aux_loss_coef * out.aux_loss + cfg.moe.z_loss_coef * out.z_loss
        (objective / micro_steps).backward()
        loss_sum += out.loss.item()
        aux_sum += out.aux_loss.item()
        z_sum += out.z_loss.item()
        if out.moe_stats:
            per_expert.append(torch.stack([s.tokens_per_expert for s in out.moe_stats]).double().cpu())
            dropped += int(sum(int(s.dropped) for s in out.moe_stats))
    load = torch.stack(per_expert).sum(0) if per_expert else torch.zeros(0, 0, dtype=torch.float64)
    return StepStats(loss_sum / micro_steps, aux_sum / micro_steps, z_sum / micro_steps, load, dropped)


@torch.no_grad()
def evaluate(model: Transformer, cfg: Config, shards: TokenShards, batches: EvalBatches = eval_batches) -> float:
    """Mean validation loss over the first ``train.eval_batches`` fixed batches (token-weighted); ``batches`` is
    the data source's ``eval_batches``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    # In a parallel job every rank scores the same batches (collectives need every rank), so all agree.
    for batch in batches(shards, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.eval_batches):
        x, y, neighbours = on_device(batch, device)
        with autocast(cfg.train.precision, device):
            out = model(x, y, neighbours=neighbours)
        total += out.loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ConfigError("the validation split is shorter than one sequence of data.seq_len tokens")
    return total / count


def train(
    cfg: Config,
    run_dir: str | Path,
    resume: bool = False,
    after_backward: AfterBackward | None = None,
    source: DataSource | None = None,
) -> TrainResult:
    """Train (or continue) a run. Under torchrun this joins the job's process group, lays the model out as
    ``[parallel]`` says and leaves the group at the end. ``source``: where batches come from (default: plain
    token windows)."""
    if cfg.retro.enabled and source is None:
        raise ConfigError(
            "a [retro] config trains with its neighbours: run `sparselm train` (or sparselm.retro.training.train)"
        )
    validate(cfg, require_data=True)
    runtime = create_runtime(cfg)
    try:
        result = _Run(cfg, Path(run_dir), runtime, resume, source or DataSource()).train(after_backward)
    except BaseException:
        runtime.close(clean=False)
        raise
    runtime.close()
    return result


class _NullLogger:
    """Non-zero ranks of a parallel job log nothing (rank 0 writes metrics.jsonl and TensorBoard)."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Window:
    """What is averaged between two log lines: tokens/s, expert load and dropped assignments."""

    num_moe: int
    num_experts: int
    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    dropped: int = 0
    assigned: int = 0
    load: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.load = torch.zeros(self.num_moe, max(self.num_experts, 1), dtype=torch.float64)

    def restart(self) -> None:
        self.start, self.steps, self.dropped, self.assigned = time.perf_counter(), 0, 0, 0
        self.load.zero_()


class _Run:
    """One call of ``train``: everything set up before the first step, then the loop."""

    def __init__(self, cfg: Config, run_dir: Path, runtime: Runtime, resume: bool, source: DataSource) -> None:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)  # before the precision check, which times matmuls
        self.runtime = runtime
        wanted = cfg.train.keep_freed_memory and runtime.device.type == "cpu"
        not_kept = keep_freed_memory() if wanted else None  # process-wide, before the model's memory is allocated
        self.cfg = cfg = _with_resolved_precision(cfg, runtime)
        self.run_dir = run_dir
        self.train_shards = TokenShards(cfg.data.path, "train")
        self.val_shards = TokenShards(cfg.data.path, "val")
        if self.train_shards.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's vocabulary "
                f"({self.train_shards.vocab_size}, from {cfg.data.path})"
            )
        existing = latest_checkpoint(run_dir)
        if existing is not None and not resume:
            raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue or choose a new --out")
        info = checkpoint_info(existing) if existing is not None else None
        # Measured before the model is built so that it cannot disturb the seeded RNG stream.
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        log = cfg.logging
        self.peak = (log.peak_flops or measure_matmul_flops(dtype)) if log.mfu and runtime.is_main else None
        self.model = runtime.parallelize(source.prepare(build_model(cfg)).to(runtime.device))
        self.model.train()
        fresh_optimizer_at = info.step if info is not None and not info.has_optimizer_state else 0
        self.optimizer, self.scheduler = runtime.build_optimizer(self.model, fresh_optimizer_at)
        t = cfg.train
        data_seed = t.seed if cfg.data.seed == -1 else cfg.data.seed
        self.sampler = source.sampler(
            self.train_shards, cfg.data.seq_len, t.global_batch_size, data_seed, runtime.dp_rank, runtime.dp_size
        )
        self.eval_batches = source.eval_batches
        self.start_step = 0
        if existing is not None:
            state = load_training_state(existing, self.model, self.optimizer, self.scheduler, runtime)
            if "sampler" in state:
                self.sampler.load_state_dict(state["sampler"])
            self.start_step = state["step"]
            self.say(f"resumed from {existing} at step {self.start_step}")
            if not info.has_optimizer_state:
                self.say("it holds weights only: a fresh optimizer starts from them (and a fresh data order)")
        elif resume:
            self.say(f"--resume: no checkpoint in {run_dir}, starting from step 0")
        self.say(f"layout: {runtime.describe()}, AdamW {implementation_of(self.optimizer)}")
        if not_kept:
            self.say(f"train.keep_freed_memory: not applied, {not_kept}")
        if runtime.distributed and cfg.parallel.cpu_offload and runtime.device.type == "cpu":
            self.say("parallel.cpu_offload: the model already lives in CPU memory here, so it changes nothing")
        if runtime.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(to_toml(cfg))
        self.logger = MetricsLogger(run_dir, cfg.logging.tensorboard) if runtime.is_main else _NullLogger()
        self.micro_steps = t.global_batch_size // (runtime.dp_size * t.micro_batch_size)
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.train_flops = flops_per_token(cfg, cfg.data.seq_len).train_causal  # MFU: causal attention
        self.num_moe = len(cfg.moe.layer_indices(cfg.model.n_layers)) + len(cfg.retro.encoder_moe_layers(cfg.moe))
        self.window = _Window(self.num_moe, cfg.moe.num_experts)
        self.train_seconds = 0.0  # wall time of training steps in this process (evaluation and checkpoints excluded)
        self.bad_streak = 0

    def say(self, message: str) -> None:
        if self.runtime.is_main:
            tqdm.write(message)

    def train(self, after_backward: AfterBackward | None) -> TrainResult:
        cfg, t, runtime = self.cfg, self.cfg.train, self.runtime
        result = TrainResult(self.run_dir, self.start_step)
        show = cfg.logging.progress and runtime.is_main
        bar = tqdm(range(self.start_step, t.max_steps), initial=self.start_step, total=t.max_steps,
                   disable=not show, desc="train", unit="step", dynamic_ncols=True)  # fmt: skip
        try:
            for step in bar:
                step_start = time.perf_counter()
                runtime.seed_step(step)
                x, y, neighbours = on_device(self.sampler.next_batch(), runtime.device)
                self.optimizer.zero_grad(set_to_none=True)
                stats = forward_backward(self.model, cfg, x, y, self.micro_steps, runtime, neighbours)
                if after_backward is not None:
                    after_backward(step, self.model)
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                grad_norm = runtime.reduce_and_clip_gradients(self.model, clip)
                loss, aux, z = runtime.mean_over_dp([stats.loss, stats.aux_loss, stats.z_loss])
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if finite:
                    self.optimizer.step()
                    self.bad_streak = 0
                else:
                    self._skip_update(step, loss, grad_norm, result)
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                done = result.final_step = step + 1
                result.losses.append(loss)
                self._count(stats)
                self.train_seconds += time.perf_counter() - step_start
                if finite and (done % cfg.logging.log_every == 0 or done == t.max_steps):
                    self._log(done, loss, aux, z, lr, grad_norm, result, bar)
                if t.eval_every and (done % t.eval_every == 0 or done == t.max_steps):
                    self._validate(done, result)
                # Only checkpoint after a good step, so the newest checkpoint is never from inside a bad streak.
                if finite and cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != t.max_steps:
                    self._checkpoint(done)
            if self.start_step < t.max_steps:
                self._checkpoint(t.max_steps)
        finally:
            bar.close()
            self.logger.close()
        if self.num_moe and result.expert_load:
            self.say("expert load (share of routed tokens per expert, last logging window):")
            self.say(format_expert_load(result.expert_load, result.dropped_fraction))
        return result

    def _skip_update(self, step: int, loss: float, grad_norm: float, result: TrainResult) -> None:
        """The weights stay as they were after the last good step; too many bad steps in a row stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_streak += 1
        result.skipped_steps += 1
        self.logger.log({"step": step + 1, "loss": loss, "grad_norm": grad_norm, "skipped": True})
        self.say(f"step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}: update skipped")
        limit = self.cfg.train.max_bad_steps
        if self.bad_streak >= limit:
            raise TrainingStopped(
                f"{self.bad_streak} non-finite steps in a row (train.max_bad_steps={limit}); stopped at step "
                f"{step + 1}. The last good checkpoint in {self.run_dir / 'checkpoints'} is intact."
            )

    def _count(self, stats: StepStats) -> None:
        w = self.window
        w.steps += 1
        if self.num_moe:
            load = self.runtime.sum_over_dp(stats.tokens_per_expert)
            w.load += load
            w.dropped += int(self.runtime.sum_over_dp(torch.tensor(float(stats.dropped))).item())
            w.assigned += int(load.sum())

    def _log(self, done: int, loss, aux, z, lr, grad_norm, result: TrainResult, bar) -> None:
        w = self.window
        tokens_per_sec = self.tokens_per_step * w.steps / (time.perf_counter() - w.start)
        record = {
            "step": done,
            "loss": loss,
            "aux_loss": aux,
            "z_loss": z,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "flops_per_sec": tokens_per_sec * self.train_flops / self.runtime.world_size,  # model FLOP/s per device
            "tokens_seen": done * self.tokens_per_step,
            "train_seconds": self.train_seconds,
        }
        if self.peak is not None:
            record["mfu"] = record["flops_per_sec"] / self.peak
        if self.num_moe:
            result.expert_load = (w.load / w.load.sum(dim=1, keepdim=True).clamp(min=1)).tolist()
            result.dropped_fraction = w.dropped / max(w.assigned, 1)
            record["expert_load"] = result.expert_load
            record["dropped_fraction"] = result.dropped_fraction
        self.logger.log(record)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:.0f}")
        w.restart()

    def _validate(self, done: int, result: TrainResult) -> None:
        val = evaluate(self.model, self.cfg, self.val_shards, self.eval_batches)
        result.val_losses.append((done, val))
        ppl = math.exp(min(val, 50.0))
        self.logger.log(
            {
                "step": done,
                "val_loss": val,
                "val_ppl": ppl,
                "tokens_seen": done * self.tokens_per_step,
                "train_seconds": self.train_seconds,
            }
        )
        self.say(f"step {done}: val loss {val:.4f}  ppl {ppl:.2f}")
        self.window.start = time.perf_counter()  # keep evaluation out of the tokens/s figure

    def _checkpoint(self, step: int) -> None:
        save_checkpoint(
            self.run_dir,
            step,
            self.model,
            self.cfg,
            self.runtime,
            self.optimizer,
            self.scheduler,
            {"sampler": self.sampler.state_dict()},
            Path(self.cfg.data.path) / "tokenizer.model",
            keep_last=self.cfg.checkpoint.keep_last,
        )
        self.window.start = time.perf_counter()


def _with_resolved_precision(cfg: Config, runtime: Runtime) -> Config:
    """``cfg`` with train.precision auto replaced by what this hardware runs fast (every rank of a job agrees: bf16
    only if all of them have it), so that the run's config.toml says what was computed."""
    precision = runtime.resolve_precision(cfg.train.precision, warn=tqdm.write if runtime.is_main else None)
    if precision == cfg.train.precision:
        return cfg
    if runtime.is_main:
        tqdm.write(f"train.precision auto: computing in {precision} on this {runtime.device.type}")
    cfg = copy.deepcopy(cfg)
    cfg.train.precision = precision
    return cfg
