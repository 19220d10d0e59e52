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
``("call", payload_bytes)``, ``("exit",)``.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection


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
            os._exit(1)
        time.sleep(0.5)


def _to_cpu(value):
    import torch
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, lambda t: t.detach().cpu(), value)


def _run_call(conn: Connection, payload: bytes, lock: threading.Lock) -> None:
    import cloudpickle
    import torch.distributed as dist

    real_out, real_err = sys.stdout, sys.stderr
    sys.stdout = _RankStream(conn, "stdout", lock)
    sys.stderr = _RankStream(conn, "stderr", lock)
    try:
        fn, args, kwargs = cloudpickle.loads(payload)
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
        # Drop this module's own frame: the learner's code starts one level down.
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
        with lock:
            conn.send(("err", type(exc).__name__, text))
        return
    finally:
        sys.stdout, sys.stderr = real_out, real_err
    try:
        data = cloudpickle.dumps(_to_cpu(result))
    except Exception as exc:  # noqa: BLE001
        with lock:
            conn.send(("unpicklable", f"{type(exc).__name__}: {exc}"))
        return
    with lock:
        conn.send(("ok", data, dist.is_initialized()))


def main(argv: list[str]) -> None:
    fd, rank, world_size, host, port, backend, threads, group_timeout = argv
    rank, world_size, threads = int(rank), int(world_size), int(threads)
    conn = Connection(int(fd))
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
        _run_call(conn, message[1], lock)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
