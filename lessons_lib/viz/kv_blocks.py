"""The paged KV cache as requests arrive, grow and finish: who owns which block, over time.

:func:`block_timeline` is a pure function of an event list: it replays the events
on a :class:`~lessons_lib.caching.BlockAllocator` and returns one snapshot per
event (the owner and fill of every physical block). :func:`draw_blocks` draws one
snapshot; :func:`kv_blocks_widget` puts a time slider over them.
"""

from __future__ import annotations

import ipywidgets as widgets

from ..caching.paged_kv import BlockAllocator, OutOfBlocksError
from ..validate import bad, check_choice, check_int
from .explorer import Explorer

EVENT_KINDS = ("arrive", "grow", "finish")

# A small serving trace: prompts arrive, decode grows them, some finish early.
EXAMPLE_EVENTS = [
    ("arrive", "A", 20), ("arrive", "B", 9), ("grow", "A", 6), ("arrive", "C", 30),
    ("grow", "B", 12), ("finish", "A"), ("arrive", "D", 14), ("grow", "C", 5),
    ("finish", "B"), ("arrive", "E", 25), ("grow", "D", 10), ("finish", "C"),
]


def block_timeline(events: list[tuple], num_blocks: int = 16, block_size: int = 8) -> list[dict]:
    """Replay ``events`` and return a snapshot after each.

    An event is ``("arrive", req, n_tokens)``, ``("grow", req, n_tokens)`` or
    ``("finish", req)``. A snapshot has ``owner`` (request id or None per block),
    ``fill`` (tokens in each block), ``tables`` (request -> its block table),
    ``free`` (free block count) and ``label`` (what happened).
    """
    allocator = BlockAllocator(num_blocks, block_size)
    if isinstance(events, (str, bytes)) or not hasattr(events, "__iter__"):
        raise bad("events", events, "a list of events such as ('arrive', 'A', 20)")
    tables: dict[str, list[int]] = {}
    lengths: dict[str, int] = {}
    snapshots = []
    for i, event in enumerate(events):
        shape = "('arrive' | 'grow', request, n_tokens) or ('finish', request)"
        if not isinstance(event, (tuple, list)) or len(event) < 2:
            raise bad(f"events[{i}]", event, shape)
        kind, req = check_choice(f"events[{i}] kind", event[0], EVENT_KINDS), event[1]
        if len(event) != (2 if kind == "finish" else 3):
            raise bad(f"events[{i}]", event, shape)
        if kind == "arrive" and req in tables:
            raise ValueError(f"event {i}: request {req!r} arrived twice")
        if kind != "arrive" and req not in tables:
            raise ValueError(f"event {i}: request {req!r} has not arrived (or already finished)")
        if kind == "finish":
            for block in tables.pop(req):
                allocator.free(block)
            del lengths[req]
        else:
            n = check_int(f"events[{i}] n_tokens", event[2], low=1)
            table = tables.setdefault(req, [])
            lengths[req] = lengths.get(req, 0) + n
            try:
                while len(table) * block_size < lengths[req]:
                    table.append(allocator.allocate())
            except OutOfBlocksError as err:
                raise OutOfBlocksError(f"event {i} {event}: {err}") from None
        owner: list = [None] * num_blocks
        fill = [0] * num_blocks
        for r, table in tables.items():
            for j, block in enumerate(table):
                owner[block] = r
                fill[block] = min(block_size, lengths[r] - j * block_size)
        label = f"{kind} {req}" + (f" (+{event[2]} tokens)" if kind != "finish" else "")
        snapshots.append({"step": i, "label": label, "owner": owner, "fill": fill,
                          "tables": {r: list(t) for r, t in tables.items()},
                          "free": allocator.num_free, "block_size": block_size})
    return snapshots


def draw_blocks(snapshot: dict, ax=None, columns: int = 8):
    """Draw the physical blocks as a grid: colour = owner, text = owner and tokens used."""
    import matplotlib.pyplot as plt   # here, not at the top: ranks import this module and never draw

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3))
    owners = sorted({o for o in snapshot["owner"] if o is not None})
    cmap = plt.get_cmap("tab10")
    colour = {o: cmap(i % 10) for i, o in enumerate(sorted(set(owners) | set("ABCDE")))}
    bs = snapshot["block_size"]
    for block, (owner, fill) in enumerate(zip(snapshot["owner"], snapshot["fill"])):
        x, y = block % columns, -(block // columns)
        face = colour[owner] if owner is not None else (0.93, 0.93, 0.93)
        ax.add_patch(plt.Rectangle((x, y), 0.95, 0.9, facecolor=face, edgecolor="black", lw=0.5))
        if owner is not None and fill < bs:   # the unused tail of a partly filled block
            ax.add_patch(plt.Rectangle((x + 0.95 * fill / bs, y), 0.95 * (1 - fill / bs), 0.9,
                                       facecolor="white", alpha=0.6, lw=0))
        text = f"#{block}\n{owner}:{fill}/{bs}" if owner is not None else f"#{block}\nfree"
        ax.text(x + 0.47, y + 0.45, text, ha="center", va="center", fontsize=7)
    rows = -(-len(snapshot["owner"]) // columns)
    ax.set_xlim(-0.1, columns)
    ax.set_ylim(-rows + 0.9, 1)
    ax.set_axis_off()
    tables = "; ".join(f"{r}: {t}" for r, t in snapshot["tables"].items())
    ax.set_title(f"step {snapshot['step']}: {snapshot['label']}; {snapshot['free']} free\n"
                 f"block tables  {tables}", fontsize=8)
    return ax


def kv_blocks_widget(events: list[tuple] = EXAMPLE_EVENTS, num_blocks: int = 16, block_size: int = 8) -> Explorer:
    """A time slider over :func:`block_timeline`; the grid redraws on every move.

    The control is ``event``; :attr:`~Explorer.data` is the snapshot last drawn.
    """
    snapshots = block_timeline(events, num_blocks, block_size)
    slider = widgets.IntSlider(value=0, min=0, max=len(snapshots) - 1, description="event")
    return Explorer({"event": slider}, lambda event: snapshots[event], draw_blocks, title="paged KV blocks",
                    text=lambda snap: f"step {snap['step']}: {snap['label']}; {snap['free']} blocks free",
                    figsize=(8, 3.2))
