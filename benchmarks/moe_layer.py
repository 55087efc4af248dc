"""Forward+backward time of one MoE layer vs a dense SwiGLU FFN of equal active FLOPs, and vs Hugging Face's Mixtral.

For every (experts, top-k, dtype) row: our ``MoE`` (d_model 512, expert d_ff 1024, 8,192 tokens), a dense
``FeedForward`` with d_ff = top_k x 1024 (so both do the same matmul FLOPs per token; the MoE adds only the router),
and transformers' ``MixtralSparseMoeBlock`` with the same weights and routing in each of its expert implementations.
Before timing, each HF implementation must reproduce our output in fp32 (the comparison is like for like).

dtypes: ``fp32``; ``bf16`` = bf16 autocast over fp32 master weights (how ``sparselm train`` runs); ``bf16-pure`` =
weights and activations stored in bf16 (our router still computes in fp32).

Timing: ``torch.set_num_threads``, one warm-up step per model, then ``--repeats`` steps per model interleaved
(model A, B, C, A, B, C, ...) so that a burst of load from other processes hits every model alike; the median is
reported. Gradients are set to None before each step, as ``optimizer.zero_grad()`` does. By default each timed step
first waits (up to 20 s) for the CPUs to be idle, which only matters on a shared machine.

    python benchmarks/moe_layer.py [--json] [--quick] [--experts 8,32,64,128] [--tokens 8192,32768] [--repeats N]
        [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from memory import add_allocator_argument, apply_allocator
from sparselm.config import MoEConfig
from sparselm.model.layers import FeedForward
from sparselm.model.moe import MoE
from sparselm.precision import bf16_is_fast, cpu_speeds_sentence, measure_matmul_flops

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
START, END = "<!-- moe_layer:start -->", "<!-- moe_layer:end -->"
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
DTYPES = ("fp32", "bf16", "bf16-pure")

# ------------------------------------------------------------------------------------------------------- timing


def _cpu_busy(seconds: float = 0.2) -> float:
    """Fraction of all CPUs busy over ``seconds`` (Linux /proc/stat); 0 elsewhere."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return 0.0
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_idle(enabled: bool, limit: float = 0.15, timeout: float = 20.0) -> None:
    """Let other processes' bursts pass before a timed step (each step is 0.1-3 s; a 2-core box is easily shared)."""
    deadline = time.monotonic() + timeout
    while enabled and time.monotonic() < deadline and _cpu_busy() > limit:
        pass


def make_step(model: nn.Module, x: torch.Tensor, upstream: torch.Tensor, autocast: bool) -> Callable[[], None]:
    """One training step of a layer without the optimizer: forward, backward of a fixed upstream gradient."""

    def step() -> None:
        for p in model.parameters():
            p.grad = None
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out = out[0] if isinstance(out, tuple) else out  # our MoE returns (out, stats)
        out.backward(upstream.to(out.dtype).view_as(out))

    return step


def time_interleaved(
    steps: dict[str, Callable[[], None]], repeats: int, wait: bool, slow_s: float = float("inf")
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per-model step times in ms (interleaved rounds) and warm-up times. A model whose warm-up step took longer
    than ``slow_s`` seconds is timed once only (HF eager at 128 experts takes about a minute per step)."""
    warmup: dict[str, float] = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()  # warm-up: first-call allocations, oneDNN kernel selection
        warmup[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats):
        for name, step in steps.items():
            if round_ > 0 and warmup[name] > slow_s:
                continue
            wait_for_idle(wait)
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times, warmup


# ------------------------------------------------------------------------------------------------- HF Mixtral


def hf_block(moe: MoE, hidden: int, d_ff: int) -> nn.Module:
    """transformers' MixtralSparseMoeBlock holding the same router and expert weights as ``moe``."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=d_ff,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_jitter_noise=0.0,
        hidden_act="silu",
    )
    block = MixtralSparseMoeBlock(config)
    ex = moe.experts
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        # HF stores [E, out, in] with gate rows first in gate_up_proj (forward: linear(x, W).chunk(2) -> gate, up).
        block.experts.gate_up_proj.copy_(torch.cat([ex.w_gate.transpose(1, 2), ex.w_up.transpose(1, 2)], dim=1))
        block.experts.down_proj.copy_(ex.w_down.transpose(1, 2))
    return block


