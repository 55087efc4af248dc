"""benchmarks/serve.py's decode-step breakdown and its section of docs/benchmarks.md."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from sparselm.model.attention import Attention
from sparselm.model.layers import FeedForward
from sparselm.model.moe import MoE
from sparselm.model.transformer import Transformer
from sparselm.serve.engine import Engine
from sparselm.serve.kv_cache import StepCache
from sparselm.serve.params import EngineConfig, SamplingParams

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
START, END = "<!-- serve:start -->", "<!-- serve:end -->"
PARTS = {
    "attention: SDPA (prompt chunks; decoding too without the kernel)": (Attention, "_attend"),
    "attention: paged decode kernel": (StepCache, "attend"),
    "KV blocks: gather + store": (StepCache, ("keys", "store")),
    "MoE FFN (router, dispatch, experts, combine)": (MoE, "forward"),
    "dense FFN": (FeedForward, "forward"),
}


def breakdown(model, tokenizer, requests, precision: str, batches=(1, 16), steps: int = 8) -> dict:
    """Wall time of the engine's decode steps by component, at each batch size (ms per step)."""
    spent: dict[str, float] = {}
    originals = []

    def timed(cls, name: str, label: str) -> None:
        original = getattr(cls, name)
        originals.append((cls, name, original))

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

        setattr(cls, name, wrapper)

    for label, (cls, names) in PARTS.items():
        for name in (names,) if isinstance(names, str) else names:
            timed(cls, name, label)
    timed(Transformer, "forward", "forward")
    out = {}
    try:
        for batch in batches:
            engine = Engine(model, tokenizer, EngineConfig(precision=precision, max_num_seqs=max(batches)))
            params = SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True)
            seqs = [engine.add_request(str(i), requests[i % len(requests)].prompt, params) for i in range(batch)]
            while any(not s.output for s in seqs):
                engine.step()
            engine.step()
            spent.clear()
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            total = time.perf_counter() - start
            row = {label: spent.get(label, 0.0) / steps * 1e3 for label in PARTS}
            row["rest of the forward (projections, norms, logits)"] = (
                (spent["forward"] - sum(spent.get(k, 0) for k in PARTS)) / steps * 1e3
            )
            row["engine outside the forward (schedule, batch, sample, text)"] = (total - spent["forward"]) / steps * 1e3
            row["step"] = total / steps * 1e3
            out[batch] = row
            engine.release_threads()
            del engine
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)
    return out


def _p(d: dict | None) -> str:
    if not d or d.get("p50") is None:
        return "-"
    return f"{d['p50']:.0f} / {d['p90']:.0f} / {d['p99']:.0f}"


def format_docs(report: dict) -> str:
    m = report["machine"]
    runs = report.get("runs_measured", [m])  # one run, or one per case (serve.py --docs-from)
    when = "; ".join(r["date"] for r in runs) + (
        f" ({len(runs)} runs, one per case, in that order)" if len(runs) > 1 else ""
    )
    loads = "; ".join(f"{r['load_before']:.1f} before and {r.get('load_after', 0):.1f} after" for r in runs)
    lines = [
        f"Measured {when} on {m['cpu']} ({m['cores']} cores; avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, "
        f"amx_bf16 {'yes' if m['amx_bf16'] else 'no'}), torch {m['torch']}, {report['threads']} threads; 1-minute "
        f"load average {loads} (2 cores: above ~2 means other jobs shared them). Server and load generator share "
        f"the cores. Prompts: 32-512 tokens cut from {report['prompt_source']}; outputs 32-256 tokens (ignore_eos), "
        "greedy; latencies in ms (p50 / p90 / p99).",
    ]
    for case in report["cases"]:
        kv = case.get("kv_cache_dtype", case["precision"])  # reports before 2026-12-07 08:00 kept them alike
        attention = f", decode attention: {case['decode_attention']}" if "decode_attention" in case else ""
        lines += ["", f"**{case['case']}**, {case['precision']} weights, {kv} KV cache{attention} "
                  f"({case['params'] / 1e6:.1f}M parameters, {case['weights']})", ""]  # fmt: skip
        lines += ["| load | completed | failed | req/s | output tok/s | TTFT | TPOT | ITL | E2E | load avg |",
                  "|---|---:|---:|---:|---:|---|---|---|---|---:|"]  # fmt: skip
        for r in case.get("runs", []):
            lines.append(
                f"| {r['load']} | {r['completed']} | {r['failed']} | {r['request_throughput']:.2f} | "
                f"{r['output_throughput']:.0f} | {_p(r['ttft_ms'])} | {_p(r['tpot_ms'])} | {_p(r['itl_ms'])} | "
                f"{_p(r['e2e_ms'])} | {r['load_avg']:.1f} |"
            )
        lines += _targets(case)
        lines += _breakdown(case["breakdown"])
        if "soak" in case:
            lines += _soak(case["soak"])
    return "\n".join(lines)


