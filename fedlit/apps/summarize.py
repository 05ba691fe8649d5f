"""Results tables: mean ± std over seeds of finished runs, with the paper's numbers beside ours.

    fedlit summarize results/table1/ViT-B-16 --out results/table1      # → results/table1.md, results/table1.csv

One row per (method, dataset, backbone, report config): runs are grouped by everything that changes the numbers
except the seed (:func:`fedlit.settings.report_config` of the run's ``config.yaml``: the method's
hyper-parameters, data and trainer settings, rounds included), so different configs are never averaged and a
per-domain row of a domain run never stands in for a single-dataset run; the keys that differ between rows of
one method and dataset are columns. Each cell is the run's ``final`` — the statistic its paper reports
(``selection`` in ``results.json``: e.g. the best-Local round for FedPGP's Table 1), named in the Statistic column,
with the last round's values beside it. Local / Base / Novel as mean ± sample std over seeds (std needs two
seeds), HM = harmonic mean of the three *mean* values (the papers' convention — FedPGP's Average row is the HM of
the averaged Local/Base/Novel, not the mean of per-row HMs), the number of seeds, and where the paper printed the
cell, the paper value and ours − paper. A method with all five FedPGP Table-1 datasets also gets an "Average" row
(mean over datasets of the per-dataset means; HM of those).

A run directory holds ``results.json`` (written by :meth:`fedlit.orchestrator.Orchestrator.finish`); a directory
without one that holds run directories below it is searched recursively; anything else is skipped with a warning.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FedlitError
from ..metrics import STATISTIC_LABELS, harmonic_mean
from ..settings import differing, report_config, report_key, short_value
from .paper_results import DATASET_NAMES, METHOD_NAMES, PAPERS, TABLE1_DATASETS, TABLE1_METHODS, paper_value

KEYS = ("local", "base", "novel")
COLUMNS = ("local", "base", "novel", "hm")
PAPER_CHOICES = ("auto", *PAPERS, "none")
#: the OOD protocol's columns (fedlit.ood), shown when a run has them: key → header
OOD_COLUMNS = {"ood/acc": "ID", "ood/cacc": "CACC", **{f"ood/{s}/{m}": f"{m.upper()} {s}" for s in
                                                       ("msp", "energy", "neglabel") for m in ("fpr95", "auroc")}}


def ood_columns(rows) -> list[str]:
    """The OOD columns some row has a value for, in :data:`OOD_COLUMNS` order."""
    return [k for k in OOD_COLUMNS if any(k in r.mean for r in rows)]


@dataclass
class Row:
    method: str
    dataset: str  # the run's dataset name ("average" for the Average row)
    backbone: str
    seeds: list[int]
    mean: dict[str, float]
    std: dict[str, float]  # absent key → not defined (one seed)
    paper_dataset: str = ""  # the dataset the paper value refers to (alias target), "" = same as dataset
    paper: dict[str, float] = field(default_factory=dict)
    paper_name: str = ""
    status: str = "ok"  # "ok" | "failed: …" | "pending"
    key: str = ""  # report key (fedlit.settings.report_key): rows with different keys are different configs
    config: dict = field(default_factory=dict)  # the group's report config (fedlit.settings.report_config)
    settings: dict = field(default_factory=dict)  # the keys that tell this row from another of its method+dataset
    statistic: str = ""  # the statistic ``final`` holds ("best-Local round")
    rounds: str = ""  # the rounds it comes from, over seeds ("9, 10"; "" for a mean over rounds)
    last: dict = field(default_factory=dict)  # mean over seeds of the last round's values (``hm`` of those)

    @property
    def diff(self) -> dict[str, float]:
        return {k: self.mean[k] - self.paper[k] for k in COLUMNS if k in self.mean and k in self.paper}


# ------------------------------------------------------------------------------------------ loading
def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def find_runs(run_dirs: Iterable[str | Path], warn=_warn) -> list[dict]:
    """The ``results.json`` of every finished run in ``run_dirs`` (searched recursively); others warned and skipped."""
    runs, seen = [], set()
    for d in run_dirs:
        d = Path(d)
        if (d / "results.json").is_file():
            files = [d / "results.json"]
        elif d.is_dir():
            files = sorted(d.rglob("results.json"))
            if not files:
                unfinished = any(d.glob("checkpoint*"))
                why = "unfinished run (checkpoint, no results.json)" if unfinished else "no results.json"
                warn(f"skipping {d}: {why}")
                continue
        else:
            warn(f"skipping {d}: {'not a directory' if d.exists() else 'does not exist'}")
            continue
        for f in files:
            key = f.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                res = json.loads(f.read_text())
                if not isinstance(res.get("final"), dict) or "method" not in res or "dataset" not in res:
                    raise ValueError("missing method/dataset/final")
            except (OSError, ValueError) as e:
                warn(f"skipping {f.parent}: unreadable results.json ({e})")
                continue
            res.setdefault("seed", 0)
            res.setdefault("backbone", "?")
            res["_dir"] = str(f.parent)
            res["_config"] = _report_config(f.parent, res)
            runs.append(res)
    return runs


def _report_config(run_dir: Path, res: dict) -> dict:
    """The run's :func:`~fedlit.settings.report_config` from its ``config.yaml``; without one (a run written
    elsewhere), its resume digest and round count stand in (so runs of different configs still never merge)."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        if isinstance(cfg, dict):
            return report_config(cfg)
    except (OSError, yaml.YAMLError):
        pass
    rounds = max([h.get("round", 0) for h in res.get("history", [])] or [0])
    return {"identity.config_digest": (res.get("identity") or {}).get("config_digest", "?"), "trainer.rounds": rounds}


