"""Chunked output layer + cross-entropy (``sparselm.ops.linear_cross_entropy``): the loss and the gradients of the
input and of the weight equal the plain ``F.cross_entropy(F.linear(x, W).float(), y)`` path, in fp32 and under bf16
autocast, across chunks and blocks, with ignored targets and an incoming gradient other than 1; no gradient work
without autograd; the model computes its training loss through it."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from sparselm.config import ModelConfig
from sparselm.model.transformer import Transformer
from sparselm.ops import linear_cross_entropy

N, D, V = 37, 16, 50
lce_module = importlib.import_module("sparselm.ops.linear_cross_entropy")  # the package exports the function


def _inputs(seed: int = 0, ignore: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    w = torch.randn(V, D, generator=gen) * 0.5
    y = torch.randint(0, V, (N,), generator=gen)
    if ignore:
        y[[0, 5, 6, 30]] = -100
    return x, w, y


def _plain(x, w, y, scale: float, bf16: bool):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(F.linear(x, w).float(), y, ignore_index=-100)
    (loss * scale).backward()
    return loss.detach(), x.grad, w.grad


def _chunked(x, w, y, scale: float, bf16: bool, chunk_rows: int):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = linear_cross_entropy(x, w, y, chunk_rows=chunk_rows)
    (loss * scale).backward()
    return loss.detach(), x.grad, w.grad


@pytest.fixture(params=["kernel", "pytorch"])
def small_blocks(request, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test twice: the softmax through the C++ kernel (where it builds), and through PyTorch's ops in blocks of
    3 rows, so that chunks of 8 rows are cut into several blocks (the last one short)."""
    if request.param == "kernel" and not lce_module.kernel_available():
        pytest.skip(lce_module.unavailable_reason())
    if request.param == "pytorch":
        monkeypatch.setattr(lce_module, "_kernel_applies", lambda logits: False)
    monkeypatch.setattr(lce_module, "BLOCK_ELEMENTS", 3 * V)


@pytest.mark.parametrize("chunk_rows", [8, N, 1000])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_fp32_equals_the_plain_path(small_blocks: None, chunk_rows: int, scale: float) -> None:
    x, w, y = _inputs()
    want = _plain(x, w, y, scale, bf16=False)
    got = _chunked(x, w, y, scale, bf16=False, chunk_rows=chunk_rows)
    assert got[0].dtype == torch.float32
    for name, a, b in zip(("loss", "x grad", "weight grad"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def _error(t: torch.Tensor, ref: torch.Tensor) -> float:
    return ((t.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("chunk_rows", [8, 1000])
def test_bf16_autocast_as_accurate_as_the_plain_path(small_blocks: None, chunk_rows: int) -> None:
    """Under autocast both paths round logits and their gradient to bf16: against float64 arithmetic on the same
    bf16-rounded inputs, the chunked results are as close as the plain path's."""
    x, w, y = _inputs(1)
    plain = _plain(x, w, y, 0.5, bf16=True)
    chunked = _chunked(x, w, y, 0.5, bf16=True, chunk_rows=chunk_rows)
    xd, wd = x.bfloat16().double().requires_grad_(), w.bfloat16().double().requires_grad_()
    ref_loss = F.cross_entropy(xd @ wd.t(), y, ignore_index=-100)
    (ref_loss * 0.5).backward()
    refs = (ref_loss.detach(), xd.grad, wd.grad)
    assert chunked[1].dtype == torch.float32 and chunked[2].dtype == torch.float32  # fp32 master, fp32 input
    for name, c, p, ref in zip(("loss", "x grad", "weight grad"), chunked, plain, refs, strict=True):
        assert _error(c, ref) <= 1.2 * _error(p, ref) + 1e-6, (name, _error(c, ref), _error(p, ref))
        assert _error(c, ref) < 1e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_kernel_equals_pytorchs_blocks(dtype) -> None:
    """Loss and d logits of rows longer than the kernel's 8 lanes with a tail, ignored rows (scale 0) included."""
    if not lce_module.kernel_available():
        pytest.skip(lce_module.unavailable_reason())
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 67, 1001
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    scale = torch.rand(rows, generator=gen)
    scale[[2, 40]] = 0.0
    got_logits, want_logits = logits.clone(), logits.clone()
    got_loss, want_loss = torch.empty(rows), torch.empty(rows)
    lce_module.softmax_rows(got_logits, targets, scale, got_loss, True)
    lce_module._softmax_block(want_logits, targets.unsqueeze(1), scale, want_loss, True)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-9)
    else:  # the same fp32 value rounded once: at most one bf16 step apart
        step = want_logits.float().abs() * 2**-7 + 1e-30
        assert ((got_logits.float() - want_logits.float()).abs() <= step).all()
    assert (got_logits[[2, 40]] == 0).all()
    loss_only = logits.clone()
    lce_module.softmax_rows(loss_only, targets, scale, got_loss, False)
    assert torch.equal(loss_only, logits)


def test_softmax_kernel_refuses_bad_arguments() -> None:
    if not lce_module.kernel_available():
        pytest.skip(lce_module.unavailable_reason())
    logits, loss, scale = torch.zeros(3, 10), torch.empty(3), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"a target is outside \[0, 10\)"):
        lce_module.softmax_rows(logits, torch.tensor([0, 10, 1]), scale, loss, True)
    with pytest.raises(RuntimeError, match="logits must be bf16 or fp32"):
        lce_module.softmax_rows(logits.double(), torch.tensor([0, 1, 1]), scale, loss, True)
    with pytest.raises(RuntimeError, match="targets must be N contiguous int64"):
        lce_module.softmax_rows(logits, torch.tensor([0, 1]), scale, loss, True)


def test_bf16_weight_gets_a_bf16_gradient() -> None:
    x, w, y = _inputs(2)
    xb, wb = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    linear_cross_entropy(xb, wb, y, chunk_rows=8).backward()
    assert xb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    _, gx, gw = _plain(x.bfloat16().float(), w.bfloat16().float(), y, 1.0, bf16=False)
    torch.testing.assert_close(wb.grad.float(), gw, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(xb.grad.float(), gx, rtol=2e-2, atol=1e-3)


def test_no_gradient_work_without_autograd_and_one_backward_only() -> None:
    x, w, y = _inputs(3)
    w.requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, y, chunk_rows=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.detach().t(), y, ignore_index=-100))
    loss = linear_cross_entropy(x, w, y, chunk_rows=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_all_targets_ignored_gives_nan_like_the_plain_path() -> None:
    x, w, _ = _inputs(4)
    y = torch.full((N,), -100)
    assert torch.isnan(linear_cross_entropy(x, w, y)) and torch.isnan(F.cross_entropy(x @ w.t(), y))


def test_bad_shapes_are_refused() -> None:
    x, w, y = _inputs(5)
    with pytest.raises(ValueError, match="expected x"):
        linear_cross_entropy(x, w.t(), y)


@pytest.mark.parametrize("tie", [True, False])
def test_model_loss_is_cross_entropy_of_its_logits(tie: bool) -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, tie_embeddings=tie)
    torch.manual_seed(0)
    model = Transformer(cfg)
    idx = torch.randint(0, 64, (2, 16))
    targets = torch.randint(0, 64, (2, 16))
    targets[0, :3] = -100
    out = model(idx, targets)
    assert out.logits is None  # the loss never materialises them
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits = model(idx).logits
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    want.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
