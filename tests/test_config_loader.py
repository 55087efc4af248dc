"""The one config loader: the training and the pipeline config read values, --set strings and choices the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparselm.config import PRECISIONS, Config, apply_overrides, config_from_dict, load_config, validate
from sparselm.config_loader import parse_value
from sparselm.errors import ConfigError
from sparselm.pipeline import config as pipeline_config
from sparselm.pipeline.config import PipelineConfig
from sparselm.pipeline.quality import SELECTION_MODES
from sparselm.pipeline.sources import EXTRACTORS, FORMATS

SOURCE = {"name": "web", "paths": ["x"], "weight": 1.0}


def pipeline(**sections: object) -> PipelineConfig:
    return pipeline_config.config_from_dict({"source": [dict(SOURCE)], **sections})


def error(call, *args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("train_value", "pipeline_value", "message"),
    [
        # (a [train] or [run] value, the same kind of value for the pipeline, the message both give)
        ({"compile": "yes"}, {"progress": "yes"}, "expected true or false, got 'yes'"),
        ({"compile": 1}, {"progress": 1}, "expected true or false, got 1"),
        ({"max_steps": "10"}, {"workers": "10"}, "expected an integer, got '10'"),
        ({"max_steps": 2.5}, {"workers": 2.5}, "expected an integer, got 2.5"),
        ({"seed": True}, {"seed": True}, "expected an integer, got True"),
        ({"precision": 3}, {"executor": 3}, "expected one of"),
    ],
)
def test_file_values_follow_the_same_rules_in_both_configs(
    train_value: dict, pipeline_value: dict, message: str
) -> None:
    train_error = error(config_from_dict, {"train": train_value})
    pipeline_error = error(pipeline, run=pipeline_value)
    assert train_error.startswith(f"train.{next(iter(train_value))}: ") and message in train_error
    assert pipeline_error.startswith(f"run.{next(iter(pipeline_value))}: ") and message in pipeline_error


def test_a_quoted_number_in_a_file_is_a_string_not_a_number() -> None:
    assert error(config_from_dict, {"optim": {"lr": "1e-3"}}) == "optim.lr: expected a number, got '1e-3'"
    assert error(pipeline, dedup={"threshold": "0.5"}) == "dedup.threshold: expected a number, got '0.5'"
    assert config_from_dict({"train": {"max_steps": 1e3}}).train.max_steps == 1000  # integral float: an integer


def test_set_values_are_read_as_toml_in_both_configs() -> None:
    cfg = apply_overrides(Config(), ["optim.lr=1e-3", "train.max_steps=1_000", "moe.dropless=false"])
    assert (cfg.optim.lr, cfg.train.max_steps, cfg.moe.dropless) == (1e-3, 1000, False)
    pcfg = pipeline_config.apply_overrides(pipeline(), ["dedup.threshold=5e-1", "mixture.total_tokens=2e6"])
    assert (pcfg.dedup.threshold, pcfg.mixture.total_tokens) == (0.5, 2_000_000)
    for set_true in ("moe.dropless=yes", "moe.dropless=1", "moe.dropless=True"):
        assert "moe.dropless: expected true or false" in error(apply_overrides, Config(), [set_true])
    assert "run.progress: expected true or false" in error(
        pipeline_config.apply_overrides, pipeline(), ["run.progress=1"]
    )


def test_strings_need_no_quotes_and_keep_their_text() -> None:
    cfg = apply_overrides(Config(), ["data.path=runs/x y", "model.norm=layernorm"])
    assert (cfg.data.path, cfg.model.norm) == ("runs/x y", "layernorm")
    cfg = apply_overrides(Config(), ['data.path="quoted/dir"', "model.position='xl'"])
    assert (cfg.data.path, cfg.model.position) == ("quoted/dir", "xl")
    assert apply_overrides(Config(), ["data.path=1e-3"]).data.path == "1e-3"  # a string field takes the text as is
    pcfg = pipeline_config.apply_overrides(pipeline(), ["run.out=true", 'tokenizer.path="a b/t.model"'])
    assert (pcfg.run.out, pcfg.tokenizer.path) == ("true", "a b/t.model")
    assert parse_value("ten", int) == "ten" and parse_value("[1, 2]", list[int]) == [1, 2]
    assert parse_value("1\nx = 2", int) == "1\nx = 2"  # one value, never a smuggled second key


def test_choice_fields_use_one_message_format() -> None:
    assert error(apply_overrides, Config(), ["model.norm=batchnorm"]) == (
        "model.norm: expected one of 'rmsnorm', 'layernorm', got 'batchnorm'"
    )
    assert error(pipeline_config.apply_overrides, pipeline(), ["source.web.format=csv"]) == (
        "source.web.format: expected one of 'auto', 'text', 'jsonl', 'parquet', 'zip', got 'csv'"
    )
    assert error(pipeline, extract={"invalid_utf8": "ignore"}) == (
        "extract.invalid_utf8: expected one of 'reject', 'replace', got 'ignore'"
    )
    # one list per choice: the tuples the CLI and the readers use come from the annotations
    assert PRECISIONS == ("auto", "bf16", "fp32") and SELECTION_MODES == ("none", "threshold", "pareto")
    assert "wikiextractor" in EXTRACTORS and FORMATS[0] == "auto"


def test_validate_rechecks_values_set_in_code() -> None:
    cfg = Config()
    cfg.train.precision = "fp16"
    assert "train.precision: expected one of" in error(validate, cfg)
    cfg = Config()
    cfg.model.d_model = "512"  # type: ignore[assignment]
    assert error(validate, cfg) == "model.d_model: expected an integer, got '512'"
    pcfg = pipeline()
    pcfg.sources[0].extractor = "pdf"  # type: ignore[assignment]
    assert "source.web.extractor: expected one of 'auto', 'none'" in error(pipeline_config.validate, pcfg)


def test_unknown_names_suggest_the_closest_one() -> None:
    assert error(config_from_dict, {"model": {"d_modle": 1}}) == (
        "unknown config key model.d_modle (did you mean model.d_model?)"
    )
    assert error(config_from_dict, {"optimizer": {}}) == "unknown config section [optimizer] (did you mean [optim]?)"
    assert error(apply_overrides, Config(), ["train.max_step=3"]) == (
        "unknown config key train.max_step (did you mean train.max_steps?)"
    )
    assert error(pipeline, dedupe={}) == "unknown config section [dedupe] (did you mean [dedup]?)"
    assert error(pipeline_config.apply_overrides, pipeline(), ["source.web.weigth=1"]) == (
        "unknown config key source.web.weigth (did you mean source.web.weight?)"
    )
    assert "(known: min, max)" in error(pipeline, filters={"word_count": {"lower": 3}})
    assert "unknown config key train.max_steps.x" in error(apply_overrides, Config(), ["train.max_steps.x=1"])
    assert (
        error(apply_overrides, Config(), ["train.max_steps"]) == "--set 'train.max_steps': expected section.key=value"
    )


def test_pipeline_paths_address_sources_by_name_and_filters_by_key() -> None:
    cfg = pipeline(filters={"word_count": {"min": 10}})
    pipeline_config.apply_overrides(
        cfg,
        [
            "source.web.epochs=2",
            "source.web.weight=0",
            'source.web.paths=["a", "b"]',
            "source.web.filters=gopher_quality",  # a lone string is a list of one
            "source.web.filter_overrides.word_count.max=5e5",
            "filters.word_count.max=100",
            "filters.mean_word_length.min=2",  # an entry that was not there
            'quality.positive=["web"]',
        ],
    )
    src = cfg.source("web")
    assert (src.epochs, src.weight, src.paths, src.filters) == (2.0, 0.0, ["a", "b"], ["gopher_quality"])
    assert src.filter_overrides == {"word_count": {"max": 500_000.0}}
    assert cfg.filters == {"word_count": {"min": 10.0, "max": 100.0}, "mean_word_length": {"min": 2.0}}
    assert cfg.quality.positive == ["web"]
    assert error(pipeline_config.apply_overrides, cfg, ["source.c4.weight=1"]) == (
        "source.c4: no [[source]] named 'c4' (names: web)"
    )
    assert "source: expected an array of tables" in error(pipeline_config.config_from_dict, {"source": {"name": "x"}})
    assert "filters.nope: unknown filter" in error(pipeline_config.validate, pipeline(filters={"nope": {"min": 1}}))


def test_both_configs_report_missing_and_invalid_files_alike(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    for load in (load_config, pipeline_config.load_pipeline_config):
        assert error(load, tmp_path / "missing.toml") == f"config file not found: {tmp_path / 'missing.toml'}"
        assert error(load, bad).startswith(f"{bad}: invalid TOML: ")
