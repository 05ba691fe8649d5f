"""A researcher's loop: progress that shows without a terminal, Ctrl-C, then the same command resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fedlit.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
SMALL = ["--data.num_clients", "4", "--data.shots", "4", "--method", "coop",
         "--data.dataset_args", '{"train_per_class": 8, "test_per_class": 4}']


def test_without_a_terminal_every_round_prints_one_plain_line(tmp_path, capsys):
    assert main(["fit", "--config", QUICK, *SMALL, "--trainer.rounds", "2", "--out_dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [ln for ln in out if ln.startswith("coop round ")]
    assert [ln.split()[2] for ln in lines] == ["1/2", "2/2"]
    for ln in lines:
        assert " s  loss " in ln and "Local " in ln and "HM " in ln


def test_ctrl_c_then_the_same_command_resumes_and_the_saved_config_follows(tmp_path):
    cmd = [sys.executable, "-m", "fedlit.cli", "fit", "--config", QUICK, *SMALL]
    run = tmp_path / "runs" / "coop-shapes-dark-seed0"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*cmd, "--trainer.rounds", "30"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (run / "checkpoint.safetensors").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err and str(Path("runs") / run.name) in err
    assert not (run / "results.json").exists()
    # the same command (here with another round count) finds the unfinished run instead of starting runs/…-2
    again = subprocess.run([*cmd, "--trainer.rounds", "3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming after round" in again.stdout
    assert (run / "results.json").is_file() and sorted(p.name for p in run.parent.iterdir()) == [run.name]
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["rounds"] == 3
    # a finished run is never reused: the next identical command gets a new directory
    third = subprocess.run([*cmd, "--trainer.rounds", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
    assert third.returncode == 0 and (run.parent / f"{run.name}-2" / "results.json").is_file()
