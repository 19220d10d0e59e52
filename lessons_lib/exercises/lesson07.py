"""Checkers for notebook 07 (fault tolerance).

- ``07.predict_detection_delay`` (predict): how long after a worker freezes the lesson's
  ``FailureDetector`` first suspects it, measured with a scripted clock;
- ``07.worker_states`` (build): liveness against progress: a worker that heart-beats but makes no
  progress on the requests it holds is stuck, not healthy;
- ``07.retry_budget`` (stretch): re-dispatch with a retry budget per request, so a poison request
  that crashes every worker it reaches takes down at most ``max_attempts`` of them.
"""

from __future__ import annotations

import functools

from ..serving.health import ExactlyOnce, FailureDetector
from .check import (Incorrect, exercise, judge_prediction, labelled_cases, predicted_number, refuse_reference,
                    with_hidden)

# -- 07.predict_detection_delay (predict) -----------------------------------------------------
BEAT_MS, FREEZE_MS, POLL_MS, TIMEOUT_MS = 100, 2030, 20, 500


@functools.lru_cache(maxsize=1)
def measured_detection_delay() -> float:
    """Seconds from the freeze to the first poll at which the detector suspects the worker."""
    now = [0]
    detector = FailureDetector(timeout=TIMEOUT_MS / 1000, clock=lambda: now[0] / 1000)
    for ms in range(0, 10_000):
        now[0] = ms
        if ms % BEAT_MS == 0 and ms < FREEZE_MS:
            detector.heartbeat("w")
        if ms % POLL_MS == 0 and "w" in detector.suspects():
            return (ms - FREEZE_MS) / 1000
    raise AssertionError("the detector never suspected the frozen worker")


@exercise("07.predict_detection_delay", "predict how long a frozen worker goes unnoticed")
def check_predict_detection_delay(candidate):
    refuse_reference(candidate, FailureDetector, measured_detection_delay)
    guess = predicted_number(candidate, "predicted_detection_delay")
    measured = measured_detection_delay()
    last_beat = FREEZE_MS // BEAT_MS * BEAT_MS
    mistakes = [
        (TIMEOUT_MS / 1000, "the timeout runs from the last heartbeat the router heard "
                            f"(t = {last_beat / 1000:g} s), not from the moment the worker froze"),
        ((last_beat + TIMEOUT_MS - FREEZE_MS) / 1000, "a worker is suspected when its silence is *longer* "
                                                      "than the timeout: at exactly 0.5 s it is still alive, "
                                                      "so the first suspecting poll is the next one"),
        ((last_beat + TIMEOUT_MS + BEAT_MS + POLL_MS - FREEZE_MS) / 1000,
         "no missed heartbeat needs to be waited for on top of the timeout: the silence is measured "
         "from the last heartbeat"),
        (measured * 1000, "give seconds, not milliseconds"),
    ]
    judge_prediction(guess, measured, mistakes, "s",
                     "Find the last heartbeat before the freeze, add the timeout, and take the first poll "
                     "at which the silence is longer than it.", tolerance=0.001)
    return (f"{measured:g} s: last heartbeat at {last_beat / 1000:g} s, silence longer than "
            f"{TIMEOUT_MS / 1000:g} s first seen by the poll at {(FREEZE_MS + measured * 1000) / 1000:g} s")


# -- 07.worker_states (build) -----------------------------------------------------------------
def _reference_states(events, now, heartbeat_timeout, progress_timeout):
    last_beat, last_progress, in_flight = {}, {}, {}
    for t, worker, kind in events:
        in_flight.setdefault(worker, 0)
        if kind == "heartbeat":
            last_beat[worker] = t
        else:
            last_progress[worker] = t
            in_flight[worker] += {"sent": 1, "done": -1, "token": 0}[kind]
    states = {}
    for worker in in_flight:
        if worker not in last_beat or now - last_beat[worker] > heartbeat_timeout:
            states[worker] = "dead"
        elif in_flight[worker] > 0 and now - last_progress[worker] > progress_timeout:
            states[worker] = "stuck"
        else:
            states[worker] = "healthy"
    return states


