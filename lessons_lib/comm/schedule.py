"""Collective algorithms as data: who sends which chunk to whom, step by step.

A schedule is a plain list of :class:`Transfer` records computed by a pure function.
The executor in :mod:`lessons_lib.comm.collectives` runs exactly these transfers and
the ring picture in :mod:`lessons_lib.viz.ring` draws exactly these transfers: one
source of truth, and both are testable without a process group.

Chunks. A tensor of ``n`` elements is cut into ``p`` chunks the way
``torch.tensor_split`` does: the first ``n % p`` chunks get one element more. When
``p`` divides ``n`` every chunk has ``n / p`` elements and every rank of a ring
all-reduce sends exactly ``2 (p - 1) / p * n`` elements. When it does not, a rank's
count depends on which chunks pass through it (they differ by at most ``2 (p - 1)``
elements between ranks), but the sum over all ranks is still exactly
``2 (p - 1) * n``: every chunk travels ``p - 1`` hops in each of the two phases.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..validate import check_choice, check_int

RING_KINDS = ("all_reduce", "reduce_scatter", "all_gather")
# Phases whose transfers carry the whole tensor rather than one chunk of it.
WHOLE_TENSOR_PHASES = ("broadcast", "one-shot")


@dataclass(frozen=True)
class Transfer:
    """One message: at ``step``, ``src`` sends chunk ``chunk`` to ``dst``.

    ``op`` says what the receiver does with it: ``"reduce"`` adds it into its own copy
    of the chunk, ``"copy"`` overwrites its copy. ``phase`` names the algorithm phase.
    """

    step: int
    phase: str
    src: int
    dst: int
    chunk: int
    op: str


def _check_world_size(p, name: str = "p") -> int:
    return check_int(name, p, low=1, why="the number of ranks")


def chunk_bounds(n: int, p: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each of the ``p`` chunks of ``n`` elements (``torch.tensor_split`` sizes)."""
    _check_world_size(p)
    check_int("n", n, low=0, why="the number of elements")
    base, extra = divmod(n, p)
    bounds, start = [], 0
    for i in range(p):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def ring_schedule(p: int, kind: str = "all_reduce") -> list[list[Transfer]]:
    """The ring algorithm's steps; ``steps[s]`` holds the ``p`` transfers made at step ``s``.

    Ranks sit on a ring; at every step each rank sends one chunk to its right
    neighbour ``(r + 1) % p`` and receives one from its left neighbour, so every link
    is busy and no link carries more than one chunk per step.

    * reduce-scatter (``p - 1`` steps): at step ``s`` rank ``r`` sends chunk
      ``(r - s - 1) % p``; the receiver adds it to its own. The partial sum of each
      chunk walks round the ring collecting one contribution per hop and ends,
      complete, on the rank with the same index (rank ``r`` owns chunk ``r``, as in
      ``reduce_scatter_tensor``).
    * all-gather (``p - 1`` steps): rank ``r`` starts with chunk ``r`` and at step
      ``s`` forwards chunk ``(r - s) % p``; receivers copy it.
    * all-reduce = reduce-scatter then all-gather: ``2 (p - 1)`` steps.
    """
    _check_world_size(p)
    check_choice("kind", kind, RING_KINDS)
    steps: list[list[Transfer]] = []
    if kind in ("all_reduce", "reduce_scatter"):
        for s in range(p - 1):
            steps.append([Transfer(len(steps), "reduce-scatter", r, (r + 1) % p, (r - s - 1) % p, "reduce")
                          for r in range(p)])
    if kind in ("all_reduce", "all_gather"):
        for s in range(p - 1):
            steps.append([Transfer(len(steps), "all-gather", r, (r + 1) % p, (r - s) % p, "copy")
                          for r in range(p)])
    return steps


