"""Every way export and import refuse: one line on stderr, exit status 2, and nothing written in --out (no
directory, no temporary leftovers beside it). Also the CLI verbs' success paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from interop_models import random_model, tiny_config, write_checkpoint
from sparselm.cli import main
from sparselm.data.tokenizer import Tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(capsys, out: Path, message: str, *argv: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert not out.exists(), f"{out} was written"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".tmp_{out.name}")], "staging left behind"


@pytest.fixture(scope="module")
def checkpoints(tiny_tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sparselm checkpoints (dense, Qwen2-shaped MoE) and their Hugging Face exports, shared read-only."""
    root = tmp_path_factory.mktemp("interop_errors")
    found = {}
    for name, moe in (("dense", {}), ("moe", {"num_experts": 4, "top_k": 1, "moe_every": 2, "shared_expert": True})):
        cfg = tiny_config(tiny_tokenizer.vocab_size, moe=moe)
        found[name] = write_checkpoint(random_model(cfg), cfg, tiny_tokenizer.path, root / name)
        assert main(["export", "--format", "hf", "--ckpt", str(found[name]), "--out", str(root / f"{name}-hf")]) == 0
        found[f"{name}-hf"] = root / f"{name}-hf"
    return found


def hf_copy(checkpoints: dict[str, Path], name: str, tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(checkpoints[name], folder)
    return folder


def edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------------- import

IMPORT_REFUSALS = {
    "unsupported architecture": (
        lambda f: edit_config(f, architectures=["BertForMaskedLM"]),
        "'BertForMaskedLM' is not supported",
    ),
    "two architectures": (lambda f: edit_config(f, architectures=["A", "B"]), "exactly one entry in architectures"),
    "rope scaling": (
        lambda f: edit_config(f, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
        "rope_type='llama3'",
    ),
    "head_dim": (lambda f: edit_config(f, head_dim=16), "head_dim=16 with hidden_size=32"),
    "sliding window": (lambda f: edit_config(f, sliding_window=16), "sliding_window=16"),
    "activation": (lambda f: edit_config(f, hidden_act="gelu"), "hidden_act='gelu'"),
    "quantized": (lambda f: edit_config(f, quantization_config={"quant_method": "gptq"}), "quantized checkpoints"),
    "mismatched shapes": (lambda f: edit_config(f, intermediate_size=40), "mismatched shapes"),
    "missing tensor": (
        lambda f: edit_tensors(f, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight")),
        "missing tensor model.layers.2.self_attn.k_proj.weight",
    ),
    "unexpected tensor": (
        lambda f: edit_tensors(f, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)})),
        "unexpected tensor model.layers.0.mlp.extra.weight",
    ),
    "wrong dtype": (
        lambda f: edit_tensors(f, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)})),
        "has dtype torch.int32",
    ),
    "no config": (lambda f: (f / "config.json").unlink(), "is not a Hugging Face model directory (no config.json)"),
    "bad json": (lambda f: (f / "config.json").write_text("{"), "config.json is not valid JSON"),
    "pickle only": (
        lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
        "only PyTorch pickle weights",
    ),
    "no tokenizer": (
        lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer.model")],
        "has no tokenizer sparselm can read",
    ),
    "vocabulary too small": (lambda f: edit_config(f, vocab_size=100), "mismatched shapes"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_REFUSALS))
def test_import_refusals(case: str, checkpoints, capsys, tmp_path: Path) -> None:
    edit, message = IMPORT_REFUSALS[case]
    folder = hf_copy(checkpoints, "dense-hf", tmp_path)
    edit(folder)
    assert_refused(capsys, tmp_path / "run", message, "import", "--hf", str(folder), "--out", str(tmp_path / "run"))


MOE_REFUSALS = {
    "trained shared-expert gate": (
        lambda f: edit_tensors(f, lambda t: t["model.layers.3.mlp.shared_expert_gate.weight"].fill_(0.01)),
        "layer 3: mlp.shared_expert_gate.weight is not zero",
    ),
    "shared expert width": (
        lambda f: edit_config(f, shared_expert_intermediate_size=96),
        "shared_expert_intermediate_size=96",
    ),
    "top-1 renormalised": (
        lambda f: edit_config(f, norm_topk_prob=True),
        "norm_topk_prob=true with num_experts_per_tok=1",
    ),
    "irregular placement": (lambda f: edit_config(f, mlp_only_layers=[3]), "puts experts in layers [1]"),
    "trained q/k/v bias": (
        lambda f: edit_tensors(f, lambda t: t["model.layers.1.self_attn.q_proj.bias"].fill_(0.1)),
        "model.layers.1.self_attn.q_proj.bias is not zero",
    ),
}


