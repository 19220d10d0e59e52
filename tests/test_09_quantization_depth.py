"""Lesson 09, beyond weight-only: activation outliers and SmoothQuant, GPTQ, FP8, KV-cache quantisation."""

import pytest
import torch

from lessons_lib.compression import (QuantizedKVCache, QuantizedLayerKVCache, calibration_inputs,
                                     dequantize_int4, fake_quantize_fp8, fake_quantize_int8, fp8_max,
                                     gptq_quantize, kv_bytes_per_token, kv_tokens_per_gib,
                                     plant_outlier_channels, relative_error, round_to_nearest, smooth,
                                     smoothing_factors, w8a8_linear, with_kv_cache_dtype)
from lessons_lib.sizing import LLAMA2_7B, LLAMA2_70B, kv_cache_bytes
from lessons_lib.model import ModelConfig, generate
from lessons_lib.validate import BadArgument
from tests.models import tiny_lm

pytestmark = pytest.mark.lesson09


def _activations(tokens=256, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, width, generator=g), torch.randn(32, width, generator=g) * 0.05


# -- outliers and SmoothQuant ------------------------------------------------------------
def test_planted_outliers_keep_the_float_layer_and_leave_the_inputs_alone():
    x, w = _activations()
    x0, w0 = x.clone(), w.clone()
    xo, wo = plant_outlier_channels(x, [1, 7], 50.0, weight=w)
    assert torch.equal(x, x0) and torch.equal(w, w0)
    assert xo[:, 1].abs().max() > 40 * x[:, 1].abs().max() / 2
    torch.testing.assert_close(xo @ wo.t(), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_outliers_break_per_tensor_int8_and_smoothquant_repairs_it():
    x, w = _activations()
    ref = x @ w.t()
    clean = relative_error(w8a8_linear(x, w, "tensor"), ref)
    xo, wo = plant_outlier_channels(x, [1, 7, 30], 100.0, weight=w)
    broken = relative_error(w8a8_linear(xo, wo, "tensor"), ref)
    xs, ws, s = smooth(xo, wo, alpha=0.5)
    torch.testing.assert_close(xs @ ws.t(), ref, rtol=1e-4, atol=1e-4)   # migration changes nothing in float
    fixed = relative_error(w8a8_linear(xs, ws, "tensor"), ref)
    assert clean < 0.02 and broken > 10 * clean and fixed < 2 * clean


def test_smoothing_factors_follow_the_formula():
    x, w = _activations()
    s = smoothing_factors(x, w, alpha=0.7)
    expected = x.abs().amax(0) ** 0.7 / w.abs().amax(0) ** 0.3
    torch.testing.assert_close(s, expected)
    with pytest.raises(BadArgument, match="alpha"):
        smoothing_factors(x, w, alpha=1.5)
    with pytest.raises(BadArgument, match="x="):
        smoothing_factors(x[:, :10], w)


@pytest.mark.parametrize("granularity", ["tensor", "token", "channel"])
def test_int8_fake_quantisation_error_is_at_most_half_a_step(granularity):
    x, _ = _activations()
    dim = {"tensor": None, "token": 1, "channel": 0}[granularity]
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    assert ((fake_quantize_int8(x, granularity) - x).abs() <= amax / 127 / 2 + 1e-6).all()
    with pytest.raises(BadArgument, match="granularity"):
        fake_quantize_int8(x, "row")


# -- GPTQ -----------------------------------------------------------------------------------
def _correlated_inputs(n=1024, width=96, seed=0):
    """Inputs whose channels are correlated, the same way for every seed (one distribution)."""
    mix = 3 * torch.randn(width, width, generator=torch.Generator().manual_seed(99)) / width ** 0.5
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) @ (mix + torch.eye(width))


@pytest.mark.parametrize("bits,group_size", [(3, None), (4, None), (4, 32)])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits, group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 96, generator=g) * 0.05
    calib, held_out = _correlated_inputs(seed=2), _correlated_inputs(seed=3)
    q, s = gptq_quantize(w, calib, bits, group_size)
    qr, sr = round_to_nearest(w, bits, group_size)
    qmax = 2 ** (bits - 1) - 1
    assert q.abs().max() <= qmax and s.shape == sr.shape
    gptq = relative_error(held_out @ dequantize_int4(q, s).t(), held_out @ w.t())
    rtn = relative_error(held_out @ dequantize_int4(qr, sr).t(), held_out @ w.t())
    assert gptq < 0.85 * rtn


def test_gptq_is_round_to_nearest_when_the_inputs_are_uncorrelated():
    # Orthogonal columns: X^T X is diagonal, so no column can compensate another.
    x = torch.linalg.qr(torch.randn(256, 64, generator=torch.Generator().manual_seed(0)))[0] * 16
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    q, s = gptq_quantize(w, x, bits=4)
    qr, sr = round_to_nearest(w, bits=4)
    assert torch.equal(q, qr) and torch.allclose(s, sr)


