"""Small helpers notebooks use to show things: library source, tables."""

from __future__ import annotations

import inspect


def show_source(obj) -> None:
    """Display the source of a library function or class, highlighted, in a notebook."""
    from IPython.display import Markdown, display

    display(Markdown(f"```python\n{inspect.getsource(obj).rstrip()}\n```"))


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table from a header and rows of values (floats to 3 significant digits)."""
    def fmt(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