@pytest.mark.parametrize("case", sorted(MOE_REFUSALS))
def test_import_refusals_moe(case: str, checkpoints, capsys, tmp_path: Path) -> None:
    edit, message = MOE_REFUSALS[case]
    folder = hf_copy(checkpoints, "moe-hf", tmp_path)
    edit(folder)
    assert_refused(capsys, tmp_path / "run", message, "import", "--hf", str(folder), "--out", str(tmp_path / "run"))


def test_missing_shard(checkpoints, capsys, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    assert (
        main(
            [
                "export",
                "--format",
                "hf",
                "--ckpt",
                str(checkpoints["dense"]),
                "--out",
                str(out),
                "--max-shard-size",
                "30KB",
            ]
        )
        == 0
    )
    capsys.readouterr()  # the export's progress bar
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    assert_refused(
        capsys,
        tmp_path / "run",
        f"shard {shards[1].name} listed in",
        "import",
        "--hf",
        str(out),
        "--out",
        str(tmp_path / "run"),
    )


def test_import_never_touches_a_non_empty_out(checkpoints, capsys, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "import", "--hf", str(checkpoints["dense-hf"]), "--out", str(out))
    assert code == 2 and "already exists and is not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------------------------- export

EXPORT_REFUSALS = {
    "relative positions": ({"position": "relative"}, {}, None, "model.position=relative (T5 relative position bias"),
    "transformer-xl": ({"position": "xl"}, {}, None, "model.position=xl (Transformer-XL relative attention"),
    "capacity factor": ({}, {"num_experts": 4, "dropless": False}, None, "moe.dropless=false (capacity-factor"),
    "jitter": ({}, {"num_experts": 4, "jitter": 0.01}, None, "moe.jitter=0.01 (router input jitter)"),
    "straight-through top-1 gate": (
        {},
        {"num_experts": 4, "top_k": 1, "top1_gate": "straight_through"},
        None,
        "moe.top1_gate=straight_through",
    ),
    "layernorm with rope": ({"norm": "layernorm"}, {}, None, "model.norm=layernorm (needs rmsnorm)"),
    "dropout": ({"dropout": 0.1}, {}, None, "model.dropout=0.1"),
    "forced mixtral on top-1": (
        {},
        {"num_experts": 4, "top_k": 1, "moe_every": 1},
        "mixtral",
        "cannot export to Mixtral",
    ),
    "forced llama on moe": ({}, {"num_experts": 4}, "llama", "moe.num_experts=4 (Llama is dense)"),
    "qk norm with shared expert": (
        {"qk_norm": True},
        {"num_experts": 4, "shared_expert": True},
        None,
        "moe.shared_expert=true (Qwen3-MoE has no shared expert)",
    ),
}


@pytest.mark.parametrize("case", sorted(EXPORT_REFUSALS))
def test_export_refusals(case: str, tiny_tokenizer: Tokenizer, capsys, tmp_path: Path) -> None:
    model_fields, moe_fields, architecture, message = EXPORT_REFUSALS[case]
    cfg = tiny_config(tiny_tokenizer.vocab_size, model_fields, moe_fields)
    ckpt = write_checkpoint(random_model(cfg), cfg, tiny_tokenizer.path, tmp_path / "ckpt")
    argv = ["export", "--format", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]
    argv += ["--architecture", architecture] if architecture else []
    assert_refused(capsys, tmp_path / "hf", message, *argv)


def test_export_argument_errors(checkpoints, capsys, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    base = ["export", "--format", "hf", "--ckpt", str(checkpoints["dense"]), "--out", str(out)]
    assert_refused(capsys, out, "--max-shard-size 'lots'", *base, "--max-shard-size", "lots")
    assert_refused(
        capsys, out, "no checkpoint found", "export", "--format", "hf", "--ckpt", str(tmp_path), "--out", str(out)
    )


def test_export_default_format_is_sparselm(checkpoints, capsys, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "export", "--ckpt", str(checkpoints["moe"]), "--out", str(tmp_path / "one"))
    assert code == 0 and "model.safetensors" in out
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "config.toml",
        "model.safetensors",
        "tokenizer.model",
        "trainer_state.json",
    ]


def test_cli_round_trip_and_generate(checkpoints, capsys, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, out, _ = run(capsys, "import", "--hf", str(checkpoints["moe-hf"]), "--out", str(run_dir))
    assert code == 0 and "Qwen2MoeForCausalLM" in out
    assert (run_dir / "config.toml").is_file() and (
        run_dir / "checkpoints" / "step_00000000" / "model.safetensors"
    ).is_file()
    code, out, _ = run(
        capsys, "generate", "--ckpt", str(run_dir), "--prompt", "The", "--greedy", "--max-new-tokens", "5"
    )
    assert code == 0 and out.startswith("--- prompt: 'The'")
    # --overwrite replaces an existing export only once the new one is complete
    code, _, _ = run(capsys, "import", "--hf", str(checkpoints["dense-hf"]), "--out", str(run_dir), "--overwrite")
    assert (
        code == 0
        and "LlamaForCausalLM" in (run_dir / "checkpoints" / "step_00000000" / "trainer_state.json").read_text()
    )


def test_train_resumes_from_an_imported_run(checkpoints, tiny_dataset: Path, capsys, tmp_path: Path) -> None:
    """An imported run is a weights-only checkpoint at step 0: train --resume starts from its weights with a fresh
    optimizer (at a learning rate of ~0, the weights after two steps are still the imported ones)."""
    from sparselm.checkpoint.inference import load_checkpoint

    run_dir = tmp_path / "run"
    assert run(capsys, "import", "--hf", str(checkpoints["moe-hf"]), "--out", str(run_dir))[0] == 0
    imported = load_checkpoint(run_dir)[0].state_dict()
    overrides = [
        f"data.path={tiny_dataset}",
        "data.seq_len=32",
        "train.max_steps=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "train.precision=fp32",
        "train.eval_every=0",
        "optim.lr=1e-30",
        "optim.warmup_steps=0",
        "optim.weight_decay=0",
        "checkpoint.every=2",
        "logging.progress=false",
        "logging.tensorboard=false",
        "logging.mfu=false",
    ]
    argv = ["train", "--config", str(run_dir / "config.toml"), "--out", str(run_dir), "--resume"]
    code, out, err = run(capsys, *[*argv, *[a for o in overrides for a in ("--set", o)]])
    assert code == 0, err
    assert "resumed from" in out + err and "step_00000000" in out + err
    trained = load_checkpoint(run_dir)[0].state_dict()  # the latest: step 2
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()
    assert all(torch.allclose(trained[k], imported[k], atol=1e-6) for k in imported)


def test_model_card_carries_config_tokens_and_eval_results(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    from sparselm.eval.harness import TaskResult, write_reports
    from sparselm.interop import export_hf

    cfg = tiny_config(tiny_tokenizer.vocab_size, moe={"num_experts": 4, "top_k": 2, "moe_every": 2})
    ckpt = write_checkpoint(random_model(cfg), cfg, tiny_tokenizer.path, tmp_path / "run", step=7)
    (tmp_path / "run" / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "tokens_seen": 12345}) + "\n" + json.dumps({"step": 9, "tokens_seen": 99999}) + "\n"
    )
    piqa = TaskResult("piqa", "multiple_choice", {"acc": {"value": 0.625, "stderr": 0.01}}, 80, 0)
    write_reports([piqa], tmp_path / "run" / "eval", {"checkpoint": str(ckpt), "step": 7, "shots": 0})
    export_hf(ckpt, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    assert "Qwen2MoeForCausalLM" in card and "4 experts, top-2" in card
    assert "| training tokens | 12,345 (7 steps) |" in card  # the run's own count at the checkpoint's step
    assert "| piqa | acc | 0.6250 | 0.0100 | 80 |" in card
    assert "[moe]\nnum_experts = 4" in card
