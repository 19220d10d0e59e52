"""Make an exercise notebook from its solution notebook.

A solution notebook marks each answer the nbgrader way::

    def sum_of_squares():
        ### BEGIN SOLUTION
        ...the answer...
        ### END SOLUTION

The exercise notebook is the same notebook with every such region replaced by
a stub that raises ``NotImplementedError`` (markdown regions become
"YOUR ANSWER HERE") and all outputs cleared. Run
``python -m lessons_lib.exercises.stubs [solutions/NN_topic.ipynb ...]`` to
regenerate ``exercises/`` from ``solutions/``; a test fails when the two are out of step.

Before that, :func:`mark_for_nbgrader` gives every solution cell its nbgrader metadata (answer
cells are solution cells, each ``check`` cell an autograded test worth :data:`POINTS`, a written
answer a manually graded one, every other cell locked), idempotently; the exercise notebooks
inherit it, so they are what ``nbgrader generate_assignment`` releases (see
:mod:`lessons_lib.grade.nbgrader`).

Regenerating leaves a committed exercise notebook alone when its cells are unchanged, keeps
the outputs of code cells whose source did not change, and re-executes a notebook (in place,
like ``make notebooks``) only when one of its code cells changed; ``--no-execute`` skips that.
"""

from __future__ import annotations

import copy
import re
import sys
import time
from pathlib import Path

import nbformat

POINTS = 1                  # an autograded check, or a written answer graded by hand
_CHECK_CALL = re.compile(r'\bcheck\(\s*"(?P<id>[\w.]+)"\s*,\s*(?P<name>[A-Za-z_]\w*)\s*\)')
_DEFINES = re.compile(r"^(?:def|class)\s+(?P<name>[A-Za-z_]\w*)", re.M)

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
_BEGIN_RE = re.compile(r"^(\s*)### BEGIN SOLUTION\s*$")


