"""Warm rank pools are stopped after sitting unused ($LESSONS_LIB_POOL_IDLE_S), so an idle kernel
does not hold its ranks forever; a call after that starts fresh ranks."""

import os
import time

import pytest
import torch.distributed as dist

from lessons_lib import run_distributed
from lessons_lib.launch import run as launch_run
from lessons_lib.launch import shutdown

pytestmark = pytest.mark.lesson00


def rank_pid():
    return dist.get_rank(), os.getpid()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_an_idle_pool_is_stopped_and_the_next_call_starts_afresh(monkeypatch):
    shutdown()
    monkeypatch.setenv("LESSONS_LIB_POOL_IDLE_S", "1")
    first = run_distributed(rank_pid, 2)
    assert run_distributed(rank_pid, 2) == first          # warm: the same processes
    deadline = time.monotonic() + 30
    while any(_alive(pid) for _, pid in first) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for _, pid in first), "the idle ranks were not stopped"
    assert not launch_run._pools
    again = run_distributed(rank_pid, 2)
    assert {pid for _, pid in again}.isdisjoint(pid for _, pid in first)
    shutdown()


def test_a_pool_in_use_is_kept(monkeypatch):
    shutdown()
    monkeypatch.setenv("LESSONS_LIB_POOL_IDLE_S", "3")
    first = run_distributed(rank_pid, 2)
    for _ in range(4):     # calls 1 s apart: never idle for 3 s
        time.sleep(1)
        assert run_distributed(rank_pid, 2) == first
    shutdown()


def test_zero_keeps_pools_and_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("LESSONS_LIB_POOL_IDLE_S", "0")
    assert launch_run.idle_timeout() == 0
    monkeypatch.delenv("LESSONS_LIB_POOL_IDLE_S")
    assert launch_run.idle_timeout() == launch_run.DEFAULT_IDLE_S == 600
    monkeypatch.setenv("LESSONS_LIB_POOL_IDLE_S", "ten minutes")
    with pytest.raises(ValueError, match="LESSONS_LIB_POOL_IDLE_S='ten minutes' is not valid"):
        run_distributed(rank_pid, 2)
