"""The serving engine (no HTTP): whatever the arrival pattern, chunking, preemption or prefix sharing, a greedy request
gets exactly what ``generate`` gives its prompt alone, and logprobs match a plain forward within 1e-4."""

from __future__ import annotations

import copy
import random
import shutil

import pytest
import torch

from sparselm.config import ModelConfig, MoEConfig
from sparselm.errors import InputError
from sparselm.model.generate import SamplingConfig, generate
from sparselm.model.transformer import Transformer
from sparselm.ops import paged_attention
from sparselm.serve.engine import ONE_THREAD_MAX_TOKENS, ONE_THREAD_MAX_WEIGHT_BYTES, Engine, threads_for_step
from sparselm.serve.kv_cache import BlockPool, block_hash
from sparselm.serve.params import EngineConfig, SamplingParams, parse_bytes
from sparselm.serve.sequence import Status, TextTracker

POSITIONS = ["rope", "relative", "xl", "absolute", "none"]
FFNS = {"dense": MoEConfig(), "moe": MoEConfig(num_experts=4, top_k=2, moe_every=1)}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread runs them fastest (two spin on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeTokenizer:
    """Token t reads as the letter chr(ord('a') + t % 26); eod is 2."""

    eod_id = 2

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + t % 26) for t in ids)

    def id_to_piece(self, token: int) -> str:
        return chr(ord("a") + token % 26)


def make_model(position: str = "rope", ffn: str = "moe", max_seq_len: int = 128, init_std: float = 0.5) -> Transformer:
    torch.manual_seed(0)
    # init_std 0.5 spreads a random model's logits: no near-ties that float noise between paths could flip.
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=max_seq_len,
        position=position,
        init_std=init_std,
    )
    return Transformer(cfg, copy.deepcopy(FFNS[ffn])).eval()


def random_prompts(count: int, seed: int, shared: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 64, (shared,), generator=g).tolist()
    lengths = torch.randint(1, 50, (count,), generator=g).tolist()
    return [(prefix if i % 2 else []) + torch.randint(3, 64, (n,), generator=g).tolist() for i, n in enumerate(lengths)]


def reference(model: Transformer, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    cfg = SamplingConfig(max_new_tokens=max_tokens, greedy=True, stop_on_eod=False)
    return [generate(model, [p], cfg)[0] for p in prompts]


def run_interleaved(engine: Engine, prompts, params, seed: int = 0):
    """Add the prompts a few at a time between steps (a random arrival pattern); run until all finish."""
    rng = random.Random(seed)
    pending = list(enumerate(prompts))
    seqs = []
    while pending or any(s.status is not Status.FINISHED for s in seqs):
        for _ in range(rng.randint(0, 2)):
            if pending:
                i, prompt = pending.pop(0)
                seqs.append(engine.add_request(str(i), prompt, params[i] if isinstance(params, list) else params))
        engine.step()
    return seqs


def check_logprobs(model: Transformer, seqs) -> float:
    """Largest difference between the engine's logprobs (chosen and top alternatives, prompt and output) and a plain
    full-sequence forward's log-softmax."""
    worst = 0.0
    for s in seqs:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([s.prompt + s.output])).logits[0].float(), dim=-1)
        p = len(s.prompt)
        for j, entry in enumerate(s.output_logprobs):
            assert entry.token == s.output[j]
            for token, value in [(entry.token, entry.logprob), *entry.top]:
                worst = max(worst, abs(value - lp[p - 1 + j, token].item()))
        if s.params.prompt_logprobs is not None:
            assert len(s.prompt_logprobs) == p and s.prompt_logprobs[0] is None
            for j, entry in enumerate(s.prompt_logprobs[1:], start=1):
                assert entry.token == s.prompt[j]
                worst = max(worst, abs(entry.logprob - lp[j - 1, entry.token].item()))
    return worst


@pytest.mark.parametrize("ffn", list(FFNS))
@pytest.mark.parametrize("position", POSITIONS)
def test_greedy_matches_generate_alone_for_any_arrival_pattern(position: str, ffn: str) -> None:
    model = make_model(position, ffn)
    prompts = random_prompts(14, seed=1, shared=37)
    expected = reference(model, prompts, 24)
    # A small pool (preemption), a small token budget (chunked prefill), shared prefixes (prefix-cache hits).
    config = EngineConfig(
        block_size=4, max_num_seqs=6, max_batched_tokens=24, kv_cache_memory=40 * 2048, precision="fp32"
    )
    engine = Engine(model, FakeTokenizer(), config)
    params = [
        SamplingParams(
            max_tokens=24, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2 if i % 4 == 0 else None
        )
        for i in range(len(prompts))
    ]
    seqs = run_interleaved(engine, prompts, params)
    assert [s.output for s in seqs] == expected
    assert engine.scheduler.counters.preemptions > 0
    assert engine.scheduler.counters.prefix_hits > 0
    assert engine.pool.num_free == engine.pool.num_blocks  # every block back in the pool
    assert check_logprobs(model, seqs) < 1e-4
    assert len({t for out in expected for t in out}) > 5  # not a model stuck on one token


