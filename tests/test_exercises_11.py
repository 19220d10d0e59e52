"""Lesson 11's exercises: the solution passes, a stub is not attempted, the library is refused, and
each plausible wrong answer earns the hint about its own mistake. The answers that run on ranks
are module-level functions, so the ranks can import them."""

import pytest
import torch
import torch.distributed as dist

from exercise_catalogue import assert_correct, assert_hidden_hint, assert_hint, assert_not_attempted, assert_refused

pytestmark = pytest.mark.lesson11


def stub(*args):
    raise NotImplementedError()


# -- 11.gather_bytes (predict) --------------------------------------------------------------
ROW = 16 * 264 * 4                        # one row of logits: 16 positions x 264 tokens x float32


def predicted_right():
    return (4 - 1) * 3 * ROW               # 10 rows on 4 ranks: 3, 3, 2, 2, padded to 3


def predicted_with_library():
    from lessons_lib.parallel.data import split_sizes
    return 3 * max(split_sizes(10, 4)) * ROW


@pytest.mark.parametrize("guess, fragments", [
    (7 * ROW, ["only the other ranks' real rows", "padded to the largest (3 rows)"]),
    (8 * ROW, ["only the other ranks' real rows"]),
    (4 * 3 * ROW, ["rank's own slice", "p - 1"]),
    (10 * ROW, ["whole batch"]),
    (3 * 3 * 264 * 4, ["one position per row", "all 16 positions"]),
    (3 * 3 * 16 * 256 * 4, ["264 tokens", "not 256"]),
    (3 * 2 * ROW, ["10 // 4 = 2", "dropping the remainder"]),
    (8 * 3 * 3 * ROW, ["bits, not bytes"]),
    (50_000, ["too low", "the measurement is 152,064 bytes"]),
])
def test_gather_bytes_wrong_predictions(guess, fragments):
    assert_hint("11.gather_bytes", lambda: guess, f"you predicted {guess:,} bytes", *fragments)


def test_gather_bytes_verdicts():
    assert_correct("11.gather_bytes", predicted_right)
    assert_not_attempted("11.gather_bytes", stub)
    assert_refused("11.gather_bytes", predicted_with_library, "split_sizes")


# -- 11.gather_rows (build) -----------------------------------------------------------------
def _counts(local):
    count = torch.tensor([local.shape[0]])
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    return [int(c) for c in counts]


def _padded_parts(local, counts, dtype=None):
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=dtype or local.dtype)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return parts


def gather_right(local):
    counts = _counts(local)
    return torch.cat([part[:n] for part, n in zip(_padded_parts(local, counts), counts)])


def gather_untrimmed(local):
    return torch.cat(_padded_parts(local, _counts(local)))


def gather_summed(local):
    counts = _counts(local)
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype)
    padded[:local.shape[0]] = local
    dist.all_reduce(padded)
    return padded


def gather_trims_by_own_count(local):
    parts = _padded_parts(local, _counts(local))
    return torch.cat([part[:local.shape[0]] for part in parts])


def gather_reversed(local):
    counts = _counts(local)
    parts = _padded_parts(local, counts)
    return torch.cat([part[:n] for part, n in reversed(list(zip(parts, counts)))])


def gather_float_padding(local):
    counts = _counts(local)
    parts = _padded_parts(local, counts, dtype=torch.float32)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def gather_2d_padding(local):
    counts = _counts(local)
    padded = torch.zeros(max(counts), local.shape[1], dtype=local.dtype)   # 2-D slices only
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def gather_unpadded(local):
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts)


def gather_padded_to_rank_0(local):
    """Pads every slice to rank 0's row count, as if rank 0 always held the most rows (as
    torch.tensor_split's remainder-first sizes do): true of every public case, not of a hidden one."""
    counts = _counts(local)
    padded = torch.zeros((counts[0], *local.shape[1:]), dtype=local.dtype)
    padded[:local.shape[0]] = local[:counts[0]]
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def test_gather_rows_hidden_case_has_the_most_rows_off_rank_0():
    assert_hidden_hint("11.gather_rows", gather_padded_to_rank_0, "p=5, rows per rank [0, 3, 1, 4, 2]",
                       "returned 0 rows, expected 10")


def gather_with_library(local):
    from lessons_lib.parallel.data import gather_rows
    return gather_rows(local)


@pytest.mark.parametrize("answer, fragments", [
    (gather_untrimmed, ["p=3, rows per rank [3, 2, 1]", "returned 9 rows, expected 6",
                        "3 padded slices of 3", "trim each part"]),
    (gather_summed, ["returned 3 rows, expected 6", "do not sum"]),
    (gather_trims_by_own_count, ["returned [9, 6, 3] rows", "trimmed to the receiving rank's count"]),
    (gather_reversed, ["row 0 is rank 2's row 0, expected rank 0's row 0", "in rank order"]),
    (gather_float_padding, ["[1, 1, 0, 0]", "int64", "returned dtype torch.float32", "local.dtype"]),
])
def test_gather_rows_wrong_answers(answer, fragments):
    assert_hint("11.gather_rows", answer, *fragments)


