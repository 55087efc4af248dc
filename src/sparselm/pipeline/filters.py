"""Text normalisation and the Gopher (MassiveText) document-quality and repetition heuristics.

Every filter measures one number per document and keeps the document when the number is inside ``[min, max]``.
Defaults are the thresholds of Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from
Training Gopher", Appendix A.1.1 (quality filters) and Table A1 (repetition filters):

- quality: 50 to 100,000 words; mean word length 3 to 10 characters; symbol-to-word ratio (``#`` and ellipses)
  at most 0.1; at most 90% of lines starting with a bullet; at most 30% of lines ending with an ellipsis; at least
  80% of words with an alphabetic character; at least two English stop words (the, be, to, of, and, that, have,
  with).
- repetition: duplicate lines at most 30% of lines and 20% of characters; duplicate paragraphs likewise; the most
  frequent 2-, 3-, 4-gram at most 20%, 18%, 16% of characters; characters inside duplicated 5- to 10-grams at most
  15%, 14%, 13%, 12%, 11%, 10%.

Words are whitespace-separated tokens (punctuation stays attached, as in the paper's description); lines are the
non-blank lines, paragraphs the blocks between blank lines. Character fractions are over the characters of words
(whitespace excluded). A document is removed by the *first* failing filter in the order configured, which is the
reason recorded for it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from sparselm.errors import InputError

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "‣", "◦", "·", "–", "—", "▪", "●", "○", "■", "□", "➢", "→")
_ALPHA = re.compile(r"[^\W\d_]")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# Unicode space separators (no-break, en/em, ideographic, ...) become a plain space; zero-width ones disappear.
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_NGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: polynomial n-gram hashing with uint64 wrap


def normalize_document(text: str) -> str:
    """NFC, LF line endings, plain spaces, no control characters or trailing spaces, at most one blank line in a
    row, no blank lines at the ends. Returns "" for a document with nothing left."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = _ZERO_WIDTH.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("\n", text + "\n")
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n") + "\n" if text.strip() else ""


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """One uint64 per window of ``n`` consecutive ids (polynomial hash, wrapping arithmetic)."""
    count = len(ids) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    ids = ids.astype(np.uint64, copy=False)
    h = ids[:count].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            h = h * _NGRAM_MULT + ids[k : k + count]
    return h


def group_sorted(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, group starts, group sizes) of equal values: ``values[order]`` is sorted and stable, so the first
    element of each group is the earliest occurrence. A sort plus a diff: much faster than ``np.unique`` here."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(values) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, len(values)])
    return order, starts, sizes


class DocStats:
    """The measurements of one document, each computed once on first use."""

    def __init__(self, text: str) -> None:
        self.text = text

    @cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @cached_property
    def word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))

    @cached_property
    def word_chars(self) -> int:
        return int(self.word_lengths.sum())

    @cached_property
    def _ids_and_vocab(self) -> tuple[np.ndarray, list[str]]:
        vocab: dict[str, int] = {}
        ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in self.words), np.int64, len(self.words))
        return ids, list(vocab)

    @property
    def word_ids(self) -> np.ndarray:
        """Per word, the index of its first distinct spelling: n-grams become integer windows."""
        return self._ids_and_vocab[0]

    @property
    def vocab(self) -> list[str]:
        """Distinct words in id order, so per-word tests run once per distinct word."""
        return self._ids_and_vocab[1]

    @cached_property
    def word_counts(self) -> np.ndarray:
        return np.bincount(self.word_ids, minlength=len(self.vocab))

    @cached_property
    def lines(self) -> list[str]:
        return [line.strip() for line in self.text.split("\n") if line.strip()]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [p.strip() for p in _PARAGRAPH_BREAK.split(self.text) if p.strip()]


def _duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items equal to an earlier item, fraction of characters in those repeated items)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_items = dup_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items / len(items), dup_chars / max(total_chars, 1)


def top_ngram_char_fraction(stats: DocStats, n: int) -> float:
    """Characters covered by the most frequent word n-gram (all its occurrences) over all word characters."""
    h = ngram_hashes(stats.word_ids, n)
    if len(h) == 0 or stats.word_chars == 0:
        return 0.0
    order, starts, sizes = group_sorted(h)
    top = int(np.argmax(sizes))
    if sizes[top] < 2:
        return 0.0  # no n-gram repeats: nothing is "most frequent"
    start = int(order[starts[top]])
    chars = int(stats.word_lengths[start : start + n].sum())
    return float(sizes[top] * chars / stats.word_chars)


def duplicate_ngram_char_fraction(stats: DocStats, n: int) -> float:
    """Characters of words inside any word n-gram that occurs more than once, each character counted once."""
    h = ngram_hashes(stats.word_ids, n)
    if len(h) == 0 or stats.word_chars == 0:
        return 0.0
    order, group_starts, sizes = group_sorted(h)
    repeated = np.repeat(sizes > 1, sizes)  # per sorted position: does its n-gram occur more than once?
    starts = np.sort(order[repeated])
    if len(starts) == 0:
        return 0.0
    cover = np.zeros(len(stats.words) + 1, dtype=np.int64)  # difference array: +1 at a start, -1 after its end
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    covered = np.cumsum(cover[:-1]) > 0
    return float(stats.word_lengths[covered].sum() / stats.word_chars)


def _mean_word_length(s: DocStats) -> float:
    return s.word_chars / len(s.words) if s.words else 0.0


