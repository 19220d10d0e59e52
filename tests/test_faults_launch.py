"""The launcher under faults and bad input: hang reports, leftovers, warm-rank state, shipping, torchrun."""

import inspect
import math
import os
import subprocess
import sys
import time
import types

import cloudpickle
import pytest
import torch
import torch.distributed as dist

from lessons_lib import DistributedError, run_distributed
from lessons_lib.exercises import HISTORY, check, exercise
from lessons_lib.launch import hang, init_from_env, pool, shutdown
from lessons_lib.validate import BadArgument

pytestmark = pytest.mark.lesson00
HERE = os.path.abspath(__file__)


def live_children() -> list[int]:
    """PIDs of this process's children that are still running (zombies excluded)."""
    return [pid for pid in _pids() if _parent(pid) == os.getpid() and _running(pid)]


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def line_of(fn, text: str) -> int:
    """The line number of the first line of ``fn`` containing ``text``."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def rank_and_pid():
    return dist.get_rank(), os.getpid()


# -- 1. a hang says where every rank is -------------------------------------------------
def both_receive_first():
    peer = 1 - dist.get_rank()
    t = torch.zeros(4)
    dist.recv(t, peer)   # each rank waits for a send its peer never reaches
    dist.send(t, peer)


def one_rank_sleeps():
    # Rank 1 never reaches the all_reduce.
    if dist.get_rank() == 1:
        time.sleep(60)
    dist.all_reduce(torch.ones(1))


@pytest.mark.timeout(120)
def test_a_send_recv_deadlock_names_the_call_and_line_of_each_rank():
    shutdown()   # so that no rank of another test's pool counts as left over
    run_distributed(rank_and_pid, 2)   # warm: the timeout covers the call only
    start = time.perf_counter()
    with pytest.raises(DistributedError) as info:
        run_distributed(both_receive_first, 2, timeout=3)
    assert time.perf_counter() - start < 3 + 30   # the stacks come back promptly
    err, line = info.value, line_of(both_receive_first, "dist.recv(")
    assert (err.kind, err.failed_ranks, err.missing_ranks) == ("timeout", (0, 1), ())
    for rank in (0, 1):
        assert f"rank {rank} waits in recv at {HERE}:{line} (in both_receive_first)" in err.summary
        assert "dist.recv(t, peer)" in err.stacks[rank]
        assert err.stacks[rank].index("both_receive_first") < err.stacks[rank].index("in recv")
    assert "a deadlock" in err.summary
    assert live_children() == []


@pytest.mark.timeout(120)
def test_the_rank_that_never_reached_the_collective_is_named():
    run_distributed(rank_and_pid, 2)
    with pytest.raises(DistributedError) as info:
        run_distributed(one_rank_sleeps, 2, timeout=3)
    err = info.value
    assert err.missing_ranks == (1,)
    reduce_line, sleep_line = line_of(one_rank_sleeps, "dist.all_reduce("), line_of(one_rank_sleeps, "time.sleep(")
    assert f"rank 0 waits in all_reduce at {HERE}:{reduce_line} (in one_rank_sleeps)" in err.summary
    assert (f"rank 1 is in no torch.distributed call, it runs {HERE}:{sleep_line} "
            f"(in one_rank_sleeps): `time.sleep(60)`") in err.summary
    assert "Rank(s) 1 never reached all_reduce" in err.summary
    assert "time.sleep(60)" in str(err)   # the stacks are part of the message a learner sees


def _dump(*frames: tuple[str, int, str]) -> str:
    """A faulthandler dump of a worker's main thread, innermost frame first."""
    worker = os.path.join(os.path.dirname(hang.__file__), "_worker.py")
    lines = ["Current thread 0x00007f0000000001 (most recent call first):"]
    lines += [f'  File "{f}", line {n} in {fn}' for f, n, fn in frames]
    lines += [f'  File "{worker}", line 90 in _run_call', '  File "<frozen runpy>", line 198 in _run_module_as_main']
    return "\n".join(lines)


