"""Figures of finished runs, from their ``results.json`` (``fedlit plot RUN_DIR… --out DIR``).

    accuracy_vs_round.png      one panel per metric (Local / Base / Novel / HM), one line per run
    per_client_<run>.png       Local / Base / Novel bars for every client of one run (final evaluation)
    methods.png                Local / Base / Novel / HM grouped bars, one group per run

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas — no pyplot state, no display,
nothing changes the backend of a notebook that imports this module. The same per-client figure is logged
to TensorBoard after each evaluation (``eval/per_client_accuracy``).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from ..errors import FedlitError
from ..figures import COLORS, LABELS, METRICS, per_client_figure  # noqa: F401  (the library's, re-exported)
from ..figures import figure as _figure
from ..figures import present as _present


def accuracy_figure(runs: list[dict]):
    """Accuracy against round: one panel per metric, one line per run."""
    metrics = _present([h for r in runs for h in r.get("history", [])]) or list(METRICS)
    cols = 2 if len(metrics) > 1 else 1
    rows = math.ceil(len(metrics) / cols)
    fig = _figure(5.0 * cols, 3.2 * rows)
    for k, m in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, k + 1)
        for run in runs:
            pts = [(h["round"], h[m]) for h in run.get("history", []) if m in h and "round" in h]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=run["label"])
        ax.set_title(LABELS[m])
        ax.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole numbers
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def methods_figure(runs: list[dict]):
    """Final Local / Base / Novel / HM as grouped bars, one group per run."""
    metrics = _present([r.get("final", {}) for r in runs]) or list(METRICS)
    fig = _figure(max(5.0, 1.4 * len(runs) + 2.0), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(runs))]
        ax.bar(xs, [r.get("final", {}).get(m, float("nan")) for r in runs], width, label=LABELS[m], color=COLORS[m])
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([r["label"] for r in runs], rotation=20 if len(runs) > 4 else 0, ha="right" if len(runs) > 4 else "center")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("final accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", ncols=len(metrics), fontsize="small")
    fig.tight_layout()
    return fig


def load_run(path: str | Path) -> dict | None:
    """A finished run's results (``path`` = run directory or its ``results.json``); ``None`` with a warning
    on stderr when there is nothing usable (missing, unfinished, unreadable)."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / "results.json"
    if not file.is_file():
        why = "does not exist" if not path.exists() else "has no results.json (unfinished or not a run directory)"
        print(f"warning: skipping {path}: {why}", file=sys.stderr)
        return None
    try:
        results = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        print(f"warning: skipping {path}: unreadable results.json ({e})", file=sys.stderr)
        return None
    if not isinstance(results, dict) or not (results.get("history") or results.get("final")):
        print(f"warning: skipping {path}: results.json holds no evaluation", file=sys.stderr)
        return None
    results.setdefault("history", [])
    results.setdefault("per_client", {})
    results.setdefault("final", {})
    results["path"] = str(file.parent)
    return results


def _labels(runs: list[dict]) -> None:
    """``label`` = method name, or ``method (run dir)`` where several runs share a method."""
    names = [str(r.get("method", Path(r["path"]).name)) for r in runs]
    for run, name in zip(runs, names):
        run["label"] = name if names.count(name) == 1 else f"{name} ({Path(run['path']).name})"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> list[Path]:
    """Write the PNGs of the finished runs among ``run_dirs`` into ``out``; returns their paths."""
    runs = [r for r in (load_run(p) for p in run_dirs) if r is not None]
    if not runs:
        raise FedlitError(f"no finished run among {len(run_dirs)} path(s) (a finished run directory holds "
                          f"results.json); pass run directories written by `fedlit fit`")
    _labels(runs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FedlitError(f"cannot create output directory {out} ({e.strerror}); choose another --out") from None
    figures = [("accuracy_vs_round.png", accuracy_figure(runs)), ("methods.png", methods_figure(runs))]
    used = set()
    for run in runs:
        if run["per_client"]:
            name = f"per_client_{_slug(run['label'])}.png"
            while name in used:
                name = name[:-4] + "_.png"
            used.add(name)
            figures.append((name, per_client_figure(run["per_client"], f"{run['label']}: per-client accuracy")))
    written = []
    for name, fig in figures:
        fig.savefig(out / name)
        written.append(out / name)
    return written


__all__ = ["accuracy_figure", "load_run", "methods_figure", "per_client_figure", "plot_runs"]
