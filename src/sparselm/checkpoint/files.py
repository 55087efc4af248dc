"""Checkpoints: one directory per step, written to a temporary name and renamed into place.

Layout of ``RUN_DIR/checkpoints/step_00000100/`` written by one process:
- ``model.safetensors``: weights (no pickle);
- ``optimizer.pt``: optimizer and scheduler state (tensors and numbers only, loaded with ``weights_only=True``);
- ``trainer_state.json``: step, data-sampler position, counters;
- ``rng.pt``: torch RNG state (a uint8 tensor);
- ``config.toml`` and ``tokenizer.model``: everything needed to use the checkpoint on its own.

A parallel job (torchrun) writes ``dcp/`` instead of the first three: a ``torch.distributed.checkpoint`` of model
and optimizer state with global shapes, each rank writing its own shard (see sparselm.checkpoint.sharded), and
puts the scheduler state in ``trainer_state.json``. Either format resumes in any layout, including one process;
``sparselm export`` turns a ``dcp/`` checkpoint into a single ``model.safetensors``. A checkpoint with weights but
no optimizer state (an export, an imported model) resumes too, with a fresh optimizer.

A directory named ``step_*`` (or an export's ``--out``) exists only once all of it was written, every rank's shard
included, so a crash mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sparselm.config import Config, load_config, to_toml
from sparselm.errors import CheckpointError, ConfigError, InputError

if TYPE_CHECKING:
    from sparselm.parallel.runtime import Runtime

DCP_DIR = "dcp"  # sharded (torch.distributed.checkpoint) model + optimizer state inside a step_* directory

STEP_DIR = re.compile(r"^step_(\d{8})$")


def is_dcp_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_DIR / ".metadata").is_file()


def _sharded():
    # Imported on use: torch.distributed.checkpoint is not needed to read single-process checkpoints.
    from sparselm.checkpoint import sharded

    return sharded


def _publish(tmp: Path, final: Path) -> None:
    """Make everything in ``tmp`` durable, then give it the name ``final`` (replacing an older one) in one rename."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume): replace the old one
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


# The tokenizer files a checkpoint may carry: SentencePiece (what sparselm trains), or an imported model's
# Hugging Face tokenizer.json with its config (see sparselm.data.tokenizer.load_tokenizer).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_files(ckpt: Path) -> list[Path]:
    return [Path(ckpt) / name for name in TOKENIZER_FILES if (Path(ckpt) / name).is_file()]


def _write_usable_alone(out: Path, cfg: Config, state: dict, tokenizer: str | Path | list[Path] | None) -> None:
    """What every checkpoint carries besides tensors: the trainer state, the config and the tokenizer (a
    SentencePiece ``.model`` file, stored as tokenizer.model, or a list of tokenizer files kept under their names)."""
    (out / "trainer_state.json").write_text(json.dumps(state, indent=1))
    (out / "config.toml").write_text(to_toml(cfg))
    for path in [tokenizer] if isinstance(tokenizer, str | Path) else tokenizer or []:
        path = Path(path)
        if path.is_file():
            shutil.copyfile(path, out / ("tokenizer.model" if path.suffix == ".model" else path.name))


@contextmanager
def staged_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write a whole directory or nothing: yields an empty temporary sibling of ``out`` that is published as
    ``out`` when the block finishes and deleted if it raises. An existing non-empty ``out`` is refused unless
    ``overwrite`` (then it is replaced only once the new one is complete)."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not empty; choose a new directory (or pass --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(out.parent / f".tmp_{out.name}_{os.getpid()}")
    try:
        yield tmp
        if out.exists() and not out.is_dir():
            out.unlink()
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
    if (path / "model.safetensors").is_file() or is_dcp_checkpoint(path):
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
    runtime: Runtime,
    optimizer: Any = None,
    scheduler: Any = None,
    trainer_state: dict | None = None,
    tokenizer_path: str | Path | None = None,
    keep_last: int = 0,
) -> Path:
    """Write ``step_<step>``: safetensors + ``optimizer.pt`` from one process, a DCP shard from every rank of a
    job (collective: every rank calls it). Then keep only the newest ``keep_last`` checkpoints (0 keeps all)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"  # one name for all ranks (a restarted job reuses and clears it)
    if runtime.is_main:
        _fresh_dir(tmp)
    runtime.barrier()
    state = {"step": step, **(trainer_state or {})}
    if runtime.distributed:
        optim_state = runtime.sharded_optimizer_state(model, optimizer) if optimizer is not None else None
        _sharded().save_sharded(tmp / DCP_DIR, model, optim_state)
        state.update(scheduler=scheduler.state_dict() if scheduler else None, format="dcp", layout=runtime.describe())
    else:
        save_file(_weights(model), str(tmp / "model.safetensors"), metadata={"step": str(step)})
        if optimizer is not None:
            optim = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None}
            torch.save(optim, tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    if runtime.is_main:
        _write_usable_alone(tmp, cfg, state, tokenizer_path)
    runtime.barrier()  # every shard is on disk before the directory gets its final name
    if runtime.is_main:
        _publish(tmp, final)
        if keep_last > 0:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()  # nobody moves on (or exits) before the checkpoint is in place
    return final


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Write ``out/model.safetensors`` (one file, all weights), ``config.toml`` and the tokenizer from any
    checkpoint: a directory ``sparselm generate``/``ppl``/``eval`` load in one process and ``train --resume``
    continues from with a fresh optimizer. ``out`` appears only once complete; an existing non-empty ``out`` that
    is not an earlier export is refused."""
    from sparselm.model.transformer import Transformer

    ckpt = resolve_checkpoint(ckpt)
    out = Path(out)
    earlier_export = (out / "model.safetensors").is_file()
    if out.exists() and any(out.iterdir()) and not earlier_export:
        raise CheckpointError(f"{out} exists and is not an earlier export: choose a new --out")
    cfg = load_config_from_checkpoint(ckpt)
    model = Transformer(cfg.model, cfg.moe, cfg.retro)
    load_model_weights(model, ckpt)
    step = read_trainer_state(ckpt).get("step", 0)
    with staged_directory(out, overwrite=earlier_export) as tmp:
        meta = {"step": str(step), "exported_from": str(ckpt)}
        save_file(_weights(model), str(tmp / "model.safetensors"), metadata=meta)
        _write_usable_alone(tmp, cfg, {"step": step, "exported_from": str(ckpt)}, tokenizer_files(ckpt))
    return out


