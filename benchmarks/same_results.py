"""Does a refactor leave the numbers unchanged? 2-round runs of every method, captured before and after, compared.

    python benchmarks/same_results.py capture --tree /path/to/old/checkout --out /tmp/before   # the old code
    python benchmarks/same_results.py capture --out /tmp/after                                 # this checkout
    python benchmarks/same_results.py compare /tmp/before /tmp/after        # exit 0: same numbers; 1: a difference

``capture`` runs ``python -m fedlit.cli fit --config configs/<name>.yaml --config configs/embedded.yaml`` + SMALL
(2 rounds, 3 clients, 2 shots, 1 thread, seed 1; the method's optimiser-state policy, sync and augmentation: the
official loops) for every registered method with a config, then the CASES, one process at a time (``--methods``
picks some). It runs ``--tree`` (default: this checkout) with ``PYTHONPATH=TREE``, ``cwd=TREE`` and this
interpreter, so it captures an older checkout too (this script imports no fedlit). Each run writes ``OUT/<name>/``
(one already holding results.json is kept) and ``OUT/<name>.log``; ``OUT/capture.json``: commands, seconds, commit.

``compare`` walks the FIELDS of every run's ``results.json`` and the tensors of its ``checkpoint.safetensors`` (the
trained state: far finer than accuracies): numbers equal within ``--atol`` (default 0, bit-identical: right on the
same machine and thread count), all else equal. Wall time, run dir, config digest and keys only one side has (a new
``plan`` block) are not compared; one-sided keys are listed. Exit 1 on any difference (run, json path, before,
after) or on a run of BEFORE missing in AFTER (a failed run has no results.json); runs only in AFTER are listed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
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
EXTRA = {"fedmaple": ["--method.init_args.prompt_depth", "2"], "pfedpg": ["--data.subsample", "all"],
         "fedvpt": ["--data.subsample", "all"], "localvpt": ["--data.subsample", "all"],
         "pfedmma": ["--method.init_args.adapter_start", "1", "--method.init_args.adapter_end", "2"],
         "fedpha": ["--method.init_args.local_lengths", "[4, 16, 8]"],
         "promptsrc": ["--method.init_args.prompt_depth_text", "2", "--method.init_args.prompt_depth_vision", "2"]}

#: paths of the loop no method config takes by default: name -> (configs, overrides after SMALL)
EMBEDDED = "configs/embedded.yaml"
CASES = {
    "focoop+ood": (["configs/focoop.yaml", EMBEDDED, "configs/protocols/ood_embedded.yaml"], []),
    "fedpgp+domains": (["configs/fedpgp.yaml", EMBEDDED, "configs/protocols/embedded_domains.yaml"],
                       ["--data.num_clients", "1"]),
    "fedtpg+cross_class": (["configs/fedtpg.yaml", EMBEDDED, "configs/protocols/embedded_cross_class.yaml"], []),
    "fedprox_live": (["configs/fedprox_live.yaml", EMBEDDED], []),  # the proximal term with its gradient
    "promptfl+lockstep": (["configs/promptfl.yaml", EMBEDDED], ["--trainer.lockstep", "0",
                                                                "--trainer.optimizer_state", "fresh"]),
    "promptfl+partial": (["configs/promptfl.yaml", EMBEDDED], ["--trainer.participation", "0.5"]),
    "promptfl+2proc": (["configs/promptfl.yaml", EMBEDDED], ["--trainer.devices", "2", "--trainer.accelerator", "cpu",
                                                             "--trainer.optimizer_state", "fresh"]),
    "quickstart": (["configs/quickstart.yaml"], []),  # the demo's config: cached features, fresh, 2 local epochs
}


# ----------------------------------------------------------------------------------------------- compare (pure)
def diff(before, after, atol: float = 0.0, path: str = "") -> tuple[list[tuple[str, object, object]], list[str]]:
    """``(differences, one_sided)`` of two JSON values: differences as ``(path, before, after)``; one-sided as
    ``"path (only in before|after)"``. Numbers agree within ``atol`` (NaN equals NaN), lists by position."""
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (before, after)):
        same = math.isnan(before) == math.isnan(after) and (math.isnan(before) or abs(before - after) <= atol)
        return ([] if same else [(path, before, after)]), []
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(set(before) | set(after), key=str)
        one_sided = [f"{path}.{k}".lstrip(".") + f" (only in {'before' if k in before else 'after'})"
                     for k in keys if (k in before) != (k in after)]
        pairs = [(f"{path}.{k}".lstrip("."), before[k], after[k]) for k in keys if k in before and k in after]
    elif isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [(f"{path} (length)", len(before), len(after))], []
        one_sided, pairs = [], [(f"{path}[{i}]", b, a) for i, (b, a) in enumerate(zip(before, after))]
    else:
        same = before == after and isinstance(before, bool) == isinstance(after, bool)  # True is not the number 1
        return ([] if same else [(path, before, after)]), []
    differences = []
    for sub, b, a in pairs:
        d, o = diff(b, a, atol, sub)
        differences, one_sided = differences + d, one_sided + o
    return differences, one_sided


def compare_results(before: dict, after: dict, atol: float = 0.0, ignore: tuple[str, ...] = ()) -> tuple[list, list]:
    """:func:`diff` of the FIELDS of two results.json dicts (less ``ignore``); top-level keys outside FIELDS that
    only one side has are listed too."""
    fields = [f for f in FIELDS if f not in ignore]
    differences, one_sided = diff({k: before[k] for k in fields if k in before},
                                  {k: after[k] for k in fields if k in after}, atol)
    one_sided += [f"{k} (only in {'before' if k in before else 'after'})" for k in sorted(set(before) ^ set(after))
                  if k not in fields]
    return differences, one_sided


_CODES = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h", "I8": "b", "U8": "B", "BOOL": "?"}


def tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes) of a safetensors file (stdlib: 8-byte header size, JSON header, data)."""
    size = struct.unpack("<Q", (raw := path.read_bytes())[:8])[0]
    header, data = json.loads(raw[8:8 + size]), raw[8 + size:]
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def values(dtype: str, data: bytes) -> tuple:
    """The numbers of a tensor's little-endian bytes (of another dtype: its bytes)."""
    return struct.unpack(f"<{len(data) // struct.calcsize(_CODES.get(dtype, 'B'))}{_CODES.get(dtype, 'B')}", data)


