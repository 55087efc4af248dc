"""``sparselm plan`` against real runs: the dry run on fake tensors and a fake process group must see what gloo
workers running the same layouts see.

- One torchrun job per world size (2 and 4 gloo ranks) runs, back to back, the layouts of
  ``benchmarks/zero_memory.py`` and ``benchmarks/comm_volume.py`` with those benchmarks' own ``measure`` functions
  (the figures docs/benchmarks.md publishes), and ``sparselm.plan.dryrun.measure_steps`` on real tensors (the
  dry run's own measurement, on a real rank). The plan of each layout, made in this process on ``world`` fake
  ranks, must give the same parameter, gradient and optimizer bytes and the same collective bytes exactly, and the
  same peak of live tensor bytes within 10%.
- Extending two shallow copies to the full depth gives a full dry run's counts; micro-batch accumulation is scaled
  as a real step of four micro-batches counts it.
- Layout errors are the launcher's; GLaM's 1.2T preset plans at 1,024 ranks in a process of bounded memory; the
  search ranks what fits and says why the rest does not.

This file is also the worker: ``python -m torch.distributed.run ... tests/test_plan.py SPEC.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import comm_volume  # noqa: E402
import parallel_bench as pb  # noqa: E402
import zero_memory  # noqa: E402
from sparselm.config import Config  # noqa: E402

STAGES = [("fp32", s) for s in (0, 1, 2, 3)] + [("bf16", s) for s in (0, 2, 3)]
COMM = {2: list(comm_volume.LAYOUTS), 4: ["dp (ZeRO-0)", "ZeRO-1", "ZeRO-2", "ZeRO-3", "TP", "EP"]}


def stage_overrides(dtype: str, stage: int) -> list[str]:
    return [*pb.DENSE, f"parallel.zero_stage={stage}", f"parallel.param_dtype={dtype}"]


def comm_overrides(layout: str, world: int) -> list[str]:
    """The comm_volume layout's config; its data-parallel rows are the zero_memory fp32 configs."""
    stage = {"dp (ZeRO-0)": 0, "ZeRO-1": 1, "ZeRO-2": 2, "ZeRO-3": 3}.get(layout)
    if stage is not None:
        return stage_overrides("fp32", stage)
    model, parallel = comm_volume.LAYOUTS[layout]
    return [*model, *(o.replace("=-1", f"={world}") for o in parallel)]


def bench_cfg(overrides: list[str], world: int, micro_batches: int = 1) -> Config:
    """The config ``parallel_bench.build`` trains: one micro-batch of 2 per data-parallel rank per step."""
    cfg = pb.bench_config(overrides, world)
    cfg.train.global_batch_size = cfg.train.micro_batch_size * pb._dp_size(cfg, world) * micro_batches
    return cfg


# ---- the worker (runs inside torchrun) ----------------------------------------------------------------------------
def _real_steps(overrides: list[str], micro_batches: int, kernel: str | None) -> dict:
    """``measure_steps`` on a real rank: the dry run's measurement, with gloo and real tensors."""
    import torch.distributed as dist

    from sparselm.parallel.runtime import create_runtime
    from sparselm.plan.dryrun import measure_steps, use_expert_kernel
    from sparselm.plan.fake import Tally
    from sparselm.train.trainer import build_model

    cfg = bench_cfg(overrides, dist.get_world_size(), micro_batches)
    runtime = create_runtime(cfg)
    generator = torch.Generator().manual_seed(0)
    with Tally() as tally:
        model = build_model(cfg)
        use_expert_kernel(model, kernel)
        runtime.parallelize(model)
        m = measure_steps(
            cfg, runtime, model, tally, lambda shape: torch.randint(0, cfg.model.vocab_size, shape, generator=generator)
        )
    return m.to_dict()


def _accumulated_step(overrides: list[str], micro_batches: int) -> dict:
    """Bytes per collective kind of one whole real step of ``micro_batches`` micro-batches (the second step)."""
    import torch.distributed as dist

    from sparselm.parallel.accounting import CommCounter
    from sparselm.parallel.runtime import create_runtime
    from sparselm.train.trainer import build_model, forward_backward

    cfg = bench_cfg(overrides, dist.get_world_size(), micro_batches)
    runtime = create_runtime(cfg)
    model = runtime.parallelize(build_model(cfg))
    model.train()
    optimizer, _ = runtime.build_optimizer(model)
    counter = CommCounter()
    for step in range(2):
        x = torch.randint(0, cfg.model.vocab_size, (micro_batches * cfg.train.micro_batch_size, cfg.data.seq_len))
        optimizer.zero_grad(set_to_none=True)
        with counter if step == 1 else contextlib.nullcontext():
            stats = forward_backward(model, cfg, x, x, micro_batches, runtime)
            runtime.reduce_and_clip_gradients(model, cfg.optim.grad_clip)
            runtime.mean_over_dp([stats.loss, stats.aux_loss, stats.z_loss])
            optimizer.step()
    return {k: {"calls": r.calls, "volume": r.volume} for k, r in counter.records.items()}