def test_gptq_refuses_bad_arguments():
    w = torch.randn(8, 32)
    with pytest.raises(BadArgument, match="bits"):
        gptq_quantize(w, torch.randn(16, 32), bits=1)
    with pytest.raises(BadArgument, match="group_size"):
        gptq_quantize(w, torch.randn(16, 32), group_size=5)
    with pytest.raises(BadArgument, match="x="):
        gptq_quantize(w, torch.randn(16, 31))


# -- FP8 ------------------------------------------------------------------------------------
def test_fp8_e4m3_range_and_relative_precision():
    assert fp8_max("e4m3") == 448.0 and fp8_max("e5m2") == 57344.0
    x = torch.linspace(-448, 448, 1001)
    y = fake_quantize_fp8(x, scale=1.0)
    normal = x.abs() >= 2 ** -6                           # E4M3's smallest normal number
    assert ((y - x).abs()[normal] <= x.abs()[normal] * 2 ** -4 + 1e-6).all()   # 3 mantissa bits
    assert torch.equal(fake_quantize_fp8(y, scale=1.0), y)                    # representable stays put
    assert fake_quantize_fp8(torch.tensor([1e6]), scale=1.0).item() == 448.0  # saturates, no NaN


def test_int8_wins_without_outliers_and_fp8_with_them():
    x, _ = _activations(1024, 64)
    assert relative_error(fake_quantize_int8(x), x) < relative_error(fake_quantize_fp8(x), x)
    xo = plant_outlier_channels(x, [3], 200.0)
    assert relative_error(fake_quantize_fp8(xo), xo) < relative_error(fake_quantize_int8(xo), xo)
    with pytest.raises(BadArgument, match="fmt"):
        fake_quantize_fp8(x, "e3m4")


# -- KV-cache quantisation ----------------------------------------------------------------
@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
def test_quantised_cache_layer_appends_truncates_and_counts_its_bytes(kv_cache_dtype):
    layer = QuantizedLayerKVCache(kv_cache_dtype)
    k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    k_out, v_out = layer.update(k, v)
    tol = 0.5 / 127 if kv_cache_dtype == "int8" else 2 ** -4
    assert ((k_out - k).abs() <= tol * k.abs().amax(-1, keepdim=True) * 1.01).all()
    layer.update(k[:, :, :1], v[:, :, :1])
    assert layer.seq_len == 6 and layer.k.dtype != torch.float32
    assert layer.nbytes() == 2 * (2 * 2 * 6 * 16 + 2 * 2 * 6 * 2)      # codes + bf16 scales, K and V
    layer.truncate(3)
    assert layer.seq_len == 3 and layer.k_scale.shape[2] == 3
    layer.truncate(0)
    assert layer.nbytes() == 0


def test_int8_kv_cache_keeps_greedy_tokens_and_works_under_generate():
    model = tiny_lm(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64))
    ids = torch.tensor([[256, 72, 105, 33]])
    quantised = with_kv_cache_dtype(model, "int8")
    with torch.no_grad():
        x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
        assert relative_error(quantised(x), model(x)) < 0.01
    assert isinstance(quantised.new_cache(), QuantizedKVCache)
    assert torch.equal(generate(quantised, ids, 8), generate(model, ids, 8))
    assert with_kv_cache_dtype(model, "bf16") is model
    with pytest.raises(BadArgument, match="kv_cache_dtype"):
        with_kv_cache_dtype(model, "int4")


def test_kv_capacity_of_real_models_against_bf16():
    for shape in (LLAMA2_7B, LLAMA2_70B):
        bf16 = kv_bytes_per_token(shape, "bf16")
        assert bf16 == kv_cache_bytes(shape, 1, 1, "bf16")
        int8 = kv_bytes_per_token(shape, "int8")
        assert int8 == bf16 / 2 + 2 * shape.n_layers * shape.n_kv_heads * 2
        assert 1.9 < kv_tokens_per_gib(shape, "fp8_e4m3") / kv_tokens_per_gib(shape, "bf16") < 2


def test_calibration_inputs_are_what_the_layer_reads():
    model = tiny_lm(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64))
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(0))
    down = model.layers[0].mlp.down_proj
    x = calibration_inputs(model, down, ids, window=16)
    assert x.shape == (48, 64)                        # 3 full rows of 16 tokens, ffn_dim features
    with torch.no_grad():
        torch.testing.assert_close(down(x), x @ down.weight.t())
    with pytest.raises(BadArgument, match="module"):
        calibration_inputs(model, torch.nn.Linear(64, 32), ids)
