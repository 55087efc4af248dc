"""A trained checkpoint exported to Hugging Face files and scored by lm-evaluation-harness's own ``hf`` model (its
transformers model and tokenizer loaded from the export) on PIQA and LAMBADA gives the numbers ``sparselm eval``
gives on the checkpoint: a cross-check of the export and of sparselm's harness at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sparselm.config import load_config
from sparselm.interop.hf_export import export_hf
from sparselm.train.trainer import train

# As the other evaluation tests find it (the checkout beside shared/), or where $SPARSELM_EVAL_DATA says.
SHARED_DATA = Path(os.environ.get("SPARSELM_EVAL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
pytestmark = [
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"evaluation data not found at {SHARED_DATA}"),
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op"),
]
LIMIT = 40


@pytest.fixture(autouse=True)
def offline_one_thread(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tiny_vocab_size: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's shape (top-2 MoE in every other layer: a Qwen2-MoE export), tiny, trained a few steps."""
    cfg = load_config(
        "configs/default.toml" if Path("configs/default.toml").is_file() else None,
        [
            f"model.vocab_size={tiny_vocab_size}",
            "model.d_model=32",
            "model.n_layers=4",
            "model.n_heads=4",
            "model.d_ff=64",
            "model.max_seq_len=512",  # PIQA options reach 271 tokens with the 500-piece tokenizer
            "moe.d_ff_expert=32",
            f"data.path={tiny_dataset}",
            "data.seq_len=64",
            "train.max_steps=8",
            "train.global_batch_size=8",
            "train.micro_batch_size=8",
            "train.precision=fp32",
            "train.eval_every=0",
            "train.threads=1",
            "checkpoint.every=8",
            "logging.progress=false",
            "logging.tensorboard=false",
            "logging.mfu=false",
        ],
    )
    run = tmp_path_factory.mktemp("lm_eval_hf") / "run"
    train(cfg, run)
    return run


def test_lm_eval_hf_model_matches_sparselm_eval(trained: Path, tmp_path: Path) -> None:
    from sparselm.interop.crosscheck import lm_eval_hf_scores, sparselm_scores, task_files

    result = export_hf(trained, tmp_path / "hf")
    assert result.architecture == "Qwen2MoeForCausalLM"
    files = task_files(trained, SHARED_DATA, tmp_path / "tasks")
    theirs = lm_eval_hf_scores(tmp_path / "hf", files, tmp_path / "tasks", limit=LIMIT)
    mine = sparselm_scores(trained, files, limit=LIMIT)
    for metric in ("acc", "acc_norm"):
        assert theirs["piqa"][metric] == pytest.approx(mine["piqa"][metric], abs=1e-12), metric
    assert 0 < mine["piqa"]["acc"] < 1 and mine["lambada"]["perplexity"] > 1  # real scores, not an empty run
    assert theirs["lambada"]["acc"] == pytest.approx(mine["lambada"]["acc"], abs=1e-12)
    assert theirs["lambada"]["perplexity"] == pytest.approx(mine["lambada"]["perplexity"], rel=1e-5)


def test_crosscheck_benchmark_smallest_setting(trained: Path) -> None:
    """benchmarks/interop_crosscheck.py (the docs' demo-checkpoint table) end to end on a few examples."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "interop_crosscheck.py"), "--ckpt", str(trained)]
        + ["--data-dir", str(SHARED_DATA), "--limit", "4", "--threads", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = records[-1]
    assert summary["round_trip_bitwise"] and summary["architecture"] == "Qwen2MoeForCausalLM"
    assert {(r["task"], r["metric"]) for r in records[:-1]} == {
        ("piqa", "acc"),
        ("piqa", "acc_norm"),
        ("lambada", "acc"),
        ("lambada", "perplexity"),
    }
    assert all(r["diff"] <= 1e-5 for r in records[:-1])  # relative
