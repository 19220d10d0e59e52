"""Lesson 07: failure detection, retries with backoff, exactly-once answers under kill/hang/slow."""

import signal
import time

import pytest
import torch

from lessons_lib import DistributedError, run_distributed
from lessons_lib.caching import block_hashes
from lessons_lib.engine import SamplingParams
from lessons_lib.serving import NoWorkerError, Request, RequestQuarantined, Router, WorkerSpec
from lessons_lib.serving.elastic import run_elastic, tp_row_parallel_step
from lessons_lib.serving.faults import exactly_once_report, run_with_fault
from lessons_lib.serving.health import ExactlyOnce, FailureDetector, backoff_delays
from lessons_lib.serving.worker import load_model, make_engine
from lessons_lib.serving.workload import make_requests, reference_tokens

pytestmark = [pytest.mark.lesson07, pytest.mark.timeout(120)]


# -- pure parts -------------------------------------------------------------------------------
def test_backoff_grows_exponentially_up_to_the_cap_without_jitter():
    assert backoff_delays(6, base=0.1, factor=2, cap=1.0, jitter="none") == \
        pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_full_jitter_stays_below_the_envelope_and_is_reproducible():
    d = backoff_delays(8, base=0.1, cap=2.0, seed=7)
    assert d == backoff_delays(8, base=0.1, cap=2.0, seed=7)
    assert d != backoff_delays(8, base=0.1, cap=2.0, seed=8)
    assert all(0 <= x <= min(2.0, 0.1 * 2 ** k) for k, x in enumerate(d))
    eq = backoff_delays(8, base=0.1, cap=2.0, jitter="equal", seed=7)
    assert all(min(2.0, 0.1 * 2 ** k) / 2 <= x <= min(2.0, 0.1 * 2 ** k) for k, x in enumerate(eq))


@pytest.mark.parametrize("kwargs, words", [({"attempts": -1}, "attempts"), ({"attempts": 2, "jitter": "x"},
                                           "jitter='x'"), ({"attempts": 2, "base": 0}, "base=0")])
def test_backoff_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        backoff_delays(**kwargs)


def test_failure_detector_suspects_only_silent_workers_and_fenced_ones_stay_dead():
    now = [0.0]
    fd = FailureDetector(timeout=1.0, clock=lambda: now[0])
    fd.heartbeat("a"), fd.heartbeat("b")
    now[0] = 0.8
    fd.heartbeat("a")
    now[0] = 1.5
    assert fd.suspects() == ["b"] and fd.alive() == ["a"]
    fd.mark_dead("b")
    fd.heartbeat("b")   # a late heartbeat from a fenced worker does not revive it
    assert fd.suspects() == [] and fd.alive() == ["a"]


def test_exactly_once_keeps_the_first_answer_and_counts_duplicates():
    ledger = ExactlyOnce()
    assert ledger.accept("r1", "first") and not ledger.accept("r1", "second")
    assert ledger.answers["r1"] == "first" and ledger.duplicates == 1 and len(ledger) == 1


def test_worker_engine_with_prefix_cache_equals_generate():
    model = load_model("random:0")
    reqs = make_requests(12, seed=3, shared_prefix_share=1.0)
    ref = reference_tokens(reqs, model)
    engine = make_engine(model, block_size=16, max_num_seqs=1)   # one at a time: later ones find earlier blocks
    outs = engine.generate([list(r.prompt) for r in reqs], [SamplingParams(max_tokens=r.max_new_tokens)
                                                            for r in reqs])
    assert [tuple(o.output_token_ids) for o in outs] == [ref[r.id] for r in reqs]
    assert sum(o.num_cached_tokens > 0 for o in outs) > 0   # shared system prompts were reused


# -- real workers -----------------------------------------------------------------------------
SPEC = "random:0"


@pytest.fixture(scope="module")
def reqs_and_ref():
    reqs = make_requests(200, seed=0)
    return reqs, reference_tokens(reqs, model_spec=SPEC)


