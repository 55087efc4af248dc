"""The paged KV cache: fixed-size blocks from one pool allocated at start, block tables per sequence, prefix caching.

``BlockPool`` does the bookkeeping (no tensors): reference counts, the free queue, and the prefix cache, which maps
the hash of a full block's tokens and of everything before it to the block holding their keys and values. A freed
block keeps its contents and its hash until it is handed out again, so a later request with the same prefix (or a
preempted request coming back) finds it; free blocks without a hash are handed out first, then cached ones in the
order they were freed (least recently used first).

``PagedKVCache`` holds the tensors, ``[layers, heads, blocks, block_size, head_dim]`` for keys and for values (head
major: a sequence's gathered keys are then contiguous per head, the layout attention kernels read fastest), and
``StepCache`` is one forward's view of it: the model's ``AttentionCache`` for a packed batch of sequences (see
``sparselm.model.attention``). The new tokens of a step are laid out as the decoding sequences (one token each)
followed by each prefill chunk; the decoding sequences attend together in one call over their gathered blocks,
each prefill chunk in a call of its own.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from sparselm.model.attention import KeyGroup


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Identity of a full block: its tokens and (through ``parent``, the previous block's hash) all tokens before."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    def __init__(self, num_blocks: int, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self, count: int) -> list[int] | None:
        """``count`` blocks with reference count 1, or None (nothing taken) when fewer are free."""
        if count > len(self.free):
            return None
        blocks = []
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            old = self.hashes[block]
            if old is not None:  # evict: its contents are about to be overwritten
                del self.cached[old]
                self.hashes[block] = None
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Freed last blocks are evicted first: a sequence's tail is the part
        least likely to be shared."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
                if self.hashes[block] is None:
                    self.free.move_to_end(block, last=False)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The longest run of ``hashes`` found in the cache, each block taken with one more reference."""
        if not self.prefix_caching:
            return []
        found = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
            found.append(block)
        return found

    def commit(self, block: int, h: bytes) -> None:
        """``block`` now holds the full block ``h``: later requests may share it. If another block already holds
        the same tokens, that one stays the cached copy."""
        if self.prefix_caching and h not in self.cached and self.hashes[block] is None:
            self.cached[h] = block
            self.hashes[block] = h