def expand_groups(runs: Sequence[Mapping]) -> list[dict]:
    """A run of several datasets / domains (``per_group`` in its results) becomes one row per group plus its mean
    row, whose dataset is the ``+``-joined names (paper lookups treat it as the paper's mean / Avg)."""
    out = []
    for r in runs:
        ds = r["dataset"]
        r = {**r, "dataset": "+".join(ds) if isinstance(ds, list) else str(ds)}
        out.append(r)
        for g, res in (r.get("per_group") or {}).items():  # one group's numbers: no overall last-round values
            out.append({**r, "dataset": g, "final": res, "statistics": {}, "_part_of": r["dataset"]})
    return out


# ------------------------------------------------------------------------------------------ statistics
def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n − 1; None for a single value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def paper_for(method: str, dataset: str, paper: str = "auto") -> tuple[dict[str, float], str]:
    """The paper's Local/Base/Novel/HM for (method, dataset) and the paper's name (``{}, ""`` if none printed it)."""
    names = [p for p in PAPERS] if paper == "auto" else ([] if paper == "none" else [paper])
    for name in names:
        v = paper_value(name, method, dataset)
        if v:
            return v, name
    return {}, ""


def summarize_runs(runs: Sequence[Mapping], paper: str = "auto", aliases: Mapping[str, str] | None = None,
                   failed: Sequence[Mapping] = (), warn=_warn) -> list[Row]:
    """Rows of the table: one per (method, dataset, backbone, report config — runs of different configs are
    never averaged), then an Average row per (method, backbone, config but the dataset).

    ``aliases`` maps a run's dataset to the dataset whose paper numbers it stands in for (the embedded
    benchmark: ``{"shapes-dark": "oxford_pets", …}``). ``failed``: grid cells that did not finish
    (``{"method", "dataset", "backbone", "seed", "reason"}``, or ``"status": "pending"`` for cells not run yet),
    listed as such rows when no seed of that cell finished. Several runs of one seed count once: the newest
    (``results.json`` written last) is used and the others are named in a warning.
    """
    if paper not in PAPER_CHOICES:
        raise FedlitError(f"unknown paper '{paper}'; choose one of {', '.join(PAPER_CHOICES)}")
    aliases = dict(aliases or {})
    groups: dict[tuple[str, str, str, str], list[Mapping]] = {}
    for r in expand_groups(runs):
        key = report_key(r.get("_config") or {})
        groups.setdefault((r["method"], r["dataset"], str(r["backbone"]), key), []).append(r)
    rows: list[Row] = []
    for (method, dataset, backbone, key), rs in groups.items():
        rs = one_run_per_seed(rs, warn)
        mean, std = {}, {}
        for k in (*KEYS, *OOD_COLUMNS):
            vals = [float(r["final"][k]) for r in rs if k in r["final"] and r["final"][k] == r["final"][k]]
            if vals:
                mean[k], s = mean_std(vals)
                if s is not None:
                    std[k] = s
        present = [mean[k] for k in KEYS if k in mean]
        if present:
            mean["hm"] = harmonic_mean(present)
        target = aliases.get(dataset, dataset)
        pv, pname = paper_for(method, target, paper)
        rows.append(Row(method, dataset, backbone, [int(r["seed"]) for r in rs], mean, std,
                        paper_dataset=target if target != dataset else "", paper=pv, paper_name=pname,
                        key=key, config=dict(rs[0].get("_config") or {}), statistic=_statistic(rs)[0],
                        rounds=_statistic(rs)[1], last=_last_round(rs)))
    _mark_settings(rows)
    done = {(r.method, r.dataset, r.backbone) for r in rows}
    for f in failed:
        key = (f["method"], f["dataset"], str(f["backbone"]))
        if key in done:
            continue
        target = aliases.get(f["dataset"], f["dataset"])
        pv, pname = paper_for(f["method"], target, paper)
        rows.append(Row(f["method"], f["dataset"], str(f["backbone"]), [], {}, {},  # no seed finished
                        paper_dataset=target if target != f["dataset"] else "", paper=pv, paper_name=pname,
                        status=f.get("status") or f"failed: {f.get('reason', '?')}"))
        done.add(key)
    rows.sort(key=_order)
    return rows + _average_rows(rows, paper)


