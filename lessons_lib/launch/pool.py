"""Parent side of a warm pool of ranks: start, call, collect output, stop.

A pool is ``world_size`` Python processes joined in one process group. It is
started on first use and kept, so the next call with the same world size costs
a message round-trip. Any failure (an exception, a dead rank, a timeout, an
interrupt) stops the whole pool: a process group in which one rank failed
mid-collective cannot be trusted again, and a fresh pool is cheap by comparison.

Each rank leads its own process group, so stopping a rank also ends every process
it started (a ``subprocess.Popen`` in ``fn``), which would otherwise outlive it.

A rank's *native* standard error (file descriptor 2: what C++ code such as gloo or
NCCL writes, a C++ ``terminate`` message, a fatal-signal report) goes to a
temporary file per rank, never straight to the caller's terminal or notebook. After
a call that succeeds it is shown with the rank's other output; when a call fails it
travels in the :class:`DistributedError` (``native_stderr``), so a rank's last words
are read under the explained error instead of above it.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait

from . import hang
from .child import course_env, start_child
from .errors import DistributedError

STARTUP_TIMEOUT_S = 180.0   # import torch + join the group, on a busy 2-core laptop
MIN_STARTUP_S = 60.0        # the least start-up is given, even under a smaller `timeout`
MAX_TIMEOUT_S = 86_400      # a call waiting longer than a day is a hang, not work
# torch's own collective timeout: longer than any `timeout`, so the caller's acts first.
GROUP_TIMEOUT_S = MAX_TIMEOUT_S + 60.0
DEATH_GRACE_S = 0.05        # after a rank's exception, how long to look for a rank that died first
STACK_WAIT_S = 2.0          # how long a hung rank has to write its stack


def startup_limit(timeout: float) -> float:
    """Seconds start-up may take in a call with this ``timeout``: the timeout itself,
    but at least :data:`MIN_STARTUP_S` (a cold start imports torch on every rank)
    and at most :data:`STARTUP_TIMEOUT_S`."""
    return min(STARTUP_TIMEOUT_S, max(MIN_STARTUP_S, timeout))


class RankDiedWhileStarting(DistributedError):
    """A rank process ended before joining the group (no error of its own to report)."""


class WorkerPool:
    def __init__(self, world_size: int, backend: str, threads: int, startup_s: float):
        import torch.distributed as dist

        self.world_size, self.backend, self.threads = world_size, backend, threads
        # Port 0: the OS picks a free port, so concurrent notebooks never clash.
        self._store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                                    wait_for_workers=False)
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        self._dumps: list[int] = []   # read ends of the ranks' stack-dump pipes
        self._errs: list = []         # each rank's native stderr (a temporary file)
        self._err_read: list[int] = []  # how much of each of them was already read
        try:
            self._start(startup_s)
        except BaseException:
            self.close(kill=True)
            raise

    # -- lifecycle -----------------------------------------------------------------
    def _spawn(self, rank: int, env: dict) -> None:
        parent_end, child_end = socket.socketpair()
        dump_read, dump_write = os.pipe()
        # A file, not a pipe: a rank writing much to fd 2 can never block on a full pipe.
        native_err = tempfile.TemporaryFile(prefix=f"rank{rank}-stderr-")
        args = [child_end.fileno(), dump_write, rank, self.world_size, "127.0.0.1", self._store.port,
                self.backend, self.threads, GROUP_TIMEOUT_S]
        try:
            proc = start_child("lessons_lib.launch._worker", args, env=env,
                               pass_fds=(child_end.fileno(), dump_write), stderr=native_err)
        except BaseException:
            parent_end.close()
            os.close(dump_read)
            native_err.close()
            raise
        finally:
            child_end.close()
            os.close(dump_write)
        os.set_blocking(dump_read, False)
        self._procs.append(proc)
        self._conns.append(Connection(parent_end.detach()))
        self._dumps.append(dump_read)
        self._errs.append(native_err)
        self._err_read.append(0)

    def native_stderr(self) -> dict[int, str]:
        """What each rank wrote to its file descriptor 2 since the last time this was asked,
        for the ranks that wrote anything."""
        texts = {}
        for rank, f in enumerate(self._errs):
            size = os.fstat(f.fileno()).st_size
            if size > self._err_read[rank]:
                data = os.pread(f.fileno(), size - self._err_read[rank], self._err_read[rank])
                self._err_read[rank] += len(data)
                texts[rank] = data.decode(errors="replace")
        return texts

    def _start(self, startup_s: float) -> None:
        env = course_env()
        for rank in range(self.world_size):
            self._spawn(rank, env)
        info = {"sys_path": caller_sys_path(), "cwd": os.getcwd()}
        for rank, conn in enumerate(self._conns):
            try:
                conn.send(("init", info))
            except OSError:          # the rank ended before it could read its first message
                raise RankDiedWhileStarting(
                    f"rank {rank} {self._recv(rank)[1]} while starting, before joining the process group",
                    rank=rank, kind="startup", native_stderr=self.native_stderr()) from None
        deadline = time.monotonic() + startup_s
        pending = set(range(self.world_size))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DistributedError(
                    f"ranks {sorted(pending)} did not join the process group within "
                    f"{startup_s:g} s (a cold start runs a new Python process per rank, "
                    f"imports torch and joins the group: on a busy machine pass a larger "
                    f"`timeout`)", rank=min(pending), kind="startup")
            for conn in wait([self._conns[r] for r in pending], timeout=remaining):
                rank = self._conns.index(conn)
                message = self._recv(rank)
                if message[0] == "died":
                    raise RankDiedWhileStarting(
                        f"rank {rank} {message[1]} while starting, before joining the process group",
                        rank=rank, kind="startup", native_stderr=self.native_stderr())
                if message[0] != "ready":
                    raise DistributedError(
                        f"rank {rank} could not join the process group "
                        f"(backend={self.backend!r})", rank=rank, kind="startup",
                        remote_type=message[1], remote_traceback=message[2])
                pending.discard(rank)

    def alive(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def close(self, kill: bool = False) -> None:
        """Stop every rank and whatever it started, and reap it; ``kill`` skips the goodbye."""
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
            # Even after a clean exit: the group id stays reserved while anything the
            # rank started is still in it, so this reaches those processes and no others.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                proc.kill()
            proc.wait()
        for conn in self._conns:
            conn.close()
        for fd in self._dumps:
            os.close(fd)
        for f in self._errs:
            f.close()
        self._procs, self._conns, self._dumps, self._errs, self._err_read = [], [], [], [], []
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

    def _dead_rank(self, exclude: int) -> int | None:
        """The lowest rank other than ``exclude`` whose process has already ended, if any."""
        time.sleep(DEATH_GRACE_S)      # a death and the error it causes arrive close together
        return next((r for r, proc in enumerate(self._procs) if r != exclude and proc.poll() is not None),
                    None)

    def _died_error(self, rank: int, how: str) -> DistributedError:
        return DistributedError(f"rank {rank} {how} before finishing; the other ranks were stopped",
                                rank=rank, kind="killed", native_stderr=self.native_stderr())

    def _stacks(self, ranks: list[int]) -> dict[int, str]:
        """Each rank's stack dump, asked for with SIGUSR1 (see :mod:`._worker`)."""
        texts = {r: b"" for r in ranks}
        for r in ranks:
            try:
                while os.read(self._dumps[r], 1 << 16):   # drop anything stale
                    pass
            except BlockingIOError:
                pass
            try:
                os.kill(self._procs[r].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STACK_WAIT_S
        waiting = set(ranks)
        while waiting and time.monotonic() < deadline:
            readable, _, _ = select.select([self._dumps[r] for r in waiting], [], [], 0.1)
            for r in [r for r in waiting if self._dumps[r] in readable]:
                try:
                    chunk = os.read(self._dumps[r], 1 << 16)
                except BlockingIOError:
                    continue
                texts[r] += chunk
                if not chunk or hang.DUMP_END in texts[r]:
                    waiting.discard(r)
        return {r: text.decode(errors="replace") for r, text in texts.items()}

    def _timeout_error(self, pending: list[int], finished: list[int], timeout: float):
        whereabouts = {r: hang.parse_dump(text) for r, text in self._stacks(pending).items()}
        story, missing = hang.diagnose(pending, finished, whereabouts)
        return DistributedError(
            f"ranks {pending} did not finish within timeout={timeout:g} s; all ranks were "
            f"stopped. Where they were:\n{story}",
            rank=pending[0], kind="timeout", failed_ranks=tuple(pending),
            stacks={r: hang.format_stack(w) for r, w in whereabouts.items()},
            missing_ranks=missing, native_stderr=self.native_stderr())

    def call(self, payload: bytes, context: dict, timeout: float, outputs: list[dict]) -> list[bytes]:
        """Run one pickled call on every rank; fill ``outputs[rank]`` with its text.

        ``context`` is the caller's ``cwd`` and ``sys_path``. Returns each rank's pickled
        result, and adds what each rank wrote to its native stderr to ``outputs``. Raises
        :class:`DistributedError` on the first failure, with the ranks' native stderr in
        it, after which the pool is unusable and must be closed.
        """
        for conn in self._conns:
            conn.send(("call", payload, context))
        results: dict[int, bytes] = {}
        self.group_alive = True
        deadline = time.monotonic() + timeout
        while len(results) < self.world_size:
            pending = [r for r in range(self.world_size) if r not in results]
            remaining = deadline - time.monotonic()
            ready = wait([self._conns[r] for r in pending], timeout=max(0.0, remaining))
            if not ready:
                raise self._timeout_error(pending, sorted(results), timeout)
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
                    dead = self._dead_rank(exclude=rank)
                    if dead is not None:
                        # Another rank died first: the exception here (a peer closed the
                        # connection mid-collective) is its consequence, not the cause.
                        raise self._died_error(dead, self._recv(dead)[1])
                    raise DistributedError(
                        f"rank {rank} raised {message[1]}; the other ranks were stopped",
                        rank=rank, kind="exception", remote_type=message[1],
                        remote_traceback=message[2], native_stderr=self.native_stderr())
                elif tag == "unpicklable":
                    raise DistributedError(
                        f"rank {rank} returned a value that cannot be sent back to the "
                        f"caller ({message[1]}); make `fn` return tensors, numbers, "
                        f"strings or containers of them", rank=rank, kind="unpicklable",
                        native_stderr=self.native_stderr())
                elif tag == "died":
                    raise self._died_error(rank, message[1])
        # Each rank wrote its fd-2 text before its answer, so the files hold all of it now.
        for rank, text in self.native_stderr().items():
            outputs[rank]["stderr"].append(text)
        return [results[r] for r in range(self.world_size)]


def caller_sys_path() -> list[str]:
    """``sys.path`` as the ranks should see it: ``''`` (the current directory) made absolute."""
    return [p if p else os.getcwd() for p in sys.path]
