"""``sparselm retro ...`` arguments and verbs; argparse only at import time (``--help`` stays instant)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparselm.errors import InputError


def _data_split(text: str) -> tuple[str, str]:
    """``DIR`` or ``DIR:SPLIT`` (default split: train)."""
    path, _, split = text.rpartition(":") if ":" in Path(text).name else (text, "", "")
    return (path or text, split or "train")


def cmd_build_db(args: argparse.Namespace) -> int:
    from sparselm.retro.build import BuildOptions, build_database

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    queries = [_data_split(q) for q in args.queries] if args.queries else None
    if args.no_neighbours:
        queries = []
    opts = BuildOptions(
        out=Path(args.out),
        data=[_data_split(d) for d in args.data],
        chunk_size=args.chunk_size,
        keys=args.keys,
        index=args.index,
        flat_max=args.flat_max,
        doc_fraction=args.doc_fraction,
        seed=args.seed,
        from_db=Path(args.from_db) if args.from_db else None,
        queries=queries,
        keep=args.keep,
        reuse_keys=[Path(p) for p in args.reuse_keys],
        batch_size=args.batch_size,
        precision=args.precision,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    db = build_database(opts, say=lambda msg: print(msg, file=sys.stderr))
    print(f"{db.path}: {db.size:,} chunks")
    return 0


def cmd_neighbours(args: argparse.Namespace) -> int:
    from sparselm.retro.neighbours import precompute_neighbours
    from sparselm.retro.store import Database

    db = Database(args.db)
    reuse = [Database(p, verify=False) for p in args.reuse_keys]
    for split in [s.strip() for s in args.split.split(",") if s.strip()]:
        path = precompute_neighbours(
            db, args.data, split, args.keep, args.batch_size, args.precision, not args.no_progress, print, reuse
        )
        print(path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from sparselm.retro.store import Database

    db = Database(args.db, verify=not args.no_verify)
    tables = {}
    for info in sorted((db.path / "neighbours").glob("*.json")):
        meta = json.loads(info.read_text(encoding="utf-8"))
        tables[info.stem] = {k: meta[k] for k in ("data_dir", "split", "chunks", "keep", "missing")}
        tables[info.stem]["current"] = meta["database"] == db.identity
    summary = {
        "path": str(db.path),
        "chunks": db.size,
        "chunk_size": db.chunk_size,
        "keys": db.meta["key_encoder"],
        "index": db.meta["index"],
        "sources": [{"data_dir": s.data_dir, "split": s.split, "chunks": s.count} for s in db.sources],
        "build": db.meta["build"],
        "neighbour_tables": tables,
        "checked": "sizes and checksums" if not args.no_verify else "sizes",
    }
    print(json.dumps(summary, indent=1))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sparselm.checkpoint.files import resolve_checkpoint
    from sparselm.checkpoint.inference import load_checkpoint
    from sparselm.model.generate import SamplingConfig
    from sparselm.precision import autocast
    from sparselm.retro.generate import attribute, retro_generate
    from sparselm.retro.scoring import open_retriever

    model, _, tokenizer = load_checkpoint(args.ckpt)
    retriever = open_retriever(model, resolve_checkpoint(args.ckpt) / "tokenizer.model", args.db, args.k)
    sampling = SamplingConfig.from_args(args)
    report = []
    for prompt in args.prompt:
        ids = tokenizer.encode(prompt) or [tokenizer.eod_id]
        with autocast(args.precision, model.tok_emb.weight.device):
            new, chunk_ids = retro_generate(model, retriever, ids, sampling, tokenizer.eod_id)
        text = tokenizer.decode(new)
        chunks = attribute(retriever.db, ids + new, len(ids), chunk_ids, tokenizer)
        report.append({"prompt": prompt, "text": text, "chunks": [vars(c) for c in chunks]})
        if args.json:
            continue
        print(f"--- prompt: {prompt!r}")
        print(prompt + text)
        if args.attribution:
            for c in chunks:
                kind = "generated" if c.generated else "prompt"
                print(f"  chunk {c.chunk} ({kind}): {c.text[:70]!r}")
                for n in c.neighbours:
                    span = f"bytes {n['bytes'][0]}-{n['bytes'][1]}"
                    print(f"    [{n['rank']}] {n['document']} ({n['split']}, {span}): {n['text'][:70]!r}")
    if args.json:
        print(json.dumps(report))
    return 0


def add_retro_verbs(verbs) -> None:
    """``sparselm retro <verb>``."""
    retro = verbs.add_parser("retro", help="retrieval (RETRO): chunk databases, neighbours, generation")
    sub = retro.add_subparsers(dest="retro_verb", required=True)

    p = sub.add_parser("build-db", help="chunk prepared data, key it, index it, precompute training neighbours")
    p.add_argument("--data", action="append", default=[], metavar="DIR[:SPLIT]", help="prepared dataset (repeatable)")
    p.add_argument("--out", required=True, help="database directory")
    p.add_argument("--from-db", help="cut the database from this one (whole documents, keys reused)")
    p.add_argument("--chunk-size", type=int, default=64, help="tokens per chunk, m (default 64)")
    p.add_argument("--keys", choices=["minilm", "bm25"], default="minilm", help="dense MiniLM keys or BM25 terms")
    p.add_argument("--index", choices=["auto", "flat", "ivfpq", "hnsw"], default="auto")
    p.add_argument("--flat-max", type=int, default=100_000, help="auto: exact search up to this many chunks")
    p.add_argument("--doc-fraction", type=float, default=1.0, help="keep a seeded sample of the documents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--queries",
        action="append",
        default=[],
        metavar="DIR[:SPLIT]",
        help="splits to precompute neighbours for (default: train and val of the first --data)",
    )
    p.add_argument("--no-neighbours", action="store_true", help="precompute no neighbours")
    p.add_argument("--keep", type=int, default=10, help="neighbours kept per chunk (default 10; training uses k)")
    p.add_argument("--reuse-keys", action="append", default=[], metavar="DB", help="reuse the query keys this "
                   "database already holds instead of encoding them again (repeatable)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128, help="chunks per encoder batch")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="key encoder precision")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_build_db)

    p = sub.add_parser("neighbours", help="precompute the neighbours of a prepared split's chunks")
    p.add_argument("--db", required=True)
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--split", default="train,val", help="comma-separated splits (default train,val)")
    p.add_argument("--keep", type=int, default=10)
    p.add_argument("--reuse-keys", action="append", default=[], metavar="DB", help="reuse this database's query keys")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_neighbours)

    p = sub.add_parser("info", help="check a database (sizes, checksums) and describe it")
    p.add_argument("--db", required=True)
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not checksums")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate with retrieval at every chunk boundary, with attribution")
    p.add_argument("--ckpt", required=True, help="RETRO run or checkpoint directory")
    p.add_argument("--db", required=True, help="retrieval database")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--k", type=int, default=0, help="neighbours per chunk (default: the model's retro.neighbours)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--attribution", action="store_true", help="print each chunk's neighbours and their documents")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)


def add_retro_db_arguments(p: argparse.ArgumentParser) -> None:
    """``--retro-db`` / ``--retro-k`` for ``sparselm ppl`` and ``sparselm eval``."""
    p.add_argument("--retro-db", default=None, help="RETRO model: retrieve from this database while scoring")
    p.add_argument("--retro-k", type=int, default=0, help="neighbours per chunk (default: the model's)")


def check_retro_args(args: argparse.Namespace) -> None:
    if args.retro_k and not args.retro_db:
        raise InputError("--retro-k needs --retro-db")
