"""The embedded default corpus: ten public-domain English books (see ``SOURCES.md`` next to this file).

Small enough to ship inside the package (about 1.3 MB gzip-compressed, 3.5 MB of text), so a tokenizer and a toy
model can be trained with no download. Each ``.txt.gz`` file is one plain-text document for ``iter_documents``.
"""

from __future__ import annotations

from pathlib import Path

CORPUS_DIR = Path(__file__).parent


def default_corpus_files() -> list[Path]:
    """Paths of the embedded books, sorted by name."""
    files = sorted(CORPUS_DIR.glob("*.txt.gz"))
    if not files:
        raise FileNotFoundError(f"no embedded corpus files in {CORPUS_DIR}; the sparselm installation is incomplete")
    return files
