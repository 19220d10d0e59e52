"""Where hung ranks are: read their stack dumps and say who is missing from the collective.

When a call times out, the parent asks each unfinished rank for its Python stack
(``faulthandler`` on ``SIGUSR1``, which works while the rank is blocked inside C++
code such as a gloo ``recv``). This module turns those dumps into the report a
learner needs: which ``torch.distributed`` call each rank waits in, at which line
of their code, and which ranks never reached the call the others wait in.
"""

from __future__ import annotations

import linecache
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from itertools import groupby

import torch

_FRAME = re.compile(r'^\s*File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>.*)$')
_THREAD = re.compile(r"^(Current thread|Thread) 0x[0-9a-fA-F]+")
_WAIT = re.compile(r"\.wait\(")
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_DIST_DIR = os.path.join(_TORCH_DIR, "distributed") + os.sep
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
_WORKER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py")
# Point-to-point calls: when every stuck rank is in one of these, the ranks wait for each other.
P2P_CALLS = frozenset({"send", "recv", "isend", "irecv", "batch_isend_irecv", "wait"})
# The last line faulthandler writes for a worker's main thread: the dump of it is complete.
DUMP_END = b"in _run_module_as_main"


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    func: str


@dataclass(frozen=True)
class Whereabouts:
    """One rank's position: its frames below the launcher (outermost first), and what they mean."""

    frames: tuple[Frame, ...]
    dist_call: str | None   # the torch.distributed function it is blocked in, if any
    site: Frame | None      # the innermost frame of the learner's (or the library's) code


def _path(frame: Frame) -> str:
    return frame.file if frame.file.startswith("<") else os.path.abspath(frame.file)


def _in_torch(frame: Frame) -> bool:
    return _path(frame).startswith(_TORCH_DIR)


def _is_user_code(frame: Frame) -> bool:
    path = _path(frame)
    return not (path.startswith(_TORCH_DIR) or path.startswith(_STDLIB_DIR)
                or path.startswith("<frozen"))


def _public(frames: list[Frame]) -> Frame:
    """The frame a learner would recognise in a run of torch frames: the function they called."""
    named = [f for f in frames if f.func != "wrapper" and not f.func.startswith("_")]
    return (named or frames)[0]


def parse_dump(text: str) -> Whereabouts | None:
    """The frames of the thread that runs ``fn``, from a ``faulthandler`` dump (None if absent)."""
    threads: list[list[Frame]] = []
    for raw in text.splitlines():
        if _THREAD.match(raw):
            threads.append([])
        elif (match := _FRAME.match(raw)) and threads:
            threads[-1].append(Frame(match["file"], int(match["line"]), match["func"]))
    for frames in threads:
        outermost_first = frames[::-1]
        for i, frame in enumerate(outermost_first):
            if frame.func == "_run_call" and os.path.abspath(frame.file) == _WORKER_FILE:
                return _interpret(tuple(outermost_first[i + 1:]))
    return None


def _interpret(frames: tuple[Frame, ...]) -> Whereabouts:
    dist_call = None
    for i, frame in enumerate(frames):
        if _path(frame).startswith(_DIST_DIR):
            # Skip torch's logging wrappers: name the public function the code called.
            dist_call = _public(list(frames[i:])).func
            break
    users = [f for f in frames if _is_user_code(f)]
    site = users[-1] if users else (frames[-1] if frames else None)
    if dist_call is None and site is not None and site is frames[-1]:
        # `work.wait()` on the handle of an isend/irecv/async collective is C++ with no
        # Python frame of its own: only the source line shows the rank is in one.
        if _WAIT.search(linecache.getline(site.file, site.line)):
            dist_call = "wait"
    return Whereabouts(frames, dist_call, site)


def _place(filename: str) -> str:
    """A notebook cell's file as Jupyter names it (``Cell In[5]``), other files by path."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None:
        try:
            label = shell.compile.format_code_name(filename)
        except Exception:  # noqa: BLE001 - an older IPython: fall back to the path
            label = None
        if label:
            return " ".join(label)
    return filename


def _at(frame: Frame) -> str:
    return f"{_place(frame.file)}:{frame.line} (in {frame.func})"


def format_stack(where: Whereabouts | None) -> str:
    """The rank's frames, traceback style, with source lines; each run of torch frames as one."""
    if where is None:
        return "(no stack: the rank did not answer the request for it)"
    shown: list[Frame] = []
    for inside, run in groupby(where.frames, key=_in_torch):
        shown += [_public(list(run))] if inside else list(run)
    lines = []
    for frame in shown:
        lines.append(f'  File "{_place(frame.file)}", line {frame.line}, in {frame.func}')
        source = linecache.getline(frame.file, frame.line).strip()
        if source:
            lines.append(f"    {source}")
    return "\n".join(lines) or "(no Python frame: the rank is between calls)"


def describe(rank: int, where: Whereabouts | None) -> str:
    if where is None or where.site is None:
        return f"rank {rank}: position unknown (it did not answer the request for its stack)"
    if where.dist_call:
        return f"rank {rank} waits in {where.dist_call} at {_at(where.site)}"
    source = linecache.getline(where.site.file, where.site.line).strip()
    doing = f": `{source}`" if source else ""
    return f"rank {rank} is in no torch.distributed call, it runs {_at(where.site)}{doing}"


def diagnose(stuck: list[int], finished: list[int],
             whereabouts: dict[int, Whereabouts | None]) -> tuple[str, tuple[int, ...]]:
    """One paragraph on who waits for whom, and the ranks missing from the awaited call."""
    waiting = {r: whereabouts[r].dist_call for r in stuck
               if whereabouts.get(r) is not None and whereabouts[r].dist_call}
    elsewhere = [r for r in stuck if r not in waiting]
    lines = [describe(r, whereabouts.get(r)) for r in stuck]
    lines += [f"rank {r} had already returned from fn" for r in finished]
    text = ";\n".join(lines) + "."
    if not waiting:
        return text + ("\nNo rank is inside torch.distributed: this looks like slow work, not a "
                       "hang; raise `timeout` if it is expected to take this long."), ()
    calls = sorted(set(waiting.values()))
    missing = tuple(sorted(elsewhere + finished))
    if missing:
        who = ", ".join(str(r) for r in missing)
        return text + (f"\nRank(s) {who} never reached {' / '.join(calls)}, which rank(s) "
                       f"{sorted(waiting)} wait in: look at rank(s) {who} first."), missing
    if set(calls) <= P2P_CALLS:
        return text + ("\nEvery rank waits for a peer (in send/recv, or the wait() of one) that "
                       "is itself waiting: a deadlock. Order the calls so one side sends while "
                       "the other receives, or post both at once with dist.batch_isend_irecv."), ()
    if len(calls) > 1:
        return text + (f"\nThe ranks wait in different calls ({', '.join(calls)}): each collective "
                       f"completes only when every rank calls the same one, in the same order."), ()
    return text + (f"\nEvery rank is inside {calls[0]} and none completes: check that they pass the "
                   f"same group, the same src/dst and tensors of the same size."), ()
