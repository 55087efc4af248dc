"""RETRO in use: training with neighbours (exact resume, data parallel / ZeRO against one process), RETRO-fitting
(frozen base, retrieval off = the base bit for bit), ``ppl``/``eval --retro-db`` and generation with attribution.

The database here uses BM25 keys over the tiny dataset (fast); the dense path is tested in test_retro_db.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparselm.checkpoint.inference import load_checkpoint
from sparselm.cli import main
from sparselm.config import Config
from sparselm.errors import ConfigError, DatabaseError
from sparselm.model.retro import is_retrieval_parameter
from sparselm.parallel.layout import validate_parallel
from sparselm.retro.build import BuildOptions, build_database
from sparselm.retro.training import train
from test_parallel_train import torchrun, train_task
from tiny_run import tiny_config

M = 16
RETRO = ["model.n_layers=4", "retro.enabled=true", f"retro.chunk_size={M}", "retro.cca_start=2", "retro.cca_every=2"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def db(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("retro_train") / "db"
    opts = BuildOptions(out=out, data=[(str(tiny_dataset), "train")], chunk_size=M, keys="bm25", progress=False)
    build_database(opts, say=lambda _: None)
    return out


def config(data: Path, vocab: int, *overrides: str) -> Config:
    """tests/tiny_run.py's run with 4 dense layers (cross-attention needs depth; RETRO's own MoE is opt-in)."""
    return tiny_config(data, vocab, "model.n_layers=4", "moe.num_experts=0", *overrides)


@pytest.fixture(scope="module")
def base_run(tiny_dataset: Path, tiny_vocab_size: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("retro_base") / "run"
    train(config(tiny_dataset, tiny_vocab_size), run)
    return run


@pytest.fixture(scope="module")
def fit_run(base_run: Path, db: Path, tiny_dataset: Path, tiny_vocab_size: int, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("retro_fit") / "run"
    fit = [*RETRO, f"retro.db={db}", f"retro.init_from={base_run}", "retro.freeze_base=true", "optim.lr=1e-2"]
    train(config(tiny_dataset, tiny_vocab_size, *fit), run)
    return run


def test_retro_training_reads_neighbours_and_resumes_exactly(
    db: Path, tiny_dataset: Path, tiny_vocab_size: int, tmp_path: Path
) -> None:
    cfg = config(tiny_dataset, tiny_vocab_size, *RETRO, f"retro.db={db}", "moe.num_experts=4", "retro.encoder_moe=true")
    whole = train(cfg, tmp_path / "whole")
    assert whole.final_step == 12 and all(torch.isfinite(torch.tensor(whole.losses)))
    assert len(whole.val_losses) == 2 and whole.losses[-1] < whole.losses[0]
    assert len(whole.expert_load) == 3  # two decoder MoE layers and the encoder's

    def crash_after_step_6(step: int, model: torch.nn.Module) -> None:
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "split", after_backward=crash_after_step_6)
    second = train(cfg, tmp_path / "split", resume=True)
    assert second.losses == whole.losses[6:]  # the neighbours read after resuming are those of the same batches
    toml = (tmp_path / "whole" / "config.toml").read_text()
    assert "[retro]" in toml and "enabled = true" in toml


def test_retro_fitting_trains_only_retrieval_and_keeps_the_base_exactly(
    base_run: Path, fit_run: Path, tiny_vocab_size: int
) -> None:
    base, _, _ = load_checkpoint(base_run)
    fitted, cfg, _ = load_checkpoint(fit_run)
    base_state, fitted_state = base.state_dict(), fitted.state_dict()
    changed = [n for n, t in fitted_state.items() if n in base_state and not torch.equal(t, base_state[n])]
    assert not changed, f"frozen base parameters moved: {changed[:3]}"
    assert all(is_retrieval_parameter(n) for n in set(fitted_state) - set(base_state))
    idx = torch.randint(0, tiny_vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fitted(idx).logits, base(idx).logits)  # retrieval off: the base model, bit for bit
    trainer_state = json.loads((fit_run / "checkpoints" / "step_00000012" / "trainer_state.json").read_text())
    assert trainer_state["step"] == 12


def test_fitting_refuses_a_base_of_another_shape(
    base_run: Path, db: Path, tiny_dataset: Path, tiny_vocab_size: int, tmp_path: Path
) -> None:
    cfg = config(
        tiny_dataset, tiny_vocab_size, *RETRO, "model.d_ff=48", f"retro.db={db}", f"retro.init_from={base_run}"
    )
    with pytest.raises(ConfigError, match=r"\[model\] differs .* d_ff"):
        train(cfg, tmp_path / "run")


def test_training_refuses_a_mismatched_database(
    db: Path, tiny_dataset: Path, tiny_vocab_size: int, tmp_path: Path
) -> None:
    cfg = config(tiny_dataset, tiny_vocab_size, *RETRO, "retro.chunk_size=8", f"retro.db={db}")
    with pytest.raises(DatabaseError, match="retro.chunk_size=8"):
        train(cfg, tmp_path / "run")
    cfg = config(tiny_dataset, tiny_vocab_size, *RETRO, "data.seq_len=36", f"retro.db={db}")
    with pytest.raises(ConfigError, match="multiple of retro.chunk_size"):
        train(cfg, tmp_path / "run2")


def test_ppl_and_eval_with_retrieval(
    fit_run: Path, base_run: Path, db: Path, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    def ppl(run: Path, *extra: str) -> dict:
        args = ["ppl", "--ckpt", str(run), "--input", str(tiny_dataset), "--split", "val", "--json"]
        assert main([*args, "--max-windows", "6", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    base = ppl(base_run)
    without = ppl(fit_run)
    with_db = ppl(fit_run, "--retro-db", str(db))
    assert without["loss"] == base["loss"]  # a RETRO-fitted model without retrieval scores as its base
    assert with_db["tokens"] == base["tokens"] and with_db["loss"] != base["loss"]
    assert ppl(fit_run, "--retro-db", str(db), "--retro-k", "4")["loss"] != with_db["loss"]

    rows = [
        {"question": f"What is {i} plus {i}? " * 4, "options": ["one", "two", "three"], "answer": "two"}
        for i in range(3)
    ]
    (tmp_path / "sums.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (tmp_path / "sums.yaml").write_text(
        "kind: multiple_choice\ndata: sums.jsonl\nprompt: 'Q: {question}\\nA:'\nchoices_field: options\n"
        "gold_field: answer\n",
        encoding="utf-8",
    )
    args = ["eval", "--ckpt", str(fit_run), "--tasks", str(tmp_path / "sums.yaml"), "--json", "--no-progress"]
    args += ["--data-dir", str(tmp_path)]
    assert main([*args, "--out", str(tmp_path / "a"), "--retro-db", str(db)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["retro_db"] == str(db) and result["results"][0]["n"] == 3
    assert main(["ppl", "--ckpt", str(base_run), "--input", str(tiny_dataset), "--retro-db", str(db)]) == 2
    assert "needs a RETRO model" in capsys.readouterr().err


def test_generation_retrieves_at_chunk_boundaries_with_attribution(fit_run: Path, db: Path, capsys) -> None:
    prompt = "It was the best of times, it was the worst of times, it was the age of wisdom"
    args = ["retro", "generate", "--ckpt", str(fit_run), "--db", str(db), "--prompt", prompt, "--greedy"]
    assert main([*args, "--max-new-tokens", "20", "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    chunks = report["chunks"]
    assert chunks and [c["chunk"] for c in chunks] == list(range(len(chunks)))
    assert any(c["generated"] for c in chunks) and any(not c["generated"] for c in chunks)
    for c in chunks:
        for n in c["neighbours"]:
            assert n["document"] and n["bytes"][1] > n["bytes"][0] and n["text"]
    assert main([*args, "--max-new-tokens", "12", "--attribution"]) == 0
    out = capsys.readouterr().out
    assert "chunk 0 (prompt)" in out and "docs.jsonl" in out  # neighbours name the file their document came from


def test_data_parallel_and_zero_train_retro_as_one_process(
    db: Path, tiny_dataset: Path, tiny_vocab_size: int, tmp_path: Path
) -> None:
    overrides = [*RETRO, f"retro.db={db}", "moe.num_experts=4", "moe.top_k=2", "retro.encoder_moe=true"]
    single = train(config(tiny_dataset, tiny_vocab_size, *overrides, "train.micro_batch_size=2", "train.eval_every=0"),
                   tmp_path / "single").losses  # fmt: skip
    layouts = {f"zero{z}": [*overrides, f"parallel.zero_stage={z}"] for z in (0, 1, 2, 3)}
    tasks = [train_task(name, tmp_path / "runs", *o) for name, o in layouts.items()]
    results, _ = torchrun(2, tasks, tmp_path / "job", tiny_dataset, tiny_vocab_size)
    for name in layouts:
        got = torch.tensor(results[name]["losses"])
        assert torch.allclose(got, torch.tensor(single), rtol=1e-4), (name, got, single)


def test_tensor_and_expert_parallel_refuse_retro(tiny_dataset: Path, tiny_vocab_size: int) -> None:
    for layout in ("parallel.tp=2", "parallel.ep=2"):
        cfg = config(tiny_dataset, tiny_vocab_size, *RETRO, "moe.num_experts=4", layout)
        with pytest.raises(ConfigError, match="data parallelism / ZeRO only"):
            validate_parallel(cfg)
