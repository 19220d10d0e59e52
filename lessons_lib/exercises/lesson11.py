"""Checkers for notebook 11 (data-parallel inference)."""

import torch

from ..launch import run_distributed
from ..parallel.data import row_range
from .check import Incorrect, exercise


@exercise("11.row_range", "the rows of a batch that one rank takes")
def check_row_range(candidate):
    for n_rows, world in ((10, 3), (9, 3), (2, 4), (7, 2), (0, 2), (5, 1)):
        for rank in range(world):
            got = candidate(n_rows, world, rank)
            expected = row_range(n_rows, world, rank)
            if tuple(got) != expected:
                raise Incorrect(f"{n_rows} rows on {world} ranks: rank {rank} got rows {tuple(got)}, "
                                f"expected {expected}. The first n_rows % world_size ranks take one "
                                "extra row, and the slices must be contiguous and in rank order")
    return "every rank takes a contiguous, balanced slice (10 rows on 3 ranks: 4, 3, 3)"


def _gather_on_ranks(candidate):
    import torch.distributed as dist

    rank = dist.get_rank()
    local = torch.arange(2.0 * (3 - rank)).view(3 - rank, 2) + 100 * rank   # 3, 2, 1 rows
    return candidate(local)


@exercise("11.gather_rows", "gather uneven per-rank outputs in rank order")
def check_gather_rows(candidate):
    expected = torch.cat([torch.arange(2.0 * (3 - r)).view(3 - r, 2) + 100 * r for r in range(3)])
    for rank, got in enumerate(run_distributed(_gather_on_ranks, 3, candidate, timeout=60)):
        if not isinstance(got, torch.Tensor):
            raise Incorrect(f"rank {rank} returned a {type(got).__name__}; return a tensor")
        if got.shape != expected.shape:
            raise Incorrect(f"rank {rank} returned shape {tuple(got.shape)}, expected "
                            f"{tuple(expected.shape)} (3 + 2 + 1 rows). Did you sum instead of "
                            "concatenating, or keep the padding rows?")
        if not torch.equal(got, expected):
            raise Incorrect(f"rank {rank} has the right shape but wrong rows: keep rank order and "
                            "trim each rank's padding to its own row count")
    return "uneven slices (3, 2, 1 rows) come back concatenated in rank order on every rank"
