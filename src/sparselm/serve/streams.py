"""One HTTP request in flight: the outputs of its sequences, turned into an OpenAI response or a stream of chunks.

The engine hands each step's outputs to the server in one call, which the event loop sorts into the requests'
asyncio queues (``ServerState.dispatch``). ``events`` (streaming) and ``result`` (not streaming) consume the queue;
a stream that fell behind sends everything waiting in its queue in one write. Both abort the request in the engine
if the client goes away or the consumer is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from sparselm.serve.protocol import APIError
from sparselm.serve.render import Envelope, chat_logprobs, completion_logprobs, error_body, sse, usage
from sparselm.serve.sequence import SequenceOutput, SequenceRecord, token_text


class EngineFailure(Exception):
    pass


@dataclass
class Choice:
    prompt: list[int]
    prompt_text: str
    seq: SequenceRecord | None = None
    finish_reason: str | None = None
    offset: int = 0  # characters sent so far (text_offset of the next token)
    started: bool = False
    pieces: list[str] = field(default_factory=list)


class RequestStream:
    def __init__(self, state, request_id: str, req, chat: bool, prompts, texts, loop) -> None:
        self.state = state
        self.request_id = request_id
        self.req = req
        self.chat = chat
        self.prompts = prompts
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.envelope = Envelope(request_id, state.config.model_name, chat)
        tok = state.tokenizer
        self.choices = [
            Choice(ids, text if isinstance(text, str) else tok.decode(ids))
            for ids, text in zip(prompts, texts, strict=True)
            for _ in range(req.n)
        ]
        self.open = len(self.choices)
        self.done = False

    # engine reader thread
    def fail(self, message: str) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, EngineFailure(message))

    # event loop
    async def _outputs(self) -> AsyncIterator[list[SequenceOutput]]:
        """-> the outputs waiting in the queue, all of them at each wake-up, until every choice has finished."""
        try:
            while self.open:
                batch = [await self.queue.get()]
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                for out in batch:
                    if isinstance(out, EngineFailure):
                        raise out
                    choice = self.choices[out.index]
                    if out.seq is not None:  # sent with a sequence's first and last outputs
                        choice.seq = out.seq
                    if out.finished:
                        self.open -= 1
                        choice.finish_reason = out.finish_reason
                        self.state.metrics.finished(out.seq, time.monotonic())
                yield batch
            self.done = True
        finally:
            self.state.active.pop(self.request_id, None)
            if not self.done and self.state.engine is not None:
                self.state.engine.abort(self.request_id)  # client gone or consumer cancelled: free the blocks

    def _usage(self) -> dict:
        n = self.req.n
        firsts = [self.choices[i * n].seq for i in range(len(self.prompts))]
        cached = sum(s.cached_tokens for s in firsts if s is not None)
        completion = sum(len(c.seq.output) for c in self.choices if c.seq is not None)
        return usage(sum(len(p) for p in self.prompts), completion, cached)

    @property
    def _echo(self) -> bool:
        return not self.chat and self.req.echo

    # ------------------------------------------------------------------------------------------ not streaming
    async def result(self, request: Request) -> dict:
        collect = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if collect not in done:
            collect.cancel()  # the client left: _outputs' cleanup aborts the request
            await asyncio.gather(collect, return_exceptions=True)
            return {}
        gone.cancel()
        return collect.result()

    async def _collect(self) -> dict:

        try:
            async for _ in self._outputs():
                pass
        except EngineFailure as exc:
            raise APIError(500, str(exc), "server_error") from None
        tok = self.state.tokenizer
        choices = []
        for i, c in enumerate(self.choices):
            seq = c.seq
            if self.chat:
                item = {"index": i, "message": {"role": "assistant", "content": seq.text}, "logprobs": None}
                if self.req.logprobs:
                    item["logprobs"] = chat_logprobs(tok, seq.output_logprobs)
            else:
                item = {"index": i, "text": (c.prompt_text if self._echo else "") + seq.text, "logprobs": None}
                if self.req.logprobs is not None:
                    tokens, entries = list(seq.output), list(seq.output_logprobs)
                    if self._echo:
                        tokens, entries = seq.prompt + tokens, seq.prompt_logprobs + entries
                    item["logprobs"] = completion_logprobs(tok, tokens, entries, 0)
            item["finish_reason"] = c.finish_reason
            choices.append(item)
        return self.envelope.full(choices, self._usage())

    # ---------------------------------------------------------------------------------------------- streaming
    async def events(self) -> AsyncIterator[str]:
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        if self.chat:
            role = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(len(self.choices))]  # fmt: skip
            yield sse(self.envelope.chunk(role))
        try:
            async for batch in self._outputs():
                events = []
                for out in batch:
                    choice = self._chunk_choice(out)
                    if choice is None:
                        continue
                    last = self.open == 0 and out is batch[-1]
                    final_usage = self._usage() if last and not include_usage else None
                    events.append(sse(self.envelope.chunk([choice], final_usage)))
                if events:
                    yield "".join(events)
        except EngineFailure as exc:
            yield sse(error_body(str(exc), "server_error"))
        if include_usage and self.done:
            yield sse(self.envelope.chunk([], self._usage()))
        yield sse("[DONE]")

    def _chunk_choice(self, out: SequenceOutput) -> dict | None:
        c = self.choices[out.index]
        tok = self.state.tokenizer
        text, tokens, entries = out.text_delta, list(out.new_tokens), list(out.logprobs)
        if self._echo and not c.started:
            text = c.prompt_text + text
            if self.req.logprobs is not None:
                tokens, entries = c.seq.prompt + tokens, c.seq.prompt_logprobs + entries
        c.started = True
        if not text and not out.finished and not entries:
            return None
        if self.chat:
            delta = {"content": text} if text else {}
            item = {"index": out.index, "delta": delta, "logprobs": None}
            if self.req.logprobs and entries:
                item["logprobs"] = chat_logprobs(tok, entries)
        else:
            item = {"index": out.index, "text": text, "logprobs": None}
            if self.req.logprobs is not None and entries:
                item["logprobs"] = completion_logprobs(tok, tokens, entries, c.offset)
                c.offset += sum(len(token_text(tok, t)) for t in tokens)
        item["finish_reason"] = out.finish_reason if out.finished else None
        return item


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
