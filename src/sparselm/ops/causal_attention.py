"""Causal self-attention for bf16 training on CPU: forward and backward in one C++ kernel over the causal triangle.

PyTorch's CPU flash-attention kernel reaches ~53 GFLOP/s on the d512 training shape (B 8, H 8, T 512, head 64)
where this CPU's bf16 matmuls run at ~400, so attention took a fifth of a compiled training step
(docs/benchmarks.md, "What train.compile compiles"). The kernel in ``causal_attention.cpp`` computes each block of
64 queries against the keys it may see with oneDNN's bf16 batch-reduce GEMM (bf16 inputs, fp32 results), softmax in
fp32 between the products, and keeps only each query's log-sum-exp for the backward, which recomputes the
probabilities (as flash attention does). Same math as ``scaled_dot_product_attention(q, k, v, is_causal=True)``:
scores and sums in fp32, probabilities rounded to bf16 before they multiply the values.

:func:`causal_attention` takes the kernel when :func:`applies` (bf16 CPU tensors of one shape, even head size, the
kernel built and working here) and ``scaled_dot_product_attention`` otherwise. Compiled on first use
(:mod:`sparselm.ops.extension`); ``SPARSELM_CAUSAL_ATTENTION=off`` turns it off (to compare). oneDNN's bf16 GEMM
needs a CPU with bf16 or AMX instructions: a first small call checks that the kernel runs and matches PyTorch,
else :func:`unavailable_reason` says why and every call keeps PyTorch's kernel.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from sparselm.ops.extension import build

SOURCE = Path(__file__).with_name("causal_attention.cpp")


@functools.cache
def _load() -> str | None:
    """Build, load and try the kernel once per process; None if it works, else why not."""
    reason = build("sparselm_causal_attention", SOURCE, "SPARSELM_CAUSAL_ATTENTION")
    if reason is not None:
        return reason
    _register_shapes()
    try:  # oneDNN's bf16 GEMM is there on every CPU build but runs only where the CPU has bf16 or AMX instructions
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 70, 16, generator=generator).bfloat16() for _ in range(3))
        got = torch.ops.sparselm_causal.forward(q, k, v, 0.25)[0]
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=0.25)
        error = (got.float() - want).abs().max().item()
    except RuntimeError as exc:
        return f"oneDNN's bf16 GEMM does not run on this CPU ({str(exc).strip().splitlines()[0]})"
    if not error < 0.05:
        return f"the kernel's trial output differs from PyTorch's by {error:.3g} on this CPU"
    return None


@functools.cache  # once per process, however often _load's cache is cleared
def _register_shapes() -> None:
    """Output shapes and layouts of the two ops, for torch.compile's tracing (the kernel runs inside the graph), and
    their FLOPs, for ``torch.utils.flop_counter``."""

    def heads(q: torch.Tensor) -> torch.Tensor:
        b, h, t, d = q.shape
        return q.new_empty(b, t, h, d).transpose(1, 2)

    torch.library.register_fake("sparselm_causal::forward")(
        lambda q, k, v, scale: (heads(q), q.new_empty(q.shape[:3], dtype=torch.float32))
    )
    torch.library.register_fake("sparselm_causal::backward")(
        lambda grad_out, q, k, v, out, lse, scale: (heads(q), heads(q), heads(q))
    )
    # FLOPs as torch's counter counts scaled_dot_product_attention (the full square), so that counts taken with and
    # without the kernel (sparselm plan's fake ranks run PyTorch's attention) agree.
    from torch.utils import flop_counter

    flop_counter.register_flop_formula(torch.ops.sparselm_causal.forward)(
        lambda q_shape, k_shape, v_shape, *args, **kwargs: flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)
    )
    flop_counter.register_flop_formula(torch.ops.sparselm_causal.backward)(
        lambda g_shape, q_shape, k_shape, v_shape, *args, **kwargs: flop_counter.sdpa_backward_flop_count(
            g_shape, q_shape, k_shape, v_shape
        )
    )


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant rather than tracing the build
def kernel_available() -> bool:
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the kernel is not in use, or None when it is."""
    return _load()


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``causal_attention`` of these tensors goes through the kernel: bf16 plain CPU tensors (not DTensor
    shards), q [B, H, Tq, D] and k, v [B, H, Tk, D] with Tk >= Tq (Tk == Tq where autograd records; one query over
    more keys, a decoding step, reads them faster through PyTorch's kernel than through a repacked copy), even D,
    and the kernel working on this machine."""
    return (
        q.dim() == 4
        and k.shape == v.shape
        and k.dim() == 4
        and q.shape[:2] == k.shape[:2]
        and q.shape[3] == k.shape[3]
        and (k.shape[2] == q.shape[2] or (1 < q.shape[2] < k.shape[2] and not _records_grad(q, k, v)))
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and type(q) is type(k) is type(v) is torch.Tensor
        and q.shape[-1] % 2 == 0
        and kernel_available()
    )


def _records_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        out, lse = torch.ops.sparselm_causal.forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dq, dk, dv = torch.ops.sparselm_causal.backward(grad_out, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of queries [B, H, Tq, D] over keys and values [B, H, Tk, D], Tk >= Tq, the queries being the
    last Tq positions (query i sees keys 0 .. Tk - Tq + i: a prompt chunk after cached keys; Tk == Tq is
    ``scaled_dot_product_attention(q, k, v, is_causal=True)``). Through the kernel where :func:`applies`, else
    through PyTorch. The kernel's result is laid out as [B, T, H, D] (a transposed view), so merging the heads
    afterwards needs no copy."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if applies(q, k, v):
        return _CausalAttention.apply(q, k, v, scale)
    if k.shape[-2] == q.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if q.shape[-2] == 1:  # the last position sees every key: no mask
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    past = k.shape[-2] - q.shape[-2]
    q_pos = torch.arange(past, k.shape[-2], device=q.device).unsqueeze(1)
    mask = torch.arange(k.shape[-2], device=q.device).unsqueeze(0) <= q_pos  # bottom-right aligned
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
