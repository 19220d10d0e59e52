"""Topology-aware placement: which physical device runs which rank of a TP x PP x DP plan.

A cluster is ``nodes`` machines of ``devices_per_node`` GPUs. Inside a node GPUs talk
over NVLink (hundreds of GB/s); between nodes over InfiniBand or Ethernet (tens of
GB/s per port). The parallel plan decides how much each group talks:

* a tensor-parallel (TP) group all-reduces activations twice per layer, every token;
* a pipeline (PP) boundary sends one activation per token;
* data-parallel (DP) replicas do not talk at all at inference.

So a good placement keeps every TP group inside one node and lets PP cross nodes.
Ranks come from the course's one grid, ``mesh_grid(tp, pp, dp)`` of
:mod:`lessons_lib.parallel.mesh`: rank ``r`` has coordinates ``(dp, pp, tp)``. A
placement assigns each rank a ``(node, device)``; :func:`place_ranks` fills devices
in the nesting order you give it, ``("dp", "pp", "tp")`` meaning tp varies fastest.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..parallel.mesh import AXES, groups_along, mesh_grid, rank_at, rank_coords
from ..validate import bad, check_int, check_real

GOOD_ORDER = ("dp", "pp", "tp")   # TP peers on adjacent devices: inside a node
BAD_ORDER = ("tp", "dp", "pp")    # PP stages adjacent, TP peers a whole node apart


@dataclass(frozen=True)
class Placement:
    """``devices[rank] = (node, device)``, plus the plan it realises."""

    nodes: int
    devices_per_node: int
    tp: int
    pp: int
    dp: int
    devices: tuple

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(dp, pp, tp)`` coordinates of ``rank`` in the mesh grid."""
        return rank_coords(mesh_grid(self.tp, self.pp, self.dp), rank)

    def groups(self, axis: str) -> list[list[int]]:
        return groups_along(mesh_grid(self.tp, self.pp, self.dp), axis)


def _positive(name: str, value) -> None:
    check_int(name, value, low=1)


def check_plan(nodes: int, devices_per_node: int, tp: int, pp: int, dp: int) -> None:
    for name, value in (("nodes", nodes), ("devices_per_node", devices_per_node), ("tp", tp),
                        ("pp", pp), ("dp", dp)):
        _positive(name, value)
    if tp * pp * dp != nodes * devices_per_node:
        raise bad("tp x pp x dp", tp * pp * dp, f"nodes x devices_per_node = {nodes} x {devices_per_node} "
                  f"= {nodes * devices_per_node}, one rank per device",
                  f"tp x pp x dp = {tp} x {pp} x {dp} = {tp * pp * dp} ranks")


def place_ranks(nodes: int, devices_per_node: int, tp: int, pp: int, dp: int = 1,
                order: tuple = GOOD_ORDER) -> Placement:
    """Assign ranks to devices, filling devices in order (node 0 device 0, node 0 device 1, ...).

    ``order`` lists the three axes outermost first; the last varies fastest on
    consecutive devices. The default ``("dp", "pp", "tp")`` puts TP peers side by side,
    so a TP group of size ``<= devices_per_node`` (dividing it) stays in one node.
    """
    check_plan(nodes, devices_per_node, tp, pp, dp)
    if isinstance(order, str) or not hasattr(order, "__iter__") or sorted(order) != sorted(AXES):
        raise bad("order", order, f"a permutation of {AXES}, outermost axis first")
    grid = mesh_grid(tp, pp, dp)
    sizes = dict(zip(AXES, grid.shape))
    devices = [None] * grid.numel()
    slot = 0
    for combo in itertools.product(*(range(sizes[a]) for a in order)):
        rank = rank_at(grid, **dict(zip(order, combo)))
        devices[rank] = divmod(slot, devices_per_node)
        slot += 1
    return Placement(nodes, devices_per_node, tp, pp, dp, tuple(devices))


def check_placement(placement: Placement) -> None:
    """Every rank on a real device, no device used twice (a ValueError says which)."""
    if not isinstance(placement, Placement):
        raise bad("placement", placement, "a Placement, e.g. from place_ranks")
    p = placement
    for name in ("nodes", "devices_per_node", "tp", "pp", "dp"):
        _positive(name, getattr(p, name))
    if len(p.devices) != p.tp * p.pp * p.dp:
        raise ValueError(f"devices has {len(p.devices)} entries; the plan has {p.tp * p.pp * p.dp} ranks")
    seen = {}
    for rank, dev in enumerate(p.devices):
        if (not isinstance(dev, tuple) or len(dev) != 2 or not 0 <= dev[0] < p.nodes
                or not 0 <= dev[1] < p.devices_per_node):
            raise ValueError(f"rank {rank} is placed on {dev!r}, not a (node, device) of this cluster")
        if dev in seen:
            raise ValueError(f"ranks {seen[dev]} and {rank} are both placed on {dev}")
        seen[dev] = rank


