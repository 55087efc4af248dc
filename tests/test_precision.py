"""train.precision auto: bf16 autocast only where this machine computes bf16 at least as fast as fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparselm.config import load_config
from sparselm.precision import cpu_matmul_speeds, resolve_precision
from sparselm.train.trainer import train
from tiny_run import SMALLEST_RUN, tiny_config

CPU = torch.device("cpu")


def test_auto_follows_this_machines_measured_matmul_speeds() -> None:
    fp32, bf16 = cpu_matmul_speeds()
    assert fp32 > 0 and bf16 > 0
    assert resolve_precision("auto", CPU) == ("bf16" if bf16 >= fp32 else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # explicit bf16 is kept even where it is slow


@pytest.mark.parametrize(("speeds", "auto"), [((100e9, 1e9), "fp32"), ((170e9, 420e9), "bf16")])
def test_the_rule_on_both_kinds_of_cpu(speeds: tuple, auto: str) -> None:
    """An AVX2-only CPU (bf16 emulated, 0.9 vs 115 GFLOP/s measured) and an avx512_bf16 one (420 vs 170): this
    machine is only one of them, so the other's measurement is supplied."""
    warnings: list[str] = []
    assert resolve_precision("auto", CPU, warn=warnings.append, speeds=speeds) == auto
    assert resolve_precision("bf16", CPU, warn=warnings.append, speeds=speeds) == "bf16"
    if auto == "fp32":
        assert warnings == [
            "precision bf16: bf16 matmuls run at 1.0 GFLOP/s on this CPU against 100 in fp32, so training will be "
            "slow; precision auto (or fp32) computes in fp32 here"
        ]
    else:
        assert warnings == []


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        resolve_precision("fp16", CPU)


def test_a_run_records_the_precision_it_computed_in(tiny_dataset: Path, tiny_vocab_size: int, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_dataset, tiny_vocab_size, *SMALLEST_RUN, "train.precision=auto")
    assert cfg.train.precision == "auto"  # the default
    train(cfg, tmp_path / "run")
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.train.precision == resolve_precision("auto", CPU)
