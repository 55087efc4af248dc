"""OpenAI response shapes: completion and chat objects, their streamed chunks, logprobs, usage and errors."""

from __future__ import annotations

import json
import time

from sparselm.serve.sequence import TokenLogprob, token_text


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def completion_logprobs(tokenizer, tokens: list[int], entries: list[TokenLogprob | None], offset: int) -> dict:
    """The legacy completions ``logprobs`` object for ``tokens`` (entries None: the prompt's first token, which
    has no logprob); ``offset`` is the character offset of the first token in the choice's text."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(tokens, entries, strict=True):
        text = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entry.logprob)
        top: dict[str, float] = {}
        for alt, lp in entry.top:
            top.setdefault(token_text(tokenizer, alt), lp)
        out["top_logprobs"].append(top)
    return out


def _token_entry(tokenizer, token: int, logprob: float) -> dict:
    text = token_text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    content = []
    for e in entries:
        item = _token_entry(tokenizer, e.token, e.logprob)
        item["top_logprobs"] = [_token_entry(tokenizer, t, lp) for t, lp in e.top]
        content.append(item)
    return {"content": content}


class Envelope:
    """The fields every object of one response shares."""

    def __init__(self, request_id: str, model: str, chat: bool) -> None:
        self.id = request_id
        self.model = model
        self.chat = chat
        self.created = int(time.time())

    def full(self, choices: list[dict], usage_: dict) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                "usage": usage_}  # fmt: skip

    def chunk(self, choices: list[dict], usage_: dict | None = None) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage_ is not None:
            out["usage"] = usage_
        return out
