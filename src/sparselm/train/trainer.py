"""The training loop: global batch -> micro-batches -> bf16 autocast forward/backward -> clip -> AdamW step.

One process, or one of several torchrun workers: then ``sparselm.parallel`` lays the model out (ZeRO, TP, EP) on
a DeviceMesh, each data-parallel rank trains on its rows of the same global batch, and the logged numbers are
reduced over the data-parallel ranks. ``train.global_batch_size`` is the global batch per optimizer step in every
layout and micro-batches keep ``train.micro_batch_size`` sequences, so a layout changes where the arithmetic runs,
not what is trained: the same config gives the same losses on 1 process and on N.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from sparselm.checkpoint.files import latest_checkpoint, load_training_state, save_checkpoint
from sparselm.config import Config, to_toml, validate
from sparselm.data.loader import BatchSampler, TokenShards, eval_batches
from sparselm.errors import ConfigError, TrainingStopped
from sparselm.model.transformer import Transformer
from sparselm.parallel.launch import DistEnv, init_distributed, shutdown
from sparselm.parallel.layout import validate_parallel
from sparselm.parallel.mesh import default_device
from sparselm.parallel.runtime import ParallelRuntime
from sparselm.parallel.zero1 import ZeroStage1
from sparselm.params.counting import flops_per_token
from sparselm.precision import autocast, measure_matmul_flops, resolve_precision
from sparselm.train.metrics import MetricsLogger, format_expert_load
from sparselm.train.optim import build_optimizer, build_scheduler


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


def build_model(cfg: Config, apply_policies: bool = True) -> Transformer:
    """The seeded single-device model; ``apply_policies`` adds activation checkpointing and compile (a parallel
    job applies them itself, after tensor and expert parallelism)."""
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model, cfg.moe)
    for block in model.layers if apply_policies else []:
        block.checkpoint = cfg.train.activation_checkpointing
        if cfg.train.compile:
            block.compile()  # in place: parameter names (and so checkpoints) are unchanged
    return model


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
    runtime: ParallelRuntime | None = None,
) -> StepStats:
    """Accumulate gradients of ``LM loss + aux_coef * aux + z_coef * z`` over ``micro_steps`` equal micro-batches.

    Each micro-batch's objective is divided by ``micro_steps`` so the gradient equals that of the mean over the
    global batch (data parallelism then averages over ranks); the MoE losses are computed per micro-batch, as each
    micro-batch is routed on its own, whatever the layout.
    """
    loss_sum, aux_sum, z_sum, dropped = 0.0, 0.0, 0.0, 0
    per_expert: list[torch.Tensor] = []
    chunks = list(zip(x.chunk(micro_steps), y.chunk(micro_steps), strict=True))
    for i, (xm, ym) in enumerate(chunks):
        if runtime is not None:
            runtime.before_micro_batch(model, i, len(chunks))
        with autocast(cfg.train.precision, xm.device):
            out = model(xm, ym)
            objective = out.loss + cfg.moe.aux_loss_coef * out.aux_loss + cfg.moe.z_loss_coef * out.z_loss
        (objective / micro_steps).backward()
        loss_sum += out.loss.item()
        aux_sum += out.aux_loss.item()
        z_sum += out.z_loss.item()
        if out.moe_stats:
            counts = torch.stack([s.tokens_per_expert for s in out.moe_stats]).double().cpu()
            per_expert.append(counts)
            dropped += int(sum(int(s.dropped) for s in out.moe_stats))
    load = torch.stack(per_expert).sum(0) if per_expert else torch.zeros(0, 0, dtype=torch.float64)
    return StepStats(loss_sum / micro_steps, aux_sum / micro_steps, z_sum / micro_steps, load, dropped)


@torch.no_grad()
def evaluate(model: Transformer, cfg: Config, shards: TokenShards) -> float:
    """Mean validation loss over the first ``train.eval_batches`` fixed batches (token-weighted)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    # In a parallel job every rank scores the same batches (collectives need every rank), so all agree.
    for x, y in eval_batches(shards, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.eval_batches):
        x, y = x.to(device), y.to(device)
        with autocast(cfg.train.precision, device):
            out = model(x, y)
        total += out.loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ConfigError("the validation split is shorter than one sequence of data.seq_len tokens")
    return total / count


