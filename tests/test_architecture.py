"""ARCHITECTURE.md is true: the paths it names exist and the library's imports follow its layers."""

import ast
import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "lessons_lib"
DOC = (ROOT / "ARCHITECTURE.md").read_text()


def layers() -> list[set[str]]:
    """The layer lines of the document's ``text`` block, lowest first, as sets of names."""
    block = re.search(r"<!-- layers:.*?-->\s*```text\n(.*?)```", DOC, re.S).group(1)
    return [{name.strip() for name in line.split(":", 1)[0].split(",")} for line in block.splitlines()
            if line.strip()]


def unit_of(path: Path) -> str:
    """The package (first directory) or top-level module a library file belongs to."""
    rel = path.relative_to(LIB)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def library_imports(path: Path) -> set[str]:
    """Units of ``lessons_lib`` that ``path`` imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    here = list(path.relative_to(LIB).parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - (node.level - 1)]
            parts = base + (node.module.split(".") if node.module else [])
            found.add(parts[0] if parts else node.names[0].name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lessons_lib."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lessons_lib.")}
    return found


def test_every_path_it_names_exists():
    named = {p for p in re.findall(r"`((?:lessons_lib|notebooks|tests|solutions|exercises)/[\w./]+)`", DOC)
             if "NN" not in p}                   # "NN" marks a template, in "Adding a lesson"
    assert len(named) > 40
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_lesson_has_a_row():
    notebooks = sorted(p.name[:2] for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    rows = re.findall(r"^\| (\d\d) \| `notebooks/", DOC, re.M)
    assert rows == notebooks, "add a row for each lesson to ARCHITECTURE.md's table"


def test_the_layers_name_every_package_once():
    names = [n for layer in layers() for n in layer]
    assert len(names) == len(set(names))
    units = {unit_of(p) for p in LIB.rglob("*.py")} - {"__init__"}
    existing = {n for n in names if (LIB / n).is_dir() or (LIB / f"{n}.py").exists()}
    assert units <= existing, f"give these a layer in ARCHITECTURE.md: {sorted(units - existing)}"


def test_imports_go_down_the_layers():
    level = {name: i for i, layer in enumerate(layers()) for name in layer}
    wrong = []
    for path in sorted(LIB.rglob("*.py")):
        unit = unit_of(path)
        if unit == "__init__":
            continue
        for target in library_imports(path) - {unit}:
            if level.get(target, -1) >= level[unit]:
                wrong.append(f"{path.relative_to(ROOT)} ({unit}, layer {level[unit]}) imports {target} "
                             f"(layer {level.get(target)})")
    assert not wrong, "imports that do not go down the layers:\n" + "\n".join(wrong)


# Packages whose submodules a notebook imports directly: the display helpers (one widget module
# per picture) and the course's checkers. Every other package is imported through its face.
SUBMODULES_IMPORTED_DIRECTLY = {"viz", "exercises"}


def test_notebooks_import_the_library_through_package_faces():
    """A lesson's names come from a package's ``__init__`` (``from lessons_lib.serving import
    Router``), never from a module inside it, so a newcomer finds them in one place."""
    offenders = []
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for module in re.findall(r"from (lessons_lib\.[\w.]+) import", nb.read_text()):
            parts = module.split(".")
            package = LIB.joinpath(*parts[1:])
            if parts[1] in SUBMODULES_IMPORTED_DIRECTLY or package.is_dir() or len(parts) == 2:
                continue
            offenders.append(f"{nb.name}: {module}")
    assert not offenders, f"import these names from their package instead: {offenders}"


def test_every_package_face_exports_what_it_imports():
    """Each package ``__init__`` lists in ``__all__`` exactly the names it imports from its modules."""
    for init in sorted(LIB.rglob("__init__.py")):
        if init.parent == LIB or init.parent.name in SUBMODULES_IMPORTED_DIRECTLY:
            continue
        tree = ast.parse(init.read_text())
        imported = {a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom)
                    for a in node.names}
        exported = set()
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                if getattr(target, "id", "") == "__all__":
                    exported |= {e.value for e in node.value.elts}
        rel = init.relative_to(ROOT)
        assert exported, f"{rel} has no __all__"
        assert exported == imported - {"annotations"}, \
            f"{rel}: imported but not in __all__ {sorted(imported - exported - {'annotations'})}, " \
            f"in __all__ but not imported {sorted(exported - imported)}"


def test_every_name_a_notebook_imports_from_the_library_exists():
    """nbval would find a missing name too, but only after minutes of running the notebook."""
    import importlib

    missing = []
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = [c["source"] for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        for cell in cells:
            source = "".join(cell) if isinstance(cell, list) else cell
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue                  # IPython magics: not library imports
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lessons_lib"):
                    module = importlib.import_module(node.module)
                    missing += [f"{nb.name}: {node.module}.{a.name}" for a in node.names
                                if not hasattr(module, a.name)
                                and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing, f"notebooks import names the library does not have: {missing}"
