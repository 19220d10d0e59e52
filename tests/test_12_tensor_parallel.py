"""Tensor parallelism: shard arithmetic, the plan, and equality with one process (fp32, atol 1e-5)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from lessons_lib import DistributedError, run_distributed
from lessons_lib.model import ModelConfig, generate
from lessons_lib.parallel.plan import (Colwise, Rowwise, describe_shards, parallelize,
                                       tiny_lm_tp_plan, validate_tp)
from lessons_lib.parallel.tensor import shard_indices
from models import tiny_lm

pytestmark = pytest.mark.lesson12
# fp32: atol 1e-5 plus rtol 1e-4. The trained model's logits reach ~16; sums re-ordered by the
# split (and by a rank's thread count) move a logit by ~1e-5, which the relative term covers. A real
# sharding bug (a bias counted twice, a wrong slice) moves logits by orders of magnitude more.
ATOL, RTOL = 1e-5, 1e-4
NEW_TOKENS = 32





def _prompt(batch=3, seq=6):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference():
    model, ids = tiny_lm(), _prompt()
    with torch.no_grad():
        return ids, model(ids), generate(model, ids, NEW_TOKENS)


# -- pure shard arithmetic -----------------------------------------------------------------------
def test_shards_are_whole_heads_and_cover_every_feature_once():
    owned = [shard_indices(8, 2, r, unit=2).tolist() for r in range(2)]
    assert owned == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    # 2 KV heads of 2 features on 4 ranks: ranks 0,1 hold head 0 and ranks 2,3 hold head 1,
    # the KV head their query heads (one each, heads 0..3, groups of 2) attend with.
    owned = [shard_indices(4, 4, r, unit=2, replicate=True).tolist() for r in range(4)]
    assert owned == [[0, 1], [0, 1], [2, 3], [2, 3]]


@pytest.mark.parametrize("tp, words", [
    (3, "tp=3 does not divide n_heads=4: choose tp among 1, 2 or 4"),
    (8, "tp=8 does not divide n_heads=4"),
    (0, "tp=0 is not valid: expected an int >= 1"),
])
def test_validate_tp_names_the_parameter_and_valid_choices(tp, words):
    with pytest.raises(ValueError, match=words):
        validate_tp(ModelConfig(), tp)


def test_validate_tp_names_ffn_and_vocab():
    with pytest.raises(ValueError, match="ffn_dim=390: choose tp among"):
        validate_tp(ModelConfig(ffn_dim=390, n_heads=4), 4)
    with pytest.raises(ValueError, match="vocab_size=262"):
        validate_tp(ModelConfig(vocab_size=262), 4)
    with pytest.raises(ValueError, match="or a multiple of n_kv_heads=3"):
        validate_tp(ModelConfig(dim=96, n_heads=6, n_kv_heads=3), 2)


# -- the plan, in one process (tp = 1) ------------------------------------------------------------
def test_a_plan_naming_a_missing_submodule_lists_close_and_valid_names():
    model = tiny_lm()
    with pytest.raises(ValueError) as info:
        parallelize(model, {"layers.*.attn.qproj": "colwise"})
    message = str(info.value)
    assert "'layers.*.attn.qproj' matches no submodule" in message
    assert "did you mean layers.*.attn.q_proj" in message and "lm_head" in message
    assert isinstance(model.layers[0].attn.q_proj, nn.Linear)  # untouched


def test_wrong_module_type_and_unknown_style_are_rejected_before_any_swap():
    model = tiny_lm()
    with pytest.raises(TypeError, match="embed is a Embedding, but style Colwise needs an nn.Linear"):
        parallelize(model, {"lm_head": "vocab_head", "embed": "colwise"})
    assert isinstance(model.lm_head, nn.Linear)
    with pytest.raises(ValueError, match="unknown style 'column'"):
        parallelize(model, {"lm_head": "column"})


def test_tp1_plan_is_the_identity_and_strict_false_skips_missing_entries(reference):
    ids, logits, _ = reference
    model = parallelize(tiny_lm(), tiny_lm_tp_plan(ModelConfig()))
    assert len(describe_shards(model)) == 4 * 7 + 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids), logits, atol=ATOL, rtol=RTOL)
    mlp = nn.Sequential(nn.Linear(4, 8))
    assert parallelize(mlp, {"0": "colwise", "lm_head": "vocab_head"}, strict=False) is mlp


# -- on several ranks -----------------------------------------------------------------------------
def _tp_tiny_lm(ids, new_tokens):
    model = tiny_lm()
    parallelize(model, tiny_lm_tp_plan(model.config))
    with torch.no_grad():
        logits = model(ids)
    return logits, generate(model, ids, new_tokens), describe_shards(model)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_logits_and_greedy_tokens_equal_one_process(tp, reference):
    ids, logits, tokens = reference
    for rank_logits, rank_tokens, shards in run_distributed(_tp_tiny_lm, tp, ids, NEW_TOKENS):
        torch.testing.assert_close(rank_logits, logits, atol=ATOL, rtol=RTOL)
        assert torch.equal(rank_tokens, tokens)
    shapes = {name: local for name, _, local, _ in shards}
    hd = ModelConfig().head_dim
    assert shapes["layers.0.attn.q_proj"] == (4 // tp * hd, 128)
    assert shapes["layers.0.attn.k_proj"] == (max(1, 2 // tp) * hd, 128)  # replicated at tp=4
    assert shapes["layers.0.mlp.down_proj"] == (128, 384 // tp)
    assert shapes["embed"] == (264 // tp, 128)


def _dp_tp(ids, new_tokens):
    from lessons_lib.parallel.data import DataParallelInference, data_parallel_generate
    from lessons_lib.parallel.mesh import Mesh

    mesh = Mesh(tp=2)   # 4 ranks: dp=2 replicas, each a tp=2 pair
    model = parallelize(tiny_lm(), tiny_lm_tp_plan(ModelConfig()), mesh.tp_group)
    logits = DataParallelInference(model, mesh.dp_group)(ids)
    return logits, data_parallel_generate(model, ids, new_tokens, group=mesh.dp_group)


def test_dp2_x_tp2_on_a_mesh_equals_one_process(reference):
    ids, logits, tokens = reference
    for rank_logits, rank_tokens in run_distributed(_dp_tp, 4, ids, NEW_TOKENS):
        torch.testing.assert_close(rank_logits, logits, atol=ATOL, rtol=RTOL)
        assert torch.equal(rank_tokens, tokens)


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 4))


def _tp_mlp(x):
    model = _mlp()
    parallelize(model, {"0": "colwise", "2": "rowwise", "3": Colwise(gather_output=True)})
    with torch.no_grad():
        return model(x)


def test_plan_on_a_plain_mlp_with_biases_adds_each_bias_once():
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = _mlp()(x)
    for out in run_distributed(_tp_mlp, 2, x):
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


def _stage_with_some_layers(ids):
    """A pipeline stage that holds layers 2 and 3 only: the whole-model plan, strict=False."""
    full = tiny_lm()
    positions, mask = full.prepare_inputs(ids)
    with torch.no_grad():
        h = full.embed(ids)
        for layer in full.layers[:2]:
            h = layer(h, positions=positions, attn_mask=mask)
        stage = nn.Module()
        stage.layers = nn.ModuleDict({"2": tiny_lm().layers[2], "3": tiny_lm().layers[3]})
        parallelize(stage, tiny_lm_tp_plan(full.config), strict=False)
        for layer in stage.layers.values():
            h = layer(h, positions=positions, attn_mask=mask)
        return full.lm_head(full.norm(h))


def test_tp_on_a_stage_that_holds_only_some_layers(reference):
    ids, logits, _ = reference
    for out in run_distributed(_stage_with_some_layers, 2, ids):
        torch.testing.assert_close(out, logits, atol=ATOL, rtol=RTOL)


def _indivisible():
    model = tiny_lm(ModelConfig(dim=96, n_heads=3, n_kv_heads=3))
    parallelize(model, tiny_lm_tp_plan(model.config))


def test_tp_not_dividing_heads_is_a_value_error_on_the_ranks():
    with pytest.raises(DistributedError) as info:
        run_distributed(_indivisible, 2)
    assert info.value.remote_type == "BadArgument"          # a ValueError that names the parameter
    assert ("layers.0.attn.q_proj: tp=2 is not valid: expected a divisor of n_heads=3 "
            "(tp=2 does not divide n_heads=3: choose tp among 1 or 3)") in info.value.remote_traceback


def _torch_parallelize_module(ids):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from lessons_lib.parallel.plan import torch_tp_plan

    model = tiny_lm()
    parallelize_module(model, init_device_mesh("cpu", (dist.get_world_size(),)), torch_tp_plan(model))
    ours = parallelize(tiny_lm(), tiny_lm_tp_plan(ModelConfig()))
    with torch.no_grad():
        return model(ids), ours(ids)


def test_same_logits_as_torch_parallelize_module_at_tp2(reference):
    ids, logits, _ = reference
    for theirs, ours in run_distributed(_torch_parallelize_module, 2, ids):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(theirs, logits, atol=ATOL, rtol=RTOL)


def test_rowwise_with_unsplit_input_slices_it_itself():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))

    def run(x):
        torch.manual_seed(6)
        lin = nn.Linear(8, 5)
        expected = lin(x)
        model = parallelize(nn.Sequential(lin), {"0": Rowwise(input_is_parallel=False)})
        return (model(x) - expected).abs().max().item()

    assert max(run_distributed(run, 2, x)) < ATOL


def _tp_x_pp(ids, new_tokens):
    """tp=2 inside each of pp=2 pipeline stages: each stage holds half its layers' weights."""
    from lessons_lib.parallel.mesh import Mesh
    from lessons_lib.parallel.pipeline import PipelineInference, build_stage

    mesh = Mesh(tp=2, pp=2)
    stage = build_stage(tiny_lm(), mesh)
    parallelize(stage, tiny_lm_tp_plan(ModelConfig()), mesh.tp_group, strict=False)
    return PipelineInference(stage, mesh, n_microbatches=2).generate(ids, new_tokens)


def test_tp_composes_with_the_pipeline_stages_on_a_mesh(reference):
    ids, _, tokens = reference
    for rank_tokens in run_distributed(_tp_x_pp, 4, ids, NEW_TOKENS):
        assert torch.equal(rank_tokens, tokens)
