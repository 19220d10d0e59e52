"""Sequence parallelism and head counts kept as attributes: equality with one process, bytes, errors."""

import pytest
import torch
import torch.nn as nn

from lessons_lib import run_distributed
from lessons_lib.comm import ring_all_reduce
from lessons_lib.model import ModelConfig, MultiHeadSelfAttention
from lessons_lib.parallel import (Colwise, LocalCount, Rowwise, SequenceParallelNorm, check_sequence_split,
                                  parallelize, sequence_bytes_sent, tiny_lm_sp_plan)
from models import tiny_lm

pytestmark = pytest.mark.lesson12
ATOL, RTOL = 1e-5, 1e-4          # fp32, as in test_12_tensor_parallel.py: sums re-ordered by the split


def _ids(batch=2, seq=8):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))


# -- sequence parallelism ------------------------------------------------------------------------
def _sp_tiny_lm(ids):
    model = parallelize(tiny_lm(), tiny_lm_sp_plan(ModelConfig()))
    residual = []
    model.layers[0].attn_norm.norm.register_forward_pre_hook(lambda m, args: residual.append(args[0].shape))
    with torch.no_grad():
        logits = model(ids)
    sent = sequence_bytes_sent(model)
    h = torch.zeros(ids.numel() * ModelConfig().dim)              # one all-reduce of the residual stream
    return logits, sent, ring_all_reduce(h), tuple(residual[0])


@pytest.mark.parametrize("tp", [2, 4])
def test_sp_equals_one_process_and_sends_what_the_all_reduces_send(tp):
    ids = _ids()
    with torch.no_grad():
        expected = tiny_lm()(ids)
    n_all_reduces = 1 + 2 * ModelConfig().n_layers      # the embedding's, then two per decoder layer
    for logits, sent, one_all_reduce, residual in run_distributed(_sp_tiny_lm, tp, ids):
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)
        assert sent == n_all_reduces * one_all_reduce    # RS + AG = AR, measured on the ring
        assert residual == (2, 8 // tp, ModelConfig().dim)   # each rank holds seq / tp tokens


def test_sp_at_tp1_is_the_identity():
    ids = _ids(seq=5)
    model = parallelize(tiny_lm(), tiny_lm_sp_plan())
    assert isinstance(model.norm, SequenceParallelNorm)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), tiny_lm()(ids), atol=ATOL, rtol=RTOL)
    assert sequence_bytes_sent(model) == 0


def test_a_sequence_tp_does_not_divide_is_refused_with_the_fix():
    assert check_sequence_split(8, 4) == 2
    with pytest.raises(ValueError, match=r"sequence length=7 is not valid: expected a multiple of tp=2 "
                                         r"\(.*pad the prompt to 8 tokens"):
        check_sequence_split(7, 2)


def _sp_odd_sequence(ids):
    try:
        with torch.no_grad():
            parallelize(tiny_lm(), tiny_lm_sp_plan())(ids)
    except ValueError as e:          # caught here, so the ranks stay up for the next test
        return type(e).__name__, str(e)


def test_an_odd_sequence_on_ranks_is_the_same_clear_error_on_every_rank_not_a_hang():
    for kind, message in run_distributed(_sp_odd_sequence, 2, _ids(seq=7), timeout=60):
        assert kind == "BadArgument" and "expected a multiple of tp=2" in message


# -- head counts kept as attributes --------------------------------------------------------------
def _mha_plan(head_dim):
    return {"q_proj": Colwise(unit=head_dim, name="n_heads"),
            "k_proj": Colwise(unit=head_dim, name="n_kv_heads", replicate=True),
            "v_proj": Colwise(unit=head_dim, name="n_kv_heads", replicate=True),
            "o_proj": Rowwise(unit=head_dim, name="n_heads"),
            "n_heads": LocalCount(), "n_kv_heads": LocalCount(replicate=True)}


def _mha():
    torch.manual_seed(0)
    return MultiHeadSelfAttention(dim=64, n_heads=4, n_kv_heads=2)


def _mha_tp(x, with_counts):
    plan = {k: v for k, v in _mha_plan(16).items() if with_counts or not isinstance(v, LocalCount)}
    model = parallelize(_mha(), plan)
    try:
        with torch.no_grad():
            return model(x), (model.n_heads, model.n_kv_heads)
    except RuntimeError as e:        # caught here, so the ranks stay up for the next test
        return str(e), None


def test_attribute_plan_makes_a_head_count_model_equal_one_process():
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = _mha()(x)
    for tp, counts in ((2, (2, 1)), (4, (1, 1))):      # at tp=4 the 2 KV heads are replicated
        for out, local in run_distributed(_mha_tp, tp, x, True):
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
            assert local == counts
    message, _ = run_distributed(_mha_tp, 2, x, False)[0]   # without it the model still asks for 4 heads
    assert "shape '[2, 6, 4, 16]' is invalid" in message


def _bad_count():
    torch.manual_seed(0)
    model = MultiHeadSelfAttention(dim=48, n_heads=3)
    try:
        parallelize(model, {"o_proj": "rowwise", "n_heads": "local_count"})
    except ValueError as e:
        return str(e), type(model.o_proj).__name__, model.n_heads


def test_a_count_tp_does_not_divide_is_refused_before_any_swap():
    message, o_proj, n_heads = run_distributed(_bad_count, 2)[0]
    assert "n_heads: tp=2 is not valid: expected a divisor of n_heads=3" in message
    assert (o_proj, n_heads) == ("Linear", 3)


def test_count_entries_must_name_an_int_attribute():
    with pytest.raises(ValueError, match="names no attribute"):
        parallelize(_mha(), {"attn.n_heads": LocalCount()})
    with pytest.raises(TypeError, match="needs an int count"):
        parallelize(_mha(), {"q_proj.weight": LocalCount()})
    model = parallelize(nn.Sequential(_mha()), {"0.n_heads": "local_count"})    # tp=1: unchanged
    assert model[0].n_heads == 4
