"""The paged decode-attention kernel against PyTorch's attention over the same keys, gathered (fp32 and bf16 pools,
scattered block tables, lengths that end inside a block, head sizes that are and are not multiples of the kernel's
16 lanes), thread counts, and its errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from sparselm.ops import causal_attention, paged_attention, row_matmul
from sparselm.ops.paged_attention import paged_decode_attention, paged_decode_attention_reference

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the kernel"
)


def case(seqs: int, heads: int, dim: int, block: int, num_blocks: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(heads, num_blocks, block, dim, generator=g).to(dtype)
    v = torch.randn(heads, num_blocks, block, dim, generator=g).to(dtype)
    q = torch.randn(seqs, heads, dim, generator=g)
    lengths = torch.randint(1, 6 * block, (seqs,), generator=g)
    lengths[0] = 1  # a sequence with one key
    width = int((lengths.max() + block - 1) // block)
    # every sequence's blocks in a random order of the pool; entries past a sequence's last block hold ids far
    # outside the pool, which the kernel must never read
    tables = torch.full((seqs, width), 10**9, dtype=torch.long)
    for s in range(seqs):
        used = int((lengths[s] + block - 1) // block)
        tables[s, :used] = torch.randperm(num_blocks, generator=g)[:used]
    return q, k, v, tables, lengths


def test_the_kernel_builds_here() -> None:
    assert paged_attention.kernel_available(), paged_attention.unavailable_reason()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "dim", "block"), [(4, 64, 16), (1, 24, 4), (3, 16, 5)])
def test_equals_attention_over_the_gathered_keys(dtype, heads: int, dim: int, block: int) -> None:
    q, k, v, tables, lengths = case(7, heads, dim, block, num_blocks=64, dtype=dtype)
    out = paged_decode_attention(q, k, v, tables, lengths)
    ref = paged_decode_attention_reference(q, k, v, tables, lengths)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # bf16 keys are widened exactly: fp32 both ways
    scaled = paged_decode_attention(q, k, v, tables, lengths, scale=0.3)
    torch.testing.assert_close(
        scaled, paged_decode_attention_reference(q, k, v, tables, lengths, 0.3), rtol=1e-5, atol=1e-5
    )


def test_one_key_returns_its_value_and_threads_do_not_change_the_result() -> None:
    q, k, v, tables, lengths = case(16, 4, 64, 16, num_blocks=128, dtype=torch.bfloat16, seed=3)
    out = paged_decode_attention(q, k, v, tables, lengths)
    first = tables[0, 0]
    torch.testing.assert_close(out[0], v[:, first, 0].float(), rtol=0, atol=0)  # one key: softmax weight exactly 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_decode_attention(q, k, v, tables, lengths)
        torch.set_num_threads(2)
        two = paged_decode_attention(q, k, v, tables, lengths)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, out)  # each (sequence, head) is computed by one thread


def test_bad_arguments_are_named() -> None:
    q, k, v, tables, lengths = case(2, 2, 16, 4, num_blocks=8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="pools must have q's heads"):
        paged_decode_attention(q[:, :1].contiguous(), k, v, tables, lengths)
    with pytest.raises(RuntimeError, match="bf16 or fp32"):
        paged_decode_attention(q, k.half(), v.half(), tables, lengths)
    with pytest.raises(RuntimeError, match="tables must be contiguous int64"):
        paged_decode_attention(q, k, v, tables.int(), lengths)
    with pytest.raises(RuntimeError, match="lengths must be"):
        paged_decode_attention(q, k, v, tables, lengths[:1])
    with pytest.raises(RuntimeError, match="sequence 1 has length 0"):
        paged_decode_attention(q, k, v, tables, torch.tensor([1, 0]))
    with pytest.raises(RuntimeError, match=f"has length {tables.shape[1] * 4 + 1}: its table holds"):
        paged_decode_attention(q, k, v, tables, torch.tensor([1, tables.shape[1] * 4 + 1]))
    bad = tables.clone()
    bad[0, 0] = 8
    with pytest.raises(RuntimeError, match="sequence 0 names block 8 of a pool of 8"):
        paged_decode_attention(q, k, v, bad, lengths)


def test_where_the_kernel_cannot_be_built_the_engine_says_why_and_keeps_sdpa(monkeypatch) -> None:
    """A build failure (no compiler, no ninja) or SPARSELM_PAGED_ATTENTION=off leaves the kernel out with the reason,
    and the engine then attends through SDPA over an fp32 cache (bf16 weights), as before the kernel existed."""
    from torch.utils import cpp_extension

    from sparselm.config import ModelConfig
    from sparselm.model.transformer import Transformer
    from sparselm.serve.engine import Engine
    from sparselm.serve.params import EngineConfig

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found\nmore lines")

    row_matmul.kernel_available()  # built before the patch: the engine below asks for them too
    causal_attention.kernel_available()
    try:
        paged_attention._load.cache_clear()
        monkeypatch.setattr(cpp_extension, "load", no_compiler)
        assert not paged_attention.kernel_available()
        assert paged_attention.unavailable_reason() == (
            "the C++ kernel could not be built (Error building extension: c++: command not found)"
        )
        with pytest.raises(RuntimeError, match="paged decode attention is unavailable: the C"):
            paged_decode_attention(*case(1, 1, 16, 4, num_blocks=2, dtype=torch.float32))
        model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32))
        engine = Engine(model, tokenizer=None, config=EngineConfig(precision="bf16", block_size=4))
        assert not engine.paged_kernel and engine.kv.k.dtype == torch.float32
        assert engine.decode_attention.startswith("PyTorch SDPA per sequence (the C++ kernel could not be built")
        monkeypatch.undo()
        paged_attention._load.cache_clear()
        monkeypatch.setenv("SPARSELM_PAGED_ATTENTION", "off")
        assert paged_attention.unavailable_reason() == "turned off by SPARSELM_PAGED_ATTENTION"
    finally:
        monkeypatch.undo()
        paged_attention._load.cache_clear()
    assert paged_attention.kernel_available()
