"""Serving under load: ``sparselm serve`` against requests one at a time through ``generate`` and static batches of 16
through Hugging Face transformers' ``generate``, same prompts, same model, same run.

For each model (the demo MoE of configs/default.toml with its context raised to 1,024, and a d_model 512, 8-layer,
16-expert top-2 MoE; random weights unless ``--ckpt`` gives a trained demo run):
1. in this process: a breakdown of the engine's decode step by component at 1 and 16 sequences;
2. ``sparselm serve`` in a subprocess on a loopback port, driven by serve_load.py at fixed concurrency 1, 4, 16,
   64 and with Poisson arrivals at 0.5x and 1x the request rate reached at concurrency 16;
3. ``--rounds`` rounds (default 3) of, in turn: 16 requests one at a time through ``generate`` and in static
   batches of 16 through the HF model that ``sparselm.interop.to_transformers`` builds from the same weights, in
   this process while the server idles, then 32 requests through the server at concurrency 16. The target ratios
   are the medians of the rounds' ratios. The concurrency-1 load
   alternates with this process timing the bare decode forward (one token through the model's contiguous KV cache,
   what ``generate`` does per step) over the same request, the server idle meanwhile: TPOT at concurrency 1 is set
   against that forward measured in the same seconds.
Prompts are 32-512 tokens cut at fixed-seed offsets from held-out text (the validation split of
data_cache/default if `make demo` prepared it, else the last embedded book); outputs are 32-256 tokens, forced with
``ignore_eos``, greedy. ``--soak`` adds a long mixed run (streaming or not, 10% cancelled mid-stream, 5% malformed)
checking that every well-formed request completes, every KV block is free at the end and RSS stays flat.

    python benchmarks/serve.py [--json] [--quick] [--soak] [--write-docs] [--cases demo-moe,moe-d512-l8-e16]
        [--precisions fp32,bf16] [--rounds 3] [--report FILE]
    python benchmarks/serve.py --docs-from FILE,FILE [--write-docs]     # one table from runs made one case each
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from serve_load import Request, percentiles, run_load, summarize
from serve_report import breakdown, format_docs, write_docs
from sparselm.config import apply_overrides, load_config
from sparselm.model.generate import SamplingConfig, generate
from sparselm.model.transformer import Transformer
from sparselm.precision import kv_cache_dtype, resolve_precision
from sparselm.serve.engine import paged_kernel_refusal

REPO = Path(__file__).resolve().parents[1]
D512 = ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.d_ff=1408", "moe.num_experts=16",
        "moe.d_ff_expert=704"]  # fmt: skip
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=128", "moe.d_ff_expert=64"]
CASES = {"demo-moe": [], "moe-d512-l8-e16": D512, "tiny-moe": TINY}  # tiny-moe: the smoke test's
CONTEXT = ["model.max_seq_len=1024"]  # prompts up to 512 + outputs up to 256 (RoPE has no learned positions)


def tokenizer_and_text(tok_path: Path | None = None):
    """The demo tokenizer (trained as `make demo` does if missing) and held-out token ids."""
    from sparselm.data.tokenizer import Tokenizer

    tok_path = tok_path or REPO / "data_cache" / "tokenizer.model"
    if not tok_path.is_file():
        subprocess.run([sys.executable, "-m", "sparselm", "tokenizer", "train", "--out", str(tok_path.with_suffix("")),
                        "--vocab-size", "8192"], check=True)  # fmt: skip
    tokenizer = Tokenizer.load(tok_path)
    prepared = REPO / "data_cache" / "default"
    if (prepared / "meta.json").is_file():
        from sparselm.data.loader import TokenShards

        val = TokenShards(prepared, "val")
        # Only ids of this very tokenizer: another one's ids may lie outside the model's vocabulary.
        if val.tokenizer_path.read_bytes() == Path(tok_path).read_bytes():
            ids = val.window(0, len(val)).astype(np.int64).tolist()
            return tokenizer, ids, "the validation split of data_cache/default"
    from sparselm.corpus import default_corpus_files
    from sparselm.data.reader import iter_documents

    book = list(iter_documents(default_corpus_files()[-1:]))[0]
    return tokenizer, tokenizer.encode(book.text), f"the embedded book {default_corpus_files()[-1].name}"


def make_requests(ids: list[int], count: int, seed: int, eod: int) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(32, 512)
        start = rng.randrange(0, len(ids) - length)
        prompt = [t if t != eod else eod - 1 for t in ids[start : start + length]]
        out.append(Request(prompt, rng.randint(32, 256)))
    return out


def build(case: str, ckpt: str | None, vocab: int):
    if ckpt:
        from sparselm.checkpoint.inference import load_checkpoint

        model, cfg, _ = load_checkpoint(ckpt)
        cfg = apply_overrides(cfg, CONTEXT)
        model.cfg.max_seq_len = cfg.model.max_seq_len
        return model, cfg, "trained (" + ckpt + ")"
    cfg = apply_overrides(
        load_config(REPO / "configs" / "default.toml"), [*CONTEXT, *CASES[case], f"model.vocab_size={vocab}"]
    )
    torch.manual_seed(0)
    return Transformer(cfg.model, cfg.moe).eval(), cfg, "random weights"


def save(model, cfg, tokenizer, directory: Path) -> Path:
    from sparselm.checkpoint.files import save_checkpoint
    from sparselm.parallel.runtime import Runtime

    save_checkpoint(directory, 0, model, cfg, Runtime(cfg, torch.device("cpu")), tokenizer_path=tokenizer.path)
    return directory


def bare_decode_ms(model, requests: list[Request], dtype) -> dict:
    """Per-token time of the model's forward alone (one token, contiguous KV cache) over these requests' decodes."""
    return percentiles(bare_decode_seconds(model, requests, dtype))


@torch.inference_mode()
def bare_decode_seconds(model, requests: list[Request], dtype) -> list[float]:
    times = []
    for r in requests:
        cache = model.new_cache(1, len(r.prompt) + r.max_tokens, dtype=kv_cache_dtype(dtype, torch.device("cpu")))
        logits = model(torch.tensor([r.prompt]), cache=cache, last_only=True).logits
        for _ in range(r.max_tokens - 1):
            token = logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            logits = model(token, cache=cache, last_only=True).logits
            times.append(time.perf_counter() - start)
    return times


def concurrency_one_paired(server, model, requests: list[Request], dtype) -> tuple[dict, dict]:
    """Each request through the idle server, then its decode through the bare forward in this process, in turn: this
    VM's speed drifts by up to ~25% over minutes, so the server's TPOT and the forward it is set against are
    measured in the same seconds. -> (the load's summary, the bare forward's percentiles over all these decodes)."""
    results, seconds, bare = [], 0.0, []
    for request in requests:
        done, took = asyncio.run(run_load(server.base, [request], "bench", concurrency=1))
        results += done
        seconds += took
        bare += bare_decode_seconds(model, [request], dtype)
    return summarize(results, seconds), percentiles(bare)


def one_at_a_time(model, requests: list[Request]) -> dict:
    start = time.perf_counter()
    tokens = 0
    for r in requests:
        cfg = SamplingConfig(max_new_tokens=r.max_tokens, greedy=True, stop_on_eod=False)
        tokens += len(generate(model, [r.prompt], cfg)[0])
    seconds = time.perf_counter() - start
    return {"system": "sparselm generate, one at a time", "requests": len(requests), "seconds": seconds,
            "output_throughput": tokens / seconds, "load_avg": os.getloadavg()[0]}  # fmt: skip


def hf_static_batches(model, cfg, requests: list[Request], dtype, batch: int = 16) -> dict:
    row = {"system": f"transformers generate, static batches of {batch}", "requests": len(requests)}
    try:
        from sparselm.interop import to_transformers
    except ImportError:
        row["not_measured"] = "sparselm.interop.to_transformers is not on this branch yet"
        return row
    hf = to_transformers(model, cfg).to(dtype)
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(requests), batch):
        group = requests[i : i + batch]
        width = max(len(r.prompt) for r in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row_i, r in enumerate(group):
            ids[row_i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[row_i, width - len(r.prompt) :] = 1
        longest = max(r.max_tokens for r in group)
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                        do_sample=False, pad_token_id=0)  # fmt: skip
        tokens += sum(r.max_tokens for r in group)  # what the requests asked for; the rest of the batch is waste
    seconds = time.perf_counter() - start
    row.update(seconds=seconds, output_throughput=tokens / seconds, load_avg=os.getloadavg()[0])
    return row


def _die_with_parent() -> None:
    """In the server child: get SIGTERM if this benchmark dies, so no server outlives it."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """``sparselm serve`` in a child process. ``launch`` replaces ``-m sparselm`` (serve_compare.py runs other
    trees and uvicorn settings through it), ``env`` adds to the environment."""

    def __init__(self, ckpt: Path, precision: str, threads: int, extra: list[str], launch: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, *(launch or ["-m", "sparselm"]), "serve", "--ckpt", str(ckpt), "--port", str(self.port),
               "--precision", precision, "--threads", str(threads), "--log-level", "warning", "--model-name", "bench",
               *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.base}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("server did not become healthy")

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(f"{self.base}/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def processes(self) -> list[int]:
        """The server's process and its engine process."""
        pids = [self.proc.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and b"spawn_main" in cmdline:
                pids.append(int(stat.parent.name))
        return pids

    def rss_mb(self) -> float:
        """Resident memory of the server and its engine process together."""
        total = 0.0
        for pid in self.processes():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        return total

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=120)


