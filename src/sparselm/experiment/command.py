"""``sparselm experiment moe-vs-dense``: arguments and the verb. Imports nothing heavy at module level (the CLI
builds its parser from here on every start)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The contracts are 90 minutes (default) and 10 (--quick) on 2 cores; the budgets leave room for the planner's
# estimate running short (docs/moe-vs-dense-design.md).
DEFAULT_BUDGET_MINUTES = 80.0
QUICK_BUDGET_MINUTES = 6.0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(exp: argparse._SubParsersAction) -> None:
    from sparselm.config import PRECISIONS

    p = exp.add_parser(
        "moe-vs-dense",
        help="a dense frontier of finished runs vs the seed systems' MoE recipes, over seeds: compute-saving factor",
    )
    p.add_argument("--data", action="append", default=[], help="text/JSONL file or directory (repeatable; default: "
                   "the embedded corpus)")  # fmt: skip
    p.add_argument("--out", default="runs/moe-vs-dense", help="experiment directory (data, runs, results.json)")
    p.add_argument("--report", help="report path (default OUT/moe-vs-dense.md; plots go to a folder beside it)")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=0,
        help=f"wall-time budget (default {DEFAULT_BUDGET_MINUTES:.0f}, --quick {QUICK_BUDGET_MINUTES:.0f})",
    )
    p.add_argument("--quick", action="store_true", help="tiny models and budget: checks the whole pipeline")
    p.add_argument("--steps", type=int, default=0, help="full budget B in steps (default: chosen from the budget)")
    p.add_argument("--search-steps", type=int, default=0, help="steps per search run (default: from the budget)")
    p.add_argument("--regimes", type=_names, default=(), help="candidate regimes (default the small "
                   "ones; one skips the search)")  # fmt: skip
    p.add_argument("--recipes", type=_names, default=("switch", "gshard", "deepspeed"), help="MoE recipes compared")
    p.add_argument("--experts", type=_int_list, default=(4, 64), help="numbers of experts swept with the best recipe")
    p.add_argument("--seeds", type=int, default=3, help="seeds of dense-S and the best recipe at the full budget")
    p.add_argument("--other-seeds", type=int, default=2, help="seeds of every other run")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary")
    p.add_argument("--val-fraction", type=float, default=0.02, help="fraction of documents held out for validation")
    p.add_argument("--eval-batches", type=int, default=0, help="validation batches per point (default 16, quick 4)")
    p.add_argument(
        "--moe-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change every MoE run's recipe, e.g. --moe-set moe.aux_loss_coef=0.1",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="BASE:SECTION.KEY=VALUE[,...]",
        help="also train BASE (a recipe: switch, gshard, deepspeed; or dense-XS/S/M) at the full budget with changed "
        "settings, --other-seeds seeds (repeatable; rerun a finished --out to add variants)",
    )
    p.add_argument("--jobs", type=int, default=0, help="runs trained at once, each in its own process (default: "
                   "one per core, at most 4)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads of each run (default: the cores shared out "
                   "among the jobs)")  # fmt: skip
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="compute precision of every run (default "
                   "auto: bf16 where this machine computes it natively, else fp32)")  # fmt: skip
    p.set_defaults(func=run)

    p = exp.add_parser("retro", help="baseline vs RETRO (dense and MoE): bits per byte, report")
    p.add_argument("--data", action="append", default=[], help="text folder(s) (default ../shared/data/corpus)")
    p.add_argument("--other", action="append", default=[], help="text folder(s) of the database that excludes "
                   "the training set (default ../shared/data/gutenberg-nltk)")  # fmt: skip
    p.add_argument("--out", default="runs/retro", help="experiment directory")
    p.add_argument("--report", help="report path (default OUT/retro.md)")
    p.add_argument("--quick", action="store_true", help="small data and models: the whole pipeline in minutes")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.set_defaults(func=run_retro)


def run(args: argparse.Namespace) -> int:
    import shlex

    from sparselm.experiment.moe_vs_dense import ExperimentOptions, run_experiment
    from sparselm.experiment.plan import Layout

    data = [Path(p) for p in args.data]
    if not data:
        from sparselm.corpus import default_corpus_files

        data = default_corpus_files()
        print(f"no --data given: using the embedded default corpus ({len(data)} books)", file=sys.stderr)
    opts = ExperimentOptions(
        data=data,
        out=Path(args.out),
        report=Path(args.report) if args.report else None,
        budget_minutes=args.budget_minutes or (QUICK_BUDGET_MINUTES if args.quick else DEFAULT_BUDGET_MINUTES),
        quick=args.quick,
        steps=args.steps,
        search_steps=args.search_steps,
        regimes=args.regimes,
        layout=Layout(
            seeds=args.seeds,
            other_seeds=args.other_seeds,
            recipes=args.recipes,
            sweep_experts=args.experts,
            variants=args.variant,
            moe_overrides=args.moe_set,
        ),
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        eval_batches=args.eval_batches or (4 if args.quick else 16),
        threads=args.threads,
        jobs=args.jobs or min(4, os.cpu_count() or 1),
        precision=args.precision,
        command="sparselm " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    results = run_experiment(opts)
    print(f"wrote {results['report']} (data and runs in {opts.out})")
    return 0


def run_retro(args: argparse.Namespace) -> int:
    import shlex

    from sparselm.experiment.retro import RetroExperiment, run_experiment

    opts = RetroExperiment(
        data=[Path(p) for p in args.data] or [Path("../shared/data/corpus")],
        out=Path(args.out),
        report=Path(args.report) if args.report else None,
        other=[Path(p) for p in args.other],
        quick=args.quick,
        threads=args.threads,
        precision=args.precision,
        command="sparselm " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    result = run_experiment(opts)
    print(f"wrote {result['report']} (data, databases and runs in {opts.out})")
    return 0
