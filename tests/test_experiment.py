"""The MoE-vs-dense experiment: the family's FLOP matching, the layout and planner, the whole command end to end at
the smallest settings (a few steps per run, search included) with a rerun that reuses finished work, and the
committed report, which must be what the code renders from the committed results.json."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparselm.errors import ConfigError, InputError
from sparselm.experiment.data import prepare_dataset
from sparselm.experiment.family import QUICK_REGIMES, RECIPES, REGIMES, dense_run, moe_run
from sparselm.experiment.moe_vs_dense import ExperimentOptions, collect_run, run_experiment, train_run
from sparselm.experiment.plan import Layout, budgets, fit_steps, main_runs, parse_variant, search_runs
from sparselm.experiment.report import plot_names, render_markdown


@pytest.mark.parametrize("regime", [*REGIMES.values(), *QUICK_REGIMES.values()], ids=lambda r: r.name)
def test_every_recipe_spends_dense_s_flops_and_sizes_grow(regime) -> None:
    s = dense_run(regime, 2048, "S", 10, 1)
    layers = len(s.cfg.moe.placement(s.cfg.model.n_layers))
    assert layers >= 1
    for key in RECIPES:
        for e in (4, regime.experts):
            moe = moe_run(regime, 2048, key, e, 10, 1)
            router = 3 * 2 * e * s.cfg.model.d_model * layers  # training FLOPs of the router: the only extra
            assert moe.train_flops_per_token - s.train_flops_per_token == router, (key, e)
            assert moe.total_params > s.total_params and moe.cfg.moe.moe_every == regime.moe_every
            assert not moe.cfg.model.tie_embeddings  # tied runs here are chaotic (docs/moe-vs-dense-design.md)
    assert not s.cfg.model.tie_embeddings
    flops = [dense_run(regime, 2048, size, 10, 1).train_flops_per_token for size in regime.sizes]
    assert flops == sorted(flops) and len(set(flops)) == 3 and list(regime.sizes)[1] == "S"


def test_layout_budgets_seeds_and_sweeps() -> None:
    regime = QUICK_REGIMES["tiny"]
    layout = Layout(seeds=3, other_seeds=2, recipes=("switch", "deepspeed"), sweep_experts=(2, 4, 8))
    assert budgets(100) == [25, 50, 100]
    first = main_runs(regime, 512, 100, layout, None)
    count = {}
    for r in first:
        count[(r.model, r.steps)] = count.get((r.model, r.steps), 0) + 1
    assert count[("dense-S", 100)] == 3 and count[("dense-M", 25)] == 2 and count[("dense-XS", 50)] == 2
    assert count[("MoE-4 Switch top-1", 100)] == 2 and count[("MoE-4 DeepSpeed top-1 + shared", 100)] == 2
    assert all(r.steps == 100 for r in first if r.kind == "moe")
    assert len(first) == 3 + 8 * 2 + 2 * 2
    full = main_runs(regime, 512, 100, layout, "deepspeed")
    assert [r.slug for r in full[: len(first)]] == [r.slug for r in first]
    extra = full[len(first) :]
    names = [(r.model, r.steps, r.seed) for r in extra]
    assert ("MoE-4 DeepSpeed top-1 + shared", 100, 1236) in names  # the best recipe's third seed
    assert {(n, s) for n, s, _ in names} == {
        ("MoE-4 DeepSpeed top-1 + shared", 100),
        ("MoE-2 DeepSpeed top-1 + shared", 100),
        ("MoE-8 DeepSpeed top-1 + shared", 100),  # E=4 is the regime's own: not swept again
        ("MoE-4 DeepSpeed top-1 + shared", 25),
        ("MoE-4 DeepSpeed top-1 + shared", 50),
    }
    for r in full:  # each run's schedule ends at its own last step
        assert r.cfg.train.max_steps == r.steps and r.cfg.optim.decay_steps == 0
    search = search_runs(list(QUICK_REGIMES.values()), 512, 7)
    assert [(r.group, r.kind, r.steps) for r in search] == [
        ("search-tiny", "dense", 7),
        ("search-tiny", "moe", 7),
        ("search-tiny-deep", "dense", 7),
        ("search-tiny-deep", "moe", 7),
    ]
    # Both regimes have a "dense-S": the planner must time (and cost) each regime's own.
    assert len({r.timing_key for r in search}) == 4 and len({r.model for r in search}) == 2
    assert not {r.timing_key for r in search} & {r.timing_key for r in first}


def test_variants_parse_and_reject_unknown_bases() -> None:
    regime, layout = QUICK_REGIMES["tiny"], Layout(other_seeds=2)
    runs = parse_variant("switch:moe.renormalize=false,moe.aux_loss_coef=0.1", regime, 512, 40, layout)
    assert len(runs) == 2 and runs[0].model == "MoE-4 Switch top-1 [moe.renormalize=false, moe.aux_loss_coef=0.1]"
    assert runs[0].cfg.moe.renormalize is False and runs[0].cfg.moe.aux_loss_coef == 0.1 and runs[0].steps == 40
    assert parse_variant("dense-S:optim.lr=0.01", regime, 512, 40, layout)[1].cfg.optim.lr == 0.01
    with pytest.raises(ConfigError, match="unknown base"):
        parse_variant("s-moe64-top1:moe.aux_loss_coef=0.1", regime, 512, 40, layout)
    with pytest.raises(ConfigError, match="expected BASE"):
        parse_variant("switch", regime, 512, 40, layout)


def test_fit_steps_takes_the_largest_budget_that_fits() -> None:
    assert fit_steps(lambda b: 3.0 * b, 300.0) == 100
    assert fit_steps(lambda b: 3.0 * b + 50, 300.0) == 80  # multiples of 4
    assert fit_steps(lambda b: 3.0 * b, 1.0) == 8  # never fewer than the minimum


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--budget-minutes"):
        ExperimentOptions(data=[tmp_path], out=tmp_path / "x", budget_minutes=0)
    with pytest.raises(InputError, match="--regimes"):
        ExperimentOptions(data=[tmp_path], out=tmp_path / "x", regimes=("nope",))
    with pytest.raises(InputError, match="--recipes"):
        ExperimentOptions(data=[tmp_path], out=tmp_path / "x", layout=Layout(recipes=("top3",)))
    with pytest.raises(InputError, match="--seeds"):
        ExperimentOptions(data=[tmp_path], out=tmp_path / "x", layout=Layout(seeds=1))
    with pytest.raises(InputError, match="--jobs"):
        ExperimentOptions(data=[tmp_path], out=tmp_path / "x", jobs=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_experiment(ExperimentOptions(data=[tmp_path / "missing"], out=tmp_path / "x", progress=False))


def test_cli_verb_rejects_bad_arguments_with_one_line(tmp_path: Path, tiny_corpus: Path, capsys) -> None:
    from sparselm.cli import main

    base = ["experiment", "moe-vs-dense", "--data", str(tiny_corpus), "--out", str(tmp_path / "x")]
    assert main([*base, "--quick", "--regimes", "nope"]) == 2
    assert "--regimes: unknown nope (known: tiny, tiny-deep)" in capsys.readouterr().err
    assert main([*base, "--recipes", "top3"]) == 2
    assert main([*base, "--jobs", "-1"]) == 2
    with pytest.raises(SystemExit) as stop:
        main([*base, "--experts", "4,x"])
    assert stop.value.code == 2 and "expected comma-separated integers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written before the arguments are checked


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> tuple[ExperimentOptions, dict]:
    """The whole experiment at the smallest settings (a few steps per run, the search included), run once."""
    layout = Layout(seeds=2, other_seeds=1, recipes=("switch", "deepspeed"), sweep_experts=(2,))
    opts = ExperimentOptions(
        data=[tiny_corpus],
        out=tmp_path_factory.mktemp("experiment") / "exp",
        quick=True,
        steps=4,
        search_steps=2,
        layout=layout,
        vocab_size=512,
        val_fraction=0.1,
        eval_batches=1,
        threads=1,
        jobs=2,  # two runs at a time, each in its own process: the path the command takes on 2 cores
        progress=False,
        command="test",
    )
    return opts, run_experiment(opts)


def test_a_run_of_another_regime_in_the_same_directory_is_refused(finished) -> None:
    opts, results = finished
    chosen = results["plan"]["regime"]
    other = next(r for name, r in QUICK_REGIMES.items() if name != chosen)
    record = next(r for r in results["runs"] if r["group"] == "main" and r["model"] == "dense-S")
    run = dense_run(other, 512, "S", record["steps"], record["seed"])  # same directory name, other shapes
    run_dir = opts.out / "runs" / run.slug
    before = sorted(p.name for p in run_dir.rglob("*"))
    with pytest.raises(InputError, match="other model settings"):
        train_run(run, opts, run_dir)
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_a_run_trained_beside_another_matches_it_trained_alone(finished, tmp_path: Path) -> None:
    opts, results = finished
    record = next(r for r in results["runs"] if r["group"] == "main" and r["kind"] == "moe")
    regime = QUICK_REGIMES[results["plan"]["regime"]]
    run = moe_run(regime, 512, record["recipe"], record["num_experts"], record["steps"], record["seed"])
    run.cfg.data.path = str(opts.out / "data" / "shards")
    run.cfg.train.precision = results["precision"]
    alone = dataclasses.replace(opts, jobs=1)
    assert train_run(run, alone, tmp_path / "alone")
    losses = [point["val_loss"] for point in collect_run(run, tmp_path / "alone")["curve"]]
    assert losses == [point["val_loss"] for point in record["curve"]]  # bit for bit: runs are deterministic


def test_experiment_end_to_end_and_rerun(finished) -> None:
    opts, results = finished
    assert results["plan"]["regime"] in QUICK_REGIMES and results["plan"]["best"] in ("switch", "deepspeed")
    groups = {r["group"] for r in results["runs"]}
    assert groups == {"search-tiny", "search-tiny-deep", "main"}
    main = [r for r in results["runs"] if r["group"] == "main"]
    assert len(main) == 2 + 8 + 4 + 1 + 2  # dense-S@B x2, other dense cells x1, recipes x2, E sweep, budget sweep
    for run in results["runs"]:
        assert run["curve"][-1]["step"] == run["steps"] and run["final_val_loss"] == run["curve"][-1]["val_loss"]
        assert run["train_flops"] == run["tokens"] * run["train_flops_per_token"] and run["train_seconds"] > 0
        if run["kind"] == "moe":
            assert all(sum(layer) == pytest.approx(1.0, abs=1e-4) for layer in run["expert_load"][-1]["load"])
    report = Path(results["report"])
    text = report.read_text()
    assert text.startswith("# MoE vs dense at laptop scale\n\n**Verdict: ")
    for heading in ("## Regime search", "## The dense frontier", "## MoE runs", "## Expert load"):
        assert heading in text
    assert "- **Equal steps**:" in text and "- **Number of experts**" in text and "- **Token budget**" in text
    for png in ("loss-vs-flops.png", "loss-vs-time.png", "curves.png", "expert-load.png"):
        assert (report.parent / report.stem / png).stat().st_size > 1000
    # The report is a function of results.json alone, which is also kept beside its plots.
    saved = json.loads((opts.out / "results.json").read_text())
    assert render_markdown(saved, plot_names(report)) + "\n" == text
    assert json.loads((report.parent / report.stem / "results.json").read_text()) == saved

    # A rerun trains nothing again; a variant added by the rerun is the only thing trained.
    timings = json.loads((opts.out / "timings.json").read_text())["seconds"]
    rerun = copy.deepcopy(opts)
    rerun.layout.variants = ["switch:moe.top1_gate=straight_through"]
    again = run_experiment(rerun)
    after = json.loads((opts.out / "timings.json").read_text())["seconds"]
    assert {k: v for k, v in after.items() if k in timings} == timings
    new = [k for k in after if k not in timings]
    assert len(new) == 1 and "top1gate=straightthrough" in new[0]  # the run's directory name
    assert [r["final_val_loss"] for r in again["runs"] if not r["overrides"]] == [
        r["final_val_loss"] for r in results["runs"]
    ]
    assert "MoE-4 Switch top-1 [moe.top1_gate=straight_through]" in Path(again["report"]).read_text()
    # The data of an --out belongs to its settings: another vocabulary is refused, not mixed in.
    with pytest.raises(InputError, match="different settings"):
        prepare_dataset(opts.data, opts.out / "data", 1024, opts.val_fraction, 1234, progress=False)


def _with_moe_losses(results: dict, loss_of) -> dict:
    """A copy of ``results`` in which every main-stage MoE run ends at ``loss_of(run, dense_s_loss)``."""
    out = copy.deepcopy(results)
    dense_s = {}
    for run in out["runs"]:
        if run["group"] == "main" and run["model"] == "dense-S":
            dense_s.setdefault(run["steps"], []).append(run["final_val_loss"])
    for run in out["runs"]:
        if run["group"] == "main" and run["kind"] == "moe":
            s = dense_s[run["steps"]]
            run["final_val_loss"] = run["curve"][-1]["val_loss"] = loss_of(run, sum(s) / len(s))
    return out


def test_verdict_follows_the_numbers(finished) -> None:
    """The same runs with the MoE losses moved far below or far above dense: the verdict and the equal-steps line
    flip with them, because they are derived from the numbers, not written."""
    _, results = finished
    names = plot_names(Path("r.md"))
    lowest = min(r["final_val_loss"] for r in results["runs"] if r["kind"] == "dense")
    better = render_markdown(_with_moe_losses(results, lambda run, s: lowest - 1.0 - 1e-3 * run["seed"]), names)
    worse = render_markdown(_with_moe_losses(results, lambda run, s: s + 1.0 + 1e-3 * run["seed"]), names)
    first = [text.split("\n")[2] for text in (better, worse)]
    assert first[0].startswith(("**Verdict: the experts save compute", "**Verdict: a measurable saving")), first[0]
    assert first[1].startswith("**Verdict: the MoE costs more training compute than dense.**"), first[1]
    assert "nats below dense-S" in better and "nats above dense-S" in worse
    assert "(saving)" in better and "(costs more)" in worse  # the other recipes at the full budget


DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"


def test_committed_reports_are_rendered_from_their_committed_results() -> None:
    """Every report under docs/results/ with a results.json beside it (in its plot folder) is exactly what
    report.py renders from that file, so a change to the analysis or the wording regenerates it in the same commit."""
    rendered = 0
    for report in sorted(DOCS.glob("moe-vs-dense*.md")):
        saved = report.parent / report.stem / "results.json"
        if saved.is_file():
            results = json.loads(saved.read_text())
            assert render_markdown(results, plot_names(report)) + "\n" == report.read_text(), report.name
            assert all(r["final_val_loss"] is not None for r in results["runs"])
            rendered += 1
    assert rendered >= 1


def test_side_by_side_runs_stop_when_the_experiment_is_killed(tmp_path: Path) -> None:
    # The experiment's process holds a worker busy, then dies by SIGKILL (no handler can run): the worker must not
    # train on unseen, holding the cores that a rerun of the experiment is about to use.
    script = tmp_path / "holder.py"
    script.write_text(
        "import os, time\n"
        "from sparselm.experiment.moe_vs_dense import worker_pool\n"
        "if __name__ == '__main__':\n"
        "    pool = worker_pool(1)\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 120)\n"
        "    time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = 0
    try:
        worker = int(holder.stdout.readline())
        os.kill(worker, 0)  # alive while the experiment is
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 30
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        holder.kill()
        if worker and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "State:\tZ" in status.read_text())  # a zombie has stopped: its parent is gone
