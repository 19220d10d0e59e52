"""Time-budget calculator: batch, prompt, context and micro-batches -> TTFT and TPOT per layout, in parts."""

from __future__ import annotations

import functools

import ipywidgets as w

from ..sizing import LAYOUTS, LLAMA2_70B, PART_LABELS, PARTS, LLMShape, budget_table
from ..validate import bad
from .explorer import Explorer

COLOURS = {"weights": "#4C72B0", "kv_cache": "#DD8452", "compute": "#55A868",
           "tp_all_reduce": "#C44E52", "pp_hops": "#8172B3", "pp_bubble": "#BBBBBB"}
FIGSIZE = (11, 0.8 + 0.55 * len(LAYOUTS))


def budget_report(shape: LLMShape = LLAMA2_70B, layouts=LAYOUTS, *, batch: int = 1, prompt: int = 2048,
                  context: int = 4096, micro_batches: int = 1) -> dict:
    """Everything the calculator shows, as plain data (milliseconds per part, per layout)."""
    if not isinstance(shape, LLMShape):
        raise bad("shape", shape, "an LLMShape, e.g. LLAMA2_70B")
    rows = budget_table(shape, layouts, batch=batch, context=context, prompt=prompt,
                        micro_batches=micro_batches)
    return {"model": shape.name, "batch": batch, "prompt": prompt, "context": context,
            "micro_batches": micro_batches,
            "rows": [{"layout": r["layout"].name, "gpus": r["layout"].gpus,
                      "ttft_ms": {k: v * 1e3 for k, v in r["ttft"].items()},
                      "tpot_ms": {k: v * 1e3 for k, v in r["tpot"].items()},
                      "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"]} for r in rows]}


def draw_budget(report: dict, axes) -> None:
    """Two panels of stacked bars, one bar per layout: the prefill (TTFT) and one decode step (TPOT)."""
    names = [r["layout"] for r in report["rows"]]
    for ax, key, title in ((axes[0], "ttft_ms", f"prefill of {report['prompt']} tokens (TTFT)"),
                           (axes[1], "tpot_ms", f"one decode step at {report['context']} tokens (TPOT)")):
        left = [0.0] * len(names)
        for part in PARTS:            # one call per part: every layout's bar at once
            widths = [row[key][part] for row in report["rows"]]
            ax.barh(range(len(names)), widths, left=left, color=COLOURS[part], label=PART_LABELS[part])
            left = [a + b for a, b in zip(left, widths)]
        for i, total in enumerate(left):
            ax.text(total, i, f" {total:.1f}", va="center", fontsize=8)
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms")
        ax.set_xlim(0, 1.2 * max(r[key]["total"] for r in report["rows"]))
        ax.set_title(f"{title}, batch {report['batch']}", fontsize=9)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)


def budget_text(report: dict) -> str:
    """The settings the picture is drawn for, in one line."""
    return (f"{report['model']}: batch {report['batch']}, prompt {report['prompt']} tokens, "
            f"context {report['context']} tokens, {report['micro_batches']} micro-batch(es)")


class BudgetCalculator(Explorer):
    """Sliders for batch, prompt, context and micro-batches; every change recomputes :attr:`data`
    (a :func:`budget_report`) and redraws. ``layouts`` adds rows (e.g. one over this machine's link).
    Values that cannot go together (more micro-batches than sequences) keep the last picture and
    say why in :attr:`error`."""

    def __init__(self, shape: LLMShape = LLAMA2_70B, layouts=LAYOUTS, batch=1, prompt=2048, context=4096,
                 micro_batches=1):
        if not isinstance(shape, LLMShape):
            raise bad("shape", shape, "an LLMShape, e.g. LLAMA2_70B")
        layouts = tuple(layouts)
        wide = {"layout": w.Layout(width="100%"), "style": {"description_width": "130px"}}
        controls = {
            "batch": w.IntSlider(value=batch, min=1, max=512, description="batch", **wide),
            "prompt": w.IntSlider(value=prompt, min=128, max=32768, step=128, description="prompt tokens", **wide),
            "context": w.IntSlider(value=context, min=128, max=32768, step=128, description="context (decode)",
                                   **wide),
            "micro_batches": w.IntSlider(value=micro_batches, min=1, max=16, description="micro-batches",
                                         **wide),
        }
        super().__init__(controls, functools.partial(budget_report, shape, layouts), draw_budget,
                         title="time-budget calculator", text=budget_text, figsize=FIGSIZE, ncols=2)
