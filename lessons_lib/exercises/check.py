"""The ``check`` helper, the registry of checkers behind it, and what every checker shares.

A checker receives the learner's answer and either returns a short success message or
raises :class:`Incorrect` with a hint. The helpers here keep checkers honest and bounded:

- :func:`refuse_reference` turns away an answer that calls the library's own
  implementation of the exercise ("uses lessons_lib's own X: write it yourself");
- :func:`run_ranks` runs an answer on real ranks and turns a hang into a deadlock report
  (which rank waits in which call, at which line) and a rank's exception into a hint;
- :func:`evaluate` bounds the whole check in time (:data:`CHECK_LIMIT_S`), so an endless
  loop in an answer ends as a verdict too.

For grading, verdicts are data (:class:`CheckResult`), not printed text:

- strict mode (``COURSE_STRICT=1`` in the environment) makes :func:`check` raise
  :class:`NotCorrect`, with the same text, on anything but correct;
- ``lessons_lib.grade.assert_correct`` judges an answer in a fresh Python process, outside the
  learner's namespace (a notebook that rebinds ``check`` or prints a verdict line of its own
  gains nothing), and raises :class:`NotCorrect` unless it is correct;
- grading mode (``COURSE_GRADING=1``, set by the graders) passes ``hidden=True`` to the
  checkers that take a ``hidden`` keyword, which then add cases beyond the public ones.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import math
import numbers
import os
import signal
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..launch import run_distributed
from ..launch.errors import DistributedError

CHECK_LIMIT_S = 60      # a whole check, whatever the answer does
RANK_TIMEOUT_S = 8      # one call of an answer on warm ranks: a hang is reported after this

STRICT_ENV = "COURSE_STRICT"     # "1": check() raises NotCorrect unless the answer is correct
GRADING_ENV = "COURSE_GRADING"   # "1": checkers that support it add hidden cases

CORRECT, INCORRECT, NOT_ATTEMPTED = "correct", "incorrect", "not attempted"
_MARKS = {CORRECT: "✅", INCORRECT: "❌", NOT_ATTEMPTED: "⬜", "error": "⚠️"}  # error: grading only

_CHECKERS: dict[str, tuple[str, Callable]] = {}
_HIDDEN: set[str] = set()   # checkers that take ``hidden=`` (extra cases when grading)
HISTORY: list["CheckResult"] = []   # every result in this process, oldest first


class Incorrect(Exception):
    """Raised by a checker with a hint: what the learner's answer got wrong."""


class NotCorrect(AssertionError):
    """Raised by ``lessons_lib.grade.assert_correct`` (and by :func:`check` in strict mode) unless the answer
    is correct; its text is the verdict line with the hint. ``result`` is the verdict as data."""

    def __init__(self, result: "CheckResult"):
        super().__init__(str(result))
        self.result = result


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def strict() -> bool:
    """Whether ``check`` raises on anything but correct (``COURSE_STRICT=1``)."""
    return _env_flag(STRICT_ENV)


def grading() -> bool:
    """Whether checks run for a grade (``COURSE_GRADING=1``): hidden cases are added."""
    return _env_flag(GRADING_ENV)


class _OverTime(BaseException):
    """Raised in the main thread when a check runs past its limit. Not an ``Exception``, so an
    answer's ``except Exception`` does not swallow it."""


@contextmanager
def _time_limit(seconds: float):
    """Raise :class:`_OverTime` in the main thread after ``seconds`` (see :func:`_bounded`)."""
    def alarm(signum, frame):
        raise _OverTime()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _bounded(call: Callable, seconds: float):
    """``call()``, raising :class:`_OverTime` once it has run ``seconds``.

    In the main thread an alarm interrupts the answer itself. Elsewhere (a widget callback, a
    thread of the learner's) no signal can reach it: the call runs in a daemon thread, and when it
    overruns, the verdict comes on time and :class:`_OverTime` is raised inside that thread too
    (CPython's ``PyThreadState_SetAsyncExc``), so an endless Python loop stops rather than spin
    on, holding the interpreter lock, for the rest of the session. (A call blocked inside C code
    sees it only when it returns to Python.)
    """
    if threading.current_thread() is threading.main_thread():
        with _time_limit(seconds):
            return call()
    box: dict = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run, name="check", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(_OverTime))
        raise _OverTime()
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- answers that call the library's own implementation -------------------------------------
_LIBRARY = __name__.split(".")[0]   # "lessons_lib"


