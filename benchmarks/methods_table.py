"""Every method × Local / Base / Novel / HM on the embedded benchmark, mean ± std over seeds.

    python benchmarks/methods_table.py --seeds 0 1 2 --out results/methods   # writes results/methods/table.md

Each cell is `fedlit fit --config configs/<method>.yaml --config configs/embedded.yaml` (fedlit-toy,
shapes-dark, 6 clients, disjoint base classes, 16 shots) with the overrides the 2-layer toy needs; finished
runs are skipped, so the command can be re-run to fill in what is missing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRA = {"fedmaple": ["--method.init_args.prompt_depth", "2"], "pfedpg": ["--data.subsample", "all"],
         "fedvpt": ["--data.subsample", "all"], "localvpt": ["--data.subsample", "all"],
         "ivlp": ["--method.init_args.prompt_depth_text", "2", "--method.init_args.prompt_depth_vision", "2"],
         "pfedmma": ["--method.init_args.adapter_start", "1", "--method.init_args.adapter_end", "2"],
         "promptsrc": ["--method.init_args.prompt_depth_text", "2", "--method.init_args.prompt_depth_vision", "2"]}


def main() -> None:
    from fedlit.methods import list_methods

    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list_methods())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="results/methods")
    a = p.parse_args()
    out = Path(a.out)
    runs = []
    for m in a.methods:
        for s in a.seeds:
            run = out / m / f"seed{s}"
            runs.append(str(run))
            if (run / "results.json").exists():
                continue
            cmd = [sys.executable, "-m", "fedlit.cli", "fit", "--config", f"configs/{m}.yaml", "--config",
                   "configs/embedded.yaml", "--seed", str(s), "--trainer.rounds", str(a.rounds),
                   "--trainer.progress", "false", "--out_dir", str(run), *EXTRA.get(m, [])]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            print(f"{m} seed {s}: {proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else 'FAILED ' + proc.stderr[-300:]}",
                  flush=True)
    subprocess.run([sys.executable, "-m", "fedlit.cli", "summarize", *runs, "--out", str(out / "table"),
                    "--paper", "none"], cwd=ROOT, check=False)


if __name__ == "__main__":
    main()
