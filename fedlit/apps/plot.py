"""Figures of finished runs, from their ``results.json`` (``fedlit plot RUN_DIR_OR_FOLDER… --out DIR``).

    accuracy_vs_round.{png,pdf}   one panel per metric (Local / Base / Novel / HM): a line per group, mean over
                                  the seeds that evaluated each round (runs of different lengths are not cut to
                                  the shortest) with a ± std band; methods with nothing to train (zero-shot CLIP)
                                  are a dashed reference line; the legend under the panels
    methods.{png,pdf}             the reported Local / Base / Novel / HM (each run's ``final``, the statistic named
                                  in the title), one panel per metric: horizontal bars from 0 with their values,
                                  whiskers = ± std, black diamonds = the paper's value where a paper printed it
    per_client_<method>_<dataset>_<key>.{png,pdf}
                                  Local / Base / Novel bars (from 0, with values) for every client of a group's
                                  first seed; a domain / pooled run's clients are labelled by domain / dataset

Runs are grouped like ``fedlit summarize`` makes rows: one group per (method, dataset, backbone, report config —
:func:`fedlit.settings.report_config`, everything that changes the numbers but the seed), its seeds averaged,
reruns of one seed counted once; ``<key>`` is the config's report key, so a figure of another config never
replaces one. Titles name the dataset and backbone; labels name only what differs between groups (dataset,
backbone, the differing settings). Curves' accuracy axes span the data, so gaps of a few points stay visible; bar
axes start at 0.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas — no pyplot state, no display,
nothing changes the backend of a notebook that imports this module. The per-client figure is also logged to
TensorBoard after each evaluation (``eval/per_client_accuracy``).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FedlitError
from ..figures import (COLORS, LABELS, METRICS, accuracy_axis, bar_axis, figure, finite, mean_std, per_client_figure,
                       present, value_labels)

FORMATS = ("png", "pdf")


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class Group:
    """The runs of one (method, dataset, backbone, report config): one per seed."""

    method: str
    dataset: str
    backbone: str
    runs: list[dict]
    label: str = ""
    key: str = ""  # the report key (fedlit.settings.report_key)
    settings: dict = field(default_factory=dict)  # the keys that tell it from another group of its method+dataset
    part_of: str = ""  # a per-domain / per-dataset group of a run of several: that run's dataset label

    @property
    def single_evaluation(self) -> bool:
        """Every run evaluated once (zero-shot CLIP: nothing to train, one evaluation is the result)."""
        return all(len(r.get("history", [])) <= 1 for r in self.runs)

    def final(self, metric: str) -> tuple[float, float] | None:
        vals = [float(r["final"][metric]) for r in self.runs if finite(r.get("final", {}).get(metric))]
        return mean_std(vals) if vals else None

    def curve(self, metric: str) -> tuple[list[int], list[float], list[float]]:
        """Every round some seed evaluated, with the mean and std over the seeds that evaluated it (runs of
        different lengths: the curve goes on with the longer ones, never cut to the shortest)."""
        per_run = [{h["round"]: h[metric] for h in r.get("history", []) if finite(h.get(metric)) and "round" in h}
                   for r in self.runs]
        rounds = sorted(set().union(*per_run)) if per_run else []
        stats = [mean_std([p[t] for p in per_run if t in p]) for t in rounds]
        return rounds, [s[0] for s in stats], [s[1] for s in stats]


def group_runs(runs: list[dict]) -> list[Group]:
    """Groups as ``fedlit summarize`` makes rows (method, dataset, backbone, report config; the paper's order),
    labelled by what differs between them: dataset and backbone where several, and the settings that tell apart
    groups of one method and dataset."""
    from ..settings import differing, report_key, short_value
    from .paper_results import DATASET_NAMES, METHOD_NAMES, TABLE1_DATASETS, TABLE1_METHODS
    from .summarize import expand_groups, one_run_per_seed

    by: dict[tuple[str, str, str, str], list[dict]] = {}
    for r in expand_groups(runs):
        key = report_key(r.get("_config") or {})
        by.setdefault((str(r["method"]), r["dataset"], str(r.get("backbone", "?")), key), []).append(r)

    def order(k):
        m, d, b, _ = k
        return (b, TABLE1_METHODS.index(m) if m in TABLE1_METHODS else len(TABLE1_METHODS), m,
                TABLE1_DATASETS.index(d) if d in TABLE1_DATASETS else len(TABLE1_DATASETS), d, k[3])

    groups = [Group(m, d, b, one_run_per_seed(rs, _warn), key=k, part_of=rs[0].get("_part_of", ""))
              for (m, d, b, k), rs in sorted(by.items(), key=lambda kv: order(kv[0]))]
    same: dict[tuple[str, str, str], list[Group]] = {}
    for g in groups:
        same.setdefault((g.method, g.dataset, g.backbone), []).append(g)
    for gs in same.values():
        configs = [g.runs[0].get("_config") or {} for g in gs]
        for k in differing(configs) if len(gs) > 1 else []:
            for g, c in zip(gs, configs):
                g.settings[k] = short_value(c.get(k))
    vary_d = len({g.dataset for g in groups}) > 1
    vary_b = len({g.backbone for g in groups}) > 1
    for g in groups:
        parts = [METHOD_NAMES.get(g.method, g.method)]
        if vary_d:
            parts.append(DATASET_NAMES.get(g.dataset, g.dataset))
        if vary_b:
            parts.append(g.backbone)
        if g.settings:
            parts.append(", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in g.settings.items()))
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


def _statistic_note(groups: list[Group]) -> str:
    from ..metrics import STATISTIC_LABELS

    sels = sorted({r.get("selection", "last_round") for g in groups for r in g.runs})
    return "final = " + " / ".join(STATISTIC_LABELS.get(s, s) for s in sels)


# ----------------------------------------------------------------------------------------------- figures
def _legend_below(fig, handles, labels, height: float) -> None:
    """The legend under the panels, inside the figure; the panels shrink to make room for its rows."""
    ncol = min(len(labels), 4)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize="small", frameon=False)
    rows = math.ceil(len(labels) / ncol)
    fig.tight_layout(rect=(0, min(0.4, (0.28 * rows + 0.1) / height), 1, 1))


def accuracy_figure(groups: list[Group], title: str | None = None):
    """Accuracy against round, one panel per metric: mean over seeds ± std band per group; methods with nothing
    to train are dashed horizontal reference lines at their (single) evaluation; the legend under the panels."""
    metrics = present([h for g in groups for r in g.runs for h in r.get("history", [])]) or list(METRICS)
    cols = 2 if len(metrics) > 1 else 1
    nrows = math.ceil(len(metrics) / cols)
    height = 3.0 * nrows + 0.9 + 0.25 * math.ceil(len(groups) / 4)
    fig = figure(5.0 * cols + 0.6, height)
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
    fig.suptitle(title or _title(groups, "Accuracy against round"))
    handles, labels = fig.axes[0].get_legend_handles_labels() if fig.axes else ([], [])
    if handles:
        _legend_below(fig, handles, labels, height)
    else:
        fig.tight_layout()
    return fig


def methods_figure(groups: list[Group], title: str | None = None):
    """The reported Local / Base / Novel / HM per group, one panel per metric (2 × 2): horizontal bars from 0 =
    mean over seeds with its value, whiskers = ± std, black diamonds = the paper's value where a paper printed
    that cell. Group names are the rows' labels, horizontal and never rotated."""
    from .summarize import paper_for

    finals = [{m: (g.final(m) or (float("nan"), 0.0))[0] for m in METRICS} for g in groups]
    metrics = present(finals) or list(METRICS)
    cols = 2 if len(metrics) > 1 else 1
    nrows = math.ceil(len(metrics) / cols)
    longest = max((len(g.label) for g in groups), default=8)
    height = nrows * (0.32 * len(groups) + 1.0) + 1.0
    fig = figure(cols * (3.6 + 0.065 * min(longest, 60)) + 0.4, height)
    marked = False
    ys = list(range(len(groups)))[::-1]  # the first group on top
    for k, m in enumerate(metrics):
        ax = fig.add_subplot(nrows, cols, k + 1)
        stats = [g.final(m) for g in groups]
        means = [s[0] if s else float("nan") for s in stats]
        errs = [s[1] if s else 0.0 for s in stats]
        bars = ax.barh(ys, means, 0.7, color=COLORS[m])
        if any(errs):  # whiskers only where there is a spread (several seeds)
            ax.errorbar(means, ys, xerr=[e if e > 0 else float("nan") for e in errs], fmt="none", ecolor="black",
                        capsize=2, linewidth=1)
        value_labels(ax, bars, means)
        values = [a + e for a, e in zip(means, errs)]
        for y, g in zip(ys, groups):
            paper = paper_for(g.method, g.dataset)[0].get(m)  # ({metric: value}, paper name)
            if finite(paper):
                ax.plot([paper], [y], marker="D", markersize=4, color="black", linestyle="none",
                        label=None if marked else "paper")
                values.append(paper)
                marked = True
        ax.set_yticks(ys)
        ax.set_yticklabels([g.label for g in groups] if k % cols == 0 else [], fontsize="small")
        bar_axis(ax, values, horizontal=True, pad=12.0)
        ax.set_title(LABELS[m])
    fig.suptitle(title or _title(groups, f"Reported accuracy ({_statistic_note(groups)})"))
    handles = [h for ax in fig.axes for h, lab in zip(*ax.get_legend_handles_labels()) if lab == "paper"]
    if handles:
        _legend_below(fig, handles[:1], ["paper"], height)
    else:
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
    for g in groups:
        run = g.runs[0]
        if run.get("per_client") and not g.part_of:  # a domain run's clients: one figure, under the whole run
            # unique per config: another run's figure never replaces this one (the report key names the config)
            name = f"per_client_{_slug(g.method)}_{_slug(g.dataset)}_{g.key or 'run'}"
            seed = f", seed {run.get('seed', '?')}" if len(g.runs) > 1 else ""
            fig = per_client_figure(run["per_client"], f"{g.label}: per-client accuracy{seed}",
                                    names=run.get("client_groups"))
            written += save(fig, out / name, formats)
    return written


__all__ = ["Group", "accuracy_figure", "group_runs", "methods_figure", "per_client_figure", "plot_runs", "save"]
