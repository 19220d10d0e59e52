"""Visualisers: each picture is a pure function of plain data (testable without a browser),
wrapped in ipywidgets for the notebooks. Import the submodule you need."""
