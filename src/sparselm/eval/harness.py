"""Run tasks against a model: build the requests of each task kind, score them, aggregate metrics, write reports.

Few-shot prompts (``shots=k``): k demonstrations, each an example solved (context + delimiter + gold answer),
joined by the task's ``fewshot_delimiter`` and placed before the scored example's context. They are drawn with a
seed that depends only on ``seed``, the task name and the example's index, so an example gets the same
demonstrations whatever ``limit`` is. The pool is the task's ``fewshot_data`` when it has one, else its own
examples minus the scored one. Perplexity tasks take no demonstrations.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from sparselm.errors import InputError
from sparselm.eval import metrics as M
from sparselm.eval.formats import Example, load_examples
from sparselm.eval.loglik import Scorer
from sparselm.eval.tasks import TaskSpec

SCHEMA = "sparselm-eval/1"


@dataclass
class TaskResult:
    task: str
    kind: str
    metrics: dict[str, dict]  # name -> {"value": float, "stderr": float | None}
    n: int  # examples scored
    shots: int
    records: int = 0  # records in the data file
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> records of the file that are unusable
    too_long: int = 0  # examples (within --limit) not scored: a continuation does not fit the model
    truncated: int = 0  # examples whose context was cut on the left to fit the model
    seconds: float = 0.0
    description: str = ""


def fewshot_prefix(spec: TaskSpec, example: Example, pool: list[Example], own_pool: bool, shots: int, seed: int) -> str:
    if shots <= 0:
        return ""
    rng = random.Random(f"{seed}:{spec.name}:{example.index}")  # str seeds hash deterministically across runs
    picks = rng.sample(range(len(pool)), min(len(pool), shots + 1))
    demos = [pool[i] for i in picks if not (own_pool and pool[i].index == example.index)][:shots]
    if len(demos) < shots:
        raise InputError(f"task {spec.name!r}: {shots} demonstrations requested but the pool has only {len(demos)}")
    return spec.fewshot_delimiter.join(d.demo for d in demos) + spec.fewshot_delimiter


class _Progress:
    """Counts finished requests per example and advances the bar when an example's last request is done."""

    def __init__(self, bar: tqdm, owners: list[int], n_examples: int) -> None:
        self.bar, self.owners = bar, owners
        self.remaining = [0] * n_examples
        for o in owners:
            self.remaining[o] += 1

    def __call__(self, request: int) -> None:
        owner = self.owners[request]
        self.remaining[owner] -= 1
        if self.remaining[owner] == 0:
            self.bar.update(1)


def _metric(value: float, stderr: float | None = None) -> dict:
    return {"value": value, "stderr": stderr}


def evaluate_task(
    scorer: Scorer,
    spec: TaskSpec,
    data_dir: Path | None,
    shots: int = 0,
    limit: int = 0,
    seed: int = 1234,
    stride: int = 0,
    progress: bool = True,
) -> TaskResult:
    """Score one task; ``limit`` > 0 keeps the first ``limit`` usable examples."""
    start = time.perf_counter()
    too_long = 0
    data = load_examples(spec, data_dir)
    examples = data.examples[:limit] if limit > 0 else data.examples
    skipped = dict(data.skipped)
    if not examples:
        reasons = ", ".join(f"{n} x {r}" for r, n in skipped.items()) or "the file holds no records"
        raise InputError(f"task {spec.name!r}: no usable examples ({reasons})")
    if spec.kind == "perplexity":
        shots = 0
    own_pool = not spec.fewshot_data
    pool = data.examples if own_pool else load_examples(spec, data_dir, "fewshot_data").examples
    prefixes = [fewshot_prefix(spec, ex, pool, own_pool, shots, seed) for ex in examples]

    bar = tqdm(total=len(examples), desc=spec.name, unit="ex", disable=not progress)
    try:
        if spec.kind == "generate":
            scored, truncated = _run_generate(scorer, spec, examples, prefixes, bar)
        elif spec.kind == "perplexity":
            scored, truncated = _run_perplexity(scorer, examples, stride, bar)
        else:
            scored, truncated, too_long = _run_loglik(scorer, spec, examples, prefixes, bar)
    finally:
        bar.close()
    if not scored[0]:
        raise InputError(f"task {spec.name!r}: no example fits the model's context")
    return TaskResult(
        spec.name,
        spec.kind,
        {m: scored[1][m] for m in spec.metrics},
        scored[0],
        shots,
        data.records,
        skipped,
        too_long,
        truncated,
        time.perf_counter() - start,
        spec.description,
    )


