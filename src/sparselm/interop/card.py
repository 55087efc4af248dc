"""The model card (``README.md``) of an exported model: what it is, how it was trained, how it scored."""

from __future__ import annotations

import json
from pathlib import Path

from sparselm.config import Config, to_toml
from sparselm.params.counting import count_params


def tokens_seen(ckpt: Path, cfg: Config, step: int) -> int:
    """Training tokens up to ``step``: the run's own count (metrics.jsonl) when it is there, else steps x batch."""
    metrics = ckpt.parent.parent / "metrics.jsonl" if ckpt.parent.name == "checkpoints" else None
    seen = None
    if metrics is not None and metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step and "tokens_seen" in record:
                seen = int(record["tokens_seen"])
    return seen if seen is not None else step * cfg.train.global_batch_size * cfg.data.seq_len


def _eval_sections(ckpt: Path) -> list[str]:
    from sparselm.errors import InputError
    from sparselm.eval.harness import default_out_dir, read_results, table_rows

    lines: list[str] = []
    for path in sorted(default_out_dir(ckpt).glob("results-*shot.json")):
        try:
            meta, results = read_results(path)
        except InputError:
            continue
        lines += [
            "",
            f"`sparselm eval` on {meta.get('checkpoint', '?')} (step {meta.get('step', '?')}, "
            f"{meta.get('shots', 0)}-shot, {meta.get('precision', '?')}"
            + (f", first {meta['limit']} examples per task" if meta.get("limit") else "")
            + "):",
            "",
            "| task | metric | value | stderr | n |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [f"| {r[0]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} |" for r in table_rows(results)]
    return lines


def model_card(cfg: Config, architecture: str, ckpt: Path, step: int, tokenizer_note: str, dtype: str) -> str:
    m, e = cfg.model, cfg.moe
    counts = count_params(cfg)
    moe = "dense"
    tags = ["sparselm", "text-generation"]
    if e.enabled:
        tags.append("mixture-of-experts")
        every = {1: "in every layer", 2: "in every other layer"}.get(e.moe_every, f"in one layer of {e.moe_every}")
        gates = "renormalised" if e.renormalize and e.top_k > 1 else "router probability"
        moe = f"{e.num_experts} experts, top-{e.top_k} ({gates} gates), {every}"
        if e.shared_expert:
            moe += ", plus a shared expert"
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    front += [f"- {t}" for t in tags] + ["---", ""]
    body = [
        f"# {architecture} exported by sparselm",
        "",
        f"Trained with sparselm and exported from `{ckpt}` (step {step:,}) as "
        f"`{architecture}` in {dtype}. The export is exact: transformers computes the same logits as sparselm "
        "(checked to 1e-5 in fp32 by sparselm's tests for this architecture).",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {counts.total:,} ({counts.active:,} active per token) |",
        f"| layers, width, heads | {m.n_layers}, {m.d_model}, {m.n_heads} |",
        f"| feed-forward | {m.ffn}, {m.d_ff} wide; {moe}"
        + (f", experts {e.d_ff_expert} wide" if e.d_ff_expert else "")
        + " |",
        f"| positions, norm | {m.position}, {m.norm}" + (", query/key norm" if m.qk_norm else "") + " |",
        f"| context | {m.max_seq_len} tokens |",
        f"| vocabulary | {m.vocab_size} ({tokenizer_note}) |",
        f"| training tokens | {tokens_seen(ckpt, cfg, step):,} ({step:,} steps) |",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")',
        'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")',
        "```",
        "",
        "The tokenizer adds no BOS token, as in training; documents were separated by "
        "the end-of-sequence token. `sparselm import --hf THIS_DIR --out RUN` brings it back into sparselm.",
        "",
        "## Evaluation",
    ]
    evals = _eval_sections(ckpt)
    body += evals if evals else ["", "No `sparselm eval` results were found for this run."]
    body += ["", "## Training configuration", "", "```toml", to_toml(cfg).rstrip(), "```", ""]
    return "\n".join(front + body)
