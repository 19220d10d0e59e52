"""Pipeline schedules as data: which stage runs which micro-batch, in what order.

A schedule is a list of actions per stage, ``orders[s] = (F0, F1, ..., B0, ...)``, the
same idea as ``torch.distributed.pipelining``'s ``pipeline_order``. It is plain data:

* the executor (:mod:`.runtime`) walks ``orders[s]`` on the rank that owns stage ``s``;
* :meth:`Schedule.timeline` places every action in time (each waits for its stage to be
  free and for the micro-batch to arrive from its neighbour), which is what the Gantt
  chart in :mod:`lessons_lib.viz.pipeline` draws and what the bubble fraction is read from.

Two schedules:

* **GPipe** (fill-drain): every stage runs all forwards, then (in training) all backwards.
* **1F1B** (PipeDream-flush): after a warm-up of ``p - 1 - s`` forwards, stage ``s``
  alternates one forward and one backward. Same bubble as GPipe, but a stage holds at
  most ``p - s`` micro-batches' activations instead of ``m``. With no backward pass
  (inference) there is nothing to alternate with, and 1F1B *is* GPipe.

With unit cost per action, the idle (bubble) fraction of both is ``(p - 1) / (m + p - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...validate import check_choice, check_int, check_real

SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Action:
    """One unit of work: stage ``stage`` runs ``kind`` ('F' forward, 'B' backward) on a micro-batch."""

    stage: int
    microbatch: int
    kind: str = "F"

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


@dataclass(frozen=True)
class Slot:
    """An action placed in time: it runs from ``start`` to ``end``."""

    action: Action
    start: float
    end: float


def _check_sizes(n_stages, n_microbatches) -> None:
    check_int("n_stages", n_stages, low=1)
    check_int("n_microbatches", n_microbatches, low=1)


@dataclass(frozen=True)
class Schedule:
    """``orders[s]``: the actions stage ``s`` runs, in order."""

    name: str
    n_stages: int
    n_microbatches: int
    orders: tuple[tuple[Action, ...], ...]

    @property
    def has_backward(self) -> bool:
        return any(a.kind == "B" for order in self.orders for a in order)

    def timeline(self, forward_cost: float = 1.0, backward_cost: float = 1.0) -> list[Slot]:
        """Place every action as early as its dependencies allow.

        F of micro-batch i on stage s needs F(i) on stage s-1 done (its input activation);
        B(i) on stage s needs B(i) on stage s+1 done (its output gradient), and on the last
        stage F(i) done. A stage runs one action at a time, in its order.
        """
        cost = {"F": check_real("forward_cost", forward_cost, low=0, low_open=True),
                "B": check_real("backward_cost", backward_cost, low=0, low_open=True)}
        done: dict[tuple[int, int, str], float] = {}
        free = [0.0] * self.n_stages
        nxt = [0] * self.n_stages
        slots: list[Slot] = []
        total = sum(len(o) for o in self.orders)
        while len(slots) < total:
            progressed = False
            for s, order in enumerate(self.orders):
                while nxt[s] < len(order):
                    a = order[nxt[s]]
                    if a.kind == "F":
                        dep = (s - 1, a.microbatch, "F") if s > 0 else None
                    elif s < self.n_stages - 1:
                        dep = (s + 1, a.microbatch, "B")
                    else:
                        dep = (s, a.microbatch, "F")
                    if dep is not None and dep not in done:
                        break
                    start = max(free[s], done[dep] if dep else 0.0)
                    end = start + cost[a.kind]
                    done[(s, a.microbatch, a.kind)] = free[s] = end
                    slots.append(Slot(a, start, end))
                    nxt[s] += 1
                    progressed = True
            if not progressed:
                stuck = {s: str(self.orders[s][nxt[s]]) for s in range(self.n_stages)
                         if nxt[s] < len(self.orders[s])}
                raise ValueError(f"schedule {self.name!r} deadlocks: stages wait forever at {stuck}")
        return sorted(slots, key=lambda sl: (sl.start, sl.action.stage))

    def makespan(self, **costs) -> float:
        return max(sl.end for sl in self.timeline(**costs))

    def bubble_fraction(self, **costs) -> float:
        """Share of stage-time spent idle: ``1 - busy / (stages x makespan)``."""
        slots = self.timeline(**costs)
        span = max(sl.end for sl in slots)
        busy = sum(sl.end - sl.start for sl in slots)
        return 1.0 - busy / (self.n_stages * span)

    def grid(self) -> list[list[str | None]]:
        """Unit-cost timeline as a table: ``grid[step][stage]`` is 'F3', 'B1' or None (idle)."""
        slots = self.timeline()
        steps = int(max(sl.end for sl in slots))
        table: list[list[str | None]] = [[None] * self.n_stages for _ in range(steps)]
        for sl in slots:
            table[int(sl.start)][sl.action.stage] = str(sl.action)
        return table

    def peak_in_flight(self) -> list[int]:
        """Per stage, the most micro-batches whose forward ran but whose backward has not:
        the activations it must keep in memory (training only; forward-only frees them at once)."""
        peaks = []
        for order in self.orders:
            held = peak = 0
            for a in order:
                held += 1 if a.kind == "F" else -1
                peak = max(peak, held)
            peaks.append(peak if self.has_backward else min(peak, 1))
        return peaks


def gpipe(n_stages: int, n_microbatches: int, *, backward: bool = False) -> Schedule:
    """GPipe: all forwards, then (with ``backward``, as in training) all backwards, on every stage."""
    _check_sizes(n_stages, n_microbatches)
    orders = []
    for s in range(n_stages):
        order = [Action(s, i, "F") for i in range(n_microbatches)]
        if backward:
            order += [Action(s, i, "B") for i in range(n_microbatches)]
        orders.append(tuple(order))
    return Schedule("gpipe", n_stages, n_microbatches, tuple(orders))


def one_f_one_b(n_stages: int, n_microbatches: int, *, backward: bool = False) -> Schedule:
    """1F1B: ``p - 1 - s`` warm-up forwards, then (with ``backward``, as in training) one forward /
    one backward, then the rest of the backwards. Forward-only, the default as for every schedule
    here, it is the GPipe order."""
    _check_sizes(n_stages, n_microbatches)
    orders = []
    for s in range(n_stages):
        warm = min(n_stages - 1 - s, n_microbatches)
        order = [Action(s, i, "F") for i in range(warm)]
        f = warm
        if backward:
            b = 0
            while f < n_microbatches:
                order += [Action(s, f, "F"), Action(s, b, "B")]
                f, b = f + 1, b + 1
            order += [Action(s, i, "B") for i in range(b, n_microbatches)]
        else:
            order += [Action(s, i, "F") for i in range(f, n_microbatches)]
        orders.append(tuple(order))
    return Schedule("1f1b", n_stages, n_microbatches, tuple(orders))


def make_schedule(name: str, n_stages: int, n_microbatches: int, *, backward: bool = False) -> Schedule:
    """Build a schedule by name: 'gpipe' or '1f1b'."""
    check_choice("schedule", name, SCHEDULES)
    return (gpipe if name == "gpipe" else one_f_one_b)(n_stages, n_microbatches, backward=backward)


def bubble_formula(n_stages: int, n_microbatches: int) -> float:
    """Idle fraction of a fill-drain pipeline with equal work per action: (p - 1) / (m + p - 1)."""
    _check_sizes(n_stages, n_microbatches)
    return (n_stages - 1) / (n_microbatches + n_stages - 1)
