"""The pipeline-bubble picture: a Gantt chart of a schedule and its idle fraction.

:func:`gantt_data` is a pure function of (stages, micro-batches, schedule): it returns the
bars (one per action, placed by :meth:`Schedule.timeline`) and the numbers, nothing drawn.
:func:`draw_gantt` draws that data with matplotlib; :class:`PipelineBubbleWidget` is the
:class:`~lessons_lib.viz.explorer.Explorer` over both (stages slider, micro-batches slider,
schedule dropdown whose values are ``(schedule, backward)``). The executor runs the
very same :class:`~lessons_lib.parallel.pipeline.schedule.Schedule` objects, so the picture
is the run.
"""

from __future__ import annotations

import ipywidgets as widgets
from IPython.display import Image, display
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ..parallel.pipeline.schedule import bubble_formula, make_schedule
from ..validate import check_choice, check_int
from .explorer import Explorer, make_figure
from .static import figure_png

# The schedules the widget offers, as (schedule name, with backward?) values.
CHOICES = (("gpipe", False), ("gpipe", True), ("1f1b", True))
COLORS = {"F": "#4C72B0", "B": "#DD8452"}


def schedule_title(schedule: str, backward: bool) -> str:
    """How a chart and the dropdown name a schedule, e.g. ``1F1B, training (one F, one B)``."""
    name = {"gpipe": "GPipe", "1f1b": "1F1B"}[schedule]
    if not backward:
        return f"{name}, inference (forward only)"
    return f"{name}, training " + ("(all F, then all B)" if schedule == "gpipe" else "(one F, one B)")


def gantt_data(n_stages: int, n_microbatches: int, schedule: str = "gpipe", *, backward: bool = False) -> dict:
    """Bars and numbers of one schedule (as :func:`make_schedule` names it), unit cost per action.

    Returns ``{"bars": [(stage, start, duration, label, kind), ...], "makespan", "bubble",
    "formula", "peak_in_flight", "n_stages", "n_microbatches", "schedule", "backward", "title"}``.
    """
    check_int("n_stages", n_stages, low=1)
    check_int("n_microbatches", n_microbatches, low=1)
    check_choice("backward", backward, (False, True))
    plan = make_schedule(schedule, n_stages, n_microbatches, backward=bool(backward))
    slots = plan.timeline()
    return {
        "bars": [(sl.action.stage, sl.start, sl.end - sl.start, str(sl.action), sl.action.kind)
                 for sl in slots],
        "makespan": max(sl.end for sl in slots),
        "bubble": plan.bubble_fraction(),
        "formula": bubble_formula(n_stages, n_microbatches),
        "peak_in_flight": plan.peak_in_flight(),
        "n_stages": n_stages, "n_microbatches": n_microbatches,
        "schedule": schedule, "backward": bool(backward), "title": schedule_title(schedule, bool(backward)),
    }


def bubble_text(data: dict) -> str:
    """One line: the idle fraction read off the chart, the formula, activations held."""
    p, m = data["n_stages"], data["n_microbatches"]
    return (f"p={p} stages, m={m} micro-batches: idle (bubble) fraction {data['bubble']:.3f}; "
            f"formula (p-1)/(m+p-1) = {p - 1}/{m + p - 1} = {data['formula']:.3f}; "
            f"most micro-batches' activations held by a stage: {max(data['peak_in_flight'])}")


GANTT_AXES_WIDTH_IN = 7.0   # about the Gantt axes' width in the 11-inch figure


def block_labels(makespan: float, n_microbatches: int) -> tuple[float, int]:
    """``(font size in points, rotation)`` for the micro-batch numbers inside unit blocks.

    A block is ``GANTT_AXES_WIDTH_IN / makespan`` inches wide. Its number (up to two digits)
    is written across when that fits at 7 points or more, else turned upright (a row is far
    taller than a block is wide), else left out (size 0): never smaller than 6 points.
    """
    digits = len(str(max(0, n_microbatches - 1)))
    block_pt = 72 * GANTT_AXES_WIDTH_IN / max(makespan, 1)
    across = min(8.0, block_pt / (0.65 * digits + 0.4))
    if across >= 7:
        return round(across, 1), 0
    upright = min(8.0, block_pt / 1.3)
    return (round(upright, 1), 90) if upright >= 6 else (0, 0)


def gantt_of(n_stages: int, n_microbatches: int, schedule: tuple = ("gpipe", False)) -> dict:
    """:func:`gantt_data` with the schedule as the widget's ``(schedule name, backward)`` value."""
    check_choice("schedule", tuple(schedule), CHOICES)
    return gantt_data(n_stages, n_microbatches, schedule[0], backward=schedule[1])


