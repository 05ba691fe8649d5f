"""Crash and resume, failing clients, atomic checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlit import checkpoint as ckpt
from fedlit.cli import main
from fedlit.errors import FedlitError

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
SMALL = ["--trainer.rounds", "3", "--data.num_clients", "4", "--data.shots", "8", "--method", "coop",
         "--trainer.optimizer_state", "chain"]  # CoOp's official optimiser (the quickstart itself trains fresh)


def _fit_subprocess(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FEDLIT_FAULT", None)
    if fault:
        env["FEDLIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "fedlit.cli", "fit", "--config", QUICK, "--out_dir", str(out), *SMALL],
                          capture_output=True, text=True, timeout=600, env=env)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _fit_subprocess(out)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "results.json").read_text()), _scalars(out)


@pytest.mark.parametrize("fault", ["checkpoint-write:2", pytest.param("client:2:1", marks=pytest.mark.slow),
                                   pytest.param("client:3:0", marks=pytest.mark.slow)])
def test_sigkill_then_resume_gives_identical_results(tmp_path, reference, fault):
    ref_results, ref_scalars = reference
    out = tmp_path / "run"
    killed = _fit_subprocess(out, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "results.json").exists()
    resumed = _fit_subprocess(out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after round" in resumed.stdout
    res = json.loads((out / "results.json").read_text())
    # CoOp's official optimiser is one state chained from client to client: the resume must restore it too
    assert res["optimizer_state"] == ref_results["optimizer_state"] == "chain"
    for key in ("final", "per_client", "history"):
        assert res[key] == ref_results[key], key
    scalars = _scalars(out)
    assert set(scalars) == set(ref_scalars)
    for tag, series in ref_scalars.items():
        steps = [s for s, _ in scalars[tag]]
        assert steps == sorted(set(steps)), f"duplicated steps in {tag}: {steps}"
        assert scalars[tag] == series, tag


def test_checkpoint_write_is_atomic_and_loading_checks(tmp_path, monkeypatch):
    path = tmp_path / ckpt.NAME
    state = ckpt.RunState(round=2, global_state={"ctx": torch.ones(2, 3)}, personal={0: {"u": torch.zeros(1)}},
                          history=[{"round": 1, "local": 1.0}], identity={"method": "coop"})
    ckpt.save(path, state)
    back = ckpt.load(path)
    assert back.round == 2 and torch.equal(back.global_state["ctx"], torch.ones(2, 3))
    assert torch.equal(back.personal[0]["u"], torch.zeros(1)) and back.history == state.history

    before = path.read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fedlit.atomic.os.fsync", disk_full)  # the write itself fails, after the temporary file exists
    with pytest.raises(FedlitError, match="previous checkpoint is intact"):
        ckpt.save(path, ckpt.RunState(round=3, global_state={"ctx": torch.zeros(2, 3)}, personal={}))
    assert path.read_bytes() == before and not (tmp_path / (ckpt.NAME + ".tmp")).exists()

    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(before[: len(before) // 2])
    with pytest.raises(FedlitError, match="unreadable or truncated"):
        ckpt.load(trunc)
    with pytest.raises(FedlitError, match="written with another method"):
        ckpt.check_identity(path, {"method": "coop"}, {"method": "fedpgp"})


def test_resume_refuses_a_checkpoint_of_another_method(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", "--config", QUICK, "--out_dir", str(out), *SMALL[:2], "--method", "coop"]) == 0
    (out / "results.json").unlink()  # pretend it was interrupted after its last checkpoint
    rc = main(["fit", "--config", QUICK, "--out_dir", str(out), *SMALL[:2], "--method", "promptfl"])
    err = capsys.readouterr().err
    assert rc == 2 and "another method" in err


def _flaky(monkeypatch):
    """Makes PromptFL's loss raise for client 1 and be NaN for client 2 (the client being trained is noted by a
    wrapper around the client engine's LocalRun: the loss itself is not told the client id)."""
    from fedlit import engine
    from fedlit.methods.promptfl import PromptFL

    current, loss, run_init = [None], PromptFL.loss, engine.LocalRun.__init__

    def noting(self, rt, module, cid, *args, **kwargs):
        current[0] = cid
        run_init(self, rt, module, cid, *args, **kwargs)

    def flaky(self, module, x, y, task, classes=None):
        if current[0] == 1:
            raise RuntimeError("injected failure")
        out = loss(self, module, x, y, task, classes)
        return out * float("nan") if current[0] == 2 else out

    monkeypatch.setattr(engine.LocalRun, "__init__", noting)
    monkeypatch.setattr(PromptFL, "loss", flaky)


def test_failing_clients_are_left_out_and_counted(tmp_path, monkeypatch, capsys):
    _flaky(monkeypatch)
    out = tmp_path / "flaky"
    assert main(["fit", "--config", QUICK, "--out_dir", str(out), "--trainer.rounds", "2"]) == 0
    err = capsys.readouterr().err
    assert "client 1 left out" in err and "injected failure" in err and "client 2 left out" in err
    res = json.loads((out / "results.json").read_text())
    assert len(res["history"]) == 2
    failed = dict(_scalars(out)["train/failed_clients"])
    assert failed == {1: 2.0, 2: 2.0}
    rc = main(["fit", "--config", QUICK, "--out_dir", str(tmp_path / "stop"), "--trainer.rounds", "2",
               "--trainer.on_client_failure", "stop"])
    assert rc == 2 and "client 1 failed in round 1" in capsys.readouterr().err
