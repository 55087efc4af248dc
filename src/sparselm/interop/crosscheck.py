"""Score an exported model with lm-evaluation-harness's own ``hf`` model (transformers model and tokenizer loaded
from the export) on PIQA and LAMBADA, defined as lm-eval's ``piqa`` and ``lambada_openai`` tasks define them, next
to ``sparselm eval`` on the checkpoint: equal numbers check the export and sparselm's harness at once.

lm-eval reads its task data from the hub; here the same records come from local files (the authors' PIQA files,
OpenAI's LAMBADA JSONL) through lm-eval's ``json`` dataset loader, one YAML file per task. Needs the ``hf`` extra
(lm-eval's hf model needs accelerate) and ``HF_HUB_OFFLINE=1`` for a machine without hub access.
"""

from __future__ import annotations

import json
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


def _task_data(task: str, data_dir: Path, folder: Path) -> Path:
    if task == "lambada":
        return data_dir / "lambada" / "lambada_test.jsonl"
    goals = (data_dir / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    labels = (data_dir / "piqa" / "valid-labels.lst").read_text(encoding="utf-8").split()
    path = folder / "piqa.jsonl"  # labels joined in: the json loader reads one file
    path.write_text(
        "".join(json.dumps({**json.loads(g), "label": int(y)}) + "\n" for g, y in zip(goals, labels, strict=True)),
        encoding="utf-8",
    )
    return path


def lm_eval_hf_scores(
    hf_dir: Path, data_dir: Path, workdir: Path, tasks=TASKS, limit: int = 0, batch_size: int = 8
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's hf model on the Hugging Face directory ``hf_dir`` (fp32, CPU)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    workdir.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in tasks:
        name = f"sparselm_crosscheck_{task}"
        data = _task_data(task, Path(data_dir), workdir)
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


def sparselm_scores(ckpt: Path, data_dir: Path, tasks=TASKS, limit: int = 0, batch_size: int = 8) -> dict:
    """The same numbers from ``sparselm eval``'s engine on the sparselm checkpoint (fp32)."""
    from sparselm.checkpoint.inference import load_checkpoint
    from sparselm.eval.harness import evaluate_task
    from sparselm.eval.loglik import Scorer
    from sparselm.eval.tasks import load_task

    model, _, tokenizer = load_checkpoint(ckpt)
    scorer = Scorer(model, tokenizer, batch_size=batch_size)
    scores = {}
    for task in tasks:
        metrics = evaluate_task(scorer, load_task(task), Path(data_dir), limit=limit, progress=False).metrics
        scores[task] = {m: float(metrics[m]["value"]) for m in METRICS[task]}
    return scores
