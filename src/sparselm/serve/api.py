"""The OpenAI-compatible HTTP API over the engine (FastAPI; run by uvicorn from ``sparselm serve``).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` sends server-sent events ending in
``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (200 once the model is loaded, 503 while loading, draining or
failed) and ``GET /metrics`` (Prometheus). Errors are OpenAI-shaped JSON: 400 bad request (invalid JSON, wrong
types, max_tokens <= 0, a prompt longer than the context, with the numbers), 404 unknown model, 413 body over
``max_body_bytes``, 429 when ``max_queue`` sequences already wait for a place in the running batch (answered at
once), 503 not ready.

The engine runs in a process of its own (``engine_process``): each step's outputs arrive in one message, which
becomes one event-loop callback that puts each output into its request's asyncio queue. A client that disconnects
(streaming or not) aborts its request, which frees its KV blocks at the start of the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparselm.errors import CheckpointError, InputError
from sparselm.serve.chat import ChatTemplate
from sparselm.serve.engine_process import EngineGone
from sparselm.serve.metrics import ServerMetrics
from sparselm.serve.params import EngineConfig, SamplingParams
from sparselm.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from sparselm.serve.render import error_body
from sparselm.serve.streams import RequestStream

log = logging.getLogger("sparselm.serve")
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServerConfig:
    ckpt: str
    model_name: str
    engine: EngineConfig
    max_queue: int = 256  # sequences queued beyond the engine's max_num_seqs running places before requests get 429
    max_body_bytes: int = 1 << 20
    chat_template: str | None = None
    threads: int = 0  # torch intra-op threads at most (0: torch's default); EngineConfig.step_threads picks per step


class ServerState:
    """What the routes share: the engine once loaded, the tokenizer, the metrics, the requests in flight."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.status = "loading"  # loading | ready | draining | failed
        self.error: str | None = None
        self.engine = None  # the EngineProcess, once the model is loaded
        self.event_loop = None  # asyncio's, set when the app starts
        self.tokenizer = None
        self.chat = None
        self.metrics = ServerMetrics(lambda: self.engine.snapshot() if self.engine is not None else None)
        self.active: dict[str, RequestStream] = {}
        self.on_failure = None  # called with the message when loading fails (the CLI stops the server)

    def load(self) -> None:
        """Start the engine process and load the tokenizer (runs in a thread while the server already answers)."""
        from sparselm.checkpoint.files import resolve_checkpoint
        from sparselm.data.tokenizer import load_tokenizer
        from sparselm.serve.engine_process import EngineProcess, EngineStartError

        try:
            ckpt = resolve_checkpoint(self.config.ckpt)
            self.tokenizer = load_tokenizer(ckpt)
            self.chat = ChatTemplate.load(self.config.chat_template, ckpt)
            engine = EngineProcess(str(ckpt), self.config.engine, self.config.threads, self.deliver, self.engine_failed)
            info = engine.start()
            self.engine = engine
            self.status = "ready"
            log.info(
                "model %s loaded in engine process %d: %s weights, KV cache %d blocks of %d tokens in %s (%.1f MiB), "
                "prompt attention: %s, decode attention: %s, few-row matmuls: %s",
                self.config.model_name, info.pid, info.precision, info.num_blocks, info.block_size, info.kv_dtype,
                info.kv_bytes / 2**20, info.prompt_attention, info.decode_attention, info.decode_matmuls,
            )  # fmt: skip
        except (InputError, CheckpointError, FileNotFoundError, EngineStartError) as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug: keep the traceback in the log
            log.exception("loading the model failed")
            self._fail(f"{type(exc).__name__}: {exc}")

    def deliver(self, outputs) -> None:
        """(engine reader thread) One step's outputs: one callback on the event loop, whatever their number."""
        self.event_loop.call_soon_threadsafe(self.dispatch, outputs)

    def dispatch(self, outputs) -> None:
        """(event loop) Each output to its request's queue; outputs of requests already gone are dropped."""
        active = self.active
        for out in outputs:
            stream = active.get(out.request_id)
            if stream is not None:
                stream.queue.put_nowait(out)

    def _fail(self, message: str) -> None:
        self.status, self.error = "failed", message
        log.error("sparselm serve: %s", message)
        if self.on_failure is not None:
            self.on_failure(message)

    def engine_failed(self, message: str) -> None:
        """(engine reader thread) The engine process failed or exited: every request in flight gets the error."""
        log.error("%s", message)
        self.status, self.error = "failed", message
        for stream in list(self.active.values()):
            stream.fail(self.error)

    def require_ready(self) -> None:
        if self.status != "ready":
            detail = f": {self.error}" if self.error else ""
            raise APIError(503, f"server is {self.status}{detail}", "service_unavailable", code=self.status)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()


async def _read_json(request: Request, limit: int) -> dict:
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over {limit:,} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


def _validate(model_cls, body: dict):
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not isinstance(p, str) or "[" not in p)
        raise APIError(400, f"{where}: {first['msg']}", param=where or None) from None