def _symbol_word_ratio(s: DocStats) -> float:
    symbols = s.text.count("#") + s.text.count("...") + s.text.count("…")
    return symbols / max(len(s.words), 1)


def _bullet_lines(s: DocStats) -> float:
    return sum(line.startswith(BULLETS) for line in s.lines) / max(len(s.lines), 1)


def _ellipsis_lines(s: DocStats) -> float:
    return sum(line.endswith(("...", "…")) for line in s.lines) / max(len(s.lines), 1)


def _alpha_words(s: DocStats) -> float:
    if not s.words:
        return 0.0
    alpha = np.fromiter((_ALPHA.search(w) is not None for w in s.vocab), bool, len(s.vocab))
    return float(s.word_counts[alpha].sum() / len(s.words))


def _stop_words(s: DocStats) -> float:
    # Occurrences, not distinct words: "at least two of the following words" read as two hits in the text.
    counts = s.word_counts
    return float(sum(counts[i] for i, w in enumerate(s.vocab) if w.strip(".,;:!?\"'()[]").lower() in STOP_WORDS))


@dataclass(frozen=True)
class FilterSpec:
    name: str
    group: str
    measure: Callable[[DocStats], float]
    min: float | None  # Gopher default lower bound (None: unbounded)
    max: float | None
    doc: str


def _specs() -> list[FilterSpec]:
    q, r = "gopher_quality", "gopher_repetition"
    specs = [
        FilterSpec("word_count", q, lambda s: float(len(s.words)), 50, 100_000, "words in the document"),
        FilterSpec("mean_word_length", q, _mean_word_length, 3.0, 10.0, "mean characters per word"),
        FilterSpec("symbol_word_ratio", q, _symbol_word_ratio, None, 0.1, "(# + ellipses) per word"),
        FilterSpec("bullet_lines", q, _bullet_lines, None, 0.9, "fraction of lines starting with a bullet"),
        FilterSpec("ellipsis_lines", q, _ellipsis_lines, None, 0.3, "fraction of lines ending with an ellipsis"),
        FilterSpec("alpha_words", q, _alpha_words, 0.8, None, "fraction of words with an alphabetic character"),
        FilterSpec("stop_words", q, _stop_words, 2, None, "occurrences of the 8 Gopher stop words"),
        FilterSpec(
            "duplicate_lines", r, lambda s: _duplicate_fractions(s.lines)[0], None, 0.30, "fraction of lines repeated"
        ),
        FilterSpec(
            "duplicate_line_chars",
            r,
            lambda s: _duplicate_fractions(s.lines)[1],
            None,
            0.20,
            "fraction of line characters in repeated lines",
        ),
        FilterSpec(
            "duplicate_paragraphs",
            r,
            lambda s: _duplicate_fractions(s.paragraphs)[0],
            None,
            0.30,
            "fraction of paragraphs repeated",
        ),
        FilterSpec(
            "duplicate_paragraph_chars",
            r,
            lambda s: _duplicate_fractions(s.paragraphs)[1],
            None,
            0.20,
            "fraction of paragraph characters in repeated paragraphs",
        ),
    ]
    for n, limit in ((2, 0.20), (3, 0.18), (4, 0.16)):
        specs.append(
            FilterSpec(
                f"top_{n}gram",
                r,
                lambda s, n=n: top_ngram_char_fraction(s, n),
                None,
                limit,
                f"character fraction of the most frequent {n}-gram",
            )
        )
    for n, limit in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)):
        specs.append(
            FilterSpec(
                f"duplicate_{n}grams",
                r,
                lambda s, n=n: duplicate_ngram_char_fraction(s, n),
                None,
                limit,
                f"character fraction in duplicated {n}-grams",
            )
        )
    return specs


FILTERS: dict[str, FilterSpec] = {spec.name: spec for spec in _specs()}
GROUPS: dict[str, list[str]] = {}
for _spec in FILTERS.values():
    GROUPS.setdefault(_spec.group, []).append(_spec.name)


def expand_filter_names(names: list[str]) -> list[str]:
    """Group names ("gopher_quality", "gopher_repetition", "all") and filter names -> filter names, in order.

    A name prefixed with "-" removes that filter (or group) from what came before, e.g. ["all", "-word_count"].
    Raises ValueError naming an unknown filter.
    """
    out: list[str] = []
    for raw in names:
        negate = raw.startswith("-")
        name = raw[1:] if negate else raw
        if name == "all":
            members = list(FILTERS)
        elif name in GROUPS:
            members = GROUPS[name]
        elif name in FILTERS:
            members = [name]
        else:
            known = ", ".join(["all", *GROUPS, *FILTERS])
            raise InputError(f"unknown filter {name!r} (known: {known})")
        for member in members:
            if negate and member in out:
                out.remove(member)
            elif not negate and member not in out:
                out.append(member)
    return out


@dataclass(frozen=True)
class BoundFilter:
    """A filter with its bounds for one source."""

    name: str
    min: float | None
    max: float | None

    def check(self, stats: DocStats) -> tuple[bool, float]:
        value = FILTERS[self.name].measure(stats)
        ok = (self.min is None or value >= self.min) and (self.max is None or value <= self.max)
        return ok, value


def first_failure(text: str, filters: list[BoundFilter]) -> tuple[str, float] | None:
    """(filter name, measured value) of the first filter the document fails, or None if it passes them all."""
    stats = DocStats(text)
    for f in filters:
        ok, value = f.check(stats)
        if not ok:
            return f.name, value
    return None