def _code_objects(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _scan(candidate) -> tuple[list, set[str]]:
    """What an answer can reach: the objects it names (through globals, closures, defaults,
    bound methods, partials, classes and the helpers it calls, recursively) and every name or
    string its code spells (so ``from lessons_lib.x import y`` inside a function counts)."""
    reached, spelled, seen, todo = [], set(), set(), [candidate]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or len(seen) > 2000:
            continue
        seen.add(id(obj))
        reached.append(obj)
        if isinstance(obj, types.MethodType):
            todo.append(obj.__func__)
        elif isinstance(obj, functools.partial):
            todo += [obj.func, *obj.args, *obj.keywords.values()]
        elif inspect.isclass(obj) and not obj.__module__.startswith((_LIBRARY, "builtins", "torch")):
            todo += [getattr(v, "__func__", v) for v in vars(obj).values()]
        elif inspect.isfunction(obj):
            names = set()
            for code in _code_objects(obj.__code__):
                names.update(code.co_names)
                spelled.update(c for c in code.co_consts if isinstance(c, str))
            spelled.update(names)
            scope = obj.__globals__
            for name in names:
                value = scope.get(name, None)
                if isinstance(value, types.ModuleType):
                    reached.append(value)
                    todo += [getattr(value, n) for n in names if hasattr(value, n)]
                elif value is not None and not isinstance(value, (int, float, str, bytes)):
                    todo.append(value)
            todo += [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
            todo += list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
    return reached, spelled


def refuse_reference(candidate, *references) -> None:
    """Raise :class:`Incorrect` if ``candidate`` uses one of the library's ``references``.

    The answer is read, not run: every function, class and module it can reach by name is
    compared with the references, and an answer whose code names ``lessons_lib`` (an import
    inside the function) and a reference's name is refused too.
    """
    reached, spelled = _scan(candidate)
    by_id = {id(ref): ref for ref in references}
    for obj in reached:
        if id(obj) in by_id:
            name = by_id[id(obj)].__name__
            raise Incorrect(f"uses lessons_lib's own {name}: write it yourself "
                            f"(the exercise is to build what {name} does)")
    names_library = any(name.startswith(_LIBRARY) for name in spelled) or any(
        isinstance(obj, types.ModuleType) and obj.__name__.startswith(_LIBRARY) for obj in reached)
    for ref in references:
        if names_library and ref.__name__ in spelled:
            raise Incorrect(f"uses lessons_lib's own {ref.__name__}: write it yourself "
                            f"(the exercise is to build what {ref.__name__} does)")


# -- answers on real ranks -------------------------------------------------------------------
class _StubOnRank:
    """What a rank returns when the answer is still a stub: the warm ranks stay up, where an
    exception on a rank would stop them all and the next check would start cold ones."""


def _guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        return _StubOnRank()


def run_ranks(fn, world_size: int, *args, timeout: float = RANK_TIMEOUT_S, what: str = "",
              **kwargs) -> list:
    """``run_distributed(fn, world_size, ...)`` whose failures become hints.

    A hang becomes "deadlock" (or "ran past the limit") with the launcher's report of where
    each rank waits; an exception on a rank becomes "rank r raised ..." with its last line.
    A stub's ``NotImplementedError`` passes through, so the verdict is "not attempted".
    ``what`` names the case in the hint, e.g. ``"p=3, n=13"``.
    """
    where = f"{what}: " if what else f"on {world_size} ranks: "
    try:
        results = run_distributed(_guarded, world_size, fn, *args, timeout=timeout, **kwargs)
    except DistributedError as err:
        if err.remote_type == "NotImplementedError":
            raise
        if err.kind == "timeout":
            stuck = "a deadlock" in err.summary
            head = ("your ranks deadlocked" if stuck else
                    f"your code did not finish within {timeout:g} s (a deadlock or an endless loop)")
            raise Incorrect(f"{where}{head}. {err.summary}") from None
        if err.kind == "exception":
            last = (err.remote_traceback or "").strip().splitlines()[-1:] or [err.remote_type]
            raise Incorrect(f"{where}rank {err.rank} raised {last[0]}") from None
        raise Incorrect(f"{where}{err.summary}") from None
    if any(isinstance(result, _StubOnRank) for result in results):
        raise NotImplementedError()
    return results


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
        if "hidden" in inspect.signature(checker).parameters:
            _HIDDEN.add(exercise_id)
        return checker
    return register


def registered() -> dict[str, str]:
    """Exercise ids and their titles."""
    return {key: title for key, (title, _) in sorted(_CHECKERS.items())}


def has_hidden_cases(exercise_id: str) -> bool:
    """Whether the checker of ``exercise_id`` adds hidden cases when grading."""
    return exercise_id in _HIDDEN


HIDDEN_ONLY = "only"   # hidden=HIDDEN_ONLY: the hidden cases without the public ones (tests of the cases)


def cases(public: list, hidden: list, include_hidden: bool | str) -> list:
    """The cases a checker runs: the public ones, then the hidden ones when grading.

    A checker opts in by taking a keyword ``hidden`` and passing it here::

        @exercise("NN.name", "...")
        def check_name(candidate, hidden=False):
            for case in cases(PUBLIC, HIDDEN, hidden): ...

    ``include_hidden="only"`` leaves the public cases out: the course's tests judge its own answers
    on the hidden cases that way, since the solution notebooks' check cells already judge the public ones.
    """
    return [case for _, case in labelled_cases(public, hidden, include_hidden)]


HIDDEN_LABEL = "hidden case "


def labelled_cases(public: list, hidden: list, include_hidden: bool | str) -> list[tuple[str, object]]:
    """:func:`cases` with a label prefix for each: ``""`` for a public case, ``"hidden case "``
    for a hidden one, so a hint names the case it comes from ("hidden case p=6, n=7: ...")."""
    shown = [] if include_hidden == HIDDEN_ONLY else [("", case) for case in public]
    return shown + ([(HIDDEN_LABEL, case) for case in hidden] if include_hidden else [])


def with_hidden(message: str, hidden: list, include_hidden: bool | str) -> str:
    """The success ``message``, saying the hidden cases passed too only when they ran."""
    if not include_hidden or not hidden:
        return message
    n = len(hidden)
    ran = f"the {n} hidden grading case{'s' if n != 1 else ''}"
    return f"{ran} (the public ones not run)" if include_hidden == HIDDEN_ONLY else f"{message}; and {ran}"


def _is_stub(exc: BaseException) -> bool:
    if isinstance(exc, NotImplementedError):
        return True
    # A stub called inside run_distributed raises on the ranks.
    return isinstance(exc, DistributedError) and exc.remote_type == "NotImplementedError"


def evaluate(exercise_id: str, candidate, hidden: bool | str | None = None) -> CheckResult:
    """The verdict on ``candidate`` for ``exercise_id``, as data; never raises, bounded in time.

    ``hidden`` adds the hidden cases of a checker that has some (``"only"``: runs them without
    the public ones); by default it follows grading mode (``COURSE_GRADING=1``).
    """
    if exercise_id not in _CHECKERS:
        known = ", ".join(sorted(_CHECKERS)) or "none"
        return CheckResult(exercise_id, INCORRECT, f"no exercise has this id; known ids: {known}")
    _, checker = _CHECKERS[exercise_id]
    if hidden is None:
        hidden = grading()
    if exercise_id in _HIDDEN:
        checker = functools.partial(checker, hidden=hidden)
    try:
        message = _bounded(lambda: checker(candidate), CHECK_LIMIT_S)
    except Incorrect as wrong:
        return CheckResult(exercise_id, INCORRECT, str(wrong))
    except _OverTime:
        return CheckResult(exercise_id, INCORRECT,
                           f"the check ran for more than {CHECK_LIMIT_S} s and was stopped: "
                           f"does your code loop forever, or wait for something that never comes?")
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

    In strict mode (``COURSE_STRICT=1``) a verdict other than correct is raised as
    :class:`NotCorrect` after it is printed, so an autograder counts the cell as failed.
    """
    result = evaluate(exercise_id, candidate)
    HISTORY.append(result)
    print(result)
    if strict() and result.status != CORRECT:
        raise NotCorrect(result)


# -- what many checkers share ----------------------------------------------------------------
# Collectives an answer built from send/recv must not call. Each is replaced on the ranks by a
# recorder that still runs it, so the other ranks are not left waiting and the hint can name it.
COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "scatter", "gather")


def recording_collectives(call, names=COLLECTIVES, moved: list | None = None):
    """``call()`` on this rank with the collectives ``names`` recorded; returns (result, names used).

    With a list ``moved``, each call also appends the number of tensor elements it was given (its
    inputs and outputs together; an ``*_object`` collective counts as unbounded), so a checker can
    tell a few numbers per row from a gather of the whole tensor.
    """
    used = []
    saved = {name: getattr(dist, name) for name in names}

    def recorder(name, original):
        def recorded(*args, **kwargs):
            used.append(name)
            if moved is not None:
                items = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]
                moved.append(float("inf") if name.endswith("_object") else
                             sum(t.numel() for t in items if isinstance(t, torch.Tensor)))
            return original(*args, **kwargs)
        return recorded

    for name, original in saved.items():
        setattr(dist, name, recorder(name, original))
    try:
        result = call()
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
    return result, sorted(set(used))


def bytes_sent_to(call, dst: int) -> tuple:
    """``call()`` on this rank, counting the bytes it hands to ``dist.isend`` for rank ``dst``
    (the way the pipeline sends activations); returns (result, bytes)."""
    sent, original = [], dist.isend

    def counting(tensor, to, *args, **kwargs):
        if to == dst:
            sent.append(tensor.numel() * tensor.element_size())
        return original(tensor, to, *args, **kwargs)

    dist.isend = counting
    try:
        result = call()
    finally:
        dist.isend = original
    return result, sum(sent)


def raise_if_stub(candidate) -> None:
    """Say "not attempted" for a stub before any rank runs it: an exception on the ranks stops
    them, and the next check would wait for fresh ones."""
    code = getattr(candidate, "__code__", None)
    if code is not None and set(code.co_names) == {"NotImplementedError"}:
        raise NotImplementedError()


def predicted_number(candidate, name: str) -> float:
    """The number a predict exercise's ``candidate()`` returns, or a hint if it is not one."""
    value = candidate()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise Incorrect(f"{name}() returned {value!r}; return one number")
    return value


PREDICT_TOLERANCE = 0.01     # a prediction within 1% of the measurement is correct


def format_number(x) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.4g}"


def judge_prediction(guess, measured: float, mistakes: list[tuple[float, str]], unit: str, advice: str,
                     tolerance: float = PREDICT_TOLERANCE) -> None:
    """Raise :class:`Incorrect` unless ``guess`` is within ``tolerance`` (relative) of ``measured``.

    A guess near one of the ``mistakes`` (value, what went wrong) gets that mistake's hint; any
    other wrong guess gets ``advice``. Shared by the predict exercises.
    """
    if isinstance(guess, bool) or not isinstance(guess, numbers.Real) or not math.isfinite(guess):
        raise Incorrect(f"return your prediction as a number of {unit}; got {guess!r}")
    if abs(guess - measured) <= tolerance * abs(measured):
        return
    said = f"you predicted {format_number(guess)} {unit}; the measurement is {format_number(measured)} {unit}"
    for value, why in mistakes:
        if abs(guess - value) <= tolerance * abs(value):
            raise Incorrect(f"{said}. {why}")
    how = f"{guess / measured:.3g}x, " if measured else ""
    raise Incorrect(f"{said} ({how}{'too high' if guess > measured else 'too low'}). {advice}")
