"""Staying up when workers fail: heartbeats, a failure detector, retries, exactly-once answers.

* Each worker sends a heartbeat every ``interval`` seconds. The :class:`FailureDetector` suspects a
  worker whose last heartbeat is older than ``timeout``. A dead process (SIGKILL, crash) also shows
  as a closed socket at once; a *hung* one (stopped, deadlocked, swapping) only shows as silence,
  which is why heartbeats exist. The timeout trades detection speed against false alarms.
* A request whose worker failed is re-dispatched elsewhere after a delay from
  :func:`backoff_delays`: exponential, capped, with jitter so that many clients retrying at once
  do not arrive in lock-step (the "thundering herd").
* Re-dispatching means a request may be answered twice (the "dead" worker was only slow).
  :class:`ExactlyOnce` keys answers by request id: the first answer wins, later ones are dropped.
  At-least-once delivery plus idempotent ids gives exactly-once *results*.
"""

from __future__ import annotations

import random
import threading
import time

from ..validate import check_choice, check_int, check_real


def backoff_delays(attempts: int, base: float = 0.05, factor: float = 2.0, cap: float = 1.0,
                   jitter: str = "full", seed: int | None = 0) -> list[float]:
    """Delays before retry 1..attempts.

    The un-jittered delay of retry ``k`` (from 0) is ``min(cap, base * factor**k)``.
    ``jitter="full"`` draws uniformly in [0, that] (AWS's "full jitter"), ``"equal"`` in
    [that/2, that], ``"none"`` returns it unchanged. ``seed`` fixes the draws.
    """
    check_int("attempts", attempts, low=0)
    check_real("base", base, low=0, low_open=True)
    check_real("factor", factor, low=1)
    check_real("cap", cap, low=base, why="the cap bounds every delay, the first one included")
    check_choice("jitter", jitter, ("full", "equal", "none"))
    if seed is not None:
        check_int("seed", seed, why="or None for fresh randomness")
    rng = random.Random(seed)
    out = []
    for k in range(attempts):
        d = min(cap, base * factor ** k)
        if jitter == "full":
            d = rng.uniform(0, d)
        elif jitter == "equal":
            d = d / 2 + rng.uniform(0, d / 2)
        out.append(d)
    return out


class FailureDetector:
    """Timeout-based failure detector over heartbeats (thread-safe).

    ``clock`` is injectable so the detector can be tested without sleeping.
    """

    def __init__(self, timeout: float = 1.0, clock=time.monotonic) -> None:
        check_real("timeout", timeout, low=0, low_open=True, why="seconds of silence before a suspicion")
        self.timeout, self.clock = timeout, clock
        self.last_seen: dict[str, float] = {}
        self.dead: set[str] = set()
        self._lock = threading.Lock()

    def heartbeat(self, worker: str) -> None:
        with self._lock:
            if worker not in self.dead:   # a fenced worker stays dead: no flapping back
                self.last_seen[worker] = self.clock()

    def mark_dead(self, worker: str) -> None:
        with self._lock:
            self.dead.add(worker)
            self.last_seen.pop(worker, None)

    def suspects(self) -> list[str]:
        """Workers silent for longer than the timeout (not yet marked dead)."""
        now = self.clock()
        with self._lock:
            return sorted(w for w, t in self.last_seen.items() if now - t > self.timeout)

    def alive(self) -> list[str]:
        now = self.clock()
        with self._lock:
            return sorted(w for w, t in self.last_seen.items() if now - t <= self.timeout)


class ExactlyOnce:
    """First answer per request id wins; duplicates are counted and dropped (thread-safe)."""

    def __init__(self) -> None:
        self.answers: dict = {}
        self.duplicates = 0
        self._lock = threading.Lock()

    def accept(self, request_id, answer) -> bool:
        """Record ``answer`` if ``request_id`` has none yet; return whether it was accepted."""
        with self._lock:
            if request_id in self.answers:
                self.duplicates += 1
                return False
            self.answers[request_id] = answer
            return True

    def __contains__(self, request_id) -> bool:
        return request_id in self.answers

    def __len__(self) -> int:
        return len(self.answers)
