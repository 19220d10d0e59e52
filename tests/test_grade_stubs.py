"""`make exercises` regenerates exercises/ from solutions/ without leaving committed notebooks dirty."""

import shutil
from pathlib import Path

import nbformat
import pytest

from lessons_lib.exercises.stubs import merge_outputs, regenerate

pytestmark = pytest.mark.lesson00
ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))


def _course_copy(tmp_path, solution: Path) -> tuple[Path, Path]:
    for folder in ("solutions", "exercises"):
        (tmp_path / folder).mkdir(exist_ok=True)
        shutil.copy(ROOT / folder / solution.name, tmp_path / folder / solution.name)
    return tmp_path / "solutions" / solution.name, tmp_path / "exercises" / solution.name


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.name)
def test_regenerating_the_committed_exercises_changes_no_byte(tmp_path, solution):
    source, target = _course_copy(tmp_path, solution)
    before = target.read_bytes()
    assert regenerate(source, execute=False) == "unchanged"
    assert target.read_bytes() == before


def test_a_prose_change_keeps_every_output(tmp_path):
    source, target = _course_copy(tmp_path, ROOT / "solutions" / "03_communication.ipynb")
    nb = nbformat.read(source, as_version=4)
    markdown = next(c for c in nb.cells if c.cell_type == "markdown")
    markdown.source += "\n\nOne more sentence."
    nbformat.write(nb, source)
    assert regenerate(source, execute=False) == "updated (outputs kept)"
    old = nbformat.read(ROOT / "exercises" / source.name, as_version=4)
    new = nbformat.read(target, as_version=4)
    assert [c.get("outputs") for c in new.cells] == [c.get("outputs") for c in old.cells]
    assert "One more sentence." in new.cells[nb.cells.index(markdown)].source


def test_a_code_change_clears_only_that_cell_without_executing():
    code = nbformat.v4.new_code_cell
    old = nbformat.v4.new_notebook(cells=[code("x = 1"), code("print(x)")])
    for i, cell in enumerate(old.cells):
        cell.execution_count, cell.outputs = i + 1, [nbformat.v4.new_output("stream", text=f"out {i}")]
    new = nbformat.v4.new_notebook(cells=[code("x = 2"), code("print(x)")])
    for cell, before in zip(new.cells, old.cells):
        cell["id"] = before["id"]
    merged, changed = merge_outputs(new, old)
    assert changed
    assert merged.cells[0].outputs == [] and merged.cells[1].outputs == old.cells[1].outputs


def test_a_code_change_is_executed_so_the_notebook_is_not_left_dirty(tmp_path):
    (tmp_path / "solutions").mkdir()
    source = tmp_path / "solutions" / "99_tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\nprint('ran')")]), source)
    assert regenerate(source).startswith("regenerated and executed")
    cell = nbformat.read(tmp_path / "exercises" / source.name, as_version=4).cells[0]
    assert cell.execution_count == 1 and cell.outputs[0]["text"] == "ran\n"
    assert regenerate(source) == "unchanged"
