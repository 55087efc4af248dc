"""Metrics on hand-made examples with known answers, task files and format adapters (no model needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sparselm.errors import ConfigError
from sparselm.eval import metrics as M
from sparselm.eval.formats import detokenize_wikitext, load_examples, render, split_wikitext
from sparselm.eval.tasks import builtin_tasks, load_task, resolve_data_dir, task_from_file


def test_squad_normalisation_exact_match_and_f1() -> None:
    assert M.normalize_answer("  The Eiffel-Tower!! ") == "eiffeltower"
    assert M.normalize_answer("An apple, a pear") == "apple pear"
    assert M.exact_match(" the Onion.", ["Onions", "Onion"]) == 1.0  # best over every alias
    assert M.exact_match("onion soup", ["Onion"]) == 0.0
    # F1: "onion soup" vs "onion": precision 1/2, recall 1 -> 2/3; the best alias wins.
    assert M.token_f1("onion soup", ["Onion"]) == pytest.approx(2 / 3)
    assert M.token_f1("red onion soup", ["garlic", "Red Onion"]) == pytest.approx(0.8)
    assert M.token_f1("the", ["a"]) == 1.0  # both normalise to nothing: they agree
    assert M.token_f1("", ["Onion"]) == 0.0
    with pytest.raises(ValueError):
        M.exact_match("x", [])


def test_acc_and_acc_norm_can_disagree() -> None:
    # Summed log-likelihood prefers the short option; per character, the long one is better.
    logprobs, choices = [-4.0, -6.0], ["cat", "elephants"]
    pred, pred_norm = M.choice_predictions(logprobs, choices)
    assert (pred, pred_norm) == (0, 1)  # -4/3 = -1.33 < -6/9 = -0.67
    assert M.choice_predictions([-1.0, -1.0], ["a", "b"]) == (0, 0)  # ties: the first, like numpy.argmax


def test_mean_stderr_is_the_sample_standard_error() -> None:
    mean, stderr = M.mean_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75
    assert stderr == pytest.approx(math.sqrt(0.25 / 4))  # sample variance 0.25 (n - 1), over n
    assert M.mean_stderr([1.0]) == (1.0, None)


def test_word_level_perplexity_normalisation() -> None:
    # 4 words, 6 tokens, 20 bytes, total log-likelihood -12 nats.
    text = "ab cd ef ghijklmnopq"
    assert M.count_words(text) == 4 and M.count_bytes(text) == 20
    values = M.corpus_perplexities(-12.0, tokens=6, words=M.count_words(text), n_bytes=M.count_bytes(text))
    assert values["token_perplexity"] == pytest.approx(math.exp(2.0))
    assert values["word_perplexity"] == pytest.approx(math.exp(3.0))
    assert values["byte_perplexity"] == pytest.approx(math.exp(0.6))
    assert values["bits_per_byte"] == pytest.approx(0.6 / math.log(2))
    # lm-eval's count: whitespace at the edges adds an empty "word" (what published WikiText numbers used).
    assert M.count_words(" a b \n") == 4


def test_lambada_perplexity_is_exp_of_mean_negative_loglik() -> None:
    ppl, stderr = M.example_perplexity([-1.0, -3.0])
    assert ppl == pytest.approx(math.exp(2.0))
    assert stderr == pytest.approx(math.exp(2.0) * 1.0)  # sample std sqrt(2) / sqrt(2)


def test_templates_and_wikitext_helpers() -> None:
    assert render("Q: {q}\n{{A}}: {n}", {"q": "why", "n": 3}) == "Q: why\n{A}: 3"
    with pytest.raises(ValueError, match="missing field 'q'"):
        render("{q}", {})
    raw = " \n = Alpha = \n \n Text @-@ here , 1 @,@ 000 . \n = = Sub = = \n \n = Beta = \n x \n"
    articles = split_wikitext(raw)
    assert [a.split("\n")[0] for a in articles] == [" = Alpha = ", " = Beta = "]
    assert "".join(a + "\n" for a in articles) == raw[2:] + "\n"  # nothing lost but the leading blank line
    assert detokenize_wikitext(" Text @-@ here , 1 @,@ 000 . \n = = Sub = = \n") == " Text-here, 1,000.\n== Sub ==\n"


def test_builtin_task_definitions_are_valid() -> None:
    names = builtin_tasks()
    for name in ("lambada", "piqa", "boolq", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "copa"):
        assert name in names
    assert {"triviaqa", "wikitext2"} <= set(names)
    kinds = {name: load_task(name).kind for name in names}
    assert kinds["winogrande"] == "partial" and kinds["lambada"] == "last_word"
    assert kinds["triviaqa"] == "generate" and kinds["wikitext2"] == "perplexity"


def write_task(tmp_path: Path, text: str, name: str = "t.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_task_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="task file not found"):
        load_task(str(tmp_path / "nope.toml"))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(ConfigError, match="unknown key 'promt'"):
        task_from_file(write_task(tmp_path, 'kind = "generate"\ndata = "x"\npromt = "{q}"\n'))
    with pytest.raises(ConfigError, match="kind must be one of"):
        task_from_file(write_task(tmp_path, 'kind = "mc"\ndata = "x"\n'))
    with pytest.raises(ConfigError, match="needs gold_field"):
        task_from_file(write_task(tmp_path, 'kind = "multiple_choice"\ndata = "x"\nchoices_field = "c"\n'))
    with pytest.raises(ConfigError, match="not available"):
        task_from_file(write_task(tmp_path, 'kind = "generate"\ndata = "x"\nanswers_field=["a"]\nmetrics=["acc"]\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        task_from_file(write_task(tmp_path, "kind = \n"))
    spec = task_from_file(write_task(tmp_path, 'kind = "generate"\ndata = "missing.jsonl"\nanswers_field = ["a"]\n'))
    with pytest.raises(FileNotFoundError, match="data file 'missing.jsonl' not found"):
        load_examples(spec, tmp_path)


def test_bad_records_are_counted_not_scored(tmp_path: Path) -> None:
    lines = [
        json.dumps({"q": "Capital of France?", "a": "Paris", "aliases": ["paris"]}),
        "{not json",
        json.dumps({"q": "No answer here", "a": ""}),
        json.dumps({"a": "no question"}),
        json.dumps(["a list"]),
        "",
        json.dumps({"q": "Line\u2028separator inside a string", "a": "ok"}),
    ]
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = write_task(
        tmp_path, 'kind = "generate"\ndata = "qa.jsonl"\nprompt = "{q}"\nanswers_field = ["a", "aliases"]\n'
    )
    data = load_examples(task_from_file(path), data_dir=None)  # found next to the task file
    assert [e.answers for e in data.examples] == [["Paris", "paris"], ["ok"]]
    assert data.records == 6
    assert dict(data.skipped) == {
        "malformed line (not a JSON object)": 2,
        "no answer": 1,
        "missing field 'q'": 1,
    }


def test_multiple_choice_gold_checks_and_labels_file(tmp_path: Path) -> None:
    rows = [{"q": "a", "c": ["x", "y"], "g": 1}, {"q": "b", "c": ["x", "y"], "g": 5}, {"q": "c", "c": ["x", "y"]}]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    spec = task_from_file(
        write_task(tmp_path, 'kind = "multiple_choice"\ndata = "mc.jsonl"\nprompt = "{q}"\nchoices_field = "c"\n'
                   'gold_field = "g"\n')
    )  # fmt: skip
    data = load_examples(spec, tmp_path)
    assert [(e.contexts, e.gold, e.demo) for e in data.examples] == [(["a"], 1, "a y")]
    assert dict(data.skipped) == {"gold label outside the choices": 1, "no gold label": 1}
    (tmp_path / "labels.lst").write_text("0\n1\n", encoding="utf-8")
    spec.labels, spec.gold_field = "labels.lst", "label"
    with pytest.raises(ValueError, match="2 labels for 3 records"):
        load_examples(spec, tmp_path)


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARSELM_EVAL_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="pass --data-dir"):
        resolve_data_dir(None)
    (tmp_path.parent / "shared" / "data").mkdir(parents=True, exist_ok=True)
    assert resolve_data_dir(None) == Path("..") / "shared" / "data"
    monkeypatch.setenv("SPARSELM_EVAL_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(str(tmp_path / "nope"))
