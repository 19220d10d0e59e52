"""Faults injected into the serving router and its workers, and bad input to the serving API.

Every fault test asserts that each request is answered exactly once with the tokens of a single
in-process ``generate`` (the no-fault reference), or, where the fault makes that impossible, ends
in a named error, never a hang; and that no process, file descriptor or temporary file is left.
"""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

import pytest

from lessons_lib.serving import (DuplicateRequestId, MessageTooLarge, Request, RequestFailed, Router, RouterClosed,
                                 WorkerSpec)
from lessons_lib.serving.faults import ANSWER_FAULTS, LINK_FAULTS, corrupt_answer, inject, run_with_fault
from lessons_lib.serving.health import FailureDetector, backoff_delays
from lessons_lib.serving.policies import PowerOfTwoChoices, PrefixCacheAware, block_hashes, make_policy
from lessons_lib.serving.simulate import (CostModel, compare_policies, make_trace, measure_capacity, percentile,
                                          retime, simulate)
from lessons_lib.serving.versioning import run_session
from lessons_lib.engine import SamplingParams
from lessons_lib.serving.worker import load_model, make_engine
from lessons_lib.serving.workload import make_requests, reference_tokens, replay
from lessons_lib.validate import BadArgument

pytestmark = [pytest.mark.lesson07, pytest.mark.timeout(60)]

SPEC = "random:0"
TALLY = Counter()   # faults injected, requests sent, requests lost, orphan processes


@pytest.fixture(scope="module", autouse=True)
def tally(request):
    yield TALLY
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and TALLY:
        with capture.global_and_fixture_disabled():   # printed whether or not pytest captures output
            reporter.write_line("\nserving fault suite: " + ", ".join(f"{k}: {v}" for k, v in sorted(TALLY.items())))


@pytest.fixture(scope="module")
def reqs_and_ref():
    reqs = make_requests(24, seed=5)
    return reqs, reference_tokens(reqs, model_spec=SPEC)


def _children() -> set[int]:
    """Live (not zombie) child processes of this process."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            if int(ppid) == os.getpid() and state != "Z":
                out.add(int(d))
    return out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pids, seconds: float = 15.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if not _gone(p)]


@pytest.fixture
def clean(tmp_path, monkeypatch):
    """A private temp dir for the router and its workers; afterwards none of their processes,
    files or file descriptors may remain."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    fds, children = len(os.listdir("/proc/self/fd")), _children()
    pids: list[int] = []
    yield pids
    orphans = _wait_gone(sorted(set(pids) | (_children() - children)))
    TALLY["orphan processes"] += len(orphans)
    assert not orphans, f"processes left behind: {orphans}"
    assert list(tmp.iterdir()) == [], "temporary files left behind"
    assert len(os.listdir("/proc/self/fd")) <= fds, "file descriptors left open"


def workers(n=3, **faulty):
    """``n`` honest workers ``w0..``; ``faulty={"w1": dict(fault=...)}`` changes one."""
    return [WorkerSpec(f"w{i}", model=SPEC, **faulty.get(f"w{i}", {})) for i in range(n)]


def start(specs, clean, **kw) -> Router:
    router = Router(specs, **kw)
    clean.extend(h.proc.pid for h in router.workers.values())
    return router


def assert_exactly_once(router, reqs, responses, ref):
    """Each request answered once, by the reference's tokens; the router's ledger agrees."""
    TALLY["requests sent"] += len(reqs)
    answered = Counter(r.id for r in responses)
    lost = {r.id for r in reqs} - set(answered)
    TALLY["requests lost"] += len(lost)
    assert not lost, f"requests lost: {sorted(lost)}"
    assert all(n == 1 for n in answered.values()) and len(responses) == len(reqs)
    assert [r.id for r in responses] == [q.id for q in reqs]
    wrong = [r.id for r in responses if r.tokens != ref[r.id]]
    assert not wrong, f"answers differ from the reference: {wrong}"
    assert len(router.answers) == len(reqs)


def events_of(router, worker):
    return " | ".join(what for _, w, what in router.events if w == worker)


# -- process faults -----------------------------------------------------------------------------
def test_sigkill_mid_run_loses_nothing(reqs_and_ref, clean):
    reqs, ref = reqs_and_ref
    with start(workers(3), clean) as router:
        responses = run_with_fault(router, reqs, "w1", "kill", after=4, timeout=30)
        TALLY["faults injected"] += 1
        assert_exactly_once(router, reqs, responses, ref)
        assert "connection closed" in events_of(router, "w1") and router.live_workers() == ["w0", "w2"]


