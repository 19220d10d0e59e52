"""``run_distributed``: run one function on N ranks from a notebook cell."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections import OrderedDict

from ..validate import bad, check_choice, check_int, check_real
from ._pickle import dumps, loads
from .errors import DistributedError
from .pool import MAX_TIMEOUT_S, RankDiedWhileStarting, WorkerPool, caller_sys_path, startup_limit

MAX_POOLS = 3   # warm pools kept at once (e.g. the 2-, 3- and 4-rank ones)
# A warm pool unused this long is stopped, so a kernel left open does not hold its ranks forever.
IDLE_ENV = "LESSONS_LIB_POOL_IDLE_S"
DEFAULT_IDLE_S = 600.0
_pools: "OrderedDict[tuple, WorkerPool]" = OrderedDict()
_last_used: dict[tuple, float] = {}   # pool key -> time.monotonic() when its last call ended
_lock = threading.Lock()
_reaper: threading.Thread | None = None
_wake = threading.Event()   # set after each call, so the reaper re-reads the timeout at once


def idle_timeout() -> float:
    """Seconds a warm pool may sit unused before it is stopped: ``$LESSONS_LIB_POOL_IDLE_S``
    (default 600; ``0`` keeps pools until :func:`shutdown` or the interpreter exits)."""
    raw = os.environ.get(IDLE_ENV, "")
    if raw.strip() == "":
        return DEFAULT_IDLE_S
    try:
        value = float(raw)
    except ValueError:
        value = None
    if value is None or not value >= 0 or value == float("inf"):
        raise bad(IDLE_ENV, raw, "a number of seconds >= 0",
                  "how long warm ranks may sit unused; 0 keeps them until shutdown()")
    return value


def _reap_idle() -> None:
    """Background thread: stop pools idle for longer than :func:`idle_timeout`; ends with the pools."""
    global _reaper
    while True:
        limit = idle_timeout()
        _wake.wait(min(30.0, limit / 4) if limit > 0 else 30.0)
        _wake.clear()
        # A call in progress holds the lock: its pool is not idle, so just try again later.
        if not _lock.acquire(timeout=1.0):
            continue
        try:
            limit = idle_timeout()
            now = time.monotonic()
            for key in [k for k in _pools if limit > 0 and now - _last_used.get(k, now) > limit]:
                _pools.pop(key).close()
                _last_used.pop(key, None)
            if not _pools:
                _reaper = None
                return
        finally:
            _lock.release()


def _watch_idle_pools() -> None:
    """Start the reaper thread if pools exist and none is running (called with ``_lock`` held)."""
    global _reaper
    if _pools and (_reaper is None or not _reaper.is_alive()):
        _reaper = threading.Thread(target=_reap_idle, name="lessons_lib-idle-pools", daemon=True)
        _reaper.start()
    _wake.set()


def max_world_size() -> int:
    """Most ranks this machine hosts: four processes per core, at least eight."""
    return max(8, 4 * (os.cpu_count() or 1))


def choose_backend(world_size: int) -> str:
    """NCCL when every rank can have its own CUDA GPU, gloo otherwise."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def _validate(fn, world_size, timeout, backend) -> tuple[int, float, str]:
    if not callable(fn):
        raise bad("fn", fn, "a callable: the function every rank runs")
    world_size = check_int("world_size", world_size, low=1)
    most = max_world_size()
    if world_size > most:
        raise bad("world_size", world_size, f"an int in [1, {most}]",
                  "each rank is a process on this machine: more would not fit")
    timeout = check_real("timeout", timeout, low=0, low_open=True, high=MAX_TIMEOUT_S,
                         why="seconds the call may take before its ranks are stopped")
    backend = check_choice("backend", backend, ("gloo", "nccl", None),
                           why="None picks nccl when every rank has a CUDA GPU, gloo otherwise")
    if backend is None:
        backend = choose_backend(world_size)
    elif backend == "nccl" and choose_backend(world_size) != "nccl":
        raise bad("backend", backend, "'gloo' or None",
                  f"nccl needs {world_size} CUDA GPUs, one per rank")
    return world_size, timeout, backend


