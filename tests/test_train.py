"""Training loop: run-directory contents, exact resume, the NaN guard, atomic checkpoints, the LR schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sparselm.checkpoint.files import export_checkpoint, latest_checkpoint, list_checkpoints, load_model_weights
from sparselm.checkpoint.inference import load_checkpoint
from sparselm.config import Config, apply_overrides, load_config, validate
from sparselm.errors import CheckpointError, ConfigError, TrainingStopped
from sparselm.optim import build_optimizer, build_scheduler, lr_multiplier
from sparselm.train.metrics import read_metrics
from sparselm.train.trainer import build_model, train
from tiny_run import TINY_RUN, tiny_config


@pytest.fixture()
def cfg(tiny_dataset: Path, tiny_vocab_size: int) -> Config:
    return tiny_config(tiny_dataset, tiny_vocab_size, "logging.tensorboard=true")


def test_run_directory_contents(cfg: Config, tmp_path: Path) -> None:
    result = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for r in steps:
        assert {"loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_sec", "flops_per_sec"} <= set(r)
        assert len(r["expert_load"]) == 1 and len(r["expert_load"][0]) == 4
        assert sum(r["expert_load"][0]) == pytest.approx(1.0)
        assert r["dropped_fraction"] == 0.0  # dropless default
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in list_checkpoints(run)] == ["step_00000006", "step_00000012"]
    ckpt = latest_checkpoint(run)
    assert {"model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json", "config.toml", "tokenizer.model"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert result.final_step == 12 and len(result.losses) == 12
    model, loaded_cfg, tok = load_checkpoint(run)
    assert loaded_cfg == cfg
    assert tok.vocab_size <= cfg.model.vocab_size
    assert not model.training


def test_refuses_to_overwrite_a_run(cfg: Config, tmp_path: Path) -> None:
    cfg = apply_overrides(cfg, ["train.max_steps=2", "checkpoint.every=0", "train.eval_every=0"])
    train(cfg, tmp_path / "run")
    before = (tmp_path / "run" / "checkpoints" / "step_00000002" / "model.safetensors").read_bytes()
    with pytest.raises(Exception, match="already holds checkpoints"):
        train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "model.safetensors").read_bytes() == before


class Crash(Exception):
    pass


def test_resume_matches_uninterrupted_run(cfg: Config, tmp_path: Path) -> None:
    """2 x 6 steps with a crash and --resume in the middle give exactly the losses of 12 uninterrupted steps."""
    cfg = apply_overrides(cfg, ["moe.jitter=0.1", "model.dropout=0.1"])  # RNG consumers must resume too
    full = train(cfg, tmp_path / "full")

    def crash_at_step_7(step: int, model: torch.nn.Module) -> None:
        if step == 6:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", after_backward=crash_at_step_7)
    assert latest_checkpoint(tmp_path / "resumed").name == "step_00000006"
    second = train(cfg, tmp_path / "resumed", resume=True)
    assert second.losses == full.losses[6:]
    assert second.val_losses == [full.val_losses[1]]
    a = load_checkpoint(tmp_path / "full")[0].state_dict()
    b = load_checkpoint(tmp_path / "resumed")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_weights_only_starts_a_fresh_optimizer(cfg: Config, tmp_path: Path) -> None:
    """A checkpoint with weights but no optimizer state (an export, an imported model) resumes at its step with
    fresh AdamW moments and the learning rate where that step puts the schedule."""
    cfg = apply_overrides(cfg, ["train.eval_every=0"])
    train(cfg, tmp_path / "full")
    step6 = tmp_path / "full" / "checkpoints" / "step_00000006"
    export_checkpoint(step6, tmp_path / "run" / "checkpoints" / "step_00000006")
    assert not (tmp_path / "run" / "checkpoints" / "step_00000006" / "optimizer.pt").exists()
    second = train(cfg, tmp_path / "run", resume=True)
    assert second.final_step == 12 and len(second.losses) == 6
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r]
    assert lrs == pytest.approx([cfg.optim.lr * lr_multiplier(s, cfg.optim, 12) for s in range(6, 12)])
    state = torch.load(latest_checkpoint(tmp_path / "run") / "optimizer.pt", weights_only=True)["optimizer"]
    assert {int(s["step"]) for s in state["state"].values()} == {6}  # six AdamW steps since the fresh start
    # An export never lands half-written, and never over a directory that holds something else.
    with pytest.raises(CheckpointError, match="not an earlier export"):
        export_checkpoint(step6, tmp_path / "full")
    assert {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()} == {"step_00000006", "step_00000012"}


def test_transient_nan_step_is_skipped(cfg: Config, tmp_path: Path) -> None:
    def poison_step_3(step: int, model: torch.nn.Module) -> None:
        if step == 2:
            next(model.parameters()).grad.fill_(float("nan"))

    result = train(cfg, tmp_path / "run", after_backward=poison_step_3)
    assert result.skipped_steps == 1 and result.final_step == 12
    assert all(torch.isfinite(p).all() for p in load_checkpoint(tmp_path / "run")[0].parameters())
    skipped = [r for r in read_metrics(tmp_path / "run") if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3]


def test_persistent_nan_stops_with_last_good_checkpoint(cfg: Config, tmp_path: Path) -> None:
    cfg = apply_overrides(cfg, ["checkpoint.every=2", "train.max_bad_steps=3", "checkpoint.keep_last=5"])

    def poison_from_step_6(step: int, model: torch.nn.Module) -> None:
        if step >= 5:
            next(model.parameters()).grad.fill_(float("inf"))

    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row"):
        train(cfg, tmp_path / "run", after_backward=poison_from_step_6)
    last = latest_checkpoint(tmp_path / "run")
    assert last.name == "step_00000004"
    model = load_checkpoint(last)[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_interrupted_checkpoint_write_is_ignored(cfg: Config, tmp_path: Path) -> None:
    cfg = apply_overrides(cfg, ["train.max_steps=4", "checkpoint.every=2", "train.eval_every=0"])
    train(cfg, tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    # A save that died half-way leaves only a temporary directory, which is never taken for a checkpoint.
    partial = root / ".tmp_step_00000006_999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000004"
    # A corrupted weights file gives a clear error, not a crash deep inside safetensors.
    bad = root / "step_00000004" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model_weights(build_model(cfg), root / "step_00000004")


def test_checkpoint_of_another_model_is_rejected(cfg: Config, tmp_path: Path) -> None:
    cfg2 = apply_overrides(cfg, ["train.max_steps=1", "train.eval_every=0"])
    train(cfg2, tmp_path / "run")
    other = build_model(apply_overrides(cfg2, ["model.d_model=64"]))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model_weights(other, tmp_path / "run")


def test_data_seed_sets_the_batches_apart_from_the_init(cfg: Config, tmp_path: Path) -> None:
    """data.seed = -1 follows train.seed exactly; another data.seed keeps the init and changes the batches."""
    short = ["train.max_steps=2", "train.eval_every=0", "checkpoint.every=0", "train.seed=7"]
    runs = {
        name: train(apply_overrides(cfg, [*short, *extra]), tmp_path / name).losses
        for name, extra in (("follows", []), ("same", ["data.seed=7"]), ("other", ["data.seed=8"]))
    }
    assert runs["same"] == runs["follows"]
    assert runs["other"][0] != runs["follows"][0]
    with pytest.raises(ConfigError, match="data.seed"):
        validate(apply_overrides(cfg, ["data.seed=-2"]))


def test_mfu_is_logged_only_against_a_peak(cfg: Config, tmp_path: Path) -> None:
    """logging.mfu=false (the experiments) logs the model's FLOP/s and no MFU, since it has no peak to divide by."""
    short = ["train.max_steps=2", "train.eval_every=0", "checkpoint.every=0"]
    train(apply_overrides(cfg, [*short, "logging.mfu=false"]), tmp_path / "off")
    records = [r for r in read_metrics(tmp_path / "off") if "loss" in r]
    assert records and all("mfu" not in r and r["flops_per_sec"] > 0 for r in records)
    train(apply_overrides(cfg, [*short, "logging.mfu=true", "logging.peak_flops=2e11"]), tmp_path / "given")
    records = [r for r in read_metrics(tmp_path / "given") if "loss" in r]
    assert records and all(r["mfu"] == pytest.approx(r["flops_per_sec"] / 2e11) for r in records)


