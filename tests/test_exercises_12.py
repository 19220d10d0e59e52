"""Lesson 12's exercises: every catalogued wrong answer earns the hint for its mistake."""

import pytest
import torch
import torch.distributed as dist

from exercise_catalogue import (assert_correct, assert_hint, assert_not_attempted, assert_refused,
                               solution_function)

pytestmark = pytest.mark.lesson12


# -- 12.predict_rank_bytes ---------------------------------------------------------------------
predicted_rank_bytes = solution_function("12_tensor_parallel", "predicted_rank_bytes")


TOTAL = 4 * (2 * 264 * 64 + 2 * (64 * 64 * 2 + 2 * 16 * 64 + 3 * 160 * 64 + 128) + 64)
NORMS = 4 * (2 * 128 + 64)
KV = 4 * 2 * 2 * 16 * 64


@pytest.mark.parametrize("guess, fragments", [
    (TOTAL / 4, ["norms are replicated", "KV head is replicated"]),
    ((TOTAL - NORMS) / 4 + NORMS, ["whole KV head"]),
    ((TOTAL - KV) / 4 + KV, ["RMSNorm weights are replicated"]),
    (129280 / 4, ["elements"]),
    (129280 / 2, ["bfloat16"]),
    (TOTAL, ["whole model"]),
    (100000, ["layer by layer"]),
])
def test_predict_rank_bytes_names_the_mistake(guess, fragments):
    assert_hint("12.predict_rank_bytes", lambda: guess, *fragments)


def test_predict_rank_bytes_verdicts():
    assert_correct("12.predict_rank_bytes", predicted_rank_bytes)

    def stub():
        raise NotImplementedError()
    assert_not_attempted("12.predict_rank_bytes", stub)

    def measuring():
        from lessons_lib.exercises.lesson12 import measured_rank_bytes
        return measured_rank_bytes()
    assert_refused("12.predict_rank_bytes", measuring, "measured_rank_bytes")


# -- 12.vocab_argmax ---------------------------------------------------------------------------
def vocab_argmax(local_logits, vocab_start):
    batch = local_logits.shape[0]
    if local_logits.shape[1]:
        best, index = local_logits.max(dim=-1)
        index = index + vocab_start
    else:
        best = torch.full((batch,), float("-inf"))
        index = torch.zeros(batch, dtype=torch.long)
    top = best.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    # among the ranks holding the best value, the smallest token id wins
    candidate = torch.where(best == top, index, torch.full_like(index, torch.iinfo(torch.long).max))
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN)
    return candidate


def vocab_argmax_local_index(local_logits, vocab_start):
    out = vocab_argmax(local_logits, vocab_start)
    return out - vocab_start if dist.get_rank() == 0 else out - vocab_start


def vocab_argmax_last_tie(local_logits, vocab_start):
    batch = local_logits.shape[0]
    if local_logits.shape[1]:
        best, index = local_logits.max(dim=-1)
        index = index + vocab_start
    else:
        best, index = torch.full((batch,), float("-inf")), torch.zeros(batch, dtype=torch.long)
    top = best.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    candidate = torch.where(best == top, index, torch.full_like(index, -1))
    dist.all_reduce(candidate, op=dist.ReduceOp.MAX)
    return candidate


def vocab_argmax_gathering(local_logits, vocab_start):
    p = dist.get_world_size()
    vocab = torch.tensor([local_logits.shape[1]])
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(p)]
    dist.all_gather(sizes, vocab)
    most = int(max(sizes))
    padded = torch.full((local_logits.shape[0], most), float("-inf"))
    padded[:, :local_logits.shape[1]] = local_logits
    parts = [torch.empty_like(padded) for _ in range(p)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:, :int(n)] for part, n in zip(parts, sizes)], dim=1).argmax(dim=-1)


def vocab_argmax_zero_for_empty(local_logits, vocab_start):
    batch = local_logits.shape[0]
    if local_logits.shape[1]:
        best, index = local_logits.max(dim=-1)
        index = index + vocab_start
    else:
        best, index = torch.zeros(batch), torch.full((batch,), vocab_start)
    top = best.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    candidate = torch.where(best == top, index, torch.full_like(index, torch.iinfo(torch.long).max))
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN)
    return candidate


def vocab_argmax_with_the_library(local_logits, vocab_start):
    from lessons_lib.parallel.tensor import ParallelLMHead
    return ParallelLMHead


@pytest.mark.parametrize("answer, fragments", [
    (vocab_argmax_local_index, ["inside a rank's slice", "vocab_start"]),
    (vocab_argmax_last_tie, ["tie", "smallest id"]),
    (vocab_argmax_gathering, ["gathering the logits"]),
    (vocab_argmax_zero_for_empty, ["holds no vocabulary", "minus infinity"]),
])
def test_vocab_argmax_names_the_mistake(answer, fragments):
    assert_hint("12.vocab_argmax", answer, *fragments)


def test_vocab_argmax_verdicts():
    assert_correct("12.vocab_argmax", vocab_argmax)
    assert_refused("12.vocab_argmax", vocab_argmax_with_the_library, "ParallelLMHead")

    def stub(local_logits, vocab_start):
        raise NotImplementedError()
    assert_not_attempted("12.vocab_argmax", stub)


# -- 12.fused_qkv_shard ------------------------------------------------------------------------
fused_qkv_shard = solution_function("12_tensor_parallel", "fused_qkv_shard")


def contiguous_chunk(weight, n_heads, n_kv_heads, head_dim, tp, rank):
    return weight.chunk(tp)[rank]


def kv_not_replicated(weight, n_heads, n_kv_heads, head_dim, tp, rank):
    q, k, v = weight.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim])
    per_q = n_heads // tp
    q_rows = q[rank * per_q * head_dim:(rank + 1) * per_q * head_dim]
    per_kv = max(1, n_kv_heads // tp)
    kv = slice(rank * per_kv * head_dim, (rank + 1) * per_kv * head_dim)
    return torch.cat([q_rows, k[kv], v[kv]])


def v_before_k(weight, n_heads, n_kv_heads, head_dim, tp, rank):
    shard = fused_qkv_shard(weight, n_heads, n_kv_heads, head_dim, tp, rank)
    q_rows = n_heads // tp * head_dim
    kv = (shard.shape[0] - q_rows) // 2
    return torch.cat([shard[:q_rows], shard[q_rows + kv:], shard[q_rows:q_rows + kv]])


def qkv_with_the_library(weight, n_heads, n_kv_heads, head_dim, tp, rank):
    from lessons_lib.parallel.tensor import shard_indices
    return weight[shard_indices(weight.shape[0], tp, rank)]


@pytest.mark.parametrize("answer, fragments", [
    (contiguous_chunk, ["contiguous 1/tp", "split each part by heads"]),
    (kv_not_replicated, ["k1", "replicated on tp // n_kv_heads ranks"]),
    (v_before_k, ["as k then v"]),
])
def test_fused_qkv_shard_names_the_mistake(answer, fragments):
    assert_hint("12.fused_qkv_shard", answer, *fragments)


def test_fused_qkv_shard_verdicts():
    assert_correct("12.fused_qkv_shard", fused_qkv_shard)
    assert_refused("12.fused_qkv_shard", qkv_with_the_library, "shard_indices")

    def stub(weight, n_heads, n_kv_heads, head_dim, tp, rank):
        raise NotImplementedError()
    assert_not_attempted("12.fused_qkv_shard", stub)
