"""The few-row matmul kernels against PyTorch's matmuls (fp32 and bf16 rows and weights, sizes that are and are not
multiples of the kernel's 16 lanes and 256-column blocks, 1-9 rows, idle experts), thread counts, the dispatch rule
(only inference with few rows takes them), the model's decode through them, and their errors and fallback."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from sparselm.ops import causal_attention, linear, paged_attention, prefer_rows, row_matmul
from sparselm.ops.row_matmul import applies, expert_rows, linear_rows, row_experts, use_rows

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the kernels"
)
DTYPES = [torch.float32, torch.bfloat16]


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32 sums in another order; a bf16 result is the fp32 sum rounded once."""
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_the_kernels_build_here() -> None:
    assert row_matmul.kernel_available(), row_matmul.unavailable_reason()


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize(("rows", "d_in", "d_out"), [(1, 256, 768), (2, 37, 19), (3, 512, 300), (9, 16, 5)])
def test_linear_rows_equals_the_matmul(x_dtype, w_dtype, rows: int, d_in: int, d_out: int) -> None:
    g = torch.Generator().manual_seed(rows * d_in)
    x = torch.randn(rows, d_in, generator=g).to(x_dtype)
    w = torch.randn(d_out, d_in, generator=g).to(w_dtype)
    _close(linear_rows(x, w), x.float() @ w.float().T, x_dtype)


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize(("counts", "d_in", "d_out"), [([1, 0, 0, 1], 256, 384), ([0, 3, 0, 6, 1], 40, 300)])
def test_expert_rows_equals_each_experts_matmul(x_dtype, w_dtype, counts, d_in: int, d_out: int) -> None:
    g = torch.Generator().manual_seed(d_in)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), d_in, generator=g).to(x_dtype)
    w = torch.randn(len(counts), d_in, d_out, generator=g).to(w_dtype)
    ref = torch.cat([rows.float() @ w[e].float() for e, rows in enumerate(x.split(counts.tolist()))])
    _close(expert_rows(x, counts, w), ref, x_dtype)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_row_experts_equals_the_loop_kernel(kind: str, bias: bool) -> None:
    from sparselm.model.moe import Experts

    torch.manual_seed(0)
    experts = Experts(8, 32, 48, kind=kind, bias=bias)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    counts = torch.tensor([2, 0, 0, 1, 4, 0, 0, 1])
    x = torch.randn(int(counts.sum()), 32)
    gates = torch.rand(x.shape[0])
    weights = (experts.w_up, experts.w_gate, experts.w_down, experts.b_up, experts.b_down)
    with torch.no_grad():
        experts.impl = "loop"
        ref = experts(x, counts, gates)
        experts.impl = "auto"  # no grad, fp32 weights, 5 weight reads for 8 experts: the rows kernel
        assert experts.kernel_for(x, counts) == "rows"
        torch.testing.assert_close(experts(x, counts, gates), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(row_experts(x, gates, counts, *weights), ref, rtol=1e-5, atol=1e-5)


def test_threads_do_not_change_the_result() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 512, generator=g).bfloat16()
    w = torch.randn(1408, 512, generator=g).bfloat16()
    w3 = torch.randn(4, 512, 704, generator=g).bfloat16()
    counts = torch.tensor([1, 0, 1, 0])
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((linear_rows(x, w), expert_rows(x, counts, w3)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)  # each output is one task's sum, whatever the split


def test_only_inference_with_few_rows_takes_the_kernel() -> None:
    w = torch.nn.Parameter(torch.randn(16, 8))
    one, many = torch.randn(1, 8), torch.randn(5, 8)
    assert not use_rows(one, w, 1)  # autograd on: training never sees the kernel
    with torch.no_grad():
        assert use_rows(one, w, 1) and use_rows(one, w, 4)
        assert not use_rows(many, w, 5)  # more rows than LINEAR_MAX_ROWS: F.linear
        assert applies(many, w)
        assert not use_rows(one.bfloat16(), w, 1)  # F.linear refuses mixed dtypes; so does the rule
        assert not use_rows(one.to(torch.float16), w.to(torch.float16), 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not use_rows(one, w, 1)  # autocast decides the dtype: leave it to F.linear
        assert not applies(one.bfloat16(), w)
        y = linear(one.view(1, 1, 8), w, bias=torch.ones(16))
        torch.testing.assert_close(y, F.linear(one.view(1, 1, 8), w, torch.ones(16)), rtol=1e-5, atol=1e-5)
        assert y.shape == (1, 1, 16)


def test_the_experts_take_the_rows_kernel_while_it_reads_less_than_the_padded_one() -> None:
    assert prefer_rows([1, 0, 0, 1]) and prefer_rows([4, 4, 4, 4]) and prefer_rows([5, 0, 0, 0])  # 1, 4, 2 reads
    assert prefer_rows([2] * 16) and prefer_rows([5, 5, 5, 5, 0, 0, 0, 0])  # 16 reads for 16 experts, 8 for 8
    assert not prefer_rows([6] * 8)  # 16 reads for 8 experts: the padded kernel reads 8
    assert not prefer_rows([500, 0, 0, 0]) and not prefer_rows([0, 0])  # a prompt on one expert; no rows at all


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_models_decode_through_the_kernels_equals_pytorchs(monkeypatch, dtype) -> None:
    """Greedy generation and the logits of every decode step, with the kernels and with them turned off."""
    from sparselm.config import ModelConfig, MoEConfig
    from sparselm.model.generate import SamplingConfig, generate
    from sparselm.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64, tie_embeddings=False)
    model = Transformer(cfg, MoEConfig(num_experts=4, top_k=2, moe_every=2, d_ff_expert=32)).eval().to(dtype)
    prompt = [[5, 17, 3, 40, 2, 9]]
    sampling = SamplingConfig(max_new_tokens=12, greedy=True, stop_on_eod=False)
    calls = []
    real = torch.ops.sparselm_rows.linear_rows

    def counted(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(row_matmul, "linear_rows", lambda x, w: counted(x.contiguous(), w.contiguous()))
    fast = generate(model, prompt, sampling)
    assert calls and set(calls) == {1}  # every decode step's projections, FFN and output layer; never the prefill
    monkeypatch.setattr(row_matmul, "_load", lambda: "turned off for the test")
    assert generate(model, prompt, sampling) == fast
    with torch.inference_mode():
        cache_on, cache_off = model.new_cache(1, 32, dtype=dtype), model.new_cache(1, 32, dtype=dtype)
        monkeypatch.undo()
        on = [model(torch.tensor(prompt), cache=cache_on, last_only=True).logits]
        on += [model(torch.tensor([[t]]), cache=cache_on, last_only=True).logits for t in (4, 8, 15)]
        monkeypatch.setattr(row_matmul, "_load", lambda: "turned off for the test")
        off = [model(torch.tensor(prompt), cache=cache_off, last_only=True).logits]
        off += [model(torch.tensor([[t]]), cache=cache_off, last_only=True).logits for t in (4, 8, 15)]
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4 if dtype == torch.float32 else 3e-2, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_generate_command_decodes_through_the_kernels(monkeypatch, capsys, tiny_tokenizer, tmp_path, precision):
    """`sparselm generate --precision bf16` holds bf16 weights, as the server does, so its decode steps take the
    kernels (autocast over fp32 weights would bypass them); fp32 takes them in fp32."""
    from interop_models import random_model, tiny_config, write_checkpoint
    from sparselm.cli import main

    cfg = tiny_config(tiny_tokenizer.vocab_size)
    run = write_checkpoint(random_model(cfg), cfg, tiny_tokenizer.path, tmp_path / "run")
    dtypes = []
    real = row_matmul.linear_rows
    monkeypatch.setattr(row_matmul, "linear_rows", lambda x, w: dtypes.append(w.dtype) or real(x, w))
    argv = ["generate", "--ckpt", str(run), "--prompt", "The old man", "--greedy", "--max-new-tokens", "4"]
    assert main([*argv, "--precision", precision]) == 0
    assert capsys.readouterr().out.startswith("--- prompt: 'The old man'")
    assert dtypes and set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}


def test_argument_errors_are_clear() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="x has 8 features, the weight takes 6"):
        linear_rows(x, torch.randn(4, 6))
    with pytest.raises(RuntimeError, match="must be fp32 or bf16"):
        linear_rows(x.half(), torch.randn(4, 8).half())
    with pytest.raises(RuntimeError, match="counts add up to 3 rows; x has 2"):
        expert_rows(x, torch.tensor([1, 2]), torch.randn(2, 8, 4))
    with pytest.raises(RuntimeError, match="expert 1 has a negative row count"):
        expert_rows(x, torch.tensor([3, -1]), torch.randn(2, 8, 4))
    with pytest.raises(RuntimeError, match=r"counts must be int64 \[experts\] \(2 experts\)"):
        expert_rows(x, torch.tensor([1, 1, 0]), torch.randn(2, 8, 4))


