"""Joining a ``torchrun`` job: the process group, this process's device, and cross-rank reductions.

Training is data-parallel over one mesh dimension. ``torchrun`` describes the job in environment
variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT); a plain ``python`` process has none of
them and is world size 1, which needs no process group at all, so the single-device path stays free
of collectives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tokenmill import TokenmillError


def env_rank() -> int:
    return int(os.environ.get("RANK", 0))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0 writes metrics, summaries and checkpoint metadata; the other ranks only compute."""
    return env_rank() == 0


@dataclass
class Distributed:
    """This process's place in the job; ``mesh`` is None when it trains alone."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None
    owns_group: bool  # this module started the process group, so it ends it too

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks (itself when alone). Gloo has no AVG, so means divide after."""
        if self.mesh is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def setup_distributed(device: torch.device) -> Distributed:
    """Join the job ``torchrun`` started (nccl on CUDA, gloo on CPU) with one device per process:
    ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    world_size = env_world_size()
    if world_size == 1:
        return Distributed(0, 1, device, None, owns_group=False)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise TokenmillError(
                f"LOCAL_RANK={device.index} but this node has {torch.cuda.device_count()} CUDA device(s): "
                "launch torchrun with --nproc_per_node at most the number of GPUs"
            )
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    return Distributed(dist.get_rank(), dist.get_world_size(), device, mesh, owns_group)
