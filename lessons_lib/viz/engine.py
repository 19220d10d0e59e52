"""The serving engine step by step: who runs, which KV blocks each request holds, what is cached.

:func:`record_run` drives an :class:`~lessons_lib.engine.LLMEngine` through a trace (requests
added at the step they arrive) and keeps one plain snapshot per step: the scheduled requests and
their token counts, who was preempted or finished, the running and waiting queues, every block
table, and the state of every physical block (held by whom, free, or free but still holding a
cached prefix). :func:`draw_engine_step` draws one snapshot; :func:`engine_widget` puts a step
slider over a recorded run. The snapshots are the one source of truth: tests read them, the
picture draws them.
"""

from __future__ import annotations

import ipywidgets as widgets

from ..engine import LLMEngine
from ..validate import bad, check_int
from .explorer import Explorer

FREE, CACHED = "free", "cached"


def _block_states(engine) -> tuple[list, list]:
    """Per physical block: the requests holding it (a list, empty when free), and its state."""
    bm = engine.block_manager
    holders: list[list[str]] = [[] for _ in range(bm.num_blocks)]
    for rid, table in bm.block_tables.items():
        for block in table:
            holders[block].append(rid)
    cached = set(bm.prefix_cache.hash_of) if bm.prefix_cache is not None else set()
    state = []
    for block, held in enumerate(holders):
        if held:
            state.append("held")
        else:
            state.append(CACHED if block in cached else FREE)
    return holders, state


def snapshot(engine, step: int, outputs, request_ids: list[str]) -> dict:
    """The engine just after ``engine.step()`` returned ``outputs``, as plain data."""
    plan = engine.last_schedule
    holders, state = _block_states(engine)
    stats = engine.stats()
    return {
        "step": step,
        "scheduled": [(r.request_id, n) for r, n in plan.scheduled] if plan else [],
        "preempted": [r.request_id for r in plan.preempted] if plan else [],
        "finished": [o.request_id for o in outputs if o.finished],
        "running": [r.request_id for r in engine.scheduler.running],
        "waiting": [r.request_id for r in engine.scheduler.waiting],
        "tables": {rid: engine.block_manager.block_table(rid) for rid in engine.block_manager.block_tables},
        "holders": holders,
        "state": state,
        "num_free_blocks": stats.num_free_blocks,
        "num_blocks": stats.num_blocks,
        "kv_tokens": stats.kv_tokens,
        "kv_slots": stats.kv_slots,
        "block_size": engine.block_size,
        "request_ids": list(request_ids),
    }


def record_run(engine, arrivals, max_steps: int = 10_000) -> list[dict]:
    """Serve ``arrivals`` on ``engine`` and return a snapshot after every step.

    ``arrivals`` is a list of ``(step, request_id, prompt_token_ids, sampling_params)``: each request
    is added just before the step of that number (0 is the first step). Steps run until every
    request has finished.
    """

    if not isinstance(engine, LLMEngine):
        raise bad("engine", engine, "an LLMEngine")
    if isinstance(arrivals, (str, bytes)) or not hasattr(arrivals, "__iter__"):
        raise bad("arrivals", arrivals, "a list of (step, request_id, prompt_token_ids, sampling_params)")
    arrivals = list(arrivals)
    for i, a in enumerate(arrivals):
        if not isinstance(a, (tuple, list)) or len(a) != 4:
            raise bad(f"arrivals[{i}]", a, "(step, request_id, prompt_token_ids, sampling_params)")
        check_int(f"arrivals[{i}] step", a[0], low=0)
    check_int("max_steps", max_steps, low=1)
    pending = sorted(arrivals, key=lambda a: a[0])
    request_ids = [a[1] for a in pending]
    snapshots, step = [], 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params)
        outputs = engine.step()
        snapshots.append(snapshot(engine, step, outputs, request_ids))
        step += 1
        if step >= max_steps:
            raise RuntimeError(f"the run did not finish within max_steps={max_steps} steps")
    return snapshots


def _colours(request_ids: list[str]) -> dict:
    import matplotlib.pyplot as plt   # here, not at the top: ranks import this module and never draw

    cmap = plt.get_cmap("tab20")
    return {rid: cmap(i % 20) for i, rid in enumerate(request_ids)}


def step_summary(snap: dict) -> str:
    """One snapshot in words: what ran, who waits, what the pool holds."""
    ran = ", ".join(f"{rid}:{n}" for rid, n in snap["scheduled"]) or "nothing"
    lines = [f"step {snap['step']}: ran {ran} ({sum(n for _, n in snap['scheduled'])} tokens)",
             f"running {snap['running'] or '[]'}; waiting {snap['waiting'] or '[]'}"]
    if snap["preempted"]:
        lines.append(f"preempted {snap['preempted']}")
    if snap["finished"]:
        lines.append(f"finished {snap['finished']}")
    cached = snap["state"].count(CACHED)
    lines.append(f"blocks: {snap['num_blocks'] - snap['num_free_blocks']} held, "
                 f"{snap['num_free_blocks']} free ({cached} of them cached)")
    return "\n".join(lines)


