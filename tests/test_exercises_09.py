"""Lesson 09's exercises: the solution passes, a stub is not attempted, the library is refused, and
each plausible wrong answer earns the hint about its own mistake."""

import pytest
import torch

from exercise_catalogue import assert_correct, assert_hidden_hint, assert_hint, assert_not_attempted, assert_refused

pytestmark = pytest.mark.lesson09

ROWS, COLS, GROUP = 11008 // 4, 4096, 128


def stub(*args):
    raise NotImplementedError()


# -- 09.int4_shard_bytes (predict) ----------------------------------------------------------
def predicted_right():
    return ROWS * COLS // 2 + ROWS * (COLS // GROUP) * 2 * 2


def predicted_by_measuring():
    import torch.nn as nn

    from lessons_lib.compression import Int4Linear, linear_weight_bytes
    return linear_weight_bytes(Int4Linear.from_float(nn.Linear(COLS, ROWS, bias=False), GROUP))


@pytest.mark.parametrize("guess, fragments", [
    (4 * (ROWS * COLS // 2 + ROWS * (COLS // GROUP) * 4), ["whole layer", "2752 of the 11008"]),
    (ROWS * COLS + ROWS * (COLS // GROUP) * 4, ["one code per byte", "two 4-bit codes"]),
    (ROWS * COLS // 2, ["packed codes only", "bfloat16 scale"]),
    (ROWS * COLS // 2 + ROWS * (COLS // GROUP) * 2, ["not its zero"]),
    (ROWS * COLS // 2 + ROWS * (COLS // GROUP) * 8, ["in float32", "bfloat16, 2 bytes"]),
    (8 * (ROWS * COLS // 2 + ROWS * (COLS // GROUP) * 4), ["bits, not bytes"]),
    (ROWS * COLS * 2, ["in bfloat16, before quantisation"]),
    (1_000_000, ["too low", "the measurement is 5,988,352"]),
])
def test_int4_shard_bytes_wrong_predictions(guess, fragments):
    assert_hint("09.int4_shard_bytes", lambda: guess, f"you predicted {guess:,}", *fragments)


def test_int4_shard_bytes_verdicts():
    assert_correct("09.int4_shard_bytes", predicted_right)
    assert_correct("09.int4_shard_bytes", lambda: 1.005 * predicted_right())   # inside 1%
    assert_hint("09.int4_shard_bytes", lambda: "six million", "as a number")
    assert_not_attempted("09.int4_shard_bytes", stub)
    assert_refused("09.int4_shard_bytes", predicted_by_measuring, "Int4Linear")


# -- 09.quantize_int4 (build) ---------------------------------------------------------------
def quantize_int4_right(w, group_size):
    out, n = w.shape
    groups = w.reshape(out, n // group_size, group_size)
    amax = groups.abs().amax(dim=2)
    scales = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    q = torch.round(groups / scales[..., None]).clamp(-7, 7).to(torch.int8)
    return q.reshape(out, n), scales


def int4_with_flat_view(w, group_size):
    out, n = w.shape
    groups = w.view(-1, group_size)                           # one row per group: needs a contiguous w
    amax = groups.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    q = torch.round(groups / scales[:, None]).clamp(-7, 7).to(torch.int8)
    return q.view(out, n), scales.view(out, n // group_size)


def test_quantize_int4_hidden_case_gives_a_transposed_weight():
    # Every public weight is contiguous; a hidden one is a transposed view, as a Linear's weight.T is.
    assert_hidden_hint("09.quantize_int4", int4_with_flat_view, "a transposed view", "RuntimeError",
                       "w.reshape(...) copies when it must")


def _guarded(amax):
    return torch.where(amax > 0, amax, torch.ones_like(amax))


def int4_one_scale_per_row(w, group_size):
    out, n = w.shape
    amax = _guarded(w.abs().amax(dim=1, keepdim=True))
    q = torch.round(w / (amax / 7)).clamp(-7, 7).to(torch.int8)
    return q, (amax / 7).expand(out, n // group_size)


def int4_signed_max(w, group_size):
    out, n = w.shape
    groups = w.reshape(out, n // group_size, group_size)
    scales = _guarded(groups.amax(dim=2).abs()) / 7
    q = torch.round(groups / scales[..., None]).clamp(-7, 7).to(torch.int8)
    return q.reshape(out, n), scales


def int4_strided_groups(w, group_size):
    out, n = w.shape
    groups = w.reshape(out, group_size, n // group_size)          # every (n // g)-th input
    scales = _guarded(groups.abs().amax(dim=1)) / 7
    q = torch.round(groups / scales[:, None, :]).clamp(-7, 7).to(torch.int8)
    return q.reshape(out, n), scales


def int4_truncated(w, group_size):
    out, n = w.shape
    groups = w.reshape(out, n // group_size, group_size)
    scales = _guarded(groups.abs().amax(dim=2)) / 7
    q = (groups / scales[..., None]).clamp(-7, 7).to(torch.int8)  # .to(int8) truncates
    return q.reshape(out, n), scales


def int4_zero_group_divides(w, group_size):
    out, n = w.shape
    groups = w.reshape(out, n // group_size, group_size)
    scales = groups.abs().amax(dim=2) / 7                          # 0 for an all-zero group
    q = torch.nan_to_num(torch.round(groups / scales[..., None])).clamp(-7, 7).to(torch.int8)
    return q.reshape(out, n), scales


def int4_minus_eight(w, group_size):
    out, n = w.shape
    groups = w.reshape(out, n // group_size, group_size)
    scales = _guarded(groups.abs().amax(dim=2)) / 8
    q = torch.round(groups / scales[..., None]).clamp(-8, 7).to(torch.int8)
    return q.reshape(out, n), scales


def int4_with_int8_codes(w, group_size):
    out, n = w.shape
    groups = w.reshape(out, n // group_size, group_size)
    scales = _guarded(groups.abs().amax(dim=2)) / 127
    q = torch.round(groups / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(out, n), scales


def int4_per_row_vector(w, group_size):
    amax = _guarded(w.abs().amax(dim=1))
    return torch.round(w / (amax[:, None] / 7)).clamp(-7, 7).to(torch.int8), amax / 7


def int4_bfloat16_scales(w, group_size):
    q, scales = quantize_int4_right(w, group_size)
    return q, scales.to(torch.bfloat16)


def int4_from_library(w, group_size):
    from lessons_lib.compression import quantize_int4
    return quantize_int4(w, group_size, scale_dtype=torch.float32)


@pytest.mark.parametrize("answer, fragments", [
    (int4_one_scale_per_row, ["(4, 16), group_size=8", "one scale per row", "its own max|w| / 7"]),
    (int4_signed_max, ["max(w), not max(|w|)", "largest magnitude is a negative weight"]),
    (int4_strided_groups, ["strided (inputs j, j + 2, j + 4", "reshape(out, in // 8, 8)"]),
    (int4_truncated, ["truncated toward zero", "torch.round"]),
    (int4_zero_group_divides, ["row 3, group 1", "all zeros", "scale 1"]),
    (int4_minus_eight, ["[-8, 7]", "clamp to [-7, 7]"]),
    (int4_with_int8_codes, ["int8 codes"]),
    (int4_per_row_vector, ["shape (4,)", "expected (4, 2)", "one scale per row"]),
    (int4_bfloat16_scales, ["dtype torch.bfloat16", "float32"]),
])
def test_quantize_int4_wrong_answers(answer, fragments):
    assert_hint("09.quantize_int4", answer, *fragments)


def test_quantize_int4_verdicts():
    assert_correct("09.quantize_int4", quantize_int4_right)
    assert_not_attempted("09.quantize_int4", stub)
    assert_refused("09.quantize_int4", int4_from_library, "quantize_int4")


# -- 09.int4_row_shard (stretch) -----------------------------------------------------------
def shard_right(q, scales, group_size, rank, world_size):
    base, extra = divmod(q.shape[1] // group_size, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (rank < extra)
    return q[:, first * group_size:last * group_size], scales[:, first:last], \
        (first * group_size, last * group_size)


def shard_as_given(q, scales, group_size, rank, world_size):
    in_features = q.shape[1]
    per = in_features // world_size
    start, stop = rank * per, (rank + 1) * per
    return q[:, start:stop], scales[:, start:stop], (start, stop)


def shard_columns_floor(q, scales, group_size, rank, world_size):
    per = q.shape[1] // world_size
    start, stop = rank * per, (rank + 1) * per
    return q[:, start:stop], scales[:, start // group_size:stop // group_size], (start, stop)


def shard_groups_floor(q, scales, group_size, rank, world_size):
    per = q.shape[1] // group_size // world_size
    first, last = rank * per, (rank + 1) * per
    return q[:, first * group_size:last * group_size], scales[:, first:last], \
        (first * group_size, last * group_size)


def shard_groups_ceil(q, scales, group_size, rank, world_size):
    n_groups = q.shape[1] // group_size
    per = -(-n_groups // world_size)
    first, last = min(rank * per, n_groups), min((rank + 1) * per, n_groups)
    return q[:, first * group_size:last * group_size], scales[:, first:last], \
        (first * group_size, last * group_size)


def shard_remainder_on_last(q, scales, group_size, rank, world_size):
    n_groups = q.shape[1] // group_size
    per = n_groups // world_size
    first = rank * per
    last = n_groups if rank == world_size - 1 else first + per
    return q[:, first * group_size:last * group_size], scales[:, first:last], \
        (first * group_size, last * group_size)


def shard_scales_by_rows(q, scales, group_size, rank, world_size):
    start, stop = shard_right(q, scales, group_size, rank, world_size)[2]
    return q[:, start:stop], scales[start // group_size:stop // group_size], (start, stop)


def shard_dequantising_with_library(q, scales, group_size, rank, world_size):
    from lessons_lib.compression import dequantize_int4
    dequantize_int4(q, scales)
    return shard_right(q, scales, group_size, rank, world_size)


@pytest.mark.parametrize("answer, fragments", [
    (shard_as_given, ["64, group_size=8", "on 3 ranks", "rank 0", "sliced by input column",
                      "scales[:, start // 8 : stop // 8]"]),
    (shard_columns_floor, ["rank 0 holds columns 0..20", "cuts group 2", "split the groups"]),
    (shard_groups_floor, ["columns 48..63 (groups 6..7) belong to no rank", "drops the remainder"]),
    (shard_groups_ceil, ["80, group_size=8", "on 4 ranks", "groups per rank [3, 3, 3, 1]",
                         "busiest rank"]),
    (shard_remainder_on_last, ["groups per rank [2, 2, 4]", "one more"]),
    (shard_scales_by_rows, ["rank 0's scales_shard has shape (3, 8)", "scales[:, 0:3]"]),
])
def test_int4_row_shard_wrong_answers(answer, fragments):
    assert_hint("09.int4_row_shard", answer, *fragments)


def test_int4_row_shard_verdicts():
    assert_correct("09.int4_row_shard", shard_right)
    assert_not_attempted("09.int4_row_shard", stub)
    assert_refused("09.int4_row_shard", shard_dequantising_with_library, "dequantize_int4")
