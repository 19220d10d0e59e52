"""Checkers for notebook 06 (load balancing).

- ``06.predict_hit_rate`` (predict): the prefix-cache hit rate of round-robin on a trace whose
  prompts share a system prompt, measured by the lesson's simulator;
- ``06.bounded_affinity`` (build): prefix-affinity routing with a load bound: the longest cached
  prefix wins unless its worker is overloaded;
- ``06.stale_loads`` (stretch): a burst routed between two load reports; the given router herds
  every request onto the worker that looked idle, to be fixed with the router's own accounting.
"""

from __future__ import annotations

import functools

from ..serving.policies import LeastOutstanding, PrefixCacheAware, block_hashes, make_policy
from ..serving.protocol import Request
from ..serving.simulate import TraceItem, simulate
from .check import (Incorrect, exercise, judge_prediction, labelled_cases, predicted_number, refuse_reference,
                    with_hidden)

# -- 06.predict_hit_rate (predict) ------------------------------------------------------------
HIT_REQUESTS, HIT_WORKERS, HIT_SYSTEM, HIT_QUESTION, HIT_BLOCK = 12, 3, 40, 20, 16


def hit_trace() -> list[TraceItem]:
    system = tuple(range(1000, 1000 + HIT_SYSTEM))
    return [TraceItem(0.05 * i, Request(f"r{i}", system + tuple(range(i * 100, i * 100 + HIT_QUESTION)), 4))
            for i in range(HIT_REQUESTS)]


@functools.lru_cache(maxsize=1)
def measured_hit_rate() -> float:
    result = simulate(hit_trace(), "round-robin", speeds=(1.0,) * HIT_WORKERS, block_size=HIT_BLOCK)
    return result.cached_tokens / result.prompt_tokens


@exercise("06.predict_hit_rate", "predict round-robin's prefix-cache hit rate on a shared system prompt")
def check_predict_hit_rate(candidate):
    refuse_reference(candidate, simulate, measured_hit_rate, block_hashes)
    guess = predicted_number(candidate, "predicted_hit_rate")
    measured = measured_hit_rate()
    prompt = HIT_SYSTEM + HIT_QUESTION
    per_worker_hits = HIT_REQUESTS - HIT_WORKERS
    whole = HIT_SYSTEM // HIT_BLOCK * HIT_BLOCK
    total = HIT_REQUESTS * prompt
    mistakes = [
        (per_worker_hits * HIT_SYSTEM / total, f"a cache matches whole blocks of {HIT_BLOCK} tokens: "
                                               f"the {HIT_SYSTEM}-token system prompt fills {HIT_SYSTEM // HIT_BLOCK} "
                                               f"blocks ({whole} tokens); the third block mixes it with the "
                                               f"question and never matches"),
        ((HIT_REQUESTS - 1) * whole / total, "each worker has its own cache: round-robin sends the first "
                                             f"request of each of the {HIT_WORKERS} workers to a cold cache"),
        (per_worker_hits * (whole + HIT_BLOCK) / total, "the block that holds the end of the system prompt "
                                                        "also holds the start of the question: it differs "
                                                        "between requests"),
        (measured * 100, "give a fraction between 0 and 1, not a percentage"),
        (whole / prompt, "that is one warm request's rate: divide by every request's prompt tokens, the "
                         "cold first request on each worker included"),
    ]
    judge_prediction(guess, measured, mistakes, "(fraction of prompt tokens)",
                     "Count, per worker, which requests find the system prompt cached and how many of "
                     "their tokens a block-granular cache can serve.")
    return (f"{measured:.4f}: {per_worker_hits} of {HIT_REQUESTS} requests hit {whole} of their {prompt} "
            f"tokens; prefix-aware routing would send them all to one worker")