def _pool_for(world_size: int, backend: str, timeout: float) -> WorkerPool:
    threads = max(1, (os.cpu_count() or 1) // world_size)
    key = (world_size, backend, threads)
    pool = _pools.pop(key, None)
    if pool is not None and not pool.alive():
        pool.close(kill=True)
        pool = None
    while len(_pools) >= MAX_POOLS:
        oldest_key, oldest = _pools.popitem(last=False)
        _last_used.pop(oldest_key, None)
        oldest.close()
    if pool is None:
        try:
            pool = WorkerPool(world_size, backend, threads, startup_limit(timeout))
        except RankDiedWhileStarting:
            # A rank that ends with no error of its own while starting is a failure of the
            # machine (a process killed, a port taken), not of the caller's code: start once more.
            pool = WorkerPool(world_size, backend, threads, startup_limit(timeout))
    _pools[key] = pool
    return pool


def _print_rank_output(outputs: list[dict]) -> None:
    """Each rank's text, prefixed by its rank, in rank order: the same every run."""
    for stream_name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        for rank, streams in enumerate(outputs):
            text = "".join(streams[stream_name])
            for line in text.splitlines():
                stream.write(f"[rank{rank}] {line}\n")
        stream.flush()


def run_distributed(fn, world_size, *args, timeout=120.0, backend=None, **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks and return their results in rank order.

    Inside ``fn``, ``torch.distributed`` is initialised (gloo on CPU; NCCL when there
    is one CUDA GPU per rank, each rank on ``cuda:<rank>``), so ``dist.get_rank()``
    and the collectives work. ``fn`` may be defined in a notebook cell: it is
    serialised by value. Each rank's printed output is shown afterwards, prefixed
    ``[rankN]``, rank by rank.

    Ranks are kept warm between calls with the same ``world_size`` (a pool unused for
    :func:`idle_timeout` seconds, 600 unless ``$LESSONS_LIB_POOL_IDLE_S`` says otherwise, is
    stopped; :func:`shutdown` stops every pool at once); each call
    starts in the caller's current directory and ``sys.path``, and what a call
    changes in the environment, torch's default dtype and device, grad mode and
    thread count is undone after it (imported modules and their globals persist).
    Any failure stops every rank, and what they started, and raises one
    :class:`DistributedError` naming the first failing rank, with its traceback.

    ``timeout`` (seconds, at most a day) bounds the call: a rank that hangs, for
    example in a collective another rank never joins, ends it, and the error says
    where each unfinished rank was and which ranks never reached the collective.
    Starting cold ranks is bounded by ``timeout`` too, but given at least a minute.
    ``KeyboardInterrupt`` (a kernel interrupt) stops every rank too.
    """
    world_size, timeout, backend = _validate(fn, world_size, timeout, backend)
    idle_timeout()   # a bad $LESSONS_LIB_POOL_IDLE_S is reported now, not in the background
    try:
        payload = dumps((fn, args, kwargs))
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"fn and its arguments must be picklable to reach the ranks: "
                        f"{type(exc).__name__}: {exc}") from None
    outputs = [{"stdout": [], "stderr": []} for _ in range(world_size)]
    with _lock:
        pool = _pool_for(world_size, backend, timeout)
        context = {"cwd": os.getcwd(), "sys_path": caller_sys_path()}
        try:
            raw = pool.call(payload, context, timeout, outputs)
        except BaseException:
            _pools.pop((pool.world_size, pool.backend, pool.threads), None)
            pool.close(kill=True)
            _print_rank_output(outputs)
            raise
        if not pool.group_alive:  # fn tore the group down: start afresh next time
            _pools.pop((pool.world_size, pool.backend, pool.threads), None)
            pool.close()
        else:
            _last_used[(pool.world_size, pool.backend, pool.threads)] = time.monotonic()
            _watch_idle_pools()
    _print_rank_output(outputs)
    results = []
    for rank, data in enumerate(raw):
        try:
            results.append(loads(data))
        except Exception as exc:  # noqa: BLE001
            raise DistributedError(f"rank {rank}'s return value cannot be rebuilt in the caller "
                                   f"({type(exc).__name__}: {exc})", rank=rank,
                                   kind="unpicklable") from None
    return results


def shutdown() -> None:
    """Stop every warm pool now (also done when the interpreter exits, and to each pool left
    unused for :func:`idle_timeout` seconds)."""
    with _lock:
        while _pools:
            _, pool = _pools.popitem()
            pool.close()
        _last_used.clear()


atexit.register(shutdown)
