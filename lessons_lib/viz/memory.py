"""Memory calculator: model, dtype, batch, context, devices, strategy -> memory per device, fits or not."""

from __future__ import annotations

import matplotlib.pyplot as plt

from ..memory import DTYPE_BYTES, GiB, REFERENCE_SHAPES, STRATEGIES, fits, memory_per_device
from ..validate import check_choice, check_real
from . import redraw as redraw_output

HEADROOM = 0.1  # the share of a device kept back for the runtime, drawn as the "usable" line
PARTS = ("weights", "kv_cache", "activations")
COLOURS = {"weights": "#4C72B0", "kv_cache": "#DD8452", "activations": "#55A868"}


def memory_report(model: str, dtype: str, batch: int, context: int, devices: int, strategy: str,
                  device_gib: float, headroom: float = HEADROOM) -> dict:
    """Everything the calculator shows, as plain data: GiB per part, total, and whether it fits
    once ``headroom`` of the device is kept back (shown on the picture as the "usable" line)."""
    check_choice("model", model, sorted(REFERENCE_SHAPES))
    check_real("device_gib", device_gib, low=0, low_open=True)
    if strategy == "single":
        devices = 1
    per_device = memory_per_device(REFERENCE_SHAPES[model], dtype=dtype, batch=batch, context=context,
                                   devices=devices, strategy=strategy)
    gib = {part: per_device[part] / GiB for part in (*PARTS, "total")}
    return {"model": model, "strategy": strategy, "devices": devices, "device_gib": device_gib,
            "gib": gib, "headroom": headroom, "fits": fits(per_device, device_gib, headroom=headroom)}


def draw_memory(report: dict, ax=None):
    """A stacked bar of one device's memory against its capacity less the report's headroom."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 2.2))
    left = 0.0
    for part in PARTS:
        ax.barh([0], [report["gib"][part]], left=left, color=COLOURS[part], label=part.replace("_", " "))
        left += report["gib"][part]
    usable = 1 - report["headroom"]
    ax.axvline(report["device_gib"] * usable, color="black", linestyle="--",
               label=f"usable ({usable:.0%}: {report['headroom']:.0%} headroom)")
    verdict = "fits" if report["fits"] else "does NOT fit"
    ax.set_title(f"{report['model']}, {report['strategy']} on {report['devices']} device(s): "
                 f"{report['gib']['total']:.1f} GiB per device, {verdict} in {report['device_gib']} GiB")
    ax.set_yticks([])
    ax.set_xlabel("GiB per device")
    ax.set_xlim(0, max(left, report["device_gib"]) * 1.05)
    ax.legend(loc="lower right", fontsize=7, ncol=4)
    return ax


class MemoryCalculator:
    """The ipywidgets UI: every control change recomputes :attr:`report` and redraws."""

    def __init__(self, model="Llama-2-7B", dtype="bf16", batch=1, context=4096, devices=1,
                 strategy="single", device_gib=80):
        import ipywidgets as w

        self.controls = {
            "model": w.Dropdown(options=sorted(REFERENCE_SHAPES), value=model, description="model"),
            "dtype": w.Dropdown(options=list(DTYPE_BYTES), value=dtype, description="dtype"),
            "batch": w.IntSlider(value=batch, min=1, max=256, description="batch"),
            "context": w.IntSlider(value=context, min=256, max=32768, step=256, description="context"),
            "devices": w.IntSlider(value=devices, min=1, max=16, description="devices"),
            "strategy": w.Dropdown(options=STRATEGIES, value=strategy, description="strategy"),
            "device_gib": w.Dropdown(options=[16, 24, 40, 80, 141], value=device_gib, description="GiB/device"),
        }
        self.message = w.HTML()
        self.output = w.Output()
        for control in self.controls.values():
            control.observe(lambda _: self.update(), names="value")
        self.widget = w.VBox([w.HBox(list(self.controls.values())[:4]),
                              w.HBox(list(self.controls.values())[4:]), self.message, self.output])
        self.update()

    def update(self) -> None:
        values = {name: c.value for name, c in self.controls.items()}
        try:
            self.report = memory_report(**values)
            self.message.value = ""
        except ValueError as err:  # an impossible combination: say why, keep the last picture
            self.message.value = f"<b>{err}</b>"
            return
        redraw_output(self.output, lambda ax: draw_memory(self.report, ax), figsize=(8, 2.2))

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