def _run_loglik(scorer: Scorer, spec: TaskSpec, examples: list[Example], prefixes: list[str], bar: tqdm):
    """multiple_choice, partial and last_word: one log-likelihood request per (context, continuation) option."""
    pairs, owners = [], []
    delim = "" if spec.kind == "last_word" else spec.target_delimiter
    for e, (ex, prefix) in enumerate(zip(examples, prefixes, strict=True)):
        if spec.kind == "partial":
            options = [(prefix + ctx, delim + ex.continuations[0]) for ctx in ex.contexts]
        else:
            options = [(prefix + ex.contexts[0], delim + choice) for choice in ex.continuations]
        pairs += options
        owners += [e] * len(options)
    results = scorer.loglikelihood_text(pairs, _Progress(bar, owners, len(examples)))
    per_example: list[list] = [[] for _ in examples]
    for owner, result in zip(owners, results, strict=True):
        per_example[owner].append(result)
    acc, acc_norm, lls, truncated, too_long = [], [], [], 0, 0
    for ex, scores in zip(examples, per_example, strict=True):
        if not all(s.ok for s in scores):
            too_long += 1
            continue
        truncated += any(s.truncated for s in scores)
        if spec.kind == "last_word":
            acc.append(float(scores[0].is_greedy))
            lls.append(scores[0].logprob)
            continue
        logprobs = [s.logprob for s in scores]
        if spec.kind == "partial":
            acc.append(float(M.argmax(logprobs) == ex.gold))
            continue
        pred, pred_norm = M.choice_predictions(logprobs, ex.continuations)
        acc.append(float(pred == ex.gold))
        acc_norm.append(float(pred_norm == ex.gold))
    out = {}
    if acc:
        out["acc"] = _metric(*M.mean_stderr(acc))
    if acc_norm:
        out["acc_norm"] = _metric(*M.mean_stderr(acc_norm))
    if lls:
        out["perplexity"] = _metric(*M.example_perplexity(lls))
    return (len(acc), out), truncated, too_long


def _run_generate(scorer: Scorer, spec: TaskSpec, examples: list[Example], prefixes: list[str], bar: tqdm):
    prompts = [prefix + ex.contexts[0] for ex, prefix in zip(examples, prefixes, strict=True)]
    outputs = scorer.generate_until(prompts, spec.until, spec.max_gen_tokens, lambda i: bar.update(1))
    em = [M.exact_match(text, ex.answers) for ex, (text, _) in zip(examples, outputs, strict=True)]
    f1 = [M.token_f1(text, ex.answers) for ex, (text, _) in zip(examples, outputs, strict=True)]
    truncated = sum(1 for _, dropped in outputs if dropped)
    return (len(em), {"em": _metric(*M.mean_stderr(em)), "f1": _metric(*M.mean_stderr(f1))}), truncated


def _run_perplexity(scorer: Scorer, examples: list[Example], stride: int, bar: tqdm):
    totals = scorer.rolling([ex.contexts[0] for ex in examples], stride, lambda i: bar.update(1))
    logprob = math.fsum(t[0] for t in totals)
    tokens = sum(t[1] for t in totals)
    words = sum(M.count_words(ex.original) for ex in examples)
    n_bytes = sum(M.count_bytes(ex.original) for ex in examples)
    values = M.corpus_perplexities(logprob, tokens, words, n_bytes)
    # Corpus-level ratios have no per-example standard error here (lm-eval reports none either).
    return (len(examples), {k: _metric(v) for k, v in values.items()}), 0


def default_out_dir(ckpt: Path) -> Path:
    """RUN/eval for a checkpoint inside RUN/checkpoints/, else an eval/ folder inside the checkpoint itself."""
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "eval"
    return ckpt / "eval"


