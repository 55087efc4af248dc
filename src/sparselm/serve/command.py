"""``sparselm serve``: arguments and the verb itself. Imports nothing heavy at module level (the CLI builds its parser
from here on every start).

The checkpoint's config, the precision and the KV-cache size are checked before the server starts (a bad one exits
with status 2 and one line); the weights then load in the background while ``/health`` answers 503. SIGTERM (or
Ctrl-C) stops accepting connections, lets requests in flight finish for up to ``--drain-timeout`` seconds, aborts
what is left, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from sparselm.config import PRECISIONS
from sparselm.serve.params import EngineConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="name clients use in 'model' (default: the run directory's name)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="weights and KV cache: auto (bf16 where this CPU computes it natively, else fp32), bf16 or fp32",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="KV cache: auto (the weights' dtype; fp32 on a CPU where the paged decode kernel cannot be built, as "
        "PyTorch's attention reads fp32 keys faster), bf16 (half the memory) or fp32",
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch at most")
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        default=EngineConfig.max_batched_tokens,
        help="tokens per step: one per decoding sequence + prefill chunks (lower it to bound how long a prompt "
        "chunk stalls the decoding sequences)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument(
        "--kv-cache-memory",
        default="0",
        help="bytes for the KV cache, e.g. 2GiB (default: room for --max-num-seqs sequences of the model's context)",
    )
    p.add_argument("--no-prefix-caching", action="store_true", help="do not share the blocks of repeated prefixes")
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="sequences waiting for one of the --max-num-seqs running places beyond which requests get 429",
    )
    p.add_argument("--max-body-bytes", default="1MiB", help="largest request body (bigger ones get 413)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file (default: see docs/serving.md)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads at most (default: torch's choice)")
    p.add_argument(
        "--step-threads",
        default="auto",
        help="torch threads per engine step: auto (one for small steps, leaving a core to the HTTP side; all "
        "--threads for large ones: docs/serving.md) or a number for every step",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the seeds of requests that bring none")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def build(args: argparse.Namespace):
    """Check everything that can be checked without the weights -> (ServerConfig, ServerState)."""
    from sparselm.checkpoint.files import load_config_from_checkpoint, resolve_checkpoint
    from sparselm.errors import InputError
    from sparselm.serve.api import ServerConfig, ServerState, checkpoint_name
    from sparselm.serve.engine import kv_cache_blocks, paged_kernel_refusal
    from sparselm.serve.params import parse_bytes

    ckpt = resolve_checkpoint(args.ckpt)
    cfg = load_config_from_checkpoint(ckpt)
    engine = EngineConfig(
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
        kv_cache_memory=parse_bytes(args.kv_cache_memory),
        prefix_caching=not args.no_prefix_caching,
        precision=args.precision,
        seed=args.seed,
        step_threads=args.step_threads,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    for name in ("max_queue", "port"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0")
    import torch

    from sparselm.precision import kv_cache_dtype, resolve_precision

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, torch.device("cpu"), warn=logging.getLogger("sparselm.serve").warning)
    weights = torch.bfloat16 if precision == "bf16" else torch.float32
    cpu = torch.device("cpu")
    paged = paged_kernel_refusal(cfg.model, cpu) is None
    kv_cache_blocks(cfg.model, engine, kv_cache_dtype(weights, cpu, engine.kv_cache_dtype, paged))
    engine.precision = precision  # resolved once: the engine does not measure again
    config = ServerConfig(
        ckpt=str(ckpt),
        model_name=args.model_name or checkpoint_name(args.ckpt),
        engine=engine,
        max_queue=args.max_queue,
        max_body_bytes=parse_bytes(args.max_body_bytes),
        chat_template=args.chat_template,
        threads=args.threads,
    )
    return config, ServerState(config)


# oneDNN, which computes bf16 matmuls on CPU, keeps a compiled kernel for every distinct operand shape in two LRU
# caches (its own and PyTorch's ideep one), 1,024 entries each by default, about 0.3 MB per entry. A server's steps
# have ever-new shapes (the batch's token count, each expert's row count), so those caches grew the server by half a
# gigabyte before they filled; capped here, they stop at a few tens of MB (docs/benchmarks.md, serving notes).
KERNEL_CACHE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}


def bound_kernel_caches() -> None:
    """Cap oneDNN's kernel caches unless the environment already sets them (both are read at the first matmul)."""
    for name, value in KERNEL_CACHE_ENV.items():
        os.environ.setdefault(name, value)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from sparselm.errors import InputError

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"sparselm serve needs {', '.join(missing)}: pip install 'sparselm[serve]'")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bound_kernel_caches()
    config, state = build(args)
    import uvicorn

    from sparselm.serve.api import create_app

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.status != "failed":
                state.status = "draining"  # /health says so and new requests get 503 while in-flight ones finish
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            create_app(config, state),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.drain_timeout,
            lifespan="on",
        )
    )
    failure: list[str] = []

    def on_failure(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    state.on_failure = on_failure
    # uvicorn re-raises the signal that stopped it once it has shut down, which would end the process with that
    # signal's status; a handler that ignores it makes a clean drain exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if failure:
        print(f"sparselm: error: {failure[0]}", file=sys.stderr)
        return 2
    return 0
