"""Where a served step's time goes: the engine's steps inside ``sparselm serve`` against the same engine driven alone.

One process runs the server (uvicorn in a thread, as ``sparselm serve`` builds it) with its engine's ``step``
wrapped to record wall time and the engine thread's CPU time per step; a second process drives it with serve_load.py
at a fixed concurrency (as benchmarks/serve.py does). Then, in the server's process, the same requests run through
the engine alone at the same concurrency (a new request joins as one finishes). Reported per engine step: wall ms in
the server and alone, the engine thread's CPU ms, the event-loop thread's CPU ms, the client process's CPU ms.
``--profile`` adds cProfile of the event-loop thread (top functions by own time).

    python benchmarks/serve_profile.py [--case demo-moe] [--concurrency 16] [--requests 32] [--threads 2]
        [--step-threads auto] [--plain-uvicorn] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from serve import build, make_requests, save, tokenizer_and_text
from serve_load import Request, run_load, summarize
from sparselm.precision import resolve_precision
from sparselm.serve.command import bound_kernel_caches
from sparselm.serve.sequence import Status


def thread_cpu(ident: int) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def client_main(base: str, path: str, concurrency: int) -> None:
    requests = [Request(**r) for r in json.loads(Path(path).read_text())]
    before = resource.getrusage(resource.RUSAGE_SELF)
    results, seconds = asyncio.run(run_load(base, requests, "bench", concurrency=concurrency, timeout=3600))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(json.dumps({**summarize(results, seconds), "cpu_seconds": cpu}))


def alone(engine, requests: list[Request], concurrency: int) -> dict:
    """The same requests through the engine alone, ``concurrency`` in flight; -> per-step wall and tokens/s."""
    from sparselm.serve.params import SamplingParams

    pending = list(enumerate(requests))
    running, times, tokens = [], [], 0
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < concurrency:
            i, r = pending.pop(0)
            params = SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
            running.append(engine.add_request(f"alone-{i}", r.prompt, params))
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
        for s in [s for s in running if s.status is Status.FINISHED]:
            tokens += len(s.output)
            running.remove(s)
    seconds = time.perf_counter() - start
    return {"steps": len(times), "step_ms": 1e3 * sum(times) / len(times), "output_throughput": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="demo-moe")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-threads", default=None, help="the server's --step-threads (a tree that has it)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--plain-uvicorn", action="store_true", help="asyncio + h11 even where uvloop and httptools are")
    ap.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return client_main(args.client[0], args.client[1], int(args.client[2]))
    bound_kernel_caches()
    torch.set_num_threads(args.threads)
    import uvicorn

    from sparselm.serve.api import ServerConfig, ServerState, create_app
    from sparselm.serve.params import EngineConfig

    tokenizer, ids, _ = tokenizer_and_text()
    model, cfg, _ = build(args.case, None, tokenizer.vocab_size)
    work = Path(tempfile.mkdtemp(prefix="serve-profile-"))
    ckpt = save(model, cfg, tokenizer, work / args.case)
    del model
    requests = make_requests(ids, args.requests, seed=1, eod=tokenizer.eod_id)
    engine_cfg = {"max_num_seqs": 64, "precision": resolve_precision(args.precision, torch.device("cpu"))}
    if args.step_threads is not None:
        engine_cfg["step_threads"] = args.step_threads
    config = ServerConfig(ckpt=str(ckpt), model_name="bench", engine=EngineConfig(**engine_cfg), max_queue=100000,
                          threads=args.threads)  # fmt: skip
    state = ServerState(config)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plain = {"loop": "asyncio", "http": "h11"} if args.plain_uvicorn else {}
    server = uvicorn.Server(uvicorn.Config(create_app(config, state), port=port, log_level="warning", **plain))
    profiler = cProfile.Profile() if args.profile else None
    loop_ident = []

    def serve() -> None:
        loop_ident.append(threading.get_ident())
        if profiler:
            profiler.runcall(server.run)
        else:
            server.run()

    threading.Thread(target=serve, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    while state.status != "ready":
        if state.status == "failed":
            raise SystemExit(state.error)
        time.sleep(0.1)
    while True:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    engine = state.engine
    steps: list[tuple[float, float, int]] = []  # wall, engine-thread CPU, running sequences
    step = engine.step

    def timed_step():
        t, c = time.perf_counter(), time.thread_time()
        out = step()
        steps.append((time.perf_counter() - t, time.thread_time() - c, len(engine.scheduler.running)))
        return out

    engine.step = timed_step
    # warm-up: a few requests, not counted
    warm = work / "warm.json"
    warm.write_text(json.dumps([r.__dict__ for r in requests[:4]]))
    subprocess.run([sys.executable, __file__, "--client", base, str(warm), "4"], check=True, capture_output=True)
    steps.clear()
    load = work / "load.json"
    load.write_text(json.dumps([r.__dict__ for r in requests]))
    loop_cpu0, engine_cpu0 = thread_cpu(loop_ident[0]), thread_cpu(state.loop.thread.ident)
    client = subprocess.run([sys.executable, __file__, "--client", base, str(load), str(args.concurrency)],
                            capture_output=True, text=True)  # fmt: skip
    if client.returncode:
        raise SystemExit(f"the load generator failed: {client.stderr[-2000:]}")
    loop_cpu = thread_cpu(loop_ident[0]) - loop_cpu0
    engine_cpu = thread_cpu(state.loop.thread.ident) - engine_cpu0
    served = json.loads(client.stdout.strip().splitlines()[-1])
    wall = served["seconds"]  # the load alone (the client's start-up is not in it; the CPU figures include it)
    server.should_exit = True
    time.sleep(1.0)
    state.loop.stop()
    engine.step = step
    engine.on_outputs = None  # (a tree that has it) the server's event loop is gone
    n = len(steps)
    full = [s for s in steps if s[2] >= args.concurrency - 1]
    report = {
        "case": args.case,
        "concurrency": args.concurrency,
        "threads": args.threads,
        "torch_threads_now": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0],
        "served_output_throughput": served["output_throughput"],
        "served_tpot_p50": served["tpot_ms"]["p50"],
        "server_steps": n,
        "server_step_ms": 1e3 * sum(s[0] for s in steps) / n,
        "server_step_ms_full_batch": 1e3 * sum(s[0] for s in full) / max(1, len(full)),
        "engine_thread_cpu_ms_per_step": 1e3 * engine_cpu / n,
        "engine_step_cpu_ms_per_step": 1e3 * sum(s[1] for s in steps) / n,
        "engine_idle_ms_per_step": 1e3 * (wall - sum(s[0] for s in steps)) / n,
        "loop_thread_cpu_ms_per_step": 1e3 * loop_cpu / n,
        "client_cpu_ms_per_step": 1e3 * served["cpu_seconds"] / n,  # during the load
    }
    a = alone(engine, requests, args.concurrency)
    report.update(alone_steps=a["steps"], alone_step_ms=a["step_ms"], alone_output_throughput=a["output_throughput"])
    print(json.dumps(report, indent=1))
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue())


if __name__ == "__main__":
    main()
