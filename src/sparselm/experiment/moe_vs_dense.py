"""``sparselm experiment moe-vs-dense``: does an MoE reach a dense model's loss with less training compute?

Stages, each restartable (a rerun with the same ``--out`` skips finished runs and resumes a half-trained one):

1. data: raw text -> documents -> tokenizer -> shards (``OUT/data``; validation held out by document);
2. search: dense-S and one MoE recipe in every candidate regime for a few steps; the regime where the MoE gains
   most over dense-S at equal steps is the one the rest of the experiment runs in;
3. plan: time one step of every model and choose the full budget B (steps) that fits ``--budget-minutes``;
4. main: the dense frontier (sizes XS, S, M at B/4, B/2 and B, each its own schedule), the seed systems' recipes
   at B, then the best recipe's third seed, its sweep over the number of experts and its shorter budgets;
5. ``OUT/results.json`` (final losses, curves, times, expert load) and the report rendered from it alone.
"""

from __future__ import annotations

import json
import os
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
from sparselm.errors import InputError
from sparselm.experiment import plan as planning
from sparselm.experiment.family import QUICK_REGIMES, REGIMES, SEARCHED, RunSpec
from sparselm.precision import resolve_precision

WARMUP_FRACTION = 0.10  # of each run's own steps (why: docs/moe-vs-dense-design.md)
QUICK_MAX_CHARS = 6_000_000  # --quick reads about 6 MB of text: enough for a few hundred steps of small models
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that decide bf16 and matmul speed
LOAD_WINDOWS = 8  # expert-load windows kept per run in results.json (first, last and evenly spaced between)


@dataclass
class ExperimentOptions:
    data: list[Path]
    out: Path
    report: Path | None = None  # default OUT/moe-vs-dense.md
    budget_minutes: float = 80.0
    quick: bool = False
    steps: int = 0  # the full budget B in steps; 0: chosen from the budget
    search_steps: int = 0  # steps of each search run; 0: chosen from the budget
    regimes: tuple[str, ...] = ()  # candidate regimes (default: family.SEARCHED, all quick ones; one skips the search)
    layout: planning.Layout = field(default_factory=planning.Layout)
    vocab_size: int = 2048  # small, so the FFNs the experts replace are a real share of a small model
    val_fraction: float = 0.02
    eval_batches: int = 16
    threads: int = 0  # torch threads of each run (0: the cores shared out among the jobs)
    jobs: int = 1  # runs trained at once, each in its own process
    precision: str = "auto"  # auto | bf16 | fp32 (sparselm.precision); the plan records what auto resolved to
    progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        if self.budget_minutes <= 0:
            raise InputError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if self.steps < 0 or self.search_steps < 0:
            raise InputError("--steps and --search-steps must be >= 0")
        if self.steps and self.steps < 4:
            raise InputError(f"--steps must be at least 4 (the shortest budget is a quarter of it), got {self.steps}")
        known = QUICK_REGIMES if self.quick else REGIMES
        unknown = [r for r in self.regimes if r not in known]
        if unknown:
            raise InputError(f"--regimes: unknown {', '.join(unknown)} (known: {', '.join(known)})")
        lay = self.layout
        if lay.seeds < 2 or lay.other_seeds < 1:
            raise InputError(f"--seeds must be >= 2 and --other-seeds >= 1, got {lay.seeds} and {lay.other_seeds}")
        from sparselm.experiment.family import RECIPES

        bad = [r for r in lay.recipes if r not in RECIPES]
        if bad or not lay.recipes:
            raise InputError(f"--recipes: expected some of {', '.join(RECIPES)}, got {', '.join(lay.recipes)}")
        if any(e < 2 for e in lay.sweep_experts):
            raise InputError(f"--experts needs numbers of experts >= 2, got {lay.sweep_experts}")
        if self.jobs < 1 or self.threads < 0:
            raise InputError(f"--jobs must be >= 1 and --threads >= 0, got {self.jobs} and {self.threads}")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def threads_per_run(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.jobs)

    def candidate_regimes(self):
        known = QUICK_REGIMES if self.quick else REGIMES
        return [known[name] for name in (self.regimes or (tuple(known) if self.quick else SEARCHED))]


