"""Collectives built from point-to-point messages, each counting the bytes it sends.

``torch.distributed`` gives every rank ``send``/``recv`` (blocking) and
``isend``/``irecv`` (non-blocking, returning a work handle). Everything else,
all-reduce included, can be built from them. These functions do exactly that,
running the schedules of :mod:`lessons_lib.comm.schedule`, and return the number
of payload bytes this rank sent, so the volume formulas can be checked rather than
believed:

==================  ==========================  ==========================
collective          steps                       bytes sent per rank
==================  ==========================  ==========================
ring all-reduce     ``2 (p - 1)``               ``2 (p - 1) / p * n``
ring reduce-scatter ``p - 1``                   ``(p - 1) / p * n``
ring all-gather     ``p - 1``                   ``(p - 1) / p * n``
one-shot all-reduce ``1``                       ``(p - 1) n``
two-shot all-reduce ``2``                       ``2 (p - 1) / p * n``
tree broadcast      ``ceil(log2 p)``            ``n`` per child (root: ``ceil(log2 p) n``)
==================  ==========================  ==========================

(``n`` in bytes; exact when ``p`` divides the element count, see
:mod:`~lessons_lib.comm.schedule` for uneven sizes.) Inputs are checked on every rank
after one tiny metadata exchange (:mod:`~lessons_lib.comm.agree`), so a rank with a wrong
size, dtype, layout or root makes *every* rank raise the same clear error instead of
leaving the others waiting.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..validate import BadArgument, check_int, check_tensor
from .agree import describe, gather_across_ranks, require_same
from .agree import group_ranks as _group_ranks
from .schedule import (WHOLE_TENSOR_PHASES, Transfer, chunk_bounds, one_shot_schedule, ring_schedule,
                       tree_broadcast_schedule, two_shot_schedule)

# dtypes gloo and NCCL can sum; bool is excluded on purpose (summing truth values is not addition).
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                    torch.int8, torch.uint8, torch.int32, torch.int64)


def check_inputs(tensors: dict, group=None, *, same_numel: tuple = (), chunk_of: tuple | None = None,
                 same: dict | None = None, call: str = "check_inputs", dtypes=SUPPORTED_DTYPES,
                 contiguous: bool = True, min_dim: int = 0, hint: str = "") -> list[dict]:
    """Check the named tensors, and the values in ``same``, on every rank of ``group``; raise the
    same error everywhere.

    Each tensor must be a ``torch.Tensor`` on every rank, with at least ``min_dim`` dimensions, a
    dtype of ``dtypes`` (None: any) and, with ``contiguous``, a contiguous layout; its dtype must
    be the same on every rank. ``same_numel`` names tensors that must have one size on all ranks;
    ``chunk_of`` is ``(chunk_name, full_name)``: ``chunk_name`` must hold this rank's chunk of
    ``full_name``. ``same`` holds other arguments that must agree (a broadcast's ``src``); ``hint``
    ends their error message. One all-gather of a small record per call (see :mod:`.agree`).
    Returns every rank's view (``describe`` values, by group rank) for callers that need it.
    """
    values = {k: v for name, t in tensors.items() for k, v in describe(name, t).items()}
    values.update(same or {})
    ranks, everyone = gather_across_ranks(values, group, call=call)
    p = len(ranks)
    for name in tensors:
        for r, seen in enumerate(everyone):
            where = f"{name} on rank {ranks[r]}"
            if seen[name] != "Tensor":
                raise BadArgument(f"{where} is not valid: expected a torch.Tensor (got a {seen[name]})")
            if len(seen[f"{name}.shape"]) < min_dim:
                raise BadArgument(f"{where} is not valid: expected a tensor with at least {min_dim} "
                                  f"dimension(s) (got shape {seen[f'{name}.shape']})")
            if dtypes is not None and seen[f"{name}.dtype"] not in dtypes:
                raise BadArgument(f"{where} has an unsupported dtype {seen[f'{name}.dtype']}; choose one of "
                                  f"{[str(d).replace('torch.', '') for d in dtypes]}")
            if contiguous and not seen[f"{name}.is_contiguous()"]:
                raise BadArgument(f"{where} is not contiguous (a transposed or strided view): "
                                  f"pass {name}.contiguous()")
        require_same(f"{name}.dtype", [seen[f"{name}.dtype"] for seen in everyone], ranks)
    for name in same_numel:
        require_same(f"{name}.numel()", [math.prod(seen[f"{name}.shape"]) for seen in everyone], ranks)
    if chunk_of:
        chunk_name, full_name = chunk_of
        for r, seen in enumerate(everyone):
            start, stop = chunk_bounds(math.prod(seen[f"{full_name}.shape"]), p)[r]
            have = math.prod(seen[f"{chunk_name}.shape"])
            if have != stop - start:
                raise BadArgument(f"{chunk_name} on rank {ranks[r]} has {have} elements; "
                                  f"rank {r} of {p} owns chunk {r} of {full_name}, which has "
                                  f"{stop - start} (chunks are sized like torch.tensor_split)")
            if seen[f"{chunk_name}.dtype"] != seen[f"{full_name}.dtype"]:
                raise BadArgument(f"{chunk_name} and {full_name} must have the same dtype, "
                                  f"got {seen[f'{chunk_name}.dtype']} and {seen[f'{full_name}.dtype']}")
    for name in same or {}:
        require_same(name, [seen[name] for seen in everyone], ranks, hint)
    return everyone


def run_ring(flat: torch.Tensor, steps: list[list[Transfer]], group=None) -> int:
    """Execute a ring schedule in place on the 1-D ``flat``; return bytes this rank sent.

    At each step this rank posts its send and its receive together (``isend`` and
    ``irecv``) and waits for both: if every rank did a blocking ``send`` first, each
    would wait for a receive that its neighbour has not posted yet (see
    :mod:`lessons_lib.comm.deadlock`).
    """
    check_tensor("flat", flat, min_dim=1)
    me, p, ranks = _group_ranks(group)
    bounds = chunk_bounds(flat.numel(), p)
    largest = max(stop - start for start, stop in bounds) if bounds else 0
    buffer = torch.empty(largest, dtype=flat.dtype, device=flat.device)
    sent = 0
    for step in steps:
        out = next(t for t in step if t.src == me)
        inc = next(t for t in step if t.dst == me)
        s0, s1 = bounds[out.chunk]
        r0, r1 = bounds[inc.chunk]
        works = []
        if s1 > s0:   # an empty chunk (fewer elements than ranks) is skipped by both ends
            works.append(dist.isend(flat[s0:s1], ranks[out.dst], group=group))
            sent += (s1 - s0) * flat.element_size()
        # A copied chunk lands in place; a reduced one needs a buffer to add from. (The chunk
        # received is never the one being sent in the same step, so landing in place is safe.)
        target = buffer[: r1 - r0] if inc.op == "reduce" else flat[r0:r1]
        if r1 > r0:
            works.append(dist.irecv(target, ranks[inc.src], group=group))
        for work in works:
            work.wait()
        if r1 > r0 and inc.op == "reduce":
            flat[r0:r1] += target
    return sent


def ring_all_reduce(tensor: torch.Tensor, group=None, *, check: bool = True) -> int:
    """Sum ``tensor`` over the ranks of ``group``, in place, like ``dist.all_reduce``.

    Reduce-scatter then all-gather on a ring. Returns the bytes this rank sent:
    ``2 (p - 1) / p`` of the tensor's bytes when ``p`` divides its element count.
    ``check=False`` skips the input check (one tiny all-gather) for benchmarking.
    """
    if check:
        check_inputs({"tensor": tensor}, group, same_numel=("tensor",), call="ring_all_reduce")
    _, p, _ = _group_ranks(group)
    return run_ring(tensor.view(-1), ring_schedule(p, "all_reduce"), group)


def run_direct(flat: torch.Tensor, steps: list[list[Transfer]], group=None) -> int:
    """Execute a direct schedule (one-shot, two-shot) in place on the 1-D ``flat``; return bytes sent.

    In a direct schedule a rank talks to every other rank in the same step, not only to its
    ring neighbours. It posts all its sends and receives of a step at once and waits for all
    of them, so no order of posting can deadlock. Received copies of a chunk that is reduced
    are added in rank order 0, 1, ..., p - 1, the same order on every rank, so every rank
    ends with bitwise the same floats (vLLM's one-shot kernel keeps the order fixed for the
    same reason).
    """
    check_tensor("flat", flat, min_dim=1)
    me, p, ranks = _group_ranks(group)
    bounds = chunk_bounds(flat.numel(), p)
    sent = 0
    for step in steps:
        works, received = [], {}
        for t in step:
            start, stop = (0, flat.numel()) if t.phase in WHOLE_TENSOR_PHASES else bounds[t.chunk]
            if stop <= start:   # an empty chunk (fewer elements than ranks) is skipped by both ends
                continue
            if t.src == me:
                works.append(dist.isend(flat[start:stop], ranks[t.dst], group=group))
                sent += (stop - start) * flat.element_size()
            elif t.dst == me and t.op == "reduce":
                buffer = torch.empty(stop - start, dtype=flat.dtype, device=flat.device)
                received.setdefault((start, stop), {})[t.src] = buffer
                works.append(dist.irecv(buffer, ranks[t.src], group=group))
            elif t.dst == me:
                works.append(dist.irecv(flat[start:stop], ranks[t.src], group=group))
        for work in works:
            work.wait()
        # Only now, with every send of the step complete, may the chunks sent be overwritten.
        for (start, stop), copies in received.items():
            copies[me] = flat[start:stop]
            total = copies[0].clone()
            for r in range(1, p):
                total += copies[r]
            flat[start:stop].copy_(total)
    return sent


def one_shot_all_reduce(tensor: torch.Tensor, group=None, *, check: bool = True) -> int:
    """Sum ``tensor`` over the ranks of ``group``, in place, in one step (``dist.all_reduce``'s result).

    Every rank sends its whole tensor to every other rank and adds the ``p`` tensors itself:
    one message latency, ``(p - 1) n`` bytes sent per rank. The choice for small, latency-bound
    messages. ``check=False`` skips the input check (one tiny all-gather) for benchmarking.
    """
    if check:
        check_inputs({"tensor": tensor}, group, same_numel=("tensor",), call="one_shot_all_reduce")
    _, p, _ = _group_ranks(group)
    return run_direct(tensor.view(-1), one_shot_schedule(p), group)


def two_shot_all_reduce(tensor: torch.Tensor, group=None, *, check: bool = True) -> int:
    """Sum ``tensor`` over the ranks of ``group``, in place, in two steps (``dist.all_reduce``'s result).

    A direct reduce-scatter (rank ``c`` receives chunk ``c`` from every rank and adds them),
    then a direct all-gather (each rank sends its summed chunk to every rank): two message
    latencies and the ring's ``2 (p - 1) / p * n`` bytes per rank. Chunks are sized like
    ``torch.tensor_split``, so any size works. ``check=False`` skips the input check.
    """
    if check:
        check_inputs({"tensor": tensor}, group, same_numel=("tensor",), call="two_shot_all_reduce")
    _, p, _ = _group_ranks(group)
    return run_direct(tensor.view(-1), two_shot_schedule(p), group)


def ring_reduce_scatter(output: torch.Tensor, input: torch.Tensor, group=None) -> int:
    """Rank ``r`` receives chunk ``r`` of the sum of every rank's ``input`` (``reduce_scatter_tensor``).

    ``input`` is left unchanged. Chunks are sized like ``torch.tensor_split``, so
    ``input`` need not divide evenly; ``output`` must have this rank's chunk size.
    """
    check_inputs({"output": output, "input": input}, group, same_numel=("input",),
                 chunk_of=("output", "input"), call="ring_reduce_scatter")
    me, p, _ = _group_ranks(group)
    work = input.reshape(-1).clone()
    sent = run_ring(work, ring_schedule(p, "reduce_scatter"), group)
    start, stop = chunk_bounds(work.numel(), p)[me]
    output.view(-1).copy_(work[start:stop])
    return sent


def ring_all_gather(output: torch.Tensor, input: torch.Tensor, group=None) -> int:
    """Concatenate every rank's ``input`` into ``output`` in rank order (``all_gather_into_tensor``).

    Rank ``r``'s ``input`` is chunk ``r`` of ``output``; chunks may be uneven
    (``torch.tensor_split`` sizes), which torch's gloo all-gather does not allow.
    """
    check_inputs({"output": output, "input": input}, group, same_numel=("output",),
                 chunk_of=("input", "output"), call="ring_all_gather")
    me, p, _ = _group_ranks(group)
    flat = output.view(-1)
    start, stop = chunk_bounds(flat.numel(), p)[me]
    flat[start:stop].copy_(input.reshape(-1))
    return run_ring(flat, ring_schedule(p, "all_gather"), group)


def tree_broadcast(tensor: torch.Tensor, src: int = 0, group=None) -> int:
    """Copy ``tensor`` from rank ``src`` (a rank of ``group``) to every rank, like ``dist.broadcast``.

    Binomial tree: ``ceil(log2 p)`` rounds of blocking ``send``/``recv``; in each round
    a rank either sends, receives or idles, so no two ranks wait on each other.
    """
    # src travels with the tensor's metadata: ranks that each took themselves for the root would
    # all send and wait for ever.
    check_inputs({"tensor": tensor}, group, same_numel=("tensor",), same={"src": src}, call="tree_broadcast")
    me, p, ranks = _group_ranks(group)
    check_int("src", src, low=0, high=p - 1, why="a rank of the group")
    sent = 0
    for round_ in tree_broadcast_schedule(p, src):
        for t in round_:
            if t.src == me:
                dist.send(tensor, ranks[t.dst], group=group)
                sent += tensor.numel() * tensor.element_size()
            elif t.dst == me:
                dist.recv(tensor, ranks[t.src], group=group)
    return sent
