"""Checkers for notebook 11 (data-parallel inference): the bytes of the padded gather, an in-order
gather of uneven slices on real ranks, and data-parallel generation that stops at EOS without
deadlocking."""

from __future__ import annotations

import functools

import torch

from ..comm.schedule import chunk_bounds
from ..model import ModelConfig, generate
from ..parallel.data import (DataParallelInference, data_parallel_generate, gather_rows, local_rows,
                             row_range, split_sizes)
from .check import (Incorrect, exercise, judge_prediction, labelled_cases, refuse_reference, run_ranks,
                    with_hidden)

LIBRARY = (gather_rows, DataParallelInference, data_parallel_generate, local_rows, row_range, split_sizes,
           chunk_bounds)

ABORTED = ("gloo aborts the whole program when the ranks of one collective pass tensors of "
           "different sizes: every rank must hand all_gather the same shape (pad first)")
NEVER_SKIP = ("Every rank must call every collective, in the same order, the same number of "
              "times, even a rank with no rows or whose rows are all finished")


class _Stub:
    """What a rank returns when the answer is still the stub: the checker then reports "not
    attempted" without the launcher having to restart its ranks."""


def _ranks(fn, world: int, *args, what: str, on_abort: str = "", on_hang: str = ""):
    """``run_ranks``, with the usual cause of an abort or a hang added to its hint."""
    try:
        results = run_ranks(fn, world, *args, what=what)
        if any(isinstance(r, _Stub) for r in results):
            raise NotImplementedError()
        return results
    except Incorrect as err:
        text = str(err).rstrip(". ")
        if "SIGABRT" in text:
            text += f". {ABORTED}{on_abort}"
        elif "deadlock" in text or "did not finish" in text:
            text += f". {NEVER_SKIP}{on_hang}"
        raise Incorrect(text) from None


# -- predict: the bytes each rank receives in the padded gather ---------------------------
BATCH, POSITIONS, RANKS = 10, 16, 4
VOCAB = ModelConfig().vocab_size


