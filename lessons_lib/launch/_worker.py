"""One rank of a warm worker pool (the parent side is :mod:`lessons_lib.launch.pool`).

The parent starts this module as a fresh Python process (never ``fork``: a fork
of a process in which torch has already computed can deadlock) and talks to it
over one end of a socket pair. The worker imports torch once, joins the process
group once, then runs every function it is sent, so repeated calls from a
notebook cost a message round-trip instead of a process start and an
``import torch``.

Messages, worker to parent: ``("ready",)``, ``("out", stream, text)``,
``("ok", result_bytes, group_alive)``, ``("err", type_name, traceback_text)``,
``("unpicklable", description)``. Parent to worker: ``("init", info)``,
``("call", payload_bytes, context)``, ``("exit",)``; ``context`` carries the
caller's current directory and ``sys.path``.

Besides the socket, the worker holds the write end of a pipe: on ``SIGUSR1``,
``faulthandler`` writes every thread's Python stack there. It runs in the signal
handler itself, so it answers even while the rank is blocked inside a C++
collective, which is when the parent asks (a call past its timeout).

A warm worker runs many calls, so what one call changes must not leak into the
next: each call starts in the caller's directory and ``sys.path``, and the
environment, torch's default dtype and device, grad mode and thread count are
put back after it. Imported modules and their globals persist (see the README).
"""

from __future__ import annotations

import faulthandler
import io
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from ._pickle import dumps, loads


class _RankStream(io.TextIOBase):
    """A text stream that forwards every write to the parent, tagged with its name."""

    def __init__(self, conn: Connection, name: str, lock: threading.Lock):
        self._conn, self._name, self._lock = conn, name, lock

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            with self._lock:
                self._conn.send(("out", self._name, text))
        return len(text)


def _exit_when_orphaned(parent_pid: int) -> None:
    """Leave no process behind when the parent (the notebook kernel) dies."""
    while True:
        if os.getppid() != parent_pid:
            try:   # the rank leads its own process group: this ends it and whatever fn started
                os.killpg(os.getpgid(0), signal.SIGKILL)
            finally:
                os._exit(1)
        time.sleep(0.5)


def _to_cpu(value):
    import torch
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, lambda t: t.detach().cpu(), value)


def _snapshot() -> dict:
    import torch

    return {"cwd": os.getcwd(), "sys_path": list(sys.path), "environ": dict(os.environ),
            "dtype": torch.get_default_dtype(), "device": torch.get_default_device(),
            "grad": torch.is_grad_enabled(), "threads": torch.get_num_threads()}


def _restore(saved: dict) -> None:
    """Undo what a call changed in the process-wide state listed in :func:`_snapshot`."""
    import torch

    try:
        os.chdir(saved["cwd"])
    except OSError:  # fn removed it; the next call moves to its caller's directory anyway
        pass
    sys.path[:] = saved["sys_path"]
    if os.environ != saved["environ"]:
        for name in set(os.environ) - set(saved["environ"]):
            del os.environ[name]
        for name, value in saved["environ"].items():
            if os.environ.get(name) != value:
                os.environ[name] = value
    torch.set_default_dtype(saved["dtype"])
    if torch.get_default_device() != saved["device"]:
        # None removes the device mode instead of stacking a "cpu" one on every op.
        torch.set_default_device(None if saved["device"].type == "cpu" else saved["device"])
    torch.set_grad_enabled(saved["grad"])
    if torch.get_num_threads() != saved["threads"]:
        torch.set_num_threads(saved["threads"])


def _run_call(conn: Connection, payload: bytes, context: dict, lock: threading.Lock) -> None:
    import torch.distributed as dist

    real_out, real_err = sys.stdout, sys.stderr
    saved = _snapshot()
    sys.stdout = _RankStream(conn, "stdout", lock)
    sys.stderr = _RankStream(conn, "stderr", lock)
    try:
        os.chdir(context["cwd"])
        sys.path[:] = context["sys_path"]
        fn, args, kwargs = loads(payload)
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
        # Drop this module's own frame: the learner's code starts one level down.
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
        with lock:
            conn.send(("err", type(exc).__name__, text))
        return
    finally:
        sys.stdout, sys.stderr = real_out, real_err
        _restore(saved)
    try:
        data = dumps(_to_cpu(result))
    except Exception as exc:  # noqa: BLE001
        with lock:
            conn.send(("unpicklable", f"{type(exc).__name__}: {exc}"))
        return
    with lock:
        conn.send(("ok", data, dist.is_initialized()))


def main(argv: list[str]) -> None:
    fd, dump_fd, rank, world_size, host, port, backend, threads, group_timeout = argv
    rank, world_size, threads = int(rank), int(world_size), int(threads)
    conn = Connection(int(fd))
    faulthandler.register(signal.SIGUSR1, file=int(dump_fd), all_threads=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops ranks itself
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()

    _, info = conn.recv()
    sys.path[:] = info["sys_path"]
    os.chdir(info["cwd"])
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))

    lock = threading.Lock()
    try:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        store = dist.TCPStore(host, int(port), world_size, is_master=False,
                              timeout=timedelta(seconds=float(group_timeout)))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=float(group_timeout)))
    except BaseException as exc:  # noqa: BLE001
        conn.send(("err", type(exc).__name__, traceback.format_exc()))
        return
    conn.send(("ready",))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message[0] == "exit":
            break
        _run_call(conn, message[1], message[2], lock)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
