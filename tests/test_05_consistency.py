"""Lesson 05: fingerprints catch a one-element change, broadcast repairs it, versions are pinned."""

import pytest
import torch

from lessons_lib import run_distributed
from lessons_lib.serving import Request, Router, WorkerSpec
from lessons_lib.serving.fingerprint import (broadcast_state_, diff_states, gather_fingerprints, shard_manifest,
                                             shard_state, state_fingerprint, sum_order_demo, tensor_digest)
from lessons_lib.serving.versioning import rolling_update, run_session
from lessons_lib.serving.worker import load_model
from lessons_lib.serving.workload import make_requests

pytestmark = [pytest.mark.lesson05, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def state():
    return {k: v.clone() for k, v in load_model("random:0").state_dict().items()}


def test_a_one_element_change_changes_the_fingerprint_and_is_located(state):
    fp = state_fingerprint(state)
    assert fp == state_fingerprint(dict(reversed(list(state.items()))))   # order-independent
    changed = {k: v.clone() for k, v in state.items()}
    name = "layers.2.mlp.down_proj.weight"
    changed[name].view(-1)[123] = torch.nextafter(changed[name].view(-1)[123], torch.tensor(1.0))  # one ulp
    assert state_fingerprint(changed) != fp
    assert diff_states(state, changed) == [name]


def test_dtype_shape_and_name_are_part_of_the_digest():
    t = torch.zeros(4)
    assert tensor_digest("a", t) != tensor_digest("b", t)
    assert tensor_digest("a", t) != tensor_digest("a", t.view(2, 2))
    assert tensor_digest("a", t) != tensor_digest("a", torch.zeros(4, dtype=torch.float64)[:4].float().double())
    assert tensor_digest("a", torch.tensor([0.0])) != tensor_digest("a", torch.tensor([-0.0]))
    with pytest.raises(TypeError, match="state_dict"):
        state_fingerprint([t])


def _replicas_detect_and_repair():
    import torch.distributed as dist

    from lessons_lib.serving.fingerprint import broadcast_state_, gather_fingerprints
    from lessons_lib.serving.worker import load_model

    state = load_model("random:0").state_dict()
    if dist.get_rank() == 2:
        with torch.no_grad():
            state["embed.weight"][5, 7] += 1e-3     # a silently corrupted replica
    before = gather_fingerprints(state)
    broadcast_state_(state, src=0)
    return before, gather_fingerprints(state)


def test_replicas_fingerprints_find_the_bad_rank_and_broadcast_repairs_it():
    results = run_distributed(_replicas_detect_and_repair, 3, timeout=90)
    before, after = results[0]
    assert before[0] == before[1] != before[2]
    assert len(set(after)) == 1 and after[0] == before[0]
    assert all(r == results[0] for r in results)


def test_tp_shard_fingerprints_match_the_manifest_except_a_corrupted_shard(state):
    manifest = shard_manifest(state, 2)
    shards = [shard_state(state, r, 2) for r in range(2)]
    assert [state_fingerprint(s) for s in shards] == manifest
    assert manifest[0] != manifest[1]
    bad = {k: v.clone() for k, v in shards[1].items()}
    bad["lm_head.weight"][0, 0] += 1
    assert state_fingerprint(bad) != manifest[1]


def test_tp_sums_are_allclose_but_not_bitwise_equal():
    r = sum_order_demo()
    assert r["allclose"] and not r["bitwise_equal_orders"] and r["elements_differing"] > 0
    assert r["max_abs_diff"] < 1e-3


def test_sessions_hit_two_versions_without_pinning_and_one_with_it():
    specs = [WorkerSpec("w0", version="v1", model="random:0"), WorkerSpec("w1", version="v2", model="random:1")]
    prompt = make_requests(1, seed=5)[0].prompt
    with Router(specs, "round-robin") as router:
        unpinned = run_session(router, "s-free", prompt, steps=2, pin=False)
        router.policy.turn = 0
        pinned = run_session(router, "s-pinned", prompt, steps=2, pin=True)
        assert unpinned["mixed"] and [v for _, v in unpinned["served"]] == ["v1", "v2"]
        assert not pinned["mixed"] and [v for _, v in pinned["served"]] == ["v1", "v1"]
        router.policy.turn = 0
        pure_v1 = router.submit(Request("pure", tuple(prompt), 6, version="v1")).result(timeout=60)
        assert pinned["tokens"] == pure_v1.tokens
        # Rolling update of the v1 replica to v2: afterwards only v2 serves.
        rolling_update(router, ["w0"], [WorkerSpec("w2", version="v2", model="random:1")])
        after = run_session(router, "s-after", prompt, steps=2, pin=True)
        assert {v for _, v in after["served"]} == {"v2"} and set(router.live_workers()) == {"w1", "w2"}


def _fingerprint_after_parallelize():
    import torch.distributed as dist

    from lessons_lib.parallel.plan import parallelize, tiny_lm_tp_plan
    from lessons_lib.serving.fingerprint import state_fingerprint
    from lessons_lib.serving.worker import load_model

    model = load_model("random:0")
    parallelize(model, tiny_lm_tp_plan(model))
    return dist.get_rank(), state_fingerprint(model.state_dict())


@pytest.mark.parametrize("tp", [2, 4])
def test_the_manifest_follows_the_real_tp_plan(state, tp):
    # What each rank holds after parallelize is what shard_state computes offline; at tp=4 the
    # tiny LM's KV heads are replicated, which a plain split of every matrix would get wrong.
    manifest = shard_manifest(state, tp)
    assert run_distributed(_fingerprint_after_parallelize, tp, timeout=90) == list(enumerate(manifest))
    shard = shard_state(state, 1, 2)
    assert shard["layers.0.attn.o_proj.weight"].shape[1] * 2 == state["layers.0.attn.o_proj.weight"].shape[1]
    assert torch.equal(shard["norm.weight"], state["norm.weight"])       # norms stay replicated


def test_a_plan_that_does_not_divide_is_named():
    with pytest.raises(ValueError, match="layers.0.mlp.gate_proj.weight: .*tp=5"):
        shard_state({"layers.0.mlp.gate_proj.weight": torch.ones(12, 4)}, 0, 5)


def test_tp_against_one_process_in_fp32_and_bf16():
    from lessons_lib.serving.numerics import tp_vs_one_process

    for dtype in ("float32", "bfloat16"):
        assert tp_vs_one_process(tp=1, dtype=dtype)["elements_differing"] == 0   # the same matmul
    fp32, bf16 = tp_vs_one_process(tp=8), tp_vs_one_process(tp=8, dtype="bfloat16")
    assert 0 < fp32["max_rel_diff"] < 1e-5
    assert bf16["elements_differing"] > 0 and fp32["max_rel_diff"] < bf16["max_rel_diff"] < 0.05
    with pytest.raises(ValueError, match="dtype="):
        tp_vs_one_process(dtype="float16")


def test_batch_variance_compares_with_the_request_served_alone():
    from lessons_lib.serving.numerics import batch_variance

    model = load_model("random:0")
    before = state_fingerprint(model.state_dict())
    rows = batch_variance(model, [1, 2, 8])
    assert [r["batch"] for r in rows] == [1, 2, 8] and rows[0]["logits_differing"] == 0
    assert all(r["max_abs_diff"] < 1e-3 for r in rows)
    assert state_fingerprint(model.state_dict()) == before          # the model is not cast in place
    with pytest.raises(ValueError, match="batch_sizes"):
        batch_variance(model, [])
