"""Latency vs throughput: how batching trades one for the other, measured on a real model.

Two regimes matter. On a GPU serving a real model, a decode step at small batch reads every weight
once and does little arithmetic per byte, so its time has a floor, weight bytes / memory bandwidth
(:func:`decode_floor_s`); batching shares that read among the sequences. The course's tiny LM on a
CPU is in the other regime: its weights are a few megabytes, so a step's time is mostly the fixed
cost of dispatching its many small operators from Python, and batching shares *that*
(:func:`fixed_and_per_sequence` separates the two parts of a measured step).
"""

from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..model import generate
from ..validate import bad, check_int, check_real

# NVIDIA H100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h100/),
# "GPU memory bandwidth": H100 SXM 3.35 TB/s (H100 NVL: 3.9 TB/s).
H100_SXM_HBM_BYTES_PER_S = 3.35e12
# The same datasheet lists BF16 Tensor Core 1,979 teraFLOPS for H100 SXM "with sparsity"; dense is half.
H100_SXM_BF16_FLOPS = 1979e12 / 2
H100_SXM_SOURCE = ("NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/ "
                   "(H100 SXM: GPU memory bandwidth 3.35 TB/s; BF16 Tensor Core 1,979 TFLOPS with "
                   "sparsity, so about 990 dense)")


def decode_floor_s(weight_bytes_per_device: float, bandwidth_bytes_per_s: float) -> float:
    """The least time one decode step can take on a device that must read ``weight_bytes_per_device``
    from memory at ``bandwidth_bytes_per_s``: a lower bound (KV-cache reads, communication and kernel
    launches only add to it), reached when the step is memory-bound."""
    check_real("weight_bytes_per_device", weight_bytes_per_device, low=0, low_open=True)
    check_real("bandwidth_bytes_per_s", bandwidth_bytes_per_s, low=0, low_open=True)
    return weight_bytes_per_device / bandwidth_bytes_per_s


def critical_batch(peak_flops: float, bandwidth_bytes_per_s: float, bytes_per_weight: float = 2.0) -> float:
    """The batch at which a decode step's arithmetic takes as long as its weight read.

    A step does 2 FLOPs per weight per sequence (a multiply and an add) and reads each weight once
    for the whole batch, so compute time ``b x 2 x P / peak`` meets read time
    ``P x bytes_per_weight / bandwidth`` at ``b = peak x bytes_per_weight / (2 x bandwidth)``. Below
    it the step is memory-bound and extra sequences are nearly free; above it, compute-bound.
    """
    check_real("peak_flops", peak_flops, low=0, low_open=True)
    check_real("bandwidth_bytes_per_s", bandwidth_bytes_per_s, low=0, low_open=True)
    check_real("bytes_per_weight", bytes_per_weight, low=0, low_open=True)
    return peak_flops * bytes_per_weight / (2 * bandwidth_bytes_per_s)


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def weight_read_s(model, repeats: int = 20) -> float:
    """Seconds to read all of ``model``'s weights once (one sum over them laid end to end, on one
    thread, best of ``repeats``): the memory part of a decode step."""
    check_int("repeats", repeats, low=1)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return _best_of(flat.sum, repeats)
    finally:
        torch.set_num_threads(before)


def dispatch_s(n_ops: int, repeats: int = 20) -> float:
    """Seconds to dispatch ``n_ops`` PyTorch operators on a one-element tensor (best of ``repeats``):
    the fixed cost those operators pay whatever their size, with no data to speak of."""
    check_int("n_ops", n_ops, low=1)
    check_int("repeats", repeats, low=1)
    x = torch.zeros(1)

    def run():
        for _ in range(n_ops):
            x.add(1)
    return _best_of(run, repeats)


def operators_per_decode_step(model, batch: int = 1, prompt_len: int = 16) -> int:
    """How many PyTorch operators (ATen calls) one cached decode step dispatches.

    Each one costs a fixed dispatch from Python and PyTorch whatever the tensor sizes; for a model
    whose tensors are tiny that fixed cost is most of the step.
    """
    check_int("batch", batch, low=1)
    check_int("prompt_len", prompt_len, low=1)

    class _Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            type(self).calls += 1
            return func(*args, **(kwargs or {}))

    ids = torch.zeros(batch, prompt_len + 1, dtype=torch.long)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :-1], cache=cache)
        with _Count():
            model(ids[:, -1:], cache=cache)
    return _Count.calls


