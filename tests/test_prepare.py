"""Reading inputs and preparing token shards: input kinds, bad data counted per file, splits, atomicity, determinism."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from sparselm.data import prepare as prepare_module
from sparselm.data.prepare import META_FILE, prepare
from sparselm.data.reader import ReadStats, iter_documents, strip_gutenberg
from sparselm.data.tokenizer import Tokenizer

GOOD = {
    "plain.txt": "Plain text file.\nSecond line.\n",
    "crlf.txt": "Windows\r\nline endings\r\n",
    "nested/deeper/notes.md": "Markdown notes in a subdirectory.\n",
    "nested/README": "A file without an extension.\n",
    "book.txt.gz": "A gzip-compressed plain text book.\n",
}


def gz_bytes(text: str) -> bytes:
    return gzip.compress(text.encode("utf-8"), mtime=0)


def jsonl(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


@pytest.fixture()
def messy(tmp_path: Path) -> Path:
    """A directory with every supported input kind and every kind of bad input, each in its own file."""
    root = tmp_path / "inputs"
    for name, text in GOOD.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gz_bytes(text) if name.endswith(".gz") else text.encode())
    (root / "bad_utf8.txt").write_bytes(b"caf\xe9 au lait \xff\xfe ok\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.text").write_bytes(b"  \n\n\t\n")
    (root / "records.jsonl").write_text(
        jsonl(
            {"text": "First JSON document."},
            "{not json at all",
            {"body": "no text field"},
            {"text": 42},
            ["a", "list"],
            "",
            {"text": ""},
            {"text": "Second JSON document.", "id": 7},
        )
    )
    (root / "more.jsonl.gz").write_bytes(gz_bytes(jsonl({"text": "Gzipped JSONL document."})))
    full = gz_bytes(jsonl(*({"text": f"Truncated stream record {i}."} for i in range(2000))))
    (root / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])
    text_gz = gz_bytes("Start of a truncated text file. " + " ".join(f"w{i * 7919 % 10007}" for i in range(20_000)))
    (root / "cut.txt.gz").write_bytes(text_gz[: len(text_gz) // 2])
    (root / "ignored.csv").write_text("a,b\n1,2\n")
    (root / ".hidden.txt").write_text("hidden files are never read\n")
    return root


def test_iter_documents_reads_every_kind_and_counts_every_problem(messy: Path) -> None:
    stats = ReadStats()
    docs = list(iter_documents([messy], stats=stats))
    texts = [d.text for d in docs]
    for text in GOOD.values():
        assert text.replace("\r\n", "\n") in texts
    assert "caf\ufffd au lait \ufffd\ufffd ok\n" in texts  # decoded with replacement, not dropped
    assert [d.text for d in docs if d.source.endswith("s.jsonl")] == ["First JSON document.", "Second JSON document."]
    assert [d.index for d in docs if d.source.endswith("records.jsonl")] == [0, 7]  # line numbers
    assert "Gzipped JSONL document." in texts
    cut = [d.text for d in docs if d.source.endswith("cut.jsonl.gz")]
    assert 0 < len(cut) < 2000 and cut == [f"Truncated stream record {i}." for i in range(len(cut))]
    cut_text = next(d.text for d in docs if d.source.endswith("cut.txt.gz"))
    assert cut_text.startswith("Start of a truncated text file. w0 w7919 ") and 1000 < len(cut_text) < 100_000

    def counters(name: str) -> dict[str, int]:
        return stats.files[str(messy / name)]

    assert counters("bad_utf8.txt")["invalid_utf8"] == 1
    assert counters("empty.txt")["empty_documents"] == 1
    assert counters("blank.text")["empty_documents"] == 1
    records = counters("records.jsonl")
    assert (records["documents"], records["malformed_json"], records["missing_text_field"]) == (2, 2, 1)
    assert (records["non_string_text"], records["empty_documents"]) == (1, 1)
    assert counters("cut.jsonl.gz")["truncated_gzip"] == 1
    assert counters("cut.txt.gz")["truncated_gzip"] == 1
    assert counters("cut.txt.gz")["invalid_utf8"] == 0
    assert counters("crlf.txt")["documents"] == 1 and counters("crlf.txt")["bytes"] == len(GOOD["crlf.txt"])
    assert stats.skipped == [str(messy / "ignored.csv")]
    assert not any(".hidden" in s for s in stats.files)
    problems = {(Path(src).name, key) for src, key, _ in stats.problems()}
    assert ("records.jsonl", "malformed_json") in problems and ("plain.txt", "invalid_utf8") not in problems
    totals = stats.totals()
    assert totals["documents"] == len(docs) and totals["files"] == len(stats.files)


def test_directory_order_is_sorted_and_missing_input_raises(messy: Path) -> None:
    sources = [d.source for d in iter_documents([messy])]
    assert sources == sorted(sources, key=lambda s: Path(s).relative_to(messy).parts)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        iter_documents([messy, messy / "does-not-exist"])  # raised at call time, before reading anything


def test_json_lone_surrogate_is_replaced_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "bad \\ud800 surrogate"}\n{"text": "fine \\ud83d\\ude00 pair"}\n')
    stats = ReadStats()
    texts = [d.text for d in iter_documents([path], stats=stats)]
    assert texts[1] == "fine 😀 pair" and "\ud800" not in texts[0]
    texts[0].encode("utf-8")  # must be encodable, or SentencePiece would fail on it later
    assert stats.files[str(path)]["invalid_utf8"] == 1


def test_gutenberg_boilerplate_is_stripped() -> None:
    book = (
        "The Project Gutenberg EBook of Something\r\nLicence blah\r\n\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING\r\nWRAPPED ***\r\n\r\n\r\n"
        "Produced by Some Volunteer\r\nand another\r\n\r\n"
        "CHAPTER I\r\n\r\nThe actual story.\r\n\r\n"
        "End of the Project Gutenberg EBook of Something\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\nThe licence...\r\n"
    )
    assert strip_gutenberg(book.replace("\r\n", "\n")) == "CHAPTER I\n\nThe actual story.\n"
    assert strip_gutenberg("An ordinary text about Gutenberg's press.\n") is None


def read_split(data_dir: Path, split: str) -> np.ndarray:
    meta = json.loads((data_dir / META_FILE).read_text())
    files = [data_dir / s["file"] for s in meta["splits"][split]["shards"]]
    return np.concatenate([np.fromfile(f, dtype=meta["dtype"]) for f in files] or [np.empty(0, np.uint16)])


def split_documents(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    """Decode a split's token stream back into its documents (every document ends with eod)."""
    assert len(tokens) == 0 or tokens[-1] == tok.eod_id
    ends = np.flatnonzero(tokens == tok.eod_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[a:b]) for a, b in zip(starts, ends, strict=True)]


