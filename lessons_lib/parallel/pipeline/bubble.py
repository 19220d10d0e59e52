"""Measuring the bubble: run a schedule with a fixed amount of work per action and time it.

Each action does the same matrix multiplications (no sleeping: the CPU really works), the
executor records when each stage is busy, and the idle fraction is read off those intervals:
``1 - busy / (stages x wall time)``. With equal work per action it should approach the
formula ``(p - 1) / (m + p - 1)``; what is left over is communication and scheduling noise
(and, on a machine with fewer cores than ranks, stages slowing each other down).
"""

from __future__ import annotations

import torch

from .runtime import execute, idle_fraction
from .schedule import make_schedule


def matmul_workload(size: int = 96, repeats: int = 40):
    """A ``compute(microbatch, x)`` that does ``repeats`` (size x size) matmuls, then passes a
    small activation on. The same work for every micro-batch, whatever its input."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen) / size ** 0.5
    b = torch.randn(size, size, generator=gen) / size ** 0.5

    def compute(microbatch: int, x: torch.Tensor) -> torch.Tensor:
        y = a
        for _ in range(repeats):
            y = torch.tanh(y @ b)
        return x + y[: x.shape[0], : x.shape[1]].sum() * 0
    return compute


def _rank_records(n_microbatches: int, schedule: str, size: int, repeats: int, trials: int = 1):
    """Run on every rank of a pure pipeline (world = pp): this stage's busy intervals, per trial
    (after one warm-up run)."""
    from ..mesh import Mesh

    mesh = Mesh(pp=torch.distributed.get_world_size())
    sched = make_schedule(schedule, mesh.pp, n_microbatches)
    compute = matmul_workload(size, repeats)
    inputs = [torch.zeros(4, 8) for _ in range(n_microbatches)]
    per_trial = []
    for _ in range(trials + 1):
        records: list = []
        torch.distributed.barrier(group=mesh.pp_group)
        execute(sched, mesh.pp_rank, compute, inputs, prev=mesh.pp_prev, next=mesh.pp_next,
                records=records)
        per_trial.append(records)
    return per_trial[1:]


def measure_idle_fraction(n_stages: int, n_microbatches: int, schedule: str = "gpipe",
                          size: int = 128, repeats: int = 300, trials: int = 5,
                          timeout: float = 120) -> float:
    """Run the schedule ``trials`` times on ``n_stages`` ranks; return the idle fraction of the
    fastest run (best of k: the run least disturbed by other programs on the machine)."""
    from ...launch import run_distributed

    per_rank = run_distributed(_rank_records, n_stages, n_microbatches, schedule, size, repeats,
                               trials, timeout=timeout)
    runs = [[per_rank[r][t] for r in range(n_stages)] for t in range(trials)]

    def span(run):
        return max(e for recs in run for _, _, e in recs) - min(s for recs in run for _, s, _ in recs)
    return idle_fraction(min(runs, key=span))
