"""OpenAI request bodies for ``/v1/completions`` and ``/v1/chat/completions``, validated with pydantic.

Types are strict (``"max_tokens": "5"`` is an error, not 5). Fields of the OpenAI API that this server does not
implement are accepted only at their neutral values (penalties 0, no ``logit_bias``, no ``suffix``, ``best_of`` equal
to ``n``), so a client is never silently given something other than what it asked for. vLLM's extensions ``top_k``
and ``ignore_eos`` are accepted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from sparselm.errors import InputError
from sparselm.serve.params import MAX_LOGPROBS, SamplingParams

Number = StrictInt | StrictFloat


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields (user, metadata, ...) are ignored, as OpenAI does

    model: StrictStr | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    top_k: StrictInt = 0  # vLLM extension; -1 also means "off"
    n: StrictInt = Field(1, ge=1, le=16)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    ignore_eos: StrictBool = False  # vLLM extension
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: dict[str, Number] | None = None

    def _unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InputError(f"{name} is not supported by this server (only 0)")
        if self.logit_bias:
            raise InputError("logit_bias is not supported by this server")

    def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=0 if self.top_k == -1 else self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def check(self) -> None:
        self._unsupported()
        if self.suffix:
            raise InputError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise InputError("best_of is not supported by this server (only best_of = n)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InputError("prompt is an empty list")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as text or token-id lists (a list of strings or of id lists is a batch)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def check(self) -> None:
        self._unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise InputError("top_logprobs needs logprobs: true")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class APIError(Exception):
    """An OpenAI-shaped error answer: HTTP status, message, error type, and optional code and parameter."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param
