"""Queue lengths over time per worker, and latency per policy: pure data, then the picture.

``queue_series`` turns a simulation's event timeline into step functions sampled on a grid (plain
lists, testable); ``queue_data`` and ``draw_queues`` make and draw the picture of one run, ``plot_latency`` the
latency bars; ``queue_widget`` puts a policy dropdown and a time-window slider over the first.
"""

from __future__ import annotations

import ipywidgets as widgets

from ..validate import check_int, check_real
from .explorer import Explorer


def queue_series(result, n_points: int = 200, t_end: float | None = None) -> tuple[list[float], dict]:
    """(times, {worker: queue length at each time}) from ``result.timeline`` (a step function)."""
    check_int("n_points", n_points, low=2)
    if t_end is not None:
        check_real("t_end", t_end, low=0)
    if not result.timeline:
        raise ValueError("the result has an empty timeline: simulate a non-empty trace")
    t_end = t_end if t_end is not None else max(t for t, _, _ in result.timeline)
    times = [t_end * i / (n_points - 1) for i in range(n_points)]
    workers = sorted({w for _, w, _ in result.timeline})
    series = {w: [] for w in workers}
    events = sorted(result.timeline, key=lambda e: e[0])
    current = {w: 0 for w in workers}
    k = 0
    for t in times:
        while k < len(events) and events[k][0] <= t:
            current[events[k][1]] = events[k][2]
            k += 1
        for w in workers:
            series[w].append(current[w])
    return times, series


def queue_data(result, window: tuple[float, float] | None = None, n_points: int = 400) -> dict:
    """What :func:`draw_queues` draws: the sampled queue lengths of one run, its policy and time window."""
    times, series = queue_series(result, n_points=n_points)
    window = tuple(window) if window else (0.0, times[-1])
    peak = max((y for ys in series.values() for t, y in zip(times, ys) if window[0] <= t <= window[1]), default=0)
    return {"policy": result.policy, "times": times, "series": series, "window": window, "peak": peak}


def draw_queues(data: dict, ax) -> None:
    """Queue length per worker over time, as steps, within the data's time window."""
    for w, ys in data["series"].items():
        ax.step(data["times"], ys, where="post", label=w)
    ax.set_xlim(*data["window"])
    ax.set_xlabel("time (s)")
    ax.set_ylabel("queue length")
    ax.set_title(f"queue length per worker: {data['policy']}")
    ax.legend(loc="upper left", fontsize=8)


def plot_queues(result, t_window: tuple[float, float] | None = None, ax=None):
    """:func:`draw_queues` of one run on a new pyplot figure (or ``ax``); returns the figure."""
    import matplotlib.pyplot as plt   # here, not at the top: ranks import this module and never draw

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 2.8))
    draw_queues(queue_data(result, t_window), ax)
    ax.figure.tight_layout()
    return ax.figure


def plot_latency(summaries, ax=None):
    """Bars of p50 and p99 latency per policy (``summaries``: list of ``SimResult.summary()``)."""
    import matplotlib.pyplot as plt   # here, not at the top: ranks import this module and never draw

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 2.8))
    names = [s["policy"] for s in summaries]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [s["p50_s"] for s in summaries], width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [s["p99_s"] for s in summaries], width=0.4, label="p99")
    ax.set_xticks(list(xs), names, rotation=15)
    ax.set_ylabel("latency (s)")
    ax.legend()
    ax.figure.tight_layout()
    return ax.figure


def queue_widget(results) -> Explorer:
    """A dropdown over policies and a slider over the time window, redrawing :func:`draw_queues`."""
    by_name = {r.policy: r for r in results}
    t_max = max(max(t for t, _, _ in r.timeline) for r in results)
    controls = {"policy": widgets.Dropdown(options=list(by_name), description="policy"),
                "window": widgets.FloatRangeSlider(value=(0.0, t_max), min=0.0, max=t_max, step=t_max / 100,
                                                   description="time (s)")}
    return Explorer(controls, lambda policy, window: queue_data(by_name[policy], window), draw_queues,
                    title="queue length per worker", figsize=(7, 2.8),
                    text=lambda d: (f"policy={d['policy']}, {d['window'][0]:.1f}-{d['window'][1]:.1f} s: "
                                    f"longest queue {d['peak']}"))
