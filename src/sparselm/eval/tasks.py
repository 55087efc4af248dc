"""Task definitions: small TOML (or YAML) files naming a data file, its format, a prompt template and the answer.

A task file, e.g. ``piqa.toml``::

    name = "piqa"
    kind = "multiple_choice"            # multiple_choice | partial | last_word | generate | perplexity
    data = "piqa/valid.jsonl"           # resolved against --data-dir, then against the task file's folder
    format = "jsonl"                    # jsonl | lines | text | wikitext (see formats.py)
    labels = "piqa/valid-labels.lst"    # optional: one gold label per line, aligned with the records
    prompt = "Question: {goal}\\nAnswer:"
    choices = ["{sol1}", "{sol2}"]      # or choices_field = "choices" (a field holding a list)
    gold_field = "label"                # an index into the choices, or the text of the right choice
    metrics = ["acc", "acc_norm"]

Templates substitute ``{field}`` with the record's field (``{{`` and ``}}`` are literal braces); nothing else is
evaluated, so a task file cannot run code. The built-in tasks live in ``sparselm/eval/tasks/*.toml``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sparselm.errors import ConfigError, InputError

BUILTIN_DIR = Path(__file__).with_name("tasks")
DATA_ENV = "SPARSELM_EVAL_DATA"

# Metrics each kind can report; a task lists a subset (default: all of them, in this order).
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm"),
    "partial": ("acc",),
    "last_word": ("acc", "perplexity"),
    "generate": ("em", "f1"),
    "perplexity": ("word_perplexity", "token_perplexity", "byte_perplexity", "bits_per_byte"),
}
FORMATS = ("jsonl", "lines", "text", "wikitext")
DETOKENIZERS = ("", "wikitext")


@dataclass
class TaskSpec:
    name: str
    kind: str
    data: str
    format: str = "jsonl"
    description: str = ""
    labels: str = ""
    fewshot_data: str = ""  # a pool of demonstrations in the same format; default: the task's own other examples
    prompt: str = "{text}"
    choices: list[str] = field(default_factory=list)
    choices_field: str = ""
    contexts_field: str = ""  # partial scoring: a field holding one context per option
    continuation: str = ""  # partial scoring: the shared continuation (a template)
    gold_field: str = ""
    answers_field: list[str] = field(default_factory=list)  # generate: fields holding a string or list of strings
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    max_gen_tokens: int = 32
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    detokenize: str = ""
    metrics: list[str] = field(default_factory=list)
    source: Path | None = None  # the file it was read from

    def validate(self) -> None:
        where = f"task {self.name!r} ({self.source})" if self.source else f"task {self.name!r}"
        if self.kind not in KIND_METRICS:
            raise ConfigError(f"{where}: kind must be one of {', '.join(KIND_METRICS)}, got {self.kind!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"{where}: format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.detokenize not in DETOKENIZERS:
            raise ConfigError(f"{where}: detokenize must be empty or 'wikitext', got {self.detokenize!r}")
        if not self.data:
            raise ConfigError(f"{where}: 'data' (the data file) is required")
        allowed = KIND_METRICS[self.kind]
        self.metrics = list(self.metrics or allowed)
        bad = [m for m in self.metrics if m not in allowed]
        if bad:
            raise ConfigError(f"{where}: metric {bad[0]!r} is not available for kind {self.kind!r} ({allowed})")
        needs = {
            "multiple_choice": ("gold_field", "choices or choices_field", bool(self.choices or self.choices_field)),
            "partial": (
                "gold_field",
                "contexts_field and continuation",
                bool(self.contexts_field and self.continuation),
            ),
            "generate": ("answers_field", "prompt", bool(self.prompt)),
        }
        if self.kind in needs:
            answer_key, other, present = needs[self.kind]
            if not getattr(self, answer_key):
                raise ConfigError(f"{where}: kind {self.kind!r} needs {answer_key}")
            if not present:
                raise ConfigError(f"{where}: kind {self.kind!r} needs {other}")
        if self.choices and self.choices_field:
            raise ConfigError(f"{where}: give either choices or choices_field, not both")
        if self.max_gen_tokens < 1:
            raise ConfigError(f"{where}: max_gen_tokens must be >= 1, got {self.max_gen_tokens}")


_FIELDS = {f.name: f for f in dataclasses.fields(TaskSpec) if f.name != "source"}


def _read_mapping(path: Path) -> dict:
    if path.suffix == ".toml":
        try:
            with open(path, "rb") as f:
                return tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"{path}: YAML task files need PyYAML: pip install 'sparselm[eval]'") from exc
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a task file must be a mapping of keys to values")
        return raw
    raise ConfigError(f"{path}: a task file must end in .toml, .yaml or .yml")


def task_from_file(path: str | Path) -> TaskSpec:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    raw = _read_mapping(path)
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_FIELDS))})")
    values = {"name": path.stem, **raw}
    for key, value in values.items():
        expected = _FIELDS[key].type
        ok = (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
            if expected.startswith("list")
            else isinstance(value, int) and not isinstance(value, bool)
            if expected == "int"
            else isinstance(value, str)
        )
        if not ok:
            raise ConfigError(f"{path}: {key} must be {expected}, got {value!r}")
    for key in ("kind", "data"):
        if key not in values:
            raise ConfigError(f"{path}: missing required key {key!r}")
    spec = TaskSpec(**values, source=path)
    spec.validate()
    return spec


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_task(name_or_path: str) -> TaskSpec:
    """A built-in task by name, or a task file by path."""
    path = Path(name_or_path)
    if path.suffix in (".toml", ".yaml", ".yml") or os.sep in name_or_path:
        return task_from_file(path)
    builtin = BUILTIN_DIR / f"{name_or_path}.toml"
    if builtin.is_file():
        return task_from_file(builtin)
    raise InputError(
        f"unknown task {name_or_path!r}: give a task file (.toml/.yaml) or one of {', '.join(builtin_tasks())}"
    )


def resolve_data_dir(arg: str | Path | None) -> Path:
    """--data-dir, else $SPARSELM_EVAL_DATA, else ../shared/data relative to the working directory if it exists."""
    if arg:
        path = Path(arg)
        source = "--data-dir"
    elif os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV])
        source = f"${DATA_ENV}"
    else:
        path = Path("..") / "shared" / "data"
        if not path.is_dir():
            raise FileNotFoundError(
                f"no evaluation data directory: pass --data-dir DIR or set {DATA_ENV} "
                "(the folder holding lambada/, piqa/, llm-foundry-eval/, wikitext-2/)"
            )
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation data directory {path} (from {source}) does not exist")
    return path


def resolve_data_path(spec: TaskSpec, relative: str, data_dir: Path | None) -> Path:
    """A task's data path: absolute as is; else under the data directory, else next to the task file."""
    path = Path(relative).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [d / path for d in (data_dir, spec.source.parent if spec.source else None) if d is not None]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates) or relative
    raise FileNotFoundError(f"task {spec.name!r}: data file {relative!r} not found (tried {tried}); pass --data-dir")
