"""The per-client accuracy figure the round loop logs to TensorBoard (``eval/per_client_accuracy``), and the
figure helpers the plotting app (:mod:`fedlit.apps.plot`) shares. Built on :class:`matplotlib.figure.Figure` with
the Agg canvas: no pyplot state, no display, nothing changes the backend of a notebook.
"""

from __future__ import annotations

import math

from .errors import FedlitError

METRICS = ("local", "base", "novel", "hm")
LABELS = {"local": "Local", "base": "Base", "novel": "Novel", "hm": "HM"}
COLORS = {"local": "#4C72B0", "base": "#55A868", "novel": "#C44E52", "hm": "#8172B2"}


def figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a core dependency
        raise FedlitError("plotting needs matplotlib; install it with `pip install matplotlib`") from None
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def present(rows, metrics=METRICS) -> list[str]:
    """Metrics that at least one row holds as a finite number (pFedPG/VPT have no Novel)."""
    return [m for m in metrics if any(finite(r.get(m)) for r in rows)]


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def accuracy_axis(ax, values: list[float], pad: float = 4.0) -> None:
    """Y range around the data (with ``pad`` points of room), inside [0, 100]."""
    vals = [v for v in values if finite(v)]
    if vals:
        lo, hi = max(0.0, min(vals) - pad), min(100.0, max(vals) + pad)
        ax.set_ylim(lo, hi if hi > lo else lo + 1.0)
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)


def bar_axis(ax, values: list[float], horizontal: bool = False, pad: float = 8.0) -> None:
    """Accuracy axis of a bar chart: from 0 (bars are read by their length) to the data + ``pad`` (≤ 100)."""
    vals = [v for v in values if finite(v)]
    hi = min(100.0, max(vals) + pad) if vals else 100.0
    (ax.set_xlim if horizontal else ax.set_ylim)(0.0, max(hi, 1.0))
    (ax.set_xlabel if horizontal else ax.set_ylabel)("accuracy (%)")
    ax.grid(axis="x" if horizontal else "y", alpha=0.3)


def value_labels(ax, bars, values: list[float], size: float = 7.0, rotation: float = 0.0) -> None:
    """Each bar's value (one decimal) at its end."""
    ax.bar_label(bars, labels=[f"{v:.1f}" if finite(v) else "" for v in values], padding=2, fontsize=size,
                 rotation=rotation)


def per_client_figure(per_client: dict, title: str = "per-client accuracy", names: dict | None = None):
    """Grouped bars: for every client its Local / Base / Novel accuracy (percent), the axis from 0, values on
    the bars (up to 16 clients), the legend under the axes. ``names``: a label per client (its domain or dataset
    in a domain / pooled run), shown under the client's number."""
    clients = sorted(per_client, key=lambda c: int(c))
    rows = [per_client[c] for c in clients]
    metrics = present(rows, ("local", "base", "novel"))
    names = {str(k): v for k, v in (names or {}).items()}
    # width capped at 40 in (4,800 px): with 1,000 clients an uncapped canvas (90,000 px) cost ~800 MB of peak memory
    fig = figure(min(max(5.0, (1.2 if names else 0.9) * len(clients) + 2.0), 40.0), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(metrics), 1)
    for j, m in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(clients))]
        vals = [r.get(m, float("nan")) for r in rows]
        bars = ax.bar(xs, vals, width, label=LABELS[m], color=COLORS[m])
        if len(clients) <= 16:
            value_labels(ax, bars, vals, size=6.0, rotation=90 if len(metrics) * len(clients) > 12 else 0)
    every = max(1, len(clients) // 40)  # at most ~40 client labels
    ax.set_xticks(range(0, len(clients), every))
    ax.set_xticklabels([f"{int(c)}\n{names[str(c)]}" if str(c) in names else str(int(c)) for c in clients[::every]],
                       fontsize="small")
    ax.set_xlabel("client" + (" (domain / dataset)" if names else ""))
    bar_axis(ax, [r.get(m) for r in rows for m in metrics], pad=12.0)
    ax.set_title(title)
    if metrics:  # under the axes, inside the figure
        fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=len(metrics), fontsize="small",
                   frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
