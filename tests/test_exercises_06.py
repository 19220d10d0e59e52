"""Lesson 06's exercises: every catalogued wrong answer earns the hint for its mistake."""

import pytest

from exercise_catalogue import (assert_correct, assert_hidden_hint, assert_hint, assert_not_attempted,
                               assert_refused, solution_function)

pytestmark = pytest.mark.lesson06


# -- 06.predict_hit_rate -----------------------------------------------------------------------
predicted_hit_rate = solution_function("06_load_balancing", "predicted_hit_rate")


@pytest.mark.parametrize("guess, fragments", [
    (9 * 40 / 720, ["whole blocks"]),
    (11 * 32 / 720, ["its own cache"]),
    (9 * 48 / 720, ["start of the question"]),
    (40.0, ["not a percentage"]),
    (32 / 60, ["one warm request", "cold first request"]),
    (0.9, ["Count, per worker"]),
])
def test_predict_hit_rate_names_the_mistake(guess, fragments):
    assert_hint("06.predict_hit_rate", lambda: guess, *fragments)


def test_predict_hit_rate_verdicts():
    assert_correct("06.predict_hit_rate", predicted_hit_rate)

    def stub():
        raise NotImplementedError()
    assert_not_attempted("06.predict_hit_rate", stub)

    def simulating():
        from lessons_lib.serving.simulate import simulate
        return simulate
    assert_refused("06.predict_hit_rate", simulating, "simulate")


# -- 06.bounded_affinity -----------------------------------------------------------------------
bounded_affinity = solution_function("06_load_balancing", "bounded_affinity")


def affinity_without_bound(prefix_hashes, workers, bound):
    return bounded_affinity(prefix_hashes, workers, float("inf"))


def affinity_counting_any_hash(prefix_hashes, workers, bound):
    mean = sum(load for _, load, _ in workers) / len(workers)
    eligible = [(i, w) for i, w in enumerate(workers) if w[1] <= bound * mean]
    return min(eligible, key=lambda e: (-len(set(prefix_hashes) & e[1][2]), e[1][1], e[0]))[1][0]


def affinity_last_on_ties(prefix_hashes, workers, bound):
    mean = sum(load for _, load, _ in workers) / len(workers)
    best, best_key = None, None
    for wid, load, cached in workers:
        if load > bound * mean:
            continue
        match = 0
        while match < len(prefix_hashes) and prefix_hashes[match] in cached:
            match += 1
        if best_key is None or match >= best_key:
            best, best_key = wid, match
    return best


def affinity_bound_on_minimum(prefix_hashes, workers, bound):
    least = min(load for _, load, _ in workers)
    allowed = [(w, load, cached) for w, load, cached in workers if load <= bound * least]
    return bounded_affinity(prefix_hashes, allowed, float("inf"))


def affinity_with_the_library(prefix_hashes, workers, bound):
    from lessons_lib.serving.policies import PrefixCacheAware
    return PrefixCacheAware().choose(None, workers)


@pytest.mark.parametrize("answer, fragments", [
    (affinity_without_bound, ["above bound x mean"]),
    (affinity_counting_any_hash, ["every block before it matches"]),
    (affinity_last_on_ties, ["equal prefixes"]),
    (affinity_bound_on_minimum, ["not x the smallest load"]),
])
def test_bounded_affinity_names_the_mistake(answer, fragments):
    assert_hint("06.bounded_affinity", answer, *fragments)


def affinity_counting_with_a_for_loop(prefix_hashes, workers, bound):
    mean = sum(load for _, load, _ in workers) / len(workers)
    best = None
    for index, (wid, load, cached) in enumerate(workers):
        if load > bound * mean:
            continue
        for match, h in enumerate(prefix_hashes):
            if h not in cached:
                break
        else:
            match += 1          # every hash cached; with no hashes, `match` was never set
        key = (-match, load, index)
        if best is None or key < best[0]:
            best = (key, wid)
    return best[1]


def test_bounded_affinity_hidden_case_sends_an_empty_prompt():
    # Every public case has at least one prefix hash; a hidden one has none.
    assert_hidden_hint("06.bounded_affinity", affinity_counting_with_a_for_loop, "an empty prompt",
                       "UnboundLocalError", "prefix_hashes is empty")


def test_bounded_affinity_verdicts():
    assert_correct("06.bounded_affinity", bounded_affinity)
    assert_refused("06.bounded_affinity", affinity_with_the_library, "PrefixCacheAware")

    def stub(prefix_hashes, workers, bound):
        raise NotImplementedError()
    assert_not_attempted("06.bounded_affinity", stub)


# -- 06.stale_loads ----------------------------------------------------------------------------
route_burst = solution_function("06_load_balancing", "route_burst")


def herding(n_requests, reported):
    w = min(range(len(reported)), key=lambda i: (reported[i], i))
    return [w] * n_requests


def round_robin(n_requests, reported):
    return [i % len(reported) for i in range(n_requests)]


def highest_index_on_ties(n_requests, reported):
    counts = list(reported)
    chosen = []
    for _ in range(n_requests):
        w = min(range(len(counts)), key=lambda i: (counts[i], -i))
        counts[w] += 1
        chosen.append(w)
    return chosen


def with_the_library(n_requests, reported):
    from lessons_lib.serving.policies import LeastOutstanding
    return LeastOutstanding


@pytest.mark.parametrize("answer, fragments", [
    (herding, ["herding", "count what it has just sent"]),
    (round_robin, ["ignoring the reported loads"]),
    (highest_index_on_ties, ["lowest index on ties"]),
])
def test_stale_loads_names_the_mistake(answer, fragments):
    assert_hint("06.stale_loads", answer, *fragments)


def test_stale_loads_verdicts():
    assert_correct("06.stale_loads", route_burst)
    assert_refused("06.stale_loads", with_the_library, "LeastOutstanding")

    def stub(n_requests, reported):
        raise NotImplementedError()
    assert_not_attempted("06.stale_loads", stub)
