"""``sparselm data ...`` arguments and verb functions; argparse only at import time, so ``--help`` stays instant.

The pipeline modules (numpy, scikit-learn, pyarrow, ...) are imported inside the verb functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def cmd_data_run(args: argparse.Namespace) -> int:
    from sparselm.pipeline.config import load_pipeline_config
    from sparselm.pipeline.run import run_pipeline

    overrides = list(args.overrides)
    for value, field in ((args.workers, "run.workers"), (args.executor, "run.executor"), (args.out, "run.out")):
        if value is not None:
            overrides.append(f"{field}={json.dumps(value)}")
    if args.no_progress:
        overrides.append("run.progress=false")
    cfg = load_pipeline_config(args.config, overrides)
    argv = sys.argv[1:]
    command = "sparselm " + " ".join(argv) if argv[:2] == ["data", "run"] else f"sparselm data run {args.config}"
    summary = run_pipeline(cfg, command=command, report_path=args.report)
    t = summary["totals"]
    print(
        f"{t['input']:,} input documents: {t['kept']:,} kept, {t['filtered']:,} filtered, "
        f"{t['duplicates']:,} duplicates, {t['rejected']:,} rejected"
    )
    for split, info in summary["dataset"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens")
    out = Path(cfg.run.out)
    print(f"token shards: {out / 'tokens'} (set data.path to it); report: {args.report or out / 'report.md'}")
    return 0


def cmd_data_quality_train(args: argparse.Namespace) -> int:
    from sparselm.pipeline.quality_jobs import quality_train

    metrics = quality_train(
        args.positive,
        args.negative,
        args.out,
        config=args.config,
        extractor=args.extractor,
        text_field=args.text_field,
        max_passages=args.max_passages,
        passage_chars=args.passage_chars,
        seed=args.seed,
        folds=args.folds,
    )
    print(
        f"held-out passages: {metrics['heldout_passages']:,}; precision {metrics['precision']:.4f}, "
        f"recall {metrics['recall']:.4f}, ROC AUC {metrics['auc']:.4f}"
    )
    print(f"wrote {args.out} (metrics: {Path(args.out).with_suffix('.json')})")
    return 0


def cmd_data_quality_score(args: argparse.Namespace) -> int:
    from sparselm.pipeline.quality_jobs import quality_score

    options: dict[str, Any] = {"config": args.config, "extractor": args.extractor, "text_field": args.text_field}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            result = quality_score(args.model, args.input, f, **options)
    else:
        result = quality_score(args.model, args.input, **options)
    print(json.dumps(result), file=sys.stderr)
    return 0


def add_data_verbs(verbs: Any) -> None:
    """Add ``data run``, ``data quality train`` and ``data quality score`` to the top-level subparsers."""
    data = verbs.add_parser("data", help="data pipeline: filter, deduplicate, mix and tokenise raw text")
    actions = data.add_subparsers(dest="action", required=True)
    p = actions.add_parser("run", help="run a pipeline config (see configs/pipeline/example.toml)")
    p.add_argument("config", help="pipeline TOML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field: run.workers=1, source.NAME.weight=2, filters.word_count.max=1e6 (repeatable)",
    )
    p.add_argument("--workers", type=int, help="worker processes (overrides run.workers)")
    p.add_argument("--executor", choices=["local", "dask"], help="overrides run.executor")
    p.add_argument("--out", help="output directory (overrides run.out)")
    p.add_argument("--report", help="write the Markdown report here (default OUT/report.md; plots beside it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_run)

    quality = actions.add_parser("quality", help="text quality classifier").add_subparsers(
        dest="quality", required=True
    )
    source_help = "a source name from --config, or a file, directory or glob (repeatable)"
    train = quality.add_parser("train", help="train a classifier: high-quality (positive) vs web (negative) text")
    train.add_argument("--positive", action="append", required=True, help=source_help)
    train.add_argument("--negative", action="append", required=True, help=source_help)
    train.add_argument("--out", required=True, help="model file to write (.npz; metrics to the same name .json)")
    train.add_argument("--max-passages", type=int, default=3000, help="passages sampled per source")
    train.add_argument("--passage-chars", type=int, default=2000)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--folds",
        type=int,
        default=5,
        help="cross-fitting fold models (0 = none): `score` rates a training source's documents with the fold "
        "model that did not see them",
    )
    train.set_defaults(func=cmd_data_quality_train)
    score = quality.add_parser(
        "score",
        help="score documents: one JSON line per document (location, score); an input that is one of the model's "
        "training sources (same name or path) is scored by cross-fitting",
    )
    score.add_argument("--model", required=True, help="a model from `sparselm data quality train`")
    score.add_argument("--input", action="append", required=True, help=source_help)
    score.add_argument("--out", help="write the JSON lines here instead of stdout")
    score.set_defaults(func=cmd_data_quality_score)
    for sub in (train, score):
        sub.add_argument("--config", help="pipeline TOML whose [[source]] names may be used as sources")
        sub.add_argument(
            "--extractor",
            default="auto",
            help="extractor for path sources: auto, none, gutenberg, wikiextractor, lines, paragraphs",
        )
        sub.add_argument("--text-field", default="text", help="JSONL/Parquet field of path sources")