def diff_tensors(before: dict, after: dict, atol: float = 0.0) -> tuple[list, list]:
    """:func:`diff` of two :func:`tensors` dicts; a difference: ``("checkpoint:NAME", "K of N values differ", …)``."""
    differences, one_sided = [], []
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            one_sided.append(f"checkpoint:{name} (only in {'before' if name in before else 'after'})")
            continue
        (db, sb, xb), (da, sa, xa) = before[name], after[name]
        if (db, sb) != (da, sa):
            differences.append((f"checkpoint:{name} (dtype, shape)", [db, sb], [da, sa]))
        elif xb != xa:
            gaps = [0.0 if p != p and q != q else abs(p - q) for p, q in zip(values(db, xb), values(da, xa))]
            bad = [g for g in gaps if not g <= atol]  # NaN against a number is a difference
            if bad:
                differences.append((f"checkpoint:{name}", f"{len(bad)} of {len(gaps)} values differ",
                                    f"max |diff| {max(bad):.3g}"))
    return differences, one_sided


def compare_run(before: Path, after: Path, atol: float = 0.0, ignore: tuple[str, ...] = ()) -> tuple[list, list]:
    """Two run directories: results.json (:func:`compare_results`), checkpoint tensors (:func:`diff_tensors`)."""
    differences, one_sided = compare_results(json.loads((before / "results.json").read_text()),
                                             json.loads((after / "results.json").read_text()), atol, ignore)
    ckpt = [d / "checkpoint.safetensors" for d in (before, after)]
    if "checkpoint" not in ignore and any(c.exists() for c in ckpt):
        d, o = diff_tensors(*[tensors(c) if c.exists() else {} for c in ckpt], atol)
        differences, one_sided = differences + d, one_sided + o
    return differences, one_sided


def compare(before_dir: Path, after_dir: Path, atol: float = 0.0, ignore: tuple[str, ...] = (), out=print) -> int:
    """Compare every run in both folders; print what differs; 0 when nothing does, else 1."""
    before, after = ({p.parent.name: p.parent for p in d.glob("*/results.json")} for d in (before_dir, after_dir))
    for name in sorted(set(before) ^ set(after)):  # a run missing after fails; a new one is only listed
        out(f"{name}: MISSING in {after_dir} (it failed or was not captured)" if name in before
            else f"{name}: only in {after_dir} (not compared)")
    failed = not before or bool(set(before) - set(after))
    for name in sorted(set(before) & set(after)):
        differences, one_sided = compare_run(before[name], after[name], atol, ignore)
        for key in one_sided:
            out(f"{name}: key {key}")
        for path, b, a in differences:
            out(f"{name}: {path}: " + (f"{b}, {a}" if path.startswith("checkpoint:") else f"before {b!r} after {a!r}"))
        failed |= bool(differences)
        out(f"{name}: same") if not differences else None
    out(f"same_results: {'DIFFERENT' if failed else 'same'} ({len(set(before) & set(after))} runs compared, "
        f"atol {atol}; {before_dir} holds {len(before)})")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- capture
