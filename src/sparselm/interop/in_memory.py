"""``to_transformers``: a sparselm model as the equivalent transformers model, in memory (same weights, eval mode)."""

from __future__ import annotations

from sparselm.config import Config
from sparselm.interop.architectures import choose_mapping
from sparselm.interop.convert import StateDictSource, build
from sparselm.interop.mapping import MEMORY


def to_transformers(model, cfg: Config, architecture: str | None = None, tokenizer=None):
    """The ``transformers.PreTrainedModel`` that computes what ``model`` (a sparselm ``Transformer`` built from
    ``cfg``) computes, in fp32 on the model's device, in eval mode. ``architecture`` forces a mapping ("llama",
    "mixtral", "qwen3_moe", "qwen2_moe", "gpt2"); by default the most specific one that holds the model exactly.
    ``tokenizer`` (optional) sets the config's BOS/EOS ids. Raises ``Refusal`` (an ``InputError``) for a model no
    mapping holds exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparselm.interop.hf_export import hf_config_json

    mapping = choose_mapping(cfg, architecture)
    fields = hf_config_json(mapping, cfg, tokenizer, dtype="float32")
    fields.pop("architectures")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf = AutoModelForCausalLM.from_config(config)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors = build(mapping.export_targets(cfg, MEMORY), StateDictSource(state), copy=False)
    hf.load_state_dict(tensors, strict=True)
    device = next(model.parameters()).device
    return hf.to(device).eval()