def test_ranks_in_different_collectives_are_told_apart():
    c10d = os.path.join(os.path.dirname(torch.__file__), "distributed", "distributed_c10d.py")
    logger = os.path.join(os.path.dirname(torch.__file__), "distributed", "c10d_logger.py")
    dumps = {0: _dump((c10d, 10, "all_reduce"), (logger, 5, "wrapper"), ("/cell.py", 3, "fn")),
             1: _dump((c10d, 20, "barrier"), (logger, 5, "wrapper"), ("/cell.py", 7, "fn")),
             2: "garbage"}
    where = {r: hang.parse_dump(text) for r, text in dumps.items()}
    assert where[2] is None
    story, missing = hang.diagnose([0, 1], [], where)
    assert "rank 0 waits in all_reduce at /cell.py:3 (in fn)" in story
    assert "rank 1 waits in barrier at /cell.py:7 (in fn)" in story
    assert "different calls (all_reduce, barrier)" in story and missing == ()
    story, missing = hang.diagnose([0, 2], [1], where)
    assert missing == (1, 2) and "rank 2: position unknown" in story


def test_a_rank_in_the_wait_of_an_async_handle_counts_as_in_torch_distributed(tmp_path):
    cell = tmp_path / "cell.py"
    cell.write_text("def fn(work):\n    work.wait()\n    time.sleep(1)\n")
    where = {0: hang.parse_dump(_dump((str(cell), 2, "fn"))),
             1: hang.parse_dump(_dump((str(cell), 3, "fn")))}
    story, missing = hang.diagnose([0, 1], [], where)
    assert f"rank 0 waits in wait at {cell}:2 (in fn)" in story
    assert f"rank 1 is in no torch.distributed call, it runs {cell}:3 (in fn)" in story
    assert missing == (1,)


# -- 2. timeout: bounded, and bounding start-up -----------------------------------------
@pytest.mark.timeout(60)
def test_timeout_bounds_a_cold_start(monkeypatch):
    shutdown()
    monkeypatch.setattr(pool, "MIN_STARTUP_S", 0.0)
    with pytest.raises(DistributedError, match=r"did not join the process group within 0\.05 s") as info:
        run_distributed(rank_and_pid, 2, timeout=0.05)   # importing torch alone takes longer
    assert info.value.kind == "startup"
    assert live_children() == []


def test_the_largest_timeout_is_accepted():
    assert [r for r, _ in run_distributed(rank_and_pid, 2, timeout=pool.MAX_TIMEOUT_S)] == [0, 1]


# -- 3. what a rank starts ends with it ---------------------------------------------------
def start_a_sleeper(scratch: str, then_fail: bool):
    child = subprocess.Popen(["sleep", "300"])
    with open(os.path.join(scratch, f"pid-{dist.get_rank()}"), "w") as f:
        f.write(str(child.pid))
    dist.barrier()   # both processes are started before rank 1 fails
    if then_fail and dist.get_rank() == 1:
        raise RuntimeError("fails after starting a process")
    return child.pid


