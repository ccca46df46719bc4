"""Figures of the synthetic experiments (matplotlib, no global state: each call builds its own
Figure, so nothing is drawn or configured at import)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

# (panel title, y label, [(series key, legend label), ...], draw a y = 0 line)
Panel = tuple[str, str, Sequence[tuple[str, str]], bool]


def sweep_figure(result: Mapping[str, Any], x_key: str, x_label: str, panels: Sequence[Panel], title: str) -> Figure:
    """One panel per entry of `panels`: mean over seeds with ± one standard error as a band."""
    series = result["series"]
    x = series[x_key]
    order = sorted(range(len(x)), key=lambda i: x[i])
    xs = [x[i] for i in order]
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel_title, y_label, lines, zero_line) in zip(axes, panels):
        for key, label in lines:
            if key not in series:
                continue
            mean = [series[key][i] for i in order]
            ax.plot(xs, mean, marker="o", label=label)
            sem = series.get(f"{key}_sem")
            if sem is not None:
                s = [sem[i] for i in order]
                ax.fill_between(xs, [m - e for m, e in zip(mean, s)], [m + e for m, e in zip(mean, s)], alpha=0.2)
        if zero_line:
            ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n_seeds = len(result.get("seeds", []))
    fig.suptitle(f"{title} (mean ± s.e. over {n_seeds} seeds)", fontsize=11)
    return fig
