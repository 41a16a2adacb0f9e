"""The plots of evaluation and study results, and the figure helpers every plot of hpt uses.

A figure is data: ``panels`` maps a panel's title to its lines, and a line's name to its
``(x, y)`` points. :func:`draw_panels` draws such a row of panels and saves it as a PNG with
matplotlib's Agg canvas (no display, no pyplot state), written atomically. ``hpt eval`` draws
:func:`plot_pass_at_k`; ``hpt demo`` (``hpt.demo.study.draw_plots``) and ``hpt plot``
(``hpt.train.plots``) draw their curves with :func:`draw_panels`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpt.utils import atomic_write_bytes

__all__ = ["Curve", "Panels", "draw_panels", "pass_at_k_curve", "plot_pass_at_k", "save_figure"]

Curve = tuple[Sequence[float], Sequence[float]]  # (x, y)
Panels = Mapping[str, Mapping[str, Curve]]  # panel title -> line name -> curve

MARKERS_UP_TO = 30  # a line with more points is drawn without markers
DPI = 120


def save_figure(figure: Any, path: str | Path, dpi: int = DPI) -> Path:
    """Render ``figure`` to PNG with the Agg canvas and write it atomically (parents created)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure)  # attaches itself: savefig renders with Agg, whatever the backend
    figure.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def draw_panels(
    path: str | Path,
    panels: Panels,
    *,
    ylabel: str,
    xlabel: str = "step",
    title: str | None = None,
    ylim: tuple[float, float] | None = None,
    log2_x: bool = False,
    panel_size: tuple[float, float] = (6.4, 4.0),
    legend: bool = True,
) -> Path:
    """Draw a row of line panels and save it as a PNG.

    Args:
        path: The PNG to write.
        panels: Panel title -> line name -> ``(x, y)``; a line without points is skipped.
        ylabel, xlabel: Axis labels (shared by the panels).
        title: The figure's title above the panels (None: only the panels' titles).
        ylim: The y range of every panel (None: matplotlib's choice).
        log2_x: A log2 x axis (k of pass@k).
        panel_size: Width and height of one panel, inches.
        legend: Draw a legend on panels with named lines.

    Returns:
        The written path.
    """
    from matplotlib.figure import Figure

    width, height = panel_size
    figure = Figure(figsize=(width * len(panels), height), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, lines) in zip(axes, panels.items()):
        for name, (x, y) in lines.items():
            if len(x):
                marker = "o" if len(x) <= MARKERS_UP_TO else None
                ax.plot(x, y, marker=marker, markersize=3, label=name)
        ax.set(title=panel, xlabel=xlabel, ylabel=ylabel)
        if log2_x:
            ax.set_xscale("log", base=2)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(True, alpha=0.3)
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return save_figure(figure, path)


def pass_at_k_curve(values: Mapping[Any, float], scale: float = 1.0) -> Curve:
    """``{k: pass@k}`` (k as int or string) as ``(ks, values * scale)`` sorted by k."""
    points = sorted((int(k), scale * float(v)) for k, v in values.items())
    return [k for k, _ in points], [v for _, v in points]


def plot_pass_at_k(
    per_benchmark: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "pass@k"
) -> Path:
    """Draw pass@k against k (log2 axis), one line per benchmark, and save it as a PNG.

    Args:
        per_benchmark: benchmark name -> summary with ``"pass@k": {"1": p1, "2": p2, ...}``
            (fractions; drawn in percent).
        path: the PNG to write (parents are created).
        title: the figure title.

    Returns:
        The written path.
    """
    lines = {
        name: pass_at_k_curve(summary.get("pass@k") or {}, scale=100.0)
        for name, summary in per_benchmark.items()
    }
    return draw_panels(
        path, {title: lines}, ylabel="pass@k (%)", xlabel="k (samples)", ylim=(0, 100), log2_x=True
    )
