"""Lesson 09: pruning, int8/int4 weight-only quantisation, distillation."""

import pytest
import torch
import torch.nn as nn

from lessons_lib.compression import (Int4Linear, Int8Linear, decode_rates, dequantize_int4, dequantize_int8,
                                     distillation_loss, heldout_ids, linear_weight_bytes,
                                     prune_2_4, prune_attention_heads, prune_mlp_channels,
                                     prune_unstructured, quantize_int4, quantize_int8,
                                     quantize_model, sparsity_of)
from lessons_lib.compression.pruning import prunable_linears
from lessons_lib.model import ModelConfig, TinyLM, load_tiny_lm, perplexity
from lessons_lib.model.checkpoint import TINY_LM_PATH

pytestmark = pytest.mark.lesson09


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyLM(ModelConfig()).eval()


# -- pruning ------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_global_unstructured_sparsity_is_exact_and_leaves_the_input_alone(model, sparsity):
    pruned = prune_unstructured(model, sparsity)
    n = sum(m.weight.numel() for m in prunable_linears(model).values())
    assert sparsity_of(pruned) == round(sparsity * n) / n
    assert sparsity_of(model) == 0.0
    assert torch.equal(pruned.lm_head.weight, model.lm_head.weight)


def test_global_pruning_zeroes_the_smallest_magnitudes(model):
    pruned = prune_unstructured(model, 0.5)
    kept = torch.cat([m.weight.abs().flatten() for m in prunable_linears(pruned).values()])
    orig = torch.cat([m.weight.abs().flatten() for m in prunable_linears(model).values()])
    assert orig[kept == 0].max() <= kept[kept != 0].min()


def test_per_layer_pruning_hits_the_sparsity_in_every_layer(model):
    pruned = prune_unstructured(model, 0.3, scope="layer")
    for name, m in prunable_linears(pruned).items():
        assert int((m.weight == 0).sum()) == round(0.3 * m.weight.numel()), name


def test_two_four_keeps_the_two_largest_of_every_four(model):
    pruned = prune_2_4(model)
    for name, m in prunable_linears(pruned).items():
        w = m.weight.reshape(m.weight.shape[0], -1, 4)
        orig = prunable_linears(model)[name].weight.reshape_as(w).abs()
        assert ((w != 0).sum(-1) == 2).all(), name
        kept_min = orig.masked_fill(w == 0, float("inf")).amin(-1)
        dropped_max = orig.masked_fill(w != 0, -1.0).amax(-1)
        assert (dropped_max <= kept_min).all(), name
    assert sparsity_of(pruned) == 0.5


def test_structured_pruning_shrinks_the_shapes_and_the_model_still_runs(model):
    x = torch.randint(0, 256, (2, 7))
    mlp_half = prune_mlp_channels(model, 0.5)
    assert mlp_half.layers[0].mlp.up_proj.weight.shape == (192, 128)
    assert mlp_half.layers[0].mlp.down_proj.weight.shape == (128, 192)
    one_head = prune_attention_heads(model, 1)
    assert one_head.layers[0].attn.q_proj.weight.shape == (64, 128)
    assert one_head.layers[0].attn.o_proj.weight.shape == (128, 64)
    for pruned in (mlp_half, one_head):
        assert pruned(x).shape == (2, 7, 264)
    # Keeping every channel or head changes nothing.
    assert torch.allclose(prune_mlp_channels(model, 1.0)(x), model(x), atol=1e-6)
    assert torch.allclose(prune_attention_heads(model, 2)(x), model(x), atol=1e-6)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "half", True])
def test_sparsity_outside_zero_one_is_a_clear_error(model, sparsity):
    with pytest.raises(ValueError, match=r"sparsity=.*\[0, 1\)"):
        prune_unstructured(model, sparsity)


def test_bad_scope_and_head_counts_are_clear_errors(model):
    with pytest.raises(ValueError, match="scope='row'.*'global', 'layer'"):
        prune_unstructured(model, 0.5, scope="row")
    with pytest.raises(ValueError, match=r"heads_per_group=3 is not valid: expected an int in \[1, 2\]"):
        prune_attention_heads(model, 3)


# -- quantisation -------------------------------------------------------------------------
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_error_is_within_half_a_scale(scale_dtype):
    torch.manual_seed(1)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]   # rows of very different size
    w[3] = 0.0                                                       # an all-zero row
    q, scale = quantize_int8(w, scale_dtype=scale_dtype)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and scale.shape == (64,)
    err = (w - dequantize_int8(q, scale)).abs()
    assert (err <= scale.float()[:, None] / 2 * (1 + 1e-6)).all()
    assert (dequantize_int8(q, scale)[3] == 0).all()


