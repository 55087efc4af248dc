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

Cross-fitting (``folds`` = k, default 5): a model's score of one of its own training documents is biased towards the
document's label (it has seen, and partly memorised, that very text), so when the pipeline trains the classifier on
the same web sample it then selects from, those documents would be judged by a model that already knows them. The
documents of every training source are therefore also split into k folds by a seeded hash of their normalised text,
and k fold models are trained, fold model f on the training passages of every fold but f. A document of a training
source is scored by the fold model of its own fold, which never saw it (nor any passage packed with it); documents of
other sources are scored by the full model, trained on all folds. The fold of a document depends only on its text and
the seed, so the shard stage finds it again without knowing which documents were sampled for training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sparselm.config_loader import choices
from sparselm.errors import InputError

FORMAT = "sparselm-quality"
VERSION = 2  # 2 added the optional fold models of cross-fitting; version 1 files (no folds) still load
SelectionMode = Literal["none", "threshold", "pareto"]
SELECTION_MODES = choices(SelectionMode)


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


def fold_of(text: str, seed: int, folds: int) -> int:
    """The cross-fitting fold of a document (0 when folds < 2): a seeded hash of its text as the pipeline reads it
    (``normalize_document``), without the whitespace at its ends."""
    if folds < 2:
        return 0
    digest = hashlib.blake2b(text.strip().encode("utf-8"), digest_size=8, key=f"fold-{seed}".encode()).digest()
    return int.from_bytes(digest, "little") % folds


def _pick_evenly(items: list[str], k: int) -> list[str]:
    if len(items) <= k:
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, k).round()]


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))


@dataclass(frozen=True)
class CrossFit:
    """The fold models of a cross-fitted classifier: row f of ``coef`` was trained without fold f's documents."""

    coef: np.ndarray  # float32 [folds, n_features]
    intercept: np.ndarray  # float64 [folds]
    seed: int
    sources: tuple[str, ...]  # names of the training sources, whose documents are scored by their fold's model

    @property
    def folds(self) -> int:
        return len(self.intercept)


class QualityModel:
    """A loaded classifier: ``score(text)`` is the probability that the text looks like the positive class."""

    def __init__(
        self,
        coef: np.ndarray,
        intercept: float,
        settings: FeatureSettings,
        info: dict[str, Any],
        crossfit: CrossFit | None = None,
    ) -> None:
        self.coef = coef.astype(np.float32).reshape(-1)
        self.intercept = float(intercept)
        self.settings = settings
        self.info = info
        self.crossfit = crossfit
        # [n_features, folds], C order: what a sparse-times-dense product needs, made once instead of per batch
        self._fold_coef_t = None if crossfit is None else np.ascontiguousarray(crossfit.coef.T)
        self._vec = _vectorizer(settings)

    def crossfits(self, source: str) -> bool:
        """Whether documents of ``source`` (a training source name) are scored by their fold's model."""
        return self.crossfit is not None and source in self.crossfit.sources

    def fold_of(self, text: str) -> int:
        assert self.crossfit is not None
        return fold_of(text, self.crossfit.seed, self.crossfit.folds)

    def passage_probabilities(self, texts: list[str], fold: int | None = None) -> np.ndarray:
        """Probabilities from the full model, or from fold model ``fold`` (trained without that fold)."""
        if not texts:
            return np.zeros(0)
        if fold is None:
            return _sigmoid(self._vec.transform(texts) @ self.coef + self.intercept)
        assert self.crossfit is not None
        return _sigmoid(self._vec.transform(texts) @ self.crossfit.coef[fold] + self.crossfit.intercept[fold])

    def score_many(self, texts: list[str], crossfit: bool = False) -> np.ndarray:
        """One score per document, with one vectoriser call for the whole batch. ``crossfit=True`` (for documents
        of a training source, see ``crossfits``) scores each document with the fold model that did not see it."""
        pieces: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            chosen = _pick_evenly(list(passages(text, self.settings.passage_chars)), self.settings.score_passages)
            pieces.extend(chosen or [""])
            owners.extend([i] * max(len(chosen), 1))
        if not pieces:
            return np.zeros(0)
        features = self._vec.transform(pieces)
        if crossfit and self.crossfit is not None:
            cf = self.crossfit
            folds = np.array([fold_of(text, cf.seed, cf.folds) for text in texts])[owners]
            logits = (features @ self._fold_coef_t)[np.arange(len(pieces)), folds] + cf.intercept[folds]
        else:
            logits = features @ self.coef + self.intercept
        probs = _sigmoid(logits)
        sums = np.bincount(owners, weights=probs, minlength=len(texts))
        counts = np.bincount(owners, minlength=len(texts))
        return sums / np.maximum(counts, 1)

    def score(self, text: str, crossfit: bool = False) -> float:
        return float(self.score_many([text], crossfit)[0])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "version": VERSION, "settings": asdict(self.settings), **self.info}
        arrays = {"coef": self.coef, "intercept": np.array([self.intercept])}
        if self.crossfit is not None:
            header["crossfit"] = {"seed": self.crossfit.seed, "sources": list(self.crossfit.sources)}
            arrays |= {"fold_coef": self.crossfit.coef, "fold_intercept": self.crossfit.intercept}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays, header=np.array(json.dumps(header)))
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
                folds = (data["fold_coef"], data["fold_intercept"]) if "fold_coef" in data.files else None
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"{path} is not a sparselm quality model: {exc}") from None
        if header.get("format") != FORMAT or header.get("version") not in (1, VERSION):
            raise InputError(f"{path}: unsupported quality model format {header.get('format')}/{header.get('version')}")
        settings = FeatureSettings(**header.pop("settings"))
        if coef.shape != (settings.n_features,):
            raise InputError(f"{path}: coefficient shape {coef.shape} does not match n_features={settings.n_features}")
        crossfit = None
        fold_header = header.pop("crossfit", None)
        if folds is not None and fold_header is not None:
            fold_coef, fold_intercept = folds
            if fold_coef.shape != (len(fold_intercept), settings.n_features):
                raise InputError(f"{path}: fold coefficient shape {fold_coef.shape} does not match its intercepts")
            crossfit = CrossFit(fold_coef, fold_intercept, int(fold_header["seed"]), tuple(fold_header["sources"]))
        for key in ("format", "version"):
            header.pop(key)
        return cls(coef, intercept, settings, header, crossfit)


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
    folds: int = 5  # cross-fitting: fold models that score the training sources' own documents; 0 = none


