"""Visualisers: each picture is a pure function of plain data (testable without a browser),
wrapped in one widget form, :class:`~lessons_lib.viz.explorer.Explorer`. Import the submodule
of the picture you need."""

from .explorer import Explorer, make_figure

__all__ = ["Explorer", "make_figure"]
