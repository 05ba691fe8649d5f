"""Client-parallel simulation: with the same ``trainer.threads``, 2 processes (gloo, CPU) give exactly the same
run as 1 — results and every checkpoint tensor (global, personal, server state), bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
#: FedPGP keeps personal tensors (U, V), pFedPG server state (generator, base prompts, descriptors + Adam moments)
#: and personal heads; 5 clients over 2 ranks make uneven shards, so state must come back to the right client.
METHODS = {
    "fedpgp": [],
    "pfedpg": ["--data.subsample", "all", "--data.shots", "2"],
}


def _fit(out: Path, method: str, *extra: str) -> tuple[dict, dict[str, torch.Tensor]]:
    cmd = [sys.executable, "-m", "fedlit.cli", "fit", "--config", str(CONFIGS / f"{method}.yaml"),
           "--config", str(CONFIGS / "embedded.yaml"), "--trainer.rounds", "2", "--trainer.local_epochs", "1",
           "--data.num_clients", "5", "--data.shots", "4",
           "--data.dataset_args", '{"train_per_class": 8, "test_per_class": 4}',
           "--trainer.threads", "1", "--trainer.optimizer_state", "fresh",  # clients in parallel: nothing chained
           "--out_dir", str(out), *METHODS[method], *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "results.json").read_text()), load_file(str(out / "checkpoint.safetensors"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_equal_one_bit_for_bit(tmp_path, method):
    one, ckpt_one = _fit(tmp_path / "one", method)
    two, ckpt_two = _fit(tmp_path / "two", method, "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    assert two["per_client"] == one["per_client"]
    assert two["history"] == one["history"]
    assert two["final"] == one["final"]
    assert sorted(ckpt_two) == sorted(ckpt_one)
    kinds = {k.split("/")[0] for k in ckpt_one}
    assert {"global", "personal"} <= kinds and ("server" in kinds) == (method == "pfedpg")
    differ = [k for k in ckpt_one if not torch.equal(ckpt_one[k], ckpt_two[k])]
    assert not differ, f"{len(differ)} of {len(ckpt_one)} checkpoint tensors differ: {differ[:5]}"


def test_threads_setting_applies_to_this_process_and_launched_ones(monkeypatch):
    from fedlit.trainer import FedTrainer

    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # restored after the test
    before = torch.get_num_threads()
    try:
        FedTrainer(threads=1).make_fabric()
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"  # what Lightning's launched processes inherit and keep
    finally:
        torch.set_num_threads(before)
