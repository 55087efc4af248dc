"""Format adapters and prompt templates: turn a task's data file into scored examples, counting what is unusable.

Formats (the ``format`` key of a task):

- ``jsonl``: one JSON object per line (blank lines ignored); a line that is not a JSON object is skipped and counted.
- ``lines``: one record ``{"text": line}`` per non-blank line.
- ``text``: the whole file is one record ``{"text": ...}``.
- ``wikitext``: the word-tokenized WikiText files (``wiki.test.tokens``): one record per article, an article
  starting at each top-level heading line `` = Title = ``.

An example that cannot be scored (a missing field, no answer, a gold label outside the choices...) is skipped and
counted under its reason, never scored as a guess; the counts are reported with the results.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sparselm.errors import InputError
from sparselm.eval.tasks import TaskSpec, resolve_data_path

_HEADING = re.compile(r"^ = [^=].* = $")
_FIELD = re.compile(r"\{\{|\}\}|\{(\w+)\}")


class SkipExample(ValueError):
    """This record cannot be turned into an example; the message is the reason counted in the report."""


@dataclass
class Example:
    index: int  # record number in the data file, 0-based
    contexts: list[str]  # one context, or one per option (partial scoring)
    continuations: list[str] = field(default_factory=list)  # the choices, or the one shared continuation
    gold: int = 0
    answers: list[str] = field(default_factory=list)  # generate: every accepted answer
    original: str = ""  # perplexity: the text as stored (words and bytes are counted on it)
    demo: str = ""  # this example solved, as a few-shot demonstration


@dataclass
class TaskData:
    examples: list[Example]
    records: int  # records in the file (usable or not)
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def render(template: str, record: dict) -> str:
    """Substitute ``{field}`` with ``record[field]`` (strings and numbers only); ``{{``/``}}`` are literal braces."""

    def substitute(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        if name not in record or record[name] is None:
            raise SkipExample(f"missing field '{name}'")
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise SkipExample(f"field '{name}' is not a string")
        return str(value)

    return _FIELD.sub(substitute, template)


def read_records(path: Path, fmt: str) -> list[dict | None]:
    """The file's records in order; ``None`` stands for a malformed line (kept so label files stay aligned)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text: {exc}") from exc
    if fmt == "text":
        return [{"text": text}]
    # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085... which occur inside JSON strings.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if fmt == "lines":
        return [{"text": line} for line in lines if line.strip()]
    if fmt == "wikitext":
        return [{"text": article} for article in split_wikitext(text)]
    records: list[dict | None] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        records.append(record if isinstance(record, dict) else None)
    return records


def split_wikitext(text: str) -> list[str]:
    """Articles of a tokenized WikiText file, each from its `` = Title = `` line up to the next one."""
    articles: list[list[str]] = []
    for line in text.split("\n"):
        if _HEADING.match(line) or not articles:
            if not articles and not line.strip():
                continue  # blank lines before the first heading belong to no article
            articles.append([])
        articles[-1].append(line)
    return ["\n".join(lines) for lines in articles]


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's word tokenization before scoring (the rules lm-eval and GPT-2 used for WikiText)."""
    for old, new in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("s '", "s'")):
        text = text.replace(old, new)
    for mark in (":", ";", ".", "!", "?", ","):
        text = text.replace(f" {mark} ", f"{mark} ")
    for open_, close in (("(", ")"), ("[", "]"), ("{", "}")):
        text = re.sub(rf"\{open_}\s*([^\{close}]*?)\s*\{close}", rf"{open_}\1{close}", text)
    for quote in ('"', "'"):
        text = re.sub(rf"{quote}\s*([^{quote}]*?)\s*{quote}", rf"{quote}\1{quote}", text)
    text = text.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    text = text.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    return text.replace(" N ", " 1 ").replace(" 's", "'s")


def _gold_index(value: object, choices: list[str]) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or value is None:
        raise SkipExample("no gold label")
    if isinstance(value, int):
        if not 0 <= value < len(choices):
            raise SkipExample("gold label outside the choices")
        return value
    if isinstance(value, str):
        if value not in choices:
            raise SkipExample("gold answer not among the choices")
        return choices.index(value)
    raise SkipExample("gold label is not an index or a string")


def _string_list(value: object, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise SkipExample(f"{what} is not a string or a non-empty list of strings")


def make_example(spec: TaskSpec, record: dict, index: int) -> Example:
    """One record -> one example of the task's kind (raises SkipExample with the reason when it cannot)."""
    delim = spec.target_delimiter
    if spec.kind == "multiple_choice":
        context = render(spec.prompt, record)
        if spec.choices:
            choices = [render(c, record) for c in spec.choices]
        else:
            choices = _string_list(record.get(spec.choices_field), f"field '{spec.choices_field}'")
        gold = _gold_index(record.get(spec.gold_field), choices)
        return Example(index, [context], choices, gold, demo=context + delim + choices[gold])
    if spec.kind == "partial":
        contexts = _string_list(record.get(spec.contexts_field), f"field '{spec.contexts_field}'")
        continuation = render(spec.continuation, record)
        if not continuation.strip():
            raise SkipExample("empty continuation")
        gold = _gold_index(record.get(spec.gold_field), contexts)
        return Example(index, contexts, [continuation], gold, demo=contexts[gold] + delim + continuation)
    if spec.kind == "last_word":
        text = render(spec.prompt, record).rstrip()
        context, space, word = text.rpartition(" ")
        if not space or not word:
            raise SkipExample("no last word")
        # The target carries its own space (lm-eval's lambada_openai): the delimiter is not used here.
        return Example(index, [context], [" " + word], demo=text)
    if spec.kind == "generate":
        context = render(spec.prompt, record)
        answers: list[str] = []
        for name in spec.answers_field:
            if record.get(name) not in (None, "", []):
                answers += [a for a in _string_list(record[name], f"field '{name}'") if a not in answers]
        answers = [a for a in answers if a.strip()]
        if not answers:
            raise SkipExample("no answer")
        return Example(index, [context], answers=answers, demo=context + delim + answers[0])
    text = render(spec.prompt, record)
    if not text.strip():
        raise SkipExample("empty text")
    scored = detokenize_wikitext(text) if spec.detokenize == "wikitext" else text
    return Example(index, [scored], original=text)


def _apply_labels(spec: TaskSpec, records: list[dict | None], data_dir: Path | None) -> None:
    path = resolve_data_path(spec, spec.labels, data_dir)
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(records):
        raise InputError(f"task {spec.name!r}: {path} has {len(labels)} labels for {len(records)} records")
    for record, label in zip(records, labels, strict=True):
        if record is not None:
            record.setdefault(spec.gold_field or "label", label)


def load_examples(spec: TaskSpec, data_dir: Path | None, which: str = "data") -> TaskData:
    """Read ``spec.data`` (or ``spec.fewshot_data``) into examples; unusable records are counted, not scored."""
    path = resolve_data_path(spec, getattr(spec, which), data_dir)
    records = read_records(path, spec.format)
    if spec.labels and which == "data":
        _apply_labels(spec, records, data_dir)
    examples, skipped = [], Counter()
    for index, record in enumerate(records):
        try:
            if record is None:
                raise SkipExample("malformed line (not a JSON object)")
            examples.append(make_example(spec, record, index))
        except SkipExample as exc:
            skipped[str(exc)] += 1
    return TaskData(examples, len(records), skipped)
