"""Quality classifier: separates shared/data's high-quality text from web text, saves without pickle, selects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparselm.pipeline.quality import (
    FeatureSettings,
    QualityModel,
    TrainSettings,
    keep_document,
    passages,
    train_classifier,
)
from sparselm.pipeline.run import source_documents
from sparselm.pipeline.sources import ReadOptions, expand_paths

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "corpus").is_dir(), reason=f"shared data not found at {SHARED}")


def shared_source(pattern: str, **options: object):
    return source_documents(expand_paths([str(SHARED / pattern)]), ReadOptions(**options))


@pytest.fixture(scope="module")
def trained() -> tuple[QualityModel, dict]:
    sources = [
        ("wiki", 1, shared_source("corpus/wiki", extractor="wikiextractor")),
        ("books", 1, shared_source("corpus/books", extractor="gutenberg")),
        ("c4", 0, shared_source("c4-sample/*.json.gz")),
        ("redpajama", 0, shared_source("redpajama-cc-sample/*.jsonl")),
        ("webtext", 0, shared_source("nltk-webtext/webtext.zip", extractor="lines", members=("*.txt",))),
    ]
    return train_classifier(sources, TrainSettings(max_passages_per_source=800, seed=0))


@needs_shared
def test_classifier_separates_books_and_wikipedia_from_web_text_on_held_out_documents(trained) -> None:
    _, metrics = trained
    assert metrics["auc"] >= 0.9, metrics
    assert metrics["precision"] > 0.8 and metrics["recall"] > 0.8, metrics
    per_source = metrics["sources"]
    assert all(per_source[s]["heldout_passages"] > 0 for s in ("wiki", "books", "c4", "webtext"))
    assert per_source["wiki"]["heldout_mean_score"] > 0.5 > per_source["c4"]["heldout_mean_score"]


@needs_shared
def test_saved_model_is_plain_arrays_and_scores_identically(trained, tmp_path: Path) -> None:
    model, _ = trained
    path = model.save(tmp_path / "quality.npz")
    with np.load(path, allow_pickle=False) as data:  # would raise if the file needed unpickling
        assert sorted(data.files) == ["coef", "header", "intercept"]
        assert json.loads(str(data["header"]))["format"] == "sparselm-quality"
    loaded = QualityModel.load(path)
    texts = ["The history of the region begins with the first settlers.", "CLICK HERE buy cheap pills now!!!"]
    assert np.allclose(loaded.score_many(texts), model.score_many(texts))
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


def test_threshold_and_pareto_selection() -> None:
    assert keep_document("threshold", 0.6, 0.5, 9.0, 0, 1) and not keep_document("threshold", 0.4, 0.5, 9.0, 0, 1)
    assert keep_document("none", 0.0, 0.5, 9.0, 0, 1)
    hashes = range(1, 5_001)
    for score in (0.3, 0.7):
        kept = [keep_document("pareto", score, 0.5, 9.0, 0, h * 7919) for h in hashes]
        expected = (2.0 - score) ** -9.0  # P(Lomax(alpha) > 1 - score)
        assert abs(np.mean(kept) - expected) < 0.015
        assert kept == [keep_document("pareto", score, 0.5, 9.0, 0, h * 7919) for h in hashes]  # seeded per doc