def test_learning_rate_schedule() -> None:
    o = Config().optim
    o.lr, o.warmup_steps, o.min_lr_ratio = 1.0, 10, 0.1
    assert lr_multiplier(0, o, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, o, 110) == pytest.approx(1.0)
    assert lr_multiplier(10, o, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, o, 110) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_multiplier(110, o, 110) == pytest.approx(0.1)
    assert lr_multiplier(500, o, 110) == pytest.approx(0.1)  # stays at 10% of the peak (Gopher)


def test_expert_learning_rate_and_init_scale(cfg: Config) -> None:
    """optim.expert_lr_scale gives the 3-D expert weights their own learning rate through the whole schedule;
    moe.expert_init_scale shrinks their initial weights and nothing else."""
    cfg = apply_overrides(cfg, ["moe.num_experts=4", "optim.lr=0.01", "optim.warmup_steps=2"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert len(build_optimizer(model, cfg.optim).param_groups) == 2  # scale 1: no separate group
    cfg.optim.expert_lr_scale = 3.0
    optimizer = build_optimizer(model, cfg.optim)
    expert_group = optimizer.param_groups[2]
    expert_weights = {id(p) for n, p in model.named_parameters() if ".experts.w_" in n}
    assert len(expert_weights) == 3 * (cfg.model.n_layers // 2)  # up, gate, down in every other layer
    assert {id(p) for p in expert_group["params"]} == expert_weights
    scheduler = build_scheduler(optimizer, cfg.optim, 10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        assert expert_group["lr"] == pytest.approx(3.0 * optimizer.param_groups[0]["lr"])

    torch.manual_seed(0)
    small = build_model(apply_overrides(cfg, ["moe.expert_init_scale=0.1"]))
    for (name, a), (_, b) in zip(model.named_parameters(), small.named_parameters(), strict=True):
        if ".experts." in name:
            assert b.std().item() == pytest.approx(0.1 * a.std().item(), rel=0.05)
        else:
            assert torch.equal(a, b), name


def test_gradient_accumulation_matches_one_big_batch(cfg: Config, tmp_path: Path) -> None:
    """Micro-batching changes nothing but memory: 8 = 2 x 4 gives the losses of 8 = 1 x 8 (dense and MoE)."""
    base = ["train.max_steps=4", "train.eval_every=0", "checkpoint.every=0"]
    for moe in ("moe.num_experts=4", "moe.num_experts=0"):
        a = train(apply_overrides(cfg, [*base, moe, "train.micro_batch_size=4"]), tmp_path / f"a{moe[-1]}")
        b = train(apply_overrides(cfg, [*base, moe, "train.micro_batch_size=8"]), tmp_path / f"b{moe[-1]}")
        # The aux loss is per micro-batch, so MoE steps after the first differ slightly; the first step is exact.
        assert a.losses[0] == pytest.approx(b.losses[0], rel=1e-6)
        assert a.losses == pytest.approx(b.losses, rel=2e-3)


@pytest.mark.slow
def test_default_moe_learns_on_embedded_corpus(tiny_dataset: Path, tiny_vocab_size: int, tmp_path: Path) -> None:
    """The default small MoE (configs/default.toml), ~100 steps: validation loss falls well below its start."""
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "default.toml",
        [
            f"model.vocab_size={tiny_vocab_size}",
            f"data.path={tiny_dataset}",
            "data.seq_len=128",
            "train.max_steps=100",
            "train.global_batch_size=8",
            "train.micro_batch_size=8",
            "train.eval_every=100",
            "checkpoint.every=0",
            "logging.progress=false",
            "logging.mfu=false",
        ],
    )
    from sparselm.data.loader import TokenShards
    from sparselm.train.trainer import evaluate

    torch.manual_seed(cfg.train.seed)
    start = evaluate(build_model(cfg), cfg, TokenShards(cfg.data.path, "val"))
    assert start == pytest.approx(math.log(tiny_vocab_size), rel=0.1)
    result = train(cfg, tmp_path / "run")
    final = result.val_losses[-1][1]
    assert final < start - 1.5, (start, final)
    state = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert state["step"] == 100


def test_compiled_blocks_match_eager(cfg: Config, tmp_path: Path) -> None:
    """train.compile=true compiles each block in place and trains the same. fp32 on purpose: there grouped_mm
    cannot be traced on CPU and must run eagerly behind a graph break (bf16 traces it; compile takes ~1 min more)."""
    base = ["train.max_steps=2", "train.eval_every=0", "checkpoint.every=0"]
    eager = train(apply_overrides(cfg, base), tmp_path / "eager")
    compiled = train(apply_overrides(cfg, [*base, "train.compile=true"]), tmp_path / "compiled")
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)


def test_compiled_dense_blocks_have_no_graph_breaks() -> None:
    """train.compile=true in bf16: each block of a dense model is one graph (no break, so norms, RoPE, SwiGLU and the
    residual adds fuse around the matmuls and attention), every block reuses that one graph (no recompiles), and the
    loss and gradients are eager's up to bf16 rounding."""
    from torch._dynamo.utils import counters

    from sparselm.parallel.runtime import Runtime
    from sparselm.train.trainer import forward_backward

    base = [*TINY_RUN, "model.vocab_size=256", "moe.num_experts=0", "train.precision=bf16"]
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (2, 8, 32), generator=gen)
    results = []
    torch._dynamo.reset()
    counters.clear()
    for compiled in ("false", "true"):
        cfg = load_config(None, [*base, f"train.compile={compiled}"])
        torch.manual_seed(0)
        runtime = Runtime(cfg, torch.device("cpu"))
        model = runtime.parallelize(build_model(cfg))
        stats = forward_backward(model, cfg, x, y, 2, runtime)
        results.append((stats.loss, {n: p.grad for n, p in model.named_parameters()}))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # one graph serves both blocks
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-3)
    for name, grad in eager_grads.items():
        error = (compiled_grads[name] - grad).norm() / grad.norm()
        assert error < 2e-2, (name, error.item())
