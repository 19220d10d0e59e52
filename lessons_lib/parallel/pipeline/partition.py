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

from ...validate import check_int, check_tensor


def partition_layers(n_layers: int, pp: int) -> list[range]:
    """Split ``n_layers`` decoder layers into ``pp`` contiguous, balanced stages.

    Each stage gets ``n_layers // pp`` layers and the first ``n_layers % pp`` stages one
    more, so sizes differ by at most one (5 layers on 2 stages -> 3, 2). Megatron puts
    the extra layers first too; the last stage already carries the LM head.

    >>> partition_layers(5, 2)
    [range(0, 3), range(3, 5)]
    """
    check_int("n_layers", n_layers, low=1)
    check_int("pp", pp, low=1, high=n_layers, why=f"a stage needs at least one of the {n_layers} layers")
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
    check_int("batch_size", batch_size, low=1)
    check_int("n_microbatches", n_microbatches, low=1, high=batch_size,
              why=f"each micro-batch needs at least one of the batch's {batch_size} rows")
    base, extra = divmod(batch_size, n_microbatches)
    return [base + (1 if i < extra else 0) for i in range(n_microbatches)]


def split_microbatches(batch: torch.Tensor, n_microbatches: int) -> list[torch.Tensor]:
    """Cut ``batch`` along dim 0 into ``n_microbatches`` pieces (sizes from :func:`microbatch_sizes`)."""
    check_tensor("batch", batch, min_dim=1, why="micro-batches are cut along dim 0")
    sizes = microbatch_sizes(batch.shape[0], n_microbatches)
    return list(torch.split(batch, sizes, dim=0))
