"""Generation with retrieval at every chunk boundary, and attribution of each chunk to its neighbours' sources.

Each step runs the model over the whole sequence so far (no KV cache: a chunk's neighbours change what the
cross-attention of the following positions sees, and sequences here are at most ``max_seq_len`` tokens). Whenever
the sequence completes a chunk of m tokens, prompt or generated, that chunk is searched once (the retriever caches
it) and its neighbours serve the next m positions, as in training. The attribution lists, for every chunk, the
neighbours it retrieved: database row, source document, byte span, similarity rank and text.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparselm.errors import InputError
from sparselm.model.generate import SamplingConfig, sample_next
from sparselm.retro.retriever import Retriever
from sparselm.retro.store import Database


@dataclass
class ChunkAttribution:
    chunk: int  # index of the chunk in the sequence
    generated: bool  # False: a chunk of the prompt
    text: str
    neighbours: list[dict] = field(default_factory=list)  # row, document, bytes, text (best first)


@torch.no_grad()
def retro_generate(
    model, retriever: Retriever, prompt: list[int], sampling: SamplingConfig, eod_id: int | None = None
) -> tuple[list[int], list[list[int]]]:
    """New tokens after ``prompt`` and the database ids [chunks][k] each complete chunk retrieved."""
    sampling.validate()
    if not prompt:
        raise InputError("empty prompt")
    max_len = model.cfg.max_seq_len
    if len(prompt) >= max_len:
        raise InputError(f"the prompt has {len(prompt)} tokens; model.max_seq_len={max_len} leaves no room")
    m = retriever.m
    device = model.tok_emb.weight.device
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    seq = list(prompt)
    for _ in range(min(sampling.max_new_tokens, max_len - len(prompt))):
        neighbours = retriever.neighbours_for([seq], len(seq)).to(device)
        logits = model(torch.tensor([seq], device=device), neighbours=neighbours, last_only=True).logits[:, -1]
        token = int(sample_next(logits.float().cpu(), sampling, generator)[0])
        if sampling.stop_on_eod and eod_id is not None and token == eod_id:
            break
        seq.append(token)
    return seq[len(prompt) :], retriever.ids_for([seq], len(seq) // m)[0].tolist()


def attribute(db: Database, tokens: list[int], prompt_len: int, ids: list[list[int]], tokenizer) -> list:
    """One ``ChunkAttribution`` per complete chunk of ``tokens`` (prompt + generated)."""
    names = DocumentNames(db)
    out = []
    m = db.chunk_size
    for u, row in enumerate(ids):
        chunk = tokens[u * m : (u + 1) * m]
        entry = ChunkAttribution(u, (u + 1) * m > prompt_len, tokenizer.decode(chunk))
        for rank, i in enumerate(row):
            if i < 0:
                continue
            f = db.chunks[i]
            source = db.sources[int(f["source"])]
            entry.neighbours.append(
                {
                    "rank": rank,
                    "row": int(i),
                    "document": names.name(int(f["source"]), int(f["doc_first"])),
                    "split": source.split,
                    "bytes": [int(f["byte_start"]), int(f["byte_start"] + f["n_bytes"])],
                    "text": tokenizer.decode(db.tokens[i][:m].tolist()),
                }
            )
        out.append(entry)
    return out


class DocumentNames:
    """Names of database documents (input file, and the ``source``/``title``/``url`` of a JSONL record), recovered
    from the prepared data's inputs: a prepared split numbers its documents in input order, so re-reading the inputs
    and re-applying the split rule names them. Falls back to ``split#number`` when the inputs are gone."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._docs: dict[int, list[tuple[str, int]] | None] = {}
        self._jsonl: dict[str, dict[int, str]] = {}

    def name(self, source: int, doc: int) -> str:
        if source not in self._docs:
            self._docs[source] = self._recover(source)
        docs = self._docs[source]
        s = self.db.sources[source]
        if docs is None or doc >= len(docs):
            return f"{Path(s.data_dir).name}/{s.split} document {doc}"
        path, index = docs[doc]
        if ".jsonl" not in path:
            return Path(path).name
        if path not in self._jsonl:
            self._jsonl[path] = _jsonl_labels(path)
        return self._jsonl[path].get(index, f"{Path(path).name}#{index}")

    def _recover(self, source: int) -> list[tuple[str, int]] | None:
        from sparselm.data.prepare import val_score
        from sparselm.data.reader import iter_documents

        s = self.db.sources[source]
        try:
            meta = json.loads((Path(s.data_dir) / "meta.json").read_text(encoding="utf-8"))
            inputs = [Path(p) for p in meta["inputs"]]
            if not all(p.exists() for p in inputs):
                return None
            docs = []
            for doc in iter_documents(inputs):
                split = "val" if val_score(meta["seed"], doc.text) < meta["val_fraction"] else "train"
                if split == s.split:
                    docs.append((doc.source, doc.index))
        except (OSError, ValueError, KeyError):
            return None
        return docs if len(docs) == s.documents else None


def _jsonl_labels(path: str) -> dict[int, str]:
    labels = {}
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            for key in ("source", "title", "url"):
                if isinstance(record, dict) and isinstance(record.get(key), str):
                    labels[i] = record[key]
                    break
    return labels
