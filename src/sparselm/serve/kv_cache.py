"""The paged KV cache: fixed-size blocks from one pool allocated at start, block tables per sequence, prefix caching.

``BlockPool`` does the bookkeeping (no tensors): reference counts, the free queue, the sequences' claims (the runs
of blocks they are expected to grow into, so that a sequence's blocks stay one run) and the prefix cache, which maps
the hash of a full block's tokens and of everything before it to the block holding their keys and values. A freed
block keeps its contents and its hash until it is handed out again, so a later request with the same prefix (or a
preempted request coming back) finds it; the free queue is in eviction order: blocks without a hash first, then
cached ones in the order they were freed (least recently used first).

``PagedKVCache`` holds the tensors, ``[layers, heads, blocks, block_size, head_dim]`` for keys and for values (head
major: a sequence's gathered keys are then contiguous per head, the layout attention kernels read fastest), and
``StepCache`` is one forward's view of it: the model's ``AttentionCache`` for a packed batch of sequences (see
``sparselm.model.attention``). The new tokens of a step are laid out as the decoding sequences (one token each)
followed by each prefill chunk. The decoding sequences attend in one call of the paged decode kernel
(``sparselm.ops.paged_attention``: each over exactly its keys, read in place through its block table) when the
engine uses it; otherwise each attends alone through SDPA's unmasked path, in place when its blocks form one run
and gathered otherwise. Each prefill chunk attends in a call of its own with a causal mask.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from sparselm.model.attention import KeyGroup
from sparselm.ops.paged_attention import paged_decode_attention


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Identity of a full block: its tokens and (through ``parent``, the previous block's hash) all tokens before."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Blocks, their reference counts, the free queue, the prefix cache and the sequences' claims.

    A claim is the run of blocks a sequence is expected to grow into: where a sequence starts (or restarts, when
    the block after its last one is taken), the pool picks a run of free blocks that no other claim covers and is
    long enough for the blocks it asks ``room`` for, and the sequence then grows block by block into that run. Its
    blocks stay one run of the pool, which SDPA reads in place instead of gathering. Placement does not follow the
    prefix cache's eviction order: a run may hold cached blocks freed more recently than others. ``keep_runs``
    False (for a reader that follows block tables, like the paged decode kernel, to which runs are worth nothing):
    no claims, every block is taken in eviction order, and the prefix cache keeps its least-recently-used order.
    """

    def __init__(self, num_blocks: int, prefix_caching: bool = True, keep_runs: bool = True) -> None:
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.keep_runs = keep_runs
        self.refs = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.claim_of = [-1] * num_blocks  # the claim covering each block: its first block, or -1
        self.claims: dict[int, range] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self, count: int, after: int | None = None, room: int = 0) -> list[int] | None:
        """``count`` blocks with reference count 1, or None (nothing taken) when fewer are free. Without
        ``keep_runs`` they come in eviction order (below). Otherwise each block is the one after the previous (the
        first: after ``after``) when that one is free and no other sequence's claim covers it; otherwise the rest
        start a new claim of up to ``max(room, count)`` blocks (see the class docstring), and where no free run is
        long enough for all of them, the blocks are taken in eviction order: free blocks without a hash first, then
        cached ones in the order they were freed (least recently used first)."""
        if count > len(self.free):
            return None
        if not self.keep_runs:
            return [self._take(next(iter(self.free))) for _ in range(count)]
        blocks: list[int] = []
        while len(blocks) < count:
            nxt = after + 1 if after is not None else -1
            if 0 <= nxt < self.num_blocks and self.refs[nxt] == 0 and self.claim_of[nxt] in (-1, self.claim_of[after]):
                blocks.append(self._take(nxt))
                after = nxt
                continue
            start = self._place(count - len(blocks), max(room - len(blocks), count - len(blocks)))
            if start is None:  # fragmented: no run holds even the blocks asked for now
                while len(blocks) < count:
                    blocks.append(self._take(next(iter(self.free))))
                break
            blocks.append(self._take(start))
            after = start
        return blocks

    def _place(self, need: int, room: int) -> int | None:
        """Claim a run of free, unclaimed blocks for a sequence that needs ``need`` blocks now and expects ``room``:
        the first start in eviction order whose run holds ``room``, else the longest run holding ``need``. Runs are
        measured only as far as ``room``, and a block inside a run already measured is not measured again."""
        best, best_len = None, 0
        measured: set[int] = set()
        for b in self.free:
            if b in measured or self.claim_of[b] != -1:
                continue
            end = b
            while end < self.num_blocks and end - b < room and self.refs[end] == 0 and self.claim_of[end] == -1:
                end += 1
            if end - b >= room:
                best, best_len = b, end - b
                break
            measured.update(range(b, end))
            if end - b >= need and end - b > best_len:
                best, best_len = b, end - b
        if best is None:
            return None
        claim = range(best, best + best_len)
        self.claims[best] = claim
        for b in claim:
            self.claim_of[b] = best
        return best

    def _take(self, block: int) -> int:
        del self.free[block]
        old = self.hashes[block]
        if old is not None:  # evict: its contents are about to be overwritten
            del self.cached[old]
            self.hashes[block] = None
        self.refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block, and a claim started at a block no sequence holds any more. Freed last
        blocks are evicted first: a sequence's tail is the part least likely to be shared."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
                if self.hashes[block] is None:
                    self.free.move_to_end(block, last=False)
                claim = self.claims.pop(block, None)
                for b in claim or ():
                    self.claim_of[b] = -1

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
        self.head_offsets = torch.arange(n_heads, device=device).unsqueeze(1) * num_blocks  # [H, 1]: first block row
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