def _log(message: str) -> None:
    tqdm.write(f"[moe-vs-dense] {message}", file=sys.stderr)


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    memory = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f in CPU_FLAGS]
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class StageClock:
    """Wall time of every stage and the machine's load during it, kept in OUT/timings.json across invocations: a
    rerun that skips finished work does not lose its time, so the report states what the whole experiment cost."""

    def __init__(self, path: Path) -> None:
        self.path = path
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.seconds: dict[str, float] = saved.get("seconds", {})
        self.loads: list[float] = saved.get("loads", [])

    def record(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        load = _load_average()
        if load is not None:
            self.loads.append(load)
        self.path.write_text(json.dumps({"seconds": self.seconds, "loads": self.loads}, indent=1))

    def total(self, prefix: str = "") -> float:
        return sum(v for k, v in self.seconds.items() if k.startswith(prefix))


# ------------------------------------------------------------------------------------------------------- training


def train_run(run: RunSpec, opts: ExperimentOptions, run_dir: Path) -> bool:
    """Train (or finish training) one run with its own schedule; False if it was already trained."""
    from sparselm.checkpoint.files import latest_checkpoint
    from sparselm.train.trainer import train

    cfg, steps = run.cfg, run.steps
    if "optim.warmup_steps" not in {o.split("=")[0] for o in run.overrides}:
        cfg.optim.warmup_steps = max(1, round(steps * WARMUP_FRACTION))
    cfg.train.eval_every = max(1, steps // planning.EVAL_POINTS)
    cfg.train.eval_batches = opts.eval_batches
    cfg.checkpoint.every = max(1, steps // 2)
    cfg.logging.log_every = max(1, min(10, steps // 20))
    cfg.logging.progress = opts.progress and opts.jobs == 1  # bars of runs side by side would overwrite each other
    cfg.train.threads = opts.threads_per_run
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        _check_same_run(cfg, run_dir)
    if latest is not None and latest.name == f"step_{steps:08d}":
        return False
    if latest is None and run_dir.exists():
        shutil.rmtree(run_dir)  # a run that died before its first checkpoint: its partial log would mislead
    resuming = f" (resuming from {latest.name})" if latest else ""
    _log(f"{run.model} seed {run.seed}: {steps} step{'' if steps == 1 else 's'}{resuming}")
    train(cfg, run_dir, resume=latest is not None)
    return True


def worker_pool(jobs: int):
    """Processes that train runs side by side. Spawned, not forked: a forked child would inherit this process's
    OpenMP pool and torch state. Each stops when this process dies, even by SIGKILL, instead of training on."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(jobs, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),))


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _check_same_run(cfg, run_dir: Path) -> None:
    """A run found under OUT/runs must be this one: its directory name says the model, steps and seed, not the
    regime or the recipe's settings, and a rerun with other options must not count another run as finished."""
    from dataclasses import asdict

    from sparselm.config import load_config

    saved = load_config(run_dir / "config.toml")
    for section in ("model", "moe", "optim"):
        if asdict(getattr(saved, section)) != asdict(getattr(cfg, section)):
            raise InputError(
                f"{run_dir} holds a run with other {section} settings (another regime or recipe?): "
                "give the experiment a new --out, or remove that directory"
            )


def _train_all(
    runs: list[RunSpec], opts: ExperimentOptions, clock: StageClock, stage: str, step_seconds: dict[str, float]
) -> None:
    """Train ``runs``, ``opts.jobs`` at a time, longest planned first (so the last ones to finish are short). With
    several jobs the stage's wall time is shared out evenly among the runs trained: the clock adds up to wall time."""
    if opts.jobs == 1:
        for run in runs:
            start = time.perf_counter()
            if train_run(run, opts, opts.out / "runs" / run.slug):
                clock.record(f"{stage}/{run.slug}", time.perf_counter() - start)
        return
    order = sorted(runs, key=lambda r: -r.steps * step_seconds.get(r.timing_key, 1.0))
    start = time.perf_counter()
    with worker_pool(opts.jobs) as pool:
        futures = [(run, pool.submit(train_run, run, opts, opts.out / "runs" / run.slug)) for run in order]
        trained = [run for run, future in futures if future.result()]
    for run in trained:
        clock.record(f"{stage}/{run.slug}", (time.perf_counter() - start) / len(trained))


# ------------------------------------------------------------------------------------------------------- collect


def _sample(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def collect_run(run: RunSpec, run_dir: Path) -> dict[str, Any]:
    from sparselm.train.metrics import read_metrics

    flops_per_token = run.train_flops_per_token
    curve, loads = {}, []
    for r in read_metrics(run_dir):
        if "val_loss" in r:  # a resumed run logs the steps after its checkpoint again: keep the last record
            curve[r["step"]] = {"step": r["step"], "val_loss": round(r["val_loss"], 5), "seconds": r["train_seconds"]}
        elif "expert_load" in r and not r.get("skipped"):
            loads.append({"step": r["step"], "load": [[round(x, 5) for x in layer] for layer in r["expert_load"]]})
    points = list(curve.values())
    tokens = run.steps * run.cfg.train.global_batch_size * run.cfg.data.seq_len
    m, moe = run.cfg.model, run.cfg.moe
    return {
        "model": run.model,
        "kind": run.kind,
        "group": run.group,
        "recipe": run.recipe,
        "num_experts": run.num_experts,
        "top_k": moe.top_k if run.kind == "moe" else 0,
        "overrides": run.overrides,
        "steps": run.steps,
        "seed": run.seed,
        "shape": {"d_model": m.d_model, "n_layers": m.n_layers, "d_ff": m.d_ff, "lr": run.cfg.optim.lr},
        "total_params": run.total_params,
        "active_params": run.active_params,
        "train_flops_per_token": flops_per_token,
        "flops_share": _flops_share(run, flops_per_token),
        "tokens": tokens,
        "train_flops": tokens * flops_per_token,
        "curve": points,
        "final_val_loss": points[-1]["val_loss"] if points else None,
        "train_seconds": points[-1]["seconds"] if points else None,
        "expert_load": _sample(loads, LOAD_WINDOWS),
    }


def _flops_share(run: RunSpec, train_flops_per_token: int) -> dict[str, Any]:
    """Shares of a token's training FLOPs in the FFNs an MoE replaces (for a dense run, the FFNs an MoE at the
    regime's placement would replace) and in the output layer: the part experts can change, and a part they cannot."""
    from sparselm.params.counting import ffn_params

    m = run.cfg.model
    replaced = run.cfg.moe.placement(m.n_layers)
    ffn_matmul = ffn_params(m.d_model, m.d_ff, m.ffn, m.bias)[0]
    return {
        "replaced_ffns": round(6 * ffn_matmul * len(replaced) / train_flops_per_token, 4),
        "output_layer": round(6 * m.d_model * m.vocab_size / train_flops_per_token, 4),
    }


# ----------------------------------------------------------------------------------------------------------- main


def _prepare(opts: ExperimentOptions, clock: StageClock) -> tuple[Path, dict[str, Any]]:
    from sparselm.experiment.data import prepare_dataset

    _log(f"data: {', '.join(map(str, opts.data))} -> {opts.out / 'data'}")
    start = time.perf_counter()
    shards = prepare_dataset(
        opts.data,
        opts.out / "data",
        opts.vocab_size,
        opts.val_fraction,
        planning.FIRST_SEED,
        progress=opts.progress,
        max_chars=QUICK_MAX_CHARS if opts.quick else 0,
    )
    if "data" not in clock.seconds:
        clock.record("data", time.perf_counter() - start)
    return shards, json.loads((shards / "meta.json").read_text())


def _configure(runs: list[RunSpec], shards: Path, precision: str) -> list[RunSpec]:
    for run in runs:
        run.cfg.data.path = str(shards)
        if "train.precision" not in {o.split("=")[0] for o in run.overrides}:
            run.cfg.train.precision = precision
    return runs


def _plan_key(opts: ExperimentOptions) -> dict[str, Any]:
    """What a saved plan depends on: a rerun with other settings must not reuse it."""
    lay = opts.layout
    return {
        "quick": opts.quick,
        "budget_minutes": opts.budget_minutes,
        "steps": opts.steps,
        "search_steps": opts.search_steps,
        "regimes": [r.name for r in opts.candidate_regimes()],
        "seeds": [lay.seeds, lay.other_seeds],
        "recipes": list(lay.recipes),
        "sweep_experts": list(lay.sweep_experts),
        "moe_overrides": lay.moe_overrides,
        "precision": opts.precision,
    }


def run_experiment(opts: ExperimentOptions) -> dict[str, Any]:
    from sparselm.experiment.report import write_report
    from sparselm.precision import measure_matmul_flops

    started = time.perf_counter()
    if opts.threads and opts.jobs == 1:
        torch.set_num_threads(opts.threads)
    opts.out.mkdir(parents=True, exist_ok=True)
    clock = StageClock(opts.out / "timings.json")
    shards, dataset = _prepare(opts, clock)
    vocab = int(dataset["vocab_size"])
    plan_path = opts.out / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    if plan.get("key") != _plan_key(opts):
        precision = resolve_precision(opts.precision, torch.device("cpu"), warn=_log)
        plan = {"key": _plan_key(opts), "precision": precision, "step_seconds": {}}
    precision = plan["precision"]

    def save() -> None:
        plan_path.write_text(json.dumps(plan, indent=1))

    regimes = opts.candidate_regimes()
    seconds = opts.budget_minutes * 60
    if len(regimes) > 1:
        if "search_steps" not in plan and opts.search_steps:
            plan["search_steps"] = opts.search_steps
        if "search_steps" not in plan:
            probe = _configure(planning.search_runs(regimes, vocab, 8), shards, precision)
            start = time.perf_counter()
            plan["step_seconds"] = _time_models(probe, plan["step_seconds"], opts)
            clock.record("plan/search", time.perf_counter() - start)

            def search_cost(steps: int) -> float:
                runs = planning.search_runs(regimes, vocab, steps)
                cost = sum(planning.run_seconds(r, plan["step_seconds"][r.timing_key], opts.eval_batches) for r in runs)
                return cost / opts.jobs

            plan["search_steps"] = planning.fit_steps(search_cost, planning.SEARCH_SHARE * seconds)
            save()
        search = _configure(planning.search_runs(regimes, vocab, plan["search_steps"]), shards, precision)
        _log(f"search: {len(regimes)} regimes, {plan['search_steps']} steps per run")
        _train_all(search, opts, clock, "search", plan["step_seconds"])
        if "regime" not in plan:
            plan["regime"] = _choose_regime(search, opts.out)
            save()
    else:
        search = []
        plan["regime"] = regimes[0].name
    regime = next(r for r in regimes if r.name == plan["regime"])
    _log(f"regime: {regime.name} ({regime.about})")

    if "steps" not in plan and opts.steps:
        plan["steps"] = opts.steps
    if "steps" not in plan:
        probe = _configure(planning.main_runs(regime, vocab, 8, opts.layout, None), shards, precision)
        for key in opts.layout.recipes:  # any recipe may turn out best: time its sweep models too
            probe += _configure(planning.main_runs(regime, vocab, 8, opts.layout, key), shards, precision)
        start = time.perf_counter()
        plan["step_seconds"] = _time_models(probe, plan["step_seconds"], opts)
        clock.record("plan/main", time.perf_counter() - start)

        def main_cost(steps: int) -> float:
            worst = 0.0
            for key in opts.layout.recipes:
                runs = planning.main_runs(regime, vocab, steps, opts.layout, key)
                cost = sum(planning.run_seconds(r, plan["step_seconds"][r.timing_key], opts.eval_batches) for r in runs)
                worst = max(worst, cost / opts.jobs)
            return worst

        plan["steps"] = planning.fit_steps(main_cost, seconds - clock.total())
        save()
    steps = plan["steps"]
    first = _configure(planning.main_runs(regime, vocab, steps, opts.layout, None), shards, precision)
    _log(f"main: B = {steps} steps; {len(first)} runs, then the best recipe's sweeps")
    _train_all(first, opts, clock, "main", plan["step_seconds"])
    if "best" not in plan:
        plan["best"] = _best_recipe(first, opts.out)
        save()
    runs = _configure(planning.main_runs(regime, vocab, steps, opts.layout, plan["best"]), shards, precision)
    _train_all(runs, opts, clock, "main", plan["step_seconds"])

    results = {
        "schema": "sparselm-moe-vs-dense/2",
        "command": opts.command,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "matmul_peak_flops": {
            "bf16": measure_matmul_flops(torch.bfloat16),
            "fp32": measure_matmul_flops(torch.float32),
        },
        "load_average": {"max": max(clock.loads, default=None), "samples": len(clock.loads)},
        "options": {
            "budget_minutes": opts.budget_minutes,
            "quick": opts.quick,
            "data": [str(p) for p in opts.data],
            "eval_batches": opts.eval_batches,
            "jobs": opts.jobs,
            "threads_per_run": opts.threads_per_run,
            "layout": asdict(opts.layout),
        },
        "dataset": {
            "vocab_size": vocab,
            "splits": {k: {"documents": v["documents"], "tokens": v["tokens"]} for k, v in dataset["splits"].items()},
        },
        "precision": precision,
        "warmup_fraction": WARMUP_FRACTION,
        "eval_points": planning.EVAL_POINTS,
        "regimes": [asdict(r) for r in regimes],
        "plan": {k: v for k, v in plan.items() if k != "key"},
        "wall_minutes": {
            "data": clock.total("data") / 60,
            "plan": clock.total("plan") / 60,
            "search": clock.total("search/") / 60,
            "main": clock.total("main/") / 60,
            "total": clock.total() / 60,
            "this_invocation": (time.perf_counter() - started) / 60,
        },
        "runs": [collect_run(r, opts.out / "runs" / r.slug) for r in [*search, *runs]],
    }
    (opts.out / "results.json").write_text(json.dumps(results, indent=1))
    report = opts.report or opts.out / "moe-vs-dense.md"
    write_report(results, report)
    results["report"] = str(report)
    return results


def _time_models(runs: list[RunSpec], known: dict[str, float], opts: ExperimentOptions) -> dict[str, float]:
    """Seconds per step of each model on the threads one run gets. With several jobs each run shares the machine
    with the others; the planner divides the summed time by the number of jobs and PLAN_SLACK covers the rest."""
    saved = torch.get_num_threads()
    torch.set_num_threads(opts.threads_per_run)
    try:
        return planning.step_seconds(runs, known, opts.progress)
    finally:
        torch.set_num_threads(saved)


def _final_loss(run: RunSpec, out: Path) -> float:
    record = collect_run(run, out / "runs" / run.slug)
    if record["final_val_loss"] is None:
        raise RuntimeError(f"{run.slug} finished without a validation loss")
    return record["final_val_loss"]


def _choose_regime(search: list[RunSpec], out: Path) -> str:
    """The regime where the search recipe's MoE ends furthest below dense-S trained for the same steps."""
    gain: dict[str, float] = {}
    for run in search:
        regime = run.group.removeprefix("search-")
        sign = 1.0 if run.kind == "dense" else -1.0
        gain[regime] = gain.get(regime, 0.0) + sign * _final_loss(run, out)
    return max(gain, key=gain.get)


def _best_recipe(runs: list[RunSpec], out: Path) -> str:
    """The recipe with the lowest mean final loss at the full budget (its first two seeds)."""
    losses: dict[str, list[float]] = {}
    full = max(r.steps for r in runs)
    for run in runs:
        if run.kind == "moe" and run.steps == full and not run.overrides:
            losses.setdefault(run.recipe, []).append(_final_loss(run, out))
    return min(losses, key=lambda k: sum(losses[k]) / len(losses[k]))
