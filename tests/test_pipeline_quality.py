"""Quality classifier: separates shared/data's high-quality text from web text, saves without pickle, selects, and
scores its own training documents by cross-fitting."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from sparselm.pipeline.filters import normalize_document
from sparselm.pipeline.quality import (
    FeatureSettings,
    QualityModel,
    TrainSettings,
    keep_document,
    passages,
    train_classifier,
)
from sparselm.pipeline.quality_jobs import quality_score
from sparselm.pipeline.run import source_documents
from sparselm.pipeline.sources import ReadOptions, expand_paths

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "corpus").is_dir(), reason=f"shared data not found at {SHARED}")


def shared_source(pattern: str, **options: object):
    return source_documents(expand_paths([str(SHARED / pattern)]), ReadOptions(**options))


def enumerate_docs(texts: list[str]):
    return ((f"doc{i}", normalize_document(text)) for i, text in enumerate(texts))


@pytest.fixture(scope="module")
def trained() -> tuple[QualityModel, dict]:
    sources = [
        ("wiki", 1, shared_source("corpus/wiki", extractor="wikiextractor")),
        ("books", 1, shared_source("corpus/books", extractor="gutenberg")),
        ("c4", 0, shared_source("c4-sample/*.json.gz")),
        ("redpajama", 0, shared_source("redpajama-cc-sample/*.jsonl")),
        ("webtext", 0, shared_source("nltk-webtext/webtext.zip", extractor="lines", members=("*.txt",))),
    ]
    return train_classifier(
        sources, TrainSettings(FeatureSettings(n_features=1 << 18), max_passages_per_source=800, folds=3), workers=2
    )


@needs_shared
def test_classifier_separates_books_and_wikipedia_from_web_text_on_held_out_documents(trained) -> None:
    _, metrics = trained
    assert metrics["auc"] >= 0.9, metrics
    assert metrics["precision"] > 0.8 and metrics["recall"] > 0.8, metrics
    per_source = metrics["sources"]
    assert all(per_source[s]["heldout_passages"] > 0 for s in ("wiki", "books", "c4", "webtext"))
    assert per_source["wiki"]["heldout_mean_score"] > 0.5 > per_source["c4"]["heldout_mean_score"]
    assert metrics["folds"] == 3 and metrics["crossfit_auc"] >= 0.9, metrics
    for name in ("wiki", "c4"):  # the full model flatters its own training passages; out-of-fold scores do not
        s = per_source[name]
        assert abs(s["crossfit_mean_score"] - 0.5) < abs(s["train_mean_score"] - 0.5), s


@needs_shared
def test_saved_model_is_plain_arrays_and_scores_identically(trained, tmp_path: Path) -> None:
    model, _ = trained
    path = model.save(tmp_path / "quality.npz")
    with np.load(path, allow_pickle=False) as data:  # would raise if the file needed unpickling
        assert sorted(data.files) == ["coef", "fold_coef", "fold_intercept", "header", "intercept"]
        assert json.loads(str(data["header"]))["format"] == "sparselm-quality"
    loaded = QualityModel.load(path)
    texts = ["The history of the region begins with the first settlers.", "CLICK HERE buy cheap pills now!!!"]
    assert np.allclose(loaded.score_many(texts), model.score_many(texts))
    assert np.allclose(loaded.score_many(texts, crossfit=True), model.score_many(texts, crossfit=True))
    assert loaded.crossfits("c4") and not loaded.crossfits("speeches")
    assert loaded.score(texts[0]) > loaded.score(texts[1])


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        QualityModel.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sparselm quality model"):
        QualityModel.load(tmp_path / "junk.npz")


def test_tiny_classifier_and_passages() -> None:
    good = [
        (f"g{i}", f"The council met on day {i} to discuss the history of the old bridge and its repair.")
        for i in range(60)
    ]
    bad = [(f"b{i}", f"buy cheap deal {i} click here free offer best price now") for i in range(60)]
    settings = TrainSettings(FeatureSettings(n_features=1 << 12, passage_chars=200), max_passages_per_source=50)
    model, metrics = train_classifier([("good", 1, iter(good)), ("bad", 0, iter(bad))], settings)
    assert metrics["auc"] == 1.0
    with pytest.raises(ValueError, match="no negative"):
        train_classifier([("good", 1, iter(good))], settings)
    text = "line one\n" * 100
    pieces = list(passages(text, 100))
    assert all(len(p) <= 100 for p in pieces) and "".join(p + "\n" for p in pieces) == text


PLANTED = "\n".join([" ".join(f"zq{chr(97 + i % 26)}{chr(97 + i // 26)}x" for i in range(28))] * 4)  # unique words


def test_a_training_document_is_scored_by_the_fold_model_that_did_not_see_it(tmp_path: Path) -> None:
    good = [f"The council met on day {i} to discuss the history of the old bridge and its repair." for i in range(80)]
    bad = [f"buy cheap deal {i} click here free offer best price now" for i in range(80)]
    bad.insert(44, PLANTED)  # a negative training document (key doc44 is not held out) of words no other has
    files = []
    for name, texts in (("good", good), ("bad", bad)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        files.append(str(tmp_path / f"{name}.jsonl"))
    # Keyed by position, not by file path, so the held-out split (a hash of the key) does not depend on tmp_path.
    sources = [(files[0], 1, enumerate_docs(good)), (files[1], 0, enumerate_docs(bad))]
    settings = TrainSettings(FeatureSettings(n_features=1 << 16, passage_chars=200), max_passages_per_source=500)
    trained, _ = train_classifier(sources, settings)
    model = QualityModel.load(trained.save(tmp_path / "q.npz"))
    assert model.crossfit is not None and model.crossfit.folds == 5 and model.crossfits(files[1])
    own = model.fold_of(PLANTED)
    by_fold = [model.passage_probabilities(PLANTED.splitlines()[:1], fold=f)[0] for f in range(5)]
    prior = 1.0 / (1.0 + np.exp(-model.crossfit.intercept))  # a model's score of text with only unknown words
    full = model.score(PLANTED)
    # The full model and every fold model that trained on the planted document have memorised it as negative ...
    assert full < prior[own] - 0.15 and all(by_fold[f] < prior[f] - 0.1 for f in range(5) if f != own), by_fold
    # ... the fold model that did not see it knows none of its words: only its intercept speaks.
    assert by_fold[own] == pytest.approx(prior[own], abs=0.02)
    assert model.score(PLANTED, crossfit=True) == pytest.approx(by_fold[own])
    # `quality score` rates an input that was a training source (same path) by cross-fitting, one line per document
    out = io.StringIO()
    result = quality_score(tmp_path / "q.npz", [files[1]], out)
    assert result["crossfitted_inputs"] == [files[1]] and result["documents"] == len(bad)
    assert json.loads(out.getvalue().splitlines()[44])["score"] == pytest.approx(by_fold[own], abs=1e-4)


def test_threshold_and_pareto_selection() -> None:
    assert keep_document("threshold", 0.6, 0.5, 9.0, 0, 1) and not keep_document("threshold", 0.4, 0.5, 9.0, 0, 1)
    assert keep_document("none", 0.0, 0.5, 9.0, 0, 1)
    hashes = range(1, 5_001)
    for score in (0.3, 0.7):
        kept = [keep_document("pareto", score, 0.5, 9.0, 0, h * 7919) for h in hashes]
        expected = (2.0 - score) ** -9.0  # P(Lomax(alpha) > 1 - score)
        assert abs(np.mean(kept) - expected) < 0.015
        assert kept == [keep_document("pareto", score, 0.5, 9.0, 0, h * 7919) for h in hashes]  # seeded per doc
