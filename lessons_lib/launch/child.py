"""Starting a course child process: one way, used by the launcher, the router, torchrun demos.

Every child the course starts is ``python -m <module> <args>`` run by this interpreter, with:

* the environment of the caller, the course's package root first on ``PYTHONPATH`` (so the child
  imports the same ``lessons_lib`` even when the notebook runs from another directory) and any
  extra variables the caller names;
* its own session (process group), so that stopping it also stops whatever it started
  (torchrun's ranks, a rank's own subprocesses);
* stdin closed: a child never waits for keyboard input.

:func:`read_port` is the handshake of a child that serves on a port the OS chose: it prints
``{"port": N}`` as its first line. :func:`stop_child` ends a child and its group for good.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def course_env(**extra: str) -> dict:
    """The caller's environment, with the course's package root first on ``PYTHONPATH`` and ``extra`` set."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_child(module: str, args=(), *, env: dict | None = None, **popen_kwargs) -> subprocess.Popen:
    """``python -m module *args`` in its own session, stdin closed, in ``env`` (default :func:`course_env`)."""
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)],
                            env=course_env() if env is None else env, start_new_session=True,
                            **popen_kwargs)


def read_port(proc: subprocess.Popen, timeout: float, name: str, log=None) -> int:
    """The port a child announced as ``{"port": N}`` on its first stdout line.

    Raises ``RuntimeError`` with the tail of ``log`` (its stderr file) if it exits first, and
    ``TimeoutError`` if it says nothing within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line:
                return int(json.loads(line)["port"])
        if proc.poll() is not None:
            tail = ""
            if log is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with code {proc.returncode} at start:\n{tail}")
    raise TimeoutError(f"{name} did not report its port within {timeout} s")


def stop_child(proc: subprocess.Popen, timeout: float = 0.0) -> int:
    """Wait up to ``timeout`` seconds for ``proc`` to end, then SIGKILL its whole group; its exit code."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    return proc.wait()