def _stream(*items):
    return [(t, w, k) for t, w, k in items]


STATE_CASES = [
    ("beats and makes tokens", _stream((0.0, "a", "heartbeat"), (0.1, "a", "sent"), (0.5, "a", "token"),
                                       (0.9, "a", "heartbeat"), (1.0, "a", "token")), 1.2),
    ("beats but holds a request with no token for 3 s", _stream((0.0, "a", "heartbeat"), (0.2, "a", "sent"),
                                                                (1.0, "a", "heartbeat"), (2.0, "a", "heartbeat"),
                                                                (3.0, "a", "heartbeat")), 3.3),
    ("beats, holds nothing, says nothing else", _stream((0.0, "a", "heartbeat"), (0.1, "a", "sent"),
                                                        (0.4, "a", "done"), (3.0, "a", "heartbeat")), 3.3),
    ("silent for 2 s", _stream((0.0, "a", "heartbeat"), (0.1, "a", "sent"), (1.2, "a", "token")), 2.0),
    ("given a request just now", _stream((0.0, "a", "heartbeat"), (2.9, "a", "heartbeat"), (3.0, "a", "sent")), 3.2),
    ("silent for exactly the heartbeat timeout, progress exactly the progress timeout ago",
     _stream((0.0, "a", "heartbeat"), (0.5, "a", "sent"), (1.0, "a", "heartbeat")), 2.0),
    ("three workers", _stream((0.0, "a", "heartbeat"), (0.0, "b", "heartbeat"), (0.0, "c", "heartbeat"),
                              (0.1, "a", "sent"), (0.1, "b", "sent"), (0.3, "b", "token"), (1.9, "a", "heartbeat"),
                              (1.9, "b", "heartbeat"), (2.0, "b", "done")), 2.4),
]
STATE_HIDDEN = [  # grading only
    ("two requests sent, one done: the other still waits",
     _stream((0.0, "a", "heartbeat"), (0.1, "a", "sent"), (0.2, "a", "sent"), (0.3, "a", "token"),
             (0.4, "a", "done"), (2.0, "a", "heartbeat")), 2.1),
    ("b was given a request but never sent a heartbeat", _stream((0.0, "a", "heartbeat"), (0.2, "b", "sent")), 0.5),
    ("no events at all", [], 1.0),
]
HEARTBEAT_TIMEOUT, PROGRESS_TIMEOUT = 1.0, 1.5


@exercise("07.worker_states", "liveness against progress: dead, stuck or healthy")
def check_worker_states(candidate, hidden=False):
    refuse_reference(candidate, FailureDetector)
    for label, (what, events, now) in labelled_cases(STATE_CASES, STATE_HIDDEN, hidden):
        what = f"{label}{what}"
        want = _reference_states(events, now, HEARTBEAT_TIMEOUT, PROGRESS_TIMEOUT)
        got = candidate(list(events), now, HEARTBEAT_TIMEOUT, PROGRESS_TIMEOUT)
        case = (f"{what}: events {events}, now = {now}, heartbeat_timeout = {HEARTBEAT_TIMEOUT}, "
                f"progress_timeout = {PROGRESS_TIMEOUT}")
        if not isinstance(got, dict) or set(got) != set(want):
            raise Incorrect(f"{case}: return a dict worker -> state for workers {sorted(want)}, got {got!r}")
        for worker in sorted(want):
            if got[worker] == want[worker]:
                continue
            said = f"{case}: worker {worker} is {want[worker]!r}, you said {got[worker]!r}"
            if want[worker] == "stuck" and got[worker] == "healthy":
                raise Incorrect(f"{said}. Its heartbeats come from their own thread and say only that the "
                                f"process lives; it holds a request and has produced nothing for longer "
                                f"than the progress timeout: liveness is not progress")
            if want[worker] == "healthy" and got[worker] == "stuck":
                if "holds nothing" in what:
                    raise Incorrect(f"{said}: a worker with no request in flight has no progress to make; "
                                    f"count requests sent minus done")
                raise Incorrect(f"{said}: progress counts from its latest token, or from when it was given "
                                f"the request (or finished one), and a silence equal to the timeout is not "
                                f"yet longer than it")
            if "exactly" in what:
                raise Incorrect(f"{said}: a silence equal to the timeout is not yet longer than it")
            raise Incorrect(f"{said}: dead when no heartbeat for longer than the heartbeat timeout; else "
                            f"stuck when it holds requests and made no progress for longer than the "
                            f"progress timeout; else healthy")
    return with_hidden(f"right on {len(STATE_CASES)} scripted streams", STATE_HIDDEN, hidden)