def batch_sweep(model, batch_sizes=(1, 2, 4, 8, 16, 32), *, prompt_len: int = 16,
                new_tokens: int = 32, repeats: int = 3, threads: int | None = 1) -> list[dict]:
    """Greedy-generate ``new_tokens`` for batches of each size and time each.

    Every request in a batch finishes together, so a request's latency is the batch's time, and
    throughput is ``batch x new_tokens / time``. To resist a busy machine, every size is run once
    to warm up, then ``repeats`` rounds each run every size once (interleaved, so a slow spell hits
    all sizes rather than one), and each size keeps its best round. ``decode_step_s`` is the best
    round's mean time per decode step (the prefill excluded). ``threads`` sets PyTorch's intra-op
    threads for the sweep (restored after; None leaves them): the tiny LM's operators are too small
    to gain from several threads, and on a shared machine waiting threads make timings jump.
    """
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeats", repeats)):
        check_int(name, value, low=1)
    if isinstance(batch_sizes, (str, bytes)) or not hasattr(batch_sizes, "__iter__") or not batch_sizes:
        raise bad("batch_sizes", batch_sizes, "a non-empty list of ints >= 1")
    batch_sizes = list(batch_sizes)
    for i, b in enumerate(batch_sizes):
        check_int(f"batch_sizes[{i}]", b, low=1)
    vocab = model.config.vocab_size
    prompts = {b: torch.randint(0, min(vocab, 256), (b, prompt_len),
                                generator=torch.Generator().manual_seed(b)) for b in batch_sizes}
    if threads is not None:
        check_int("threads", threads, low=1)
    best = {b: (float("inf"), 0.0) for b in batch_sizes}
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for round_ in range(repeats + 1):          # round 0 warms up and is not kept
            for batch in batch_sizes:
                timings: dict = {}
                start = time.perf_counter()
                generate(model, prompts[batch], new_tokens, timings=timings)
                elapsed = time.perf_counter() - start
                if round_ and elapsed < best[batch][0]:
                    best[batch] = (elapsed, timings["decode_s"] / max(1, new_tokens - 1))
    finally:
        torch.set_num_threads(before)
    return [{"batch": b, "latency_s": best[b][0], "tokens_per_s": b * new_tokens / best[b][0],
             "decode_step_s": best[b][1]} for b in batch_sizes]


def fixed_and_per_sequence(rows: list[dict]) -> tuple[float, float]:
    """Least-squares fit of a decode step's time as ``fixed + per_sequence x batch``.

    ``fixed`` is what a step costs whatever the batch (operator dispatch, reading the weights);
    ``per_sequence`` what each sequence adds. Batching pays while ``fixed`` dominates.
    """
    if not isinstance(rows, list) or len(rows) < 2 or not all(
            isinstance(r, dict) and {"batch", "decode_step_s"} <= set(r) for r in rows):
        raise bad("rows", rows, "batch_sweep's rows, at least two batch sizes")
    xs = torch.tensor([float(r["batch"]) for r in rows], dtype=torch.float64)
    ys = torch.tensor([float(r["decode_step_s"]) for r in rows], dtype=torch.float64)
    if float(xs.var()) == 0:
        raise bad("rows", rows, "at least two different batch sizes")
    slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
    return float(ys.mean()) - slope * float(xs.mean()), slope


def plot_sweep(rows: list[dict], ax=None):
    """Throughput (left axis) and latency (right axis) against batch size."""
    import matplotlib.pyplot as plt   # here, not at the top: ranks import this module and never draw

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2))
    batches = [r["batch"] for r in rows]
    ax.plot(batches, [r["tokens_per_s"] for r in rows], "o-", color="#4C72B0", label="throughput")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s", color="#4C72B0")
    twin = ax.twinx()
    twin.plot(batches, [r["latency_s"] for r in rows], "s--", color="#C44E52", label="latency")
    twin.set_ylabel("latency per request (s)", color="#C44E52")
    ax.set_title("Batching: throughput up, latency up (best of interleaved rounds)")
    return ax
