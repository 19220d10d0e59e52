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
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import nbformat

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


def exercise_path(solution_path: Path) -> Path:
    return solution_path.parent.parent / "exercises" / solution_path.name


def main(argv: list[str]) -> int:
    """Regenerate the exercises of the given solution notebooks (default: all of solutions/)."""
    solutions = [Path(p) for p in argv] or sorted(Path("solutions").glob("[0-9][0-9]_*.ipynb"))
    for path in solutions:
        nb = make_exercise(nbformat.read(path, as_version=4), name=str(path))
        target = exercise_path(path)
        target.parent.mkdir(exist_ok=True)
        nbformat.write(nb, target)
        print(f"{path} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