def _wait_gone(pids, seconds=10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.mark.timeout(120)
@pytest.mark.parametrize("then_fail", [False, True], ids=["pool-closed", "rank-failed"])
def test_no_process_started_by_a_rank_outlives_it(tmp_path, then_fail):
    shutdown()   # so that no rank of another test's pool counts as left over
    try:
        if then_fail:
            with pytest.raises(DistributedError):
                run_distributed(start_a_sleeper, 2, str(tmp_path), True)
        else:
            pids = run_distributed(start_a_sleeper, 2, str(tmp_path), False)
            assert all(_running(p) for p in pids)   # they run while the ranks are warm
            shutdown()
        sleepers = [int(f.read_text()) for f in sorted(tmp_path.glob("pid-*"))]
        assert len(sleepers) == 2 and _wait_gone(sleepers) == []
        assert live_children() == []
    finally:
        for f in tmp_path.glob("pid-*"):   # leave nothing behind even when the test fails
            pid = int(f.read_text())
            if _is_our_sleeper(pid):
                os.kill(pid, 9)


def _is_our_sleeper(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read() == b"sleep\x00300\x00" and _running(pid)
    except OSError:
        return False


# -- 4. warm ranks start every call afresh ------------------------------------------------
PROBE = "LESSONS_LAUNCH_PROBE"


def change_process_state(scratch):
    os.chdir(scratch)
    torch.set_default_dtype(torch.float64)
    os.environ[PROBE] = "left by the previous call"
    del os.environ["WORLD_SIZE"]
    sys.path.append("/left/by/the/previous/call")
    torch.set_grad_enabled(False)
    torch.set_num_threads(torch.get_num_threads() + 1)
    return os.getpid(), torch.get_num_threads()


def observe_process_state(module_name):
    return {"pid": os.getpid(), "cwd": os.getcwd(), "dtype": torch.get_default_dtype(),
            "probe": os.environ.get(PROBE), "world_size": os.environ.get("WORLD_SIZE"),
            "sys_path": list(sys.path), "grad": torch.is_grad_enabled(),
            "threads": torch.get_num_threads(),
            "imported": __import__(module_name).ANSWER}


@pytest.mark.timeout(120)
def test_a_call_sees_the_callers_directory_and_path_and_none_of_the_last_calls_changes(
        tmp_path, monkeypatch):
    shutdown()
    threads = run_distributed(torch.get_num_threads, 2)
    changed = run_distributed(change_process_state, 2, str(tmp_path))
    assert [t for _, t in changed] == [t + 1 for t in threads]

    here = tmp_path / "caller_dir"
    here.mkdir()
    (tmp_path / "probe_mod_for_launch.py").write_text("ANSWER = 42\n")
    monkeypatch.chdir(here)
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = run_distributed(observe_process_state, 2, "probe_mod_for_launch")
    for (pid, _), state, n in zip(changed, seen, threads):
        assert state["pid"] == pid   # the same warm process
        assert state["cwd"] == str(here)
        assert state["sys_path"] == pool.caller_sys_path()
        assert state["imported"] == 42
        assert state["dtype"] == torch.float32
        assert (state["probe"], state["world_size"]) == (None, "2")
        assert state["grad"] is True and state["threads"] == n
    shutdown()


# -- 5. a notebook function reading `.config` next to `dist` ships ------------------------
CELL = '''
import torch
import torch.distributed as dist

def read_config(model):
    size = model.config["hidden"]
    return dist.get_rank(), size, torch.get_default_dtype() is torch.float32
'''


def test_a_notebook_function_touching_config_and_dist_ships():
    cell = {"__name__": "__main__"}   # what a notebook cell's globals look like
    exec(compile(CELL, "<cell>", "exec"), cell)
    read_config = cell["read_config"]
    with pytest.raises(TypeError, match="ConfigModuleInstance"):
        cloudpickle.dumps(read_config)   # the failure this reproduces
    model = types.SimpleNamespace(config={"hidden": 64})
    assert run_distributed(read_config, 2, model) == [(0, 64, True), (1, 64, True)]


# -- 6. check() survives sys.exit() in an answer ------------------------------------------
@exercise("test.launch_faults.calls", "call the candidate")
def _check_calls(candidate):
    candidate()
    return "returned"


def _raise(exc):
    def answer():
        raise exc
    return answer


@pytest.mark.parametrize("answer, name", [
    (sys.exit, "SystemExit"),
    (_raise(SystemExit(3)), "SystemExit: 3"),
    (_raise(GeneratorExit()), "GeneratorExit"),
])
def test_check_reports_a_base_exception_as_a_verdict(answer, name, capsys):
    check("test.launch_faults.calls", answer)
    result = HISTORY[-1]
    assert result.status == "incorrect" and f"your code raised {name}" in result.message
    assert "return a value or raise an exception instead" in result.message
    assert "incorrect" in capsys.readouterr().out


def test_ctrl_c_during_check_still_interrupts():
    before = len(HISTORY)
    with pytest.raises(KeyboardInterrupt):
        check("test.launch_faults.calls", _raise(KeyboardInterrupt()))
    assert len(HISTORY) == before


# -- 7. torchrun's variables, checked one by one ------------------------------------------
GOOD_ENV = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name, value, words", [
    ("RANK", "5", r"RANK=5 is not valid: expected an int in \[0, 3\] \(WORLD_SIZE=4\)"),
    ("RANK", "-1", r"RANK=-1 is not valid: expected an int in \[0, 3\]"),
    ("RANK", "one", r"RANK='one' is not valid: expected an int in \[0, 3\] \(not a whole number"),
    ("WORLD_SIZE", "0", r"WORLD_SIZE=0 is not valid: expected an int >= 1"),
    ("WORLD_SIZE", "4.0", r"WORLD_SIZE='4.0' is not valid: expected an int >= 1"),
    ("LOCAL_RANK", "2", r"LOCAL_RANK=2 is not valid: expected an int in \[0, 1\] \(LOCAL_WORLD_SIZE=2\)"),
    ("LOCAL_WORLD_SIZE", "8", r"LOCAL_WORLD_SIZE=8 is not valid: expected an int in \[1, 4\]"),
    ("MASTER_PORT", "0", r"MASTER_PORT=0 is not valid: expected an int in \[1, 65535\]"),
    ("MASTER_PORT", "70000", r"MASTER_PORT=70000 is not valid"),
    ("MASTER_PORT", "http", r"MASTER_PORT='http' is not valid"),
    ("MASTER_ADDR", "", r"MASTER_ADDR='' is not valid: expected a host name or IP address"),
])
def test_a_bad_torchrun_variable_is_named_with_its_valid_range(monkeypatch, name, value, words):
    for key, good in GOOD_ENV.items():
        monkeypatch.setenv(key, good)
    monkeypatch.setenv(name, value)
    with pytest.raises(BadArgument, match=words):
        init_from_env(timeout=5)
    assert not dist.is_initialized()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("timeout", [math.nan, math.inf, 0, True])
