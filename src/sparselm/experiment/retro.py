"""``sparselm experiment retro``: baselines and RETRO models (dense and MoE) on the same tokens, bits per byte of
held-out documents with and without retrieval, database size, neighbours, leakage, controls; then the report.

Stages, each restartable (a rerun with the same ``--out`` skips what is done and resumes a half-trained run):

1. data: the text -> documents -> tokenizer -> shards (``OUT/data``, validation held out by document), and a second
   corpus tokenised the same way that shares no document with the training set (``OUT/other``);
2. databases: the training split (``db100``), seeded document samples of it (``db30``, ``db10``: keys copied, not
   re-encoded), the other corpus (``other``: excludes the training set); neighbours of the training split
   (``db100``, which RETRO trains with) and of the validation split (all of them);
3. training: dense baseline (2 seeds), dense RETRO (2 seeds), a RETRO-fit of the first baseline, and an MoE
   baseline, RETRO and RETRO-fit, all on the same batches;
4. evaluation: bits per byte on evenly spaced validation windows for each (model, database, k, control), saved in
   ``OUT/eval.json`` one entry at a time;
5. ``OUT/results.json`` and the report (Markdown + PNG plots).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sparselm.errors import InputError
from sparselm.experiment.retro_report import BUDGET_MINUTES, collect, eval_key, write_report


@dataclass(frozen=True)
class Scale:
    """Everything the full and the --quick runs differ in."""

    max_chars: int  # text read from --data
    other_chars: int  # text read from the other corpus
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    cca_start: int
    encoder_d_model: int
    encoder_heads: int
    encoder_d_ff: int
    experts: int
    seq_len: int
    batch: int
    steps: int
    fit_steps: int
    lr: float
    eval_windows: int
    val_fraction: float
    budget_minutes: float  # issue 17: the whole experiment in at most this much wall time on 2 cores


FULL = Scale(
    max_chars=12_000_000, other_chars=6_000_000, d_model=128, n_layers=9, n_heads=4, d_ff=384, cca_start=6,
    encoder_d_model=96, encoder_heads=3, encoder_d_ff=256, experts=8, seq_len=512, batch=16, steps=200,
    fit_steps=70, lr=2e-3, eval_windows=384, val_fraction=0.04, budget_minutes=BUDGET_MINUTES["full"],
)  # fmt: skip
QUICK = Scale(
    max_chars=1_500_000, other_chars=400_000, d_model=64, n_layers=6, n_heads=2, d_ff=192, cca_start=3,
    encoder_d_model=64, encoder_heads=2, encoder_d_ff=128, experts=4, seq_len=256, batch=8, steps=60,
    fit_steps=24, lr=3e-3, eval_windows=48, val_fraction=0.04, budget_minutes=BUDGET_MINUTES["quick"],
)  # fmt: skip
SEEDS = (1234, 4321)
DB_FRACTIONS = {"db10": 0.1, "db30": 0.3}
K_EVAL = (1, 2, 4, 10)


@dataclass
class RetroExperiment:
    data: list[Path]
    out: Path
    report: Path | None = None
    other: list[Path] = field(default_factory=list)  # the corpus of the database excluding the training set
    quick: bool = False
    threads: int = 0
    precision: str = "auto"
    progress: bool = True
    command: str = ""

    @property
    def scale(self) -> Scale:
        return QUICK if self.quick else FULL


def run_experiment(opts: RetroExperiment) -> dict[str, Any]:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    opts.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(opts.out / "wall_time.json")
    with clock("data"):
        shards, other = _data(opts)
    with clock("databases"):
        dbs = _databases(opts, shards, other)
    with clock("training"):
        runs = _train_all(opts, shards, dbs["db100"])
    with clock("evaluation"):
        evals = _evaluate_all(opts, shards, dbs, runs)

    results = collect(opts, shards, dbs, runs, evals, clock.record())
    (opts.out / "results.json").write_text(json.dumps(results, indent=1))
    report = write_report(results, opts.report or opts.out / "retro.md")
    return {"report": report, "results": results}


class Clock:
    """Wall time per stage, summed over invocations (a restarted experiment adds to it), and each invocation's start
    with the machine's 1-minute load average then (a timing taken on a busy machine says so)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if saved and "stages" not in saved:  # the format before invocations were recorded
            saved = {"stages": saved, "invocations": []}
        self.seconds: dict[str, float] = saved.get("stages", {})
        self.invocations: list[dict[str, Any]] = saved.get("invocations", [])
        self.invocations.append({"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load": _load()})
        self._save()

    def _save(self) -> None:
        self.path.write_text(json.dumps({"stages": self.seconds, "invocations": self.invocations}, indent=1))

    def __call__(self, stage: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[stage] = clock.seconds.get(stage, 0.0) + time.perf_counter() - self.start
                clock._save()

        return _Stage()

    def record(self) -> dict[str, Any]:
        """What results.json keeps: stage seconds, invocations, and the load when the last stage ended."""
        return {"stages": dict(self.seconds), "invocations": self.invocations, "load_at_end": _load()}


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------------------ data
def _data(opts: RetroExperiment) -> tuple[Path, Path]:
    from sparselm.data.prepare import prepare
    from sparselm.experiment.data import extract_documents, find_text_files, prepare_dataset

    s = opts.scale
    shards = prepare_dataset(opts.data, opts.out / "data", 2048, s.val_fraction, SEEDS[0], opts.progress, s.max_chars)
    other_dir = opts.out / "other"
    if not (other_dir / "shards" / "meta.json").is_file():
        sources = opts.other or [p for p in (Path("../shared/data/gutenberg-nltk"),) if p.is_dir()]
        if not sources:
            raise InputError("no corpus for the database that excludes the training set: pass --other TEXT_DIR")
        other_dir.mkdir(parents=True, exist_ok=True)
        documents = other_dir / "documents.jsonl.gz"
        extract_documents(find_text_files(sources), documents, opts.progress, s.other_chars)
        prepare([documents], shards / "tokenizer.model", other_dir / "shards", val_fraction=0.0, seed=0,
                progress=opts.progress, overwrite=True)  # fmt: skip
    return shards, other_dir / "shards"


def _databases(opts: RetroExperiment, shards: Path, other: Path) -> dict[str, Path]:
    from sparselm.retro.build import BuildOptions, build_database

    root, say = opts.out / "db", (lambda msg: tqdm.write(msg))
    val = [(str(shards), "val")]
    dbs = {"db100": root / "db100", **{name: root / name for name in DB_FRACTIONS}, "other": root / "other"}
    common = {"precision": opts.precision, "progress": opts.progress}
    build_database(BuildOptions(out=dbs["db100"], data=[(str(shards), "train")], **common), say)
    for name, fraction in DB_FRACTIONS.items():
        opts_ = BuildOptions(out=dbs[name], from_db=dbs["db100"], doc_fraction=fraction, seed=7, queries=val, **common)
        build_database(opts_, say)
    # The other corpus was prepared with no validation split: all of it is in its train split. The validation
    # chunks' keys were encoded for db100 already.
    opts_ = BuildOptions(
        out=dbs["other"], data=[(str(other), "train")], queries=val, reuse_keys=[dbs["db100"]], **common
    )
    build_database(opts_, say)
    return dbs


# -------------------------------------------------------------------------------------------------------- training
def model_overrides(s: Scale, shards: Path, moe: bool) -> list[str]:
    warmup = max(1, s.steps // 10)
    base = [
        "model.vocab_size=2048", f"model.d_model={s.d_model}", f"model.n_layers={s.n_layers}",
        f"model.n_heads={s.n_heads}", f"model.d_ff={s.d_ff}", f"model.max_seq_len={s.seq_len}",
        f"data.path={shards}", f"data.seq_len={s.seq_len}", f"optim.lr={s.lr}", f"optim.warmup_steps={warmup}",
        f"train.max_steps={s.steps}", f"train.global_batch_size={s.batch}", f"train.micro_batch_size={s.batch}",
        "train.eval_every=0", "checkpoint.every=50", "checkpoint.keep_last=1", "logging.log_every=10",
        "logging.tensorboard=false",
    ]  # fmt: skip
    if moe:  # same active FFN width per token as the dense model: top-2 of experts half as wide
        base += [f"moe.num_experts={s.experts}", "moe.top_k=2", "moe.moe_every=2", f"moe.d_ff_expert={s.d_ff // 2}"]
    return base


def retro_overrides(s: Scale, db: Path, moe: bool) -> list[str]:
    return [
        "retro.enabled=true", "retro.chunk_size=64", "retro.neighbours=2", f"retro.cca_start={s.cca_start}",
        "retro.cca_every=3", "retro.encoder_layers=2", f"retro.encoder_d_model={s.encoder_d_model}",
        f"retro.encoder_heads={s.encoder_heads}", f"retro.encoder_d_ff={s.encoder_d_ff}", f"retro.db={db}",
        *(["retro.encoder_moe=true"] if moe else []),
    ]  # fmt: skip


def run_specs(opts: RetroExperiment, shards: Path, db: Path) -> dict[str, list[str]]:
    """Run name -> config overrides. Every run trains on the batches of its seed (the data order is seeded)."""
    s, runs_dir = opts.scale, opts.out / "runs"
    specs: dict[str, list[str]] = {}
    for kind, moe in (("dense", False), ("moe", True)):
        seeds = SEEDS if kind == "dense" else SEEDS[:1]
        for i, seed in enumerate(seeds, start=1):
            common = [*model_overrides(s, shards, moe), f"train.seed={seed}", f"train.precision={opts.precision}"]
            specs[f"{kind}-base-s{i}"] = common
            specs[f"{kind}-retro-s{i}"] = [*common, *retro_overrides(s, db, moe)]
        fit = [*specs[f"{kind}-retro-s1"], f"retro.init_from={runs_dir / f'{kind}-base-s1'}", "retro.freeze_base=true"]
        specs[f"{kind}-fit"] = [
            *fit,
            f"train.max_steps={s.fit_steps}",
            f"optim.warmup_steps={max(1, s.fit_steps // 10)}",
        ]
    return specs


def _train_all(opts: RetroExperiment, shards: Path, db: Path) -> dict[str, Path]:
    from sparselm.config import load_config
    from sparselm.retro.training import train  # the trainer, with neighbours for the [retro] runs

    runs = {}
    for name, overrides in run_specs(opts, shards, db).items():
        run = opts.out / "runs" / name
        cfg = load_config(None, [*overrides, f"logging.progress={str(opts.progress).lower()}"])
        done = run / "checkpoints" / f"step_{cfg.train.max_steps:08d}"
        if not done.is_dir():
            tqdm.write(f"training {name}")
            train(cfg, run, resume=True)
        runs[name] = run
    return runs


# ------------------------------------------------------------------------------------------------------ evaluation
def eval_plan() -> list[tuple[str, str | None, int, bool]]:
    """(run, database or None, k, shuffled) of every number the report uses."""
    plan: list[tuple[str, str | None, int, bool]] = []
    for kind in ("dense", "moe"):
        seeds = ("s1", "s2") if kind == "dense" else ("s1",)
        for seed in seeds:
            plan += [(f"{kind}-base-{seed}", None, 0, False), (f"{kind}-retro-{seed}", None, 0, False)]
            plan += [(f"{kind}-retro-{seed}", db, 2, False) for db in ("db10", "db30", "db100", "other")]
        plan += [(f"{kind}-retro-s1", "db100", k, False) for k in K_EVAL if k != 2]
        plan += [(f"{kind}-retro-s1", "db100", 2, True)]
        plan += [(f"{kind}-fit", None, 0, False), (f"{kind}-fit", "db100", 2, False), (f"{kind}-fit", "db100", 2, True)]
    return plan


def _evaluate_all(opts: RetroExperiment, shards: Path, dbs: dict[str, Path], runs: dict[str, Path]) -> dict:
    from sparselm.checkpoint.inference import load_checkpoint
    from sparselm.precision import resolve_precision
    from sparselm.retro.evaluate import (
        bits_per_byte,
        chunk_overlap,
        eval_windows,
        shuffled,
        token_nll,
        window_neighbour_ids,
    )
    from sparselm.retro.neighbours import load_neighbours
    from sparselm.retro.store import Database

    s = opts.scale
    path = opts.out / "eval.json"
    evals: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    nll_dir = opts.out / "nll"
    nll_dir.mkdir(exist_ok=True)
    ev = eval_windows(shards, "val", s.seq_len, s.eval_windows)
    precision = resolve_precision(opts.precision, torch.device("cpu"))
    databases = {name: Database(p) for name, p in dbs.items()}
    tables = {name: load_neighbours(db, shards, "val", max(K_EVAL)) for name, db in databases.items()}
    loaded: dict[str, Any] = {}
    plan = eval_plan()
    for run, db, k, shuffle in tqdm(plan, desc="evaluate", unit="eval", disable=not opts.progress):
        key = eval_key(run, db, k, shuffle)
        if key in evals:
            continue
        if run not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[run] = load_checkpoint(runs[run])[0]
        model = loaded[run]
        neighbours, overlap = None, None
        if db is not None:
            ids = window_neighbour_ids(tables[db], ev, 64, k)
            if shuffle:
                ids = shuffled(ids)
            tokens = databases[db].neighbour_tokens(ids)
            neighbours = lambda rows, tokens=tokens: tokens[rows]  # noqa: E731
            overlap = chunk_overlap(ev, tokens, 64)
        started = time.perf_counter()
        nll = token_nll(model, ev, neighbours, precision=precision)
        np.save(nll_dir / f"{key.replace('|', '__')}.npy", nll)
        evals[key] = {
            "run": run,
            "db": db,
            "k": k,
            "shuffled": shuffle,
            "bpb": bits_per_byte(nll, ev.target_bytes),
            "nats_per_token": float(nll.mean()),
            "seconds": round(time.perf_counter() - started, 1),
        }
        if overlap is not None:
            np.save(nll_dir / f"{key.replace('|', '__')}.overlap.npy", overlap)
        path.write_text(json.dumps(evals, indent=1))
    evals["_windows"] = {
        "count": len(ev.windows),
        "tokens": int(ev.target_bytes.size),
        "bytes": int(ev.target_bytes.sum()),
    }
    return evals
