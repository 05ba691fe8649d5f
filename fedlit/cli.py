"""``fedlit`` command line (jsonargparse, LightningCLI conventions).

    fedlit fit --config configs/quickstart.yaml                  # train a federation
    fedlit fit --config configs/quickstart.yaml --method zeroshot --trainer.rounds 5
    fedlit fit --config configs/promptfl.yaml --print_config     # the full resolved config
    fedlit plot runs/a runs/b --out plots                        # PNGs of finished runs
    fedlit summarize runs/a runs/b --out results/summary         # mean ± std table (.md + .csv), paper beside
    fedlit pretrain-toy                                          # regenerate the embedded model
    fedlit flower --config configs/quickstart.yaml               # the same run as a real Flower federation
    fedlit datasets | methods | backbones                        # list registered names

``fit`` takes ``--config`` (several compose in order), dotted overrides (``--data.shots 8``),
``class_path``/``init_args`` for the method (or ``--method NAME``), ``--seed``, ``--out_dir``. The
resolved config is saved as ``config.yaml`` in the run directory, beside ``results.json`` and the
TensorBoard files. User errors print one line, ``error: …``, and exit with status 2.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Literal

from .errors import FedlitError


class Backbone:
    """The frozen backbone (the ``backbone:`` section).

    Args:
        name: ``fedlit-toy`` (embedded) or an open_clip architecture (``ViT-B-16``; CoOp's ``ViT-B/16`` works too).
        pretrained: ``default`` (bundled weights for fedlit-toy, ``openai`` otherwise), an open_clip tag,
            a local checkpoint file, or ``none`` for random init.
        text_path: ``shared_prefix`` (default: the prompt positions shared by every class are encoded once per
            context) or ``plain`` (one full sequence per class, the reference); both are exact to float rounding.
    """

    def __init__(self, name: str = "fedlit-toy", pretrained: str | None = "default",
                 text_path: Literal["shared_prefix", "plain"] = "shared_prefix"):
        self.name = name
        self.pretrained = pretrained
        self.text_path = text_path


# ----------------------------------------------------------------------------------------- parser
def _fit_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .data.federation import FederatedData
    from .trainer import FedTrainer
    from .methods import FedMethod

    p = ArgumentParser(prog="fedlit fit", description="Train and evaluate a federation.", exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML config file(s), composed in order.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the run (partition, sampling, init).")
    p.add_argument("--out_dir", type=str | None, default=None,
                   help="Run directory (default: runs/<method>-<dataset>-seed<seed>[-N], never overwritten).")
    p.add_argument("--overwrite", type=bool, default=False, help="Allow replacing a finished run in --out_dir.")
    p.add_class_arguments(Backbone, "backbone")
    p.add_class_arguments(FederatedData, "data")
    p.add_subclass_arguments(FedMethod, "method", required=True, help="Method (class_path/init_args or --method NAME).")
    p.add_class_arguments(FedTrainer, "trainer")
    return p


def _rewrite_method_shortcut(argv: list[str]) -> list[str]:
    """``--method promptfl`` → ``--method fedlit.methods.promptfl.PromptFL`` (short names from the registry)."""
    from .methods import class_path, list_methods

    methods = list_methods()
    out = list(argv)
    for i, a in enumerate(out):
        name = None
        if a == "--method" and i + 1 < len(out):
            name, j = out[i + 1], i + 1
        elif a.startswith("--method="):
            name, j = a.split("=", 1)[1], i
        if name is None or "." in name or name.strip().startswith("{"):
            continue
        if name in methods:
            value = class_path(name)
        elif name.lower() in methods:
            value = class_path(name.lower())
        elif name[:1].isupper():
            continue  # a class name: jsonargparse resolves it
        else:
            from .errors import unknown_name

            raise unknown_name("method", name, methods)
        out[j] = value if j == i + 1 else f"--method={value}"
    return out


def _method_params(text: str) -> list[str]:
    """Constructor arguments of the class named in a jsonargparse message (``class_path 'x.y.Z'``)."""
    import importlib
    import inspect

    m = re.search(r"class_path '([\w.]+)'", text)
    if not m:
        return []
    mod, _, name = m.group(1).rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    except Exception:
        return []


def _friendly(parser, err: Exception) -> str:
    """One line from a jsonargparse error: the offending key and the closest valid one, or the bad value."""
    text = " ".join(str(err).split())
    valid = sorted(a.dest for a in _all_actions(parser) if a.dest not in ("help", "print_config"))
    unknown = (re.search(r"unrecognized arguments: --([\w.\-]+)", text)
               or re.search(r"Group '([\w.]+)' does not accept option '(\w+)'", text)
               or re.search(r'Key "([\w.]+)" is not expected', text))
    if unknown:
        key = ".".join(g for g in unknown.groups() if g)
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown config key '{key}'{hint}; `fedlit fit --help` lists the valid keys"
    opt = re.search(r"Option '(\w+)' is not accepted", text)
    if opt:
        params = _method_params(text)
        close = difflib.get_close_matches(opt.group(1), params, n=1, cutoff=0.5)
        hint = f" (did you mean 'method.init_args.{close[0]}'?)" if close else ""
        return (f"unknown config key 'method.init_args.{opt.group(1)}'{hint}; "
                f"this method takes: {', '.join(params)}")
    bad = re.findall(r'Parser key "([\w.]+)": Expected a (.+?)\. Got value: (.+?)(?= - |$)', text)
    if bad:
        key, typ, val = bad[-1]
        if key != "method" and "init_args" not in key and "class_path" in text:
            key = f"method.init_args.{key}"
        typ = re.sub(r"<class '(\w+)'>", r"\1", typ).replace("typing.", "")
        return f"{key}: expected {typ}, got '{val}'"
    if "File does not exist" in text or "Problems parsing config" in text:
        return text.split(" Given value type")[0].replace('Parser key "config": ', "config file: ")[:300]
    return text[:300]


def _all_actions(parser):
    for a in parser._actions:
        yield a
        sub = getattr(a, "_parser", None)
        if sub is not None and sub is not parser:
            yield from _all_actions(sub)


# ----------------------------------------------------------------------------------------- fit
_OURS = {"config.yaml", "results.json", "tensorboard", "checkpoint.safetensors", "checkpoint.safetensors.tmp"}


def _run_dir(out_dir: str | None, method: str, dataset: str, seed: int, overwrite: bool) -> tuple[Path, Path | None]:
    """The run directory, and the checkpoint to resume from (if the directory holds an unfinished run).

    A finished run (``results.json``) is never replaced unless ``overwrite``; an unfinished one with a
    checkpoint is resumed; a directory holding files fedlit did not write is refused.
    """
    from .checkpoint import NAME

    if out_dir is None:
        base = Path("runs") / f"{method}-{dataset}-seed{seed}"
        path, n = base, 1
        while path.exists() and any(path.iterdir()):
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    else:
        path = Path(out_dir)
    resume = None
    if path.is_dir() and any(path.iterdir()):
        foreign = sorted(p.name for p in path.iterdir() if p.name not in _OURS)
        if foreign and not overwrite:
            raise FedlitError(f"{path} holds files fedlit did not write ({', '.join(foreign[:3])}); "
                              f"choose another --out_dir")
        if overwrite:
            import shutil

            for name in _OURS:
                target = path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        elif (path / "results.json").exists():
            raise FedlitError(f"{path} already holds a finished run; choose another --out_dir or pass --overwrite true")
        elif (path / NAME).exists():
            resume = path / NAME
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise FedlitError(f"cannot write to run directory {path} ({e.strerror}); choose another --out_dir") from None
    return path, resume


def _config_digest(parser, cfg) -> str:
    """Digest of the settings that change results (not the run directory, the round count or the devices)."""
    import hashlib
    import json

    import yaml

    d = yaml.safe_load(parser.dump(cfg, skip_validation=True))
    for key in ("out_dir", "overwrite", "config"):
        d.pop(key, None)
    for key in ("rounds", "devices", "num_nodes", "strategy", "accelerator", "progress", "checkpoint_every",
                "feature_cache", "cache_dir", "threads"):  # never change the numbers beyond kernel rounding
        d.get("trainer", {}).pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cmd_fit(argv: list[str]) -> int:
    parser = _fit_parser()
    cfg, init = parse_fit(parser, lambda: parser.parse_args(_rewrite_method_shortcut(argv)))
    return fit(parser, cfg, init)


def parse_fit(parser, parse):
    """``parse()`` (a jsonargparse parse of the fit parser) and instantiation, with every failure turned into one
    :class:`FedlitError` line. Returns ``(cfg, init)``."""
    from jsonargparse import ArgumentError

    try:
        cfg = parse()
    except ArgumentError as e:
        raise FedlitError(_friendly(parser, e)) from None
    try:
        init = parser.instantiate(cfg)
    except FedlitError:
        raise
    except Exception as e:  # jsonargparse wraps constructor errors
        cause = e.__cause__ or e.__context__
        if isinstance(cause, FedlitError):
            raise cause from None
        raise FedlitError(_friendly(parser, e)) from None
    return cfg, init


def build(parser, cfg, init):
    """Fabric, data, backbone, method and orchestrator of a parsed fit config, in one fixed order (``fedlit fit``
    and the Flower apps share it, so both start from the same tensors). Everything a user can get wrong is
    checked here, before anything is written (the data first: it is cheap). Returns ``(orchestrator, identity)``."""
    import lightning as L

    from .backbones import load_backbone
    from .federation import Orchestrator

    method, data, trainer = init.method, init.data, init.trainer
    fabric = trainer.make_fabric()
    fabric.launch()
    L.seed_everything(cfg.seed, verbose=False)
    federation = data.setup(cfg.seed)
    clip = load_backbone(init.backbone.name, init.backbone.pretrained, device=fabric.device)
    if clip.has_text:
        clip.set_text_path(init.backbone.text_path)
    identity = {"method": method.name, "backbone": f"{init.backbone.name}:{init.backbone.pretrained}",
                "dataset": data.dataset, "seed": cfg.seed, "config_digest": _config_digest(parser, cfg)}
    meta = {"dataset": data.dataset, "backbone": init.backbone.name, "identity": identity}
    return Orchestrator(fabric, clip, federation, method, trainer, cfg.seed, meta), identity


def fit(parser, cfg, init) -> int:
    from . import checkpoint as ckpt
    from .federation import format_final

    method, data = init.method, init.data
    orchestrator, identity = build(parser, cfg, init)
    fabric, federation = orchestrator.fabric, orchestrator.fed
    where = None
    if fabric.global_rank == 0:
        run_dir, resume = _run_dir(cfg.out_dir, method.name, data.label, cfg.seed, cfg.overwrite)
        if resume is not None:
            state = ckpt.load(resume)
            ckpt.check_identity(resume, state.identity, identity)
        else:
            parser.save(cfg, str(run_dir / "config.yaml"), skip_validation=True, overwrite=True)
        where = (str(run_dir), str(resume) if resume else None)
    run_dir, resume = fabric.broadcast(where, src=0)
    state = ckpt.load(resume) if resume else None
    if fabric.global_rank == 0:
        action = f"resuming after round {state.round} from {resume}" if state else f"run dir {run_dir}"
        print(f"fedlit: {method.name} on {data.label} — {len(federation.clients)} clients, "
              f"backbone {init.backbone.name}, {action}")
        print(federation.summary())
    results = orchestrator.fit(run_dir, resume=state)
    if fabric.global_rank == 0:
        print(format_final(results))
    return 0


# ----------------------------------------------------------------------------------------- others
def cmd_pretrain_toy(argv: list[str]) -> int:
    from pathlib import Path

    from jsonargparse import ArgumentParser

    from .backbones.pretrain import WEIGHTS, pretrain_toy

    p = ArgumentParser(prog="fedlit pretrain-toy",
                       description="Pretrain a fedlit-toy CLIP from scratch (the recipe of the bundled weights).")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default="runs/fedlit-toy.safetensors",
                   help=f"Weights file to write (a new file; the bundled weights are {WEIGHTS}).")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace an existing --out file.")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise FedlitError(f"{out} exists; choose another --out, or --overwrite true to replace it")
    m = pretrain_toy(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, out=out)
    print(f"wrote {out} in {m['train_seconds']} s; zero-shot: {m['zero_shot']}")
    print(f"use it with: fedlit fit --config configs/quickstart.yaml --backbone.pretrained {out}")
    return 0


def cmd_list(what: str) -> int:
    if what == "datasets":
        from .data.registry import list_datasets

        names = list_datasets()
    elif what == "methods":
        from .methods import list_methods

        names = list_methods()
    else:
        from .backbones import list_backbones

        names = list_backbones()
    print("\n".join(names))
    return 0


def cmd_plot(argv: list[str]) -> int:
    """``fedlit plot RUN_DIR… --out DIR``: figures of finished runs (see :mod:`fedlit.plot`)."""
    from jsonargparse import ArgumentError, ArgumentParser

    from .plot import plot_runs

    p = ArgumentParser(prog="fedlit plot", exit_on_error=False,
                       description="Plot finished runs: accuracy vs round, per-client bars, methods compared.")
    p.add_argument("run_dirs", nargs="+", type=str, help="Run directories (or folders holding them).")
    p.add_argument("--out", type=str, required=True, help="Directory the figures (PNG + PDF) are written to.")
    try:
        a = p.parse_args(argv)
    except ArgumentError as e:
        raise FedlitError(f"{' '.join(str(e).split())[:200]}; usage: fedlit plot RUN_DIR... --out DIR") from None
    for path in plot_runs(a.run_dirs, a.out):
        print(path)
    return 0


def cmd_summarize(argv: list[str]) -> int:
    """``fedlit summarize RUN_DIR… [--out PREFIX] [--paper NAME]``: mean ± std table (see :mod:`fedlit.summarize`)."""
    from jsonargparse import ArgumentError, ArgumentParser

    from .summarize import PAPER_CHOICES, summarize

    p = ArgumentParser(prog="fedlit summarize", exit_on_error=False,
                       description="Mean ± std over seeds of finished runs, with the paper's numbers beside ours.")
    p.add_argument("run_dirs", nargs="+", type=str, help="Run directories (or folders holding them).")
    p.add_argument("--out", type=str, default="summary", help="Output prefix: writes PREFIX.md and PREFIX.csv.")
    p.add_argument("--paper", type=str, default="auto",
                   help=f"Paper numbers beside ours: {', '.join(PAPER_CHOICES)} (auto: whichever has the cell).")
    try:
        a = p.parse_args(argv)
    except ArgumentError as e:
        raise FedlitError(f"{' '.join(str(e).split())[:200]}; usage: fedlit summarize RUN_DIR... "
                          f"[--out PREFIX] [--paper NAME]") from None
    md, _, written = summarize(a.run_dirs, out=a.out, paper=a.paper)
    print(md, end="")
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_flower(argv: list[str]) -> int:
    """``fedlit flower --config …``: the config as a Flower app + deployment commands (see
    :mod:`fedlit.integrations.flower`; needs ``pip install 'fedlit[flower]'``)."""
    from .integrations.flower_deploy import main as flower_main

    return flower_main(argv)


COMMANDS = {"fit": cmd_fit, "pretrain-toy": cmd_pretrain_toy, "plot": cmd_plot, "summarize": cmd_summarize,
            "flower": cmd_flower}
USAGE = "usage: fedlit {fit,flower,plot,summarize,pretrain-toy,datasets,methods,backbones} [--help]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    warnings.filterwarnings("ignore", message=".*(does not have many workers|No pretrained weights|TensorBoard).*")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__.split("\n\n")[1] if __doc__ else "")
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd in COMMANDS:
            return COMMANDS[cmd](rest)
        if cmd in ("datasets", "methods", "backbones"):
            return cmd_list(cmd)
        from .errors import unknown_name

        raise unknown_name("command", cmd, [*COMMANDS, "datasets", "methods", "backbones"])
    except FedlitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
