"""Render a pipeline summary as Markdown with PNG plots (matplotlib, Agg backend: no display needed).

``write_report(summary, path)`` writes ``path`` and its plots into the directory ``path`` without suffix
(``report.md`` -> ``report/``), linked relatively so the pair can be moved or committed together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SNIPPET = 300


def _esc(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_esc(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _n(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else (f"{x:.4g}" if isinstance(x, float) else str(x))


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _quote(text: str) -> list[str]:
    body = text[:SNIPPET].replace("```", "'''")
    return ["```text", body + (" [...]" if len(text) > SNIPPET else ""), "```", ""]


def _plots(summary: dict[str, Any], folder: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = list(summary["sources"])
    made: dict[str, str] = {}
    save = {"dpi": 90, "bbox_inches": "tight", "metadata": {"Software": None}}

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(names)))
    left = np.zeros(len(names))
    for part, color in (
        ("kept", "#4c9a2a"),
        ("filtered", "#e0a030"),
        ("duplicates", "#6a8fd0"),
        ("rejected", "#c03030"),
    ):
        vals = np.array(
            [
                summary["sources"][n]["accounting"][part] / max(summary["sources"][n]["accounting"]["input"], 1)
                for n in names
            ]
        )
        ax.barh(names, vals, left=left, color=color, label=part)
        left += vals
    ax.set_xlabel("fraction of input documents")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    fig.savefig(folder / "documents.png", **save)
    plt.close(fig)
    made["documents"] = "documents.png"

    scored = [n for n in names if summary["sources"][n]["score_hist"] is not None]
    if scored:
        cols = min(3, len(scored))
        rows = (len(scored) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False)
        for ax, name in zip(axes.flat, scored, strict=False):
            hist = np.array(summary["sources"][name]["score_hist"], dtype=float)
            edges = np.linspace(0, 1, len(hist) + 1)
            ax.bar(edges[:-1], hist / max(hist.sum(), 1), width=edges[1] - edges[0], align="edge", color="#6a8fd0")
            ax.set_title(f"{name} (n={int(hist.sum()):,})", fontsize=9)
            ax.set_xlim(0, 1)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(scored) :]:
            ax.axis("off")
        fig.supxlabel("quality score", fontsize=9)
        fig.supylabel("fraction of documents", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / "quality_scores.png", **save)
        plt.close(fig)
        made["quality"] = "quality_scores.png"

    sizes = summary["dedup"]["cluster_sizes"]
    if sizes:
        fig, ax = plt.subplots(figsize=(5, 2.6))
        ax.bar([int(k) for k in sizes], list(sizes.values()), color="#6a8fd0")
        ax.set_yscale("log")
        ax.set_xlabel("cluster size (documents)")
        ax.set_ylabel("clusters")
        fig.savefig(folder / "duplicate_clusters.png", **save)
        plt.close(fig)
        made["clusters"] = "duplicate_clusters.png"

    mix = summary["mixture"]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    x = np.arange(len(mix))
    ax.bar(x - 0.2, [m["requested_share"] for m in mix], 0.4, label="requested", color="#b0b0b0")
    ax.bar(x + 0.2, [m["realised_share"] for m in mix], 0.4, label="realised", color="#4c9a2a")
    ax.set_xticks(x, [m["source"] for m in mix], fontsize=8)
    ax.set_ylabel("share of train tokens")
    ax.legend(frameon=False)
    fig.savefig(folder / "mixture.png", **save)
    plt.close(fig)
    made["mixture"] = "mixture.png"
    return made


def render(summary: dict[str, Any], plots: dict[str, str], plot_dir: str) -> str:
    s, t, m = summary, summary["totals"], summary["machine"]
    out = ["# Data pipeline report", ""]
    out += [
        f"- Date: {s['date']}",
        f"- Command: `{s.get('command') or 'run_pipeline(...)'}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, Python {m['python']}",
        f"- Tokenizer: `{s['tokenizer']['path']}` ({s['tokenizer']['vocab_size']:,} pieces); "
        f"executor {s['timing']['executor']} with {s['timing']['workers']} worker(s)",
        "",
        f"**{t['input']:,} input documents = {t['kept']:,} kept + {t['filtered']:,} filtered + "
        f"{t['duplicates']:,} duplicates + {t['rejected']:,} rejected** (checked per source).",
        "",
    ]
    out += ["## Documents and tokens per source", ""]
    rows = []
    for name, src in s["sources"].items():
        a = src["accounting"]
        rows.append(
            [
                name,
                src["files"],
                f"{src['file_bytes'] / 1e6:.2f}",
                _n(a["input"]),
                _n(a["rejected"]),
                _n(a["filtered"]),
                _n(a["duplicates"]),
                _n(a["kept"]),
                _n(src["extracted"]["tokens"]),
                _n(src["kept"]["tokens"]),
                _pct(src["kept"]["tokens"], src["extracted"]["tokens"]),
            ]
        )
    header = [
        "source",
        "files",
        "MB",
        "docs in",
        "rejected",
        "filtered",
        "duplicates",
        "docs kept",
        "tokens in",
        "tokens kept",
        "tokens kept %",
    ]
    out += _table(header, rows)
    out += [f"![documents per source]({plot_dir}/{plots['documents']})", ""]
    out += [
        "## Stages per source",
        "",
        "Documents and tokens into and out of each stage, in order; filters that "
        "removed nothing are left out. `tokens in` of the first row counts extracted documents only.",
        "",
    ]
    rows = []
    for name, src in s["sources"].items():
        for i, st in enumerate(src["funnel"]):
            if i == 0 or st["docs_in"] != st["docs_out"]:
                rows.append(
                    [
                        name,
                        st["stage"],
                        _n(st["docs_in"]),
                        _n(st["docs_out"]),
                        _n(st.get("tokens_in", "")),
                        _n(st["tokens_out"]),
                    ]
                )
    out += _table(["source", "stage", "docs in", "docs out", "tokens in", "tokens out"], rows)
    out += _reasons(s, "filtered", "## Removed by filter", "Documents (tokens) removed by each filter.")
    out += _reasons(s, "rejected", "## Rejected input", "Bad input, by reason (details in `rejects.jsonl`).")
    out += _quality(s, plots, plot_dir)
    out += dedup_section(s, plots, plot_dir)
    out += _mixture(s, plots, plot_dir)
    out += ["## Examples of removed documents", ""]
    for reason, shelf in sorted(s["examples"].items()):
        out += [f"### {reason}", ""]
        for e in shelf:
            value = f", value {e['value']:.4g}" if e.get("value") is not None else ""
            out += [f"`{e['id']}` ({e['source']}{value})", ""] + _quote(e["text"])
    tp, tm = s["throughput"], s["timing"]
    out += ["## Throughput", ""]
    rows = [
        ["documents/s per worker", _n(tp["docs_per_second_per_worker"])],
        ["MB/s per worker", _n(tp["mb_per_second_per_worker"])],
        ["input", f"{tp['input_mb']} MB, {tp['input_docs']:,} documents"],
        ["shard stage wall time", f"{tm['wall_seconds']} s ({tm['shards_run']} of {tm['shards_total']} shards run)"],
        ["quality classifier training", f"{tm['quality_seconds']} s"],
        ["dedup + clean output", f"{tm['dedup_seconds']} s"],
        ["mixture + token shards", f"{tm['mixture_seconds']} s"],
        ["total", f"{tm['total_seconds']} s"],
    ]
    out += _table(["what", "value"], rows)
    out += [
        "Per worker = input divided by the summed time of the shard tasks (reading, extraction, tokenisation, "
        "quality scoring, filters, MinHash), i.e. what one worker process sustains.",
        "",
    ]
    return "\n".join(out)


def _reasons(s: dict[str, Any], kind: str, title: str, note: str) -> list[str]:
    names = list(s["sources"])
    reasons = sorted({r for src in s["sources"].values() for r in src[kind]})
    if not reasons:
        return [title, "", "None.", ""]
    rows = []
    for reason in reasons:
        cells = []
        for n in names:
            row = s["sources"][n][kind].get(reason)
            tokens = f" ({row['tokens']:,})" if row and kind == "filtered" else ""
            cells.append(f"{row['docs']:,}{tokens}" if row else "")
        rows.append([reason, *cells])
    return [title, "", note, "", *_table(["reason", *names], rows)]


def _quality(s: dict[str, Any], plots: dict[str, str], plot_dir: str) -> list[str]:
    q = s["quality"]
    out = ["## Quality classifier", ""]
    if q is None:
        return [*out, "No classifier configured.", ""]
    out += [
        f"Hashed word 1-{q['settings']['ngram_max']}-gram features ({q['settings']['n_features']:,} buckets), "
        f"logistic regression (C={q['settings']['c']}); passages of <= {q['settings']['passage_chars']} characters; "
        f"{q['train_passages']:,} training and {q['heldout_passages']:,} held-out passages "
        f"(held out by document, {q['settings']['holdout_fraction']:.0%}).",
        "",
    ]
    out += _table(
        ["precision", "recall", "ROC AUC", "accuracy"], [[q["precision"], q["recall"], q["auc"], q["accuracy"]]]
    )
    folds = q.get("folds") or 0
    rows = [
        [
            n,
            "positive" if v["label"] else "negative",
            _n(v["documents"]),
            _n(v["train_passages"]),
            _n(v["heldout_passages"]),
            _score(v.get("heldout_mean_score")),
            _score(v.get("train_mean_score")),
            _score(v.get("crossfit_mean_score")),
        ]
        for n, v in q["sources"].items()
    ]
    header = ["source", "class", "documents", "train passages", "held-out passages", "held-out mean score"]
    header += ["train mean score (full model)", "out-of-fold mean score"]
    out += _table(header, rows)
    training = ", ".join(q["sources"])
    if folds:
        out += [
            f"Cross-fitting: the documents of the training sources ({training}) are split into {folds} folds by a "
            f"hash of their text, and {folds} more models are trained, each without one fold. The pipeline scores a "
            "document of a training source with the model that did not see its fold (out-of-fold mean score above, "
            f"ROC AUC {q['crossfit_auc']} over the training passages), and documents of other sources with the full "
            "model. The full model's scores of its own training passages (train mean score) show the bias that "
            "this avoids.",
            "",
        ]
    elif "folds" in q:  # (a model from before cross-fitting existed records no folds at all)
        out += [
            f"No cross-fitting (quality.folds = 0): documents of the training sources ({training}) are scored by a "
            "model that was trained on some of them, so their scores lean towards their class.",
            "",
        ]
    if "quality" in plots:
        note = " (cross-fitted for the training sources)" if folds else ""
        out += [f"Score of every extracted document, per source{note}:", ""]
        out += [f"![quality scores]({plot_dir}/{plots['quality']})", ""]
    return out


def _score(value: float | None) -> str:
    return "-" if value is None else str(value)


def dedup_section(s: dict[str, Any], plots: dict[str, str], plot_dir: str) -> list[str]:
    d = s["dedup"]
    cfg = s["config"]["dedup"]
    out = ["## Deduplication", ""]
    out += [
        f"Exact: {d['exact']:,} documents (normalised-text hash). Near: {d['near']:,} documents (MinHash, "
        f"{cfg['num_perm']} permutations of word {cfg['ngram']}-grams, LSH {d['bands']} bands x {d['rows']} rows, "
        f"estimated Jaccard >= {cfg['threshold']}). {d['cross_source']:,} duplicates had their kept copy in "
        "another source. Each cluster keeps its first document in config order (source, file, position).",
        "",
    ]
    candidates = sum(src["accounting"]["kept"] + src["accounting"]["duplicates"] for src in s["sources"].values())
    methods = [name for name, on in (("exact", cfg.get("exact", True)), ("near", cfg.get("near", True))) if on]
    if d["cluster_sizes"]:
        out += ["Duplicate clusters by size (a cluster is one kept document and its duplicates):", ""]
        out += _table(["cluster size", "clusters"], [[k, v] for k, v in d["cluster_sizes"].items()])
    elif methods:
        out += [
            f"**No duplicate clusters were found**: none of the {candidates:,} candidate documents (those that "
            f"passed the filters and quality selection) is a duplicate ({' or '.join(methods)}) of another, so "
            "there is no cluster-size table or plot.",
            "",
        ]
    else:
        out += ["Deduplication is off (dedup.exact = dedup.near = false).", ""]
    if "clusters" in plots:
        out += [f"![duplicate clusters]({plot_dir}/{plots['clusters']})", ""]
    for kind, shelf in d["examples"].items():
        for e in shelf[:2]:
            out += [f"{kind} duplicate `{e['id']}` of kept `{e['kept']}`:", ""] + _quote(e["text"])
    return out


def _mixture(s: dict[str, Any], plots: dict[str, str], plot_dir: str) -> list[str]:
    out = ["## Mixture", ""]
    rows = [
        [
            m["source"],
            m["weight"] or "",
            m["epochs_requested"] or "",
            _n(m["train_tokens_available"]),
            f"{m['requested_share']:.3f}",
            f"{m['realised_share']:.3f}",
            _n(m["sampled_tokens"]),
            f"{m['realised_epochs']:.2f}" + (" (capped)" if m["capped_by_max_epochs"] else ""),
            _n(m["val_docs"]),
            _n(m["val_tokens"]),
        ]
        for m in s["mixture"]
    ]
    header = [
        "source",
        "weight",
        "epochs",
        "train tokens available",
        "requested share",
        "realised share",
        "train tokens sampled",
        "epochs realised",
        "val docs",
        "val tokens",
    ]
    out += _table(header, rows)
    out += [f"![mixture]({plot_dir}/{plots['mixture']})", ""]
    ds = s["dataset"]
    out += [
        f"Token dataset: train {ds['train']['documents']:,} documents (repeats counted) / "
        f"{ds['train']['tokens']:,} tokens, "
        f"validation {ds['val']['documents']:,} documents / {ds['val']['tokens']:,} tokens "
        f"(`{s['outputs']['tokens']}`, set `data.path` to it).",
        "",
    ]
    return out


def write_report(summary: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent / path.stem
    plots = _plots(summary, folder)
    path.write_text(render(summary, plots, folder.name) + "\n", encoding="utf-8")
    return path
