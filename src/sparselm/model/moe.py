"""Mixture-of-Experts FFN: route, sort tokens by expert, run every expert on its contiguous block of rows, combine.

Expert weights are 3-D parameters ``[num_experts, d_in, d_out]`` so that FSDP and expert parallelism can shard
dim 0. There is never a Python loop over tokens. Two expert kernels compute the same thing (``Experts.impl``):

- ``"loop"`` (the default on CPU): a custom autograd Function that walks the experts once in the forward and once in
  the backward, doing all of one expert's work while its weights and rows are in cache. On CPU this is what
  ``grouped_mm`` does inside anyway (one GEMM per group), but the Function also casts each expert's fp32 master
  weights to the autocast dtype one expert at a time instead of materialising bf16 copies of all E experts,
  writes the fp32 weight gradients in place instead of going through full-size bf16 gradients, recycles the
  gradient memory of earlier steps (see ``_grad_buffer``), recomputes the activation in the backward instead of
  saving it, and folds the gate weights into the expert outputs. Those full-size copies are what made an MoE
  slower than a dense FFN of equal active FLOPs: their cost grows with the total parameter count, and on CPU every
  fresh buffer above 32 MB also costs a page fault per 4 KiB.
  With several intra-op threads the experts are split into one group per thread, each group's GEMMs running
  single-threaded at the same time (``EXPERT_THREADS``): expert-sized GEMMs are too small to share well.
- ``"grouped_mm"`` (the default elsewhere): plain autograd through ``torch.nn.functional.grouped_mm``, one call per
  projection, for GPUs where a Python loop over experts would be launch-bound.

Dispatch and combine are gathers in both directions (the inverse permutation replaces ``index_add``'s scatter
whenever no assignment was dropped), so the backward has no atomics and is deterministic.

Two modes:
- dropless (default): every token reaches its top-k experts, however unbalanced the routing.
- capacity: each expert takes at most ``ceil(capacity_factor * tokens * k / E)`` assignments. First choices win
  over second choices, then earlier tokens over later ones (GShard's priority). A dropped assignment contributes
  nothing, so a token whose every choice was dropped passes through the block's residual connection unchanged.
"""

from __future__ import annotations

import math
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sparselm.model.layers import FeedForward
from sparselm.model.router import Router


@dataclass
class MoEStats:
    """What one MoE layer did in one forward; returned explicitly, never stored in globals."""

    aux_loss: torch.Tensor  # scalar, Switch load-balancing loss (coefficient not applied)
    z_loss: torch.Tensor  # scalar, router z-loss (coefficient not applied)
    tokens_per_expert: torch.Tensor  # [E] assignments chosen by the router (before dropping)
    dropped: torch.Tensor  # scalar int64, assignments dropped for lack of capacity


# ------------------------------------------------------------------------------------------- gradient buffers

# Whether the loop kernel recycles the memory of earlier steps' expert weight gradients (see _grad_buffer).
REUSE_GRAD_BUFFERS = hasattr(torch._C, "_storage_Use_Count")
_GRAD_BUFFERS: dict[int, tuple[weakref.ref, list[torch.Tensor]]] = {}
_MAX_BUFFERS = 2  # e.g. one held as .grad while gradients accumulate over micro-batches, one being written


