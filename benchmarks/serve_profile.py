"""Where a served step's time goes: the engine's steps inside ``sparselm serve`` against the same engine driven alone.

``sparselm serve`` runs as a child process (its engine in a process of its own), driven by serve_load.py from a
second child at a fixed concurrency, as benchmarks/serve.py does. The server's /metrics give its engine's steps and
their wall time; /proc gives the CPU time of the server's process (the HTTP side), of its engine process, and the
load generator reports its own. Then, in this process, the same requests run through the engine alone at the same
concurrency (a new request joins as one finishes). Reported per engine step: wall ms in the server and alone, the
engine process's CPU ms, the HTTP process's CPU ms, the load generator's CPU ms; and of the engine alone's time, the
share of steps that carried a prompt chunk and of decode-only steps by how many sequences ran (the load's tail).

    python benchmarks/serve_profile.py [--case demo-moe] [--concurrency 16] [--requests 32] [--threads 2]
        [--step-threads auto] [--precision auto]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from serve import Server, build, make_requests, save, tokenizer_and_text
from serve_load import Request, run_load, summarize
from sparselm.precision import resolve_precision
from sparselm.serve.command import bound_kernel_caches
from sparselm.serve.sequence import Status


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_main(base: str, path: str, concurrency: int) -> None:
    requests = [Request(**r) for r in json.loads(Path(path).read_text())]
    before = resource.getrusage(resource.RUSAGE_SELF)
    results, seconds = asyncio.run(run_load(base, requests, "bench", concurrency=concurrency, timeout=3600))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(json.dumps({**summarize(results, seconds), "cpu_seconds": cpu}))


def step_kind(plan: list) -> str:
    """A step's plan (sequence, tokens fed) -> what kind of step it was."""
    if sum(n for _, n in plan) > len(plan):
        return "prefill"
    if len(plan) <= 4:
        return "decode, 1-4 sequences"
    return "decode, 5-15 sequences" if len(plan) < 16 else "decode, 16+ sequences"


def alone(engine, requests: list[Request], concurrency: int) -> dict:
    """The same requests through the engine alone, ``concurrency`` in flight; -> per-step wall, tokens/s, and where
    the steps' time went: steps that carried a prompt chunk, and decode-only steps by how many sequences ran."""
    from sparselm.serve.params import SamplingParams

    schedule, plans = engine.scheduler.schedule, []
    engine.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    pending = list(enumerate(requests))
    running, times, tokens, kinds = [], [], 0, []
    start = time.perf_counter()
    try:
        while pending or running:
            while pending and len(running) < concurrency:
                i, r = pending.pop(0)
                params = SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
                running.append(engine.add_request(f"alone-{i}", r.prompt, params))
            plans.clear()
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
            plan = plans[-1] if plans else []
            kinds.append(step_kind(plan))
            for s in [s for s in running if s.status is Status.FINISHED]:
                tokens += len(s.output)
                running.remove(s)
    finally:
        del engine.scheduler.schedule  # back to the class's method
    seconds = time.perf_counter() - start
    share = {}
    for label in ("prefill", "decode, 1-4 sequences", "decode, 5-15 sequences", "decode, 16+ sequences"):
        picked = [t for t, k in zip(times, kinds, strict=True) if k == label]
        share[label] = {"steps": len(picked), "seconds": sum(picked), "share": sum(picked) / seconds}
    return {"steps": len(times), "step_ms": 1e3 * sum(times) / len(times), "output_throughput": tokens / seconds,
            "time_by_step_kind": share}  # fmt: skip


def engine_counters(server: Server) -> tuple[float, float]:
    """-> (engine steps, engine wall seconds inside steps) from the server's /metrics."""
    m = server.metrics()
    seconds = sum(v for k, v in m.items() if k.startswith("sparselm_engine_seconds_total"))
    return m["sparselm_engine_steps_total"], seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="demo-moe")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-threads", default=None, help="the server's --step-threads")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return client_main(args.client[0], args.client[1], int(args.client[2]))
    bound_kernel_caches()
    torch.set_num_threads(args.threads)
    from sparselm.serve.engine import Engine
    from sparselm.serve.params import EngineConfig

    precision = resolve_precision(args.precision, torch.device("cpu"))
    tokenizer, ids, _ = tokenizer_and_text()
    model, cfg, _ = build(args.case, None, tokenizer.vocab_size)
    work = Path(tempfile.mkdtemp(prefix="serve-profile-"))
    ckpt = save(model, cfg, tokenizer, work / args.case)
    requests = make_requests(ids, args.requests, seed=1, eod=tokenizer.eod_id)
    extra = ["--max-num-seqs", "64", "--max-queue", "100000"]
    if args.step_threads is not None:
        extra += ["--step-threads", args.step_threads]
    if args.case != "demo-moe":
        extra += ["--kv-cache-memory", "1GiB"]
    server = Server(ckpt, precision, args.threads, extra)
    try:
        http_pid, engine_pid = server.processes()
        warm = work / "warm.json"  # a few requests, not counted
        warm.write_text(json.dumps([r.__dict__ for r in requests[:4]]))
        subprocess.run([sys.executable, __file__, "--client", server.base, str(warm), "4"], check=True,
                       capture_output=True)  # fmt: skip
        load = work / "load.json"
        load.write_text(json.dumps([r.__dict__ for r in requests]))
        steps0, seconds0 = engine_counters(server)
        http0, engine0 = process_cpu(http_pid), process_cpu(engine_pid)
        client = subprocess.run([sys.executable, __file__, "--client", server.base, str(load), str(args.concurrency)],
                                capture_output=True, text=True)  # fmt: skip
        if client.returncode:
            raise SystemExit(f"the load generator failed: {client.stderr[-2000:]}")
        http_cpu, engine_cpu = process_cpu(http_pid) - http0, process_cpu(engine_pid) - engine0
        steps1, seconds1 = engine_counters(server)  # (the scrape itself is not in the CPU figures above)
    finally:
        server.stop()
    served = json.loads(client.stdout.strip().splitlines()[-1])
    n = steps1 - steps0
    report = {
        "case": args.case,
        "concurrency": args.concurrency,
        "threads": args.threads,
        "load_avg": os.getloadavg()[0],
        "served_output_throughput": served["output_throughput"],
        "served_tpot_p50": served["tpot_ms"]["p50"],
        "server_steps": n,
        "server_step_ms": 1e3 * (seconds1 - seconds0) / n,
        "engine_process_cpu_ms_per_step": 1e3 * engine_cpu / n,
        "engine_idle_ms_per_step": 1e3 * (served["seconds"] - (seconds1 - seconds0)) / n,
        "http_process_cpu_ms_per_step": 1e3 * http_cpu / n,
        "client_cpu_ms_per_step": 1e3 * served["cpu_seconds"] / n,  # during the load
    }
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=64, precision=precision))
    alone(engine, requests[:4], 4)  # the same warm-up as the server's
    a = alone(engine, requests, args.concurrency)
    report.update(alone_steps=a["steps"], alone_step_ms=a["step_ms"], alone_output_throughput=a["output_throughput"])
    report["alone_time_by_step_kind"] = a["time_by_step_kind"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