class _NullLogger:
    """Non-zero ranks of a parallel job log nothing (rank 0 writes metrics.jsonl and TensorBoard)."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def train(
    cfg: Config, run_dir: str | Path, resume: bool = False, after_backward: AfterBackward | None = None
) -> TrainResult:
    """Train (or continue) a run. Under torchrun with several workers this joins the process group, lays the model
    out as ``[parallel]`` says and leaves the group at the end; alone, ``[parallel]`` is ignored."""
    validate(cfg, require_data=True)
    validate_parallel(cfg)
    env = init_distributed()
    try:
        result = _train(cfg, Path(run_dir), resume, after_backward, env)
    except BaseException:
        shutdown(env, clean=False)
        raise
    shutdown(env)
    return result


def _with_resolved_precision(cfg: Config, device: torch.device, env: DistEnv | None) -> Config:
    """``cfg`` with train.precision auto replaced by what this hardware runs fast (every rank of a job agrees: bf16
    only if all of them have it), so that the run's config.toml says what was computed."""
    is_main = env is None or env.is_main
    precision = resolve_precision(cfg.train.precision, device, warn=tqdm.write if is_main else None)
    if env is not None and cfg.train.precision == "auto":
        flag = torch.tensor([1.0 if precision == "bf16" else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        precision = "bf16" if flag.item() == 1.0 else "fp32"
    if precision == cfg.train.precision:
        return cfg
    if is_main:
        tqdm.write(f"train.precision auto: computing in {precision} on this {device.type}")
    cfg = copy.deepcopy(cfg)
    cfg.train.precision = precision
    return cfg


def _train(
    cfg: Config, run_dir: Path, resume: bool, after_backward: AfterBackward | None, env: DistEnv | None
) -> TrainResult:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)  # before the precision check, which times matmuls
    device = env.device if env is not None else default_device()
    cfg = _with_resolved_precision(cfg, device, env)
    t, log_cfg = cfg.train, cfg.logging
    # The layout is checked against the world size here, before any data is read or model built.
    runtime = ParallelRuntime(cfg, env) if env is not None else None
    is_main = env is None or env.is_main
    if runtime is None and (cfg.parallel.tp > 1 or cfg.parallel.ep > 1 or cfg.parallel.dp_shard > 1):
        tqdm.write("single process: the [parallel] layout is ignored (launch with torchrun to use it)")

    train_shards = TokenShards(cfg.data.path, "train")
    val_shards = TokenShards(cfg.data.path, "val")
    if train_shards.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's vocabulary "
            f"({train_shards.vocab_size}, from {cfg.data.path})"
        )
    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue or choose a new --out")

    # Measured before the model is built so that it cannot disturb the seeded RNG stream.
    peak = log_cfg.peak_flops
    if not peak:
        peak = measure_matmul_flops(torch.bfloat16 if t.precision == "bf16" else torch.float32) if is_main else 1.0
    world = env.world_size if env is not None else 1
    model = build_model(cfg, apply_policies=runtime is None).to(device)
    if runtime is not None:
        runtime.parallelize(model)
    model.train()
    if runtime is not None:
        optimizer = runtime.build_optimizer(model, lambda m: build_optimizer(m, cfg.optim))
    else:
        optimizer = build_optimizer(model, cfg.optim)
    lr_optimizer = optimizer.optimizer if isinstance(optimizer, ZeroStage1) else optimizer
    scheduler = build_scheduler(lr_optimizer, cfg.optim, t.max_steps)
    dp_rank, dp_size = (runtime.dp_rank, runtime.dp_size) if runtime is not None else (0, 1)
    sampler = BatchSampler(train_shards, cfg.data.seq_len, t.global_batch_size, t.seed, dp_rank, dp_size)
    start_step = 0
    if resume and existing is not None:
        state = load_training_state(existing, model, optimizer, scheduler, runtime)
        sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
        if is_main:
            tqdm.write(f"resumed from {existing} at step {start_step}")
    elif resume and is_main:
        tqdm.write(f"--resume: no checkpoint in {run_dir}, starting from step 0")
    if runtime is not None and is_main:
        tqdm.write(f"parallel layout: {runtime.layout.describe()} ({env.backend})")
        if cfg.parallel.cpu_offload and device.type == "cpu":
            tqdm.write("parallel.cpu_offload: the model already lives in CPU memory here, so it changes nothing")

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
    tokenizer_path = Path(cfg.data.path) / "tokenizer.model"
    logger = MetricsLogger(run_dir, tensorboard=log_cfg.tensorboard) if is_main else _NullLogger()
    train_flops = flops_per_token(cfg, cfg.data.seq_len).train

    def checkpoint(step: int) -> None:
        save_checkpoint(
            run_dir,
            step,
            model,
            cfg,
            optimizer,
            scheduler,
            {"sampler": sampler.state_dict()},
            tokenizer_path,
            keep_last=cfg.checkpoint.keep_last,
            runtime=runtime,
        )

    result = TrainResult(run_dir, start_step)
    micro_steps = t.global_batch_size // (dp_size * t.micro_batch_size)
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    num_moe = len(cfg.moe.layer_indices(cfg.model.n_layers))
    load_window = torch.zeros(num_moe, max(cfg.moe.num_experts, 1), dtype=torch.float64)
    dropped_window, assigned_window = 0, 0
    bad_streak = 0
    window_start, window_steps = time.perf_counter(), 0
    train_seconds = 0.0  # wall time spent in training steps by this process (evaluation and checkpoints excluded)
    bar = tqdm(
        range(start_step, t.max_steps),
        initial=start_step,
        total=t.max_steps,
        disable=not (log_cfg.progress and is_main),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    try:
        for step in bar:
            step_start = time.perf_counter()
            if runtime is not None:
                runtime.seed_step(step)
            x, y = sampler.next_batch()
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            stats = forward_backward(model, cfg, x, y, micro_steps, runtime)
            if after_backward is not None:
                after_backward(step, model)
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            if runtime is not None:
                runtime.after_backward()
                grad_norm = runtime.clip_grad_norm(model, clip)
                loss_sum, aux_sum, z_sum = runtime.mean_over_dp([stats.loss, stats.aux_loss, stats.z_loss])
                step_load = runtime.sum_over_dp(stats.tokens_per_expert) if num_moe else stats.tokens_per_expert
                step_dropped = int(runtime.sum_over_dp(torch.tensor(float(stats.dropped))).item())
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
                loss_sum, aux_sum, z_sum = stats.loss, stats.aux_loss, stats.z_loss
                step_load, step_dropped = stats.tokens_per_expert, stats.dropped
            if num_moe:
                load_window += step_load
                dropped_window += step_dropped
                assigned_window += int(step_load.sum())
            loss = loss_sum
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
                bad_streak = 0
            else:
                # Skip the update: the weights stay as they were after the last good step.
                optimizer.zero_grad(set_to_none=True)
                bad_streak += 1
                result.skipped_steps += 1
                logger.log({"step": step + 1, "loss": loss, "grad_norm": grad_norm, "skipped": True})
                if is_main:
                    tqdm.write(f"step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}: update skipped")
                if bad_streak >= t.max_bad_steps:
                    raise TrainingStopped(
                        f"{bad_streak} non-finite steps in a row (train.max_bad_steps={t.max_bad_steps}); stopped at "
                        f"step {step + 1}. The last good checkpoint in {run_dir / 'checkpoints'} is intact."
                    )
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            done = step + 1
            result.final_step = done
            result.losses.append(loss)
            window_steps += 1
            train_seconds += time.perf_counter() - step_start

            if finite and (done % log_cfg.log_every == 0 or done == t.max_steps):
                elapsed = time.perf_counter() - window_start
                tokens_per_sec = tokens_per_step * window_steps / elapsed
                record = {
                    "step": done,
                    "loss": loss,
                    "aux_loss": aux_sum,
                    "z_loss": z_sum,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_sec": tokens_per_sec,
                    "mfu": tokens_per_sec * train_flops / (peak * world),
                    "tokens_seen": done * tokens_per_step,
                    "train_seconds": train_seconds,
                }
                if num_moe:
                    totals = load_window.sum(dim=1, keepdim=True).clamp(min=1)
                    result.expert_load = (load_window / totals).tolist()
                    result.dropped_fraction = dropped_window / max(assigned_window, 1)
                    record["expert_load"] = result.expert_load
                    record["dropped_fraction"] = result.dropped_fraction
                    load_window.zero_()
                    dropped_window, assigned_window = 0, 0
                logger.log(record)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:.0f}")
                window_start, window_steps = time.perf_counter(), 0

            if t.eval_every and (done % t.eval_every == 0 or done == t.max_steps):
                val = evaluate(model, cfg, val_shards)
                result.val_losses.append((done, val))
                logger.log(
                    {
                        "step": done,
                        "val_loss": val,
                        "val_ppl": math.exp(min(val, 50.0)),
                        "tokens_seen": done * tokens_per_step,
                        "train_seconds": train_seconds,
                    }
                )
                if is_main:
                    tqdm.write(f"step {done}: val loss {val:.4f}  ppl {math.exp(min(val, 50.0)):.2f}")
                window_start = time.perf_counter()  # keep evaluation out of the tokens/s figure

            # Only checkpoint after a good step, so the newest checkpoint is never from inside a bad streak.
            if finite and cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != t.max_steps:
                checkpoint(done)
                window_start = time.perf_counter()
        if start_step < t.max_steps:
            checkpoint(t.max_steps)
    finally:
        bar.close()
        logger.close()
    if num_moe and result.expert_load and is_main:
        tqdm.write("expert load (share of routed tokens per expert, last logging window):")
        tqdm.write(format_expert_load(result.expert_load, result.dropped_fraction))
    return result
