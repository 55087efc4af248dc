"""The CPU expert kernel (``sparselm.ops.ExpertLoop``): agreement with the expert FFN written from its definition
(outputs and every gradient, empty experts included), and bitwise equality of its thread-group split with the
serial loop (fp32 and bf16 autocast, under inference mode, and with fresh worker threads in a fresh process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expert_reference import as_args, check_against_textbook, expert_weights, params
from sparselm.ops import ExpertLoop, ExpertLoopSettings

COUNTS = torch.tensor([0, 30, 2, 0, 0, 9, 51, 1, 0, 17, 40, 0])  # uneven, with empty experts


@pytest.mark.parametrize("gated", [True, False], ids=["gates", "no-gates"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_loop_matches_the_textbook_experts(kind: str, bias: bool, gated: bool) -> None:
    loop = ExpertLoop(ExpertLoopSettings(threads=1))
    weight_grads = check_against_textbook(loop, COUNTS, 32, 48, kind, bias, gated, seed=1)
    # An expert without rows gets an exact zero gradient, not leftovers from recycled or uninitialised memory.
    for g in weight_grads:
        assert torch.equal(g[0], torch.zeros_like(g[0])) and torch.equal(g[11], torch.zeros_like(g[11]))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_experts_split_over_threads_equal_the_serial_loop_bitwise(kind: str, autocast: bool) -> None:
    """The loop kernel may run groups of experts on several threads at once (``ExpertLoopSettings.threads`` /
    intra-op threads): every expert writes only its own rows and gradient slices, and each GEMM runs
    single-threaded, so outputs and gradients are bitwise those of the serial loop on one thread."""

    def run(loop: ExpertLoop) -> list[torch.Tensor]:
        w = expert_weights(len(COUNTS), 32, 48, kind, bias=kind == "gelu")
        gen = torch.Generator().manual_seed(1)
        rows = torch.randn(int(COUNTS.sum()), 32, generator=gen, requires_grad=True)
        gates = torch.rand(int(COUNTS.sum()), generator=gen, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = loop(rows.to(torch.bfloat16 if autocast else torch.float32), gates, COUNTS, *as_args(w))
        out.float().square().sum().backward()
        return [out.detach(), rows.grad, gates.grad, *(p.grad for p in params(w))]

    intra = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = run(ExpertLoop(ExpertLoopSettings(threads=1)))
        torch.set_num_threads(2)
        for threads in (2, 3):
            split = ExpertLoop(ExpertLoopSettings(threads=threads))
            for a, b in zip(serial, run(split), strict=True):
                assert torch.equal(a, b)
            assert split.threads.workers == threads - 1  # really split
    finally:
        torch.set_num_threads(intra)


def test_experts_split_over_threads_under_inference_mode() -> None:
    """Inference mode is per thread; the worker threads must run under it too (generation uses it)."""
    counts = torch.tensor([30, 22, 0, 41, 25, 18, 27, 33, 19, 24, 26, 31, 20, 28, 29, 27])  # 16 experts, 400 rows
    w = expert_weights(len(counts), 32, 48)
    x = torch.randn(int(counts.sum()), 32)
    gates = torch.rand(int(counts.sum()))
    intra = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            serial = ExpertLoop(ExpertLoopSettings(threads=1))(x, gates, counts, *as_args(w))
        torch.set_num_threads(2)
        split_loop = ExpertLoop(ExpertLoopSettings(threads=2))
        with torch.inference_mode():
            split = split_loop(x, gates, counts, *as_args(w))
    finally:
        torch.set_num_threads(intra)
    assert split_loop.threads.workers == 1
    assert torch.equal(serial, split)


def test_fresh_worker_threads_compute_single_threaded() -> None:
    """A pool thread starts with OpenMP's default thread count, not the caller's: unless it sets its own, its
    GEMMs fan out over every core and the split differs from the serial loop in the last bit. A fresh process, so
    that the worker threads are new and nothing earlier in this session has touched their thread count."""
    script = """
import sys, torch
from sparselm.config import MoEConfig
from sparselm.model.moe import MoE
from sparselm.ops import ExpertLoop, ExpertLoopSettings
torch.manual_seed(0)
moe = MoE(32, 48, MoEConfig(num_experts=16, top_k=2, router_init_std=1.0))
with torch.no_grad():
    for p in moe.experts.parameters():
        p.normal_(std=0.2)
x = torch.randn(200, 32)
out = []
for expert_threads, intra in ((1, 1), (2, 2)):
    torch.set_num_threads(intra)
    moe.experts.loop = ExpertLoop(ExpertLoopSettings(threads=expert_threads))
    moe.experts.impl = "loop"  # inference would pick the padded kernel
    with torch.inference_mode():
        out.append(moe(x)[0])
sys.exit(0 if torch.equal(*out) and moe.experts.loop.threads.workers == 1 else 1)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0
