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

import time

import torch
import torch.distributed as dist

from ..validate import check_int


def _compute(x: torch.Tensor, iters: int) -> torch.Tensor:
    for _ in range(iters):
        x = torch.tanh(x @ x)
    return x


def overlap_timeline(numel: int = 1 << 20, matrix: int = 128, iters: int = 20) -> dict:
    """On every rank: an all-reduce of ``numel`` floats and ``iters`` matmuls, blocking then overlapped.

    Returns ``{"blocking": events, "overlapped": events}``; an event is
    ``(name, start_s, end_s)`` relative to the start of that run. The compute does not
    read the all-reduced tensor, which is what makes overlapping it legal.
    """
    check_int("numel", numel, low=1)
    check_int("matrix", matrix, low=1)
    check_int("iters", iters, low=0)
    grads = torch.ones(numel)
    x = torch.randn(matrix, matrix, generator=torch.Generator().manual_seed(0)) / matrix ** 0.5
    _compute(x, 2)   # warm-up: the first matmul pays one-off costs
    runs = {}
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
        runs[mode] = events
    return runs


def plot_timeline(timelines: list[dict], ax=None):
    """Draw each rank's blocking and overlapped runs as horizontal bars; return the axes."""
    import matplotlib.pyplot as plt

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
    ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    return ax
