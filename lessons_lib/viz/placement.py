"""The cluster as a grid: nodes (rows) x devices (columns), coloured by TP group, labelled
with rank and pipeline stage. A picture of :func:`lessons_lib.cluster.placement.placement_grid`."""

from __future__ import annotations

from functools import partial

import ipywidgets as widgets

from ..cluster.placement import (BAD_ORDER, GOOD_ORDER, cross_node_bytes_per_token, place_ranks,
                                 placement_grid)
from ..validate import check_int
from .explorer import Explorer


def draw_placement(placement, ax=None, title: str = ""):
    """One cell per device; colour = TP group, text = rank and pipeline stage."""
    import matplotlib.pyplot as plt   # here, not at the top: ranks import this module and never draw

    grid = placement_grid(placement)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.1 * placement.devices_per_node + 1, 0.9 * placement.nodes + 0.8))
    ax.clear()
    colours = plt.get_cmap("tab10")
    for n, row in enumerate(grid):
        for d, cell in enumerate(row):
            ax.add_patch(plt.Rectangle((d, -n - 1), 0.95, 0.9, color=colours(cell["tp_group"] % 10), alpha=0.8))
            ax.text(d + 0.47, -n - 0.55, f"r{cell['rank']}\npp{cell['pp']} tp{cell['tp']}",
                    ha="center", va="center", fontsize=8)
        ax.text(-0.1, -n - 0.55, f"node {n}", ha="right", va="center", fontsize=9)
    ax.set_xlim(-1.2, placement.devices_per_node)
    ax.set_ylim(-placement.nodes - 0.1, 0.1)
    ax.axis("off")
    ax.set_title(title or "colour = TP group", fontsize=9)
    return ax


def placement_data(plan: tuple, order, nodes: int = 2, devices_per_node: int = 4, hidden: int = 8192,
                   n_layers: int = 80) -> dict:
    """The placement of a ``(tp, pp, dp)`` plan in one fill ``order``, and its cross-node bytes per token."""
    tp, pp, dp = plan
    placement = place_ranks(nodes, devices_per_node, tp, pp, dp, order=order)
    return {"placement": placement, "bytes": cross_node_bytes_per_token(placement, hidden, n_layers),
            "hidden": hidden, "n_layers": n_layers}


def placement_text(data: dict) -> str:
    b = data["bytes"]
    return (f"cross-node bytes per decode step (hidden={data['hidden']}, {data['n_layers']} layers, batch 1, "
            f"bf16): TP {b['tp']:,.0f} + PP {b['pp']:,.0f} = {b['total']:,.0f}")


def placement_widget(nodes: int = 2, devices_per_node: int = 4, hidden: int = 8192,
                     n_layers: int = 80) -> Explorer:
    """Choose the plan and the fill order; see the grid and the cross-node bytes per token.

    Controls: ``plan`` (a dropdown of ``(tp, pp, dp)`` values) and ``order`` (good / bad fill
    order); :attr:`~Explorer.data` has ``placement`` and ``bytes``.
    """
    for name, value in (("nodes", nodes), ("devices_per_node", devices_per_node), ("hidden", hidden),
                        ("n_layers", n_layers)):
        check_int(name, value, low=1)
    world = nodes * devices_per_node
    plans = [(tp, pp, world // (tp * pp)) for tp in range(1, world + 1) for pp in range(1, world + 1)
             if world % (tp * pp) == 0 and n_layers % pp == 0]
    first = (devices_per_node, nodes, 1) if (devices_per_node, nodes, 1) in plans else plans[0]
    controls = {
        "plan": widgets.Dropdown(options=[(f"tp={t} pp={p} dp={d}", (t, p, d)) for t, p, d in plans],
                                 value=first, description="plan"),
        "order": widgets.ToggleButtons(options=[("TP inside a node", GOOD_ORDER),
                                                ("PP inside a node", BAD_ORDER)], description="placement"),
    }
    return Explorer(controls, partial(placement_data, nodes=nodes, devices_per_node=devices_per_node,
                                      hidden=hidden, n_layers=n_layers),
                    lambda data, ax: draw_placement(data["placement"], ax), title="rank placement",
                    text=placement_text, figsize=(1.1 * devices_per_node + 1, 0.9 * nodes + 0.8))
