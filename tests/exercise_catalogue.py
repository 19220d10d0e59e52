"""What every lesson's exercise tests share: a wrong answer must earn its own hint, quickly.

A lesson's ``tests/test_exercises_NN.py`` lists its catalogue of plausible wrong answers and
calls :func:`assert_hint` on each; :func:`assert_correct` and :func:`assert_refused` cover
the solution and an answer that calls the library's own implementation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lessons_lib.exercises import evaluate

# The design bound is RANK_TIMEOUT_S on warm ranks; the slack covers starting cold ranks
# on a busy machine, so this catches a hint that waits for a long timeout, not noise.
HINT_LIMIT_S = 30


def verdict(exercise_id: str, answer):
    start = time.perf_counter()
    result = evaluate(exercise_id, answer)
    return result, time.perf_counter() - start


def assert_hint(exercise_id: str, answer, *fragments: str, kind: str = "wrong answer") -> str:
    """``answer`` is judged incorrect, with a hint containing every fragment (any case)."""
    result, seconds = verdict(exercise_id, answer)
    assert result.status == "incorrect", f"{exercise_id}: expected incorrect, got {result}"
    for fragment in fragments:
        assert fragment.lower() in result.message.lower(), \
            f"{exercise_id}: hint lacks {fragment!r}: {result.message}"
    assert seconds < HINT_LIMIT_S, f"{exercise_id}: the hint took {seconds:.1f} s"
    _log(exercise_id, kind, seconds)
    return result.message


def assert_hidden_hint(exercise_id: str, answer, *fragments: str) -> str:
    """``answer`` passes the public cases, but grading's hidden cases find its mistake: judged
    incorrect with ``hidden=True``, with a hint naming the hidden case and containing every fragment."""
    public = evaluate(exercise_id, answer, hidden=False)
    assert public.status == "correct", f"{exercise_id}: expected the public cases to pass, got {public}"
    assert "hidden" not in public.message, f"{exercise_id}: hidden cases claimed without running: {public}"
    start = time.perf_counter()
    result = evaluate(exercise_id, answer, hidden=True)
    seconds = time.perf_counter() - start
    assert result.status == "incorrect", f"{exercise_id}: expected incorrect on a hidden case, got {result}"
    for fragment in ("hidden case", *fragments):
        assert fragment.lower() in result.message.lower(), \
            f"{exercise_id}: hint lacks {fragment!r}: {result.message}"
    assert seconds < HINT_LIMIT_S, f"{exercise_id}: the hint took {seconds:.1f} s"
    _log(exercise_id, "hidden case", seconds)
    return result.message


def _log(exercise_id: str, kind: str, seconds: float) -> None:
    """With ``COURSE_CATALOGUE_LOG=path``, append one JSON line per judged answer (for counts)."""
    path = os.environ.get("COURSE_CATALOGUE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"exercise": exercise_id, "kind": kind, "seconds": round(seconds, 2)}) + "\n")


def assert_correct(exercise_id: str, answer) -> None:
    result, seconds = verdict(exercise_id, answer)
    assert result.status == "correct", f"{exercise_id}: {result}"
    _log(exercise_id, "correct", seconds)


def assert_not_attempted(exercise_id: str, answer) -> None:
    result, _ = verdict(exercise_id, answer)
    assert result.status == "not attempted", f"{exercise_id}: {result}"


def assert_refused(exercise_id: str, answer, name: str) -> None:
    """An answer that calls the library's own ``name`` is refused, saying so."""
    assert_hint(exercise_id, answer, f"uses lessons_lib's own {name}", "write it yourself", kind="refused")


def solution_function(stem: str, name: str):
    """The function ``name`` as the solution notebook ``solutions/<stem>.ipynb`` defines it.

    The catalogue then tests the course's own answer rather than a copy of it. Cells that call
    ``check`` or start ranks are skipped; the rest run in a fresh namespace.
    """
    import nbformat

    path = Path(__file__).resolve().parent.parent / "solutions" / f"{stem}.ipynb"
    namespace = {"__name__": f"solution_{stem[:2]}"}
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code" and "check(" not in cell.source and "run_distributed(" not in cell.source:
            exec(compile(cell.source, f"{path.name}", "exec"), namespace)
    return namespace[name]