def _statistic(runs: Sequence[Mapping]) -> tuple[str, str]:
    """(``best-Local round``, ``9, 10``): the statistic of the runs' ``final`` and the rounds it comes from."""
    sels = {r.get("selection", "last_round") for r in runs}
    rounds = sorted({r["final_round"] for r in runs if r.get("final_round")})
    single = sels <= {"best_local", "last_round"}
    return " / ".join(STATISTIC_LABELS.get(s, s) for s in sorted(sels)), ", ".join(map(str, rounds)) if single else ""


def _last_round(runs: Sequence[Mapping]) -> dict[str, float]:
    """Mean over seeds of the last round's Local / Base / Novel (results.json ``statistics.last_round``), HM of
    those; {} where a run does not hold them (a group row, an older results.json)."""
    lasts = [(r.get("statistics") or {}).get("last_round") for r in runs]
    if not lasts or not all(lasts):
        return {}
    out = {k: sum(x[k] for x in lasts) / len(lasts) for k in KEYS if all(k in x for x in lasts)}
    if out:
        out["hm"] = harmonic_mean([out[k] for k in KEYS if k in out])
    return out


def _mark_settings(rows: Sequence[Row]) -> None:
    """Rows of one (method, dataset, backbone) with different configs get the keys that differ as settings."""
    by: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        by.setdefault((r.method, r.dataset, r.backbone), []).append(r)
    for same in by.values():
        if len(same) > 1:
            for k in differing([r.config for r in same]):
                for r in same:
                    r.settings[k] = short_value(r.config.get(k))


def one_run_per_seed(runs: Sequence[Mapping], warn) -> list[Mapping]:
    """The newest run of each seed, sorted by seed; reruns of a seed are named in a warning, never averaged."""
    by_seed: dict[int, list[Mapping]] = {}
    for r in runs:
        by_seed.setdefault(int(r["seed"]), []).append(r)
    out = []
    for seed in sorted(by_seed):
        rs = sorted(by_seed[seed], key=_written_at)
        if len(rs) > 1:
            r = rs[-1]
            warn(f"{r['method']} on {r['dataset']}: {len(rs)} runs of seed {seed}; counting the newest once "
                 f"({r.get('_dir', '?')}), not {', '.join(str(x.get('_dir', '?')) for x in rs[:-1])}")
        out.append(rs[-1])
    return out


def _written_at(run: Mapping) -> float:
    try:
        return (Path(run["_dir"]) / "results.json").stat().st_mtime
    except (KeyError, OSError):
        return 0.0


def _average_rows(rows: Sequence[Row], paper: str) -> list[Row]:
    """Average over the five Table-1 datasets, for every (method, backbone) that has all five finished."""
    out = []
    by_method: dict[tuple[str, str, str], dict[str, Row]] = {}
    for r in rows:  # one Average per config: the configs of the five cells differ only in their dataset
        if r.status == "ok":
            key = report_key({k: v for k, v in r.config.items() if k != "data.dataset"})
            by_method.setdefault((r.method, r.backbone, key), {})[r.paper_dataset or r.dataset] = r
    for (method, backbone, _), per in by_method.items():
        if not all(d in per for d in TABLE1_DATASETS):
            continue
        cells = [per[d] for d in TABLE1_DATASETS]
        mean = {k: sum(c.mean[k] for c in cells) / len(cells) for k in KEYS if all(k in c.mean for c in cells)}
        present = [mean[k] for k in KEYS if k in mean]
        if present:
            mean["hm"] = harmonic_mean(present)
        pv, pname = paper_for(method, "average", paper)
        seeds = sorted(set.intersection(*(set(c.seeds) for c in cells)))
        last = {k: sum(c.last[k] for c in cells) / len(cells) for k in KEYS if all(k in c.last for c in cells)}
        if last:
            last["hm"] = harmonic_mean([last[k] for k in KEYS if k in last])
        out.append(Row(method, "average", backbone, seeds, mean, {}, paper=pv, paper_name=pname,
                       statistic=" / ".join(sorted({c.statistic for c in cells})),
                       last=last, settings=dict(cells[0].settings)))
    return sorted(out, key=_order)


