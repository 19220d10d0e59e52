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
tree broadcast      ``ceil(log2 p)``            ``n`` per child (root: ``ceil(log2 p) n``)
==================  ==========================  ==========================

(``n`` in bytes; exact when ``p`` divides the element count, see
:mod:`~lessons_lib.comm.schedule` for uneven sizes.) Inputs are checked on every rank
after one tiny metadata exchange, so a rank with a wrong size, dtype or layout makes
*every* rank raise the same clear error instead of leaving the others waiting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .schedule import Transfer, chunk_bounds, ring_schedule, tree_broadcast_schedule

# dtypes gloo and NCCL can sum; bool is excluded on purpose (summing truth values is not addition).
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                    torch.int8, torch.uint8, torch.int32, torch.int64)


def _group_ranks(group) -> tuple[int, int, list[int]]:
    """(my rank in ``group``, group size, global rank of each group member)."""
    if not dist.is_initialized():
        raise RuntimeError("no process group: call this inside run_distributed (or after init_process_group)")
    group = group if group is not None else dist.group.WORLD
    me = dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group)
    if me < 0:
        raise ValueError(f"group does not contain the calling rank (global rank {dist.get_rank()}): "
                         f"its ranks are {ranks}; call the collective only on members of group")
    return me, len(ranks), ranks


def _describe(name: str, t) -> list[int]:
    """This rank's view of ``t`` as integers: is_tensor, dtype code, contiguous, numel."""
    if not isinstance(t, torch.Tensor):
        return [0, -1, 1, 0]
    code = SUPPORTED_DTYPES.index(t.dtype) if t.dtype in SUPPORTED_DTYPES else -1
    return [1, code, int(t.is_contiguous()), t.numel()]


def check_inputs(tensors: dict, group=None, *, same_numel: tuple = (), chunk_of: tuple | None = None) -> None:
    """Check the named tensors on every rank of ``group``; raise the same error everywhere.

    ``same_numel`` names tensors that must have one size on all ranks; ``chunk_of``
    is ``(chunk_name, full_name)``: ``chunk_name`` must hold this rank's chunk of
    ``full_name``. One all-gather of a few integers per call: cheap next to any payload.
    """
    me, p, ranks = _group_ranks(group)
    names = list(tensors)
    mine = torch.tensor([v for name in names for v in _describe(name, tensors[name])], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(p)]
    dist.all_gather(everyone, mine, group=group)
    info = {(r, name): everyone[r][4 * i: 4 * i + 4].tolist() for r in range(p) for i, name in enumerate(names)}
    for name in names:
        for r in range(p):
            is_tensor, code, contiguous, _ = info[(r, name)]
            where = f"{name} on rank {ranks[r]}"
            if not is_tensor:
                raise TypeError(f"{where} is not a torch.Tensor")
            if code < 0:
                raise TypeError(f"{where} has an unsupported dtype; choose one of "
                                f"{[str(d).replace('torch.', '') for d in SUPPORTED_DTYPES]}")
            if not contiguous:
                raise ValueError(f"{where} is not contiguous (a transposed or strided view): "
                                 f"pass {name}.contiguous()")
        codes = {info[(r, name)][1] for r in range(p)}
        if len(codes) > 1:
            found = {ranks[r]: str(SUPPORTED_DTYPES[info[(r, name)][1]]).replace("torch.", "") for r in range(p)}
            raise TypeError(f"{name} has different dtypes across ranks {found}: every rank must pass the same dtype")
    for name in same_numel:
        sizes = [info[(r, name)][3] for r in range(p)]
        if len(set(sizes)) > 1:
            raise ValueError(f"{name} has a different number of elements on different ranks "
                             f"{dict(zip(ranks, sizes))}: every rank must pass the same size")
    if chunk_of:
        chunk_name, full_name = chunk_of
        for r in range(p):
            start, stop = chunk_bounds(info[(r, full_name)][3], p)[r]
            if info[(r, chunk_name)][3] != stop - start:
                raise ValueError(f"{chunk_name} on rank {ranks[r]} has {info[(r, chunk_name)][3]} elements; "
                                 f"rank {r} of {p} owns chunk {r} of {full_name}, which has "
                                 f"{stop - start} (chunks are sized like torch.tensor_split)")
        dtypes = {info[(r, name)][1] for r in range(p) for name in (chunk_name, full_name)}
        if len(dtypes) > 1:
            raise TypeError(f"{chunk_name} and {full_name} must have the same dtype")


def run_ring(flat: torch.Tensor, steps: list[list[Transfer]], group=None) -> int:
    """Execute a ring schedule in place on the 1-D ``flat``; return bytes this rank sent.

    At each step this rank posts its send and its receive together (``isend`` and
    ``irecv``) and waits for both: if every rank did a blocking ``send`` first, each
    would wait for a receive that its neighbour has not posted yet (see
    :mod:`lessons_lib.comm.deadlock`).
    """
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
        check_inputs({"tensor": tensor}, group, same_numel=("tensor",))
    _, p, _ = _group_ranks(group)
    return run_ring(tensor.view(-1), ring_schedule(p, "all_reduce"), group)


def ring_reduce_scatter(output: torch.Tensor, input: torch.Tensor, group=None) -> int:
    """Rank ``r`` receives chunk ``r`` of the sum of every rank's ``input`` (``reduce_scatter_tensor``).

    ``input`` is left unchanged. Chunks are sized like ``torch.tensor_split``, so
    ``input`` need not divide evenly; ``output`` must have this rank's chunk size.
    """
    check_inputs({"output": output, "input": input}, group, same_numel=("input",),
                 chunk_of=("output", "input"))
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
                 chunk_of=("input", "output"))
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
    check_inputs({"tensor": tensor}, group, same_numel=("tensor",))
    me, p, ranks = _group_ranks(group)
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < p:
        raise ValueError(f"src must be a rank of the group, 0..{p - 1}, got {src!r}")
    sent = 0
    for round_ in tree_broadcast_schedule(p, src):
        for t in round_:
            if t.src == me:
                dist.send(tensor, ranks[t.dst], group=group)
                sent += tensor.numel() * tensor.element_size()
            elif t.dst == me:
                dist.recv(tensor, ranks[t.src], group=group)
    return sent
