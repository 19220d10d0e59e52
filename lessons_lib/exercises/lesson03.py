"""Checkers for notebook 03 (communication).

- ``03.ring_bytes`` (predict): the most bytes one rank sends in a ring all-reduce of a size the
  ranks do not divide, measured on four real ranks with the library's ring;
- ``03.recursive_doubling`` (build): an all-reduce by recursive doubling from send/recv, for a
  number of ranks that need not be a power of two, returning the bytes each rank sent;
- ``03.kv_rotation`` (stretch): ring attention's rotation of KV blocks, given as code that
  deadlocks (and hides a second bug), to be fixed.

All-reduce results are decoded rather than only compared: rank ``r`` contributes
``16**r * (i + 1)`` to element ``i``, so the base-16 digits of a result say how many times
each rank's tensor was counted, and the hint can name the rank that is missing or doubled.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist

from ..comm import (bytes_sent, one_shot_all_reduce, ring_all_reduce, ring_schedule, run_direct, run_ring,
                    simulate_ring, tree_broadcast, two_shot_all_reduce)
from ..launch import run_distributed
from .check import (Incorrect, exercise, labelled_cases, predicted_number, raise_if_stub,
                    recording_collectives, refuse_reference, run_ranks, with_hidden)

def _refuse_collectives(used_by_rank: list, case: str, what: str) -> None:
    used = sorted({name for names in used_by_rank for name in names})
    if used:
        raise Incorrect(f"{case}: your code calls dist.{', dist.'.join(used)}; {what} is to be built "
                        f"from point-to-point messages only (send/recv, isend/irecv, batch_isend_irecv)")


# -- 03.ring_bytes (predict) ------------------------------------------------------------------
RING_P, RING_N = 4, 10     # chunks of 3, 3, 2, 2 float32 elements
_measured: dict = {}


def _ring_bytes_on_rank(n: int) -> int:
    return ring_all_reduce(torch.zeros(n, dtype=torch.float32))


def measured_ring_bytes() -> list[int]:
    """Bytes each of 4 real ranks sends in the library's ring all-reduce of 10 float32 elements."""
    if "ring" not in _measured:
        _measured["ring"] = run_distributed(_ring_bytes_on_rank, RING_P, RING_N, timeout=60)
    return _measured["ring"]


@exercise("03.ring_bytes", "predict: the most bytes any one rank sends in a ring all-reduce (p=4, n=10)")
def check_ring_bytes(candidate):
    refuse_reference(candidate, bytes_sent, ring_schedule, simulate_ring, ring_all_reduce, run_ring,
                     run_distributed, measured_ring_bytes)
    guess = predicted_number(candidate, "predicted_busiest_rank_bytes")
    sent = measured_ring_bytes()
    most, busiest = max(sent), sent.index(max(sent))
    if guess == most:
        return (f"measured on 4 ranks: {sent} bytes; rank {busiest} sends the most, {most} "
                f"(exactly as predicted)")
    p, n, size = RING_P, RING_N, 4
    average = 2 * (p - 1) * n * size // p
    told = f"you predicted {guess:g} bytes; measured on 4 ranks the busiest rank (rank {busiest}) sends {most}"
    known = {
        average: "that is the average 2(p-1)/p · n · 4: right when p divides n, but 10 elements make "
                 "chunks of 3, 3, 2, 2, and a rank sends every chunk but one in each phase",
        min(sent): "that is the fewest any rank sends (rank "
                   f"{sent.index(min(sent))}); the question asks for the busiest rank",
        2 * (p - 1) * 3 * size: "that counts every chunk as 3 elements (rounded up); "
                                "torch.tensor_split sizes are 3, 3, 2, 2",
        2 * (p - 1) * 2 * size: "that counts every chunk as 2 elements (rounded down); "
                                "torch.tensor_split sizes are 3, 3, 2, 2",
        most // 2: "that is one phase only: the ring sends p-1 chunks in reduce-scatter and p-1 "
                   "more in all-gather",
        most // size: "that is elements, not bytes: a float32 element is 4 bytes",
        most * 8: "that is bits, not bytes",
        2 * n * size: "that sends every chunk in both phases (p steps each): a phase has p-1 steps, "
                      "so each rank skips one chunk per phase",
        2 * (p - 1) * n * size: "that is the total over all 4 ranks, not one rank's share",
        n * size: "that is the tensor once; an all-reduce moves it twice (reduce-scatter, then all-gather)",
    }
    if guess in known:
        raise Incorrect(f"{told}: {known[guess]}.")
    direction = "too low" if guess < most else "too high"
    raise Incorrect(f"{told}: {direction}. In reduce-scatter rank r sends every chunk except chunk r, "
                    f"in all-gather every chunk except chunk (r+1) % p; chunks are sized like "
                    f"torch.tensor_split.")


