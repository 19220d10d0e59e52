"""The exercises as an nbgrader assignment, from the same ``solutions/`` as ``exercises/``.

``python -m lessons_lib.grade.nbgrader COURSE_DIR ASSIGNMENT [NN ...]`` writes
``COURSE_DIR/source/ASSIGNMENT/<NN_topic>.ipynb`` for the chosen lessons (default: all) and, if
there is none yet, ``COURSE_DIR/nbgrader_config.py``. Then, in ``COURSE_DIR``::

    nbgrader generate_assignment ASSIGNMENT     # release/: equal in content to exercises/
    nbgrader autograde ASSIGNMENT               # submitted/<student>/ASSIGNMENT/*.ipynb
    nbgrader generate_feedback ASSIGNMENT

The solution notebooks already carry nbgrader's cell metadata (``make exercises`` keeps it in
step, see :func:`lessons_lib.exercises.stubs.mark_for_nbgrader`): answers are solution cells,
each ``check(...)`` cell is an autograded test cell worth one point, a written answer is graded
by hand, every other cell is locked. The source written here adds to each check cell a hidden
test, removed from the release and put back by ``autograde``::

    check("03.ring_bytes", predicted_busiest_rank_bytes)
    ### BEGIN HIDDEN TESTS
    from lessons_lib.grade import assert_correct as _assert_correct
    _assert_correct("03.ring_bytes", predicted_busiest_rank_bytes)
    ### END HIDDEN TESTS

``assert_correct`` judges the answer in a fresh process with the hidden cases and raises with
the hint unless it is correct, so a rebound ``check`` or a printed verdict line earns nothing.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import nbformat

from ..exercises.check import CHECK_LIMIT_S
from ..exercises.stubs import check_calls, mark_for_nbgrader
from .judge import judge_limit

COURSE_ROOT = Path(__file__).resolve().parent.parent.parent
# One test cell runs check() in the kernel (bounded by CHECK_LIMIT_S), then assert_correct in a
# fresh process (bounded by judge_limit(1)). nbgrader's default, 30 s, is about what the course
# takes to diagnose a deadlock (cold ranks, then RANK_TIMEOUT_S on them): a deadlocking answer
# would race it and could end as a bare CellTimeoutError instead of the course's report of where
# each rank waits. It is also above run_distributed's default timeout, for the given cells.
CELL_TIMEOUT_S = CHECK_LIMIT_S + int(judge_limit(1)) + 15

HIDDEN = ('### BEGIN HIDDEN TESTS\n'
          'from lessons_lib.grade import assert_correct as _assert_correct\n'
          '{calls}\n'
          '### END HIDDEN TESTS')

CONFIG = f'''# nbgrader's configuration for the distributed-inference course (written by
# `python -m lessons_lib.grade.nbgrader`; edit freely, it is not overwritten).
c = get_config()
c.CourseDirectory.course_id = "distributed-inference"
# A test cell runs check() and then assert_correct() in a fresh process, each bounded by the
# course itself (a deadlock is reported with where each rank waits); the cell timeout leaves
# room for both, and for run_distributed's default timeout in the given cells: not nbgrader's 30 s.
c.Execute.timeout = {CELL_TIMEOUT_S}
# Students' notebooks name the course kernel that `make lab` registers; autograde runs them on the
# kernel of the Python that runs nbgrader (the course's environment), registered or not.
c.Execute.kernel_name = "python3"
'''


def source_notebook(solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """nbgrader's source version of a solution notebook: metadata, hidden tests, no outputs."""
    nb = copy.deepcopy(solution)
    mark_for_nbgrader(nb)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
        calls = check_calls(cell.source)
        if calls and cell.metadata["nbgrader"]["grade"]:
            hidden = "\n".join(f'_assert_correct("{i}", {name})' for i, name in calls)
            cell.source = cell.source.rstrip("\n") + "\n" + HIDDEN.format(calls=hidden)
    return nb


def write_course(course_dir: Path, assignment: str, lessons: list[str] | None = None,
                 course_root: Path = COURSE_ROOT) -> list[Path]:
    """Write the assignment's source notebooks (and a config if none); return their paths."""
    solutions = sorted((course_root / "solutions").glob("[0-9][0-9]_*.ipynb"))
    if lessons:
        wanted = {name[:2] for name in lessons}
        unknown = wanted - {p.name[:2] for p in solutions}
        if unknown:
            raise ValueError(f"no lesson {', '.join(sorted(unknown))}; lessons are "
                             f"{', '.join(p.stem for p in solutions)}")
        solutions = [p for p in solutions if p.name[:2] in wanted]
    target = course_dir / "source" / assignment
    target.mkdir(parents=True, exist_ok=True)
    config = course_dir / "nbgrader_config.py"
    if not config.exists():
        config.write_text(CONFIG)
    written = []
    for path in solutions:
        nb = source_notebook(nbformat.read(path, as_version=4))
        nbformat.write(nb, target / path.name)
        written.append(target / path.name)
    return written


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0].startswith("-"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    course_dir, assignment, lessons = Path(argv[0]), argv[1], argv[2:]
    try:
        written = write_course(course_dir, assignment, lessons)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    for path in written:
        print(path)
    print(f"now, in {course_dir}: nbgrader generate_assignment {assignment}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
