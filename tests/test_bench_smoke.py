"""benchmarks/bench.py's speed (at the defaults), image, scaling and grid subcommands at tiny scale: what they count
and compare (image forwards, same views on every path, equal results), never how long anything took."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# loaded by path, never as ``benchmarks.bench``: opacus' wheel installs a top-level package called ``benchmarks``
_spec = importlib.util.spec_from_file_location("fedlit_benchmarks_bench", ROOT / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)

TINY = ["--clients", "2", "--shots", "4", "--rounds", "2", "--dataset-args", '{"test_per_class": 1}']


def test_speed_at_the_defaults_trains_the_same_views_on_every_path():
    r = bench.main(["speed", *TINY])
    assert r["augment"] == "dassl" and r["optimizer_state"] == "chain" and r["views_cached"]
    n = r["train_images"] * r["rounds"]  # one fresh view per image and epoch (1 local epoch), full participation
    assert r["image_forwards"] == {"naive": n, "fedlit": n, "floor": n}
    assert r["max_acc_diff_points"] == 0 and r["state_max_abs_diff"] < 1e-4
    assert set(r["total_s"]) >= {"naive", "fedlit", "floor"} and r["speedup_vs_naive"] > 0


def test_speed_with_augment_none_encodes_each_image_once_on_fedlit_and_the_floor():
    r = bench.main(["speed", *TINY, "--augment", "none", "--optimizer-state", "fresh"])
    assert r["augment"] == "none" and r["optimizer_state"] == "fresh"
    n = r["train_images"]
    assert r["image_forwards"] == {"naive": n * r["rounds"], "fedlit": n, "floor": n}
    assert r["max_acc_diff_points"] == 0 and r["state_max_abs_diff"] < 1e-4


def test_image_bench_encodes_the_same_views_as_open_clip():
    r = bench.main(["image", *TINY, "--reps", "1", "--image-batches", "8", "16"])
    assert r["views_per_image"] == 2 and r["forwards"] == r["train_images"] * 2 == r["fedlit_bank_encoded"]
    assert r["fedlit_pass_padding"] >= 1 and r["open_clip_best_batch"] in (8, 16)
    assert r["max_abs_diff_fedlit_vs_open_clip"] < 1e-4  # same images, same views, same tower


def test_scaling_writes_its_json_and_figure(tmp_path):
    out = bench.main(["scaling", "--rounds", "2", "--classes-list", "10", "20", "--clients-list", "4", "8",
                      "--shots-list", "1", "2", "--scale-clients", "4", "--scale-classes", "8",
                      "--json", str(tmp_path / "s.json"), "--figure", str(tmp_path / "s.png")])
    assert [p["classes"] for p in out["classes"]] == [10, 20] and [p["clients"] for p in out["clients"]] == [4, 8]
    assert all(p["classes_in_softmax"] == p["classes"] for p in out["classes"])
    assert (tmp_path / "s.json").is_file() and (tmp_path / "s.png").stat().st_size > 0


def test_grid_shares_the_views_of_a_seed_between_its_cells():
    r = bench.main(["grid", "--grid-methods", "promptfl", "fedpgp", "--rounds", "2"])
    cells = r["cells"]
    assert cells["promptfl"]["grid"]["tower_images"] == cells["promptfl"]["alone"]["tower_images"] > 0  # the first cell
    assert cells["fedpgp"]["grid"]["tower_images"] == 0  # every view and test feature read from the shared cache
    assert cells["fedpgp"]["alone"]["tower_images"] > 0
    assert r["total_tower_images"]["grid"] < r["total_tower_images"]["alone"]
