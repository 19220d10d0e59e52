"""The exercise pipeline: solution -> exercise generation, check(), and every check run for real."""

import re
import sys
from pathlib import Path

import nbformat
import pytest

from lessons_lib.exercises import HISTORY, Incorrect, check, exercise, registered
from lessons_lib.exercises.stubs import exercise_path, make_exercise, strip_cell_source

pytestmark = pytest.mark.lesson00
ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
VERDICT = re.compile(r"^\S+ \[(?P<id>[\w.]+)\] (?P<status>correct|incorrect|not attempted)\b", re.M)


# -- generating exercises --------------------------------------------------------------
def test_a_solution_region_becomes_a_stub_at_its_indentation():
    source = "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n\nprint(1)"
    stripped, top_level = strip_cell_source(source)
    assert stripped == "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\nprint(1)"
    assert not top_level


def test_a_top_level_region_is_flagged_and_markdown_gets_a_placeholder():
    _, top_level = strip_cell_source("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")
    assert top_level
    text, _ = strip_cell_source("Answer:\n### BEGIN SOLUTION\nIt is 4.\n### END SOLUTION", markdown=True)
    assert text == "Answer:\nYOUR ANSWER HERE"


@pytest.mark.parametrize("source, words", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without a matching"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another"),
])
def test_unbalanced_markers_are_errors_naming_the_cell(source, words):
    with pytest.raises(ValueError, match=f"nb.ipynb, cell 3: .*{words}"):
        strip_cell_source(source, where="nb.ipynb, cell 3")


def test_generated_top_level_stub_cells_are_tagged_for_nbval():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")])
    assert make_exercise(nb).cells[0].metadata["tags"] == ["raises-exception"]


def test_every_solution_has_at_least_one_region_and_one_check():
    assert SOLUTIONS, "no solution notebooks"
    for path in SOLUTIONS:
        text = path.read_text()
        assert "### BEGIN SOLUTION" in text and "check(" in text, path.name


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.name)
def test_exercises_are_generated_from_the_current_solutions(solution):
    expected = make_exercise(nbformat.read(solution, as_version=4))
    committed = nbformat.read(exercise_path(solution), as_version=4)
    assert [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in committed.cells] == \
           [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in expected.cells], \
        "exercises/ is out of date: run `make exercises` (then `make notebooks`)"
    assert "BEGIN SOLUTION" not in exercise_path(solution).read_text()


def test_committed_notebooks_are_executed():
    for folder in ("notebooks", "solutions", "exercises"):
        for path in (ROOT / folder).glob("*.ipynb"):
            nb = nbformat.read(path, as_version=4)
            code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
            assert all(c.execution_count for c in code), f"{folder}/{path.name}: run `make notebooks`"


# -- check() ---------------------------------------------------------------------------
@exercise("test.double", "double a number")
def _check_double(candidate):
    for x in (0, 3, -2):
        if candidate(x) != 2 * x:
            raise Incorrect(f"double({x}) returned {candidate(x)}, expected {2 * x}")
    return "doubles"


def _stub(x):
    raise NotImplementedError()


@pytest.mark.parametrize("candidate, status, words", [
    (lambda x: 2 * x, "correct", "doubles"),
    (lambda x: x + x + (x == 3), "incorrect", "double(3) returned 7, expected 6"),
    (lambda x: 1 / 0, "incorrect", "raised ZeroDivisionError"),
    (_stub, "not attempted", "NotImplementedError"),
])
def test_check_reports_each_verdict_without_raising(candidate, status, words, capsys):
    check("test.double", candidate)
    result = HISTORY[-1]
    assert (result.exercise, result.status) == ("test.double", status)
    assert words in result.message
    assert f"[test.double] {status}" in capsys.readouterr().out


def test_check_with_an_unknown_id_lists_the_known_ones():
    check("99.nope", _stub)
    assert HISTORY[-1].status == "incorrect"
    assert "00.sum_of_squares" in HISTORY[-1].message


def test_every_registered_exercise_is_checked_in_some_solution():
    ids = {i for i in registered() if not i.startswith("test.")}
    used = set()
    for path in SOLUTIONS:
        used |= set(re.findall(r'check\(\\?"([\w.]+)\\?"', path.read_text()))
    assert ids == used