def gantt_figsize(data: dict) -> tuple[float, float]:
    return (11, 0.5 * data["n_stages"] + 2.2)


GANTT_WIDTHS = (3, 1.2)   # the Gantt chart, then the bubble-vs-m panel


def draw_gantt(data: dict, axes=None, max_microbatches: int = 16):
    """Left: the Gantt chart (stage 0 on top). Right: bubble fraction against m for this p.

    With ``axes`` (a pair), draws on them; without, returns a new ``matplotlib.figure.Figure``
    made without pyplot, so no backend shows it behind the caller's back (:func:`show_figure`
    displays it once, as a PNG).
    """
    if axes is None:
        return make_figure(lambda d, a: draw_gantt(d, a, max_microbatches), data, gantt_figsize(data),
                           ncols=2, width_ratios=GANTT_WIDTHS)
    ax, ax2 = axes
    fig = ax.figure
    p, m = data["n_stages"], data["n_microbatches"]
    size, rotation = block_labels(data["makespan"], m)
    for stage, start, dur, label, kind in data["bars"]:
        ax.barh(stage, dur, left=start, color=COLORS[kind], edgecolor="white")
        if size:
            # The colour says F or B; the label is the micro-batch alone, so it fits its block.
            ax.text(start + dur / 2, stage, label[1:] if len(label) > 1 else label, ha="center",
                    va="center", color="white", fontsize=size, rotation=rotation)
    fig.legend(handles=[Patch(color=c, label={"F": "forward", "B": "backward"}[k])
                       for k, c in COLORS.items() if any(b[4] == k for b in data["bars"])],
               loc="lower left", ncol=2, fontsize=8, frameon=False)   # in a strip below the axes
    ax.set_ylim(p - 0.5, -0.5)
    ax.set_xlim(0, data["makespan"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yticks(range(p), [f"stage {s}" for s in range(p)])
    ax.set_xlabel("time (one unit = one stage's work on one micro-batch)")
    ax.set_facecolor("#eeeeee")   # the grey that shows through is the bubble
    ax.set_title(f"{data['title']}: bubble {data['bubble']:.3f}")
    ms = list(range(1, max(max_microbatches, m) + 1))
    ax2.plot(ms, [bubble_formula(p, k) for k in ms], color="grey", label="(p-1)/(m+p-1)")
    ax2.plot([m], [data["bubble"]], "o", color="#C44E52", label=f"this schedule, m={m}")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("micro-batches m")
    ax2.set_ylabel("idle fraction")
    ax2.set_title(f"bubble vs m, p={p}")
    ax2.legend(fontsize=8)
    if fig.get_layout_engine() is not None:   # keep the strip below the axes for the legend
        fig.get_layout_engine().set(rect=(0, 0.07, 1, 1))
    else:
        fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def show_figure(fig) -> None:
    """Display a figure in a notebook as a PNG image."""
    display(Image(data=figure_png(fig), format="png"))


class PipelineBubbleWidget(Explorer):
    """Sliders for stages and micro-batches, a schedule dropdown, the chart and the numbers.

    The controls are ``n_stages``, ``n_microbatches`` and ``schedule`` (values ``(name, backward)``);
    :attr:`data` is :func:`gantt_data`'s dict.
    """

    def __init__(self, n_stages: int = 4, n_microbatches: int = 4, schedule: str = "gpipe",
                 backward: bool = False) -> None:
        check_choice("schedule, backward", (schedule, backward), CHOICES)
        # "initial": the description gets the width its text needs (the default cuts it).
        label = {"style": {"description_width": "initial"}, "layout": widgets.Layout(width="360px")}
        controls = {
            "n_stages": widgets.IntSlider(value=n_stages, min=1, max=8, description="stages p", **label),
            "n_microbatches": widgets.IntSlider(value=n_microbatches, min=1, max=16,
                                                description="micro-batches m", **label),
            "schedule": widgets.Dropdown(options=[(schedule_title(*c), c) for c in CHOICES],
                                         value=(schedule, backward), description="schedule",
                                         layout=widgets.Layout(width="420px")),
        }
        super().__init__(controls, gantt_of, draw_gantt, title="pipeline bubble", text=bubble_text,
                         figsize=gantt_figsize, ncols=2, width_ratios=GANTT_WIDTHS,
                         rows=[["n_stages", "n_microbatches"], ["schedule"]])


def pipeline_widget(**kwargs) -> PipelineBubbleWidget:
    """The interactive pipeline-bubble view (display it as the last line of a cell)."""
    return PipelineBubbleWidget(**kwargs)
