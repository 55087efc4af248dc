"""The MoE-vs-dense experiment: compute-saving arithmetic by hand, the model family's FLOP matching, and the whole
command end to end at the smallest settings (3 steps per run), including a rerun that reuses finished work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sparselm.config import load_config
from sparselm.experiment.analysis import compute_saving, family_flops_to_reach, flops_to_reach, loss_at_flops
from sparselm.experiment.family import build_family
from sparselm.experiment.moe_vs_dense import ExperimentOptions, run_experiment
from sparselm.experiment.report import _experts_alone
from sparselm.precision import resolve_precision

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_flops_to_reach_interpolates_in_log_flops() -> None:
    curve = [(1e9, 6.0), (1e10, 5.0), (1e11, 4.0)]
    assert flops_to_reach(curve, 6.5) == 1e9  # already below at the first point
    assert flops_to_reach(curve, 5.0) == pytest.approx(1e10)
    assert flops_to_reach(curve, 4.5) == pytest.approx(10**10.5)  # halfway in loss = halfway in log-FLOPs
    assert flops_to_reach(curve, 3.9) is None


def test_loss_at_flops() -> None:
    curve = [(1e9, 6.0), (1e11, 4.0)]
    assert loss_at_flops(curve, 1e10) == pytest.approx(5.0)
    assert loss_at_flops(curve, 1e8) is None
    assert loss_at_flops(curve, 1e12) is None


def test_family_takes_the_cheapest_dense_run() -> None:
    curves = {"small": [(1.0, 5.0), (10.0, 4.0)], "big": [(4.0, 4.5), (40.0, 3.0)]}
    flops, name = family_flops_to_reach(curves, 4.5)
    assert name == "small" and flops == pytest.approx(math.sqrt(10.0))  # 3.16 beats big's 4.0
    flops, name = family_flops_to_reach(curves, 3.5)
    assert name == "big" and flops == pytest.approx(4.0 * 10 ** (2 / 3))  # small never gets there
    assert family_flops_to_reach(curves, 2.0) == (None, None)


def test_compute_saving_against_a_constructed_family() -> None:
    # Dense S ends at loss 5 after 1e10 FLOPs; M (4x FLOPs per token) passes 4.5 at 2e10 and ends at 4.0 after 4e10.
    dense = {
        "dense-S": [(1e9, 6.0), (1e10, 5.0)],
        "dense-M": [(4e9, 6.0), (2e10, 4.5), (4e10, 4.0)],
    }
    moe = [(1e9, 5.8), (5e9, 4.8), (1e10, 4.5)]
    s = compute_saving(moe, dense)
    assert s.dense_flops == pytest.approx(2e10) and s.dense_run == "dense-M"
    assert s.factor == pytest.approx(2.0)
    assert s.flops_to_m_final is None and s.factor_vs_m is None  # never reaches M's final 4.0
    assert s.loss_at_s_flops == pytest.approx(4.5) and s.s_final_loss == 5.0
    better = compute_saving([(1e9, 5.0), (1e10, 3.9)], dense)
    assert better.factor is None and better.factor_lower_bound == pytest.approx(4.0)
    # 4.0 is reached at 10**(9 + 1/1.1) FLOPs on the log-FLOPs segment from (1e9, 5.0) to (1e10, 3.9).
    assert better.flops_to_m_final == pytest.approx(10 ** (9 + 1.0 / 1.1))
    assert better.factor_vs_m == pytest.approx(4e10 / 10 ** (9 + 1.0 / 1.1))


def _run(name: str, slug: str, kind: str, steps: int, flops: float, loss: float, **extra) -> dict:
    run = {"name": name, "slug": slug, "kind": kind, "steps": steps, "train_flops": flops, "final_val_loss": loss}
    return {"overrides": [], **run, **extra}


def test_experts_alone_compares_equal_steps_and_reads_dense_s_end_points() -> None:
    # dense-S trained to 100 steps ends at 4.0 after 1e12 FLOPs, to 200 steps at 3.6 after 2e12: an MoE loss of 3.8
    # is halfway between in loss, so worth sqrt(2) x 1e12 dense-S FLOPs (log-FLOPs interpolation).
    results = {
        "steps": 100,
        "runs": [
            _run("dense-S", "dense-s", "dense", 100, 1e12, 4.0),
            _run(
                "dense-S [train.max_steps=200]",
                "dense-s--maxsteps200",
                "dense",
                200,
                2e12,
                3.6,
                variant_of="dense-s",
                overrides=["train.max_steps=200"],
            ),
            _run(
                "dense-S [train.seed=7]",
                "dense-s--seed7",
                "dense",
                100,
                1e12,
                4.03,
                variant_of="dense-s",
                overrides=["train.seed=7"],
            ),
            # Not an end point of dense-S: a recipe change, not a budget.
            _run(
                "dense-S [optim.lr=1]",
                "dense-s--lr1",
                "dense",
                200,
                2e12,
                3.0,
                variant_of="dense-s",
                overrides=["optim.lr=1", "train.max_steps=200"],
            ),
            _run("S+MoE-4 top-1", "s-moe4-top1", "moe", 100, 1e12, 3.8),
            _run("S+MoE-16 top-1", "s-moe16-top1", "moe", 100, 1e12, 4.1),
            _run(
                "S+MoE-4 top-1 [train.max_steps=200]",
                "s-moe4-top1--maxsteps200",
                "moe",
                200,
                2e12,
                3.5,
                variant_of="s-moe4-top1",
                overrides=["train.max_steps=200"],
            ),
        ],
    }
    text = "\n".join(_experts_alone(results))
    assert "at 100 steps (dense-S 4.000): S+MoE-4 top-1 -0.200 (1.41x); S+MoE-16 top-1 +0.100 (< 1x)" in text
    assert "at 200 steps (dense-S 3.600): S+MoE-4 top-1 [train.max_steps=200] -0.100 (> 1.00x)" in text
    assert "dense-S [train.seed=7] ends 0.030 nats from dense-S" in text
    # Without a second budget there is no end-point interpolation, only the differences.
    single = {"steps": 100, "runs": [results["runs"][0], results["runs"][4]]}
    assert "S+MoE-4 top-1 -0.200." in "\n".join(_experts_alone(single))


def test_family_matches_flops_and_grows_dense_sizes() -> None:
    runs = {r.name: r for r in build_family(ExperimentOptions.vocab_size)}  # the experiment's default vocabulary
    s = runs["dense-S"].train_flops_per_token
    assert 3.5 <= runs["dense-M"].train_flops_per_token / s <= 4.5  # "about 4x"
    assert 14.0 <= runs["dense-L"].train_flops_per_token / s <= 18.0  # "about 16x"
    for e in (4, 16, 64):
        for k in (1, 2):
            moe = runs[f"S+MoE-{e} top-{k}"]
            # Same FLOPs per token as S up to the router (2 x E x d_model per MoE layer, x3 for training).
            router = 3 * 2 * e * moe.cfg.model.d_model * 2
            assert moe.train_flops_per_token - s == router
            assert moe.total_params > runs["dense-S"].total_params
            assert moe.cfg.moe.moe_every == 2


@pytest.mark.skipif(not (SHARED / "piqa").is_dir(), reason="needs ../shared/data for the zero-shot tasks")
def test_experiment_end_to_end_and_rerun(tmp_path: Path, tiny_corpus: Path) -> None:
    opts = ExperimentOptions(
        data=[tiny_corpus],
        out=tmp_path / "exp",
        quick=True,
        steps=3,
        experts=(4,),
        top_ks=(1, 2),
        vocab_size=512,
        seq_len=32,
        batch_size=4,
        val_fraction=0.1,
        eval_batches=1,
        tasks=("piqa", "lambada"),
        eval_limit=2,
        eval_data_dir=SHARED,
        progress=False,
        command="test",
    )
    results = run_experiment(opts)
    names = [r["name"] for r in results["runs"]]
    assert names == ["dense-S", "dense-M", "dense-L", "S+MoE-4 top-1", "S+MoE-4 top-2"]
    for run in results["runs"]:
        assert [p["step"] for p in run["curve"]] == [1, 2, 3]
        assert run["tokens"] == 3 * 4 * 32
        assert run["curve"][-1]["flops"] == run["tokens"] * run["train_flops_per_token"]
        assert run["train_seconds"] > 0 and run["tokens_per_sec"] > 0
        assert (
            set(run["tasks"]) == {"piqa", "lambada"} and 1 <= run["tasks"]["piqa"]["n"] <= 2
        )  # an option may not fit 32 tokens
        if run["kind"] == "moe":
            assert len(run["expert_load"][-1]["load"]) == 1  # 2 layers in quick S: one MoE layer
            assert sum(run["expert_load"][-1]["load"][0]) == pytest.approx(1.0)
    report = Path(results["report"])
    text = report.read_text()
    for heading in ("Validation loss against training compute", "Compute-saving factor", "Expert load"):
        assert heading in text
    assert "S+MoE-4 top-2" in text and "PIQA" in text
    assert "What limits the MoE runs here" in text and "Capacity headroom" in text and "Data per expert" in text
    share = results["runs"][0]["flops_share"]  # quick dense-S: 2 layers, the second one's FFN is what MoE replaces
    assert share["replaced_ffn_layers"] == 1 and 0 < share["replaced_ffns"] < 1 and 0 < share["output_layer"] < 1
    assert "Where the compute goes" in text
    for png in ("loss-vs-flops.png", "loss-vs-time.png", "expert-load.png"):
        assert (report.parent / report.stem / png).stat().st_size > 1000
    saved = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert saved["steps"] == 3 and len(saved["runs"]) == 5
    # the family's warmup is 10% of its steps, at least one step, and the report says so
    assert saved["warmup_steps"] == 1 and "AdamW, warmup 1 step (33%) then cosine" in text
    family_cfg = load_config(tmp_path / "exp" / "runs" / "dense-s" / "config.toml")
    assert family_cfg.optim.warmup_steps == 1
    # precision auto is resolved once for this machine, recorded, used by every run and stated in the report
    expected = resolve_precision("auto", torch.device("cpu"))
    assert saved["precision"] == expected and family_cfg.train.precision == expected
    assert ("bf16 autocast (auto" if expected == "bf16" else "fp32 (auto: bf16 matmuls measured slower") in text

    # A rerun finds every run trained and evaluated: nothing is retrained, the numbers are the same; a recipe
    # variant added by the rerun is the only thing trained, for the family's steps unless it sets train.max_steps,
    # and gets its own table.
    metrics = tmp_path / "exp" / "runs" / "dense-l" / "metrics.jsonl"
    before = metrics.read_text()
    evaluated = json.loads((tmp_path / "exp" / "timings.json").read_text())
    opts.variants = [
        "s-moe4-top1:moe.aux_loss_coef=0.1",
        "s-moe4-top1:train.max_steps=5",
        "dense-s:train.max_steps=5",
        "dense-s:optim.warmup_steps=2",
        "dense-s:train.precision=bf16",
    ]
    again = run_experiment(opts)
    assert metrics.read_text() == before
    timings = json.loads((tmp_path / "exp" / "timings.json").read_text())
    for key in evaluated:  # nothing of the family was trained or evaluated again
        assert timings[key] == evaluated[key], key
    assert [r["final_val_loss"] for r in again["runs"][:5]] == [r["final_val_loss"] for r in results["runs"]]
    variant = again["runs"][5]
    assert variant["variant_of"] == "s-moe4-top1" and variant["overrides"] == ["moe.aux_loss_coef=0.1"]
    assert variant["steps"] == 3 and [p["step"] for p in variant["curve"]] == [1, 2, 3]
    longer = again["runs"][6]
    assert longer["steps"] == 5 and longer["tokens"] == 5 * 4 * 32 and longer["curve"][-1]["step"] == 5
    assert longer["train_flops"] == pytest.approx(5 / 3 * again["runs"][3]["train_flops"])
    assert again["steps"] == 3  # the family's plan is unchanged
    assert "Best MoE run of the family" in report.read_text()
    assert "**Longer run**: S+MoE-4 top-1 [train.max_steps=5] trains on 640 tokens (1.7x the family's)" in (
        report.read_text()
    )
    assert "- Control: dense-S [train.max_steps=5]" in report.read_text()  # held to the same dense-M target
    # dense-S at 3 and 5 steps are two end points; the 5-step MoE is compared with the 5-step dense-S
    assert "**Experts alone**" in report.read_text() and "at 5 steps (dense-S " in report.read_text()
    warm = load_config(tmp_path / "exp" / "runs" / again["runs"][8]["slug"] / "config.toml")
    assert warm.optim.warmup_steps == 2 and warm.train.max_steps == 3  # the variant's warmup, the family's steps
    pinned = load_config(tmp_path / "exp" / "runs" / again["runs"][9]["slug"] / "config.toml")
    assert pinned.train.precision == "bf16"  # a variant's own precision is not replaced by the family's
    assert "Recipe variants" in report.read_text() and "moe.aux_loss_coef=0.1" in report.read_text()
    wall = again["wall_minutes"]
    assert wall["variants"] > 0 and wall["family_total"] + wall["variants"] == pytest.approx(wall["total"])
    opts.command = "test --variant"
    assert run_experiment(opts)["commands"] == ["test", "test --variant"]
    assert "**Then**: `test --variant`" in report.read_text()
    with pytest.raises(ValueError, match="unknown base run"):
        opts.variants = ["s-moe99-top1:moe.aux_loss_coef=0.1"]
        run_experiment(opts)


def test_experiment_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--top-k"):
        ExperimentOptions(data=[tmp_path], out=tmp_path / "x", top_ks=(3,))
    with pytest.raises(ValueError, match="--budget-minutes"):
        ExperimentOptions(data=[tmp_path], out=tmp_path / "x", budget_minutes=0)
    opts = ExperimentOptions(data=[tmp_path / "missing"], out=tmp_path / "x", tasks=(), progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_experiment(opts)