# -- 03.recursive_doubling (build) -------------------------------------------------------------
DOUBLING_CASES = [(3, 5, torch.float32), (4, 5, torch.float32), (4, 3, torch.float64),
                  (3, 1, torch.float32), (4, 0, torch.float32)]
# Grading only: two extra ranks (p=6 = 4 + 2), one case per dtype.
DOUBLING_HIDDEN = [(6, 7, torch.float32), (6, 2, torch.float64)]


def contribution_input(rank: int, n: int, dtype) -> torch.Tensor:
    """Rank ``rank``'s input: element ``i`` is ``16**rank * (i + 1)`` (exact in float32 up to 6 ranks of 15 elements)."""
    return torch.arange(1, n + 1, dtype=dtype) * 16 ** rank


def contributions(value: float, index: int, p: int) -> list[int] | None:
    """How many times each rank's input is counted in element ``index``, or None if it is no such sum."""
    scaled = value / (index + 1)
    if not math.isfinite(scaled) or scaled < 0 or scaled != int(scaled):
        return None
    whole, digits = int(scaled), []
    for _ in range(p):
        whole, digit = divmod(whole, 16)
        digits.append(digit)
    return digits if whole == 0 else None


def doubling_bytes(p: int, n: int, element_size: int) -> list[int]:
    """Bytes each rank sends in the recursive-doubling all-reduce described in the exercise."""
    q = 1 << (p.bit_length() - 1)          # the largest power of two <= p
    rounds = q.bit_length() - 1
    whole = n * element_size
    return [whole if r >= q else (rounds + (r + q < p)) * whole for r in range(p)]


def _doubling_on_rank(candidate, n, dtype):
    rank = dist.get_rank()
    tensor = contribution_input(rank, n, dtype)
    returned, used = recording_collectives(lambda: candidate(tensor))
    return tensor, returned, used


