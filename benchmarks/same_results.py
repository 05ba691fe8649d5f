"""Does a refactor leave the numbers unchanged? 2-round runs of every method, captured before and after, compared.

    python benchmarks/same_results.py capture --tree /path/to/old/checkout --out /tmp/before   # the old code
    python benchmarks/same_results.py capture --out /tmp/after                                 # this checkout
    python benchmarks/same_results.py compare /tmp/before /tmp/after        # exit 0: same numbers; 1: a difference

``capture`` runs, one process at a time, ``python -m fedlit.cli fit --config configs/<name>.yaml --config
configs/embedded.yaml`` with the small fixed overrides below (2 rounds, 3 clients, 2 shots, 1 thread, seed 1; the
optimiser-state policy, sync mode and augmentation stay the method's, so the official loops are covered) for every
registered method that has a config (``--methods`` picks some), then a few fixed CASES (OOD section, domain and
cross-class partitions, lock-step, partial participation, 2 processes, the quickstart). The code run is the one in
``--tree`` (default: the checkout this script is in), with ``PYTHONPATH=TREE`` and ``cwd=TREE``, so the same script
captures an older checkout; the interpreter is the one running this script. Each run writes ``OUT/<name>/`` (a name
that already holds ``results.json`` is kept, not rerun) and ``OUT/<name>.log``; ``OUT/capture.json`` lists commands,
seconds and status. This script imports no fedlit: it must not mix the two trees.

``compare`` walks the numbers of each run's ``results.json`` (the FIELDS below) recursively: numbers equal within
``--atol`` (default 0, bit-identical: right on the same machine and thread count), everything else equal. Wall time,
the run dir, the config digest and keys only one side has (a new ``plan`` block) are not compared, but the one-sided
keys are listed. Exit 1 on any difference (method / json path / before / after) or on a run of BEFORE missing in
AFTER (a failed run leaves no results.json); runs only in AFTER are listed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: results.json fields that are numbers of the run (or say which loop produced them)
FIELDS = ("final", "statistics", "history", "per_client", "per_group", "client_groups", "final_round",
          "per_client_round", "selection", "optimizer_state", "sync", "step_loop", "privacy", "ood", "images_encoded")

#: small and fast on the embedded default, for every run (later dotted overrides win, so CASES can undo one)
SMALL = ["--trainer.rounds", "2", "--trainer.eval_every", "1", "--data.num_clients", "3", "--data.shots", "2",
         "--data.dataset_args", '{"test_per_class": 6, "train_per_class": 8}', "--trainer.batch_size", "8",
         "--trainer.threads", "1", "--trainer.progress", "false", "--seed", "1"]

#: per-method overrides the 2-layer toy backbone needs (as tests/test_all_methods.py)
EXTRA = {
    "fedmaple": ["--method.init_args.prompt_depth", "2"],
    "pfedpg": ["--data.subsample", "all"],
    "fedvpt": ["--data.subsample", "all"],
    "localvpt": ["--data.subsample", "all"],
    "pfedmma": ["--method.init_args.adapter_start", "1", "--method.init_args.adapter_end", "2"],
    "fedpha": ["--method.init_args.local_lengths", "[4, 16, 8]"],
    "promptsrc": ["--method.init_args.prompt_depth_text", "2", "--method.init_args.prompt_depth_vision", "2"],
}

#: paths of the loop no method config takes by default: name -> (config, overlays, overrides after SMALL)
CASES = {
    "focoop+ood": ("configs/focoop.yaml", ["configs/protocols/ood_embedded.yaml"], []),
    "fedpgp+domains": ("configs/fedpgp.yaml", ["configs/protocols/embedded_domains.yaml"],
                       ["--data.num_clients", "1"]),
    "fedtpg+cross_class": ("configs/fedtpg.yaml", ["configs/protocols/embedded_cross_class.yaml"], []),
    "promptfl+lockstep": ("configs/promptfl.yaml", [], ["--trainer.lockstep", "0", "--trainer.optimizer_state", "fresh"]),
    "promptfl+partial": ("configs/promptfl.yaml", [], ["--trainer.participation", "0.5"]),
    "promptfl+2proc": ("configs/promptfl.yaml", [], ["--trainer.devices", "2", "--trainer.accelerator", "cpu",
                                                      "--trainer.optimizer_state", "fresh"]),
    "quickstart": ("configs/quickstart.yaml", [], []),
}


# ----------------------------------------------------------------------------------------------- compare (pure)
def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def diff(before, after, atol: float = 0.0, path: str = "") -> tuple[list[tuple[str, object, object]], list[str]]:
    """``(differences, one_sided)`` of two JSON values: differences as ``(path, before, after)``; one-sided as
    ``"path (only in before|after)"``. Numbers agree within ``atol`` (NaN equals NaN), lists by position."""
    if _is_number(before) and _is_number(after):
        same = (math.isnan(before) and math.isnan(after)) if (math.isnan(before) or math.isnan(after)) \
            else abs(before - after) <= atol
        return ([] if same else [(path, before, after)]), []
    if isinstance(before, dict) and isinstance(after, dict):
        differences, one_sided = [], []
        for key in sorted(set(before) | set(after), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in after:
                one_sided.append(f"{sub} (only in before)")
            elif key not in before:
                one_sided.append(f"{sub} (only in after)")
            else:
                d, o = diff(before[key], after[key], atol, sub)
                differences += d
                one_sided += o
        return differences, one_sided
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [(f"{path} (length)", len(before), len(after))], []
        differences, one_sided = [], []
        for i, (b, a) in enumerate(zip(before, after)):
            d, o = diff(b, a, atol, f"{path}[{i}]")
            differences += d
            one_sided += o
        return differences, one_sided
    same = before == after and isinstance(before, bool) == isinstance(after, bool)  # True is not the number 1
    return ([] if same else [(path, before, after)]), []


def compare_results(before: dict, after: dict, atol: float = 0.0, ignore: tuple[str, ...] = ()) -> tuple[list, list]:
    """:func:`diff` of the FIELDS of two results.json dicts (less ``ignore``); top-level keys outside FIELDS that
    only one side has are listed too."""
    fields = [f for f in FIELDS if f not in ignore]
    differences, one_sided = diff({k: before[k] for k in fields if k in before},
                                  {k: after[k] for k in fields if k in after}, atol)
    one_sided += [f"{k} (only in before)" for k in sorted(set(before) - set(after) - set(fields))]
    one_sided += [f"{k} (only in after)" for k in sorted(set(after) - set(before) - set(fields))]
    return differences, one_sided


def _runs(folder: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in sorted(folder.glob("*/results.json"))}


def compare(before_dir: Path, after_dir: Path, atol: float = 0.0, ignore: tuple[str, ...] = (), out=print) -> int:
    """Compare every run in both folders; print what differs; 0 when nothing does, else 1."""
    before, after = _runs(before_dir), _runs(after_dir)
    if not before:
        out(f"same_results: no */results.json under {before_dir}")
        return 1
    failed = False
    for name in sorted(set(before) - set(after)):
        out(f"{name}: MISSING in {after_dir} (the run failed or was not captured)")
        failed = True
    for name in sorted(set(after) - set(before)):
        out(f"{name}: only in {after_dir} (not compared)")
    for name in sorted(set(before) & set(after)):
        differences, one_sided = compare_results(json.loads(before[name].read_text()),
                                                 json.loads(after[name].read_text()), atol, ignore)
        for key in one_sided:
            out(f"{name}: key {key}")
        for path, b, a in differences:
            out(f"{name}: {path}: before {b!r} after {a!r}")
        failed |= bool(differences)
        if not differences:
            out(f"{name}: same")
    both = len(set(before) & set(after))
    out(f"same_results: {'DIFFERENT' if failed else 'same'} ({both} runs compared, atol {atol})")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- capture
def registered_methods(tree: Path) -> list[str]:
    """The method names the tree registers (asked of the tree itself, in a child process)."""
    code = "import json; from fedlit.methods import list_methods; print(json.dumps(list(list_methods())))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=_env(tree), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"same_results: cannot list the methods of {tree}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def plan(tree: Path, methods: list[str] | None, cases: bool) -> dict[str, tuple[str, list[str], list[str]]]:
    """name -> (config, overlays, overrides) of every run to capture, methods first."""
    names = methods or [m for m in registered_methods(tree) if (tree / "configs" / f"{m}.yaml").exists()]
    for m in names:
        if not (tree / "configs" / f"{m}.yaml").exists():
            sys.exit(f"same_results: {tree}/configs/{m}.yaml does not exist; pick methods from `fedlit methods`")
    runs = {m: (f"configs/{m}.yaml", [], EXTRA.get(m, [])) for m in names}
    if cases:
        runs.update(CASES)
    return runs


def command(config: str, overlays: list[str], extra: list[str], out_dir: Path) -> list[str]:
    configs = [a for c in [config, "configs/embedded.yaml", *overlays] for a in ("--config", c)]
    return [sys.executable, "-m", "fedlit.cli", "fit", *configs, *SMALL, *extra, "--out_dir", str(out_dir)]


def capture(tree: Path, out: Path, methods: list[str] | None, cases: bool, timeout: float) -> int:
    """Run every planned run of ``tree`` into ``out``; one line each; 1 if any failed."""
    tree, out = tree.resolve(), out.resolve()
    runs = plan(tree, methods, cases)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "capture.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update({"tree": str(tree), "commit": _commit(tree), "python": sys.executable})
    manifest.setdefault("runs", {})
    failed, t_all = [], time.time()
    for name, (config, overlays, extra) in runs.items():
        run = out / name
        if (run / "results.json").exists():
            print(f"{name:<20} kept (results.json already in {run})", flush=True)
            continue
        if run.exists():  # an earlier capture stopped in it: no results to lose, start it afresh
            shutil.rmtree(run)
        cmd = command(config, overlays, extra, run)
        t0 = time.time()
        try:
            done = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=timeout)
            rc, log = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            rc, log = "timeout", f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout} s"
        seconds = round(time.time() - t0, 1)
        ok = rc == 0 and (run / "results.json").exists()
        (out / f"{name}.log").write_text(log if isinstance(log, str) else str(log))
        last = "" if ok else "  " + (log.strip().splitlines() or ["(no output)"])[-1][:160]
        print(f"{name:<20} {seconds:7.1f} s  {'ok' if ok else 'FAILED'}{last}", flush=True)
        manifest["runs"][name] = {"command": cmd[1:], "seconds": seconds, "ok": ok}
        manifest_path.write_text(json.dumps(manifest, indent=1))
        if not ok:
            failed.append(name)
    print(f"same_results: {len(runs) - len(failed)}/{len(runs)} ok in {time.time() - t_all:.0f} s"
          + (f"; failed: {' '.join(failed)} (see OUT/<name>.log)" if failed else ""))
    return 1 if failed else 0


def _commit(tree: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="run every method for 2 rounds into OUT/<name>/")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--tree", "--fedlit", type=Path, default=ROOT, help="the checkout to run (default: this one)")
    c.add_argument("--methods", nargs="+", help="these methods only (default: all with a config; then the CASES)")
    c.add_argument("--no-cases", action="store_true", help="methods only, without the extra CASES")
    c.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    k = sub.add_parser("compare", help="compare the results.json numbers of two captures")
    k.add_argument("before", type=Path)
    k.add_argument("after", type=Path)
    k.add_argument("--atol", type=float, default=0.0, help="numbers may differ by this much (default 0)")
    k.add_argument("--ignore", nargs="+", default=[], choices=FIELDS, help="fields not compared")
    a = p.parse_args(argv)
    if a.cmd == "capture":
        return capture(a.tree, a.out, a.methods, not a.no_cases and not a.methods, a.timeout)
    return compare(a.before, a.after, a.atol, tuple(a.ignore))


if __name__ == "__main__":
    sys.exit(main())
