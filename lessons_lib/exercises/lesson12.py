"""Checkers for notebook 12 (tensor parallelism)."""

import torch
import torch.nn as nn

from ..launch import run_distributed
from ..parallel.tensor import RowParallelLinear
from .check import Incorrect, exercise


def _row_parallel_on_ranks(candidate, x, bias: bool):
    import torch.distributed as dist

    class Candidate(RowParallelLinear):
        forward = candidate

    torch.manual_seed(7)
    linear = nn.Linear(x.shape[-1], 3, bias=bias)
    layer = Candidate.from_linear(linear)
    local_x = x.chunk(dist.get_world_size(), dim=-1)[dist.get_rank()]
    with torch.no_grad():
        return layer(local_x)


@exercise("12.row_parallel_forward", "RowParallelLinear.forward: local matmul, all-reduce, bias once")
def check_row_parallel_forward(candidate):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(8))
    for bias in (True, False):
        torch.manual_seed(7)
        linear = nn.Linear(8, 3, bias=bias)
        with torch.no_grad():
            expected, no_bias = linear(x), x @ linear.weight.T
        for world in (2, 4):
            for rank, got in enumerate(run_distributed(_row_parallel_on_ranks, world, candidate, x,
                                                       bias, timeout=60)):
                if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
                    raise Incorrect(f"tp={world}, rank {rank}: expected a tensor of shape "
                                    f"{tuple(expected.shape)}, got {getattr(got, 'shape', got)!r}")
                if torch.allclose(got, expected, atol=1e-5):
                    continue
                if bias and torch.allclose(got, no_bias + world * linear.bias, atol=1e-5):
                    raise Incorrect(f"tp={world}: the bias was counted {world} times; add it once, "
                                    "after the all-reduce")
                if bias and torch.allclose(got, no_bias, atol=1e-5):
                    raise Incorrect("the bias is missing: add self.bias after the all-reduce")
                raise Incorrect(f"tp={world}, rank {rank}: output differs from the unsplit layer. "
                                "Each rank holds only a partial sum x_local @ W_local.T; did you "
                                "all-reduce it over self.group?")
    return "row-parallel output equals the unsplit layer on 2 and 4 ranks, with and without bias"
