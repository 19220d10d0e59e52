"""Communication: collectives from send/recv (ring, one-shot, two-shot, tree), their schedules
as data, sync vs async, a deadlock and its fix, and the alpha-beta cost model."""

from .agree import RanksDisagree, check_same_across_ranks
from .collectives import (SUPPORTED_DTYPES, check_inputs, one_shot_all_reduce, ring_all_gather,
                          ring_all_reduce, ring_reduce_scatter, run_direct, run_ring, tree_broadcast,
                          two_shot_all_reduce)
from .schedule import (Transfer, bytes_sent, chunk_bounds, one_shot_schedule, ring_schedule, simulate_ring,
                       tree_broadcast_schedule, two_shot_schedule)

__all__ = ["RanksDisagree", "SUPPORTED_DTYPES", "Transfer", "bytes_sent", "check_inputs",
           "check_same_across_ranks", "chunk_bounds", "one_shot_all_reduce", "one_shot_schedule",
           "ring_all_gather", "ring_all_reduce", "ring_reduce_scatter", "ring_schedule", "run_direct",
           "run_ring", "simulate_ring", "tree_broadcast", "tree_broadcast_schedule", "two_shot_all_reduce",
           "two_shot_schedule"]
