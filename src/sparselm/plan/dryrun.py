"""A dry run of one training step of rank 0 of an N-rank job: the trainer's own layout code on fake tensors.

``dry_run(cfg, env)`` does what ``sparselm train`` does before and during a step, on the meta device and a fake
process group (``sparselm.plan.fake``): ``ParallelRuntime`` checks the layout (``resolve_layout``, the launcher's
own errors), the seeded model is built on the meta device and laid out by ``runtime.parallelize`` (tensor, expert,
data parallel / ZeRO), its sharded tensors become fake tensors, ``runtime.build_optimizer`` builds AdamW (ZeRO-1:
over this rank's slices), and three steps run as the trainer runs them: ``forward_backward`` over the micro-batches,
``reduce_and_clip_gradients``, the metric reduction and ``optimizer.step``.

The first step creates the optimizer state; the second measures the activations and peak of the *other*
activation-checkpointing setting; the third is measured in full: model-state bytes at the same points as
``benchmarks/zero_memory.py`` (end of each forward, after backward, after the gradient reduction, after the step),
every collective with its process group (``CommCounter``), the FLOPs and the peak of all bytes alive. A step of
``m`` micro-batches runs ``min(m, 2)``: the first micro-batch stands for the ``m - 1`` that accumulate, the last
one for itself (ZeRO-0 synchronises only there), and the totals are scaled accordingly.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from sparselm.config import Config
from sparselm.model.moe import Experts
from sparselm.ops.expert_loop import ExpertLoop
from sparselm.ops.settings import ExpertLoopSettings
from sparselm.parallel.accounting import CommCounter, CommRecord, model_state_bytes, model_state_storages
from sparselm.parallel.launch import DistEnv
from sparselm.parallel.layout import Layout
from sparselm.parallel.runtime import ParallelRuntime
from sparselm.plan.fake import DryRun, Tally
from sparselm.train.trainer import build_model, forward_backward


@dataclass
class Collective:
    kind: str  # all_reduce | all_gather | reduce_scatter | all_to_all | ...
    group: str  # which mesh group: tp, ep, dp_shard, dp_replicate, dp, expert_dp, ... or world
    ranks: list[int]  # the group's ranks (this rank's group)
    phase: str  # micro_batch (once per micro-batch) | update (once per step, after the last backward)
    calls: float
    payload: float  # bytes this rank passes in
    volume: float  # ZeRO paper's convention (sparselm.parallel.accounting)
    wire: float  # bytes this rank sends with ring algorithms


@dataclass
class Measurement:
    """What one rank holds and does in one training step (bytes, FLOPs), measured on fake tensors."""

    layout: Layout
    micro_batch_size: int
    micro_batches: int  # per optimizer step on each data-parallel rank
    seq_len: int
    precision: str
    activation_checkpointing: bool
    state: dict[str, int]  # params, grads, optimizer, total at the largest snapshot (zero_memory's peak)
    activations: dict[str, int]  # "off" / "on": bytes one micro-batch's forward leaves for its backward
    peak: dict[str, int]  # "off" / "on": all bytes alive at the step's worst moment (searches: configured only)
    flops: float  # per step, with the configured checkpointing (recomputation included)
    flops_micro_batch: float  # one accumulating micro-batch
    collectives: list[Collective] = field(default_factory=list)
    peak_segments: dict[str, dict[tuple, int]] = field(default_factory=dict, repr=False)  # see _StepProbe.segment
    unknown_scalars: int = 0
    seconds: float = 0.0

    @property
    def peak_bytes(self) -> int:
        return self.peak["on" if self.activation_checkpointing else "off"]

    def collective_totals(self, key: str = "volume") -> dict[str, float]:
        """Per kind, per step (the ``records`` of a CommCounter around a real step)."""
        out: dict[str, float] = {}
        for c in self.collectives:
            out[c.kind] = out.get(c.kind, 0.0) + getattr(c, key)
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["peak_segments"]
        d["layout"] = asdict(self.layout)
        for c in d["collectives"]:
            c["group_size"] = len(c.pop("ranks"))
        return d


def group_names(runtime: ParallelRuntime) -> dict[str, tuple[str, list[int]]]:
    """Process group name -> (what the group is, its ranks). Groups of the mesh coincide in some layouts (with ep
    = the world, the expert group is the data-parallel one): the name says so, e.g. "ep=dp"."""
    dims = runtime.dims
    meshes = [("tp", dims.tp_mesh), ("ep", dims.ep_mesh), ("dp", dims.dp_mesh), ("dp_shard", dims.dp_shard_mesh)]
    meshes += [("dp_replicate", dims.mesh["dp_replicate"]), ("expert_dp", dims.expert_dp_mesh)]
    meshes += [("dp_shard_mod_ep", dims.mesh["dp_shard_mod_ep"])]
    roles: dict[str, list[str]] = {}
    ranks: dict[str, list[int]] = {}
    for name, mesh in meshes:
        group = mesh.get_group()
        roles.setdefault(group.group_name, []).append(name)
        ranks.setdefault(group.group_name, dist.get_process_group_ranks(group))
    world = dist.group.WORLD
    roles.setdefault(world.group_name, []).append("world")
    ranks.setdefault(world.group_name, list(range(dist.get_world_size())))
    out = {}
    for key, names in roles.items():
        main = [n for n in names if n in ("tp", "ep", "dp")]
        out[key] = ("=".join(main) if main else names[0], ranks[key])
    return out


def _diff(after: dict, before: dict) -> dict:
    out = {}
    for key, rec in after.items():
        base = before.get(key, CommRecord())
        d = CommRecord(rec.calls - base.calls, rec.payload - base.payload, rec.volume - base.volume,
                       rec.wire - base.wire)  # fmt: skip
        if d.calls:
            out[key] = d
    return out


class _StepProbe:
    """Snapshots taken while the trainer's step runs: model state, activations, collectives and FLOPs per phase, and
    the peak of live bytes in each *segment* of the step (see ``segment``)."""

    def __init__(self, model, optimizer, tally: Tally, counter: CommCounter) -> None:
        self.model, self.optimizer, self.tally, self.counter = model, optimizer, tally, counter
        self.states: list[dict[str, int]] = []
        self.activations: list[int] = []
        self.marks: list[tuple[dict, float]] = []  # (collectives, flops) at each micro-batch start
        self.segments: dict[tuple, int] = {}
        self._segment: tuple = ("start",)
        self._micro = 0
        self._mark = 0
        self.handles = [
            model.register_forward_pre_hook(self._forward_start),
            model.register_forward_hook(self._forward_end),
        ]
        for i, block in enumerate(model.layers):
            self.handles.append(block.register_forward_pre_hook(lambda m, args, i=i: self._block_start(i, args)))
            self.handles.append(block.register_forward_hook(lambda m, args, out, i=i: self._block_end(i, out)))

    def segment(self, name: tuple) -> None:
        """Close the current segment (its peak of live bytes) and open ``name``. Segments: ("start",) until the
        first block, ("F", i) block i's forward, ("G", i) after it, ("B", i) block i's backward (from the gradient
        of its output to that of its input), ("E", i) after it, each per micro-batch: shallow copies of a model
        extend to its full depth segment by segment (``sparselm.plan.planner.extend_peak``)."""
        key = (self._micro, *self._segment)
        self.segments[key] = max(self.segments.get(key, 0), self.tally.peak_bytes)
        self.tally.reset_peak()
        self._segment = name

    def _block_start(self, i: int, args) -> None:
        self.segment(("F", i))
        x = args[0] if args else None
        if torch.is_tensor(x) and x.requires_grad:
            x.register_hook(lambda grad: self.segment(("E", i)))

    def _block_end(self, i: int, out) -> None:
        self.segment(("G", i))
        x = out[0] if isinstance(out, tuple) else out
        if torch.is_tensor(x) and x.requires_grad:
            x.register_hook(lambda grad: self.segment(("B", i)))

    def snapshot(self) -> dict:
        return copy.deepcopy(dict(self.counter.by_group)), self.tally.flops

    def micro_batch(self, original):
        def before_micro_batch(model, index: int, count: int) -> None:
            self.marks.append(self.snapshot())
            self.segment(("start",))
            self._micro = index
            original(model, index, count)

        return before_micro_batch

    def state(self) -> None:
        self.states.append(model_state_bytes(self.model, self.optimizer))

    def _forward_start(self, *_) -> None:
        self._mark = self.tally.mark()

    def _forward_end(self, module, args, output) -> None:
        self.state()
        if output.loss is not None and output.loss.requires_grad:
            output.loss.register_hook(self._backward_start)

    def _backward_start(self, grad) -> None:
        # What the forward left for backward, counted once autocast has dropped its cached low-precision copies of
        # the weights (alive until the forward's autocast region ends, a transient the peak includes).
        state = model_state_storages(self.model, self.optimizer)
        exclude = {key for storages in state.values() for key in storages}
        self.activations.append(self.tally.bytes_since(self._mark, exclude))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _train_step(cfg: Config, runtime, model, optimizer, x: torch.Tensor, step: int, probe: _StepProbe) -> None:
    """One optimizer step as the trainer's loop runs it (sparselm.train.trainer._Run.train)."""
    runtime.seed_step(step)
    optimizer.zero_grad(set_to_none=True)
    stats = forward_backward(model, cfg, x, x, x.shape[0] // cfg.train.micro_batch_size, runtime)
    probe.state()
    probe.marks.append(probe.snapshot())  # end of the last micro-batch
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    runtime.reduce_and_clip_gradients(model, clip)
    probe.state()
    runtime.mean_over_dp([stats.loss, stats.aux_loss, stats.z_loss])
    optimizer.step()
    probe.state()
    probe.marks.append(probe.snapshot())  # end of the step


def measure_steps(
    cfg: Config, runtime: ParallelRuntime, model, tally: Tally, tokens, both_checkpointing: bool = True
) -> Measurement:
    """Build the optimizer of the laid-out ``model`` and run the measured steps under ``tally`` (entered by the
    caller before the model was made, so every storage is known). ``tokens(shape)`` makes a batch of token ids."""
    layout, t = runtime.layout, cfg.train
    micro_batches = t.global_batch_size // (layout.dp * t.micro_batch_size)
    x = tokens((min(micro_batches, 2) * t.micro_batch_size, cfg.data.seq_len))
    model.train()
    optimizer, _ = runtime.build_optimizer(model)
    counter = CommCounter()
    probe = _StepProbe(model, optimizer, tally, counter)
    runtime.before_micro_batch = probe.micro_batch(runtime.before_micro_batch)
    configured = t.activation_checkpointing
    results, segments = {}, {}
    # Step 0 creates the optimizer state (and FSDP's lazy state); the others are alike but for checkpointing.
    settings = (configured, not configured, configured) if both_checkpointing else (configured, configured)
    try:
        for step, ckpt in enumerate(settings):
            for block in model.layers:
                block.checkpoint = ckpt
            probe.states.clear()
            probe.activations.clear()
            probe.marks.clear()
            probe.segments = {}
            probe._micro, probe._segment = 0, ("start",)
            tally.reset_peak()
            with counter:
                _train_step(cfg, runtime, model, optimizer, x, step, probe)
            probe.segment(("end",))
            key = "on" if ckpt else "off"
            results[key] = (max(probe.segments.values()), probe.activations[0])
            segments[key] = probe.segments
    finally:
        probe.close()
        del runtime.before_micro_batch
    collectives, flops, flops_micro = _per_step(probe.marks, micro_batches, group_names(runtime))
    return Measurement(
        layout=layout,
        micro_batch_size=t.micro_batch_size,
        micro_batches=micro_batches,
        seq_len=cfg.data.seq_len,
        precision=t.precision,
        activation_checkpointing=configured,
        state=max(probe.states, key=lambda s: s["total"]),
        activations={k: v[1] for k, v in results.items()},
        peak={k: v[0] for k, v in results.items()},
        flops=flops,
        flops_micro_batch=flops_micro,
        collectives=collectives,
        peak_segments=segments,
    )


def resting_parameter_bytes(cfg: Config, env: DistEnv) -> int:
    """Bytes of the parameters this rank holds between steps (shards, padding included): a lower bound of its
    memory, read from the meta tensors ``parallelize`` leaves, without running a step."""
    runtime = ParallelRuntime(cfg, env)
    with torch.device("meta"):
        model = build_model(cfg)
    runtime.parallelize(model)
    storages = model_state_storages(model, torch.optim.SGD([torch.zeros(1)]))["params"]
    return sum(storages.values())


def use_expert_kernel(model, kernel: str | None) -> None:
    """Make every MoE run ``kernel`` (``Experts.impl``: "grouped_mm" is what accelerators run; None: as chosen for
    the device, the loop on CPUs). Before ``parallelize``: expert parallelism copies the choice."""
    if kernel is None:
        return
    for module in model.modules():
        if isinstance(module, Experts):
            module.impl = kernel


def plan_expert_loop(model) -> None:
    """Give every MoE a loop kernel that runs in this thread and takes fresh gradient memory each step.

    Dispatch modes are per thread, so experts split over pool threads would escape the dry run's count. And the
    CPU loop recycles last step's expert-gradient memory when nothing else holds it, judged by the storage's
    reference count, which fake tensors do not keep as real ones do: a dry run would keep a spare buffer a real rank
    does not (accelerators never recycle). Fresh buffers each step peak where recycled ones do (tests/test_plan.py).
    Before ``parallelize``: expert parallelism copies the loop."""
    for module in model.modules():
        if isinstance(module, Experts):
            module.loop = ExpertLoop(ExpertLoopSettings(threads=1, reuse_grad_buffers=False))


def dry_run(
    cfg: Config, env: DistEnv, both_checkpointing: bool = True, expert_kernel: str | None = None
) -> Measurement:
    """Lay out ``cfg`` on ``env``'s (fake) world and measure one training step of its rank 0. Without
    ``both_checkpointing`` the step of the other activation-checkpointing setting is skipped (searches);
    ``expert_kernel`` as in ``use_expert_kernel``."""
    start = time.perf_counter()
    cfg = replace(cfg, train=replace(cfg.train, compile=False))  # compiling changes neither bytes nor traffic
    runtime = ParallelRuntime(cfg, env)
    with torch.device("meta"):
        model = build_model(cfg)
    use_expert_kernel(model, expert_kernel)
    plan_expert_loop(model)
    runtime.parallelize(model)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    dry = DryRun(fake_mode)
    with fake_mode, dry:
        model.to_empty(device=runtime.device)

        def tokens(shape):
            return torch.zeros(shape, dtype=torch.long)

        m = measure_steps(cfg, runtime, model, dry, tokens, both_checkpointing)
    m.unknown_scalars = dry.unknown_scalars
    m.seconds = time.perf_counter() - start
    return m


def _per_step(marks: list, micro_batches: int, names: dict) -> tuple[list[Collective], float, float]:
    """Scale the measured phases to a whole step: marks are (collectives, flops) at each micro-batch start, at the
    end of backward and at the end of the step."""
    *micro_marks, end_backward, end = marks
    bounds = [*micro_marks, end_backward]
    phases = []  # (records, flops, repeat, phase)
    for i in range(len(micro_marks)):
        last = i == len(micro_marks) - 1
        repeat = 1 if last else micro_batches - 1
        records = _diff(bounds[i + 1][0], bounds[i][0])
        phases.append((records, bounds[i + 1][1] - bounds[i][1], repeat, "micro_batch"))
    phases.append((_diff(end[0], end_backward[0]), end[1] - end_backward[1], 1, "update"))
    collectives: dict[tuple, Collective] = {}
    flops = 0.0
    for records, phase_flops, repeat, phase in phases:
        flops += phase_flops * repeat
        for (kind, group_name), rec in records.items():
            group, ranks = names.get(group_name, (group_name, []))
            key = (kind, group, phase)
            c = collectives.setdefault(key, Collective(kind, group, ranks, phase, 0, 0, 0, 0))
            c.calls += rec.calls * repeat
            c.payload += rec.payload * repeat
            c.volume += rec.volume * repeat
            c.wire += rec.wire * repeat
    flops_micro = bounds[1][1] - bounds[0][1]
    return list(collectives.values()), flops, flops_micro