def test_kill_one_of_three_during_200_requests_loses_and_duplicates_nothing(reqs_and_ref):
    reqs, ref = reqs_and_ref
    with Router([WorkerSpec(f"w{i}", model=SPEC) for i in range(3)], "round-robin") as router:
        responses = run_with_fault(router, reqs, "w1", "kill", after=20)
        report = exactly_once_report(reqs, responses, ref)
        assert report["answered"] == report["unique ids"] == 200 and report["all ids answered"]
        assert report["equal to reference"]
        assert router.redispatched > 0 and router.live_workers() == ["w0", "w2"]
        assert len(router.answers) == 200 and router.duplicates_dropped == 0
        # Later requests only go to the survivors.
        after = router.run(make_requests(6, seed=1, prefix="late"))
        assert {r.worker for r in after} == {"w0", "w2"}


def test_slow_and_crashing_workers_still_answer_everything_once(reqs_and_ref):
    reqs, ref = reqs_and_ref
    reqs = reqs[:30]
    specs = [WorkerSpec("slow", model=SPEC, delay=0.02), WorkerSpec("crashy", model=SPEC, crash_after=3)]
    with Router(specs, "least-outstanding") as router:
        responses = router.run(reqs)
        report = exactly_once_report(reqs, responses, ref)
        assert report["unique ids"] == 30 and report["equal to reference"]
        assert router.live_workers() == ["slow"]
        # Pinned to a version nobody serves: refused after the retries, not hung.
        with pytest.raises(NoWorkerError, match="version=v9"):
            router.submit(Request("pinned", (1, 2, 3), 2, version="v9")).result(timeout=30)


def test_a_hung_worker_is_detected_by_heartbeat_timeout_and_its_late_answers_are_dropped(reqs_and_ref):
    reqs, ref = reqs_and_ref
    reqs = reqs[:60]
    specs = [WorkerSpec("w0", model=SPEC, delay=0.01), WorkerSpec("w1", model=SPEC)]
    with Router(specs, "round-robin", failure_timeout=0.5) as router:
        start = time.monotonic()
        responses = run_with_fault(router, reqs, "w0", "hang", after=4)
        assert any("heartbeat timeout" in what for _, w, what in router.events if w == "w0")
        assert exactly_once_report(reqs, responses, ref)["equal to reference"]
        assert len({r.id for r in responses}) == 60
        router.kill("w0", signal.SIGCONT)   # it wakes up and answers what it had queued
        deadline = time.monotonic() + 20
        while router.duplicates_dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert router.duplicates_dropped > 0 and len(router.answers) == 60
        assert time.monotonic() - start < 60


def test_a_worker_alive_but_stuck_is_caught_by_progress_not_by_heartbeats(reqs_and_ref):
    """Its heartbeat thread goes on; its engine produces nothing for 30 s a step."""
    reqs, ref = reqs_and_ref
    specs = [WorkerSpec("stuck", model=SPEC, delay=30.0), WorkerSpec("ok", model=SPEC)]
    with Router(specs, "round-robin", failure_timeout=0.5, progress_timeout=2.0) as router:
        start = time.monotonic()
        responses = router.run(reqs[:4], timeout=30)
        waited = time.monotonic() - start
        assert [r.tokens for r in responses] == [ref[r.id] for r in reqs[:4]]
        assert {r.worker for r in responses} == {"ok"}
        stuck_events = [what for _, w, what in router.events if w == "stuck"]
        assert any("no progress" in what for what in stuck_events), stuck_events
        assert not any("heartbeat timeout" in what for what in stuck_events)   # it was alive throughout
        assert waited < 15


