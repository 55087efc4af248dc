"""The DeviceMesh that carries a job's layout (``sparselm.parallel.layout``), and the device of this process.

The root mesh has the four named dims ``("dp_replicate", "dp_shard_mod_ep", "ep", "tp")`` with tp fastest, so
tensor-parallel peers are neighbouring ranks (the same node under torchrun) and the all-to-all of expert parallelism
is the next closest. Flattened views give the other groups the code needs:

- ``dp_shard`` = dp_shard_mod_ep x ep: ranks that shard the non-expert ZeRO state (FSDP's shard dim);
- ``dp`` = dp_replicate x dp_shard: every data-parallel rank (the batch split, loss averaging);
- ``expert_dp`` = dp_replicate x dp_shard_mod_ep: ranks holding copies of the same experts.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sparselm.parallel.layout import Layout

MESH_DIMS = ("dp_replicate", "dp_shard_mod_ep", "ep", "tp")


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
