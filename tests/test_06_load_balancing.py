"""Lesson 06: every policy's choice on scripted cases; the simulation is deterministic and sane."""

import pytest

from lessons_lib.serving.policies import (LeastOutstanding, PowerOfTwoChoices, PrefixCacheAware, RoundRobin,
                                          TokenCostAware, WorkerLoad, block_hashes, make_policy)
from lessons_lib.serving.protocol import Request
from lessons_lib.serving.simulate import (CostModel, TraceItem, compare_policies, fit_cost_model, make_trace,
                                          measure_capacity, percentile, retime, simulate)

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
    rr = results["round-robin"]["ttft_p99_s"]
    for name in ("least-outstanding", "power-of-two", "token-cost", "kv-aware"):
        assert results[name]["ttft_p99_s"] < rr / 2, (name, results)
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


def test_queue_widget_redraws_the_chosen_policy_and_window():
    from lessons_lib.serving.simulate import SimResult
    from lessons_lib.viz.queues import queue_widget

    runs = [SimResult("a", timeline=[(0.0, "w0", 1), (1.0, "w1", 3), (2.0, "w1", 0)]),
            SimResult("b", timeline=[(0.0, "w0", 2), (4.0, "w0", 0)])]
    w = queue_widget(runs)
    assert w.data["policy"] == "a" and w.data["peak"] == 3 and "longest queue 3" in w.text
    w.controls["policy"].value = "b"
    assert w.data["policy"] == "b" and w.data["window"] == (0.0, 4.0)
    w.controls["window"].value = (0.0, 1.0)
    assert w.figure.axes[0].get_xlim() == (0.0, 1.0) and w.data["peak"] == 2


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


# -- the continuously batching worker of the simulator -----------------------------------------
def test_a_worker_batches_requests_and_charges_every_step_by_one_formula():
    cost = CostModel(step_overhead_s=0.01, prefill_s_per_token=0.001, decode_s_per_token=0.002,
                     max_num_seqs=4, max_num_batched_tokens=64)
    trace = [TraceItem(0.0, Request(f"r{i}", tuple(range(10 * i + 1, 10 * i + 11)), 3)) for i in range(4)]
    r = simulate(trace, "round-robin", speeds=(1.0,), cost=cost, cache_blocks=0)
    # Step 1 prefills all four 10-token prompts (40 tokens) and gives each its first token.
    first = 0.01 + 40 * 0.001
    assert all(t == pytest.approx(first) for t in r.ttft.values())
    # Steps 2 and 3 decode the four together: one token each, 4 decode tokens a step.
    assert all(t == pytest.approx(0.01 + 4 * 0.002) for t in r.tpot.values())
    assert r.steps == 3 and r.makespan == pytest.approx(first + 2 * (0.01 + 4 * 0.002))
    # max_num_seqs=1: the same requests one after the other, each paying every step's overhead.
    one = simulate(trace, "round-robin", speeds=(1.0,), cost=CostModel(0.01, 0.001, 0.002, 1, 64), cache_blocks=0)
    assert one.steps == 12 and one.makespan > 2 * r.makespan
    # A worker at speed 0.5 takes twice as long for everything.
    half = simulate(trace, "round-robin", speeds=(0.5,), cost=cost, cache_blocks=0)
    assert half.makespan == pytest.approx(2 * r.makespan)


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    cost = CostModel(step_overhead_s=0.0, prefill_s_per_token=0.001, decode_s_per_token=0.001,
                     max_num_seqs=2, max_num_batched_tokens=16)
    trace = [TraceItem(0.0, Request("long", tuple(range(1, 41)), 2))]
    r = simulate(trace, "round-robin", speeds=(1.0,), cost=cost, cache_blocks=0)
    assert r.steps == 4                                   # 16 + 16 + 8 prompt tokens, then 1 decode
    assert r.ttft["long"] == pytest.approx(0.040) and r.tpot["long"] == pytest.approx(0.001)


def test_token_cost_weighs_prompt_and_decode_tokens_by_the_simulators_costs():
    cost = CostModel(step_overhead_s=0.008, prefill_s_per_token=1e-4, decode_s_per_token=1e-4, max_num_seqs=8)
    weights = cost.token_costs()
    assert weights == {"prefill_cost": pytest.approx(1e-4), "decode_cost": pytest.approx(1e-4 + 0.001)}
    policy = make_policy("token-cost", **weights)
    # a: 1000 prompt tokens (0.1 s of prefill); b: 100 new tokens (0.11 s of decode steps).
    a = WorkerLoad("a", 1, 1000, 1000, 0)
    b = WorkerLoad("b", 1, 100, 0, 100)
    assert policy(req(), [a, b]) == "a"
    assert TokenCostAware()(req(), [a, b]) == "b"       # counting tokens alone


