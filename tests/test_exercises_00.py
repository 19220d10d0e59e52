"""Lesson 00's exercises: the answers that pass, and a catalogue of plausible wrong ones, each
earning the hint about its own mistake."""

import pytest
import torch
import torch.distributed as dist

from exercise_catalogue import assert_correct, assert_hint, assert_not_attempted, assert_refused

pytestmark = pytest.mark.lesson00


def stub(*args):
    raise NotImplementedError()


# -- 00.sum_of_squares -----------------------------------------------------------------------
def squares_right():
    t = torch.tensor([dist.get_rank() ** 2])
    dist.all_reduce(t)
    return int(t.item())


def squares_of_rank_ids():
    t = torch.tensor([dist.get_rank()])
    dist.all_reduce(t)
    return int(t.item())


def squares_never_combined():
    return dist.get_rank() ** 2


def squares_with_max():
    t = torch.tensor([dist.get_rank() ** 2])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def test_sum_of_squares():
    assert_correct("00.sum_of_squares", squares_right)
    assert_not_attempted("00.sum_of_squares", stub)
    assert_hint("00.sum_of_squares", squares_of_rank_ids, "on 3 ranks", "expected 5",
                "sum of the rank ids")
    assert_hint("00.sum_of_squares", squares_never_combined, "rank 0 returned 0", "never combined")
    assert_hint("00.sum_of_squares", squares_with_max, "returned 4", "not MAX")


# -- 00.predict_gather_bytes -----------------------------------------------------------------
def test_predict_gather_bytes():
    right = 3 * 3 * 264 * 2
    assert_correct("00.predict_gather_bytes", lambda: right)
    assert_not_attempted("00.predict_gather_bytes", stub)
    for wrong, fragment in [(4 * 3 * 264 * 2, "own tensor too"),
                            (3 * 3 * 264, "elements, not bytes"),
                            (right * 8, "bits, not bytes"),
                            (right * 2, "not 4 like float32"),
                            (3 * 264 * 2, "one rank's tensor")]:
        assert_hint("00.predict_gather_bytes", lambda w=wrong: w, f"predicted {wrong}",
                    f"measured {right} bytes", fragment)
    assert_hint("00.predict_gather_bytes", lambda: 1234, "p - 1")
    assert_hint("00.predict_gather_bytes", lambda: "4752", "return a number")


def predicted_by_measuring():
    from lessons_lib import run_distributed
    return run_distributed(lambda: 0, 4)[0]


def test_predict_gather_bytes_refuses_measuring_instead_of_predicting():
    assert_refused("00.predict_gather_bytes", predicted_by_measuring, "run_distributed")


# -- 00.mean_nll -----------------------------------------------------------------------------
def mean_right(local):
    t = torch.tensor([local.sum().item(), float(local.numel())], dtype=torch.float64)
    dist.all_reduce(t)
    return (t[0] / t[1]).item()


def mean_of_means(local):
    m = local.mean()
    dist.all_reduce(m)
    return (m / dist.get_world_size()).item()


def mean_over_ranks(local):
    s = local.sum()
    dist.all_reduce(s)
    return (s / dist.get_world_size()).item()


def mean_local_only(local):
    return local.mean().item()


def mean_nan_when_idle(local):
    t = torch.stack([local.mean() * local.numel(), torch.tensor(float(local.numel()))])
    dist.all_reduce(t)
    return (t[0] / t[1]).item()


def mean_reduced_to_rank_0(local):
    t = torch.tensor([local.sum().item(), float(local.numel())])
    dist.reduce(t, dst=0)
    return (t[0] / t[1]).item()


def mean_as_tensor(local):
    t = torch.tensor([local.sum().item(), float(local.numel())])
    dist.all_reduce(t)
    return t[0] / t[1]


def test_mean_nll():
    assert_correct("00.mean_nll", mean_right)
    assert_not_attempted("00.mean_nll", stub)
    assert_hint("00.mean_nll", mean_of_means, "p=3, tokens per rank [5, 2, 1]", "per-rank means",
                "sum of the losses and the count")
    assert_hint("00.mean_nll", mean_over_ranks, "number of ranks (3)", "number of tokens (8)")
    assert_hint("00.mean_nll", mean_local_only, "rank 0 returned", "own 5 tokens only")
    assert_hint("00.mean_nll", mean_nan_when_idle, "p=4, tokens per rank [2, 0, 1, 0]",
                "returned nan", "[1, 3] hold no tokens", "count of 0")
    assert_hint("00.mean_nll", mean_reduced_to_rank_0, "while rank 0 got it right", "all_reduce")
    assert_hint("00.mean_nll", mean_as_tensor, "returned a tensor", ".item()")


# -- 00.collective_order ---------------------------------------------------------------------
def order_right(prompt_lengths):
    longest = torch.tensor([max(prompt_lengths, default=0)])
    tokens = torch.tensor([sum(prompt_lengths)])
    dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    return int(longest), int(tokens)


def order_as_given(prompt_lengths):
    longest = torch.tensor([max(prompt_lengths, default=0)])
    tokens = torch.tensor([sum(prompt_lengths)])
    if dist.get_rank() == 0:
        dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    else:
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
    return int(longest), int(tokens)


def order_packed_with_sum(prompt_lengths):
    both = torch.tensor([max(prompt_lengths, default=0), sum(prompt_lengths)])
    dist.all_reduce(both)
    return int(both[0]), int(both[1])


def order_packed_with_max(prompt_lengths):
    both = torch.tensor([max(prompt_lengths, default=0), sum(prompt_lengths)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return int(both[0]), int(both[1])


def order_longest_dropped(prompt_lengths):
    tokens = torch.tensor([sum(prompt_lengths)])
    dist.all_reduce(tokens)
    return max(prompt_lengths, default=0), int(tokens)


def order_swapped(prompt_lengths):
    longest, tokens = order_right(prompt_lengths)
    return tokens, longest


def test_collective_order():
    assert_correct("00.collective_order", order_right)
    assert_not_attempted("00.collective_order", stub)
    message = assert_hint("00.collective_order", order_as_given, "p=3", "the ranks disagree",
                          "same order on every rank")
    assert "never reduced" not in message
    assert_hint("00.collective_order", order_packed_with_sum, "expected (12, 33)",
                "sum of the ranks' longest", "MAX")
    assert_hint("00.collective_order", order_packed_with_max, "largest rank's count", "SUM")
    assert_hint("00.collective_order", order_longest_dropped, "the ranks disagree",
                "its own longest prompt", "never reduced")
    assert_hint("00.collective_order", order_swapped, "swapped")
