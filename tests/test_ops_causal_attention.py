"""The causal-attention kernel against attention in fp32 (outputs and the three gradients, as close as PyTorch's
own bf16 kernel gets), over odd lengths, one token, several head sizes and transposed inputs; its fallbacks (fp32,
no kernel, turned off) equal ``scaled_dot_product_attention`` exactly; torch.compile keeps it in one graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

from sparselm.ops import causal_attention as module
from sparselm.ops.causal_attention import causal_attention

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the kernel"
)


def heads(batch: int, n_heads: int, length: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v as the model makes them: [B, H, T, D] views of [B, T, H, D] projections."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 3, n_heads, dim, generator=g)
    return [x[:, :, i].transpose(1, 2) for i in range(3)]


def attention_and_grads(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_the_kernel_works_where_the_cpu_has_bf16_instructions() -> None:
    """oneDNN's bf16 GEMM runs on CPUs with avx512_bf16 or AMX (every machine of this project so far but one)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        pytest.skip("no avx512_bf16 or amx_bf16 on this CPU")
    assert module.kernel_available(), module.unavailable_reason()


@pytest.mark.parametrize("shape", [(2, 3, 130, 64), (1, 2, 7, 16), (2, 2, 64, 32), (1, 1, 1, 8), (1, 2, 129, 24)])
def test_equals_fp32_attention_as_closely_as_pytorchs_bf16_kernel(shape) -> None:
    if not module.kernel_available():
        pytest.skip(module.unavailable_reason())
    q, k, v = heads(*shape)
    grad = torch.randn(shape[0], shape[1], shape[2], shape[3], generator=torch.Generator().manual_seed(1))
    want = attention_and_grads(sdpa, q, k, v, grad)
    bf16 = [t.bfloat16() for t in (q, k, v)]
    got = attention_and_grads(causal_attention, *bf16, grad)
    pytorch = attention_and_grads(sdpa, *bf16, grad)
    for name, g, p, w in zip(("output", "dq", "dk", "dv"), got, pytorch, want, strict=True):
        error, pytorch_error = (g - w).abs().max().item(), (p - w).abs().max().item()
        assert error <= 1.5 * pytorch_error + 0.01 * w.abs().max().item(), (name, error, pytorch_error)


@pytest.mark.parametrize(("queries", "keys"), [(5, 37), (64, 200), (1, 9), (70, 71)])
def test_more_keys_than_queries_attend_as_the_last_positions(queries: int, keys: int) -> None:
    """A prompt chunk after cached keys: query i sees keys 0 .. keys - queries + i. Without autograd through the
    kernel (as close to fp32 as PyTorch's bf16 attention over the same mask), except one query (a decoding step:
    PyTorch's, unmasked); with autograd recording through PyTorch, bit for bit the masked attention."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, queries, 32, generator=g)
    k, v = (torch.randn(2, 3, keys, 32, generator=g) for _ in range(2))
    past = keys - queries
    mask = torch.arange(keys).unsqueeze(0) <= torch.arange(past, keys).unsqueeze(1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.inference_mode():
        bf16 = [t.bfloat16() for t in (q, k, v)]
        pytorch = F.scaled_dot_product_attention(*bf16, attn_mask=mask).float()
        got = causal_attention(*bf16).float()
        assert module.applies(*bf16) == (module.kernel_available() and queries > 1)  # one query: PyTorch's
    error, pytorch_error = (got - want).abs().max().item(), (pytorch - want).abs().max().item()
    assert error <= 1.5 * pytorch_error + 0.01, (error, pytorch_error)
    q.requires_grad_()
    assert not module.applies(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert torch.equal(causal_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_many_prompt_lengths_do_not_grow_memory() -> None:
    """oneDNN keeps a compiled kernel per product shape: the forward's shapes are bucketed so that a server seeing
    every prompt length does not keep one per length (measured over these 400 lengths: +61 MB unbucketed, +35 MB
    with only the query rows fixed, +4 MB bucketed)."""
    if not module.kernel_available():
        pytest.skip(module.unavailable_reason())
    statm = Path("/proc/self/statm")
    if not statm.exists():
        pytest.skip("no /proc/self/statm to read the resident set from")

    def resident_mb() -> float:
        return int(statm.read_text().split()[1]) * 4096 / 2**20

    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        causal_attention(*(torch.randn(1, 2, 5, 64, generator=g).bfloat16() for _ in range(3)))
        before = resident_mb()
        for keys in range(20, 420):
            q = torch.randn(1, 2, 2 + keys % 37, 64, generator=g).bfloat16()
            k = torch.randn(1, 2, keys, 64, generator=g).bfloat16()
            causal_attention(q, k, k)
    assert resident_mb() - before < 20


def test_output_is_laid_out_for_merging_heads_and_threads_do_not_change_it() -> None:
    if not module.kernel_available():
        pytest.skip(module.unavailable_reason())
    q, k, v = (t.bfloat16() for t in heads(2, 4, 50, 16))
    out = causal_attention(q, k, v)
    assert out.shape == (2, 4, 50, 16) and out.transpose(1, 2).is_contiguous()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(causal_attention(q, k, v), out)
    finally:
        torch.set_num_threads(threads)
    contiguous = causal_attention(*(t.contiguous() for t in (q, k, v)))
    assert torch.equal(contiguous, out)


def test_what_the_kernel_does_not_take_goes_to_pytorch_unchanged() -> None:
    """fp32, an odd head size and mismatched shapes are scaled_dot_product_attention's, bit for bit."""
    q, k, v = heads(1, 2, 20, 16)
    assert torch.equal(causal_attention(q, k, v), sdpa(q, k, v))
    odd = [t.bfloat16() for t in heads(1, 2, 20, 15)]
    assert torch.equal(causal_attention(*odd), sdpa(*odd))
    q, k, v = (t.bfloat16() for t in (q, k, v))
    assert not module.applies(q, k[:, :, :10], v[:, :, :10])


