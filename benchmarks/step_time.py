"""Step time of each parallel layout at world sizes 1, 2 and 4 on this machine.

    python benchmarks/step_time.py [--json] [--write-docs] [--steps 5]

Each rank trains on one micro-batch of 2 x 128 tokens per step (so the global batch grows with the data-parallel
size); a row reports the median step time over ``--steps`` steps after 2 warm-up steps, and global tokens/s. The
development machine has 2 cores shared by every process (and by other work): with 2 or 4 processes this shows the
overheads of each layout (communication, sharding bookkeeping, duplicated work), not speed-ups. On a GPU cluster
the same layouts trade these overheads against memory and per-device compute.
"""

from __future__ import annotations

from pathlib import Path

import parallel_bench as pb

LAYOUTS = {
    1: {"single process": pb.DENSE, "single process (MoE)": pb.MOE},
    2: {
        "ZeRO-0": [*pb.DENSE, "parallel.zero_stage=0"],
        "ZeRO-1": [*pb.DENSE, "parallel.zero_stage=1"],
        "ZeRO-2": [*pb.DENSE, "parallel.zero_stage=2"],
        "ZeRO-3": [*pb.DENSE, "parallel.zero_stage=3"],
        "TP=2": [*pb.DENSE, "parallel.tp=2"],
        "TP=2 + SP": [*pb.DENSE, "parallel.tp=2", "parallel.sequence_parallel=true"],
        "ZeRO-0 (MoE)": [*pb.MOE, "parallel.zero_stage=0"],
        "EP=2 (MoE)": [*pb.MOE, "parallel.ep=2"],
    },
    4: {
        "ZeRO-0": [*pb.DENSE, "parallel.zero_stage=0"],
        "ZeRO-1": [*pb.DENSE, "parallel.zero_stage=1"],
        "ZeRO-2": [*pb.DENSE, "parallel.zero_stage=2"],
        "ZeRO-3": [*pb.DENSE, "parallel.zero_stage=3"],
        "dp_shard=2 x TP=2, ZeRO-3": [*pb.DENSE, "parallel.dp_shard=2", "parallel.tp=2", "parallel.zero_stage=3"],
        "dp=4 x EP=2, ZeRO-3 (MoE)": [*pb.MOE, "parallel.ep=2", "parallel.zero_stage=3"],
    },
}


def measure(case: dict) -> dict:
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    overrides = LAYOUTS[world][case["layout"]]
    if world == 1:  # the single-process trainer path: the world-size-1 runtime, torch's own clipping
        from sparselm.parallel.runtime import Runtime
        from sparselm.train.trainer import build_model

        cfg = pb.bench_config(overrides, 1)
        runtime = Runtime(cfg, torch.device("cpu"))
        model = runtime.parallelize(build_model(cfg))
        model.train()
        optimizer, _ = runtime.build_optimizer(model)
    else:
        cfg, runtime, model, optimizer = pb.build(overrides)
    dp = runtime.dp_size

    def step(i: int) -> None:
        pb.train_step(cfg, runtime, model, optimizer, i)

    seconds = pb.max_over_ranks(pb.median_time(step, 2, case["steps"]))
    tokens = dp * cfg.train.micro_batch_size * cfg.data.seq_len
    return {
        "layout": case["layout"],
        "world_size": world,
        "step_ms": seconds * 1e3,
        "global_tokens": tokens,
        "tokens_per_sec": tokens / seconds,
    }


def table(rows: list[dict]) -> str:
    lines = [
        pb.machine_line(),
        "**2 cores for every process: these are overheads, not speed-ups.** Dense 4.33M-parameter model (MoE rows: "
        "8 experts in every other layer, top-2), fp32, one micro-batch of 2 x 128 tokens per rank per step.",
        "",
        "| layout | ranks | step ms (median) | global tokens / step | tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['world_size']} | {r['step_ms']:.0f} | {r['global_tokens']} "
            f"| {r['tokens_per_sec']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    pb.main(
        Path(__file__),
        measure,
        lambda args: [
            (world, [{"layout": n, "steps": args.steps} for n in layouts]) for world, layouts in LAYOUTS.items()
        ],
        table,
        ("step_time", "Step time per layout (`benchmarks/step_time.py`)"),
        lambda ap: ap.add_argument("--steps", type=int, default=5),
    )


if __name__ == "__main__":
    main()
