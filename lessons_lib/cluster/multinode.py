"""Launching with ``torchrun``: one node, and two "nodes" on one machine.

``torchrun`` (``python -m torch.distributed.run``) is a small supervisor (the *agent*)
per node. The agents meet at a **rendezvous**: with ``--rdzv-backend=c10d`` one of them
hosts a key-value store (a ``TCPStore``) at ``--rdzv-endpoint=HOST:PORT`` and every
agent registers there, learns how many nodes came and which number it got. Then each
agent starts ``--nproc-per-node`` worker processes and tells each who it is through
environment variables:

* ``RANK``: the global rank, ``0 .. WORLD_SIZE - 1``;
* ``LOCAL_RANK``: the rank on this node, ``0 .. LOCAL_WORLD_SIZE - 1``; picks the GPU
  (``cuda:LOCAL_RANK``);
* ``WORLD_SIZE``: all workers of the job, ``nnodes x nproc_per_node``;
* ``GROUP_RANK``: the node's number, as assigned by the rendezvous;
* ``MASTER_ADDR`` / ``MASTER_PORT``: where the store that ``init_process_group``
  uses listens.

Real nodes run the same command on different machines with their own
``--node-rank``; here both agents run on localhost, which exercises the same
rendezvous and environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from ..launch.child import course_env, start_child, stop_child
from ..validate import check_int, check_real

ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def report_environment() -> str:
    """Run on every rank: print (in one write) what torchrun told it, then all-reduce to prove the group works."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([rank])
    dist.all_reduce(total)
    env = " ".join(f"{name}={os.environ.get(name, '?')}" for name in ENV_VARS[:4])
    master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    line = (f"{env} MASTER_ADDR:MASTER_PORT={master}"
            f" | all_reduce(rank) = {total.item()} (expected {world * (world - 1) // 2})")
    print(line + "\n", end="", flush=True)   # one write: lines from several ranks never interleave
    return line


def free_port() -> int:
    """A TCP port that is free now (the OS picks it); never a fixed number."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nnodes: int, node_rank: int, nproc_per_node: int, port: int) -> list[str]:
    """The ``torchrun`` command line of one node, run by this Python interpreter."""
    check_int("nnodes", nnodes, low=1)
    check_int("nproc_per_node", nproc_per_node, low=1)
    check_int("port", port, low=1, high=65535)
    check_int("node_rank", node_rank, low=0, high=nnodes - 1, why=f"one number per node of {nnodes}")
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
            f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--local-addr=127.0.0.1", "--max-restarts=0",
            "-m", "lessons_lib.cluster.multinode"]


def launch_nodes(nnodes: int = 2, nproc_per_node: int = 2, timeout: float = 240.0) -> dict:
    """Start ``nnodes`` torchrun agents on localhost that rendezvous on a free port; wait for all.

    Returns ``{"returncodes": [...], "lines": sorted worker lines, "seconds": wall time}``.
    Lines are sorted because the ranks print concurrently. On timeout every agent is
    killed (with its workers: each agent leads its own process group) and
    ``TimeoutError`` is raised.
    """
    check_int("nnodes", nnodes, low=1)
    check_int("nproc_per_node", nproc_per_node, low=1)
    check_real("timeout", timeout, low=0, low_open=True, why="seconds")
    port = free_port()
    env = course_env(PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    # Each agent leads its own session, so stopping it stops its ranks too.
    agents = [start_child("torch.distributed.run", torchrun_command(nnodes, node, nproc_per_node, port)[3:],
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for node in range(nnodes)]
    outputs = []
    try:
        for agent in agents:
            remaining = max(1.0, timeout - (time.perf_counter() - start))
            outputs.append(agent.communicate(timeout=remaining))
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the {nnodes} torchrun agents did not finish within timeout={timeout:g} s") from None
    finally:
        for agent in agents:
            stop_child(agent)
    lines = sorted(line for out, _ in outputs for line in out.splitlines() if line.startswith("RANK="))
    return {"returncodes": [a.returncode for a in agents], "lines": lines,
            "stderr": [err for _, err in outputs], "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    from lessons_lib.launch import run_under_torchrun

    run_under_torchrun(report_environment, timeout=120)