def _targets(case: dict) -> list[str]:
    runs = {r["load"]: r for r in case.get("runs", [])}
    c16, c1 = runs.get("concurrency 16"), runs.get("concurrency 1")
    if "paired" in case:
        return _paired(case["paired"], case["baselines"]) + _tpot(case, c1)
    lines = [
        "",
        "| system (same prompts) | output tok/s | sparselm serve at concurrency 16 / this |",
        "|---|---:|---:|",
    ]
    if c16:
        lines.append(f"| sparselm serve, concurrency 16 | {c16['output_throughput']:.0f} | 1.00 |")
    for b in case["baselines"]:
        if "not_measured" in b:
            lines.append(f"| {b['system']} | not measured: {b['not_measured']} | - |")
        elif c16:
            lines.append(f"| {b['system']} ({b['requests']} requests) | {b['output_throughput']:.0f} | "
                         f"{c16['output_throughput'] / b['output_throughput']:.2f} |")  # fmt: skip
    return lines + _tpot(case, c1)


def _paired(rounds: list[dict], baselines: list[dict]) -> list[str]:
    """Each round's baselines and concurrency 16, measured in turn, and the median of the rounds' ratios."""
    one, hf = baselines

    def cells(key: str) -> str:
        return ", ".join(f"{r[key]:.0f}" for r in rounds)

    lines = [
        "",
        f"Baselines and the server at concurrency 16 in turn ({len(rounds)} round{'s' if len(rounds) > 1 else ''}; "
        "output tok/s per round):",
        "",
        "| system (same prompts) | output tok/s, each round | serve c16 / this, each round | median |",
        "|---|---|---|---:|",
        f"| sparselm serve, concurrency 16 | {cells('concurrency_16')} | - | - |",
    ]
    for key, b, target in (("one_at_a_time", one, 4), ("hf", hf, 2)):
        if "not_measured" in b:
            lines.append(f"| {b['system']} | not measured: {b['not_measured']} | - | - |")
            continue
        ratios = [r["concurrency_16"] / r[key] for r in rounds]
        each = ", ".join(f"{x:.2f}" for x in ratios)
        median = f"{statistics.median(ratios):.2f} (target >= {target})"
        lines.append(f"| {b['system']} ({b['requests']} requests) | {cells(key)} | {each} | {median} |")
    return lines


def _tpot(case: dict, c1: dict | None) -> list[str]:
    lines = []
    bare, after = case["bare_decode_ms"], case.get("bare_decode_ms_after")
    if c1 and c1["tpot_ms"]["p50"] and bare["p50"]:
        tpot = c1["tpot_ms"]["p50"]
        if after and after.get("p50"):  # reports made before the pairing: right before and right after that load
            mean = (bare["p50"] + after["p50"]) / 2
            against = (f"{mean:.2f} ms, the mean of the bare decode forward's p50 right before ({bare['p50']:.2f}) "
                       f"and right after ({after['p50']:.2f}) that load")  # fmt: skip
        else:
            mean = bare["p50"]
            against = f"{mean:.2f} ms for the bare decode forward, timed in turn with each request of that load"
        lines += [
            "",
            f"TPOT p50 at concurrency 1: {tpot:.2f} ms against {against} (p50 over the same requests' decode "
            f"steps): {tpot / mean:.2f}x (target <= 1.2x).",
        ]
    return lines


def _breakdown(parts: dict) -> list[str]:
    batches = sorted(parts)
    head = "| decode step, ms (share) | " + " | ".join(f"{b} sequence{'s' if b > 1 else ''}" for b in batches) + " |"
    lines = ["", head, "|---|" + "---:|" * len(batches)]
    for label in next(iter(parts.values())):
        if label == "step":
            continue
        cells = [f"{parts[b][label]:.2f} ({parts[b][label] / parts[b]['step'] * 100:.0f}%)" for b in batches]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| whole step | " + " | ".join(f"{parts[b]['step']:.2f}" for b in batches) + " |")
    return lines


def _soak(s: dict) -> list[str]:
    growth = (s["rss_end_mb"] / s["rss_start_mb"] - 1) * 100 if s["rss_start_mb"] else float("nan")
    mid = f"{s['rss_mid_mb']:.0f}" if "rss_mid_mb" in s else "?"
    mal = "statuses " + (", ".join(str(c) for c in s.get("malformed_statuses", [])) or "?")
    return [
        "",
        f"Soak: {s['requests']} requests at concurrency 16 (half streaming, {s['cancelled']} cancelled mid-stream, "
        f"{s['malformed']} malformed; a warm-up tenth first, then two halves) in {s['seconds']:.0f} s: "
        f"{s['well_formed_completed']} of {s['well_formed']} well-formed requests completed, "
        f"{s['malformed_answered_4xx']} of {s['malformed']} malformed ones answered with a 4xx error "
        f"({mal}), {s['aborted']:.0f} sequences aborted; afterwards {s['kv_blocks_used_after']:.0f} KV blocks "
        f"in use and {s['running_after']:.0f} running; server RSS after the warm-up, each half: "
        f"{s['rss_start_mb']:.0f} -> {mid} -> {s['rss_end_mb']:.0f} MB ({growth:+.1f}%, target < 5%); "
        f"exit status after SIGTERM {s.get('exit_code')}." + (f" Client errors: {s['errors']}." if s["errors"] else ""),
    ]


def write_docs(text: str) -> None:
    doc = DOCS.read_text()
    block = f"{START}\n{text}\n{END}"
    if START in doc:
        head, rest = doc.split(START, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip() + "\n\n## Serving under load (`benchmarks/serve.py`)\n\n" + block + "\n"
    DOCS.write_text(doc)