def test_decode_batch_and_chunked_prefill_without_preemption() -> None:
    model = make_model("rope", "moe")
    prompts = random_prompts(10, seed=2)
    engine = Engine(model, FakeTokenizer(), EngineConfig(block_size=8, max_batched_tokens=16, precision="fp32"))
    seqs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [s.output for s in seqs] == reference(model, prompts, 12)
    assert engine.scheduler.counters.preemptions == 0
    # per-layer expert load: every token of every step was routed (top-2 of each MoE layer)
    load = engine.expert_load
    assert load.shape == (2, 4) and int(load.sum()) == 2 * 2 * (sum(map(len, prompts)) + 10 * 11)


def without_paged_kernel(monkeypatch) -> None:
    """Engines built after this attend through PyTorch's SDPA, as where the paged kernel cannot be built."""
    import sparselm.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "paged_kernel_refusal", lambda cfg, device: "turned off by the test")


@pytest.mark.parametrize("position", ["rope", "relative"])
def test_decoding_sequences_attend_unmasked_over_their_blocks_in_place_or_gathered(monkeypatch, position) -> None:
    """Without the paged kernel, a decoding sequence meets exactly its own keys with no mask, read in place when its
    blocks form one run and gathered otherwise (here: interleaved growth and shared prefix blocks); outputs and
    logprobs stay exact."""
    import sparselm.model.attention as attention
    from sparselm.serve.kv_cache import StepCache

    without_paged_kernel(monkeypatch)

    decode_masks, paths = [], []
    sdpa, keys = attention.F.scaled_dot_product_attention, StepCache.keys

    def spy_sdpa(q, k, v, attn_mask=None, **kwargs):
        if q.shape[2] == 1 and k.shape[2] > 1:
            decode_masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    def spy_keys(self, layer, group):
        paths.append(getattr(group, "first_block", "chunk") is None)
        return keys(self, layer, group)

    model = make_model(position, "moe")
    prompts = random_prompts(6, seed=9, shared=9)
    expected = reference(model, prompts, 10)
    engine = Engine(model, FakeTokenizer(), EngineConfig(block_size=4, max_batched_tokens=16, precision="fp32"))
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    with monkeypatch.context() as patch:
        patch.setattr(attention.F, "scaled_dot_product_attention", spy_sdpa)
        patch.setattr(StepCache, "keys", spy_keys)
        seqs = run_interleaved(engine, prompts, params, seed=3)
    assert [s.output for s in seqs] == expected
    assert check_logprobs(model, seqs) < 1e-4
    assert decode_masks and all(m is None for m in decode_masks) == (position == "rope")
    assert True in paths and False in paths  # both the gathered and the in-place reads ran