def test_sigstop_then_sigcont_answers_once_and_drops_the_late_answers(reqs_and_ref, clean):
    reqs, ref = reqs_and_ref
    specs = [WorkerSpec("w0", model=SPEC, delay=0.02), WorkerSpec("w1", model=SPEC)]
    with start(specs, clean, failure_timeout=0.5) as router:
        responses = run_with_fault(router, reqs, "w0", "hang", after=2, timeout=30)
        TALLY["faults injected"] += 1
        assert_exactly_once(router, reqs, responses, ref)
        assert "heartbeat timeout" in events_of(router, "w0")
        router.kill("w0", signal.SIGCONT)
        deadline = time.monotonic() + 10
        while router.duplicates_dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert router.duplicates_dropped > 0 and len(router.answers) == len(reqs)


def test_a_slow_worker_is_not_a_failed_one(reqs_and_ref, clean):
    reqs, ref = reqs_and_ref
    with start(workers(2, w0={"delay": 0.05}), clean, policy="round-robin") as router:
        TALLY["faults injected"] += 1
        assert_exactly_once(router, reqs, router.run(reqs, timeout=30), ref)
        assert router.live_workers() == ["w0", "w1"] and router.redispatched == 0


# -- garbage from a worker ------------------------------------------------------------------------
GARBAGE = {   # the fault, and what the router's event log says about the worker that sent it
    "missing-tokens": "without its 'tokens' field",
    "wrong-types": "result.tokens=",
    "wrong-id": "never sent to it",
    "non-json": "is not JSON",
    "oversized": "exceeds the 16777216-byte limit",
}


def test_the_table_covers_every_garbage_fault():
    assert set(GARBAGE) | {"wrong-tokens"} == set(ANSWER_FAULTS)


@pytest.mark.parametrize("fault", sorted(GARBAGE))
def test_a_worker_sending_garbage_is_fenced_and_its_requests_re_sent(fault, reqs_and_ref, clean):
    reqs, ref = reqs_and_ref
    specs = workers(3, w1={"fault": fault, "fault_after": 1})
    with start(specs, clean) as router:
        responses = router.run(reqs, timeout=30)
        TALLY["faults injected"] += 1
        assert_exactly_once(router, reqs, responses, ref)
        said = events_of(router, "w1")
        assert GARBAGE[fault] in said and "fenced (killed)" in said, said
        assert router.live_workers() == ["w0", "w2"]
        assert not _wait_gone([router.workers["w1"].proc.pid], 5)
        assert {r.worker for r in responses} >= {"w1"}   # its one honest answer was kept


def test_wrong_tokens_are_caught_only_by_a_second_replica(reqs_and_ref, clean):
    reqs, ref = reqs_and_ref
    specs = workers(3, w1={"fault": "wrong-tokens", "fault_after": 1})
    with start(specs, clean, verify_fraction=1.0) as router:
        responses = router.run(reqs, timeout=30)
        TALLY["faults injected"] += 1
        assert_exactly_once(router, reqs, responses, ref)
        assert "outvoted" in events_of(router, "w1") and router.live_workers() == ["w0", "w2"]
        assert router.verified == len(reqs)
        assert all(len(r.extra["verified_by"]) >= 2 for r in responses)


def test_the_wrong_tokens_fault_sends_plausible_ids_a_heartbeat_cannot_tell_apart():
    result = {"op": "result", "id": "r0", "tokens": [5, 263, 7]}
    frame = corrupt_answer(result, "wrong-tokens", vocab_size=264)
    assert json.loads(frame[4:])["tokens"] == [6, 0, 8]


# -- garbage to a worker --------------------------------------------------------------------------
@pytest.mark.parametrize("fault", sorted(LINK_FAULTS))
def test_a_worker_that_cannot_read_its_link_says_so_and_nothing_is_lost(fault, reqs_and_ref, clean):
    reqs, ref = reqs_and_ref
    with start(workers(3, w0={"delay": 0.01}, w1={"delay": 0.01}, w2={"delay": 0.01}), clean) as router:
        responses = run_with_fault(router, reqs, "w1", fault, after=2, timeout=30)
        TALLY["faults injected"] += 1
        assert_exactly_once(router, reqs, responses, ref)
        said = events_of(router, "w1")
        assert "could not read the router's message" in said, said
        assert router.live_workers() == ["w0", "w2"]


