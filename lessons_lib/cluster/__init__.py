"""The cluster (lesson 04): launching with torchrun across "nodes", topology-aware placement of a
TP x PP x DP plan, and sharded checkpoint loading."""

from .multinode import free_port, launch_nodes, report_environment, torchrun_command
from .placement import (BAD_ORDER, GOOD_ORDER, Placement, check_placement, check_plan, cross_node_bytes_per_token, decode_comm_seconds,
                        place_ranks, placement_grid)
from .sharded_loading import (expected_bytes_per_rank, load_tp_shard, open_checkpoint, pages_touched, shard_bounds,
                              split_dim)

__all__ = ["BAD_ORDER", "GOOD_ORDER", "Placement", "check_placement", "check_plan", "cross_node_bytes_per_token", "decode_comm_seconds",
           "expected_bytes_per_rank", "free_port", "launch_nodes", "load_tp_shard", "open_checkpoint",
           "pages_touched", "place_ranks", "placement_grid", "report_environment", "shard_bounds", "split_dim",
           "torchrun_command"]