def run_eval(
    ckpt: str | Path,
    tasks: list[str],
    data_dir: str | Path | None = None,
    shots: int = 0,
    limit: int = 0,
    batch_size: int = 16,
    precision: str = "fp32",
    seed: int = 1234,
    stride: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
    make_scorer: Callable[..., Scorer] | None = None,
    extra_meta: dict | None = None,
) -> tuple[list[TaskResult], dict, tuple[Path, Path]]:
    """Load a checkpoint, score every task, write JSON + Markdown. Returns (results, meta, (json, md) paths).
    ``make_scorer(model, tokenizer, ckpt_dir, batch_size=, precision=)`` builds another scorer than ``Scorer``
    (RETRO's retrieves while scoring); ``extra_meta`` goes into the results' meta."""
    from datetime import UTC, datetime

    from sparselm.checkpoint.files import resolve_checkpoint
    from sparselm.checkpoint.inference import load_checkpoint
    from sparselm.eval.tasks import load_task, resolve_data_dir

    if shots < 0 or limit < 0:
        raise InputError(f"--shots and --limit must be >= 0, got {shots}, {limit}")
    specs = [load_task(t) for t in tasks]  # fail on a bad task name before loading anything heavy
    if len({s.name for s in specs}) != len(specs):
        raise InputError(f"a task is listed twice: {', '.join(s.name for s in specs)}")
    data = resolve_data_dir(data_dir)
    ckpt_dir = resolve_checkpoint(ckpt)
    model, _, tokenizer = load_checkpoint(ckpt_dir)
    if make_scorer is not None:
        scorer = make_scorer(model, tokenizer, ckpt_dir, batch_size=batch_size, precision=precision)
    else:
        scorer = Scorer(model, tokenizer, batch_size=batch_size, precision=precision)
    results = [evaluate_task(scorer, s, data, shots, limit, seed, stride, progress) for s in specs]
    step = None
    state = ckpt_dir / "trainer_state.json"
    if state.is_file():
        step = json.loads(state.read_text(encoding="utf-8")).get("step")
    meta = {
        "checkpoint": str(ckpt_dir),
        "step": step,
        "shots": shots,
        "limit": limit,
        "precision": precision,
        "seed": seed,
        "stride": stride or model.cfg.max_seq_len,
        "max_seq_len": model.cfg.max_seq_len,
        "data_dir": str(data),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    meta.update(extra_meta or {})
    paths = write_reports(results, out_dir or default_out_dir(ckpt_dir), meta)
    return results, meta, paths


# ------------------------------------------------------------------------------------------------------ reports
def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def table_rows(results: list[TaskResult]) -> list[list[str]]:
    rows = []
    for r in results:
        for name, m in r.metrics.items():
            rows.append([r.task, str(r.shots), name, _fmt(m["value"]), _fmt(m["stderr"]), str(r.n)])
    return rows


HEADER = ["task", "shots", "metric", "value", "stderr", "n"]


def format_table(results: list[TaskResult]) -> str:
    """Plain aligned text for the terminal, followed by skip/truncation notes."""
    rows = [HEADER, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + notes(results))


def notes(results: list[TaskResult]) -> list[str]:
    out = []
    for r in results:
        for reason, count in r.skipped.items():
            out.append(f"{r.task}: {count} of the {r.records} records in the data file skipped ({reason})")
        if r.too_long:
            out.append(f"{r.task}: {r.too_long} examples not scored (an option is longer than the model's context)")
        if r.truncated:
            out.append(f"{r.task}: {r.truncated} examples had their context cut on the left to fit the model")
    return out


def markdown_report(results: list[TaskResult], meta: dict) -> str:
    lines = [f"# Evaluation of `{meta.get('checkpoint', '?')}`", ""]
    for key in ("step", "shots", "limit", "precision", "seed", "data_dir", "created"):
        if meta.get(key) not in (None, ""):
            lines.append(f"- {key}: {meta[key]}")
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    extra = notes(results)
    if extra:
        lines += ["", *[f"- {n}" for n in extra]]
    return "\n".join(lines) + "\n"


def results_filename(shots: int) -> str:
    return f"results-{shots}shot"


def write_reports(results: list[TaskResult], out_dir: str | Path, meta: dict) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_filename(int(meta.get("shots", 0)))
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    payload = {"schema": SCHEMA, **meta, "results": [asdict(r) for r in results]}
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    md_path.write_text(markdown_report(results, meta), encoding="utf-8")
    return json_path, md_path


def read_results(path: str | Path) -> tuple[dict, list[TaskResult]]:
    """(meta, results) from a JSON file written by ``write_reports``."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable results file: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
        raise InputError(f"{path}: not a sparselm eval results file (schema {SCHEMA})")
    results = [TaskResult(**r) for r in payload.pop("results")]
    return payload, results
