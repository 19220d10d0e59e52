"""Child processes that grading starts, and how every process they leave behind is ended.

A student's notebook runs in a kernel, which starts ranks, which lead process groups of their
own (see :mod:`lessons_lib.launch.pool`); a rank whose kernel died is adopted by init. So a
process tree or a process group does not find them all. Each job instead puts a tag in the
environment of the process it starts, every descendant inherits it, and :func:`end_tagged`
ends every process of this user that carries the tag.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import psutil

from ..launch.child import start_child

TAG_ENV = "COURSE_GRADE_JOB"


def job_env(extra: dict | None = None, sys_path: list[str] | None = None) -> tuple[str, dict]:
    """A fresh tag and the environment for a job's process: one thread per process (the
    grader runs jobs side by side), the tag, and ``sys_path`` as ``PYTHONPATH``."""
    tag = uuid.uuid4().hex
    env = dict(os.environ)
    env.update({TAG_ENV: tag, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    env.pop("COURSE_STRICT", None)
    if sys_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys_path if p)
    env.update(extra or {})
    return tag, env


def end_tagged(tag: str, root: int | None = None) -> int:
    """Kill ``root``'s process tree and every process carrying ``tag``; return how many."""
    victims: dict[int, psutil.Process] = {}
    if root is not None:
        try:
            parent = psutil.Process(root)
            victims.update({p.pid: p for p in parent.children(recursive=True)})
            victims[parent.pid] = parent
        except psutil.Error:
            pass
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid in victims or proc.pid == me:
            continue
        try:
            if proc.environ().get(TAG_ENV) == tag:
                victims[proc.pid] = proc
        except psutil.Error:   # gone, or not ours to read
            continue
    for proc in victims.values():
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=5)
    return len(victims)


def core_sets(jobs: int) -> list[list[int]]:
    """The machine's cores cut into ``jobs`` disjoint sets (one per job running at once), or
    ``[]`` where a process's cores cannot be chosen."""
    try:
        cores = sorted(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):
        return []
    jobs = max(1, min(jobs, len(cores)))
    return [cores[i::jobs] for i in range(jobs)]


def run_python(module: str, args: list[str], env: dict, tag: str, timeout: float, stdin: bytes | None = None,
               cwd: str | None = None, cores: list[int] | None = None) -> tuple[int | None, str, str]:
    """``python -m module *args`` with a time limit; every process it left is ended afterwards.

    With ``cores``, the process (and so the kernel and ranks it starts, which inherit it) runs on
    those cores only: jobs side by side do not compete for the same ones.
    Returns (exit code or None when it ran past ``timeout``, stdout, stderr).
    """
    proc = start_child(module, args, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    if cores:
        try:
            psutil.Process(proc.pid).cpu_affinity(cores)
        except psutil.Error:
            pass
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        end_tagged(tag, proc.pid)
        out, err = proc.communicate()
        code = None
    finally:
        end_tagged(tag, proc.pid)
    return code, out.decode(errors="replace"), err.decode(errors="replace")
