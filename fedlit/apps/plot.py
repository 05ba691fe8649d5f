"""Figures of finished runs, from their ``results.json`` (``fedlit plot RUN_DIR_OR_FOLDER… --out DIR``).

    accuracy_vs_round.{png,pdf}   one panel per metric (Local / Base / Novel / HM): a line per method, mean over
                                  seeds with a ± std band; methods with nothing to train (zero-shot CLIP) are a
                                  dashed reference line
    methods.{png,pdf}             final Local / Base / Novel / HM per method: bars = mean over seeds, whiskers =
                                  ± std, black diamonds = the paper's value where a paper printed that cell
    per_client_<method>.{png,pdf} Local / Base / Novel bars for every client of a method's run (first seed)

Runs are grouped like ``fedlit summarize`` groups them: one group per (method, dataset, backbone), its seeds
averaged, reruns of one seed counted once. Titles name the dataset and backbone; labels name only what differs
between groups; the accuracy axis spans the data (not 0–100), so gaps of a few points stay visible.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas — no pyplot state, no display,
nothing changes the backend of a notebook that imports this module. The per-client figure is also logged to
TensorBoard after each evaluation (``eval/per_client_accuracy``).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import FedlitError
from ..figures import COLORS, LABELS, METRICS, accuracy_axis, figure, finite, mean_std, per_client_figure, present

FORMATS = ("png", "pdf")


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class Group:
    """The runs of one (method, dataset, backbone): one per seed."""

    method: str
    dataset: str
    backbone: str
    runs: list[dict]
    label: str = ""

    @property
    def single_evaluation(self) -> bool:
        """Every run evaluated once (zero-shot CLIP: nothing to train, one evaluation is the result)."""
        return all(len(r.get("history", [])) <= 1 for r in self.runs)

    def final(self, metric: str) -> tuple[float, float] | None:
        vals = [float(r["final"][metric]) for r in self.runs if finite(r.get("final", {}).get(metric))]
        return mean_std(vals) if vals else None

    def curve(self, metric: str) -> tuple[list[int], list[float], list[float]]:
        """Rounds every seed evaluated, with the mean and std over seeds there."""
        per_run = [{h["round"]: h[metric] for h in r.get("history", []) if finite(h.get(metric)) and "round" in h}
                   for r in self.runs]
        rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
        stats = [mean_std([p[t] for p in per_run]) for t in rounds]
        return rounds, [s[0] for s in stats], [s[1] for s in stats]


def group_runs(runs: list[dict]) -> list[Group]:
    """Groups in the paper's order (as ``fedlit summarize`` orders rows), labelled by what differs between them."""
    from .paper_results import DATASET_NAMES, METHOD_NAMES, TABLE1_DATASETS, TABLE1_METHODS
    from .summarize import expand_groups, one_run_per_seed

    by: dict[tuple[str, str, str], list[dict]] = {}
    for r in expand_groups(runs):
        by.setdefault((str(r["method"]), r["dataset"], str(r.get("backbone", "?"))), []).append(r)

    def order(key):
        m, d, b = key
        return (b, TABLE1_METHODS.index(m) if m in TABLE1_METHODS else len(TABLE1_METHODS), m,
                TABLE1_DATASETS.index(d) if d in TABLE1_DATASETS else len(TABLE1_DATASETS), d)

    groups = [Group(m, d, b, one_run_per_seed(rs, _warn)) for (m, d, b), rs in sorted(by.items(), key=lambda kv:
                                                                                        order(kv[0]))]
    vary_d = len({g.dataset for g in groups}) > 1
    vary_b = len({g.backbone for g in groups}) > 1
    for g in groups:
        parts = [METHOD_NAMES.get(g.method, g.method)]
        if vary_d:
            parts.append(DATASET_NAMES.get(g.dataset, g.dataset))
        if vary_b:
            parts.append(g.backbone)
        g.label = " · ".join(parts)
    return groups


def _title(groups: list[Group], what: str) -> str:
    from .paper_results import DATASET_NAMES

    ds = {g.dataset for g in groups}
    bb = {g.backbone for g in groups}
    where = []
    if len(ds) == 1:
        where.append(DATASET_NAMES.get(next(iter(ds)), next(iter(ds))))
    if len(bb) == 1:
        where.append(next(iter(bb)))
    seeds = sorted({len(g.runs) for g in groups})
    n = f"{seeds[0]} seed{'s' if seeds[0] > 1 else ''}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]} seeds"
    return f"{what} — {', '.join(where)} ({n})" if where else f"{what} ({n})"


