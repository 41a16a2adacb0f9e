"""pass@k curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["plot_pass_at_k"]


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, summary in per_benchmark.items():
        curve = sorted((int(k), 100 * float(v)) for k, v in (summary.get("pass@k") or {}).items())
        if curve:
            ax.plot([k for k, _ in curve], [v for _, v in curve], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
