"""Expert rows padded to a multiple of a few rows for oneDNN (``sparselm.ops.row_alignment`` and its use by the loop
kernel): the layout itself, GEMMs that really see aligned row counts, and outputs and gradients that do not change
(the padding rows are zero and add exactly zero), gelu with biases included."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from expert_reference import as_args, expert_weights, params
from sparselm.errors import ConfigError
from sparselm.ops import ExpertLoop, ExpertLoopSettings
from sparselm.ops.row_alignment import AlignedRows, alignment_for

COUNTS = [0, 5, 32, 33, 0, 70, 1]
BIG_COUNTS = [0, 300, 290, 0, 411, 33]  # 258.5 rows per busy expert: padded to multiples of 16


def test_layout_rounds_each_expert_up_and_keeps_the_real_rows_in_order() -> None:
    layout = AlignedRows.of(COUNTS, 32)
    assert layout.counts == [0, 32, 32, 64, 0, 96, 32]
    assert layout.total == 256
    starts = [0, 0, 32, 64, 128, 128, 224]  # padded block starts
    want = [s + i for s, n in zip(starts, COUNTS, strict=True) for i in range(n)]
    assert layout.rows.tolist() == want
    x = torch.arange(sum(COUNTS) * 3, dtype=torch.float32).view(-1, 3) + 1
    padded = layout.spread(x)
    assert padded.shape == (256, 3)
    assert torch.equal(layout.gather(padded), x)
    assert int((padded != 0).any(-1).sum()) == sum(COUNTS)  # every other row is zero


def test_aligned_counts_need_no_layout() -> None:
    layout = AlignedRows.of([0, 32, 64], 32)
    assert layout.rows is None and layout.counts == [0, 32, 64]
    x = torch.randn(96, 4)
    assert layout.spread(x) is x and layout.gather(x) is x
    assert AlignedRows.of(COUNTS, 1).rows is None


def test_the_multiple_follows_the_mean_rows() -> None:
    assert alignment_for([31, 0, 20], 32) == 1  # a few rows: nothing to gain
    assert alignment_for([64] * 8, 32) == 4
    assert alignment_for([255, 0, 255], 32) == 8
    assert alignment_for(BIG_COUNTS, 32) == 16
    assert alignment_for([512, 512], 32) == 32
    assert alignment_for([4096] * 4, 32) == 32  # at most the setting
    assert alignment_for([4096] * 4, 48) == 32  # a power of two
    assert alignment_for([4096] * 4, 1) == 1
    assert alignment_for([0, 0], 32) == 1


def test_bad_multiples_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        AlignedRows.of(COUNTS, 0)
    with pytest.raises(ConfigError, match="align_rows"):
        ExpertLoopSettings(align_rows=0)


def _run(loop: ExpertLoop, kind: str, bias: bool, pure: bool):
    counts = torch.tensor(BIG_COUNTS)
    w = expert_weights(len(BIG_COUNTS), 32, 48, kind, bias)
    if pure:
        w = {k: None if v is None else torch.nn.Parameter(v.detach().to(torch.bfloat16)) for k, v in w.items()}
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(int(counts.sum()), 32, generator=gen).to(torch.bfloat16).requires_grad_()
    gates = torch.rand(int(counts.sum()), generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not pure):
        out = loop(x, gates, counts, *as_args(w))
    out.float().square().sum().backward()
    return [out.detach(), x.grad, gates.grad, *(p.grad for p in params(w))]


@pytest.mark.parametrize("pure", [False, True], ids=["autocast", "bf16-weights"])
@pytest.mark.parametrize(("kind", "bias"), [("swiglu", False), ("gelu", True)])
def test_padded_loop_equals_the_unpadded_one(kind: str, bias: bool, pure: bool) -> None:
    settings = ExpertLoopSettings(threads=1)
    unpadded = _run(ExpertLoop(dataclasses.replace(settings, align_rows=1)), kind, bias, pure)
    padded_loop = ExpertLoop(settings)
    with torch.profiler.profile(record_shapes=True) as prof:
        padded = _run(padded_loop, kind, bias, pure)
    gemm_rows = {
        dims
        for e in prof.events()
        if e.name in ("aten::mm", "aten::addmm_")
        for shape in e.input_shapes[:2]
        for dims in shape
    }
    # Every GEMM dimension is a model width (32, 48) or a row count padded to a multiple of 16.
    assert gemm_rows and all(n % 16 == 0 for n in gemm_rows), gemm_rows
    for a, b in zip(unpadded, padded, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(a.abs().max()))
    # Experts without rows still get exact zero gradients.
    for g in padded[3:]:
        assert not g[0].any() and not g[3].any()


def test_fp32_is_not_padded() -> None:
    """fp32 GEMMs do not go through oneDNN's per-shape kernels: nothing to gain, and fp32 stays bitwise."""
    with torch.profiler.profile(record_shapes=True) as prof:
        counts = torch.tensor(BIG_COUNTS)
        w = expert_weights(len(BIG_COUNTS), 32, 48)
        ExpertLoop(ExpertLoopSettings(threads=1))(torch.randn(int(counts.sum()), 32), None, counts, *as_args(w))
    rows = {e.input_shapes[0][0] for e in prof.events() if e.name == "aten::mm"}
    assert rows == {n for n in BIG_COUNTS if n}
