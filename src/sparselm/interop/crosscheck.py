"""Score an exported model with lm-evaluation-harness's own ``hf`` model (transformers model and tokenizer loaded
from the export) on PIQA and LAMBADA, defined as lm-eval's ``piqa`` and ``lambada_openai`` tasks define them, next
to ``sparselm eval`` on the checkpoint: equal numbers check the export and sparselm's harness at once.

lm-eval reads its task data from the hub; here the same records come from local files (the authors' PIQA files,
OpenAI's LAMBADA JSONL) through lm-eval's ``json`` dataset loader, one YAML file per task, and both sides read the
same files. PIQA questions with an option longer than the model's context are left out of both (``sparselm eval``
skips them, lm-eval's hf model stops on them). Needs the ``hf`` extra (lm-eval's hf model needs accelerate) and
``HF_HUB_OFFLINE=1`` on a machine without hub access.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

TASKS = ("piqa", "lambada")
METRICS = {"piqa": ("acc", "acc_norm"), "lambada": ("acc", "perplexity")}
# The prompts of lm-eval 0.4's piqa and lambada_openai tasks.
BODIES = {
    "piqa": 'output_type: multiple_choice\ndoc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\n'
    'doc_to_choice: "{{[sol1, sol2]}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
    "lambada": "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
    "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n",
}


@dataclass
class TaskFiles:
    paths: dict[str, Path]  # task -> the JSON Lines file both sides score
    left_out: dict[str, int]  # task -> records left out (an option longer than the model's context)


def task_files(ckpt: Path, data_dir: Path, workdir: Path, tasks=TASKS) -> TaskFiles:
    """The records of ``tasks`` as JSON Lines files in ``workdir`` (PIQA with its labels joined in)."""
    from sparselm.checkpoint.files import load_config_from_checkpoint, resolve_checkpoint
    from sparselm.data.tokenizer import load_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    paths, left_out = {}, {}
    for task in tasks:
        left_out[task] = 0
        if task == "lambada":  # the target is one word: it always fits
            paths[task] = Path(data_dir) / "lambada" / "lambada_test.jsonl"
            continue
        ckpt = resolve_checkpoint(ckpt)
        max_len = load_config_from_checkpoint(ckpt).model.max_seq_len
        tokenizer = load_tokenizer(ckpt)
        goals = (Path(data_dir) / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines()
        labels = (Path(data_dir) / "piqa" / "valid-labels.lst").read_text(encoding="utf-8").split()
        lines = []
        for goal, label in zip(goals, labels, strict=True):
            record = {**json.loads(goal), "label": int(label)}
            context = f"Question: {record['goal']}\nAnswer:"
            fits = [
                len(tokenizer.encode(context + " " + o)) - len(tokenizer.encode(context)) <= max_len
                for o in (record["sol1"], record["sol2"])
            ]
            if all(fits):
                lines.append(json.dumps(record) + "\n")
            else:
                left_out[task] += 1
        paths[task] = workdir / "piqa.jsonl"
        paths[task].write_text("".join(lines), encoding="utf-8")
    return TaskFiles(paths, left_out)


def lm_eval_hf_scores(
    hf_dir: Path, files: TaskFiles, workdir: Path, limit: int = 0, batch_size: int = 8
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's hf model on the Hugging Face directory ``hf_dir`` (fp32, CPU)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    workdir.mkdir(parents=True, exist_ok=True)
    names = {}
    for task, data in files.paths.items():
        name = f"sparselm_crosscheck_{task}"
        head = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {workdir / 'hf_cache'}\ntest_split: test\n"
        )
        (workdir / f"{name}.yaml").write_text(head + BODIES[task], encoding="utf-8")
        names[task] = name
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_dir},dtype=float32,device=cpu",
        tasks=list(names.values()),
        batch_size=batch_size,
        limit=limit or None,
        num_fewshot=0,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(workdir), include_defaults=False),
    )
    return {t: {m: float(out["results"][n][f"{m},none"]) for m in METRICS[t]} for t, n in names.items()}


def sparselm_scores(ckpt: Path, files: TaskFiles, limit: int = 0, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """The same numbers from ``sparselm eval``'s engine on the sparselm checkpoint (fp32), on the same files."""
    from sparselm.checkpoint.inference import load_checkpoint
    from sparselm.eval.harness import evaluate_task
    from sparselm.eval.loglik import Scorer
    from sparselm.eval.tasks import load_task

    model, _, tokenizer = load_checkpoint(ckpt)
    scorer = Scorer(model, tokenizer, batch_size=batch_size)
    scores = {}
    for task, data in files.paths.items():
        spec = dataclasses.replace(load_task(task), data=str(data), labels="")  # PIQA's labels are in the file
        result = evaluate_task(scorer, spec, None, limit=limit, progress=False)
        scores[task] = {m: float(result.metrics[m]["value"]) for m in METRICS[task]}
    return scores
