"""The alpha-beta cost model of communication, fitted to measurements.

Sending ``n`` bytes costs ``t = alpha + n * beta``: ``alpha`` is the latency of one
message (software overhead, one network round), ``beta`` the time per byte (the
inverse of bandwidth). A ring all-reduce makes ``2 (p - 1)`` steps, each one message
of ``n / p`` bytes, so

    t_ring(n, p) = 2 (p - 1) alpha + 2 (p - 1) / p * n * beta.

Small messages are latency-bound (the alpha term), large ones bandwidth-bound.

The same model prices the other all-reduce algorithms as ``steps * alpha + bytes * beta``,
with the steps and the bytes each rank sends (a rank's messages within one step travel
together, so a step costs one alpha however many peers it talks to):

==========  =============  =====================
algorithm   steps          bytes sent per rank
==========  =============  =====================
ring        ``2 (p - 1)``  ``2 (p - 1) / p * n``
one-shot    ``1``          ``(p - 1) n``
two-shot    ``2``          ``2 (p - 1) / p * n``
==========  =============  =====================

One-shot wins while alpha dominates (small messages), ring and two-shot once bytes dominate.
Two-shot never loses to the ring in this model; what the model leaves out is that it needs
every pair of ranks connected (``p - 1`` messages in flight per rank), which a fully
connected NVLink/NVSwitch node offers and a ring of neighbours does not.

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
than across nodes over one NDR port: why tensor parallelism (two all-reduces per decoder
layer, after attention and after the MLP) stays inside a node and pipeline parallelism (one send
per stage) spans nodes.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..validate import bad, check_choice, check_int, check_real
from .collectives import one_shot_all_reduce, ring_all_reduce, two_shot_all_reduce

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
    check_real("n_bytes", n_bytes, low=0)
    check_int("p", p, low=2, why="communication needs at least 2 ranks")
    return 2 * (p - 1), 2 * (p - 1) / p * n_bytes


def predict_ring_all_reduce(n_bytes: float, p: int, alpha: float, beta: float) -> float:
    """Predicted seconds of a ring all-reduce of ``n_bytes`` on ``p`` ranks."""
    # Not required >= 0: a least-squares fit of noisy timings may give a slightly negative term.
    check_real("alpha", alpha, why="seconds per message")
    check_real("beta", beta, why="seconds per byte")
    a, b = ring_all_reduce_terms(n_bytes, p)
    return a * alpha + b * beta


ALL_REDUCE_ALGORITHMS = ("ring", "one_shot", "two_shot")


def all_reduce_terms(algorithm: str, n_bytes: float, p: int) -> tuple[float, float]:
    """The coefficients ``(steps, bytes per rank)`` of alpha and beta for an all-reduce algorithm.

    ``algorithm`` is ``"ring"`` (``2 (p-1)``, ``2 (p-1)/p n``), ``"one_shot"`` (``1``,
    ``(p-1) n``) or ``"two_shot"`` (``2``, ``2 (p-1)/p n``).
    """
    check_choice("algorithm", algorithm, ALL_REDUCE_ALGORITHMS)
    check_real("n_bytes", n_bytes, low=0)
    check_int("p", p, low=2, why="communication needs at least 2 ranks")
    if algorithm == "ring":
        return ring_all_reduce_terms(n_bytes, p)
    if algorithm == "one_shot":
        return 1, (p - 1) * n_bytes
    return 2, 2 * (p - 1) / p * n_bytes


def predict_all_reduce(algorithm: str, n_bytes: float, p: int, alpha: float, beta: float) -> float:
    """Predicted seconds of an all-reduce of ``n_bytes`` on ``p`` ranks: ``steps alpha + bytes beta``."""
    check_real("alpha", alpha, why="seconds per message")
    check_real("beta", beta, why="seconds per byte")
    steps, n_sent = all_reduce_terms(algorithm, n_bytes, p)
    return steps * alpha + n_sent * beta


def fastest_all_reduce(n_bytes: float, p: int, alpha: float, beta: float) -> str:
    """The algorithm the model predicts fastest (ties go to the one named first in
    ``ALL_REDUCE_ALGORITHMS``, so two-shot beats the ring only where it is strictly faster)."""
    times = {a: predict_all_reduce(a, n_bytes, p, alpha, beta) for a in ALL_REDUCE_ALGORITHMS}
    return min(ALL_REDUCE_ALGORITHMS, key=times.__getitem__)   # min keeps the first of equals


def crossover_bytes(first: str, second: str, p: int, alpha: float, beta: float) -> float | None:
    """The message size at which ``first`` and ``second`` take equal time in the model.

    Below it the algorithm with fewer steps is faster, above it the one that sends fewer bytes.
    None when the two never cross (one is never slower, or the model has no positive crossing).
    """
    check_real("alpha", alpha, why="seconds per message")
    check_real("beta", beta, low=0, low_open=True, why="seconds per byte")
    s1, b1 = all_reduce_terms(first, 1.0, p)
    s2, b2 = all_reduce_terms(second, 1.0, p)
    if b1 == b2:
        return None
    n = (s2 - s1) * alpha / ((b1 - b2) * beta)
    return n if n > 0 else None


def fit_alpha_beta(samples: list[tuple[float, int, float]]) -> tuple[float, float]:
    """Least-squares ``(alpha, beta)`` from ``(n_bytes, p, seconds)`` ring all-reduce samples.

    Each sample gives one linear equation ``2 (p-1) alpha + 2 (p-1)/p n beta = t``.
    Relative errors are minimised (each row divided by ``t``), so microsecond-sized small
    messages weigh as much as millisecond-sized large ones.
    """
    samples = list(samples)
    if len(samples) < 2:
        raise bad("samples", samples, "at least 2 measurements (n_bytes, p, seconds) to fit 2 parameters")
    for i, sample in enumerate(samples):
        if not isinstance(sample, (tuple, list)) or len(sample) != 3:
            raise bad(f"samples[{i}]", sample, "a tuple (n_bytes, p, seconds)")
        check_real(f"samples[{i}] seconds", sample[2], low=0, low_open=True)
    rows = torch.tensor([ring_all_reduce_terms(n, p) for n, p, _ in samples], dtype=torch.float64)
    times = torch.tensor([t for _, _, t in samples], dtype=torch.float64)
    solution = torch.linalg.lstsq(rows / times[:, None], torch.ones_like(times)[:, None]).solution
    alpha, beta = solution[:, 0].tolist()
    return alpha, beta


def bus_bandwidth(n_bytes: float, seconds: float, p: int) -> float:
    """nccl-tests' all-reduce bus bandwidth in bytes/s: ``n / t * 2 (p-1) / p``."""
    check_real("n_bytes", n_bytes, low=0)
    check_real("seconds", seconds, low=0, low_open=True)
    check_int("p", p, low=1)
    return n_bytes / seconds * 2 * (p - 1) / p


