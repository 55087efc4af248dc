"""``sparselm plan``: arguments and the verb itself. Imports nothing heavy at module level (the CLI builds its parser
from here on every start)."""

from __future__ import annotations

import argparse
import json
import sys

from sparselm.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a preset from configs/presets/ (sparselm params --list)")
    source.add_argument("--config", help="TOML config file (neither: the built-in defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config field, e.g. --set parallel.tp=8 --set train.micro_batch_size=2 (repeatable)",
    )
    p.add_argument("--world-size", type=int, help="number of devices (ranks) of the job")
    p.add_argument(
        "--hardware",
        default=None,
        help="device: a100-80g (default), a100-40g, h100-80g, v100-32g, tpu-v4, or a TOML file with the same fields",
    )
    p.add_argument(
        "--efficiency",
        type=float,
        default=None,
        help="fraction of the device's peak FLOP/s the matmuls and attention reach (default 0.5)",
    )
    p.add_argument("--search", action="store_true", help="try the layouts of --world-size devices, fastest first")
    p.add_argument("--top", type=int, default=10, help="with --search: how many fitting layouts to list")
    p.add_argument("--full", action="store_true", help="dry-run every layer (default: two shallow copies, extended)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--list-hardware", action="store_true", help="list the shipped device files")


def run(args: argparse.Namespace) -> int:
    from sparselm.plan.hardware import DEFAULT_HARDWARE, list_hardware, load_hardware

    if args.list_hardware:
        for key in list_hardware():
            hw = load_hardware(key)
            print(
                f"{key:<10} {hw.name}: {hw.memory_gib:g} GiB, bf16 {hw.bf16_tflops:g} / fp32 {hw.fp32_tflops:g} "
                f"TFLOP/s, {hw.devices_per_node} per node, {hw.intra_node_gbs:g} / {hw.inter_node_gbs:g} GB/s"
            )
        return 0
    if args.world_size is None or args.world_size < 1:
        raise ConfigError("sparselm plan needs --world-size N (N >= 1)")
    efficiency = 0.5 if args.efficiency is None else args.efficiency
    if not 0 < efficiency <= 1:
        raise ConfigError(f"--efficiency must be in (0, 1], got {efficiency}")
    from sparselm.config import load_config
    from sparselm.params.presets import load_preset
    from sparselm.plan.planner import plan, plan_config
    from sparselm.plan.report import format_plan, format_search

    cfg = load_preset(args.preset, args.overrides) if args.preset else load_config(args.config, args.overrides)
    name = args.preset or args.config or "the default config"
    hw = load_hardware(args.hardware or DEFAULT_HARDWARE)
    if args.hardware is None and not args.json:
        print(f"no --hardware given: planning for {DEFAULT_HARDWARE}", file=sys.stderr)
    if not args.search:
        result = plan(cfg, args.world_size, hw, efficiency, full=args.full)
        print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result, name))
        return 0
    from sparselm.plan.search import fixed_settings, search

    cfg = plan_config(cfg, hw)
    progress = None
    if sys.stderr.isatty() and not args.json:

        def progress(message: str) -> None:
            print(f"\rsearching: {message}   ", end="", file=sys.stderr, flush=True)

    result = search(cfg, args.world_size, hw, fixed_settings(args.overrides), efficiency, progress)
    if progress:
        print(file=sys.stderr)
    best = None
    if result.ranked:
        best = plan(result.ranked[0].plan.cfg, args.world_size, hw, efficiency, full=args.full)
    if args.json:
        print(json.dumps(_search_json(result, best), indent=2))
        return 0
    print(format_search(result, name, args.top))
    if best is not None:
        print("\nthe fastest layout in full:\n")
        print(format_plan(best, name))
    return 0


def _search_json(result, best) -> dict:
    return {
        "world_size": result.world_size,
        "hardware": result.hardware.key,
        "dry_runs": result.measured,
        "ranked": [{"layout": t.settings, **t.plan.to_dict()} for t in result.ranked],
        "rejected": [{"layout": t.settings, "reason": t.reason} for t in result.rejected],
        "best": best.to_dict() if best else None,
    }
