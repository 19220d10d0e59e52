"""lessons_lib: the small library behind the distributed LLM inference course."""

from .exercises import check
from .launch import DistributedError, init_from_env, run_distributed, run_under_torchrun

__all__ = ["DistributedError", "check", "init_from_env", "run_distributed", "run_under_torchrun"]
