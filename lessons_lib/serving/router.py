"""The router: starts N worker processes, routes requests to them, survives their failures.

``with Router([WorkerSpec("w0"), WorkerSpec("w1")], policy="least-outstanding") as router:``
starts the workers (real processes, loopback TCP), and on exit stops every one of them.
``router.run(requests)`` returns one :class:`Response` per request, in request order.

Failure handling, in one place (see ``health.py`` for the parts):

* a worker whose socket closes (crash, SIGKILL) or whose heartbeats stop for ``failure_timeout``
  seconds (hung) is taken out of rotation;
* so is a worker that sends anything the protocol does not allow: a frame that is not a message, a
  result with a missing or mistyped field, an answer for a request id the router never sent it.
  Such a worker is *fenced*: killed, because nothing it says can be trusted any more;
* its unanswered requests are re-dispatched to live workers after an exponential backoff with
  jitter; a request whose ``max_attempts`` dispatches all failed ends in :class:`RequestFailed`;
* answers are keyed by request id and only the worker that owes a request may answer it, so a
  slow worker that answers after its request was re-dispatched produces a dropped duplicate,
  never a second answer;
* a heartbeat cannot see a worker that answers on time with *wrong* tokens. With
  ``verify_fraction > 0`` a seeded sample of requests is re-run on a second replica; when the two
  disagree a third breaks the tie, the majority answer is delivered and the outvoted worker fenced;
* a worker can be alive and still stuck (a kernel that never returns, a thread deadlocked while
  the heartbeat thread goes on). Heartbeats carry *progress*, the tokens its engine has produced;
  a worker that owes requests and produces nothing for ``progress_timeout`` seconds is fenced and
  its requests re-dispatched: liveness is not progress;
* a *poison* request (one that crashes whoever serves it) must not walk through the fleet: each
  failure of a worker counts against every request it owed, and a request that was on
  ``quarantine_after`` failed workers is quarantined (ended with :class:`RequestQuarantined`);
* every request ends: answered, or failed with a named error (also when the router is closed).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace

from ..launch.child import course_env, read_port, start_child
from ..validate import BadArgument, bad, check_choice, check_int, check_probability, check_real, check_str
from .faults import ANSWER_FAULTS
from .health import ExactlyOnce, FailureDetector, backoff_delays
from .policies import Policy, WorkerLoad, make_policy
from .protocol import (LOOPBACK, BadFrame, ProtocolError, Request, Response, encode, message_field, parse_heartbeat,
                       parse_hello, parse_result, recv_msg, send_msg)
from .worker import check_model_spec

class RequestFailed(RuntimeError):
    """A request ended without an answer; the message says why (every attempt, where it failed)."""


class NoWorkerError(RequestFailed):
    """A request could not be served: no live worker (of its pinned version) after every retry."""


class RouterClosed(RequestFailed):
    """The router was closed before the request was answered, or a request came after it was."""


class RequestQuarantined(RequestFailed):
    """A request was on several workers that failed: it is ended rather than sent to another one."""


class DuplicateRequestId(BadArgument):
    """A request id was submitted again with a different request: an id names one request."""


@dataclass
class WorkerSpec:
    """How to start one worker: its id, model version and model, and injected faults."""

    id: str
    version: str = "v1"
    model: str = "auto"
    delay: float = 0.0          # extra seconds per engine step (a slow worker)
    crash_after: int = 0        # the worker exits after this many results (0: never)
    block_size: int = 16        # KV block size (0: blocks of 16, no prefix caching)
    fault: str | None = None    # corrupt its answers: one of faults.ANSWER_FAULTS (None: honest)
    fault_after: int = 0        # ... after this many honest answers
    crash_on_token: int | None = None   # the worker exits when a prompt holds this token (a poison request)
    max_num_seqs: int = 8       # requests its engine runs at once

    def __post_init__(self) -> None:
        check_str("id", self.id)
        check_str("version", self.version)
        check_model_spec(self.model)
        check_real("delay", self.delay, low=0)
        check_int("crash_after", self.crash_after, low=0)
        check_int("block_size", self.block_size, low=0, why="0 turns the prefix cache off")
        if self.fault is not None:
            check_choice("fault", self.fault, ANSWER_FAULTS, why="or None for an honest worker")
        check_int("fault_after", self.fault_after, low=0)
        if self.crash_on_token is not None:
            check_int("crash_on_token", self.crash_on_token, low=0, why="a token id, or None")
        check_int("max_num_seqs", self.max_num_seqs, low=1)


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    proc: subprocess.Popen
    log: object                 # the worker's stderr (an unnamed temporary file)
    sock: socket.socket | None = None
    pid: int = 0
    fingerprint: str = ""
    vocab_size: int = 0
    max_seq_len: int = 0
    alive: bool = True
    draining: bool = False
    outstanding: dict = field(default_factory=dict)   # request id -> Request, owed by this worker
    sent: set = field(default_factory=set)             # every request id ever sent to it
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    reported: dict = field(default_factory=dict)       # its last heartbeat's load fields
    cached: set = field(default_factory=set)           # block hashes its prefix cache holds
    progress: int = 0                                  # tokens its engine has produced
    progress_at: float = field(default_factory=time.monotonic)   # when progress last moved

    def load(self) -> WorkerLoad:
        owed = self.outstanding.values()
        prompt, decode = sum(len(r.prompt) for r in owed), sum(r.max_new_tokens for r in owed)
        return WorkerLoad(self.spec.id, len(self.outstanding), prompt + decode, prompt, decode,
                          queue=self.reported.get("queue", 0), running=self.reported.get("running", 0),
                          kv_usage=self.reported.get("kv_usage", 0.0), cached_blocks=frozenset(self.cached))


class Router:
    def __init__(self, specs, policy: str | Policy = "round-robin", *, heartbeat_interval: float = 0.1,
                 failure_timeout: float = 1.0, max_attempts: int = 4, backoff_base: float = 0.05,
                 seed: int = 0, start_timeout: float = 90.0, verify_fraction: float = 0.0,
                 progress_timeout: float = 30.0, quarantine_after: int = 2) -> None:
        if isinstance(specs, WorkerSpec):
            raise bad("specs", specs, "a list of WorkerSpec", f"wrap it: [{specs!r}]")
        try:
            specs = list(specs)
        except TypeError:
            raise bad("specs", specs, "a list of WorkerSpec") from None
        if not specs or not all(isinstance(s, WorkerSpec) for s in specs):
            raise bad("specs", specs, "a non-empty list of WorkerSpec (at least one worker)")
        ids = [s.id for s in specs]
        if len(set(ids)) != len(ids):
            raise bad("specs", ids, "unique worker ids")
        if isinstance(policy, str):
            self.policy = make_policy(policy)
        elif callable(policy):
            self.policy = policy
        else:
            raise bad("policy", policy, "a policy name or a Policy")
        self.heartbeat_interval = check_real("heartbeat_interval", heartbeat_interval, low=0, low_open=True)
        check_real("failure_timeout", failure_timeout, low=heartbeat_interval, low_open=True,
                   why="a worker is suspected after this much silence, so it must exceed the "
                       "heartbeat interval")
        self.max_attempts = check_int("max_attempts", max_attempts, low=1)
        self.backoff_base = check_real("backoff_base", backoff_base, low=0, low_open=True)
        self.seed = check_int("seed", seed)
        self.start_timeout = check_real("start_timeout", start_timeout, low=0, low_open=True)
        self.verify_fraction = check_probability("verify_fraction", verify_fraction)
        self.progress_timeout = check_real(
            "progress_timeout", progress_timeout, low=failure_timeout, low_open=True,
            why="seconds a worker that owes requests may produce no token; longer than the failure "
                "timeout, and than the slowest legitimate step (a long prefill)")
        self.quarantine_after = check_int("quarantine_after", quarantine_after, low=1,
                                          why="failed workers a request may have been on before it is ended")
        self.detector = FailureDetector(failure_timeout)
        self.answers = ExactlyOnce()
        self.workers: dict[str, WorkerHandle] = {}
        self.events: list[tuple[float, str, str]] = []   # (time, worker, what happened)
        self.redispatched = 0
        self.verified = 0          # requests whose answer a second replica confirmed
        self._late = 0             # answers from a worker that no longer owed the request
        self._requests: dict[str, Request] = {}
        self._futures: dict[str, Future] = {}
        self._submitted: dict[str, float] = {}
        self._attempts: dict[str, int] = {}
        self._strikes: dict[str, int] = {}             # request id -> failed workers it was on
        self._history: dict[str, list[str]] = {}     # request id -> "worker: why" per failed attempt
        self._votes: dict[str, list[Response]] = {}   # request id -> answers so far, when verified
        self._lock = threading.RLock()
        self._closed = False
        self._t0 = time.monotonic()
        self._start(specs)
        threading.Thread(target=self._monitor, daemon=True).start()

    # -- lifecycle ---------------------------------------------------------------------------
    def _start(self, specs) -> None:
        env = course_env(OMP_NUM_THREADS="1")
        started, socks = [], []
        for s in specs:
            log = tempfile.TemporaryFile()
            args = ["--worker-id", s.id, "--version", s.version, "--model", s.model,
                    "--parent-pid", os.getpid(), "--heartbeat-interval", self.heartbeat_interval,
                    "--delay", s.delay, "--block-size", s.block_size, "--crash-after", s.crash_after,
                    "--max-num-seqs", s.max_num_seqs]
            if s.fault is not None:
                args += ["--fault", s.fault, "--fault-after", s.fault_after]
            if s.crash_on_token is not None:
                args += ["--crash-on-token", s.crash_on_token]
            proc = start_child("lessons_lib.serving.worker", args, env=env, stdout=subprocess.PIPE, stderr=log)
            started.append((s, proc, log))
        try:
            for s, proc, log in started:
                port = read_port(proc, self.start_timeout, f"worker {s.id}", log)
                sock = socket.create_connection((LOOPBACK, port), timeout=self.start_timeout)
                socks.append(sock)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    hello = parse_hello(recv_msg(sock))
                except (ProtocolError, OSError) as e:
                    raise RuntimeError(f"worker {s.id} did not introduce itself: {e}") from None
                sock.settimeout(None)
                h = WorkerHandle(s, proc, log, sock, hello["pid"], hello["fingerprint"],
                                 hello["vocab_size"], hello["max_seq_len"])
                self.workers[s.id] = h
                self.detector.heartbeat(s.id)
                self._event(s.id, f"started (version {s.version})")
                threading.Thread(target=self._receive, args=(h,), daemon=True).start()
        except BaseException:
            for sock in socks:
                sock.close()
            for s, proc, log in started:
                proc.kill()
                proc.wait()
                proc.stdout.close()
                log.close()
                self.workers.pop(s.id, None)
            raise

    def close(self) -> None:
        """Fail every unanswered request with :class:`RouterClosed`, then stop every worker: a
        polite stop message, then SIGKILL for any that linger. Calling it twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = [rid for rid, f in self._futures.items() if not f.done()]
        for rid in pending:
            self._finish(rid, error=RouterClosed(f"request {rid}: the router was closed before "
                                                 f"it was answered"))
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
            h.log.close()

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------
    def submit(self, request: Request) -> Future:
        """Route one request; the future resolves to its :class:`Response` or to the error that
        ended it. Submitting the same request again returns the same future (the id is its
        idempotency key); a *different* request under a used id raises :class:`DuplicateRequestId`."""
        if not isinstance(request, Request):
            raise bad("request", request, "a lessons_lib.serving.Request")
        if self._closed:
            raise RouterClosed(f"request {request.id}: the router is closed; start a new Router")
        self._check_fits(request)
        with self._lock:
            known = self._requests.get(request.id)
            if known is not None:
                if known == request:
                    return self._futures[request.id]
                raise DuplicateRequestId(*bad(
                    "request.id", request.id, "an id not yet used for a different request",
                    f"it was first submitted as {_describe(known)}, now as {_describe(request)}; "
                    f"answering it would return the first request's tokens").args)
            fut = Future()
            self._requests[request.id] = request
            self._futures[request.id] = fut
            self._submitted[request.id] = time.monotonic()
            self._attempts[request.id] = 0
        self._dispatch(request)
        return fut

    def _check_fits(self, request: Request) -> None:
        """Refuse, before anything is sent, a request no worker can take."""
        encode(request.to_wire())    # MessageTooLarge: no worker could even read it
        serving = [h for h in self.workers.values()
                   if request.version is None or h.spec.version == request.version]
        if not serving:
            return                   # NoWorkerError after the retries, as for a dead fleet
        vocab = min(h.vocab_size for h in serving)
        context = min(h.max_seq_len for h in serving)
        if max(request.prompt) >= vocab:
            raise bad("request.prompt", f"ids up to {max(request.prompt)}", f"token ids in [0, {vocab})",
                      "the workers' vocabulary size")
        room = context - len(request.prompt)
        if room < request.max_new_tokens:
            if room < 1:
                raise bad("request.prompt", f"{len(request.prompt)} tokens",
                          f"at most {context - 1} tokens", f"the workers' max_seq_len is {context}")
            raise bad("request.max_new_tokens", request.max_new_tokens, f"an int <= {room}",
                      f"a {len(request.prompt)}-token prompt leaves {room} of max_seq_len={context}")

    def run(self, requests, arrival_times=None, timeout: float = 120.0) -> list[Response]:
        """Submit every request (at ``arrival_times`` seconds from now, if given); wait for all."""
        requests = list(requests)
        check_real("timeout", timeout, low=0, low_open=True)
        if arrival_times is not None:
            arrival_times = [check_real("arrival_times[]", t, low=0) for t in arrival_times]
            if len(arrival_times) != len(requests):
                raise bad("arrival_times", f"{len(arrival_times)} times",
                          f"one per request ({len(requests)})")
        start = time.monotonic()
        futures = []
        for i, r in enumerate(requests):
            if arrival_times is not None:
                time.sleep(max(0.0, start + arrival_times[i] - time.monotonic()))
            futures.append(self.submit(r))
        return [f.result(timeout=max(0.1, start + timeout - time.monotonic())) for f in futures]

    def _dispatch(self, request: Request, verify: bool = False) -> None:
        try:
            self._dispatch_once(request, verify)
        except Exception as e:   # e.g. a custom policy's bug: the caller hears of it, never waits
            self._finish(request.id, error=e)

    def _dispatch_once(self, request: Request, verify: bool) -> None:
        rid = request.id
        with self._lock:
            if self._closed or self._futures[rid].done():
                return
            if not verify:
                self._attempts[rid] += 1
            attempt = self._attempts[rid]
            voted = {v.worker for v in self._votes.get(rid, ())}   # a second opinion comes from elsewhere
            live = [h for h in self.workers.values() if h.alive and not h.draining
                    and (request.version is None or h.spec.version == request.version)
                    and h.spec.id not in voted]
            chosen = None
            if live:
                wid = self.policy(request, [h.load() for h in live])
                if wid not in {h.spec.id for h in live}:
                    raise RuntimeError(f"policy {getattr(self.policy, 'name', self.policy)!r} chose "
                                       f"{wid!r}, not one of the live workers {sorted(h.spec.id for h in live)}")
                chosen = self.workers[wid]
                if not chosen.outstanding:
                    chosen.progress_at = time.monotonic()   # idle until now: its progress clock starts
                chosen.outstanding[rid] = request
                chosen.sent.add(rid)
            elif voted:
                self._settle_unverifiable(rid)
                return
        if chosen is None:
            if attempt >= self.max_attempts:
                self._finish(rid, error=NoWorkerError(
                    f"request {rid}: no live worker (version={request.version}) "
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

    def _finish(self, rid: str, response: Response | None = None, error: BaseException | None = None) -> bool:
        """End request ``rid`` once: with ``response``, or with ``error``. False if it had ended."""
        with self._lock:
            fut = self._futures[rid]
            if fut.done():
                return False
            self.answers.accept(rid, response)
            self._votes.pop(rid, None)
            for w in self.workers.values():
                w.outstanding.pop(rid, None)   # nobody owes it any more: later answers are late
            try:
                if error is None:
                    fut.set_result(response)
                else:
                    fut.set_exception(error)
            except InvalidStateError:          # the caller cancelled it
                return False
        return True

    # -- answers -----------------------------------------------------------------------------
    def _receive(self, h: WorkerHandle) -> None:
        """One thread per worker. Whatever arrives, it ends only by taking the worker out of rotation
        (and so re-dispatching what it owed), never silently."""
        try:
            while True:
                self._handle(h, recv_msg(h.sock))
        except BadFrame as e:
            self._on_failure(h, f"sent a bad message ({e})", fence=True)
        except (ProtocolError, OSError):
            self._on_failure(h, "connection closed")
        except Exception as e:   # a bug here must cost one worker, not every request it owes
            self._on_failure(h, f"{type(e).__name__} while reading its message: {e}", fence=True)

    def _handle(self, h: WorkerHandle, msg: dict) -> None:
        op = msg["op"]
        if op == "heartbeat":
            self._on_heartbeat(h, parse_heartbeat(msg))
        elif op == "result":
            self._on_result(h, msg)
        elif op == "error":
            self._on_error(h, msg)
        elif op == "bad-frame":
            self._on_failure(h, f"could not read the router's message ({str(msg.get('error'))[:200]})",
                             fence=True)
        else:
            raise BadFrame(f"unknown op {op!r}")

    def _on_heartbeat(self, h: WorkerHandle, beat: dict) -> None:
        self.detector.heartbeat(h.spec.id)
        with self._lock:
            h.reported = beat
            h.cached.difference_update(beat["removed"])
            h.cached.update(beat["stored"])
            if beat["progress"] != h.progress:
                h.progress, h.progress_at = beat["progress"], time.monotonic()

    def _owed(self, h: WorkerHandle, msg: dict) -> tuple[str, Request | None]:
        """The request a result or error answers; None if the worker no longer owes it."""
        rid = message_field(msg, "id", check_str)
        with self._lock:
            request = h.outstanding.get(rid)
            if request is None and rid not in h.sent:
                raise BadFrame(f"it answered request id {rid!r}, which the router never sent to it")
            if request is None:
                self._late += 1
        return rid, request

    def _on_result(self, h: WorkerHandle, msg: dict) -> None:
        rid, request = self._owed(h, msg)
        if request is None:
            return
        # A malformed result raises here, while the request is still owed: the failure of this
        # worker re-dispatches it.
        fields = parse_result(msg, request, h.spec.id, h.spec.version, h.vocab_size)
        with self._lock:
            h.progress_at = time.monotonic()           # an answer is progress too
            if h.outstanding.pop(rid, None) is None:   # taken from it meanwhile (declared failed)
                self._late += 1
                return
            resp = Response(rid, fields["tokens"], h.spec.id, h.spec.version, fields["cached_tokens"],
                            fields["service_s"], time.monotonic() - self._submitted[rid],
                            self._attempts[rid], queue_s=fields["queue_s"], ttft_s=fields["ttft_s"],
                            tpot_s=fields["tpot_s"])
            winner, losers = self._vote(request, resp)
        if winner is None:
            self._dispatch(request, verify=True)
            return
        self._finish(rid, response=winner)
        for w in losers:
            self._on_failure(self.workers[w], f"its answer to {rid} was outvoted by "
                                              f"{len(winner.extra['verified_by'])} replicas", fence=True)

    def _sampled(self, rid: str) -> bool:
        return zlib.crc32(f"{self.seed}/{rid}".encode()) / 2 ** 32 < self.verify_fraction

    def _vote(self, request: Request, resp: Response) -> tuple[Response | None, list[str]]:
        """(answer to deliver, workers it outvoted), or (None, []) while another opinion is needed."""
        if request.id not in self._votes and not self._sampled(request.id):
            return resp, []
        votes = self._votes.setdefault(request.id, [])
        votes.append(resp)
        tokens, n = Counter(v.tokens for v in votes).most_common(1)[0]
        if n < 2:
            return None, []
        agree = [v.worker for v in votes if v.tokens == tokens]
        self.verified += 1
        winner = next(v for v in votes if v.tokens == tokens)
        return replace(winner, extra={"verified_by": agree}), [v.worker for v in votes if v.tokens != tokens]

    def _settle_unverifiable(self, rid: str) -> None:
        """No other replica can give an opinion: deliver a lone answer as unverified; refuse a tie."""
        votes = self._votes[rid]
        if len(votes) == 1:
            self._finish(rid, response=replace(votes[0], extra={"verified_by": []}))
            return
        said = "; ".join(f"{v.worker}: {list(v.tokens)}" for v in votes)
        self._finish(rid, error=RequestFailed(f"request {rid}: replicas disagree ({said}) and no "
                                              f"other live replica can break the tie"))

    def _on_error(self, h: WorkerHandle, msg: dict) -> None:
        rid, request = self._owed(h, msg)
        error = message_field(msg, "error", check_str)
        if request is not None:
            self._finish(rid, error=RequestFailed(f"worker {h.spec.id} could not serve request "
                                                  f"{rid}: {error}"))

    # -- failures ----------------------------------------------------------------------------
    def _monitor(self) -> None:
        while not self._closed:
            for wid in self.detector.suspects():
                self._on_failure(self.workers[wid], "heartbeat timeout")
            now = time.monotonic()
            for h in list(self.workers.values()):
                stalled = now - h.progress_at
                if h.alive and h.outstanding and stalled > self.progress_timeout:
                    self._on_failure(h, f"no progress for {stalled:.1f} s while owing "
                                        f"{len(h.outstanding)} requests (alive, but stuck)", fence=True)
            time.sleep(self.heartbeat_interval / 2)

    def _on_failure(self, h: WorkerHandle, reason: str, fence: bool = False) -> None:
        """Take ``h`` out of rotation and re-dispatch what it owed; ``fence`` also kills it (a
        worker that broke the protocol is not trusted to finish anything)."""
        with self._lock:
            if not h.alive or self._closed:
                return
            h.alive = False
            self.detector.mark_dead(h.spec.id)
            orphans = list(h.outstanding.values())
            h.outstanding.clear()
            self.redispatched += len(orphans)
            self._event(h.spec.id, f"{reason}: out of rotation{', fenced (killed)' if fence else ''}, "
                                   f"{len(orphans)} requests re-dispatched")
        if fence:
            try:
                h.proc.kill()
            except OSError:
                pass
        for r in orphans:
            self._history.setdefault(r.id, []).append(f"{h.spec.id}: {reason}")
            self._strikes[r.id] = self._strikes.get(r.id, 0) + 1
            if self._strikes[r.id] >= self.quarantine_after and self.quarantine_after > 0:
                self._finish(r.id, error=RequestQuarantined(
                    f"request {r.id} was on {self._strikes[r.id]} workers that failed "
                    f"({'; '.join(self._history[r.id])}); quarantined so that it cannot take down "
                    f"another replica (quarantine_after={self.quarantine_after})"))
            elif self._attempts[r.id] >= self.max_attempts:
                self._finish(r.id, error=RequestFailed(
                    f"request {r.id}: all {self._attempts[r.id]} attempts failed "
                    f"({'; '.join(self._history[r.id])}); giving up (max_attempts={self.max_attempts})"))
            else:
                self._retry_later(r, self._attempts[r.id])

    def _event(self, worker: str, what: str) -> None:
        self.events.append((time.monotonic() - self._t0, worker, what))

    # -- operations: fault injection and rolling updates ----------------------------------------
    def kill(self, worker_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a worker process: SIGKILL (crash) or SIGSTOP (hang); SIGCONT resumes."""
        check_choice("worker_id", worker_id, sorted(self.workers))
        os.kill(self.workers[worker_id].proc.pid, sig)

    def add_worker(self, spec: WorkerSpec) -> None:
        if not isinstance(spec, WorkerSpec):
            raise bad("spec", spec, "a WorkerSpec")
        if spec.id in self.workers:
            raise bad("spec.id", spec.id, "an id no worker has yet", "choose a new one")
        self._start([spec])

    def drain(self, worker_id: str, timeout: float = 60.0) -> None:
        """Stop routing to a worker, wait for its in-flight requests, then stop it."""
        check_choice("worker_id", worker_id, sorted(self.workers))
        check_real("timeout", timeout, low=0)
        h = self.workers[worker_id]
        with self._lock:
            h.draining = True
        deadline = time.monotonic() + timeout
        while h.outstanding and h.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            h.alive = False
            self.detector.mark_dead(worker_id)
            orphans = list(h.outstanding.values())   # still owed after the timeout: re-send them
            h.outstanding.clear()
        for r in orphans:
            self._retry_later(r, self._attempts[r.id])
        try:
            with h.send_lock:
                send_msg(h.sock, {"op": "stop"})
        except OSError:
            pass   # it died while draining: nothing left to stop
        self._event(worker_id, "drained and stopped")

    @property
    def duplicates_dropped(self) -> int:
        """Answers dropped because the request was answered already or had been re-dispatched."""
        return self.answers.duplicates + self._late

    def live_workers(self) -> list[str]:
        return [w for w, h in self.workers.items() if h.alive and not h.draining]


def _describe(r: Request) -> str:
    return (f"a prompt of {len(r.prompt)} tokens (crc32 {zlib.crc32(repr(r.prompt).encode()):08x}), "
            f"max_new_tokens={r.max_new_tokens}, version={r.version}")
