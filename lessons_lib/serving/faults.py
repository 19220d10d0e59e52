"""Fault injection on a running router, and in the answers a worker sends.

Three kinds, one hook each:

* **process faults** (:data:`SIGNAL_FAULTS`): crash (SIGKILL) or hang (SIGSTOP) a worker process;
  ``router.kill(worker, signal.SIGCONT)`` resumes a hung one;
* **link faults** (:data:`LINK_FAULTS`): garbage on the router -> worker link (a frame over the
  size limit, bytes that are not JSON), as a corrupted stream would deliver;
* **answer faults** (:data:`ANSWER_FAULTS`): a worker started with ``WorkerSpec(fault=...)`` sends
  every answer after its first ``fault_after`` ones corrupted by :func:`corrupt_answer`.

``run_with_fault`` submits every request at once, waits until ``after`` of them are answered,
then injects a process or link fault into one worker while the rest are still queued or running,
so the fault always lands mid-run, with requests in flight on the victim.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

from ..validate import check_choice, check_int, check_real
from .protocol import HEADER, MAX_MESSAGE, encode

SIGNAL_FAULTS = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP}
LINK_FAULTS = {
    "oversized-frame": HEADER.pack(MAX_MESSAGE + 1),                  # a length no reader accepts
    "non-json-frame": HEADER.pack(12) + b"\xffnot json\x00\x01\x02",   # framed, but not a message
}
FAULTS = {**SIGNAL_FAULTS, **LINK_FAULTS}

ANSWER_FAULTS = {
    "missing-tokens": "a result without its 'tokens' field",
    "wrong-types": "a result whose tokens are a string and cached_tokens a float",
    "wrong-id": "a result under a request id the router never sent to this worker",
    "wrong-tokens": "plausible but wrong tokens (each id shifted by one): only a second replica can tell",
    "non-json": "a frame whose bytes are not JSON",
    "oversized": "a frame header announcing more than the message limit",
}


def corrupt_answer(result: dict, fault: str, vocab_size: int) -> bytes:
    """The framed bytes a faulty worker sends instead of ``result``."""
    check_choice("fault", fault, ANSWER_FAULTS)
    if fault == "non-json":
        return LINK_FAULTS["non-json-frame"]
    if fault == "oversized":
        return LINK_FAULTS["oversized-frame"]
    bad = dict(result)
    if fault == "missing-tokens":
        del bad["tokens"]
    elif fault == "wrong-types":
        bad["tokens"], bad["cached_tokens"] = ",".join(map(str, result["tokens"])), 0.5
    elif fault == "wrong-id":
        bad["id"] = f"{result['id']}'"
    else:
        bad["tokens"] = [(t + 1) % vocab_size for t in result["tokens"]]
    return encode(bad)


def inject(router, victim: str, fault: str) -> None:
    """Inject a process or link fault into worker ``victim`` now."""
    check_choice("fault", fault, FAULTS)
    check_choice("victim", victim, sorted(router.workers))
    h = router.workers[victim]
    in_flight = len(h.outstanding)
    if fault in SIGNAL_FAULTS:
        router.kill(victim, SIGNAL_FAULTS[fault])
    else:
        with h.send_lock:
            h.sock.sendall(LINK_FAULTS[fault])
    router._event(victim, f"fault injected: {fault} ({in_flight} requests in flight)")


def run_with_fault(router, requests, victim: str, fault: str = "kill", after: int = 10,
                   timeout: float = 120.0):
    """Serve ``requests`` and inject ``fault`` into ``victim`` after ``after`` answers.

    Returns the responses in request order. With ``fault="hang"`` the victim stays stopped;
    resume it with ``router.kill(victim, signal.SIGCONT)`` to see its late answers dropped.
    """
    check_choice("fault", fault, FAULTS)
    check_choice("victim", victim, sorted(router.workers))
    check_int("after", after, low=0)
    check_real("timeout", timeout, low=0, low_open=True)
    futures = [router.submit(r) for r in requests]
    deadline = time.monotonic() + timeout
    while sum(f.done() for f in futures) < min(after, len(futures)) and time.monotonic() < deadline:
        time.sleep(0.002)
    inject(router, victim, fault)
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