# -- 07.retry_budget (stretch) ----------------------------------------------------------------
def _reference_serve(requests, workers, attempt, max_attempts):
    live, results = list(workers), {}
    for request in requests:
        crashed = 0
        while True:
            if not live:
                results[request] = ("unserved", crashed)
                break
            worker = live[0]
            if attempt(request, worker) == "ok":
                results[request] = ("ok", worker)
                break
            live.remove(worker)
            crashed += 1
            if crashed == max_attempts:
                results[request] = ("quarantined", crashed)
                break
    return results, live


def _poison(request, worker):
    return "crash" if request.startswith("poison") else "ok"


def _flaky(request, worker):
    return "crash" if (request, worker) == ("r2", "w0") else "ok"


RETRY_CASES = [
    ("one poison request among good ones", ["r1", "poison", "r2", "r3"], ["w0", "w1", "w2", "w3", "w4"], _poison, 2),
    ("two poison requests", ["poison-a", "r1", "poison-b", "r2"], ["w0", "w1", "w2", "w3", "w4", "w5"], _poison, 2),
    ("a good request that crashes one worker", ["r1", "r2", "r3"], ["w0", "w1"], _flaky, 3),
    ("a budget of one", ["poison", "r1"], ["w0", "w1", "w2"], _poison, 1),
    ("more poison than workers", ["poison-a", "poison-b", "r1"], ["w0", "w1", "w2"], _poison, 2),
]


@exercise("07.retry_budget", "a retry budget per request: a poison request is quarantined")
def check_retry_budget(candidate):
    refuse_reference(candidate, ExactlyOnce)
    for what, requests, workers, attempt, budget in RETRY_CASES:
        calls = []

        def counted(request, worker, attempt=attempt):
            calls.append((request, worker))
            return attempt(request, worker)

        want, want_live = _reference_serve(requests, workers, attempt, budget)
        got = candidate(list(requests), list(workers), counted, budget)
        case = f"{what}: requests {requests}, workers {workers}, max_attempts {budget}"
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], dict)):
            raise Incorrect(f"{case}: return (results, live workers), got {got!r}")
        results, live = got
        if results == want and list(live) == want_live:
            continue
        crashed_by = {r: sum(1 for q, w in calls if q == r and attempt(q, w) == "crash") for r in requests}
        worst = max(crashed_by, key=crashed_by.get)
        if crashed_by[worst] > budget:
            raise Incorrect(f"{case}: request {worst!r} crashed {crashed_by[worst]} workers; a request that "
                            f"has crashed max_attempts = {budget} workers must be quarantined, whether or "
                            f"not live workers remain: count its attempts across every re-dispatch")
        reused = [w for i, (q, w) in enumerate(calls) if any(w == w2 and attempt(q2, w2) == "crash"
                                                             for q2, w2 in calls[:i])]
        if reused:
            raise Incorrect(f"{case}: worker {reused[0]} was sent a request after it crashed; a crashed "
                            f"worker leaves the pool")
        quarantined = {r for r, v in results.items() if isinstance(v, tuple) and v[0] == "quarantined"}
        early = sorted(r for r in quarantined if crashed_by.get(r, 0) < budget)
        if early:
            r = early[0]
            raise Incorrect(f"{case}: you quarantined {r!r} after {crashed_by[r]} crash(es); it is "
                            f"quarantined when it has crashed max_attempts = {budget} workers, not before")
        raise Incorrect(f"{case}: you returned {results} with live {list(live)}; expected {want} with live "
                        f"{want_live}")
    return "every poison request stops at its budget; good requests are served; crashed workers stay out"
