"""Bytes through each collective in one training step, per layout, next to theory.

    python benchmarks/comm_volume.py [--json] [--write-docs]

A TorchDispatchMode (sparselm.parallel.accounting.CommCounter) sees every collective a worker issues, whether
from torch.distributed (FSDP2, ZeRO-1, the expert all-to-all) or DTensor (tensor parallel), and adds up bytes per
kind. The second optimizer step is measured (the first includes one-off initialisation). Volumes follow the ZeRO
paper's convention (an all-reduce of S bytes counts 2S; an all-gather or reduce-scatter of a full S-byte tensor
counts S); ``wire`` is what one rank actually sends with ring algorithms ((N - 1) / N of that, and for an all-to-all
the rows bound for other ranks). Theory, with Psi parameters of 4 bytes (fp32):

- data parallel (ZeRO-0): all-reduce of the gradients, 2 Psi; ZeRO-1 (reduce-scatter + all-gather) and ZeRO-2
  (all-gather + reduce-scatter): 2 Psi; ZeRO-3 (all-gather in forward and again in backward + reduce-scatter): 3 Psi;
- tensor parallel (Megatron): per layer one all-reduce of the B x T x d activations after attention and after the
  FFN, forward and backward: 4 all-reduces, 8 B T d bytes x 4 per layer (sequence parallel: each all-reduce is a
  reduce-scatter + all-gather, the same volume, plus one all-gather of the sequence before the final norm and one
  of the embeddings' output gradient);
- expert parallel: per MoE layer the tokens' k copies go out and come back, forward and backward:
  4 x tokens x k x d x 4 bytes through all-to-all (+ E counts), plus the all-reduce of the non-expert gradients.
The few scalar all-reduces of a step (loss, grad norm, expert load; tens of bytes) are counted but not in theory.
"""

from __future__ import annotations

from pathlib import Path

import parallel_bench as pb

LAYOUTS = {
    "dp (ZeRO-0)": (pb.DENSE, ["parallel.zero_stage=0"]),
    "ZeRO-1": (pb.DENSE, ["parallel.zero_stage=1"]),
    "ZeRO-2": (pb.DENSE, ["parallel.zero_stage=2"]),
    "ZeRO-3": (pb.DENSE, ["parallel.zero_stage=3"]),
    "TP": (pb.DENSE, ["parallel.tp=-1"]),
    "TP + SP": (pb.DENSE, ["parallel.tp=-1", "parallel.sequence_parallel=true"]),
    "EP": (pb.MOE, ["parallel.ep=-1"]),
}


def theory(layout: str, cfg, model, world: int) -> float:
    psi = pb.param_count(model)
    b = 4  # fp32
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len  # per rank per step (one micro-batch)
    d, n_layers = cfg.model.d_model, cfg.model.n_layers
    if layout == "ZeRO-3":
        return 3 * psi * b
    if layout.startswith(("dp", "ZeRO")):
        return 2 * psi * b
    if layout.startswith("TP"):
        per_layer = n_layers * 4 * 2 * tokens * d * b
        # Sequence parallel also gathers the sequence before the final norm, and the embeddings' output gradient.
        return per_layer + (2 * tokens * d * b if "SP" in layout else 0)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_moe = len(cfg.moe.layer_indices(n_layers))
    return 2 * (psi - expert) * b + n_moe * (4 * tokens * cfg.moe.top_k * d * b + 8 * cfg.moe.num_experts)


def measure(case: dict) -> dict:
    import torch.distributed as dist

    from sparselm.parallel.accounting import CommCounter

    world = dist.get_world_size()
    model_overrides, parallel = LAYOUTS[case["layout"]]
    parallel = [o.replace("=-1", f"={world}") for o in parallel]
    cfg, runtime, model, optimizer = pb.build([*model_overrides, *parallel])
    pb.train_step(cfg, runtime, model, optimizer, 0)
    with CommCounter() as counter:
        pb.train_step(cfg, runtime, model, optimizer, 1)
    expected = theory(case["layout"], cfg, model, world)
    # Ranks differ under EP (each receives the rows routed to its experts): report the mean over ranks.
    measured = pb.mean_over_ranks(counter.total("volume"))
    return {
        "layout": case["layout"],
        "world_size": world,
        "params": pb.param_count(model),
        "measured_bytes": int(measured),
        "theory_bytes": int(expected),
        "ratio": measured / expected,
        "wire_bytes_per_rank": int(pb.mean_over_ranks(counter.total("wire"))),
        "by_collective": {k: {"calls": r.calls, "volume": r.volume} for k, r in sorted(counter.records.items())},
    }


def table(rows: list[dict]) -> str:
    lines = [
        pb.machine_line(),
        f"Dense model {rows[0]['params'] / 1e6:.2f}M parameters (EP rows: the same with 8 experts of d_ff 512 in "
        "every other layer, top-2); one micro-batch of 2 x 128 tokens per rank; fp32. Volumes in MiB per rank per "
        "step (mean over ranks; the per-collective breakdown is rank 0's).",
        "",
        "| layout | ranks | measured volume | theory | measured / theory | wire bytes per rank | collectives "
        "(calls: MiB) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    mb = 1 / 2**20
    for r in rows:
        parts = ", ".join(f"{k} {v['calls']}: {v['volume'] * mb:.2f}" for k, v in r["by_collective"].items())
        lines.append(
            f"| {r['layout']} | {r['world_size']} | {r['measured_bytes'] * mb:.2f} | {r['theory_bytes'] * mb:.2f} "
            f"| {r['ratio']:.3f} | {r['wire_bytes_per_rank'] * mb:.2f} | {parts} |"
        )
    return "\n".join(lines)


def main() -> None:
    plan = {2: list(LAYOUTS), 4: ["dp (ZeRO-0)", "ZeRO-1", "ZeRO-2", "ZeRO-3", "TP", "EP"]}
    pb.main(
        Path(__file__),
        measure,
        lambda args: [(world, [{"layout": name} for name in layouts]) for world, layouts in plan.items()],
        table,
        ("comm_volume", "Communication per step (`benchmarks/comm_volume.py`)"),
    )


if __name__ == "__main__":
    main()
