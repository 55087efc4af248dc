"""The RETRO experiment's measurements: overlap (leakage) analysis, bits per byte, shuffled control, the bootstrap,
the evaluation plan, and the report's verdict lines following the numbers either way."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sparselm.experiment.retro import K_EVAL, Clock, eval_plan
from sparselm.experiment.retro_report import eval_key, findings, render, verdict, wall_time
from sparselm.retro.evaluate import (
    EvalWindows,
    bits_per_byte,
    bootstrap_difference,
    chunk_overlap,
    eval_windows,
    longest_common_run,
    served_mask,
    shuffled,
    window_neighbour_ids,
)


def brute_longest_run(a: list[int], b: list[int]) -> int:
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            n = 0
            while i + n < len(a) and j + n < len(b) and a[i + n] == b[j + n]:
                n += 1
            best = max(best, n)
    return best


def test_longest_common_run_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, size=(40, 8))
    b = rng.integers(0, 3, size=(40, 16))
    got = longest_common_run(a, b)
    assert got.tolist() == [brute_longest_run(x.tolist(), y.tolist()) for x, y in zip(a, b, strict=True)]


def test_overlap_is_measured_on_the_chunk_the_neighbours_serve() -> None:
    """Chunk u's neighbours serve the targets of chunk u + 1: a neighbour that contains chunk u + 1 verbatim is
    100% overlap, one that contains chunk u itself (not what it predicts) is not."""
    m, C = 4, 3
    tokens = np.arange(1, C * m + 2)[None]  # one window of 12 tokens + the next
    ev = EvalWindows(np.array([0]), tokens, np.ones((1, C * m), dtype=np.int64), C * m)
    neighbours = np.zeros((1, C, 1, 2 * m), dtype=np.int64) + 99
    neighbours[0, 0, 0, m:] = tokens[0, m : 2 * m]  # chunk 0's neighbour continues with chunk 1's exact text
    neighbours[0, 1, 0, :m] = tokens[0, m : 2 * m]  # chunk 1's neighbour repeats chunk 1 (not chunk 2)
    overlap = chunk_overlap(ev, neighbours, m)
    assert overlap.tolist() == [[1.0, 0.0]]
    mask = served_mask(ev, m, overlap, 0.125)
    assert mask[0].tolist() == [False] * 3 + [False] * 4 + [True] * 4 + [False]  # chunk 2's targets only


def test_bits_per_byte_and_bootstrap() -> None:
    nll = np.full((4, 8), math.log(2))  # one bit per token
    target_bytes = np.full((4, 8), 2)
    assert bits_per_byte(nll, target_bytes) == pytest.approx(0.5)
    low, high = bootstrap_difference(nll * 0.9, nll, target_bytes)
    assert low == pytest.approx(high) == pytest.approx(-0.05)


def test_windows_and_shuffled_neighbours(tiny_dataset: Path) -> None:
    ev = eval_windows(tiny_dataset, "val", 32, 5)
    assert ev.tokens.shape == (len(ev.windows), 33) and len(ev.windows) == 5
    assert ev.windows[0] == 0 and np.all(np.diff(ev.windows) > 0)
    chunks = (int(ev.windows.max()) + 1) * (32 // 8)  # every chunk of the windows' span, m = 8
    table = np.arange(chunks * 10).reshape(chunks, 10)
    ids = window_neighbour_ids(table, ev, 8, 2)
    assert ids.shape == (5, 4, 2) and ids[0, 1].tolist() == table[1, :2].tolist()
    mixed = shuffled(ids)
    assert sorted(mixed.reshape(-1, 2).tolist()) == sorted(ids.reshape(-1, 2).tolist())
    assert not np.array_equal(mixed, ids)


def test_eval_plan_covers_every_figure_of_the_report() -> None:
    keys = {eval_key(*item) for item in eval_plan()}
    for kind in ("dense", "moe"):
        for k in K_EVAL:
            assert eval_key(f"{kind}-retro-s1", "db100", k, False) in keys
        for db in ("db10", "db30", "db100", "other"):
            assert eval_key(f"{kind}-retro-s1", db, 2, False) in keys
        assert eval_key(f"{kind}-fit", "db100", 2, True) in keys
    assert eval_key("dense-base-s2", None, 0, False) in keys


def synthetic_results(gain: float) -> dict:
    evals = {}
    for run, db, k, shuffle in eval_plan():
        value = 1.50
        if db is not None and not shuffle and "base" not in run:
            value -= gain * {"db10": 0.4, "db30": 0.7, "db100": 1.0, "other": 0.2}[db]
        if run.endswith("s2"):
            value += 0.001
        evals[eval_key(run, db, k, shuffle)] = {"bpb": value}
    leak = [{"max_overlap": x, "chunks": 10, "baseline": 1.5, "retro": 1.5 - gain / 2} for x in (0.125, 0.5, 1.0)]
    return {
        "evals": evals,
        "models": {f"{kind}-fit": {"steps": 10} for kind in ("dense", "moe")},
        "analysis": {
            "intervals": {"dense": (-gain - 0.01, -gain + 0.01), "moe": (-gain - 0.01, -gain + 0.01)},
            "leakage": {"dense": leak, "moe": leak},
        },
    }


def test_findings_follow_the_numbers_either_way() -> None:
    good = "\n".join(findings(synthetic_results(0.05)))
    assert "0.0500 bits/byte below the baseline (better)" in good and "the difference is beyond seed noise" in good
    assert (
        "falling as the database grows" in good and "no gain" in good and "0.0500 higher (worse) than its real" in good
    )
    bad = "\n".join(findings(synthetic_results(-0.02)))
    assert "0.0200 bits/byte above the baseline (worse)" in bad and "not beyond seed noise" in bad
    assert "not falling monotonically" in bad
    assert "one seed, read against the dense pair's seed spread of 0.0010" in bad  # the MoE runs one seed
    assert verdict(synthetic_results(0.05)).startswith(
        "**Verdict: RETRO beats its plain baseline beyond seed noise for the dense and MoE decoders**"
    )
    assert "the retrieved text itself does matter for the dense and MoE decoder" in verdict(synthetic_results(0.05))
    worse = verdict(synthetic_results(-0.02))
    assert worse.startswith("**Verdict: no RETRO model beats its plain baseline beyond seed noise** (")
    assert "dense 0.0200 higher (worse), 2 seeds; MoE 0.0200 higher (worse), 1 seed;" in worse
    assert "The retrieved text itself changes nothing measurable" in worse


def test_wall_time_is_reported_against_the_budget(tmp_path: Path) -> None:
    clock = Clock(tmp_path / "wall_time.json")
    with clock("data"):
        pass
    again = Clock(tmp_path / "wall_time.json")  # a restarted experiment adds to the same record
    with again("training"):
        pass
    record = again.record()
    assert set(record["stages"]) == {"data", "training"} and len(record["invocations"]) == 2

    def results(minutes: dict, quick: bool = True) -> dict:
        wall = {"invocations": [{"started": "t", "load": 0.3}], "load_at_end": 2.1}
        return {"seconds": {k: v * 60 for k, v in minutes.items()}, "quick": quick, "scale": {}, "wall": wall}

    within = wall_time(results({"databases": 2.0, "training": 3.5}))
    assert "5.5 min in all, within the 10-minute budget of --quick" in within and "load average 0.3" in within
    over = wall_time(results({"databases": 50.0, "training": 45.0}, quick=False))
    assert "95.0 min in all, **5.0 min over the 90-minute budget of the full run**" in over
    restarted = results({"training": 1.0})
    restarted["wall"]["invocations"] *= 2
    assert "(summed over 2 invocations)" in wall_time(restarted)


@pytest.mark.parametrize("name", ["retro-quick", "retro"])
def test_committed_report_is_rendered_from_its_committed_results(name: str) -> None:
    report = Path(__file__).resolve().parents[1] / "docs" / "results" / f"{name}.md"
    results = json.loads((report.parent / report.stem / "results.json").read_text())
    plot = report.parent / report.stem / "bpb.png"
    assert render(results, plot, report) == report.read_text(encoding="utf-8")
