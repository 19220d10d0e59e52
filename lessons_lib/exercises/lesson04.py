"""Checkers for notebook 04 (cluster architecture)."""

from ..cluster.placement import Placement, check_placement, cross_node_bytes_per_token, place_ranks
from .check import Incorrect, exercise

CASES = [(2, 4, 4, 2, 1), (2, 8, 4, 2, 2), (4, 2, 2, 4, 1), (2, 4, 2, 2, 2)]


@exercise("04.place_tp_in_node", "place a TP x PP x DP plan so that TP groups stay inside a node")
def check_place(candidate):
    for nodes, per_node, tp, pp, dp in CASES:
        args = f"place(nodes={nodes}, devices_per_node={per_node}, tp={tp}, pp={pp}, dp={dp})"
        devices = candidate(nodes, per_node, tp, pp, dp)
        try:
            devices = tuple(tuple(d) for d in devices)
        except TypeError:
            raise Incorrect(f"{args} returned {devices!r}; return a list of (node, device) pairs, "
                            f"one per rank") from None
        placement = Placement(nodes, per_node, tp, pp, dp, devices)
        try:
            check_placement(placement)
        except ValueError as exc:
            raise Incorrect(f"{args}: {exc}") from None
        for group in placement.groups("tp"):
            if len({devices[r][0] for r in group}) > 1:
                raise Incorrect(f"{args}: TP group {group} spans nodes "
                                f"{sorted({devices[r][0] for r in group})}; keep each TP group in one node")
        best = cross_node_bytes_per_token(place_ranks(nodes, per_node, tp, pp, dp), 4096, 8)["total"]
        got = cross_node_bytes_per_token(placement, 4096, 8)["total"]
        if got > best:
            raise Incorrect(f"{args}: {got:,.0f} bytes cross nodes per token, but {best:,.0f} is possible; "
                            f"keep consecutive pipeline stages together where they fit")
    return "TP groups stay inside nodes and cross-node traffic is minimal on 4 cluster shapes"
