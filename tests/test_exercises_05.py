"""Lesson 05's exercises: the solutions pass, stubs are not attempted, the library's own
fingerprints and repair are refused, and each plausible wrong answer earns the hint about its mistake."""

import hashlib

import pytest
import torch
import torch.distributed as dist

from exercise_catalogue import assert_correct, assert_hint, assert_not_attempted, assert_refused
from lessons_lib.serving.fingerprint import broadcast_state_, diff_states, tensor_digest

pytestmark = pytest.mark.lesson05


def _stub(*args):
    raise NotImplementedError()


# -- 05.repair_bytes (predict) -----------------------------------------------------------------
EMBED_BYTES, DOWN_BYTES = 264 * 128 * 4, 128 * 384 * 4


def predicted_right():
    # embed.weight: ranks 0 and 1 agree, rank 2 differs -> rank 0 sends it to rank 2.
    # down_proj: three different copies, no majority -> nothing sent.
    return EMBED_BYTES


def predicted_by_diffing():
    return len(diff_states({}, {})) * 4


@pytest.mark.parametrize("guess, fragments", [
    (EMBED_BYTES + DOWN_BYTES, ["you predicted 331776", "sends 135168", "three different copies",
                                "nothing is sent for it"]),
    (EMBED_BYTES + 2 * DOWN_BYTES, ["three different copies"]),
    (2 * EMBED_BYTES, ["only rank 2's copy", "alone receives it"]),
    (EMBED_BYTES // 4, ["elements, not bytes"]),
    (512, ["not which row", "whole embed.weight"]),
    (2 * 3420672, ["broadcasts the whole model"]),
    (100000, ["too low", "more than half the replicas"]),
])
def test_repair_bytes_names_the_mistake(guess, fragments):
    assert_hint("05.repair_bytes", lambda: guess, *fragments)


def test_repair_bytes_verdicts():
    assert_correct("05.repair_bytes", predicted_right)
    assert_not_attempted("05.repair_bytes", _stub)
    assert_refused("05.repair_bytes", predicted_by_diffing, "diff_states")
    assert_hint("05.repair_bytes", lambda: [EMBED_BYTES], "return one number")


# -- 05.majority_repair (build) ----------------------------------------------------------------
def _bytes_digest(t):
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(str(t.dtype).encode() + str(tuple(t.shape)).encode() + data).hexdigest()


def _sum_digest(t):
    return str(float(t.double().sum()))


def _repair(state, *, digest=_bytes_digest, trust_rank_0=False, break_ties=False, to_everyone=False,
            repairs_to_everyone=False, in_place=True, names=sorted, count_elements=False):
    rank, p = dist.get_rank(), dist.get_world_size()
    everyone = [None] * p
    dist.all_gather_object(everyone, {name: digest(t) for name, t in state.items()})
    sent, undecided = 0, []
    for name in names(state):
        held = [d[name] for d in everyone]
        if trust_rank_0:
            winner = held[0]
        else:
            winner = next((h for h in held if held.count(h) * 2 > p), None)
        if winner is None and break_ties:
            winner = held[0]
        if winner is None:
            undecided.append(name)
            continue
        source = held.index(winner)
        differ = [r for r in range(p) if held[r] != winner]
        targets = [r for r in range(p) if r != source and (to_everyone or held[r] != winner
                                                           or (repairs_to_everyone and differ))]
        for target in targets:
            if rank == source:
                dist.send(state[name], target)
                sent += state[name].numel() * (1 if count_elements else state[name].element_size())
            elif rank == target:
                if in_place:
                    dist.recv(state[name], source)
                else:
                    fresh = torch.empty_like(state[name])
                    dist.recv(fresh, source)
                    state[name] = fresh
    return sent, undecided


def repair_right(state):
    return _repair(state)


def repair_trusting_rank_0(state):
    return _repair(state, trust_rank_0=True)


def repair_by_sums(state):
    return _repair(state, digest=_sum_digest)


def repair_breaking_ties(state):
    return _repair(state, break_ties=True)


def repair_sending_to_everyone(state):
    return _repair(state, to_everyone=True)


def repair_sending_repairs_to_everyone(state):
    return _repair(state, repairs_to_everyone=True)


def repair_replacing_tensors(state):
    return _repair(state, in_place=False)


def repair_counting_elements(state):
    return _repair(state, count_elements=True)


def repair_in_insertion_order(state):
    return _repair(state, names=list)


def repair_by_broadcast(state):
    for name in sorted(state):
        dist.broadcast(state[name], src=0)
    return 0, []


def repair_with_the_library(state):
    broadcast_state_(state, src=0)
    return 0, []


@pytest.mark.parametrize("answer, fragments", [
    (repair_trusting_rank_0, ["p=3, rank 0 holds the bad copy", "rank 0's w", "odd one out",
                              "not rank 0's"]),
    (repair_by_sums, ["two tensors bad on one rank", "rank 1's b", "-0.0", "digest the raw bytes"]),
    (repair_breaking_ties, ["p=4, a 2-2 tie on n", "n has no majority", "leave it alone"]),
    (repair_sending_to_everyone, ["p=3, one bad replica", "rank 0 reported 200 bytes sent, expected 12",
                                  "every tensor to every other rank"]),
    (repair_sending_repairs_to_everyone, ["rank 0 reported 24 bytes sent, expected 12",
                                          "each repaired tensor to every other rank"]),
    (repair_replacing_tensors, ["rank 2 replaced ['b']", "in place"]),
    (repair_counting_elements, ["rank 0 reported 3 bytes", "counts elements"]),
    (repair_by_broadcast, ["calls dist.broadcast", "only to the replicas whose copy differs"]),
])
def test_majority_repair_names_the_mistake(answer, fragments):
    assert_hint("05.majority_repair", answer, *fragments)


def test_majority_repair_verdicts():
    assert_correct("05.majority_repair", repair_right)
    assert_not_attempted("05.majority_repair", _stub)
    assert_refused("05.majority_repair", repair_with_the_library, "broadcast_state_")


# -- 05.pinned_routing (stretch) ---------------------------------------------------------------
def route_given(request, workers):
    candidates = [w for w in workers if w["state"] != "stopped"]
    if request["version"] is not None:
        pinned = [w for w in candidates if w["version"] == request["version"]]
        candidates = pinned or candidates
    best = min(candidates, key=lambda w: w["load"])
    return best["name"]


def _route(request, workers, *, drain_for_new=True, prefer_serving=True, fall_back=False,
           none_when_empty=True, pick=min):
    serving = [w for w in workers if w["state"] == "serving"]
    draining = [w for w in workers if w["state"] == "draining"]
    if request["version"] is None:
        candidates = serving if drain_for_new else serving + draining
    else:
        same = [w for w in serving + draining if w["version"] == request["version"]]
        if prefer_serving:
            same = [w for w in serving if w["version"] == request["version"]] or same
        candidates = same or (serving if fall_back else [])
    if not candidates and none_when_empty:
        return None
    return pick(candidates, key=lambda w: w["load"])["name"]


def route_right(request, workers):
    return _route(request, workers)


def route_draining_for_pinned(request, workers):
    return _route(request, workers, prefer_serving=False)


def route_falling_back(request, workers):
    return _route(request, workers, fall_back=True)


def route_crashing_when_none(request, workers):
    return _route(request, workers, none_when_empty=False)


def route_busiest(request, workers):
    return _route(request, workers, pick=max)


def route_by_name(request, workers):
    ordered = sorted(workers, key=lambda w: w["name"])
    return _route(request, ordered)


def route_with_the_reference(request, workers):
    from lessons_lib.exercises.lesson05 import reference_route
    return reference_route(request, workers)


@pytest.mark.parametrize("answer, fragments", [
    (route_given, ["w0 draining, a new session", "returned 'w0', expected 'w2'", "takes no new session"]),
    (route_draining_for_pinned, ["s1's next step (pinned to v1)", "returned 'w0', expected 'w1'",
                                 "only when no serving worker of that version is left"]),
    (route_falling_back, ["w1 stopped too", "returned 'w3', expected None", "mix two models' text",
                          "return None"]),
    (route_crashing_when_none, ["w1 stopped too", "raised ValueError", "return None"]),
    (route_busiest, ["before the update", "returned 'w0', expected 'w1'", "least loaded"]),
    (route_by_name, ["s2's next step (v2)", "returned 'w2', expected 'w3'", "first listed"]),
])
def test_pinned_routing_names_the_mistake(answer, fragments):
    assert_hint("05.pinned_routing", answer, *fragments)


def test_pinned_routing_verdicts():
    assert_correct("05.pinned_routing", route_right)
    assert_not_attempted("05.pinned_routing", _stub)
    assert_refused("05.pinned_routing", route_with_the_reference, "reference_route")


def test_the_checker_digest_tells_what_the_library_tells():
    from lessons_lib.exercises.lesson05 import _digest
    a, b, c = torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.float64)
    b[1] = -0.0
    for x, y in ((a, b), (a, c), (a, a.clone())):
        assert (_digest(x) == _digest(y)) == (tensor_digest("t", x) == tensor_digest("t", y))


def test_names_visited_in_each_rank_own_order_are_caught():
    # Last: the mismatched messages abort a rank, so the next check would wait for fresh ones.
    assert_hint("05.majority_repair", repair_in_insertion_order, "listed in another order",
                "sorted order on every rank")
