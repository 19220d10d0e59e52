"""The alpha-beta cost model of communication, fitted to measurements.

Sending ``n`` bytes costs ``t = alpha + n * beta``: ``alpha`` is the latency of one
message (software overhead, one network round), ``beta`` the time per byte (the
inverse of bandwidth). A ring all-reduce makes ``2 (p - 1)`` steps, each one message
of ``n / p`` bytes, so

    t_ring(n, p) = 2 (p - 1) alpha + 2 (p - 1) / p * n * beta.

Small messages are latency-bound (the alpha term), large ones bandwidth-bound.

Bus bandwidth (nccl-tests, ``doc/PERFORMANCE.md``): ``algbw = n / t`` is the
bandwidth the caller sees; ``busbw = algbw * 2 (p - 1) / p`` for all-reduce is the
rate each link actually carries, comparable with the hardware's link speed and
independent of ``p`` for a ring.

Published link speeds, for scale (all per GPU or per port, as published):

* NVLink 4 on NVIDIA H100 SXM: 900 GB/s total (both directions, all links)
  -- NVIDIA H100 Tensor Core GPU datasheet.
* PCIe Gen5 x16: 128 GB/s total -- same datasheet.
* InfiniBand NDR: 400 Gb/s per port = 50 GB/s per direction -- NVIDIA Quantum-2 /
  ConnectX-7 product pages.

So inside an NVLink node a GPU moves bytes about 9x faster per direction (450 vs 50 GB/s)
than across nodes over one NDR port: why tensor parallelism (an all-reduce
per layer) stays inside a node and pipeline parallelism (one send per stage) spans nodes.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

NVLINK4_H100_GB_S = 900.0        # GB/s, total per GPU (NVIDIA H100 datasheet)
PCIE5_X16_GB_S = 128.0           # GB/s, total (NVIDIA H100 datasheet)
INFINIBAND_NDR_GBIT_S = 400.0    # Gb/s per port (NVIDIA Quantum-2 InfiniBand)
SOURCES = {
    "NVLink 4 (H100)": "NVIDIA H100 Tensor Core GPU datasheet: NVLink 900 GB/s, PCIe Gen5 128 GB/s",
    "InfiniBand NDR": "NVIDIA Quantum-2 InfiniBand platform: 400 Gb/s per port",
    "busbw": "github.com/NVIDIA/nccl-tests doc/PERFORMANCE.md",
}


def ring_all_reduce_terms(n_bytes: float, p: int) -> tuple[float, float]:
    """The coefficients of alpha and beta in the ring all-reduce time: ``(2 (p-1), 2 (p-1)/p n)``."""
    if p < 2:
        raise ValueError(f"p must be >= 2 for communication to happen, got {p!r}")
    return 2 * (p - 1), 2 * (p - 1) / p * n_bytes


def predict_ring_all_reduce(n_bytes: float, p: int, alpha: float, beta: float) -> float:
    """Predicted seconds of a ring all-reduce of ``n_bytes`` on ``p`` ranks."""
    a, b = ring_all_reduce_terms(n_bytes, p)
    return a * alpha + b * beta


def fit_alpha_beta(samples: list[tuple[float, int, float]]) -> tuple[float, float]:
    """Least-squares ``(alpha, beta)`` from ``(n_bytes, p, seconds)`` ring all-reduce samples.

    Each sample gives one linear equation ``2 (p-1) alpha + 2 (p-1)/p n beta = t``.
    Relative errors are minimised (each row divided by ``t``), so microsecond-sized small
    messages weigh as much as millisecond-sized large ones.
    """
    if len(samples) < 2:
        raise ValueError(f"samples must hold at least 2 measurements to fit 2 parameters, got {len(samples)}")
    rows = torch.tensor([ring_all_reduce_terms(n, p) for n, p, _ in samples], dtype=torch.float64)
    times = torch.tensor([t for _, _, t in samples], dtype=torch.float64)
    if (times <= 0).any():
        raise ValueError("every measured time in samples must be > 0 seconds")
    solution = torch.linalg.lstsq(rows / times[:, None], torch.ones_like(times)[:, None]).solution
    alpha, beta = solution[:, 0].tolist()
    return alpha, beta


def bus_bandwidth(n_bytes: float, seconds: float, p: int) -> float:
    """nccl-tests' all-reduce bus bandwidth in bytes/s: ``n / t * 2 (p-1) / p``."""
    return n_bytes / seconds * 2 * (p - 1) / p


def time_all_reduce(sizes_bytes: list[int], repeats: int = 5, impl: str = "gloo") -> list[float]:
    """Run on every rank: median seconds of an all-reduce of each size (the slowest rank's view).

    ``impl`` is ``"gloo"`` (``dist.all_reduce``) or ``"ring"`` (this course's
    :func:`~lessons_lib.comm.collectives.ring_all_reduce`). Each timing starts after a
    barrier, so all ranks begin together; the maximum over ranks is taken, because an
    all-reduce is done only when the last rank is done.
    """
    from .collectives import ring_all_reduce

    if impl not in ("gloo", "ring"):
        raise ValueError(f"impl must be 'gloo' or 'ring', got {impl!r}")
    results = []
    for n_bytes in sizes_bytes:
        t = torch.ones(max(1, n_bytes // 4))
        times = []
        for i in range(repeats + 1):   # the first run is a warm-up
            dist.barrier()
            start = time.perf_counter()
            if impl == "gloo":
                dist.all_reduce(t)
            else:
                ring_all_reduce(t, check=False)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i:
                times.append(elapsed.item())
        results.append(statistics.median(times))
    return results
