"""What a learner gets from `make lab`: the course kernel in every notebook, saved widget state,
the JupyterLab settings, and warm ranks that do not outlive an idle kernel. No browser needed
(tests/test_browser.py drives JupyterLab itself)."""

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

from lessons_lib.exercises.stubs import make_exercise

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for folder in ("notebooks", "solutions", "exercises")
                   for p in (ROOT / folder).glob("[0-9][0-9]_*.ipynb"))


def _execute_script():
    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "scripts" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, f"Makefile defines no {name}"
    return match.group(1).strip()


def test_the_execute_script_keeps_the_kernel_that_make_lab_registers():
    spec = _execute_script().COURSE_KERNELSPEC
    assert spec["name"] == _makefile_var("KERNEL")
    assert spec["display_name"] == _makefile_var("KERNEL_DISPLAY")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_notebook_opens_on_the_course_kernel(path):
    kernelspec = nbformat.read(path, as_version=4).metadata.get("kernelspec")
    assert kernelspec == _execute_script().COURSE_KERNELSPEC, (
        f"{path.name} opens on {kernelspec and kernelspec.get('display_name')!r}; "
        f"run scripts/execute_notebooks.py on it (it sets the course kernelspec)")


def test_generated_exercises_keep_the_course_kernel():
    solution = nbformat.read(ROOT / "solutions" / "00_welcome.ipynb", as_version=4)
    exercise = make_exercise(solution)
    assert exercise.metadata.kernelspec == _execute_script().COURSE_KERNELSPEC
