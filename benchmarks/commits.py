"""The same benchmark at two commits, side by side in one run: is a refactor within noise of what it replaced?

Checks out OLD (and NEW, if given; else the working tree) into temporary worktrees, then runs OLD's and NEW's
copy of one benchmark script in alternating rounds (old, new, old, new, ...), each in a fresh process that imports
its own tree's sparselm.
Every ``--json`` row of the benchmark that carries METRIC is matched across the two sides by KEY fields; the table
gives the median of each side and the median of the per-round ratios new/old with its range.

    python benchmarks/commits.py --old 196a05a [--new 7f9462e] --script train.py --metric tokens_per_sec \
        --key config,precision --rounds 3 -- --quick --cases default-moe
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_side(tree: Path, script: str, args: list[str], metric: str, key: list[str]) -> dict[tuple, float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    cmd = [sys.executable, str(tree / "benchmarks" / script), "--json", *args]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {tree}:\n{done.stderr[-2000:]}")
    rows = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if metric in row:
                rows[tuple(row.get(k) for k in key)] = float(row[metric])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="git revision to compare against")
    ap.add_argument("--new", default=None, help="git revision to compare (default: the working tree)")
    ap.add_argument("--script", required=True, help="benchmark file name under benchmarks/ (in both trees)")
    ap.add_argument("--metric", required=True, help="numeric field of the --json rows to compare")
    ap.add_argument("--key", default="", help="comma-separated fields that identify a row")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then the benchmark's own arguments")
    opts = ap.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    key = [k for k in opts.key.split(",") if k]
    with tempfile.TemporaryDirectory(prefix="sparselm-commits-") as tmp:
        trees = {"old": Path(tmp) / "old", "new": Path(tmp) / "new" if opts.new else REPO}
        for name, rev in (("old", opts.old), ("new", opts.new)):
            if rev:
                add = ["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(trees[name]), rev]
                subprocess.run(add, check=True)
        try:
            sides: dict[str, list[dict[tuple, float]]] = {"old": [], "new": []}
            for r in range(opts.rounds):
                for name, tree in trees.items():
                    sides[name].append(run_side(tree, opts.script, args, opts.metric, key))
                    print(f"round {r + 1}/{opts.rounds} {name} done", file=sys.stderr, flush=True)
        finally:
            for tree in trees.values():
                if tree != REPO:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    load = os.getloadavg()[0]
    new = opts.new or "working tree"
    print(f"{opts.script} {' '.join(args)}: {opts.metric}, old = {opts.old}, new = {new}, {opts.rounds} rounds")
    print(f"| {' | '.join(key) or 'row'} | old (median) | new (median) | new/old: median of rounds (range) | rounds |")
    print("|" + "---|" * (max(len(key), 1) + 4))
    for row in sides["new"][0]:
        olds = [s.get(row) for s in sides["old"]]
        news = [s.get(row) for s in sides["new"]]
        if None in olds or None in news:
            continue
        ratios = [n / o for n, o in zip(news, olds, strict=True)]
        label = " | ".join(str(v) for v in row) or "-"
        print(
            f"| {label} | {statistics.median(olds):.4g} | {statistics.median(news):.4g} | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
            f"{', '.join(f'{r:.3f}' for r in ratios)} |"
        )
    print(f"1-minute load average at the end: {load:.1f}")


if __name__ == "__main__":
    main()