def set_hf_impl(block: nn.Module, impl: str) -> None:
    # transformers 5.x: MixtralExperts is decorated with @use_experts_implementation, which dispatches on
    # config._experts_implementation at every forward ("eager" = the original per-expert loop).
    block.experts.config._experts_implementation = impl


class _HFWrapper(nn.Module):
    """[T, d] in and out, like our layers (the HF block wants [batch, seq, d])."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.unsqueeze(0)).squeeze(0)


def check_hf_matches(moe: MoE, block: nn.Module, impl: str, x: torch.Tensor) -> float:
    """Max |HF - ours| / max |ours| in fp32. HF renormalises top-1 gates to 1 while our top-1 gate is the router
    probability (Switch), so for k=1 our output is divided by its gate first."""
    set_hf_impl(block, impl)
    with torch.no_grad():
        ours, _ = moe(x)
        if moe.top_k == 1:
            ours = ours / moe.router(x).weights
        theirs = block(x.unsqueeze(0)).squeeze(0)
    return ((theirs - ours).abs().max() / ours.abs().max()).item()


def batched_mm_gb(tokens: int, top_k: int, hidden: int, d_ff: int, bytes_per: int) -> float:
    """HF batched_mm gathers every assignment's own copy of its expert's weights (forward, plus as much again for
    their gradients): 2 x T*k x 3*d*f elements."""
    return 2 * tokens * top_k * 3 * hidden * d_ff * bytes_per / 1e9


# ----------------------------------------------------------------------------------------------------- a row


def measured_rates(dtype: str) -> tuple[float, float]:
    """(matmul FLOP/s at this dtype, memory bandwidth in bytes/s) measured here, once per dtype per run."""
    if dtype not in _RATES:
        matmul_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        src, dst = torch.ones(1 << 26), torch.empty(1 << 26)  # 256 MB each: far beyond the caches
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
        _RATES[dtype] = (measure_matmul_flops(matmul_dtype, 2048, 1.0), 2 * src.numel() * 4 / best)
    return _RATES[dtype]


_RATES: dict[str, tuple[float, float]] = {}


def roofline(tokens: int, d: int, f: int, top_k: int, experts: int, dtype: str) -> dict[str, float]:
    """The least time one forward + backward of an FFN layer can take here: max(FLOPs / matmul rate, bytes / memory
    bandwidth). FLOPs: 3 GEMMs of T*k x d x f, forward + 2x backward (the router is ignored). Bytes it must move:
    all ``experts`` weights read in the forward and again in the backward (fp32 masters unless bf16-pure) and their
    gradients written once; activations x, y, dy, dx (T x d) and the gate/up outputs (T*k x f) written forward,
    read backward, in the compute dtype. ``experts=1, top_k=1, f=k*f`` is the dense FFN."""
    peak, bandwidth = measured_rates(dtype)
    weight_bytes = 2 if dtype == "bf16-pure" else 4
    act_bytes = 4 if dtype == "fp32" else 2
    flops = 3 * 2 * tokens * top_k * 3 * d * f
    weights = 3 * experts * d * f
    moved = weights * weight_bytes * 3 + (4 * tokens * d + 2 * 2 * tokens * top_k * f) * act_bytes
    return {"ms": 1e3 * max(flops / peak, moved / bandwidth), "flops": flops, "bytes": moved}


def bench_row(args: argparse.Namespace, num_experts: int, top_k: int, dtype: str, tokens: int) -> dict:
    torch.manual_seed(0)
    d, f = args.d_model, args.d_ff
    moe = MoE(d, f, MoEConfig(num_experts=num_experts, top_k=top_k))
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_(std=0.02)
    dense = FeedForward(d, top_k * f)
    x = torch.randn(tokens, d)
    upstream = torch.randn(tokens, d)
    autocast = dtype == "bf16"

    row: dict = {"num_experts": num_experts, "top_k": top_k, "dtype": dtype, "tokens": tokens, "d_model": d}
    row["moe_impl"] = "loop" if moe.experts.impl == "auto" else moe.experts.impl  # auto = loop on CPU
    row |= {"d_ff_expert": f, "d_ff_dense": top_k * f}

    hf_impls = list(args.hf_impls)
    notes: list[str] = []
    bytes_per = 2 if dtype == "bf16-pure" else 4
    blocks: dict[str, nn.Module] = {}
    for impl in hf_impls:
        need = batched_mm_gb(tokens, top_k, d, f, bytes_per)
        if impl == "batched_mm" and need > args.batched_mm_max_gb:
            notes.append(f"batched_mm skipped: needs ~{need:.0f} GB for per-assignment weight copies")
            row["hf_ms_batched_mm"] = None
            row["hf_batched_mm_gb"] = need
            continue
        # One block per implementation (each has its own config, which is where the implementation is chosen).
        blocks[impl] = hf_block(moe, d, f)
        set_hf_impl(blocks[impl], impl)
    if blocks:
        probe = x[: args.check_tokens]
        errors = {impl: check_hf_matches(moe, block, impl, probe) for impl, block in blocks.items()}
        for impl, err in errors.items():
            if err > 1e-4:
                raise AssertionError(f"HF {impl} differs from our MoE by {err:.2e} (relative): not the same layer")
        row["hf_max_rel_diff_fp32"] = max(errors.values())

    if dtype == "bf16-pure":
        for m in (moe, dense, *blocks.values()):
            m.to(torch.bfloat16)
        x = x.bfloat16()
    x.requires_grad_(True)

    steps = {"moe": make_step(moe, x, upstream, autocast), "dense": make_step(dense, x, upstream, autocast)}
    if args.ablate:
        # Same layer on the grouped_mm expert kernel, in the same run: the before/after of the expert kernel.
        ablation = MoE(d, f, MoEConfig(num_experts=num_experts, top_k=top_k)).to(moe.experts.w_up.dtype)
        ablation.load_state_dict(moe.state_dict())
        ablation.experts.impl = "grouped_mm"
        steps["moe_grouped_mm"] = make_step(ablation, x, upstream, autocast)
    for impl, block in blocks.items():
        steps[f"hf_{impl}"] = make_step(_HFWrapper(block), x, upstream, autocast)

    times, _ = time_interleaved(steps, args.repeats, not args.no_wait, args.slow_s)
    med = {name: statistics.median(v) for name, v in times.items()}
    row["moe_ms"] = med["moe"]
    row["dense_ms"] = med["dense"]
    # MoE and dense steps of one round ran back to back under the same load: the ratio is taken per round.
    pairs = [m / d for m, d in zip(times["moe"], times["dense"], strict=True)]
    row["moe_over_dense"] = statistics.median(pairs)
    row["moe_over_dense_range"] = [min(pairs), max(pairs)]
    row["moe_ms_min"] = min(times["moe"])
    row["dense_ms_min"] = min(times["dense"])
    if "moe_grouped_mm" in med:
        row["moe_grouped_mm_ms"] = med["moe_grouped_mm"]
    hf_times = {}
    for impl in hf_impls:
        if f"hf_{impl}" in med:
            row[f"hf_ms_{impl}"] = hf_times[impl] = med[f"hf_{impl}"]
            if len(times[f"hf_{impl}"]) < args.repeats:
                row[f"hf_runs_{impl}"] = len(times[f"hf_{impl}"])
    # Like for like only: under autocast HF's grouped_mm casts the input to the fp32 weights and computes in fp32.
    comparable = {impl: ms for impl, ms in hf_times.items() if not (dtype == "bf16" and impl == "grouped_mm")}
    if comparable:
        best = min(comparable, key=comparable.get)
        row["hf_best_impl"] = best
        hf_runs = times[f"hf_{best}"]  # timed once when slow: its one run paired with the first MoE run
        row["hf_over_ours"] = statistics.median(
            h / m for h, m in zip(hf_runs, times["moe"][: len(hf_runs)], strict=True)
        )
    moe_roof = roofline(tokens, d, f, top_k, num_experts, dtype)
    dense_roof = roofline(tokens, d, top_k * f, 1, 1, dtype)
    row["roofline"] = {"moe_ms": moe_roof["ms"], "dense_ms": dense_roof["ms"], "moe_bytes": moe_roof["bytes"]}
    row["roofline"] |= {"dense_bytes": dense_roof["bytes"], "flops": moe_roof["flops"]}
    row["roofline"] |= dict(zip(("matmul_flops_per_s", "bytes_per_s"), measured_rates(dtype), strict=True))
    row["repeats"] = args.repeats
    row["load_avg_1m"] = os.getloadavg()[0]
    row["measured_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    if notes:
        row["notes"] = "; ".join(notes)
    return row


def batched_mm_probe(args: argparse.Namespace, top_k: int) -> dict | None:
    """HF batched_mm at a token count that fits in memory, to show what skipping it at full size means."""
    if "batched_mm" not in args.hf_impls:
        return None
    torch.manual_seed(0)
    d, f, tokens = args.d_model, args.d_ff, args.batched_mm_probe_tokens
    moe = MoE(d, f, MoEConfig(num_experts=64, top_k=top_k))
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_(std=0.02)
    x = torch.randn(tokens, d, requires_grad=True)
    upstream = torch.randn(tokens, d)
    block = hf_block(moe, d, f)
    set_hf_impl(block, "batched_mm")
    if check_hf_matches(moe, block, "batched_mm", x.detach()) > 1e-4:
        raise AssertionError("HF batched_mm differs from our MoE")
    steps = {"moe": make_step(moe, x, upstream, False), "hf": make_step(_HFWrapper(block), x, upstream, False)}
    times, _ = time_interleaved(steps, max(2, args.repeats), not args.no_wait)
    return {
        "tokens": tokens,
        "top_k": top_k,
        "hf_batched_mm_ms": statistics.median(times["hf"]),
        "moe_ms": statistics.median(times["moe"]),
    }


# ----------------------------------------------------------------------------------------------------- output


def format_table(rows: list[dict], probes: list[dict], args: argparse.Namespace, load: tuple[float, float]) -> str:
    when = rows[-1].get("measured_utc", time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
    lines = [
        f"Measured {when} UTC on {cpu_name()}"
        f" ({os.cpu_count()} CPUs), {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
        f"{_transformers_version()}. One layer, forward + backward, {_tokens_text(rows)} tokens, "
        f"d_model {args.d_model}, "
        f"expert d_ff {args.d_ff}; dense = SwiGLU FFN with d_ff = top_k x {args.d_ff} (equal matmul FLOPs). Median "
        f"of {args.repeats} interleaved runs, ms; ratios are medians of the per-round ratios (MoE and dense timed "
        f"back to back), with their range. 1-minute load average {load[0]:.2f} before, {load[1]:.2f} after "
        "(2 cores: anything above ~0.2 beyond this run is someone else's work). Host memory: "
        f"{rows[-1].get('host_memory', 'not recorded')}.",
        "",
        "| tokens | E | k | dtype | MoE ms | dense ms | MoE / dense | range | MoE / roofline | dense / roofline "
        "| HF eager ms | HF grouped_mm ms | HF batched_mm ms | best HF / MoE |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = {key: _ms_cell(r, key) for key in ("hf_ms_eager", "hf_ms_grouped_mm", "hf_ms_batched_mm")}
        hf_ratio = f"{r['hf_over_ours']:.2f} ({r['hf_best_impl']})" if "hf_over_ours" in r else "-"
        lines.append(
            f"| {r['tokens']:,} | {r['num_experts']} | {r['top_k']} | {r['dtype']} | {r['moe_ms']:,.0f} "
            f"| {r['dense_ms']:,.0f} | {r['moe_over_dense']:.2f} | {_range_cell(r)} | {_roof_cell(r, 'moe')} "
            f"| {_roof_cell(r, 'dense')} | {ms['hf_ms_eager']} "
            f"| {ms['hf_ms_grouped_mm']} | {ms['hf_ms_batched_mm']} | {hf_ratio} |"
        )
    lines += [
        "",
        "dtype `bf16` = bf16 autocast with fp32 master weights (what training uses where bf16 is native); "
        "`bf16-pure` = bf16 weights. HF "
        "blocks get our router and expert weights and must reproduce our fp32 output (max relative difference "
        f"< 1e-4, checked on {args.check_tokens} tokens) before being timed. HF renormalises top-1 gates to 1; ours "
        "keep the router probability (Switch), which changes no FLOPs. Under autocast HF's `grouped_mm` "
        "implementation casts the input to the weights' dtype, so it computes in fp32: that is its behaviour, "
        "not a setup error, and it is left out of `best HF / MoE` in the `bf16` rows (not like for like; "
        "`bf16-pure` is the like-for-like bf16 comparison). A ratio whose range includes 1.00 is no measurable "
        'difference. "(1 run)": the warm-up step took over '
        f"{args.slow_s:.0f} s, so that implementation was timed once.",
        "",
        "Roofline = max(FLOPs / matmul rate, bytes / memory bandwidth), both measured here in the same run (2048^2 "
        "matmul at the row's dtype; a 256 MB copy): FLOPs of the 3 GEMMs forward + backward; bytes = every expert's "
        "weights read forward and backward and its gradient written (fp32 unless bf16-pure) plus the activations. "
        "`MoE / roofline` near 1 = the layer runs as fast as this CPU allows; far above 1 = overhead to remove.",
    ]
    needs = [r["hf_batched_mm_gb"] for r in rows if r.get("hf_batched_mm_gb")]
    if needs:
        lines += [
            "",
            "HF `batched_mm` is skipped at full size: it gathers a private copy of the expert weights for every "
            f"(token, choice) pair and would need {min(needs):,.0f}-{max(needs):,.0f} GB here (23 GB of RAM).",
        ]
    for p in probes:
        lines.append("")
        lines.append(
            f"HF `batched_mm` at {p['tokens']} tokens (E=64, top-{p['top_k']}, fp32): {p['hf_batched_mm_ms']:,.0f} ms "
            f"against {p['moe_ms']:,.1f} ms for our MoE ({p['hf_batched_mm_ms'] / p['moe_ms']:,.0f}x)."
        )
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _roof_cell(row: dict, kind: str) -> str:
    roof = row.get("roofline")
    return f"{row[kind + '_ms'] / roof[kind + '_ms']:.2f}" if roof else "-"


def _tokens_text(rows: list[dict]) -> str:
    return "/".join(f"{t:,}" for t in sorted({r["tokens"] for r in rows}))


def _range_cell(row: dict) -> str:
    if "moe_over_dense_range" not in row:  # rendered from an older --json run: fastest MoE / fastest dense
        return f"({row['moe_ms_min'] / row['dense_ms_min']:.2f} of fastest)"
    low, high = row["moe_over_dense_range"]
    return f"{low:.2f}-{high:.2f}"


def _ms_cell(row: dict, key: str) -> str:
    if key not in row:
        return "-"
    if row[key] is None:
        return "skipped"
    runs = row.get(key.replace("hf_ms_", "hf_runs_"))
    return f"{row[key]:,.0f}" + (f" ({runs} run)" if runs else "")


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:
        return "not installed"


INTRO = """# Benchmarks

