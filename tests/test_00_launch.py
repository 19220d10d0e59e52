"""run_distributed: results, output, failures, cleanup, bad inputs, torchrun."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from lessons_lib import DistributedError, run_distributed
from lessons_lib.hello import allreduce_rank_ids
from lessons_lib.launch import init_from_env, shutdown

pytestmark = pytest.mark.lesson00


def live_children() -> list[int]:
    """PIDs of this process's children that are still running (zombies excluded)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(int(entry))
    return found


def rank_and_pid():
    return dist.get_rank(), dist.get_world_size(), os.getpid()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_results_come_back_in_rank_order(world_size):
    results = run_distributed(rank_and_pid, world_size)
    assert [r[:2] for r in results] == [(rank, world_size) for rank in range(world_size)]
    assert len({r[2] for r in results}) == world_size  # one process per rank


def test_a_function_defined_here_runs_by_value_with_args_and_kwargs():
    offset = 10

    def shifted_sum(scale, *, bias):
        t = torch.tensor([float(dist.get_rank() * scale + bias + offset)])
        dist.all_reduce(t)
        return t.item()

    # ranks 0..3: sum(r*2 + 1 + 10) = 2*6 + 4*11 = 56
    assert run_distributed(shifted_sum, 4, 2, bias=1) == [56.0] * 4


def test_output_is_prefixed_and_in_rank_order(capsys):
    def chatty():
        rank = dist.get_rank()
        time.sleep(0.05 * (3 - rank))  # later ranks finish first
        print(f"hello from {rank}")
        print(f"warning {rank}", file=sys.stderr)

    run_distributed(chatty, 3)
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"[rank{r}] hello from {r}" for r in range(3)]
    assert err.splitlines() == [f"[rank{r}] warning {r}" for r in range(3)]


def test_native_stderr_is_captured_and_prefixed(capfd):
    def writes_below_python():
        # What C++ code (gloo, NCCL) writes goes to file descriptor 2, past sys.stderr.
        os.write(2, f"native note from {dist.get_rank()}\n".encode())
        return dist.get_rank()

    shutdown()   # ranks started under this test's capture, so a leak would show in it
    assert run_distributed(writes_below_python, 2) == [0, 1]
    out, err = capfd.readouterr()
    assert err.splitlines() == [f"[rank{r}] native note from {r}" for r in range(2)]


def test_a_dying_ranks_native_stderr_is_in_the_error_not_above_it(capfd):
    def last_words_then_death():
        if dist.get_rank() == 1:
            os.write(2, b"terminate called after throwing an instance of 'Example'\n")
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()

    shutdown()
    with pytest.raises(DistributedError) as info:
        run_distributed(last_words_then_death, 2, timeout=60)
    err = info.value
    assert (err.rank, err.kind) == (1, "killed")
    assert "instance of 'Example'" in err.native_stderr[1]
    assert "what rank 1 wrote to its native stderr" in str(err)
    assert "Example" not in err.summary
    assert "Example" not in capfd.readouterr().err   # nothing printed above the caught error


def test_warm_pool_is_reused():
    first = run_distributed(rank_and_pid, 2)
    second = run_distributed(rank_and_pid, 2)
    assert [r[2] for r in first] == [r[2] for r in second]  # the same processes: no start-up


def test_allreduce_of_rank_ids_matches_formula():
    assert run_distributed(allreduce_rank_ids, 4) == [6, 6, 6, 6]


def test_a_raising_rank_is_named_and_everything_is_stopped():
    def fails_on_rank_two():
        if dist.get_rank() == 2:
            raise ValueError("rank two is broken")
        t = torch.ones(1)
        dist.all_reduce(t)  # the healthy ranks wait here for rank 2
        return t.item()

    before = run_distributed(rank_and_pid, 4)
    with pytest.raises(DistributedError) as info:
        run_distributed(fails_on_rank_two, 4, timeout=60)
    err = info.value
    assert (err.rank, err.kind, err.remote_type) == (2, "exception", "ValueError")
    assert "rank two is broken" in err.remote_traceback
    assert "fails_on_rank_two" in err.remote_traceback
    assert not live_children() or set(live_children()).isdisjoint(p for *_, p in before)
    after = run_distributed(rank_and_pid, 4)  # a fresh pool starts
    assert {p for *_, p in after}.isdisjoint(p for *_, p in before)


def test_a_killed_rank_is_reported_quickly():
    def rank_one_dies():
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()

    run_distributed(rank_and_pid, 3)  # warm: start-up is not part of the call's timeout
    start = time.perf_counter()
    with pytest.raises(DistributedError) as info:
        run_distributed(rank_one_dies, 3, timeout=60)
    assert time.perf_counter() - start < 60  # reported on death, not after the timeout
    assert (info.value.rank, info.value.kind) == (1, "killed")
    assert "SIGKILL" in str(info.value)
    shutdown()
    assert live_children() == []


def test_a_hang_in_a_collective_times_out():
    def rank_zero_waits_alone():
        if dist.get_rank() == 0:
            dist.all_reduce(torch.ones(1))  # rank 1 never joins
        return "done"

    run_distributed(rank_and_pid, 2)  # warm: start-up is not part of the call's timeout
    start = time.perf_counter()
    with pytest.raises(DistributedError) as info:
        run_distributed(rank_zero_waits_alone, 2, timeout=2)
    elapsed = time.perf_counter() - start
    assert 2 <= elapsed < 30  # generous: this machine may be busy
    assert (info.value.rank, info.value.kind, info.value.failed_ranks) == (0, "timeout", (0,))
    assert info.value.missing_ranks == (1,)   # rank 1 returned without joining the all_reduce
    assert "timeout=2" in str(info.value)
    shutdown()
    assert live_children() == []


def test_keyboard_interrupt_stops_all_ranks():
    def sleeps():
        time.sleep(60)

    run_distributed(rank_and_pid, 2)  # warm, so the interrupt lands while waiting on the call
    # A process started in the background by a shell without job control ignores SIGINT from the
    # start, and Python then installs no handler: give this test Python's own, as in a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    start = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_distributed(sleeps, 2, timeout=120)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - start < 50  # well before the 60 s sleep ends
    assert live_children() == []


def test_an_unpicklable_return_value_is_a_clear_error():
    def returns_a_lock():
        return threading.Lock()

    with pytest.raises(DistributedError, match="cannot be sent back") as info:
        run_distributed(returns_a_lock, 2)
    assert info.value.kind == "unpicklable"


def test_no_temporary_files_are_left(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    shutdown()

    def fails():
        raise RuntimeError("boom")

    run_distributed(rank_and_pid, 2)
    with pytest.raises(DistributedError):
        run_distributed(fails, 2)
    shutdown()
    assert list(tmp_path.iterdir()) == []


def test_unpicklable_arguments_are_a_clear_error():
    with pytest.raises(TypeError, match="must be picklable"):
        run_distributed(rank_and_pid, 2, threading.Lock())


def test_init_from_env_outside_torchrun_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --standalone"):
        init_from_env()


def test_the_same_worker_code_runs_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "lessons_lib.hello"]
    # torchrun keeps a torchelastic_* log folder in the temporary directory: keep it in ours.
    env = dict(os.environ, TMPDIR=str(tmp_path))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in range(2):
        assert f"rank {rank} of 2: sum of rank ids = 1" in done.stdout
