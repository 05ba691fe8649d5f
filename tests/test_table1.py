"""`make reproduce-table1`'s driver: the paper's order, a table after every cell, signals reach the running cell."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedlit.apps import table1

ROOT = Path(__file__).resolve().parents[1]


def test_an_interrupted_grid_leaves_a_table_with_finished_and_pending_cells(tmp_path, monkeypatch):
    real = table1._run_in_process

    def second_cell_gets_sigterm(cmd, log):
        if "promptfl" in " ".join(cmd):
            table1.Interrupted.last_signum = signal.SIGTERM
            raise table1.Interrupted(signal.SIGTERM)
        return real(cmd, log)

    monkeypatch.setattr(table1, "_run_in_process", second_cell_gets_sigterm)
    rc = table1.main(["--backbone", "fedlit-toy", "--methods", "promptfl", "zeroshot", "--datasets", "dtd",
                      "oxford_pets", "--rounds", "1", "--out", str(tmp_path)])
    assert rc == 128 + signal.SIGTERM
    md = (tmp_path / "table1-fedlit-toy.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "Method" not in ln]
    # the paper's order (CLIP before PromptFL, OxfordPets before DTD) whatever order the command named them in
    assert [r.split(" | ")[:2] for r in rows] == [["| CLIP", "shapes-dark (≙ OxfordPets)"],
                                                  ["| CLIP", "shapes-textured (≙ DTD)"],
                                                  ["| PromptFL", "shapes-dark (≙ OxfordPets)"],
                                                  ["| PromptFL", "shapes-textured (≙ DTD)"]]
    assert "pending" not in rows[0] and "pending" not in rows[1] and "| 89.34 |" in rows[0]
    assert all("| pending |" in r for r in rows[2:]) and "run the same command again" in md


def test_sigterm_to_the_driver_reaches_an_isolated_cell_and_writes_the_table(tmp_path):
    pid_file = tmp_path / "child.pid"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys
        from fedlit.apps import table1
        sleeper = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
        table1.fit_command = lambda *a, **k: [sys.executable, "-c", sleeper]
        sys.exit(table1.main(["--backbone", "fedlit-toy", "--methods", "zeroshot", "--datasets", "dtd",
                              "--isolate", "--out", {str(tmp_path)!r}]))
    """))
    proc = subprocess.Popen([sys.executable, str(driver)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    with pytest.raises(ProcessLookupError):  # the cell's process got the signal and is gone
        os.kill(child, 0)
    assert "run the same command again" in err
    assert "| pending |" in (tmp_path / "table1-fedlit-toy.md").read_text()
