"""One form for every widget of the course: controls -> plain data -> a picture and a line of words.

An :class:`Explorer` is built from named ipywidgets controls and pure functions:

* ``data(**values) -> dict``: what the widget shows, as plain data (nothing drawn), from the
  controls' values passed by name;
* ``draw(data, ax)``: the picture, on matplotlib axes (``ncols`` of them, side by side, when more
  than one);
* ``text(data) -> str``: an optional line of words under the controls.

On every control change it recomputes :attr:`Explorer.data`, rewrites the line and redraws
through one path: a matplotlib ``Figure`` made without pyplot (so no backend shows it a second
time, and a slider moved a hundred times leaves no figure open), shown as a PNG in an ``Output``.
A reader without a kernel sees that same PNG and the line (:class:`~lessons_lib.viz.static.FallbackBox`).
Tests drive the controls (``explorer.controls["p"].value = 5``) and read ``explorer.data``.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable

import ipywidgets as widgets
from matplotlib.figure import Figure

from ..validate import bad, check_int
from .static import FallbackBox, figure_png


def make_figure(draw: Callable, data: dict, figsize=(8, 3), ncols: int = 1, width_ratios=None) -> Figure:
    """``draw(data, ax)`` on a new figure made without pyplot (``ax`` is a row of ``ncols`` axes when
    ``ncols > 1``). The figure is laid out tightly when saved; a drawing that needs room outside
    its axes sets ``ax.figure.get_layout_engine().set(rect=...)``."""
    check_int("ncols", ncols, low=1)
    fig = Figure(figsize=figsize, layout="tight")
    axes = fig.subplots(1, ncols, width_ratios=width_ratios) if ncols > 1 else fig.subplots()
    draw(data, axes)
    return fig


class Explorer(FallbackBox):
    """Named controls over a pure ``data`` function, drawn by a pure ``draw`` function.

    Arguments: ``controls`` (name -> ipywidgets control; each value is passed to ``data`` under
    its name), ``data``, ``draw`` (``None``: words only), ``title``, ``text``, ``figsize`` (a
    tuple, or a function of the data), ``ncols`` and ``width_ratios`` (several axes in a row),
    ``rows`` (names of the controls per row; default one per row) and ``on_change(explorer, name)``,
    called after control ``name`` moved and before the data is recomputed: the place for a rule
    between controls (disable one, or swap one for a new control with :meth:`set_control`).

    A ``ValueError`` from ``data`` (values that cannot go together) keeps the last picture and
    data, shows the reason in bold and keeps it in :attr:`error`; at construction it is raised.
    """

    def __init__(self, controls: dict, data: Callable[..., dict], draw: Callable | None = None, *,
                 title: str, text: Callable[[dict], str] | None = None, figsize=(8, 3), ncols: int = 1,
                 width_ratios=None, rows=None, on_change: Callable | None = None):
        if not isinstance(controls, dict) or not controls or \
                not all(isinstance(c, widgets.ValueWidget) for c in controls.values()):
            raise bad("controls", controls, "a non-empty dict of name -> ipywidgets control")
        for name, fn in (("data", data), ("draw", draw), ("text", text), ("on_change", on_change)):
            if not callable(fn) and (fn is not None or name == "data"):
                raise bad(name, fn, "a function of the controls' values, returning a dict" if name == "data"
                          else "a function")
        self.controls = dict(controls)
        self.rows = [list(r) for r in rows] if rows is not None else [[name] for name in controls]
        placed = [name for r in self.rows for name in r]
        if sorted(placed) != sorted(self.controls):
            raise bad("rows", rows, f"each of the controls {sorted(self.controls)} once")
        self._data_fn, self._draw_fn, self._text_fn, self._rule = data, draw, text, on_change
        self._figsize, self._ncols, self._width_ratios = figsize, check_int("ncols", ncols, low=1), width_ratios
        self.caption = widgets.HTML()       # the line of words, and the reason when values are refused
        self.output = widgets.Output()      # the picture, as one PNG
        self.data: dict = {}
        self.text = ""
        self.error: str | None = None
        self.figure: Figure | None = None   # the figure last drawn (kept for tests and the fallback)
        self._png: bytes | None = None
        self._busy = False
        super().__init__([], title=title, picture=lambda: self._png, text=self._static_line)
        for control in self.controls.values():
            control.observe(self._moved, names="value")
        self._arrange()
        self._show(self._data_fn(**self.values()))   # the initial values must be valid: raise if not

    # -- the controls -------------------------------------------------------------------------
    def values(self) -> dict:
        """The controls' current values, by name."""
        return {name: control.value for name, control in self.controls.items()}

    def set_control(self, name: str, control) -> None:
        """Replace control ``name`` by a new one (e.g. a slider with another range)."""
        if name not in self.controls:
            raise bad("name", name, f"one of the controls {sorted(self.controls)}")
        self.controls[name].unobserve(self._moved, names="value")
        self.controls[name] = control
        control.observe(self._moved, names="value")
        self._arrange()

    def _arrange(self) -> None:
        rows = [self.controls[r[0]] if len(r) == 1 else widgets.HBox([self.controls[n] for n in r])
                for r in self.rows]
        self.children = rows + [self.caption] + ([self.output] if self._draw_fn is not None else [])

    def _moved(self, change) -> None:
        if self._busy:   # a rule in on_change moved a control: one update follows anyway
            return
        name = next((n for n, c in self.controls.items() if c is change["owner"]), None)
        self._busy = True
        try:
            if self._rule is not None:
                self._rule(self, name)
        finally:
            self._busy = False
        self.update()

    # -- data, words, picture -----------------------------------------------------------------
    def update(self) -> None:
        """Recompute the data from the controls and redraw (called on every change)."""
        try:
            data = self._data_fn(**self.values())
        except ValueError as err:
            self.error = str(err)
            self._caption()
            return
        self._show(data)

    def _show(self, data: dict) -> None:
        self.data, self.error = data, None
        self.text = self._text_fn(data) if self._text_fn is not None else ""
        if self._draw_fn is not None:
            figsize = self._figsize(data) if callable(self._figsize) else self._figsize
            self.figure = make_figure(self._draw_fn, data, figsize, self._ncols, self._width_ratios)
            self._png = figure_png(self.figure)
            self.output.outputs = ({"output_type": "display_data", "metadata": {},
                                    "data": {"image/png": base64.b64encode(self._png).decode("ascii"),
                                             "text/plain": self.text or self._fallback_title}},)
        self._caption()

    def _caption(self) -> None:
        # Several lines (a summary, a table) keep their layout in a monospaced block.
        tag = "pre" if "\n" in self.text else "span"
        line = f"<{tag} class='explorer-text'>{html.escape(self.text)}</{tag}>" if self.text else ""
        if self.error:
            # The settings lead the reason, so every move shows, even one refused for the same reason.
            settings = ", ".join(f"{name}={value}" for name, value in self.values().items())
            line = (f"<b>{html.escape(settings)}: {html.escape(self.error)}</b>"
                    + (f"<br>still showing: {line}" if line else ""))
        self.caption.value = line

    def _static_line(self) -> str:
        return self.text + (f"\nrefused: {self.error}" if self.error else "")
