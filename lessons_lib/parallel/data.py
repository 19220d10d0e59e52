"""Data parallelism (DP) for inference: every rank holds the whole model and takes a slice of the batch.

Rank ``r`` of ``p`` runs the model on its own rows; the outputs are then gathered (concatenated,
in rank order) so the result is exactly the single-process output. Nothing is all-reduced: the
ranks computed *different* rows, so summing or averaging them would be meaningless. (Averaging is
what training does to *gradients*; inference has none.)

Uneven batches are normal: 10 rows on 3 ranks are split 4, 3, 3 (the first ``rows % p`` ranks
take one extra row). A batch smaller than the number of ranks is allowed: a rank left without
rows runs the model on its empty slice (an empty output, at no cost) and contributes it to the
gather, so every rank still joins every collective (a rank that skipped one would hang the others).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..comm.collectives import check_inputs
from ..model import generate
from ..validate import check_int, check_tensor
from .tensor import group_rank, group_size


def split_sizes(n_rows: int, world_size: int) -> list[int]:
    """Rows per rank: as even as possible, the first ``n_rows % world_size`` ranks one more."""
    check_int("n_rows", n_rows, low=0)
    check_int("world_size", world_size, low=1, why="the number of ranks")
    base, extra = divmod(n_rows, world_size)
    return [base + (r < extra) for r in range(world_size)]


def row_range(n_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s rows in a batch of ``n_rows``."""
    sizes = split_sizes(n_rows, world_size)
    check_int("rank", rank, low=0, high=world_size - 1)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def local_rows(batch: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's rows of ``batch`` (dim 0), by its index in ``group``."""
    check_tensor("batch", batch, min_dim=1, why="rows are split along dim 0")
    start, stop = row_range(batch.shape[0], group_size(group), group_rank(group))
    return batch[start:stop]


def _check_same_batch(call: str, name: str, batch, group, **same) -> None:
    """Every rank passes the whole batch: a rank with another shape would cut other rows and the
    gathered result would be silently wrong. One small exchange (see :mod:`lessons_lib.comm.agree`)."""
    if group_size(group) == 1:
        return
    shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else None
    check_inputs({name: batch}, group, call=call, dtypes=None, contiguous=False, min_dim=1,
                 same={f"{name}.shape": shape, **same})


def gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``local`` along dim 0, in rank order, on every rank.

    ``dist.all_gather`` needs same-shaped tensors, but slices of an uneven batch differ in rows.
    So the ranks first exchange their shapes, pad to the largest, gather, and trim each
    part back to its true length. The other dimensions and the dtype must agree across ranks.
    """
    world = group_size(group)
    if world == 1:
        return check_tensor("local", local, min_dim=1, why="rows are gathered along dim 0")
    # One exchange of every rank's shape and dtype gives the row counts and checks the rest:
    # an all-gather of different trailing shapes or dtypes would abort the process in gloo.
    shapes = [seen["local.shape"] for seen in check_inputs(
        {"local": local}, group, call="gather_rows", dtypes=None, contiguous=False, min_dim=1,
        same={"local.shape[1:]": tuple(local.shape[1:]) if isinstance(local, torch.Tensor) else None},
        hint=" (only dim 0, the rows, may differ)")]
    counts = [shape[0] for shape in shapes]
    local = local.contiguous()
    padded = torch.zeros((max(counts),) + tuple(local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)], dim=0)


class DataParallelInference(nn.Module):
    """Wrap a model (a full replica on this rank) so calling it splits the batch and gathers.

    ``forward(x, **kwargs)``: tensors in ``kwargs`` with the batch's first dimension (an
    ``attention_mask``) are split the same way. Every rank gets the full output, in batch order.
    Ranks with no rows still join the gather.
    """

    def __init__(self, model: nn.Module, group=None) -> None:
        super().__init__()
        self.module = model
        self.group = group

    @torch.no_grad()
    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        _check_same_batch("DataParallelInference.forward", "x", x, self.group)
        mine = local_rows(x, self.group)
        local_kwargs = {k: local_rows(v, self.group)
                        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == x.shape[0] else v
                        for k, v in kwargs.items()}
        # A rank with no rows still runs the model on its empty slice: that gives an empty output
        # of the right trailing shape for the gather (and costs nothing).
        out = self.module(mine, **local_kwargs)
        return gather_rows(out, self.group)


@torch.no_grad()
def data_parallel_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *,
                           attention_mask: torch.Tensor | None = None, group=None,
                           eos_id: int | None = None, **kwargs) -> torch.Tensor:
    """Greedy (or seeded) generation, each rank for its own rows with its own KV cache.

    Returns the same ``(batch, prompt + new)`` ids as :func:`lessons_lib.model.generate` on one
    process, on every rank. Ranks generate independently (no communication per token, the point of
    DP) and meet once, at the end, to gather. With ``eos_id`` a rank may stop early: its rows are
    padded with ``eos_id`` to the longest, as the single-process call fills finished rows.
    Sampling (``greedy=False``) draws from one generator per rank, so it matches one process
    only for greedy decoding.
    """

    _check_same_batch("data_parallel_generate", "input_ids", input_ids, group,
                      max_new_tokens=max_new_tokens, eos_id=eos_id)
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal "
                         f"input_ids shape {tuple(input_ids.shape)}")
    ids = local_rows(input_ids, group)
    mask = None if attention_mask is None else local_rows(attention_mask, group)
    out = generate(model, ids, max_new_tokens, attention_mask=mask, eos_id=eos_id, **kwargs)
    # Column counts differ when ranks stop early at EOS: agree on the longest first.
    width = torch.tensor([out.shape[1]])
    if group_size(group) > 1:
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
    if out.shape[1] < int(width):
        fill = eos_id if eos_id is not None else 0
        pad = torch.full((out.shape[0], int(width) - out.shape[1]), fill, dtype=out.dtype)
        out = torch.cat([out, pad], dim=1)
    return gather_rows(out, group)
