"""Communication: collectives from send/recv (ring, one-shot, two-shot, tree), their schedules
as data, sync vs async, a deadlock and its fix, and the alpha-beta cost model."""

from .agree import RanksDisagree, check_same_across_ranks
from .collectives import (SUPPORTED_DTYPES, check_inputs, one_shot_all_reduce, ring_all_gather,
                          ring_all_reduce, ring_reduce_scatter, run_direct, run_ring, tree_broadcast,
                          two_shot_all_reduce)
from .cost_model import (ALL_REDUCE_ALGORITHMS, INFINIBAND_NDR_GBIT_S, NVLINK4_H100_GB_S, PCIE5_X16_GB_S, SOURCES,
                         all_reduce_terms, bus_bandwidth, crossover_bytes, fastest_all_reduce, fit_alpha_beta,
                         predict_all_reduce, predict_ring_all_reduce, ring_all_reduce_terms, time_all_reduce)
from .deadlock import exchange_batched, exchange_by_parity, exchange_send_first
from .overlap import overlap_timeline, plot_timeline
from .schedule import (Transfer, bytes_sent, chunk_bounds, one_shot_schedule, ring_schedule, simulate_ring,
                       tree_broadcast_schedule, two_shot_schedule)

__all__ = ["ALL_REDUCE_ALGORITHMS", "INFINIBAND_NDR_GBIT_S", "NVLINK4_H100_GB_S", "PCIE5_X16_GB_S", "SOURCES",
           "all_reduce_terms", "bus_bandwidth", "crossover_bytes", "exchange_batched", "exchange_by_parity",
           "exchange_send_first", "fastest_all_reduce", "fit_alpha_beta", "overlap_timeline", "plot_timeline",
           "predict_all_reduce", "predict_ring_all_reduce", "ring_all_reduce_terms", "time_all_reduce",
           "RanksDisagree", "SUPPORTED_DTYPES", "Transfer", "bytes_sent", "check_inputs",
           "check_same_across_ranks", "chunk_bounds", "one_shot_all_reduce", "one_shot_schedule",
           "ring_all_gather", "ring_all_reduce", "ring_reduce_scatter", "ring_schedule", "run_direct",
           "run_ring", "simulate_ring", "tree_broadcast", "tree_broadcast_schedule", "two_shot_all_reduce",
           "two_shot_schedule"]
