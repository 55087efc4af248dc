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
override single fields; values are parsed as TOML (strings may be left unquoted).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparselm.errors import ConfigError
from sparselm.pipeline.filters import FILTERS, expand_filter_names
from sparselm.pipeline.quality import SELECTION_MODES
from sparselm.pipeline.sources import EXTRACTORS, FORMATS


@dataclass
class RunSection:
    out: str = "runs/pipeline"
    seed: int = 0
    workers: int = 2  # processes (local) or dask workers started locally; 0 or 1 = run in this process
    executor: str = "local"  # local | dask
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
    invalid_utf8: str = "reject"  # reject the document | replace bad bytes with U+FFFD


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
    format: str = "auto"  # auto | text | jsonl | parquet | zip
    extractor: str = "auto"  # auto | none | gutenberg | wikiextractor | lines | paragraphs
    text_field: str = "text"
    members: list[str] = field(default_factory=lambda: ["*"])  # zip members to read
    filters: list[str] = field(default_factory=lambda: ["gopher_quality", "gopher_repetition"])
    filter_overrides: dict[str, dict[str, float]] = field(default_factory=dict)  # {name: {min, max}} for this source
    quality: str = "none"  # none | threshold | pareto
    quality_threshold: float = 0.5
    pareto_alpha: float = 9.0  # GPT-3 / GLaM's value
    dedup: bool = True
    weight: float = 0.0  # share of train tokens (normalised over the weighted sources)
    epochs: float = 0.0  # or: every kept document this many times


SECTIONS = {
    "run": RunSection,
    "tokenizer": TokenizerSection,
    "extract": ExtractSection,
    "quality": QualitySection,
    "dedup": DedupSection,
    "mixture": MixtureSection,
}


@dataclass
class PipelineConfig:
    run: RunSection = field(default_factory=RunSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    extract: ExtractSection = field(default_factory=ExtractSection)
    quality: QualitySection = field(default_factory=QualitySection)
    dedup: DedupSection = field(default_factory=DedupSection)
    mixture: MixtureSection = field(default_factory=MixtureSection)
    filters: dict[str, dict[str, float]] = field(default_factory=dict)  # global bound overrides {name: {min, max}}
    sources: list[SourceSection] = field(default_factory=list)

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


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return list(value)
    if origin is dict:
        return _bounds_table(value, where)
    raise ConfigError(f"{where}: unsupported field type {annotation!r}")


def _bounds_table(value: Any, where: str) -> dict[str, dict[str, float]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table {{filter = {{min = .., max = ..}}}}, got {value!r}")
    out: dict[str, dict[str, float]] = {}
    for name, bounds in value.items():
        if name not in FILTERS:
            raise ConfigError(f"{where}.{name}: unknown filter (known: {', '.join(FILTERS)})")
        if not isinstance(bounds, dict):
            raise ConfigError(f"{where}.{name}: expected a table with min and/or max, got {bounds!r}")
        out[name] = {}
        for key, number in bounds.items():
            if key not in ("min", "max"):
                raise ConfigError(f"{where}.{name}.{key}: unknown key (expected min or max)")
            out[name][key] = _coerce(number, float, f"{where}.{name}.{key}")
    return out


def _fill(target: Any, values: Any, where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table of key = value pairs")
    hints = typing.get_type_hints(type(target))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {where}.{key}")
        setattr(target, key, _coerce(value, hints[key], f"{where}.{key}"))


def config_from_dict(raw: dict[str, Any]) -> PipelineConfig:
    cfg = PipelineConfig()
    for section, values in raw.items():
        if section in SECTIONS:
            _fill(getattr(cfg, section), values, section)
        elif section == "filters":
            cfg.filters = _bounds_table(values, "filters")
        elif section == "source":
            if not isinstance(values, list):
                raise ConfigError("source must be an array of tables: write [[source]] for each source")
            for i, table in enumerate(values):
                src = SourceSection()
                _fill(src, table, f"source[{i}]")
                cfg.sources.append(src)
        else:
            known = ", ".join([*SECTIONS, "filters", "source"])
            raise ConfigError(f"unknown config section [{section}] (known: {known})")
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # an unquoted string


def apply_overrides(cfg: PipelineConfig, overrides: list[str]) -> None:
    for item in overrides:
        dotted, sep, text = item.partition("=")
        parts = dotted.strip().split(".")
        if not sep or len(parts) < 2:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        value = _parse_value(text.strip())
        if parts[0] == "source" and len(parts) == 3:
            _fill(cfg.source(parts[1]), {parts[2]: value}, f"source.{parts[1]}")
        elif parts[0] == "filters" and len(parts) == 3:
            merged = {parts[1]: {**cfg.filters.get(parts[1], {}), parts[2]: value}}
            cfg.filters.update(_bounds_table(merged, "filters"))
        elif parts[0] in SECTIONS and len(parts) == 2:
            _fill(getattr(cfg, parts[0]), {parts[1]: value}, parts[0])
        else:
            raise ConfigError(f"--set {item!r}: unknown field {dotted!r}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: PipelineConfig) -> None:
    r, x, q, d, m = cfg.run, cfg.extract, cfg.quality, cfg.dedup, cfg.mixture
    _check(bool(r.out), "run.out must be set")
    _check(r.workers >= 0, f"run.workers must be >= 0, got {r.workers}")
    _check(r.executor in ("local", "dask"), f"run.executor must be local or dask, got {r.executor!r}")
    _check(r.batch_docs >= 1, f"run.batch_docs must be >= 1, got {r.batch_docs}")
    _check(bool(cfg.tokenizer.path), "tokenizer.path must be set")
    _check(x.max_line_bytes >= 1024, f"extract.max_line_bytes must be >= 1024, got {x.max_line_bytes}")
    _check(x.max_document_bytes >= 1024, f"extract.max_document_bytes must be >= 1024, got {x.max_document_bytes}")
    _check(
        x.invalid_utf8 in ("reject", "replace"),
        f"extract.invalid_utf8 must be reject or replace, got {x.invalid_utf8!r}",
    )
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
    _check(bool(cfg.sources), "no [[source]] tables: describe at least one source")
    names = [s.name for s in cfg.sources]
    for i, s in enumerate(cfg.sources):
        where = f"source[{i}]" if not s.name else f"source {s.name!r}"
        _check(bool(s.name), f"{where}.name must be set")
        _check(s.name.replace("-", "").replace("_", "").isalnum(), f"{where}.name may use letters, digits, - and _")
        _check(names.count(s.name) == 1, f"{where}: the name is used by more than one source")
        _check(bool(s.paths), f"{where}.paths must list at least one file, directory or glob")
        _check(s.format in FORMATS, f"{where}.format must be one of {', '.join(FORMATS)}, got {s.format!r}")
        _check(
            s.extractor in EXTRACTORS, f"{where}.extractor must be one of {', '.join(EXTRACTORS)}, got {s.extractor!r}"
        )
        try:
            expand_filter_names(s.filters)
        except ValueError as exc:
            raise ConfigError(f"{where}.filters: {exc}") from None
        _check(s.quality in SELECTION_MODES, f"{where}.quality must be one of {', '.join(SELECTION_MODES)}")
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


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline TOML file; raises ConfigError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline config not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    cfg = config_from_dict(raw)
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg
