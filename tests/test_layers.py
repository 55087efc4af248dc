"""The import rules of docs/architecture.md: each package imports only from the layers below it, and neither the
model nor the trainer imports torch.distributed (parallelism is applied to the model from outside)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sparselm"

# layer of each top-level module or package of sparselm (docs/architecture.md, "Layers, bottom to top")
LAYERS = {
    "errors": 0, "corpus": 0,
    "config": 1, "config_loader": 1,
    "data": 2, "ops": 2, "precision": 2, "host_memory": 2, "optim": 2, "params": 2,
    "model": 3,
    "parallel": 4,
    "checkpoint": 5,
    "train": 6, "eval": 6, "pipeline": 6, "interop": 6, "serve": 6, "retro": 6, "plan": 6,
    "experiment": 7,
    "cli": 8, "__main__": 8,
}  # fmt: skip

# A job may use another job only through these interfaces (eval's Scorer is how interop's cross-check and
# retrieval evaluation score text; the trainer is how studies and retrieval training train).
ALLOWED_ACROSS_JOBS = {("interop", "eval"), ("retro", "eval"), ("retro", "train"), ("plan", "train")}


def _top(module: Path) -> str:
    rel = module.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported dotted name, line) for every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = ["sparselm", *path.relative_to(PACKAGE).parent.parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            found.append((name, node.lineno))
    return found


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    missing = sorted({_top(p) for p in _sources()} - set(LAYERS) - {"__init__"})
    assert not missing, f"add {missing} to LAYERS here and to docs/architecture.md"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down(path: Path) -> None:
    own = _top(path)
    if own == "__init__":
        return
    for name, line in _imports(path):
        parts = name.split(".")
        if parts[0] != "sparselm" or len(parts) < 2:
            continue
        target = parts[1]
        if target == own:
            continue
        where = f"{path.relative_to(PACKAGE)}:{line} imports {name}"
        assert LAYERS[target] <= LAYERS[own], f"{where}: layer {LAYERS[target]} is above {own}'s {LAYERS[own]}"
        if LAYERS[target] == LAYERS[own] == LAYERS["train"]:
            assert (own, target) in ALLOWED_ACROSS_JOBS, f"{where}: jobs do not import each other"


@pytest.mark.parametrize("package", ["model", "train", "ops"])
def test_no_torch_distributed_in(package: str) -> None:
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for name, line in _imports(path):
            assert not name.startswith("torch.distributed"), f"{path.relative_to(PACKAGE)}:{line} imports {name}"


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.glob("*.py")), ids=lambda p: p.name)
def test_tests_use_only_public_names(path: Path) -> None:
    """Tests go through the interfaces: a private name of sparselm imported by a test pins an implementation."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparselm"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{path.name}:{node.lineno} imports {private} from {node.module}"
