"""The router: starts N worker processes, routes requests to them, survives their failures.

``with Router([WorkerSpec("w0"), WorkerSpec("w1")], policy="least-outstanding") as router:``
starts the workers (real processes, loopback TCP), and on exit stops every one of them.
``router.run(requests)`` returns one :class:`Response` per request, in request order.

Failure handling, in one place (see ``health.py`` for the parts):

* a worker whose socket closes (crash, SIGKILL) or whose heartbeats stop for ``failure_timeout``
  seconds (hung) is taken out of rotation;
* its unanswered requests are re-dispatched to live workers after an exponential backoff with
  jitter, up to ``max_attempts`` dispatches per request;
* answers are keyed by request id and the first one wins, so a slow worker that answers after its
  request was re-dispatched produces a dropped duplicate, never a second answer.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from .health import ExactlyOnce, FailureDetector, backoff_delays
from .policies import Policy, WorkerLoad, make_policy
from .protocol import LOOPBACK, ProtocolError, Request, Response, recv_msg, send_msg

ROOT = Path(__file__).resolve().parents[2]


class NoWorkerError(RuntimeError):
    """A request could not be served: no live worker (of its pinned version) after every retry."""


@dataclass
class WorkerSpec:
    """How to start one worker: its id, model version and model, and injected faults."""

    id: str
    version: str = "v1"
    model: str = "auto"
    delay: float = 0.0          # extra seconds per generated token (a slow worker)
    crash_after: int = 0        # the worker exits after this many results (0: never)
    block_size: int = 16        # prefix-cache block size (0: no prefix cache)


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    proc: subprocess.Popen
    sock: socket.socket | None = None
    pid: int = 0
    fingerprint: str = ""
    alive: bool = True
    draining: bool = False
    outstanding: dict = field(default_factory=dict)   # request id -> Request
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> WorkerLoad:
        return WorkerLoad(self.spec.id, len(self.outstanding),
                          sum(r.cost_tokens for r in self.outstanding.values()))


class Router:
    def __init__(self, specs, policy: str | Policy = "round-robin", *, heartbeat_interval: float = 0.1,
                 failure_timeout: float = 1.0, max_attempts: int = 4, backoff_base: float = 0.05,
                 seed: int = 0, start_timeout: float = 90.0) -> None:
        specs = list(specs)
        if not specs:
            raise ValueError("specs must name at least one worker (a WorkerSpec)")
        ids = [s.id for s in specs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids must be unique, got {ids}")
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.heartbeat_interval, self.max_attempts = heartbeat_interval, max_attempts
        self.backoff_base, self.seed, self.start_timeout = backoff_base, seed, start_timeout
        self.detector = FailureDetector(failure_timeout)
        self.answers = ExactlyOnce()
        self.workers: dict[str, WorkerHandle] = {}
        self.events: list[tuple[float, str, str]] = []   # (time, worker, what happened)
        self.redispatched = 0
        self._futures: dict[str, Future] = {}
        self._submitted: dict[str, float] = {}
        self._attempts: dict[str, int] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._t0 = time.monotonic()
        self._start(specs)
        threading.Thread(target=self._monitor, daemon=True).start()

    # -- lifecycle ---------------------------------------------------------------------------
    def _start(self, specs) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        started = []
        for s in specs:
            log = tempfile.TemporaryFile()
            cmd = [sys.executable, "-m", "lessons_lib.serving.worker", "--worker-id", s.id,
                   "--version", s.version, "--model", s.model, "--parent-pid", str(os.getpid()),
                   "--heartbeat-interval", str(self.heartbeat_interval), "--delay", str(s.delay),
                   "--block-size", str(s.block_size), "--crash-after", str(s.crash_after)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                    env=env)
            started.append((s, proc, log))
        try:
            for s, proc, log in started:
                port = self._read_port(s, proc, log)
                sock = socket.create_connection((LOOPBACK, port), timeout=self.start_timeout)
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                hello = recv_msg(sock)
                h = WorkerHandle(s, proc, sock, hello["pid"], hello["fingerprint"])
                self.workers[s.id] = h
                self.detector.heartbeat(s.id)
                self._event(s.id, f"started (version {s.version})")
                threading.Thread(target=self._receive, args=(h,), daemon=True).start()
        except BaseException:
            for _, proc, _ in started:
                proc.kill()
                proc.wait()
            raise

    def _read_port(self, spec, proc, log) -> int:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline()
                if line:
                    import json
                    return int(json.loads(line)["port"])
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"worker {spec.id} exited with code {proc.returncode} at start:\n{tail}")
        raise TimeoutError(f"worker {spec.id} did not report its port within {self.start_timeout} s")

    def close(self) -> None:
        """Stop every worker: a polite stop message, then SIGKILL for any that linger."""
        self._closed = True
        for h in self.workers.values():
            try:
                os.kill(h.proc.pid, signal.SIGCONT)   # a stopped (hung) worker cannot exit
            except ProcessLookupError:
                pass
            try:
                with h.send_lock:
                    send_msg(h.sock, {"op": "stop"})
            except OSError:
                pass
        for h in self.workers.values():
            try:
                h.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                h.proc.wait()
            h.sock.close()
            h.proc.stdout.close()

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------
    def submit(self, request: Request) -> Future:
        """Route one request; the future resolves to its :class:`Response`."""
        if not isinstance(request, Request):
            raise TypeError(f"request must be a Request, got {type(request).__name__}")
        with self._lock:
            if request.id in self._futures:
                return self._futures[request.id]   # idempotent: same id, same answer
            fut = Future()
            self._futures[request.id] = fut
            self._submitted[request.id] = time.monotonic()
            self._attempts[request.id] = 0
        self._dispatch(request)
        return fut

    def run(self, requests, arrival_times=None, timeout: float = 120.0) -> list[Response]:
        """Submit every request (at ``arrival_times`` seconds from now, if given); wait for all."""
        requests = list(requests)
        start = time.monotonic()
        futures = []
        for i, r in enumerate(requests):
            if arrival_times is not None:
                time.sleep(max(0.0, start + arrival_times[i] - time.monotonic()))
            futures.append(self.submit(r))
        return [f.result(timeout=max(0.1, start + timeout - time.monotonic())) for f in futures]

    def _dispatch(self, request: Request) -> None:
        with self._lock:
            if request.id in self.answers or self._closed:
                return
            self._attempts[request.id] += 1
            attempt = self._attempts[request.id]
            live = [h for h in self.workers.values() if h.alive and not h.draining
                    and (request.version is None or h.spec.version == request.version)]
            if not live:
                chosen = None
            else:
                chosen = self.workers[self.policy(request, [h.load() for h in live])]
                chosen.outstanding[request.id] = request
        if chosen is None:
            if attempt >= self.max_attempts:
                self._futures[request.id].set_exception(NoWorkerError(
                    f"request {request.id}: no live worker (version={request.version}) "
                    f"after {attempt} attempts"))
                return
            self._retry_later(request, attempt)
            return
        try:
            with chosen.send_lock:
                send_msg(chosen.sock, request.to_wire())
        except OSError:
            self._on_failure(chosen, "send failed")

    def _retry_later(self, request: Request, attempt: int) -> None:
        # Per-request seed: the jitter is reproducible, and different requests spread out.
        seed = self.seed * 1_000_003 + zlib.crc32(request.id.encode())
        delay = backoff_delays(attempt, base=self.backoff_base, seed=seed)[-1]
        t = threading.Timer(delay, self._dispatch, args=(request,))
        t.daemon = True
        t.start()

    def _receive(self, h: WorkerHandle) -> None:
        try:
            while True:
                msg = recv_msg(h.sock)
                if msg["op"] == "heartbeat":
                    self.detector.heartbeat(h.spec.id)
                elif msg["op"] == "result":
                    self._complete(h, msg)
                elif msg["op"] == "error":
                    self._fail_request(h, msg)
        except (ProtocolError, OSError, ValueError):
            self._on_failure(h, "connection closed")

    def _complete(self, h: WorkerHandle, msg: dict) -> None:
        rid = msg["id"]
        with self._lock:
            for w in self.workers.values():
                w.outstanding.pop(rid, None)
            resp = Response(rid, tuple(msg["tokens"]), msg["worker"], msg["version"],
                            msg["cached_tokens"], msg["service_s"],
                            time.monotonic() - self._submitted.get(rid, time.monotonic()),
                            self._attempts.get(rid, 1))
            accepted = rid in self._futures and self.answers.accept(rid, resp)
        if accepted:
            self._futures[rid].set_result(resp)

    def _fail_request(self, h: WorkerHandle, msg: dict) -> None:
        with self._lock:
            h.outstanding.pop(msg["id"], None)
            fut = self._futures.get(msg["id"])
            ok = fut is not None and self.answers.accept(msg["id"], None)
        if ok:
            fut.set_exception(RuntimeError(f"worker {h.spec.id}: {msg['error']}"))

    # -- failures ----------------------------------------------------------------------------
    def _monitor(self) -> None:
        while not self._closed:
            for wid in self.detector.suspects():
                self._on_failure(self.workers[wid], "heartbeat timeout")
            time.sleep(self.heartbeat_interval / 2)

    def _on_failure(self, h: WorkerHandle, reason: str) -> None:
        with self._lock:
            if not h.alive or self._closed:
                return
            h.alive = False
            self.detector.mark_dead(h.spec.id)
            orphans = list(h.outstanding.values())
            h.outstanding.clear()
            self.redispatched += len(orphans)
            self._event(h.spec.id, f"{reason}: out of rotation, {len(orphans)} requests re-dispatched")
        for r in orphans:
            self._retry_later(r, self._attempts[r.id])

    def _event(self, worker: str, what: str) -> None:
        self.events.append((time.monotonic() - self._t0, worker, what))

    # -- operations: fault injection and rolling updates ----------------------------------------
    def kill(self, worker_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a worker process: SIGKILL (crash) or SIGSTOP (hang); SIGCONT resumes."""
        os.kill(self.workers[worker_id].proc.pid, sig)

    def add_worker(self, spec: WorkerSpec) -> None:
        if spec.id in self.workers:
            raise ValueError(f"worker id {spec.id!r} is taken: choose a new one")
        self._start([spec])

    def drain(self, worker_id: str, timeout: float = 60.0) -> None:
        """Stop routing to a worker, wait for its in-flight requests, then stop it."""
        h = self.workers[worker_id]
        with self._lock:
            h.draining = True
        deadline = time.monotonic() + timeout
        while h.outstanding and h.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            h.alive = False
            self.detector.mark_dead(worker_id)
        with h.send_lock:
            send_msg(h.sock, {"op": "stop"})
        self._event(worker_id, "drained and stopped")

    @property
    def duplicates_dropped(self) -> int:
        return self.answers.duplicates

    def live_workers(self) -> list[str]:
        return [w for w, h in self.workers.items() if h.alive and not h.draining]
