"""Data-parallel inference: split the batch, gather in order, equal to one process."""

import pytest
import torch
import torch.nn as nn

from lessons_lib import DistributedError, run_distributed
from lessons_lib.model import generate
from lessons_lib.parallel.data import (DataParallelInference, data_parallel_generate, gather_rows,
                                       local_rows, row_range, split_sizes)
from models import tiny_lm

pytestmark = pytest.mark.lesson11
# fp32: atol 1e-5 plus rtol 1e-4. The trained model's logits reach ~16; a different batch split or
# thread count re-orders float sums and moves a logit by ~1e-5, which the relative term covers.
ATOL, RTOL = 1e-5, 1e-4





@pytest.mark.parametrize("rows, world, sizes", [
    (10, 3, [4, 3, 3]), (9, 3, [3, 3, 3]), (2, 3, [1, 1, 0]), (0, 2, [0, 0]), (5, 1, [5]),
])
def test_split_sizes_are_balanced_and_in_order(rows, world, sizes):
    assert split_sizes(rows, world) == sizes
    assert [row_range(rows, world, r) for r in range(world)] == \
           [(sum(sizes[:r]), sum(sizes[:r + 1])) for r in range(world)]


@pytest.mark.parametrize("call, words", [
    (lambda: split_sizes(4, 0), r"world_size=0 is not valid: expected an int >= 1"),
    (lambda: split_sizes(-1, 2), r"n_rows=-1 is not valid: expected an int >= 0"),
    (lambda: row_range(4, 2, 2), r"rank=2 is not valid: expected an int in \[0, 1\]"),
    (lambda: local_rows(torch.tensor(3.0)), r"batch=.* is not valid: expected a torch.Tensor with at least 1 dim"),
])
def test_bad_inputs_name_the_parameter(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def _gather_uneven():
    import torch.distributed as dist
    rank = dist.get_rank()
    local = torch.full((3 - rank, 2), float(rank))   # 3, 2, 1 rows
    return gather_rows(local)


def test_gather_rows_concatenates_uneven_slices_in_rank_order():
    expected = torch.tensor([[0.0] * 2] * 3 + [[1.0] * 2] * 2 + [[2.0] * 2])
    for got in run_distributed(_gather_uneven, 3):
        assert torch.equal(got, expected)


def _dp_forward_and_generate(ids, mask, new_tokens):
    model = tiny_lm()
    logits = DataParallelInference(model)(ids, attention_mask=mask)
    tokens = data_parallel_generate(model, ids, new_tokens, attention_mask=mask)
    return local_rows(ids).shape[0], logits, tokens


@pytest.mark.parametrize("batch, world", [(10, 3), (2, 3)])
def test_dp_equals_one_process_on_uneven_and_tiny_batches(batch, world):
    ids = torch.randint(0, 256, (batch, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0                                    # a left-padded row, to split the mask too
    model = tiny_lm()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
    tokens = generate(model, ids, 16, attention_mask=mask)
    results = run_distributed(_dp_forward_and_generate, world, ids, mask, 16)
    assert [r[0] for r in results] == split_sizes(batch, world)   # 4,3,3 or 1,1,0 rows
    for _, rank_logits, rank_tokens in results:
        torch.testing.assert_close(rank_logits, logits, atol=ATOL, rtol=RTOL)
        assert torch.equal(rank_tokens, tokens)


def _dp_generate_eos(ids, eos_id):
    return data_parallel_generate(tiny_lm(), ids, 12, eos_id=eos_id)


def test_dp_generate_pads_early_stopping_ranks_with_eos():
    ids = torch.randint(0, 256, (4, 4), generator=torch.Generator().manual_seed(3))
    model = tiny_lm()
    first = generate(model, ids, 1)[:, -1]
    eos_id = int(first[0])                              # row 0 stops at once, on rank 0
    expected = generate(model, ids, 12, eos_id=eos_id)
    for got in run_distributed(_dp_generate_eos, 2, ids, eos_id):
        assert torch.equal(got, expected)


def _nothing_is_reduced(x):
    torch.manual_seed(1)
    return DataParallelInference(nn.Linear(3, 2))(x)


def test_dp_output_is_the_concatenation_not_a_sum_or_mean():
    x = torch.arange(12.0).view(4, 3)
    torch.manual_seed(1)
    expected = nn.Linear(3, 2)(x).detach()
    for got in run_distributed(_nothing_is_reduced, 2, x):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_a_mismatched_mask_is_a_value_error():
    ids = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask shape"):
        data_parallel_generate(tiny_lm(), ids, 2, attention_mask=torch.ones(3, 5))


def test_a_rank_failing_in_dp_is_reported():
    with pytest.raises(DistributedError):
        run_distributed(lambda: local_rows(torch.tensor(1.0)), 2)
