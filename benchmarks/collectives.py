"""The course's ring all-reduce (send/recv driven from Python) against gloo's own all_reduce.

Run: ``python benchmarks/collectives.py``. One table, measured side by side in one run:
for each size the two implementations alternate (gloo, ring, gloo, ring, ...) so that
load from other processes hits both alike; each time is the slowest rank's, after a
barrier; the median of ``REPEATS`` runs after one warm-up is reported, with the bus
bandwidth ``n / t * 2 (p - 1) / p`` (nccl-tests' definition). The ring runs with
``check=False`` (no input-metadata exchange), as gloo does no such check.
Goal: the ring takes at most 1.5x gloo's time at 1, 4 and 16 MB on 2 and 4 ranks.
"""

import statistics
import time

from lessons_lib import run_distributed
from lessons_lib.comm.cost_model import bus_bandwidth
from lessons_lib.display import markdown_table

SIZES_MB = (1, 4, 16)
REPEATS = 15
GOAL = 1.5


def alternate(sizes_bytes, repeats):
    """On every rank: median seconds of gloo's and the ring's all-reduce, run alternately."""
    import torch
    import torch.distributed as dist

    from lessons_lib.comm import ring_all_reduce

    def timed(fn, t):
        dist.barrier()
        start = time.perf_counter()
        fn(t)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item()

    rows = []
    for n_bytes in sizes_bytes:
        t = torch.ones(n_bytes // 4)
        gloo, ring = [], []
        for i in range(repeats + 1):
            g = timed(dist.all_reduce, t)
            r = timed(lambda x: ring_all_reduce(x, check=False), t)
            if i:   # the first pair is a warm-up
                gloo.append(g)
                ring.append(r)
        rows.append((statistics.median(gloo), statistics.median(ring)))
    return rows


def measure(repeats: int = REPEATS):
    table = []
    sizes = [mb << 20 for mb in SIZES_MB]
    for p in (2, 4):
        medians = run_distributed(alternate, p, sizes, repeats, timeout=600)[0]
        for mb, n, (tg, tr) in zip(SIZES_MB, sizes, medians):
            table.append([p, mb, round(tg * 1e3, 2), round(tr * 1e3, 2), round(tr / tg, 2),
                          round(bus_bandwidth(n, tg, p) / 1e9, 2), round(bus_bandwidth(n, tr, p) / 1e9, 2),
                          "yes" if tr / tg <= GOAL else "no"])
    return table


if __name__ == "__main__":
    header = ["p", "MB", "gloo ms", "ring ms", "ring / gloo", "gloo busbw GB/s", "ring busbw GB/s",
              f"<= {GOAL}x"]
    print(markdown_table(header, measure()))