class _OneDecode(KeyGroup):
    """One decoding sequence's new token at packed row ``row``. It attends, without a mask, over exactly its own
    ``length`` keys: read in place from the pool when its blocks are one run starting at ``first_block``, else from
    ``offset`` on in the keys gathered for all decoding sequences."""

    def __init__(self, row: int, position: int, length: int, device, first_block=None, offset: int = 0) -> None:
        self.row, self.position, self.length, self.device = row, position, length, device
        self.first_block, self.offset = first_block, offset
        self.allowed = None

    @property
    def q_positions(self) -> torch.Tensor:  # only models with relative positions ask
        return torch.tensor([[self.position]], device=self.device)

    @property
    def k_positions(self) -> torch.Tensor:
        return torch.arange(self.length, device=self.device).unsqueeze(0)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        return q[:, :, self.row : self.row + 1]


class _PagedDecodes(KeyGroup):
    """All decoding sequences of a step (packed rows ``0..count``), attended by the paged kernel: ``tables`` [S, W]
    their block ids, ``lengths`` [S] their key counts. No mask and no position bias (the engine uses the kernel only
    for models without relative positions)."""

    def __init__(self, count: int, tables: torch.Tensor, lengths: torch.Tensor) -> None:
        super().__init__(None, None, None)  # type: ignore[arg-type]
        self.count, self.tables, self.lengths = count, tables, lengths

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        return q[:, :, : self.count]


class _ChunkGroup(KeyGroup):
    """One sequence's prefill chunk at packed rows ``rows``; keys: its tokens so far, the chunk's own last (a causal
    tail: attention needs no mask where the position type adds no bias)."""

    def __init__(self, rows: slice, block_table: torch.Tensor, q_pos, k_pos, allowed) -> None:
        super().__init__(q_pos, k_pos, allowed, causal_tail=True)
        self.rows = rows
        self.block_table = block_table  # (rows of PagedKVCache.block_rows, 1): whole blocks, cut to k_pos's length

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        return q[:, :, self.rows]