def test_gather_rows_verdicts():
    assert_correct("11.gather_rows", gather_right)
    assert_not_attempted("11.gather_rows", stub)
    assert_refused("11.gather_rows", gather_with_library, "gather_rows")


# -- 11.dp_generate (stretch) ---------------------------------------------------------------
def _my_rows(prompts, ceil=False):
    rank, world = dist.get_rank(), dist.get_world_size()
    n = prompts.shape[0]
    if ceil:
        per = -(-n // world)
        return prompts[rank * per:(rank + 1) * per]
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return prompts[start:start + base + (rank < extra)]


def _decode(step, ids, max_new_tokens, eos_id, stop_when_any=False):
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        if done.all() or (stop_when_any and done.any()):
            break
        new = torch.where(done, eos_id, step(ids))
        done |= new == eos_id
        ids = torch.cat([ids, new[:, None]], dim=1)
    return ids


def _pad_to_longest(ids, fill):
    width = torch.tensor([ids.shape[1]])
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    pad = torch.full((ids.shape[0], int(width) - ids.shape[1]), fill, dtype=ids.dtype)
    return torch.cat([ids, pad], dim=1)


def dp_generate_right(step, prompts, max_new_tokens, eos_id):
    ids = _decode(step, _my_rows(prompts), max_new_tokens, eos_id)
    return gather_right(_pad_to_longest(ids, eos_id))


def dp_generate_as_given(step, prompts, max_new_tokens, eos_id):
    rank, world = dist.get_rank(), dist.get_world_size()
    per = -(-prompts.shape[0] // world)
    ids = prompts[rank * per:(rank + 1) * per]
    out = [prompts]
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        if done.all():
            break
        new = torch.where(done, eos_id, step(ids))
        done |= new == eos_id
        ids = torch.cat([ids, new[:, None]], dim=1)
        parts = [torch.empty_like(new) for _ in range(world)]
        dist.all_gather(parts, new)
        out.append(torch.cat(parts)[:, None])
    return torch.cat(out, dim=1)


def dp_generate_widths_disagree(step, prompts, max_new_tokens, eos_id):
    return gather_right(_decode(step, _my_rows(prompts), max_new_tokens, eos_id))


def dp_generate_pads_with_zero(step, prompts, max_new_tokens, eos_id):
    ids = _decode(step, _my_rows(prompts), max_new_tokens, eos_id)
    return gather_right(_pad_to_longest(ids, 0))


def dp_generate_whole_batch(step, prompts, max_new_tokens, eos_id):
    return _decode(step, prompts, max_new_tokens, eos_id)


def dp_generate_ceil_split(step, prompts, max_new_tokens, eos_id):
    ids = _decode(step, _my_rows(prompts, ceil=True), max_new_tokens, eos_id)
    return gather_right(_pad_to_longest(ids, eos_id))


def dp_generate_stops_at_first_eos(step, prompts, max_new_tokens, eos_id):
    ids = _decode(step, _my_rows(prompts), max_new_tokens, eos_id, stop_when_any=True)
    return gather_right(_pad_to_longest(ids, eos_id))


def dp_generate_with_library(step, prompts, max_new_tokens, eos_id):
    from lessons_lib.parallel.data import gather_rows
    ids = _decode(step, _my_rows(prompts), max_new_tokens, eos_id)
    return gather_rows(_pad_to_longest(ids, eos_id))


@pytest.mark.parametrize("answer, fragments", [
    (dp_generate_pads_with_zero, ["padded with eos_id (9)"]),
    (dp_generate_whole_batch, ["the output is right", "passed 4 rows to step", "only its own rows"]),
    (dp_generate_ceil_split, ["p=3, 7 prompts", "rows decoded per rank [3, 3, 1]", "busiest rank"]),
    (dp_generate_stops_at_first_eos, ["had not finished", "ALL its rows"]),
])
def test_dp_generate_wrong_answers(answer, fragments):
    assert_hint("11.dp_generate", answer, *fragments)


def test_dp_generate_verdicts():
    assert_correct("11.dp_generate", dp_generate_right)
    assert_not_attempted("11.dp_generate", stub)
    assert_refused("11.dp_generate", dp_generate_with_library, "gather_rows")


# -- wrong answers that stop the ranks --------------------------------------------------------
# An error on a rank, an abort or a hang stops that warm pool of ranks; the next check starts a
# new one (a second or two each). They run last, ordered so that few pools restart.
@pytest.mark.parametrize("exercise_id, answer, fragments", [
    ("11.gather_rows", gather_2d_padding, ["slices of shape (rows, 3, 5)", "raised"]),
    ("11.gather_rows", gather_unpadded, ["SIGABRT", "same shape", "pad first"]),
    ("11.dp_generate", dp_generate_as_given, ["p=2, 4 prompts", "did not finish",
                                              "rank 1 waits in all_gather", "rank 0 had already returned",
                                              "left its decode loop", "gather once"]),
    ("11.dp_generate", dp_generate_widths_disagree, ["SIGABRT", "different numbers of columns",
                                                     "all_reduce with MAX"]),
])
def test_wrong_answers_that_stop_the_ranks(exercise_id, answer, fragments):
    assert_hint(exercise_id, answer, *fragments)
