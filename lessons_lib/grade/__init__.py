"""Grading a class: ``python -m lessons_lib.grade SUBMISSIONS_DIR``.

- :mod:`.judge`: judges answers in a fresh process, outside the learner's namespace;
- :mod:`.runner`: runs one student's notebook headless and copies out the answers it defined;
- :mod:`.classroom`: grades every student's notebooks, side by side, into verdicts;
- :mod:`.report`: writes the verdicts as ``grades.csv`` and ``grades.md``;
- :mod:`.nbgrader`: the same exercises as an nbgrader assignment, whose hidden tests call
  :func:`assert_correct`.
"""

from .judge import assert_correct

__all__ = ["assert_correct"]
