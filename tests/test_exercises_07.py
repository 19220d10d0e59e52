"""Lesson 07's exercises: every catalogued wrong answer earns the hint for its mistake."""

import pytest

from exercise_catalogue import (assert_correct, assert_hidden_hint, assert_hint, assert_not_attempted,
                               assert_refused, solution_function)

pytestmark = pytest.mark.lesson07


# -- 07.predict_detection_delay ----------------------------------------------------------------
predicted_detection_delay = solution_function("07_fault_tolerance", "predicted_detection_delay")


@pytest.mark.parametrize("guess, fragments", [
    (0.5, ["from the last heartbeat"]),
    (0.47, ["*longer*"]),
    (0.59, ["no missed heartbeat"]),
    (490, ["not milliseconds"]),
    (1.3, ["Find the last heartbeat"]),
])
def test_predict_detection_delay_names_the_mistake(guess, fragments):
    assert_hint("07.predict_detection_delay", lambda: guess, *fragments)


def test_predict_detection_delay_verdicts():
    assert_correct("07.predict_detection_delay", predicted_detection_delay)

    def stub():
        raise NotImplementedError()
    assert_not_attempted("07.predict_detection_delay", stub)

    def measuring():
        from lessons_lib.serving.health import FailureDetector
        return FailureDetector(0.5).timeout
    assert_refused("07.predict_detection_delay", measuring, "FailureDetector")


# -- 07.worker_states --------------------------------------------------------------------------
worker_states = solution_function("07_fault_tolerance", "worker_states")


def heartbeats_only(events, now, heartbeat_timeout, progress_timeout):
    states = worker_states(events, now, heartbeat_timeout, progress_timeout)
    return {w: "healthy" if s == "stuck" else s for w, s in states.items()}


def stuck_when_idle(events, now, heartbeat_timeout, progress_timeout):
    last_beat, last_progress = {}, {}
    for t, worker, kind in events:
        (last_beat if kind == "heartbeat" else last_progress)[worker] = t
        last_progress.setdefault(worker, 0.0)
    states = {}
    for worker in last_progress:
        if worker not in last_beat or now - last_beat[worker] > heartbeat_timeout:
            states[worker] = "dead"
        elif now - last_progress[worker] > progress_timeout:
            states[worker] = "stuck"
        else:
            states[worker] = "healthy"
    return states


def progress_from_tokens_only(events, now, heartbeat_timeout, progress_timeout):
    """A request just handed over counts as no progress since the last token (or since time 0)."""
    tokens = [(t, w, k) if k != "sent" else (0.0, w, "sent") for t, w, k in events]
    return worker_states(tokens, now, heartbeat_timeout, progress_timeout)


def at_least_the_timeout(events, now, heartbeat_timeout, progress_timeout):
    return worker_states(events, now, heartbeat_timeout - 1e-9, progress_timeout - 1e-9)


def in_flight_as_a_flag(events, now, heartbeat_timeout, progress_timeout):
    """Holds a request or not, as a flag: a "done" clears it even with another request still in flight."""
    last_beat, last_progress, busy = {}, {}, {}
    for t, worker, kind in events:
        busy.setdefault(worker, False)
        if kind == "heartbeat":
            last_beat[worker] = t
        else:
            last_progress[worker] = t
            busy[worker] = {"sent": True, "done": False}.get(kind, busy[worker])
    states = {}
    for worker in busy:
        if worker not in last_beat or now - last_beat[worker] > heartbeat_timeout:
            states[worker] = "dead"
        elif busy[worker] and now - last_progress[worker] > progress_timeout:
            states[worker] = "stuck"
        else:
            states[worker] = "healthy"
    return states


def test_worker_states_hidden_case_counts_requests_in_flight():
    # Every public stream has at most one request in flight at a time; a hidden one has two.
    assert_hidden_hint("07.worker_states", in_flight_as_a_flag, "two requests sent, one done",
                       "worker a is 'stuck', you said 'healthy'", "liveness is not progress")


@pytest.mark.parametrize("answer, fragments", [
    (heartbeats_only, ["liveness is not progress"]),
    (stuck_when_idle, ["no request in flight"]),
    (progress_from_tokens_only, ["when it was given the request"]),
    (at_least_the_timeout, ["not yet longer"]),
])
def test_worker_states_names_the_mistake(answer, fragments):
    assert_hint("07.worker_states", answer, *fragments)


def test_worker_states_verdicts():
    assert_correct("07.worker_states", worker_states)

    def with_the_library(events, now, heartbeat_timeout, progress_timeout):
        from lessons_lib.serving.health import FailureDetector
        return FailureDetector(heartbeat_timeout)
    assert_refused("07.worker_states", with_the_library, "FailureDetector")

    def stub(events, now, heartbeat_timeout, progress_timeout):
        raise NotImplementedError()
    assert_not_attempted("07.worker_states", stub)


# -- 07.retry_budget ---------------------------------------------------------------------------
serve = solution_function("07_fault_tolerance", "serve")


def budget_checked_only_when_no_worker_is_left(requests, workers, attempt, max_attempts):
    live, results = list(workers), {}
    for request in requests:
        crashed = 0
        while True:
            if not live:
                results[request] = ("quarantined" if crashed >= max_attempts else "unserved", crashed)
                break
            worker = live[0]
            if attempt(request, worker) == "ok":
                results[request] = ("ok", worker)
                break
            live.remove(worker)
            crashed += 1
    return results, live


def crashed_workers_stay(requests, workers, attempt, max_attempts):
    results = {}
    for request in requests:
        for tries, worker in enumerate(workers * max_attempts):
            if attempt(request, worker) == "ok":
                results[request] = ("ok", worker)
                break
            if tries + 1 == max_attempts:
                results[request] = ("quarantined", max_attempts)
                break
    return results, list(workers)


def quarantine_one_too_early(requests, workers, attempt, max_attempts):
    return serve(requests, workers, attempt, max(1, max_attempts - 1))


def with_the_library(requests, workers, attempt, max_attempts):
    from lessons_lib.serving.health import ExactlyOnce
    return ExactlyOnce(), workers


@pytest.mark.parametrize("answer, fragments", [
    (budget_checked_only_when_no_worker_is_left, ["must be quarantined", "across every re-dispatch"]),
    (crashed_workers_stay, ["after it crashed", "leaves the pool"]),
    (quarantine_one_too_early, ["not before"]),
])
def test_retry_budget_names_the_mistake(answer, fragments):
    assert_hint("07.retry_budget", answer, *fragments)


def test_retry_budget_verdicts():
    assert_correct("07.retry_budget", serve)
    assert_refused("07.retry_budget", with_the_library, "ExactlyOnce")

    def stub(requests, workers, attempt, max_attempts):
        raise NotImplementedError()
    assert_not_attempted("07.retry_budget", stub)
