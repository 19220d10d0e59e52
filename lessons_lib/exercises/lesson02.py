"""Checkers for notebook 02 (parallel strategies)."""

from ..parallel.tensor import shard_indices
from .check import Incorrect, exercise


@exercise("02.q_proj_rows", "the rows of q_proj a tensor-parallel rank holds")
def check_q_proj_rows(candidate):
    for n_heads, head_dim, tp in ((4, 32, 2), (4, 32, 4), (8, 16, 2), (6, 8, 3), (4, 32, 1)):
        for rank in range(tp):
            rows = shard_indices(n_heads * head_dim, tp, rank, unit=head_dim)
            expected = (int(rows[0]), int(rows[-1]) + 1)
            got = candidate(n_heads, head_dim, tp, rank)
            if tuple(got) != expected:
                raise Incorrect(f"n_heads={n_heads}, head_dim={head_dim}, tp={tp}: rank {rank} got rows "
                                f"{tuple(got)}, expected {expected}. Each rank holds n_heads / tp whole "
                                "heads, each head_dim rows, in rank order")
    return "each rank holds n_heads / tp whole heads of q_proj, in order"
