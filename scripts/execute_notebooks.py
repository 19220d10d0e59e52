"""Execute notebooks in place, keeping their outputs (``make notebooks``).

Usage: ``python scripts/execute_notebooks.py [PATH ...]`` (default: every notebook
of notebooks/, solutions/ and exercises/). Each runs in a fresh kernel of the
current environment, in its own folder, with a per-cell timeout. Cells tagged
``raises-exception`` may fail; any other failing cell stops with an error.

The state of every widget is saved in the notebook's metadata
(``application/vnd.jupyter.widget-state+json``), so JupyterLab, nbviewer and other
renderers can draw the widgets before anything runs. The kernel used here is the
current environment's own (no kernelspec needs installing), but the notebook keeps
the course kernelspec that ``make lab`` registers, so JupyterLab opens it on that kernel.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
CELL_TIMEOUT_S = 600
# The kernel `make lab` registers (Makefile: KERNEL); tests/test_lab.py checks they agree.
COURSE_KERNELSPEC = {"display_name": "Python (distributed inference course)", "language": "python",
                     "name": "distributed-inference"}


def execute(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    # "python3" is the kernel of the Python running this script (ipykernel's native kernel).
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    nb.metadata.kernelspec = dict(COURSE_KERNELSPEC)
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv] or sorted(
        p for folder in ("notebooks", "solutions", "exercises")
        for p in (ROOT / folder).glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        print(f"executing {path} ...", flush=True)
        print(f"  done in {execute(path):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
