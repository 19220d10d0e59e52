"""Fault injection on a running router: crash (SIGKILL), hang (SIGSTOP), resume (SIGCONT).

``run_with_fault`` submits every request at once, waits until ``after`` of them are answered,
then injects the fault into one worker while the rest are still queued or running, so the fault
always lands mid-run, with requests in flight on the victim.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

FAULTS = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP}


def run_with_fault(router, requests, victim: str, fault: str = "kill", after: int = 10,
                   timeout: float = 120.0):
    """Serve ``requests`` and inject ``fault`` into ``victim`` after ``after`` answers.

    Returns the responses in request order. With ``fault="hang"`` the victim stays stopped;
    resume it with ``router.kill(victim, signal.SIGCONT)`` to see its late answers dropped.
    """
    if fault not in FAULTS:
        raise ValueError(f"fault={fault!r}: choose one of {sorted(FAULTS)}")
    if victim not in router.workers:
        raise ValueError(f"victim={victim!r}: choose one of {sorted(router.workers)}")
    futures = [router.submit(r) for r in requests]
    deadline = time.monotonic() + timeout
    while sum(f.done() for f in futures) < min(after, len(futures)) and time.monotonic() < deadline:
        time.sleep(0.002)
    in_flight = len(router.workers[victim].outstanding)
    router.kill(victim, FAULTS[fault])
    router._event(victim, f"fault injected: {fault} ({in_flight} requests in flight)")
    return [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futures]


def exactly_once_report(requests, responses, reference: dict) -> dict:
    """Counts a test or a notebook asserts on: answered, unique, equal to the oracle, per worker."""
    ids = [r.id for r in responses]
    return {
        "requests": len(requests),
        "answered": len(responses),
        "unique ids": len(set(ids)),
        "all ids answered": set(ids) == {r.id for r in requests},
        "equal to reference": all(resp.tokens == reference[resp.id] for resp in responses),
        "served by": dict(sorted(Counter(resp.worker for resp in responses).items())),
    }
