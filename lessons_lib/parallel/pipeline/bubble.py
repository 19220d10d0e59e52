"""Measuring the bubble: run a schedule with the same work in every action and time it.

The executor records when each stage is busy, and the idle fraction is read off those
intervals: ``1 - busy / (stages x wall time)``. With equal work per action it should approach
the formula ``(p - 1) / (m + p - 1)``; what is left over is the latency of each hand-off.

Two kinds of work per action:

* ``"device"``: the stage is held for a fixed time without using a CPU core, as a host is while
  its accelerator runs the stage's kernels. Stages never compete for cores, so this measures the
  schedule and the hand-offs, on any machine.
* ``"cpu"``: real matrix products on the stage's core. Stages that overlap (the steady state)
  compete for cores when the machine has fewer free cores than stages, and every action slows
  down exactly then; the idle fraction measured this way includes that contention.
"""

from __future__ import annotations

import time

import torch

from ...launch import run_distributed
from ...validate import check_choice, check_int, check_real
from ..mesh import Mesh
from .runtime import execute, idle_fraction
from .schedule import make_schedule

WORKLOADS = ("device", "cpu")


def device_workload(seconds: float = 0.05):
    """A ``compute(microbatch, x)`` that holds the stage for ``seconds`` and returns ``x``.

    It waits as a host waits on an accelerator: the core is free meanwhile, so four stages on a
    two-core machine still run side by side, as four GPUs would.
    """
    def compute(microbatch: int, x: torch.Tensor) -> torch.Tensor:
        deadline = time.perf_counter() + seconds
        while (left := deadline - time.perf_counter()) > 0:
            time.sleep(left)
        return x
    return compute


def matmul_workload(size: int = 128, repeats: int = 300):
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


def _rank_records(n_microbatches: int, schedule: str, workload: str, action_s: float, size: int,
                  repeats: int, trials: int = 1):
    """Run on every rank of a pure pipeline (world = pp): this stage's busy intervals, per trial
    (after one warm-up run)."""

    mesh = Mesh(pp=torch.distributed.get_world_size())
    sched = make_schedule(schedule, mesh.pp, n_microbatches, backward=False)
    compute = device_workload(action_s) if workload == "device" else matmul_workload(size, repeats)
    inputs = [torch.zeros(4, 8) for _ in range(n_microbatches)]
    per_trial = []
    for _ in range(trials + 1):
        records: list = []
        torch.distributed.barrier(group=mesh.pp_group)
        execute(sched, mesh.pp_rank, compute, inputs, prev=mesh.pp_prev, next=mesh.pp_next,
                records=records, group=mesh.pp_group)
        per_trial.append(records)
    return per_trial[1:]


def measure_idle_fraction(n_stages: int, n_microbatches: int, schedule: str = "gpipe", *,
                          workload: str = "device", action_s: float = 0.05, size: int = 128,
                          repeats: int = 300, trials: int = 5, timeout: float = 120) -> float:
    """Run the schedule ``trials`` times on ``n_stages`` ranks; return the idle fraction of the
    fastest run (best of k: the run least disturbed by other programs on the machine).

    ``workload="device"`` holds each action for ``action_s`` seconds without using a core;
    ``workload="cpu"`` does ``repeats`` (size x size) matmuls per action.
    """

    check_int("n_stages", n_stages, low=1)
    check_int("n_microbatches", n_microbatches, low=1)
    make_schedule(schedule, n_stages, n_microbatches)     # a bad name fails here, not on every rank
    check_choice("workload", workload, WORKLOADS)
    check_real("action_s", action_s, low=0, low_open=True, why="seconds each action takes")
    check_int("size", size, low=1)
    check_int("repeats", repeats, low=1)
    check_int("trials", trials, low=1)
    per_rank = run_distributed(_rank_records, n_stages, n_microbatches, schedule, workload,
                               action_s, size, repeats, trials, timeout=timeout)
    runs = [[per_rank[r][t] for r in range(n_stages)] for t in range(trials)]

    def span(run):
        return max(e for recs in run for _, _, e in recs) - min(s for recs in run for _, s, _ in recs)
    return idle_fraction(min(runs, key=span))
