"""Checkers for notebook 05 (consistency).

- ``05.repair_bytes`` (predict): the bytes a per-tensor majority repair of three replicas moves,
  measured on three real ranks;
- ``05.majority_repair`` (build): find each tensor's majority copy across the replicas and send it,
  point to point, only to the replicas whose copy differs; leave ties alone;
- ``05.pinned_routing`` (stretch): fix a router that breaks version pinning during a rolling update.
"""

from __future__ import annotations

import hashlib
import numbers

import torch
import torch.distributed as dist

from ..launch import run_distributed
from ..serving.fingerprint import (broadcast_state_, diff_states, gather_fingerprints, state_fingerprint,
                                   tensor_digest)
from .check import (Incorrect, exercise, labelled_cases, predicted_number, raise_if_stub,
                    recording_collectives, refuse_reference, run_ranks, with_hidden)
from ..serving.worker import load_model


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(str(t.dtype).encode() + str(tuple(t.shape)).encode() + _raw(t)).hexdigest()


def majority_plan(digests: list[dict]) -> tuple[dict, list[str]]:
    """For every name (sorted): ``(source rank, ranks to repair)``, and the names with no majority.

    ``digests[r][name]`` is rank ``r``'s digest of its copy. A copy wins when more than half the
    ranks hold it; the lowest rank holding it sends it to every rank whose copy differs.
    """
    p = len(digests)
    plan, undecided = {}, []
    for name in sorted(digests[0]) if digests else []:
        held = [d[name] for d in digests]
        winner = next((h for h in held if held.count(h) * 2 > p), None)
        if winner is None:
            undecided.append(name)
            continue
        plan[name] = (held.index(winner), [r for r in range(p) if held[r] != winner])
    return plan, undecided


def _reference_repair(state: dict) -> tuple[int, list[str]]:
    """The checker's own repair (to measure the predict exercise); run on every rank."""
    rank = dist.get_rank()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, {name: _digest(t) for name, t in state.items()})
    plan, undecided = majority_plan(digests)
    sent = 0
    for name, (source, targets) in plan.items():
        for target in targets:
            if rank == source:
                dist.send(state[name], target)
                sent += state[name].numel() * state[name].element_size()
            elif rank == target:
                dist.recv(state[name], source)
    return sent, undecided


# -- 05.repair_bytes (predict) ----------------------------------------------------------------
EMBED, DOWN = "embed.weight", "layers.2.mlp.down_proj.weight"
_measured: dict = {}


def corrupted_replica_state(rank: int) -> dict:
    """The tiny LM as rank ``rank`` of three holds it: rank 1 has one element of ``DOWN`` moved by
    one ulp; rank 2 has another element of ``DOWN`` moved and row 5 of ``EMBED`` overwritten."""
    state = {k: v.detach().clone() for k, v in load_model("random:0").state_dict().items()}
    if rank in (1, 2):
        flat = state[DOWN].view(-1)
        i = 123 if rank == 1 else 4567
        flat[i] = torch.nextafter(flat[i], torch.tensor(1.0))
    if rank == 2:
        state[EMBED][5] = 0.5
    return state


def _measure_on_rank() -> tuple[int, list[str]]:
    return _reference_repair(corrupted_replica_state(dist.get_rank()))


def measured_repair() -> dict:
    """Bytes each of three real ranks sends in the per-tensor majority repair, and the undecided names."""
    if "repair" not in _measured:
        results = run_distributed(_measure_on_rank, 3, timeout=60)
        _measured["repair"] = {"sent": [s for s, _ in results], "undecided": results[0][1]}
    return _measured["repair"]


