"""Checkpoints: one directory per step, written to a temporary name and renamed into place.

Layout of ``RUN_DIR/checkpoints/step_00000100/``:
- ``model.safetensors``: weights (no pickle);
- ``optimizer.pt``: optimizer and scheduler state (tensors and numbers only, loaded with ``weights_only=True``);
- ``trainer_state.json``: step, data-sampler position, counters;
- ``rng.pt``: torch RNG state (a uint8 tensor);
- ``config.toml`` and ``tokenizer.model``: everything needed to use the checkpoint on its own.
A directory named ``step_*`` exists only once all of it was written, so a crash mid-save never leaves a
checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sparselm.config import Config, ConfigError, load_config, to_toml
from sparselm.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (then its latest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint found at {path} (expected a step_* directory or a run directory)")
    return latest


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    cfg: Config,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    trainer_state: dict | None = None,
    tokenizer_path: str | Path | None = None,
    keep_last: int = 0,
) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    if optimizer is not None:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None}
        torch.save(state, tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(trainer_state or {})}, indent=1))
    (tmp / "config.toml").write_text(to_toml(cfg))
    if tokenizer_path is not None and Path(tokenizer_path).is_file():
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume): replace the old one
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_config_from_checkpoint(ckpt: str | Path) -> Config:
    ckpt = resolve_checkpoint(ckpt)
    try:
        return load_config(ckpt / "config.toml")
    except ConfigError as e:
        raise CheckpointError(f"{ckpt}: bad config.toml: {e}") from None


def load_model_weights(model: nn.Module, ckpt: str | Path) -> None:
    """Load weights strictly: missing, unexpected or mis-shaped tensors are errors naming the tensor."""
    ckpt = resolve_checkpoint(ckpt)
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{ckpt}/model.safetensors cannot be read: {e}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in weights.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(
                f"{ckpt}: {name} has shape {tuple(tensor.shape)}, model expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(weights)


def load_training_state(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
    """Restore model, optimizer, scheduler and RNG; return the trainer state (step, sampler position, ...)."""
    load_model_weights(model, ckpt)
    try:
        state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
        trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: training state cannot be read: {e}") from None
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["torch"])
    return trainer_state
