"""FedTPG's per-client cosine schedule and persistent optimiser (spec §2.3), kept across rounds and resumes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlit import checkpoint as ckpt
from fedlit.cli import main
from fedlit.client import load_optimizer_state, optimizer_state_tensors
from fedlit.methods.fedtpg import FedTPG

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config", str(ROOT / "configs" / "fedtpg.yaml"), "--config", str(ROOT / "configs" / "embedded.yaml"),
        "--trainer.rounds", "3", "--data.num_clients", "3", "--data.shots", "4", "--trainer.participation", "0.67",
        "--trainer.first_round_all", "false", "--method.init_args.schedule_rounds", "4"]


def test_cosine_schedule_matches_the_official_log():
    m = FedTPG()
    assert m.lr_at(0) == pytest.approx(0.003)
    # official cross-class log: lr at round 500 (t = 499 earlier participations) = 2.96e-8
    assert m.lr_at(499) == pytest.approx(2.96e-8, rel=1e-2)
    assert m.lr_at(250) == pytest.approx(0.0015)
    assert FedTPG(lr_schedule="constant").lr_at(499) == 0.003


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.full((3,), 2.0)
    opt.step()
    flat = optimizer_state_tensors(opt)
    assert set(flat) == {"0/momentum_buffer"} and torch.equal(flat["0/momentum_buffer"], torch.full((3,), 2.0))
    fresh = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    load_optimizer_state(fresh, {**flat, "participations": torch.tensor(3)})
    assert torch.equal(fresh.state[p]["momentum_buffer"], torch.full((3,), 2.0))


def _fit(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FEDLIT_FAULT"}
    if fault:
        env["FEDLIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "fedlit.cli", "fit", *ARGS, "--out_dir", str(out), *extra],
                          capture_output=True, text=True, timeout=600, env=env)


def test_persistent_state_is_personal_and_checkpointed(tmp_path):
    assert main(["fit", *ARGS, "--out_dir", str(tmp_path / "ref")]) == 0
    state = ckpt.load(tmp_path / "ref" / ckpt.NAME)
    # partial participation: clients took part a different number of times; each keeps its own step count
    counts = {c: int(t["optim/participations"]) for c, t in state.personal.items()}
    assert sorted(counts) == [0, 1, 2] and sum(counts.values()) == 2 * 3 and len(set(counts.values())) > 1
    assert all(any(k.startswith("optim/") and k.endswith("momentum_buffer") for k in t) for t in state.personal.values())
    assert not any(k.startswith("optim") for k in state.global_state)  # never sent to the server
    a = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert math.isfinite(a["final"]["hm"])

    assert main(["fit", *ARGS, "--out_dir", str(tmp_path / "fresh"), "--method.init_args.persistent_optimizer",
                 "false", "--method.init_args.lr_schedule", "constant"]) == 0
    c = json.loads((tmp_path / "fresh" / "results.json").read_text())
    assert c["final"] != a["final"]  # the official per-client state changes the numbers
    kept = {k for t in ckpt.load(tmp_path / "fresh" / ckpt.NAME).personal.values() for k in t}
    assert kept == set()  # nothing per client: a fresh optimiser every client-round, constant lr


@pytest.mark.slow
def test_sigkill_then_resume_restores_each_clients_optimizer(tmp_path):
    ref = _fit(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    killed = _fit(tmp_path / "run", fault="checkpoint-write:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = _fit(tmp_path / "run")
    assert resumed.returncode == 0 and "resuming after round" in resumed.stdout, resumed.stderr
    a = json.loads((tmp_path / "ref" / "results.json").read_text())
    b = json.loads((tmp_path / "run" / "results.json").read_text())
    assert a["final"] == b["final"] and a["history"] == b["history"]
