"""Lesson 06: every policy's choice on scripted cases; the simulation is deterministic and sane."""

import pytest

from lessons_lib.serving.policies import (LeastOutstanding, PowerOfTwoChoices, PrefixCacheAware, RoundRobin,
                                          TokenCostAware, WorkerLoad, block_hashes, make_policy)
from lessons_lib.serving.protocol import Request
from lessons_lib.serving.simulate import compare_policies, make_trace, percentile, simulate

pytestmark = pytest.mark.lesson06


def loads(*triples):
    return [WorkerLoad(w, n, t) for w, n, t in triples]


def req(prompt=(1, 2, 3), new=4, rid="r"):
    return Request(rid, tuple(prompt), new)


def test_round_robin_cycles_whatever_the_load():
    p = RoundRobin()
    ws = loads(("a", 9, 900), ("b", 0, 0), ("c", 0, 0))
    assert [p(req(), ws) for _ in range(5)] == ["a", "b", "c", "a", "b"]


def test_least_outstanding_picks_the_fewest_in_flight_and_breaks_ties_by_order():
    ws = loads(("a", 3, 10), ("b", 1, 900), ("c", 1, 5))
    assert LeastOutstanding()(req(), ws) == "b"


def test_token_cost_counts_tokens_not_requests():
    ws = loads(("a", 1, 900), ("b", 3, 30), ("c", 2, 60))
    assert TokenCostAware()(req(), ws) == "b"
    assert LeastOutstanding()(req(), ws) == "a"


def test_power_of_two_takes_the_less_loaded_of_its_two_samples_and_is_seeded():
    ws = loads(("a", 5, 0), ("b", 1, 0), ("c", 9, 0), ("d", 3, 0))
    p, q = PowerOfTwoChoices(seed=1), PowerOfTwoChoices(seed=1)
    picks = [p(req(), ws) for _ in range(200)]
    assert picks == [q(req(), ws) for _ in range(200)]
    assert "c" not in picks                    # the most loaded always loses its pair
    assert set(picks) == {"a", "b", "d"}       # but it is not least-outstanding: a wins vs c
    # One worker: nothing to sample.
    assert PowerOfTwoChoices()(req(), loads(("x", 4, 0))) == "x"


def test_prefix_aware_routes_to_the_longest_cached_prefix_then_to_the_least_loaded():
    p = PrefixCacheAware(block_size=4)
    system = list(range(100, 112))            # 3 full blocks shared by the prompts below
    ws = loads(("a", 0, 0), ("b", 0, 0))
    assert p(req(system + [1, 2]), ws) == "a"             # nobody has it: tie -> least loaded, first
    ws = loads(("a", 5, 500), ("b", 0, 0))
    assert p(req(system + [7, 7, 7, 7, 9]), ws) == "a"    # a holds 3 blocks: wins despite its load
    assert p(req([5, 5, 5, 5, 5]), ws) == "b"             # no match anywhere: least loaded
    assert p(req(system[:8] + [0, 0, 0, 0]), ws) == "a"   # 2-block match on a, none on b


def test_block_hashes_are_chained_and_salted():
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2 and a == block_hashes(list(range(10)), 4)
    b = block_hashes([99] + list(range(1, 10)), 4)
    assert a[0] != b[0] and a[1] != b[1]       # a change in block 0 changes every later hash
    assert block_hashes(list(range(10)), 4, salt=b"tenant-a") != a
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2], 0)


def test_bad_policy_names_and_empty_worker_lists_are_clear_errors():
    with pytest.raises(ValueError, match="policy='fastest'.*one of"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="no live worker"):
        RoundRobin()(req(), [])


def test_simulation_is_deterministic_and_serves_every_request_once():
    trace = make_trace(120, seed=3)
    r1, r2 = simulate(trace, "power-of-two"), simulate(trace, PowerOfTwoChoices(seed=0))
    assert r1.latency == r2.latency and len(r1.latency) == 120
    assert all(v > 0 for v in r1.latency.values())


def test_load_aware_policies_beat_round_robin_with_a_slow_worker():
    results = {r.policy: r.summary() for r in compare_policies(make_trace(300, seed=0))}
    rr = results["round-robin"]["p99_s"]
    for name in ("least-outstanding", "power-of-two", "token-cost"):
        assert results[name]["p99_s"] < rr / 2, (name, results)
    # Round-robin keeps sending a quarter of the work to the slow worker (speed 0.3).
    rr_sim = simulate(make_trace(300, seed=0), "round-robin")
    share = sum(w == "w3" for w in rr_sim.worker_of.values()) / 300
    assert 0.2 < share < 0.3
    assert results["prefix-aware"]["prefix_hit_rate"] > results["round-robin"]["prefix_hit_rate"]


def test_percentile_is_nearest_rank():
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 99) == 4
    with pytest.raises(ValueError):
        percentile([], 50)


def test_queue_series_is_a_step_function_of_the_timeline():
    from lessons_lib.serving.simulate import SimResult
    from lessons_lib.viz.queues import queue_series

    r = SimResult("demo", timeline=[(0.0, "w0", 1), (1.0, "w1", 2), (2.0, "w0", 0), (4.0, "w1", 0)])
    times, series = queue_series(r, n_points=5)
    assert times == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert series == {"w0": [1, 1, 0, 0, 0], "w1": [0, 2, 2, 2, 0]}
    with pytest.raises(ValueError, match="empty timeline"):
        queue_series(SimResult("empty"))
    full = simulate(make_trace(50, seed=1), "least-outstanding")
    _, s = queue_series(full)
    assert set(s) == {"w0", "w1", "w2", "w3"} and all(v >= 0 for ys in s.values() for v in ys)


def test_kv_aware_weighs_reported_cached_blocks_against_load():
    prompt = tuple(range(1, 49))                       # three full blocks of 16
    hashes = block_hashes(prompt, 16)
    request = Request("r", prompt, 4)
    warm = WorkerLoad("warm", outstanding=2, cached_blocks=frozenset(hashes))
    cold = WorkerLoad("cold", outstanding=0)
    assert make_policy("kv-aware", alpha=1.0).choose(request, [cold, warm]) == "warm"   # 3 - 2 > 0
    assert make_policy("kv-aware", alpha=2.0).choose(request, [cold, warm]) == "cold"   # 3 - 4 < 0
    # Blocks 2 and 3 without block 1 are no prefix: they count for nothing.
    gappy = WorkerLoad("gappy", outstanding=1, cached_blocks=frozenset(hashes[1:]))
    assert make_policy("kv-aware").choose(request, [gappy, cold]) == "cold"
    with pytest.raises(ValueError, match="alpha=-1"):
        make_policy("kv-aware", alpha=-1)


def test_bounded_prefix_affinity_leaves_an_overloaded_worker():
    policy = make_policy("prefix-affinity-bounded", load_factor=1.0)
    prompt = tuple(range(1, 33))
    loads = [WorkerLoad("a"), WorkerLoad("b")]
    assert policy.choose(Request("r0", prompt, 1), loads) == "a"
    assert policy.choose(Request("r1", prompt, 1), [WorkerLoad("a", 1), WorkerLoad("b", 0)]) == "a"
    # a has 4 outstanding against a mean of 2: beyond 1.0 x 2 + 1, so the match no longer wins
    assert policy.choose(Request("r2", prompt, 1), [WorkerLoad("a", 4), WorkerLoad("b", 0)]) == "b"
