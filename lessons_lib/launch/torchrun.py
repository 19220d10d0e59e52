"""The same worker code under ``torchrun``: initialise from its environment.

``torchrun`` starts one process per rank and tells each who it is through
environment variables: ``RANK`` (global rank), ``LOCAL_RANK`` (rank on this
node, which picks the GPU), ``WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT``
(where rank 0's store listens). A function written for :func:`run_distributed`
runs unchanged under ``run_under_torchrun``.
"""

from __future__ import annotations

import os
from datetime import timedelta

from .run import choose_backend

REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_from_env(timeout: float = 120.0) -> tuple[int, int]:
    """Join the process group described by torchrun's variables; return (rank, world_size)."""
    import torch
    import torch.distributed as dist

    missing = [name for name in REQUIRED if name not in os.environ]
    if missing:
        raise RuntimeError(f"not started by torchrun: environment variables {missing} are unset; "
                           f"launch with `torchrun --standalone --nproc-per-node=N ...`")
    if not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    backend = choose_backend(local_world)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


def run_under_torchrun(fn, *args, timeout: float = 120.0, **kwargs):
    """Initialise from torchrun's environment, run ``fn``, leave the group cleanly."""
    import torch.distributed as dist

    init_from_env(timeout)
    try:
        return fn(*args, **kwargs)
    finally:
        dist.destroy_process_group()
