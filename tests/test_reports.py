"""Reports group by config (issue 26 items 1, 4): `fedlit summarize` and `fedlit plot` never merge runs of
different configs, show the keys that differ, label the reported statistic with the last round beside it, and
never let a domain run replace a single-dataset run or overwrite another run's figure."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from fedlit.apps.summarize import find_runs, summarize, summarize_runs
from fedlit.metrics import harmonic_mean
from fedlit.settings import inapplicable, report_config

CONFIG = {"seed": 1, "out_dir": "x", "backbone": {"name": "fedlit-toy", "pretrained": "default"},
          "data": {"dataset": "shapes-dark", "shots": 16, "num_clients": 6, "partition": "disjoint", "beta": 0.3,
                   "classes_per_client": 20, "root": None},
          "method": {"class_path": "fedlit.methods.FedPGP", "init_args": {"n_ctx": 16, "lr": 0.001}},
          "trainer": {"rounds": 10, "eval_every": 1, "devices": 1, "progress": False, "statistic": "method"}}


def _run(root, name, seed, final, config=None, last=None, selection="best_local", final_round=7, **extra):
    d = root / name
    d.mkdir(parents=True)
    cfg = json.loads(json.dumps(config or CONFIG))
    cfg["seed"], cfg["out_dir"] = seed, str(d)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    final = {**final, "hm": harmonic_mean(list(final.values()))}
    last = last or final
    res = {"method": "fedpgp", "dataset": cfg["data"]["dataset"], "backbone": "fedlit-toy", "seed": seed,
           "selection": selection, "final": final, "final_round": final_round,
           "statistics": {"last_round": {"round": 10, **last}}, "per_client": {"0": final, "1": final},
           "history": [{"round": r, **final} for r in range(1, 11)], **extra}
    (d / "results.json").write_text(json.dumps(res))
    return d


def _other(**changes):
    cfg = json.loads(json.dumps(CONFIG))
    for key, value in changes.items():
        section, k = key.split("__")
        (cfg[section]["init_args"] if section == "method" else cfg[section])[k] = value
    return cfg


def test_settings_that_do_not_apply_are_neither_keys_nor_columns():
    assert inapplicable({"partition": "disjoint"}) == {"beta", "min_samples", "classes_per_client"}
    assert "beta" not in inapplicable({"partition": "dirichlet"})
    flat = report_config(CONFIG)
    assert flat["trainer.rounds"] == 10 and flat["method.n_ctx"] == 16  # rounds change a report's numbers
    assert not {"data.beta", "data.classes_per_client", "seed", "trainer.devices", "data.root"} & set(flat)
    assert report_config(_other(data__beta=0.5)) == flat  # β of a disjoint partition changes nothing


def test_two_configs_of_one_method_and_dataset_are_two_rows_with_the_differing_keys(tmp_path):
    a = [_run(tmp_path, f"a{s}", s, {"local": 30.0 + s, "base": 30.0, "novel": 20.0}) for s in (1, 2)]
    b = _run(tmp_path, "b1", 1, {"local": 50.0, "base": 40.0, "novel": 30.0},
             config=_other(trainer__rounds=20, method__n_ctx=4))
    md, rows, written = summarize([tmp_path], out=tmp_path / "t", paper="none")
    assert len(rows) == 2, md  # never one average over the two configs
    by = {r.settings["trainer.rounds"]: r for r in rows}
    assert set(by) == {"10", "20"} and by["10"].settings["method.n_ctx"] == "16"
    assert by["10"].seeds == [1, 2] and by["10"].mean["local"] == pytest.approx(31.5)
    assert by["20"].seeds == [1] and by["20"].mean["local"] == 50.0
    head = md.splitlines()[0]
    assert "method.n_ctx" in head and "trainer.rounds" in head  # the differing keys are columns
    with open(written[1]) as f:
        table = list(csv.DictReader(f))
    assert sorted(r["trainer.rounds"] for r in table) == ["10", "20"] and len({r["config_key"] for r in table}) == 2


def test_a_domain_run_never_replaces_a_single_dataset_run(tmp_path):
    _run(tmp_path, "single", 1, {"local": 35.03, "base": 34.07, "novel": 30.14})
    domains = ["shapes-dark", "shapes-noisy"]
    cfg = _other(data__partition="domain", data__num_clients=2)
    cfg["data"]["dataset"] = domains
    _run(tmp_path, "domains", 1, {"local": 20.0, "novel": 29.0}, config=cfg,
         per_group={"shapes-dark": {"local": 21.61, "novel": 29.77}, "shapes-noisy": {"local": 18.0, "novel": 28.0}})
    rows = [r for r in summarize_runs(find_runs([tmp_path]), paper="none") if r.dataset == "shapes-dark"]
    assert sorted(r.mean["local"] for r in rows) == [21.61, 35.03]  # two rows: the single run is still there
    single = next(r for r in rows if r.mean["local"] == 35.03)
    assert single.settings["data.partition"] == "disjoint" and single.mean["novel"] == 30.14


def test_the_reported_statistic_is_labelled_with_the_last_round_beside_it(tmp_path):
    _run(tmp_path, "r", 1, {"local": 40.0, "base": 30.0, "novel": 20.0}, final_round=7,
         last={"local": 38.0, "base": 29.0, "novel": 19.0})
    md, rows, written = summarize([tmp_path], out=tmp_path / "t", paper="fedpgp-table1",
                                  aliases={"shapes-dark": "oxford_pets"})
    line = next(ln for ln in md.splitlines() if ln.startswith("| FedPGP"))
    assert "best-Local round 7" in line and "| 40.00 |" in line
    assert "38.00 / 29.00 / 19.00 / " in line  # the last round beside it
    assert "Last round" in md.splitlines()[0]
    with open(written[1]) as f:
        row = next(csv.DictReader(f))
    assert row["statistic"] == "best-Local round" and row["statistic_rounds"] == "7"
    assert row["last_local"] == "38.0000" and row["comparable_with_paper"] == "no"  # a stand-in dataset, the toy


# ------------------------------------------------------------------------------- figures
def _plot_runs(tmp_path):
    _run(tmp_path, "a1", 1, {"local": 30.0, "base": 30.0, "novel": 20.0})
    _run(tmp_path, "b1", 1, {"local": 50.0, "base": 40.0, "novel": 30.0}, config=_other(trainer__rounds=20))
    return find_runs([tmp_path])


def test_two_configs_give_two_groups_and_two_figures_that_never_overwrite(tmp_path):
    from fedlit.apps.plot import group_runs, plot_runs

    groups = group_runs(_plot_runs(tmp_path / "runs"))
    assert sorted(g.label for g in groups) == ["FedPGP · rounds=10", "FedPGP · rounds=20"]
    written = plot_runs([tmp_path / "runs"], tmp_path / "fig", formats=("png",))
    per_client = sorted(p.name for p in written if p.name.startswith("per_client_"))
    assert len(per_client) == 2 and all(n.startswith("per_client_fedpgp_shapes-dark_") for n in per_client)


def test_bars_start_at_zero_with_values_and_the_legend_is_inside_the_figure(tmp_path):
    from fedlit.apps.plot import accuracy_figure, group_runs, methods_figure
    from fedlit.figures import per_client_figure

    groups = group_runs(_plot_runs(tmp_path))
    fig = methods_figure(groups)
    for ax in fig.axes:
        assert ax.get_xlim()[0] == 0.0  # bars are read by their length
        assert any(t.get_text() == "50.0" for t in ax.texts) or ax.get_title() != "Local"  # value labels
    fig = per_client_figure({"0": {"local": 70.0, "base": 60.0}, "1": {"local": 75.0, "base": 65.0}},
                            names={"0": "shapes-dark", "1": "shapes-noisy"})
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0.0 and "70.0" in [t.get_text() for t in ax.texts]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0\nshapes-dark", "1\nshapes-noisy"]  # by domain
    for f in (fig, accuracy_figure(groups)):
        f.canvas.draw()
        legend = f.legends[0].get_window_extent()
        assert legend.y0 >= 0 and legend.x0 >= 0 and legend.x1 <= f.bbox.width  # inside the canvas
        assert all(legend.y1 <= a.get_tightbbox().y0 + 1 for a in f.axes)  # under the panels, overlapping none


def test_the_mean_curve_of_runs_of_different_lengths_is_not_cut_to_the_shortest():
    from fedlit.apps.plot import Group

    runs = [{"history": [{"round": r, "local": 10.0 * r} for r in range(1, 4)]},
            {"history": [{"round": r, "local": 10.0 * r + 2} for r in range(1, 6)]}]
    rounds, mean, std = Group("promptfl", "d", "b", runs).curve("local")
    assert rounds == [1, 2, 3, 4, 5] and mean == [11.0, 21.0, 31.0, 42.0, 52.0] and std[-1] == 0.0


def test_table1_explains_itself_footnotes_bibtex_and_the_comparable_flag_in_the_csv(tmp_path):
    from fedlit.apps.table1 import write_table

    root = tmp_path / "table1" / "fedlit-toy"
    for method in ("promptfl", "fedprox", "fedotp"):
        d = root / method / "oxford_pets" / "seed1"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({
            "method": method, "dataset": "shapes-dark", "backbone": "fedlit-toy", "seed": 1,
            "selection": "best_local", "final_round": 2, "final": {"local": 30.0, "base": 30.0, "novel": 20.0},
            "statistics": {"last_round": {"round": 2, "local": 29.0, "base": 29.0, "novel": 19.0}}}))
    md_path, csv_path = write_table("fedlit-toy", tmp_path, quiet=True)
    md = md_path.read_text()
    assert "| Prompt+Prox¹ |" in md and "| FedOTP² |" in md and "| PromptFL |" in md  # marks on the rows
    assert "¹ Prompt+Prox: its proximal term is computed on detached tensors in the official code" in md
    assert "paper's rows differ" in md and "² FedOTP: far below the others" in md
    assert "@inproceedings{cui2024fedpgp," in md and "Harmonizing Generalization and Personalization" in md
    assert "best-Local round 2" in md and "29.00 / 29.00 / 19.00" in md  # the paper's statistic, last round beside
    with open(csv_path) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert {r["comparable_with_paper"] for r in rows.values()} == {"no"}  # the toy: flagged in the CSV too
    assert rows["fedprox"]["footnote"].startswith("its proximal term") and rows["promptfl"]["footnote"] == ""
