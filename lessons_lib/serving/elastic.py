"""Failure domains and elastic restarts.

A tensor-parallel (TP) group is one failure domain: every rank holds a slice of every layer, and
each layer ends in a collective that needs *all* ranks. If one rank dies the others block in that
collective; the replica cannot limp on with fewer shards. The unit you take out of rotation,
restart and re-admit is the whole TP group, which the router sees as one worker.

``torchrun --max-restarts=K`` implements that at the job level: when any rank fails, the agent
stops all of them and restarts the whole group (up to K times), telling each process which
attempt it is through ``TORCHELASTIC_RESTART_COUNT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from ..launch.child import course_env, start_child, stop_child
from ..parallel.tensor import RowParallelLinear
from ..validate import check_choice, check_int, check_real


def tp_row_parallel_step(x, weight, fail_rank: int | None = None, how: str = "raise"):
    """One row-parallel linear layer on the current process group, run inside ``run_distributed``.

    Each rank keeps its slice of the weight's input columns (lesson 12's ``RowParallelLinear``),
    multiplies its slice of ``x`` by it, and an all-reduce sums the partial products. ``fail_rank``
    simulates losing one rank before the collective: ``how="raise"`` (an error) or ``"exit"``
    (the process dies, like a lost GPU); the others then wait in the all-reduce.
    """
    check_choice("how", how, ("raise", "exit"))
    rank, world = dist.get_rank(), dist.get_world_size()
    if fail_rank is not None:
        check_int("fail_rank", fail_rank, low=0, high=world - 1)
    full = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    full.weight.data.copy_(weight)
    layer = RowParallelLinear.from_linear(full, input_is_parallel=False)
    if rank == fail_rank:
        if how == "exit":
            os._exit(1)
        raise RuntimeError(f"rank {rank}: device lost (simulated)")
    return layer(x)


def _init_for_attempt(attempt: int, timeout: float = 60.0) -> tuple[int, int]:
    """Join the group with every key under an ``attempt{N}/`` prefix of torchrun's store.

    Why not plain ``init_from_env``: after a restart the agent's store still holds the gloo
    addresses the failed attempt published, and a rank that reads a stale one fails with
    "connection refused" (seen with torch 2.13). A per-attempt prefix keeps attempts apart.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=(rank == 0 and not agent_store),
                          timeout=timedelta(seconds=timeout))
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{attempt}/", store), rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout))
    return rank, world


def elastic_main() -> None:
    """The script torchrun runs: rank 1 fails on the first attempt, everyone succeeds after."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ["RANK"])
    if attempt == 0 and rank == 1:
        # Fail before joining the process group: the agent sees a dead rank, stops the others
        # (still waiting in rendezvous) and restarts the whole group.
        # One write per line (newline included): ranks share torchrun's pipe and must not interleave.
        print(f"attempt {attempt} rank {rank}: failing on purpose\n", end="", flush=True)
        sys.exit(3)
    rank, world = _init_for_attempt(attempt, timeout=60)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    print(f"attempt {attempt} rank {rank}: all-reduce gave {t.item():.0f}\n", end="", flush=True)
    dist.destroy_process_group()


def run_elastic(nproc: int = 2, max_restarts: int = 2, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Launch :func:`elastic_main` with ``torchrun --standalone --max-restarts``; return the result."""
    check_int("nproc", nproc, low=2, why="rank 1 is the one that fails")
    check_int("max_restarts", max_restarts, low=0)
    check_real("timeout", timeout, low=0, low_open=True)
    args = ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            "--monitor-interval=0.2", "-m", "lessons_lib.serving.elastic"]
    # Its own session, so a timeout stops torchrun *and* the ranks it started.
    proc = start_child("torch.distributed.run", args, env=course_env(OMP_NUM_THREADS="1"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_child(proc)
        out, err = proc.communicate()
        raise TimeoutError(f"torchrun did not finish within {timeout} s:\n{err[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

if __name__ == "__main__":
    elastic_main()