def read_trainer_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: trainer_state.json cannot be read: {e}") from None


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    has_optimizer_state: bool  # False: weights only (an export or an imported model)


def checkpoint_info(ckpt: Path) -> CheckpointInfo:
    has_optimizer = is_dcp_checkpoint(ckpt) or (Path(ckpt) / "optimizer.pt").is_file()
    return CheckpointInfo(int(read_trainer_state(ckpt).get("step", 0)), has_optimizer)


def load_config_from_checkpoint(ckpt: str | Path) -> Config:
    ckpt = resolve_checkpoint(ckpt)
    try:
        return load_config(ckpt / "config.toml")
    except ConfigError as e:
        raise CheckpointError(f"{ckpt}: bad config.toml: {e}") from None


def load_model_weights(model: nn.Module, ckpt: str | Path) -> None:
    """Load weights strictly: missing, unexpected or mis-shaped tensors are errors naming the tensor."""
    ckpt = resolve_checkpoint(ckpt)
    if not (ckpt / "model.safetensors").is_file():
        try:
            _sharded().load_model_from_dcp(model, ckpt / DCP_DIR)
        except Exception as e:  # DCP raises a zoo of types; all mean "this checkpoint does not fit"
            raise CheckpointError(f"{ckpt}/{DCP_DIR} cannot be loaded into the model: {e}") from None
        return
    weights = _read_weights(ckpt)
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


def load_training_state(ckpt: Path, model: nn.Module, optimizer: Any, scheduler: Any, runtime: Runtime) -> dict:
    """Restore model, optimizer, scheduler and RNG; return the trainer state (step, sampler position, ...).

    Any checkpoint into any layout: a ``dcp/`` checkpoint is resharded by DCP; a single-process checkpoint is read
    whole by every rank of a parallel job; a weights-only checkpoint leaves optimizer and scheduler as built. A
    parallel job re-seeds its RNG every step from (seed, step, rank), so it needs no RNG state; one process resuming
    from a ``dcp/`` checkpoint keeps its freshly seeded RNG."""
    trainer_state = read_trainer_state(ckpt)
    if is_dcp_checkpoint(ckpt):
        try:
            _sharded().load_sharded(ckpt / DCP_DIR, model, optimizer, runtime)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt}: training state cannot be read: {e}") from None
        if scheduler is not None and trainer_state.get("scheduler") is not None:
            scheduler.load_state_dict(trainer_state["scheduler"])
        return trainer_state
    if not (ckpt / "optimizer.pt").is_file():
        if runtime.distributed:
            _sharded().load_full(model, None, _read_weights(ckpt), None, runtime)
        else:
            load_model_weights(model, ckpt)
        return trainer_state
    if runtime.distributed:
        _load_single_into_parallel(ckpt, model, optimizer, scheduler, runtime)
        return trainer_state
    load_model_weights(model, ckpt)
    try:
        state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: training state cannot be read: {e}") from None
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["torch"])
    return trainer_state


def _read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{ckpt}/model.safetensors cannot be read: {e}") from None


def _load_single_into_parallel(ckpt: Path, model: nn.Module, optimizer: Any, scheduler: Any, runtime: Runtime) -> None:
    """A single-process checkpoint resumed by a parallel job: full tensors in, each rank keeps its part."""
    from sparselm.model.transformer import Transformer
    from sparselm.optim import build_optimizer

    weights = _read_weights(ckpt)
    try:
        state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        cfg = load_config(ckpt / "config.toml")
    except (OSError, RuntimeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{ckpt}: training state cannot be read: {e}") from None
    # optimizer.pt numbers parameters in the order build_optimizer grouped them; rebuild that order (on the meta
    # device, no memory) to name them.
    with torch.device("meta"):
        plain = Transformer(cfg.model, cfg.moe, cfg.retro)
    if cfg.retro.freeze_base:  # RETRO-fitting: the optimizer holds only the retrieval parameters
        from sparselm.model.retro import freeze_decoder

        freeze_decoder(plain)
    names = {id(p): n for n, p in plain.named_parameters()}
    groups = build_optimizer(plain, cfg.optim).param_groups
    named = _sharded().named_optimizer_state(state["optimizer"], [[names[id(p)] for p in g["params"]] for g in groups])
    _sharded().load_full(model, optimizer, weights, named, runtime)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