def test_bad_arguments_to_the_op_are_named() -> None:
    if not module.kernel_available():
        pytest.skip(module.unavailable_reason())
    q, k, v = (t.bfloat16() for t in heads(1, 2, 8, 16))
    with pytest.raises(RuntimeError, match="q, k, v must be bf16"):
        torch.ops.sparselm_causal.forward(q.float(), k, v, 0.25)
    with pytest.raises(RuntimeError, match="head dimension must be even"):
        torch.ops.sparselm_causal.forward(*(t[..., :15] for t in (q, k, v)), 0.25)
    with pytest.raises(RuntimeError, match="share B, H and D"):
        torch.ops.sparselm_causal.forward(q, k[:, :1], v[:, :1], 0.25)
    with pytest.raises(RuntimeError, match="fewer keys than queries"):
        torch.ops.sparselm_causal.forward(q, k[:, :, :4], v[:, :, :4], 0.25)
    with pytest.raises(RuntimeError, match="k and v of one shape"):
        torch.ops.sparselm_causal.forward(q, k, v[:, :, :4], 0.25)


def test_compiled_it_stays_in_one_graph_and_gives_the_eager_result() -> None:
    if not module.kernel_available():
        pytest.skip(module.unavailable_reason())
    torch._dynamo.reset()
    q, k, v = (t.bfloat16() for t in heads(1, 2, 33, 16))
    grad = torch.randn(1, 2, 33, 16).bfloat16()
    explanation = torch._dynamo.explain(causal_attention)(q, k, v)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    eager = attention_and_grads(causal_attention, q, k, v, grad)
    compiled = attention_and_grads(torch.compile(causal_attention, backend="aot_eager"), q, k, v, grad)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)


def test_without_the_kernel_it_says_why_and_attends_through_pytorch(monkeypatch) -> None:
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found\nmore lines")

    q, k, v = (t.bfloat16() for t in heads(1, 2, 20, 16))
    try:
        module._load.cache_clear()
        monkeypatch.setattr(cpp_extension, "load", no_compiler)
        assert module.unavailable_reason() == (
            "the C++ kernel could not be built (Error building extension: c++: command not found)"
        )
        assert torch.equal(causal_attention(q, k, v), sdpa(q, k, v))
        monkeypatch.undo()
        module._load.cache_clear()
        monkeypatch.setenv("SPARSELM_CAUSAL_ATTENTION", "off")
        assert module.unavailable_reason() == "turned off by SPARSELM_CAUSAL_ATTENTION"
        assert torch.equal(causal_attention(q, k, v), sdpa(q, k, v))
    finally:
        monkeypatch.undo()
        module._load.cache_clear()
