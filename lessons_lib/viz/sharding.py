"""Who holds what: which slice of each weight, and of the batch, every rank keeps.

:func:`sharding_layout` is a pure function of the strategy, the world size, the model config and
the batch size. It uses the very functions the parallel code runs (``shard_indices`` for tensor
parallelism, ``split_sizes`` for data parallelism, ``partition_layers`` for pipeline stages),
so the picture cannot drift from the code. :func:`draw_layout` draws it; :func:`sharding_widget`
wraps both in ipywidgets.

Strategies:

* ``"dp"``: every rank a full replica; the batch split by rows.
* ``"tp"``: the tiny LM's plan (q/k/v, gate/up column-wise; o, down row-wise; embedding and LM
  head by vocabulary); every rank sees the whole batch.
* ``"tp-column"`` / ``"tp-row"``: every linear layer split by output rows / by input columns, to
  compare the two splits on the same weights.
* ``"pp"``: whole layers per rank (stage); the batch flows through every stage in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import ipywidgets as widgets

from ..model import ModelConfig
from ..parallel.data import split_sizes
from ..parallel.pipeline.partition import partition_layers
from ..parallel.tensor import shard_indices
from ..validate import check_choice, check_int
from .explorer import Explorer

STRATEGIES = ("dp", "tp", "tp-column", "tp-row", "pp")
STRATEGY_TITLES = {"dp": "dp: data parallel", "tp": "tp: the tiny LM's plan",
                   "tp-column": "tp-column: every linear by rows", "tp-row": "tp-row: every linear by columns",
                   "pp": "pp: pipeline stages"}


@dataclass(frozen=True)
class Placement:
    """One tensor (or the batch): its full size along the drawn dimension and each rank's pieces.

    ``pieces[r]`` is a list of ``(start, stop)`` ranges rank ``r`` holds along ``dim``
    (``"rows"`` or ``"cols"``); a replicated tensor gives every rank the full range.
    """
    name: str
    shape: tuple
    dim: str
    pieces: tuple

    def fraction_held(self, rank: int) -> float:
        size = self.shape[0] if self.dim == "rows" else self.shape[-1]
        return sum(b - a for a, b in self.pieces[rank]) / size if size else 0.0


def _ranges(indices) -> tuple:
    return ((int(indices[0]), int(indices[-1]) + 1),)


def _pp_stages(n_layers: int, pp: int) -> list[range]:
    return partition_layers(n_layers, pp)


def sharding_layout(strategy: str, world_size: int, config=None, batch: int = 8) -> dict:
    """The placement of one decoder layer's weights, the embedding, the LM head and the batch.

    Returns ``{"strategy", "world_size", "tensors": [Placement], "batch": Placement,
    "layers": [[layer indices] per rank]}``. Raises ``ValueError`` (naming the parameter and
    the valid choices) when ``world_size`` cannot shard the model that way.
    """
    check_choice("strategy", strategy, STRATEGIES)
    check_int("world_size", world_size, low=1)
    check_int("batch", batch, low=1)
    if config is None:
        config = ModelConfig()
    config = getattr(config, "config", config)
    p, c, hd = world_size, config, config.head_dim
    weights = [  # (name, (out, in), tp-plan split, unit, error name, replicate)
        ("embed", (c.vocab_size, c.dim), "rows", 1, "vocab_size", False),
        ("attn.q_proj", (c.n_heads * hd, c.dim), "rows", hd, "n_heads", False),
        ("attn.k_proj", (c.n_kv_heads * hd, c.dim), "rows", hd, "n_kv_heads", True),
        ("attn.v_proj", (c.n_kv_heads * hd, c.dim), "rows", hd, "n_kv_heads", True),
        ("attn.o_proj", (c.dim, c.n_heads * hd), "cols", hd, "n_heads", False),
        ("mlp.gate_proj", (c.ffn_dim, c.dim), "rows", 1, "ffn_dim", False),
        ("mlp.up_proj", (c.ffn_dim, c.dim), "rows", 1, "ffn_dim", False),
        ("mlp.down_proj", (c.dim, c.ffn_dim), "cols", 1, "ffn_dim", False),
        ("lm_head", (c.vocab_size, c.dim), "rows", 1, "vocab_size", False),
    ]
    full = lambda shape, dim: tuple(((0, shape[0] if dim == "rows" else shape[1]),) for _ in range(p))
    stages = _pp_stages(c.n_layers, p) if strategy == "pp" else [range(c.n_layers)] * p
    tensors = []
    for name, shape, dim, unit, label, rep in weights:
        if strategy == "dp":
            tensors.append(Placement(name, shape, "rows", full(shape, "rows")))
            continue
        if strategy == "pp":
            continue
        if strategy == "tp-column" and name not in ("embed", "lm_head"):
            dim, unit, label, rep = "rows", 1, f"{name} out_features", False
        elif strategy == "tp-row" and name not in ("embed", "lm_head"):
            dim, unit, label, rep = "cols", 1, f"{name} in_features", False
        size = shape[0] if dim == "rows" else shape[1]
        pieces = tuple(_ranges(shard_indices(size, p, r, unit=unit, name=label, replicate=rep))
                       for r in range(p))
        tensors.append(Placement(name, shape, dim, pieces))
    if strategy == "pp":   # whole layers per stage; the first also embeds, the last holds the head
        owner = {i: r for r, stage in enumerate(stages) for i in stage}
        whole = [("embed", 0)] + [(f"layers.{i}", owner[i]) for i in range(c.n_layers)] + [("lm_head", p - 1)]
        tensors = [Placement(name, (1, 1), "whole", tuple(((0, 1),) if r == o else () for r in range(p)))
                   for name, o in whole]
    if strategy == "dp":
        sizes = split_sizes(batch, p)
        starts = [sum(sizes[:r]) for r in range(p)]
        batch_pieces = tuple(((s, s + n),) if n else () for s, n in zip(starts, sizes))
    else:
        batch_pieces = full((batch,), "rows")
    return {"strategy": strategy, "world_size": p, "tensors": tensors,
            "batch": Placement("batch", (batch,), "rows", batch_pieces),
            "layers": [list(s) for s in stages]}


def draw_layout(layout: dict, ax=None):
    """Draw each tensor as a bar with one lane per rank, coloured where that rank holds it."""
    import matplotlib.pyplot as plt   # here, not at the top: ranks import this module and never draw
    from matplotlib.patches import Rectangle

    rows = layout["tensors"] + [layout["batch"]]
    p = layout["world_size"]
    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.2))
        fig.subplots_adjust(left=0.3, right=0.86)
    colours = plt.get_cmap("tab10")
    for i, placement in enumerate(rows):
        y = len(rows) - 1 - i
        size = placement.shape[0] if placement.dim == "rows" else placement.shape[-1]
        ax.add_patch(Rectangle((0, y + 0.05), 1, 0.8, fill=False, edgecolor="0.6"))
        for r in range(p):
            for a, b in placement.pieces[r]:
                ax.add_patch(Rectangle((a / size, y + 0.05 + 0.8 * (p - 1 - r) / p), (b - a) / size,
                                       0.8 / p, color=colours(r % 10)))
        label = placement.name if placement.dim == "whole" else \
            f"{placement.name} {placement.shape} by {placement.dim}"
        ax.text(-0.02, y + 0.45, label,
                ha="right", va="center", fontsize=8)
    stages = layout["layers"]
    if layout["strategy"] == "pp":
        layers = "; ".join(f"rank {r}: layers {ls[0]}-{ls[-1]}" for r, ls in enumerate(stages))
    else:
        layers = f"every rank: layers {stages[0][0]}-{stages[0][-1]}, shaped as shown"
    ax.set_title(f"{layout['strategy']} on {p} ranks (lane r = rank r)\n{layers}", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, len(rows))
    ax.axis("off")
    ax.legend(handles=[Rectangle((0, 0), 1, 1, color=colours(r % 10)) for r in range(p)],
              labels=[f"rank {r}" for r in range(p)], loc="upper left", bbox_to_anchor=(1, 1),
              fontsize=8)
    return ax.figure


def layout_figsize(layout: dict) -> tuple[float, float]:
    """One row per tensor and one for the batch."""
    return (9, 0.42 * (len(layout["tensors"]) + 1) + 1.2)


def layout_text(layout: dict) -> str:
    """The layout in one line: strategy, ranks, and what rank 0 holds of the batch."""
    held = sum(b - a for a, b in layout["batch"].pieces[0])
    return (f"strategy={layout['strategy']}, ranks={layout['world_size']}: rank 0 holds {held} of "
            f"{layout['batch'].shape[0]} batch rows")


class ShardingWidget(Explorer):
    """A strategy dropdown and a ranks slider over :func:`sharding_layout`.

    :attr:`data` holds the layout last drawn; a world size that cannot shard the model that way
    keeps it, with the reason in :attr:`error`. Tests drive ``controls["strategy"]`` and
    ``controls["world_size"]`` without a browser.
    """

    def __init__(self, config=None, batch: int = 8, strategy: str = "tp", world_size: int = 2):
        controls = {"strategy": widgets.Dropdown(options=[(STRATEGY_TITLES[s], s) for s in STRATEGIES],
                                                 value=strategy, description="strategy"),
                    "world_size": widgets.IntSlider(value=world_size, min=1, max=8, description="ranks")}
        super().__init__(controls, partial(sharding_layout, config=config, batch=batch), draw_layout,
                         title="sharding view", text=layout_text, figsize=layout_figsize,
                         rows=[["strategy", "world_size"]])


def sharding_widget(config=None, batch: int = 8, strategy: str = "tp", world_size: int = 2):
    """The interactive sharding view (see :class:`ShardingWidget`)."""
    return ShardingWidget(config, batch, strategy, world_size)