class PagedKVCache:
    """The key and value tensors of every layer, allocated once."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_heads: int, head_dim: int, dtype, device):
        shape = (n_layers, n_heads, num_blocks, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.n_heads = n_heads
        self.head_dim = head_dim
        # Gathered keys/values land in buffers kept from step to step: fresh multi-megabyte tensors every layer
        # cost a page fault per 4 KiB, which made the gathers 10x slower than the copies themselves.
        self._gather = {
            "k": torch.empty(0, dtype=dtype, device=device),
            "v": torch.empty(0, dtype=dtype, device=device),
        }

    def gather(self, layer: int, which: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of ``block_rows(layer, which)`` -> [len(rows), block_size * head_dim] in a reused buffer
        (valid until the next gather of the same tensor)."""
        src = self.block_rows(layer, which)
        size = rows.numel() * src.shape[1]
        buf = self._gather[which]
        if buf.numel() < size:
            buf = self._gather[which] = torch.empty(size, dtype=src.dtype, device=src.device)
        out = buf[:size].view(rows.numel(), src.shape[1])
        return torch.index_select(src, 0, rows, out=out)

    def slot_rows(self, layer: int, which: str) -> torch.Tensor:
        """``[heads * blocks * block_size, head_dim]``: one row per (head, slot) of one layer."""
        return getattr(self, which)[layer].view(-1, self.head_dim)

    def block_rows(self, layer: int, which: str) -> torch.Tensor:
        """``[heads * blocks, block_size * head_dim]``: one row per (head, block) of one layer."""
        return getattr(self, which)[layer].view(self.n_heads * self.num_blocks, -1)

    @staticmethod
    def bytes_per_block(n_layers: int, block_size: int, d_model: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * block_size * d_model * torch.finfo(dtype).bits // 8


@dataclass
class ScheduledChunk:
    """``count`` tokens of one sequence starting at position ``start``, whose blocks are ``blocks``."""

    start: int
    count: int
    blocks: list[int]


class _DecodeGroup(KeyGroup):
    """B sequences with one new token each, at packed rows ``rows``; keys: their blocks, gathered and padded."""

    def __init__(self, rows: slice, block_table: torch.Tensor, q_pos, k_pos, allowed) -> None:
        super().__init__(q_pos, k_pos, allowed)
        self.rows = rows
        self.block_table = block_table  # (rows of PagedKVCache.block_rows, B)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        return q[:, :, self.rows].transpose(0, 2).contiguous()  # [1, H, B, hd] -> [B, H, 1, hd]

    def outputs(self, y: torch.Tensor) -> torch.Tensor:
        return y.transpose(0, 2)


class _ChunkGroup(KeyGroup):
    """One sequence's prefill chunk at packed rows ``rows``; keys: all of its blocks so far."""

    def __init__(self, rows: slice, block_table: torch.Tensor, q_pos, k_pos, allowed) -> None:
        super().__init__(q_pos, k_pos, allowed)
        self.rows = rows
        self.block_table = block_table  # (rows of PagedKVCache.block_rows, 1)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        return q[:, :, self.rows]


class StepCache:
    """The model's ``AttentionCache`` for one packed forward over ``chunks`` (decoding ones, count 1, first)."""

    def __init__(self, cache: PagedKVCache, chunks: list[ScheduledChunk], device) -> None:
        self.cache = cache
        bs = cache.block_size
        slots = []
        for c in chunks:
            for p in range(c.start, c.start + c.count):
                slots.append(c.blocks[p // bs] * bs + p % bs)
        heads = torch.arange(cache.n_heads, device=device).unsqueeze(1)
        # rows of PagedKVCache.slot_rows that the new tokens' keys go to, head-major like the model's [1, H, N, hd]
        self.store_rows = (heads * (cache.num_blocks * bs) + torch.tensor(slots, device=device)).flatten()
        self.head_offsets = heads * cache.num_blocks
        self._groups: list[KeyGroup] = []
        decode = [c for c in chunks if c.count == 1]
        if decode and any(c.count != 1 for c in chunks[: len(decode)]):
            raise ValueError("decoding chunks (one token) must come first")
        if decode:
            width = max(len(c.blocks) for c in decode)
            table = torch.tensor([c.blocks + [0] * (width - len(c.blocks)) for c in decode], device=device)
            q_pos = torch.tensor([[c.start] for c in decode], device=device)
            k_pos = torch.arange(width * bs, device=device).expand(len(decode), -1)
            allowed = (k_pos <= q_pos).unsqueeze(1)  # [B, 1, Tk]: the padding slots lie past every query
            self._groups.append(_DecodeGroup(slice(0, len(decode)), self._rows(table), q_pos, k_pos, allowed))
        row = len(decode)
        for c in chunks[len(decode) :]:
            needed = (c.start + c.count + bs - 1) // bs
            table = torch.tensor([c.blocks[:needed]], device=device)
            q_pos = torch.arange(c.start, c.start + c.count, device=device).unsqueeze(0)
            k_pos = torch.arange(needed * bs, device=device).unsqueeze(0)
            allowed = k_pos.unsqueeze(1) <= q_pos.unsqueeze(2)  # [1, Tq, Tk]
            self._groups.append(_ChunkGroup(slice(row, row + c.count), self._rows(table), q_pos, k_pos, allowed))
            row += c.count

    def _rows(self, table: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Block table [B, W] -> rows of PagedKVCache.block_rows in [H, B, W] order, and B."""
        return (self.head_offsets + table.flatten().unsqueeze(0)).flatten(), table.shape[0]

    def groups(self, positions: torch.Tensor, valid: torch.Tensor) -> list[KeyGroup]:
        return self._groups

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for which, new in (("k", k), ("v", v)):
            rows = self.cache.slot_rows(layer, which)
            rows.index_copy_(0, self.store_rows, new[0].reshape(-1, new.shape[-1]).to(rows.dtype))  # [H * N, hd]

    def keys(self, layer: int, group: KeyGroup) -> tuple[torch.Tensor, torch.Tensor]:
        rows, batch = group.block_table  # type: ignore[attr-defined]
        hd = self.cache.head_dim
        out = []
        for which in ("k", "v"):
            gathered = self.cache.gather(layer, which, rows)  # [H * B * W, bs * hd]
            out.append(gathered.view(self.cache.n_heads, batch, -1, hd).transpose(0, 1))  # [B, H, W * bs, hd]
        return out[0], out[1]

    def advance(self, num_tokens: int) -> None:
        pass