def _grad_buffer(param: torch.Tensor) -> torch.Tensor:
    """Uninitialised memory for the gradient of ``param``, recycled from earlier steps once nobody uses it (CPU).

    Every fresh buffer above 32 MB is a fresh mmap on Linux, faulted in 4 KiB at a time, and the expert weight
    gradients are big (3 x E*d*f fp32: 400 MB at E=64, d 512, f 1024) and new every step: ~0.2 s of page faults
    single-threaded, a fifth of the layer. So we keep an owner tensor per buffer and hand out a second tensor on the
    same storage, which autograd adopts as ``param.grad`` without copying. Once ``zero_grad()`` (set_to_none) has
    dropped that gradient, the storage is referenced by the owner alone and the next backward writes into memory
    that is already mapped. A buffer is handed out only when its storage has no other user at all (no ``.grad``, no
    view of it anywhere), so nothing anyone can see is ever overwritten; otherwise a new buffer is made (at most two
    are kept per weight). The cost: the buffers stay allocated between steps, as with ``set_to_none=False``.
    """
    if not REUSE_GRAD_BUFFERS or param.device.type != "cpu":
        return torch.empty_like(param, memory_format=torch.contiguous_format)
    key = id(param)
    entry = _GRAD_BUFFERS.get(key)
    if entry is None or entry[0]() is not param:
        entry = (weakref.ref(param, lambda _, key=key: _GRAD_BUFFERS.pop(key, None)), [])
        _GRAD_BUFFERS[key] = entry
    pool = entry[1]
    for owner in pool:
        # 2 = the owner + the temporary storage object made by this very call: nobody else holds the memory.
        if owner.shape == param.shape and torch._C._storage_Use_Count(owner.untyped_storage()._cdata) == 2:
            break
    else:
        owner = torch.empty_like(param, memory_format=torch.contiguous_format)
        if len(pool) >= _MAX_BUFFERS:
            return owner
        pool.append(owner)
    return torch.empty(0, dtype=owner.dtype, device=owner.device).set_(
        owner.untyped_storage(), 0, owner.shape, owner.stride()
    )


# ------------------------------------------------------------------------------------------- grouped_mm (GPU path)


def _grouped_mm_ok(*dims: int, dtype: torch.dtype) -> bool:
    # grouped_mm wants every row stride to be a multiple of 16 bytes.
    itemsize = torch.finfo(dtype).bits // 8
    return all((d * itemsize) % 16 == 0 for d in dims)


