"""Lesson 13's exercises: every catalogued wrong answer earns the hint for its mistake."""

import pytest
import torch
import torch.distributed as dist

from exercise_catalogue import (assert_correct, assert_hint, assert_not_attempted, assert_refused,
                               solution_function)

pytestmark = pytest.mark.lesson13


# -- 13.predict_stage_bytes --------------------------------------------------------------------
predicted_stage_bytes = solution_function("13_pipeline_parallel", "predicted_stage_bytes")


PAYLOAD = 6 * 8 * 128 * 4 + 4 * 6 * 128 * 4
HEADERS = 5 * 3 * 80


@pytest.mark.parametrize("guess, fragments", [
    (PAYLOAD, ["activations alone", "header"]),
    (PAYLOAD + 5 * 80, ["one header per pass"]),
    (PAYLOAD + 6 * 128 * 4 + 6 * 3 * 80, ["one pass too many"]),
    (sum(6 * (8 + k) * 128 * 4 for k in range(5)) + HEADERS, ["KV cache"]),
    ((PAYLOAD + HEADERS) * 8, ["bits"]),
    (PAYLOAD // 2 + HEADERS, ["float32", "4 bytes"]),
    (2 * (PAYLOAD + HEADERS), ["stage 0 sends to stage 1 only"]),
    (PAYLOAD + HEADERS + 5 * 6 * 8, ["broadcasts"]),
    (12345, ["Count per pass"]),
])
def test_predict_stage_bytes_names_the_mistake(guess, fragments):
    assert_hint("13.predict_stage_bytes", lambda: guess, *fragments)


def test_predict_stage_bytes_verdicts():
    assert_correct("13.predict_stage_bytes", predicted_stage_bytes)
    assert_hint("13.predict_stage_bytes", lambda: "38 KB", "one number")

    def stub():
        raise NotImplementedError()
    assert_not_attempted("13.predict_stage_bytes", stub)

    def measuring():
        from lessons_lib.exercises.lesson13 import measured_stage_bytes
        return measured_stage_bytes()
    assert_refused("13.predict_stage_bytes", measuring, "measured_stage_bytes")


# -- 13.stage_loop -----------------------------------------------------------------------------
def _recv_from(src, shape=None):
    if shape is None:
        header = torch.empty(3, dtype=torch.int64)
        dist.recv(header, src)
        shape = header.tolist()
    x = torch.empty(*shape)
    dist.recv(x, src)
    return x


def _send_to(dst, y, header=True):
    if header:
        dist.send(torch.tensor(y.shape, dtype=torch.int64), dst)
    dist.send(y.contiguous(), dst)


def stage_loop(stage, inputs, n_steps):
    rank, p = dist.get_rank(), dist.get_world_size()
    outputs = []
    for step in range(n_steps):
        x = inputs[step] if rank == 0 else _recv_from(rank - 1)
        y = stage(x)
        if rank < p - 1:
            _send_to(rank + 1, y)
        else:
            outputs.append(y)
    return outputs if rank == p - 1 else None


def stage_loop_first_shape_kept(stage, inputs, n_steps):
    """The header is read once; later steps reuse its shape."""
    rank, p = dist.get_rank(), dist.get_world_size()
    outputs, shape = [], None
    for step in range(n_steps):
        if rank == 0:
            x = inputs[step]
        else:
            x = _recv_from(rank - 1, shape) if shape else _recv_from(rank - 1)
            shape = list(x.shape)
        y = stage(x)
        if rank < p - 1:
            _send_to(rank + 1, y, header=step == 0)
        else:
            outputs.append(y)
    return outputs if rank == p - 1 else None


def stage_loop_skipping_the_middle(stage, inputs, n_steps):
    """A middle stage forwards what it receives without running its layers."""
    rank, p = dist.get_rank(), dist.get_world_size()
    outputs = []
    for step in range(n_steps):
        x = inputs[step] if rank == 0 else _recv_from(rank - 1)
        y = x if 0 < rank < p - 1 else stage(x)
        if rank < p - 1:
            _send_to(rank + 1, y)
        else:
            outputs.append(y)
    return outputs if rank == p - 1 else None


def stage_loop_first_rank_returns(stage, inputs, n_steps):
    """The outputs are kept by every rank."""
    rank, p = dist.get_rank(), dist.get_world_size()
    outputs = []
    for step in range(n_steps):
        x = inputs[step] if rank == 0 else _recv_from(rank - 1)
        y = stage(x)
        if rank < p - 1:
            _send_to(rank + 1, y)
        outputs.append(y)
    return outputs


def stage_loop_last_rank_forgets(stage, inputs, n_steps):
    rank, p = dist.get_rank(), dist.get_world_size()
    for step in range(n_steps):
        x = inputs[step] if rank == 0 else _recv_from(rank - 1)
        y = stage(x)
        if rank < p - 1:
            _send_to(rank + 1, y)
    return None


def stage_loop_waiting_for_an_ack(stage, inputs, n_steps):
    """Each stage waits for the next one to say it is ready: nobody ever says it first."""
    rank, p = dist.get_rank(), dist.get_world_size()
    outputs = []
    for step in range(n_steps):
        if rank < p - 1:
            dist.recv(torch.empty(1), rank + 1)
        x = inputs[step] if rank == 0 else _recv_from(rank - 1)
        if rank > 0:
            dist.send(torch.ones(1), rank - 1)
        y = stage(x)
        if rank < p - 1:
            _send_to(rank + 1, y)
        else:
            outputs.append(y)
    return outputs if rank == p - 1 else None


def stage_loop_with_the_library(stage, inputs, n_steps):
    from lessons_lib.parallel.pipeline import send_tensor
    return send_tensor(stage(inputs[0]), 1)


def stage_loop_stub(stage, inputs, n_steps):
    raise NotImplementedError()


@pytest.mark.parametrize("answer, fragments", [
    (stage_loop_skipping_the_middle, ["without stage 1's layers"]),
    (stage_loop_first_rank_returns, ["rank 0 returned list", "only the last stage"]),
    (stage_loop_last_rank_forgets, ["returned None", "holds the model's outputs"]),
    (stage_loop_first_shape_kept, ["send the shape first", "header"]),
    (stage_loop_waiting_for_an_ack, ["deadlock", "waits in recv"]),
])
def test_stage_loop_names_the_mistake(answer, fragments):
    assert_hint("13.stage_loop", answer, *fragments)


def test_stage_loop_verdicts():
    assert_not_attempted("13.stage_loop", stage_loop_stub)
    assert_refused("13.stage_loop", stage_loop_with_the_library, "send_tensor")
    assert_correct("13.stage_loop", stage_loop)


# -- 13.balanced_stages ------------------------------------------------------------------------
balanced_stages = solution_function("13_pipeline_parallel", "balanced_stages")


def equal_block_counts(costs, p):
    n = len(costs)
    sizes = [n // p + (1 if s < n % p else 0) for s in range(p)]
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


def greedy_average(costs, p):
    target = sum(costs) / p
    out, start, load = [], 0, 0.0
    for i, c in enumerate(costs):
        if load + c > target and i > start and len(out) < p - 1:
            out.append(range(start, i))
            start, load = i, 0.0
        load += c
    out.append(range(start, len(costs)))
    return out


def leaves_a_stage_empty(costs, p):
    return equal_block_counts(costs, p - 1) + [range(len(costs), len(costs))]


def round_robin(costs, p):
    return [range(s, len(costs), p) for s in range(p)]


def with_the_library(costs, p):
    from lessons_lib.parallel.pipeline import partition_layers
    return partition_layers(len(costs), p)


@pytest.mark.parametrize("answer, fragments", [
    (equal_block_counts, ["equal block counts", "heavy embedding and head"]),
    (greedy_average, ["greedy fill"]),
    (leaves_a_stage_empty, ["has no blocks"]),
    (round_robin, ["contiguous"]),
])
def test_balanced_stages_names_the_mistake(answer, fragments):
    assert_hint("13.balanced_stages", answer, *fragments)


def test_balanced_stages_verdicts():
    assert_correct("13.balanced_stages", balanced_stages)
    assert_refused("13.balanced_stages", with_the_library, "partition_layers")

    def stub(costs, p):
        raise NotImplementedError()
    assert_not_attempted("13.balanced_stages", stub)
