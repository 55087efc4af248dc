"""The engine in a process of its own (``run_engine``), and the server's handle on it (``EngineProcess``).

Why a process: in the server's process the engine's torch threads shared the GIL and the two cores with the HTTP
side (event loop, JSON, server-sent events). Whenever the event loop held the GIL or took a core, the rest of the
step's OpenMP team waited at its barrier, and a served step took 1.4-1.5x the engine's own (docs/benchmarks.md,
"Server overhead"). In a process of its own the engine shares only the cores. vLLM's engine core is split from its
API server for the same reason.

Messages go through one ``multiprocessing`` pipe, pickled. Server to engine: ``("add", request_id, prompt, params,
index, arrival)``, ``("abort", request_id)``, ``("stop",)``. Engine to server: ``("ready", EngineInfo)`` or
``("failed", message)`` once loading ends, then ``("step", outputs, snapshot)`` after every step, and ``("error",
message)`` if a step raises (the process then exits). A sequence's first and last outputs carry its
``SequenceRecord`` (prompt, output, logprobs, text, latencies); those in between carry ``None``, so each step sends
what it produced rather than every sequence's history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sparselm.serve.engine import EngineSnapshot, check_prompt
from sparselm.serve.params import EngineConfig, SamplingParams
from sparselm.serve.sequence import SequenceOutput

log = logging.getLogger("sparselm.serve")


class EngineStartError(Exception):
    """The engine process could not load the model (the message says why)."""


class EngineGone(Exception):
    """The engine process is no longer there to take a request."""


@dataclass
class EngineInfo:
    """What the server needs to know of the loaded engine."""

    precision: str
    kv_dtype: str
    vocab_size: int
    max_seq_len: int
    num_blocks: int
    block_size: int
    kv_bytes: int
    pid: int
    snapshot: EngineSnapshot
    decode_attention: str = ""  # what decoding sequences attend through, and why
    decode_matmuls: str = ""  # what a step's few-row matmuls go through, and why
    prompt_attention: str = ""  # what prompt chunks attend through, and why


class EngineProcess:
    """Starts the engine process and talks to it: ``add_request``, ``abort`` and ``check_prompt`` as on ``Engine``;
    each step's outputs go to ``on_outputs`` (from a reader thread), a failure's message to ``on_error``."""

    def __init__(
        self,
        ckpt: str,
        config: EngineConfig,
        threads: int,
        on_outputs: Callable[[list[SequenceOutput]], None],
        on_error: Callable[[str], None],
    ) -> None:
        self.ckpt, self.config, self.threads = ckpt, config, threads
        self.on_outputs, self.on_error = on_outputs, on_error
        self.info: EngineInfo | None = None
        self.process = None
        self._conn = None
        self._reader: threading.Thread | None = None
        self._snapshot: EngineSnapshot | None = None
        self._num_sequences = 0  # added and not yet seen finished (changed under _count_lock)
        self._count_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ended = False  # stopped on purpose, or its failure already reported

    def start(self) -> EngineInfo:
        """Start the process and wait until it has loaded the model; EngineStartError if it could not."""
        context = multiprocessing.get_context("spawn")  # a forked child would inherit this process's threads
        conn, child_conn = context.Pipe()
        args = (child_conn, self.ckpt, self.config, self.threads, log.getEffectiveLevel())
        self.process = context.Process(target=run_engine, args=args, name="sparselm-engine", daemon=True)
        self.process.start()
        child_conn.close()  # so that recv sees the end of the pipe if the child dies
        self._conn = conn
        try:
            kind, payload = conn.recv()
        except EOFError:
            self.process.join()
            status = self.process.exitcode
            raise EngineStartError(f"the engine process died while loading (exit status {status})") from None
        if kind == "failed":
            self.process.join()
            raise EngineStartError(payload)
        self.info, self._snapshot = payload, payload.snapshot
        self._reader = threading.Thread(target=self._read, name="sparselm-engine-outputs", daemon=True)
        self._reader.start()
        return payload

    @property
    def max_seq_len(self) -> int:
        return self.info.max_seq_len

    @property
    def precision(self) -> str:
        return self.info.precision

    @property
    def num_sequences(self) -> int:
        """Sequences added and not yet finished, counted here: exact whatever the engine is doing."""
        return self._num_sequences

    def snapshot(self) -> EngineSnapshot:
        """The engine's state after its latest step."""
        return self._snapshot

    def check_prompt(self, prompt: list[int]) -> None:
        check_prompt(prompt, self.info.vocab_size, self.info.max_seq_len)

    def add_request(
        self, request_id: str, prompt: list[int], params: SamplingParams, index: int = 0, arrival: float | None = None
    ) -> None:
        self.check_prompt(prompt)
        with self._count_lock:
            self._num_sequences += 1
        arrival = time.monotonic() if arrival is None else arrival  # the same clock in both processes
        try:
            self._send(("add", request_id, list(prompt), params, index, arrival))
        except EngineGone:
            with self._count_lock:
                self._num_sequences -= 1
            raise

    def abort(self, request_id: str) -> None:
        with contextlib.suppress(EngineGone):  # nothing left to cancel
            self._send(("abort", request_id))

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the engine to exit (what is still running is dropped) and wait for it; kill it after ``timeout``."""
        self._ended = True
        if self.process is None:
            return
        with contextlib.suppress(EngineGone):
            self._send(("stop",))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        if self._reader is not None:
            self._reader.join(timeout)

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError) as exc:  # broken pipe, or closed
                raise EngineGone(f"the engine process is gone (exit status {self.process.exitcode})") from exc

    def _read(self) -> None:
        """(reader thread) Each step's outputs to ``on_outputs``; a failure or an unexpected exit to ``on_error``."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self.process.join(5)
                self._failed(f"the engine process exited (status {self.process.exitcode})")
                return
            if message[0] == "error":
                self._failed(message[1])
                continue  # the process exits next: the pipe's end follows
            _, outputs, self._snapshot = message
            finished = sum(out.finished for out in outputs)
            if finished:
                with self._count_lock:
                    self._num_sequences -= finished
            if outputs:
                self.on_outputs(outputs)

    def _failed(self, message: str) -> None:
        if not self._ended:
            self._ended = True
            self.on_error(message)