def test_finish_reasons_eod_and_context_limit() -> None:
    model = make_model("rope", "dense", max_seq_len=32)
    engine = Engine(model, FakeTokenizer(), EngineConfig(block_size=4, precision="fp32"))
    prompt = random_prompts(1, seed=3)[0][:20]
    expected = generate(model, [prompt], SamplingConfig(max_new_tokens=64, greedy=True), eod_id=2)[0]
    [seq] = engine.generate([prompt], SamplingParams(max_tokens=64, temperature=0))
    assert seq.output == expected
    assert seq.finish_reason == ("length" if len(prompt) + len(expected) == 32 else "stop")
    [full] = engine.generate([prompt], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    assert len(full.output) == 32 - len(prompt) and full.finish_reason == "length"
    with pytest.raises(InputError, match="32 tokens"):
        engine.add_request("x", list(range(3, 35)), SamplingParams())


def test_abort_frees_blocks_within_one_step() -> None:
    model = make_model()
    engine = Engine(model, FakeTokenizer(), EngineConfig(block_size=4, precision="fp32"))
    seqs = [
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
        for i, p in enumerate(random_prompts(3, 4))
    ]
    for _ in range(3):
        engine.step()
    assert engine.pool.num_used > 0
    engine.abort("r1")
    returned = engine.step()
    assert seqs[1].status is Status.FINISHED and seqs[1].finish_reason == "abort" and not seqs[1].blocks
    # the step's outputs: the abort and the two other sequences' new tokens
    assert sorted(o.request_id for o in returned) == ["r0", "r1", "r2"]
    aborted = next(o for o in returned if o.request_id == "r1")
    assert aborted.finished and aborted.finish_reason == "abort" and not aborted.new_tokens
    engine.abort("r0")
    engine.abort("r2")
    engine.step()
    assert engine.pool.num_used == 0 and not engine.has_work()


def test_num_sequences_counts_every_sequence_not_finished() -> None:
    """What the server's --max-queue limit reads: sequences in the inbox count before a step takes them in, and a
    finished or aborted one stops counting in the step that ends it."""
    engine = Engine(make_model(), FakeTokenizer(), EngineConfig(block_size=4, max_num_seqs=2, precision="fp32"))
    seqs = [
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=2 + 2 * i, ignore_eos=True))
        for i, p in enumerate(random_prompts(4, 5))
    ]
    assert engine.num_sequences == 4 and engine.num_waiting == 4 and not engine.scheduler.running
    engine.abort("r3")
    while engine.has_work():
        engine.step()
        assert engine.num_sequences == sum(s.status is not Status.FINISHED for s in seqs)
    assert engine.num_sequences == 0 and seqs[3].finish_reason == "abort" and len(seqs[2].output) == 6


def test_step_threads_setting_and_auto_rule() -> None:
    assert threads_for_step("auto", 1, 2) == 1 and threads_for_step("auto", ONE_THREAD_MAX_TOKENS, 4) == 1
    assert threads_for_step("auto", ONE_THREAD_MAX_TOKENS + 1, 4) == 4 and threads_for_step("3", 1, 2) == 3
    assert threads_for_step("auto", 1, 2, ONE_THREAD_MAX_WEIGHT_BYTES) == 1
    assert threads_for_step("auto", 1, 2, ONE_THREAD_MAX_WEIGHT_BYTES + 1) == 2  # a large model: both, always
    assert threads_for_step("1", 64, 2, 10 * ONE_THREAD_MAX_WEIGHT_BYTES) == 1
    for bad in ("0", "two", "-1"):
        with pytest.raises(InputError, match="step_threads must be auto or a whole number"):
            EngineConfig(step_threads=bad)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = make_model(max_seq_len=ONE_THREAD_MAX_TOKENS + 32)
        engine = Engine(model, FakeTokenizer(), EngineConfig(precision="fp32"))
        long = [3 + i % 60 for i in range(ONE_THREAD_MAX_TOKENS + 10)]  # its prefill step is not small: both threads
        used = []
        step = engine._step

        def watched() -> None:
            step()
            used.append(torch.get_num_threads())

        engine._step = watched
        seqs = engine.generate([long, long[:5]], SamplingParams(max_tokens=3, ignore_eos=True))
        assert used[0] == 2 and set(used[1:]) == {1}, used  # then two decoding sequences a step: one thread
        assert all(s.status is Status.FINISHED for s in seqs)
        assert torch.get_num_threads() == 2  # generate gives the process its threads back
    finally:
        torch.set_num_threads(before)


def test_seeded_sampling_does_not_depend_on_the_batch() -> None:
    model = make_model()
    prompts = random_prompts(6, seed=5)
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, top_p=0.95, seed=7, ignore_eos=True)
    alone = Engine(model, FakeTokenizer(), EngineConfig(precision="fp32")).generate([prompts[0]], sampled)[0].output
    batched = Engine(model, FakeTokenizer(), EngineConfig(precision="fp32")).generate(prompts, sampled)
    assert batched[0].output == alone
    other_seed = SamplingParams(max_tokens=10, temperature=0.9, seed=8, ignore_eos=True)
    assert (
        Engine(model, FakeTokenizer(), EngineConfig(precision="fp32")).generate([prompts[0]], other_seed)[0].output
        != alone
    )
    top1 = SamplingParams(max_tokens=10, temperature=1.0, top_k=1, ignore_eos=True)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    engine = Engine(model, FakeTokenizer(), EngineConfig(precision="fp32"))
    assert engine.generate([prompts[0]], top1)[0].output == engine.generate([prompts[0]], greedy)[0].output


