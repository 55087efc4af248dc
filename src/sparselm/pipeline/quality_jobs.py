"""The work behind ``sparselm data quality train|score``: resolving sources named on the command line.

A source argument is either the name of a ``[[source]]`` in ``--config`` (read with that source's format, extractor
and text field) or a file, directory or glob read with the command-line ``--extractor``/``--text-field``.

``score`` scores an input that is one of the model's own training sources (the same name or path spec as given to
``train``) by cross-fitting: each document by the fold model that did not see it (see ``sparselm.pipeline.quality``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from sparselm.pipeline.config import PipelineConfig, load_pipeline_config
from sparselm.pipeline.quality import FeatureSettings, QualityModel, TrainSettings, train_classifier
from sparselm.pipeline.run import read_options, source_documents
from sparselm.pipeline.sources import ReadOptions, expand_paths


def resolve_source(
    spec: str, cfg: PipelineConfig | None, extractor: str, text_field: str
) -> tuple[str, list[Path], ReadOptions]:
    """(display name, files, read options) of a source given by config name or by path."""
    if cfg is not None and any(s.name == spec for s in cfg.sources):
        src = cfg.source(spec)
        return spec, expand_paths(src.paths), read_options(cfg, src)
    return spec, expand_paths([spec]), ReadOptions(extractor=extractor, text_field=text_field)


def quality_train(
    positive: list[str],
    negative: list[str],
    out: str | Path,
    *,
    config: str | None = None,
    extractor: str = "auto",
    text_field: str = "text",
    max_passages: int = 3000,
    passage_chars: int = 2000,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    folds: int = 5,
    workers: int = 1,
) -> dict[str, Any]:
    """Train, save to ``out`` (plus ``out`` with .json: the metrics) and return the held-out metrics."""
    cfg = load_pipeline_config(config) if config else None
    sources = []
    for label, specs in ((1, positive), (0, negative)):
        for spec in specs:
            name, files, options = resolve_source(spec, cfg, extractor, text_field)
            sources.append((name, label, source_documents(files, options)))
    settings = TrainSettings(
        FeatureSettings(passage_chars=passage_chars), max_passages, holdout_fraction, seed=seed, folds=folds
    )
    model, metrics = train_classifier(sources, settings, workers=workers)
    path = model.save(out)
    path.with_suffix(".json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    return metrics


def _scored(
    model: QualityModel, docs: Iterator[tuple[str, str]], crossfit: bool, batch: int = 256
) -> Iterator[tuple[str, float]]:
    pending: list[tuple[str, str]] = []

    def flush() -> Iterator[tuple[str, float]]:
        scores = model.score_many([t for _, t in pending], crossfit).tolist()
        yield from zip([k for k, _ in pending], scores, strict=True)
        pending.clear()

    for item in docs:
        pending.append(item)
        if len(pending) >= batch:
            yield from flush()
    if pending:
        yield from flush()


def quality_score(
    model_path: str | Path,
    inputs: list[str],
    out: TextIO | None = None,
    *,
    config: str | None = None,
    extractor: str = "auto",
    text_field: str = "text",
) -> dict[str, Any]:
    """Write one JSON line per document (``location``, ``score``) to ``out``; return count, mean, histogram and the
    inputs that were the model's training sources, scored by cross-fitting."""
    model = QualityModel.load(model_path)
    cfg = load_pipeline_config(config) if config else None
    out = out if out is not None else sys.stdout
    scores: list[float] = []
    crossfitted = []
    for spec in inputs:
        name, files, options = resolve_source(spec, cfg, extractor, text_field)
        if model.crossfits(name):
            crossfitted.append(name)
        for location, score in _scored(model, source_documents(files, options), model.crossfits(name)):
            out.write(json.dumps({"location": location, "score": round(score, 4)}) + "\n")
            scores.append(score)
    hist, _ = np.histogram(scores, bins=10, range=(0.0, 1.0))
    return {
        "documents": len(scores),
        "mean": round(float(np.mean(scores)), 4) if scores else None,
        "histogram_deciles": hist.tolist(),
        "crossfitted_inputs": crossfitted,
    }
