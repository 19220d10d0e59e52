"""Memory maths of real model sizes, and the calculator widget."""

import matplotlib
import pytest

matplotlib.use("Agg")

from lessons_lib.sizing import (GiB, LLAMA2_13B, LLAMA2_70B, LLAMA2_7B, activation_bytes, fits,
                                kv_cache_bytes, memory_per_device, usable_bytes, weight_bytes)
from lessons_lib.viz.memory import MemoryCalculator, memory_report

pytestmark = pytest.mark.lesson01


@pytest.mark.parametrize("shape, published_billions", [
    (LLAMA2_7B, 6.74), (LLAMA2_13B, 13.02), (LLAMA2_70B, 68.98),
])
def test_parameter_counts_match_the_published_sizes(shape, published_billions):
    assert shape.param_count() / 1e9 == pytest.approx(published_billions, abs=0.01)


def test_kv_cache_formula_and_gqa_saving():
    # 7B, bf16: 2 x 32 layers x 32 heads x 128 dims x 2 bytes = 512 KiB per token
    assert kv_cache_bytes(LLAMA2_7B, 1, 1, "bf16") == 2 * 32 * 32 * 128 * 2 == 512 * 1024
    # 70B has 8 KV heads for 64 query heads: its cache per token is smaller than 13B's
    assert kv_cache_bytes(LLAMA2_70B, 1, 1) < kv_cache_bytes(LLAMA2_13B, 1, 1)
    assert kv_cache_bytes(LLAMA2_7B, 4, 1000) == 4000 * kv_cache_bytes(LLAMA2_7B, 1, 1)


def test_strategies_divide_what_they_should():
    one = memory_per_device(LLAMA2_13B, batch=8, context=2048)
    tp = memory_per_device(LLAMA2_13B, batch=8, context=2048, devices=4, strategy="tensor")
    pp = memory_per_device(LLAMA2_13B, batch=8, context=2048, devices=4, strategy="pipeline")
    dp = memory_per_device(LLAMA2_13B, batch=8, context=2048, devices=4, strategy="data")
    assert tp["weights"] == pytest.approx(one["weights"] / 4)
    assert tp["kv_cache"] == pytest.approx(one["kv_cache"] / 4)
    assert pp["weights"] == pytest.approx(one["weights"] / 4)       # 40 layers / 4 stages
    assert pp["activations"] == one["activations"]                 # no micro-batches: one layer, whole batch
    assert dp["weights"] == one["weights"] and dp["kv_cache"] == pytest.approx(one["kv_cache"] / 4)


def test_tensor_parallel_beyond_the_kv_heads_replicates_them():
    tp8 = memory_per_device(LLAMA2_70B, devices=8, strategy="tensor")
    tp16 = memory_per_device(LLAMA2_70B, devices=16, strategy="tensor")
    assert tp16["kv_cache"] == tp8["kv_cache"]  # one KV head per device either way
    assert tp16["weights"] == pytest.approx(tp8["weights"] / 2)


def test_70b_needs_more_than_one_80gib_device_in_bf16():
    assert not fits(memory_per_device(LLAMA2_70B), 80, headroom=0.1)
    assert fits(memory_per_device(LLAMA2_70B, devices=4, strategy="tensor"), 80, headroom=0.1)
    assert weight_bytes(LLAMA2_70B, "int4") == weight_bytes(LLAMA2_70B, "bf16") / 4
    assert activation_bytes(LLAMA2_7B, 2, 100) > activation_bytes(LLAMA2_7B, 1, 100)


def test_tensor_parallel_replicates_the_residual_stream_without_sequence_parallelism():
    b, s, h, f, v = 8, 4096, LLAMA2_70B.hidden, LLAMA2_70B.ffn, LLAMA2_70B.vocab
    for tp in (2, 4, 8):
        act = memory_per_device(LLAMA2_70B, batch=b, context=s, devices=tp, strategy="tensor")["activations"]
        # residual stream + normed input whole on every rank, gate + up split, fp32 logits whole
        assert act == 2 * b * s * h * 2 + 2 * b * s * f * 2 / tp + b * v * 4
    tp2 = memory_per_device(LLAMA2_70B, batch=b, context=s, devices=2, strategy="tensor")
    assert tp2["activations"] > activation_bytes(LLAMA2_70B, b, s) / 2