def test_init_from_env_refuses_a_bad_timeout(monkeypatch, timeout):
    for key, good in GOOD_ENV.items():
        monkeypatch.setenv(key, good)
    with pytest.raises(BadArgument, match=r"^timeout="):
        init_from_env(timeout=timeout)


# -- bad input to run_distributed ---------------------------------------------------------
@pytest.mark.timeout(10)
@pytest.mark.parametrize("kwargs, words", [
    ({"world_size": True}, r"^world_size=True is not valid: expected an int >= 1 \(a bool is not a count\)"),
    ({"world_size": 0}, r"^world_size=0 is not valid: expected an int >= 1"),
    ({"world_size": -3}, r"^world_size=-3 is not valid"),
    ({"world_size": 2.0}, r"^world_size=2\.0 is not valid: expected an int >= 1 \(got a float\)"),
    ({"world_size": "2"}, r"^world_size='2' is not valid"),
    ({"world_size": None}, r"^world_size=None is not valid"),
    ({"world_size": 10_000}, r"^world_size=10000 is not valid: expected an int in \[1, \d+\] \(each rank is a process"),
    ({"timeout": math.nan}, r"^timeout=nan is not valid: expected a finite number in \(0, 86400\]"),
    ({"timeout": math.inf}, r"^timeout=inf is not valid"),
    ({"timeout": -math.inf}, r"^timeout=-inf is not valid"),
    ({"timeout": 1e12}, r"^timeout=1000000000000\.0 is not valid: expected a finite number in \(0, 86400\]"),
    ({"timeout": 86_401}, r"^timeout=86401(\.0)? is not valid"),
    ({"timeout": -1}, r"^timeout=-1(\.0)? is not valid"),
    ({"timeout": 0}, r"^timeout=0(\.0)? is not valid"),
    ({"timeout": True}, r"^timeout=True is not valid"),
    ({"timeout": "5"}, r"^timeout='5' is not valid"),
    ({"timeout": None}, r"^timeout=None is not valid"),
    ({"backend": "mpi"}, r"^backend='mpi' is not valid: expected one of 'gloo', 'nccl', None"),
    ({"backend": "GLOO"}, r"^backend='GLOO' is not valid"),
    ({"backend": 1}, r"^backend=1 is not valid"),
    ({"fn": "not a function"}, r"^fn='not a function' is not valid: expected a callable"),
    ({"fn": None}, r"^fn=None is not valid: expected a callable"),
])
def test_bad_input_to_run_distributed_is_refused_before_any_rank_starts(kwargs, words):
    args = {"fn": rank_and_pid, "world_size": 2} | kwargs
    fn, world_size = args.pop("fn"), args.pop("world_size")
    with pytest.raises(BadArgument, match=words):
        run_distributed(fn, world_size, **args)


@pytest.mark.timeout(10)
@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="nccl is valid with 2 GPUs")
def test_nccl_without_a_gpu_per_rank_is_refused():
    with pytest.raises(BadArgument, match=r"^backend='nccl' is not valid: expected 'gloo' or None \(nccl needs 2"):
        run_distributed(rank_and_pid, 2, backend="nccl")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reaped", [False, True], ids=["dying", "gone before its first message"])
def test_a_rank_that_dies_while_starting_is_replaced_once(monkeypatch, reaped):
    shutdown()
    original, spawned = pool.WorkerPool._spawn, []

    def spawn_and_kill_the_first(self, rank, env):
        original(self, rank, env)
        spawned.append(rank)
        if len(spawned) == 2:     # the first pool's rank 1 dies before it can join
            self._procs[-1].kill()
            if reaped:            # its end of the socket is closed before the parent writes
                self._procs[-1].wait()

    monkeypatch.setattr(pool.WorkerPool, "_spawn", spawn_and_kill_the_first)
    assert [r for r, _ in run_distributed(rank_and_pid, 2)] == [0, 1]
    assert spawned == [0, 1, 0, 1]     # one more start, no more
    shutdown()
    assert live_children() == []