def cross_node_bytes_per_token(placement: Placement, hidden: int, n_layers: int, batch: int = 1,
                               bytes_per_element: int = 2) -> dict:
    """Bytes that cross node boundaries for one decode step (one new token per sequence).

    Activation message: ``M = hidden x batch x bytes_per_element``.

    * TP: each layer does 2 all-reduces of ``M`` (after attention, after the MLP) in
      every TP group, ``n_layers / pp`` layers per stage. In a ring all-reduce each
      member sends ``2 (t - 1) / t x M`` to its ring successor (group order), so each
      ring link that joins two nodes carries that much per all-reduce.
    * PP: each stage boundary passes ``M`` forward; TP rank ``i`` of stage ``s`` sends
      its ``1 / t`` slice to TP rank ``i`` of stage ``s + 1`` (Megatron's scatter-gather),
      and pairs on different nodes count.

    Returns ``{"tp": bytes, "pp": bytes, "total": bytes}`` summed over the whole cluster.
    """
    check_placement(placement)
    for name, value in (("hidden", hidden), ("n_layers", n_layers), ("batch", batch),
                        ("bytes_per_element", bytes_per_element)):
        _positive(name, value)
    p = placement
    if n_layers % p.pp:
        raise bad("n_layers", n_layers, f"a multiple of pp={p.pp}",
                  f"pp={p.pp} does not divide n_layers={n_layers}: choose pp among "
                  f"{[d for d in range(1, n_layers + 1) if n_layers % d == 0]}")
    message = hidden * batch * bytes_per_element
    node = [dev[0] for dev in p.devices]
    tp_bytes = 0.0
    if p.tp > 1:
        per_link = 2 * (p.tp - 1) / p.tp * message
        for group in p.groups("tp"):
            crossing = sum(node[a] != node[b] for a, b in zip(group, group[1:] + group[:1]))
            tp_bytes += crossing * per_link * 2 * (n_layers // p.pp)
    pp_bytes = 0.0
    for group in p.groups("pp"):   # one group per (dp, tp) coordinate: the stages in order
        for a, b in zip(group, group[1:]):
            pp_bytes += (node[a] != node[b]) * message / p.tp
    return {"tp": tp_bytes, "pp": pp_bytes, "total": tp_bytes + pp_bytes}


def decode_comm_seconds(placement: Placement, hidden: int, n_layers: int, *, alpha_intra: float,
                        alpha_inter: float, bandwidth_intra: float, bandwidth_inter: float,
                        batch: int = 1, bytes_per_element: int = 2) -> dict:
    """Seconds of communication on one decode step's critical path, alpha-beta per message.

    Bytes alone miss what decides decode: its messages are small (``M = hidden x batch x
    bytes_per_element``, 16 KB for a 70B model at batch 1), so each costs mostly its latency.

    * TP: each of the ``n_layers`` layers (the stages run one after another for one token) makes
      2 ring all-reduces of ``2 (t - 1)`` steps; in a step every ring member sends ``M / t`` to its
      successor at once, so the step takes ``alpha + (M / t) / bandwidth`` of its slowest link:
      the inter-node one if the ring crosses a node boundary.
    * PP: ``pp - 1`` hand-offs, each ``alpha + (M / t) / bandwidth`` of its slowest pair.

    ``alpha_*`` are seconds per message, ``bandwidth_*`` bytes per second per direction; pass them
    explicitly (measure them with nccl-tests on the real cluster). Returns ``{"tp_s", "pp_s",
    "total_s", "messages", "latency_s"}``: ``messages`` on the critical path, ``latency_s`` the
    part of ``total_s`` that is alpha.
    """
    check_placement(placement)
    for name, value in (("hidden", hidden), ("n_layers", n_layers), ("batch", batch),
                        ("bytes_per_element", bytes_per_element)):
        _positive(name, value)
    for name, value in (("alpha_intra", alpha_intra), ("alpha_inter", alpha_inter)):
        check_real(name, value, low=0, why="seconds per message")
    for name, value in (("bandwidth_intra", bandwidth_intra), ("bandwidth_inter", bandwidth_inter)):
        check_real(name, value, low=0, low_open=True, why="bytes per second, per direction")
    p = placement
    if n_layers % p.pp:
        raise bad("n_layers", n_layers, f"a multiple of pp={p.pp}")
    piece = hidden * batch * bytes_per_element / p.tp
    node = [dev[0] for dev in p.devices]

    def link(crosses: bool) -> tuple[float, float]:
        return (alpha_inter, piece / bandwidth_inter) if crosses else (alpha_intra, piece / bandwidth_intra)

    tp_s = tp_alpha = 0.0
    tp_messages = 0
    if p.tp > 1:
        crosses = any(node[a] != node[b] for g in p.groups("tp") for a, b in zip(g, g[1:] + g[:1]))
        alpha, beta = link(crosses)
        tp_messages = 2 * n_layers * 2 * (p.tp - 1)
        tp_s, tp_alpha = tp_messages * (alpha + beta), tp_messages * alpha
    pp_s = pp_alpha = 0.0
    for stage in range(p.pp - 1):   # the slowest pair at each boundary
        crosses = any(node[g[stage]] != node[g[stage + 1]] for g in p.groups("pp"))
        alpha, beta = link(crosses)
        pp_s, pp_alpha = pp_s + alpha + beta, pp_alpha + alpha
    return {"tp_s": tp_s, "pp_s": pp_s, "total_s": tp_s + pp_s, "messages": tp_messages + p.pp - 1,
            "latency_s": tp_alpha + pp_alpha}


def placement_grid(placement: Placement) -> list[list[dict]]:
    """``grid[node][device]`` = ``{"rank", "dp", "pp", "tp", "tp_group"}``: what the widget draws."""
    p = placement
    grid = [[None] * p.devices_per_node for _ in range(p.nodes)]
    for rank, (n, d) in enumerate(p.devices):
        dp_, pp_, tp_ = p.coords(rank)
        grid[n][d] = {"rank": rank, "dp": dp_, "pp": pp_, "tp": tp_, "tp_group": dp_ * p.pp + pp_}
    return grid