def received_in_gather(batch: int, positions: int, vocab: int) -> int:
    """On one rank: run the library's gather_rows on this rank's logits and count the bytes
    all_gather delivers to it from the other ranks."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = row_range(batch, world, rank)
    local = torch.zeros(stop - start, positions, vocab)
    received = []
    real = dist.all_gather

    def recording(tensor_list, tensor, *args, **kwargs):
        if tensor.is_floating_point():
            received.append(sum(t.numel() * t.element_size()
                                for i, t in enumerate(tensor_list) if i != rank))
        return real(tensor_list, tensor, *args, **kwargs)

    dist.all_gather = recording
    try:
        gather_rows(local)
    finally:
        dist.all_gather = real
    return sum(received)


@functools.lru_cache(maxsize=1)
def measured_gather_bytes() -> int:
    """Bytes of logits each of 4 ranks receives when gathering a (10, 16, vocab) batch, measured."""
    per_rank = run_ranks(received_in_gather, RANKS, BATCH, POSITIONS, VOCAB,
                         what="measuring the gather")
    assert len(set(per_rank)) == 1, per_rank
    return per_rank[0]


def _gather_mistakes() -> list[tuple[float, str]]:
    row = POSITIONS * VOCAB * 4
    sizes = split_sizes(BATCH, RANKS)
    padded = max(sizes)
    return [
        ((BATCH - sizes[0]) * row,
         "That counts only the other ranks' real rows: all_gather moves the same shape from "
         f"every rank, so each slice is padded to the largest ({padded} rows) before it is sent"),
        ((BATCH - sizes[-1]) * row, "That counts only the other ranks' real rows: all_gather moves "
         f"the same shape from every rank, so each slice is padded to {padded} rows first"),
        (RANKS * padded * row, "That includes the rank's own slice: it receives p - 1 slices, not p"),
        (BATCH * row, "That is the whole batch's logits: a rank receives the other ranks' "
         "(padded) slices, not its own"),
        (8 * (RANKS - 1) * padded * row, "That is bits, not bytes: divide by 8"),
        ((RANKS - 1) * padded * VOCAB * 4, f"That is one position per row: the logits of all "
         f"{POSITIONS} positions are gathered"),
        ((RANKS - 1) * padded * POSITIONS * 256 * 4, f"The tiny LM's vocabulary has {VOCAB} tokens "
         "(256 bytes and a few special tokens), not 256"),
        ((RANKS - 1) * padded * POSITIONS * VOCAB * 2, "The logits are float32: 4 bytes each"),
        ((RANKS - 1) * (BATCH // RANKS) * row, f"That splits {BATCH} rows as {BATCH} // {RANKS} = "
         f"{BATCH // RANKS} per rank, dropping the remainder: the first {BATCH % RANKS} ranks take "
         f"one more row, so the largest slice has {padded}"),
    ]


@exercise("11.gather_bytes", "predict: bytes of logits each rank receives in the padded gather")
def check_gather_bytes(candidate):
    refuse_reference(candidate, measured_gather_bytes, *LIBRARY)
    guess = candidate()
    judge_prediction(guess, measured_gather_bytes(), _gather_mistakes(), "bytes",
                     "Which rows does each rank hold, to what size is every slice padded, how many "
                     "slices does a rank receive, and how many bytes is one row of logits?")
    return "within 1% of the bytes all_gather delivered to each rank, padding included"


# -- build: gather uneven slices in rank order --------------------------------------------
# (world size, rows per rank, trailing shape, dtype): 6 rows on 3 ranks; 5 on 4 in 3-D;
# 2 on 4 (two ranks with no rows) as token ids; an empty batch.
GATHER_CASES = ((3, (3, 2, 1), (2,), torch.float32), (4, (2, 1, 1, 1), (3, 5), torch.float32),
                (4, (1, 1, 0, 0), (6,), torch.int64), (2, (0, 0), (4,), torch.float32))
# Grading only: 5 ranks, rank 0 empty and the most rows on rank 3, float64; equal int32 slices.
GATHER_HIDDEN = ((5, (0, 3, 1, 4, 2), (2,), torch.float64), (5, (1, 1, 1, 1, 1), (3,), torch.int32))


def _slice(rank: int, rows: int, trailing: tuple, dtype) -> torch.Tensor:
    """Rank ``rank``'s rows: row i of rank r is filled with 100 r + i + 1, so every row says where
    it came from (and a padding row of zeros is recognised)."""
    fill = torch.arange(rows, dtype=torch.float32) + 100 * rank + 1
    return fill.view(rows, *([1] * len(trailing))).expand(rows, *trailing).to(dtype).clone()


def _gather_on_rank(candidate, rows, trailing, dtype):
    import torch.distributed as dist

    rank = dist.get_rank()
    try:
        return candidate(_slice(rank, rows[rank], trailing, dtype))
    except NotImplementedError:
        return _Stub()


def _origin(row: torch.Tensor) -> str:
    v = int(row.flatten()[0]) if row.numel() else 0
    if v == 0:
        return "a padding row"
    rank, i = divmod(v - 1, 100)
    return f"rank {rank}'s row {i}"


def _judge_gather(case: str, rank: int, got, rows, trailing, dtype) -> None:
    world = len(rows)
    parts = [_slice(r, rows[r], trailing, dtype) for r in range(world)]
    want = torch.cat(parts)
    if not isinstance(got, torch.Tensor):
        raise Incorrect(f"{case}: rank {rank} returned a {type(got).__name__}; return a tensor")
    if got.dtype != dtype:
        raise Incorrect(f"{case}: rank {rank} returned dtype {got.dtype}, expected {dtype}: make the "
                        "padding with the slice's own dtype (torch.zeros(..., dtype=local.dtype)), "
                        "or token ids become floats")
    n, longest = sum(rows), max(rows)
    if tuple(got.shape[1:]) != trailing:
        raise Incorrect(f"{case}: rank {rank} returned shape {tuple(got.shape)}, expected "
                        f"{tuple(want.shape)}: only dim 0 (the rows) is gathered; keep the rest of "
                        "the slice's shape")
    if got.shape[0] != n:
        why = ""
        if got.shape[0] == world * longest:
            why = (f" That is {world} padded slices of {longest}: trim each part back to its "
                   "rank's own row count")
        elif got.shape[0] == longest and world > 1:
            why = " That is one padded slice: concatenate the ranks' slices, do not sum them"
        elif got.shape[0] == rows[rank]:
            why = " That is this rank's own slice: gather every rank's rows"
        raise Incorrect(f"{case}: rank {rank} returned {got.shape[0]} rows, expected {n} "
                        f"({' + '.join(map(str, rows))}).{why}")
    if not torch.equal(got, want):
        j = next(i for i in range(n) if not torch.equal(got[i], want[i]))
        origin = _origin(got[j])
        why = ""
        if origin == "a padding row":
            why = (": a padding row survived and a real row was dropped. Trim part r to rank r's "
                   "count, not to this rank's")
        elif "row" in origin and got.sum() == want.sum():
            why = ": the rows are all there, in the wrong order: concatenate the parts in rank order"
        raise Incorrect(f"{case}: on rank {rank}, row {j} is {origin}, expected {_origin(want[j])}{why}")


@exercise("11.gather_rows", "build: gather uneven per-rank slices in rank order, on real ranks")
def check_gather_rows(candidate, hidden=False):
    refuse_reference(candidate, *LIBRARY)
    for label, (world, rows, trailing, dtype) in labelled_cases(GATHER_CASES, GATHER_HIDDEN, hidden):
        n = sum(rows)
        case = (f"{label}p={world}, rows per rank {list(rows)} ({n} in all), slices of shape "
                f"(rows, {', '.join(map(str, trailing))}) {str(dtype).replace('torch.', '')}")
        empty = [r for r in range(world) if rows[r] == 0]
        results = _ranks(_gather_on_rank, world, candidate, rows, trailing, dtype, what=case,
                         on_hang=f" (here rank {empty[0]} has no rows)" if empty else "")
        got_rows = [g.shape[0] if isinstance(g, torch.Tensor) and g.dim() else None for g in results]
        if len(set(rows)) > 1 and got_rows == [world * r for r in rows]:
            raise Incorrect(f"{case}: the ranks returned {got_rows} rows, each {world} x its own row "
                            f"count, instead of {sum(rows)}: every part was trimmed to the receiving "
                            "rank's count. Trim part r to rank r's count (exchange the counts first)")
        for rank, got in enumerate(results):
            _judge_gather(case, rank, got, rows, trailing, dtype)
    return with_hidden("every rank gets every slice in rank order: uneven slices, 3-D slices, ranks with no "
                       "rows, int64 token ids and an empty batch", GATHER_HIDDEN, hidden)


# -- stretch: data-parallel generation that stops at EOS ----------------------------------
EOS = 9


def count_up(ids: torch.Tensor) -> torch.Tensor:
    """A stand-in for one greedy decode step: each row's next token is its last token plus one,
    up to ``EOS``. A row ending in token t finishes after 9 - t steps."""
    return (ids[:, -1] + 1).clamp(max=EOS)


def generate_until_eos(step, prompts: torch.Tensor, max_new_tokens: int, eos_id: int) -> torch.Tensor:
    """One process: decode every row until all have emitted ``eos_id`` (finished rows repeat it)
    or ``max_new_tokens`` steps have run."""
    ids = prompts
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        if bool(done.all()):
            break
        new = torch.where(done, torch.full_like(done, eos_id, dtype=ids.dtype), step(ids))
        done |= new == eos_id
        ids = torch.cat([ids, new[:, None]], dim=1)
    return ids


# (world size, the prompts' last tokens, max_new_tokens)
GENERATE_CASES = ((2, (5, 7, 3, 8), 6), (3, (2, 8, 6, 4, 7, 5, 8), 5), (4, (6, 3, 7), 6), (4, (), 4))
PROMPT_LEN = 3


def _prompts(last: tuple) -> torch.Tensor:
    rows = [[(t + 4 * i) % EOS for i in range(PROMPT_LEN - 1, 0, -1)] + [t] for t in last]
    return torch.tensor(rows, dtype=torch.long).view(len(last), PROMPT_LEN)


def _generate_on_rank(candidate, prompts, max_new_tokens, eos_id):
    rows_per_step = []

    def step(ids):
        rows_per_step.append(int(ids.shape[0]))
        return count_up(ids)

    try:
        return candidate(step, prompts.clone(), max_new_tokens, eos_id), rows_per_step
    except NotImplementedError:
        return _Stub()


def _judge_generate(case: str, prompts, max_new, results) -> None:
    want = generate_until_eos(count_up, prompts, max_new, EOS)
    n, world = prompts.shape[0], len(results)
    for rank, (got, _) in enumerate(results):
        if not isinstance(got, torch.Tensor):
            raise Incorrect(f"{case}: rank {rank} returned a {type(got).__name__}; return the (rows, "
                            "prompt + new tokens) ids as a tensor")
        if tuple(got.shape) != tuple(want.shape):
            why = ""
            if got.shape[0] != n:
                why = f": every rank returns all {n} rows, in batch order"
            elif got.shape[1] < want.shape[1]:
                why = (": some row had not finished. Stop a rank's loop only when ALL its rows have "
                       "emitted eos_id (or max_new_tokens steps ran)")
            raise Incorrect(f"{case}: rank {rank} returned shape {tuple(got.shape)}, expected "
                            f"{tuple(want.shape)} (one process decoding the whole batch){why}")
        if got.dtype != torch.long:
            raise Incorrect(f"{case}: rank {rank} returned dtype {got.dtype}; token ids are int64")
        if not torch.equal(got, want):
            r, c = (int(i) for i in (got != want).nonzero()[0])
            why = ""
            if int(want[r, c]) == EOS and int(got[r, c]) != EOS:
                why = (f": row {r} had finished, and a finished row is padded with eos_id ({EOS}) "
                       "up to the longest row, as one process keeps emitting it")
            raise Incorrect(f"{case}: on rank {rank}, row {r} = {got[r].tolist()}, expected "
                            f"{want[r].tolist()} (first difference at column {c}){why}")
    shares = [calls[0] if calls else 0 for _, calls in results]
    most = max(max(calls, default=0) for _, calls in results)
    if n and most > -(-n // world):
        raise Incorrect(f"{case}: the output is right, but one rank passed {most} rows to step at "
                        f"once; its share of {n} rows on {world} ranks is at most {-(-n // world)}. "
                        "Each rank decodes only its own rows: that is what makes DP faster")
    if max(shares) - min(shares) > 1:
        raise Incorrect(f"{case}: rows decoded per rank {shares}: the busiest rank sets the time. "
                        f"Give each rank {n} // {world} rows and the first {n} % {world} ranks one more")


@exercise("11.dp_generate", "stretch: fix data-parallel generation that deadlocks at EOS")
def check_dp_generate(candidate):
    refuse_reference(candidate, *LIBRARY, generate, generate_until_eos)
    for world, last, max_new in GENERATE_CASES:
        prompts = _prompts(last)
        case = (f"p={world}, {len(last)} prompts ending in tokens {list(last)}, "
                f"max_new_tokens={max_new}, eos_id={EOS}")
        results = _ranks(_generate_on_rank, world, candidate, prompts, max_new, EOS, what=case,
                         on_abort=(". Ranks whose rows finished at different steps hold different "
                                   "numbers of columns: agree on the longest (all_reduce with MAX) "
                                   "and pad with eos_id before gathering"),
                         on_hang=(": a rank whose rows were all finished left its decode loop while "
                                  "the others still called a collective for the next step. DP needs "
                                  "no communication per token: decode your rows locally, then "
                                  "gather once"))
        _judge_generate(case, prompts, max_new, results)
    return ("each rank decodes only its rows, ranks finish at different steps without waiting for "
            "each other, and one gather returns exactly what one process generates")
