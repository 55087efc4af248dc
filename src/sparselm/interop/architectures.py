"""Which mapping holds a sparselm model (export) or a Hugging Face checkpoint (import)."""

from __future__ import annotations

from sparselm.config import Config
from sparselm.errors import InputError
from sparselm.interop.gpt2 import GPT2
from sparselm.interop.llama import Llama
from sparselm.interop.mapping import Mapping, Refusal
from sparselm.interop.mixtral import Mixtral
from sparselm.interop.qwen2_moe import Qwen2Moe
from sparselm.interop.qwen3_moe import Qwen3Moe

# Export tries them in this order: the most specific architecture that holds the model exactly wins (a model
# Mixtral can hold goes to Mixtral, not to the more general Qwen2-MoE).
MAPPINGS: tuple[Mapping, ...] = (Llama(), Mixtral(), Qwen3Moe(), Qwen2Moe(), GPT2())
BY_NAME = {m.name: m for m in MAPPINGS}
BY_ARCHITECTURE = {m.architecture: m for m in MAPPINGS}


def _closest(cfg: Config) -> Mapping:
    """The mapping whose refusal best explains why a model has no equivalent (for the error message)."""
    m = cfg.model
    if m.position == "absolute" or (m.norm == "layernorm" and m.ffn == "gelu"):
        return BY_NAME["gpt2"]
    if not cfg.moe.enabled:
        return BY_NAME["llama"]
    return BY_NAME["qwen3_moe"] if m.qk_norm else BY_NAME["qwen2_moe"]


def choose_mapping(cfg: Config, name: str | None = None) -> Mapping:
    """The mapping ``name`` (refusing if it cannot hold ``cfg`` exactly) or the first one that can."""
    if name:
        if name not in BY_NAME:
            raise InputError(f"unknown architecture {name!r}; choose one of {', '.join(BY_NAME)}")
        mapping = BY_NAME[name]
        try:
            mapping.check_export(cfg)
        except Refusal as exc:
            raise Refusal(f"cannot export to {mapping.architecture}: {exc}") from None
        return mapping
    for mapping in MAPPINGS:
        try:
            mapping.check_export(cfg)
        except Refusal:
            continue
        return mapping
    closest = _closest(cfg)
    try:
        closest.check_export(cfg)
    except Refusal as exc:
        raise Refusal(f"no exact Hugging Face equivalent: {exc} for {closest.architecture}") from None
    raise AssertionError("unreachable: the closest mapping accepted a model no mapping accepted")


def mapping_for(hf_config: dict, where: str) -> Mapping:
    """The mapping for a checkpoint's ``architectures`` entry."""
    architectures = hf_config.get("architectures") or []
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise InputError(f"{where}: config.json must name exactly one entry in architectures, got {architectures!r}")
    if architectures[0] not in BY_ARCHITECTURE:
        raise InputError(
            f"{where}: architecture {architectures[0]!r} is not supported (sparselm imports "
            f"{', '.join(BY_ARCHITECTURE)})"
        )
    return BY_ARCHITECTURE[architectures[0]]