def strip_cell_source(source: str, *, markdown: bool = False, where: str = "cell") -> tuple[str, bool]:
    """Replace every solution region; return the new source and whether a stub sits at top level."""
    out, top_level, inside, indent = [], False, False, ""
    for line in source.splitlines():
        match = _BEGIN_RE.match(line)
        if match:
            if inside:
                raise ValueError(f"{where}: {BEGIN!r} inside another solution region")
            inside, indent = True, match.group(1)
            if markdown:
                out.append(f"{indent}YOUR ANSWER HERE")
            else:
                out += [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError()"]
                top_level |= indent == ""
        elif line.strip() == END:
            if not inside:
                raise ValueError(f"{where}: {END!r} without a matching {BEGIN!r}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN!r} is never closed by {END!r}")
    return "\n".join(out), top_level


def make_exercise(solution: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The exercise notebook for ``solution``: regions stubbed, outputs cleared."""
    nb = copy.deepcopy(solution)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type not in ("code", "markdown"):
            continue
        where = f"{name}, cell {index}"
        source, top_level = strip_cell_source(cell.source, markdown=cell.cell_type == "markdown",
                                              where=where)
        cell.source = source
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            if top_level:  # the stub raises as the cell runs: tell nbval that is expected
                tags = cell.metadata.setdefault("tags", [])
                if "raises-exception" not in tags:
                    tags.append("raises-exception")
    return nb


def check_calls(source: str) -> list[tuple[str, str]]:
    """The ``check("NN.id", answer)`` calls in a cell: (exercise id, answer's name)."""
    return [(m["id"], m["name"]) for m in _CHECK_CALL.finditer(source)]


def _grade_id(exercise_id: str, role: str) -> str:
    return f"{exercise_id.replace('.', '_')}_{role}"     # "03_ring_bytes_check"


def nbgrader_roles(nb: nbformat.NotebookNode) -> list[dict]:
    """The nbgrader metadata each cell of a solution notebook should carry (schema 3)."""
    checked = {}                     # answer name -> exercise id, from the check cells
    for cell in nb.cells:
        if cell.cell_type == "code":
            checked.update({name: exercise_id for exercise_id, name in check_calls(cell.source)})
    roles, last_exercise = [], None
    for cell in nb.cells:
        meta = {"grade": False, "locked": True, "solution": False, "schema_version": 3}
        has_region = BEGIN in cell.source
        calls = check_calls(cell.source) if cell.cell_type == "code" else []
        if cell.cell_type == "code" and has_region:
            names = [m["name"] for m in _DEFINES.finditer(cell.source) if m["name"] in checked]
            meta.update(locked=False, solution=True,
                        grade_id=_grade_id(checked[names[0]], "answer") if names else f"cell-{cell.get('id')}")
        elif calls:
            last_exercise = calls[0][0]
            meta.update(grade=True, points=POINTS * len(calls), grade_id=_grade_id(last_exercise, "check"))
        elif cell.cell_type == "markdown" and has_region:
            meta.update(grade=True, locked=False, solution=True, points=POINTS,
                        grade_id=_grade_id(last_exercise, "written") if last_exercise else f"cell-{cell.get('id')}")
        else:
            meta["grade_id"] = f"cell-{cell.get('id')}"
        roles.append(meta)
    return roles


def mark_for_nbgrader(nb: nbformat.NotebookNode) -> bool:
    """Give each cell of ``nb`` its nbgrader metadata (:func:`nbgrader_roles`); return whether
    anything changed. Running it again changes nothing."""
    changed = False
    for cell, meta in zip(nb.cells, nbgrader_roles(nb)):
        if cell.cell_type in ("code", "markdown") and cell.metadata.get("nbgrader") != meta:
            cell.metadata["nbgrader"] = meta
            changed = True
    return changed


def mark_solution_file(path: Path) -> bool:
    """:func:`mark_for_nbgrader` on a solution notebook file, written back only when changed."""
    nb = nbformat.read(path, as_version=4)
    if not mark_for_nbgrader(nb):
        return False
    path.write_text(nbformat.writes(nb) + "\n")
    return True


def exercise_path(solution_path: Path) -> Path:
    return solution_path.parent.parent / "exercises" / solution_path.name


def _same_cell(new, old) -> bool:
    """Same type and source: the old cell's outputs still belong to it."""
    return new.cell_type == old.cell_type and new.source == old.source


def merge_outputs(new: nbformat.NotebookNode, old: nbformat.NotebookNode | None) -> tuple[nbformat.NotebookNode, bool]:
    """``new`` with each cell whose source is unchanged taken from ``old`` (outputs and all,
    with the tags and nbgrader metadata of ``new``).

    Returns the merged notebook and whether a code cell changed (so its outputs, and every
    output after it, must be recomputed by running the notebook).
    """
    if old is None:
        return new, any(c.cell_type == "code" for c in new.cells)
    code = [[c.source for c in nb.cells if c.cell_type == "code"] for nb in (new, old)]
    code_changed = code[0] != code[1]
    old_cells = {c.get("id"): c for c in old.cells if c.get("id")}
    merged = copy.deepcopy(new)
    for index, cell in enumerate(merged.cells):
        before = old_cells.get(cell.get("id"))
        if before is None and index < len(old.cells):
            before = old.cells[index]
        if before is not None and _same_cell(cell, before):
            kept = merged.cells[index] = copy.deepcopy(before)
            if cell.get("id"):
                kept["id"] = cell["id"]
            for key in ("tags", "nbgrader"):     # the solution's say, outputs kept
                if key in cell.metadata:
                    kept.metadata[key] = copy.deepcopy(cell.metadata[key])
                else:
                    kept.metadata.pop(key, None)
    if not code_changed:
        merged.metadata = copy.deepcopy(old.metadata)
    return merged, code_changed


def execute_in_place(path: Path, cell_timeout: float = 600) -> float:
    """Run ``path`` top to bottom in a fresh kernel from its own folder and save its outputs."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=cell_timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    return time.perf_counter() - start


def regenerate(solution: Path, execute: bool = True) -> str:
    """Bring ``exercises/<stem>.ipynb`` in step with ``solution``; say what was done."""
    target = exercise_path(solution)
    new = make_exercise(nbformat.read(solution, as_version=4), name=str(solution))
    old = nbformat.read(target, as_version=4) if target.exists() else None
    merged, code_changed = merge_outputs(new, old)
    text = nbformat.writes(merged) + "\n"
    if target.exists() and target.read_text() == text:
        return "unchanged"
    target.parent.mkdir(exist_ok=True)
    target.write_text(text)
    if not code_changed:
        return "updated (outputs kept)"
    if not execute:
        return "regenerated (code changed: outputs cleared, run it or `make notebooks`)"
    return f"regenerated and executed in {execute_in_place(target):.1f} s"


def main(argv: list[str]) -> int:
    """Regenerate the exercises of the given solution notebooks (default: all of solutions/)."""
    execute = "--no-execute" not in argv
    paths = [a for a in argv if a != "--no-execute"]
    solutions = [Path(p) for p in paths] or sorted(Path("solutions").glob("[0-9][0-9]_*.ipynb"))
    for path in solutions:
        if mark_solution_file(path):
            print(f"{path}: nbgrader metadata updated", flush=True)
        print(f"{path} -> {exercise_path(path)}: {regenerate(path, execute=execute)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
