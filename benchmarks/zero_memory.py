"""Bytes of parameters + gradients + optimizer state per rank for ZeRO stages 0-3, next to the ZeRO formulas.

    python benchmarks/zero_memory.py [--json] [--write-docs] [--worlds 2,4]

For each stage and world size N the workers run three optimizer steps of a dense model (Psi parameters) and count
the storages each rank holds (sparselm.parallel.accounting.model_state_bytes) at the end of each forward, backward
(and ZeRO-1's reduce-scatter) and optimizer step; a row reports the largest total of the last step, maximised over
ranks. The formula with p, g, K bytes per parameter for parameters, gradients and optimizer state is the ZeRO
paper's: stage 0 (p+g+K)Psi, 1 (p+g)Psi + K Psi/N, 2 p Psi + (g+K)Psi/N, 3 (p+g+K)Psi/N. sparselm keeps fp32
parameters and Adam moments (p=4, g=4, K=8; bf16 runs under autocast); the paper's mixed-precision figures (p=2,
g=2, K=12: bf16 working copies plus an fp32 master copy inside the optimizer state) are shown for the
``parallel.param_dtype=bf16`` rows, where FSDP keeps bf16 gathered parameters next to the fp32 shards.
"""

from __future__ import annotations

from pathlib import Path

import parallel_bench as pb

BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12)}  # (p, g, K) per parameter


def formula(stage: int, n: int, psi: int, p: int, g: int, k: int) -> float:
    return {
        0: (p + g + k) * psi,
        1: (p + g) * psi + k * psi / n,
        2: p * psi + (g + k) * psi / n,
        3: (p + g + k) * psi / n,
    }[stage]


def measure(case: dict) -> dict:
    import torch.distributed as dist

    from sparselm.parallel.accounting import model_state_bytes

    overrides = [*pb.DENSE, f"parallel.zero_stage={case['stage']}", f"parallel.param_dtype={case['dtype']}"]
    cfg, runtime, model, optimizer = pb.build(overrides)
    snaps: list[dict] = []
    hook = model.register_forward_hook(lambda *_: snaps.append(model_state_bytes(model, optimizer)))
    for step in range(3):
        snaps.clear()
        pb.train_step(cfg, runtime, model, optimizer, step, lambda: snaps.append(model_state_bytes(model, optimizer)))
        snaps.append(model_state_bytes(model, optimizer))
    hook.remove()
    peak = max(snaps, key=lambda s: s["total"])
    measured = pb.max_over_ranks(peak["total"])
    n, psi = dist.get_world_size(), pb.param_count(model)
    p, g, k = BYTES[case["dtype"]]
    expected = formula(case["stage"], n, psi, p, g, k)
    return {
        "zero_stage": case["stage"],
        "world_size": n,
        "param_dtype": case["dtype"],
        "params": psi,
        "measured_bytes": int(measured),
        "formula_bytes": int(expected),
        "ratio": measured / expected,
        "formula": f"p={p} g={g} K={k}",
        "params_bytes": peak["params"],
        "grads_bytes": peak["grads"],
        "optimizer_bytes": peak["optimizer"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        pb.machine_line(),
        f"Dense model, {rows[0]['params'] / 1e6:.2f}M parameters (Psi); bytes per rank at the step's peak "
        "(rank 0's breakdown).",
        "",
        "| ZeRO stage | ranks N | param dtype | params | grads | optimizer | measured | formula | formula bytes | "
        "measured / formula |",
        "|---:|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        mb = 1 / 2**20
        lines.append(
            f"| {r['zero_stage']} | {r['world_size']} | {r['param_dtype']} | {r['params_bytes'] * mb:.1f} MiB "
            f"| {r['grads_bytes'] * mb:.1f} MiB | {r['optimizer_bytes'] * mb:.1f} MiB "
            f"| {r['measured_bytes'] * mb:.1f} MiB | {r['formula']} | {r['formula_bytes'] * mb:.1f} MiB "
            f"| {r['ratio']:.3f} |"
        )
    lines += [
        "",
        "Notes. The peak is the largest of the snapshots at the end of forward, of backward and of the optimizer "
        "step; transient buffers inside forward and backward (ZeRO-3's per-block gathers, reduce buffers) are not "
        "counted, as in the ZeRO formulas. ZeRO-0 (FSDP2's `replicate`) copies the parameters into a gathered "
        "buffer for forward and backward: its peak (end of forward: two parameter copies, no gradients yet) equals "
        "16 Psi, but a second 4 Psi copy is held while compute runs. ZeRO-2 peaks at the end of forward (gathered "
        "parameters, no gradients: FSDP's gradients appear sharded, after the gathered parameters are freed); with "
        "bf16 parameters that is 2 Psi + 12 Psi / N, below the paper's 2 Psi + 14 Psi / N, which keeps the bf16 "
        "parameters gathered for the whole step. ZeRO-1 has no bf16 mode (its slices are views of fp32 parameters).",
    ]
    return "\n".join(lines)


def cases(args) -> list[tuple[int, list[dict]]]:
    stages = [{"stage": s, "dtype": "fp32"} for s in (0, 1, 2, 3)] + [{"stage": s, "dtype": "bf16"} for s in (0, 2, 3)]
    return [(int(world), stages) for world in args.worlds.split(",")]


def main() -> None:
    pb.main(
        Path(__file__),
        measure,
        cases,
        table,
        ("zero_memory", "ZeRO memory per rank (`benchmarks/zero_memory.py`)"),
        lambda ap: ap.add_argument("--worlds", default="2,4"),
    )


if __name__ == "__main__":
    main()
