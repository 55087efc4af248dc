"""Analytic parameter and FLOP accounting from a ``Config``: no model is built, so a 1.6T-parameter config is instant.

The counts mirror ``sparselm.model`` exactly (``tests/test_params.py`` checks them against ``Transformer.parameters()``
for every option), so a change to the model that adds or removes parameters must be reflected here.

Vocabulary used throughout:
- *embedding* parameters are the vocabulary and position tables: token embedding, learned absolute position
  embedding and, when embeddings are untied, the LM head. The T5 relative-bias table is not an embedding (it is a
  few thousand scalars added to attention scores) and counts as non-embedding.
- *active* parameters are those a single token touches: every non-MoE parameter, the router, the shared expert and
  ``top_k`` of the ``num_experts`` routed experts in each MoE layer. Embeddings are included in ``active``;
  ``active_non_embedding`` leaves them out (the Kaplan et al. convention for scaling laws).

FLOP convention (PaLM appendix B / Chinchilla appendix F), per token:
- each matmul weight costs 2 FLOPs per token forward (multiply + add); biases, norms and activations are ignored;
- the LM head matmul (``vocab x d_model``) is counted even when it reuses the token embedding, while the embedding
  lookup itself is free;
- attention scores and the weighted sum of values cost ``2 * 2 * n_layers * seq_len * d_model``: the *full*
  ``seq_len x seq_len`` score matrix, with no halving for the causal mask. This is what PaLM's ``6N + 12 L H Q T``
  and Chinchilla's table assume, so MFU figures stay comparable with published ones, at the price of overstating
  the attention work a causal kernel really does by up to 2x;
- the router adds ``2 * num_experts * d_model`` per MoE layer;
- training is 3x the forward (backward = 2x forward: gradients for activations and for weights).
Transformer-XL attention (``position = "xl"``) is counted like the convention does for Gopher/Chinchilla: ``w_rel``
is one more d x d matmul per token (it projects about ``seq_len`` distance embeddings per sequence), and the extra
``(q + v) . R`` score term is left out.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparselm.config import Config, ConfigError, load_config

# Presets are TOML files in the source repository (they are documentation as much as configuration), so they are
# resolved relative to this file rather than shipped as package data.
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"


@dataclass
class ParamCount:
    total: int
    active: int  # parameters used per token, embeddings included
    active_non_embedding: int
    embedding: int  # token embedding + absolute position embedding + untied LM head
    non_embedding: int
    experts: int  # all routed-expert parameters (weights and biases), every MoE layer
    active_experts: int  # the top_k routed experts per MoE layer
    n_moe_layers: int
    params_per_expert: int
    breakdown: dict[str, int] = field(default_factory=dict)  # component -> parameters; sums to ``total``
    matmul_active_non_embedding: int = 0  # matmul weights a token multiplies by, router and LM head excluded


@dataclass
class FlopCount:
    forward: int  # per token
    train: int  # per token, forward + backward = 3x forward
    inference: int  # per token, = forward (no KV-cache discount: a full forward over seq_len tokens)
    seq_len: int
    breakdown: dict[str, int] = field(default_factory=dict)  # forward FLOPs per component; sums to ``forward``


def ffn_params(d_model: int, d_ff: int, kind: str, bias: bool) -> tuple[int, int]:
    """Dense ``FeedForward``: (matmul weights, biases). SwiGLU has up/gate/down, GELU up/down; every Linear biased."""
    matrices = 3 if kind == "swiglu" else 2
    biases = ((matrices - 1) * d_ff + d_model) if bias else 0
    return matrices * d_model * d_ff, biases


def _expert_params(d_model: int, d_ff: int, kind: str, bias: bool) -> tuple[int, int]:
    """One routed expert of ``Experts``: (matmul weights, biases). Only b_up and b_down exist, never a gate bias."""
    matrices = 3 if kind == "swiglu" else 2
    return matrices * d_model * d_ff, (d_ff + d_model) if bias else 0


def moe_placement(n_layers: int, moe_every: int) -> list[int]:
    """0-based indices of the layers an MoE at ``moe_every`` takes: ``(i + 1) % moe_every == 0`` (as in the model)."""
    return [i for i in range(n_layers) if (i + 1) % moe_every == 0]


def moe_layer_indices(cfg: Config) -> list[int]:
    """0-based indices of the MoE layers of ``cfg`` (none for a dense model)."""
    return moe_placement(cfg.model.n_layers, cfg.moe.moe_every) if cfg.moe.enabled else []


def count_params(cfg: Config) -> ParamCount:
    """Exact parameter counts of ``Transformer(cfg.model, cfg.moe)`` from the config alone."""
    m, e = cfg.model, cfg.moe
    d, n_layers = m.d_model, m.n_layers
    n_moe = len(moe_layer_indices(cfg))
    n_dense = n_layers - n_moe

    norm = d * (2 if (m.norm == "layernorm" and m.bias) else 1)  # RMSNorm never has a bias
    attn_matmul = 4 * d * d + (d * d if m.position == "xl" else 0)  # q/k/v/o, plus w_rel for Transformer-XL
    attn_other = (4 * d if m.bias else 0) + (2 * d if m.position == "xl" else 0)  # biases; u and v (H x head_dim)
    ffn_matmul, ffn_bias = ffn_params(d, m.d_ff, m.ffn, m.bias)

    d_ff_expert = e.d_ff_expert or m.d_ff
    expert_matmul, expert_bias = _expert_params(d, d_ff_expert, m.ffn, m.bias) if n_moe else (0, 0)
    per_expert = expert_matmul + expert_bias
    router = e.num_experts * d if n_moe else 0
    shared_matmul, shared_bias = ffn_params(d, d_ff_expert, m.ffn, m.bias) if (n_moe and e.shared_expert) else (0, 0)

    breakdown = {
        "token_embedding": m.vocab_size * d,
        "position_embedding": m.max_seq_len * d if m.position == "absolute" else 0,
        "relative_bias": m.relative_buckets * m.n_heads if m.position == "relative" else 0,
        "attention": n_layers * (attn_matmul + attn_other),
        "norms": (2 * n_layers + 1) * norm,
        "dense_ffn": n_dense * (ffn_matmul + ffn_bias),
        "router": n_moe * router,
        "experts": n_moe * e.num_experts * per_expert,
        "shared_experts": n_moe * (shared_matmul + shared_bias),
        "lm_head": 0 if m.tie_embeddings else m.vocab_size * d,
    }
    total = sum(breakdown.values())
    embedding = breakdown["token_embedding"] + breakdown["position_embedding"] + breakdown["lm_head"]
    active_experts = n_moe * e.top_k * per_expert
    active = total - breakdown["experts"] + active_experts
    matmul = n_layers * attn_matmul + n_dense * ffn_matmul + n_moe * (e.top_k * expert_matmul + shared_matmul)
    return ParamCount(
        total=total,
        active=active,
        active_non_embedding=active - embedding,
        embedding=embedding,
        non_embedding=total - embedding,
        experts=breakdown["experts"],
        active_experts=active_experts,
        n_moe_layers=n_moe,
        params_per_expert=per_expert,
        breakdown=breakdown,
        matmul_active_non_embedding=matmul,
    )


def flops_per_token(cfg: Config, seq_len: int | None = None) -> FlopCount:
    """Forward/train/inference FLOPs per token at context ``seq_len`` (default ``cfg.data.seq_len``).

    See the module docstring for the convention (PaLM/Chinchilla: 2 FLOPs per matmul weight, full non-causal
    attention ``4 * n_layers * seq_len * d_model``, LM head counted, embedding lookup free, train = 3x forward).
    """
    seq_len = cfg.data.seq_len if seq_len is None else seq_len
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    m = cfg.model
    counts = count_params(cfg)
    breakdown = {
        "matmul": 2 * counts.matmul_active_non_embedding,
        "lm_head": 2 * m.vocab_size * m.d_model,
        "attention": 2 * 2 * m.n_layers * seq_len * m.d_model,
        "router": 2 * counts.breakdown["router"],
    }
    forward = sum(breakdown.values())
    return FlopCount(forward=forward, train=3 * forward, inference=forward, seq_len=seq_len, breakdown=breakdown)


def mfu(tokens_per_sec: float, flops_per_token_train: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak, a fraction in [0, 1] when sane."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return tokens_per_sec * flops_per_token_train / peak_flops


# Published sizes of the paper models in configs/presets/. ``active`` is None where the source gives no activated
# count (dense models: active == total by construction). ``note`` says what our preset reproduces and what it does
# not; docs/presets.md has the full table and tests/test_params.py enforces it.
PUBLISHED: dict[str, dict[str, Any]] = {
    "gpt3-175b": {
        "total": 175_000_000_000,
        "active": None,
        "source": "Brown et al. 2020 (GPT-3), Table 2.1",
        "note": "",
    },
    "gopher-44m": {
        "total": 44_000_000,
        "active": None,
        "source": "Rae et al. 2021 (Gopher), Table 1",
        "note": "",
    },
    "gopher-117m": {
        "total": 117_000_000,
        "active": None,
        "source": "Rae et al. 2021 (Gopher), Table 1",
        "note": "",
    },
    "gopher-417m": {
        "total": 417_000_000,
        "active": None,
        "source": "Rae et al. 2021 (Gopher), Table 1",
        "note": "",
    },
    "gopher-1.4b": {
        "total": 1_400_000_000,
        "active": None,
        "source": "Rae et al. 2021 (Gopher), Table 1",
        "note": "",
    },
    "gopher-7.1b": {
        "total": 7_100_000_000,
        "active": None,
        "source": "Rae et al. 2021 (Gopher), Table 1",
        "note": "",
    },
    "gopher-280b": {
        "total": 280_000_000_000,
        "active": None,
        "source": "Rae et al. 2021 (Gopher), Table 1",
        "note": "",
    },
    "turing-nlg-17b": {
        "total": 17_000_000_000,
        "active": None,
        "source": "Microsoft Research blog, Turing-NLG: A 17-billion-parameter language model (Feb 2020)",
        "note": "context length not stated in the source; 1024 assumed (<0.03% of the count)",
    },
    "mt-nlg-530b": {
        "total": 530_000_000_000,
        "active": None,
        "source": "Smith et al. 2022 (Megatron-Turing NLG 530B), model configuration section",
        "note": "",
    },
    "deepspeed-moe-350m": {
        "total": 350_000_000,
        "active": None,
        "source": "Rajbhandari et al. 2022 (DeepSpeed-MoE), Table 1 (dense base of 350M+MoE-128)",
        "note": "",
    },
    "deepspeed-moe-350m-moe128": {
        "total": 13_000_000_000,
        "active": 350_000_000,
        "source": "Rajbhandari et al. 2022 (DeepSpeed-MoE), Table 1; active = the dense base (top-1 routing, Sec. 3)",
        "note": "",
    },
    "deepspeed-moe-1.3b": {
        "total": 1_300_000_000,
        "active": None,
        "source": "Rajbhandari et al. 2022 (DeepSpeed-MoE), Table 1 (dense base of 1.3B+MoE-128)",
        "note": "",
    },
    "deepspeed-moe-1.3b-moe128": {
        "total": 52_000_000_000,
        "active": 1_300_000_000,
        "source": "Rajbhandari et al. 2022 (DeepSpeed-MoE), Table 1; active = the dense base (top-1 routing, Sec. 3)",
        "note": "",
    },
    "glam-64b-64e": {
        "total": 1_200_000_000_000,
        "active": 96_600_000_000,
        "source": "Du et al. 2022 (GLaM), Table 4",
        "note": (
            "Not reproducible: no single reading of Table 4 gives both 1.2T and 96.6B. Ours (GLU dense FFN as a "
            "parameter-equal 2-matrix FFN of width 1.5*32768, plain 2-matrix experts of width 32768) gives 1.145T "
            "total (-4.6%) and 79.4B active (-17.8%); gating the experts too gives 96.6B active exactly but 1.69T total"
        ),
    },
    "switch-base": {
        "total": 7_000_000_000,
        "active": None,
        "source": "Fedus et al. 2022 (Switch Transformers), Table 9 (Switch-Base, 128 experts)",
        "note": (
            "published to one significant figure: the 12 MoE layers x 128 experts alone hold 7.25B, the "
            "encoder-decoder model 7.42B; ours 7.39B (+5.5%) still rounds to 7B"
        ),
    },
    "switch-large": {
        "total": 26_000_000_000,
        "active": None,
        "source": "Fedus et al. 2022 (Switch Transformers), Table 9 (Switch-Large, 128 experts)",
        "note": "",
    },
    "switch-c": {
        "total": 1_571_000_000_000,
        "active": None,
        "source": "Fedus et al. 2022 (Switch Transformers), Table 9 (Switch-C, 2048 experts)",
        "note": "",
    },
}


def _presets_dir() -> Path:
    if not PRESETS_DIR.is_dir():
        raise ConfigError(
            f"preset directory not found: {PRESETS_DIR} (presets live in the source repository's configs/presets/, "
            "they are not part of an installed wheel; pass --config FILE instead)"
        )
    return PRESETS_DIR


def list_presets() -> list[str]:
    """Names of the preset configs (file stems of ``configs/presets/*.toml``), sorted."""
    return sorted(p.stem for p in _presets_dir().glob("*.toml"))


def preset_path(name: str) -> Path:
    path = _presets_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return path


def load_preset(name: str, overrides: list[str] | None = None) -> Config:
    """Load and validate ``configs/presets/<name>.toml`` (with optional ``section.key=value`` overrides)."""
    return load_config(preset_path(name), overrides)


def _error_pct(ours: int, published: int | None) -> float | None:
    return None if not published else round(100.0 * (ours - published) / published, 2)


def report(cfg: Config, name: str | None = None) -> dict[str, Any]:
    """A JSON-able summary of ``cfg``; compared with ``PUBLISHED[name]`` when ``name`` is a preset with a figure."""
    counts = count_params(cfg)
    flops = flops_per_token(cfg)
    published = PUBLISHED.get(name or "", {})
    pub_total, pub_active = published.get("total"), published.get("active")
    return {
        "name": name,
        "total_params": counts.total,
        "active_params": counts.active,
        "active_non_embedding_params": counts.active_non_embedding,
        "embedding_params": counts.embedding,
        "non_embedding_params": counts.non_embedding,
        "expert_params": counts.experts,
        "moe_layers": counts.n_moe_layers,
        "params_per_expert": counts.params_per_expert,
        "train_flops_per_token": flops.train,
        "inference_flops_per_token": flops.inference,
        "seq_len": flops.seq_len,
        "published_total": pub_total,
        "published_active": pub_active,
        "total_error_pct": _error_pct(counts.total, pub_total),
        "active_error_pct": _error_pct(counts.active, pub_active),
        "source": published.get("source"),
        "note": published.get("note") or None,
        "breakdown": dict(counts.breakdown),
        "forward_flops_breakdown": dict(flops.breakdown),
    }


def human(n: float | None) -> str:
    """174.6B, 1.57T, 44.0M: two decimals below 10 of a unit, one above (three or four significant figures)."""
    if n is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.2f}{suffix}" if abs(value) < 10 else f"{value:.1f}{suffix}"
    return f"{n:.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def format_report(d: dict[str, Any]) -> str:
    """Render a ``report()`` dict as an aligned text block."""
    rows: list[tuple[str, str]] = [
        ("total params", human(d["total_params"])),
        ("active params", f"{human(d['active_params'])} ({human(d['active_non_embedding_params'])} non-embedding)"),
        ("embedding params", human(d["embedding_params"])),
    ]
    if d["expert_params"]:
        rows.append(
            (
                "expert params",
                f"{human(d['expert_params'])} ({d['moe_layers']} MoE layers, "
                f"{human(d['params_per_expert'])} per expert)",
            )
        )
    rows += [
        ("train FLOPs/token", f"{human(d['train_flops_per_token'])} (seq_len {d['seq_len']})"),
        ("inference FLOPs/token", human(d["inference_flops_per_token"])),
    ]
    if d.get("published_total"):
        rows.append(("published total", f"{human(d['published_total'])} (ours {_pct(d['total_error_pct'])})"))
    if d.get("published_active"):
        rows.append(("published active", f"{human(d['published_active'])} (ours {_pct(d['active_error_pct'])})"))
    if d.get("source"):
        rows.append(("source", d["source"]))
    if d.get("note"):
        rows.append(("note", d["note"]))
    width = max(len(label) for label, _ in rows)
    indent = " " * (width + 4)
    lines = [d.get("name") or "config (defaults)"]
    for label, value in rows:
        # Notes and sources can be long: wrap them under the value column instead of running off the terminal.
        lines.append(textwrap.fill(value, 116, initial_indent=f"  {label:<{width}}  ", subsequent_indent=indent))
    return "\n".join(lines)


def _list_line(name: str, d: dict[str, Any], width: int) -> str:
    published = "-"
    if d["published_total"]:
        published = f"{human(d['published_total'])} ({_pct(d['total_error_pct'])})"
        if d["published_active"]:
            published += f", active {human(d['published_active'])} ({_pct(d['active_error_pct'])})"
    return (
        f"{name:<{width}}  total {human(d['total_params']):>7}  active {human(d['active_params']):>7}  "
        f"published {published}"
    )


def run_params(preset: str | None, config: str | None, overrides: list[str], list_only: bool, as_json: bool) -> int:
    """``sparselm params``: print a report (or the preset list) and return the exit status.

    Bad input raises ``ConfigError``; the CLI turns it into one line on stderr and exit status 2.
    """
    overrides = list(overrides or [])
    if list_only:
        names = list_presets()
        reports = {name: report(load_preset(name, overrides), name) for name in names}
        if as_json:
            print(json.dumps(list(reports.values()), indent=2))
        else:
            width = max((len(n) for n in names), default=0)
            for name in names:
                print(_list_line(name, reports[name], width))
        return 0
    if preset and config:
        raise ConfigError("give either --preset or --config, not both")
    if preset:
        cfg = load_preset(preset, overrides)
        d = report(cfg, preset)
        if overrides and count_params(cfg).total != count_params(load_preset(preset)).total:
            # The published figures describe the preset as written; comparing a resized model with them is noise.
            for key in ("published_total", "published_active", "total_error_pct", "active_error_pct", "note"):
                d[key] = None
            d["note"] = f"overrides change the parameter count ({' '.join(overrides)}): not compared with the paper"
    else:
        d = report(load_config(config, overrides), config)
    print(json.dumps(d, indent=2) if as_json else format_report(d))
    return 0