def test_capacity_is_measured_at_saturation_and_scales_with_speed():
    trace = make_trace(100, seed=2)
    one = measure_capacity(trace, speeds=(1.0,))
    assert measure_capacity(trace, speeds=(1.0, 1.0, 0.5)) == pytest.approx(2.5 * one)
    # Offered below capacity, a balanced fleet keeps up: it answers as fast as requests arrive.
    r = simulate(retime(trace, 0.5 * 2 * one, seed=0), "least-outstanding", speeds=(1.0, 1.0))
    assert max(r.ttft.values()) < 1.0 and len(r.latency) == 100


def test_retime_keeps_the_requests_and_sets_the_rate():
    trace = make_trace(400, seed=0)
    fast = retime(trace, 100.0, seed=1)
    assert [t.request for t in fast] == [t.request for t in trace]
    assert 3.5 < fast[-1].arrival < 4.5                  # 400 arrivals at 100/s
    with pytest.raises(ValueError, match="rate"):
        retime(trace, 0)


def test_goodput_counts_requests_within_both_slos():
    r = simulate(make_trace(200, seed=0), "least-outstanding")
    good_rps, attained = r.goodput(slo_ttft_s=1e9, slo_tpot_s=1e9)
    assert attained == 1.0 and good_rps == pytest.approx(200 / r.makespan)
    assert r.goodput(1e-9, 1e9) == (0.0, 0.0)
    _, strict = r.goodput(0.05, 0.01)
    assert 0 < strict < 1


def test_stale_load_makes_least_outstanding_herd_but_not_power_of_two():
    trace = make_trace(600, seed=0)
    offered = retime(trace, 0.8 * measure_capacity(trace), seed=1)

    def longest_run(result):
        workers = [result.worker_of[t.request.id] for t in offered]
        run = best = 1
        for a, b in zip(workers, workers[1:]):
            run = run + 1 if a == b else 1
            best = max(best, run)
        return best

    fresh = simulate(offered, "least-outstanding")
    stale = simulate(offered, "least-outstanding", load_report_interval=0.2)
    two = simulate(offered, PowerOfTwoChoices(seed=0), load_report_interval=0.2)
    assert longest_run(stale) > 3 * longest_run(two)
    assert stale.summary()["ttft_p99_s"] > 3 * two.summary()["ttft_p99_s"]
    assert stale.summary()["ttft_p99_s"] > 3 * fresh.summary()["ttft_p99_s"]


def test_a_cost_model_is_fitted_to_measured_steps():
    truth = CostModel(step_overhead_s=0.004, prefill_s_per_token=2e-4, decode_s_per_token=5e-4)
    samples = [(p, d, truth.step_s(p, d)) for p in (0, 16, 64, 200) for d in (1, 4, 8)]
    fitted = fit_cost_model(samples)
    assert fitted.step_overhead_s == pytest.approx(0.004) and fitted.prefill_s_per_token == pytest.approx(2e-4)
    assert fitted.decode_s_per_token == pytest.approx(5e-4)
    # Decode tokens that cost nothing measurable: the coefficient is 0, never negative.
    flat = fit_cost_model([(p, d, 0.004 + 1e-4 * p - 1e-6 * d) for p in (0, 50, 100) for d in (1, 8)])
    assert flat.decode_s_per_token == 0.0 and flat.prefill_s_per_token > 0
    with pytest.raises(ValueError, match="samples"):
        fit_cost_model([(1, 2, 0.1)])


# -- real workers -----------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_replay_reports_ttft_tpot_and_goodput_from_real_workers():
    from lessons_lib.serving import Router, WorkerSpec
    from lessons_lib.serving import measure_fleet_capacity, replay

    with Router([WorkerSpec("w0", model="random:0"), WorkerSpec("w1", model="random:0")]) as router:
        capacity = measure_fleet_capacity(router, n=24, max_new_tokens=4)
        assert capacity > 0
        rows = replay(router, ["round-robin", make_policy("token-cost", prefill_cost=1e-4, decode_cost=1e-3)],
                      n=12, max_new_tokens=4, rate=0.5 * capacity, slo_ttft_s=60, slo_tpot_s=60, rounds=3)
    assert [r["policy"] for r in rows] == ["round-robin", "token-cost"]
    for r in rows:
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["p99_s"]
        assert 0 < r["tpot_p50_s"] <= r["tpot_p99_s"]
        assert r["slo_attainment"] == 1.0 and r["goodput_rps"] == pytest.approx(r["throughput_rps"])
        assert sum(r["served_by"].values()) == 12
    assert rows[0]["served_by"] == {"w0": 6, "w1": 6}