def test_stop_strings_cut_the_text_and_end_the_sequence() -> None:
    model = make_model()
    tok = FakeTokenizer()
    prompt = random_prompts(1, seed=6)[0]
    engine = Engine(model, tok, EngineConfig(precision="fp32"))
    [free] = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    text = free.text
    stop = text[5:7]
    [cut] = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
    assert len(cut.output) < 20


def test_text_tracker_releases_only_stable_text() -> None:
    class Tok(FakeTokenizer):
        def decode(self, ids):  # token 99 is the first half of a character split over two tokens
            return super().decode([t for t in ids if t != 99]) + ("\ufffd" if ids and ids[-1] == 99 else "")

    plain = TextTracker(Tok(), [0, 1], stop=())
    assert plain.update([23], final=False)[1] == "x"
    assert plain.update([23, 99], final=False)[1] == ""  # half a character is held back
    assert plain.update([23, 99, 0], final=False)[1] == "a"

    tracker = TextTracker(Tok(), [0, 1], stop=("xyz",))  # a tail that could start "xyz" is held back
    released = []
    for ids in ([23], [23, 0], [23, 0, 23], [23, 0, 23, 24, 25]):
        text, delta, stopped = tracker.update(ids, final=False)
        released.append(delta)
    assert released == ["", "", "x", "a"]
    assert stopped and text == "xa"


def test_block_pool_prefix_cache_and_eviction_order() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    h0 = block_hash(b"", [1, 2])
    h1 = block_hash(h0, [3, 4])
    pool.commit(a[0], h0)
    pool.commit(a[1], h1)
    assert pool.allocate(3) is None and pool.num_free == 2  # nothing taken when short
    pool.release(a)
    assert pool.num_free == 4
    hit = pool.lookup([h0, h1, block_hash(h1, [5, 6])])
    assert hit == a and pool.num_free == 2 and pool.refs[a[0]] == 1
    pool.release(hit)
    # uncached free blocks go out first; then cached ones, the tail of a freed sequence before its head
    fresh = pool.allocate(2)
    assert set(fresh).isdisjoint(a)
    assert pool.allocate(1) == [a[1]] and h1 not in pool.cached and h0 in pool.cached
    assert BlockPool(2, prefix_caching=False).lookup([h0]) == []


def test_block_pool_without_runs_takes_blocks_in_eviction_order() -> None:
    """``keep_runs=False`` (the engine with the paged kernel): no claims, the block after a sequence's last one is
    not preferred, and cached blocks go out least recently freed first, whatever their place in the pool."""
    pool = BlockPool(6, keep_runs=False)
    a, b = pool.allocate(2), pool.allocate(2)
    assert (a, b) == ([0, 1], [2, 3]) and not pool.claims
    hashes = [block_hash(b"", [i]) for i in range(4)]
    for block, h in zip(a + b, hashes, strict=True):
        pool.commit(block, h)
    pool.release(b)  # freed first: evicted first (its tail before its head)
    pool.release(a)
    assert pool.allocate(2, after=5, room=10) == [4, 5]  # uncached blocks first
    assert pool.allocate(3, after=1, room=10) == [3, 2, 1] and not pool.claims
    assert hashes[0] in pool.cached and hashes[1] not in pool.cached


def test_block_pool_claims_keep_each_growing_sequence_in_one_run() -> None:
    pool = BlockPool(32)
    a = pool.allocate(2, room=8)
    b = pool.allocate(2, room=8)  # not right after a: a has claimed 0..7
    assert a == [0, 1] and b == [8, 9]
    a += pool.allocate(1, after=a[-1], room=6)
    b += pool.allocate(3, after=b[-1], room=6)
    assert a == [0, 1, 2] and b == [8, 9, 10, 11, 12]
    a += pool.allocate(6, after=a[-1])  # past its claim: 3..7, then a new run (8..15 are b's)
    assert a == [0, 1, 2, 3, 4, 5, 6, 7, 16]
    pool.release(a)
    assert pool.claims.keys() == {8} and all(pool.claim_of[i] == -1 for i in range(8)) and pool.claim_of[16] == -1
    # the first free block in eviction order (a's, uncached, head first) that starts a run of 4 unclaimed ones
    assert pool.allocate(3, room=4) == [0, 1, 2]
    # fragmented: no run of two free blocks, so the blocks come in eviction order
    small = BlockPool(4)
    held = [small.allocate(1, room=1), small.allocate(1, room=1), small.allocate(1, room=1)]
    small.release(held[1])
    assert small.allocate(2, room=2) == [1, 3] and small.num_free == 0


