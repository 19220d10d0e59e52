"""Lesson 03's exercises: the solutions pass, stubs are not attempted, the library's own
collectives are refused, and each plausible wrong answer earns the hint about its mistake.

Answers that run on ranks are module-level functions, so they reach the ranks by reference.
"""

import pytest
import torch
import torch.distributed as dist

from exercise_catalogue import assert_correct, assert_hidden_hint, assert_hint, assert_not_attempted, assert_refused
from lessons_lib.comm import bytes_sent, one_shot_all_reduce, ring_all_reduce, ring_schedule

pytestmark = pytest.mark.lesson03


def _stub(*args):
    raise NotImplementedError()


# -- 03.ring_bytes (predict) -------------------------------------------------------------------
def predicted_right():
    # Chunks 3, 3, 2, 2; rank r skips chunk r (reduce-scatter) and chunk r+1 (all-gather):
    # rank 2 skips the two small ones and sends 20 - 2 - 2 = 16 elements.
    return 16 * 4


def predicted_from_the_library():
    return max(bytes_sent(ring_schedule(4), 10, 4, 4))


@pytest.mark.parametrize("guess, fragments", [
    (60, ["you predicted 60", "sends 64", "average 2(p-1)/p", "3, 3, 2, 2"]),
    (56, ["fewest any rank sends", "busiest"]),
    (72, ["rounded up"]),
    (16, ["elements, not bytes"]),
    (512, ["bits"]),
    (32, ["one phase only"]),
    (80, ["p-1 steps"]),
    (240, ["total over all 4 ranks"]),
    (61, ["you predicted 61", "too low", "every chunk except chunk r"]),
])
def test_ring_bytes_names_the_mistake(guess, fragments):
    assert_hint("03.ring_bytes", lambda: guess, *fragments)


def test_ring_bytes_verdicts():
    assert_correct("03.ring_bytes", predicted_right)
    assert_not_attempted("03.ring_bytes", _stub)
    assert_hint("03.ring_bytes", predicted_from_the_library, "uses lessons_lib's own", "write it yourself")
    assert_hint("03.ring_bytes", lambda: "64", "return one number")


# -- 03.recursive_doubling (build) -------------------------------------------------------------
def _exchange(tensor, peer):
    other = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, peer), dist.P2POp(dist.irecv, other, peer)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return other


def doubling_right(tensor):
    rank, p = dist.get_rank(), dist.get_world_size()
    q = 1 << (p.bit_length() - 1)
    whole, sent = tensor.numel() * tensor.element_size(), 0
    if rank >= q:
        dist.send(tensor, rank - q)
        dist.recv(tensor, rank - q)
        return whole
    if rank + q < p:
        other = torch.empty_like(tensor)
        dist.recv(other, rank + q)
        tensor += other
    span = 1
    while span < q:
        tensor += _exchange(tensor, rank ^ span)
        sent += whole
        span *= 2
    if rank + q < p:
        dist.send(tensor, rank + q)
        sent += whole
    return sent


def doubling_without_the_extra_rank(tensor):
    rank, p = dist.get_rank(), dist.get_world_size()
    q = 1 << (p.bit_length() - 1)
    if rank >= q:
        return tensor.numel() * tensor.element_size()
    span, sent = 1, 0
    while span < q:
        tensor += _exchange(tensor, rank ^ span)
        sent += tensor.numel() * tensor.element_size()
        span *= 2
    return sent


def doubling_never_returning_the_sum(tensor):
    rank, p = dist.get_rank(), dist.get_world_size()
    q = 1 << (p.bit_length() - 1)
    whole = tensor.numel() * tensor.element_size()
    if rank >= q:
        dist.send(tensor, rank - q)
        return whole
    if rank + q < p:
        other = torch.empty_like(tensor)
        dist.recv(other, rank + q)
        tensor += other
    span, sent = 1, 0
    while span < q:
        tensor += _exchange(tensor, rank ^ span)
        sent += whole
        span *= 2
    return sent


def doubling_one_round(tensor):
    rank, p = dist.get_rank(), dist.get_world_size()
    if p == 4:   # stops after round 0: partners 0-1 and 2-3 only
        tensor += _exchange(tensor, rank ^ 1)
        return tensor.numel() * tensor.element_size() * 2
    return doubling_right(tensor)


