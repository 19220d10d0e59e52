"""Lesson 02's exercises: the answers that pass, and a catalogue of plausible wrong ones, each
earning the hint about its own mistake."""

import pytest
import torch.distributed as dist
import torch.nn.functional as F

from exercise_catalogue import assert_correct, assert_hint, assert_not_attempted, assert_refused

pytestmark = pytest.mark.lesson02


def stub(*args):
    raise NotImplementedError()


# -- 02.predict_tp_bytes ---------------------------------------------------------------------
# 4 layers x 2 row-parallel all-reduces + 1 for the embedding; each of batch 3 x dim 128 float32.
RIGHT_TP = (2 * 4 + 1) * 3 * 128 * 4


def predicted_by_measuring():
    from lessons_lib import run_distributed
    return run_distributed(lambda: 0, 4)[0]


@pytest.mark.parametrize("wrong, fragments", [
    (8 * 3 * 128 * 4, ("predicted 12288", "measured 13824", "embedding all-reduces too")),
    (5 * 3 * 128 * 4, ("two all-reduces per layer, not one",)),
    (RIGHT_TP // 4, ("full hidden vector", "not 1/4")),
    (RIGHT_TP // 2, ("float32",)),
    (RIGHT_TP * 5, ("one new token per sequence",)),
    (RIGHT_TP * 3 // 2, ("ring all-reduce",)),
    (RIGHT_TP + 3 * 264 * 4, ("all_gather, not all-reduced",)),
    (99999, ("batch x dim float32",)),
])
def test_predict_tp_bytes_wrong(wrong, fragments):
    assert_hint("02.predict_tp_bytes", lambda: wrong, *fragments)


def test_predict_tp_bytes():
    assert_correct("02.predict_tp_bytes", lambda: RIGHT_TP)
    assert_not_attempted("02.predict_tp_bytes", stub)
    assert_refused("02.predict_tp_bytes", predicted_by_measuring, "run_distributed")


# -- 02.tp_attention -------------------------------------------------------------------------
def attention(x, wq, wk, wv, wo, head_dim):
    batch, seq, _ = x.shape
    n_q, n_kv = wq.shape[0] // head_dim, wk.shape[0] // head_dim
    q = (x @ wq.T).view(batch, seq, n_q, head_dim).transpose(1, 2)
    k = (x @ wk.T).view(batch, seq, n_kv, head_dim).transpose(1, 2)
    v = (x @ wv.T).view(batch, seq, n_kv, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_q != n_kv)
    return out.transpose(1, 2).reshape(batch, seq, n_q * head_dim) @ wo.T


def _slices(wq, wk, wv, wo, n_heads, n_kv_heads, kv_of_rank):
    rank, tp = dist.get_rank(), dist.get_world_size()
    hd = wq.shape[0] // n_heads
    per = n_heads // tp
    q = slice(rank * per * hd, (rank + 1) * per * hd)
    first, count = kv_of_rank(rank, tp, per, n_heads, n_kv_heads)
    kv = slice(first * hd, (first + count) * hd)
    return wq[q], wk[kv], wv[kv], wo[:, q], hd


def _kv_grouped(rank, tp, per, n_heads, n_kv):
    if tp <= n_kv:
        return rank * (n_kv // tp), n_kv // tp
    return (rank * per) // (n_heads // n_kv), 1


def _kv_round_robin(rank, tp, per, n_heads, n_kv):
    if tp <= n_kv:
        return rank * (n_kv // tp), n_kv // tp
    return rank % n_kv, 1


def tp_attention_right(x, wq, wk, wv, wo, n_heads, n_kv_heads):
    *local, hd = _slices(wq, wk, wv, wo, n_heads, n_kv_heads, _kv_grouped)
    out = attention(x, *local, hd)
    dist.all_reduce(out)
    return out


def tp_attention_no_all_reduce(x, wq, wk, wv, wo, n_heads, n_kv_heads):
    *local, hd = _slices(wq, wk, wv, wo, n_heads, n_kv_heads, _kv_grouped)
    return attention(x, *local, hd)


def tp_attention_averaged(x, wq, wk, wv, wo, n_heads, n_kv_heads):
    out = tp_attention_right(x, wq, wk, wv, wo, n_heads, n_kv_heads)
    return out / dist.get_world_size()


def tp_attention_round_robin_kv(x, wq, wk, wv, wo, n_heads, n_kv_heads):
    *local, hd = _slices(wq, wk, wv, wo, n_heads, n_kv_heads, _kv_round_robin)
    out = attention(x, *local, hd)
    dist.all_reduce(out)
    return out


def tp_attention_kv_chunked(x, wq, wk, wv, wo, n_heads, n_kv_heads):
    rank, tp = dist.get_rank(), dist.get_world_size()
    hd = wq.shape[0] // n_heads
    local = [w.chunk(tp, dim=0)[rank] for w in (wq, wk, wv)] + [wo.chunk(tp, dim=1)[rank]]
    out = attention(x, *local, hd)
    dist.all_reduce(out)
    return out


def tp_attention_o_proj_by_rows(x, wq, wk, wv, wo, n_heads, n_kv_heads):
    rank, tp = dist.get_rank(), dist.get_world_size()
    wq_, wk_, wv_, _, hd = _slices(wq, wk, wv, wo, n_heads, n_kv_heads, _kv_grouped)
    out = attention(x, wq_, wk_, wv_, wo.chunk(tp, dim=0)[rank], hd)
    dist.all_reduce(out)
    return out


def tp_attention_by_the_library(x, wq, wk, wv, wo, n_heads, n_kv_heads):
    from lessons_lib.parallel.tensor import shard_indices
    rows = shard_indices(wq.shape[0], dist.get_world_size(), dist.get_rank())
    return x @ wq[rows].T


def test_tp_attention():
    assert_correct("02.tp_attention", tp_attention_right)
    assert_not_attempted("02.tp_attention", stub)
    assert_refused("02.tp_attention", tp_attention_by_the_library, "shard_indices")
    assert_hint("02.tp_attention", tp_attention_no_all_reduce, "tp=3, n_heads=6", "own heads' part",
                "all-reduce (sum)")
    assert_hint("02.tp_attention", tp_attention_averaged, "divided by 3", "do not average")
    assert_hint("02.tp_attention", tp_attention_round_robin_kv, "tp=4, n_heads=4, n_kv_heads=2",
                "rank 1 holds query head(s) [1], which use KV head 0", "took KV head 1",
                "replicated on the 2 ranks")
    assert_hint("02.tp_attention", tp_attention_kv_chunked, "tp=3, n_heads=3, n_kv_heads=1",
                "raised", "rows of wk and wv, shape (4, 8)", "replicated on the 3 ranks")
    assert_hint("02.tp_attention", tp_attention_o_proj_by_rows, "tp=3, n_heads=6", "raised",
                "columns of wo, shape (12, 8)")


# -- 02.choose_layout ------------------------------------------------------------------------
GIB = 2 ** 30


def layout_right(shape, gpus, device_gib, context, sequences, *, largest_tp_first=False,
                 reserve=0.1, replicate_kv=True, split=True):
    tps = [t for t in range(1, gpus + 1) if gpus % t == 0 and shape.n_heads % t == 0
           and (shape.n_kv_heads % t == 0 or t % shape.n_kv_heads == 0)]
    for tp in (reversed(tps) if largest_tp_first else tps):
        dp = gpus // tp
        mine = -(-sequences // dp) if split else sequences
        kv_heads = max(1, shape.n_kv_heads // tp) if replicate_kv else shape.n_kv_heads / tp
        weights = shape.param_count() * 2 / tp
        kv = 2 * shape.n_layers * kv_heads * shape.head_dim * 2 * context * mine
        if weights + kv <= (1 - reserve) * device_gib * GIB:
            return tp, dp
    return None


def layout_most_kv_room(*args):
    return layout_right(*args, largest_tp_first=True)


def layout_every_replica_all_sequences(*args):
    return layout_right(*args, split=False)


def layout_no_reserve(*args):
    return layout_right(*args, reserve=0.0)


def layout_kv_not_replicated(*args):
    return layout_right(*args, replicate_kv=False)


def layout_as_list(*args):
    found = layout_right(*args)
    return None if found is None else list(map(float, found))


def layout_by_the_library(shape, gpus, device_gib, context, sequences):
    from lessons_lib.sizing import fits, memory_per_device
    need = memory_per_device(shape, batch=sequences, context=context, devices=gpus,
                             strategy="tensor")
    return (gpus, 1) if fits(need, device_gib, headroom=0.1) else None


def test_choose_layout():
    assert_correct("02.choose_layout", layout_right)
    assert_not_attempted("02.choose_layout", stub)
    assert_refused("02.choose_layout", layout_by_the_library, "memory_per_device")
    assert_hint("02.choose_layout", layout_most_kv_room, "Llama-2-70B on 8 GPUs",
                "you chose (8, 1), expected (4, 2)", "most replicas", "tp=4 x dp=2")
    assert_hint("02.choose_layout", layout_every_replica_all_sequences, "expected (4, 2)",
                "only its share of the sequences")
    assert_hint("02.choose_layout", layout_no_reserve, "300 sequences", "expected (8, 1)",
                "0.9 x device memory", "79.0 GiB per device (too much)")
    assert_hint("02.choose_layout", layout_kv_not_replicated, "on 16 GPUs", "expected None",
                "fraction of a KV head")
    assert_hint("02.choose_layout", layout_as_list, "pair of ints")