@exercise("05.repair_bytes", "predict: bytes a per-tensor majority repair of three replicas sends")
def check_repair_bytes(candidate):
    refuse_reference(candidate, diff_states, tensor_digest, state_fingerprint, run_distributed,
                     measured_repair, majority_plan)
    guess = predicted_number(candidate, "predicted_repair_bytes")
    m = measured_repair()
    want = sum(m["sent"])
    state = corrupted_replica_state(0)
    nbytes = {name: t.numel() * t.element_size() for name, t in state.items()}
    embed, down, whole = nbytes[EMBED], nbytes[DOWN], sum(nbytes.values())
    if guess == want:
        left = ", ".join(m["undecided"]) or "no tensor"
        return (f"measured on 3 ranks: {m['sent']} bytes sent; {left} had no majority and was left "
                f"alone, as predicted")
    told = f"you predicted {guess:g} bytes; measured on 3 ranks the repair sends {want} (ranks send {m['sent']})"
    no_majority = (f"{DOWN} has three different copies (rank 1 and rank 2 each changed a different "
                   f"element), so no copy is held by more than half the replicas: nothing is sent for it")
    known = {
        embed + down: no_majority,
        embed + 2 * down: no_majority,
        2 * embed: f"only rank 2's copy of {EMBED} differs: it alone receives it",
        want // 4: "that is elements, not bytes: float32 is 4 bytes",
        want * 8: "that is bits, not bytes",
        state[EMBED].shape[1] * 4: f"a digest per tensor says which tensor differs, not which row: the "
                              f"whole {EMBED} travels",
        4: "a digest per tensor says which tensor differs, not which element: whole tensors travel",
        2 * whole: "that broadcasts the whole model to both other replicas, the lesson's first repair; "
                   "per-tensor digests let the repair send only what differs",
        whole: "that is the whole model once; per-tensor digests let the repair send only what differs",
    }
    if guess in known:
        raise Incorrect(f"{told}: {known[guess]}.")
    direction = "too low" if guess < want else "too high"
    raise Incorrect(f"{told}: {direction}. For each tensor, find the copy more than half the replicas "
                    f"hold; it travels, whole, to each replica that differs, and a tensor without such a "
                    f"copy is left alone.")


# -- 05.majority_repair (build) ---------------------------------------------------------------
def _base_state() -> dict:
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8,
            "b": torch.tensor([0.5, 0.0, -1.25]),
            "n": torch.arange(5, dtype=torch.int64)}


def _corrupt(state: dict, name: str, how: str) -> None:
    t = state[name]
    if how == "value":
        t.view(-1)[1] += 1
    elif how == "swap":      # the sum and the mean stay the same
        flat = t.view(-1)
        flat[0], flat[1] = flat[1].clone(), flat[0].clone()
    elif how == "sign":      # -0.0 == 0.0 as numbers; only the bits differ
        t.view(-1)[1] = -0.0


# p, {rank: {name: corruption}}, ranks whose dict lists the names in another order, what it shows
REPAIR_CASES = [
    (3, {2: {"b": "value"}}, (), "one bad replica"),
    (3, {0: {"w": "value"}}, (), "rank 0 holds the bad copy"),
    (3, {1: {"w": "swap", "b": "sign"}}, (1,), "two tensors bad on one rank, listed in another order"),
    (4, {1: {"w": "value"}, 2: {"n": "value"}, 3: {"n": "value", "b": "value"}}, (), "a 2-2 tie on n"),
    (4, {}, (2,), "four identical replicas"),
    (3, None, (), "replicas with no tensors"),
]
REPAIR_HIDDEN = [  # grading only: five replicas
    (5, {0: {"w": "value"}, 3: {"w": "value", "n": "swap"}, 4: {"b": "sign"}}, (4,),
     "rank 0 and rank 3 bad on w, five replicas"),
    (5, {1: {"n": "value"}, 2: {"n": "value"}}, (), "two of five replicas bad on n: three still agree"),
]
_SOURCE_LABEL = {"value": "one element changed", "swap": "two elements swapped (the same sum)",
                 "sign": "0.0 replaced by -0.0 (equal as numbers)"}


def case_state(rank: int, bad: dict | None, reordered: tuple) -> dict:
    """Rank ``rank``'s state in a case; ``bad=None`` is a replica with no tensors at all."""
    if bad is None:
        return {}
    state = _base_state()
    for name, how in bad.get(rank, {}).items():
        _corrupt(state, name, how)
    if rank in reordered:
        state = dict(reversed(list(state.items())))
    return state


