"""Config loading, overrides and validation: every bad value fails fast with a one-line error naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparselm.cli import main
from sparselm.config import Config, apply_overrides, config_from_dict, load_config, to_toml, validate
from sparselm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load() -> None:
    for path in sorted([*(REPO / "configs").glob("*.toml"), *(REPO / "configs" / "study").glob("*.toml")]):
        cfg = load_config(path)
        assert cfg.model.d_model % cfg.model.n_heads == 0


def test_overrides_are_typed() -> None:
    cfg = apply_overrides(
        Config(), ["train.max_steps=200", "optim.lr=1e-3", "moe.dropless=false", "model.norm=layernorm"]
    )
    assert cfg.train.max_steps == 200 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.moe.dropless is False
    assert cfg.model.norm == "layernorm"


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = apply_overrides(Config(), ["moe.num_experts=4", "data.path=some/dir", "model.position=xl"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.d_model=100", "model.n_heads=3"], "model.d_model=100 is not divisible by model.n_heads=3"),
        (["moe.num_experts=2", "moe.top_k=3"], "moe.top_k=3 is larger than moe.num_experts=2"),
        (["moe.num_experts=4", "moe.dropless=false", "moe.capacity_factor=0"], "moe.capacity_factor"),
        (["moe.num_experts=4", "moe.dropless=false", "moe.capacity_factor=-1"], "moe.capacity_factor"),
        (["moe.num_experts=4", "moe.expert_init_scale=0"], "moe.expert_init_scale"),
        (["optim.expert_lr_scale=-1"], "optim.expert_lr_scale"),
        (["model.position=alibi"], "model.position"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size=10"),
        (["data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_seq_len"),
        (["train.precision=fp16"], "train.precision: expected one of 'auto', 'bf16', 'fp32', got 'fp16'"),
        (["parallel.param_dtype=fp16"], "parallel.param_dtype: expected one of 'fp32', 'bf16', got 'fp16'"),
        (["optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
    ],
)
def test_invalid_values_name_the_field(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_keys_and_sections() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key model\.d_modle"):
        config_from_dict({"model": {"d_modle": 3}})
    with pytest.raises(ConfigError, match=r"unknown config section \[modle\]"):
        config_from_dict({"modle": {}})
    with pytest.raises(ConfigError, match=r"unknown config key train\.steps"):
        apply_overrides(Config(), ["train.steps=3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(Config(), ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides(Config(), ["max_steps"])


def test_missing_data_path(tmp_path: Path) -> None:
    cfg = Config()
    with pytest.raises(ConfigError, match="data.path is not set"):
        validate(cfg, require_data=True)
    cfg.data.path = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="does not exist"):
        validate(cfg, require_data=True)
    cfg.data.path = str(tmp_path)
    with pytest.raises(ConfigError, match="no meta.json"):
        validate(cfg, require_data=True)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nd_model = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_cli_reports_config_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            "--config",
            str(REPO / "configs/default.toml"),
            "--out",
            str(tmp_path / "run"),
            "--set",
            "moe.top_k=9",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "moe.top_k=9 is larger than moe.num_experts=8" in err
    assert not (tmp_path / "run").exists()  # nothing written before validation passed
