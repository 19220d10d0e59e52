"""Cutting a model into pipeline stages and a batch into micro-batches.

Pipeline parallelism is inter-layer model parallelism: stage ``s`` of ``pp`` owns a
contiguous run of decoder layers, the first stage also owns the embedding and the
last stage the final norm and the LM head. Activations flow forward from stage to
stage; no weight is ever copied.

Both cuts are pure functions of integers, so the executor, the visualiser and the
tests all agree on who owns what.
"""

from __future__ import annotations

import torch


def _check_int(name: str, value, low: int, high: int | None = None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        choices = f"choose {low} to {high}" if high is not None else f"choose an int >= {low}"
        raise ValueError(f"{name}={value} is out of range{why}: {choices}")


def partition_layers(n_layers: int, pp: int) -> list[range]:
    """Split ``n_layers`` decoder layers into ``pp`` contiguous, balanced stages.

    Each stage gets ``n_layers // pp`` layers and the first ``n_layers % pp`` stages one
    more, so sizes differ by at most one (5 layers on 2 stages -> 3, 2). Megatron puts
    the extra layers first too; the last stage already carries the LM head.

    >>> partition_layers(5, 2)
    [range(0, 3), range(3, 5)]
    """
    _check_int("n_layers", n_layers, 1)
    _check_int("pp", pp, 1, n_layers, why=f" (a stage needs at least one of the {n_layers} layers)")
    base, extra = divmod(n_layers, pp)
    stages, start = [], 0
    for s in range(pp):
        size = base + (1 if s < extra else 0)
        stages.append(range(start, start + size))
        start += size
    return stages


def microbatch_sizes(batch_size: int, n_microbatches: int) -> list[int]:
    """Rows per micro-batch when ``batch_size`` rows are cut into ``n_microbatches``.

    Uneven batches are allowed: the first ``batch_size % n_microbatches`` micro-batches
    get one extra row (10 rows in 4 -> 3, 3, 2, 2), the same rule as ``torch.tensor_split``.
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("n_microbatches", n_microbatches, 1, batch_size,
               why=f" (each micro-batch needs at least one of the batch's {batch_size} rows)")
    base, extra = divmod(batch_size, n_microbatches)
    return [base + (1 if i < extra else 0) for i in range(n_microbatches)]


def split_microbatches(batch: torch.Tensor, n_microbatches: int) -> list[torch.Tensor]:
    """Cut ``batch`` along dim 0 into ``n_microbatches`` pieces (sizes from :func:`microbatch_sizes`)."""
    if not isinstance(batch, torch.Tensor) or batch.dim() < 1:
        raise ValueError("batch must be a tensor with a batch dimension first")
    sizes = microbatch_sizes(batch.shape[0], n_microbatches)
    return list(torch.split(batch, sizes, dim=0))
