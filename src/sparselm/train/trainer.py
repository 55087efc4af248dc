"""The training loop: global batch -> micro-batches -> bf16 autocast forward/backward -> clip -> AdamW step.

Single process for now; the seams for torch.distributed are the data sampler's (rank, world_size) and the fact that
the model is built by one function and optimised by another, so a parallelize step can slot in between.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sparselm.config import Config, ConfigError, to_toml, validate
from sparselm.data.loader import BatchSampler, TokenShards, eval_batches
from sparselm.errors import TrainingStopped
from sparselm.model.transformer import Transformer
from sparselm.params import flops_per_token
from sparselm.train.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from sparselm.train.metrics import MetricsLogger, format_expert_load, measure_peak_flops
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


def autocast(cfg: Config) -> contextlib.AbstractContextManager:
    if cfg.train.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(cfg: Config) -> Transformer:
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model, cfg.moe)
    for block in model.layers:
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


def forward_backward(model: Transformer, cfg: Config, x: torch.Tensor, y: torch.Tensor, micro_steps: int) -> StepStats:
    """Accumulate gradients of ``LM loss + aux_coef * aux + z_coef * z`` over ``micro_steps`` equal micro-batches.

    Each micro-batch's objective is divided by ``micro_steps`` so the gradient equals that of the mean over the
    global batch; the MoE losses are computed per micro-batch, as each micro-batch is routed on its own.
    """
    loss_sum, aux_sum, z_sum, dropped = 0.0, 0.0, 0.0, 0
    per_expert: list[torch.Tensor] = []
    for xm, ym in zip(x.chunk(micro_steps), y.chunk(micro_steps), strict=True):
        with autocast(cfg):
            out = model(xm, ym)
            objective = out.loss + cfg.moe.aux_loss_coef * out.aux_loss + cfg.moe.z_loss_coef * out.z_loss
        (objective / micro_steps).backward()
        loss_sum += out.loss.item()
        aux_sum += out.aux_loss.item()
        z_sum += out.z_loss.item()
        if out.moe_stats:
            counts = torch.stack([s.tokens_per_expert for s in out.moe_stats]).double()
            per_expert.append(counts)
            dropped += int(sum(int(s.dropped) for s in out.moe_stats))
    load = torch.stack(per_expert).sum(0) if per_expert else torch.zeros(0, 0, dtype=torch.float64)
    return StepStats(loss_sum / micro_steps, aux_sum / micro_steps, z_sum / micro_steps, load, dropped)


@torch.no_grad()
def evaluate(model: Transformer, cfg: Config, shards: TokenShards) -> float:
    """Mean validation loss over the first ``train.eval_batches`` fixed batches (token-weighted)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(shards, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.eval_batches):
        with autocast(cfg):
            out = model(x, y)
        total += out.loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ConfigError("the validation split is shorter than one sequence of data.seq_len tokens")
    return total / count


def train(
    cfg: Config, run_dir: str | Path, resume: bool = False, after_backward: AfterBackward | None = None
) -> TrainResult:
    validate(cfg, require_data=True)
    run_dir = Path(run_dir)
    t, log_cfg = cfg.train, cfg.logging
    if t.threads:
        torch.set_num_threads(t.threads)

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
    peak = log_cfg.peak_flops or measure_peak_flops(torch.bfloat16 if t.precision == "bf16" else torch.float32)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, t.max_steps)
    sampler = BatchSampler(train_shards, cfg.data.seq_len, t.global_batch_size, seed=t.seed)
    start_step = 0
    if resume and existing is not None:
        state = load_training_state(existing, model, optimizer, scheduler)
        sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
        tqdm.write(f"resumed from {existing} at step {start_step}")
    elif resume:
        tqdm.write(f"--resume: no checkpoint in {run_dir}, starting from step 0")

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    tokenizer_path = Path(cfg.data.path) / "tokenizer.model"
    logger = MetricsLogger(run_dir, tensorboard=log_cfg.tensorboard)
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
        )

    result = TrainResult(run_dir, start_step)
    micro_steps = t.global_batch_size // t.micro_batch_size
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    num_moe = sum(model.is_moe_layer(i) for i in range(cfg.model.n_layers))
    load_window = torch.zeros(num_moe, max(cfg.moe.num_experts, 1), dtype=torch.float64)
    dropped_window, assigned_window = 0, 0
    bad_streak = 0
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm(
        range(start_step, t.max_steps),
        initial=start_step,
        total=t.max_steps,
        disable=not log_cfg.progress,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    try:
        for step in bar:
            x, y = sampler.next_batch()
            optimizer.zero_grad(set_to_none=True)
            stats = forward_backward(model, cfg, x, y, micro_steps)
            loss_sum, aux_sum, z_sum = stats.loss, stats.aux_loss, stats.z_loss
            if num_moe:
                load_window += stats.tokens_per_expert
                dropped_window += stats.dropped
                assigned_window += int(stats.tokens_per_expert.sum())
            if after_backward is not None:
                after_backward(step, model)
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
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
                    "mfu": tokens_per_sec * train_flops / peak,
                    "tokens_seen": done * tokens_per_step,
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
                logger.log({"step": done, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))})
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
    if num_moe and result.expert_load:
        tqdm.write("expert load (share of routed tokens per expert, last logging window):")
        tqdm.write(format_expert_load(result.expert_load, result.dropped_fraction))
    return result