def test_sequences_growing_side_by_side_are_read_in_place(monkeypatch) -> None:
    """Sequences admitted together and decoding together each keep one run of blocks: no gathers (the SDPA path)."""
    from sparselm.serve.kv_cache import StepCache

    without_paged_kernel(monkeypatch)

    in_place = []
    keys = StepCache.keys

    def spy_keys(self, layer, group):
        if hasattr(group, "first_block"):
            in_place.append(group.first_block is not None)
        return keys(self, layer, group)

    model = make_model("rope", "moe")
    engine = Engine(model, FakeTokenizer(), EngineConfig(block_size=4, precision="fp32"))
    StepCache.keys = spy_keys
    try:
        engine.generate(random_prompts(8, seed=5), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    finally:
        StepCache.keys = keys
    assert len(in_place) > 8 * 2 * 20 and all(in_place)
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.pool.claims


def test_engine_config_errors() -> None:
    model = make_model(max_seq_len=128)
    with pytest.raises(InputError, match="one sequence of model.max_seq_len=128 needs 32"):
        Engine(model, FakeTokenizer(), EngineConfig(block_size=4, kv_cache_memory=1000, precision="fp32"))
    with pytest.raises(InputError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InputError, match="top_p"):
        SamplingParams(top_p=0)
    assert parse_bytes("2GiB") == 2 * 1024**3 and parse_bytes("1.5G") == 1_500_000_000
    with pytest.raises(InputError, match="size in bytes"):
        parse_bytes("lots")
    warnings = []
    capacity = MoEConfig(num_experts=4, top_k=1, moe_every=1, dropless=False, eval_capacity_factor=1.0)
    Engine(Transformer(model.cfg, capacity), FakeTokenizer(), EngineConfig(precision="fp32"), warn=warnings.append)
    assert warnings and "depends on what else is in its batch" in warnings[0]


@pytest.mark.parametrize("position", ["rope", "relative", "xl"])
def test_bf16_weights_with_an_fp32_or_a_bf16_kv_cache(position: str) -> None:
    """With bf16 weights on CPU, ``kv_cache_dtype = auto`` keeps the cache in bf16 where the paged kernel attends
    the decoding queries (rope) and in fp32 where PyTorch's attention does (relative, xl: it reads one query over
    fp32 keys faster). Attention casts the queries to the cache's dtype (xl: the keys to the queries', since its
    position term multiplies queries with weights); the paged kernel computes in fp32 whatever the cache holds.
    Through SDPA over a bf16 cache the logprobs are a plain bf16 forward's; where attention computes in fp32 (an fp32
    cache, T5's bias too, or the kernel) they lie between a bf16 forward and an fp32 forward of the same rounded
    weights: within 0.05 of one of them, while those two differ by 0.1-0.3 here."""
    for setting in ("auto", "bf16", "fp32"):
        model = make_model(position, init_std=0.1)  # 0.5 makes these random models chaotic in bf16
        rounded = copy.deepcopy(model).to(torch.bfloat16).float()
        config = EngineConfig(precision="bf16", kv_cache_dtype=setting, block_size=4, max_batched_tokens=16)
        engine = Engine(model, FakeTokenizer(), config)
        assert engine.paged_kernel == (position == "rope" and paged_attention.kernel_available())
        auto = torch.bfloat16 if engine.paged_kernel else torch.float32
        assert engine.kv.k.dtype == {"auto": auto, "bf16": torch.bfloat16, "fp32": torch.float32}[setting]
        assert model.tok_emb.weight.dtype == torch.bfloat16
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=1)
        seqs = engine.generate(random_prompts(4, 7), params)
        assert all(len(s.output) == 8 and len(s.output_logprobs) == 8 for s in seqs)
        bf16_forward, fp32_forward = check_logprobs(model, seqs), check_logprobs(rounded, seqs)
        sdpa_in_bf16 = engine.kv.k.dtype == torch.bfloat16 and not engine.paged_kernel
        assert (bf16_forward if sdpa_in_bf16 else min(bf16_forward, fp32_forward)) < 0.05


