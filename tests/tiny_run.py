"""The small training run most tests start from, in one place.

d_model 32, 2 layers of 4 heads, FFN 64, context 64; an MoE of 4 experts (top-2) in every other layer; sequences of
32 tokens, 12 steps of 8 sequences in micro-batches of 4, fp32, AdamW at 3e-3 after 2 warmup steps; validation
(2 batches) and a checkpoint every 6 steps; a log line every step (model FLOP/s, no MFU), no progress bar, no
TensorBoard. A test that needs something else says so in its overrides, which are applied after this base (and
validated with it)."""

from __future__ import annotations

from pathlib import Path

from sparselm.config import Config, apply_overrides, load_config

TINY_RUN = (
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.d_ff=64",
    "model.max_seq_len=64",
    "moe.num_experts=4",
    "moe.top_k=2",
    "data.seq_len=32",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "train.max_steps=12",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.precision=fp32",
    "train.eval_every=6",
    "train.eval_batches=2",
    "checkpoint.every=6",
    "logging.log_every=1",
    "logging.progress=false",
    "logging.tensorboard=false",
    "logging.mfu=false",
)


def tiny_config(data_dir: str | Path, vocab_size: int, *overrides: str) -> Config:
    base = load_config(None, [f"model.vocab_size={vocab_size}", f"data.path={data_dir}", *TINY_RUN])
    return apply_overrides(base, list(overrides))


# Two steps of 2 dense sequences at a warming-up learning rate (barely trained: near uniform), nothing saved on the
# way: for tests that need any trained run at all.
SMALLEST_RUN = (
    "optim.lr=3e-4",
    "optim.warmup_steps=100",
    "model.n_heads=2",
    "model.max_seq_len=32",
    "moe.num_experts=0",
    "train.max_steps=2",
    "train.global_batch_size=2",
    "train.micro_batch_size=2",
    "train.eval_every=0",
    "checkpoint.every=0",
)
