"""Queue lengths over time per worker, and latency per policy: pure data, then the picture.

``queue_series`` turns a simulation's event timeline into step functions sampled on a grid (plain
lists, testable); ``plot_queues`` and ``plot_latency`` draw them; ``queue_widget`` wraps the first
in a policy dropdown and a time-window slider.
"""

from __future__ import annotations

from ..validate import check_int, check_real


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


def plot_queues(result, t_window: tuple[float, float] | None = None, ax=None):
    import matplotlib.pyplot as plt

    times, series = queue_series(result, n_points=400)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 2.8))
    for w, ys in series.items():
        ax.step(times, ys, where="post", label=w)
    if t_window:
        ax.set_xlim(*t_window)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("queue length")
    ax.set_title(f"queue length per worker: {result.policy}")
    ax.legend(loc="upper left", fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def plot_latency(summaries, ax=None):
    """Bars of p50 and p99 latency per policy (``summaries``: list of ``SimResult.summary()``)."""
    import matplotlib.pyplot as plt

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


def queue_widget(results):
    """A dropdown over policies and a slider over the time window, redrawing :func:`plot_queues`."""
    import ipywidgets as widgets

    from .static import interactive_figure

    by_name = {r.policy: r for r in results}
    t_max = max(max(t for t, _, _ in r.timeline) for r in results)

    def draw(policy, window):
        return plot_queues(by_name[policy], window)   # shown by ipywidgets' inline-plot hook

    return interactive_figure(
        draw, title="queue length per worker",
        policy=widgets.Dropdown(options=list(by_name), description="policy"),
        window=widgets.FloatRangeSlider(value=(0.0, t_max), min=0.0, max=t_max, step=t_max / 100,
                                        description="time (s)"))
