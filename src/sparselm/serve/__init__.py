"""Serving: an engine with continuous batching over a paged KV cache (``engine``) and an OpenAI-compatible HTTP
API over it (``api``, run by ``sparselm serve``). See docs/serving.md."""

from sparselm.serve.engine import Engine
from sparselm.serve.params import EngineConfig, SamplingParams

__all__ = ["Engine", "EngineConfig", "SamplingParams"]