def draw_engine_step(snap: dict, ax=None, columns: int = 12):
    """Draw one snapshot: the block grid coloured by request, cached free blocks hatched."""
    import matplotlib.pyplot as plt   # here, not at the top: ranks import this module and never draw

    check_int("columns", columns, low=1)
    if ax is None:
        rows = -(-len(snap["holders"]) // columns)
        _, ax = plt.subplots(figsize=(9, 1.6 + 0.7 * rows))
    colour = _colours(snap["request_ids"])
    for block, (held, state) in enumerate(zip(snap["holders"], snap["state"])):
        x, y = block % columns, -(block // columns)
        if held:
            face, text = colour[held[0]], held[0] + (f" +{len(held) - 1}" if len(held) > 1 else "")
        else:
            face, text = (0.93, 0.93, 0.93), state
        ax.add_patch(plt.Rectangle((x, y), 0.95, 0.9, facecolor=face, edgecolor="black", lw=0.5,
                                   hatch="///" if state == CACHED else None))
        ax.text(x + 0.47, y + 0.45, f"#{block}\n{text}", ha="center", va="center", fontsize=6)
    rows = -(-len(snap["holders"]) // columns)
    summary = step_summary(snap)
    top = 1 + 0.32 * (summary.count("\n") + 1)       # room above the grid for the summary
    ax.text(0, top, summary, ha="left", va="top", fontsize=8, family="monospace")
    ax.set_xlim(-0.1, columns)
    ax.set_ylim(-rows + 0.9, top + 0.05)
    ax.set_axis_off()
    return ax


PAD = "pad"


def static_slots(output_lengths: list[int], batch_size: int) -> list[list]:
    """Static batching as a grid: ``grid[slot][step]`` is the request index computing a token there,
    :data:`PAD` for a slot whose request is done while its batch runs on, or None (no batch).

    Requests are batched in order, ``batch_size`` at a time; a batch runs until its longest request
    has all its tokens, then the next batch starts.
    """
    check_int("batch_size", batch_size, low=1)
    if not isinstance(output_lengths, (list, tuple)) or not output_lengths:
        raise bad("output_lengths", output_lengths, "a non-empty list of token counts")
    lengths = [check_int(f"output_lengths[{i}]", m, low=1) for i, m in enumerate(output_lengths)]
    total = sum(max(lengths[b:b + batch_size]) for b in range(0, len(lengths), batch_size))
    grid = [[None] * total for _ in range(batch_size)]
    start = 0
    for b in range(0, len(lengths), batch_size):
        group = lengths[b:b + batch_size]
        for slot, m in enumerate(group):
            for t in range(max(group)):
                grid[slot][start + t] = b + slot if t < m else PAD
        start += max(group)
    return grid


def continuous_slots(snapshots: list[dict], num_slots: int) -> list[list]:
    """Continuous batching as the same grid, from :func:`record_run`'s snapshots: a request takes
    the lowest free slot when first scheduled and frees it the step it finishes (or is preempted);
    the cell holds the request's index in ``request_ids``."""
    check_int("num_slots", num_slots, low=1)
    grid = [[None] * len(snapshots) for _ in range(num_slots)]
    slot_of: dict[str, int] = {}
    for t, snap in enumerate(snapshots):
        for rid, _ in snap["scheduled"]:
            if rid not in slot_of:
                free = sorted(set(range(num_slots)) - set(slot_of.values()))
                if not free:
                    raise ValueError(f"step {t}: more than num_slots={num_slots} requests ran")
                slot_of[rid] = free[0]
            grid[slot_of[rid]][t] = snap["request_ids"].index(rid)
        for rid in snap["finished"] + snap["preempted"]:
            slot_of.pop(rid, None)
    return grid


def draw_slots(grid: list[list], ax=None, title: str = ""):
    """Draw a slot grid: one row per batch slot, one column per step, colour = request, grey = padding."""
    import matplotlib.pyplot as plt   # here, not at the top: ranks import this module and never draw

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 2))
    cmap = plt.get_cmap("tab20")
    for slot, row in enumerate(grid):
        for t, cell in enumerate(row):
            if cell is None:
                continue
            face = (0.75, 0.75, 0.75) if cell == PAD else cmap(cell % 20)
            ax.add_patch(plt.Rectangle((t, -slot), 1, 0.9, facecolor=face, lw=0))
    steps = max((len(r) for r in grid), default=0)
    ax.set_xlim(0, max(steps, 1))
    ax.set_ylim(-len(grid) + 0.9, 1)
    ax.set_yticks([-s + 0.45 for s in range(len(grid))], [f"slot {s}" for s in range(len(grid))], fontsize=7)
    ax.set_xlabel("step")
    if title:
        ax.set_title(title, fontsize=9, loc="left")
    return ax


def engine_widget(snapshots: list[dict], columns: int = 12) -> Explorer:
    """A step slider over :func:`record_run`'s snapshots; the grid and the queues redraw on every move.

    The control is ``step``; :attr:`~Explorer.data` is the snapshot last drawn.
    """
    if not isinstance(snapshots, list) or not snapshots:
        raise bad("snapshots", snapshots, "the non-empty list record_run returns")
    check_int("columns", columns, low=1)
    slider = widgets.IntSlider(value=0, min=0, max=len(snapshots) - 1, description="step")
    return Explorer({"step": slider}, lambda step: snapshots[step],
                    lambda snap, ax: draw_engine_step(snap, ax, columns), title="serving engine, step by step",
                    text=step_summary, figsize=lambda snap: (9, 1.6 + 0.7 * -(-len(snap["holders"]) // columns)))