class StepCache:
    """The model's ``AttentionCache`` for one packed forward over ``chunks`` (decoding ones, count 1, first);
    ``paged_kernel``: the decoding sequences attend through the paged decode kernel."""

    def __init__(self, cache: PagedKVCache, chunks: list[ScheduledChunk], device, paged_kernel: bool = False) -> None:
        self.cache = cache
        bs = cache.block_size
        slots = []
        for c in chunks:
            for p in range(c.start, c.start + c.count):
                slots.append(c.blocks[p // bs] * bs + p % bs)
        # rows of PagedKVCache.slot_rows that the new tokens' keys go to, head-major like the model's [1, H, N, hd]
        self.store_rows = (cache.head_offsets * bs + torch.tensor(slots, device=device)).flatten()
        self.head_offsets = cache.head_offsets
        self._groups: list[KeyGroup] = []
        decode = [c for c in chunks if c.count == 1]
        if decode and any(c.count != 1 for c in chunks[: len(decode)]):
            raise ValueError("decoding chunks (one token) must come first")
        gathered_blocks: list[int] = []
        if paged_kernel and decode:
            used = [c.blocks[: c.start // bs + 1] for c in decode]
            width = max(map(len, used))
            tables = torch.tensor([b + [0] * (width - len(b)) for b in used], dtype=torch.long, device=device)
            lengths = torch.tensor([c.start + 1 for c in decode], dtype=torch.long, device=device)
            self._groups.append(_PagedDecodes(len(decode), tables, lengths))
        else:
            for row, c in enumerate(decode):
                blocks = c.blocks[: c.start // bs + 1]
                first = blocks[0]
                if blocks == list(range(first, first + len(blocks))):
                    self._groups.append(_OneDecode(row, c.start, c.start + 1, device, first_block=first))
                else:
                    offset = len(gathered_blocks) * bs
                    self._groups.append(_OneDecode(row, c.start, c.start + 1, device, offset=offset))
                    gathered_blocks.extend(blocks)
        # one gather per layer for every decoding sequence whose blocks are not one run
        self._gather_rows = self._rows(torch.tensor([gathered_blocks], device=device))[0] if gathered_blocks else None
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None
        row = len(decode)
        for c in chunks[len(decode) :]:
            needed = (c.start + c.count + bs - 1) // bs
            table = torch.tensor([c.blocks[:needed]], device=device)
            q_pos = torch.arange(c.start, c.start + c.count, device=device).unsqueeze(0)
            k_pos = torch.arange(c.start + c.count, device=device).unsqueeze(0)
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
        self._gathered = None  # a new layer: gather again

    def keys(self, layer: int, group: KeyGroup) -> tuple[torch.Tensor, torch.Tensor]:
        cache, hd = self.cache, self.cache.head_dim
        if isinstance(group, _OneDecode):
            if group.first_block is not None:
                end = group.first_block + (group.length - 1) // cache.block_size + 1
                pools = (cache.k[layer, :, group.first_block : end], cache.v[layer, :, group.first_block : end])
                return tuple(kv.flatten(1, 2)[None, :, : group.length] for kv in pools)  # [1, H, length, hd]
            if self._gathered is None:  # the layer's first such sequence gathers for all of them
                rows = self._gather_rows
                self._gathered = tuple(cache.gather(layer, w, rows).view(cache.n_heads, -1, hd) for w in ("k", "v"))
            end = group.offset + group.length
            return tuple(kv[None, :, group.offset : end] for kv in self._gathered)  # [1, H, length, hd]
        rows, batch = group.block_table  # type: ignore[attr-defined]
        length = group.k_positions.shape[1]
        out = []
        for which in ("k", "v"):
            gathered = self.cache.gather(layer, which, rows)  # [H * B * W, bs * hd]
            out.append(
                gathered.view(self.cache.n_heads, batch, -1, hd).transpose(0, 1)[:, :, :length]
            )  # [B, H, Tk, hd]
        return out[0], out[1]

    def attend(self, layer: int, group: KeyGroup, q: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(group, _PagedDecodes):
            return None
        queries = group.queries(q)[0].transpose(0, 1)  # [S, H, hd]
        y = paged_decode_attention(queries, self.cache.k[layer], self.cache.v[layer], group.tables, group.lengths)
        return y.transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, H, S, hd]

    def advance(self, num_tokens: int) -> None:
        pass
