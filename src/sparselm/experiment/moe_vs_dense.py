"""``sparselm experiment moe-vs-dense``: train dense S/M/L and S+MoE-E on the same tokens, evaluate, write a report.

Stages, each restartable (a rerun with the same ``--out`` skips what is finished and resumes a half-trained run):

1. data: raw text -> documents -> tokenizer -> shards (``OUT/data``; validation held out by document);
2. plan: unless ``--steps`` is given, time a few steps of every model on this machine and choose the number of
   training steps (the same for every run, so all see the same tokens) that fits ``--budget-minutes`` after
   reserving time for evaluation; the plan is saved and reused by reruns;
3. train every run with ``sparselm.train`` (validation loss at fixed intervals, with training FLOPs and wall time);
4. evaluate every run's final checkpoint zero-shot with the evaluation harness;
5. collect ``OUT/results.json`` and write the report (Markdown + PNG plots).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sparselm.config import PRECISIONS
from sparselm.experiment.family import RunSpec, build_family, parse_variant
from sparselm.precision import resolve_precision

DEFAULT_TASKS = ("lambada", "piqa", "boolq", "arc_easy", "winogrande")
EVAL_POINTS = 16  # validation evaluations per run (the points of the loss-vs-FLOPs curves)
# Warmup as a fraction of each run's steps. 5% (27 of 552 steps) was measured too short on the default family:
# 55 steps lowered dense-S's final validation loss from 4.198 to 4.115 and S+MoE-16 top-1's from 4.145 to 4.076.
WARMUP_FRACTION = 0.10
QUICK_MAX_CHARS = 6_000_000  # --quick reads about 6 MB of text: enough for a few hundred steps of small models


@dataclass
class ExperimentOptions:
    data: list[Path]
    out: Path
    report: Path | None = None  # default OUT/moe-vs-dense.md
    budget_minutes: float = 70.0
    quick: bool = False
    steps: int = 0  # 0: chosen from the budget
    experts: tuple[int, ...] = (4, 16, 64)
    top_ks: tuple[int, ...] = (1, 2)
    vocab_size: int = 2048  # small, so the FFNs the experts replace are a real share of a small model (report)
    seq_len: int = 256
    batch_size: int = 16
    seed: int = 1234
    val_fraction: float = 0.02
    eval_batches: int = 8
    tasks: tuple[str, ...] = DEFAULT_TASKS
    eval_limit: int = 500
    eval_data_dir: Path | None = None
    moe_overrides: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)  # BASE_SLUG:section.key=value,... (see family.parse_variant)
    threads: int = 0
    precision: str = "auto"  # auto | bf16 | fp32 (train/precision.py); the plan records what auto resolved to
    progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        if self.budget_minutes <= 0:
            raise ValueError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        if not self.experts or any(e < 2 for e in self.experts):
            raise ValueError(f"--experts needs numbers of experts >= 2, got {self.experts}")
        if not self.top_ks or any(k not in (1, 2) for k in self.top_ks):
            raise ValueError(f"--top-k takes 1 and/or 2, got {self.top_ks}")
        if self.eval_limit < 0:
            raise ValueError(f"--eval-limit must be >= 0, got {self.eval_limit}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def _log(message: str) -> None:
    tqdm.write(f"[moe-vs-dense] {message}", file=sys.stderr)


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import os

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------------------------------------------------ plan


def time_steps(run: RunSpec, warmup: int = 2, steps: int = 3) -> float:
    """Median seconds per optimizer step of ``run`` on random tokens, after ``warmup`` untimed steps (the first
    steps pay for allocation and are slower than the rest)."""
    from sparselm.parallel.runtime import Runtime
    from sparselm.train.trainer import build_model, forward_backward

    cfg = run.cfg
    runtime = Runtime(cfg, torch.device("cpu"))
    model = runtime.parallelize(build_model(cfg))
    model.train()
    optimizer, _ = runtime.build_optimizer(model)
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.train.global_batch_size, cfg.data.seq_len)
    x = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
    y = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, cfg, x, y, 1, runtime)
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# Zero-shot evaluation of one model on the five default tasks at 500 examples each took 17-26 times as long as one
# of its training steps on the reference machine (2-core EPYC, bf16); reserve 30 step-equivalents per 500 examples.
EVAL_STEP_EQUIVALENTS_PER_500 = 30.0
PLAN_SLACK = 1.25


def make_plan(runs: list[RunSpec], opts: ExperimentOptions, seconds_left: float) -> dict[str, Any]:
    """Steps per run so that training, validation and zero-shot evaluation fit in ``seconds_left``."""
    step_seconds = {}
    for run in tqdm(runs, desc="timing", unit="model", disable=not opts.progress, dynamic_ncols=True):
        step_seconds[run.slug] = time_steps(run)
    per_step = sum(step_seconds.values())
    # Validation: EVAL_POINTS x eval_batches forward passes of one batch per run, a forward ~1/3 of a training step.
    val_seconds = EVAL_POINTS * opts.eval_batches * per_step / 3
    eval_seconds = 0.0
    if opts.tasks:
        per_task = EVAL_STEP_EQUIVALENTS_PER_500 / len(DEFAULT_TASKS) * opts.eval_limit / 500
        eval_seconds = per_task * len(opts.tasks) * per_step
    train_seconds = seconds_left - val_seconds - eval_seconds
    # 25% for checkpoints, logging and data, and because real training is slower than the random-token timing (routing
    # on real text is unbalanced early on): on 2026-11-24 a plan of 70.6 minutes of training and validation took 90.8.
    steps = max(20, int(train_seconds / (per_step * PLAN_SLACK)))
    return {
        "steps": steps,
        "step_seconds": step_seconds,
        "estimated_minutes": {
            "train": steps * per_step / 60,
            "validation": val_seconds / 60,
            "zero_shot": eval_seconds / 60,
        },
        "seconds_left_at_planning": seconds_left,
    }


# ------------------------------------------------------------------------------------------------------- training


class StageClock:
    """Wall time of every stage, kept in OUT/timings.json across invocations: a rerun that skips finished stages
    does not lose their time, so the report states what the whole experiment cost."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.path.write_text(json.dumps(self.seconds, indent=1))

    def total(self, prefix: str = "") -> float:
        return sum(v for k, v in self.seconds.items() if k.startswith(prefix))


