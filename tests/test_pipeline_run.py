"""The whole pipeline on a corpus with planted bad input, duplicates and junk: accounting, outputs, restart, dask."""

from __future__ import annotations

import copy
import gzip
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from sparselm.cli import main
from sparselm.data.loader import TokenShards
from sparselm.data.tokenizer import Tokenizer
from sparselm.errors import ConfigError
from sparselm.pipeline import report as report_module
from sparselm.pipeline import run as run_module
from sparselm.pipeline.config import PipelineConfig, config_from_dict, load_pipeline_config, validate
from sparselm.pipeline.executor import DaskExecutor
from sparselm.pipeline.quality import QualityModel
from sparselm.pipeline.run import run_pipeline

REPO = Path(__file__).resolve().parents[1]
PLANTED_REJECTS = {
    "malformed_json",
    "missing_text_field",
    "non_string_text",
    "invalid_utf8",
    "truncated_gzip",
    "binary",
    "line_too_long",
}


def _jsonl(records: list[object]) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


@pytest.fixture(scope="module")
def planted(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four sources built from the tiny corpus, with every kind of bad input and duplicate planted in them."""
    root = tmp_path_factory.mktemp("planted")
    docs = [json.loads(line)["text"] for line in tiny_corpus.read_text().splitlines()]
    books = root / "books"
    books.mkdir()
    for i in range(3):
        body = "\n\n".join(docs[i * 3 : i * 3 + 3])
        header = f"The Project Gutenberg EBook of Book {i}\n\n*** START OF THIS PROJECT GUTENBERG EBOOK {i} ***\n\n"
        (books / f"book{i}.txt").write_text(
            header + body + f"\n*** END OF THIS PROJECT GUTENBERG EBOOK {i} ***\nlicence"
        )
    web = root / "web"
    web.mkdir()
    near = "\n\n".join(docs[0:3]).split(" ")  # the body of book0
    for p in (5, 160, 320):
        near[p] = "CHANGED"
    records: list[object] = [{"text": d} for d in docs[10:40]]
    records += [
        {"text": " ".join(near)},  # near duplicate of book0 (another source): three words changed
        {"text": docs[12].replace("\n", "  \n ").upper()},  # exact duplicate of web doc 12 after normalisation
        {"text": "Too short to keep."},
        {"text": "\n".join(["Subscribe to the newsletter for the best deals today."] * 30)},
        "{this is not json",
        {"body": "no text field"},
        {"text": ["not", "a", "string"]},
        "",
    ]
    raw = _jsonl(records) + b'{"text": "caf\xe9 and the rest of a line"}\n'
    (web / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    cut = gzip.compress(_jsonl([{"text": d} for d in docs[40:60]]))
    (web / "b.jsonl.gz").write_bytes(cut[: len(cut) // 2])
    (web / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl([{"text": d} for d in docs[60:65]])))
    pq.write_table(pa.table({"text": [*docs[65:70], None]}), web / "d.parquet")
    misc = root / "misc"
    misc.mkdir()
    (misc / "binary.bin").write_bytes(bytes(range(256)) * 40)
    (misc / "huge.txt").write_bytes(b"z" * (1 << 20) + b"\nand a tail\n")
    (misc / "latin1.txt").write_bytes(docs[70].encode("utf-8") + "\ncaf\xe9\n".encode("latin-1"))
    (misc / "empty.txt").write_text("   \n\t\n")
    wiki = "".join(f'<doc id="{i}" url="u" title="T{i}">\nT{i}\n\n{docs[71 + i]}</doc>\n' for i in range(2))
    (misc / "wiki_00").write_text(wiki)
    with zipfile.ZipFile(root / "posts.zip", "w") as z:
        for i in range(3):
            z.writestr(f"posts/{i}.txt", docs[77 + i])
    return root


def planted_config(root: Path, out: Path, tokenizer: Tokenizer, **run: object) -> PipelineConfig:
    cfg = config_from_dict(
        {
            "run": {"out": str(out), "workers": 1, "progress": False, **run},
            "tokenizer": {"path": str(tokenizer.path)},
            "extract": {"max_line_bytes": 65536},
            "dedup": {"threshold": 0.8},
            "mixture": {"val_fraction": 0.1, "shard_tokens": 20_000},
            "source": [
                {"name": "books", "paths": [str(root / "books")], "extractor": "gutenberg", "weight": 2.0},
                {"name": "web", "paths": [str(root / "web/*")], "weight": 1.0},
                {"name": "misc", "paths": [str(root / "misc")], "filters": ["gopher_quality"], "epochs": 1.0},
                {"name": "zipped", "paths": [str(root / "posts.zip")], "filters": [], "epochs": 2.0},
            ],
        }
    )
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def planted_run(planted: Path, tiny_tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run") / "out"
    return out, run_pipeline(planted_config(planted, out, tiny_tokenizer))


def _ledger(out: Path) -> list[dict]:
    entries = []
    for path in sorted((out / "work").glob("*/*.ledger.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            entries += [json.loads(line) for line in f]
    return entries


def test_every_input_document_is_accounted_for(planted_run) -> None:
    out, summary = planted_run
    totals = summary["totals"]
    assert totals["input"] == totals["kept"] + totals["filtered"] + totals["duplicates"] + totals["rejected"]
    ledger = _ledger(out)
    assert len(ledger) == totals["input"] and len({e["id"] for e in ledger}) == len(ledger)
    by_status = {s: [e for e in ledger if e["status"] == s] for s in ("candidate", "filtered", "rejected")}
    assert len(by_status["rejected"]) == totals["rejected"] and len(by_status["filtered"]) == totals["filtered"]
    with gzip.open(out / "duplicates.jsonl.gz", "rt") as f:
        duplicates = [json.loads(line) for line in f]
    assert len(duplicates) == totals["duplicates"]
    candidates = {e["id"] for e in by_status["candidate"]}
    assert {d["id"] for d in duplicates} <= candidates and len(candidates) == totals["kept"] + totals["duplicates"]
    clean_ids = set()
    for path in (out / "clean").glob("*/*.jsonl.gz"):
        with gzip.open(path, "rt") as f:
            clean_ids |= {json.loads(line)["id"] for line in f}
    assert clean_ids == candidates - {d["id"] for d in duplicates}


def test_planted_bad_input_is_rejected_with_its_reason(planted_run) -> None:
    out, summary = planted_run
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejects} == PLANTED_REJECTS
    assert all(r["location"] and r["id"] for r in rejects)
    web = summary["sources"]["web"]
    assert web["rejected"]["truncated_gzip"]["docs"] == 1 and web["candidates"]["docs"] > 30
    assert summary["sources"]["misc"]["filtered"]["empty"]["docs"] == 1
    assert {"word_count", "duplicate_lines"} <= set(web["filtered"])
    report = (out / "report.md").read_text()
    for heading in (
        "Documents and tokens per source",
        "Removed by filter",
        "Rejected input",
        "Deduplication",
        "Mixture",
    ):
        assert f"## {heading}" in report
    assert all((out / "report" / name).is_file() for name in ("documents.png", "mixture.png"))


def test_planted_duplicates_are_found_across_sources(planted_run) -> None:
    out, summary = planted_run
    with gzip.open(out / "duplicates.jsonl.gz", "rt") as f:
        duplicates = {d["kind"]: d for d in map(json.loads, f)}
    assert duplicates["near"]["id"].startswith("web/") and duplicates["near"]["kept"].startswith("books/")
    assert duplicates["exact"]["id"].startswith("web/") and duplicates["exact"]["kept"].startswith("web/")
    assert summary["dedup"]["exact"] == 1 and summary["dedup"]["near"] == 1 and summary["dedup"]["cross_source"] == 1


def test_report_shows_duplicate_clusters_or_says_there_are_none(planted_run) -> None:
    out, summary = planted_run
    report = (out / "report.md").read_text()
    assert "| cluster size | clusters |" in report and "report/duplicate_clusters.png" in report
    assert (out / "report" / "duplicate_clusters.png").is_file() and "No duplicate clusters" not in report
    unique = copy.deepcopy(summary)  # the same run as if nothing had been duplicated
    unique["dedup"].update(exact=0, near=0, cross_source=0, cluster_sizes={}, examples={})
    text = "\n".join(report_module.dedup_section(unique, {}, "report"))
    assert "No duplicate clusters were found" in text and "cluster size" not in text


def test_token_shards_load_and_follow_the_mixture(planted_run, tiny_tokenizer: Tokenizer) -> None:
    out, summary = planted_run
    train, val = TokenShards(out / "tokens", "train"), TokenShards(out / "tokens", "val")
    assert train.vocab_size == tiny_tokenizer.vocab_size and len(val) > 0
    mix = {m["source"]: m for m in summary["mixture"]}
    assert len(train) == sum(m["sampled_tokens"] for m in mix.values()) + summary["dataset"]["train"]["documents"]
    assert mix["zipped"]["realised_epochs"] == pytest.approx(2.0) or mix["zipped"]["train_tokens_available"] == 0
    books, web = mix["books"], mix["web"]  # weights 2:1 over the budget left after the epoch sources
    assert books["sampled_tokens"] / web["sampled_tokens"] == pytest.approx(2.0, rel=0.2)


def test_restart_after_a_crash_reuses_finished_shards_and_gives_the_same_result(
    planted: Path, planted_run, tiny_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    cfg = planted_config(planted, out, tiny_tokenizer)
    calls = []

    def crash_on_third(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a worker killed mid-run
        return real(task)

    real = run_module.process_shard
    monkeypatch.setattr(run_module, "process_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    monkeypatch.setattr(run_module, "process_shard", real)
    summary = run_pipeline(cfg)
    timing = summary["timing"]
    assert timing["shards_reused"] == 2 and timing["shards_run"] == timing["shards_total"] - 2
    assert summary["totals"] == planted_run[1]["totals"]
    ref = planted_run[0] / "tokens"
    for name in ("train_00000.bin", "val_00000.bin"):
        assert (out / "tokens" / name).read_bytes() == (ref / name).read_bytes()
    assert run_pipeline(cfg)["timing"]["shards_run"] == 0  # everything finished: nothing is redone


def test_dask_executor_in_local_mode_gives_the_same_result(
    planted: Path, planted_run, tiny_tokenizer, tmp_path
) -> None:
    cfg = planted_config(planted, tmp_path / "out", tiny_tokenizer, executor="dask", workers=2)
    executor = DaskExecutor(workers=2, processes=True)
    try:
        summary = run_pipeline(cfg, executor=executor)
    finally:
        executor.close()
    assert summary["totals"] == planted_run[1]["totals"]
    train = (tmp_path / "out" / "tokens" / "train_00000.bin").read_bytes()
    assert train == (planted_run[0] / "tokens" / "train_00000.bin").read_bytes()


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ("[run]\nworkerz = 2\n", "unknown config key run.workerz"),
        ('[[source]]\nname = "a"\npaths = ["x"]\nweight = 1.0\nepochs = 2.0\n', "set exactly one of weight"),
        ('[[source]]\nname = "a"\npaths = ["x"]\nweight = 1.0\nfilters = ["nope"]\n', "unknown filter 'nope'"),
        ('[[source]]\nname = "a"\npaths = ["x"]\nweight = 1.0\nquality = "pareto"\n', "no classifier"),
        ('[quality]\npositive = ["b"]\n[[source]]\nname = "a"\npaths = ["x"]\nweight = 1\n', "'b' is not a source"),
        ("[quality]\nfolds = 1\n", "quality.folds must be 0"),
        ("[filters.word_count]\nmax = 'many'\n", "filters.word_count.max: expected a number"),
    ],
)
def test_config_errors_are_one_line_and_name_the_field(tmp_path: Path, capsys, snippet: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(snippet)
    with pytest.raises(ConfigError, match=message):
        load_pipeline_config(path)
    assert main(["data", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert message.split("'")[0] in err and err.count("\n") == 1


def test_shipped_configs_validate_and_overrides_apply() -> None:
    cfg = load_pipeline_config(REPO / "configs/pipeline/example.toml", ["source.c4.weight=0.5", "run.workers=1"])
    assert cfg.source("c4").weight == 0.5 and cfg.run.workers == 1
    assert dict((n, hi) for n, _, hi in cfg.bounds(cfg.source("books")))["word_count"] == 1_000_000
    load_pipeline_config(REPO / "configs/pipeline/tiny.toml")


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "corpus").is_dir(), reason="../shared/data not found")
def test_tiny_config_end_to_end_with_the_quality_classifier_through_the_cli(
    tiny_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(REPO)  # the shipped config's paths are relative to the repository root
    out = tmp_path / "tiny"
    args = ["data", "run", "configs/pipeline/tiny.toml", "--out", str(out), "--no-progress", "--report"]
    args += [str(tmp_path / "docs" / "report.md"), "--set", f"tokenizer.path={json.dumps(str(tiny_tokenizer.path))}"]
    assert main([*args, "--set", "quality.max_passages_per_source=150"]) == 0
    assert "input documents" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quality"]["auc"] > 0.8 and summary["sources"]["c4"]["score_hist"] is not None
    assert "quality_pareto" in summary["sources"]["c4"]["filtered"]
    assert (tmp_path / "docs" / "report" / "quality_scores.png").is_file()
    assert "## Quality classifier" in (tmp_path / "docs" / "report.md").read_text()
    # c4 is one of the classifier's negatives: its documents were scored by the fold model that did not see them
    classifier = QualityModel.load(out / "quality.npz")
    assert summary["quality"]["folds"] == 5 and classifier.crossfits("c4") and classifier.crossfits("wiki")
    with gzip.open(out / "clean" / "c4" / "00000.jsonl.gz", "rt") as f:
        kept = [json.loads(line) for line in f][:20]
    assert kept and all(d["score"] == pytest.approx(classifier.score(d["text"], crossfit=True), abs=1e-4) for d in kept)

    model = out / "quality.npz"
    scores = tmp_path / "scores.jsonl"
    c4 = "../shared/data/c4-sample/c4-sample.00000-of-00001.json.gz"
    assert main(["data", "quality", "score", "--model", str(model), "--input", c4, "--out", str(scores)]) == 0
    lines = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(lines) == 1000 and all(0.0 <= line["score"] <= 1.0 for line in lines)
    result = json.loads(capsys.readouterr().err)
    assert result["documents"] == 1000 and result["crossfitted_inputs"] == []  # a path, not the source name c4

    new_model = tmp_path / "q.npz"
    train = ["data", "quality", "train", "--config", "configs/pipeline/tiny.toml", "--positive", "wiki"]
    train += ["--negative", "c4", "--out", str(new_model), "--max-passages", "100"]
    assert main(train) == 0
    assert "ROC AUC" in capsys.readouterr().out and json.loads(new_model.with_suffix(".json").read_text())["auc"] > 0.8
