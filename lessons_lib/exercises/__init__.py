"""Exercises that check themselves: ``check(exercise_id, your_function)``.

Every exercise has a checker, registered under an id such as ``"00.rank_sum"``,
that runs the learner's code against the course's reference and reports one of:

- ``correct``;
- ``incorrect``, with a hint saying what differs;
- ``not attempted``: the stub still raises ``NotImplementedError``.

``check`` never raises, so an exercise notebook runs top to bottom whatever
state the answers are in.
"""

import importlib
import pkgutil

from .check import (CHECK_LIMIT_S, HISTORY, RANK_TIMEOUT_S, CheckResult, Incorrect, cases, check, evaluate,
                    exercise, has_hidden_cases, labelled_cases, refuse_reference, registered, run_ranks,
                    with_hidden)

# Each lesson's checkers live in ``lessonNN.py``; importing the module registers them.
for _module in pkgutil.iter_modules(__path__):
    if _module.name.startswith("lesson"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["CHECK_LIMIT_S", "HISTORY", "RANK_TIMEOUT_S", "CheckResult", "Incorrect", "cases", "check",
           "evaluate", "exercise", "has_hidden_cases", "labelled_cases", "refuse_reference", "registered",
           "run_ranks", "with_hidden"]