def train_run(run: RunSpec, steps: int, opts: ExperimentOptions, run_dir: Path) -> bool:
    """Train (or finish training) one run; False if it was already trained."""
    from sparselm.checkpoint.files import latest_checkpoint
    from sparselm.train.trainer import train

    cfg = run.cfg
    cfg.train.max_steps = steps
    if "optim.warmup_steps" not in run.pinned:  # a variant may set its own warmup
        cfg.optim.warmup_steps = max(1, round(steps * WARMUP_FRACTION))
    cfg.train.eval_every = max(1, steps // EVAL_POINTS)
    cfg.train.eval_batches = opts.eval_batches
    cfg.checkpoint.every = max(1, steps // 4)
    cfg.logging.log_every = max(1, min(10, steps // 50))
    cfg.logging.progress = opts.progress
    if opts.threads:
        cfg.train.threads = opts.threads
    latest = latest_checkpoint(run_dir)
    if latest is not None and latest.name == f"step_{steps:08d}":
        _log(f"{run.name}: already trained ({latest})")
        return False
    if latest is None and run_dir.exists():
        shutil.rmtree(run_dir)  # a run that died before its first checkpoint: its partial log would mislead
    _log(f"{run.name}: training {steps} steps" + (f" (resuming from {latest.name})" if latest else ""))
    train(cfg, run_dir, resume=latest is not None)
    return True


def evaluate_run(
    run_dir: Path, opts: ExperimentOptions, data_dir: Path, clock: StageClock, precision: str
) -> dict[str, Any]:
    from sparselm.eval.harness import read_results, results_filename, run_eval

    out_dir = run_dir / "eval"
    path = out_dir / f"{results_filename(0)}.json"
    if path.is_file():
        meta, results = read_results(path)
        if meta.get("limit") == opts.eval_limit and {r.task for r in results} == set(opts.tasks):
            return _task_summary(results)
    start = time.perf_counter()
    results, _, _ = run_eval(
        run_dir,
        list(opts.tasks),
        data_dir=data_dir,
        limit=opts.eval_limit,
        precision=precision,
        out_dir=out_dir,
        progress=opts.progress,
    )
    clock.record(f"eval/{run_dir.name}", time.perf_counter() - start)
    return _task_summary(results)


def _task_summary(results: list) -> dict[str, Any]:
    summary = {}
    for r in results:
        key = "acc" if "acc" in r.metrics else next(iter(r.metrics))
        summary[r.task] = {"metric": key, **r.metrics[key], "n": r.n}
    return summary


# ------------------------------------------------------------------------------------------------------- collect


def collect_run(run: RunSpec, run_dir: Path, steps: int) -> dict[str, Any]:
    from sparselm.train.metrics import read_metrics

    records = read_metrics(run_dir)
    flops_per_token = run.train_flops_per_token
    curve, train_log, loads, dropped = [], [], [], []
    for r in records:
        if "val_loss" in r:
            curve.append(
                {
                    "step": r["step"],
                    "tokens": r["tokens_seen"],
                    "flops": r["tokens_seen"] * flops_per_token,
                    "val_loss": r["val_loss"],
                    "train_seconds": r.get("train_seconds"),
                }
            )
        elif "loss" in r and not r.get("skipped"):
            train_log.append({"step": r["step"], "loss": r["loss"], "tokens_per_sec": r.get("tokens_per_sec")})
            if "expert_load" in r:
                loads.append({"step": r["step"], "load": r["expert_load"]})
                dropped.append(r.get("dropped_fraction", 0.0))
    # A resumed run logs the steps after the checkpoint again: keep the last record of every step.
    curve = list({p["step"]: p for p in curve}.values())
    last_seconds = curve[-1]["train_seconds"] if curve else None
    tokens = steps * run.cfg.train.global_batch_size * run.cfg.data.seq_len
    return {
        "name": run.name,
        "slug": run.slug,
        "kind": run.kind,
        "num_experts": run.num_experts,
        "top_k": run.top_k,
        "variant_of": run.variant_of,
        "overrides": run.overrides,
        "d_model": run.cfg.model.d_model,
        "n_layers": run.cfg.model.n_layers,
        "flops_share": _flops_share(run, flops_per_token),
        "lr": run.cfg.optim.lr,
        "total_params": run.total_params,
        "active_params": run.active_params,
        "train_flops_per_token": flops_per_token,
        "steps": steps,
        "tokens": tokens,
        "train_flops": tokens * flops_per_token,
        "curve": curve,
        "train_log": train_log,
        "expert_load": loads,
        "dropped_fraction": (sum(dropped) / len(dropped)) if dropped else None,
        "final_val_loss": curve[-1]["val_loss"] if curve else None,
        "final_val_ppl": math.exp(curve[-1]["val_loss"]) if curve else None,
        "train_seconds": last_seconds,
        "tokens_per_sec": (tokens / last_seconds) if last_seconds else None,
    }


# ----------------------------------------------------------------------------------------------------------- main


def _flops_share(run: RunSpec, train_flops_per_token: int) -> dict[str, Any]:
    """Shares of a token's training FLOPs in the FFNs an MoE run replaces (every ``moe_every``-th layer; for a dense
    run, the FFNs an MoE at that placement would replace) and in the output layer: what experts could change."""
    from sparselm.params.counting import ffn_params

    m = run.cfg.model
    replaced = run.cfg.moe.placement(m.n_layers)
    ffn_matmul = ffn_params(m.d_model, m.d_ff, m.ffn, m.bias)[0]
    return {
        "replaced_ffn_layers": len(replaced),
        "replaced_ffns": 6 * ffn_matmul * len(replaced) / train_flops_per_token,
        "output_layer": 6 * m.d_model * m.vocab_size / train_flops_per_token,
        "vocab_size": m.vocab_size,
    }


def _set_precision(runs: list[RunSpec], precision: str) -> None:
    for run in runs:
        if "train.precision" not in run.pinned:  # a variant may compare precisions
            run.cfg.train.precision = precision


def run_experiment(opts: ExperimentOptions) -> dict[str, Any]:
    from sparselm.experiment.data import prepare_dataset
    from sparselm.experiment.report import write_report
    from sparselm.precision import measure_matmul_flops

    started = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    report_path = opts.report or out / "moe-vs-dense.md"
    data_dir = None
    if opts.tasks:
        from sparselm.eval.tasks import load_task, resolve_data_dir

        for task in opts.tasks:
            load_task(task)  # a misspelt task fails now, not after an hour of training
        data_dir = resolve_data_dir(opts.eval_data_dir)

    clock = StageClock(out / "timings.json")
    _log(f"data: {', '.join(map(str, opts.data))} -> {out / 'data'}")
    stage_start = time.perf_counter()
    shards = prepare_dataset(
        opts.data,
        out / "data",
        opts.vocab_size,
        opts.val_fraction,
        opts.seed,
        progress=opts.progress,
        max_chars=QUICK_MAX_CHARS if opts.quick else 0,
    )
    if "data" not in clock.seconds or not (out / "data" / "shards" / "meta.json").is_file():
        clock.record("data", time.perf_counter() - stage_start)
    dataset = json.loads((shards / "meta.json").read_text())
    vocab_size = int(dataset["vocab_size"])
    runs = build_family(
        vocab_size,
        opts.seq_len,
        opts.batch_size,
        opts.experts,
        opts.top_ks,
        quick=opts.quick,
        seed=opts.seed,
        moe_overrides=opts.moe_overrides,
    )
    base_slugs = [r.slug for r in runs]
    runs += [parse_variant(text, runs) for text in opts.variants]
    if len({r.slug for r in runs}) != len(runs):
        raise ValueError("two --variant options describe the same run")
    for run in runs:
        run.cfg.data.path = str(shards)
        run.cfg.logging.peak_flops = 1.0  # MFU is not this experiment's subject; skip the per-run peak measurement

    plan_path = out / "plan.json"
    plan_key = {
        "runs": base_slugs,  # variants added later train for the family's number of steps
        "quick": opts.quick,
        "budget_minutes": opts.budget_minutes,
        "steps_option": opts.steps,
        "seq_len": opts.seq_len,
        "batch_size": opts.batch_size,
        "moe_overrides": opts.moe_overrides,
        "precision": opts.precision,
    }
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    if plan is not None and "precision" not in plan.get("key", {}):
        plan["key"]["precision"] = opts.precision  # a plan from before precision was an option: kept, as bf16
    if plan is None or plan.get("key") != plan_key:
        # Resolved once and recorded: every run of the experiment, including variants added later on another
        # machine, computes in the same precision as the step times the plan was made from.
        precision = resolve_precision(opts.precision, torch.device("cpu"), warn=_log)
        _log(f"precision: {precision}" + (" (auto)" if opts.precision == "auto" else ""))
        _set_precision(runs, precision)
        if opts.steps:
            plan = {"steps": opts.steps, "step_seconds": {}}
        else:
            seconds_left = opts.budget_minutes * 60 - clock.total()
            stage_start = time.perf_counter()
            plan = make_plan([r for r in runs if r.variant_of is None], opts, seconds_left)
            clock.record("plan", time.perf_counter() - stage_start)
        plan["key"] = plan_key
        plan["precision"] = precision
        plan_path.write_text(json.dumps(plan, indent=1))
    precision = plan.get("precision", "bf16")  # plans written before precision was recorded were bf16
    _set_precision(runs, precision)
    steps = int(plan["steps"])
    tokens = steps * opts.batch_size * opts.seq_len
    _log(f"plan: {steps} steps x {opts.batch_size} x {opts.seq_len} = {tokens:,} training tokens per run")

    for run in runs:
        stage_start = time.perf_counter()
        if train_run(run, run.steps or steps, opts, out / "runs" / run.slug):
            clock.record(f"train/{run.slug}", time.perf_counter() - stage_start)

    collected = []
    for run in runs:
        record = collect_run(run, out / "runs" / run.slug, run.steps or steps)
        if data_dir is not None:
            _log(f"{run.name}: zero-shot evaluation ({', '.join(opts.tasks)}, limit {opts.eval_limit})")
            record["tasks"] = evaluate_run(out / "runs" / run.slug, opts, data_dir, clock, precision)
        collected.append(record)

    variant_seconds = sum(
        clock.seconds.get(f"{stage}/{r.slug}", 0.0)
        for r in runs
        if r.variant_of is not None
        for stage in ("train", "eval")
    )
    commands_path = out / "commands.json"
    commands = json.loads(commands_path.read_text()) if commands_path.is_file() else []
    if opts.command and opts.command not in commands:
        commands.append(opts.command)
        commands_path.write_text(json.dumps(commands, indent=1))
    peak = {
        "bf16": measure_matmul_flops(torch.bfloat16),
        "fp32": measure_matmul_flops(torch.float32),
    }
    results = {
        "schema": "sparselm-moe-vs-dense/1",
        "command": opts.command,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "matmul_peak_flops": peak,
        "options": json.loads(json.dumps(asdict(opts), default=str)),
        "dataset": {
            "path": str(shards),
            "vocab_size": vocab_size,
            "splits": {k: {"documents": v["documents"], "tokens": v["tokens"]} for k, v in dataset["splits"].items()},
            "extract": json.loads((out / "data" / "extract.json").read_text())
            if (out / "data" / "extract.json").is_file()
            else None,
        },
        "plan": plan,
        "precision": precision,
        "steps": steps,
        "warmup_steps": max(1, round(steps * WARMUP_FRACTION)),
        "tokens_per_run": tokens,
        "wall_minutes": {
            "data": clock.total("data") / 60,
            "plan": clock.total("plan") / 60,
            "train": clock.total("train/") / 60,
            "eval": clock.total("eval/") / 60,
            "total": clock.total() / 60,
            "this_invocation": (time.perf_counter() - started) / 60,
            # the family alone (what the default command costs) and the recipe variants added to it
            "family_total": (clock.total() - variant_seconds) / 60,
            "variants": variant_seconds / 60,
        },
        "commands": commands,
        "eval_points": EVAL_POINTS,
        "runs": collected,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    write_report(results, report_path)
    results["report"] = str(report_path)
    return results
