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


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 3 rows, so that chunks of 8 rows are cut into several blocks (the last one short)."""
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
