"""Settings of the expert-loop kernel: read from the environment once, bad values rejected with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sparselm.errors import ConfigError
from sparselm.ops import ExpertLoopSettings


def test_settings_from_an_environment() -> None:
    assert ExpertLoopSettings.from_env({}) == ExpertLoopSettings(threads=0)
    assert ExpertLoopSettings.from_env({"SPARSELM_EXPERT_THREADS": "3"}).threads == 3
    assert ExpertLoopSettings.from_env({"SPARSELM_EXPERT_THREADS": ""}).threads == 0  # set but empty = unset
    with pytest.raises(ConfigError, match="SPARSELM_EXPERT_THREADS must be a non-negative integer, got '-1'"):
        ExpertLoopSettings.from_env({"SPARSELM_EXPERT_THREADS": "-1"})
    with pytest.raises(ConfigError, match="threads must be >= 0"):
        ExpertLoopSettings(threads=-2)
    with pytest.raises(ConfigError, match="split_below_rows must be >= 0"):
        ExpertLoopSettings(split_below_rows=-1)


def test_expert_threads_from_the_environment() -> None:
    """The process's default kernel (the one every ``Experts`` uses unless given another) reads the variable."""
    code = (
        "from sparselm.ops import default_expert_loop; from sparselm.model.moe import Experts;"
        "print(default_expert_loop().settings.threads, Experts(2, 8, 16).loop is default_expert_loop())"
    )
    ok = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "SPARSELM_EXPERT_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert ok.stdout.split() == ["1", "True"]
    bad = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "SPARSELM_EXPERT_THREADS": "two"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "SPARSELM_EXPERT_THREADS must be a non-negative integer, got 'two'" in bad.stderr
