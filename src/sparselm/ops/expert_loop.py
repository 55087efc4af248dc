"""The CPU expert kernel: all experts over rows sorted by expert, one expert at a time, in a custom autograd Function.

On CPU this is what ``grouped_mm`` does inside anyway (one GEMM per group), but walking the experts ourselves lets
the kernel do all of one expert's work while its weights and rows are in cache, and avoid the full-size copies whose
cost grows with the total parameter count: it casts fp32 master weights to the compute dtype one expert at a time,
writes the fp32 weight gradients in place into recycled memory (:mod:`sparselm.ops.grad_buffers`), recomputes the
activation in the backward instead of saving it, and folds the gate weights into the expert outputs. The experts
may be split over threads (:mod:`sparselm.ops.thread_groups`); the result is bitwise the serial loop's. In bf16 and
fp16 each expert's rows are padded to a multiple of a few rows (:mod:`sparselm.ops.row_alignment`), which keeps the
GEMM shapes oneDNN compiles kernels for few.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sparselm.ops.grad_buffers import GradBuffers
from sparselm.ops.row_alignment import AlignedRows, alignment_for
from sparselm.ops.settings import ExpertLoopSettings
from sparselm.ops.thread_groups import ExpertThreads


class ExpertLoop:
    """The loop kernel with its settings, worker threads and gradient buffers.

    ``loop(x, gates, counts, w_up, w_gate, w_down, b_up, b_down)``: ``x`` [M, d_in] rows sorted by expert in the
    compute dtype, ``gates`` [M] or None, ``counts`` [E] rows per expert, weights [E, d_in, f] / [E, f, d_in] (any
    float dtype: cast per expert), ``w_gate`` None for a GELU FFN, biases [E, f] / [E, d_in] or None ->
    [M, d_in] in the compute dtype. Copies of a module holding an op share it (it has no per-model state).
    """

    def __init__(self, settings: ExpertLoopSettings | None = None) -> None:
        self.settings = settings if settings is not None else ExpertLoopSettings()
        self.threads = ExpertThreads(self.settings)
        self.grad_buffers = GradBuffers(self.settings.reuse_grad_buffers)

    def __repr__(self) -> str:
        return f"ExpertLoop({self.settings})"

    def __deepcopy__(self, memo: dict) -> ExpertLoop:
        return self

    def __reduce__(self):
        return (ExpertLoop, (self.settings,))

    @torch.compiler.disable  # a data-dependent loop: torch.compile runs it eagerly behind a graph break
    def __call__(self, x, gates, counts, w_up, w_gate, w_down, b_up, b_down) -> torch.Tensor:
        return _ExpertLoopFunction.apply(self, x, gates, counts.tolist(), w_up, w_gate, w_down, b_up, b_down)


def _aligned(op: ExpertLoop, x: torch.Tensor, counts: list[int]) -> AlignedRows:
    """The padded layout for oneDNN's GEMMs (bf16/fp16 on CPU); under a dispatch mode (fake tensors, FLOP counting)
    nothing is compiled and the real rows are what counts."""
    through_onednn = x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
    padded = through_onednn and _get_current_dispatch_mode() is None
    return AlignedRows.of(counts, alignment_for(counts, op.settings.align_rows) if padded else 1, x.device)


@functools.cache
def default_expert_loop() -> ExpertLoop:
    """The process's loop kernel, its settings read from the environment once (see ``ExpertLoopSettings``)."""
    return ExpertLoop(ExpertLoopSettings.from_env())


class _ExpertLoopFunction(torch.autograd.Function):
    """Forward per expert e with rows r: ``u = x_r W_up[e] (+ b_up)``, ``g = x_r W_gate[e]``,
    ``y_r = gate_r * ((silu(g) * u) W_down[e] (+ b_down))`` (GELU: ``gelu(u)`` instead of ``silu(g) * u``).
    Saved: x, u, g (the pre-activations, in the compute dtype). The activation is recomputed in the backward: two
    cheap elementwise passes over rows that are in cache anyway, instead of two more [M, f] tensors in memory.
    Both passes run on the padded layout of ``_aligned`` (zero rows, zero gates), dropping the padding at the end.
    """

    @staticmethod
    def forward(ctx, op: ExpertLoop, x, gates, counts, w_up, w_gate, w_down, b_up, b_down):
        cd = x.dtype  # compute dtype; the weights may be fp32 masters (autocast) and are cast one expert at a time
        layout = _aligned(op, x, counts)
        x, gates, counts = layout.spread(x), layout.spread(gates), layout.counts
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

            op.threads.run(expert, counts)
        ctx.op = op
        ctx.layout = layout
        ctx.has_bias = (b_up is not None, b_down is not None)
        ctx.save_for_backward(x, gates, h_up, h_gate, w_up, w_gate, w_down, b_down)
        return layout.gather(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, gates, h_up, h_gate, w_up, w_gate, w_down, b_down = ctx.saved_tensors
        op: ExpertLoop = ctx.op
        need_x, need_gates = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        cd = x.dtype
        master = w_up.dtype
        direct = master == cd  # fp32 (or pure bf16) training: GEMMs write straight into the gradient buffers
        gated = w_gate is not None
        num_experts, _, f = w_up.shape
        with torch.autocast(x.device.type, enabled=False):
            dy = ctx.layout.spread(dy.to(cd))
            g_up = op.grad_buffers.get(w_up)
            g_gate = op.grad_buffers.get(w_gate) if gated else None
            g_down = op.grad_buffers.get(w_down)
            gb_up = torch.zeros(num_experts, f, dtype=master, device=x.device) if ctx.has_bias[0] else None
            gb_down = torch.zeros_like(b_down) if b_down is not None else None
            dx = torch.empty_like(x) if need_x else None
            dgates = torch.empty_like(gates) if gates is not None and need_gates else None
            gates_c = gates.to(cd).unsqueeze(-1) if gates is not None else None
            for e, n in enumerate(ctx.layout.counts):
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

            op.threads.run(expert, ctx.layout.counts)
        return None, ctx.layout.gather(dx), ctx.layout.gather(dgates), None, g_up, g_gate, g_down, gb_up, gb_down