Numbers measured on the development machine: 2 cores of an AMD EPYC (avx512_bf16, no AMX), 23 GiB RAM, no GPU,
shared with other jobs. Matmul peak with 2 threads: fp32 ~165 GFLOP/s, bf16 ~420 GFLOP/s. Each section is written by
its script (`--write-docs`) between its own markers.
"""


def write_docs(table: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else INTRO
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## MoE layer vs dense FFN and HF Mixtral (`benchmarks/moe_layer.py`)\n\n"
        text += block + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


def render_saved(args: argparse.Namespace) -> None:
    """Table (and docs) from the JSON lines of an earlier run, e.g. after editing only the prose."""
    rows, probes = [], []
    for line in args.from_json.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            if "batched_mm_probe" in item:
                probes.append(item["batched_mm_probe"])
            else:
                rows.append(item)
    args.repeats, args.d_model = rows[0]["repeats"], rows[0]["d_model"]
    args.d_ff = rows[0]["d_ff_expert"]
    table = format_table(rows, probes, args, (rows[0]["load_avg_1m"], rows[-1]["load_avg_1m"]))
    print(table)
    if args.write_docs:
        write_docs(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object per row (and no table)")
    ap.add_argument("--quick", action="store_true", help="E=64 only, 2 repeats (a smoke run)")
    ap.add_argument("--experts", default="8,32,64,128")
    ap.add_argument("--top-k", default="1,2")
    ap.add_argument(
        "--dtypes",
        default="",
        help=f"subset of {','.join(DTYPES)} (default: all where this CPU computes bf16 natively, else fp32)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="8192", help="tokens per step; a list (8192,32768,131072) sweeps them")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--hf-impls", default=",".join(HF_IMPLS), help="HF expert implementations; empty: skip HF")
    ap.add_argument("--check-tokens", type=int, default=512, help="tokens for the HF-equals-ours check")
    ap.add_argument("--batched-mm-max-gb", type=float, default=4.0, help="skip HF batched_mm above this memory")
    ap.add_argument("--batched-mm-probe-tokens", type=int, default=64, help="tokens for the small batched_mm run")
    ap.add_argument("--ablate", action="store_true", help="also time our MoE on the grouped_mm expert kernel")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for idle CPUs before each timed step")
    ap.add_argument("--slow-s", type=float, default=15.0, help="time a model once if its warm-up took longer")
    ap.add_argument("--write-docs", action="store_true", help=f"write the table into {DOCS.relative_to(REPO)}")
    ap.add_argument("--from-json", type=Path, help="render the table from an earlier --json output instead of timing")
    add_allocator_argument(ap)
    args = ap.parse_args()
    args.allocator_phrase = apply_allocator(args.allocator)
    if args.quick:
        args.experts, args.repeats = "64", 2
    args.hf_impls = [i for i in args.hf_impls.split(",") if i]
    unknown = set(args.hf_impls) - set(HF_IMPLS)
    if unknown:
        ap.error(f"unknown HF implementations {sorted(unknown)}; choose from {HF_IMPLS}")
    skipped = ""
    if args.dtypes:
        dtypes = args.dtypes.split(",")
    elif bf16_is_fast(torch.device("cpu")):
        dtypes = list(DTYPES)
    else:  # emulated bf16 (no avx512_bf16/AMX) would time the emulation, for minutes per row
        dtypes = ["fp32"]
        skipped = (
            f"bf16 rows skipped: {cpu_speeds_sentence()} (emulated). `--dtypes fp32,bf16,bf16-pure` times them anyway."
        )
    if set(dtypes) - set(DTYPES):
        ap.error(f"--dtypes must be a subset of {DTYPES}")
    torch.set_num_threads(args.threads)
    if args.from_json:
        render_saved(args)
        return
    if args.hf_impls and _transformers_version() == "not installed":
        ap.error("transformers is not installed: pip install -e '.[bench]' (or pass --hf-impls '')")

    load_before = os.getloadavg()[0]
    rows = []
    for tokens in (int(t) for t in str(args.tokens).split(",")):
        for num_experts in (int(e) for e in args.experts.split(",")):
            for top_k in (int(k) for k in args.top_k.split(",")):
                for dtype in dtypes:
                    row = bench_row(args, num_experts, top_k, dtype, tokens) | {"host_memory": args.allocator_phrase}
                    rows.append(row)
                    if args.json:
                        print(json.dumps(row), flush=True)
                    else:
                        print(
                            f"T={tokens} E={num_experts} k={top_k} {dtype}: MoE {row['moe_ms']:.0f} ms, dense "
                            f"{row['dense_ms']:.0f} ms ({row['moe_over_dense']:.2f}x), best HF / MoE "
                            f"{row.get('hf_over_ours', math.nan):.2f}",
                            flush=True,
                        )
    last_k = int(args.top_k.split(",")[-1])
    probes = [p for p in [batched_mm_probe(args, last_k)] if p is not None]
    for p in probes:
        if args.json:
            print(json.dumps({"batched_mm_probe": p}), flush=True)
    table = format_table(rows, probes, args, (load_before, os.getloadavg()[0]))
    if skipped:
        table += f"\n\n{skipped}"
    if not args.json:
        print(table)
    if args.write_docs:
        write_docs(table)


if __name__ == "__main__":
    main()