@torch.compiler.disable
def _grouped_mm_eager(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x, w, offs=offsets)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [M, K] are sorted by group with ``counts`` [G] rows each; returns ``x_g @ w[g]`` -> [M, N]."""
    if _grouped_mm_ok(x.shape[-1], w.shape[-1], dtype=x.dtype):
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
            # torch.compile traces grouped_mm on CPU only in bf16; run fp32 eagerly (a graph break, not an error).
            return _grouped_mm_eager(x, w, offsets)
        return F.grouped_mm(x, w, offs=offsets)
    # Fallback for shapes grouped_mm rejects (tiny test models): one matmul per expert, weights unbound once.
    pieces = torch.split(x, counts.tolist(), dim=0)
    return torch.cat([p @ wg for p, wg in zip(pieces, w.unbind(0), strict=True)], dim=0)


# ------------------------------------------------------------------------------------------------- loop (CPU path)


def _expert_threads_from_env() -> int:
    value = os.environ.get("SPARSELM_EXPERT_THREADS", "0")
    if not value.isdigit():
        raise ValueError(f"SPARSELM_EXPERT_THREADS must be a non-negative integer, got {value!r}")
    return int(value)


# Split the experts over this many threads, each running its own experts' GEMMs single-threaded, instead of
# running every expert-sized GEMM on all intra-op threads (see _run_experts). 0: as many as torch's intra-op
# threads when the experts are small (SPLIT_BELOW_ROWS); 1: the serial loop. Set with SPARSELM_EXPERT_THREADS.
EXPERT_THREADS = _expert_threads_from_env()
# With EXPERT_THREADS unset, split only when the experts average fewer rows than this (measured on 2 cores: the
# default training config, 8 experts x 1,024 rows, ran ~5% slower split in fp32; E=64 at 256 rows ran 5-9% faster;
# docs/benchmarks.md).
SPLIT_BELOW_ROWS = 1024
_POOL: ThreadPoolExecutor | None = None


def _expert_groups(counts: list[int], parts: int) -> list[list[tuple[int, slice]]]:
    """(expert, row slice) of every expert with rows, cut into ``parts`` contiguous groups of similar cost.

    An expert costs its rows plus a constant for casting and reading its weights, whatever its rows."""
    items, start = [], 0
    for e, n in enumerate(counts):
        if n:
            items.append((e, slice(start, start + n)))
        start += n
    cost = [n + 32 for n in counts if n]
    total, groups, current, acc = sum(cost), [], [], 0.0
    for item, c in zip(items, cost, strict=True):
        # Close the group when this expert's midpoint lies past the group's share of the total cost.
        if current and len(groups) < parts - 1 and acc + c / 2 > total * (len(groups) + 1) / parts:
            groups.append(current)
            current = []
        current.append(item)
        acc += c
    groups.append(current)
    return [g for g in groups if g]


def _run_experts(work, counts: list[int]) -> None:
    """Call ``work(expert, rows)`` for every expert with rows.

    Expert-sized GEMMs (a few hundred rows) scale poorly over intra-op threads: each one is too small to split well,
    and thousands of them each pay for waking the threads up. So with T > 1 intra-op threads the experts are cut
    into T groups that run at the same time on T threads, each GEMM single-threaded; every expert writes only its
    own rows and its own gradient slice, so the result is bitwise that of the serial loop on one thread.
    """
    global _POOL
    threads = EXPERT_THREADS or torch.get_num_threads()
    busy = [n for n in counts if n]
    if not EXPERT_THREADS and busy and sum(busy) / len(busy) >= SPLIT_BELOW_ROWS:
        threads = 1  # experts this big keep every thread busy inside their own GEMMs (measured: splitting is slower)
    if _get_current_dispatch_mode() is not None:
        threads = 1  # dispatch modes (op counters, fake tensors) are per thread: keep every op where they can see it
    groups = _expert_groups(counts, max(threads, 1))
    if len(groups) < 2:
        for group in groups:
            for e, r in group:
                work(e, r)
        return

    inference = torch.is_inference_mode_enabled()

    def run(group: list[tuple[int, slice]]) -> None:
        # Grad and inference mode are per thread: give the workers the caller's (a Function's body runs without grad;
        # tensors made under inference mode may only be written under it).
        with torch.inference_mode() if inference else torch.no_grad():
            for e, r in group:
                work(e, r)

    if _POOL is None or _POOL._max_workers < len(groups) - 1:
        if _POOL is not None:
            _POOL.shutdown(wait=False)  # its threads are idle: nothing is submitted to it any more
        # OpenMP's thread count is per thread: a pool thread would keep its default (all cores) and its
        # "single-threaded" GEMMs would fan out again (measured: results then differ from the serial loop's in the
        # last bit), so each sets its own once, when it starts.
        _POOL = ThreadPoolExecutor(
            max_workers=len(groups) - 1,
            thread_name_prefix="sparselm-experts",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
    intra = torch.get_num_threads()
    torch.set_num_threads(1)  # worker threads take their intra-op thread count from this on first use
    try:
        futures = [_POOL.submit(run, g) for g in groups[1:]]
        run(groups[0])
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(intra)


class _ExpertLoop(torch.autograd.Function):
    """All experts over rows sorted by expert, optionally scaled by per-row gates; see the module docstring.

    Forward per expert e with rows r: ``u = x_r W_up[e] (+ b_up)``, ``g = x_r W_gate[e]``,
    ``y_r = gate_r * ((silu(g) * u) W_down[e] (+ b_down))`` (GELU: ``gelu(u)`` instead of ``silu(g) * u``).
    Saved: x, u, g (the pre-activations, in the compute dtype). The activation is recomputed in the backward: two
    cheap elementwise passes over rows that are in cache anyway, instead of two more [M, d_ff] tensors in memory.
    """

    @staticmethod
    def forward(ctx, x, gates, counts, w_up, w_gate, w_down, b_up, b_down):
        cd = x.dtype  # compute dtype; the weights may be fp32 masters (autocast) and are cast one expert at a time
        m = x.shape[0]
        f = w_up.shape[-1]
        gated = w_gate is not None
        with torch.autocast(x.device.type, enabled=False):
            h_up = torch.empty(m, f, dtype=cd, device=x.device)
            h_gate = torch.empty(m, f, dtype=cd, device=x.device) if gated else None
            y = torch.empty(m, w_down.shape[-1], dtype=cd, device=x.device)
            gates_c = gates.to(cd).unsqueeze(-1) if gates is not None else None

            def expert(e: int, r: slice) -> None:
                xe = x[r]
                u = torch.mm(xe, w_up[e].to(cd), out=h_up[r])
                if b_up is not None:
                    u.add_(b_up[e].to(cd))
                if gated:
                    g = torch.mm(xe, w_gate[e].to(cd), out=h_gate[r])
                    a = F.silu(g).mul_(u)
                else:
                    a = F.gelu(u, approximate="tanh")
                ye = torch.mm(a, w_down[e].to(cd), out=y[r])
                if b_down is not None:
                    ye.add_(b_down[e].to(cd))
                if gates_c is not None:
                    ye.mul_(gates_c[r])

            _run_experts(expert, counts)
        ctx.counts = counts
        ctx.has_bias = (b_up is not None, b_down is not None)
        ctx.save_for_backward(x, gates, h_up, h_gate, w_up, w_gate, w_down, b_down)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, gates, h_up, h_gate, w_up, w_gate, w_down, b_down = ctx.saved_tensors
        need_x, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cd = x.dtype
        master = w_up.dtype
        direct = master == cd  # fp32 (or pure bf16) training: GEMMs write straight into the gradient buffers
        gated = w_gate is not None
        num_experts, _, f = w_up.shape
        with torch.autocast(x.device.type, enabled=False):
            dy = dy.to(cd)
            g_up = _grad_buffer(w_up)
            g_gate = _grad_buffer(w_gate) if gated else None
            g_down = _grad_buffer(w_down)
            gb_up = torch.zeros(num_experts, f, dtype=master, device=x.device) if ctx.has_bias[0] else None
            gb_down = torch.zeros_like(b_down) if b_down is not None else None
            dx = torch.empty_like(x) if need_x else None
            dgates = torch.empty_like(gates) if gates is not None and need_gates else None
            gates_c = gates.to(cd).unsqueeze(-1) if gates is not None else None
            for e, n in enumerate(ctx.counts):
                if n == 0:
                    # An expert without rows still owns a gradient: an exact zero.
                    for g_w in (g_up, g_gate, g_down):
                        if g_w is not None:
                            g_w[e].zero_()

            def expert(e: int, r: slice) -> None:
                xe, u, dy_gated = x[r], h_up[r], dy[r]
                # Gradient w.r.t. the expert output before gating; ``t`` is the same through W_down^T.
                dye = dy_gated * gates_c[r] if gates_c is not None else dy_gated
                t = torch.mm(dy_gated, w_down[e].to(cd).t())
                if gated:
                    g = h_gate[r]
                    silu_g = F.silu(g)
                    a = silu_g * u
                else:
                    a = F.gelu(u, approximate="tanh")
                if dgates is not None:
                    # d gate_r = <dy_r, a_r W_down + b_down> = <dy_r W_down^T, a_r> + <dy_r, b_down>
                    dg = (t * a).sum(-1, dtype=torch.float32)
                    if b_down is not None:
                        dg += dy_gated.float() @ b_down[e].float()
                    dgates[r] = dg
                da = t.mul_(gates_c[r]) if gates_c is not None else t
                if gated:
                    du = da * silu_g
                    dpre_gate = torch.ops.aten.silu_backward(da.mul_(u), g)
                else:
                    du = torch.ops.aten.gelu_backward(da, u, approximate="tanh")
                    dpre_gate = None
                if direct:
                    torch.mm(a.t(), dye, out=g_down[e])
                    torch.mm(xe.t(), du, out=g_up[e])
                else:
                    g_down[e].copy_(torch.mm(a.t(), dye))
                    g_up[e].copy_(torch.mm(xe.t(), du))
                if dpre_gate is not None:
                    if direct:
                        torch.mm(xe.t(), dpre_gate, out=g_gate[e])
                    else:
                        g_gate[e].copy_(torch.mm(xe.t(), dpre_gate))
                if dx is not None:
                    dxe = torch.mm(du, w_up[e].to(cd).t(), out=dx[r])
                    if dpre_gate is not None:
                        dxe.addmm_(dpre_gate, w_gate[e].to(cd).t())
                if gb_up is not None:
                    gb_up[e] = du.sum(0, dtype=torch.float32)
                if gb_down is not None:
                    gb_down[e] = dye.sum(0, dtype=torch.float32)

            _run_experts(expert, ctx.counts)
        return dx, dgates, None, g_up, g_gate, g_down, gb_up, gb_down


@torch.compiler.disable  # a data-dependent loop: torch.compile runs it eagerly behind a graph break
def _expert_loop(x, gates, counts, w_up, w_gate, w_down, b_up, b_down) -> torch.Tensor:
    return _ExpertLoop.apply(x, gates, counts.tolist(), w_up, w_gate, w_down, b_up, b_down)


# ------------------------------------------------------------------------------------------- dispatch and combine


class _Dispatch(torch.autograd.Function):
    """``rows = x[token_of_row]``. Backward: when every assignment is present (dropless), each token's k row
    gradients are gathered with the inverse permutation and summed; otherwise scattered with ``index_add``."""

    @staticmethod
    def forward(ctx, x, token_of_row, inverse, top_k):
        ctx.save_for_backward(token_of_row, inverse)
        ctx.top_k = top_k
        ctx.x_shape = x.shape
        return x.index_select(0, token_of_row)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        token_of_row, inverse = ctx.saved_tensors
        if inverse is not None:
            dx = grad.index_select(0, inverse).view(ctx.top_k, ctx.x_shape[0], grad.shape[-1]).sum(0)
        else:
            dx = grad.new_zeros(ctx.x_shape).index_add_(0, token_of_row, grad)
        return dx, None, None, None


class _Combine(torch.autograd.Function):
    """``out[t] = sum of the rows of token t`` (rows already gated). Backward is a plain gather."""

    @staticmethod
    def forward(ctx, rows, token_of_row, inverse, top_k, num_tokens):
        ctx.save_for_backward(token_of_row)
        if inverse is not None:
            # Choice-major assignments: the inverse permutation lays the rows out as [k, T, d].
            return rows.index_select(0, inverse).view(top_k, num_tokens, rows.shape[-1]).sum(0)
        return rows.new_zeros(num_tokens, rows.shape[-1]).index_add_(0, token_of_row, rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (token_of_row,) = ctx.saved_tensors
        return grad.index_select(0, token_of_row), None, None, None, None


# ---------------------------------------------------------------------------------------------------- modules


class Experts(nn.Module):
    """E independent FFNs stored as 3-D weights. SwiGLU: gate/up [E, d_model, d_ff], down [E, d_ff, d_model].

    ``impl`` picks the kernel: "auto" (loop on CPU, grouped_mm elsewhere), "loop" or "grouped_mm"; all agree.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, kind: str = "swiglu", bias: bool = False) -> None:
        super().__init__()
        self.kind = kind
        self.impl = "auto"
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if kind == "swiglu" else None
        self.w_down = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_up = nn.Parameter(torch.zeros(num_experts, d_ff)) if bias else None
        self.b_down = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [M, d_model] sorted by expert, ``counts`` [E] rows per expert, optional ``gates`` [M] scaling each
        row's output -> [M, d_model] in the compute dtype (the autocast dtype if autocast is on)."""
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            # autocast covers neither grouped_mm nor the loop: cast inputs and weights to the autocast dtype ourselves.
            dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        impl = self.impl if self.impl != "auto" else ("loop" if x.device.type == "cpu" else "grouped_mm")
        if impl == "loop":
            return _expert_loop(x, gates, counts, self.w_up, self.w_gate, self.w_down, self.b_up, self.b_down)
        if impl != "grouped_mm":
            raise ValueError(f"unknown experts impl {self.impl!r}: expected 'auto', 'loop' or 'grouped_mm'")
        rows_expert = None
        if self.b_up is not None:
            rows_expert = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
        h = grouped_matmul(x, self.w_up.to(dtype), counts)
        if self.b_up is not None:
            h = h + self.b_up.to(dtype)[rows_expert]
        if self.w_gate is not None:
            h = F.silu(grouped_matmul(x, self.w_gate.to(dtype), counts)) * h
        else:
            h = F.gelu(h, approximate="tanh")
        y = grouped_matmul(h, self.w_down.to(dtype), counts)
        if self.b_down is not None:
            y = y + self.b_down.to(dtype)[rows_expert]
        if gates is not None:
            y = y * gates.to(dtype).unsqueeze(-1)
        return y


