"""One speculative round as a picture: the draft's proposals, the target's verdicts, the token kept.

:func:`draw_round` is a pure function of one ``trace`` record of
:func:`~lessons_lib.speculative.speculative_generate`; :func:`round_widget` puts a slider over the
rounds of a run. Colours: green accepted, red rejected (and the target's token that replaces it),
grey never judged (after a rejection), blue the bonus token when every proposal was accepted.
"""

from __future__ import annotations

import ipywidgets as widgets

from ..validate import bad
from .explorer import Explorer

COLOURS = {"accepted": "#8fd18f", "rejected": "#f19c9c", "unjudged": "#dddddd", "correction": "#f5c26b",
           "bonus": "#8cb8f0", "context": "#ffffff"}


def _show(token: int, decode) -> str:
    text = decode([token]) if decode else str(token)
    return {" ": "␣", "\n": "⏎"}.get(text, text) if text.strip() or text in (" ", "\n") else repr(text)


def round_cells(record: dict) -> list[tuple[str, int, str | None]]:
    """The proposal row as ``(state, token, target's token)`` triples, then the emitted token.

    ``state`` is accepted / rejected / unjudged for proposals, correction or bonus for the last.
    """
    if not isinstance(record, dict) or not {"proposal", "accepted", "token", "target_choices"} <= set(record):
        raise bad("record", record, "one dict of the trace speculative_generate(trace=[...]) fills")
    cells = []
    m = record["accepted"]
    for i, token in enumerate(record["proposal"]):
        state = "accepted" if i < m else "rejected" if i == m else "unjudged"
        cells.append((state, token, record["target_choices"][i] if i <= m else None))
    cells.append(("bonus" if record["bonus"] else "correction", record["token"], None))
    return cells


def round_summary(record: dict, decode=None) -> str:
    """The round in words, e.g. "the draft proposed 'e', ' ', 'K'; the target accepted 2 ..."."""
    cells = round_cells(record)
    proposal = ", ".join(repr(_show(t, decode)) for _, t, _ in cells[:-1]) or "nothing"
    m, last = record["accepted"], cells[-1]
    said = f"after {record['position']} generated tokens the draft proposed {proposal}; "
    said += f"the target accepted {m} of {len(cells) - 1}"
    if last[0] == "bonus":
        said += f" and added its own next token {_show(last[1], decode)!r} (a bonus: k + 1 tokens this forward)"
    else:
        rejected = cells[m]
        said += (f", rejected {_show(rejected[1], decode)!r} (it wanted {_show(rejected[2], decode)!r}) "
                 f"and emitted its own {_show(last[1], decode)!r}")
    return said + f": {m + 1} token{'s' * (m > 0)} for one target forward"


def draw_round(record: dict, ax=None, decode=None, context_chars: int = 12):
    """Draw one round: the last ``context_chars`` tokens of context, the proposals with the
    target's verdicts under them, and the token the target emitted."""
    import matplotlib.pyplot as plt   # here, not at the top: ranks import this module and never draw
    from matplotlib.patches import Rectangle

    cells = round_cells(record)
    ax = ax or plt.gca()
    context = record.get("context", [])[-context_chars:]
    x = 0.0
    for token in context:
        ax.add_patch(Rectangle((x, 1), 0.95, 0.9, facecolor=COLOURS["context"], edgecolor="#999999"))
        ax.text(x + 0.47, 1.45, _show(token, decode), ha="center", va="center", fontsize=9)
        x += 1
    x += 0.4
    for state, token, choice in cells:
        ax.add_patch(Rectangle((x, 1), 0.95, 0.9, facecolor=COLOURS[state], edgecolor="black"))
        ax.text(x + 0.47, 1.45, _show(token, decode), ha="center", va="center", fontsize=10, weight="bold")
        if choice is not None:
            ax.text(x + 0.47, 0.65, _show(choice, decode), ha="center", va="center", fontsize=9,
                    color="#226622" if state == "accepted" else "#aa2222")
        ax.text(x + 0.47, 2.15, state, ha="center", va="center", fontsize=7, rotation=30)
        x += 1
    ax.text(-0.2, 0.65, "target's pick:", ha="right", va="center", fontsize=8)
    ax.text(-0.2, 1.45, "tokens:", ha="right", va="center", fontsize=8)
    ax.set_xlim(-3.2, x + 0.2)
    ax.set_ylim(0.3, 2.6)
    ax.axis("off")
    ax.set_title(f"round at token {record['position']}: {record['accepted']} of {len(cells) - 1} "
                 f"accepted, {record['accepted'] + 1} emitted", fontsize=10)
    return ax


def round_widget(trace: list[dict], decode=None) -> Explorer:
    """A slider over the rounds of one run; the picture and the sentence redraw on every move.

    The control is ``round``; :attr:`~Explorer.data` is the round's record last drawn.
    """
    if not isinstance(trace, list) or not trace:
        raise bad("trace", trace, "the non-empty list speculative_generate(trace=[]) fills")
    slider = widgets.IntSlider(value=0, min=0, max=len(trace) - 1, description="round")
    return Explorer({"round": slider}, lambda round: trace[round],
                    lambda record, ax: draw_round(record, ax, decode), title="one speculative round",
                    text=lambda record: round_summary(record, decode), figsize=(10, 2.2))
