"""Gopher quality and repetition filters on hand-made documents, and text normalisation."""

from __future__ import annotations

import pytest

from sparselm.pipeline.filters import (
    FILTERS,
    GROUPS,
    BoundFilter,
    DocStats,
    duplicate_ngram_char_fraction,
    expand_filter_names,
    first_failure,
    normalize_document,
    top_ngram_char_fraction,
)

GOOD = """The river had been rising for three days, and by the morning of the fourth the lower fields were under
water. My grandfather walked out to the edge of the orchard with a lantern and a long stick, measuring the depth
at each fence post and writing the numbers in a small notebook that he kept in his coat.

He said that the last time the water came this high was the year his father built the barn, and that the old
men in the village had warned them not to build so close to the bend. Nobody listened to them then, and nobody
listens now, he said, but the river always remembers where it used to go.
"""


def unique_words(n: int, tag: str = "w") -> list[str]:
    """Distinct alphabetic words of normal length, so they never form repeated n-grams by accident."""
    letters = "abcdefghij"
    return [tag + "".join(letters[int(d)] for d in f"{i:04d}") for i in range(n)]


def prose_lines(n: int) -> list[str]:
    """n distinct ordinary sentences (stop words, normal word lengths)."""
    return [f"The {w} walked to the market and came back with bread for the family." for w in unique_words(n, "p")]


def defaults(name: str) -> BoundFilter:
    spec = FILTERS[name]
    return BoundFilter(name, spec.min, spec.max)


def check(name: str, text: str) -> tuple[bool, float]:
    return defaults(name).check(DocStats(normalize_document(text)))


def test_good_document_passes_every_filter_with_the_paper_defaults() -> None:
    assert first_failure(normalize_document(GOOD), [defaults(n) for n in FILTERS]) is None


FAILING = {
    "word_count": "The cat sat on the mat and that was all there was to say.",
    "mean_word_length": " ".join(["a b c to of in the an it is"] * 10),
    "symbol_word_ratio": GOOD + " ".join(f"#tag{i}" for i in range(30)),
    "bullet_lines": "\n".join(f"• item {w} with the price and the size" for w in unique_words(12)),
    "ellipsis_lines": "\n".join([line[:-1] + "..." for line in prose_lines(10)[:4]] + prose_lines(10)[4:]),
    "alpha_words": GOOD + " " + " ".join(str(1000 + i) for i in range(60)),
    "stop_words": " ".join(f"Buy cheap {w} now" for w in unique_words(20)),
    "duplicate_lines": "\n".join(prose_lines(5) + ["Click here to subscribe to our newsletter today."] * 5),
    "duplicate_line_chars": "\n".join(
        ["The " + " ".join(unique_words(60, "x")) + " and the end."] * 2 + prose_lines(8)
    ),
    "duplicate_paragraphs": "\n\n".join(prose_lines(5) + ["Share this story with the people you love."] * 5),
    "duplicate_paragraph_chars": "\n\n".join(
        ["The " + " ".join(unique_words(60, "y")) + " and the end."] * 2 + prose_lines(8)
    ),
    "top_2gram": " ".join(f"cheap flights {w} to the sea" for w in unique_words(40)),
    "top_3gram": " ".join(f"best hotel deals {w} and the" for w in unique_words(40)),
    "top_4gram": " ".join(f"buy now and save {w} with the" for w in unique_words(40)),
}
SENTENCE = "the quick brown fox jumps over the lazy dog again and again today"
for _n in range(5, 11):  # one repeated sentence makes ~20% of the characters sit in duplicated n-grams
    FAILING[f"duplicate_{_n}grams"] = " ".join(unique_words(50, "z")) + f" {SENTENCE} " * 2 + "and the end"


@pytest.mark.parametrize("name", list(FILTERS))
def test_each_filter_rejects_its_hand_made_bad_document_and_keeps_the_good_one(name: str) -> None:
    ok, value = check(name, GOOD)
    assert ok, f"{name} rejected the good document (value {value})"
    ok, value = check(name, FAILING[name])
    assert not ok, f"{name} kept its bad document (value {value})"


def test_word_count_upper_bound_and_overridden_bounds() -> None:
    huge = " ".join(["the"] * 100_001)
    assert not check("word_count", huge)[0]
    assert BoundFilter("word_count", 50, 1_000_000).check(DocStats(huge))[0]
    assert first_failure("one two three", [BoundFilter("word_count", None, None)]) is None


def test_first_failure_reports_the_first_failing_filter_in_order() -> None:
    text = normalize_document(FAILING["duplicate_lines"])
    order = [defaults("duplicate_line_chars"), defaults("duplicate_lines")]
    assert first_failure(text, order)[0] == "duplicate_line_chars"
    assert first_failure(text, order[::-1])[0] == "duplicate_lines"


def test_ngram_measures_on_exact_counts() -> None:
    # "a b" appears 3 times: 3 * 2 characters of 10 word characters.
    assert top_ngram_char_fraction(DocStats("a b a b a b x y z w"), 2) == pytest.approx(0.6)
    # 5-gram "a b c d e" twice -> those 10 of 12 words (1 char each) are covered.
    assert duplicate_ngram_char_fraction(DocStats("a b c d e a b c d e f g"), 5) == pytest.approx(10 / 12)
    assert duplicate_ngram_char_fraction(DocStats(" ".join(unique_words(30))), 5) == 0.0


def test_expand_filter_names_groups_and_exclusions() -> None:
    assert expand_filter_names(["gopher_quality"]) == GROUPS["gopher_quality"]
    names = expand_filter_names(["all", "-word_count", "-gopher_repetition"])
    assert names == [n for n in GROUPS["gopher_quality"] if n != "word_count"]
    with pytest.raises(ValueError, match="unknown filter 'nope'"):
        expand_filter_names(["nope"])


def test_normalize_document() -> None:
    raw = "\ufeffCafe\u0301 au\u00a0lait\u200b  \r\n\r\n\r\n\r\nsecond\tline   \rthird\x07\n\n\n"
    assert normalize_document(raw) == "Café au lait\n\nsecond\tline\nthird\n"
    assert normalize_document(" \n\t\n\u200b\n") == ""