def _order(row: Row):
    """The paper's order: methods and datasets as in FedPGP's Table 1, others after them by name."""
    mi = TABLE1_METHODS.index(row.method) if row.method in TABLE1_METHODS else len(TABLE1_METHODS)
    ds = row.paper_dataset or row.dataset
    di = TABLE1_DATASETS.index(ds) if ds in TABLE1_DATASETS else len(TABLE1_DATASETS)
    return (row.backbone, mi, row.method, di, row.dataset, sorted(row.settings.items()))


# ------------------------------------------------------------------------------------------ output
def _label_method(m: str) -> str:
    return METHOD_NAMES.get(m, m)


def _label_dataset(r: Row) -> str:
    if r.paper_dataset:
        return f"{r.dataset} (≙ {DATASET_NAMES.get(r.paper_dataset, r.paper_dataset)})"
    return DATASET_NAMES.get(r.dataset, r.dataset)


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None or v != v:
        return "—"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def setting_columns(rows: Sequence[Row]) -> list[str]:
    """The config keys some row is told apart by (columns of the table)."""
    return sorted({k for r in rows for k in r.settings})


def _last_cell(r: Row) -> str:
    return " / ".join(_fmt(r.last.get(k)) for k in COLUMNS if k in r.last) or "—"


MARKS = "¹²³⁴⁵⁶⁷⁸⁹"


def footnote_marks(rows: Sequence[Row], footnotes: Mapping[str, str]) -> dict[str, str]:
    """Method → its footnote mark, for the methods of ``footnotes`` that have a row, in row order."""
    order = list(dict.fromkeys(r.method for r in rows if r.method in footnotes))
    return {m: MARKS[i % len(MARKS)] for i, m in enumerate(order)}


def to_markdown(rows: Sequence[Row], title: str | None = None, notes: Sequence[str] = (),
                footnotes: Mapping[str, str] | None = None) -> str:
    """The table; ``footnotes``: method → a note, marked on that method's rows and written under the table."""
    footnotes = dict(footnotes or {})
    marks = footnote_marks(rows, footnotes)
    with_paper = any(r.paper for r in rows)
    extra = setting_columns(rows)
    head = ["Method", "Dataset", "Backbone", *extra, "Seeds", "Statistic"]
    fixed = len(head)
    for k in COLUMNS:
        name = "HM" if k == "hm" else k.capitalize()
        head += [name, "paper", "Δ"] if with_paper else [name]
    oods = ood_columns(rows)
    head += [OOD_COLUMNS[k] for k in oods]
    head.append("Last round L / B / N / HM")
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * fixed + ["---:"] * (len(head) - fixed)) + "|"]
    for r in rows:
        stat = f"{r.statistic} {r.rounds}".strip() if r.statistic else "—"
        cells = [_label_method(r.method) + marks.get(r.method, ""), _label_dataset(r), r.backbone,
                 *(r.settings.get(k, "") for k in extra),
                 str(len(r.seeds)), stat]
        for k in COLUMNS:
            if r.status != "ok":
                ours = r.status if k == "local" else ""
            elif k in r.mean:
                ours = _fmt(r.mean[k]) + (f" ± {r.std[k]:.2f}" if k in r.std else "")
            else:
                ours = "—"
            cells.append(ours)
            if with_paper:
                cells += [_fmt(r.paper.get(k)), _fmt(r.diff.get(k), signed=True) if r.paper else "—"]
        cells += [_fmt(r.mean.get(k)) + (f" ± {r.std[k]:.2f}" if k in r.std else "") for k in oods]
        cells.append(_last_cell(r) if r.status == "ok" else "")
        lines.append("| " + " | ".join(cells) + " |")
    foot = ["\nStatistic: which evaluation of each run the cells hold (results.json `selection`, by default the one "
            "the method's paper reports; `--trainer.statistic` chooses another), with its rounds over seeds; the last "
            "round's values (mean over seeds) are in the last column."
            + (f" Columns {', '.join(f'`{k}`' for k in extra)}: the settings that tell apart rows of one method and "
               "dataset (runs of different configs are never averaged)." if extra else ""),
            "Local/Base/Novel: mean ± sample std (n − 1) over seeds (no ± with one seed; reruns of a seed count "
            "once); HM = harmonic mean of the three mean values (the papers' convention), not the mean of per-seed "
            "HMs." + (" ID / CACC / FPR95 / AUROC: the OOD protocol (fedlit.ood; FPR95 convention in each run's "
                      "results.json `ood`)." if oods else "") + (" Average = mean over the five FedPGP Table-1 datasets of the per-dataset means; HM of those."
                       if any(r.dataset == "average" for r in rows) else "")]
    used = sorted({r.paper_name for r in rows if r.paper_name})
    if used:
        foot.append("paper = " + " ".join(PAPERS[p] for p in used) + " Δ = ours − paper.")
    marked = [f"{marks[m]} {_label_method(m)}: {footnotes[m]}" for m in marks]
    return "\n".join(lines) + "\n" + "\n\n".join([*marked, *foot, *notes]) + "\n"