def _worker(spec_path: str) -> None:
    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo")
    rows = []
    for case in spec["cases"]:
        kind = case["kind"]
        if kind == "zero_memory":
            row = zero_memory.measure({"stage": case["stage"], "dtype": case["dtype"]})
        elif kind == "comm_volume":
            row = comm_volume.measure({"layout": case["layout"]})
        elif kind == "steps":
            row = _real_steps(case["overrides"], 1, case["kernel"])
        else:
            row = _accumulated_step(case["overrides"], case["micro_batches"])
        rows.append(row)
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


# ---- the test (run by pytest) -------------------------------------------------------------------------------------
def start_torchrun(world: int, cases: list[dict], tmp: Path) -> tuple[subprocess.Popen, Path]:
    spec, out = tmp / "spec.json", tmp / "rows.json"
    spec.write_text(json.dumps({"cases": cases, "out": str(out)}))
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    proc = subprocess.Popen([*cmd, __file__, str(spec)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    return proc, out


def bench_configs(world: int) -> list[list[str]]:
    """Every distinct config of the two benchmarks at ``world`` ranks."""
    configs = [stage_overrides(dtype, stage) for dtype, stage in STAGES]
    return configs + [comm_overrides(name, world) for name in COMM[world] if name.startswith(("TP", "EP"))]


# Layouts whose peaks (both activation-checkpointing settings) are measured on real ranks the way the dry run
# measures them, with the expert kernel (None: the CPU's loop; grouped_mm: what accelerators run and hardware plans
# assume, bf16 only on CPUs). Peaks are per layout, not per benchmark: FSDP, TP + SP, EP over the world, and GLaM's
# shape (ZeRO-3 with bf16 gathers, experts split over some ranks and sharded over the rest, fewer local experts than
# shards, grouped_mm).
GLAM_SHAPE = [*pb.MOE, "moe.num_experts=2", "parallel.ep=2", "parallel.zero_stage=3", "parallel.param_dtype=bf16",
              "train.precision=bf16"]  # fmt: skip
PEAKS = {
    2: [(stage_overrides("bf16", 3), None), (comm_overrides("TP + SP", 2), None), (comm_overrides("EP", 2), None)],
    4: [(comm_overrides("TP", 4), None), (GLAM_SHAPE, "grouped_mm")],
}
ACCUMULATE = stage_overrides("fp32", 0)  # ZeRO-0 reduces gradients at the last of the micro-batches only


def _cases(world: int) -> list[dict]:
    cases = [{"kind": "zero_memory", "dtype": d, "stage": s} for d, s in STAGES]
    cases += [{"kind": "comm_volume", "layout": name} for name in COMM[world]]
    cases += [{"kind": "steps", "overrides": o, "kernel": k} for o, k in PEAKS[world]]
    if world == 2:
        cases += [{"kind": "accumulate", "overrides": ACCUMULATE, "micro_batches": 4}]
    return cases


def _fake_plans(world: int) -> dict:
    """The plan of every config on ``world`` fake ranks (this process), keyed like the cases."""
    from sparselm.plan.planner import measure

    plans = {(*o, k): measure(bench_cfg(o, world), world, expert_kernel=k) for o, k in PEAKS[world]}
    for o in bench_configs(world):  # model state and collectives only: the measured step alone
        plans.setdefault((*o, None), measure(bench_cfg(o, world), world, both_checkpointing=False))
    if world == 2:
        plans["x4"] = measure(bench_cfg(ACCUMULATE, 2, 4), 2, both_checkpointing=False)
    return plans


@pytest.mark.parametrize("world", [2, 4], ids=["2-ranks", "4-ranks"])
def test_plan_equals_the_benchmark_runs(world: int, tmp_path: Path) -> None:
    """One torchrun job of ``world`` gloo ranks runs the layouts of zero_memory.py and comm_volume.py with the
    benchmarks' own ``measure``; meanwhile this process plans each layout on ``world`` fake ranks. Model-state bytes
    and collective bytes must be equal, peaks within 10%."""
    cases = _cases(world)
    proc, out = start_torchrun(world, cases, tmp_path)
    try:
        plans = _fake_plans(world)
        log = proc.communicate(timeout=900)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-6000:]
    rows = list(zip(cases, json.loads(out.read_text()), strict=True))

    for case, row in (r for r in rows if r[0]["kind"] == "zero_memory"):
        state = plans[(*stage_overrides(case["dtype"], case["stage"]), None)].state
        got = (state["params"], state["grads"], state["optimizer"], state["total"])
        want = (row["params_bytes"], row["grads_bytes"], row["optimizer_bytes"], row["measured_bytes"])
        assert got == want, (case, got, want)

    for case, row in (r for r in rows if r[0]["kind"] == "comm_volume"):
        m = plans[(*comm_overrides(case["layout"], world), None)]
        totals = m.collective_totals("volume")
        # The benchmark reports the mean over ranks (ranks differ under EP: each receives what was routed to its
        # experts); the plan's rank sends and receives the balanced share, which is that mean.
        assert abs(sum(totals.values()) - row["measured_bytes"]) <= 1, (case, totals, row)
        if case["layout"] != "EP":  # rank 0's breakdown: the same on every rank without routing
            calls = m.collective_totals("calls")
            assert {k: (calls[k], totals[k]) for k in totals} == {
                k: (v["calls"], v["volume"]) for k, v in row["by_collective"].items()
            }, case

    for case, real in (r for r in rows if r[0]["kind"] == "steps"):
        fake = plans[(*case["overrides"], case["kernel"])].to_dict()
        name = " ".join(o for o in case["overrides"] if o.startswith("parallel")) + f" {case['kernel'] or ''}"
        assert fake["state"] == real["state"], name
        if not any("ep=" in o for o in case["overrides"]):  # real routing is data-dependent: sums only (above)
            assert fake["flops"] == real["flops"], name
            key = lambda c: (c["kind"], c["group"], c["phase"])  # noqa: E731
            assert sorted(fake["collectives"], key=key) == sorted(real["collectives"], key=key), name
        for ckpt in ("on", "off"):
            assert fake["peak"][ckpt] == pytest.approx(real["peak"][ckpt], rel=0.10), (name, ckpt)
            assert fake["activations"][ckpt] == pytest.approx(real["activations"][ckpt], rel=0.10), (name, ckpt)

    for _, row in (r for r in rows if r[0]["kind"] == "accumulate"):
        m = plans["x4"]  # one real step of four micro-batches against the plan's two, scaled
        assert m.micro_batches == 4
        calls, volume = m.collective_totals("calls"), m.collective_totals("volume")
        assert {k: (calls[k], volume[k]) for k in calls} == {k: (v["calls"], v["volume"]) for k, v in row.items()}


if __name__ == "__main__":
    _worker(sys.argv[1])


# ---- the plan on its own ---------------------------------------------------------------------------------------
def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``sparselm plan ARGS`` in this process: (exit code, stdout, stderr)."""
    from sparselm.cli import main

    capsys.readouterr()
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


SMALL = ["model.vocab_size=512", "model.d_model=128", "model.n_heads=4", "model.d_ff=256", "model.max_seq_len=64",
         "data.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=2"]  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        ["moe.num_experts=0", "model.n_layers=5", "parallel.tp=2", "parallel.zero_stage=3", "train.precision=bf16"],
        [
            "moe.num_experts=4",
            "moe.moe_every=2",
            "model.n_layers=8",
            "parallel.ep=2",
            "parallel.zero_stage=1",
            "train.activation_checkpointing=true",
            "train.global_batch_size=8",  # one micro-batch per rank (the dense case accumulates two)
        ],  # fmt: skip
    ],
    ids=["dense-tp2-zero3-bf16", "moe-ep2-zero1-ckpt"],
)
def test_two_shallow_copies_extend_to_the_full_run(overrides: list[str]) -> None:
    """A plan measures copies two and three periods deep and extends them to the full depth: the same bytes, calls
    and FLOPs as a dry run of every layer, and peaks within 1% (each segment of the step grows linearly with depth
    once the model is a few periods deep; ZeRO-1's update is 0.3% short at 8 layers, exact from 6 on)."""
    from sparselm.config import load_config
    from sparselm.plan.hardware import load_hardware
    from sparselm.plan.planner import plan

    cfg = load_config(None, [*SMALL, *overrides])
    hw = load_hardware("a100-80g")
    shallow = plan(cfg, 4, hw, both_checkpointing=False)
    full = plan(cfg, 4, hw, full=True, both_checkpointing=False)
    assert shallow.extrapolated_from is not None and full.extrapolated_from is None
    a, b = shallow.measurement, full.measurement
    assert a.state == b.state
    assert a.flops == pytest.approx(b.flops, rel=1e-9)
    key = lambda c: (c.kind, c.group, c.phase)  # noqa: E731
    for x, y in zip(sorted(a.collectives, key=key), sorted(b.collectives, key=key), strict=True):
        assert key(x) == key(y) and x.ranks == y.ranks
        assert (x.calls, x.payload, x.volume) == pytest.approx((y.calls, y.payload, y.volume), rel=1e-9), key(x)
    assert a.peak == pytest.approx(b.peak, rel=0.01) and a.activations == b.activations


@pytest.mark.parametrize(
    "world, overrides",
    [
        (4, ["parallel.tp=3"]),
        (8, ["parallel.tp=8"]),
        (4, ["parallel.ep=3"]),
        (4, ["parallel.dp_shard=3"]),
        (4, ["parallel.ep=4", "parallel.tp=2"]),
        (4, ["train.global_batch_size=6"]),
        (6, ["parallel.dp_shard=3", "parallel.ep=2"]),
        (4, ["parallel.zero_stage=1", "parallel.param_dtype=bf16"]),
    ],
)
def test_layout_errors_are_the_launchers(world: int, overrides: list[str], capsys: pytest.CaptureFixture) -> None:
    """What the plan refuses, with the words `sparselm train` stops with (both call resolve_layout)."""
    from sparselm.config import load_config
    from sparselm.errors import ConfigError
    from sparselm.parallel.layout import resolve_layout

    args = [*SMALL, "moe.num_experts=4", "train.global_batch_size=8", "train.micro_batch_size=2", *overrides]
    with pytest.raises(ConfigError) as launcher:
        resolve_layout(load_config(None, args), world)
    code, _, err = _cli(capsys, "--world-size", str(world), *(x for o in args for x in ("--set", o)))
    assert code == 2
    assert err.strip().endswith(str(launcher.value)), err


def test_glam_plans_at_1024_ranks_in_a_process_of_bounded_memory(tmp_path: Path) -> None:
    """GLaM 64B/64E (1.2T parameters, 18 TB of weights, gradients and AdamW state) laid out on 1,024 ranks: only
    fake tensors, so the planning process stays small; the counts are this rank's shards."""
    script = (
        "import json, resource, sys\n"
        "from sparselm.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print(json.dumps({'rc': rc, 'maxrss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}),"
        " file=sys.stderr)\n"
    )
    args = ["plan", "--preset", "glam-64b-64e", "--world-size", "1024", "--hardware", "tpu-v4", "--json",
            "--set", "parallel.ep=64", "--set", "parallel.zero_stage=3", "--set", "train.global_batch_size=1024",
            "--set", "train.micro_batch_size=1"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stderr.strip().splitlines()[-1])
    assert info["maxrss_kib"] < 2 * 2**20, info  # under 2 GiB: nothing of the model's size was allocated
    m = json.loads(proc.stdout)["measurement"]
    assert m["layout"] == {"world_size": 1024, "dp_replicate": 1, "dp_shard": 1024, "tp": 1, "ep": 64,
                           "zero_stage": 3}  # fmt: skip
    groups = {(c["kind"], c["group"], c["group_size"]) for c in m["collectives"]}
    assert ("all_to_all", "ep", 64) in groups
    assert ("all_gather", "dp", 1024) in groups and ("reduce_scatter", "dp", 1024) in groups
    assert ("all_gather", "dp_shard_mod_ep", 16) in groups  # experts: ZeRO-3 over the 16 ranks holding copies
    from sparselm.params.counting import count_params
    from sparselm.params.presets import load_preset

    total_params = count_params(load_preset("glam-64b-64e", [])).total
    # Every fp32 parameter is held by one rank, up to FSDP's padding (experts: one per rank, sharded 16 ways on d_in;
    # sharding their expert dim padded each shard to a whole expert, 16x).
    assert total_params * 4 <= m["state"]["params"] * 1024 <= total_params * 4 * 1.01


@pytest.mark.parametrize("ep", [1, 2])
def test_fewer_experts_than_shards_are_not_padded(ep: int) -> None:
    """2 experts under ZeRO-3 on 4 ranks (ep=1: 2 experts over 4 shards; ep=2: one local expert over 2): FSDP shards
    d_in, so each rank rests at a quarter of the parameters; sharding the expert dim padded each shard to a whole
    expert (GLaM at 1,024 ranks: 64 GiB per rank instead of 4.2)."""
    from sparselm.config import load_config
    from sparselm.params.counting import count_params
    from sparselm.plan.planner import resting_bytes

    cfg = load_config(None, [*SMALL, "model.n_layers=2", "moe.num_experts=2", "moe.moe_every=1",
                             "moe.d_ff_expert=1024", "parallel.zero_stage=3", f"parallel.ep={ep}"])  # fmt: skip
    share = count_params(cfg).total * 4 / 4
    assert share <= resting_bytes(cfg, 4) <= share * 1.001


def test_search_ranks_what_fits_and_says_why_the_rest_does_not(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """On a 9 MiB device, ZeRO-0 of a 0.4M-parameter model fits only with tp=2; tp=4 cannot split 2 heads."""
    hw = tmp_path / "tiny.toml"
    hw.write_text(
        'name = "a 9 MiB device"\nmemory_gib = 0.009\nbf16_tflops = 100.0\nfp32_tflops = 10.0\n'
        "devices_per_node = 4\nintra_node_gbs = 100.0\ninter_node_gbs = 10.0\n"
    )
    args = [*SMALL[:-1], "model.n_layers=2", "moe.num_experts=0", "model.n_heads=2", "parallel.zero_stage=0",
            "train.precision=fp32"]  # fmt: skip
    sets = [x for o in args for x in ("--set", o)]
    code, stdout, err = _cli(capsys, "--world-size", "4", "--hardware", str(hw), "--search", "--json", *sets)
    assert code == 0, err[-3000:]
    out = json.loads(stdout)
    ranked, rejected = out["ranked"], out["rejected"]
    assert [r["layout"]["parallel.tp"] for r in ranked] == [2, 2]  # with and without checkpointing
    steps = [r["estimate"]["step_s"] for r in ranked]
    assert steps == sorted(steps)
    for r in ranked:
        assert r["estimate"]["fits"] and r["layout"]["parallel.zero_stage"] == 0  # --set fields stay fixed
        micro = r["layout"]["train.micro_batch_size"]
        assert r["measurement"]["micro_batch_size"] == micro and 16 % (2 * micro) == 0
    reasons = {r["layout"]["parallel.tp"]: r["reason"] for r in rejected}
    assert reasons[4] == "model.n_heads=2 is not divisible by parallel.tp=4"  # the launcher's own words
    assert "GiB per device" in reasons[1]  # measured, and too big even at micro-batch 1 with checkpointing
    assert out["best"]["measurement"]["layout"]["tp"] == 2


def test_hardware_files_load_and_bad_ones_are_refused(tmp_path: Path) -> None:
    from sparselm.errors import ConfigError
    from sparselm.plan.hardware import list_hardware, load_hardware

    assert set(list_hardware()) >= {"v100-32g", "a100-40g", "a100-80g", "h100-80g", "tpu-v4"}
    for key in list_hardware():
        hw = load_hardware(key)
        assert hw.memory_gib > 0 and hw.peak_flops(hw.resolve_precision("auto")) > 0
    assert load_hardware("v100-32g").resolve_precision("auto") == "fp32"  # no bf16 on V100
    with pytest.raises(ConfigError, match="has no bf16"):
        load_hardware("v100-32g").resolve_precision("bf16")
    with pytest.raises(ConfigError, match="unknown hardware 'a200'"):
        load_hardware("a200")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nmemory_gib = 8\n')
    with pytest.raises(ConfigError, match="missing field"):
        load_hardware(str(bad))
    bad.write_text('name = "x"\nmemory_gib = -8\nbf16_tflops = 1.0\nfp32_tflops = 1.0\ndevices_per_node = 1\n'
                   "intra_node_gbs = 1.0\ninter_node_gbs = 1.0\nsmoke = 1\n")  # fmt: skip
    with pytest.raises(ConfigError, match="unknown field"):
        load_hardware(str(bad))


def test_cli_prints_the_plan_of_one_layout(capsys: pytest.CaptureFixture) -> None:
    args = [*SMALL, "model.n_layers=2", "moe.num_experts=4", "parallel.ep=2", "parallel.zero_stage=3"]
    code, text, err = _cli(
        capsys, "--world-size", "4", "--hardware", "h100-80g", *(x for o in args for x in ("--set", o))
    )
    assert code == 0, err[-3000:]
    for expected in ("memory per device", "optimizer state", "activations, one micro-batch", "fits:",
                     "all_to_all", "step time estimate on h100-80g", "assumptions"):  # fmt: skip
        assert expected in text, text
