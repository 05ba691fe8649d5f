"""Table-1 config audit: every cell `make reproduce-table1` runs resolves to the official settings written once in
configs/official/fedpgp_table1.yaml (with their source), or to a departure listed there with its reason."""

from pathlib import Path

import pytest
import yaml

from fedlit import experiment
from fedlit.apps.paper_results import TABLE1_DATASETS, TABLE1_METHODS
from fedlit.apps.table1 import PAPER_BACKBONE, fit_command

ROOT = Path(__file__).resolve().parent.parent
OFFICIAL = yaml.safe_load((ROOT / "configs" / "official" / "fedpgp_table1.yaml").read_text())


def resolve(method: str, dataset: str = "oxford_pets") -> dict:
    """The settings a Table-1 cell actually runs with (parsed and instantiated exactly as `fedlit fit` does)."""
    cmd = fit_command(method, dataset, 1, PAPER_BACKBONE, Path("/nonexistent/run"))
    argv = cmd[cmd.index("fit") + 1 :]
    parser = experiment.fit_parser()
    cfg, init = experiment.parse_fit(parser, lambda: parser.parse_args(
        experiment.rewrite_method_shortcut(argv, say=lambda note: None)))
    m, d, t = init.method, init.data, init.trainer
    trained = m.trainable
    out = {
        "rounds": t.rounds, "shots": d.shots, "num_clients": d.num_clients, "participation": t.participation,
        "partition": d.partition, "partition_seed": d.partition_seed, "subsample": d.subsample,
        "local_epochs": t.local_epochs if trained else None, "batch_size": t.batch_size if trained else None,
        "lr": m.lr if trained else None, "momentum": m.momentum if trained else None,
        "weight_decay": m.weight_decay if trained else None,
        "augmentation": (m.augmentation(t) if trained else None),
        "precision": ({"32-true": "fp32", "bf16-mixed": "bf16-mixed", "16-mixed": "fp16-mixed",
                       "auto": "auto (bf16-mixed on GPU)"}.get(t.precision, t.precision) if trained else None),
        "drop_last": t.drop_last_of(m),
        "optimizer_state": t.optimizer_state_of(m) if trained else None,
        "restart_every_round": m.restart_personal,
    }
    for key in ("n_ctx", "rank", "num_prompts", "mu", "tau", "prox_detached", "prompt_depth", "ctx_init", "eps",
                "top_percent", "thresh", "max_iter", "template"):
        if hasattr(m, key):
            out[key] = getattr(m, key)
    if hasattr(m, "depth") and "prompt_depth" not in out:
        out["prompt_depth"] = m.depth
    return out


def official(method: str) -> dict:
    return {**OFFICIAL["common"], **OFFICIAL["methods"][method]}


def departures(method: str) -> dict:
    return {d["key"]: d for d in OFFICIAL["departures"] if d["cell"] in ("*", method)}


def test_the_table_covers_every_table1_method_and_names_its_source():
    assert set(OFFICIAL["methods"]) == set(TABLE1_METHODS)
    assert "FedPGP" in OFFICIAL["source"] and "Table 1" in OFFICIAL["source"]
    for d in OFFICIAL["departures"]:
        assert d.get("why"), f"departure {d} gives no reason"


@pytest.mark.parametrize("method", TABLE1_METHODS)
def test_table1_cell_resolves_to_the_official_settings(method):
    got, want, allowed = resolve(method), official(method), departures(method)
    wrong = []
    for key, value in want.items():
        if key not in got:
            if key in allowed or value is None:
                continue
            wrong.append(f"{key}: not resolvable, official {value!r}")
            continue
        if key in allowed:
            assert got[key] == allowed[key]["fedlit"], f"{method}.{key}: departure says {allowed[key]['fedlit']!r}"
            continue
        same = got[key] == pytest.approx(value) if isinstance(value, float) else got[key] == value
        if not same:
            wrong.append(f"{key}: fedlit {got[key]!r}, official {value!r}")
    assert not wrong, f"{method}: " + "; ".join(wrong)


@pytest.mark.parametrize("dataset", TABLE1_DATASETS)
def test_every_dataset_of_a_cell_gets_the_same_settings(dataset):
    assert resolve("fedpgp", dataset) == resolve("fedpgp")
