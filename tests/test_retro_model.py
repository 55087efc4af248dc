"""RETRO model: causality of chunked cross-attention, shapes, retrieval off = the plain decoder, parameter counts."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparselm.config import Config, load_config
from sparselm.errors import ConfigError, InputError
from sparselm.model.moe import MoE
from sparselm.model.transformer import Transformer
from sparselm.params.counting import count_params, flops_per_token

M = 8  # chunk size in these tests


def retro_config(*overrides: str) -> Config:
    return load_config(
        None,
        [
            "model.vocab_size=97",
            "model.d_model=32",
            "model.n_layers=7",
            "model.n_heads=4",
            "model.d_ff=48",
            "model.max_seq_len=128",
            "data.seq_len=64",
            "retro.enabled=true",
            f"retro.chunk_size={M}",
            *overrides,
        ],
    )


def build(cfg: Config, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg.model, cfg.moe, cfg.retro).eval()


def random_neighbours(batch: int, length: int, k: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (batch, length // M, k, 2 * M), generator=g)


def test_cca_layers_follow_the_paper() -> None:
    cfg = retro_config("model.n_layers=12")
    model = build(cfg)
    assert [i for i, b in enumerate(model.layers) if b.cross is not None] == [5, 8, 11]  # layers 6, 9, 12 (1-based)
    assert cfg.retro.cca_layers(12) == [5, 8, 11]
    assert build(retro_config("retro.cca_start=2", "retro.cca_every=2")).retro_encoder is not None
    assert retro_config("retro.cca_start=2", "retro.cca_every=2").retro.cca_layers(7) == [1, 3, 5]


@pytest.mark.parametrize("length", [61, 64, 67])
@pytest.mark.parametrize("moe", [False, True])
def test_neighbours_of_chunk_u_are_invisible_before_its_last_token(length: int, moe: bool) -> None:
    """Changing the neighbours of chunk u changes no logit before position (u+1)m - 1 and does change that one."""
    extra = ["moe.num_experts=4", "moe.top_k=2", "retro.encoder_moe=true"] if moe else []
    model = build(retro_config(*extra))
    idx = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(3))
    neighbours = random_neighbours(2, length)
    base = model(idx, neighbours=neighbours).logits
    for u in range(length // M):
        changed = neighbours.clone()
        changed[:, u] = random_neighbours(2, length, seed=10 + u)[:, u]
        logits = model(idx, neighbours=changed).logits
        visible = (u + 1) * M - 1
        assert torch.equal(logits[:, :visible], base[:, :visible]), f"chunk {u} leaked before position {visible}"
        assert not torch.allclose(logits[:, visible], base[:, visible]), f"chunk {u} unused at position {visible}"


def test_first_chunk_minus_one_tokens_see_no_neighbours_and_future_tokens_change_nothing_earlier() -> None:
    model = build(retro_config())
    idx = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(4))
    neighbours = random_neighbours(1, 40)
    with_retrieval = model(idx, neighbours=neighbours).logits
    without = model(idx).logits
    assert torch.equal(with_retrieval[:, : M - 1], without[:, : M - 1])
    # The decoder stays causal: a later token changes nothing before it (through the encoder's H_u included).
    later = idx.clone()
    later[0, 20] = (later[0, 20] + 1) % 97
    assert torch.equal(model(later, neighbours=neighbours).logits[:, :20], with_retrieval[:, :20])


@pytest.mark.parametrize("length", [1, M - 1, M, 2 * M + 3, 5 * M - 1])
def test_shapes_for_lengths_that_are_not_a_multiple_of_m(length: int) -> None:
    model = build(retro_config("retro.encoder_d_model=16", "retro.encoder_heads=2", "retro.encoder_d_ff=24"))
    model.train()
    idx = torch.randint(0, 97, (3, length))
    neighbours = random_neighbours(3, length, k=3)
    out = model(idx, idx, neighbours=neighbours)  # with targets: the loss (no logits)
    out.loss.backward()
    with torch.no_grad():
        assert model(idx, neighbours=neighbours).logits.shape == (3, length, 97)
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("retro_encoder.")]
    if length >= M:  # the encoder is trained through every CCA layer
        assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)
    memory = model.retro_encoder(random_neighbours(3, length, k=3), torch.randn(3, length, 32), model.tok_emb)[0]
    assert memory.shape == (3 * (length // M), 3 * 2 * M, 16)


def test_bad_neighbours_are_clear_errors() -> None:
    model = build(retro_config())
    idx = torch.randint(0, 97, (1, 20))
    with pytest.raises(InputError, match="complete chunks"):
        model(idx, neighbours=random_neighbours(1, 40))
    plain_cfg = retro_config("retro.enabled=false")
    with pytest.raises(InputError, match="without retrieval layers"):
        build(plain_cfg)(idx, neighbours=random_neighbours(1, 20))
    with pytest.raises(InputError, match="KV cache"):
        model(idx, neighbours=random_neighbours(1, 20), cache=model.new_cache(1, 32))


def test_retrieval_off_is_the_plain_decoder_bit_for_bit() -> None:
    """RETRO-fitting's promise: the base weights in a RETRO model without neighbours give the base's logits."""
    for extra in ([], ["moe.num_experts=4", "moe.top_k=2"]):
        cfg = retro_config(*extra)
        base = build(retro_config(*extra, "retro.enabled=false"), seed=5)
        model = build(cfg, seed=6)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("retro_encoder.") or ".cross." in k for k in missing)
        idx = torch.randint(0, 97, (2, 50))
        assert torch.equal(model(idx).logits, base(idx).logits)
        cache = model.new_cache(2, 64)
        assert torch.equal(model(idx, cache=cache).logits, base(idx).logits)


def test_disabled_retro_is_todays_model() -> None:
    """Same parameter names, shapes and initial values as a Transformer built without a [retro] section."""
    cfg = retro_config("retro.enabled=false", "moe.num_experts=4")
    torch.manual_seed(0)
    today = Transformer(cfg.model, cfg.moe)
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.moe, cfg.retro)
    a, b = today.state_dict(), model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(block.cross is None for block in model.layers) and model.retro_encoder is None


def test_moe_in_decoder_and_encoder_reports_every_moe_layer() -> None:
    model = build(retro_config("moe.num_experts=4", "moe.top_k=2", "retro.encoder_moe=true")).train()
    idx = torch.randint(0, 97, (2, 32))
    out = model(idx, idx, neighbours=random_neighbours(2, 32))
    decoder_moe = sum(isinstance(b.ffn, MoE) for b in model.layers)
    encoder_moe = sum(isinstance(b.ffn, MoE) for b in model.retro_encoder.layers)
    assert (decoder_moe, encoder_moe) == (3, 1)
    assert len(out.moe_stats) == 4
    assert sum(int(s.tokens_per_expert.sum()) for s in out.moe_stats[3:]) == 2 * 4 * 2 * 2 * M * 2  # top-2
    assert len(model(idx, idx).moe_stats) == 3  # without retrieval the encoder does not run


GRID = list(itertools.product(["rmsnorm", "layernorm"], [True, False], [0, 16], [False, True], ["swiglu", "gelu"]))


@pytest.mark.parametrize(("norm", "bias", "d_enc", "encoder_moe", "ffn"), GRID)
def test_count_params_counts_retro(norm: str, bias: bool, d_enc: int, encoder_moe: bool, ffn: str) -> None:
    cfg = retro_config(
        f"model.norm={norm}",
        f"model.bias={str(bias).lower()}",
        f"model.ffn={ffn}",
        f"retro.encoder_d_model={d_enc}",
        "retro.encoder_heads=2",
        "moe.num_experts=4",
        "moe.shared_expert=true",
        f"retro.encoder_moe={str(encoder_moe).lower()}",
    )
    model = build(cfg)
    counts = count_params(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert sum(counts.breakdown.values()) == counts.total
    retro = sum(p.numel() for n, p in model.named_parameters() if n.startswith("retro_encoder.") or ".cross." in n)
    experts_in_encoder = sum(
        p.numel() for b in model.retro_encoder.layers if isinstance(b.ffn, MoE) for p in b.ffn.experts.parameters()
    )
    assert counts.breakdown["retro_cca"] + counts.breakdown["retro_encoder"] + experts_in_encoder == retro
    assert counts.n_moe_layers == sum(isinstance(m, MoE) for m in model.modules())
    flops = flops_per_token(cfg)
    assert flops.breakdown["retro_encoder"] > 0 and flops.breakdown["retro_cca"] > 0
    plain = flops_per_token(retro_config("retro.enabled=false", "moe.num_experts=4", "moe.shared_expert=true"))
    assert flops.forward > plain.forward


def test_retro_config_validation() -> None:
    with pytest.raises(ConfigError, match="retro.cca_start"):
        retro_config("retro.cca_start=9")
    with pytest.raises(ConfigError, match="encoder_moe"):
        retro_config("retro.encoder_moe=true")
    with pytest.raises(ConfigError, match="init_from"):
        retro_config("retro.freeze_base=true")
    with pytest.raises(ConfigError, match="compile"):
        retro_config("train.compile=true")
    with pytest.raises(ConfigError, match="divisible"):
        retro_config("retro.encoder_d_model=30", "retro.encoder_heads=4")
