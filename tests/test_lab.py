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


# -- widgets leave a static picture for readers without a kernel --------------------------------
def _widgets():
    from lessons_lib.model import ModelConfig
    from lessons_lib.viz.budget import BudgetCalculator
    from lessons_lib.viz.kv_blocks import kv_blocks_widget
    from lessons_lib.viz.memory import MemoryCalculator
    from lessons_lib.viz.pipeline import pipeline_widget
    from lessons_lib.viz.placement import placement_widget
    from lessons_lib.viz.ring import ring_widget
    from lessons_lib.viz.sharding import sharding_widget

    return {"memory": lambda: MemoryCalculator(), "ring": lambda: ring_widget(6),
            "pipeline": lambda: pipeline_widget(), "placement": lambda: placement_widget(),
            "sharding": lambda: sharding_widget(ModelConfig()), "kv_blocks": lambda: kv_blocks_widget(),
            "budget": lambda: BudgetCalculator()}


@pytest.mark.parametrize("name", ["memory", "ring", "pipeline", "placement", "sharding", "kv_blocks", "budget"])
def test_a_widget_shows_a_picture_and_plain_words_where_no_kernel_runs(name):
    import base64

    bundle = _widgets()[name]()._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")
    assert "VBox(" not in bundle["text/plain"] and "interactive widget" in bundle["text/plain"]


def _squares(n, kind):
    if n == 7:
        raise ValueError("n=7 is not valid: expected anything but 7")
    return {"n": n, "kind": kind, "ys": [k ** (2 if kind == "square" else 1) for k in range(n)]}


def _draw_squares(data, ax):
    ax.plot(data["ys"], label=data["kind"])
    ax.set_axis_off()   # a bare line: fifty redraws stay quick


def test_explorer_recomputes_data_words_and_picture_on_every_change():
    import base64

    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from lessons_lib.validate import BadArgument
    from lessons_lib.viz import Explorer

    def controls(n=3):
        return {"n": widgets.IntSlider(value=n, min=2, max=40),
                "kind": widgets.Dropdown(options=[("k", "line"), ("k squared", "square")], value="line")}

    ex = Explorer(controls(), _squares, _draw_squares, title="a line", text=lambda d: f"{d['kind']} of {d['n']}",
                  figsize=(1, 1))
    assert ex.data["ys"] == [0, 1, 2] and ex.text == "line of 3" and "line of 3" in ex.caption.value
    png = ex.output.outputs[0]["data"]["image/png"]
    ex.controls["kind"].value = "square"   # a dropdown's value, not its label
    assert ex.data["ys"] == [0, 1, 4] and ex.figure.axes[0].lines[0].get_label() == "square"
    assert ex.output.outputs[0]["data"]["image/png"] != png
    bundle = ex._repr_mimebundle_()
    assert "square of 3" in bundle["text/plain"] and base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")
    open_figures = plt.get_fignums()
    for k in range(50):
        ex.controls["n"].value = 8 + k % 30
    assert plt.get_fignums() == open_figures and len(ex.output.outputs) == 1
    assert ex.children[-1] is ex.output and ex.data["n"] == 8 + 49 % 30
    ex.controls["n"].value = 7   # refused: the last data and picture stay, the reason is shown
    assert ex.data["n"] == 8 + 49 % 30 and "n=7" in ex.error and "n=7" in ex.caption.value
    refused = ex.caption.value      # another control moved, refused for the same reason: still visible
    ex.controls["kind"].value = "line"
    assert ex.error == "n=7 is not valid: expected anything but 7" and ex.caption.value != refused
    assert "kind=line" in ex.caption.value
    with pytest.raises(ValueError, match="n=7"):
        Explorer(controls(7), _squares, _draw_squares, title="bad start")
    with pytest.raises(BadArgument, match="controls"):
        Explorer({"n": 3}, _squares, _draw_squares, title="no control")
    words = Explorer(controls(), _squares, title="words only", text=lambda d: f"sum {sum(d['ys'])}")
    bundle = words._repr_mimebundle_()
    assert "image/png" not in bundle and "sum 3" in bundle["text/plain"] and words.output not in words.children


WIDGET_NOTEBOOKS = [p for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
                    if "application/vnd.jupyter.widget-view+json" in p.read_text()]


@pytest.mark.parametrize("path", WIDGET_NOTEBOOKS, ids=lambda p: p.name)
def test_every_saved_widget_has_its_state_and_a_static_picture(path):
    nb = nbformat.read(path, as_version=4)
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            if view is None:
                continue
            assert view["model_id"] in state, f"cell {index}: widget state not saved (re-execute {path.name})"
            assert "VBox(" not in output["data"]["text/plain"], f"cell {index}: raw widget repr as its text"
            text_lines = output["data"]["text/plain"].strip().splitlines()
            assert "image/png" in output["data"] or len(text_lines) > 1, \
                f"cell {index}: no static picture nor text of what the widget shows"


