"""Paper presets (``configs/presets/*.toml``) and the ``sparselm params`` report: our counts next to the papers'."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from sparselm.config import Config, load_config
from sparselm.errors import ConfigError
from sparselm.params.counting import count_params, flops_per_token
from sparselm.params.published import PUBLISHED

# Presets are TOML files in the source repository (they are documentation as much as configuration), so they are
# resolved relative to this file rather than shipped as package data.
PRESETS_DIR = Path(__file__).resolve().parents[3] / "configs" / "presets"


def _presets_dir() -> Path:
    if not PRESETS_DIR.is_dir():
        raise ConfigError(
            f"preset directory not found: {PRESETS_DIR} (presets live in the source repository's configs/presets/, "
            "they are not part of an installed wheel; pass --config FILE instead)"
        )
    return PRESETS_DIR


def list_presets() -> list[str]:
    """Names of the preset configs (file stems of ``configs/presets/*.toml``), sorted."""
    return sorted(p.stem for p in _presets_dir().glob("*.toml"))


def preset_path(name: str) -> Path:
    path = _presets_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return path


def load_preset(name: str, overrides: list[str] | None = None) -> Config:
    """Load and validate ``configs/presets/<name>.toml`` (with optional ``section.key=value`` overrides)."""
    return load_config(preset_path(name), overrides)


def _error_pct(ours: int, published: int | None) -> float | None:
    return None if not published else round(100.0 * (ours - published) / published, 2)


def report(cfg: Config, name: str | None = None) -> dict[str, Any]:
    """A JSON-able summary of ``cfg``; compared with ``PUBLISHED[name]`` when ``name`` is a preset with a figure."""
    counts = count_params(cfg)
    flops = flops_per_token(cfg)
    published = PUBLISHED.get(name or "", {})
    pub_total, pub_active = published.get("total"), published.get("active")
    return {
        "name": name,
        "total_params": counts.total,
        "active_params": counts.active,
        "active_non_embedding_params": counts.active_non_embedding,
        "embedding_params": counts.embedding,
        "non_embedding_params": counts.non_embedding,
        "expert_params": counts.experts,
        "moe_layers": counts.n_moe_layers,
        "params_per_expert": counts.params_per_expert,
        "train_flops_per_token": flops.train,
        "inference_flops_per_token": flops.inference,
        "seq_len": flops.seq_len,
        "published_total": pub_total,
        "published_active": pub_active,
        "total_error_pct": _error_pct(counts.total, pub_total),
        "active_error_pct": _error_pct(counts.active, pub_active),
        "source": published.get("source"),
        "note": published.get("note") or None,
        "breakdown": dict(counts.breakdown),
        "forward_flops_breakdown": dict(flops.breakdown),
    }


def human(n: float | None) -> str:
    """174.6B, 1.57T, 44.0M: two decimals below 10 of a unit, one above (three or four significant figures)."""
    if n is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.2f}{suffix}" if abs(value) < 10 else f"{value:.1f}{suffix}"
    return f"{n:.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def format_report(d: dict[str, Any]) -> str:
    """Render a ``report()`` dict as an aligned text block."""
    rows: list[tuple[str, str]] = [
        ("total params", human(d["total_params"])),
        ("active params", f"{human(d['active_params'])} ({human(d['active_non_embedding_params'])} non-embedding)"),
        ("embedding params", human(d["embedding_params"])),
    ]
    if d["expert_params"]:
        rows.append(
            (
                "expert params",
                f"{human(d['expert_params'])} ({d['moe_layers']} MoE layers, "
                f"{human(d['params_per_expert'])} per expert)",
            )
        )
    rows += [
        ("train FLOPs/token", f"{human(d['train_flops_per_token'])} (seq_len {d['seq_len']})"),
        ("inference FLOPs/token", human(d["inference_flops_per_token"])),
    ]
    if d.get("published_total"):
        rows.append(("published total", f"{human(d['published_total'])} (ours {_pct(d['total_error_pct'])})"))
    if d.get("published_active"):
        rows.append(("published active", f"{human(d['published_active'])} (ours {_pct(d['active_error_pct'])})"))
    if d.get("source"):
        rows.append(("source", d["source"]))
    if d.get("note"):
        rows.append(("note", d["note"]))
    width = max(len(label) for label, _ in rows)
    indent = " " * (width + 4)
    lines = [d.get("name") or "config (defaults)"]
    for label, value in rows:
        # Notes and sources can be long: wrap them under the value column instead of running off the terminal.
        lines.append(textwrap.fill(value, 116, initial_indent=f"  {label:<{width}}  ", subsequent_indent=indent))
    return "\n".join(lines)


def _list_line(name: str, d: dict[str, Any], width: int) -> str:
    published = "-"
    if d["published_total"]:
        published = f"{human(d['published_total'])} ({_pct(d['total_error_pct'])})"
        if d["published_active"]:
            published += f", active {human(d['published_active'])} ({_pct(d['active_error_pct'])})"
    return (
        f"{name:<{width}}  total {human(d['total_params']):>7}  active {human(d['active_params']):>7}  "
        f"published {published}"
    )


def run_params(preset: str | None, config: str | None, overrides: list[str], list_only: bool, as_json: bool) -> int:
    """``sparselm params``: print a report (or the preset list) and return the exit status.

    Bad input raises ``ConfigError``; the CLI turns it into one line on stderr and exit status 2.
    """
    overrides = list(overrides or [])
    if list_only:
        names = list_presets()
        reports = {name: report(load_preset(name, overrides), name) for name in names}
        if as_json:
            print(json.dumps(list(reports.values()), indent=2))
        else:
            width = max((len(n) for n in names), default=0)
            for name in names:
                print(_list_line(name, reports[name], width))
        return 0
    if preset and config:
        raise ConfigError("give either --preset or --config, not both")
    if preset:
        cfg = load_preset(preset, overrides)
        d = report(cfg, preset)
        if overrides and count_params(cfg).total != count_params(load_preset(preset)).total:
            # The published figures describe the preset as written; comparing a resized model with them is noise.
            for key in ("published_total", "published_active", "total_error_pct", "active_error_pct", "note"):
                d[key] = None
            d["note"] = f"overrides change the parameter count ({' '.join(overrides)}): not compared with the paper"
    else:
        d = report(load_config(config, overrides), config)
    print(json.dumps(d, indent=2) if as_json else format_report(d))
    return 0
