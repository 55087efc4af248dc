"""What an architecture mapping is: config both ways, refusals, and per-tensor conversion plans both ways.

A plan is a list of ``Target``s: one output tensor each, named, built by a function from named source tensors.
Plans, not state dicts, so that a converter can stream: it loads only the sources of the targets it is writing
(one output shard at a time), and the same plan runs on meta tensors to learn every output's shape for free.

Two Hugging Face layouts exist for MoE experts: the hub's per-expert tensors (``experts.{e}.gate_proj.weight``,
what ``save_pretrained`` writes and every other reader expects) and transformers 5's fused in-memory 3-D tensors
(``experts.gate_up_proj`` [E, 2f, d] gate first, ``experts.down_proj`` [E, d, f]). Export plans are made for
either (``FILE`` for writing, ``MEMORY`` for ``to_transformers``); import plans read whichever the files hold.

sparselm's attention applies RoPE in the "rotate half" convention to plain q/k projections, as transformers does:
q/k weights copy over unpermuted (tests/test_interop_parity.py shows a permuted copy fails the logits check).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sparselm.config import Config
from sparselm.errors import InputError

FILE, MEMORY = "file", "memory"


@dataclass(frozen=True)
class Target:
    name: str
    sources: tuple[str, ...]
    build: Callable[..., torch.Tensor]


def same(name: str, source: str) -> Target:
    return Target(name, (source,), lambda t: t)


def transposed(name: str, source: str) -> Target:
    return Target(name, (source,), lambda t: t.t())


def zeros(name: str, shape: tuple[int, ...]) -> Target:
    """A tensor the target format needs but the source model does not have (e.g. a bias of 0): exact."""
    return Target(name, (), lambda: torch.zeros(shape))


class Refusal(InputError):
    """The model (or checkpoint) has a feature the other side cannot represent exactly."""


def refuse(message: str) -> None:
    raise Refusal(message)


class Mapping:
    """One sparselm <-> Hugging Face architecture mapping. Subclasses fill in the class attributes and methods."""

    name: str  # short name used on the command line, e.g. "llama"
    architecture: str  # the ``architectures`` entry, e.g. "LlamaForCausalLM"
    model_type: str  # config.json ``model_type``
    gguf: bool = False  # ``--format gguf`` can write it (llama.cpp's "llama" architecture)
    base_prefix: str = "model."  # checkpoints saved from the bare base model lack it (e.g. the original GPT-2)

    # ----- export
    def check_export(self, cfg: Config) -> None:
        """Raise ``Refusal`` naming the first feature of ``cfg`` this architecture cannot represent exactly."""
        raise NotImplementedError

    def hf_config(self, cfg: Config) -> dict:
        """config.json fields (without ``architectures``, ``model_type``, token ids and dtype)."""
        raise NotImplementedError

    def export_targets(self, cfg: Config, layout: str = FILE) -> list[Target]:
        """HF tensors (in ``layout``) built from sparselm's state-dict names."""
        raise NotImplementedError

    # ----- import
    def import_config(self, hf: dict) -> Config:
        """A sparselm config for the HF ``config.json`` dict, or ``Refusal`` naming the field it cannot represent."""
        raise NotImplementedError

    def import_targets(self, cfg: Config, hf: dict, keys: set[str]) -> list[Target]:
        """sparselm tensors built from the HF tensor names in ``keys`` (the checkpoint's own names)."""
        raise NotImplementedError

    def ignored(self, cfg: Config, hf: dict, keys: set[str]) -> set[str]:
        """HF tensors that import reads nothing from, on purpose (any other unread tensor is an error)."""
        return set()

    def simplify(self, cfg: Config, tensors: dict[str, torch.Tensor]) -> None:
        """After import: drop what the imported values make redundant (in place); most mappings have nothing."""


# ----------------------------------------------------------------------------------- shared config reading


def hf_field(hf: dict, name: str, default=None, required: bool = True):
    if name in hf and hf[name] is not None:
        return hf[name]
    if required and default is None:
        refuse(f"config.json has no {name}")
    return default


