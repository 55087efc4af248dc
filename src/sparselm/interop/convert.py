"""Running conversion plans: tensor sources that load only what is asked for, and the plan executor.

Sources: safetensors files (a sparselm checkpoint, or a Hugging Face directory with or without an index: each
tensor is read from its file on demand), a ``torch.distributed.checkpoint`` directory (each tensor read whole
from every rank's pieces, on demand), or an in-memory state dict. ``peak_loaded_bytes`` records the most source
bytes held at once, which is what bounds a streamed export's memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from sparselm.errors import CheckpointError, InputError
from sparselm.interop.mapping import Target

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class TensorSource:
    """Named tensors, read on demand. Subclasses fill ``_meta`` (name -> (shape, dtype)) and ``_read``."""

    def __init__(self) -> None:
        self._meta: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self.peak_loaded_bytes = 0

    def keys(self) -> set[str]:
        return set(self._meta)

    def meta(self, name: str) -> torch.Tensor:
        shape, dtype = self._meta[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(dict.fromkeys(names))
        out = self._read(names)
        held = sum(t.numel() * t.element_size() for t in out.values())
        self.peak_loaded_bytes = max(self.peak_loaded_bytes, held)
        return out

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class StateDictSource(TensorSource):
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = state
        self._meta = {k: (v.shape, v.dtype) for k, v in state.items()}

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self._state[n] for n in names}


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(path: Path) -> dict:
    """A safetensors file's JSON header (names, dtypes, shapes) without reading any tensor."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100_000_000:
                raise ValueError(f"header length {size}")
            return json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable safetensors file: {exc}") from None


class SafetensorsSource(TensorSource):
    """Tensors in one or more safetensors files (``files``: tensor name -> file)."""

    def __init__(self, files: dict[str, Path]) -> None:
        super().__init__()
        self._files = files
        headers = {path: _read_header(path) for path in set(files.values())}
        for name, path in files.items():
            entry = headers[path].get(name)
            if entry is None:
                raise InputError(f"{path} has no tensor {name} (the index says it does)")
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise InputError(f"{path}: tensor {name} has dtype {entry['dtype']}, which sparselm does not read")
            self._meta[name] = (torch.Size(entry["shape"]), dtype)

    @classmethod
    def single(cls, path: Path) -> SafetensorsSource:
        header = _read_header(path)
        return cls({name: path for name in header if name != "__metadata__"})

    @classmethod
    def hf_directory(cls, folder: Path) -> SafetensorsSource:
        """The weights of a Hugging Face model directory: ``model.safetensors`` or an index and its shards."""
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InputError(f"{index} is not a valid safetensors index: {exc}") from None
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise InputError(f"{folder}: shard {missing[0]} listed in {INDEX_FILE} is missing")
            return cls({name: folder / file for name, file in weight_map.items()})
        if (folder / SINGLE_FILE).is_file():
            return cls.single(folder / SINGLE_FILE)
        if any(folder.glob("pytorch_model*.bin")) or any(folder.glob("*.pt")):
            raise InputError(
                f"{folder} has only PyTorch pickle weights (pytorch_model.bin): sparselm reads safetensors only, "
                "never unpickles; convert them to safetensors first"
            )
        raise InputError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}")

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._files[name], []).append(name)
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in group:
                    out[name] = f.get_tensor(name)
        return out


class DCPSource(TensorSource):
    """The model tensors of a sharded (``torch.distributed.checkpoint``) checkpoint, each read whole on demand."""

    def __init__(self, path: Path) -> None:
        from sparselm.checkpoint.sharded import model_tensor_metadata

        super().__init__()
        self._path = path
        try:
            self._meta = model_tensor_metadata(path)
        except Exception as exc:  # DCP raises many types for an unreadable checkpoint
            raise CheckpointError(f"{path} cannot be read as a sharded checkpoint: {exc}") from None

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from sparselm.checkpoint.sharded import load_model_tensors

        return load_model_tensors(self._path, {n: self._meta[n] for n in names})


class RenamedSource(TensorSource):
    """Another source's tensors under other names (``names``: new name -> the source's name)."""

    def __init__(self, source: TensorSource, names: dict[str, str]) -> None:
        super().__init__()
        self._source = source
        self._names = names
        self._meta = {new: source._meta[old] for new, old in names.items()}

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        loaded = self._source.load(self._names[n] for n in names)
        return {n: loaded[self._names[n]] for n in names}


def open_sparselm_checkpoint(ckpt: Path) -> TensorSource:
    from sparselm.checkpoint.files import DCP_DIR, is_dcp_checkpoint

    if (ckpt / SINGLE_FILE).is_file():
        return SafetensorsSource.single(ckpt / SINGLE_FILE)
    if is_dcp_checkpoint(ckpt):
        return DCPSource(ckpt / DCP_DIR)
    raise CheckpointError(f"{ckpt} has no {SINGLE_FILE} or {DCP_DIR}/")


# --------------------------------------------------------------------------------------------------- executing


def missing_sources(targets: list[Target], source: TensorSource) -> list[str]:
    keys = source.keys()
    return sorted({s for t in targets for s in t.sources if s not in keys})


def output_meta(targets: list[Target], source: TensorSource) -> dict[str, torch.Tensor]:
    """Every target's shape and dtype, computed on meta tensors: nothing is read or allocated."""
    out = {}
    for t in targets:
        result = t.build(*[source.meta(s) for s in t.sources])
        out[t.name] = result if result.device.type == "meta" else result.to("meta")
    return out


def build(
    targets: list[Target], source: TensorSource, dtype: torch.dtype | None = None, copy: bool = True
) -> dict[str, torch.Tensor]:
    """Build ``targets`` from one load of all their sources. With ``copy`` every output owns its memory (a
    safetensors file may not hold two names sharing storage, which views of one source tensor would)."""
    loaded = source.load(s for t in targets for s in t.sources)
    out = {}
    for t in targets:
        tensor = t.build(*[loaded[s] for s in t.sources])
        if dtype is not None:
            tensor = tensor.to(dtype)
        out[t.name] = tensor.clone(memory_format=torch.contiguous_format) if copy else tensor
    return out


def nbytes(meta: torch.Tensor, dtype: torch.dtype | None) -> int:
    element = torch.empty((), dtype=dtype or meta.dtype).element_size()
    return meta.numel() * element


def plan_shards(
    targets: list[Target],
    meta: dict[str, torch.Tensor],
    dtype: torch.dtype | None,
    max_bytes: int,
    source: TensorSource,
) -> list[list[Target]]:
    """Consecutive groups of targets whose outputs, and whose sources, each stay within ``max_bytes`` (a single
    target bigger than that gets a group of its own): what bounds the memory of writing one group at a time."""
    shards: list[list[Target]] = [[]]
    size, loaded = 0, 0
    sources: set[str] = set()
    for t in targets:
        out = nbytes(meta[t.name], dtype)
        new = [s for s in t.sources if s not in sources]
        extra = sum(nbytes(source.meta(s), None) for s in new)
        if shards[-1] and (size + out > max_bytes or loaded + extra > max_bytes):
            shards.append([])
            size, loaded, sources = 0, 0, set()
            new = list(t.sources)
            extra = sum(nbytes(source.meta(s), None) for s in new)
        shards[-1].append(t)
        size += out
        loaded += extra
        sources.update(new)
    return shards
