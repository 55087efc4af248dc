"""``sparselm <verb>``: one command line over tokenizer, data, training, generation, accounting and perplexity.

Heavy imports happen inside each verb so that ``sparselm --help`` and config errors answer instantly.
Expected errors (bad config, bad data, bad checkpoint) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="TOML config file (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config field, e.g. --set train.max_steps=200 (repeatable)",
    )


def _inputs(paths: list[str]) -> list[Path]:
    if paths:
        return [Path(p) for p in paths]
    from sparselm.corpus import default_corpus_files

    files = default_corpus_files()
    print(f"no --input given: using the embedded default corpus ({len(files)} public-domain books)", file=sys.stderr)
    return files


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from sparselm.data.tokenizer import train_tokenizer

    path = train_tokenizer(
        _inputs(args.input),
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        seed=args.seed,
        num_threads=args.threads,
    )
    print(f"wrote {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from sparselm.data.prepare import prepare

    meta = prepare(
        _inputs(args.input),
        args.tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        text_field=args.text_field,
        overwrite=args.overwrite,
    )
    for split, info in meta["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['tokens']:,} tokens in {len(info['shards'])} shard(s)")
    problems: dict[str, int] = {}
    for counters in meta["report"]["files"].values():
        for key, value in counters.items():
            if key not in ("documents", "bytes", "gutenberg_stripped") and value:
                problems[key] = problems.get(key, 0) + value
    if problems:
        print("bad input (counted and skipped or repaired; per-file detail in meta.json): " + json.dumps(problems))
    print(f"wrote {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from sparselm.config import load_config
    from sparselm.retro.training import train  # the trainer, with neighbours for a [retro] config

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, args.out, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 speaks for the job
    if result.val_losses:
        step, val = result.val_losses[-1]
        import math

        print(
            f"final validation loss {val:.4f}, perplexity {math.exp(val):.2f} (step {step}, first "
            f"{cfg.train.eval_batches} validation batches; `sparselm ppl` scores the whole split)"
        )
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sparselm.interop.command import run_export

    return run_export(args)


def cmd_import(args: argparse.Namespace) -> int:
    from sparselm.interop.command import run_import

    return run_import(args)


def _load(ckpt: str):
    from sparselm.checkpoint.inference import load_checkpoint

    return load_checkpoint(ckpt)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from sparselm.model.generate import SamplingConfig, generate_text

    model, cfg, tokenizer = _load(args.ckpt)
    sampling = SamplingConfig.from_args(args)
    if args.precision == "bf16":
        # bf16 weights, as `sparselm serve` holds them: the few-row decode kernels multiply weights that are in the
        # compute dtype, where autocast over fp32 weights would cast them again at every step instead.
        model.to(torch.bfloat16)
    outputs = generate_text(model, tokenizer, args.prompt, sampling)
    for prompt, text in zip(args.prompt, outputs, strict=True):
        print(f"--- prompt: {prompt!r}")
        print(prompt + text)
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from sparselm.params.presets import run_params

    return run_params(args.preset, args.config, args.overrides, args.list, args.json)


def cmd_ppl(args: argparse.Namespace) -> int:
    from sparselm.eval.loglik import Scorer
    from sparselm.eval.perplexity import perplexity_of_split, perplexity_of_text
    from sparselm.retro.command import check_retro_args

    check_retro_args(args)
    model, cfg, tokenizer = _load(args.ckpt)
    if args.retro_db:
        from sparselm.checkpoint.files import resolve_checkpoint
        from sparselm.retro.scoring import RetroScorer, open_retriever

        tokenizer_path = resolve_checkpoint(args.ckpt) / "tokenizer.model"
        retriever = open_retriever(model, tokenizer_path, args.retro_db, args.retro_k)
        scorer = RetroScorer(model, tokenizer, retriever, batch_size=args.batch_size, precision=args.precision)
    else:
        scorer = Scorer(model, tokenizer, batch_size=args.batch_size, precision=args.precision)
    window = args.seq_len or cfg.data.seq_len
    src = Path(args.input)
    if (src / "meta.json").is_file():
        res = perplexity_of_split(scorer, src, args.split, window, args.max_windows)
    else:
        res = perplexity_of_text(scorer, src, window, args.max_windows)
    out = {"input": str(src), "tokens": res.tokens, "loss": res.loss, "perplexity": res.perplexity}
    if res.bits_per_byte is not None:
        out["bits_per_byte"] = res.bits_per_byte
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{src}: {res.tokens} tokens, loss {res.loss:.4f} nats/token, perplexity {res.perplexity:.2f}")
        if res.bits_per_byte is not None:
            print(f"bits per byte: {res.bits_per_byte:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sparselm.eval.command import run
    from sparselm.retro.command import check_retro_args

    check_retro_args(args)
    if args.retro_db:
        from sparselm.retro.scoring import retro_scorer

        return run(args, retro_scorer(args.retro_db, args.retro_k), {"retro_db": args.retro_db})
    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from sparselm.serve.command import run

    return run(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from sparselm.plan.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from sparselm.retro.command import add_retro_db_arguments, add_retro_verbs  # argparse only

    parser = argparse.ArgumentParser(prog="sparselm", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    tok = verbs.add_parser("tokenizer", help="train a SentencePiece tokenizer").add_subparsers(
        dest="action", required=True
    )
    p = tok.add_parser("train", help="train a SentencePiece model (byte fallback) on text files")
    p.add_argument(
        "--input", action="append", default=[], help="file or directory (repeatable; default: embedded corpus)"
    )
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_tokenizer_train)

    p = verbs.add_parser("prepare", help="tokenise text into memory-mapped train/val token shards")
    p.add_argument("--input", action="append", default=[], help="file, directory or JSONL(.gz) (repeatable)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset in --out")
    p.set_defaults(func=cmd_prepare)

    p = verbs.add_parser("train", help="train a model")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, tensorboard/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.set_defaults(func=cmd_train)

    from sparselm.interop.command import add_export_arguments, add_import_arguments  # argparse only

    p = verbs.add_parser(
        "export", help="a checkpoint as one model.safetensors (default), a Hugging Face directory or a GGUF file"
    )
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("import", help="a Hugging Face model directory as a sparselm run (Llama, Mixtral, Qwen...)")
    add_import_arguments(p)
    p.set_defaults(func=cmd_import)

    p = verbs.add_parser("generate", help="generate text from a checkpoint (KV-cache decoding)")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("params", help="parameter and FLOP accounting for a preset or config")
    p.add_argument("--preset", help="a name from --list (configs/presets/)")
    _add_config_args(p, required=False)
    p.add_argument("--list", action="store_true", help="list the presets with their sizes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_params)

    p = verbs.add_parser("ppl", help="perplexity of a checkpoint on a text file or a prepared dataset")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    p.add_argument("--input", required=True, help="text/JSONL file, or a prepared dataset directory")
    p.add_argument("--split", default="val", help="split of a prepared dataset (train or val)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the training data.seq_len)")
    p.add_argument("--batch-size", type=int, default=16, help="windows scored together")
    p.add_argument("--max-windows", type=int, default=0, help="score at most this many windows (0 = all)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--json", action="store_true")
    add_retro_db_arguments(p)
    p.set_defaults(func=cmd_ppl)

    from sparselm.eval.command import add_arguments  # argparse only: keeps --help instant

    p = verbs.add_parser("eval", help="evaluate checkpoints on LAMBADA, PIQA, ... and compare them")
    add_arguments(p)
    add_retro_db_arguments(p)
    p.set_defaults(func=cmd_eval)

    from sparselm.serve.command import add_arguments as add_serve_arguments  # argparse only: keeps --help instant

    p = verbs.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, paged KV cache)")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    from sparselm.experiment.command import add_arguments as add_experiment_arguments  # argparse only

    exp = verbs.add_parser("experiment", help="reproducible experiments").add_subparsers(dest="name", required=True)
    add_experiment_arguments(exp)

    from sparselm.plan.command import add_arguments as add_plan_arguments  # argparse only: keeps --help instant

    p = verbs.add_parser(
        "plan", help="dry-run a cluster layout on this machine: memory, collectives and step time per device"
    )
    add_plan_arguments(p)
    p.set_defaults(func=cmd_plan)

    from sparselm.pipeline.command import add_data_verbs  # argparse only: keeps --help instant

    add_data_verbs(verbs)
    add_retro_verbs(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sparselm.errors import USER_ERRORS, ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"sparselm: config error: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if os.environ.get("SPARSELM_DEBUG"):
            raise
        print(f"sparselm: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `sparselm params --list | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("sparselm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