def rope_theta(hf: dict) -> float:
    """RoPE base from transformers 5's ``rope_parameters`` or 4's ``rope_theta``/``rope_scaling``; any scaling
    (linear, dynamic, yarn, llama3, ...) is refused: sparselm implements plain RoPE only."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or params.get("type") or scaling.get("rope_type") or scaling.get("type")
    if kind not in (None, "default"):
        refuse(f"RoPE scaling rope_type={kind!r} has no sparselm equivalent (plain RoPE only)")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) not in (1, 1.0):
        refuse("partial_rotary_factor < 1 has no sparselm equivalent (RoPE on the whole head)")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def head_layout(hf: dict, hidden: int, heads: int) -> int:
    """Number of key/value heads; refuses a head_dim other than hidden_size / num_attention_heads."""
    head_dim = hf.get("head_dim") or hidden // heads
    if hidden % heads or head_dim != hidden // heads:
        refuse(
            f"head_dim={head_dim} with hidden_size={hidden} and num_attention_heads={heads}: sparselm's attention "
            "needs head_dim = hidden_size / num_attention_heads"
        )
    kv = hf.get("num_key_value_heads") or heads
    if heads % kv:
        refuse(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    return kv


def no_sliding_window(hf: dict, max_len: int) -> None:
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window", True) and window and window < max_len:
        refuse(f"sliding_window={window} < max_position_embeddings={max_len}: sparselm attends to the whole context")


POSITIONS = {
    "rope": "rotary embeddings",
    "absolute": "learned absolute positions",
    "relative": "T5 relative position bias",
    "xl": "Transformer-XL relative attention",
    "none": "no position information",
}


def check_common_export(cfg: Config, *, position: str, norm: str, ffn: str, allow_bias: bool, allow_dropout: bool):
    """The refusals every mapping shares; each message names the sparselm field (the caller names the target)."""
    m, e = cfg.model, cfg.moe
    if m.position != position:
        refuse(f"model.position={m.position} ({POSITIONS.get(m.position, m.position)}; needs {position})")
    if m.norm != norm:
        refuse(f"model.norm={m.norm} (needs {norm})")
    if m.ffn != ffn:
        refuse(f"model.ffn={m.ffn} (needs {ffn})")
    if m.bias and not allow_bias:
        refuse("model.bias=true (no biases here)")
    if m.dropout and not allow_dropout:
        refuse(f"model.dropout={m.dropout} (no residual dropout here)")
    if e.enabled:
        if not e.dropless:
            refuse("moe.dropless=false (capacity-factor token dropping)")
        if e.jitter:
            refuse(f"moe.jitter={e.jitter} (router input jitter)")
        if e.top_k == 1 and e.top1_gate == "straight_through":
            refuse("moe.top1_gate=straight_through (a top-1 expert's output not scaled by its probability)")


# ---------------------------------------------------------------------------------------- shared tensors


def repeat_kv(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """Grouped-query k/v projection [kv * hd, d] (or bias [kv * hd]) -> one copy per query head [heads * hd, ...],
    query head h reading kv head h // (heads / kv) as transformers' ``repeat_kv`` does: exact."""
    if kv_heads == heads:
        return weight
    grouped = weight.unflatten(0, (kv_heads, -1))
    return grouped.repeat_interleave(heads // kv_heads, dim=0).flatten(0, 1)


def expert_export(
    hf_prefix: str,
    sl_prefix: str,
    num_experts: int,
    layout: str,
    names: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
) -> list[Target]:
    """sparselm's 3-D expert weights (``w_gate``/``w_up`` [E, d, f], ``w_down`` [E, f, d]) as HF experts."""
    gate, up, down = (f"{sl_prefix}.{w}" for w in ("w_gate", "w_up", "w_down"))
    if layout == MEMORY:
        return [
            Target(
                f"{hf_prefix}.gate_up_proj",
                (gate, up),
                lambda g, u: torch.cat((g.transpose(1, 2), u.transpose(1, 2)), dim=1),
            ),
            Target(f"{hf_prefix}.down_proj", (down,), lambda w: w.transpose(1, 2)),
        ]
    targets = []
    for e in range(num_experts):
        for hf_name, source in zip(names, (gate, up, down), strict=True):
            targets.append(Target(f"{hf_prefix}.{e}.{hf_name}.weight", (source,), lambda w, e=e: w[e].t()))
    return targets


def expert_import(
    hf_prefix: str,
    sl_prefix: str,
    num_experts: int,
    d_ff: int,
    keys: set[str],
    names: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
) -> list[Target]:
    """HF experts, fused (``gate_up_proj``/``down_proj``) or per expert, as sparselm's 3-D weights."""
    gate, up, down = (f"{sl_prefix}.{w}" for w in ("w_gate", "w_up", "w_down"))
    if f"{hf_prefix}.gate_up_proj" in keys:
        fused = f"{hf_prefix}.gate_up_proj"
        return [
            Target(gate, (fused,), lambda t: t[:, :d_ff].transpose(1, 2)),
            Target(up, (fused,), lambda t: t[:, d_ff:].transpose(1, 2)),
            Target(down, (f"{hf_prefix}.down_proj",), lambda t: t.transpose(1, 2)),
        ]
    targets = []
    for sl_name, hf_name in zip((gate, up, down), names, strict=True):
        sources = tuple(f"{hf_prefix}.{e}.{hf_name}.weight" for e in range(num_experts))
        targets.append(Target(sl_name, sources, lambda *ws: torch.stack([w.t() for w in ws])))
    return targets