def doubling_counting_elements(tensor):
    sent = doubling_right(tensor)
    return sent // tensor.element_size()


def doubling_assuming_float32(tensor):
    sent = doubling_right(tensor)
    return sent // tensor.element_size() * 4


def doubling_rebinding(tensor):
    rank, p = dist.get_rank(), dist.get_world_size()
    q = 1 << (p.bit_length() - 1)
    whole, sent = tensor.numel() * tensor.element_size(), 0
    if rank >= q:
        dist.send(tensor, rank - q)
        dist.recv(tensor, rank - q)
        return whole
    if rank + q < p:
        other = torch.empty_like(tensor)
        dist.recv(other, rank + q)
        tensor = tensor + other
    span = 1
    while span < q:
        tensor = tensor + _exchange(tensor, rank ^ span)
        sent += whole
        span *= 2
    if rank + q < p:
        dist.send(tensor, rank + q)
        sent += whole
    return sent


def doubling_averaging(tensor):
    sent = doubling_right(tensor)
    tensor /= dist.get_world_size()
    return sent


def doubling_with_all_reduce(tensor):
    dist.all_reduce(tensor)
    return doubling_bytes_formula(tensor)


def doubling_bytes_formula(tensor):
    rank, p = dist.get_rank(), dist.get_world_size()
    q = 1 << (p.bit_length() - 1)
    rounds = q.bit_length() - 1
    whole = tensor.numel() * tensor.element_size()
    return whole if rank >= q else (rounds + (rank + q < p)) * whole


def doubling_with_the_ring(tensor):
    ring_all_reduce(tensor)
    return 0


def doubling_with_one_shot(tensor):
    return one_shot_all_reduce(tensor)


@pytest.mark.parametrize("answer, fragments", [
    (doubling_without_the_extra_rank, ["p=3, n=5 float32", "rank 0", "lacks the input of rank 2",
                                       "fold each extra rank"]),
    (doubling_never_returning_the_sum, ["p=3, n=5 float32: rank 2", "its own input, unchanged",
                                        "extra rank", "rank 0 must send it the finished sum"]),
    (doubling_one_round, ["p=4, n=5 float32: rank 0", "lacks the input of ranks 2, 3", "partner r XOR 2**k"]),
    (doubling_counting_elements, ["rank 0 reported 10 bytes sent, it sends 40", "counts elements"]),
    (doubling_assuming_float32, ["p=4, n=3 float64", "assumes 4 bytes per element"]),
    (doubling_rebinding, ["p=3, n=5 float32: rank 0", "its own input, unchanged", "rebinding the name"]),
    (doubling_averaging, ["divided by p", "does not average"]),
    (doubling_with_all_reduce, ["calls dist.all_reduce", "point-to-point"]),
])
def test_recursive_doubling_names_the_mistake(answer, fragments):
    assert_hint("03.recursive_doubling", answer, *fragments)


def doubling_folding_one_extra_rank(tensor):
    """Folds rank q into rank 0 as if it were the only extra rank: right for p = 3 and 5, not 6."""
    rank, p = dist.get_rank(), dist.get_world_size()
    q = 1 << (p.bit_length() - 1)
    whole, sent = tensor.numel() * tensor.element_size(), 0
    if rank >= q:
        if rank == q:
            dist.send(tensor, 0)
            dist.recv(tensor, 0)
        return whole
    if rank == 0 and p > q:
        other = torch.empty_like(tensor)
        dist.recv(other, q)
        tensor += other
    span = 1
    while span < q:
        tensor += _exchange(tensor, rank ^ span)
        sent += whole
        span *= 2
    if rank == 0 and p > q:
        dist.send(tensor, q)
        sent += whole
    return sent


def test_recursive_doubling_hidden_case_has_two_extra_ranks():
    # The public cases have at most one extra rank (p=3); the hidden p=6 has two.
    assert_hidden_hint("03.recursive_doubling", doubling_folding_one_extra_rank, "p=6, n=7 float32",
                       "lacks the input of rank 5", "fold each extra rank r >= 4 into rank r - 4")


