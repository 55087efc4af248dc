"""Memory for the expert weight gradients, recycled from earlier steps once nobody uses it (CPU).

The expert weight gradients are big (3 x E*d*f fp32) and new every step, and on Linux every fresh buffer above
32 MB is a fresh mmap faulted in 4 KiB at a time. So an owner tensor is kept per buffer and a second tensor on the
same storage is handed out, which autograd adopts as ``param.grad`` without copying. Once ``zero_grad()``
(set_to_none) has dropped that gradient the storage is referenced by the owner alone, and the next backward writes
into memory that is already mapped. A buffer is handed out again only when its storage has no other user at all (no
``.grad``, no view of it anywhere), so nothing anyone can see is ever overwritten; otherwise a new buffer is made
and kept, up to ``MAX_BUFFERS`` per weight. The cost: the buffers stay allocated between steps, as with
``zero_grad(set_to_none=False)``.
"""

from __future__ import annotations

import weakref

import torch

MAX_BUFFERS = 2  # e.g. one held as .grad while gradients accumulate over micro-batches, one being written


def can_recycle() -> bool:
    """Whether this torch exposes the storage use count the recycling relies on."""
    return hasattr(torch._C, "_storage_Use_Count")


class GradBuffers:
    """Hands out uninitialised gradient-sized tensors for parameters, recycling their memory when ``enabled``."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and can_recycle()
        self._owners: dict[int, tuple[weakref.ref, list[torch.Tensor]]] = {}

    def get(self, param: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor shaped like ``param`` whose contents are undefined; the caller overwrites all of it."""
        if not self.enabled or param.device.type != "cpu":
            return torch.empty_like(param, memory_format=torch.contiguous_format)
        key = id(param)
        entry = self._owners.get(key)
        if entry is None or entry[0]() is not param:
            owners = self._owners
            entry = (weakref.ref(param, lambda _, key=key: owners.pop(key, None)), [])
            self._owners[key] = entry
        kept = entry[1]
        for owner in kept:
            # 2 = the owner + the temporary storage object made by this very call: nobody else holds the memory.
            if owner.shape == param.shape and torch._C._storage_Use_Count(owner.untyped_storage()._cdata) == 2:
                break
        else:
            owner = torch.empty_like(param, memory_format=torch.contiguous_format)
            if len(kept) >= MAX_BUFFERS:
                return owner
            kept.append(owner)
        return torch.empty(0, dtype=owner.dtype, device=owner.device).set_(
            owner.untyped_storage(), 0, owner.shape, owner.stride()
        )
