"""Widgets that still show something where no kernel runs.

A saved notebook keeps each widget's state, so JupyterLab draws it live, but GitHub, a plain
notebook viewer or an untrusted notebook cannot: they fall back to another entry of the output's
MIME bundle. :class:`FallbackBox` is an ``ipywidgets.VBox`` whose bundle also carries a PNG of
its current picture and one line of text, so such a reader sees the figure (and never the
widget's ``VBox(children=...)`` repr).
"""

from __future__ import annotations

import base64
import io

import ipywidgets as widgets


def figure_png(fig, dpi: int = 80) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


class FallbackBox(widgets.VBox):
    """A ``VBox`` that leaves a static picture and a line of text for readers without a kernel.

    ``picture()`` returns the PNG bytes of what the widget shows now (or ``None``); ``text()`` a
    line saying what it shows (default: the title).
    """

    def __init__(self, children=(), *, title: str, picture=None, text=None, **kwargs):
        super().__init__(children, **kwargs)
        self._fallback_title, self._picture, self._text = title, picture, text

    def static_png(self) -> bytes | None:
        return self._picture() if self._picture is not None else None

    def static_text(self) -> str:
        line = self._text() if self._text is not None else ""
        head = f"[interactive widget: {self._fallback_title}; run the notebook to use its controls]"
        return f"{head}\n{line}".rstrip()

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = self.static_text()
        png = self.static_png()
        if png:
            bundle["image/png"] = base64.b64encode(png).decode("ascii")
        return bundle

