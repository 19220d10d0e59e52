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
    return {"model": model, "dtype": dtype, "strategy": strategy, "devices": devices,
            "device_gib": device_gib, "gib": gib, "headroom": headroom,
            "fits": fits(per_device, device_gib, headroom=headroom)}


def draw_memory(report: dict, ax=None):
    """A stacked bar of one device's memory against its capacity less the report's headroom.

    The legend sits right of the axes, never on the bars.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 2.6))
    left = 0.0
    for part in PARTS:
        ax.barh([0], [report["gib"][part]], left=left, color=COLOURS[part], label=part.replace("_", " "))
        left += report["gib"][part]
    usable = 1 - report["headroom"]
    ax.axvline(report["device_gib"] * usable, color="black", linestyle="--",
               label=f"usable ({usable:.0%}: {report['headroom']:.0%} headroom)")
    verdict = "fits" if report["fits"] else "does NOT fit"
    ax.set_title(f"{report['model']} in {report['dtype']}, {report['strategy']} on "
                 f"{report['devices']} device(s): "
                 f"{report['gib']['total']:.1f} GiB per device, {verdict} in {report['device_gib']} GiB",
                 fontsize=9)
    ax.set_yticks([])
    ax.set_xlabel("GiB per device")
    ax.set_xlim(0, max(left, report["device_gib"]) * 1.05)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return ax


SINGLE_NOTE = "strategy 'single' runs on one device: pick data, tensor or pipeline to use the devices slider"


class MemoryCalculator:
    """The ipywidgets UI: every control change recomputes :attr:`report` and redraws.

    The devices slider is disabled while the strategy is ``single`` (one device by definition),
    and :attr:`note` says so.
    """

    def __init__(self, model="Llama-2-7B", dtype="bf16", batch=1, context=4096, devices=1,
                 strategy="single", device_gib=80):
        import ipywidgets as w

        from .static import FallbackBox, figure_of

        wide = {"layout": w.Layout(width="100%"), "style": {"description_width": "80px"}}
        self.controls = {
            "model": w.Dropdown(options=sorted(REFERENCE_SHAPES), value=model, description="model"),
            "dtype": w.Dropdown(options=list(DTYPE_BYTES), value=dtype, description="dtype"),
            "strategy": w.Dropdown(options=STRATEGIES, value=strategy, description="strategy"),
            "device_gib": w.Dropdown(options=[16, 24, 40, 80, 141], value=device_gib, description="GiB/device"),
            "batch": w.IntSlider(value=batch, min=1, max=256, description="batch", **wide),
            "context": w.IntSlider(value=context, min=256, max=32768, step=256, description="context", **wide),
            "devices": w.IntSlider(value=devices, min=1, max=16, description="devices", **wide),
        }
        self.note = w.HTML()
        self.message = w.HTML()
        self.output = w.Output()
        for control in self.controls.values():
            control.observe(lambda _: self.update(), names="value")
        c = self.controls
        self.widget = FallbackBox(
            [w.HBox([c["model"], c["dtype"], c["strategy"], c["device_gib"]]),
             c["batch"], c["context"], c["devices"], self.note, self.message, self.output],
            title="memory calculator",
            picture=lambda: figure_of(lambda ax: draw_memory(self.report, ax), (8, 2.6)),
            text=lambda: ", ".join(f"{k}={v.value}" for k, v in self.controls.items()))
        self.update()

    def update(self) -> None:
        values = {name: c.value for name, c in self.controls.items()}
        single = values["strategy"] == "single"
        self.controls["devices"].disabled = single
        self.note.value = f"<i>{SINGLE_NOTE}</i>" if single else ""
        try:
            self.report = memory_report(**values)
            self.message.value = ""
        except ValueError as err:  # an impossible combination: say why, keep the last picture
            self.message.value = f"<b>{err}</b>"
            return
        redraw_output(self.output, lambda ax: draw_memory(self.report, ax), figsize=(8, 2.6))

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
