"""Every registered method runs 2 rounds end to end on the embedded default (small and fast)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedlit.cli import main
from fedlit.methods import list_methods

ROOT = Path(__file__).resolve().parents[1]

#: per-method overrides needed on the 2-layer toy backbone
EXTRA = {
    "fedmaple": ["--method.init_args.prompt_depth", "2"],
    "pfedpg": ["--data.subsample", "all"],
    "fedvpt": ["--data.subsample", "all"],
    "localvpt": ["--data.subsample", "all"],
    "pfedmma": ["--method.init_args.adapter_start", "1", "--method.init_args.adapter_end", "2"],
    "fedpha": ["--method.init_args.local_lengths", "[4, 16, 8]"],  # heterogeneous lengths, 3 clients
    "promptsrc": ["--method.init_args.prompt_depth_text", "2", "--method.init_args.prompt_depth_vision", "2"],
}


def test_every_registered_method_is_listed():
    assert set(list_methods()) >= {"zeroshot", "coop", "promptfl", "fedprox", "fedkgcoop", "fedcocoop", "fedmaple",
                                   "fedvlp", "fedotp", "fedpgp", "fedtpg", "pfedpg", "fedvpt", "localvpt", "central", "ivlp",
                                   "promptfolio", "fedpha", "pfedmma", "dpfpl", "plot", "prograd", "promptsrc", "proda",
                                   "feddnc", "focoop", "fedlapt", "fedlocoop", "fedgallop"}


@pytest.mark.parametrize("name", list_methods())
def test_method_runs_two_rounds_on_embedded_default(tmp_path, name):
    config = ROOT / "configs" / f"{name}.yaml"
    assert config.exists(), f"configs/{name}.yaml is missing"
    out = tmp_path / name
    rc = main(["fit", "--config", str(config), "--config", str(ROOT / "configs" / "embedded.yaml"),
               "--trainer.rounds", "2", "--trainer.eval_every", "2", "--data.num_clients", "3", "--data.shots", "2",
               "--data.dataset_args", '{"test_per_class": 6, "train_per_class": 8}', "--trainer.batch_size", "8",
               "--out_dir", str(out), *EXTRA.get(name, [])])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == name
    assert len(res["per_client"]) == 3
    for k, v in res["final"].items():
        assert math.isfinite(v) and 0 <= v <= 100, (k, v)
    assert "local" in res["final"] and "base" in res["final"]