# -- widget fixes: controls that say what they do, labels that do not run together -------------
def test_memory_calculator_disables_devices_while_the_strategy_is_single():
    from lessons_lib.viz.memory import MemoryCalculator

    calc = MemoryCalculator(strategy="single")
    assert calc.controls["devices"].disabled and "one device" in calc.text
    calc.controls["strategy"].value = "tensor"
    assert not calc.controls["devices"].disabled and "one device" not in calc.text
    assert calc.controls["batch"].layout.width == "100%" == calc.controls["context"].layout.width


def _overlaps(boxes) -> list:
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


@pytest.mark.parametrize("p", [4, 6, 8])
def test_ring_chunk_labels_never_touch(p):
    from matplotlib.figure import Figure

    from lessons_lib.viz.ring import draw_ring, ring_figsize, ring_frame

    fig = Figure(figsize=ring_figsize(p))
    ax = draw_ring(ring_frame(p, 0), fig.subplots())
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()
    labels = [t for t in ax.texts if t.get_fontsize() == 7]
    assert len(labels) == p * p
    for rank in range(p):
        row = [t.get_window_extent(renderer) for t in labels[rank * p:(rank + 1) * p]]
        assert not _overlaps(row), f"p={p}: rank {rank}'s chunk labels overlap"


def test_ring_step_slider_follows_p():
    from lessons_lib.viz.ring import ring_widget

    w = ring_widget(4)
    w.controls["p"].value = 8
    assert w.controls["step"].max == 14
    w.controls["step"].value = 14
    w.controls["p"].value = 3
    assert w.controls["step"].max == 4 and w.controls["step"].value == 4 and w.data["step"] == 4
    assert w.controls["step"] in w.children   # the new slider is the one shown


@pytest.mark.parametrize("schedule, backward", [("gpipe", False), ("1f1b", True)])
def test_pipeline_block_labels_fit_their_blocks_at_m16(schedule, backward):
    from lessons_lib.viz.pipeline import PipelineBubbleWidget, draw_gantt, gantt_data

    fig = draw_gantt(gantt_data(8, 16, schedule, backward=backward))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts]
    assert labels and min(t.get_fontsize() for t in labels) >= 6
    unit = ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0]
    for t in labels:
        assert t.get_window_extent(renderer).width <= unit, f"{t.get_text()!r} is wider than its block"
    w = PipelineBubbleWidget()
    assert w.controls["n_microbatches"].style.description_width == "initial"


# -- make lab's set-up: kernel, settings, trusted notebooks; idempotent -------------------------
def _fake_venv(tmp_path) -> Path:
    """A VENV for the Makefile whose python and jupyter are this interpreter's (nothing installed)."""
    import os
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, cmd in (("python", f'exec "{sys.executable}" "$@"'),
                      ("jupyter", f'exec "{sys.executable}" -m jupyter "$@"')):
        script = venv / "bin" / name
        script.write_text(f"#!/bin/sh\n{cmd}\n")
        script.chmod(0o755)
    stamp = venv / ".installed"
    stamp.touch()
    later = (ROOT / "pyproject.toml").stat().st_mtime + 1
    os.utime(stamp, (later, later))
    return venv


def test_make_lab_setup_registers_the_kernel_ships_settings_and_trusts_notebooks(tmp_path):
    import json
    import os
    import shutil
    import subprocess

    from nbformat.sign import NotebookNotary

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv, data = _fake_venv(tmp_path), tmp_path / "data"
    env = dict(os.environ, JUPYTER_DATA_DIR=str(data))
    snapshots = []
    for _ in range(2):   # the second run must succeed and change nothing
        subprocess.run(["make", "-s", "-C", str(ROOT), "lab-setup", f"VENV={venv}"], env=env, check=True,
                       timeout=120, capture_output=True)
        snapshots.append({p.relative_to(venv): p.read_bytes() for p in venv.rglob("*") if p.is_file()})
    assert snapshots[0] == snapshots[1]
    kernel = json.loads((venv / "share/jupyter/kernels/distributed-inference/kernel.json").read_text())
    assert kernel["display_name"] == _makefile_var("KERNEL_DISPLAY")
    settings = json.loads((venv / "share/jupyter/lab/settings/overrides.json").read_text())
    assert settings["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    assert "@jupyter-widgets/jupyterlab-manager:plugin" not in settings   # see lab-settings/README.md
    notary = NotebookNotary(data_dir=str(data))
    for path in NOTEBOOKS:
        assert notary.check_signature(nbformat.read(path, as_version=4)), f"{path.name} is not trusted"
    assert _makefile_var("FIRST_PAGE") == "/lab/tree/notebooks/00_welcome.ipynb"
    assert (ROOT / "notebooks" / "00_welcome.ipynb").exists()