def test_recursive_doubling_verdicts():
    assert_correct("03.recursive_doubling", doubling_right)
    assert_not_attempted("03.recursive_doubling", _stub)
    assert_refused("03.recursive_doubling", doubling_with_the_ring, "ring_all_reduce")
    assert_refused("03.recursive_doubling", doubling_with_one_shot, "one_shot_all_reduce")


# -- 03.kv_rotation (stretch) ------------------------------------------------------------------
def rotation_given(block):
    rank, p = dist.get_rank(), dist.get_world_size()
    gathered = torch.zeros((p,) + tuple(block.shape), dtype=block.dtype)
    gathered[rank] = block
    current = block
    for step in range(p - 1):
        dist.send(current, (rank + 1) % p)
        incoming = torch.empty_like(current)
        dist.recv(incoming, (rank - 1) % p)
        gathered[(rank - step) % p] = incoming
        current = incoming
    return gathered


def _pass_right(current):
    rank, p = dist.get_rank(), dist.get_world_size()
    incoming = torch.empty_like(current)
    ops = [dist.P2POp(dist.isend, current, (rank + 1) % p),
           dist.P2POp(dist.irecv, incoming, (rank - 1) % p)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return incoming


def rotation_right(block):
    rank, p = dist.get_rank(), dist.get_world_size()
    gathered = torch.zeros((p,) + tuple(block.shape), dtype=block.dtype)
    gathered[rank] = block
    current = block
    for step in range(p - 1):
        current = _pass_right(current)
        gathered[(rank - step - 1) % p] = current
    return gathered


def rotation_index_still_off(block):
    rank, p = dist.get_rank(), dist.get_world_size()
    gathered = torch.zeros((p,) + tuple(block.shape), dtype=block.dtype)
    gathered[rank] = block
    current = block
    for step in range(p - 1):
        current = _pass_right(current)
        gathered[(rank - step) % p] = current
    return gathered


def rotation_forwarding_its_own(block):
    rank, p = dist.get_rank(), dist.get_world_size()
    gathered = torch.zeros((p,) + tuple(block.shape), dtype=block.dtype)
    gathered[rank] = block
    for step in range(p - 1):
        gathered[(rank - step - 1) % p] = _pass_right(block)
    return gathered


def rotation_as_a_list(block):
    rank, p = dist.get_rank(), dist.get_world_size()
    blocks = [None] * p
    blocks[rank] = block
    current = block
    for step in range(p - 1):
        current = _pass_right(current)
        blocks[(rank - step - 1) % p] = current
    return blocks


def rotation_in_float32(block):
    rank, p = dist.get_rank(), dist.get_world_size()
    gathered = torch.zeros((p,) + tuple(block.shape))
    gathered[rank] = block
    current = block
    for step in range(p - 1):
        current = _pass_right(current)
        gathered[(rank - step - 1) % p] = current
    return gathered


def rotation_with_all_gather(block):
    parts = [torch.empty_like(block) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, block)
    return torch.stack(parts)


@pytest.mark.parametrize("answer, fragments", [
    (rotation_index_still_off, ["p=3", "rank 0, position 0 should hold rank 0's block but holds rank 2's",
                                "own block was overwritten", "(rank - s - 1) % p"]),
    (rotation_forwarding_its_own, ["p=3", "stored twice", "not your own"]),
    (rotation_as_a_list, ["returned a list", "torch.stack"]),
    (rotation_in_float32, ["float64", "dtype=block.dtype"]),
    (rotation_with_all_gather, ["calls dist.all_gather", "point-to-point"]),
])
def test_kv_rotation_names_the_mistake(answer, fragments):
    assert_hint("03.kv_rotation", answer, *fragments)


def test_kv_rotation_verdicts():
    assert_correct("03.kv_rotation", rotation_right)
    assert_not_attempted("03.kv_rotation", _stub)


def test_the_given_rotation_is_reported_as_a_deadlock_in_send():
    message = assert_hint("03.kv_rotation", rotation_given, "p=3", "deadlocked")
    assert "send" in message and "rotation_given" in message