def tree_broadcast_schedule(p: int, root: int = 0) -> list[list[Transfer]]:
    """A binomial-tree broadcast: ``ceil(log2 p)`` rounds, the set of holders doubling each round.

    Ranks are renumbered relative to the root (``v = (r - root) % p``). In round ``k``
    every holder ``v < 2**k`` sends the whole tensor (chunk 0) to ``v + 2**k``. The root
    sends ``ceil(log2 p)`` times, leaves never send, and the sum over ranks is ``p - 1``
    whole tensors: the same volume as a chain, in logarithmic rather than linear time.
    """
    _check_world_size(p)
    check_int("root", root, low=0, high=p - 1, why="a rank of the group")
    rounds, span = [], 1
    while span < p:
        rounds.append([Transfer(len(rounds), "broadcast", (v + root) % p, (v + span + root) % p, 0, "copy")
                       for v in range(span) if v + span < p])
        span *= 2
    return rounds


def one_shot_schedule(p: int) -> list[list[Transfer]]:
    """A one-shot all-reduce: one step in which every rank sends its whole tensor to every other.

    Each rank then adds the ``p`` tensors itself. One step (one latency), but ``(p - 1) n``
    bytes out of every rank: the fewest steps and the most bytes. Transfers carry the whole
    tensor (phase ``"one-shot"``, chunk 0).
    """
    _check_world_size(p)
    if p == 1:
        return []
    return [[Transfer(0, "one-shot", src, dst, 0, "reduce")
             for src in range(p) for dst in range(p) if dst != src]]


def two_shot_schedule(p: int) -> list[list[Transfer]]:
    """A two-shot all-reduce: a direct reduce-scatter, then a direct all-gather.

    Step 0: every rank sends chunk ``c`` of its tensor straight to rank ``c``, which adds the
    ``p`` copies of its chunk. Step 1: every rank sends its finished chunk straight to every
    other rank, which copies it. Two steps, and ``2 (p - 1) / p * n`` bytes per rank: the
    ring's volume in 2 steps instead of ``2 (p - 1)``, paid for with ``p - 1`` messages in
    flight per rank at once (every pair of ranks needs a link).
    """
    _check_world_size(p)
    if p == 1:
        return []
    pairs = [(src, dst) for src in range(p) for dst in range(p) if dst != src]
    return [[Transfer(0, "reduce-scatter", src, dst, dst, "reduce") for src, dst in pairs],
            [Transfer(1, "all-gather", src, dst, src, "copy") for src, dst in pairs]]


def bytes_sent(schedule: list[list[Transfer]], n: int, p: int, element_size: int) -> list[int]:
    """Bytes each rank sends when running ``schedule`` on ``n`` elements of ``element_size`` bytes.

    A ring or two-shot transfer carries one chunk (:func:`chunk_bounds`); a broadcast or
    one-shot transfer (phase in ``WHOLE_TENSOR_PHASES``) carries the whole tensor.
    """
    bounds = chunk_bounds(n, p)
    check_int("element_size", element_size, low=1, why="bytes per element")
    sent = [0] * p
    for step in schedule:
        for t in step:
            elements = n if t.phase in WHOLE_TENSOR_PHASES else bounds[t.chunk][1] - bounds[t.chunk][0]
            sent[t.src] += elements * element_size
    return sent


def simulate_ring(p: int, kind: str = "all_reduce") -> list[list[list[frozenset]]]:
    """What each rank holds after each step, without any tensors.

    ``states[s][r][c]`` is the set of ranks whose contribution rank ``r``'s copy of
    chunk ``c`` contains after ``s`` steps (``states[0]`` is the start). A correct
    all-reduce ends with every set equal to all ranks. The visualiser colours chunks
    by the size of these sets.
    """
    steps = ring_schedule(p, kind)
    if kind == "all_gather":   # rank r starts owning only its own chunk, complete
        state = [[frozenset(range(p)) if c == r else frozenset() for c in range(p)] for r in range(p)]
    else:
        state = [[frozenset({r}) for _ in range(p)] for r in range(p)]
    states = [state]
    for step in steps:
        new = [list(row) for row in state]
        for t in step:   # every transfer of a step reads the state from before the step
            sent = state[t.src][t.chunk]
            new[t.dst][t.chunk] = new[t.dst][t.chunk] | sent if t.op == "reduce" else sent
        state = new
        states.append(state)
    return states