def test_a_poison_request_takes_down_at_most_quarantine_after_workers(reqs_and_ref):
    reqs, ref = reqs_and_ref
    poison = Request("poison", (7, 250, 9), 3)
    specs = [WorkerSpec(f"w{i}", model=SPEC, crash_on_token=250) for i in range(4)]
    with Router(specs, "round-robin", quarantine_after=2) as router:
        with pytest.raises(RequestQuarantined, match="poison was on 2 workers that failed"):
            router.submit(poison).result(timeout=30)
        assert len(router.live_workers()) == 2
        healthy = [r for r in reqs[:6] if 250 not in r.prompt]
        assert [r.tokens for r in router.run(healthy)] == [ref[r.id] for r in healthy]


def test_heartbeats_report_load_and_the_blocks_a_worker_cached():
    prompt = tuple(range(1, 50))                   # three full blocks of 16
    with Router([WorkerSpec("w0", model=SPEC)], "kv-aware", heartbeat_interval=0.05) as router:
        router.run([Request("a", prompt, 2)])
        deadline = time.monotonic() + 10
        handle = router.workers["w0"]
        # The blocks are reported after the prefill step, the second token one step later: wait for both.
        while (len(handle.cached) < 3 or handle.reported.get("progress", 0) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(block_hashes(prompt, 16)) <= handle.cached
        assert handle.reported["progress"] >= 2 and handle.reported["running"] == 0
        again = router.run([Request("b", prompt + (60,), 2)])[0]
        assert again.cached_tokens == 48


def test_responses_carry_the_engines_timings_of_each_request():
    reqs = [Request("one", (5, 6, 7), 1), Request("many", tuple(range(1, 40)), 6)]
    with Router([WorkerSpec("w0", model=SPEC)]) as router:
        one, many = router.run(reqs)
    for r in (one, many):
        # queue <= first token <= last token (worker clock) <= submit-to-answer (router clock)
        assert 0 <= r.queue_s <= r.ttft_s <= r.service_s <= r.latency_s
        assert 0 <= r.client_ttft_s <= r.latency_s
    assert one.tpot_s is None                        # one token: no gap between tokens
    assert many.tpot_s > 0 and many.ttft_s + 5 * many.tpot_s == pytest.approx(many.service_s, abs=1e-3)


def test_router_rejects_bad_specs():
    with pytest.raises(ValueError, match="unique"):
        Router([WorkerSpec("a"), WorkerSpec("a")])
    with pytest.raises(ValueError, match="policy='random-ish'"):
        Router([WorkerSpec("a")], policy="random-ish")


# -- failure domains and elastic restart ------------------------------------------------------
def test_a_tp_group_is_one_failure_domain():
    torch.manual_seed(0)
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    ok = run_distributed(tp_row_parallel_step, 2, x, w)
    torch.testing.assert_close(ok[0], x @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(DistributedError) as info:
        run_distributed(tp_row_parallel_step, 2, x, w, fail_rank=1, timeout=30)
    assert info.value.rank == 1 and info.value.remote_type == "RuntimeError"


def test_torchrun_restarts_the_group_after_a_failure():
    result = run_elastic(nproc=2, max_restarts=2, timeout=100)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "attempt 0 rank 1: failing on purpose" in result.stdout
    assert "all-reduce gave 3" in result.stdout and "attempt 0 rank 0: all-reduce" not in result.stdout


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)   # a zombie is dead
    except FileNotFoundError:
        return True


def test_workers_exit_when_the_router_process_is_killed():
    import subprocess
    import sys

    code = ("from lessons_lib.serving import Router, WorkerSpec\n"
            "r = Router([WorkerSpec('w0', model='random:0')])\n"
            "print(r.workers['w0'].proc.pid, flush=True)\n"
            "import time; time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(parent.stdout.readline())
        assert not _gone(worker_pid)
        parent.kill()          # SIGKILL: the router gets no chance to clean up
        parent.wait()
        deadline = time.monotonic() + 15
        while not _gone(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(worker_pid), "the worker outlived its router"
    finally:
        parent.kill()
        parent.stdout.close()
