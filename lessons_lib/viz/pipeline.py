"""The pipeline-bubble picture: a Gantt chart of a schedule and its idle fraction.

:func:`gantt_data` is a pure function of (stages, micro-batches, schedule): it returns the
bars (one per action, placed by :meth:`Schedule.timeline`) and the numbers, nothing drawn.
:func:`draw_gantt` draws that data with matplotlib; :class:`PipelineBubbleWidget` wraps both
in ipywidgets (stages slider, micro-batches slider, schedule dropdown). The executor runs the
very same :class:`~lessons_lib.parallel.pipeline.schedule.Schedule` objects, so the picture
is the run.
"""

from __future__ import annotations

from ..parallel.pipeline.schedule import bubble_formula, make_schedule
from ..validate import check_choice, check_int

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


def draw_gantt(data: dict, max_microbatches: int = 16):
    """Left: the Gantt chart (stage 0 on top). Right: bubble fraction against m for this p.

    Returns a ``matplotlib.figure.Figure`` made without pyplot, so no backend shows it behind
    the caller's back; :func:`show_figure` displays it once, as a PNG.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    p, m = data["n_stages"], data["n_microbatches"]
    fig = Figure(figsize=(11, 0.5 * p + 2.2))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.2]})
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
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def show_figure(fig) -> None:
    """Display a figure in a notebook as a PNG image."""
    from IPython.display import Image, display

    display(Image(data=figure_png(fig), format="png"))


class PipelineBubbleWidget:
    """Sliders for stages and micro-batches, a schedule dropdown, the chart and the numbers."""

    def __init__(self, n_stages: int = 4, n_microbatches: int = 4, schedule: str = "gpipe",
                 backward: bool = False) -> None:
        import ipywidgets as widgets

        from .static import FallbackBox

        # "initial": the description gets the width its text needs (the default cuts it).
        label = {"style": {"description_width": "initial"}, "layout": widgets.Layout(width="360px")}
        self.stages = widgets.IntSlider(value=n_stages, min=1, max=8, description="stages p", **label)
        self.microbatches = widgets.IntSlider(value=n_microbatches, min=1, max=16,
                                              description="micro-batches m", **label)
        check_choice("schedule, backward", (schedule, backward), CHOICES)
        self.schedule = widgets.Dropdown(options=[(schedule_title(*c), c) for c in CHOICES],
                                         value=(schedule, backward), description="schedule",
                                         layout=widgets.Layout(width="420px"))
        self.bubble = widgets.HTML()
        self.output = widgets.Output()
        for w in (self.stages, self.microbatches, self.schedule):
            w.observe(self._on_change, names="value")
        self.box = FallbackBox([widgets.HBox([self.stages, self.microbatches]), self.schedule,
                                self.bubble, self.output],
                               title="pipeline bubble", picture=lambda: self.figure,
                               text=lambda: bubble_text(self.data))
        self.data: dict = {}
        self.figure = None      # the last chart drawn (closed, kept for inspection)
        self.update()

    def _on_change(self, _change) -> None:
        self.update()

    def update(self) -> None:
        schedule, backward = self.schedule.value
        self.data = gantt_data(self.stages.value, self.microbatches.value, schedule, backward=backward)
        self.bubble.value = f"<span class='pipeline-bubble'>{bubble_text(self.data)}</span>"
        self.figure = draw_gantt(self.data)
        with self.output:
            self.output.clear_output(wait=True)
            show_figure(self.figure)

    def _repr_mimebundle_(self, **kwargs):
        return self.box._repr_mimebundle_(**kwargs)


def pipeline_widget(**kwargs) -> PipelineBubbleWidget:
    """The interactive pipeline-bubble view (display it as the last line of a cell)."""
    return PipelineBubbleWidget(**kwargs)