# --------------------------------------------------------------------------------------------- the engine process
def run_engine(conn, ckpt: str, config: EngineConfig, threads: int, log_level: int) -> None:
    """The engine process: load the checkpoint, say ready (or why not), then step while there is work. It ends when
    the server's end of the pipe closes, which the kernel does however the server ends (PR_SET_PDEATHSIG would fire
    when the *thread* that started the process ends, here the server's loading thread)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s (engine): %(message)s")
    import torch

    from sparselm.checkpoint.inference import load_checkpoint
    from sparselm.errors import CheckpointError, InputError
    from sparselm.serve.engine import Engine

    if threads > 0:
        torch.set_num_threads(threads)
    try:
        model, _, tokenizer = load_checkpoint(ckpt)
        engine = Engine(model, tokenizer, config, warn=log.warning)
    except (InputError, CheckpointError, FileNotFoundError) as exc:
        conn.send(("failed", str(exc)))
        return
    except Exception as exc:  # a bug: keep the traceback in the log
        log.exception("loading the model failed")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    cfg = model.cfg
    info = EngineInfo(
        engine.precision, str(engine.kv_dtype).removeprefix("torch."), cfg.vocab_size, cfg.max_seq_len,
        engine.pool.num_blocks, config.block_size, engine.kv_bytes, os.getpid(), engine.snapshot(),
        engine.decode_attention, engine.decode_matmuls, engine.prompt_attention,
    )  # fmt: skip
    conn.send(("ready", info))
    try:
        _serve(engine, conn)
    except (EOFError, BrokenPipeError):
        return  # the server is gone
    except Exception as exc:
        log.exception("engine step failed")
        conn.send(("error", f"engine failed: {exc!r}"))


def _serve(engine, conn) -> None:
    recorded: set[int] = set()  # sequences whose record went out with their first output
    while True:
        if not engine.has_work():
            engine.release_threads()
            conn.poll(None)  # sleep until the server sends something
        while conn.poll(0):
            message = conn.recv()
            if message[0] == "add":
                request_id, prompt, params, index, arrival = message[1:]
                engine.add_request(request_id, prompt, params, index=index, arrival=arrival)
            elif message[0] == "abort":
                engine.abort(message[1])
            elif message[0] == "stop":
                return
        if engine.has_work():
            outputs = [_portable(out, recorded) for out in engine.step()]
            conn.send(("step", outputs, engine.snapshot()))


def _portable(out: SequenceOutput, recorded: set[int]) -> SequenceOutput:
    seq = out.seq
    first = seq.seq_id not in recorded
    if out.finished:
        recorded.discard(seq.seq_id)
    elif first:
        recorded.add(seq.seq_id)
    return dataclasses.replace(out, seq=seq.record() if first or out.finished else None)