# -- no worker can serve it: a named error, never a hang ------------------------------------------
def test_a_request_every_worker_fails_on_ends_in_a_named_error(clean):
    specs = workers(2, w0={"fault": "missing-tokens"}, w1={"fault": "missing-tokens"})
    with start(specs, clean, max_attempts=2) as router:
        futures = [router.submit(r) for r in make_requests(4, seed=1)]
        TALLY["faults injected"] += 2
        TALLY["requests sent"] += 4
        for f in futures:
            with pytest.raises(RequestFailed, match="attempts|no live worker|quarantined"):
                f.result(timeout=20)
        assert router.live_workers() == []


def test_closing_the_router_ends_every_request(reqs_and_ref, clean):
    reqs, ref = reqs_and_ref
    router = start(workers(2, w0={"delay": 0.05}, w1={"delay": 0.05}), clean)
    futures = [router.submit(r) for r in reqs]
    while sum(f.done() for f in futures) < 2:
        time.sleep(0.01)
    router.close()
    TALLY["faults injected"] += 1
    TALLY["requests sent"] += len(reqs)
    assert all(f.done() for f in futures)
    answered = [f.result() for f in futures if f.exception() is None]
    closed = [f.exception() for f in futures if f.exception() is not None]
    assert answered and closed and len(answered) + len(closed) == len(reqs)
    assert all(r.tokens == ref[r.id] for r in answered)
    assert all(isinstance(e, RouterClosed) for e in closed)
    with pytest.raises(RouterClosed, match="closed"):
        router.submit(reqs[0])
    router.close()   # twice is harmless


