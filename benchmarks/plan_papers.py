"""The seed papers' clusters planned by ``sparselm plan``: does the layout fit, what would a step take, next to what
the papers published.

    python benchmarks/plan_papers.py [--only turing,dsmoe,mtnlg,glam] [--json FILE] [--write-docs]

Every figure comes from dry runs of sparselm's own parallel code on a fake process group (``sparselm.plan``); the
published figures are the papers' (``PUBLISHED``). ``--write-docs`` puts the table between the markers of
docs/plan.md. Takes tens of minutes of one core: a search is dozens of dry runs of 10-70B-parameter-per-layer
models (shallow copies, extended).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sparselm.params.presets import load_preset
from sparselm.plan.hardware import load_hardware
from sparselm.plan.planner import plan, plan_config, resting_bytes
from sparselm.plan.search import fixed_settings, search

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "plan.md"
START, END = "<!-- plan-papers:start -->", "<!-- plan-papers:end -->"
GIB = 2**30

# What the papers report about the runs planned here.
PUBLISHED = {
    "turing": "trained on 256 V100-32GB with ZeRO-1 + 4-way Megatron TP (fp16); no step time given",
    "mtnlg": "8-way TP x 35-way pipeline x DP on 2,240 / 2,800 / 3,360 A100-80GB, batch 1,920 x 2,048: "
    "60.1 / 50.2 / 44.4 s per step = 126 / 121 / 113 TFLOP/s per GPU (Smith et al. 2022, Sec. 2.4)",
    "dsmoe": "372 samples/s on 128 A100s (6.7B dense: 70) (Rajbhandari et al. 2022)",
    "glam": "trained on 1,024 TPU v4 chips (Du et al. 2022); no per-step figure used here",
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _row(p) -> dict:
    m, e = p.measurement, p.estimate
    return {
        "layout": m.layout.describe(),
        "param_dtype": p.cfg.parallel.param_dtype,
        "micro_batch_size": m.micro_batch_size,
        "micro_batches": m.micro_batches,
        "checkpointing": m.activation_checkpointing,
        "state_gib": m.state["total"] / GIB,
        "peak_gib": m.peak_bytes / GIB,
        "usable_gib": e.usable_bytes / GIB,
        "fits": e.fits,
        "step_s": e.step_s,
        "compute_s": e.compute_s,
        "exposed_comm_s": e.exposed_comm_s,
        "overlapped_comm_s": e.overlapped_comm_s,
        "tokens_per_s": e.tokens_per_s,
        "samples_per_s": e.samples_per_s,
        "model_tflops": e.model_tflops_per_device,
        "hardware_tflops": e.hardware_tflops_per_device,
        "mfu": e.mfu,
        "dry_run_s": m.seconds,
    }


def _search(preset: str, world: int, hw_key: str, sets: list[str]) -> dict:
    hw = load_hardware(hw_key)
    cfg = plan_config(load_preset(preset, sets), hw)
    result = search(cfg, world, hw, fixed_settings(sets), progress=lambda m: _log(f"  {preset} on {world}: {m}"))
    return {
        "fit": [{"label": t.label(), **_row(t.plan)} for t in result.ranked],
        "rejected": [{"label": t.label(), "reason": t.reason} for t in result.rejected],
        "dry_runs": result.measured,
    }


def _plan(preset: str, world: int, hw_key: str, sets: list[str]) -> dict:
    _log(f"  {preset} on {world}: {' '.join(sets)}")
    return _row(plan(load_preset(preset, sets), world, load_hardware(hw_key)))


def turing() -> dict:
    """Turing-NLG 17B as trained: ZeRO-1 + 4-way TP on 256 V100-32GB (fp32 here: no bf16 on V100), batch 512; and
    the same with ZeRO-2."""
    sets = ["parallel.tp=4", "train.global_batch_size=512", "train.micro_batch_size=1",
            "train.activation_checkpointing=true"]  # fmt: skip
    return {f"zero{z}": _plan("turing-nlg-17b", 256, "v100-32g", [*sets, f"parallel.zero_stage={z}"]) for z in (1, 2)}


def mtnlg() -> dict:
    """MT-NLG 530B with 8-way TP and ZeRO-3 (bf16 gathers) instead of pipelines: the fewest A100-80GB whose resting
    model state (4x the parameter shards) fits, then dry runs from there up until one fits; and the step at 1,920
    devices (the data-parallel size must divide the batch of 1,920; the paper's 2,240 does not)."""
    hw = load_hardware("a100-80g")
    sets = ["parallel.tp=8", "parallel.zero_stage=3", "parallel.param_dtype=bf16", "train.global_batch_size=1920",
            "train.micro_batch_size=1", "train.activation_checkpointing=true"]  # fmt: skip
    cfg = plan_config(load_preset("mt-nlg-530b", sets), hw)
    tried, smallest = [], None
    for dp in [d for d in range(1, 1921) if 1920 % d == 0]:
        world = 8 * dp
        resting = resting_bytes(cfg, world)
        _log(f"  mt-nlg-530b on {world}: resting parameters {resting / GIB:.1f} GiB")
        # ZeRO-3 with AdamW rests at 4x its fp32 parameter shards (+ gradients, 2 moments): no dry run below that.
        if 4 * resting > hw.usable_bytes:
            tried.append({"world": world, "resting_gib": resting / GIB, "fits": False})
            continue
        row = _plan("mt-nlg-530b", world, "a100-80g", sets)
        tried.append({"world": world, **row})
        if row["fits"]:
            smallest = world
            break
    return {"smallest_world": smallest, "tried": tried, "at_1920": _plan("mt-nlg-530b", 1920, "a100-80g", sets)}


def mtnlg1920() -> dict:
    """MT-NLG 530B, tp=8 + ZeRO-3 on 1,920 A100-80GB: the largest micro batch that fits with checkpointing (ZeRO-3
    gathers the parameters again for every micro-batch, so fewer, larger ones save traffic)."""
    sets = ["parallel.tp=8", "parallel.zero_stage=3", "parallel.param_dtype=bf16", "parallel.dp_replicate=1",
            "train.activation_checkpointing=true", "train.global_batch_size=1920"]  # fmt: skip
    return {"search": _search("mt-nlg-530b", 1920, "a100-80g", sets)}


def dsmoe() -> dict:
    """DeepSpeed-MoE 1.3B+MoE-128 with 128-way expert parallelism and ZeRO-2 on 128 A100s (batch 512 x 2,048
    assumed): the largest micro batch that fits without checkpointing."""
    sets = ["parallel.ep=128", "parallel.tp=1", "parallel.zero_stage=2", "parallel.dp_replicate=1",
            "train.activation_checkpointing=false", "train.global_batch_size=512"]  # fmt: skip
    return {hw: _search("deepspeed-moe-1.3b-moe128", 128, hw, sets) for hw in ("a100-80g", "a100-40g")}


def glam() -> dict:
    """GLaM 64B/64E on 1,024 TPU v4 chips (32 GiB each), batch 1,024 x 1,024 (the paper's ~1M tokens, one sequence
    per chip): which expert-parallel degrees fit with ZeRO-3 (bf16 gathers) and checkpointing, sharded over all
    chips or HSDP. tp=1: sparselm splits experts by ep or by tp, not both."""
    sets = ["parallel.tp=1", "parallel.zero_stage=3", "parallel.param_dtype=bf16",
            "train.activation_checkpointing=true", "train.global_batch_size=1024"]  # fmt: skip
    return {"search": _search("glam-64b-64e", 1024, "tpu-v4", sets)}


STUDIES = {"turing": turing, "dsmoe": dsmoe, "mtnlg": mtnlg, "mtnlg1920": mtnlg1920, "glam": glam}
MTNLG_LAYOUT = "tp=8 zero=3 micro=1 ckpt=on params=bf16"


def _fit_cell(r: dict) -> str:
    verdict = "fits" if r["fits"] else "does not fit"
    return f"{verdict}: peak {r['peak_gib']:,.1f} of {r['usable_gib']:,.1f} GiB"


def _estimate_cell(r: dict) -> str:
    return (f"{r['step_s']:,.1f} s/step, {r['samples_per_s']:,.0f} samples/s, {r['model_tflops']:,.0f} model "
            f"TFLOP/s per device (MFU {r['mfu']:.0%})")  # fmt: skip


def _layout_cell(label: str) -> str:
    return f"`{label}`"


def table(results: dict) -> str:
    lines = [
        "| run | devices | layout (sparselm) | memory per device | estimate (50% of peak) | published |",
        "|---|---|---|---|---|---|",
    ]
    if "turing" in results:
        for z, r in results["turing"].items():
            run = "Turing-NLG 17B, the paper's layout" if z == "zero1" else "Turing-NLG 17B with ZeRO-2"
            published = PUBLISHED["turing"] if z == "zero1" else ""
            lines.append(f"| {run} | 256 x V100-32GB | `tp=4 {z.replace('zero', 'zero=')} micro=1 ckpt=on` (fp32) | "
                         f"{_fit_cell(r)} | {_estimate_cell(r)} | {published} |")  # fmt: skip
    if "mtnlg" in results:
        m = results["mtnlg"]
        if m["smallest_world"]:
            last = m["tried"][-1]
            lines.append(f"| MT-NLG 530B, fewest devices with tp=8 + ZeRO-3 | {m['smallest_world']:,} x A100-80GB | "
                         f"`{MTNLG_LAYOUT}` | {_fit_cell(last)} | {_estimate_cell(last)} | "
                         "needs pipeline parallelism in the paper (sparselm has none) |")  # fmt: skip
        r = m["at_1920"]
        lines.append(f"| MT-NLG 530B, tp=8 + ZeRO-3 | 1,920 x A100-80GB | `{MTNLG_LAYOUT}` | {_fit_cell(r)} | "
                     f"{_estimate_cell(r)} | {PUBLISHED['mtnlg']} |")  # fmt: skip
    if "mtnlg1920" in results:
        s = results["mtnlg1920"]["search"]
        if s["fit"]:
            b = s["fit"][0]
            lines.append(f"| MT-NLG 530B, tp=8 + ZeRO-3, largest micro batch | 1,920 x A100-80GB | "
                         f"{_layout_cell(b['label'])} | {_fit_cell(b)} | {_estimate_cell(b)} | |")  # fmt: skip
    if "dsmoe" in results:
        for hw, s in results["dsmoe"].items():
            name = {"a100-80g": "A100-80GB", "a100-40g": "A100-40GB"}[hw]
            if s["fit"]:
                b = s["fit"][0]
                lines.append(f"| DeepSpeed-MoE 1.3B+MoE-128, ep=128 + ZeRO-2 | 128 x {name} | "
                             f"{_layout_cell(b['label'])} | {_fit_cell(b)} | {_estimate_cell(b)} | "
                             f"{PUBLISHED['dsmoe']} |")  # fmt: skip
            else:
                lines.append(f"| DeepSpeed-MoE 1.3B+MoE-128, ep=128 + ZeRO-2 | 128 x {name} | does not fit | | | |")
    if "glam" in results:
        s = results["glam"]["search"]
        for i, b in enumerate(s["fit"]):
            run = "GLaM 64B/64E, ZeRO-3 + checkpointing: the expert-parallel degrees that fit" if i == 0 else ""
            lines.append(f"| {run} | 1,024 x TPU v4 (32 GiB) | {_layout_cell(b['label'])} | {_fit_cell(b)} | "
                         f"{_estimate_cell(b)} | {PUBLISHED['glam'] if i == 0 else ''} |")  # fmt: skip
        for t in s["rejected"]:
            lines.append(f"| GLaM 64B/64E, rejected | 1,024 x TPU v4 (32 GiB) | {_layout_cell(t['label'])} | "
                         f"{t['reason']} | | |")  # fmt: skip
    return "\n".join(lines)


def write_docs(results: dict) -> None:
    text = DOC.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{DOC}: markers {START} / {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{table(results)}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(STUDIES), help="comma-separated studies: " + ", ".join(STUDIES))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "plan_papers.json"), help="raw results (JSON)")
    ap.add_argument("--from-json", action="store_true", help="do not plan: rewrite the table from --json")
    ap.add_argument("--write-docs", action="store_true", help=f"write the table into {DOC.relative_to(REPO)}")
    args = ap.parse_args()
    out = Path(args.json)
    results: dict = json.loads(out.read_text()) if out.is_file() else {}  # studies not rerun keep their results
    if not args.from_json:
        for name in args.only.split(","):
            if name not in STUDIES:
                raise SystemExit(f"unknown study {name!r}; known: {', '.join(STUDIES)}")
            start = time.perf_counter()
            results[name] = STUDIES[name]()
            _log(f"{name}: {time.perf_counter() - start:.0f} s")
            out.write_text(json.dumps(results, indent=1))
    print(table(results))
    if args.write_docs:
        write_docs(results)


if __name__ == "__main__":
    main()