def test_pipeline_activations_follow_the_micro_batches():
    b, s, h, f, v = 8, 4096, LLAMA2_70B.hidden, LLAMA2_70B.ffn, LLAMA2_70B.vocab
    def pp(m):
        return memory_per_device(LLAMA2_70B, batch=b, context=s, devices=2, strategy="pipeline",
                                 micro_batches=m)["activations"]
    assert pp(1) == activation_bytes(LLAMA2_70B, b, s)
    # one layer of one micro-batch of 4, plus the other micro-batch's boundary hidden state
    assert pp(2) == (2 * 4 * s * h + 2 * 4 * s * f + 1 * 4 * s * h) * 2 + b * v * 4
    # uneven: 8 sequences in 3 micro-batches of at most 3; two others wait
    assert pp(3) == (2 * 3 * s * h + 2 * 3 * s * f + 2 * 3 * s * h) * 2 + b * v * 4
    assert pp(1) > pp(2) > pp(4) > pp(8)
    # the boundary states of all micro-batches together never exceed the whole batch's
    assert pp(8) >= (b - 1) * s * h * 2


def test_fits_names_its_headroom():
    need = {"total": 73.7 * GiB}
    assert fits(need, 80, headroom=0.0) and not fits(need, 80, headroom=0.1)
    assert usable_bytes(80, 0.1) == pytest.approx(72 * GiB)
    with pytest.raises(TypeError, match="headroom"):
        fits(need, 80)  # no silent default


def test_tp2_and_pp2_of_70b_sit_at_the_edge_of_an_80gib_device():
    """Lesson 01's conclusion: with 10 % headroom TP x2 fits by a hair, PP x2 only with micro-batches."""
    kw = dict(batch=8, context=4096, devices=2)
    tp2 = memory_per_device(LLAMA2_70B, strategy="tensor", **kw)
    pp2 = memory_per_device(LLAMA2_70B, strategy="pipeline", **kw)
    pp2m = memory_per_device(LLAMA2_70B, strategy="pipeline", micro_batches=2, **kw)
    assert tp2["total"] / GiB == pytest.approx(72.0, abs=0.05)
    assert abs(tp2["total"] - usable_bytes(80, 0.1)) < 0.01 * GiB
    assert not fits(pp2, 80, headroom=0.1) and fits(pp2m, 80, headroom=0.1)


@pytest.mark.parametrize("kwargs, words", [
    (dict(dtype="fp8"), "dtype='fp8' is not valid: expected one of"),
    (dict(strategy="expert"), "strategy='expert' is not valid: expected one of"),
    (dict(devices=0), "devices=0 is not valid: expected an int >= 1"),
    (dict(batch=0), "batch=0 is not valid: expected an int >= 1"),
    (dict(devices=2), "devices=2 is not valid: expected 1 for strategy='single'"),
    (dict(devices=4, strategy="data", batch=2), "batch=2 is not valid: expected at least devices=4"),
    (dict(devices=81, strategy="pipeline"), r"devices=81 is not valid: expected an int in \[1, 80\]"),
    (dict(devices=2, strategy="data", batch=2, micro_batches=2), "micro_batches=2 is not valid: expected 1"),
    (dict(devices=2, strategy="pipeline", batch=2, micro_batches=4),
     r"micro_batches=4 is not valid: expected an int in \[1, 2\]"),
])
def test_bad_inputs_name_the_parameter(kwargs, words):
    with pytest.raises(ValueError, match=words):
        memory_per_device(LLAMA2_70B, **kwargs)


def test_calculator_widget_recomputes_when_a_control_moves():
    calc = MemoryCalculator(model="Llama-2-70B", device_gib=80)
    assert not calc.data["fits"]
    calc.controls["strategy"].value = "tensor"
    calc.controls["devices"].value = 4
    assert calc.data["fits"] and calc.data["devices"] == 4
    before = calc.data["gib"]["kv_cache"]
    calc.controls["context"].value = 8192
    assert calc.data["gib"]["kv_cache"] == pytest.approx(2 * before)


def test_calculator_explains_an_impossible_choice_and_keeps_its_report():
    calc = MemoryCalculator(strategy="data", devices=4, batch=4)
    calc.controls["batch"].value = 2
    assert "batch=2 is not valid: expected at least devices=4" in calc.error
    assert "batch=2 is not valid" in calc.caption.value and calc.data["devices"] == 4


def test_report_is_plain_data():
    report = memory_report("Llama-2-7B", "bf16", 1, 4096, 1, "single", 24)
    assert report["fits"] and set(report["gib"]) == {"weights", "kv_cache", "activations", "total"}
    assert report["headroom"] == 0.1
    assert not memory_report("Llama-2-70B", "bf16", 8, 4096, 2, "tensor", 80, headroom=0.2)["fits"]
    assert report["gib"]["weights"] == pytest.approx(weight_bytes(LLAMA2_7B) / GiB)