# -- every check, against the solution and against the stub ------------------------------
# nbval re-executes every solution and exercise notebook (`make test-handouts`, which CI runs after
# `make test`) and fails when a cell's output differs from the committed one. So asserting here
# that the committed verdicts are right, and that no check cell is excluded from nbval's
# comparison, checks every verdict as it runs now.
NBVAL_EXCLUDING_TAGS = {"nbval-ignore-output", "nbval-skip", "raises-exception"}


def _check_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and re.search(r'\bcheck\("', c.source)]


def _committed_verdicts(nb) -> list[tuple[str, str]]:
    text = "".join(o.get("text", "") for c in _check_cells(nb) for o in c.outputs
                   if o.output_type == "stream")
    return [(m["id"], m["status"]) for m in VERDICT.finditer(text)]


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.name)
def test_solution_passes_every_check_and_the_stub_passes_none(solution):
    solved = nbformat.read(solution, as_version=4)
    stubbed = nbformat.read(exercise_path(solution), as_version=4)
    expected_ids = re.findall(r'\bcheck\("([\w.]+)"', "\n".join(c.source for c in solved.cells))
    assert expected_ids
    for nb in (solved, stubbed):
        for cell in _check_cells(nb):
            assert not NBVAL_EXCLUDING_TAGS & set(cell.metadata.get("tags", [])), cell.source
    assert _committed_verdicts(solved) == [(i, "correct") for i in expected_ids]
    assert _committed_verdicts(stubbed) == [(i, "not attempted") for i in expected_ids]


# -- what every checker shares ------------------------------------------------------------
def _exchange_receiving_first():
    import torch
    import torch.distributed as dist
    t = torch.zeros(2)
    dist.recv(t, 1 - dist.get_rank())
    dist.send(t, 1 - dist.get_rank())
    return 0


def _raises_on_rank_1():
    import torch.distributed as dist
    if dist.get_rank() == 1:
        raise ValueError("chunk 3 does not exist")
    return 0


def test_run_ranks_reports_a_deadlock_with_the_waiting_call():
    from lessons_lib.exercises import run_ranks
    with pytest.raises(Incorrect) as info:
        run_ranks(_exchange_receiving_first, 2, what="p=2")
    text = str(info.value)
    assert text.startswith("p=2: your ranks deadlocked") and "waits in recv" in text


def test_run_ranks_turns_a_rank_error_into_a_hint():
    from lessons_lib.exercises import run_ranks
    with pytest.raises(Incorrect, match="on 2 ranks: rank 1 raised ValueError: chunk 3 does not exist"):
        run_ranks(_raises_on_rank_1, 2)


def _library_sum(xs):
    from lessons_lib.model import generate as g   # a library import inside the answer
    return g


def test_refuse_reference_sees_globals_imports_inside_and_helpers():
    from lessons_lib.exercises import refuse_reference
    from lessons_lib.model import generate

    def direct(x):
        return generate(x)

    def via_helper(x):
        return direct(x)

    for answer in (direct, via_helper, _library_sum):
        with pytest.raises(Incorrect, match="uses lessons_lib's own generate: write it yourself"):
            refuse_reference(answer, generate)
    refuse_reference(lambda x: x + 1, generate)   # an answer of one's own passes


@exercise("test.loop", "never returns")
def _check_loop(candidate):
    candidate()


def test_a_check_is_bounded_in_time(monkeypatch):
    module = sys.modules["lessons_lib.exercises.check"]   # the package's `check` is the function
    monkeypatch.setattr(module, "CHECK_LIMIT_S", 1)

    def forever():
        while True:
            pass

    result = module.evaluate("test.loop", forever)
    assert result.status == "incorrect" and "more than 1 s" in result.message


def _stub_on_ranks():
    raise NotImplementedError()


def test_a_stub_on_ranks_is_not_attempted_and_keeps_the_ranks_warm():
    from lessons_lib.exercises import run_ranks
    from lessons_lib.launch import run as launch_run
    run_ranks(_raises_nothing, 2)
    pools = dict(launch_run._pools)
    with pytest.raises(NotImplementedError):
        run_ranks(_stub_on_ranks, 2)
    assert dict(launch_run._pools) == pools   # the same warm ranks serve the next check


def _raises_nothing():
    return 0