def _names(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _diagnose_sum(p: int, n: int, rank: int, got: torch.Tensor, case: str) -> str | None:
    """A hint for a wrong all-reduce result on ``rank``, or None if it is the sum."""
    q = 1 << (p.bit_length() - 1)
    want = sum(contribution_input(r, n, got.dtype) for r in range(p))
    if torch.equal(got, want):
        return None
    head = f"{case}: rank {rank} holds {got.tolist()}, expected the sum {want.tolist()}"
    if torch.allclose(got * p, want):
        return f"{head}: the sum divided by p. An all-reduce here sums (ReduceOp.SUM); it does not average."
    counts = [contributions(float(v), i, p) for i, v in enumerate(got.tolist())]
    if any(c is None for c in counts) or any(c != counts[0] for c in counts):
        return (f"{head}: the elements are not a sum of whole input tensors. Are you adding into "
                f"a slice, or mixing up positions?")
    count = counts[0]
    if count == [int(r == rank) for r in range(p)]:
        if rank >= q:
            return (f"{head}: that is its own input, unchanged. Rank {rank} is an extra rank (p={p} is not "
                    f"a power of two): after the exchanges rank {rank - q} must send it the finished sum, "
                    f"which it receives into its tensor (dist.recv(tensor, {rank - q}) writes in place).")
        return (f"{head}: that is its own input, unchanged. Write the result into the tensor you were "
                f"given (tensor += other, tensor.copy_(...)): rebinding the name `tensor = tensor + other` "
                f"leaves the caller's tensor as it was.")
    missing = [r for r in range(p) if count[r] == 0]
    doubled = [r for r in range(p) if count[r] > 1]
    parts = []
    if missing:
        parts.append(f"it lacks the input of {_names(missing)}")
    if doubled:
        parts.append(f"it counts {_names(doubled)} more than once")
    cause = ""
    if missing and all(r >= q for r in missing) and rank < q:
        cause = (f" p={p} is not a power of two: first fold each extra rank r >= {q} into rank "
                 f"r - {q} (it sends its tensor, that rank adds it), then exchange among ranks 0..{q - 1}.")
    elif missing and rank >= q:
        cause = (f" Rank {rank} is an extra rank (p={p} > {q}): after the exchanges rank "
                 f"{rank - q} must send it the finished sum, which it copies.")
    elif missing:
        cause = (f" In round k rank r exchanges its whole partial sum with partner r XOR 2**k "
                 f"(k = 0 .. log2({q}) - 1); a missing round or a wrong partner loses inputs.")
    elif doubled:
        cause = (" Does a rank add a partner's partial sum that already contains its own input, "
                 "or add the extra rank's tensor on more than one rank?")
    return f"{head}: {' and '.join(parts)}.{cause}"


def _diagnose_bytes(p, n, dtype, reported, case) -> str | None:
    size = torch.empty(0, dtype=dtype).element_size()
    want = doubling_bytes(p, n, size)
    q = 1 << (p.bit_length() - 1)
    for rank, (got, exp) in enumerate(zip(reported, want)):
        if isinstance(got, bool) or not isinstance(got, numbers.Integral):
            return (f"{case}: rank {rank} returned {got!r}; return the number of bytes this rank "
                    f"sent, an int (numel x element_size of every tensor it sent)")
        if got == exp:
            continue
        head = f"{case}: rank {rank} reported {got} bytes sent, it sends {exp}"
        if exp and got * size == exp:
            return f"{head}: that counts elements; bytes are numel x tensor.element_size() ({size} here)."
        if exp and got == exp * 8:
            return f"{head}: that counts bits; count bytes."
        if exp and size == 8 and got * 2 == exp:
            return (f"{head}: that assumes 4 bytes per element, but this tensor is {dtype} "
                    f"({size} bytes each): use tensor.element_size().")
        ring = 2 * (p - 1) * n * size // p
        if got == ring and ring != exp:
            return (f"{head}: that is the ring's 2(p-1)/p · n count; recursive doubling sends the "
                    f"whole tensor in every message.")
        role = (f"rank {rank} is an extra rank: it sends its tensor once, to rank {rank - q}"
                if rank >= q else
                f"rank {rank} sends its whole tensor in each of the log2({q}) = {q.bit_length() - 1} "
                f"rounds" + (f", and once more to extra rank {rank + q}" if rank + q < p else ""))
        return f"{head}: {role}."
    return None


@exercise("03.recursive_doubling", "build: an all-reduce by recursive doubling from send/recv")
def check_recursive_doubling(candidate, hidden=False):
    refuse_reference(candidate, ring_all_reduce, run_ring, tree_broadcast, doubling_bytes,
                     one_shot_all_reduce, two_shot_all_reduce, run_direct)
    raise_if_stub(candidate)
    for label, (p, n, dtype) in labelled_cases(DOUBLING_CASES, DOUBLING_HIDDEN, hidden):
        kind = str(dtype).replace("torch.", "")
        case = f"{label}p={p}, n={n} {kind}"
        results = run_ranks(_doubling_on_rank, p, candidate, n, dtype, what=case)
        _refuse_collectives([used for _, _, used in results], case, "the all-reduce")
        for rank, (got, _, _) in enumerate(results):
            if got.dtype != dtype or got.shape != (n,):
                raise Incorrect(f"{case}: rank {rank}'s tensor became {got.dtype} of shape {tuple(got.shape)}; "
                                f"sum in place, keeping dtype and shape")
            hint = _diagnose_sum(p, n, rank, got, case)
            if hint:
                raise Incorrect(hint)
        hint = _diagnose_bytes(p, n, dtype, [sent for _, sent, _ in results], case)
        if hint:
            raise Incorrect(hint)
    return with_hidden("equal to the sum on every rank at p = 3 (an extra rank) and 4, for 5, 3, 1 and 0 "
                       "elements, float32 and float64, with exact byte counts", DOUBLING_HIDDEN, hidden)


# -- 03.kv_rotation (stretch) ------------------------------------------------------------------
ROTATION_CASES = [(3, (2, 3), torch.float32), (4, (1, 2), torch.float64), (4, (0, 2), torch.float32)]


def kv_block(rank: int, shape, dtype) -> torch.Tensor:
    """Rank ``rank``'s KV block: ``1000 * (rank + 1)`` plus the element's position, so every block differs."""
    numel = 1
    for s in shape:
        numel *= s
    return (torch.arange(numel, dtype=dtype) + 1000 * (rank + 1)).reshape(shape)


def _rotation_on_rank(candidate, shape, dtype):
    rank = dist.get_rank()
    out, used = recording_collectives(lambda: candidate(kv_block(rank, shape, dtype)))
    # Anything but a tensor comes back as its type's name: the hint needs no more.
    return (out if isinstance(out, torch.Tensor) else type(out).__name__), used


def _whose(block: torch.Tensor, p: int, shape, dtype) -> int | str:
    if not block.numel() or bool((block == 0).all()):
        return "nothing"
    for k in range(p):
        if torch.equal(block, kv_block(k, shape, dtype)):
            return k
    return "none of the blocks"


def _diagnose_rotation(p, shape, dtype, rank, out, case) -> str | None:
    want_shape = (p, *shape)
    if not isinstance(out, torch.Tensor):
        return (f"{case}: rank {rank} returned a {out}; return one tensor of shape "
                f"{want_shape}: position j holds rank j's block (torch.stack of the blocks in rank order)")
    if tuple(out.shape) != want_shape:
        return (f"{case}: rank {rank} returned shape {tuple(out.shape)}, expected {want_shape}: "
                f"one block per rank, stacked along a new first dimension")
    if out.dtype != dtype:
        return (f"{case}: rank {rank} returned {out.dtype}, the blocks are {dtype}: allocate the "
                f"result with dtype=block.dtype")
    held = [_whose(out[j], p, shape, dtype) for j in range(p)]
    for j, k in enumerate(held):
        if k == j or (k == "nothing" and out[j].numel() == 0):
            continue
        what = k if isinstance(k, str) else f"rank {k}'s block"
        head = f"{case}: on rank {rank}, position {j} should hold rank {j}'s block but holds {what}"
        if j == rank:
            cause = ("its own block was overwritten: at step s (s = 0 .. p-2) the block that "
                     "arrives started on rank (rank - s - 1) % p, one further back than (rank - s) % p")
        elif isinstance(k, int) and held.count(k) > 1:
            cause = (f"rank {k}'s block was stored twice: at each step forward the block you just "
                     f"received, not your own, so the next rank gets a new one")
        elif isinstance(k, int) and k == (j - 1) % p:
            cause = ("the blocks are stored one position off: the block received at step s started "
                     "on rank (rank - s - 1) % p")
        elif k == "nothing":
            cause = "it was never filled: every rank must receive p - 1 blocks, one per step"
        else:
            cause = "each step passes one block from rank r to rank (r + 1) % p"
        return f"{head}; {cause}."
    return None


@exercise("03.kv_rotation", "stretch: fix the ring rotation of KV blocks (it deadlocks)")
def check_kv_rotation(candidate):
    raise_if_stub(candidate)
    for p, shape, dtype in ROTATION_CASES:
        case = f"p={p}, blocks of shape {shape} {str(dtype).replace('torch.', '')}"
        results = run_ranks(_rotation_on_rank, p, candidate, shape, dtype, what=case)
        _refuse_collectives([used for _, used in results], case, "the rotation")
        for rank, (out, _) in enumerate(results):
            hint = _diagnose_rotation(p, shape, dtype, rank, out, case)
            if hint:
                raise Incorrect(hint)
    return "every rank gathers every block in rank order at p = 3 and 4, empty blocks included, without deadlock"
