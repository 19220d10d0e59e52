"""Launching ranks: ``run_distributed`` for notebooks, ``init_from_env`` for ``torchrun``."""

from .errors import DistributedError
from .run import choose_backend, run_distributed, shutdown
from .torchrun import init_from_env, run_under_torchrun

__all__ = ["DistributedError", "choose_backend", "init_from_env", "run_distributed",
           "run_under_torchrun", "shutdown"]
