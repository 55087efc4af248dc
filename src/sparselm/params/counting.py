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
MFU (the trainer's metrics, ``benchmarks/train.py``) divides by the work a causal kernel does instead:
``FlopCount.train_causal`` counts half the score square, ``2 * n_layers * seq_len * d_model`` per token forward.
Transformer-XL attention (``position = "xl"``) is counted like the convention does for Gopher/Chinchilla: ``w_rel``
is one more d x d matmul per token (it projects about ``seq_len`` distance embeddings per sequence), and the extra
``(q + v) . R`` score term is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sparselm.config import Config
from sparselm.errors import InputError


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

    @property
    def train_causal(self) -> int:
        """``train`` with the attention scores and weighted sum counted causally (half the square): MFU's numerator."""
        return self.train - 3 * self.breakdown.get("attention", 0) // 2


def ffn_params(d_model: int, d_ff: int, kind: str, bias: bool) -> tuple[int, int]:
    """Dense ``FeedForward``: (matmul weights, biases). SwiGLU has up/gate/down, GELU up/down; every Linear biased."""
    matrices = 3 if kind == "swiglu" else 2
    biases = ((matrices - 1) * d_ff + d_model) if bias else 0
    return matrices * d_model * d_ff, biases


def _expert_params(d_model: int, d_ff: int, kind: str, bias: bool) -> tuple[int, int]:
    """One routed expert of ``Experts``: (matmul weights, biases). Only b_up and b_down exist, never a gate bias."""
    matrices = 3 if kind == "swiglu" else 2
    return matrices * d_model * d_ff, (d_ff + d_model) if bias else 0


def count_params(cfg: Config) -> ParamCount:
    """Exact parameter counts of ``Transformer(cfg.model, cfg.moe)`` from the config alone."""
    m, e = cfg.model, cfg.moe
    d, n_layers = m.d_model, m.n_layers
    n_moe = len(e.layer_indices(n_layers))
    n_dense = n_layers - n_moe

    norm = d * (2 if (m.norm == "layernorm" and m.bias) else 1)  # RMSNorm never has a bias
    attn_matmul = 4 * d * d + (d * d if m.position == "xl" else 0)  # q/k/v/o, plus w_rel for Transformer-XL
    attn_other = (4 * d if m.bias else 0) + (2 * d if m.position == "xl" else 0)  # biases; u and v (H x head_dim)
    attn_other += 2 * (d // m.n_heads) if m.qk_norm else 0  # q_norm and k_norm: one head_dim vector each
    ffn_matmul, ffn_bias = ffn_params(d, m.d_ff, m.ffn, m.bias)

    d_ff_expert = e.d_ff_expert or m.d_ff
    expert_matmul, expert_bias = _expert_params(d, d_ff_expert, m.ffn, m.bias) if n_moe else (0, 0)
    per_expert = expert_matmul + expert_bias
    router = e.num_experts * d if n_moe else 0
    shared_matmul, shared_bias = ffn_params(d, d_ff_expert, m.ffn, m.bias) if (n_moe and e.shared_expert) else (0, 0)

    breakdown: dict[str, int] = {
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
    matmul = n_layers * attn_matmul + n_dense * ffn_matmul + n_moe * (e.top_k * expert_matmul + shared_matmul)
    active_experts = n_moe * e.top_k * per_expert
    if cfg.retro.enabled:
        retro = _retro_params(cfg)
        breakdown.update(retro.breakdown)
        breakdown["experts"] += retro.experts
        n_moe += retro.n_moe
        active_experts += retro.active_experts
    total = sum(breakdown.values())
    embedding = breakdown["token_embedding"] + breakdown["position_embedding"] + breakdown["lm_head"]
    active = total - breakdown["experts"] + active_experts
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


@dataclass
class _RetroParams:
    breakdown: dict[str, int]  # "retro_cca", "retro_encoder" (routed experts excluded: they go to "experts")
    experts: int
    active_experts: int
    n_moe: int


def _retro_params(cfg: Config) -> _RetroParams:
    """RETRO's parameters (sparselm.model.retro): the chunked cross-attention sublayers and the neighbour encoder."""
    m, e, r = cfg.model, cfg.moe, cfg.retro
    d = m.d_model
    d_enc, d_ff_enc = r.encoder_d_model or d, r.encoder_d_ff or m.d_ff

    def norm(width: int) -> int:
        return width * (2 if (m.norm == "layernorm" and m.bias) else 1)

    def cross(width: int, d_memory: int) -> tuple[int, int]:  # CrossAttention: (matmul weights, biases)
        return 2 * width * width + 2 * d_memory * width, (4 * width if m.bias else 0)

    cca_matmul, cca_bias = cross(d, d_enc)
    n_cca = len(r.cca_layers(m.n_layers))
    enc_moe = len(r.encoder_moe_layers(e))
    enc_dense = r.encoder_layers - enc_moe
    cond_matmul, cond_bias = cross(d_enc, d)
    ffn_matmul, ffn_bias = ffn_params(d_enc, d_ff_enc, m.ffn, m.bias)
    d_ff_expert = e.d_ff_expert or d_ff_enc
    expert_matmul, expert_bias = _expert_params(d_enc, d_ff_expert, m.ffn, m.bias) if enc_moe else (0, 0)
    shared_matmul, shared_bias = (0, 0)
    if enc_moe and e.shared_expert:
        shared_matmul, shared_bias = ffn_params(d_enc, d_ff_expert, m.ffn, m.bias)
    per_layer = (
        4 * d_enc * d_enc
        + (4 * d_enc if m.bias else 0)  # self-attention
        + 2 * norm(d_enc)  # attention and FFN norms
        + norm(d_enc)
        + norm(d)
        + cond_matmul
        + cond_bias  # conditioning cross-attention with its query and memory norms
    )
    encoder = (
        (d * d_enc if d_enc != d else 0)  # proj_in
        + r.encoder_layers * per_layer
        + enc_dense * (ffn_matmul + ffn_bias)
        + enc_moe * (e.num_experts * d_enc + shared_matmul + shared_bias)  # routers and shared experts
        + norm(d_enc)  # final norm
    )
    per_expert = expert_matmul + expert_bias
    return _RetroParams(
        breakdown={"retro_cca": n_cca * (cca_matmul + cca_bias + norm(d)), "retro_encoder": encoder},
        experts=enc_moe * e.num_experts * per_expert,
        active_experts=enc_moe * e.top_k * per_expert,
        n_moe=enc_moe,
    )


def _retro_flops(cfg: Config) -> dict[str, int]:
    """Forward FLOPs per decoder token of RETRO's additions, k = retro.neighbours neighbours of r = 2m tokens per
    chunk of m: the encoder runs on k * r / m = 2k neighbour tokens per decoder token."""
    m, e, r = cfg.model, cfg.moe, cfg.retro
    d, d_enc = m.d_model, r.encoder_d_model or m.d_model
    d_ff_enc = r.encoder_d_ff or m.d_ff
    k, chunk, length = r.neighbours, r.chunk_size, 2 * r.chunk_size
    per_neighbour_token = 2 * (d * d_enc if d_enc != d else 0)
    enc_moe = len(r.encoder_moe_layers(e))
    ffn_matmul = ffn_params(d_enc, d_ff_enc, m.ffn, m.bias)[0]
    d_ff_expert = e.d_ff_expert or d_ff_enc
    expert_matmul = _expert_params(d_enc, d_ff_expert, m.ffn, m.bias)[0]
    shared = ffn_params(d_enc, d_ff_expert, m.ffn, m.bias)[0] if e.shared_expert else 0
    per_neighbour_token += 2 * (r.encoder_layers - enc_moe) * ffn_matmul
    per_neighbour_token += 2 * enc_moe * (e.top_k * expert_matmul + shared + e.num_experts * d_enc)
    per_layer = 2 * (4 * d_enc * d_enc + 2 * d_enc * d_enc)  # self-attention q/k/v/o; conditioning q/o
    per_layer += 2 * chunk / length * 2 * d * d_enc  # conditioning k/v over the chunk's m states, per neighbour
    per_layer += 4 * length * d_enc + 4 * chunk * d_enc  # self-attention and conditioning scores
    encoder = k * length / chunk * (per_neighbour_token + r.encoder_layers * per_layer)
    n_cca = len(r.cca_layers(m.n_layers))
    cca = n_cca * (2 * 2 * d * d + k * length / chunk * 2 * 2 * d_enc * d + 4 * k * length * d)
    return {"retro_encoder": int(encoder), "retro_cca": int(cca)}


def flops_per_token(cfg: Config, seq_len: int | None = None) -> FlopCount:
    """Forward/train/inference FLOPs per token at context ``seq_len`` (default ``cfg.data.seq_len``).

    See the module docstring for the convention (PaLM/Chinchilla: 2 FLOPs per matmul weight, full non-causal
    attention ``4 * n_layers * seq_len * d_model``, LM head counted, embedding lookup free, train = 3x forward).
    """
    seq_len = cfg.data.seq_len if seq_len is None else seq_len
    if seq_len <= 0:
        raise InputError(f"seq_len must be positive, got {seq_len}")
    m = cfg.model
    counts = count_params(cfg)
    breakdown = {
        "matmul": 2 * counts.matmul_active_non_embedding,
        "lm_head": 2 * m.vocab_size * m.d_model,
        "attention": 2 * 2 * m.n_layers * seq_len * m.d_model,
        "router": 2 * counts.breakdown["router"],
    }
    if cfg.retro.enabled:
        breakdown.update(_retro_flops(cfg))
    forward = sum(breakdown.values())
    return FlopCount(forward=forward, train=3 * forward, inference=forward, seq_len=seq_len, breakdown=breakdown)
