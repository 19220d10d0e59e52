"""The project's setup: one dependency list, two commands, a complete layout."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from lessons_lib.course import LESSONS

pytestmark = pytest.mark.lesson00
ROOT = Path(__file__).resolve().parent.parent
_REQ = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*$")


def _normalise(requirement: str) -> tuple[str, str]:
    name, spec = _REQ.match(requirement).groups()
    return name.lower().replace("_", "-"), spec.replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return dict(_normalise(r) for r in requirements)


def environment_requirements() -> tuple[dict[str, str], list[str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    found, pip_lines = {}, []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_lines = dep["pip"]
            continue
        name, spec = _normalise(dep.replace("=", "==", 1) if re.match(r"^[\w-]+=[^=]", dep) else dep)
        if name not in ("python", "pip"):
            found[name] = spec
    for line in pip_lines:
        if not line.startswith("-e"):
            name, spec = _normalise(line)
            found[name] = spec
    return found, pip_lines


def test_environment_yml_lists_exactly_the_pyproject_dependencies():
    declared = pyproject_requirements()
    listed, _ = environment_requirements()
    assert listed == declared


def test_environment_yml_installs_the_project_with_its_extras():
    _, pip_lines = environment_requirements()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"-e .[{','.join(extras)}]" in pip_lines


def test_torch_is_pinned_to_the_cpu_wheel_version():
    assert pyproject_requirements()["torch"] == "==2.13.0"


def test_readme_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:sh|bash|shell)?\n(.*?)```", readme, re.S).group(1)
    assert [line.strip() for line in first_block.strip().splitlines()] == ["make lab", "make test"]


def test_ci_runs_make_test_and_every_other_test_target():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    targets = set(re.findall(r"^(test(?:-[a-z]+)?):", (ROOT / "Makefile").read_text(), re.M))
    assert targets >= {"test", "test-handouts", "test-browser", "test-portable"}
    assert [line for line in ci if line.startswith("make ")] == ["make test"] + [
        f"make {t}" for t in ("test-handouts", "test-browser", "test-portable")]


def test_layout():
    for name in ("notebooks", "lessons_lib", "exercises", "solutions", "tests", "benchmarks",
                 "environment.yml", "pyproject.toml", "README.md", "Makefile"):
        assert (ROOT / name).exists(), name


def test_every_notebook_is_on_the_course_map_and_paired():
    known = {lesson.filename for lesson in LESSONS}
    for folder in ("notebooks", "solutions", "exercises"):
        for path in (ROOT / folder).glob("*.ipynb"):
            assert path.name in known, f"{folder}/{path.name} is not on the course map"
    solutions = {p.name for p in (ROOT / "solutions").glob("*.ipynb")}
    exercises = {p.name for p in (ROOT / "exercises").glob("*.ipynb")}
    lessons = {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert solutions == exercises
    assert solutions <= lessons
