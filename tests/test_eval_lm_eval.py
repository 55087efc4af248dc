"""The lm-evaluation-harness adapter, run by lm-eval itself on local YAML task files (no hub access), returns the
same numbers as ``sparselm eval`` on the same tasks and model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparselm.checkpoint.inference import load_checkpoint
from sparselm.eval.formats import load_examples, split_wikitext
from sparselm.eval.harness import evaluate_task
from sparselm.eval.loglik import Scorer
from sparselm.eval.tasks import load_task, task_from_file
from sparselm.train.trainer import train
from tiny_run import tiny_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FOUNDRY = SHARED_DATA / "llm-foundry-eval"
pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"evaluation data not found at {SHARED_DATA}")
LIMIT = 6


@pytest.fixture(autouse=True)
def offline_one_thread(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared: one thread avoids OpenMP contention
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tiny_dataset: Path, tiny_vocab_size: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config(
        tiny_dataset,
        tiny_vocab_size,
        "optim.lr=3e-4",
        "optim.warmup_steps=100",
        "train.max_steps=6",
        "train.micro_batch_size=8",
        "train.eval_every=0",
        "train.threads=1",
    )
    run = tmp_path_factory.mktemp("lm_eval_run") / "run"
    train(cfg, run)
    return run


def yaml_task(folder: Path, name: str, data_file: Path, body: str) -> None:
    """One lm-eval task per YAML file, reading a local JSON Lines file through the `json` dataset builder."""
    head = (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        f"  cache_dir: {folder / 'hf_cache'}\ntest_split: test\n"
    )
    (folder / f"{name}.yaml").write_text(head + body, encoding="utf-8")


def test_adapter_matches_sparselm_eval(ckpt: Path, tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import sparselm.eval.lm_eval_adapter  # noqa: F401  (registers the "sparselm" model)

    folder = tmp_path / "tasks"
    folder.mkdir()
    mc = "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: gold\n"
    acc_norm = "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    yaml_task(folder, "sl_copa", FOUNDRY / "copa.jsonl", mc + "doc_to_text: '{{query}}'\n" + acc_norm)
    yaml_task(folder, "sl_arc", FOUNDRY / "arc_easy.jsonl", mc + 'doc_to_text: "{{query}}\\nAnswer:"\n' + acc_norm)
    yaml_task(
        folder,
        "sl_wino",  # partial scoring: the gold index as "text" makes lm-eval put the options in the context
        FOUNDRY / "winogrande.jsonl",
        "output_type: multiple_choice\ndoc_to_text: gold\ndoc_to_choice: context_options\n"
        "doc_to_target: continuation\nmetric_list:\n  - metric: acc\n",
    )
    yaml_task(
        folder,
        "sl_lambada",
        SHARED_DATA / "lambada" / "lambada_test.jsonl",
        "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n",
    )
    # Rolling perplexity over three WikiText articles (as stored: no detokenisation on either side).
    articles = split_wikitext((SHARED_DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8"))[:3]
    docs = tmp_path / "articles.jsonl"
    docs.write_text("".join(json.dumps({"text": a}) + "\n" for a in articles), encoding="utf-8")
    yaml_task(
        folder,
        "sl_ppl",
        docs,
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
    )
    yaml_task(
        folder,
        "sl_trivia",
        FOUNDRY / "triviaqa_sm_sub.jsonl",
        "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{answer}}'\n"
        'generation_kwargs:\n  until: ["\\n", ".", ","]\n  max_gen_toks: 24\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
    )

    lm = get_model("sparselm").create_from_arg_string(f"ckpt={ckpt},batch_size=16")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    common = {"limit": LIMIT, "task_manager": manager, "log_samples": True, "num_fewshot": 0}
    out = lm_eval.simple_evaluate(model=lm, tasks=["sl_copa", "sl_arc", "sl_wino", "sl_ppl", "sl_trivia"], **common)
    # LAMBADA's perplexity would be bootstrapped for its standard error; skip that (the value is what we compare).
    lambada = lm_eval.simple_evaluate(model=lm, tasks=["sl_lambada"], bootstrap_iters=0, **common)
    theirs = {**out["results"], **lambada["results"]}

    model, _, tokenizer = load_checkpoint(ckpt)
    scorer = Scorer(model, tokenizer, batch_size=16)

    def ours(spec):
        return evaluate_task(scorer, spec, SHARED_DATA, limit=LIMIT, progress=False).metrics

    copa = load_task("copa")
    copa.metrics = ["acc", "acc_norm"]
    for name, spec in (("sl_copa", copa), ("sl_arc", load_task("arc_easy")), ("sl_wino", load_task("winogrande"))):
        mine = ours(spec)
        for metric in spec.metrics:
            assert theirs[name][f"{metric},none"] == pytest.approx(mine[metric]["value"], abs=1e-12), (name, metric)
            assert theirs[name][f"{metric}_stderr,none"] == pytest.approx(mine[metric]["stderr"], abs=1e-12)

    mine = ours(load_task("lambada"))
    assert theirs["sl_lambada"]["acc,none"] == mine["acc"]["value"]
    assert theirs["sl_lambada"]["perplexity,none"] == pytest.approx(mine["perplexity"]["value"], rel=1e-9)

    ppl_task = tmp_path / "ppl.toml"
    ppl_task.write_text(f'kind = "perplexity"\ndata = "{docs}"\nprompt = "{{text}}"\n', encoding="utf-8")
    mine = ours(task_from_file(ppl_task))
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert theirs["sl_ppl"][f"{metric},none"] == pytest.approx(mine[metric]["value"], rel=1e-9), metric

    # Generation: lm-eval's raw responses are exactly what the native TriviaQA task generates and scores.
    trivia = load_task("triviaqa")
    prompts = [ex.contexts[0] for ex in load_examples(trivia, SHARED_DATA).examples[:LIMIT]]
    native = [text for text, _ in scorer.generate_until(prompts, trivia.until, trivia.max_gen_tokens)]
    samples = sorted(out["samples"]["sl_trivia"], key=lambda s: s["doc_id"])
    assert [s["arguments"][0][0] for s in samples] == prompts
    assert [s["resps"][0][0] for s in samples] == native
    assert any(native)  # the tiny model does say something before a stop string


def test_rolling_windows_are_lm_evals() -> None:
    """Default-stride windows equal the ones lm-eval's Hugging Face model builds for loglikelihood_rolling."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from sparselm.config import ModelConfig
    from sparselm.model.transformer import Transformer

    class Tok:
        eod_id = 2

    model = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16))
    scorer = Scorer(model, Tok())
    for n in (1, 15, 16, 17, 40, 64):
        tokens = list(range(3, 3 + n))
        theirs = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(token_list=tokens, prefix_token=2, max_seq_len=16, context_len=1)
        ]
        assert [(list(c), list(x)) for c, x in theirs] == scorer.rolling_requests(tokens), n
