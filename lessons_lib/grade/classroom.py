"""Grade a class: every student's exercise notebooks, run headless, each answer judged afresh.

Submissions are laid out ``SUBMISSIONS_DIR/<student>/<NN_topic>.ipynb`` (an nbgrader
``submitted/<student>/<assignment>/`` folder works too: notebooks are found below each
student's folder). For each (student, notebook), side by side on the machine's cores:

1. a scratch copy of the notebook runs in a fresh kernel with a time limit
   (:mod:`.runner`); the kernel, the ranks it started and anything else they left are ended;
2. the answers it defined are judged in a fresh process with the course's checkers
   (:mod:`.judge`): what the notebook printed, or which ``check`` it called, plays no part.

Jobs run side by side, one per :data:`RANKS_PER_JOB` cores by default, each pinned to its own
cores, so the ranks of two jobs never compete for one core.

A notebook that cannot be read, crashes its kernel, runs past its limit or deletes what the
grader needs gives "error" on its exercises; grading goes on with the rest. A notebook the student did not hand in counts as not
attempted. Which function answers which exercise is read from the course's own ``exercises/``.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..exercises.check import NOT_ATTEMPTED
from . import runner
from .judge import ERROR, judge_limit, judge_payload
from .processes import core_sets, job_env, run_python

COURSE_ROOT = Path(__file__).resolve().parent.parent.parent
NOTEBOOK_LIMIT_S = 600      # one cell of a student's notebook; the notebook gets this plus start-up
START_S = 30                # starting the kernel (torch imports) on a busy machine
RANKS_PER_JOB = 4           # the most ranks an exercise starts: one job uses about this many cores
POINTS = 1                  # per exercise judged correct
_CHECK_CALL = re.compile(r'\bcheck\(\s*"(?P<id>[\w.]+)"\s*,\s*(?P<name>[A-Za-z_]\w*)\s*\)')


@dataclass(frozen=True)
class Verdict:
    student: str
    lesson: str          # the notebook's stem, e.g. "03_communication"
    exercise: str
    status: str          # correct, incorrect, not attempted or error
    message: str

    @property
    def points(self) -> int:
        return POINTS if self.status == "correct" else 0


def course_answers(course_root: Path = COURSE_ROOT) -> dict[str, list[tuple[str, str]]]:
    """For each lesson stem, its exercises in order: (exercise id, name of the answer)."""
    lessons = {}
    for path in sorted((course_root / "exercises").glob("[0-9][0-9]_*.ipynb")):
        import nbformat

        cells = nbformat.read(path, as_version=4).cells
        found = [(m["id"], m["name"]) for c in cells if c.cell_type == "code"
                 for m in _CHECK_CALL.finditer(c.source)]
        if found:
            lessons[path.stem] = found
    return lessons


def find_submissions(submissions: Path, lessons: dict) -> dict[str, dict[str, Path]]:
    """``{student: {lesson stem: notebook}}`` for every folder of ``submissions``."""
    if not submissions.is_dir():
        raise FileNotFoundError(f"{submissions} is not a folder: expected SUBMISSIONS_DIR/<student>/<NN_topic>.ipynb")
    found = {}
    for folder in sorted(p for p in submissions.iterdir() if p.is_dir() and not p.name.startswith(".")):
        notebooks = {}
        for path in sorted(folder.rglob("[0-9][0-9]_*.ipynb")):
            if path.stem in lessons and ".ipynb_checkpoints" not in path.parts:
                notebooks.setdefault(path.stem, path)
        found[folder.name] = notebooks
    return found


def default_jobs() -> int:
    """Notebooks graded at once: one per :data:`RANKS_PER_JOB` cores, at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // RANKS_PER_JOB)


