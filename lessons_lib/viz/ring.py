"""The ring all-reduce, step by step: a picture of :func:`lessons_lib.comm.ring_schedule`.

``ring_frame(p, step)`` is a pure function returning what to draw (the transfers of
this step and every rank's chunk state from :func:`~lessons_lib.comm.simulate_ring`);
``draw_ring`` draws a frame with matplotlib; ``ring_widget`` adds sliders. The
executor that moves real tensors runs the very same schedule.
"""

from __future__ import annotations

import math
from functools import partial

import ipywidgets as widgets

from ..comm.schedule import ring_schedule, simulate_ring
from ..validate import check_int
from .explorer import Explorer


def ring_frame(p: int, step: int, kind: str = "all_reduce") -> dict:
    """What the picture shows after ``step`` steps (0 = the start).

    Returns ``{"p", "step", "n_steps", "phase", "transfers", "fill"}``: ``transfers``
    are the ``(src, dst, chunk, op)`` about to happen at this step (empty after the
    last), ``fill[r][c]`` is how many ranks' data rank ``r``'s chunk ``c`` contains.
    """
    check_int("p", p, low=1)
    steps = ring_schedule(p, kind)
    check_int("step", step, low=0, high=len(steps), why=f"{len(steps)} steps for p={p}")
    state = simulate_ring(p, kind)[step]
    upcoming = steps[step] if step < len(steps) else []
    return {"p": p, "step": step, "n_steps": len(steps),
            "phase": upcoming[0].phase if upcoming else "done",
            "transfers": [(t.src, t.dst, t.chunk, t.op) for t in upcoming],
            "fill": [[len(cell) for cell in row] for row in state]}


def ring_figsize(p: int) -> tuple[float, float]:
    """Bigger for more ranks, so each rank's ``p`` chunk labels keep their own room."""
    side = 5.5 if p <= 4 else 7.0
    return (side, side)


def draw_ring(frame: dict, ax=None):
    """Ranks on a circle, each with its ``p`` chunks coloured by how complete they are; arrows for the step.

    Chunk labels are the chunk's index under its box (``c0`` ... for up to four ranks, bare
    digits beyond), sized so that neighbouring labels never touch up to p = 8.
    """
    import matplotlib.pyplot as plt   # here, not at the top: ranks import this module and never draw
    from matplotlib import cm

    p = frame["p"]
    if ax is None:
        _, ax = plt.subplots(figsize=ring_figsize(p))
    ax.clear()
    ax.set_aspect("equal")
    ax.axis("off")
    centres = [(math.cos(math.pi / 2 - 2 * math.pi * r / p), math.sin(math.pi / 2 - 2 * math.pi * r / p))
               for r in range(p)]
    span = 0.5 if p <= 4 else 0.64          # width of one rank's row of chunks, in data units
    width = span / p
    label = (lambda c: f"c{c}") if p <= 4 else str
    for r, (x, y) in enumerate(centres):
        for c in range(p):
            level = frame["fill"][r][c] / p
            ax.add_patch(plt.Rectangle((x - span / 2 + c * width, y - 0.08), width * 0.9, 0.16,
                                       color=cm.viridis(level), ec="black"))
            ax.text(x - span / 2 + (c + 0.45) * width, y - 0.17, label(c), ha="center", va="center",
                    fontsize=7)
        ax.text(x, y + 0.15, f"rank {r}", ha="center", fontsize=9, weight="bold")
    for src, dst, chunk, op in frame["transfers"]:
        (x0, y0), (x1, y1) = centres[src], centres[dst]
        ax.annotate("", xy=(x0 + 0.8 * (x1 - x0), y0 + 0.8 * (y1 - y0)),
                    xytext=(x0 + 0.2 * (x1 - x0), y0 + 0.2 * (y1 - y0)),
                    arrowprops={"arrowstyle": "->", "color": "tab:red" if op == "reduce" else "tab:blue"})
        ax.text((x0 + x1) / 2 * 1.15, (y0 + y1) / 2 * 1.15, f"c{chunk} {'+' if op == 'reduce' else '='}",
                ha="center", fontsize=8, color="tab:red" if op == "reduce" else "tab:blue")
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.4, 1.4)
    ax.set_title(f"p={p}, step {frame['step']}/{frame['n_steps']}: {frame['phase']} "
                 f"(colour: share of ranks summed in; c+ adds, c= copies)", fontsize=9)
    return ax


def ring_text(frame: dict) -> str:
    moves = ", ".join(f"{src}->{dst} c{chunk}{'+' if op == 'reduce' else '='}"
                      for src, dst, chunk, op in frame["transfers"]) or "none"
    return f"p={frame['p']}, step {frame['step']}/{frame['n_steps']} ({frame['phase']}): transfers {moves}"


def _step_slider(p: int, value: int, kind: str):
    return widgets.IntSlider(value=value, min=0, max=len(ring_schedule(p, kind)), description="step")


def ring_widget(p: int = 4, kind: str = "all_reduce") -> Explorer:
    """Sliders for ``p`` and the step; the figure redraws from :func:`ring_frame`.

    Controls: ``p`` and ``step``; :attr:`~Explorer.data` is the frame last drawn. When ``p``
    changes, ``controls["step"]`` is a new slider whose maximum is the new number of steps.
    """
    check_int("p", p, low=2, high=8)

    def step_follows_p(explorer: Explorer, name: str) -> None:
        # A fresh slider for each p: JupyterLab's slider keeps the keys Home/End on the range it
        # was drawn with, so only a new one lets End reach the last step of a larger ring.
        p_now, step = explorer.controls["p"].value, explorer.controls["step"]
        n_steps = len(ring_schedule(p_now, kind))
        if name == "p" and step.max != n_steps:
            explorer.set_control("step", _step_slider(p_now, min(step.value, n_steps), kind))

    controls = {"p": widgets.IntSlider(value=p, min=2, max=8, description="ranks p"),
                "step": _step_slider(p, 0, kind)}
    return Explorer(controls, partial(ring_frame, kind=kind), draw_ring, title="ring all-reduce, step by step",
                    text=ring_text, figsize=lambda frame: ring_figsize(frame["p"]), on_change=step_follows_p)
