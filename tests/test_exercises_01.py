"""Lesson 01's exercises: the answers that pass, and a catalogue of plausible wrong ones, each
earning the hint about its own mistake."""

import pytest
import torch

from exercise_catalogue import assert_correct, assert_hint, assert_not_attempted, assert_refused

pytestmark = pytest.mark.lesson01


def stub(*args):
    raise NotImplementedError()


# -- 01.predict_kv_bytes ---------------------------------------------------------------------
# 4 layers, 2 KV heads of head_dim 16, bfloat16; batch 5; 7 prompt tokens + 4 decode steps cached.
RIGHT_KV = 2 * 4 * 2 * 16 * 2 * 5 * (7 + 4)


@pytest.mark.parametrize("wrong, fragments", [
    (RIGHT_KV * 3, ("predicted 84480", "measured 28160", "query heads")),
    (RIGHT_KV * 2, ("2 bytes, not 4",)),
    (RIGHT_KV // 2, ("a key *and* a value",)),
    (RIGHT_KV * 8, ("bits, not bytes",)),
    (RIGHT_KV // 5, ("each of the 5 sequences",)),
    (RIGHT_KV // 4, ("every one of the 4 layers",)),
    (2 * 4 * 2 * 16 * 2 * 5 * 7, ("decoding adds to the cache too",)),
    (2 * 4 * 2 * 16 * 2 * 5 * 12, ("one position too many", "not cached")),
    (12345, ("2 (K and V) x layers x KV heads",)),
])
def test_predict_kv_bytes_wrong(wrong, fragments):
    assert_hint("01.predict_kv_bytes", lambda: wrong, *fragments)


def predicted_by_the_library():
    from lessons_lib.model import ModelConfig, kv_cache_bytes_per_token
    return kv_cache_bytes_per_token(ModelConfig(dim=96, n_heads=6), torch.bfloat16) * 55


def test_predict_kv_bytes():
    assert_correct("01.predict_kv_bytes", lambda: RIGHT_KV)
    assert_not_attempted("01.predict_kv_bytes", stub)
    assert_refused("01.predict_kv_bytes", predicted_by_the_library, "kv_cache_bytes_per_token")
    assert_hint("01.predict_kv_bytes", lambda: None, "return a number")


# -- 01.device_memory ------------------------------------------------------------------------
def _kv_per_sequence(shape, context, nbytes, heads):
    return 2 * shape.n_layers * heads * shape.head_dim * nbytes * context


def memory_right(shape, batch, context, devices, strategy, bytes_per_value):
    weights = shape.param_count() * bytes_per_value
    sequences, heads, layer_share = batch, shape.n_kv_heads, 1.0
    if strategy == "data":
        sequences = -(-batch // devices)
    elif strategy == "tensor":
        weights /= devices
        heads = max(1, -(-shape.n_kv_heads // devices))
    elif strategy == "pipeline":
        layer_share = -(-shape.n_layers // devices) / shape.n_layers
        weights *= layer_share
    kv = _kv_per_sequence(shape, context, bytes_per_value, heads) * sequences * layer_share
    return weights, kv


def memory_dp_splits_weights(shape, batch, context, devices, strategy, bytes_per_value):
    weights, kv = memory_right(shape, batch, context, devices, strategy, bytes_per_value)
    return (weights / devices if strategy == "data" else weights), kv


def memory_tp_no_replication(shape, batch, context, devices, strategy, bytes_per_value):
    weights, kv = memory_right(shape, batch, context, devices, strategy, bytes_per_value)
    if strategy == "tensor":
        kv = _kv_per_sequence(shape, context, bytes_per_value, shape.n_kv_heads) * batch / devices
    return weights, kv


def memory_pp_floor(shape, batch, context, devices, strategy, bytes_per_value):
    weights, kv = memory_right(shape, batch, context, devices, strategy, bytes_per_value)
    if strategy == "pipeline":
        share = (shape.n_layers // devices) / shape.n_layers
        weights = shape.param_count() * bytes_per_value * share
    return weights, kv


def memory_dp_fractional_batch(shape, batch, context, devices, strategy, bytes_per_value):
    weights, kv = memory_right(shape, batch, context, devices, strategy, bytes_per_value)
    if strategy == "data":
        kv = _kv_per_sequence(shape, context, bytes_per_value, shape.n_kv_heads) * batch / devices
    return weights, kv


def memory_query_heads(shape, batch, context, devices, strategy, bytes_per_value):
    weights, kv = memory_right(shape, batch, context, devices, strategy, bytes_per_value)
    return weights, kv * shape.n_heads / shape.n_kv_heads


def memory_no_v(shape, batch, context, devices, strategy, bytes_per_value):
    weights, kv = memory_right(shape, batch, context, devices, strategy, bytes_per_value)
    return weights, kv / 2


def memory_by_the_library(shape, batch, context, devices, strategy, bytes_per_value):
    from lessons_lib.sizing import memory_per_device
    need = memory_per_device(shape, batch=batch, context=context, devices=devices, strategy=strategy)
    return need["weights"], need["kv_cache"]


def test_device_memory():
    assert_correct("01.device_memory", memory_right)
    assert_not_attempted("01.device_memory", stub)
    assert_refused("01.device_memory", memory_by_the_library, "memory_per_device")
    assert_hint("01.device_memory", memory_dp_splits_weights, "strategy='data'", "weights",
                "copies the whole model to every device")
    assert_hint("01.device_memory", memory_tp_no_replication, "devices=16", "KV cache",
                "only 8 KV heads", "replicated")
    assert_hint("01.device_memory", memory_pp_floor, "devices=3", "lightest stage (floor)",
                "ceil(32/3) = 11")
    assert_hint("01.device_memory", memory_dp_fractional_batch, "batch=5", "sequences are whole",
                "ceil(5/2) = 3")
    assert_hint("01.device_memory", memory_query_heads, "Llama-2-70B", "64 query heads")
    assert_hint("01.device_memory", memory_no_v, "Llama-2-7B, batch=1", "a key *and* a value")
    assert_hint("01.device_memory", lambda *args: 1.0, "return a pair of numbers")


# -- 01.fix_decode_loop ----------------------------------------------------------------------
def decode_right(model, prompt, new_tokens):
    cache = model.new_cache()
    ids, step_ids = prompt, prompt
    for _ in range(new_tokens):
        logits = model(step_ids, cache=cache)
        step_ids = logits[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, step_ids], dim=1)
    return ids, cache


def decode_as_given(model, prompt, new_tokens):
    cache = model.new_cache()
    ids = prompt
    for _ in range(new_tokens):
        logits = model(ids, cache=cache)
        next_id = logits[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids, cache


def decode_new_cache_each_step(model, prompt, new_tokens):
    ids, cache = prompt, model.new_cache()
    for step in range(new_tokens):
        cache = model.new_cache()
        logits = model(ids if step == 0 else ids[:, -1:], cache=cache)
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids, cache


def decode_without_prefill(model, prompt, new_tokens):
    cache = model.new_cache()
    ids = prompt
    for _ in range(new_tokens):
        logits = model(ids[:, -1:], cache=cache)
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids, cache


def decode_first_position(model, prompt, new_tokens):
    cache = model.new_cache()
    ids, step_ids = prompt, prompt
    for _ in range(new_tokens):
        logits = model(step_ids, cache=cache)
        step_ids = logits[:, 0].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, step_ids], dim=1)
    return ids, cache


def decode_by_the_library(model, prompt, new_tokens):
    from lessons_lib.model import generate
    return generate(model, prompt, new_tokens), model.new_cache()


def test_fix_decode_loop():
    assert_correct("01.fix_decode_loop", decode_right)
    assert_not_attempted("01.fix_decode_loop", stub)
    assert_refused("01.fix_decode_loop", decode_by_the_library, "generate")
    assert_hint("01.fix_decode_loop", decode_as_given, "new_tokens=6", "holds 111 position(s)",
                "expected 21", "16 + 17 + 18 + 19 + 20 + 21", "only the newest token")
    assert_hint("01.fix_decode_loop", decode_new_cache_each_step, "holds 1 position(s)",
                "a new cache each step")
    assert_hint("01.fix_decode_loop", decode_without_prefill, "holds 6 position(s)", "prefill")
    assert_hint("01.fix_decode_loop", decode_first_position, "new token 0 of row",
                "logits[:, -1]")
