"""Checkers for notebook 00 (welcome): first collectives on real ranks.

Every check runs on 3 and 4 ranks, where work splits unevenly and a rank may hold nothing.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..launch import run_distributed
from .check import Incorrect, exercise, labelled_cases, refuse_reference, run_ranks, with_hidden

WORLD_SIZES = (3, 4)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# -- 00.sum_of_squares (warm-up) -------------------------------------------------------------
@exercise("00.sum_of_squares", "all-reduce the squares of the rank ids")
def check_sum_of_squares(candidate):
    for p in WORLD_SIZES:
        expected = sum(r * r for r in range(p))
        results = run_ranks(candidate, p, what=f"on {p} ranks")
        for rank, got in enumerate(results):
            if isinstance(got, bool) or not isinstance(got, int):
                raise Incorrect(f"on {p} ranks, rank {rank} returned {got!r} "
                                f"({type(got).__name__}); return a Python int, e.g. `t.item()`")
            if got == expected:
                continue
            squares = " + ".join(f"{r}²" for r in range(p))
            if got == sum(range(p)):
                cause = "that is the sum of the rank ids: square each rank's id before the all-reduce"
            elif got == rank * rank:
                cause = "that is this rank's own square: the ranks never combined (all_reduce)"
            elif got == max(r * r for r in range(p)):
                cause = "that is the largest square: all-reduce with ReduceOp.SUM, not MAX"
            else:
                cause = "did every rank contribute rank², and did you all-reduce with SUM?"
            raise Incorrect(f"on {p} ranks, rank {rank} returned {got}; expected {expected} = "
                            f"{squares}: {cause}")
    return "every rank holds the sum of squares on 3 and 4 ranks"


# -- 00.predict_gather_bytes -----------------------------------------------------------------
GATHER_RANKS, GATHER_ROWS, GATHER_VOCAB = 4, 3, 264


def _received_logits_bytes(rows: int, vocab: int) -> int:
    """On one rank: all-gather bfloat16 logits (rows, vocab) and count the bytes that came from
    the other ranks."""
    import torch.distributed as dist

    rank, p = dist.get_rank(), dist.get_world_size()
    logits = torch.full((rows, vocab), float(rank), dtype=torch.bfloat16)
    parts = [torch.empty_like(logits) for _ in range(p)]
    dist.all_gather(parts, logits)
    for r, part in enumerate(parts):   # the gather really delivered every rank's tensor
        if not torch.equal(part, torch.full_like(part, float(r))):
            raise RuntimeError(f"all_gather delivered wrong data for rank {r}")
    return sum(part.numel() * part.element_size() for r, part in enumerate(parts) if r != rank)


@exercise("00.predict_gather_bytes", "predict the bytes each rank receives in an all-gather")
def check_predict_gather_bytes(candidate):
    refuse_reference(candidate, run_distributed, run_ranks)
    got = candidate()
    if not _is_number(got):
        raise Incorrect(f"predicted_gather_bytes() returned {got!r}: return a number of bytes")
    p, rows, vocab = GATHER_RANKS, GATHER_ROWS, GATHER_VOCAB
    measured = run_ranks(_received_logits_bytes, p, rows, vocab, what=f"measuring on {p} ranks")
    if len(set(measured)) != 1:
        raise RuntimeError(f"ranks received different byte counts: {measured}")
    expected = measured[0]
    numel = rows * vocab
    size = numel * 2                                   # one rank's tensor, bfloat16
    case = (f"{p} ranks each all-gather bfloat16 logits of shape ({rows}, {vocab}); "
            f"measured {expected} bytes received per rank, you predicted {got:g}")
    if math.isclose(got, expected, abs_tol=0.5):
        return f"{case}: exactly right"
    mistakes = [
        (p * size, "you counted the rank's own tensor too: it receives one from each of the "
                   f"p - 1 = {p - 1} other ranks"),
        ((p - 1) * numel, "that is a count of elements, not bytes: a bfloat16 element is 2 bytes"),
        (p * numel, "that is every rank's elements, own included: count bytes (2 per bfloat16), "
                    "from the p - 1 other ranks only"),
        ((p - 1) * size * 8, "that is bits, not bytes"),
        ((p - 1) * numel * 4, "a bfloat16 element is 2 bytes, not 4 like float32"),
        (size, "that is one rank's tensor: every rank receives one from each of the other "
               f"{p - 1} ranks"),
        ((p - 1) * rows * 2, "you left out the vocabulary: each row holds one logit per token "
                             f"of the {vocab}-token vocabulary"),
    ]
    for value, cause in mistakes:
        if math.isclose(got, value, abs_tol=0.5):
            raise Incorrect(f"{case}: {cause}")
    raise Incorrect(f"{case}: count the other ranks (p - 1), times rows x vocab elements, "
                    f"times the bytes of one bfloat16 element")


# -- 00.mean_nll (build) ---------------------------------------------------------------------
# Per-rank token counts: uneven on 3 ranks; on 4 ranks fewer tokens than ranks, two ranks idle.
MEAN_CASES = ((3, (5, 2, 1)), (4, (2, 0, 1, 0)))
# Grading only: five ranks with rank 0 idle, and one token on every rank but the last.
MEAN_HIDDEN = ((5, (0, 3, 0, 7, 1)), (5, (1, 1, 1, 1, 0)))


def _losses(sizes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, generator=g) * 4 + 0.5).to(torch.float32) for n in sizes]


def _mean_on_rank(candidate, shards):
    import torch.distributed as dist

    return candidate(shards[dist.get_rank()].clone())


def _mean_mistakes(shards: list[torch.Tensor], rank: int) -> list[tuple[float, str]]:
    """Values a typical wrong answer returns on ``rank``, each with what went wrong."""
    p = len(shards)
    total = float(torch.cat(shards).sum())
    counts = [len(s) for s in shards]
    means = [float(s.mean()) for s in shards if len(s)]
    sizes = ", ".join(map(str, counts))
    out = []
    if len(shards[rank]):
        out.append((float(shards[rank].mean()),
                    f"that is the mean of rank {rank}'s own {counts[rank]} tokens only: the ranks "
                    "never combined their losses (all_reduce)"))
    out += [
        (sum(means) / p if len(means) == p else math.nan,
         f"that is the average of the per-rank means, but the ranks hold {sizes} tokens: every "
         "token must weigh the same, so all-reduce the sum of the losses and the count of "
         "tokens, then divide"),
        (total / p, f"you divided the total loss by the number of ranks ({p}), not by the number "
                    f"of tokens ({sum(counts)})"),
        (total, "that is the sum of all losses: divide by the number of tokens"),
    ]
    return out


@exercise("00.mean_nll", "the mean loss over every rank's tokens, on every rank")
def check_mean_nll(candidate, hidden=False):
    for seed, (label, (p, sizes)) in enumerate(labelled_cases(MEAN_CASES, MEAN_HIDDEN, hidden)):
        shards = _losses(sizes, seed)
        expected = float(torch.cat(shards).mean())
        what = f"{label}p={p}, tokens per rank {list(sizes)}"
        results = run_ranks(_mean_on_rank, p, candidate, shards, what=what)
        for rank, got in enumerate(results):
            if isinstance(got, torch.Tensor) and got.numel() == 1:
                raise Incorrect(f"{what}: rank {rank} returned a tensor ({got!r}); return a "
                                "Python float, e.g. `total.item()`")
            if not _is_number(got):
                raise Incorrect(f"{what}: rank {rank} returned {got!r}; return a Python float")
        right = [math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-6) for got in results]
        if all(right):
            continue
        rank = right.index(False)
        got = results[rank]
        case = f"{what}: rank {rank} returned {got:.6g}, expected {expected:.6g}"
        if math.isnan(got):
            idle = [r for r, n in enumerate(sizes) if n == 0]
            raise Incorrect(f"{case}. Rank(s) {idle} hold no tokens, and the mean of an empty "
                            "tensor is nan (0 / 0), which the all-reduce spreads to every rank: "
                            "contribute a sum of 0 and a count of 0 instead")
        if any(right):
            good = right.index(True)
            raise Incorrect(f"{case}, while rank {good} got it right: only some ranks hold the "
                            "result (dist.reduce leaves it on one rank); every rank needs it, "
                            "so all_reduce")
        for value, cause in _mean_mistakes(shards, rank):
            if math.isclose(got, value, rel_tol=1e-5, abs_tol=1e-6):
                raise Incorrect(f"{case}: {cause}")
        raise Incorrect(f"{case}. Each rank adds up its own losses and counts its tokens; "
                        "all-reduce both sums, then divide")
    return with_hidden("the mean over all tokens on 3 ranks (5, 2, 1 tokens) and on 4 ranks with two idle",
                       MEAN_HIDDEN, hidden)


# -- 00.collective_order (stretch) -----------------------------------------------------------
ORDER_CASES = ((3, ((7, 3), (12,), (5, 5, 1))), (4, ((4,), (), (9, 2), ())))


def _order_on_rank(candidate, lengths):
    import torch.distributed as dist

    return candidate(list(lengths[dist.get_rank()]))


def _pair(got):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return None
    longest, tokens = got
    if isinstance(longest, torch.Tensor) and longest.numel() == 1:
        longest = longest.item()
    if isinstance(tokens, torch.Tensor) and tokens.numel() == 1:
        tokens = tokens.item()
    if not (_is_number(longest) and _is_number(tokens)):
        return None
    return longest, tokens


@exercise("00.collective_order", "fix collectives that ranks call in different orders")
def check_collective_order(candidate):
    for p, lengths in ORDER_CASES:
        expected = (max(n for req in lengths for n in req), sum(n for req in lengths for n in req))
        what = f"p={p}, prompt lengths per rank {[list(x) for x in lengths]}"
        results = run_ranks(_order_on_rank, p, candidate, lengths, what=what)
        pairs = [_pair(got) for got in results]
        for rank, pair in enumerate(pairs):
            if pair is None:
                raise Incorrect(f"{what}: rank {rank} returned {results[rank]!r}; return a pair "
                                "of numbers (longest, tokens)")
        if all(pair == expected for pair in pairs):
            continue
        own_longest = [max(req, default=0) for req in lengths]
        own_tokens = [sum(req) for req in lengths]
        if len(set(pairs)) > 1:
            shown = ", ".join(f"rank {r}: {pair}" for r, pair in enumerate(pairs))
            disagree = f"{what}: the ranks disagree ({shown}); expected {expected} on every rank"
            for i, name, own in ((0, "longest prompt", own_longest), (1, "token count", own_tokens)):
                if all(pair[i] == own[r] for r, pair in enumerate(pairs)):
                    raise Incorrect(f"{disagree}. Each rank returned its own {name}: it was "
                                    "never reduced across the ranks")
            raise Incorrect(f"{disagree}. Collectives are matched by the order in which the "
                            "ranks call them, not by the tensor you pass: when rank 0 calls them "
                            "in another order, its all-reduce of one value meets the others' "
                            "all-reduce of the other. Call them in the same order on every rank")
        rank, got = next((r, pair) for r, pair in enumerate(pairs) if pair != expected)
        case = f"{what}: every rank returned {got}, expected {expected}"
        if got == expected[::-1]:
            raise Incorrect(f"{case}: the two values are swapped; return (longest, tokens)")
        if got[0] != expected[0] and got[0] == sum(own_longest):
            raise Incorrect(f"{case}: the longest prompt came out as the sum of the ranks' "
                            "longest prompts; reduce it with ReduceOp.MAX")
        if got[1] != expected[1] and got[1] == max(own_tokens):
            raise Incorrect(f"{case}: the token count came out as the largest rank's count; "
                            "reduce it with ReduceOp.SUM")
        if got[0] != expected[0] and got[0] in own_longest:
            raise Incorrect(f"{case}: the longest prompt is one rank's own; it was never reduced "
                            "across the ranks")
        raise Incorrect(f"{case}. If values from one reduction ended up in the other, the ranks "
                        "called their collectives in different orders")
    return ("every rank agrees on (longest, tokens) on 3 ranks and on 4 ranks with idle ranks")