# ----------------------------------------------------------------------------------------------- figures
def accuracy_figure(groups: list[Group], title: str | None = None):
    """Accuracy against round, one panel per metric: mean over seeds ± std band per method; methods with nothing
    to train are dashed horizontal reference lines at their (single) evaluation."""
    metrics = present([h for g in groups for r in g.runs for h in r.get("history", [])]) or list(METRICS)
    cols = 2 if len(metrics) > 1 else 1
    nrows = math.ceil(len(metrics) / cols)
    fig = figure(5.2 * cols + 1.6, 3.0 * nrows + 0.6)
    colors = _group_colors(groups)
    last_round = max([h.get("round", 1) for g in groups for r in g.runs for h in r.get("history", [])] or [1])
    for k, m in enumerate(metrics):
        ax = fig.add_subplot(nrows, cols, k + 1)
        values = []
        for g in groups:
            rounds, mean, std = g.curve(m)
            if not rounds:
                continue
            if g.single_evaluation and last_round > 1:
                ax.axhline(mean[-1], color=colors[g.label], linestyle="--", linewidth=1.2, label=g.label)
                values.append(mean[-1])
                continue
            ax.plot(rounds, mean, marker="o", markersize=3, color=colors[g.label], label=g.label)
            if any(s > 0 for s in std):
                ax.fill_between(rounds, [a - s for a, s in zip(mean, std)], [a + s for a, s in zip(mean, std)],
                                color=colors[g.label], alpha=0.2, linewidth=0)
            values += [a - s for a, s in zip(mean, std)] + [a + s for a, s in zip(mean, std)]
        ax.set_title(LABELS[m])
        ax.set_xlim(0.5, last_round + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole numbers
        ax.set_xlabel("round")
        accuracy_axis(ax, values)
    handles, labels = fig.axes[0].get_legend_handles_labels() if fig.axes else ([], [])
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize="small", frameon=False)
    fig.suptitle(title or _title(groups, "Accuracy against round"))
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    return fig


def methods_figure(groups: list[Group], title: str | None = None):
    """Final Local / Base / Novel / HM per method: bars = mean over seeds, whiskers = ± std, black diamonds =
    the paper's value for that (method, dataset) where one is known."""
    from .summarize import paper_for

    finals = [{m: (g.final(m) or (float("nan"), 0.0))[0] for m in METRICS} for g in groups]
    metrics = present(finals) or list(METRICS)
    fig = figure(max(6.0, 1.3 * len(groups) * max(1, len(metrics)) / 3 + 2.5), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(metrics)
    values, marked = [], False
    for j, m in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(groups))]
        stats = [g.final(m) for g in groups]
        means = [s[0] if s else float("nan") for s in stats]
        errs = [s[1] if s else 0.0 for s in stats]
        ax.bar(xs, means, width, label=LABELS[m], color=COLORS[m])
        if any(errs):  # whiskers only where there is a spread (several seeds)
            ax.errorbar(xs, means, yerr=[e if e > 0 else float("nan") for e in errs], fmt="none", ecolor="black",
                        capsize=2, linewidth=1)
        values += [a - e for a, e in zip(means, errs)] + [a + e for a, e in zip(means, errs)]
        for x, g in zip(xs, groups):
            paper = paper_for(g.method, g.dataset)[0].get(m)  # ({metric: value}, paper name)
            if finite(paper):
                ax.plot([x], [paper], marker="D", markersize=4, color="black", linestyle="none",
                        label=None if marked else "paper")
                values.append(paper)
                marked = True
    ax.set_xticks(range(len(groups)))
    long = len(groups) > 4 or max((len(g.label) for g in groups), default=0) > 12
    ax.set_xticklabels([g.label for g in groups], rotation=25 if long else 0, ha="right" if long else "center")
    accuracy_axis(ax, values, pad=6.0)
    ax.set_title(title or _title(groups, "Final accuracy"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def _group_colors(groups: list[Group]) -> dict[str, str]:
    palette = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B2", "#937860", "#DA8BC3", "#8C8C8C",
               "#CCB974", "#64B5CD"]
    return {g.label: palette[i % len(palette)] for i, g in enumerate(groups)}


# ----------------------------------------------------------------------------------------------- files
def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def save(fig, stem: Path, formats=FORMATS) -> list[Path]:
    """Write ``fig`` as ``stem.png`` and ``stem.pdf`` (by default)."""
    out = []
    for ext in formats:
        path = stem.with_name(f"{stem.name}.{ext}")
        fig.savefig(path, bbox_inches="tight")
        out.append(path)
    return out


def plot_runs(paths: list[str | Path], out: str | Path, formats=FORMATS) -> list[Path]:
    """Write the figures of the finished runs in ``paths`` (run directories or folders holding them) into
    ``out``; returns the files written."""
    from .summarize import find_runs

    runs = [r for r in find_runs(paths, warn=_warn) if r.get("history") or r.get("final")]
    if not runs:
        raise FedlitError(f"no finished run among {len(paths)} path(s) (a finished run directory holds "
                          f"results.json); pass run directories written by `fedlit fit`, or folders holding them")
    groups = group_runs(runs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FedlitError(f"cannot create output directory {out} ({e.strerror}); choose another --out") from None
    written = save(accuracy_figure(groups), out / "accuracy_vs_round", formats)
    written += save(methods_figure(groups), out / "methods", formats)
    used = set()
    for g in groups:
        run = g.runs[0]
        if run.get("per_client"):
            name = f"per_client_{_slug(g.label)}"
            while name in used:
                name += "_"
            used.add(name)
            seed = f", seed {run.get('seed', '?')}" if len(g.runs) > 1 else ""
            fig = per_client_figure(run["per_client"], f"{g.label}: per-client accuracy{seed}")
            written += save(fig, out / name, formats)
    return written


__all__ = ["Group", "accuracy_figure", "group_runs", "methods_figure", "per_client_figure", "plot_runs", "save"]
