"""Output layer + cross-entropy in row chunks: the loss and its gradients without the full fp32 logits.

The plain path, ``F.cross_entropy(F.linear(x, W).float(), targets)``, writes the logits, an fp32 copy of them and
their log-softmax, and in the backward a zero-filled gradient of the same size, the log-softmax gradient and its
cast back: at 4,096 tokens and a 32k vocabulary each of these is 0.26-0.52 GB, and on a CPU moving them costs about
as much as the output GEMMs' arithmetic. Here the rows are taken a chunk at a time: the chunk's logits are computed
into one reused buffer in the compute dtype, and small blocks of its rows (sized to stay in cache) are upcast to
fp32 for their log-sum-exp, loss and softmax, whose gradient is written back over the logits in place; the chunk's
input gradient and its share of the weight gradient follow at once. Gradients are computed in the forward (when
autograd will want them), so the backward only scales them by the incoming gradient: no logits are recomputed.

The math is the plain path's: logits in the compute dtype (bf16 under autocast) upcast to fp32, the mean over
targets != ``ignore_index``, ``d logits = (softmax - onehot) / n`` rounded to the compute dtype before the two GEMMs.
What differs are roundings: the weight gradient is summed over chunks in fp32 (each chunk's GEMM rounds once, instead
of one rounding for all rows), and the incoming gradient multiplies the results instead of ``d logits``.

On CPU the softmax part runs in ``linear_cross_entropy.cpp`` (three passes over each row of the chunk, in cache,
rows over the intra-op threads; exponentials by a polynomial within ~2 ulp of ``torch.exp``) where PyTorch's ops
take about ten passes over blocks of rows; compiled on first use (:mod:`sparselm.ops.extension`), PyTorch's ops
where it cannot be built or with ``SPARSELM_XENT_KERNEL=off``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from sparselm.ops.extension import build

# Logits elements per chunk (bf16: 128 MB): few chunks, since each adds one pass over the [V, d] fp32 weight gradient.
CHUNK_ELEMENTS = 1 << 26
# Logits elements upcast to fp32 at a time (4 MB): the softmax passes stay in cache.
BLOCK_ELEMENTS = 1 << 20
SOURCE = Path(__file__).with_name("linear_cross_entropy.cpp")


@functools.cache
def _load() -> str | None:
    """Build and load the softmax kernel once per process; None if loaded, else why it could not be."""
    return build("sparselm_linear_cross_entropy", SOURCE, "SPARSELM_XENT_KERNEL")


def kernel_available() -> bool:
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the softmax kernel is not in use, or None when it is."""
    return _load()


def _kernel_applies(logits: torch.Tensor) -> bool:
    return (
        logits.device.type == "cpu"
        and type(logits) is torch.Tensor
        and logits.dtype in (torch.float32, torch.bfloat16)
        and kernel_available()
    )


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``x @ weight.T`` against ``targets``: ``x`` [N, d], ``weight`` [V, d], ``targets`` [N]
    -> fp32 scalar. Under autocast the GEMMs run in the autocast dtype, as ``F.linear`` would; ``weight`` may be the
    fp32 master (its gradient is returned in its own dtype, accumulated in fp32)."""
    if x.dim() != 2 or weight.dim() != 2 or targets.shape != x.shape[:1] or x.shape[1] != weight.shape[1]:
        shapes = f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}"
        raise ValueError(f"expected x [N, d], weight [V, d], targets [N]; got {shapes}")
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    # Gradients are made in the forward, so only when autograd will ask for them (not under no_grad, in eval).
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, rows, grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk_rows, grad):
        cd = x.dtype
        n_rows, vocab = x.shape[0], weight.shape[0]
        want_dx, want_dw = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        want_grad = want_dx or want_dw
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(cd)
            valid = targets != ignore_index
            count = valid.sum()  # a tensor: no host sync, and values need not be known (sparselm plan's fake ranks)
            safe_targets = targets.masked_fill(~valid, 0).unsqueeze(1)
            # Each valid row's share of the mean (0 for ignored rows, whose gradient is zero).
            scale = valid.to(torch.float32) / count.clamp(min=1)
            row_loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
            dx = torch.empty_like(x) if want_dx else None
            dw = None
            logits = torch.empty(min(chunk_rows, n_rows), vocab, dtype=cd, device=x.device)
            use_kernel = _kernel_applies(logits)
            flat_targets = safe_targets.squeeze(1).contiguous() if use_kernel else None
            block = max(1, BLOCK_ELEMENTS // vocab)
            for start in range(0, n_rows, chunk_rows):
                stop = min(start + chunk_rows, n_rows)
                chunk = logits[: stop - start]
                torch.mm(x[start:stop], w.t(), out=chunk)
                if use_kernel:
                    part = slice(start, stop)
                    softmax_rows(chunk, flat_targets[part], scale[part], row_loss[part], want_grad)
                else:
                    for b in range(0, stop - start, block):
                        rows = slice(start + b, min(start + b + block, stop))
                        _softmax_block(chunk[b : b + block], safe_targets[rows], scale[rows], row_loss[rows], want_grad)
                if want_dx:
                    torch.mm(chunk, w, out=dx[start:stop])
                if want_dw:
                    dw = _accumulate(dw, chunk.t(), x[start:stop])
            loss = row_loss.masked_fill_(~valid, 0.0).sum(dtype=torch.float64).div(count).to(torch.float32)
        if dw is not None and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
        ctx.grads = (dx, dw)
        ctx.mark_non_differentiable(targets)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy computes its gradients once; backward ran a second time")
        dx, dw = ctx.grads
        ctx.grads = None  # handed over: autograd may adopt them as .grad without copying
        # Always scaled (by 1.0 in training: exact), never branched on the value, which would need a host sync.
        if dx is not None:
            dx.mul_(grad_loss.to(dx.dtype))
        if dw is not None:
            dw.mul_(grad_loss.to(dw.dtype))
        return dx, dw, None, None, None, None


def softmax_rows(logits, targets, scale, row_loss, want_grad: bool) -> None:
    """The C++ kernel's loss (and, with ``want_grad``, d logits over ``logits``) for rows of a [N, V] chunk with
    targets [N] int64 and each row's share of the mean ``scale`` [N] fp32: what ``_softmax_block`` computes."""
    torch.ops.sparselm_xent.softmax_rows(logits, targets, scale, row_loss, want_grad)


def _softmax_block(logits, targets, scale, row_loss, want_grad: bool) -> None:
    """Loss of a block of rows into ``row_loss``; with ``want_grad`` its logits are overwritten by d logits.
    One exp per logit: the shifted exponentials give both the log-sum-exp and the softmax."""
    lf = logits.float()  # a copy in bf16, the block itself in fp32 (then updated in place: the logits go anyway)
    lf.sub_(lf.amax(dim=-1, keepdim=True))
    target_logit = lf.gather(1, targets)
    total = lf.exp_().sum(dim=-1, keepdim=True)
    torch.sub(total.log(), target_logit, out=row_loss.unsqueeze(1))
    if not want_grad:
        return
    # d logits = (softmax - onehot) * scale: exp / total * scale, then -scale at the target.
    probs = lf.mul_(scale.unsqueeze(1) / total)
    probs.scatter_add_(1, targets, -scale.unsqueeze(1))
    if probs.data_ptr() != logits.data_ptr():
        logits.copy_(probs)


def _accumulate(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` in fp32 (``acc`` None: start the sum); a bf16 GEMM rounds its own result once."""
    if a.dtype == torch.float32:
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    part = torch.mm(a, b)
    return part.float() if acc is None else acc.add_(part)