# -- 06.bounded_affinity (build) --------------------------------------------------------------
def _reference_route(prefix_hashes, workers, bound):
    mean = sum(load for _, load, _ in workers) / len(workers)
    best = None
    for index, (wid, load, cached) in enumerate(workers):
        if load > bound * mean:
            continue
        match = 0
        while match < len(prefix_hashes) and prefix_hashes[match] in cached:
            match += 1
        key = (-match, load, index)
        if best is None or key < best[0]:
            best = (key, wid)
    return best[1]


def _h(*names):
    return [f"h{n}" for n in names]


AFFINITY_CASES = [
    # (what, prefix hashes, workers (id, load, cached hashes), bound)
    ("no worker has the prefix: the least loaded", _h(1, 2, 3),
     [("a", 30, set()), ("b", 10, set()), ("c", 20, set())], 1.5),
    ("b holds the longest prefix and is not overloaded", _h(1, 2, 3),
     [("a", 10, set(_h(1))), ("b", 14, set(_h(1, 2, 3))), ("c", 12, set())], 1.5),
    ("b holds the longest prefix but carries 3x the mean load", _h(1, 2, 3),
     [("a", 2, set(_h(1))), ("b", 90, set(_h(1, 2, 3))), ("c", 3, set())], 1.5),
    ("c holds hashes 2 and 3 but not 1: no prefix at all", _h(1, 2, 3),
     [("a", 10, set(_h(1))), ("b", 9, set()), ("c", 8, set(_h(2, 3)))], 1.5),
    ("a and c hold equal prefixes: the less loaded", _h(1, 2),
     [("a", 20, set(_h(1, 2))), ("b", 5, set()), ("c", 12, set(_h(1, 2)))], 2.0),
    ("a and c hold equal prefixes at equal load: the first listed", _h(1, 2),
     [("a", 7, set(_h(1, 2))), ("b", 7, set()), ("c", 7, set(_h(1, 2)))], 1.2),
    ("the bound is on the mean: b at 1.4x the mean is allowed with bound 1.5", _h(1),
     [("a", 10, set()), ("b", 14, set(_h(1))), ("c", 6, set())], 1.5),
    ("one worker", _h(1), [("only", 100, set())], 1.0),
]
AFFINITY_HIDDEN = [  # grading only: an empty prompt, five workers, a fractional mean
    ("an empty prompt: no prefix to match, the least loaded", [],
     [("a", 9, set(_h(1))), ("b", 4, set()), ("c", 6, set())], 1.5),
    ("five workers: d holds the longest prefix within the bound, e a longer one above it", _h(1, 2, 3, 4),
     [("a", 5, set(_h(1))), ("b", 3, set()), ("c", 4, set(_h(1, 2))), ("d", 6, set(_h(1, 2, 3))),
      ("e", 12, set(_h(1, 2, 3, 4)))], 1.2),
    ("a fractional mean: c at exactly bound x mean is allowed", _h(1, 2),
     [("a", 1, set()), ("b", 2, set(_h(1))), ("c", 3, set(_h(1, 2)))], 1.5),
]


