"""GLaM-style text quality classifier: logistic regression over hashed word n-gram features.

Training examples are *passages*: documents cut at line boundaries into pieces of at most ``passage_chars``
characters, with consecutive short documents of the same source packed together, so a book, a Wikipedia article, a
web page and a one-line forum post all look alike in length and the model has to learn from the words. Documents
(not passages) are split into train and held-out sets by a seeded hash of their key, so no held-out passage shares a
document with a training passage; precision, recall and ROC AUC are measured on the held-out passages.

The model is stored as plain arrays (``np.savez_compressed``: the coefficient vector, the intercept and a JSON header
with the feature settings) and loaded with ``allow_pickle=False``: loading a model file never runs code from it,
unlike pickle/joblib. Scikit-learn's ``HashingVectorizer`` is stateless (MurmurHash3 of each n-gram), so the same
settings rebuild exactly the same features at load time.

A document is scored as the mean probability of up to ``score_passages`` of its passages, evenly spaced through it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "sparselm-quality"
VERSION = 1
SELECTION_MODES = ("none", "threshold", "pareto")


@dataclass(frozen=True)
class FeatureSettings:
    n_features: int = 1 << 20
    ngram_max: int = 2
    passage_chars: int = 2000
    score_passages: int = 8


def _vectorizer(settings: FeatureSettings) -> Any:
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        n_features=settings.n_features,
        ngram_range=(1, settings.ngram_max),
        alternate_sign=False,  # counts stay non-negative, so a hashed feature reads as "this n-gram is present"
        norm="l2",
        lowercase=True,
        dtype=np.float32,
    )


def passages(text: str, max_chars: int) -> Iterator[str]:
    """Consecutive pieces of at most ``max_chars`` characters, cut after a newline when there is one."""
    start, n = 0, len(text)
    while start < n:
        end = min(start + max_chars, n)
        if end < n:
            newline = text.rfind("\n", start + max_chars // 4, end)
            end = newline + 1 if newline > start else end
        piece = text[start:end].strip()
        if piece:
            yield piece
        start = end


def _pick_evenly(items: list[str], k: int) -> list[str]:
    if len(items) <= k:
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, k).round()]


class QualityModel:
    """A loaded classifier: ``score(text)`` is the probability that the text looks like the positive class."""

    def __init__(self, coef: np.ndarray, intercept: float, settings: FeatureSettings, info: dict[str, Any]) -> None:
        self.coef = coef.astype(np.float32).reshape(-1)
        self.intercept = float(intercept)
        self.settings = settings
        self.info = info
        self._vec = _vectorizer(settings)

    def passage_probabilities(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        logits = self._vec.transform(texts) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))

    def score_many(self, texts: list[str]) -> np.ndarray:
        """One score per document, with one vectoriser call for the whole batch."""
        pieces: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            chosen = _pick_evenly(list(passages(text, self.settings.passage_chars)), self.settings.score_passages)
            pieces.extend(chosen or [""])
            owners.extend([i] * max(len(chosen), 1))
        probs = self.passage_probabilities(pieces)
        sums = np.bincount(owners, weights=probs, minlength=len(texts))
        counts = np.bincount(owners, minlength=len(texts))
        return sums / np.maximum(counts, 1)

    def score(self, text: str) -> float:
        return float(self.score_many([text])[0])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "version": VERSION, "settings": asdict(self.settings), **self.info}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(
            tmp, coef=self.coef, intercept=np.array([self.intercept]), header=np.array(json.dumps(header))
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> QualityModel:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"quality model not found: {path} (train one with `sparselm data quality train`)")
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                coef, intercept = data["coef"], float(data["intercept"][0])
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path} is not a sparselm quality model: {exc}") from None
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(f"{path}: unsupported quality model format {header.get('format')}/{header.get('version')}")
        settings = FeatureSettings(**header.pop("settings"))
        if coef.shape != (settings.n_features,):
            raise ValueError(f"{path}: coefficient shape {coef.shape} does not match n_features={settings.n_features}")
        for key in ("format", "version"):
            header.pop(key)
        return cls(coef, intercept, settings, header)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---- selection ----------------------------------------------------------------------------------------------------


def keep_document(mode: str, score: float, threshold: float, alpha: float, seed: int, doc_hash: int) -> bool:
    """GLaM/GPT-3 selection: ``threshold`` keeps score >= threshold; ``pareto`` keeps when a Pareto(alpha) draw
    exceeds 1 - score, so low-scoring documents survive now and then (diversity) while high ones almost always do.
    The draw is seeded by (seed, document hash): the same document gets the same verdict in any shard or order."""
    if mode == "none":
        return True
    if mode == "threshold":
        return score >= threshold
    rng = np.random.default_rng([seed, doc_hash & 0xFFFFFFFF, doc_hash >> 32])
    return bool(rng.pareto(alpha) > 1.0 - score)


# ---- training -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    features: FeatureSettings = FeatureSettings()
    max_passages_per_source: int = 3000
    holdout_fraction: float = 0.2
    c: float = 1.0  # inverse L2 strength of the logistic regression
    seed: int = 0


def _unit(seed: int, key: str) -> float:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=f"quality-{seed}".encode()).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class _Reservoir:
    """Uniform sample of at most ``capacity`` items from a stream (Vitter's algorithm R), seeded."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity, self.rng, self.items, self.seen = capacity, rng, [], 0

    def add(self, item: str) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
        else:
            j = int(self.rng.integers(0, self.seen))
            if j < self.capacity:
                self.items[j] = item


def sample_passages(
    docs: Iterable[tuple[str, str]], settings: TrainSettings, source_index: int
) -> tuple[list[str], list[str], int]:
    """(train passages, held-out passages, documents read) of one source, each list capped and uniformly sampled."""
    rng = np.random.default_rng([settings.seed, source_index])
    cap = settings.max_passages_per_source
    held_cap = max(1, round(cap * settings.holdout_fraction))
    pools = {False: _Reservoir(cap - held_cap, rng), True: _Reservoir(held_cap, rng)}
    packs: dict[bool, str] = {False: "", True: ""}
    size = settings.features.passage_chars
    count = 0
    for key, text in docs:
        count += 1
        held = _unit(settings.seed, key) < settings.holdout_fraction
        for piece in passages(text, size):
            joined = f"{packs[held]}\n{piece}" if packs[held] else piece
            if len(joined) < size // 2:
                packs[held] = joined  # too short on its own: pack with what follows in the same source
                continue
            pools[held].add(joined)
            packs[held] = ""
    for held, rest in packs.items():
        if rest:
            pools[held].add(rest)
    return pools[False].items, pools[True].items, count


def train_classifier(
    sources: list[tuple[str, int, Iterable[tuple[str, str]]]], settings: TrainSettings
) -> tuple[QualityModel, dict[str, Any]]:
    """Train on ``(name, label, documents as (key, text))`` sources; label 1 = high quality. Returns the model and
    its held-out metrics. Raises ValueError when a class has no passages."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    train_x: list[str] = []
    train_y: list[int] = []
    held_x: list[str] = []
    held_y: list[int] = []
    held_src: list[str] = []
    per_source: dict[str, dict[str, Any]] = {}
    for index, (name, label, docs) in enumerate(sources):
        tr, ho, count = sample_passages(docs, settings, index)
        train_x += tr
        train_y += [label] * len(tr)
        held_x += ho
        held_y += [label] * len(ho)
        held_src += [name] * len(ho)
        per_source[name] = {"label": label, "documents": count, "train_passages": len(tr), "heldout_passages": len(ho)}
    for label in (0, 1):
        if label not in train_y or label not in held_y:
            kind = "positive" if label else "negative"
            raise ValueError(f"no {kind} training or held-out passages: give more {kind} documents")
    vec = _vectorizer(settings.features)
    clf = LogisticRegression(C=settings.c, class_weight="balanced", solver="liblinear", max_iter=1000)
    clf.fit(vec.transform(train_x), np.array(train_y))
    info = {"sources": per_source}
    model = QualityModel(clf.coef_.reshape(-1), float(clf.intercept_[0]), settings.features, info)
    probs = model.passage_probabilities(held_x)
    y = np.array(held_y)
    predicted = (probs >= 0.5).astype(int)
    for name in per_source:
        mask = np.array([s == name for s in held_src])
        per_source[name]["heldout_mean_score"] = round(float(probs[mask].mean()), 4) if mask.any() else None
    metrics = {
        "heldout_passages": len(held_x),
        "train_passages": len(train_x),
        "precision": round(float(precision_score(y, predicted)), 4),
        "recall": round(float(recall_score(y, predicted)), 4),
        "auc": round(float(roc_auc_score(y, probs)), 4),
        "accuracy": round(float((predicted == y).mean()), 4),
        "sources": per_source,
        "settings": {**asdict(settings.features), "c": settings.c, "holdout_fraction": settings.holdout_fraction},
    }
    model.info = {"metrics": metrics}
    return model, metrics
