"""Latency vs throughput: the bandwidth floor of a real model and the tiny LM's measured sweep."""

import pytest

import lessons_lib.sizing.throughput as throughput
from lessons_lib.model import load_tiny_lm
from lessons_lib.sizing import (H100_SXM_BF16_FLOPS, H100_SXM_HBM_BYTES_PER_S, LLAMA2_70B, batch_sweep,
                                critical_batch, decode_floor_s, dispatch_s, fixed_and_per_sequence,
                                operators_per_decode_step, weight_bytes, weight_read_s)

pytestmark = pytest.mark.lesson01


def test_decode_floor_is_weight_bytes_over_bandwidth():
    one = decode_floor_s(weight_bytes(LLAMA2_70B, "bf16"), H100_SXM_HBM_BYTES_PER_S)
    assert one == pytest.approx(68.98e9 * 2 / 3.35e12, rel=1e-3)          # about 41 ms
    tp8 = decode_floor_s(weight_bytes(LLAMA2_70B, "bf16") / 8, H100_SXM_HBM_BYTES_PER_S)
    assert tp8 == pytest.approx(one / 8)
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s"):
        decode_floor_s(1e9, 0)


def test_critical_batch_of_an_h100_in_bf16():
    assert critical_batch(H100_SXM_BF16_FLOPS, H100_SXM_HBM_BYTES_PER_S) == pytest.approx(295, abs=1)
    assert critical_batch(1e12, 1e12, bytes_per_weight=1) == 0.5


def test_sweep_warms_up_then_interleaves_rounds_and_keeps_the_best(monkeypatch):
    calls = []

    def fake_generate(model, ids, new_tokens, timings):
        calls.append(ids.shape[0])
        timings.update(prefill_s=0.0, decode_s=0.0)

    monkeypatch.setattr(throughput, "generate", fake_generate)

    class Model:
        class config:
            vocab_size = 264

    rows = batch_sweep(Model(), batch_sizes=(1, 4), new_tokens=2, repeats=3)
    assert calls == [1, 4] * 4                     # a warm-up round, then three interleaved rounds
    assert [r["batch"] for r in rows] == [1, 4]


def test_sweep_on_the_tiny_lm_and_the_fixed_cost_fit():
    model, _ = load_tiny_lm()
    rows = batch_sweep(model, batch_sizes=(1, 2), new_tokens=3, repeats=1)
    assert all(r["latency_s"] > 0 and r["decode_step_s"] > 0 for r in rows)
    assert rows[1]["tokens_per_s"] == pytest.approx(2 * 3 / rows[1]["latency_s"])
    line = [{"batch": b, "decode_step_s": 0.002 + 0.0001 * b} for b in (1, 2, 4, 8)]
    fixed, per_sequence = fixed_and_per_sequence(line)
    assert fixed == pytest.approx(0.002) and per_sequence == pytest.approx(0.0001)
    with pytest.raises(ValueError, match="rows"):
        fixed_and_per_sequence(line[:1])


def test_a_decode_step_dispatches_hundreds_of_operators():
    model, _ = load_tiny_lm()
    n = operators_per_decode_step(model)
    assert n >= 10 * model.config.n_layers       # every layer: norms, projections, rope, attention, MLP
    assert operators_per_decode_step(model, batch=8) == n  # the count does not grow with the batch


def test_weight_read_and_dispatch_are_measured():
    model, _ = load_tiny_lm()
    assert 0 < weight_read_s(model, repeats=2) < 1
    assert 0 < dispatch_s(10, repeats=2) < 1
    with pytest.raises(ValueError, match="n_ops"):
        dispatch_s(0)
