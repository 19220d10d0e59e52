"""Memory calculator: model, dtype, batch, context, devices, strategy -> memory per device, fits or not."""

from __future__ import annotations

import ipywidgets as w
import matplotlib.pyplot as plt

from ..sizing import DTYPE_BYTES, GiB, REFERENCE_SHAPES, STRATEGIES, fits, memory_per_device
from ..validate import check_choice, check_real
from .explorer import Explorer

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


def memory_text(report: dict) -> str:
    """The report in one line (and why the devices slider is off while the strategy is single)."""
    verdict = "fits" if report["fits"] else "does NOT fit"
    line = (f"{report['model']} in {report['dtype']}, {report['strategy']} on {report['devices']} device(s): "
            f"{report['gib']['total']:.1f} GiB per device, {verdict} in {report['device_gib']} GiB")
    return line + (f"\n{SINGLE_NOTE}" if report["strategy"] == "single" else "")


def _devices_rule(explorer: Explorer, _name: str) -> None:
    """One device by definition while the strategy is ``single``: the slider is switched off."""
    explorer.controls["devices"].disabled = explorer.controls["strategy"].value == "single"


class MemoryCalculator(Explorer):
    """The calculator: every control change recomputes :attr:`data` (a :func:`memory_report`) and redraws.

    The devices slider is disabled while the strategy is ``single`` (one device by definition),
    and the text line says so. An impossible combination (batch smaller than the data-parallel
    devices) keeps the last picture and shows why in :attr:`error`.
    """

    def __init__(self, model="Llama-2-7B", dtype="bf16", batch=1, context=4096, devices=1,
                 strategy="single", device_gib=80):
        wide = {"layout": w.Layout(width="100%"), "style": {"description_width": "80px"}}
        controls = {
            "model": w.Dropdown(options=sorted(REFERENCE_SHAPES), value=model, description="model"),
            "dtype": w.Dropdown(options=list(DTYPE_BYTES), value=dtype, description="dtype"),
            "strategy": w.Dropdown(options=STRATEGIES, value=strategy, description="strategy"),
            "device_gib": w.Dropdown(options=[16, 24, 40, 80, 141], value=device_gib, description="GiB/device"),
            "batch": w.IntSlider(value=batch, min=1, max=256, description="batch", **wide),
            "context": w.IntSlider(value=context, min=256, max=32768, step=256, description="context", **wide),
            "devices": w.IntSlider(value=devices, min=1, max=16, description="devices", **wide),
        }
        super().__init__(controls, memory_report, draw_memory, title="memory calculator", text=memory_text,
                         figsize=(8, 2.6), rows=[["model", "dtype", "strategy", "device_gib"], ["batch"],
                                                 ["context"], ["devices"]], on_change=_devices_rule)
        _devices_rule(self, "strategy")
