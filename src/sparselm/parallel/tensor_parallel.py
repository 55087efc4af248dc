"""Megatron-style tensor parallelism with DTensor plans, applied to an unmodified ``Transformer``.

Per block: q/k/v projections column-parallel (each rank gets ``n_heads / tp`` whole heads; attention's
``unflatten(-1, (-1, head_dim))`` turns the local width into local heads), the output projection row-parallel, so
attention costs one all-reduce forward and one backward; the dense FFN the same (up/gate column-, down
row-parallel); MoE experts are split along their hidden width by :mod:`sparselm.parallel.expert_parallel`.
Embeddings, router and norms stay replicated.

Sequence parallel (Megatron-LM v3) additionally splits the residual stream and the norms along the sequence: the
all-reduce after each row-parallel layer becomes a reduce-scatter, and an all-gather precedes the next
column-parallel layer; norm activations take 1/tp of the memory.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from sparselm.model.layers import FeedForward
from sparselm.model.moe import MoE


def _ffn_plan(prefix: str, ffn: FeedForward, residual_out) -> dict:
    plan = {f"{prefix}.up": ColwiseParallel(), f"{prefix}.down": RowwiseParallel(output_layouts=residual_out)}
    if ffn.gate is not None:
        plan[f"{prefix}.gate"] = ColwiseParallel()
    return plan


def block_plan(block: nn.Module, sequence_parallel: bool) -> dict:
    """The parallelize_module plan of one transformer block."""
    # With sequence parallel the residual stream is Shard(1) (sequence); without, replicated.
    residual = Shard(1) if sequence_parallel else Replicate()
    plan: dict = {
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=residual),
    }
    # The block input enters attention (and the dense FFN) as one replicated DTensor: q, k and v (up and gate)
    # then add their partial input gradients as DTensors and reduce them once, as Megatron's fused QKV does,
    # instead of one all-reduce per projection. With sequence parallel it is gathered from the sequence shards
    # first (all-gather forward, reduce-scatter backward).
    plan["attn"] = PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),))
    if sequence_parallel:
        plan["attn_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
    if isinstance(block.ffn, MoE):
        if block.ffn.shared is not None:
            plan.update(_ffn_plan("ffn.shared", block.ffn.shared, Replicate()))
        if sequence_parallel:
            # The router sees every token of the micro-batch (as on one device), then the output is re-split.
            plan["ffn"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1), None),
                desired_input_layouts=(Replicate(), None),
                use_local_input=True,
                output_layouts=(Replicate(), None),
                desired_output_layouts=(Shard(1), None),
                use_local_output=True,
            )
    else:
        plan.update(_ffn_plan("ffn", block.ffn, residual))
        plan["ffn"] = PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),))
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Parallelize every block of ``model`` (a ``Transformer``) over ``tp_mesh`` in place."""
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan(block, sequence_parallel))
    if sequence_parallel:
        # Split the embeddings' output along the sequence before the first block, gather it back before the
        # final norm (which, with the tied output layer, then sees whole sequences as on one device).
        to_sequence = PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=True
        )
        parallelize_module(model.tok_emb, tp_mesh, to_sequence)
        if model.pos_emb is not None:
            parallelize_module(model.pos_emb, tp_mesh, to_sequence)
        parallelize_module(
            model.norm,
            tp_mesh,
            PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True),
        )
