"""Latency vs throughput: how batching trades one for the other, measured on a real model."""

from __future__ import annotations

import time

import torch

from .model import generate
from .validate import bad, check_int


def batch_sweep(model, batch_sizes=(1, 2, 4, 8, 16, 32), *, prompt_len: int = 16,
                new_tokens: int = 32, repeats: int = 2) -> list[dict]:
    """Greedy-generate ``new_tokens`` for batches of each size; time each (best of ``repeats``).

    Every request in a batch finishes together, so a request's latency is the batch's time, and
    throughput is ``batch x new_tokens / time``.
    """
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeats", repeats)):
        check_int(name, value, low=1)
    if isinstance(batch_sizes, (str, bytes)) or not hasattr(batch_sizes, "__iter__") or not batch_sizes:
        raise bad("batch_sizes", batch_sizes, "a non-empty list of ints >= 1")
    for i, b in enumerate(batch_sizes):
        check_int(f"batch_sizes[{i}]", b, low=1)
    vocab = model.config.vocab_size
    rows = []
    for batch in batch_sizes:
        ids = torch.randint(0, min(vocab, 256), (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            generate(model, ids, new_tokens)
            best = min(best, time.perf_counter() - start)
        rows.append({"batch": batch, "latency_s": best, "tokens_per_s": batch * new_tokens / best})
    return rows


def plot_sweep(rows: list[dict], ax=None):
    """Throughput (left axis) and latency (right axis) against batch size."""
    import matplotlib.pyplot as plt

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
    ax.set_title("Batching: throughput up, latency up")
    return ax
