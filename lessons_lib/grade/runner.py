"""Run one student's notebook headless and copy out the answers it defined.

``python -m lessons_lib.grade.runner NOTEBOOK ANSWERS.json PAYLOAD_OUT CELL_TIMEOUT`` runs
``NOTEBOOK`` top to bottom in a fresh kernel, from the notebook's own folder (a scratch copy:
what the notebook writes or deletes stays there), going on past cells that raise, as a
learner's "Run All" would with the stubs left in. The course's own ``check("NN.id", answer)``
cells are not run (their verdicts would count for nothing: the grader judges each answer
afresh), which saves the time of every check. A last cell, added here, copies each answer
(see :func:`lessons_lib.grade.judge.export`) into ``PAYLOAD_OUT``; the executed notebook is
saved over ``NOTEBOOK`` for the instructor to read. The exit code says what went wrong:
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

UNREADABLE, KERNEL_DIED, NO_ANSWERS, TIMED_OUT = 3, 4, 5, 6

_EXPORT = '''\
def _course_grade_export(names, path):
    import pickle
    from lessons_lib.grade.judge import export
    namespace = get_ipython().user_ns
    payload = export({i: namespace[n] for i, n in names if n in namespace})
    for i, n in names:
        payload.setdefault(i, ("not attempted", f"`{n}` is not defined once the notebook has run"))
    with open(path, "wb") as f:
        pickle.dump(payload, f)
_course_grade_export(NAMES, PATH)
'''


def _skip_course_checks(nb, names) -> None:
    """Comment out every cell that is exactly one of the course's check calls."""
    for exercise_id, name in names:
        call = re.compile(rf'check\(\s*"{re.escape(exercise_id)}"\s*,\s*{re.escape(name)}\s*\)')
        for cell in nb.cells:
            if cell.cell_type == "code" and call.fullmatch(cell.source.strip()):
                cell.source = f"# {cell.source.strip()}: judged by the grader, in a fresh process"


def main(argv: list[str]) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    notebook, names, payload, cell_timeout = Path(argv[0]), json.loads(argv[1]), argv[2], float(argv[3])
    try:
        nb = nbformat.read(notebook, as_version=4)
    except Exception as exc:  # noqa: BLE001 - a broken file is that student's verdict
        print(f"the notebook cannot be read ({type(exc).__name__}: {exc})", file=sys.stderr)
        return UNREADABLE
    _skip_course_checks(nb, names)
    export = _EXPORT.replace("NAMES", repr([tuple(n) for n in names]))
    nb.cells.append(nbformat.v4.new_code_cell(export.replace("PATH", repr(str(Path(payload).resolve())))))
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(notebook.parent)}})
    try:
        client.execute()
    except DeadKernelError:
        print("the kernel died while running the notebook (a crash, or os._exit)", file=sys.stderr)
        return KERNEL_DIED
    except CellTimeoutError:
        return TIMED_OUT
    finally:
        try:
            nbformat.write(nb, notebook)
        except Exception:  # noqa: BLE001 - the scratch folder may have been deleted
            pass
    if not Path(payload).exists():
        export_cell = nb.cells[-1]
        errors = [o.get("ename", "") for o in export_cell.get("outputs", []) if o.output_type == "error"]
        print(f"the answers could not be collected after the run ({', '.join(errors) or 'no file'})",
              file=sys.stderr)
        return NO_ANSWERS
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