class MoE(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        kind: str = "swiglu",
        bias: bool = False,
        dropless: bool = True,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        renormalize: bool = True,
        jitter: float = 0.0,
        shared_expert: bool = False,
        router_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.dropless = dropless
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.router = Router(d_model, num_experts, top_k, renormalize, jitter, router_init_std)
        self.experts = Experts(num_experts, d_model, d_ff, kind, bias)
        self.shared = FeedForward(d_model, d_ff, kind, bias) if shared_expert else None

    def capacity(self, num_tokens: int) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return math.ceil(factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """``x`` [..., d_model]; ``valid`` [...] False for padding, which is neither routed nor counted (padding
        would otherwise take capacity from real tokens and skew the load statistics and aux losses)."""
        if valid is not None and not bool(valid.all()):
            keep = valid.flatten()
            flat = x.flatten(0, -2)
            routed, stats = self._route_and_compute(flat[keep])
            out = torch.zeros(flat.shape[0], flat.shape[1], dtype=routed.dtype, device=x.device)
            out[keep] = routed
            return out.unflatten(0, x.shape[:-1]), stats
        out, stats = self._route_and_compute(x.flatten(0, -2))
        return out.unflatten(0, x.shape[:-1]), stats

    def _route_and_compute(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        """Route, dispatch, compute and combine the tokens ``x`` [T, d_model]."""
        num_tokens = x.shape[0]
        route = self.router(x)

        # Assignment a = choice * T + token ("choice-major"), so a stable sort by expert keeps first choices ahead
        # of second choices and earlier tokens ahead of later ones within each expert.
        experts_flat = route.experts.t().flatten()
        weights_flat = route.weights.t().flatten()
        order = torch.argsort(experts_flat, stable=True)
        counts = route.tokens_per_expert
        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        if not self.dropless:
            cap = self.capacity(num_tokens)
            starts = torch.cumsum(counts, 0) - counts
            rank_in_expert = torch.arange(order.numel(), device=x.device) - starts[experts_flat[order]]
            order = order[rank_in_expert < cap]
            kept = counts.clamp(max=cap)
            dropped = counts.sum() - kept.sum()
            counts = kept
        token_of_row = order % num_tokens
        inverse = None
        if order.numel() == experts_flat.numel():
            # Nothing dropped: row -> assignment is a permutation, and its inverse turns scatters into gathers.
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=x.device)

        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        # Cast before the gather: k times fewer bytes to convert and half the bytes to move under bf16.
        rows = _Dispatch.apply(x.to(dtype), token_of_row, inverse, self.top_k)
        gates = weights_flat[order]
        if isinstance(self.experts, Experts):
            y_rows = self.experts(rows, counts, gates)  # gates folded into the expert kernel
        else:  # a drop-in replacement with the plain (rows, counts) call, e.g. ParallelExperts
            y_rows = self.experts(rows, counts)
            y_rows = y_rows * gates.unsqueeze(-1).to(y_rows.dtype)
        out = _Combine.apply(y_rows, token_of_row, inverse, self.top_k, num_tokens)
        if self.shared is not None:
            out = out + self.shared(x)
        return out, MoEStats(route.aux_loss, route.z_loss, route.tokens_per_expert, dropped)
