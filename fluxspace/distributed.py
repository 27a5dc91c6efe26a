"""Sharding work across processes under torchrun (the edit-quality benchmark and `fluxspace sweep`).

    torchrun --nproc_per_node N -m fluxspace.cli sweep ...

Rank r takes every N-th unit of work and writes its results as a shard file; after a barrier rank 0
merges the shards. Shard files live beside the output, so every rank must see the output folder
(one machine, or a shared filesystem). Without torchrun (no WORLD_SIZE) everything runs in-process.
"""

import os

import torch


def world() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed under torchrun: gloo on CPUs, NCCL on GPUs."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), size


def barrier(size: int) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if size > 1:
        torch.distributed.barrier()
