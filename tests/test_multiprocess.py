"""Client-parallel simulation: 2 processes (gloo, CPU) give exactly the same results as 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def _fit(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "fedlit.cli", "fit", "--config", QUICK, "--method", "coop",
           "--trainer.rounds", "2", "--data.num_clients", "5", "--out_dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


def test_two_processes_equal_one(tmp_path):
    one = _fit(tmp_path / "one")
    two = _fit(tmp_path / "two", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    # 5 clients over 2 ranks: uneven shards; personal CoOp state must come back to the right client
    assert two["per_client"] == one["per_client"]
    assert two["history"] == one["history"]
    assert two["final"] == one["final"]
