"""``python -m lessons_lib.grade SUBMISSIONS_DIR [--out DIR] [--jobs N] [--timeout S]``

Grades every student's exercise notebooks (``SUBMISSIONS_DIR/<student>/<NN_topic>.ipynb``) and
writes ``grades.csv`` and ``grades.md`` to ``--out`` (default: ``SUBMISSIONS_DIR/../grades``),
with each executed notebook under ``--out/notebooks/<student>/``. See
:mod:`lessons_lib.grade.classroom` for what is run, where, and how a verdict is reached.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .classroom import NOTEBOOK_LIMIT_S, default_jobs, grade_class
from .report import write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lessons_lib.grade", description=__doc__.split("\n\n")[1])
    parser.add_argument("submissions", type=Path, help="one folder per student, holding NN_topic.ipynb files")
    parser.add_argument("--out", type=Path, help="where grades.csv and grades.md go")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help=f"notebooks graded at once (default here: {default_jobs()}, one per 4 cores)")
    parser.add_argument("--timeout", type=float, default=NOTEBOOK_LIMIT_S,
                        help=f"seconds one notebook may run (default {NOTEBOOK_LIMIT_S})")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.timeout <= 0:
        parser.error("--jobs must be at least 1 and --timeout positive")
    if not args.submissions.is_dir():
        parser.error(f"{args.submissions} is not a folder of students' folders")
    out = args.out or args.submissions.resolve().parent / "grades"
    start = time.perf_counter()
    verdicts = grade_class(args.submissions, limit_s=args.timeout, jobs=args.jobs, keep=out / "notebooks")
    csv_path, md_path = write(verdicts, out)
    students = len({v.student for v in verdicts})
    print(f"graded {students} students in {time.perf_counter() - start:.0f} s: {csv_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