def write_csv(rows: Sequence[Row], path: Path, footnotes: Mapping[str, str] | None = None) -> None:
    extra = setting_columns(rows)
    fields = ["method", "dataset", "paper_dataset", "backbone", *extra, "n_seeds", "seeds", "status", "statistic",
              "statistic_rounds"]
    for k in COLUMNS:
        fields += [f"{k}_mean", f"{k}_std", f"{k}_paper", f"{k}_diff"]
    fields += [f"last_{k}" for k in COLUMNS]
    oods = ood_columns(rows)
    fields += [f"{k}_{s}" for k in oods for s in ("mean", "std")]
    fields += ["paper", "comparable_with_paper", "config_key", "footnote"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            d = {"method": r.method, "dataset": r.dataset, "paper_dataset": r.paper_dataset, "backbone": r.backbone,
                 "n_seeds": len(r.seeds), "seeds": " ".join(map(str, r.seeds)), "status": r.status,
                 "paper": r.paper_name, "statistic": r.statistic, "statistic_rounds": r.rounds,
                 "comparable_with_paper": _comparable(r) if r.paper_name else "", "config_key": r.key,
                 "footnote": (footnotes or {}).get(r.method, ""),
                 **{k: r.settings.get(k, "") for k in extra}}
            diff = r.diff
            for k in COLUMNS:
                d[f"{k}_mean"] = _csv(r.mean.get(k))
                d[f"{k}_std"] = _csv(r.std.get(k))
                d[f"{k}_paper"] = _csv(r.paper.get(k))
                d[f"{k}_diff"] = _csv(diff.get(k))
                d[f"last_{k}"] = _csv(r.last.get(k))
            for k in oods:
                d[f"{k}_mean"], d[f"{k}_std"] = _csv(r.mean.get(k)), _csv(r.std.get(k))
            w.writerow(d)


def _comparable(r: Row) -> str:
    """``no`` where ours cannot be held against the paper's number: a stand-in dataset or the embedded toy CLIP."""
    return "no" if r.paper_dataset or str(r.backbone).startswith("fedlit-toy") else "yes"


def _csv(v: float | None) -> str:
    return "" if v is None or v != v else f"{v:.4f}"


def summarize(run_dirs: Sequence[str | Path], out: str | Path | None = "summary", paper: str = "auto",
              aliases: Mapping[str, str] | None = None, title: str | None = None, notes: Sequence[str] = (),
              failed: Sequence[Mapping] = (), warn=None, footnotes: Mapping[str, str] | None = None
              ) -> tuple[str, list[Row], list[Path]]:
    """Read the runs, build the rows, write ``<out>.md`` and ``<out>.csv`` (unless ``out`` is None).

    Returns (markdown, rows, written paths). No finished run at all (and nothing failed) → FedlitError.
    """
    warn = warn or _warn
    runs = find_runs(run_dirs, warn=warn)
    if not runs and not failed:
        raise FedlitError(f"no finished run (results.json) in {', '.join(map(str, run_dirs))}; "
                          "pass run directories written by `fedlit fit`")
    rows = summarize_runs(runs, paper=paper, aliases=aliases, failed=failed, warn=warn)
    md = to_markdown(rows, title=title, notes=notes, footnotes=footnotes)
    written = []
    if out is not None:
        prefix = Path(out)
        if prefix.suffix in (".md", ".csv"):
            prefix = prefix.with_suffix("")
        try:
            prefix.parent.mkdir(parents=True, exist_ok=True)
            md_path, csv_path = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".csv")
            md_path.write_text(md)
            write_csv(rows, csv_path, footnotes)
        except OSError as e:
            raise FedlitError(f"cannot write the table to {prefix}.md/.csv ({e.strerror}); "
                              "choose another --out") from None
        written = [md_path, csv_path]
    return md, rows, written


__all__ = ["Row", "find_runs", "mean_std", "one_run_per_seed", "paper_for", "summarize_runs", "to_markdown",
           "write_csv", "summarize"]
