"""Project Gutenberg books without their boilerplate: the header, the volunteers' credits and the licence footer."""

from __future__ import annotations

import re

_PG_START = re.compile(
    # The marker's closing *** sometimes wraps onto the next line, so allow a short run without '*' before it.
    r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG(?:[^*]{0,300}\*{3})?"
    r"|\*END\*THE SMALL PRINT)[^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_PG_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG|End of (?:the |this )?Project Gutenberg)",
    re.IGNORECASE | re.MULTILINE,
)
# Volunteer and transcriber credits that PG puts right after the start marker; not part of the book.
_PG_CREDITS = re.compile(
    r"\A\s*(?:Produced by|(?:Text|HTML) file produced by|E-?text prepared by|This e-?text was (?:created|prepared) by"
    r"|Transcribed (?:from|by))[^\n]*(?:\n[^\n]+)*",
    re.IGNORECASE,
)


def book_text(text: str) -> tuple[str, bool]:
    """``text`` with LF line endings and no leading byte-order mark, and without the Project Gutenberg boilerplate
    when it has PG markers; and whether it had them."""
    text = normalize_text(text)
    if ("GUTENBERG" in text or "Gutenberg" in text or "SMALL PRINT" in text) and (
        stripped := strip_gutenberg(text)
    ) is not None:
        return stripped, True
    return text, False


def normalize_text(text: str) -> str:
    """Unify line endings to LF and drop a leading byte-order mark."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def strip_gutenberg(text: str) -> str | None:
    """Return the book without the Project Gutenberg header, credits and licence footer, or None if no markers."""
    # Some files repeat the start marker after a title block; the last one is where the book begins.
    start_match = None
    for start_match in _PG_START.finditer(text):  # noqa: B007 - only the last match is wanted
        pass
    start = start_match.end() if start_match else 0
    end_match = _PG_END.search(text, start)
    if start_match is None and end_match is None:
        return None
    body = text[start : end_match.start() if end_match else len(text)]
    if start_match:
        for _ in range(2):  # a text-file credit is often followed by an HTML-file credit
            body = _PG_CREDITS.sub("", body, count=1)
    return body.strip("\n") + "\n"
