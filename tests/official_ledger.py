"""Reading the ledger of official settings (configs/official/*.yaml, schema in configs/official/README.md) and
resolving a ledger cell's real `fedlit fit` command into the settings it runs with — parsed and instantiated
exactly as `fedlit fit` does, without building a model. Used by tests/test_official_ledger.py."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import yaml

from fedlit import experiment, features
from fedlit.methods.roles import legacy_property
from fedlit.metrics import statistic_of
from fedlit.apps.table1 import PAPER_BACKBONE, fit_command

ROOT = Path(__file__).resolve().parent.parent
LEDGER_DIR = ROOT / "configs" / "official"
CONFIGS = ROOT / "configs"
SCALARS = (bool, int, float, str, type(None))
PRECISION = {"32-true": "fp32", "16-true": "fp16", "16-mixed": "fp16-mixed", "bf16-mixed": "bf16-mixed",
             "bf16-true": "bf16", "auto": "auto"}


def ledgers() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(LEDGER_DIR.glob("*.yaml"))}


def argv_of(ledger: dict, method: str, column: str) -> list[str]:
    """The `fedlit fit` arguments of one cell: the Table-1 driver's own command for FedPGP Table 1, else the method's
    config (PromptFL's with the method swapped when it has none, as the driver does), the table's overlays, the
    column's and the cell's overrides."""
    run, col = ledger["run"], ledger["columns"][column]
    cell = ledger["cells"][method]
    if run.get("driver") == "table1":
        cmd = fit_command(method, col.get("dataset", column), 1, PAPER_BACKBONE, Path("/nonexistent/run"))
        argv = cmd[cmd.index("fit") + 1:]
    else:
        own = CONFIGS / f"{cell.get('config', method)}.yaml"
        argv = ["--config", str(own)] if own.is_file() else ["--config", str(CONFIGS / "promptfl.yaml"),
                                                             "--method", method]
        argv += [a for c in [*run.get("overlays", []), *col.get("overlays", [])] for a in ("--config", str(CONFIGS / c))]
        argv += list(run.get("overrides", []))
    return argv + list(col.get("overrides", [])) + list(cell.get("overrides", []))


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _parser():
    """One fit parser for every cell (building it is most of a resolve's cost; parsing does not change it)."""
    if not hasattr(_parser, "cached"):
        _parser.cached = experiment.fit_parser()
    return _parser.cached


def resolve(argv: list[str]) -> dict:
    """Every setting a `fedlit fit` command line runs with, as ``section.key`` (``trainer.rounds``,
    ``method.n_ctx``, ``data.shots``) plus the derived ``trainer.augmentation`` (the transform the method trains
    with) and ``trainer.precision`` in the official vocabulary (fp32, fp16, …)."""
    parser = _parser()
    cfg, init = experiment.parse_fit(parser, lambda: parser.parse_args(
        experiment.rewrite_method_shortcut(argv, say=lambda note: None)))
    m, d, t = init.method, init.data, init.trainer
    out = {"method.name": m.name, "backbone.name": init.backbone.name, "backbone.pretrained": init.backbone.pretrained}
    for section, obj in (("trainer", t), ("data", d), ("method", m)):
        for key, value in vars(obj).items():
            if not key.startswith("_") and (isinstance(value, SCALARS) or
                                            isinstance(value, (list, tuple)) and all(isinstance(x, SCALARS) for x in value)):
                out[f"{section}.{key}"] = _plain(value)
    for key in dir(type(m)):  # class-level settings (e.g. `trainable`) and the policy's flags, not methods
        if key.startswith("_") or f"method.{key}" in out:
            continue
        declared = inspect.getattr_static(type(m), key)
        value = getattr(m, key) if isinstance(declared, property | legacy_property) else getattr(type(m), key)
        if isinstance(value, SCALARS):
            out[f"method.{key}"] = value
    if out.get("data.partition_seed") is None:
        out["data.partition_seed"] = "run"  # null = the run's seed
    out["trainer.precision"] = PRECISION.get(t.precision, t.precision)
    out["trainer.augmentation"] = m.augmentation(t) if m.trainable else None
    # the loop policies as the run resolves them (``method`` → the method's official one)
    out["trainer.drop_last"] = t.drop_last_of(m)
    if t.sync_of(m) == "step":
        out.update({f"trainer.{k}": v for k, v in t.step_policies(m).items()})
    else:
        out["trainer.optimizer_state"] = t.optimizer_state_of(m)
    out["trainer.selection"] = statistic_of(m.name, t.statistic)
    out["trainer.augment_seed"] = getattr(features, "VIEW_SEED", "run")  # the view bank's seed: the run's
    return out


REF = re.compile(r"^([a-z0-9_]+):(.*)$")


def expand_source(ledger: dict, source: str) -> str:
    """``alias:where`` → ``<refs[alias]> where`` (aliases are the ledger's ``refs``)."""
    m = REF.match(source)
    if m and m.group(1) in ledger.get("refs", {}):
        return f"{ledger['refs'][m.group(1)]} {m.group(2)}".strip()
    return source


def settings(ledger: dict, method: str, column: str | None = None) -> dict[str, tuple[object, str]]:
    """The official settings of a cell: the table's ``common``, overlaid with the column's, the cell's own and the
    cell's for that column (``cells.M.columns.C``), as ``key → (value, source)``."""
    out = {}
    cell = ledger["cells"][method]
    blocks = [ledger.get("common", {}), ledger["columns"].get(column, {}).get("settings", {}) if column else {},
              cell.get("settings", {}), cell.get("columns", {}).get(column, {}) if column else {}]
    for block in blocks:
        for key, entry in block.items():
            value, source = (entry["value"], entry["source"]) if isinstance(entry, dict) else entry
            out[key] = (value, source)
    for d in (ledger.get("loops") or []):  # loop settings stated per cell list
        if _applies(d, method, column):
            out[d["key"]] = (d["official"], d["why"])
    return out


def _applies(d: dict, method: str, column: str | None) -> bool:
    cells = d["cell"] if isinstance(d["cell"], list) else [d["cell"]]
    cols = d.get("column", "*")
    cols = cols if isinstance(cols, list) else [cols]
    return ("*" in cells or method in cells) and ("*" in cols or column is None or column in cols)


def departures(ledger: dict, method: str, column: str) -> dict[str, dict]:
    """The listed departures that apply to a cell, by key."""
    return {d["key"]: d for d in (ledger.get("departures") or []) if _applies(d, method, column)}
