"""Judge answers in a fresh Python process, outside the learner's namespace: ``assert_correct``.

An answer travels as a copy (cloudpickle: its code and everything it refers to; a module or a
library function by name), so the fresh process judges exactly what the learner defined, with
the course's own ``check`` machinery, freshly imported: a notebook that rebinds ``check``,
patches a checker in its kernel or prints a verdict line of its own changes nothing here. The
fresh process runs in grading mode (hidden cases on), with a time limit, and every process it
starts (ranks included) is ended when it is done.

``python -m lessons_lib.grade.judge`` reads ``{exercise_id: ("ok", bytes) | (kind, why)}``
(pickled) on stdin and prints one JSON verdict per line, as each is reached.
"""

from __future__ import annotations

import json
import pickle
import sys

from ..exercises.check import (CHECK_LIMIT_S, CORRECT, HISTORY, INCORRECT, NOT_ATTEMPTED, CheckResult,
                               NotCorrect, evaluate)
from ..launch.pool import caller_sys_path
from .processes import job_env, run_python
from ..launch._pickle import dumps, loads

ERROR = "error"             # the answer could not be judged: see the message
STATUSES = (CORRECT, INCORRECT, NOT_ATTEMPTED, ERROR)
JUDGE_START_S = 30          # start Python and import torch and the checkers, on a busy machine
PER_ANSWER_S = CHECK_LIMIT_S + 15   # a check's own bound, plus stopping its ranks


def judge_limit(count: int) -> float:
    """Seconds a fresh process may take to judge ``count`` answers."""
    return JUDGE_START_S + count * PER_ANSWER_S


def export(answers: dict[str, object]) -> dict[str, tuple]:
    """Each answer as ``("ok", pickled bytes)``, or ``("error", why)`` when it cannot travel."""
    payload = {}
    for exercise_id, answer in answers.items():
        try:
            payload[exercise_id] = ("ok", dumps(answer))
        except Exception as exc:  # noqa: BLE001 - any failure is a verdict, not a crash
            payload[exercise_id] = (ERROR, f"your answer could not be copied for grading "
                                           f"({type(exc).__name__}: {exc})")
    return payload


def judge_payload(payload: dict[str, tuple], sys_path: list[str] | None = None,
                  timeout: float | None = None, cores: list[int] | None = None) -> dict[str, CheckResult]:
    """Verdicts on exported answers, judged in one fresh process (see the module's doc)."""
    if not payload:
        return {}
    timeout = judge_limit(len(payload)) if timeout is None else timeout
    tag, env = job_env({"COURSE_GRADING": "1"}, sys_path)
    code, out, err = run_python("lessons_lib.grade.judge", [], env, tag, timeout,
                                stdin=pickle.dumps(payload), cores=cores)
    verdicts = {}
    for line in out.splitlines():
        try:
            data = json.loads(line)
            verdicts[data["exercise"]] = CheckResult(data["exercise"], data["status"], data["message"])
        except (ValueError, KeyError, TypeError):
            continue    # a line the answer printed itself
    if code is None:
        why = f"judging ran past its limit of {timeout:.0f} s and was stopped"
    else:
        last = err.strip().splitlines()[-1:] or [f"exit code {code}"]
        why = f"the grader's process ended early ({last[0]})"
    for exercise_id in payload:
        verdicts.setdefault(exercise_id, CheckResult(exercise_id, ERROR, why))
    return verdicts


def judge_isolated(exercise_id: str, candidate) -> CheckResult:
    """The verdict on one answer, judged in a fresh process (what :func:`assert_correct` uses)."""
    return judge_payload(export({exercise_id: candidate}), caller_sys_path())[exercise_id]


def assert_correct(exercise_id: str, candidate, isolated: bool = True) -> None:
    """Judge ``candidate`` for a grade: print the verdict and raise
    :class:`~lessons_lib.exercises.check.NotCorrect` (with the same hint) unless it is correct.

    With ``isolated`` (the default) the checker runs in a fresh Python process with the hidden
    cases, on a copy of the answer (its code and what it refers to), so nothing the notebook
    rebinds or prints changes the verdict; the run is bounded there and killed, ranks and all,
    if it overruns. nbgrader's test cells call this (see :mod:`lessons_lib.grade.nbgrader`);
    the verdict is also appended to ``HISTORY``.
    """
    if isolated:
        result = judge_isolated(exercise_id, candidate)
    else:
        result = evaluate(exercise_id, candidate, hidden=True)
    HISTORY.append(result)
    print(result)
    if result.status != CORRECT:
        raise NotCorrect(result)
    # Returns nothing: an autograder would read a value shown as the cell's output as a score.


def main() -> int:
    payload = pickle.loads(sys.stdin.buffer.read())
    out = sys.stdout
    sys.stdout = sys.stderr       # what an answer prints must not look like a verdict line
    for exercise_id, (kind, data) in payload.items():
        if kind != "ok":
            result = CheckResult(exercise_id, kind if kind in STATUSES else ERROR, data)
        else:
            try:
                answer = loads(data)
            except Exception as exc:  # noqa: BLE001
                result = CheckResult(exercise_id, ERROR, f"your answer could not be loaded for "
                                                         f"grading ({type(exc).__name__}: {exc})")
            else:
                result = evaluate(exercise_id, answer, hidden=True)
        out.write(json.dumps({"exercise": result.exercise, "status": result.status,
                              "message": result.message}) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
