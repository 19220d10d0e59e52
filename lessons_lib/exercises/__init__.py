"""Exercises that check themselves: ``check(exercise_id, your_function)``.

Every exercise has a checker, registered under an id such as ``"00.rank_sum"``,
that runs the learner's code against the course's reference and reports one of:

- ``correct``;
- ``incorrect``, with a hint saying what differs;
- ``not attempted``: the stub still raises ``NotImplementedError``.

``check`` never raises, so an exercise notebook runs top to bottom whatever
state the answers are in.
"""

from .check import HISTORY, CheckResult, Incorrect, check, exercise, registered

# Importing the lesson modules registers their checkers.
from . import lesson00  # noqa: E402,F401

__all__ = ["HISTORY", "CheckResult", "Incorrect", "check", "exercise", "registered"]
