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
