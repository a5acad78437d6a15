"""Where a process sits in a torchrun job, and the few collectives the build and the trainer use.

One module for both stages: the build shards its work across ranks (gloo barriers only), the
trainer runs DDP (nccl on GPU, gloo on CPU). Run alone, a process is rank 0 of 1 and every
helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Dist", "OtherRankFailed", "from_env", "setup", "current", "comm_device", "barrier", "fail_together",
           "teardown"]


class OtherRankFailed(ValueError):
    """Raised on the ranks that did not fail themselves (one line: the failing rank prints why)."""


@dataclass
class Dist:
    """Rank, world size, local rank and this process's device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes manifests, logs and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _device(device: str | None, local_rank: int) -> torch.device:
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def from_env(device: str | None = None) -> Dist:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK (0 / 1 / 0 when absent); no process group."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), local, _device(device, local))


def setup(device: str | None = "auto", backend: str | None = None) -> Dist:
    """:func:`from_env`, select the CUDA device, and start the process group when world > 1
    (``backend`` default: nccl on GPU, gloo on CPU)."""
    d = from_env(device)
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
    if d.enabled and not dist.is_initialized():
        backend = backend or ("nccl" if d.device.type == "cuda" else "gloo")
        kw = {"device_id": d.device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kw)
    return d


def current(device: torch.device | None = None) -> Dist:
    """This process's place in an already initialised process group (rank 0 of 1 without one)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = device if device is not None else _device(None, local)
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local, dev)
    return Dist(0, 1, local, dev)


def comm_device(d: Dist) -> torch.device:
    """Where tensors must be for collectives: the GPU under nccl, the CPU under gloo."""
    return d.device if d.enabled and dist.get_backend() == "nccl" else torch.device("cpu")


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op alone)."""
    if d.enabled and dist.is_initialized():
        dist.barrier()


def fail_together(d: Dist, err: BaseException | None) -> None:
    """Raise ``err`` on its rank and a pointer to it on the others, instead of leaving them
    hanging in the next collective. No-op when no rank failed."""
    if not (d.enabled and dist.is_initialized()):
        if err is not None:
            raise err
        return
    flag = torch.tensor([0 if err is None else 1], device=comm_device(d))
    dist.all_reduce(flag)
    if int(flag.item()):
        if err is not None:
            raise err
        raise OtherRankFailed("another rank failed (see its message)")


def teardown(d: Dist) -> None:
    """Destroy the process group this job started."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
