"""Verdicts as data for grading: strict mode, hidden cases, a time bound on every answer, and
assert_correct judging in a fresh process, outside the notebook's namespace."""

import importlib
import threading
import time

import pytest

from lessons_lib.exercises.check import (HISTORY, Incorrect, NotCorrect, cases, check, evaluate, exercise,
                                         has_hidden_cases)
from lessons_lib.grade import assert_correct

pytestmark = pytest.mark.lesson00
check_module = importlib.import_module("lessons_lib.exercises.check")   # the package exports check()


@exercise("test.grade_halve", "halve an even number")
def _check_halve(candidate, hidden=False):
    for x in cases([0, 4, -6], [10**12, 2], hidden):
        if candidate(x) != x // 2:
            raise Incorrect(f"halve({x}) returned {candidate(x)!r}, expected {x // 2}")
    return "halves"


def _public_only(x):
    return {0: 0, 4: 2, -6: -3}.get(x, 0)


def test_strict_mode_raises_the_printed_verdict_on_anything_but_correct(monkeypatch, capsys):
    monkeypatch.setenv("COURSE_STRICT", "1")
    check("test.grade_halve", lambda x: x // 2)            # correct: no exception
    with pytest.raises(NotCorrect) as raised:
        check("test.grade_halve", lambda x: x)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(raised.value) == printed == str(HISTORY[-1])
    assert raised.value.result.status == "incorrect" and "halve(4) returned 4" in printed
    with pytest.raises(NotCorrect, match="not attempted"):
        check("test.grade_halve", lambda x: (_ for _ in ()).throw(NotImplementedError()))


def test_without_strict_mode_check_never_raises(monkeypatch):
    monkeypatch.delenv("COURSE_STRICT", raising=False)
    check("test.grade_halve", lambda x: x)
    assert HISTORY[-1].status == "incorrect"


def test_hidden_cases_run_only_when_grading(monkeypatch):
    assert has_hidden_cases("test.grade_halve") and not has_hidden_cases("00.sum_of_squares")
    monkeypatch.delenv("COURSE_GRADING", raising=False)
    assert evaluate("test.grade_halve", _public_only).status == "correct"
    assert "halve(1000000000000)" in evaluate("test.grade_halve", _public_only, hidden=True).message
    monkeypatch.setenv("COURSE_GRADING", "1")
    assert evaluate("test.grade_halve", _public_only).status == "incorrect"


def _endless(x):
    while True:
        try:
            pass
        except Exception:   # an answer that swallows errors is still stopped
            pass


@pytest.mark.parametrize("thread", ["main", "other"])
def test_an_endless_single_process_answer_is_stopped_with_a_verdict(monkeypatch, thread):
    monkeypatch.setattr(check_module, "CHECK_LIMIT_S", 1)
    box = {}
    if thread == "main":
        box["result"] = evaluate("test.grade_halve", _endless)
    else:
        worker = threading.Thread(target=lambda: box.update(result=evaluate("test.grade_halve", _endless)))
        worker.start()
        worker.join(30)
    assert box["result"].status == "incorrect"
    assert "ran for more than 1 s" in box["result"].message
    # The endless answer itself was stopped, not left spinning on the interpreter lock.
    deadline = time.monotonic() + 10
    while any(t.name == "check" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "check"]


NAMESPACE_SOURCE = '''
def predicted_sealed_bytes():
    return 30          # the tag is forgotten

def check(*args):      # a learner's own "check"
    print("✅ [08.predict_sealed_bytes] correct")
'''


def test_assert_correct_judges_in_a_fresh_process_outside_the_namespace(monkeypatch, capsys):
    namespace = {"__name__": "__main__"}
    exec(compile(NAMESPACE_SOURCE, "<notebook cell>", "exec"), namespace)
    # Even a checker patched in this process does not change the verdict of the fresh one.
    title, _ = check_module._CHECKERS["08.predict_sealed_bytes"]
    monkeypatch.setitem(check_module._CHECKERS, "08.predict_sealed_bytes", (title, lambda c: "fake"))
    with pytest.raises(NotCorrect) as raised:
        assert_correct("08.predict_sealed_bytes", namespace["predicted_sealed_bytes"])
    assert raised.value.result.status == "incorrect" and "46" in str(raised.value)
    namespace["predicted_sealed_bytes"] = lambda: 46
    assert assert_correct("08.predict_sealed_bytes", namespace["predicted_sealed_bytes"]) is None
    assert HISTORY[-1].status == "correct"
    assert "✅ [08.predict_sealed_bytes] correct" in capsys.readouterr().out