def _child(tree: Path, args: list[str], **kw) -> subprocess.CompletedProcess:
    """``args`` run by this interpreter in ``tree`` on ``tree``'s fedlit."""
    return subprocess.run([sys.executable, *args], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True, **kw)


def plan(tree: Path, names: list[str] | None) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (configs, overrides) of each run: ``names`` (methods, CASES), else the tree's methods with a config."""
    if not names:
        done = _child(tree, ["-c", "from fedlit.methods import list_methods; print(*list_methods())"])
        if done.returncode != 0:
            sys.exit(f"same_results: cannot list the methods of {tree}: {done.stderr.strip()[-300:]}")
        names = [m for m in done.stdout.split() if (tree / "configs" / f"{m}.yaml").exists()] + list(CASES)
    missing = [m for m in names if m not in CASES and not (tree / "configs" / f"{m}.yaml").exists()]
    if missing:
        sys.exit(f"same_results: {tree}/configs/{missing[0]}.yaml does not exist; pick a method of `fedlit methods` "
                 f"or a case ({' '.join(CASES)})")
    return {m: CASES[m] if m in CASES else ([f"configs/{m}.yaml", EMBEDDED], EXTRA.get(m, [])) for m in names}


def capture(tree: Path, out: Path, names: list[str] | None, timeout: float) -> int:
    """Run every planned run of ``tree`` into ``out``; one line each; 1 if any failed."""
    tree, out = tree.resolve(), out.resolve()
    runs = plan(tree, names)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "capture.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"runs": {}}
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    manifest.update({"tree": str(tree), "commit": commit.strip() or None, "python": sys.executable})
    failed, kept, t_all = [], [], time.time()
    for name, (configs, extra) in runs.items():
        run = out / name
        if (run / "results.json").exists():
            print(f"{name:<20} kept (results.json already in {run})", flush=True)
            kept.append(name)
            continue
        shutil.rmtree(run, ignore_errors=True)  # an earlier capture stopped in it: no results to lose, start afresh
        cmd = ["-m", "fedlit.cli", "fit", *[a for c in configs for a in ("--config", c)], *SMALL, *extra,
               "--out_dir", str(run)]  # config paths relative to the tree
        t0 = time.time()
        try:
            done = _child(tree, cmd, timeout=timeout)
            rc, log = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired:
            rc, log = "timeout", f"timed out after {timeout} s (--timeout)"
        seconds = round(time.time() - t0, 1)
        ok = rc == 0 and (run / "results.json").exists()
        (out / f"{name}.log").write_text(log)
        last = "" if ok else "  " + (log.strip().splitlines() or ["(no output)"])[-1][:160]
        print(f"{name:<20} {seconds:7.1f} s  {'ok' if ok else 'FAILED'}{last}", flush=True)
        manifest["runs"][name] = {"command": cmd, "seconds": seconds, "ok": ok}
        manifest_path.write_text(json.dumps(manifest, indent=1))
        failed += [] if ok else [name]
    print(f"same_results: {len(runs) - len(failed) - len(kept)} ran ok, {len(kept)} kept, {len(failed)} failed"
          f" in {time.time() - t_all:.0f} s" + (f": {' '.join(failed)} (see {out}/<name>.log)" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="run every method for 2 rounds into OUT/<name>/")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--tree", "--fedlit", type=Path, default=ROOT, help="the checkout to run (default: this one)")
    c.add_argument("--methods", nargs="+", help="these methods / CASES only (default: all with a config, the CASES)")
    c.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    k = sub.add_parser("compare", help="compare the results.json numbers of two captures")
    for side in ("before", "after"):
        k.add_argument(side, type=Path)
    k.add_argument("--atol", type=float, default=0.0, help="numbers may differ by this much (default 0)")
    k.add_argument("--ignore", nargs="+", default=[], choices=[*FIELDS, "checkpoint"], help="fields not compared")
    a = p.parse_args(argv)
    return capture(a.tree, a.out, a.methods, a.timeout) if a.cmd == "capture" else \
        compare(a.before, a.after, a.atol, tuple(a.ignore))


if __name__ == "__main__":
    sys.exit(main())