def _unit(seed: int, key: str) -> float:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=f"quality-{seed}".encode()).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class _Reservoir:
    """Uniform sample of at most ``capacity`` items from a stream (Vitter's algorithm R), seeded."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity, self.rng, self.seen = capacity, rng, 0
        self.items: list[Any] = []

    def add(self, item: Any) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
        else:
            j = int(self.rng.integers(0, self.seen))
            if j < self.capacity:
                self.items[j] = item


def sample_passages(
    docs: Iterable[tuple[str, str]], settings: TrainSettings, source_index: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """(train passages, held-out passages, documents read) of one source: each a capped, uniform sample of
    (passage, cross-fitting fold) pairs. Short documents are packed only with documents of the same split and fold."""
    rng = np.random.default_rng([settings.seed, source_index])
    cap = settings.max_passages_per_source
    held_cap = max(1, round(cap * settings.holdout_fraction))
    pools = {False: _Reservoir(cap - held_cap, rng), True: _Reservoir(held_cap, rng)}
    packs: dict[tuple[bool, int], str] = {}
    size = settings.features.passage_chars
    count = 0
    for key, text in docs:
        count += 1
        held = _unit(settings.seed, key) < settings.holdout_fraction
        fold = fold_of(text, settings.seed, settings.folds)
        for piece in passages(text, size):
            pack = packs.get((held, fold), "")
            joined = f"{pack}\n{piece}" if pack else piece
            if len(joined) < size // 2:
                packs[(held, fold)] = joined  # too short on its own: pack with what follows in the same source
                continue
            pools[held].add((joined, fold))
            packs[(held, fold)] = ""
    for (held, fold), rest in packs.items():
        if rest:
            pools[held].add((rest, fold))
    return pools[False].items, pools[True].items, count


def _mean(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 4) if len(values) else None


def train_classifier(
    sources: list[tuple[str, int, Iterable[tuple[str, str]]]], settings: TrainSettings, workers: int = 1
) -> tuple[QualityModel, dict[str, Any]]:
    """Train on ``(name, label, documents as (key, text))`` sources; label 1 = high quality. Returns the model (with
    ``settings.folds`` fold models for cross-fitting, fitted by up to ``workers`` threads) and its held-out metrics.
    Raises ValueError when a class has no passages, or when a fold holds every training passage of a class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    train: list[tuple[str, int]] = []
    train_y: list[int] = []
    train_src: list[str] = []
    held_x: list[str] = []
    held_y: list[int] = []
    held_src: list[str] = []
    per_source: dict[str, dict[str, Any]] = {}
    for index, (name, label, docs) in enumerate(sources):
        tr, ho, count = sample_passages(docs, settings, index)
        train += tr
        train_y += [label] * len(tr)
        train_src += [name] * len(tr)
        held_x += [text for text, _ in ho]
        held_y += [label] * len(ho)
        held_src += [name] * len(ho)
        per_source[name] = {"label": label, "documents": count, "train_passages": len(tr), "heldout_passages": len(ho)}
    for label in (0, 1):
        if label not in train_y or label not in held_y:
            kind = "positive" if label else "negative"
            raise InputError(f"no {kind} training or held-out passages: give more {kind} documents")
    y_train = np.array(train_y)
    fold_ids = np.array([fold for _, fold in train])
    folds = settings.folds if settings.folds >= 2 else 0
    subsets: list[np.ndarray | None] = [None] + [np.flatnonzero(fold_ids != f) for f in range(folds)]
    for f, rows in enumerate(subsets[1:]):
        if len(np.unique(y_train[rows])) < 2:
            raise InputError(
                f"cross-fitting: without fold {f} there are no positive or no negative training passages; "
                "give more documents or turn cross-fitting off (folds = 0)"
            )
    x_train = _vectorizer(settings.features).transform([text for text, _ in train])

    def fit(rows: np.ndarray | None) -> tuple[np.ndarray, float]:
        clf = LogisticRegression(C=settings.c, class_weight="balanced", solver="liblinear", max_iter=1000)
        clf.fit(x_train if rows is None else x_train[rows], y_train if rows is None else y_train[rows])
        return clf.coef_.reshape(-1).astype(np.float32), float(clf.intercept_[0])

    threads = max(1, min(workers, len(subsets)))
    with ThreadPoolExecutor(threads) as pool:  # liblinear releases the GIL: the fits run in parallel
        fits = list(pool.map(fit, subsets))
    crossfit = None
    if folds:
        crossfit = CrossFit(
            np.stack([coef for coef, _ in fits[1:]]),
            np.array([b for _, b in fits[1:]]),
            settings.seed,
            tuple(per_source),
        )
    model = QualityModel(fits[0][0], fits[0][1], settings.features, {}, crossfit)
    probs = model.passage_probabilities(held_x)
    y = np.array(held_y)
    predicted = (probs >= 0.5).astype(int)
    # The full model on its own training passages (memorised, optimistic) and, with cross-fitting, every training
    # passage scored by the fold model that did not see it: what the pipeline's scores of training sources are.
    train_probs = _sigmoid(x_train @ model.coef + model.intercept)
    out_of_fold = np.full(len(train), np.nan)
    if crossfit is not None:
        for f in range(folds):
            rows = np.flatnonzero(fold_ids == f)
            out_of_fold[rows] = _sigmoid(x_train[rows] @ crossfit.coef[f] + crossfit.intercept[f])
    held_names, train_names = np.array(held_src), np.array(train_src)
    for name in per_source:
        per_source[name]["heldout_mean_score"] = _mean(probs[held_names == name])
        per_source[name]["train_mean_score"] = _mean(train_probs[train_names == name])
        per_source[name]["crossfit_mean_score"] = _mean(out_of_fold[train_names == name]) if folds else None
    metrics = {
        "heldout_passages": len(held_x),
        "train_passages": len(train),
        "precision": round(float(precision_score(y, predicted)), 4),
        "recall": round(float(recall_score(y, predicted)), 4),
        "auc": round(float(roc_auc_score(y, probs)), 4),
        "accuracy": round(float((predicted == y).mean()), 4),
        "folds": folds,
        "crossfit_auc": round(float(roc_auc_score(y_train, out_of_fold)), 4) if folds else None,
        "sources": per_source,
        "settings": {
            **asdict(settings.features),
            "c": settings.c,
            "holdout_fraction": settings.holdout_fraction,
            "folds": folds,
        },
    }
    model.info = {"metrics": metrics}
    return model, metrics