@exercise("06.bounded_affinity", "prefix-affinity routing with a load bound")
def check_bounded_affinity(candidate, hidden=False):
    refuse_reference(candidate, PrefixCacheAware, make_policy, block_hashes)
    for label, (what, hashes, workers, bound) in labelled_cases(AFFINITY_CASES, AFFINITY_HIDDEN, hidden):
        what = f"{label}{what}"
        want = _reference_route(hashes, workers, bound)
        case = f"{what}: workers {[(w, load, sorted(c)) for w, load, c in workers]}, bound {bound}"
        try:
            got = candidate(list(hashes), [(w, load, set(c)) for w, load, c in workers], bound)
        except NotImplementedError:
            raise
        except Exception as exc:  # noqa: BLE001 - a learner's error is a hint that names the case
            empty = " (the prompt has no full block: prefix_hashes is empty)" if not hashes else ""
            raise Incorrect(f"{case}: your code raised {type(exc).__name__}: {exc}{empty}") from None
        if got == want:
            continue
        mean = sum(load for _, load, _ in workers) / len(workers)
        loads = dict((w, load) for w, load, _ in workers)
        if got not in loads:
            raise Incorrect(f"{case}: you returned {got!r}; return a worker id")
        if loads[got] > bound * mean:
            raise Incorrect(f"{case}: you chose {got}, whose load {loads[got]} is above bound x mean = "
                            f"{bound} x {mean:g}: the load bound excludes it, however much it has cached")
        def leading(wid):
            cached = next(c for w, _, c in workers if w == wid)
            n = 0
            while n < len(hashes) and hashes[n] in cached:
                n += 1
            return n, len(set(hashes) & cached)

        (mine, mine_any), (best, _) = leading(got), leading(want)
        if mine_any > mine and mine_any >= best:
            raise Incorrect(f"{case}: you chose {got}, expected {want}: {got} holds {mine_any} of the hashes "
                            f"but only {mine} leading ones; a cached block counts only if every block "
                            f"before it matches too (count the leading hashes, stop at the first miss)")
        if mine == best:
            raise Incorrect(f"{case}: you chose {got}, expected {want}: on equal prefixes (or none) take "
                            f"the smaller load, then the first listed")
        least = min(loads.values())
        extra = (f"; the bound is {bound} x the mean load, not x the smallest load ({least})"
                 if loads[want] > bound * least else "")
        raise Incorrect(f"{case}: you chose {got}, expected {want}, which holds a longer cached prefix "
                        f"({best} blocks against {mine}) at load {loads[want]}, within bound x mean = "
                        f"{bound * mean:g}{extra}")
    return with_hidden(f"right on {len(AFFINITY_CASES)} cases: prefixes, the load bound, ties",
                       AFFINITY_HIDDEN, hidden)


# -- 06.stale_loads (stretch) -----------------------------------------------------------------
def _reference_burst(n_requests, reported):
    counts = list(reported)
    out = []
    for _ in range(n_requests):
        w = min(range(len(counts)), key=lambda i: (counts[i], i))
        counts[w] += 1
        out.append(w)
    return out


BURST_CASES = [(8, [0, 0, 0, 0]), (6, [3, 0, 5]), (10, [4, 1, 1, 7]), (1, [2, 2]), (0, [1, 0]),
               (5, [0, 9, 9, 9])]


@exercise("06.stale_loads", "route a burst between two load reports without herding")
def check_stale_loads(candidate):
    refuse_reference(candidate, LeastOutstanding, make_policy)
    for n, reported in BURST_CASES:
        want = _reference_burst(n, reported)
        got = candidate(n, list(reported))
        case = f"{n} requests, reported outstanding {reported}"
        if not isinstance(got, (list, tuple)) or len(got) != n:
            raise Incorrect(f"{case}: return a list of {n} worker indices, got {got!r}")
        got = list(got)
        if got == want:
            continue
        if n > 1 and len(set(got)) == 1:
            raise Incorrect(f"{case}: every request went to worker {got[0]}, the one that looked least "
                            f"loaded in the last report: herding. Between reports the router must count "
                            f"what it has just sent itself (add 1 to the chosen worker)")
        final = list(reported)
        for w in got:
            if isinstance(w, int) and 0 <= w < len(final):
                final[w] += 1
        if sorted(final) == sorted(_final(n, reported)) and got != want:
            raise Incorrect(f"{case}: your loads end balanced but the order differs: you sent {got}, "
                            f"expected {want}; each request goes to the least loaded worker at that moment, "
                            f"the lowest index on ties")
        if got == [i % len(reported) for i in range(n)]:
            raise Incorrect(f"{case}: you sent {got}, round-robin over all workers, ignoring the reported "
                            f"loads; start from the report and add your own sends")
        raise Incorrect(f"{case}: you sent {got}, expected {want}; loads after your sends {final}")
    return "no herding: each request goes to the least loaded worker, counting the router's own sends"


def _final(n, reported):
    counts = list(reported)
    for w in _reference_burst(n, reported):
        counts[w] += 1
    return counts
