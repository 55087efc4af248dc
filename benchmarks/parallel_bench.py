"""Shared harness of the parallelism benchmarks (zero_memory.py, comm_volume.py, step_time.py).

Each benchmark re-launches this file under torchrun (gloo, CPU) once per world size; the workers build the model
in the requested layouts with the trainer's own code (``sparselm.parallel.runtime``), run optimizer steps on random
tokens exactly as ``sparselm train`` does, measure, and rank 0 appends one JSON object per row to a file the
parent reads. Measured on the 2-core development machine, where several processes share two cores: the figures
show sizes and overheads, not speed-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sparselm.config import Config
    from sparselm.parallel.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"

# A dense model whose dims divide by 4 (no FSDP padding) and whose parameters are spread over many equal blocks.
DENSE = [
    "model.vocab_size=512",
    "model.d_model=256",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.d_ff=1024",
    "model.max_seq_len=128",
    "moe.num_experts=0",
    "data.seq_len=128",
    "train.precision=fp32",
]
MOE = [*DENSE, "moe.num_experts=8", "moe.top_k=2", "moe.moe_every=2", "moe.d_ff_expert=512"]


def bench_config(overrides: list[str], world: int, micro: int = 2) -> Config:
    from sparselm.config import apply_overrides, load_config

    cfg = load_config(None, [f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * world}"])
    return apply_overrides(cfg, overrides)


def build(overrides: list[str]) -> tuple[Config, Runtime, torch.nn.Module, Any]:
    """(cfg, runtime, model, optimizer) for this worker's world size, as the trainer builds them."""
    import torch.distributed as dist

    from sparselm.parallel.runtime import create_runtime
    from sparselm.train.trainer import build_model

    cfg = bench_config(overrides, dist.get_world_size())
    dp = _dp_size(cfg, dist.get_world_size())
    cfg.train.global_batch_size = cfg.train.micro_batch_size * dp
    runtime = create_runtime(cfg)
    model = runtime.parallelize(build_model(cfg))
    model.train()
    optimizer, _ = runtime.build_optimizer(model)
    return cfg, runtime, model, optimizer


def _dp_size(cfg: Config, world: int) -> int:
    from sparselm.parallel.layout import resolve_layout

    cfg.train.global_batch_size = cfg.train.micro_batch_size * world  # large enough to resolve any layout
    return resolve_layout(cfg, world).dp


def batch(cfg: Config, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)
    vocab = cfg.model.vocab_size
    return torch.randint(0, vocab, shape, generator=g), torch.randint(0, vocab, shape, generator=g)


def train_step(
    cfg: Config,
    runtime: Runtime,
    model: torch.nn.Module,
    optimizer: Any,
    step: int,
    after_backward: Callable[[], None] | None = None,
) -> None:
    """One optimizer step of the trainer (one micro-batch per rank)."""
    from sparselm.train.trainer import forward_backward

    x, y = batch(cfg, step)
    optimizer.zero_grad(set_to_none=True)
    stats = forward_backward(model, cfg, x, y, 1, runtime)
    if after_backward is not None:
        after_backward()
    runtime.reduce_and_clip_gradients(model, cfg.optim.grad_clip)
    if after_backward is not None:
        after_backward()
    runtime.mean_over_dp([stats.loss, stats.aux_loss, stats.z_loss])
    optimizer.step()


def param_count(model: torch.nn.Module) -> int:
    """Global number of parameters (DTensors report their global shape)."""
    return sum(p.numel() for p in model.parameters())


def launch(script: Path, world: int, cases: list[dict]) -> list[dict]:
    """Run ``script --worker`` under torchrun with ``world`` gloo processes; return rank 0's rows."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "rows.jsonl"
        spec.write_text(json.dumps({"cases": cases, "out": str(out)}))
        env = {**os.environ, "TMPDIR": tmp, "OMP_NUM_THREADS": "1"}
        if world == 1:
            env.update({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
            env["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
            cmd = [sys.executable, str(script), "--worker", str(spec)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
            cmd += [str(script), "--worker", str(spec)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{script.name} world {world} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return [json.loads(line) for line in out.read_text().splitlines()]


def main(
    script: Path,
    measure: Callable[[dict], dict | None],
    plan: Callable[[argparse.Namespace], Iterable[tuple[int, list[dict]]]],
    table: Callable[[list[dict]], str],
    docs: tuple[str, str],
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda ap: None,
) -> None:
    """The command line of every parallelism benchmark. ``script --worker SPEC`` (under torchrun) measures cases;
    otherwise ``plan(args)`` gives (world size, cases) pairs, each launched once, and the rows print as JSON lines
    (``--json``) or as ``table(rows)``, which ``--write-docs`` also writes into docs/benchmarks.md under
    ``docs = (marker, section title)``."""
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], measure)
        return
    doc = sys.modules["__main__"].__doc__ or script.stem
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    add_arguments(ap)
    args = ap.parse_args()
    rows = []
    for world, cases in plan(args):
        for row in launch(script, world, cases):
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print(table(rows))
    if args.write_docs:
        write_docs(*docs, table(rows))


def worker(spec_path: str, measure: Callable[[dict], dict | None]) -> None:
    """Worker entry: ``measure(case) -> row`` for each case; rank 0 appends the rows."""
    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo")
    for case in spec["cases"]:
        row = measure(case)
        if dist.get_rank() == 0 and row is not None:
            with open(spec["out"], "a") as f:
                f.write(json.dumps(row) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def max_over_ranks(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def mean_over_ranks(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def machine_line() -> str:
    return (
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores, shared with other jobs: 1-minute load {os.getloadavg()[0]:.1f} at the end), "
        f"torch {torch.__version__}, gloo, one thread per process."
    )


def write_docs(marker: str, title: str, body: str) -> None:
    """Replace (or append) this benchmark's own section of docs/benchmarks.md; other sections are left alone."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
    DOCS.write_text(text)


def median_time(fn: Callable[[int], None], warmup: int, steps: int) -> float:
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        fn(warmup + i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
