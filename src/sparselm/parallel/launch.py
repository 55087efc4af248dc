"""Process-group setup from torchrun's environment: gloo on CPUs, NCCL on CUDA, the same code on both.

torchrun (``python -m torch.distributed.run``) sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for
every worker; ``init_process_group`` reads them (the ``env://`` rendezvous). Nothing here manages processes:
restarts, rendezvous across nodes and failure detection are torchrun's job.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparselm.parallel.mesh import default_device


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    owns_group: bool  # True when this module created the process group (and so must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """The world size torchrun announced (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed() -> DistEnv | None:
    """Join the job's process group if this process is one of several torchrun workers; None when alone.

    An already initialised default group (e.g. a test harness) is reused and left for its owner to destroy.
    """
    if env_world_size() <= 1 and not dist.is_initialized():
        return None
    device = default_device()
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # device_id binds NCCL's communicator to this GPU eagerly (faster first collective, clearer errors).
            dist.init_process_group(backend_for(device), device_id=device)
        else:
            dist.init_process_group(backend_for(device))
        owns = True
    if (
        owns
        and dist.get_rank() == 0
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    ):
        # torchrun shares its rendezvous TCPStore with the workers by default; keys of a failed attempt survive in
        # it and restarted workers can connect to dead peers or hang (pytorch/pytorch#135712).
        print(
            "sparselm: torchrun --max-restarts with a shared rendezvous store may hang on restart; "
            "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun",
            file=sys.stderr,
        )
    return DistEnv(
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=dist.get_world_size(),
        device=device,
        backend=dist.get_backend(),
        owns_group=owns,
    )


def shutdown(env: DistEnv | None, clean: bool = True) -> None:
    """Leave the process group. After a clean run, a barrier first: without it one rank sometimes aborts at exit
    with gloo. After an error there is no barrier (a peer may be gone, and torchrun stops the others anyway)."""
    if env is None or not env.owns_group or not dist.is_initialized():
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()
