"""Accelerator descriptions for ``sparselm plan``: small TOML files, one per device, with their sources.

The shipped ones live in ``configs/hardware/`` (``--hardware a100-80g``); any other file with the same fields can
be passed by path. Bandwidths are GB/s (10^9 bytes) per device in each direction; ``intra_node_gbs`` is the link
between devices of one node (NVLink), ``inter_node_gbs`` each device's share of the network between nodes.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from sparselm.errors import ConfigError

HARDWARE_DIR = Path(__file__).resolve().parents[3] / "configs" / "hardware"
DEFAULT_HARDWARE = "a100-80g"
REQUIRED = {"name", "memory_gib", "bf16_tflops", "fp32_tflops", "devices_per_node", "intra_node_gbs", "inter_node_gbs"}


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak; 0 = no bf16
    fp32_tflops: float  # dense peak without TF32; 0 = not usable
    devices_per_node: int
    intra_node_gbs: float
    inter_node_gbs: float
    usable_fraction: float = 0.9  # of memory_gib, for tensors (the rest: runtime, communication buffers, fragmentation)
    latency_us: float = 20.0  # fixed cost of one collective call
    key: str = ""  # file stem or path it came from

    @property
    def usable_bytes(self) -> float:
        return self.memory_gib * 2**30 * self.usable_fraction

    def peak_flops(self, precision: str) -> float:
        tflops = self.bf16_tflops if precision == "bf16" else self.fp32_tflops
        return tflops * 1e12

    def node_of(self, rank: int) -> int:
        return rank // self.devices_per_node

    def resolve_precision(self, precision: str) -> str:
        """``train.precision`` on this device: auto is bf16 where the device has it, else fp32."""
        if precision == "auto":
            precision = "bf16" if self.bf16_tflops > 0 else "fp32"
        if self.peak_flops(precision) <= 0:
            other = "fp32" if precision == "bf16" else "bf16"
            raise ConfigError(f"train.precision={precision}: the {self.key} has no {precision} (use {other})")
        return precision


def list_hardware() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.toml")) if HARDWARE_DIR.is_dir() else []


def load_hardware(name_or_path: str) -> Hardware:
    """A shipped device by name (``a100-80g``) or a TOML file by path."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" or path.is_file()):
        path = HARDWARE_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            shipped = ", ".join(list_hardware())
            raise ConfigError(f"unknown hardware {name_or_path!r}; shipped: {shipped}, or a .toml file")
    if not path.is_file():
        raise ConfigError(f"hardware file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    known = {f.name for f in fields(Hardware)} - {"key"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    missing = sorted(REQUIRED - set(data))
    if missing:
        raise ConfigError(f"{path}: missing field(s) {', '.join(missing)}")
    try:
        hw = Hardware(**data, key=path.stem if path.parent == HARDWARE_DIR else str(path))
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None
    for name in ("memory_gib", "intra_node_gbs", "inter_node_gbs"):
        if not isinstance(getattr(hw, name), (int, float)) or getattr(hw, name) <= 0:
            raise ConfigError(f"{path}: {name} must be a positive number, got {getattr(hw, name)!r}")
    if not isinstance(hw.devices_per_node, int) or hw.devices_per_node < 1:
        raise ConfigError(f"{path}: devices_per_node must be a positive integer, got {hw.devices_per_node!r}")
    if not 0 < hw.usable_fraction <= 1:
        raise ConfigError(f"{path}: usable_fraction must be in (0, 1], got {hw.usable_fraction}")
    if hw.bf16_tflops <= 0 and hw.fp32_tflops <= 0:
        raise ConfigError(f"{path}: bf16_tflops or fp32_tflops must be positive")
    return hw