def soak(server: Server, ids: list[int], eod: int, count: int, concurrency: int) -> dict:
    """Mixed traffic: half streaming, 10% cancelled mid-stream, 5% malformed; then the server must be idle."""
    rng = random.Random(7)
    requests = make_requests(ids, count, seed=11, eod=eod)
    bad = [b'{"prompt": [1, 2', {"prompt": "x", "max_tokens": "ten"}, {"prompt": "x", "max_tokens": 0},
           {"prompt": "x", "model": "nope"}, {"prompt": list(range(3, 1100))}]  # fmt: skip
    for i, r in enumerate(requests):
        r.stream = rng.random() < 0.5
        if i % 20 == 7:
            r.malformed = bad[(i // 20) % len(bad)]
        elif i % 10 == 3:
            r.stream, r.cancel_after = True, rng.randint(2, 20)
    warm = count // 10
    half = warm + (count - warm) // 2
    results, _ = asyncio.run(run_load(server.base, requests[:warm], "bench", concurrency=concurrency))
    rss = [server.rss_mb()]
    seconds = 0.0
    for part in (requests[warm:half], requests[half:]):  # RSS after each half: still growing, or flat?
        done, took = asyncio.run(run_load(server.base, part, "bench", concurrency=concurrency, timeout=3600))
        results += done
        seconds += took
        rss.append(server.rss_mb())
    time.sleep(1.0)  # aborted requests are freed at the start of the next step; the engine idles after
    m = server.metrics()
    pairs = list(zip(results, requests, strict=True))  # the warm-up's requests count too: it is the same traffic
    well_formed = [r for r, q in pairs if q.malformed is None and q.cancel_after is None]
    return {
        "requests": count,
        "seconds": seconds,
        "well_formed_completed": sum(r.ok for r in well_formed),
        "well_formed": len(well_formed),
        "cancelled": sum(q.cancel_after is not None for q in requests),
        "malformed": sum(q.malformed is not None for q in requests),
        "malformed_answered_4xx": sum(r.ok for r, q in pairs if q.malformed is not None),
        "malformed_statuses": sorted({r.status for r, q in pairs if q.malformed is not None}),
        "errors": [r.error for r in results if r.error][:3],
        "kv_blocks_used_after": m.get("sparselm_kv_cache_blocks_used", -1),
        "running_after": m.get("sparselm_num_requests_running", -1),
        "aborted": m.get('sparselm_request_finished_total{reason="abort"}', 0),
        "rss_start_mb": rss[0],
        "rss_mid_mb": rss[1],
        "rss_end_mb": server.rss_mb(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="few requests, concurrency 1 and 4 only (a smoke run)")
    ap.add_argument("--soak", action="store_true", help="also the long mixed run on the demo MoE")
    ap.add_argument("--soak-requests", type=int, default=520)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--ckpt", default=None, help="a trained demo run for demo-moe (default: random weights)")
    ap.add_argument("--precisions", default="auto", help="comma-separated: auto (this CPU's rule), bf16, fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of baselines and concurrency 16 in turn")
    ap.add_argument("--tokenizer", default=None, help="SentencePiece model (default: data_cache/tokenizer.model)")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--report", default=None, help="also write the whole report (JSON) here")
    ap.add_argument("--docs-from", default=None, help="comma-separated --report files: their cases, one docs table")
    args = ap.parse_args()
    if args.docs_from:  # cases measured in separate runs (each short enough to hold the machine alone)
        reports = [json.loads(Path(f).read_text()) for f in args.docs_from.split(",")]
        report = {**reports[0], "cases": [c for r in reports for c in r["cases"]]}
        for case in report["cases"]:  # JSON made the breakdown's batch sizes strings
            case["breakdown"] = {int(k): v for k, v in case["breakdown"].items()}
        report["runs_measured"] = [r["machine"] for r in reports]
        text = format_docs(report)
        print(text)
        if args.write_docs:
            write_docs(text)
        return
    torch.set_num_threads(args.threads)
    precisions = [resolve_precision(p.strip(), torch.device("cpu")) for p in args.precisions.split(",")]
    tokenizer, ids, source = tokenizer_and_text(Path(args.tokenizer) if args.tokenizer else None)
    report = {"machine": machine(), "threads": args.threads, "prompt_source": source, "cases": []}
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    try:
        for case in args.cases.split(","):
            for precision in dict.fromkeys(precisions):
                rows = run_case(args, case, precision, tokenizer, ids, work)
                report["cases"].append(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_after"] = os.getloadavg()[0]
    if args.report:
        Path(args.report).write_text(json.dumps(report, default=str))
    text = format_docs(report)
    if not args.json:
        print(text)
    if args.write_docs:
        write_docs(text)


def run_case(args, case: str, precision: str, tokenizer, ids: list[int], work: Path) -> dict:
    """The step breakdown in process, the server under each load, the baselines in turn with concurrency 16 (and
    the soak), for one model at one precision."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, cfg, weights = build(case, args.ckpt if case == "demo-moe" else None, tokenizer.vocab_size)
    ckpt = save(model, cfg, tokenizer, work / f"{case}-{precision}")
    model.to(dtype)
    reqs = make_requests(ids, 64 if not args.quick else 8, seed=1, eod=tokenizer.eod_id)
    base = reqs[: 4 if args.quick else 16]
    cpu = torch.device("cpu")
    refusal = paged_kernel_refusal(cfg.model, cpu)  # the engine's own choice, for the labels
    paged = refusal is None
    rows = {
        "case": case,
        "precision": precision,
        "kv_cache_dtype": "fp32" if kv_cache_dtype(dtype, cpu, "auto", paged) == torch.float32 else "bf16",
        "decode_attention": "sparselm paged kernel" if paged else f"PyTorch SDPA per sequence ({refusal})",
        "weights": weights,
        "params": sum(p.numel() for p in model.parameters()),
    }
    rows["breakdown"] = breakdown(model, tokenizer, base, precision)
    emit(args, {k: v for k, v in rows.items() if k != "breakdown"})
    extra = ["--max-num-seqs", "64", "--max-queue", "100000"]
    if case != "demo-moe":
        extra += ["--kv-cache-memory", "1GiB"]
    server = Server(ckpt, precision, args.threads, extra)
    try:
        rows["runs"] = []
        for c in (1, 4) if args.quick else (1, 4, 16, 64):
            n = load_size(args, c)
            load = reqs[:n] if n <= len(reqs) else make_requests(ids, n, seed=1, eod=tokenizer.eod_id)
            if c == 1:
                summary, rows["bare_decode_ms"] = concurrency_one_paired(server, model, load, dtype)
                emit(args, {"case": case, "precision": precision, "bare_decode_ms": rows["bare_decode_ms"]})
            else:
                summary = summarize(*asyncio.run(run_load(server.base, load, "bench", concurrency=c)))
            rows["runs"].append({"load": f"concurrency {c}", **summary})
            emit(args, {"case": case, "precision": precision, **rows["runs"][-1]})
        c16 = next((r for r in rows["runs"] if r["load"] == "concurrency 16"), rows["runs"][-1])
        rows["baselines"], rows["paired"] = paired_baselines(args, server, model, cfg, base, reqs, dtype)
        emit(args, {"case": case, "precision": precision, "paired": rows["paired"], "baselines": rows["baselines"]})
        del model
        for factor in () if args.quick else (0.5, 1.0):
            rate = factor * c16["request_throughput"]
            results, seconds = asyncio.run(run_load(server.base, reqs[:32], "bench", rate=rate, seed=3))
            rows["runs"].append({"load": f"Poisson {rate:.2f} req/s", **summarize(results, seconds)})
            emit(args, {"case": case, "precision": precision, **rows["runs"][-1]})
        rows["server_seconds"] = {k: v for k, v in server.metrics().items() if "engine_seconds" in k}
    finally:
        server.stop()
    if args.soak and case == "demo-moe":
        server = Server(ckpt, precision, args.threads, ["--max-num-seqs", "64", "--max-queue", "100000"])
        try:
            rows["soak"] = soak(server, ids, tokenizer.eod_id, args.soak_requests, concurrency=16)
        finally:
            code = server.stop()
        rows["soak"]["exit_code"] = code
        emit(args, {"case": case, "precision": precision, "soak": rows["soak"]})
    return rows


def paired_baselines(args, server, model, cfg, base, reqs, dtype) -> tuple[list[dict], list[dict]]:
    """The two baselines and the server at concurrency 16, in turn, ``--rounds`` times (the server idle while this
    process runs a baseline): each round's ratios compare figures measured within a minute or two of each other,
    where one baseline measured before all the loads would carry this VM's drift into every ratio.
    -> (each baseline's first round, as the table's rows; per round: output tokens/s of each)."""
    c16_load = reqs[: load_size(args, 16)]
    firsts, rounds = [], []
    for i in range(1 if args.quick else args.rounds):
        one, hf = one_at_a_time(model, base), hf_static_batches(model, cfg, base, dtype)
        results, seconds = asyncio.run(run_load(server.base, c16_load, "bench", concurrency=16))
        rounds.append({"one_at_a_time": one["output_throughput"], "hf": hf.get("output_throughput"),
                       "concurrency_16": summarize(results, seconds)["output_throughput"]})  # fmt: skip
        if i == 0:
            firsts = [one, hf]
    return firsts, rounds


def load_size(args, concurrency: int) -> int:
    """Requests sent at a fixed concurrency."""
    return max(4, concurrency) if args.quick else max(8, 2 * concurrency)


def emit(args, row: dict) -> None:
    if args.json:
        print(json.dumps(row), flush=True)


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "")
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": os.getloadavg()[0],
    }


def machine_summary(host: dict) -> str:
    """What a table's note says of the machine: CPU, cores, bf16 support, torch."""
    yes = lambda flag: "yes" if host[flag] else "no"  # noqa: E731
    return (f"{host['cpu']}, {host['cores']} cores, avx512_bf16 {yes('avx512_bf16')}, amx_bf16 {yes('amx_bf16')}, "
            f"torch {host['torch']}")  # fmt: skip


if __name__ == "__main__":
    main()
