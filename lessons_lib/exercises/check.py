"""The ``check`` helper and the registry of checkers behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..launch.errors import DistributedError

CORRECT, INCORRECT, NOT_ATTEMPTED = "correct", "incorrect", "not attempted"
_MARKS = {CORRECT: "✅", INCORRECT: "❌", NOT_ATTEMPTED: "⬜"}

_CHECKERS: dict[str, tuple[str, Callable]] = {}
HISTORY: list["CheckResult"] = []   # every result in this process, oldest first


class Incorrect(Exception):
    """Raised by a checker with a hint: what the learner's answer got wrong."""


@dataclass(frozen=True)
class CheckResult:
    exercise: str
    status: str
    message: str

    def __str__(self) -> str:
        line = f"{_MARKS[self.status]} [{self.exercise}] {self.status}"
        return f"{line}: {self.message}" if self.message else line


def exercise(exercise_id: str, title: str):
    """Register ``checker(candidate)`` under ``exercise_id``.

    The checker raises :class:`Incorrect` with a hint when the candidate is wrong
    and returns a short success message (or ``None``) when it is right.
    """
    def register(checker: Callable) -> Callable:
        if exercise_id in _CHECKERS:
            raise ValueError(f"exercise id {exercise_id!r} is registered twice")
        _CHECKERS[exercise_id] = (title, checker)
        return checker
    return register


def registered() -> dict[str, str]:
    """Exercise ids and their titles."""
    return {key: title for key, (title, _) in sorted(_CHECKERS.items())}


def _is_stub(exc: BaseException) -> bool:
    if isinstance(exc, NotImplementedError):
        return True
    # A stub called inside run_distributed raises on the ranks.
    return isinstance(exc, DistributedError) and exc.remote_type == "NotImplementedError"


def _evaluate(exercise_id: str, candidate) -> CheckResult:
    if exercise_id not in _CHECKERS:
        known = ", ".join(sorted(_CHECKERS)) or "none"
        return CheckResult(exercise_id, INCORRECT, f"no exercise has this id; known ids: {known}")
    _, checker = _CHECKERS[exercise_id]
    try:
        message = checker(candidate)
    except Incorrect as wrong:
        return CheckResult(exercise_id, INCORRECT, str(wrong))
    except KeyboardInterrupt:
        raise   # Ctrl-C (a kernel interrupt) stops the cell, as everywhere else
    except BaseException as exc:  # noqa: BLE001 - a learner's bug is feedback, not a crash
        if _is_stub(exc):
            return CheckResult(exercise_id, NOT_ATTEMPTED,
                               "replace `raise NotImplementedError()` with your code")
        summary = exc.summary if isinstance(exc, DistributedError) else str(exc)
        verdict = f"your code raised {type(exc).__name__}: {summary}".rstrip(": ")
        if not isinstance(exc, Exception):
            verdict += (f" ({type(exc).__name__} is not an error but a request to stop: "
                        f"in a notebook, return a value or raise an exception instead)")
        return CheckResult(exercise_id, INCORRECT, verdict)
    return CheckResult(exercise_id, CORRECT, message or "")


def check(exercise_id: str, candidate) -> None:
    """Check ``candidate`` (usually your function) for exercise ``exercise_id``; print the verdict.

    Whatever the candidate raises becomes the verdict, ``SystemExit`` from ``sys.exit()``
    and other ``BaseException``s included, so a check never ends the notebook's cell
    abruptly; only ``KeyboardInterrupt`` passes through, so Ctrl-C still stops a check.
    The verdict is also appended to :data:`HISTORY`, where tests read it.
    """
    result = _evaluate(exercise_id, candidate)
    HISTORY.append(result)
    print(result)
