"""Checkers for notebook 13 (pipeline parallel code)."""

from ..parallel.pipeline.schedule import gpipe
from .check import Incorrect, exercise

CASES = [(1, 1), (2, 3), (3, 2), (4, 6), (5, 1), (3, 7)]


def reference_gpipe_grid(n_stages: int, n_microbatches: int) -> list[list[int | None]]:
    """``grid[step][stage]``: the micro-batch that stage runs at that step, or None (idle)."""
    return [[None if cell is None else int(cell[1:]) for cell in row]
            for row in gpipe(n_stages, n_microbatches).grid()]


@exercise("13.gpipe_grid", "the forward-only GPipe schedule as a grid")
def check_gpipe_grid(candidate):
    for p, m in CASES:
        got = candidate(p, m)
        want = reference_gpipe_grid(p, m)
        if not isinstance(got, list) or not all(isinstance(row, list) for row in got):
            raise Incorrect(f"for p={p}, m={m} you returned {type(got).__name__}; return a list of "
                            "lists, one per time step, each with one entry per stage")
        if len(got) != len(want):
            raise Incorrect(f"for p={p} stages and m={m} micro-batches the pipeline takes "
                            f"m + p - 1 = {len(want)} steps; your grid has {len(got)}")
        for step, (row, ref) in enumerate(zip(got, want)):
            if len(row) != p:
                raise Incorrect(f"for p={p}, m={m}, step {step} has {len(row)} entries; "
                                f"expected one per stage ({p})")
            if row != ref:
                raise Incorrect(f"for p={p}, m={m}, step {step}: you have {row}, expected {ref}. "
                                "Stage s can start micro-batch i only after stage s-1 finished it.")
    return f"the grid matches GPipe for (p, m) in {CASES}"