def test_workers_of_a_killed_router_exit_with_requests_in_flight(clean, tmp_path):
    code = ("import sys\n"
            "from lessons_lib.serving import Router, WorkerSpec\n"
            "from lessons_lib.serving.workload import make_requests\n"
            "r = Router([WorkerSpec(f'w{i}', model='random:0', delay=0.05) for i in range(2)])\n"
            "fs = [r.submit(q) for q in make_requests(20)]\n"
            "print(*[h.proc.pid for h in r.workers.values()], flush=True)\n"
            "fs[-1].result()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        clean.extend(pids)
        assert len(pids) == 2 and not any(_gone(p) for p in pids)
        parent.kill()
        parent.wait()
        TALLY["faults injected"] += 1
        assert not _wait_gone(pids), "a worker outlived its router"
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


# -- refused at submit: nothing sent, every worker still serving ----------------------------------
@pytest.fixture(scope="module")
def shared_router(reqs_and_ref):
    router = Router(workers(3))
    yield router
    pids = [h.proc.pid for h in router.workers.values()]
    router.close()
    assert not _wait_gone(pids)


def test_a_prompt_over_the_message_limit_is_refused_before_sending(shared_router, reqs_and_ref):
    reqs, ref = reqs_and_ref
    huge = Request("huge", [255] * 5_000_000, 2)
    with pytest.raises(MessageTooLarge, match=r"request=.*5000000 prompt tokens.*at most 16777216 bytes"
                                              r".*encodes to 20000\d+ bytes"):
        shared_router.submit(huge)
    assert all("huge" not in h.sent for h in shared_router.workers.values())
    responses = shared_router.run(reqs[:6], timeout=30)
    assert [r.tokens for r in responses] == [ref[r.id] for r in reqs[:6]]
    assert shared_router.live_workers() == ["w0", "w1", "w2"]


def test_a_reused_id_with_another_prompt_is_refused(shared_router, reqs_and_ref):
    reqs, ref = reqs_and_ref
    first = shared_router.submit(reqs[6])
    assert shared_router.submit(reqs[6]) is first   # the same request again: the same answer
    other = Request(reqs[6].id, (1, 2, 3), reqs[6].max_new_tokens)
    with pytest.raises(DuplicateRequestId, match=f"request.id='{reqs[6].id}'.*first submitted as"):
        shared_router.submit(other)
    assert first.result(timeout=30).tokens == ref[reqs[6].id]
    with pytest.raises(DuplicateRequestId):   # also once answered
        shared_router.submit(other)


# -- bad input to the serving API -----------------------------------------------------------------
NAN = math.nan
BAD_INPUTS = {
    # Router and WorkerSpec: refused before a process starts
    "router no workers": (lambda: Router([]), "specs=\\[\\]"),
    "router a bare spec": (lambda: Router(WorkerSpec("w0")), "specs=.*wrap it"),
    "router not specs": (lambda: Router(["w0", "w1"]), "specs="),
    "router duplicate ids": (lambda: Router([WorkerSpec("a"), WorkerSpec("a")]), "unique worker ids"),
    "router policy name": (lambda: Router(workers(1), policy="fastest"), "policy='fastest'"),
    "router policy type": (lambda: Router(workers(1), policy=3), "policy=3"),
    "router heartbeat nan": (lambda: Router(workers(1), heartbeat_interval=NAN), "heartbeat_interval=nan"),
    "router heartbeat 0": (lambda: Router(workers(1), heartbeat_interval=0), "heartbeat_interval=0"),
    "router timeout < heartbeat": (lambda: Router(workers(1), failure_timeout=0.05), "failure_timeout=0.05"),
    "router timeout negative": (lambda: Router(workers(1), failure_timeout=-1), "failure_timeout=-1"),
    "router max_attempts 0": (lambda: Router(workers(1), max_attempts=0), "max_attempts=0"),
    "router max_attempts bool": (lambda: Router(workers(1), max_attempts=True), "max_attempts=True"),
    "router backoff inf": (lambda: Router(workers(1), backoff_base=math.inf), "backoff_base=inf"),
    "router start_timeout nan": (lambda: Router(workers(1), start_timeout=NAN), "start_timeout=nan"),
    "router verify 1.5": (lambda: Router(workers(1), verify_fraction=1.5), "verify_fraction=1.5"),
    "router verify nan": (lambda: Router(workers(1), verify_fraction=NAN), "verify_fraction=nan"),
    "spec empty id": (lambda: WorkerSpec(""), "id=''"),
    "spec id int": (lambda: WorkerSpec(3), "id=3"),
    "spec model": (lambda: WorkerSpec("w", model="random:x"), "model='random:x'"),
    "spec delay negative": (lambda: WorkerSpec("w", delay=-0.1), "delay=-0.1"),
    "spec delay nan": (lambda: WorkerSpec("w", delay=NAN), "delay=nan"),
    "spec crash_after bool": (lambda: WorkerSpec("w", crash_after=True), "crash_after=True"),
    "spec block_size negative": (lambda: WorkerSpec("w", block_size=-16), "block_size=-16"),
    "spec fault": (lambda: WorkerSpec("w", fault="lies"), "fault='lies'"),
    "spec fault_after": (lambda: WorkerSpec("w", fault_after=-1), "fault_after=-1"),
    # Request
    "request id empty": (lambda: Request("", (1,)), "id=''"),
    "request id int": (lambda: Request(7, (1,)), "id=7"),
    "request prompt empty": (lambda: Request("r", ()), "prompt=.*no tokens"),
    "request prompt text": (lambda: Request("r", "hello"), "prompt='hello'.*tokenizer"),
    "request prompt floats": (lambda: Request("r", [1.0, 2.0]), "prompt=.*1.0"),
    "request prompt bools": (lambda: Request("r", [True, False]), "prompt=.*True"),
    "request prompt negative": (lambda: Request("r", [3, -1]), "prompt=.*-1"),
    "request prompt None": (lambda: Request("r", None), "prompt=None"),
    "request max_new_tokens bool": (lambda: Request("r", (1,), True), "max_new_tokens=True"),
    "request max_new_tokens negative": (lambda: Request("r", (1,), -2), "max_new_tokens=-2"),
    "request max_new_tokens float": (lambda: Request("r", (1,), 2.0), "max_new_tokens=2.0"),
    "request version": (lambda: Request("r", (1,), 2, version=2), "version=2"),
    # policies
    "policy name": (lambda: make_policy("fastest"), "policy='fastest'"),
    "policy name type": (lambda: make_policy(None), "policy=None"),
    "power-of-two seed": (lambda: PowerOfTwoChoices(seed=1.5), "seed=1.5"),
    "prefix-aware block": (lambda: PrefixCacheAware(block_size=0), "block_size=0"),
    "prefix-aware capacity": (lambda: PrefixCacheAware(capacity=-1), "capacity=-1"),
    "block_hashes bool": (lambda: block_hashes([1, 2], True), "block_size=True"),
    # workload
    "requests n 0": (lambda: make_requests(0), "n=0"),
    "requests n bool": (lambda: make_requests(True), "n=True"),
    "requests n float": (lambda: make_requests(2.0), "n=2.0"),
    "requests max_new_tokens": (lambda: make_requests(2, max_new_tokens=0), "max_new_tokens=0"),
    "requests share nan": (lambda: make_requests(2, shared_prefix_share=NAN), "shared_prefix_share=nan"),
    "requests share 2": (lambda: make_requests(2, shared_prefix_share=2), "shared_prefix_share=2"),
    "requests prefix": (lambda: make_requests(2, prefix=None), "prefix=None"),
    "reference not requests": (lambda: reference_tokens([(1, 2)], model=object()), "requests=\\(1, 2\\)"),
    "replay rate nan": (lambda: replay(None, ["round-robin"], rate=NAN), "rate=nan"),
    "replay rate negative": (lambda: replay(None, ["round-robin"], rate=-5), "rate=-5"),
    "replay policy": (lambda: replay(None, ["fastest"]), "policy='fastest'"),
    "replay policy string": (lambda: replay(None, "round-robin"), "policy_names=.*wrap it"),
    # simulation
    "trace n 0": (lambda: make_trace(0), "n=0"),
    "trace base_rate nan": (lambda: make_trace(5, base_rate=NAN), "base_rate=nan"),
    "trace burst_rate negative": (lambda: make_trace(5, burst_rate=-1), "burst_rate=-1"),
    "trace burst_every 0": (lambda: make_trace(5, burst_every=0), "burst_every=0"),
    "trace burst_len > every": (lambda: make_trace(5, burst_len=4), "burst_len=4"),
    "trace long_share": (lambda: make_trace(5, long_share=1.5), "long_share=1.5"),
    "trace n_prefixes": (lambda: make_trace(5, n_prefixes=0), "n_prefixes=0"),
    "simulate policy": (lambda: simulate([], "fastest"), "policy='fastest'"),
    "simulate policy type": (lambda: simulate([], 42), "policy=42"),
    "simulate speeds empty": (lambda: simulate([], "round-robin", speeds=()), "speeds=\\(\\)"),
    "simulate speeds number": (lambda: simulate([], "round-robin", speeds=2), "speeds=2"),
    "simulate speeds nan": (lambda: simulate([], "round-robin", speeds=(1, NAN)), "speeds\\[\\]=nan"),
    "simulate speeds 0": (lambda: simulate([], "round-robin", speeds=(1, 0)), "speeds\\[\\]=0"),
    "simulate prefill negative": (lambda: simulate([], "round-robin", prefill_s_per_token=-1),
                                  "prefill_s_per_token=-1"),
    "simulate trace items": (lambda: simulate([1, 2], "round-robin"), "trace=1"),
    "compare names": (lambda: compare_policies([], names=["fastest"]), "policy='fastest'"),
    "simulate stale interval": (lambda: simulate([], "round-robin", load_report_interval=-1),
                                "load_report_interval=-1"),
    "simulate cost type": (lambda: simulate([], "round-robin", cost={"step_overhead_s": 1}), "cost="),
    "cost overhead nan": (lambda: CostModel(step_overhead_s=NAN), "step_overhead_s=nan"),
    "cost batch below seqs": (lambda: CostModel(max_num_seqs=8, max_num_batched_tokens=4),
                              "max_num_batched_tokens=4"),
    "retime rate 0": (lambda: retime(make_trace(3), 0), "rate=0"),
    "retime trace items": (lambda: retime([1], 5.0), "trace=1"),
    "capacity empty trace": (lambda: measure_capacity([]), "trace=\\[\\]"),
    "goodput slo 0": (lambda: simulate(make_trace(3), "round-robin").goodput(0, 1), "slo_ttft_s=0"),
    "replay no policies": (lambda: replay(None, []), "policy_names=\\[\\]"),
    "replay rounds 0": (lambda: replay(None, ["round-robin"], n=4, rounds=0), "rounds=0"),
    "replay rounds > n": (lambda: replay(None, ["round-robin"], n=4, rounds=5), "rounds=5"),
    "token-cost weight negative": (lambda: make_policy("token-cost", decode_cost=-1), "decode_cost=-1"),
    "percentile empty": (lambda: percentile([], 50), "sorted_values=\\[\\]"),
    "percentile q nan": (lambda: percentile([1.0], NAN), "q=nan"),
    "percentile q 150": (lambda: percentile([1.0], 150), "q=150"),
    # health, worker, sessions, faults
    "backoff base nan": (lambda: backoff_delays(3, base=NAN), "base=nan"),
    "backoff factor": (lambda: backoff_delays(3, factor=0.5), "factor=0.5"),
    "backoff cap < base": (lambda: backoff_delays(3, base=0.5, cap=0.1), "cap=0.1"),
    "detector timeout nan": (lambda: FailureDetector(timeout=NAN), "timeout=nan"),
    "model spec": (lambda: load_model("random:one"), "model='random:one'"),
    "model spec type": (lambda: load_model(None), "model=None"),
    "engine block size": (lambda: make_engine(load_model(SPEC), block_size=-1), "block_size=-1"),
    "engine prompt out of vocab": (lambda: make_engine(load_model(SPEC)).add_request("x", [1, 999]),
                                   "prompt_token_ids=.*999"),
    "engine max_tokens bool": (lambda: SamplingParams(max_tokens=True), "max_tokens=True"),
    "session steps": (lambda: run_session(None, "s", (1, 2), steps=0), "steps=0"),
    "session tokens bool": (lambda: run_session(None, "s", (1, 2), tokens_per_step=True), "tokens_per_step=True"),
    "corrupt answer kind": (lambda: corrupt_answer({}, "lies", 264), "fault='lies'"),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_its_name(case):
    call, names = BAD_INPUTS[case]
    TALLY["bad inputs"] += 1
    with pytest.raises(BadArgument, match=names):
        call()


SUBMIT_BAD = {
    "not a request": (lambda: {"id": "r", "prompt": [1]}, "request="),
    "out of vocabulary": (lambda: Request("oov", (1, 264)), "request.prompt=.*\\[0, 264\\)"),
    "past the context": (lambda: Request("long", (1,) * 1000, 100), "request.max_new_tokens=100.*<= 24"),
    "prompt alone past the context": (lambda: Request("longer", (1,) * 1024, 1), "request.prompt=.*1023"),
}


ROUTER_CALLS_BAD = {
    "run timeout nan": (lambda r: r.run([], timeout=NAN), "timeout=nan"),
    "run arrival times short": (lambda r: r.run(make_requests(2, prefix="at"), arrival_times=[0.0]),
                                "arrival_times=.*one per request"),
    "run arrival time negative": (lambda r: r.run(make_requests(1, prefix="an"), arrival_times=[-1]),
                                  "arrival_times\\[\\]=-1"),
    "kill unknown worker": (lambda r: r.kill("w9"), "worker_id='w9'"),
    "drain unknown worker": (lambda r: r.drain("w9"), "worker_id='w9'"),
    "add a taken id": (lambda r: r.add_worker(WorkerSpec("w0", model=SPEC)), "spec.id='w0'"),
    "add not a spec": (lambda r: r.add_worker("w3"), "spec='w3'"),
}
SUBMIT_BAD.update({case: (None, names) for case, (_, names) in ROUTER_CALLS_BAD.items()})


@pytest.mark.timeout(10)
@pytest.mark.parametrize("case", sorted(SUBMIT_BAD))
def test_the_router_refuses_bad_calls_and_requests_no_worker_can_serve(case, shared_router):
    make, names = SUBMIT_BAD[case]
    TALLY["bad inputs"] += 1
    with pytest.raises(BadArgument, match=names):
        if make is None:
            ROUTER_CALLS_BAD[case][0](shared_router)
        else:
            shared_router.submit(make())
    assert shared_router.live_workers() == ["w0", "w1", "w2"]


@pytest.mark.timeout(10)
def test_a_policy_naming_no_live_worker_fails_the_request_instead_of_hanging(shared_router):
    before = shared_router.policy
    shared_router.policy = lambda request, loads: "nope"
    try:
        future = shared_router.submit(Request("misrouted", (1, 2, 3), 2))
        with pytest.raises(RuntimeError, match="chose 'nope', not one of the live workers"):
            future.result(timeout=5)
    finally:
        shared_router.policy = before


@pytest.mark.timeout(10)
@pytest.mark.parametrize("fault, victim", [("explode", "w0"), ("kill", "w9")])
def test_fault_injection_refuses_unknown_faults_and_victims(fault, victim, shared_router):
    TALLY["bad inputs"] += 1
    with pytest.raises(BadArgument, match="fault='explode'" if fault == "explode" else "victim='w9'"):
        inject(shared_router, victim, fault)
