"""Small helpers notebooks use to show things: library source, tables, numbers at a tolerance."""

from __future__ import annotations

import inspect
import math

from .validate import check_real


def show_source(obj) -> None:
    """Display the source of a library function or class, highlighted, in a notebook."""
    from IPython.display import Markdown, display   # here: ranks import this module, IPython is slow to load

    display(Markdown(f"```python\n{inspect.getsource(obj).rstrip()}\n```"))


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table from a header and rows of values (floats to 3 significant digits)."""
    def fmt(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def within(value: float, tol: float, *, signed: bool = False, unit: str = "") -> str:
    """``value`` written so that float rounding in the last bits cannot change the text.

    Below ``tol`` in magnitude it reads ``"< tol"`` (``"within ±tol"`` when ``signed``): a
    difference that small depends on the CPU's kernels, thread count and batch shape, not on the
    code. Otherwise it is rounded to ``tol``'s decimal place (2 significant digits below 1e-3).
    """
    tol = check_real("tol", tol, low=0.0, low_open=True, why="the smallest difference worth printing")
    value = float(value)
    if math.isnan(value):
        return f"nan{unit}"
    if abs(value) < tol:
        return f"within ±{_plain(tol)}{unit}" if signed else f"< {_plain(tol)}{unit}"
    sign = "+" if signed else ""
    if tol < 1e-3:
        return f"{value:{sign}.1e}".replace("e-0", "e-").replace("e+0", "e+") + unit
    decimals = max(0, -math.floor(math.log10(tol)))
    return f"{value:{sign}.{decimals}f}{unit}"


def _plain(x: float) -> str:
    """1e-06 as ``1e-6``, 0.1 as ``0.1``."""
    text = f"{x:.0e}" if x < 1e-3 else f"{x:g}"
    return text.replace("e-0", "e-").replace("e+0", "e+")
