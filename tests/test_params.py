"""Analytic parameter/FLOP accounting: exact against the real model, and the paper presets against published sizes."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from sparselm.config import Config, config_from_dict, validate
from sparselm.errors import ConfigError
from sparselm.model.moe import MoE
from sparselm.model.transformer import Transformer
from sparselm.params.counting import count_params, flops_per_token
from sparselm.params.presets import PRESETS_DIR, list_presets, load_preset, report, run_params
from sparselm.params.published import PUBLISHED

# --- (1) exact agreement with Transformer.parameters() over every option ------------------------------------------

POSITIONS = ["rope", "relative", "xl", "absolute", "none"]
FFNS = ["swiglu", "gelu"]
NORMS = ["rmsnorm", "layernorm"]
MOE_VARIANTS = {
    "dense": {"num_experts": 0},
    "top1-every1": {"num_experts": 4, "top_k": 1, "moe_every": 1},
    "top2-every2": {"num_experts": 4, "top_k": 2, "moe_every": 2},
    "top1-every3": {"num_experts": 2, "top_k": 1, "moe_every": 3},  # only layer index 2 of 4 is MoE
    "shared-expert": {"num_experts": 3, "top_k": 2, "moe_every": 2, "shared_expert": True},
    "d_ff_expert": {"num_experts": 4, "top_k": 1, "moe_every": 2, "d_ff_expert": 40},
    "shared+d_ff_expert": {"num_experts": 4, "top_k": 2, "moe_every": 1, "shared_expert": True, "d_ff_expert": 12},
}


def tiny(position: str, ffn: str, norm: str, tie: bool, bias: bool, moe: dict) -> Config:
    cfg = config_from_dict(
        {
            "model": {
                "vocab_size": 50,
                "d_model": 16,
                "n_layers": 4,
                "n_heads": 2,
                "d_ff": 24,
                "max_seq_len": 32,
                "relative_buckets": 8,
                "position": position,
                "ffn": ffn,
                "norm": norm,
                "tie_embeddings": tie,
                "bias": bias,
            },
            "moe": moe,
            "data": {"seq_len": 16},
        }
    )
    validate(cfg)
    return cfg


GRID = list(itertools.product(POSITIONS, FFNS, NORMS, [True, False], [True, False], MOE_VARIANTS))


@pytest.mark.parametrize(("position", "ffn", "norm", "tie", "bias", "moe"), GRID)
def test_count_matches_model(position: str, ffn: str, norm: str, tie: bool, bias: bool, moe: str) -> None:
    cfg = tiny(position, ffn, norm, tie, bias, MOE_VARIANTS[moe])
    model = Transformer(cfg.model, cfg.moe)
    counts = count_params(cfg)

    total = sum(p.numel() for p in model.parameters())
    assert counts.total == total
    assert sum(counts.breakdown.values()) == total

    # Active = total minus the (E - k) experts a token does not use, taken from the model's own expert tensors.
    unused, experts, moe_layers = 0, 0, 0
    for block in model.layers:
        if isinstance(block.ffn, MoE):
            moe_layers += 1
            layer_experts = sum(p.numel() for p in block.ffn.experts.parameters())
            num = block.ffn.num_experts
            assert layer_experts % num == 0
            experts += layer_experts
            unused += layer_experts // num * (num - block.ffn.top_k)
    assert counts.n_moe_layers == moe_layers
    assert counts.experts == experts
    assert counts.active == total - unused

    embedding = model.tok_emb.weight.numel()
    embedding += model.pos_emb.weight.numel() if model.pos_emb is not None else 0
    embedding += model.lm_head.weight.numel() if model.lm_head is not None else 0
    assert counts.embedding == embedding
    assert counts.active_non_embedding == counts.active - embedding


def test_count_includes_qk_norm() -> None:
    cfg = tiny("rope", "swiglu", "rmsnorm", True, False, MOE_VARIANTS["shared+d_ff_expert"])
    cfg.model.qk_norm = True
    model = Transformer(cfg.model, cfg.moe)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def test_count_is_instant_for_trillion_parameter_configs() -> None:
    cfg = load_preset("switch-c")
    start = time.perf_counter()
    counts = count_params(cfg)
    flops_per_token(cfg)
    assert time.perf_counter() - start < 0.5
    assert counts.total > 1.5e12


# --- (2) presets against the published figures ----------------------------------------------------------------------

TOLERANCE_PCT = 3.0

# Documented exceptions: the reason, and the band our error must stay in (so a change to the preset or to the
# accounting that moves the number is caught, rather than the check being skipped). See docs/presets.md.
TOTAL_EXCEPTIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "switch-base": (
        "'7B' has one significant figure: the 12 MoE layers x 128 experts x 2*768*3072 alone are 7.25B (> 7B + 3%) "
        "and the encoder-decoder original counts 7.42B; ours is 7.39B, which still rounds to 7B",
        (5.0, 6.0),
    ),
    "glam-64b-64e": (
        "GLaM Table 4 is not reproducible by one architecture: the paper's stated architecture (GLU dense FFN, plain "
        "experts) gives 1.145T, and no reading of it reaches 1.2T within 3%",
        (-5.0, -4.0),
    ),
}
ACTIVE_EXCEPTIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "glam-64b-64e": (
        "96.6B activated is reproduced only if the experts are gated as well, which makes the total 1.69T; with "
        "the architecture that best matches the total, activated is 79.4B",
        (-18.5, -17.0),
    ),
}


def test_presets_and_published_cover_each_other() -> None:
    assert PRESETS_DIR.is_dir()
    names = list_presets()
    assert len(names) >= 17
    assert set(names) == set(PUBLISHED)
    for entry in PUBLISHED.values():
        assert entry["total"] > 0 and entry["source"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_published(name: str) -> None:
    cfg = load_preset(name)  # load_config validates
    validate(cfg)
    header = (PRESETS_DIR / f"{name}.toml").read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("# "), "every preset starts with a comment citing its source"

    d = report(cfg, name)
    published = PUBLISHED[name]
    assert d["published_total"] == published["total"]

    error = d["total_error_pct"]
    if name in TOTAL_EXCEPTIONS:
        reason, (low, high) = TOTAL_EXCEPTIONS[name]
        assert low <= error <= high, f"documented exception moved ({reason}): total error {error}%"
        assert published["note"], "a documented exception must be explained in PUBLISHED[name]['note']"
    else:
        assert abs(error) <= TOLERANCE_PCT, f"{name}: total {d['total_params']:,} is {error}% off the paper"

    if published["active"] is None:
        if not cfg.moe.enabled:
            assert d["active_params"] == d["total_params"]
        return
    error = d["active_error_pct"]
    if name in ACTIVE_EXCEPTIONS:
        reason, (low, high) = ACTIVE_EXCEPTIONS[name]
        assert low <= error <= high, f"documented exception moved ({reason}): active error {error}%"
        assert published["note"]
    else:
        assert abs(error) <= TOLERANCE_PCT, f"{name}: active {d['active_params']:,} is {error}% off the paper"


def test_switch_base_rounds_to_the_published_precision() -> None:
    total = count_params(load_preset("switch-base")).total
    assert round(total / 1e9) == 7


def test_glam_alternative_readings_are_as_documented() -> None:
    """The claims in the GLaM preset comment: gating the experts reproduces 96.6B active but not 1.2T, and even the
    largest reading of the stated architecture stays more than 3% short of 1.2T."""
    published = PUBLISHED["glam-64b-64e"]
    gated = count_params(load_preset("glam-64b-64e", ["model.ffn=swiglu", "model.d_ff=32768", "moe.d_ff_expert=0"]))
    assert abs(gated.active - published["active"]) / published["active"] < 0.001
    assert gated.total / published["total"] > 1.4

    largest = count_params(load_preset("glam-64b-64e", ["model.position=xl", "model.tie_embeddings=false"]))
    assert (published["total"] - largest.total) / published["total"] > TOLERANCE_PCT / 100

    # The dense FFN of width 1.5 * 32768 has exactly the parameters of GLaM's gated FFN of width 32768.
    cfg = load_preset("glam-64b-64e")
    assert 2 * cfg.model.d_model * cfg.model.d_ff == 3 * cfg.model.d_model * 32768


@pytest.mark.parametrize("name", [n for n in sorted(PUBLISHED) if n.startswith("gopher-")])
def test_gopher_is_13_l_d_squared_plus_vocab_d(name: str) -> None:
    m = load_preset(name).model
    L, d = m.n_layers, m.d_model
    extras = L * 2 * d + (2 * L + 1) * d  # u and v per layer, RMSNorm weights
    assert count_params(load_preset(name)).total == 13 * L * d * d + m.vocab_size * d + extras


def test_unknown_preset_names_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="gpt3-175b"):
        load_preset("gpt-5")


# --- (3) FLOPs --------------------------------------------------------------------------------------------------------


def test_flops_hand_computed() -> None:
    # V=100, d=16, L=2, GELU d_ff=32, tied, RoPE, no bias; layer 0 dense, layer 1 MoE with 4 experts, top-2; T=8.
    cfg = config_from_dict(
        {
            "model": {
                "vocab_size": 100,
                "d_model": 16,
                "n_layers": 2,
                "n_heads": 2,
                "d_ff": 32,
                "max_seq_len": 8,
                "ffn": "gelu",
                "position": "rope",
                "tie_embeddings": True,
                "bias": False,
            },
            "moe": {"num_experts": 4, "top_k": 2, "moe_every": 2},
            "data": {"seq_len": 8},
        }
    )
    validate(cfg)
    attention_weights = 2 * 4 * 16 * 16  # q/k/v/o in both layers: 2048
    dense_ffn = 2 * 16 * 32  # up + down: 1024
    active_experts = 2 * (2 * 16 * 32)  # two experts of the MoE layer: 2048
    lm_head = 100 * 16  # tied, but the output matmul still runs: 1600
    attention = 2 * 2 * 2 * 8 * 16  # 2 * 2 * L * T * d, full (non-causal) score matrix: 1024
    router = 2 * 4 * 16  # 128
    expected = 2 * (attention_weights + dense_ffn + active_experts) + 2 * lm_head + attention + router
    assert expected == 14592

    flops = flops_per_token(cfg)
    assert flops.forward == expected
    assert flops.inference == flops.forward
    assert flops.train == 3 * flops.forward
    assert sum(flops.breakdown.values()) == flops.forward
    assert flops.seq_len == 8
    assert flops_per_token(cfg, 4).forward == expected - 2 * 2 * 2 * 4 * 16
    assert flops.train_causal == 3 * (expected - attention // 2)  # MFU's numerator: half the score square


@pytest.mark.parametrize("name", ["gpt3-175b", "glam-64b-64e", "switch-c"])
def test_flops_follow_the_6n_convention(name: str) -> None:
    """forward ~= 2 x active non-embedding params + LM head + attention (biases, norms and the router are small)."""
    cfg = load_preset(name)
    m, counts, flops = cfg.model, count_params(cfg), flops_per_token(cfg)
    approx = 2 * counts.active_non_embedding + 2 * m.vocab_size * m.d_model + 4 * m.n_layers * flops.seq_len * m.d_model
    assert flops.forward == pytest.approx(approx, rel=0.01)
    assert flops.train == 3 * flops.forward


# --- (4) the `sparselm params` entry point -------------------------------------------------------------------------


def test_run_params_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_params("switch-c", None, [], list_only=False, as_json=True) == 0
    d = json.loads(capsys.readouterr().out)
    assert isinstance(d["total_params"], int) and isinstance(d["active_params"], int)
    assert d["name"] == "switch-c" and d["published_total"] == 1_571_000_000_000

    assert run_params(None, None, ["model.n_layers=2"], list_only=False, as_json=True) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total_params"] == count_params(config_from_dict({"model": {"n_layers": 2}})).total
    assert d["published_total"] is None


def test_run_params_text_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_params("gpt3-175b", None, [], list_only=False, as_json=False) == 0
    out = capsys.readouterr().out
    assert "174.6B" in out and "175.0B" in out

    assert run_params(None, None, [], list_only=True, as_json=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    assert any("1.57T" in line for line in lines)

    # An override that resizes the model drops the comparison with the paper instead of reporting a bogus error.
    assert run_params("gpt3-175b", None, ["model.n_layers=2"], list_only=False, as_json=True) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["published_total"] is None and d["total_error_pct"] is None


def test_run_params_rejects_preset_and_config_together() -> None:
    with pytest.raises(ConfigError, match="not both"):
        run_params("gpt3-175b", str(PRESETS_DIR / "gpt3-175b.toml"), [], list_only=False, as_json=False)
