"""A fake class graded by ``python -m lessons_lib.grade``: the expected table, asserted.

Six students hand in lesson 08 (three single-process exercises, so the test stays quick): every
answer right, one wrong answer, the stubs untouched, an answer that imports the library's own
ReplayWindow, a wrong answer that rebinds ``check`` and prints a fake verdict, and a notebook
that hangs. The same class is graded by nbgrader in tests/test_grade_nbgrader.py.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import nbformat
import psutil
import pytest

pytestmark = pytest.mark.lesson00
ROOT = Path(__file__).resolve().parent.parent
LESSON = "08_security"
IDS = ["08.predict_sealed_bytes", "08.replay_window", "08.tenant_blocks"]
HANG_LIMIT_S = 15   # generous for a loaded 2-core machine; the hanging notebook costs this once

WRONG_PREDICTION = "def predicted_sealed_bytes():\n    return 30   # forgot the tag\n"
IMPORTS_REFERENCE = '''from lessons_lib.serving.security import ReplayWindow


def replay_window(seqs, window):
    guard = ReplayWindow(window)
    return [guard.check(s) for s in seqs]
'''
REBINDS_CHECK = '''def predicted_sealed_bytes():
    return 0


def check(exercise_id, candidate):
    print(f"✅ [{exercise_id}] correct")


print("✅ [08.predict_sealed_bytes] correct")
'''
HANGS = "import time\nwhile True:\n    time.sleep(0.5)\n"

# student -> (starting notebook, {answer name: new source of its cell}, cell appended at the end)
CLASS = {
    "all_correct": ("solutions", {}, None),
    "one_wrong": ("solutions", {"predicted_sealed_bytes": WRONG_PREDICTION}, None),
    "untouched": ("exercises", {}, None),
    "imports_reference": ("solutions", {"replay_window": IMPORTS_REFERENCE}, None),
    "rebinds_check": ("exercises", {"predicted_sealed_bytes": REBINDS_CHECK}, None),
    "hangs": ("solutions", {}, HANGS),
}
C, I, N, E = "correct", "incorrect", "not attempted", "error"
EXPECTED = {
    "all_correct": [C, C, C],
    "one_wrong": [I, C, C],
    "untouched": [N, N, N],
    "imports_reference": [C, I, C],
    "rebinds_check": [I, N, N],
    "hangs": [E, E, E],
}


def make_class(folder: Path, layout: str = "{student}/{lesson}.ipynb", students=None) -> Path:
    """Write the fake class's notebooks under ``folder`` (``layout`` places each one)."""
    for student, (start, answers, appended) in CLASS.items():
        if students is not None and student not in students:
            continue
        nb = nbformat.read(ROOT / start / f"{LESSON}.ipynb", as_version=4)
        for name, source in answers.items():
            cell = next(c for c in nb.cells if c.cell_type == "code" and f"def {name}(" in c.source)
            cell.source = source
        if appended:
            nb.cells.append(nbformat.v4.new_code_cell(appended))
        path = folder / layout.format(student=student, lesson=LESSON)
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
    return folder


def read_grades(csv_path: Path) -> dict[str, list[str]]:
    with open(csv_path) as f:
        return {row["student"]: [row[i] for i in IDS] for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    from lessons_lib.grade.__main__ import main

    base = tmp_path_factory.mktemp("class")
    make_class(base / "submitted")
    before = {p.pid for p in psutil.process_iter()}
    assert main([str(base / "submitted"), "--out", str(base / "grades"), "--jobs", "2",
                 "--timeout", str(HANG_LIMIT_S)]) == 0
    return base / "grades", before


@pytest.mark.handouts
def test_the_grade_table_is_the_expected_one(graded):
    out, _ = graded
    assert read_grades(out / "grades.csv") == EXPECTED
    with open(out / "grades.csv") as f:
        points = {row["student"]: (row["points"], row["max_points"]) for row in csv.DictReader(f)}
    assert points == {s: (str(v.count(C)), "3") for s, v in EXPECTED.items()}


@pytest.mark.handouts
def test_the_markdown_report_gives_totals_and_each_hint(graded):
    out, _ = graded
    text = (out / "grades.md").read_text()
    assert "| all_correct | ✅ | ✅ | ✅ | 3 / 3 |" in text
    assert "| hangs | ⚠️ | ⚠️ | ⚠️ | 0 / 3 |" in text
    assert "uses lessons_lib's own ReplayWindow" in text
    assert f"ran past its limit of {HANG_LIMIT_S} s" in text
    assert "you predicted 30 bytes" in text


@pytest.mark.handouts
def test_grading_leaves_no_kernel_or_rank_behind(graded):
    from lessons_lib.grade.processes import TAG_ENV

    _, before = graded
    left = []
    for proc in psutil.process_iter():
        try:
            if proc.pid not in before and TAG_ENV in proc.environ():
                left.append(proc.cmdline())
        except psutil.Error:
            continue
    assert not left


@pytest.mark.handouts
def test_the_executed_notebooks_are_kept_for_the_instructor(graded):
    out, _ = graded
    nb = nbformat.read(out / "notebooks" / "rebinds_check" / f"{LESSON}.ipynb", as_version=4)
    assert any("judged by the grader" in c.source for c in nb.cells)


DELETES = "import os, shutil\nshutil.rmtree(os.path.dirname(os.getcwd()))   # the grader's scratch folder\n"


@pytest.mark.handouts
def test_missing_broken_and_self_deleting_notebooks(tmp_path):
    from lessons_lib.grade.classroom import grade_class

    (tmp_path / "late").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / f"{LESSON}.ipynb").write_text("{ not json")
    shutil.copy(ROOT / "exercises" / f"{LESSON}.ipynb", tmp_path / "late" / "notes.ipynb")
    (tmp_path / "deletes").mkdir()
    nb = nbformat.read(ROOT / "solutions" / f"{LESSON}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(DELETES))
    nbformat.write(nb, tmp_path / "deletes" / f"{LESSON}.ipynb")
    verdicts = grade_class(tmp_path, progress=False)
    got = {(v.student, v.status) for v in verdicts}
    assert got == {("broken", E), ("late", N), ("deletes", E)}
    assert all("cannot be read" in v.message for v in verdicts if v.student == "broken")
    assert all("could not be collected" in v.message for v in verdicts if v.student == "deletes")
    assert (tmp_path / "deletes" / f"{LESSON}.ipynb").exists()    # it ran on a scratch copy


def test_bad_arguments_are_refused_with_a_reason(tmp_path, capsys):
    from lessons_lib.grade.__main__ import main

    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
    assert "is not a folder" in capsys.readouterr().err
