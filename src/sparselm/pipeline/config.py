"""Pipeline configuration: typed dataclasses loaded from TOML, validated with one-line errors naming the field.

A config has a few singleton sections and one ``[[source]]`` table per source (see configs/pipeline/example.toml)::

    [run]        out, seed, workers, executor ("local" | "dask"), dask_address, progress, batch_docs
    [tokenizer]  path                               the SentencePiece model used for the token shards
    [extract]    max_line_bytes, max_document_bytes, invalid_utf8 ("reject" | "replace")
    [filters.NAME]  min, max                        bounds of a Gopher filter (defaults: the paper's values)
    [quality]    model, positive, negative, ...     the classifier: a saved model, or sources to train one from
    [dedup]      exact, near, ngram, num_perm, threshold
    [mixture]    total_tokens, val_fraction, max_epochs, shard_tokens
    [[source]]   name, paths, format, extractor, text_field, members, filters, filter_overrides,
                 quality ("none" | "threshold" | "pareto"), quality_threshold, pareto_alpha, dedup, weight | epochs

Relative paths (source paths, tokenizer, model, out) are relative to the working directory, like every other
sparselm config. ``--set section.key=value``, ``--set source.NAME.key=value`` and ``--set filters.NAME.max=value``
override single fields. Loading is ``sparselm.config_loader``'s, the same as the training config's: each value must
have its field's type (``true``/``false``, numbers unquoted, a choice field one of its listed values), and a
``--set`` value is read as TOML (``--set source.c4.weight=0.4``, ``--set quality.positive=["books"]``), with text
that is not TOML taken as an unquoted string (``--set run.out=runs/x``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

from sparselm import config_loader
from sparselm.data.documents import InvalidUtf8
from sparselm.errors import ConfigError
from sparselm.pipeline.filters import FILTERS, expand_filter_names
from sparselm.pipeline.quality import SelectionMode
from sparselm.pipeline.sources import Extractor, Format

Executor = Literal["local", "dask"]


class Bounds(TypedDict, total=False):
    """Bounds of one Gopher filter; a missing key keeps the value below it (paper default < [filters.X] < source)."""

    min: float
    max: float


@dataclass
class RunSection:
    out: str = "runs/pipeline"
    seed: int = 0
    workers: int = 2  # processes (local) or dask workers started locally; 0 or 1 = run in this process
    executor: Executor = "local"
    dask_address: str = ""  # an existing dask scheduler, e.g. "tcp://10.0.0.5:8786"; "" = a local dask cluster
    progress: bool = True
    batch_docs: int = 256  # documents tokenised and scored per call inside a worker


@dataclass
class TokenizerSection:
    path: str = "data_cache/tokenizer.model"


@dataclass
class ExtractSection:
    max_line_bytes: int = 1 << 20  # longer lines are rejected (minified or binary data), never held in memory
    max_document_bytes: int = 32 << 20
    invalid_utf8: InvalidUtf8 = "reject"  # reject the document | replace bad bytes with U+FFFD


@dataclass
class QualitySection:
    model: str = ""  # a saved model (.npz); empty = train one in the run into OUT/quality.npz
    positive: list[str] = field(default_factory=list)  # source names: high-quality text (books, Wikipedia)
    negative: list[str] = field(default_factory=list)  # source names: typical web text
    max_passages_per_source: int = 3000
    holdout_fraction: float = 0.2
    passage_chars: int = 2000
    ngram_max: int = 2
    n_features: int = 1 << 20
    c: float = 1.0
    folds: int = 5  # cross-fitting: the training sources' documents are scored by fold models that did not see them


@dataclass
class DedupSection:
    exact: bool = True
    near: bool = True
    ngram: int = 5  # words per shingle
    num_perm: int = 128
    threshold: float = 0.8  # estimated Jaccard similarity at or above which two documents are near duplicates


@dataclass
class MixtureSection:
    total_tokens: int = 0  # train tokens to produce; 0 = the kept tokens of the weighted sources (re-weight only)
    val_fraction: float = 0.01  # documents held out for validation, per source, by a seeded hash of the text
    max_epochs: float = 10.0  # a weighted source is never repeated more than this many times
    shard_tokens: int = 50_000_000


@dataclass
class SourceSection:
    name: str = ""
    paths: list[str] = field(default_factory=list)  # files, directories or globs (``**`` allowed)
    format: Format = "auto"
    extractor: Extractor = "auto"
    text_field: str = "text"
    members: list[str] = field(default_factory=lambda: ["*"])  # zip members to read
    filters: list[str] = field(default_factory=lambda: ["gopher_quality", "gopher_repetition"])
    filter_overrides: dict[str, Bounds] = field(default_factory=dict)  # {filter name: {min, max}} for this source
    quality: SelectionMode = "none"
    quality_threshold: float = 0.5
    pareto_alpha: float = 9.0  # GPT-3 / GLaM's value
    dedup: bool = True
    weight: float = 0.0  # share of train tokens (normalised over the weighted sources)
    epochs: float = 0.0  # or: every kept document this many times


@dataclass
class PipelineConfig:
    run: RunSection = field(default_factory=RunSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    extract: ExtractSection = field(default_factory=ExtractSection)
    quality: QualitySection = field(default_factory=QualitySection)
    dedup: DedupSection = field(default_factory=DedupSection)
    mixture: MixtureSection = field(default_factory=MixtureSection)
    filters: dict[str, Bounds] = field(default_factory=dict)  # global bound overrides {filter name: {min, max}}
    sources: list[SourceSection] = field(default_factory=list, metadata={config_loader.NAME_KEY: "source"})

    def source(self, name: str) -> SourceSection:
        for src in self.sources:
            if src.name == name:
                return src
        raise ConfigError(f"no source named {name!r} (sources: {', '.join(s.name for s in self.sources)})")

    def bounds(self, src: SourceSection) -> list[tuple[str, float | None, float | None]]:
        """(filter, min, max) for every filter of ``src``, in order: paper default < [filters.X] < source override."""
        out = []
        for name in expand_filter_names(src.filters):
            spec = FILTERS[name]
            merged = {
                "min": spec.min,
                "max": spec.max,
                **self.filters.get(name, {}),
                **src.filter_overrides.get(name, {}),
            }
            lo, hi = merged["min"], merged["max"]
            out.append(
                (name, None if lo is None or lo == -math.inf else lo, None if hi is None or hi == math.inf else hi)
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_dict(raw: dict[str, Any]) -> PipelineConfig:
    """Build a PipelineConfig from nested dicts (as parsed from TOML); unknown sections or keys are errors."""
    return config_loader.fill(PipelineConfig(), raw)


def apply_overrides(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """Apply ``section.key=value``, ``source.NAME.key=value`` and ``filters.NAME.min=value`` strings in order."""
    return config_loader.apply_overrides(cfg, overrides)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: PipelineConfig) -> None:
    """Check every field and every relation between fields; raise ConfigError naming the first problem."""
    config_loader.check(cfg)  # types and choice fields, as the loader checks them
    r, x, q, d, m = cfg.run, cfg.extract, cfg.quality, cfg.dedup, cfg.mixture
    _check(bool(r.out), "run.out must be set")
    _check(r.workers >= 0, f"run.workers must be >= 0, got {r.workers}")
    _check(r.batch_docs >= 1, f"run.batch_docs must be >= 1, got {r.batch_docs}")
    _check(bool(cfg.tokenizer.path), "tokenizer.path must be set")
    _check(x.max_line_bytes >= 1024, f"extract.max_line_bytes must be >= 1024, got {x.max_line_bytes}")
    _check(x.max_document_bytes >= 1024, f"extract.max_document_bytes must be >= 1024, got {x.max_document_bytes}")
    _check(d.ngram >= 1, f"dedup.ngram must be >= 1, got {d.ngram}")
    _check(d.num_perm >= 8, f"dedup.num_perm must be >= 8, got {d.num_perm}")
    _check(0.0 < d.threshold <= 1.0, f"dedup.threshold must be in (0, 1], got {d.threshold}")
    _check(m.total_tokens >= 0, f"mixture.total_tokens must be >= 0, got {m.total_tokens}")
    _check(0.0 <= m.val_fraction < 1.0, f"mixture.val_fraction must be in [0, 1), got {m.val_fraction}")
    _check(m.max_epochs > 0, f"mixture.max_epochs must be > 0, got {m.max_epochs}")
    _check(m.shard_tokens >= 1, f"mixture.shard_tokens must be >= 1, got {m.shard_tokens}")
    _check(0.0 < q.holdout_fraction < 1.0, f"quality.holdout_fraction must be in (0, 1), got {q.holdout_fraction}")
    _check(q.max_passages_per_source >= 10, "quality.max_passages_per_source must be >= 10")
    _check(q.passage_chars >= 100, f"quality.passage_chars must be >= 100, got {q.passage_chars}")
    _check(q.ngram_max >= 1 and q.n_features >= 1024, "quality.ngram_max must be >= 1 and quality.n_features >= 1024")
    _check(q.c > 0, f"quality.c must be > 0, got {q.c}")
    _check(q.folds == 0 or 2 <= q.folds <= 20, f"quality.folds must be 0 (off) or in [2, 20], got {q.folds}")
    _check_filter_names(cfg.filters, "filters")
    _check(bool(cfg.sources), "no [[source]] tables: describe at least one source")
    names = [s.name for s in cfg.sources]
    for i, s in enumerate(cfg.sources):
        where = f"source.{s.name}" if s.name else f"source[{i}]"
        _check(bool(s.name), f"{where}.name must be set")
        _check(s.name.replace("-", "").replace("_", "").isalnum(), f"{where}.name may use letters, digits, - and _")
        _check(names.count(s.name) == 1, f"{where}: the name is used by more than one source")
        _check(bool(s.paths), f"{where}.paths must list at least one file, directory or glob")
        _check_filter_names(s.filter_overrides, f"{where}.filter_overrides")
        try:
            expand_filter_names(s.filters)
        except ValueError as exc:
            raise ConfigError(f"{where}.filters: {exc}") from None
        _check(0.0 <= s.quality_threshold <= 1.0, f"{where}.quality_threshold must be in [0, 1]")
        _check(s.pareto_alpha > 0, f"{where}.pareto_alpha must be > 0, got {s.pareto_alpha}")
        _check(s.weight >= 0 and s.epochs >= 0, f"{where}: weight and epochs must be >= 0")
        _check((s.weight > 0) != (s.epochs > 0), f"{where}: set exactly one of weight (share of tokens) or epochs")
    for side in ("positive", "negative"):
        for name in getattr(q, side):
            _check(name in names, f"quality.{side}: {name!r} is not a source name (sources: {', '.join(names)})")
    if any(s.quality != "none" for s in cfg.sources) and not q.model:
        _check(
            bool(q.positive) and bool(q.negative),
            "quality.model is empty and quality.positive/negative are not both set: no classifier to select with",
        )


def _check_filter_names(bounds: dict[str, Bounds], where: str) -> None:
    for name in bounds:
        _check(name in FILTERS, f"{where}.{name}: unknown filter (known: {', '.join(FILTERS)})")


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline TOML file; raises ConfigError with a one-line message."""
    cfg = config_from_dict(config_loader.read_toml(path))
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg
