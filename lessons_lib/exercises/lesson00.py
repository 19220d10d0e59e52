"""Checkers for notebook 00 (welcome)."""

from ..launch import run_distributed
from .check import Incorrect, exercise


@exercise("00.sum_of_squares", "all-reduce the squares of the rank ids")
def check_sum_of_squares(candidate):
    for world_size in (2, 3):
        expected = sum(r * r for r in range(world_size))
        results = run_distributed(candidate, world_size, timeout=60)
        for rank, got in enumerate(results):
            if isinstance(got, bool) or not isinstance(got, int):
                raise Incorrect(f"on {world_size} ranks, rank {rank} returned {got!r} "
                                f"({type(got).__name__}); return a Python int, e.g. `t.item()`")
            if got != expected:
                raise Incorrect(f"on {world_size} ranks, rank {rank} returned {got}; expected "
                                f"{expected} = " + " + ".join(f"{r}²" for r in range(world_size))
                                + ". Did every rank contribute rank², and did you all-reduce with SUM?")
    return "every rank holds the sum of squares on 2 and 3 ranks"
