"""Step time from a dry run's counts and a device's figures: a model, with every assumption it makes said.

- compute: the FLOPs the rank ran in the dry run (every matmul and attention, recomputation included) at
  ``efficiency`` x the device's dense peak for the step's precision;
- each collective: the bytes this rank sends with ring algorithms (``wire``) over the slowest link its group
  crosses (inside one node: NVLink; across nodes: the network share of one device), plus a fixed latency per call;
- overlap: FSDP's all-gathers / reduce-scatters and ``replicate``'s gradient all-reduce run on their own stream
  beside the compute, so only what exceeds the compute time shows; tensor-parallel all-reduces and expert-parallel
  all-to-alls sit between the matmuls that need them, and ZeRO-1's reduce-scatter / all-gather run after backward:
  those add up in full.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sparselm.config import Config
from sparselm.params.counting import flops_per_token
from sparselm.plan.dryrun import Collective, Measurement
from sparselm.plan.hardware import Hardware

DATA_PARALLEL_GROUPS = ("dp", "dp_shard", "dp_replicate", "expert_dp", "dp_shard_mod_ep")
SCALAR_BYTES = 1024  # metric and gradient-norm all-reduces: latency only


@dataclass
class CollectiveTime:
    collective: Collective
    link: str  # intra-node | inter-node
    nodes: int  # nodes the group spans
    seconds: float
    overlapped: bool


@dataclass
class Estimate:
    precision: str
    efficiency: float
    compute_s: float
    exposed_comm_s: float  # on the critical path
    overlapped_comm_s: float  # hidden behind compute up to compute_s
    step_s: float
    tokens_per_s: float
    samples_per_s: float
    model_tflops_per_device: float  # training FLOPs of the model (6N + attention, no recomputation) per second
    hardware_tflops_per_device: float  # FLOPs the device runs (recomputation included) per second
    mfu: float
    fits: bool
    usable_bytes: float
    collectives: list[CollectiveTime] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["collectives"] = [
            {
                "kind": c.collective.kind,
                "group": c.collective.group,
                "phase": c.collective.phase,
                "link": c.link,
                "nodes": c.nodes,
                "seconds": c.seconds,
                "overlapped": c.overlapped,
            }  # fmt: skip
            for c in self.collectives
        ]
        return d


def _collective_time(c: Collective, hw: Hardware, zero_stage: int) -> CollectiveTime:
    nodes = len({hw.node_of(r) for r in c.ranks}) if c.ranks else 1
    link, bandwidth = ("intra-node", hw.intra_node_gbs) if nodes <= 1 else ("inter-node", hw.inter_node_gbs)
    seconds = c.wire / (bandwidth * 1e9) + c.calls * hw.latency_us * 1e-6
    bulk = c.calls and c.payload / c.calls > SCALAR_BYTES
    data_parallel = c.kind != "all_to_all" and any(name in DATA_PARALLEL_GROUPS for name in c.group.split("="))
    overlapped = bool(bulk and data_parallel and zero_stage != 1)
    return CollectiveTime(c, link, nodes, seconds, overlapped)


def estimate(m: Measurement, cfg: Config, hw: Hardware, efficiency: float) -> Estimate:
    precision = m.precision
    peak = hw.peak_flops(precision)
    compute = m.flops / (peak * efficiency)
    times = [_collective_time(c, hw, m.layout.zero_stage) for c in m.collectives]
    exposed = sum(t.seconds for t in times if not t.overlapped)
    hidden = sum(t.seconds for t in times if t.overlapped)
    step = compute + exposed + max(0.0, hidden - compute)
    t = cfg.train
    tokens = t.global_batch_size * m.seq_len
    model_flops = flops_per_token(cfg, m.seq_len).train * tokens / m.layout.world_size
    assumptions = [
        f"compute: {m.flops / 1e12:,.1f} TFLOP per step on this rank (counted in the dry run, recomputation "
        f"included) at {efficiency:.0%} of the {hw.key} {precision} peak ({peak / 1e12:,.0f} TFLOP/s)",
        f"links: {hw.intra_node_gbs:g} GB/s inside a node of {hw.devices_per_node}, {hw.inter_node_gbs:g} GB/s per "
        f"device between nodes, {hw.latency_us:g} us per collective call; ring algorithms (bytes sent = wire)",
        "overlap: data-parallel / FSDP traffic (ZeRO-0, 2, 3) hides behind compute; tensor- and expert-parallel "
        "collectives and ZeRO-1's after-backward reduce-scatter / all-gather do not",
        "not modelled: memory-bound kernels (norms, activations, softmax) beyond the efficiency factor, load "
        "imbalance between experts (routing is assumed balanced), stragglers, data loading",
    ]
    return Estimate(
        precision=precision,
        efficiency=efficiency,
        compute_s=compute,
        exposed_comm_s=exposed,
        overlapped_comm_s=hidden,
        step_s=step,
        tokens_per_s=tokens / step,
        samples_per_s=t.global_batch_size / step,
        model_tflops_per_device=model_flops / step / 1e12,
        hardware_tflops_per_device=m.flops / step / 1e12,
        mfu=model_flops / step / peak,
        fits=m.peak_bytes <= hw.usable_bytes,
        usable_bytes=hw.usable_bytes,
        collectives=times,
        assumptions=assumptions,
    )
