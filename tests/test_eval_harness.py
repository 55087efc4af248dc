"""``sparselm eval`` end to end: every built-in task on its real data file, reports, few-shot draws, comparison
across checkpoints (table + PNG), and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparselm.checkpoint.inference import load_checkpoint
from sparselm.cli import main
from sparselm.eval.formats import load_examples
from sparselm.eval.harness import evaluate_task, fewshot_prefix, read_results
from sparselm.eval.loglik import Scorer
from sparselm.eval.tasks import builtin_tasks, load_task
from sparselm.train.trainer import train
from tiny_run import tiny_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"evaluation data not found at {SHARED_DATA}")


@pytest.fixture(autouse=True)
def one_thread():
    # The CPU is shared: one thread avoids OpenMP contention that makes tiny forwards far slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset: Path, tiny_vocab_size: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MoE trained for 10 steps (checkpoints at steps 5 and 10); max_seq_len 64 forces context truncation."""
    cfg = tiny_config(
        tiny_dataset,
        tiny_vocab_size,
        "train.max_steps=10",
        "train.micro_batch_size=8",
        "train.eval_every=0",
        "train.threads=1",
        "checkpoint.every=5",
    )
    run = tmp_path_factory.mktemp("eval_run") / "run"
    train(cfg, run)
    return run


@needs_data
def test_cli_scores_every_builtin_task_on_its_real_data(tiny_run: Path, tmp_path: Path, capsys) -> None:
    tasks = ",".join(builtin_tasks())
    args = ["eval", "--ckpt", str(tiny_run), "--tasks", tasks, "--limit", "3", "--data-dir", str(SHARED_DATA)]
    assert main([*args, "--batch-size", "64", "--no-progress"]) == 0
    table = capsys.readouterr().out
    meta, results = read_results(tiny_run / "eval" / "results-0shot.json")  # default: RUN/eval/
    assert meta["step"] == 10 and meta["shots"] == 0 and meta["limit"] == 3
    assert [r.task for r in results] == builtin_tasks()
    for r in results:
        assert r.metrics and r.records > 0 and r.shots == 0, r
        assert 0 < r.n <= 3 and r.n + r.too_long == min(3, r.records)
        for name, m in r.metrics.items():
            assert m["value"] == m["value"], (r.task, name)  # not NaN
            if name in ("acc", "acc_norm", "em", "f1"):
                assert 0.0 <= m["value"] <= 1.0
            assert f"{r.task} " in table and name in table
    by_task = {r.task: r for r in results}
    assert by_task["lambada"].truncated > 0  # LAMBADA passages are longer than 64 tokens: cut on the left, counted
    assert by_task["triviaqa"].skipped == {} and by_task["triviaqa"].records == 3000
    ppl = by_task["wikitext2"].metrics
    assert ppl["word_perplexity"]["value"] > ppl["token_perplexity"]["value"] > 1.0  # several tokens per word
    markdown = (tiny_run / "eval" / "results-0shot.md").read_text()
    assert "| task | shots | metric | value | stderr | n |" in markdown and "| piqa | 0 | acc_norm |" in markdown


@needs_data
def test_few_shot_prompts_are_seeded_and_exclude_the_scored_example(tiny_run: Path) -> None:
    spec = load_task("copa")
    data = load_examples(spec, SHARED_DATA)
    pool = data.examples
    first = [fewshot_prefix(spec, ex, pool, True, 3, seed=7) for ex in pool[:20]]
    assert first == [fewshot_prefix(spec, ex, pool, True, 3, seed=7) for ex in pool[:20]]  # reproducible
    assert first != [fewshot_prefix(spec, ex, pool, True, 3, seed=8) for ex in pool[:20]]  # the seed matters
    for ex, prefix in zip(pool, first, strict=False):
        demos = prefix.split("\n\n")[:-1]
        assert len(demos) == 3 and ex.demo not in demos  # never its own answer
        assert all(d.split(", ")[-1].split(" ", 1)[0] in ("therefore", "because") for d in demos)
    model, _, tokenizer = load_checkpoint(tiny_run)
    result = evaluate_task(Scorer(model, tokenizer), spec, SHARED_DATA, shots=2, limit=4, progress=False)
    assert result.shots == 2 and result.n == 4
    with pytest.raises(ValueError, match="pool has only"):
        fewshot_prefix(spec, pool[0], pool[:3], True, 3, seed=0)


@needs_data
def test_compare_prints_one_table_and_draws_a_png(tiny_run: Path, tmp_path: Path, capsys) -> None:
    base = ["--tasks", "copa,winogrande", "--limit", "4", "--data-dir", str(SHARED_DATA), "--no-progress"]
    for step in ("00000005", "00000010"):
        ckpt = tiny_run / "checkpoints" / f"step_{step}"
        assert main(["eval", "--ckpt", str(ckpt), *base, "--out", str(tmp_path / step)]) == 0
    capsys.readouterr()
    files = [str(tmp_path / s / "results-0shot.json") for s in ("00000005", "00000010")]
    assert main(["eval", "--compare", *files, "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "| task | metric | run@5 | run@10 |" in table
    assert "| copa | acc |" in table and "| winogrande | acc |" in table and "(n=4)" in table
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (tmp_path / "cmp" / "compare.md").read_text() == table


def test_bad_input_is_one_line_and_exit_2(tiny_run: Path, tmp_path: Path, capsys) -> None:
    cases = [
        ["--tasks", str(tmp_path / "missing.toml")],
        ["--tasks", "no_such_task"],
        ["--tasks", "copa", "--data-dir", str(tmp_path / "nowhere")],
    ]
    for extra in cases:
        assert main(["eval", "--ckpt", str(tiny_run), *extra, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sparselm: ") and err.count("\n") == 1, err
    assert main(["eval", "--compare", str(tmp_path)]) == 2
    assert "run `sparselm eval --ckpt" in capsys.readouterr().err
    # A task whose every record is unusable is an error, not a score of zero.
    (tmp_path / "bad.jsonl").write_text('{"q": "x"}\nnot json\n', encoding="utf-8")
    task = tmp_path / "bad.toml"
    task.write_text('kind = "generate"\ndata = "bad.jsonl"\nprompt = "{q}"\nanswers_field = ["a"]\n', encoding="utf-8")
    assert main(["eval", "--ckpt", str(tiny_run), "--tasks", str(task), "--no-progress"]) == 2
    assert "no usable examples (1 x no answer, 1 x malformed line" in capsys.readouterr().err


def test_user_task_file_and_json_output(tiny_run: Path, tmp_path: Path, capsys) -> None:
    rows = [
        {"question": f"What is {i} plus {i}?", "options": ["one", "two", "three"], "answer": "two"} for i in range(5)
    ]
    (tmp_path / "sums.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (tmp_path / "sums.yaml").write_text(
        "kind: multiple_choice\ndata: sums.jsonl\nprompt: 'Q: {question}\\nA:'\nchoices_field: options\n"
        "gold_field: answer\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    args = ["eval", "--ckpt", str(tiny_run), "--tasks", str(tmp_path / "sums.yaml"), "--out", str(out)]
    assert main([*args, "--json", "--no-progress"]) == 0
    payload = json.loads(capsys.readouterr().out)
    (result,) = payload["results"]
    assert result["task"] == "sums" and result["n"] == 5 and set(result["metrics"]) == {"acc", "acc_norm"}
    # Five identical questions: every example gets the same prediction, so accuracy is 0 or 1.
    assert result["metrics"]["acc"]["value"] in (0.0, 1.0)
    assert (out / "results-0shot.json").is_file() and (out / "results-0shot.md").is_file()
