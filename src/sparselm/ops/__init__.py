"""MoE kernels as ops, one per file (megablocks-style); ``model/moe.py`` composes them.

- ``permute``: sort a routing's assignments by expert, with an optional capacity (``permute.py``);
- ``dispatch`` / ``combine``: tokens to expert-sorted rows and back, as gathers where possible
  (``dispatch.py``, ``combine.py``);
- ``ExpertLoop``: the CPU expert FFN kernel, a custom autograd Function walking the experts (``expert_loop.py``),
  with its settings (``settings.py``), its thread groups (``thread_groups.py``), its recycled gradient memory
  (``grad_buffers.py``) and its rows padded for oneDNN (``row_alignment.py``);
- ``grouped_experts`` / ``grouped_matmul``: the same FFN through ``torch.nn.functional.grouped_mm`` (``grouped_mm.py``);
- ``padded_experts`` / ``prefer_padded``: the same FFN as batched matmuls over rows padded per expert, for inference
  with few rows per expert, and the rule for when it pays (``padded_experts.py``);
- ``linear`` / ``row_experts``: a linear layer and the expert FFN for a few rows (decoding) through C++ kernels
  that read each weight once, ``F.linear`` / the other kernels otherwise (``row_matmul.py``);
- ``causal_attention``: causal self-attention, forward and backward, through a C++ kernel for bf16 on CPU
  (``causal_attention.py``);
- ``linear_cross_entropy``: the output layer and the cross-entropy in row chunks, without the full fp32 logits
  (``linear_cross_entropy.py``).

Nothing here knows about modules or ranks: tensors in, tensors out.
"""

from sparselm.ops.combine import combine
from sparselm.ops.dispatch import dispatch
from sparselm.ops.expert_loop import ExpertLoop, default_expert_loop
from sparselm.ops.grad_buffers import GradBuffers
from sparselm.ops.grouped_mm import grouped_experts, grouped_matmul
from sparselm.ops.linear_cross_entropy import linear_cross_entropy
from sparselm.ops.padded_experts import padded_experts, prefer_padded
from sparselm.ops.permute import Permutation, permute
from sparselm.ops.row_matmul import linear, prefer_rows, row_experts
from sparselm.ops.settings import ExpertLoopSettings
from sparselm.ops.thread_groups import ExpertThreads, split_experts

__all__ = [
    "ExpertLoop",
    "ExpertLoopSettings",
    "ExpertThreads",
    "GradBuffers",
    "Permutation",
    "combine",
    "default_expert_loop",
    "dispatch",
    "grouped_experts",
    "grouped_matmul",
    "linear",
    "linear_cross_entropy",
    "padded_experts",
    "permute",
    "prefer_padded",
    "prefer_rows",
    "row_experts",
    "split_experts",
]