def grade_notebook(student: str, lesson: str, notebook: Path, answers: list[tuple[str, str]],
                   limit_s: float = NOTEBOOK_LIMIT_S, keep: Path | None = None,
                   cores: list[int] | None = None) -> list[Verdict]:
    """Run one notebook and judge its answers (steps 1 and 2 of the module's doc)."""
    def every(status: str, message: str) -> list[Verdict]:
        return [Verdict(student, lesson, i, status, message) for i, _ in answers]

    with tempfile.TemporaryDirectory(prefix="course-grade-") as scratch:
        scratch = Path(scratch)
        work, payload_path = scratch / "work", scratch / "answers.pickle"
        work.mkdir()
        copy = work / notebook.name
        try:
            shutil.copyfile(notebook, copy)
        except OSError as exc:
            return every(ERROR, f"the notebook could not be read ({exc})")
        tag, env = job_env()
        code, _, err = run_python("lessons_lib.grade.runner", [str(copy), json.dumps(answers),
                                   str(payload_path), str(limit_s)], env, tag, limit_s + START_S, cwd=str(work),
                                  cores=cores)
        if keep is not None and copy.exists():
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(copy, keep / notebook.name)
        if code is None or code == runner.TIMED_OUT:
            return every(ERROR, f"the notebook ran past its limit of {limit_s:.0f} s and was stopped "
                                f"(an endless loop, or a deadlock outside check)")
        if code != 0 or not payload_path.exists():
            why = (err.strip().splitlines() or [f"exit code {code}"])[-1]
            if code not in (runner.UNREADABLE, runner.KERNEL_DIED, runner.NO_ANSWERS):
                why = f"running the notebook failed: {why}"
            return every(ERROR, why)
        import pickle

        payload = pickle.loads(payload_path.read_bytes())
    verdicts = judge_payload(payload, sys_path=None, timeout=judge_limit(len(answers)), cores=cores)
    return [Verdict(student, lesson, i, verdicts[i].status, verdicts[i].message) for i, _ in answers]


def grade_class(submissions: Path, course_root: Path = COURSE_ROOT, limit_s: float = NOTEBOOK_LIMIT_S,
                jobs: int | None = None, keep: Path | None = None, progress: bool = True) -> list[Verdict]:
    """Verdicts for every student and every exercise of the lessons handed in (see module doc)."""
    lessons = course_answers(course_root)
    students = find_submissions(Path(submissions), lessons)
    handed_in = sorted({lesson for notebooks in students.values() for lesson in notebooks})
    work, verdicts = [], []
    for student, notebooks in students.items():
        for lesson in handed_in:
            if lesson in notebooks:
                work.append((student, lesson, notebooks[lesson]))
            else:
                verdicts += [Verdict(student, lesson, i, NOT_ATTEMPTED, f"{lesson}.ipynb was not handed in")
                             for i, _ in lessons[lesson]]
    left = {s: sum(1 for w in work if w[0] == s) for s in students}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(students), unit="student", desc="grading", disable=not progress)
    bar.update(sum(1 for n in left.values() if n == 0))
    lock = threading.Lock()
    jobs = jobs or default_jobs()
    slots: queue.Queue = queue.Queue()
    for cores in core_sets(jobs) or [None] * jobs:
        slots.put(cores)

    def one(item):
        student, lesson, path = item
        cores = slots.get()       # each job on its own cores: ranks of two jobs never share one
        try:
            result = grade_notebook(student, lesson, path, lessons[lesson], limit_s,
                                    keep / student if keep else None, cores)
        except Exception as exc:  # noqa: BLE001 - one student's trouble must not stop the class
            result = [Verdict(student, lesson, i, ERROR, f"grading failed: {type(exc).__name__}: {exc}")
                      for i, _ in lessons[lesson]]
        finally:
            slots.put(cores)
        with lock:
            left[student] -= 1
            if left[student] == 0:
                bar.update(1)
        return result

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for result in pool.map(one, work):
            verdicts += result
    bar.close()
    order = {(lesson, i): k for k, (lesson, i) in enumerate(
        (lesson, i) for lesson in handed_in for i, _ in lessons[lesson])}
    return sorted(verdicts, key=lambda v: (v.student, order[(v.lesson, v.exercise)]))