COLLECTIVES = ("broadcast", "broadcast_object_list", "all_reduce", "all_gather", "all_gather_into_tensor",
               "scatter", "scatter_object_list", "reduce", "reduce_scatter", "all_to_all")


def _repair_on_rank(candidate, bad, reordered):
    rank = dist.get_rank()
    state = case_state(rank, bad, reordered)
    held = dict(state)     # the tensor objects the model's parameters would be
    returned, used = recording_collectives(lambda: candidate(state), COLLECTIVES)
    replaced = sorted(n for n in held if state.get(n) is not held[n])
    return {"held": {n: t.clone() for n, t in held.items()}, "replaced": replaced,
            "returned": returned if isinstance(returned, tuple) else type(returned).__name__,
            "used": used}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _raw(a) == _raw(b)


def _diagnose_repair(p, bad, reordered, label, results, tag: str = "") -> None:
    case = f"{tag}p={p}, {label}"
    states = [case_state(r, bad, reordered) for r in range(p)]
    plan, undecided = majority_plan([{n: _digest(t) for n, t in s.items()} for s in states])
    used = sorted({u for res in results for u in res["used"]})
    if used:
        raise Incorrect(f"{case}: your code calls dist.{', dist.'.join(used)}; send each tensor only to "
                        f"the replicas whose copy differs, with send/recv (a broadcast sends it to every "
                        f"rank); the digests may travel with dist.all_gather_object")
    for rank, res in enumerate(results):
        if res["replaced"]:
            raise Incorrect(f"{case}: rank {rank} replaced {res['replaced']} in the dict with new tensors; "
                            f"the model's parameters are the tensors already there: copy into them in place "
                            f"(dist.recv(state[name], src) or state[name].copy_(received))")
    for rank, res in enumerate(results):
        for name in sorted(states[rank]):
            got, mine = res["held"][name], states[rank][name]
            if name in undecided:
                if not _same_bits(got, mine):
                    owners = [r for r in range(p) if _same_bits(states[r][name], got)]
                    raise Incorrect(f"{case}: {name} has no majority (no copy is held by more than half of "
                                    f"the {p} replicas), yet rank {rank}'s copy was overwritten with "
                                    f"{_names(owners)}'s. A tie cannot tell the good copy from the bad: "
                                    f"leave it alone and report it as undecided")
                continue
            source, targets = plan[name]
            want = states[source][name]
            if _same_bits(got, want):
                continue
            majority = [r for r in range(p) if _same_bits(states[r][name], want)]
            head = f"{case}: rank {rank}'s {name} is {got.tolist()}, the copy {_names(majority)} hold is {want.tolist()}"
            if _same_bits(got, mine):
                how = (bad or {}).get(rank, {}).get(name)
                if how in ("swap", "sign"):
                    cause = (f"your repair left it: its copy has {_SOURCE_LABEL[how]}, so a digest of the "
                             f"values (a sum, a mean, ==) misses it; digest the raw bytes")
                elif rank == 0:
                    cause = (f"rank 0's copy is the odd one out here: the copy held by more than half the "
                             f"replicas wins, not rank 0's; rank {source} sends it and rank 0 copies it")
                else:
                    cause = f"your repair left it: rank {source} should send it, and rank {rank} copy it in place"
            elif rank != 0 and _same_bits(got, states[0][name]):
                cause = (f"it took rank 0's copy, which is the odd one out: the copy held by more than half "
                         f"the replicas wins, not rank 0's")
            elif reordered:
                cause = (f"the dicts of {_names(reordered)} list the names in another order: visit the names "
                         f"in sorted order on every rank, or the sends and receives pair up the wrong tensors")
            else:
                cause = "it holds neither its own copy nor the majority's: did a receive land in the wrong tensor?"
            raise Incorrect(f"{head}: {cause}.")
    for rank, res in enumerate(results):
        returned = res["returned"]
        if (not isinstance(returned, tuple) or len(returned) != 2 or isinstance(returned[0], bool)
                or not isinstance(returned[0], numbers.Integral) or not isinstance(returned[1], list)):
            raise Incorrect(f"{case}: rank {rank} returned {returned!r}; return (bytes_sent, undecided): an "
                            f"int and the sorted list of names without a majority")
        sent, names = returned
        if names != undecided:
            raise Incorrect(f"{case}: rank {rank} reported undecided={names}, expected {undecided} (sorted"
                            f"{'' if not undecided else f': {undecided[0]} has no copy held by more than half'})")
        want_sent = sum(states[rank][n].numel() * states[rank][n].element_size() * len(targets)
                        for n, (source, targets) in plan.items() if source == rank)
        if sent != want_sent:
            elements = sum(states[rank][n].numel() * len(t) for n, (s, t) in plan.items() if s == rank)
            to_all = sum(states[rank][n].numel() * states[rank][n].element_size() * (p - 1)
                         for n, (s, t) in plan.items() if s == rank and t)
            everything = sum(t.numel() * t.element_size() * (p - 1) for t in states[rank].values())
            if sent == elements and sent:
                cause = "that counts elements; bytes are numel x element_size"
            elif sent == everything:
                cause = ("that sends every tensor to every other rank, as the lesson's whole-state broadcast "
                         "does; the digests say which tensors differ on which ranks: send only those, only there")
            elif sent == to_all:
                cause = "that sends each repaired tensor to every other rank; only the ranks whose copy differs need it"
            elif want_sent:
                cause = "count the bytes this rank sent: each repaired tensor's nbytes, once per rank it went to"
            else:
                cause = f"rank {rank} is not the source of any repair here and should send nothing"
            raise Incorrect(f"{case}: rank {rank} reported {sent} bytes sent, expected {want_sent}: {cause}.")