_FROM_SEND_RECV = {"ring": ring_all_reduce, "one_shot": one_shot_all_reduce, "two_shot": two_shot_all_reduce}


def time_all_reduce(sizes_bytes: list[int], repeats: int = 5, impl: str = "gloo", *,
                    warmup: int = 1) -> list[float]:
    """Run on every rank: median seconds of an all-reduce of each size (the slowest rank's view).

    ``impl`` is ``"gloo"`` (``dist.all_reduce``) or one of this course's all-reduces built
    from send/recv: ``"ring"``, ``"one_shot"``, ``"two_shot"``
    (:mod:`lessons_lib.comm.collectives`). Each timing starts after a
    barrier, so all ranks begin together; the maximum over ranks is taken, because an
    all-reduce is done only when the last rank is done. ``warmup`` untimed runs of each size
    come first (the first messages between two ranks pay for setting up their connection);
    ``warmup=0`` suits a size timed after smaller ones have warmed the same connections.
    """

    check_choice("impl", impl, ("gloo",) + ALL_REDUCE_ALGORITHMS)
    check_int("repeats", repeats, low=1)
    check_int("warmup", warmup, low=0)
    if isinstance(sizes_bytes, (str, bytes)) or not hasattr(sizes_bytes, "__iter__"):
        raise bad("sizes_bytes", sizes_bytes, "a list of message sizes in bytes")
    for i, n_bytes in enumerate(sizes_bytes):
        check_int(f"sizes_bytes[{i}]", n_bytes, low=1)
    results = []
    for n_bytes in sizes_bytes:
        t = torch.ones(max(1, n_bytes // 4))
        times = []
        for i in range(warmup + repeats):
            dist.barrier()
            start = time.perf_counter()
            if impl == "gloo":
                dist.all_reduce(t)
            else:
                _FROM_SEND_RECV[impl](t, check=False)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i >= warmup:
                times.append(elapsed.item())
        results.append(statistics.median(times))
    return results