def test_prepare_messy_inputs_with_workers(messy: Path, tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "data"
    meta = prepare([messy], tiny_tokenizer.path, out, val_fraction=0.3, workers=2, shard_tokens=50, progress=False)
    assert json.loads((out / META_FILE).read_text()) == meta
    expected = [d.text for d in iter_documents([messy])]
    train = split_documents(read_split(out, "train"), tiny_tokenizer)
    val = split_documents(read_split(out, "val"), tiny_tokenizer)
    assert sorted(train + val) == sorted(expected)  # every good document, exactly once, decoded exactly
    assert train and val
    for split, docs in (("train", train), ("val", val)):
        info = meta["splits"][split]
        assert info["documents"] == len(docs)
        assert info["tokens"] == sum(len(tiny_tokenizer.encode(d)) + 1 for d in docs)
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        assert all(s["tokens"] <= 50 for s in info["shards"])
        for shard in info["shards"]:
            assert (out / shard["file"]).stat().st_size == 2 * shard["tokens"]
    assert meta["dtype"] == "uint16" and meta["eod_id"] == tiny_tokenizer.eod_id == 2
    assert meta["vocab_size"] == tiny_tokenizer.vocab_size
    assert (out / "tokenizer.model").read_bytes() == tiny_tokenizer.path.read_bytes()
    assert meta["tokenizer"]["file"] == "tokenizer.model" and len(meta["tokenizer"]["sha256"]) == 64
    report = meta["report"]["files"]
    assert report[str(messy / "records.jsonl")]["malformed_json"] == 2
    assert report[str(messy / "records.jsonl")]["missing_text_field"] == 1
    assert report[str(messy / "bad_utf8.txt")]["invalid_utf8"] == 1
    assert report[str(messy / "empty.txt")]["empty_documents"] == 1
    assert report[str(messy / "cut.jsonl.gz")]["truncated_gzip"] == 1
    assert meta["report"]["totals"]["documents"] == len(expected)
    assert not list(out.glob("*.tmp"))


def test_fifty_megabyte_line_is_tokenised_in_bounded_chunks(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    # 50 MB without a newline. Plain repeated words tokenise fast, so this measures the chunking, not the BPE.
    size = 50 * 1024 * 1024
    repeats = size // 4
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "huge.txt").write_bytes(b"the " * repeats)
    (inputs / "small.txt").write_text("A normal little document.\n")
    meta = prepare([inputs], tiny_tokenizer.path, tmp_path / "data", workers=2, progress=False)
    assert meta["report"]["files"][str(inputs / "huge.txt")]["very_long_lines"] == 1
    assert meta["report"]["files"][str(inputs / "huge.txt")]["bytes"] == size
    assert meta["report"]["files"][str(inputs / "small.txt")]["very_long_lines"] == 0
    # Expected ids from three tiny encodes: cuts fall before a word's space, so chunking adds nothing.
    first, word, tail = (tiny_tokenizer.encode(t) for t in ("the", " the", " "))
    huge_tokens = len(first) + (repeats - 1) * len(word) + len(tail) + 1
    small_tokens = len(tiny_tokenizer.encode("A normal little document.\n")) + 1
    assert sorted(s["tokens"] for s in meta["splits"].values()) == sorted([huge_tokens, small_tokens])
    huge_split = "train" if meta["splits"]["train"]["tokens"] == huge_tokens else "val"
    tokens = read_split(tmp_path / "data", huge_split)
    middle = tokens[len(first) : len(first) + 1000 * len(word)]
    assert np.array_equal(middle, np.tile(word, 1000))


def test_very_long_line_without_whitespace(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    text = "".join(chr(0x4E00 + i % 500) for i in range(300_000))  # CJK, no spaces: hard cuts + byte fallback
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text("short\n")
    prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tiny_tokenizer.path, tmp_path / "d", workers=1, progress=False)
    docs = split_documents(read_split(tmp_path / "d", "train"), tiny_tokenizer)
    docs += split_documents(read_split(tmp_path / "d", "val"), tiny_tokenizer)
    assert sorted(docs) == sorted([text, "short\n"])


def make_docs(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    texts = [f"Document number {i} talks about topic {i * 7 % 13}.\n" for i in range(n)]
    (root / "docs.jsonl").write_text(jsonl(*({"text": t} for t in texts)))
    return texts


def test_validation_is_held_out_by_whole_documents(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    texts = make_docs(tmp_path / "in", 200)
    meta = prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "d", val_fraction=0.2, seed=1, progress=False)
    train = split_documents(read_split(tmp_path / "d", "train"), tiny_tokenizer)
    val = split_documents(read_split(tmp_path / "d", "val"), tiny_tokenizer)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(texts)
    assert 20 <= len(val) <= 60  # ~40 expected
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (len(train), len(val))
    # The split is decided by document content, not by position or file layout.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    (shuffled / "docs.jsonl").write_text(jsonl(*({"text": t} for t in reversed(texts))))
    prepare([shuffled], tiny_tokenizer.path, tmp_path / "d2", val_fraction=0.2, seed=1, progress=False)
    assert sorted(split_documents(read_split(tmp_path / "d2", "val"), tiny_tokenizer)) == sorted(val)
    prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "d3", val_fraction=0.2, seed=2, progress=False)
    assert sorted(split_documents(read_split(tmp_path / "d3", "val"), tiny_tokenizer)) != sorted(val)


@pytest.mark.parametrize("val_fraction", [0.0, 0.999])
def test_both_splits_get_a_document(tiny_tokenizer: Tokenizer, tmp_path: Path, val_fraction: float) -> None:
    make_docs(tmp_path / "in", 3)
    meta = prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "d", val_fraction=val_fraction, progress=False)
    counts = sorted(s["documents"] for s in meta["splits"].values())
    assert counts == [1, 2]


