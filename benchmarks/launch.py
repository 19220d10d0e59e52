"""Cost of a distributed call: the warm pool of run_distributed vs a fresh spawn each time.

Run: ``python benchmarks/launch.py``. Prints one table measured in one run.
Goal: the median of 20 warm calls of a trivial function on 4 ranks is at most 0.15 s.
"""

import os
import socket
import statistics
import time
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

from lessons_lib import run_distributed
from lessons_lib.launch import shutdown

WORLD_SIZE, CALLS, SPAWN_CALLS = 4, 20, 3


def trivial():
    return dist.get_rank()


def _spawned_rank(rank, world_size, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    trivial()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_spawn() -> float:
    start = time.perf_counter()
    mp.spawn(_spawned_rank, args=(WORLD_SIZE, free_port()), nprocs=WORLD_SIZE, join=True)
    return time.perf_counter() - start


def main():
    shutdown()
    start = time.perf_counter()
    run_distributed(trivial, WORLD_SIZE)
    first = time.perf_counter() - start
    warm = []
    for _ in range(CALLS):
        start = time.perf_counter()
        run_distributed(trivial, WORLD_SIZE)
        warm.append(time.perf_counter() - start)
    shutdown()
    spawn = statistics.median(time_spawn() for _ in range(SPAWN_CALLS))
    warm_median = statistics.median(warm)

    print(f"trivial fn on {WORLD_SIZE} ranks (gloo), {os.cpu_count()} CPU cores\n")
    print(f"| launch | seconds per call | vs warm run_distributed |")
    print(f"|---|---|---|")
    print(f"| run_distributed, warm (median of {CALLS}) | {warm_median:.4f} | 1.0x |")
    print(f"| run_distributed, first call (starts the pool) | {first:.3f} | {first / warm_median:.0f}x |")
    print(f"| mp.spawn + init_process_group (median of {SPAWN_CALLS}) | {spawn:.3f} | {spawn / warm_median:.0f}x |")
    verdict = "met" if warm_median <= 0.15 else "NOT met"
    print(f"\ngoal: warm median <= 0.15 s: {verdict} ({warm_median:.4f} s)")


if __name__ == "__main__":
    main()
