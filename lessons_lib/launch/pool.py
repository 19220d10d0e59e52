"""Parent side of a warm pool of ranks: start, call, collect output, stop.

A pool is ``world_size`` Python processes joined in one process group. It is
started on first use and kept, so the next call with the same world size costs
a message round-trip. Any failure (an exception, a dead rank, a timeout, an
interrupt) stops the whole pool: a process group in which one rank failed
mid-collective cannot be trusted again, and a fresh pool is cheap by comparison.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait

from .errors import DistributedError

STARTUP_TIMEOUT_S = 180.0   # import torch + join the group, on a busy 2-core laptop
GROUP_TIMEOUT_S = 600.0     # torch's own collective timeout; the caller's `timeout` acts first


class WorkerPool:
    def __init__(self, world_size: int, backend: str, threads: int):
        import torch.distributed as dist

        self.world_size, self.backend, self.threads = world_size, backend, threads
        # Port 0: the OS picks a free port, so concurrent notebooks never clash.
        self._store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                                    wait_for_workers=False)
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        try:
            self._start()
        except BaseException:
            self.close(kill=True)
            raise

    # -- lifecycle -----------------------------------------------------------------
    def _start(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        for rank in range(self.world_size):
            parent_end, child_end = socket.socketpair()
            cmd = [sys.executable, "-m", "lessons_lib.launch._worker", str(child_end.fileno()),
                   str(rank), str(self.world_size), "127.0.0.1", str(self._store.port),
                   self.backend, str(self.threads), str(GROUP_TIMEOUT_S)]
            proc = subprocess.Popen(cmd, pass_fds=(child_end.fileno(),), env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            child_end.close()
            self._procs.append(proc)
            self._conns.append(Connection(parent_end.detach()))
        info = {"sys_path": [p if p else os.getcwd() for p in sys.path], "cwd": os.getcwd()}
        for conn in self._conns:
            conn.send(("init", info))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = set(range(self.world_size))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DistributedError(
                    f"ranks {sorted(pending)} did not join the process group within "
                    f"{STARTUP_TIMEOUT_S:.0f} s", rank=min(pending), kind="startup")
            for conn in wait([self._conns[r] for r in pending], timeout=remaining):
                rank = self._conns.index(conn)
                message = self._recv(rank)
                if message[0] != "ready":
                    raise DistributedError(
                        f"rank {rank} could not join the process group "
                        f"(backend={self.backend!r})", rank=rank, kind="startup",
                        remote_type=message[1], remote_traceback=message[2])
                pending.discard(rank)

    def alive(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def close(self, kill: bool = False) -> None:
        """Stop every rank and reap it; ``kill`` skips the polite goodbye."""
        if not kill:
            for conn in self._conns:
                try:
                    conn.send(("exit",))
                except OSError:
                    pass
            deadline = time.monotonic() + 5.0
            for proc in self._procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
            proc.wait()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        self._store = None

    # -- one call ------------------------------------------------------------------
    def _recv(self, rank: int) -> tuple:
        try:
            return self._conns[rank].recv()
        except (EOFError, OSError):
            code = self._procs[rank].wait()
            how = (f"killed by {signal.Signals(-code).name}" if code < 0
                   else f"exited with status {code}")
            return ("died", how)

    def call(self, payload: bytes, timeout: float, outputs: list[dict]) -> list[bytes]:
        """Run one pickled call on every rank; fill ``outputs[rank]`` with its text.

        Returns each rank's pickled result. Raises :class:`DistributedError` on the
        first failure, after which the pool is unusable and must be closed.
        """
        for conn in self._conns:
            conn.send(("call", payload))
        results: dict[int, bytes] = {}
        self.group_alive = True
        deadline = time.monotonic() + timeout
        while len(results) < self.world_size:
            pending = [r for r in range(self.world_size) if r not in results]
            remaining = deadline - time.monotonic()
            ready = wait([self._conns[r] for r in pending], timeout=max(0.0, remaining))
            if not ready:
                raise DistributedError(
                    f"ranks {pending} did not finish within timeout={timeout:g} s "
                    f"(a rank stuck in a collective that another rank never joined, or "
                    f"slow work: raise `timeout`); all ranks were stopped",
                    rank=pending[0], kind="timeout", failed_ranks=tuple(pending))
            for conn in ready:
                rank = self._conns.index(conn)
                message = self._recv(rank)
                tag = message[0]
                if tag == "out":
                    outputs[rank][message[1]].append(message[2])
                elif tag == "ok":
                    results[rank] = message[1]
                    self.group_alive &= message[2]
                elif tag == "err":
                    raise DistributedError(
                        f"rank {rank} raised {message[1]}; the other ranks were stopped",
                        rank=rank, kind="exception", remote_type=message[1],
                        remote_traceback=message[2])
                elif tag == "unpicklable":
                    raise DistributedError(
                        f"rank {rank} returned a value that cannot be sent back to the "
                        f"caller ({message[1]}); make `fn` return tensors, numbers, "
                        f"strings or containers of them", rank=rank, kind="unpicklable")
                elif tag == "died":
                    raise DistributedError(
                        f"rank {rank} {message[1]} before finishing; the other ranks "
                        f"were stopped", rank=rank, kind="killed")
        return [results[r] for r in range(self.world_size)]
