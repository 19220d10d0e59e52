"""Memory maths of real model sizes, and the calculator widget."""

import matplotlib
import pytest

matplotlib.use("Agg")

from lessons_lib.memory import (GiB, LLAMA2_13B, LLAMA2_70B, LLAMA2_7B, activation_bytes, fits,
                                kv_cache_bytes, memory_per_device, weight_bytes)
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
    assert pp["activations"] == one["activations"]                 # one layer at a time, as before
    assert dp["weights"] == one["weights"] and dp["kv_cache"] == pytest.approx(one["kv_cache"] / 4)


def test_tensor_parallel_beyond_the_kv_heads_replicates_them():
    tp8 = memory_per_device(LLAMA2_70B, devices=8, strategy="tensor")
    tp16 = memory_per_device(LLAMA2_70B, devices=16, strategy="tensor")
    assert tp16["kv_cache"] == tp8["kv_cache"]  # one KV head per device either way
    assert tp16["weights"] == pytest.approx(tp8["weights"] / 2)


def test_70b_needs_more_than_one_80gib_device_in_bf16():
    assert not fits(memory_per_device(LLAMA2_70B), 80)
    assert fits(memory_per_device(LLAMA2_70B, devices=4, strategy="tensor"), 80)
    assert weight_bytes(LLAMA2_70B, "int4") == weight_bytes(LLAMA2_70B, "bf16") / 4
    assert activation_bytes(LLAMA2_7B, 2, 100) > activation_bytes(LLAMA2_7B, 1, 100)


@pytest.mark.parametrize("kwargs, words", [
    (dict(dtype="fp8"), "dtype='fp8' is not valid: expected one of"),
    (dict(strategy="expert"), "strategy='expert' is not valid: expected one of"),
    (dict(devices=0), "devices=0 is not valid: expected an int >= 1"),
    (dict(batch=0), "batch=0 is not valid: expected an int >= 1"),
    (dict(devices=2), "devices=2 is not valid: expected 1 for strategy='single'"),
    (dict(devices=4, strategy="data", batch=2), "batch=2 is not valid: expected at least devices=4"),
    (dict(devices=81, strategy="pipeline"), r"devices=81 is not valid: expected an int in \[1, 80\]"),
])
def test_bad_inputs_name_the_parameter(kwargs, words):
    with pytest.raises(ValueError, match=words):
        memory_per_device(LLAMA2_70B, **kwargs)


def test_calculator_widget_recomputes_when_a_control_moves():
    calc = MemoryCalculator(model="Llama-2-70B", device_gib=80)
    assert not calc.report["fits"]
    calc.controls["strategy"].value = "tensor"
    calc.controls["devices"].value = 4
    assert calc.report["fits"] and calc.report["devices"] == 4
    before = calc.report["gib"]["kv_cache"]
    calc.controls["context"].value = 8192
    assert calc.report["gib"]["kv_cache"] == pytest.approx(2 * before)


def test_calculator_explains_an_impossible_choice_and_keeps_its_report():
    calc = MemoryCalculator(strategy="data", devices=4, batch=4)
    calc.controls["batch"].value = 2
    assert "batch=2 is not valid: expected at least devices=4" in calc.message.value
    assert calc.report["devices"] == 4


def test_report_is_plain_data():
    report = memory_report("Llama-2-7B", "bf16", 1, 4096, 1, "single", 24)
    assert report["fits"] and set(report["gib"]) == {"weights", "kv_cache", "activations", "total"}
    assert report["gib"]["weights"] == pytest.approx(weight_bytes(LLAMA2_7B) / GiB)
