"""Synchronous vs asynchronous communication, as a recorded timeline.

*Blocking* (synchronous) calls return when the operation is complete: ``dist.send``,
``dist.all_reduce(t)``. *Non-blocking* (asynchronous) calls return at once with a
work handle: ``dist.isend``/``dist.irecv``, or any collective with ``async_op=True``.
The caller may compute while the bytes move, then ``work.wait()`` before it touches
the buffer. That overlap, hiding communication behind independent compute, is what
"asynchronous" means; both kinds are all-reduces, reduces, sends alike.

:func:`overlap_timeline` runs the same communication and compute both ways on every
rank and records events with timestamps; :func:`plot_timeline` draws them.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..validate import check_int


def _compute(x: torch.Tensor, iters: int) -> torch.Tensor:
    for _ in range(iters):
        x = torch.tanh(x @ x)
    return x


def _timed_compute(x: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    _compute(x, iters)
    return time.perf_counter() - start


def _agree(iters: float) -> int:
    """The ranks' mean of a compute count, so every rank runs the same one."""
    mean = torch.tensor([float(iters)], dtype=torch.float64)
    dist.all_reduce(mean)
    return max(1, round(mean.item() / dist.get_world_size()))


def overlap_timeline(numel: int = 1 << 20, matrix: int = 128, iters: int | None = None, *,
                     rounds: int = 5, warmup: int = 3) -> dict:
    """On every rank: an all-reduce of ``numel`` floats and ``iters`` matmuls, blocking then overlapped.

    A fair comparison needs three things, and this does all three. **Warm-up**: the first
    all-reduce of a process group pays one-off costs (connections, buffers), so ``warmup``
    blocking all-reduces and matmuls run before anything is timed. **Comparable sizes**: the
    saving of overlap is at most ``min(communication, compute)``, so with ``iters=None`` the
    compute is sized to take about as long as the all-reduce (the ranks agree on the largest
    count). **Medians**: ``rounds`` rounds each run blocking then overlapped; the medians are
    reported and the drawn events are each mode's median round.

    Returns ``{"blocking": events, "overlapped": events, "comm_s", "compute_s", "blocking_s",
    "overlapped_s", "iters"}``: an event is ``(name, start_s, end_s)`` relative to the start of
    its run; ``comm_s`` and ``compute_s`` are the medians of the two parts of the blocking runs,
    ``blocking_s`` and ``overlapped_s`` the medians of the whole runs. The compute does not read
    the all-reduced tensor, which is what makes overlapping it legal.
    """
    check_int("numel", numel, low=1)
    check_int("matrix", matrix, low=1)
    if iters is not None:
        check_int("iters", iters, low=0)
    check_int("rounds", rounds, low=1)
    check_int("warmup", warmup, low=1)
    grads = torch.ones(numel)
    x = torch.randn(matrix, matrix, generator=torch.Generator().manual_seed(0)) / matrix ** 0.5
    comm = []
    for _ in range(warmup):
        _compute(x, 2)
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(grads)
        comm.append(time.perf_counter() - start)
    if iters is None:   # size the compute to the (warm) communication, then correct it once
        iters = _agree(statistics.median(comm) / statistics.median(
            _timed_compute(x, 20) / 20 for _ in range(3)))
        for _ in range(2):   # correct with the median ratio of three blocking rounds
            ratios = []
            for _ in range(3):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(grads)
                mid = time.perf_counter()
                _compute(x, iters)
                ratios.append((mid - start) / (time.perf_counter() - mid))
            iters = _agree(iters * statistics.median(ratios))
    runs: dict = {"blocking": [], "overlapped": []}
    for _ in range(rounds):
        for mode in ("blocking", "overlapped"):
            dist.barrier()
            t0 = time.perf_counter()
            if mode == "blocking":
                dist.all_reduce(grads)
                t1 = time.perf_counter()
                _compute(x, iters)
                t2 = time.perf_counter()
                events = [("all_reduce", 0.0, t1 - t0), ("compute", t1 - t0, t2 - t0)]
            else:
                work = dist.all_reduce(grads, async_op=True)   # returns at once with a handle
                _compute(x, iters)                              # runs while the bytes move
                t1 = time.perf_counter()
                work.wait()                                     # now grads may be read
                t2 = time.perf_counter()
                events = [("all_reduce (in flight)", 0.0, t2 - t0), ("compute", 0.0, t1 - t0),
                          ("wait", t1 - t0, t2 - t0)]
            runs[mode].append(events)
    out: dict = {"iters": iters}
    for mode, events in runs.items():
        totals = [e[-1][2] for e in events]
        out[f"{mode}_s"] = statistics.median(totals)
        out[mode] = events[sorted(range(len(totals)), key=totals.__getitem__)[len(totals) // 2]]
    out["comm_s"] = statistics.median(e[0][2] for e in runs["blocking"])
    out["compute_s"] = statistics.median(e[1][2] - e[1][1] for e in runs["blocking"])
    return out


def plot_timeline(timelines: list[dict], ax=None):
    """Draw each rank's blocking and overlapped runs as horizontal bars; return the axes."""
    import matplotlib.pyplot as plt   # here, not at the top: ranks import this module and never draw

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.6 + 0.5 * 2 * len(timelines)))
    colours = {"all_reduce": "tab:orange", "all_reduce (in flight)": "tab:orange",
               "compute": "tab:blue", "wait": "tab:red"}
    labels, y = [], 0
    for rank, runs in enumerate(timelines):
        for mode in ("blocking", "overlapped"):
            for name, start, end in runs[mode]:
                height = 0.35 if name in ("compute", "wait") else 0.7
                offset = -0.2 if name in ("compute", "wait") else 0.0
                ax.barh(y + offset, (end - start) * 1e3, left=start * 1e3, height=height,
                        color=colours[name], alpha=0.55 if "flight" in name else 0.9,
                        label=name if name not in ax.get_legend_handles_labels()[1] else None)
            labels.append(f"rank {rank} {mode}")
            y += 1
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("time since start (ms)")
    # Outside the axes, to the right: a legend inside would cover the bars it explains.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.invert_yaxis()
    ax.figure.tight_layout()
    return ax
