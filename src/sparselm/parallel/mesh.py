"""The layout of a job (how its ranks split the work) and the DeviceMesh that carries it.

world size = dp_replicate x dp_shard x tp, and expert parallelism borrows its ranks from dp_shard
(dp_shard = dp_shard_mod_ep x ep), as in torchtitan. The root mesh has the four named dims
``("dp_replicate", "dp_shard_mod_ep", "ep", "tp")`` with tp fastest, so tensor-parallel peers are neighbouring
ranks (the same node under torchrun) and the all-to-all of expert parallelism is the next closest. Flattened views
give the other groups the code needs:

- ``dp_shard`` = dp_shard_mod_ep x ep: ranks that shard the non-expert ZeRO state (FSDP's shard dim);
- ``dp`` = dp_replicate x dp_shard: every data-parallel rank (the batch split, loss averaging);
- ``expert_dp`` = dp_replicate x dp_shard_mod_ep: ranks holding copies of the same experts.

Every check raises ``ConfigError`` with one line naming the fields, before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sparselm.config import Config, ConfigError

MESH_DIMS = ("dp_replicate", "dp_shard_mod_ep", "ep", "tp")


@dataclass(frozen=True)
class Layout:
    world_size: int
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int
    zero_stage: int

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ways the global batch is split."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_mod_ep(self) -> int:
        return self.dp_shard // self.ep

    @property
    def expert_dp(self) -> int:
        """Copies of each expert: the data-parallel ranks that do not split the experts among themselves."""
        return self.dp_replicate * self.dp_shard_mod_ep

    def describe(self) -> str:
        parts = [f"dp_replicate={self.dp_replicate}", f"dp_shard={self.dp_shard}", f"tp={self.tp}", f"ep={self.ep}"]
        return f"{self.world_size} ranks: " + " x ".join(parts[:3]) + f", {parts[3]}, zero_stage={self.zero_stage}"


def resolve_layout(cfg: Config, world_size: int) -> Layout:
    """Fill in ``dp_shard=-1`` and check that the world size factors into the requested layout."""
    p, t = cfg.parallel, cfg.train
    if world_size % (p.dp_replicate * p.tp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.dp_replicate={p.dp_replicate} x parallel.tp={p.tp}"
        )
    dp_shard = p.dp_shard if p.dp_shard != -1 else world_size // (p.dp_replicate * p.tp)
    if p.dp_replicate * dp_shard * p.tp != world_size:
        raise ConfigError(
            f"parallel.dp_replicate={p.dp_replicate} x parallel.dp_shard={dp_shard} x parallel.tp={p.tp} = "
            f"{p.dp_replicate * dp_shard * p.tp} ranks, but the world size is {world_size}"
        )
    if dp_shard % p.ep != 0:
        raise ConfigError(
            f"parallel.ep={p.ep} does not divide parallel.dp_shard={dp_shard} (expert parallelism uses dp_shard ranks)"
        )
    layout = Layout(world_size, p.dp_replicate, dp_shard, p.tp, p.ep, p.zero_stage)
    if t.global_batch_size % (layout.dp * t.micro_batch_size) != 0:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by {layout.dp} data-parallel ranks x "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    return layout


class ParallelDims:
    """The root DeviceMesh of a layout and the sub-meshes / process groups each kind of parallelism uses."""

    def __init__(self, layout: Layout, device_type: str) -> None:
        self.layout = layout
        self.device_type = device_type
        sizes = (layout.dp_replicate, layout.dp_shard_mod_ep, layout.ep, layout.tp)
        self.mesh: DeviceMesh = init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)
        # Flattened views; each creates its process group once, here, in the same order on every rank. They are
        # kept here (slicing a flattened dim out of the root mesh is being deprecated).
        self.dp_shard_mesh = self.mesh[("dp_shard_mod_ep", "ep")]._flatten("dp_shard")
        self.dp_mesh = self.mesh[("dp_replicate", "dp_shard_mod_ep", "ep")]._flatten("dp")
        self.expert_dp_mesh = self.mesh[("dp_replicate", "dp_shard_mod_ep")]._flatten("expert_dp")

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.mesh["ep"]

    def fsdp_mesh(self) -> DeviceMesh:
        """FSDP2 mesh for non-expert parameters: 1-D over dp_shard, or 2-D (replicate, shard) for HSDP."""
        if self.layout.dp_replicate > 1:
            return DeviceMesh._concatenate([self.mesh["dp_replicate"], self.dp_shard_mesh])
        return self.dp_shard_mesh

    def expert_fsdp_mesh(self) -> DeviceMesh:
        """FSDP2 mesh for expert parameters: the dp_shard ranks left over by expert parallelism."""
        if self.layout.dp_replicate > 1:
            return self.mesh[("dp_replicate", "dp_shard_mod_ep")]
        return self.mesh["dp_shard_mod_ep"]

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.layout.dp


def default_device() -> torch.device:
    """One accelerator per process when there is one (torchrun's LOCAL_RANK picks it), else the CPU."""
    import os

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
