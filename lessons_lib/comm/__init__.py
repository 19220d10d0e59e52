"""Communication: collectives from send/recv, their schedules as data, sync vs async,
a deadlock and its fix, and the alpha-beta cost model."""

from .agree import RanksDisagree, check_same_across_ranks
from .collectives import (SUPPORTED_DTYPES, check_inputs, ring_all_gather, ring_all_reduce,
                          ring_reduce_scatter, run_ring, tree_broadcast)
from .schedule import (Transfer, bytes_sent, chunk_bounds, ring_schedule, simulate_ring,
                       tree_broadcast_schedule)

__all__ = ["RanksDisagree", "SUPPORTED_DTYPES", "Transfer", "bytes_sent", "check_inputs",
           "check_same_across_ranks", "chunk_bounds",
           "ring_all_gather", "ring_all_reduce", "ring_reduce_scatter", "ring_schedule", "run_ring",
           "simulate_ring", "tree_broadcast", "tree_broadcast_schedule"]
