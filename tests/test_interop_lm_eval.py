"""A trained checkpoint exported to Hugging Face files and scored by lm-evaluation-harness's own ``hf`` model (its
transformers model and tokenizer loaded from the export) on PIQA and LAMBADA gives the numbers ``sparselm eval``
gives on the checkpoint: a cross-check of the export and of sparselm's harness at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sparselm.checkpoint.inference import load_checkpoint
from sparselm.config import load_config
from sparselm.eval.harness import evaluate_task
from sparselm.eval.loglik import Scorer
from sparselm.eval.tasks import load_task
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
            "logging.peak_flops=1e11",
        ],
    )
    run = tmp_path_factory.mktemp("lm_eval_hf") / "run"
    train(cfg, run)
    return run


def yaml_task(folder: Path, name: str, data_file: Path, body: str) -> None:
    head = (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        f"  cache_dir: {folder / 'hf_cache'}\ntest_split: test\n"
    )
    (folder / f"{name}.yaml").write_text(head + body, encoding="utf-8")


def test_lm_eval_hf_model_matches_sparselm_eval(trained: Path, tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    result = export_hf(trained, tmp_path / "hf")
    assert result.architecture == "Qwen2MoeForCausalLM"

    # PIQA as lm-eval's piqa task defines it, on the authors' files (labels joined in: the json loader reads one file).
    goals = (SHARED_DATA / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines()[:LIMIT]
    labels = (SHARED_DATA / "piqa" / "valid-labels.lst").read_text(encoding="utf-8").split()[:LIMIT]
    piqa = tmp_path / "piqa.jsonl"
    piqa.write_text(
        "".join(json.dumps({**json.loads(g), "label": int(y)}) + "\n" for g, y in zip(goals, labels, strict=True))
    )
    folder = tmp_path / "tasks"
    folder.mkdir()
    yaml_task(
        folder,
        "x_piqa",
        piqa,
        'output_type: multiple_choice\ndoc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\n'
        'doc_to_choice: "{{[sol1, sol2]}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
    )
    yaml_task(
        folder,
        "x_lambada",
        SHARED_DATA / "lambada" / "lambada_test.jsonl",
        "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n",
    )
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu",
        tasks=["x_piqa", "x_lambada"],
        batch_size=8,
        limit=LIMIT,
        num_fewshot=0,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
    )
    theirs = out["results"]

    model, _, tokenizer = load_checkpoint(trained)
    scorer = Scorer(model, tokenizer, batch_size=8)
    mine = evaluate_task(scorer, load_task("piqa"), SHARED_DATA, limit=LIMIT, progress=False).metrics
    for metric in ("acc", "acc_norm"):
        assert theirs["x_piqa"][f"{metric},none"] == pytest.approx(mine[metric]["value"], abs=1e-12), metric
    mine = evaluate_task(scorer, load_task("lambada"), SHARED_DATA, limit=LIMIT, progress=False).metrics
    assert theirs["x_lambada"]["acc,none"] == pytest.approx(mine["acc"]["value"], abs=1e-12)
    assert theirs["x_lambada"]["perplexity,none"] == pytest.approx(mine["perplexity"]["value"], rel=1e-5)