def _engine_matmuls() -> str:
    from sparselm.config import ModelConfig
    from sparselm.model.transformer import Transformer
    from sparselm.serve.engine import Engine
    from sparselm.serve.params import EngineConfig

    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32))
    return Engine(model, tokenizer=None, config=EngineConfig(precision="bf16", block_size=4)).decode_matmuls


def test_where_the_kernels_cannot_be_built_pytorch_computes(monkeypatch) -> None:
    """A build failure or SPARSELM_ROW_MATMUL=off: every product through PyTorch, and the serving engine says why."""
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found\nmore lines")

    w = torch.randn(16, 8)
    paged_attention.kernel_available()  # built before the patch: the engine below asks for them too
    causal_attention.kernel_available()
    try:
        row_matmul._load.cache_clear()
        monkeypatch.setattr(cpp_extension, "load", no_compiler)
        assert row_matmul.unavailable_reason() == (
            "the C++ kernel could not be built (Error building extension: c++: command not found)"
        )
        with torch.no_grad():
            assert not use_rows(torch.randn(1, 8), w, 1)
            assert linear(torch.randn(1, 8), w).shape == (1, 16)
        with pytest.raises(RuntimeError, match="few-row matmul kernels are unavailable: the C"):
            linear_rows(torch.randn(1, 8), w)
        assert _engine_matmuls().startswith("PyTorch (the C++ kernel could not be built (Error building extension")
        monkeypatch.undo()
        row_matmul._load.cache_clear()
        monkeypatch.setenv("SPARSELM_ROW_MATMUL", "off")
        assert row_matmul.unavailable_reason() == "turned off by SPARSELM_ROW_MATMUL"
    finally:
        monkeypatch.undo()
        row_matmul._load.cache_clear()
    assert row_matmul.kernel_available()
    assert _engine_matmuls() == "sparselm few-row kernels"


def test_a_first_build_says_it_is_compiling(monkeypatch, capsys) -> None:
    """A load that takes longer than NOTICE_AFTER_S is a compile: one line on stderr; a quick (cached) load says
    nothing."""
    import time

    from torch.utils import cpp_extension

    from sparselm.ops import extension

    monkeypatch.setattr(extension, "NOTICE_AFTER_S", 0.05)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: time.sleep(0.5))
    assert extension.build("sparselm_test_op", row_matmul.SOURCE, "SPARSELM_TEST_OP") is None
    assert "sparselm: compiling the C++ op sparselm_test_op_" in capsys.readouterr().err
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: None)
    assert extension.build("sparselm_test_op", row_matmul.SOURCE, "SPARSELM_TEST_OP") is None
    time.sleep(0.1)
    assert capsys.readouterr().err == ""