@pytest.mark.parametrize("group_size", [16, 32, 96])
def test_int4_error_is_within_half_a_group_scale(group_size):
    torch.manual_seed(2)
    w = torch.randn(32, 192)
    q, scales = quantize_int4(w, group_size)
    assert int(q.abs().max()) <= 7 and scales.shape == (32, 192 // group_size)
    err = (w - dequantize_int4(q, scales)).abs()
    bound = scales.float().repeat_interleave(group_size, dim=1) / 2
    assert (err <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("group_size", [32, 48])      # 32: the CPU kernel; 48: the fallback path
def test_quantised_linears_compute_x_times_their_dequantised_weight(group_size):
    torch.manual_seed(3)
    linear = nn.Linear(96 if group_size == 48 else 128, 64, bias=False)
    x = torch.randn(3, 5, linear.in_features)
    for layer in (Int8Linear.from_float(linear), Int4Linear.from_float(linear, group_size)):
        ref = x @ layer.dequantized_weight().t()
        # bfloat16 activations: about 3 significant digits.
        assert torch.allclose(layer(x), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    int4 = Int4Linear.from_float(linear, group_size)
    assert int4.uses_kernel == (group_size == 32)
    assert torch.equal(int4.codes(), quantize_int4(linear.weight, group_size)[0])


def test_bad_group_size_names_the_valid_divisors():
    with pytest.raises(ValueError, match=r"group_size=48 is not valid: expected a divisor of "
                                         r"in_features=128, one of \[1, 2, 4, 8, 16, 32, 64, 128\]"):
        quantize_int4(torch.randn(8, 128), 48)
    with pytest.raises(ValueError, match="group_size=0"):
        quantize_int4(torch.randn(8, 128), 0)
    with pytest.raises(ValueError, match="scheme='int2' is not valid: expected one of 'int8', 'int4'"):
        quantize_model(TinyLM(ModelConfig(n_layers=1)), "int2")


def test_int8_linear_weights_are_at_least_3_9x_smaller(model):
    int8 = quantize_model(model, "int8")
    assert all(not isinstance(m, nn.Linear) for m in int8.modules())
    ratio = linear_weight_bytes(model) / linear_weight_bytes(int8)
    assert ratio >= 3.9, ratio
    assert linear_weight_bytes(model) / linear_weight_bytes(quantize_model(model, "int4")) > 6


# -- distillation --------------------------------------------------------------------------
def test_distillation_loss_reduces_to_its_parts():
    torch.manual_seed(4)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    ce = nn.functional.cross_entropy(s.reshape(-1, 11), y.reshape(-1))
    assert torch.allclose(distillation_loss(s, t, y, alpha=0.0), ce)
    assert distillation_loss(t, t, y, temperature=3.0, alpha=1.0).abs() < 1e-6
    assert distillation_loss(s, t, y, temperature=3.0, alpha=1.0) > 0.01
    with pytest.raises(ValueError, match="temperature=0"):
        distillation_loss(s, t, y, temperature=0)


# -- the trained checkpoint ----------------------------------------------------------------
@pytest.mark.skipif(not TINY_LM_PATH.exists(), reason="trained tiny LM checkpoint not there yet "
                    "(scripts/train_tiny_lm.py writes it)")
def test_int8_perplexity_is_within_two_percent_on_held_out_text():
    trained, _ = load_tiny_lm()
    valid = heldout_ids(2048)
    base = perplexity(trained, valid)
    int8 = perplexity(quantize_model(trained, "int8"), valid)
    assert base < 10, "the trained model should be far better than uniform (264)"
    assert int8 <= base * 1.02, (base, int8)


def test_decode_rates_times_every_model_and_refuses_bad_counts(model):
    rates = decode_rates({"fp32": model, "int8": quantize_model(model, "int8")}, new_tokens=3, rounds=1)
    assert set(rates) == {"fp32", "int8"} and all(rate > 0 for rate in rates.values())
    with pytest.raises(ValueError, match=r"rounds=0 is not valid: expected an int >= 1"):
        decode_rates({"fp32": model}, rounds=0)
    with pytest.raises(ValueError, match=r"new_tokens=1 is not valid: expected an int >= 2"):
        decode_rates({"fp32": model}, new_tokens=1)