def create_app(config: ServerConfig, state: ServerState | None = None) -> FastAPI:
    state = state or ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.event_loop = asyncio.get_running_loop()
        threading.Thread(target=state.load, name="sparselm-load", daemon=True).start()
        yield
        state.shutdown()

    app = FastAPI(title="sparselm", lifespan=lifespan)
    app.state.serve = state

    app.add_middleware(LimitsAndCounts, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(EngineGone)
    async def engine_gone(request: Request, exc: EngineGone):
        return _error(APIError(503, str(exc), "service_unavailable", code="failed"))

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        return _error(APIError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(APIError(exc.status_code, str(exc.detail), "invalid_request_error"))

    @app.get("/health")
    async def health():
        body = {"status": "ok" if state.status == "ready" else state.status}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/v1/models")
    async def models():
        card = {"id": config.model_name, "object": "model", "created": int(time.time()), "owned_by": "sparselm"}
        if state.engine is not None:
            card["max_model_len"] = state.engine.max_seq_len
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _validate(CompletionRequest, await _read_json(request, config.max_body_bytes))
        return await _serve(request, state, req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _validate(ChatCompletionRequest, await _read_json(request, config.max_body_bytes))
        return await _serve(request, state, req, chat=True)

    return app


class LimitsAndCounts:
    """ASGI middleware: 413 for a declared body over the limit before anything is read (chunked bodies are counted
    as they are read, in ``_read_json``), and the count of answers per route and status for /metrics. Plain ASGI,
    not Starlette's BaseHTTPMiddleware, so streamed responses pass through untouched."""

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.state.config.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length", b"")
        status = []

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            if length.isdigit() and int(length) > limit:
                error = APIError(413, f"request body is over {limit:,} bytes", code="body_too_large")
                await _error(error)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            path = scope["path"] if scope["path"] in ROUTES else "other"  # unknown paths must not grow the label set
            self.state.metrics.http.labels(path, str(status[0] if status else 0)).inc()


def _error(exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(error_body(str(exc), exc.kind, exc.param, exc.code), status_code=exc.status, headers=headers)


def _prompt_ids(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    ids = state.tokenizer.encode(prompt)
    return ids if ids else [state.tokenizer.eod_id]  # an empty prompt starts a new document


async def _serve(request: Request, state: ServerState, req, chat: bool):
    state.require_ready()
    req.check()
    config, engine = state.config, state.engine
    if req.model is not None and req.model != config.model_name:
        raise APIError(404, f"model {req.model!r} does not exist; this server serves {config.model_name!r}",
                       code="model_not_found", param="model")  # fmt: skip
    if chat:
        messages = [(m.role, m.text()) for m in req.messages]
        texts = [state.chat.render(messages)]
        stop_extra = state.chat.stop
    else:
        texts = req.prompts()
        stop_extra = ()
    prompts = [_prompt_ids(state, p) for p in texts]
    max_len = engine.max_seq_len
    requested = req.requested_max_tokens if chat else req.max_tokens
    params = []
    for i, ids in enumerate(prompts):
        engine.check_prompt(ids)
        room = max_len - len(ids)
        max_tokens = room if requested is None else requested
        if isinstance(max_tokens, int) and max_tokens > room:
            which = f"prompt {i} has" if len(prompts) > 1 else "the prompt has"
            raise APIError(
                400,
                f"this model's context is {max_len} tokens, but {which} {len(ids)} tokens and max_tokens is "
                f"{max_tokens} ({len(ids) + max_tokens} in all): lower max_tokens to at most {room}",
                param="max_tokens",
            )
        if chat:
            top = req.top_logprobs or 0
            sp = req.sampling(max_tokens, top if req.logprobs else None, None)
        else:
            echo_lp = req.logprobs if req.echo and req.logprobs is not None else None
            sp = req.sampling(max_tokens, req.logprobs, echo_lp)
        if stop_extra:
            sp = SamplingParams(**{**sp.__dict__, "stop": tuple(dict.fromkeys(sp.stop + stop_extra))})
        params.append(sp)
    _admit(engine, config, len(prompts) * req.n)
    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    stream = RequestStream(state, request_id, req, chat, prompts, texts, asyncio.get_running_loop())
    state.active[request_id] = stream
    try:
        for i, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
            for j in range(req.n):
                engine.add_request(request_id, ids, sp, index=i * req.n + j)
    except BaseException:
        state.active.pop(request_id, None)
        engine.abort(request_id)
        raise
    if req.stream:
        return StreamingResponse(stream.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    return JSONResponse(await stream.result(request))


def _admit(engine, config: ServerConfig, new: int) -> None:
    """429 unless ``new`` more sequences leave at most ``max_queue`` beyond the ``max_num_seqs`` running places.

    Counted from all the engine's sequences, not from those outside the running batch: the engine takes new
    sequences in only at the start of a step, so a request arriving while a step runs would otherwise be counted as
    waiting although the batch has a place for it, and refusals would depend on the step thread's timing."""
    places = engine.config.max_num_seqs
    if new > places + config.max_queue:
        raise APIError(400, f"this request makes {new} sequences (prompts x n); the server takes at most "
                            f"{places + config.max_queue} at once ({places} running + {config.max_queue} queued)",
                       param="n")  # fmt: skip
    held = engine.num_sequences
    if held + new > places + config.max_queue:
        raise APIError(
            429, f"server busy: {held} sequences are running or queued for {places} places in the batch and "
                 f"{config.max_queue} in the queue; retry later", "rate_limit_error", code="queue_full",
        )  # fmt: skip


def checkpoint_name(ckpt: str) -> str:
    """The default model name: the run directory's name (``runs/demo`` -> ``demo``)."""
    path = Path(ckpt).resolve()
    if path.parent.name == "checkpoints":
        path = path.parent.parent
    return path.name
