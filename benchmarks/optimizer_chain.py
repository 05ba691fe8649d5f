"""The optimiser-state policy on the embedded default (issue 21 item 1, issue 24 item 5): accuracy of the official
``chain`` against ``fresh`` over seeds, and the wall time of ``chain`` (clients in sequence) against ``fresh`` with
the clients in lock-step and with 2 processes, measured one after the other in one job.

    python benchmarks/optimizer_chain.py --out results/optimizer_chain                 # seeds 1 2 3, then timing
    python benchmarks/optimizer_chain.py --out results/optimizer_chain --report        # the markdown tables

Every run is ``fedlit fit --config configs/<method>.yaml --config configs/embedded.yaml --seed S
--trainer.optimizer_state P`` in its own process (Fabric launches the 2-process one), with a shared disk feature
cache, so the view bank of a seed is encoded once for all methods and policies (the timed runs read it warm).
``summary.json`` is rewritten after every run: an interrupted job keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["fedpgp", "promptfl", "coop", "fedotp"]  # the headline first: a short job keeps it
POLICIES = ["chain", "fresh"]
TIMED_ROUNDS = ["--trainer.rounds", "2", "--trainer.eval_every", "2"]  # per-round cost: 2 rounds, warm view cache
TIMED = {"chain (sequential)": ["--trainer.optimizer_state", "chain"],
         "fresh, lockstep 0": ["--trainer.optimizer_state", "fresh", "--trainer.lockstep", "0"],
         "fresh, 2 processes": ["--trainer.optimizer_state", "fresh", "--trainer.devices", "2",
                                "--trainer.accelerator", "cpu"]}


def fit(out: Path, method: str, seed: int, extra: list[str], cache: Path) -> dict:
    cmd = [sys.executable, "-m", "fedlit.cli", "fit", "--config", str(ROOT / "configs" / f"{method}.yaml"),
           "--config", str(ROOT / "configs" / "embedded.yaml"), "--seed", str(seed), "--trainer.progress", "false",
           "--trainer.feature_cache", "disk", "--trainer.cache_dir", str(cache), "--out_dir", str(out), *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    r = json.loads((out / "results.json").read_text())
    return {"final": r["final"], "optimizer_state": r.get("optimizer_state"), "fit_wall_s": r["wall_time_s"],
            "process_wall_s": round(time.time() - t0, 2), "load": os.getloadavg()[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="results/optimizer_chain")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--report", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"runs": {}, "timed": {}}
    if a.report:
        print(report(summary))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"

    def save():
        summary_path.write_text(json.dumps(summary, indent=1))

    for i, seed in enumerate(a.seeds):
        for method in METHODS:
            for policy in POLICIES:
                key = f"{method}/{policy}/{seed}"
                if key not in summary["runs"]:
                    summary["runs"][key] = fit(out / key, method, seed, ["--trainer.optimizer_state", policy], cache)
                    save()
                    print(key, summary["runs"][key], flush=True)
            if i == 0 and method == "fedpgp":  # the timing, once, right after FedPGP warmed the first seed's cache
                for label, extra in TIMED.items():
                    if label not in summary["timed"]:
                        summary["timed"][label] = fit(out / "timed" / label.replace(" ", "_").replace(",", ""),
                                                      "fedpgp", seed, [*extra, *TIMED_ROUNDS], cache)
                        save()
                        print(label, summary["timed"][label], flush=True)
    print(report(summary))
    return 0


def report(summary: dict) -> str:
    lines = ["| method | optimizer_state | seeds | Local | Base | Novel | HM |", "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for policy in POLICIES:
            runs = [r for k, r in summary["runs"].items() if k.startswith(f"{method}/{policy}/")]
            if not runs:
                continue
            cells = []
            for m in ("local", "base", "novel", "hm"):
                v = np.array([r["final"][m] for r in runs])
                cells.append(f"{v.mean():.2f} ± {v.std():.2f}")
            lines.append(f"| {method} | {policy} | {len(runs)} | " + " | ".join(cells) + " |")
    if summary["timed"]:
        lines += ["", "| FedPGP, seed 1, 2 rounds | fit loop (s) | process (s) | load avg (1 min) at the end |",
                  "|---|---|---|---|"]
        for label, r in summary["timed"].items():
            lines.append(f"| {label} | {r['fit_wall_s']:.1f} | {r['process_wall_s']:.1f} | {r['load']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
