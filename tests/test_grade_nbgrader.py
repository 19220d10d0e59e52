"""nbgrader end to end: the solutions carry nbgrader's metadata, the release equals exercises/,
and the fake class of tests/test_grade_class.py is autograded with the expected scores.

Four of the six students are autograded (each costs a kernel and a fresh process per check):
the all-correct student adds nothing that the others' correct answers do not show, and a hanging
cell is nbgrader's own business (it interrupts the cell after ``Execute.timeout`` and goes on).
The end-to-end tests need nbgrader (``pip install -e '.[instructor]'``, which the test targets
do) and run in ``make test-handouts``; without nbgrader they skip and say so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from lessons_lib.exercises.stubs import check_calls, mark_for_nbgrader
from lessons_lib.grade.nbgrader import CELL_TIMEOUT_S, source_notebook, write_course
from test_grade_class import LESSON, make_class

pytestmark = pytest.mark.lesson00
ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
NBGRADER_CLASS = ["one_wrong", "untouched", "imports_reference", "rebinds_check"]


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.name)
def test_solutions_carry_nbgrader_metadata_in_step(solution):
    nb = nbformat.read(solution, as_version=4)
    assert not mark_for_nbgrader(nb), "run `make exercises` to update the nbgrader metadata"
    checks = [c for c in nb.cells if c.cell_type == "code" and check_calls(c.source)]
    assert checks and all(c.metadata.nbgrader["grade"] and c.metadata.nbgrader["points"] == 1
                          and c.metadata.nbgrader["locked"] for c in checks)
    answers = [c for c in nb.cells if "### BEGIN SOLUTION" in c.source]
    assert all(c.metadata.nbgrader["solution"] and not c.metadata.nbgrader["locked"] for c in answers)
    code_answers = [c.metadata.nbgrader["grade_id"] for c in answers if c.cell_type == "code"]
    assert all(g.endswith("_answer") for g in code_answers)
    others = [c for c in nb.cells if c not in answers and c not in checks]
    assert all(c.metadata.nbgrader["locked"] for c in others)
    ids = [c.metadata.nbgrader["grade_id"] for c in nb.cells]
    assert len(ids) == len(set(ids))


def test_the_source_adds_a_hidden_assert_to_every_check_cell():
    nb = source_notebook(nbformat.read(ROOT / "solutions" / "03_communication.ipynb", as_version=4))
    tests = [c.source for c in nb.cells if c.metadata.nbgrader.get("grade") and c.cell_type == "code"]
    assert len(tests) == 3
    assert tests[0] == ('check("03.ring_bytes", predicted_busiest_rank_bytes)\n'
                        '### BEGIN HIDDEN TESTS\n'
                        'from lessons_lib.grade import assert_correct as _assert_correct\n'
                        '_assert_correct("03.ring_bytes", predicted_busiest_rank_bytes)\n'
                        '### END HIDDEN TESTS')
    assert all(not c.get("outputs") for c in nb.cells)


def test_the_documented_cell_timeout_leaves_room_for_the_deadlock_report(tmp_path):
    import inspect

    from lessons_lib.exercises.check import CHECK_LIMIT_S
    from lessons_lib.launch import run_distributed

    rank_default = inspect.signature(run_distributed).parameters["timeout"].default
    assert CELL_TIMEOUT_S > CHECK_LIMIT_S + 30 and CELL_TIMEOUT_S > rank_default
    readme = (ROOT / "README.md").read_text()
    assert f"`c.Execute.timeout = {CELL_TIMEOUT_S}`" in readme
    assert f"`check` (at most {CHECK_LIMIT_S} s)" in readme and f"({rank_default:g} s by default)" in readme
    write_course(tmp_path, "lab1", ["08"])
    assert f"c.Execute.timeout = {CELL_TIMEOUT_S}" in (tmp_path / "nbgrader_config.py").read_text()
    with pytest.raises(ValueError, match="no lesson 77"):
        write_course(tmp_path, "lab1", ["77"])


# -- end to end ----------------------------------------------------------------------------
def _nbgrader(course: Path, *args: str) -> str:
    env = dict(os.environ)
    # nbgrader runs `alembic` from PATH: the one installed beside this Python.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    pytest.importorskip("nbgrader", reason="nbgrader is not installed: pip install -e '.[instructor]' "
                                           "(make test-handouts installs it)")
    course = tmp_path_factory.mktemp("course")
    write_course(course, "lab1", [LESSON])
    _nbgrader(course, "generate_assignment", "lab1")
    make_class(course / "submitted", layout="{student}/lab1/{lesson}.ipynb", students=NBGRADER_CLASS)
    _nbgrader(course, "autograde", "lab1")
    _nbgrader(course, "generate_feedback", "lab1")
    return course


@pytest.mark.handouts
def test_the_release_equals_exercises_in_content(course):
    release = nbformat.read(course / "release" / "lab1" / f"{LESSON}.ipynb", as_version=4)
    exercise = nbformat.read(ROOT / "exercises" / f"{LESSON}.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in release.cells] == [(c.cell_type, c.source) for c in exercise.cells]
    assert [c.metadata.nbgrader["grade_id"] for c in release.cells] == \
           [c.metadata.nbgrader["grade_id"] for c in exercise.cells]


EXPECTED_SCORES = {
    "one_wrong": [0, 1, 1],
    "untouched": [0, 0, 0],
    "imports_reference": [1, 0, 1],
    "rebinds_check": [0, 0, 0],
}


@pytest.mark.handouts
def test_autograde_scores_each_student_as_expected(course):
    from nbgrader.api import Gradebook

    grade_ids = ["08_predict_sealed_bytes_check", "08_replay_window_check", "08_tenant_blocks_check"]
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        scores = {student: [gradebook.find_grade(g, LESSON, "lab1", student).score for g in grade_ids]
                  for student in NBGRADER_CLASS}
    assert scores == EXPECTED_SCORES


@pytest.mark.handouts
def test_feedback_carries_the_hint(course):
    feedback = (course / "feedback" / "one_wrong" / "lab1" / f"{LESSON}.html").read_text()
    assert "you predicted 30 bytes" in feedback
    imports = (course / "feedback" / "imports_reference" / "lab1" / f"{LESSON}.html").read_text()
    assert "ReplayWindow" in imports and "write it yourself" in imports
    rebinds = (course / "feedback" / "rebinds_check" / "lab1" / f"{LESSON}.html").read_text()
    assert "you predicted 0 bytes" in rebinds