def test_prompt_chunks_attend_through_the_causal_kernel_after_cached_keys(monkeypatch) -> None:
    """bf16 weights and cache: each prompt chunk is a causal tail of its sequence's keys so far, which the model's
    attention computes through the causal-attention kernel (chunks of 16 tokens after earlier chunks, prefix-cache
    hits), with the logprobs PyTorch's masked attention gives the same engine (both round the probabilities to bf16)
    and a bf16 forward's within 0.05."""
    import sparselm.model.attention as attention_module
    from sparselm.ops import causal_attention as kernel_module

    if not kernel_module.kernel_available():
        pytest.skip(kernel_module.unavailable_reason())
    calls = []

    def counted(q, k, v):
        calls.append((q.shape[2], k.shape[2], kernel_module.applies(q, k, v)))
        return kernel_module.causal_attention(q, k, v)

    monkeypatch.setattr(attention_module, "causal_attention", counted)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    reuse = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
    prompts = random_prompts(6, 11, shared=20)
    logprobs = {}
    try:
        for kernel in (True, False):
            if not kernel:
                monkeypatch.setenv("SPARSELM_CAUSAL_ATTENTION", "off")
                kernel_module._load.cache_clear()
            calls.clear()
            model = make_model("rope", init_std=0.1)
            config = EngineConfig(precision="bf16", kv_cache_dtype="bf16", block_size=4, max_batched_tokens=16)
            engine = Engine(model, FakeTokenizer(), config)
            off = "PyTorch SDPA (turned off by SPARSELM_CAUSAL_ATTENTION)"
            assert engine.prompt_attention == ("sparselm causal kernel" if kernel else off)
            # Odd prompts share a prefix; they reuse cached blocks only without prompt logprobs (which need every
            # prompt position computed). The first of them runs alone, so that its blocks are cached for the others.
            per_request = [params if i % 2 == 0 else reuse for i in range(len(prompts))]
            seqs = engine.generate([prompts[1]], reuse) + run_interleaved(engine, prompts, per_request)
            assert check_logprobs(model, seqs) < 0.05
            logprobs[kernel] = [e.logprob for s in seqs for e in (s.prompt_logprobs or [None])[1:] + s.output_logprobs]
            assert engine.snapshot().prefix_hits > 0, "no prompt reused cached blocks"
            assert any(tk > tq for tq, tk, _ in calls) and all(tk >= tq for tq, tk, _ in calls)
            assert all(used == kernel for _, _, used in calls)
    finally:
        monkeypatch.delenv("SPARSELM_CAUSAL_ATTENTION", raising=False)
        kernel_module._load.cache_clear()
    assert max(abs(a - b) for a, b in zip(logprobs[True], logprobs[False], strict=True)) < 0.05


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("position", ["rope", "absolute", "none"])
def test_decoding_sequences_attend_through_the_paged_kernel(monkeypatch, position) -> None:
    """Where it builds, the paged kernel attends every decoding query of a step in one call per layer (PyTorch's
    attention then sees only prompt chunks), with interleaved arrivals, preemption and shared prefixes: greedy
    outputs stay generate's and logprobs a plain forward's within 1e-4."""
    import sparselm.model.attention as attention
    import sparselm.serve.kv_cache as kv_cache

    assert paged_attention.kernel_available(), paged_attention.unavailable_reason()
    kernel_calls, sdpa_queries = [], []
    kernel, sdpa = kv_cache.paged_decode_attention, attention.F.scaled_dot_product_attention

    def spy_kernel(q, k, v, tables, lengths, *args):
        kernel_calls.append(q.shape[0])
        return kernel(q, k, v, tables, lengths, *args)

    def spy_sdpa(q, *args, **kwargs):
        sdpa_queries.append(q.shape[2])
        return sdpa(q, *args, **kwargs)

    model = make_model(position, "moe")
    prompts = random_prompts(12, seed=4, shared=37)
    expected = reference(model, prompts, 16)
    config = EngineConfig(  # 40 blocks of 2,048 bytes: preemption
        block_size=4, max_num_seqs=6, max_batched_tokens=24, kv_cache_memory=40 * 2048, precision="fp32"
    )
    engine = Engine(model, FakeTokenizer(), config)
    assert engine.paged_kernel and engine.decode_attention == "sparselm paged kernel"
    monkeypatch.setattr(kv_cache, "paged_decode_attention", spy_kernel)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy_sdpa)
    seqs = run_interleaved(engine, prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2))
    assert [s.output for s in seqs] == expected
    assert check_logprobs(model, seqs) < 1e-4
    assert engine.scheduler.counters.preemptions > 0 and engine.scheduler.counters.prefix_hits > 0
    assert max(kernel_calls) > 1 and sum(kernel_calls) >= 2 * 12 * 15  # 2 layers, 15 decode steps per sequence
    assert 1 not in sdpa_queries  # no decoding query went through SDPA
