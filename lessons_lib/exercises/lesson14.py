"""Checkers for notebook 14 (capstone: the seed's full example, fixed)."""

import torch
import torch.nn as nn

from ..launch import run_distributed
from .check import Incorrect, exercise


class RowCounter(nn.Module):
    """Wraps a model and counts the rows it is run on (to see that each rank did only its share)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


def _run_candidate(candidate, model, x):
    counter = RowCounter(model)
    out = candidate(counter, x)
    return out, counter.rows


@exercise("14.dp_forward", "data parallelism done right: split the batch, gather the outputs")
def check_dp_forward(candidate):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    for world_size, rows in ((2, 100), (2, 7)):
        x = torch.randn(rows, 10)
        with torch.no_grad():
            want = model(x)
        results = run_distributed(_run_candidate, world_size, candidate, model, x, timeout=60)
        for rank, (out, seen) in enumerate(results):
            if not isinstance(out, torch.Tensor):
                raise Incorrect(f"on {world_size} ranks, rank {rank} returned {type(out).__name__}; "
                                "return the whole output tensor on every rank")
            if tuple(out.shape) != tuple(want.shape):
                raise Incorrect(f"on {world_size} ranks with {rows} rows, rank {rank} returned shape "
                                f"{tuple(out.shape)}; expected {tuple(want.shape)} (all rows, in order)")
            if not torch.allclose(out, want, atol=1e-6, rtol=0):
                raise Incorrect(f"on {world_size} ranks with {rows} rows, rank {rank}'s output differs "
                                f"from model(x) by {(out - want).abs().max():.2e}: are the parts "
                                "concatenated in rank order (not summed or averaged)?")
            share = -(-rows // world_size)
            if seen > share:
                raise Incorrect(f"on {world_size} ranks rank {rank} ran the model on {seen} rows; "
                                f"its share of {rows} is at most {share}: split the batch")
    return "every rank gets model(x), each having run only its own rows (even and uneven splits)"
