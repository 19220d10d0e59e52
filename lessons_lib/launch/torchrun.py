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

from ..validate import bad, check_int, check_real
from .pool import MAX_TIMEOUT_S
from .run import choose_backend

REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str, *, low: int, high: int | None = None, why: str = "") -> int:
    """The environment variable ``name`` as an int in ``[low, high]``."""
    text = os.environ[name]
    try:
        value = int(text.strip())
    except ValueError:
        expected = "an int" + (f" in [{low}, {high}]" if high is not None else f" >= {low}")
        raise bad(name, text, expected, "; ".join(filter(None, ["not a whole number", why]))) from None
    return check_int(name, value, low=low, high=high, why=why)


def check_env() -> tuple[int, int, int, int]:
    """torchrun's variables, each checked: ``(rank, world_size, local_rank, local_world_size)``."""
    missing = [name for name in REQUIRED if name not in os.environ]
    if missing:
        raise RuntimeError(f"not started by torchrun: environment variables {missing} are unset; "
                           f"launch with `torchrun --standalone --nproc-per-node=N ...`")
    world_size = _env_int("WORLD_SIZE", low=1, why="the number of ranks in the job")
    rank = _env_int("RANK", low=0, high=world_size - 1, why=f"WORLD_SIZE={world_size}")
    local_world = world_size
    if "LOCAL_WORLD_SIZE" in os.environ:
        local_world = _env_int("LOCAL_WORLD_SIZE", low=1, high=world_size,
                               why=f"ranks on this node, WORLD_SIZE={world_size}")
    local_rank = _env_int("LOCAL_RANK", low=0, high=local_world - 1,
                          why=f"LOCAL_WORLD_SIZE={local_world}")
    if not os.environ["MASTER_ADDR"].strip():
        raise bad("MASTER_ADDR", os.environ["MASTER_ADDR"], "a host name or IP address",
                  "where rank 0's store listens")
    _env_int("MASTER_PORT", low=1, high=65535, why="a TCP port")
    return rank, world_size, local_rank, local_world


def init_from_env(timeout: float = 120.0) -> tuple[int, int]:
    """Join the process group described by torchrun's variables; return (rank, world_size)."""
    import torch
    import torch.distributed as dist

    timeout = check_real("timeout", timeout, low=0, low_open=True, high=MAX_TIMEOUT_S,
                         why="seconds a collective may wait before torch gives up")
    _, _, local_rank, local_world = check_env()
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