def _names(ranks) -> str:
    ranks = list(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


@exercise("05.majority_repair", "build: repair replicas by per-tensor majority, sending only what differs")
def check_majority_repair(candidate, hidden=False):
    refuse_reference(candidate, broadcast_state_, gather_fingerprints, tensor_digest, state_fingerprint,
                     diff_states, majority_plan, _reference_repair)
    raise_if_stub(candidate)
    for tag, (p, bad, reordered, label) in labelled_cases(REPAIR_CASES, REPAIR_HIDDEN, hidden):
        try:
            results = run_ranks(_repair_on_rank, p, candidate, bad, reordered, what=f"{tag}p={p}, {label}")
        except Incorrect as err:
            if not reordered:
                raise
            raise Incorrect(f"{err} (Here the dicts of {_names(reordered)} list the names in another "
                            f"order: visit the names in sorted order on every rank, or sends and receives "
                            f"pair up different tensors.)") from None
        _diagnose_repair(p, bad, reordered, label, results, tag)
    return with_hidden("every replica ends with the majority copy at p = 3 and 4 (rank 0 bad, swapped "
                       "elements, -0.0, another name order, no tensors), a 2-2 tie left alone, exact bytes",
                       REPAIR_HIDDEN, hidden)


# -- 05.pinned_routing (stretch) --------------------------------------------------------------
def _worker(name, version, state, load):
    return {"name": name, "version": version, "state": state, "load": load}


# A rolling update of two v1 workers to v2, one routing decision at a time:
# (what happens, request, workers). Sessions are pinned to the version of their first step.
ROUTING_SCRIPT = [
    ("before the update, a new session", {"session": "s1", "version": None},
     [_worker("w0", "v1", "serving", 1), _worker("w1", "v1", "serving", 0)]),
    ("w2 (v2) started, a new session", {"session": "s2", "version": None},
     [_worker("w0", "v1", "serving", 1), _worker("w1", "v1", "serving", 1), _worker("w2", "v2", "serving", 0)]),
    ("w0 draining, a new session", {"session": "s3", "version": None},
     [_worker("w0", "v1", "draining", 0), _worker("w1", "v1", "serving", 2), _worker("w2", "v2", "serving", 1)]),
    ("w0 draining, s1's next step (pinned to v1)", {"session": "s1", "version": "v1"},
     [_worker("w0", "v1", "draining", 0), _worker("w1", "v1", "serving", 2), _worker("w2", "v2", "serving", 2)]),
    ("w0 stopped, w3 (v2) started, w1 draining: s1's next step (v1)", {"session": "s1", "version": "v1"},
     [_worker("w0", "v1", "stopped", 0), _worker("w1", "v1", "draining", 3), _worker("w2", "v2", "serving", 0),
      _worker("w3", "v2", "serving", 0)]),
    ("w1 stopped too: s1's last step (v1)", {"session": "s1", "version": "v1"},
     [_worker("w0", "v1", "stopped", 0), _worker("w1", "v1", "stopped", 0), _worker("w2", "v2", "serving", 2),
      _worker("w3", "v2", "serving", 1)]),
    ("after the update, s2's next step (v2)", {"session": "s2", "version": "v2"},
     [_worker("w3", "v2", "serving", 1), _worker("w2", "v2", "serving", 1)]),
    ("every worker stopped, a new session", {"session": "s4", "version": None},
     [_worker("w2", "v2", "stopped", 0), _worker("w3", "v2", "stopped", 0)]),
]


def reference_route(request: dict, workers: list[dict]) -> str | None:
    serving = [w for w in workers if w["state"] == "serving"]
    if request["version"] is None:
        candidates = serving
    else:
        candidates = [w for w in serving if w["version"] == request["version"]] or \
                     [w for w in workers if w["state"] == "draining" and w["version"] == request["version"]]
    if not candidates:
        return None
    return min(candidates, key=lambda w: w["load"])["name"]   # ties: the first listed


@exercise("05.pinned_routing", "stretch: fix a router that breaks version pinning in a rolling update")
def check_pinned_routing(candidate):
    refuse_reference(candidate, reference_route)
    for when, request, workers in ROUTING_SCRIPT:
        listing = ", ".join(f"{w['name']} ({w['version']}, {w['state']}, load {w['load']})" for w in workers)
        ask = f"{when}: route({request}) with workers {listing}"
        try:
            got = candidate(dict(request), [dict(w) for w in workers])
        except NotImplementedError:
            raise
        except Exception as err:   # noqa: BLE001 - the learner's error, named in the hint
            raise Incorrect(f"{ask} raised {type(err).__name__}: {err}. When no worker may serve a "
                            f"request, return None") from None
        want = reference_route(request, workers)
        if got == want:
            continue
        head = f"{ask} returned {got!r}, expected {want!r}"
        chosen = next((w for w in workers if w["name"] == got), None)
        pinned = request["version"]
        if got is not None and chosen is None:
            cause = "return the name of one of the workers given, or None"
        elif chosen is not None and chosen["state"] == "stopped":
            cause = f"{got} is stopped: it serves nothing"
        elif chosen is not None and pinned is not None and chosen["version"] != pinned:
            cause = (f"session {request['session']} is pinned to {pinned}; serving its next step on "
                     f"{chosen['version']} would mix two models' text. With no {pinned} worker left, return "
                     f"None: the client restarts the session on the new version" if want is None else
                     f"session {request['session']} is pinned to {pinned}: only {pinned} workers may serve it")
        elif chosen is not None and chosen["state"] == "draining" and pinned is None:
            cause = (f"{got} is draining: it finishes what it has and takes no new session, or the drain "
                     f"never ends")
        elif chosen is not None and chosen["state"] == "draining":
            cause = (f"{got} is draining and a serving {pinned} worker exists: a draining worker serves a "
                     f"pinned step only when no serving worker of that version is left")
        elif got is None:
            cause = "a worker may serve it: return None only when none may"
        elif chosen["load"] > min(w["load"] for w in workers if w["name"] == want):
            cause = f"{got} has load {chosen['load']}: among the workers allowed, send it to the least loaded"
        else:
            cause = "among equally loaded workers allowed, take the first listed"
        raise Incorrect(f"{head}: {cause}.")
    return "pins every session through the update: no mixed versions, drains end, None when no worker may serve"