def test_single_document_goes_to_train_only_if_hashed_there(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    make_docs(tmp_path / "in", 1)
    meta = prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "d", progress=False)
    assert sum(s["documents"] for s in meta["splits"].values()) == 1


def test_same_seed_gives_byte_identical_output(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    make_docs(tmp_path / "in", 60)
    kwargs = {"val_fraction": 0.2, "seed": 5, "shard_tokens": 300, "progress": False}
    prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "a", workers=1, **kwargs)
    prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "b", workers=2, **kwargs)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len([n for n in names if n.startswith("train_")]) > 1
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_meta_json_is_written_last(tiny_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_docs(tmp_path / "in", 20)
    renamed: list[str] = []
    real_replace = os.replace

    def recording_replace(src: str | Path, dst: str | Path) -> None:
        assert Path(src).name.endswith(".tmp")  # everything reaches its final name by rename
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(prepare_module.os, "replace", recording_replace)
    prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "d", shard_tokens=100, progress=False)
    assert renamed[-1] == META_FILE and renamed.count(META_FILE) == 1
    assert {n for n in renamed if n.endswith(".bin")} == {p.name for p in (tmp_path / "d").glob("*.bin")}


@pytest.mark.parametrize("fail_at", ["encode", "meta"])
def test_crash_leaves_no_prepared_directory(
    tiny_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    make_docs(tmp_path / "in", 20)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash")

    target = "_encode_task" if fail_at == "encode" else "_write_json_atomic"
    monkeypatch.setattr(prepare_module, target, boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "d", workers=1, progress=False)
    assert not (tmp_path / "d" / META_FILE).exists()
    assert not list((tmp_path / "d").glob("*.bin*"))
    monkeypatch.undo()
    prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "d", workers=1, progress=False)  # retry just works
    assert (tmp_path / "d" / META_FILE).exists()


def test_existing_dataset_needs_overwrite(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    make_docs(tmp_path / "in", 30)
    prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "d", shard_tokens=50, progress=False)
    assert len(list((tmp_path / "d").glob("train_*.bin"))) > 2
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "d", progress=False)
    meta = prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "d", progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "d").glob("*.bin")) == ["train_00000.bin", "val_00000.bin"]
    assert meta["splits"]["train"]["shards"] == [
        {"file": "train_00000.bin", "tokens": meta["splits"]["train"]["tokens"]}
    ]


def test_clear_errors(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    make_docs(tmp_path / "in", 3)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        prepare([tmp_path / "in"], tmp_path / "missing.model", tmp_path / "d", progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare([tmp_path / "nowhere"], tiny_tokenizer.path, tmp_path / "d", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no documents found"):
        prepare([tmp_path / "empty"], tiny_tokenizer.path, tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / META_FILE).exists()
    with pytest.raises(ValueError, match="val_fraction"):
        prepare([tmp_path / "in"], tiny_tokenizer.path, tmp_path / "d", val_fraction=1.0, progress=False)
