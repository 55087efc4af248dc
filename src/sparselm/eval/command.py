"""``sparselm eval``: arguments and the verb itself. Imports nothing heavy at module level (the CLI builds its parser
from here on every start)."""

from __future__ import annotations

import argparse
import json
import sys

from sparselm.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="run directory or checkpoint directory to evaluate")
    p.add_argument(
        "--tasks",
        default="",
        help="comma-separated built-in task names and/or task files (.toml/.yaml), e.g. lambada,piqa,my_task.toml",
    )
    p.add_argument("--shots", type=int, default=0, help="demonstrations per example (default 0: zero-shot)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N usable examples of each task")
    p.add_argument(
        "--data-dir", default=None, help="folder holding the task data (default: $SPARSELM_EVAL_DATA or ../shared/data)"
    )
    p.add_argument(
        "--out", default=None, help="output folder (default: RUN/eval for --ckpt, eval_compare for --compare)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draws")
    p.add_argument("--stride", type=int, default=0, help="perplexity: new tokens per window (default: max_seq_len)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN_OR_JSON",
        help="compare evaluated checkpoints (run dirs or results JSON files): one table and a bar plot (PNG)",
    )
    p.add_argument("--list", action="store_true", help="list the built-in tasks")


def run(args: argparse.Namespace, make_scorer=None, extra_meta: dict | None = None) -> int:
    """``make_scorer`` and ``extra_meta``: see ``run_eval`` (the CLI passes RETRO's for ``--retro-db``)."""
    if args.list:
        from sparselm.eval.tasks import builtin_tasks, load_task

        for name in builtin_tasks():
            spec = load_task(name)
            print(f"{name:14s} {spec.kind:16s} {spec.description}")
        return 0
    if args.compare:
        from sparselm.eval.compare import run_compare

        return run_compare(args.compare, args.shots, args.out or "eval_compare", args.json)
    if not args.ckpt or not args.tasks:
        raise InputError("sparselm eval needs --ckpt and --tasks (or --compare RUN ..., or --list)")
    from sparselm.eval.harness import format_table, run_eval

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results, meta, (json_path, md_path) = run_eval(
        args.ckpt,
        tasks,
        data_dir=args.data_dir,
        shots=args.shots,
        limit=args.limit,
        batch_size=args.batch_size,
        precision=args.precision,
        seed=args.seed,
        stride=args.stride,
        out_dir=args.out,
        progress=not args.no_progress,
        make_scorer=make_scorer,
        extra_meta=extra_meta,
    )
    if args.json:
        print(json.dumps(json.loads(json_path.read_text(encoding="utf-8"))))
    else:
        print(format_table(results))
        print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0
