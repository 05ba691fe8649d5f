"""Experiments: parse a fit config, build a run from it, name and run it. The composition root of fedlit.

``fedlit fit`` (:mod:`fedlit.cli`), the Flower apps (:mod:`fedlit.integrations.flower`) and notebooks all go through
these functions, so every runtime starts from the same tensors in the same order:

- :func:`fit_parser` — the jsonargparse parser of a fit config (``backbone``, ``data``, ``method``, ``trainer``,
  ``seed``, ``out_dir``); :func:`rewrite_method_shortcut` turns ``--method NAME`` into its class path.
- :func:`parse_fit` — parse + instantiate, every failure one :class:`FedlitError` line (:func:`friendly`).
- :func:`build` — Fabric, data, backbone, method and :class:`~fedlit.orchestrator.Orchestrator`, in one fixed order.
- :func:`run_name` / :func:`run_dir` — the one place run directories are named, created, refused or resumed.
- :func:`fit` — all of it, then the round loop.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from pathlib import Path
from typing import Literal

from .atomic import atomic_write, dir_in_use as _in_use, lock_dir, unlock_dir as unlock_run_dir
from .errors import FedlitError, unknown_name


class Backbone:
    """The frozen backbone (the ``backbone:`` section).

    Args:
        name: ``fedlit-toy`` (embedded) or an open_clip architecture (``ViT-B-16``; CoOp's ``ViT-B/16`` works too;
            ``RN50``: a ModifiedResNet image tower for the text-prompt methods; ``fedlit-toy-rn``: a tiny one).
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
def fit_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .data.federation import FederatedData
    from .trainer import FedTrainer
    from .methods import FedMethod, list_methods
    from .ood import OODEval

    list_methods()  # every method imported: `--help` lists them all as known subclasses
    p = ArgumentParser(prog="fedlit fit", description="Train and evaluate a federation.", exit_on_error=False,
                       allow_abbrev=False)  # `--trainer.round 5` is an error, not `rounds`
    p.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config file(s), composed in order.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the run (partition, sampling, init).")
    p.add_argument("--out_dir", type=str | None, default=None,
                   help="Run directory (default: runs/<method>-<dataset>-seed<seed>[-N], never overwritten).")
    p.add_argument("--overwrite", type=bool, default=False, help="Allow replacing a finished run in --out_dir.")
    p.add_class_arguments(Backbone, "backbone")
    p.add_class_arguments(FederatedData, "data")
    p.add_subclass_arguments(FedMethod, "method", required=True, help="Method (class_path/init_args or --method NAME).")
    p.add_class_arguments(FedTrainer, "trainer")
    p.add_class_arguments(OODEval, "ood")
    return p


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def rewrite_method_shortcut(argv: list[str], say=None) -> list[str]:
    """``--method promptfl`` → PromptFL **with its own hyper-parameters**: those of ``configs/promptfl.yaml``'s
    ``method:`` section where that file exists, else the class defaults — never the previous method's arguments
    (a later ``--method.init_args.KEY`` still overrides them). ``--method.help promptfl`` → the class path.
    ``say``: where the one-line note on the switch goes (default: stderr)."""
    from .methods import class_path, list_methods, method_class

    methods = list_methods()
    out = list(argv)
    shortcut = None
    for i, a in enumerate(out):
        name = None
        if a in ("--method", "--method.help") and i + 1 < len(out):
            name, j = out[i + 1], i + 1
        elif a.startswith(("--method=", "--method.help=")):
            name, j = a.split("=", 1)[1], i
        if name is None or "." in name or name.strip().startswith("{"):
            continue
        key = name if name in methods else name.lower()
        if key not in methods:
            if name[:1].isupper():
                continue  # a class name: jsonargparse resolves it
            raise unknown_name("method", name, methods)
        if a.startswith("--method.help"):
            value = class_path(key)
        else:
            args, source = _own_arguments(method_class(key), key)
            value = json.dumps({"class_path": class_path(key), "init_args": args})
            (say or (lambda m: print(m, file=sys.stderr)))(
                f"--method {key}: {method_class(key).__name__} with {source} (override with --method.init_args.KEY)")
        out[j] = value if j == i + 1 else f"{a.split('=', 1)[0]}={value}"
        shortcut = j
    return out if shortcut is None else _overrides_after(out, shortcut)


def _overrides_after(argv: list[str], at: int) -> list[str]:
    """``--method.init_args.lr 0.05 --method coop``: the method's overrides given before the shortcut at
    position ``at`` move right after it, so that they apply to the named method instead of being replaced."""
    moved: list[int] = []
    i = 0
    while i < at:
        a = argv[i]
        take = 1 if "=" in a else 2
        if a.startswith("--method.") and not a.startswith(("--method.help", "--method.class_path", "--method.init_args=")):
            moved += list(range(i, i + take))
            i += take
        else:
            i += 1
    rest = [x for k, x in enumerate(argv) if k not in set(moved)]
    at -= len(moved)
    return rest[:at + 1] + [argv[k] for k in moved] + rest[at + 1:]


def _own_arguments(cls, name: str) -> tuple[dict, str]:
    """A method's constructor defaults, updated by the ``method:`` section of ``configs/<name>.yaml``."""
    import inspect

    import yaml

    args = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.default is not inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    path = CONFIGS / f"{name}.yaml"
    try:
        section = (yaml.safe_load(path.read_text()) or {}).get("method") or {}
    except (OSError, yaml.YAMLError):
        return args, "its defaults"
    if str(section.get("class_path", "")).rsplit(".", 1)[-1] != cls.__name__:
        return args, "its defaults"
    args.update(section.get("init_args") or {})
    return args, f"the hyper-parameters of configs/{name}.yaml"


def check_config_files(argv: list[str]) -> None:
    """A config file given with ``--config``/``-c`` that is not valid YAML: one line naming the file and where."""
    import yaml

    for i, a in enumerate(argv[:-1]):
        if a not in ("--config", "-c"):
            continue
        path = Path(argv[i + 1])
        if not path.is_file():
            continue  # jsonargparse says it does not exist
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise FedlitError(f"{path} is not valid YAML ({what}{where}); fix the file") from None


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


def friendly(parser, err: Exception) -> str:
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
_OURS = {"config.yaml", "results.json", "tensorboard", "checkpoint.safetensors", "checkpoint.safetensors.tmp", ".lock"}
LOCK = ".lock"


def run_name(method: str, data_label: str, seed: int) -> str:
    """The default name of a run directory: ``<method>-<data label>-seed<seed>`` (``FederatedData.label``)."""
    return f"{method}-{data_label}-seed{seed}"


def default_run_dir(method: str, data_label: str, seed: int, digest: str | None = None,
                    overwrite: bool = False) -> Path:
    """``runs/<run_name>[-N]``: the first such directory that holds an unfinished run of the same config
    (``digest``: :func:`config_digest`; rerunning a command resumes it), else the first one a run left before its
    first checkpoint (only fedlit's files, no checkpoint, no results: it is reused), else the first missing or
    empty one. Directories another run is writing are passed over. A damaged checkpoint is refused in one line
    (with ``overwrite``, that directory is started afresh)."""
    from .checkpoint import NAME, identity_of

    base = Path("runs") / run_name(method, data_label, seed)
    candidates = [base]
    while candidates[-1].exists() and any(candidates[-1].iterdir()):
        candidates.append(base.with_name(f"{base.name}-{len(candidates) + 1}"))
    used = [p for p in candidates[:-1] if not _in_use(p)]
    for path in used:
        if digest is not None and _unfinished_run_of(path, digest):
            return path
    for path in used:
        if (path / "results.json").exists():
            continue
        if (path / NAME).is_file() and identity_of(path / NAME) is None:
            if overwrite:
                return path
            raise FedlitError(f"{path} holds a damaged checkpoint ({NAME} cannot be read), so this run cannot "
                              f"resume; delete it (rm -r {path}) or pass --overwrite true to start it afresh")
        if not (path / NAME).exists() and all(p.name in _OURS for p in path.iterdir()):
            return path  # stopped before its first checkpoint: nothing to resume, the name is reused
    return candidates[-1]


def _unfinished_run_of(path: Path, digest: str) -> bool:
    """``path`` holds a checkpoint and no results, written by a run of the config with this digest."""
    from .checkpoint import NAME, identity_of

    if (path / "results.json").exists() or not (path / NAME).is_file():
        return False
    return (identity_of(path / NAME) or {}).get("config_digest") == digest


def run_dir(out_dir: str | None, method: str, data_label: str, seed: int, overwrite: bool,
            digest: str | None = None) -> tuple[Path, Path | None]:
    """The run directory (``out_dir``, or :func:`default_run_dir`, which finds an unfinished run of the same
    config), and the checkpoint to resume from (if the directory holds an unfinished run).

    A finished run (``results.json``) is never replaced unless ``overwrite``; an unfinished one with a
    checkpoint is resumed; a directory holding files fedlit did not write is refused.
    """
    from .checkpoint import NAME

    path = default_run_dir(method, data_label, seed, digest, overwrite) if out_dir is None else Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise FedlitError(f"cannot write to run directory {path} ({e.strerror}); choose another --out_dir") from None
    fresh = not (path / LOCK).exists()
    lock_dir(path, LOCK, f"another fedlit run is writing {path}; wait for it to finish, or choose another --out_dir")
    try:
        resume = _claim(path, overwrite, NAME)
    except BaseException:
        unlock_run_dir(path)
        if fresh:  # leave a refused directory as it was
            (path / LOCK).unlink(missing_ok=True)
        raise
    return path, resume


def _claim(path: Path, overwrite: bool, name: str) -> Path | None:
    """The checks of :func:`run_dir` on a directory this process holds the lock of; the checkpoint to resume."""
    entries = [p for p in path.iterdir() if p.name != LOCK]
    if not entries:
        return None
    foreign = sorted(p.name for p in entries if p.name not in _OURS)
    if foreign and not overwrite:
        raise FedlitError(f"{path} holds files fedlit did not write ({', '.join(foreign[:3])}); "
                          f"choose another --out_dir")
    if overwrite:
        import shutil

        for entry in _OURS - {LOCK}:
            target = path / entry
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return None
    if (path / "results.json").exists():
        raise FedlitError(f"{path} already holds a finished run; choose another --out_dir or pass --overwrite true")
    if (path / name).exists():
        return path / name
    import shutil  # a run stopped before its first checkpoint: its logs would be duplicated

    shutil.rmtree(path / "tensorboard", ignore_errors=True)
    return None


def trainer_class(parser) -> type:
    """The settings class of the parser's ``trainer:`` section (:class:`~fedlit.trainer.FedTrainer`)."""
    from .trainer import FedTrainer

    return getattr(parser.groups.get("trainer"), "group_class", FedTrainer)


def config_digest(parser, cfg) -> str:
    """Digest of the settings that change results (not the run directory, the round count or the devices): every
    section but ``trainer:`` whole, of ``trainer:`` the fields :func:`~fedlit.trainer.digest_fields` names (an
    option added later, :data:`~fedlit.settings.ADDED_AT_DEFAULT`, only where it differs from its default)."""
    import hashlib
    import json

    import yaml

    from .settings import drop_added_defaults
    from .trainer import digest_fields

    d = yaml.safe_load(parser.dump(cfg, skip_validation=True))
    for key in ("out_dir", "overwrite", "config"):
        d.pop(key, None)
    if isinstance(d.get("trainer"), dict):
        keep = set(digest_fields(trainer_class(parser)))
        d["trainer"] = {k: v for k, v in d["trainer"].items() if k in keep}
    d = drop_added_defaults(d, trainer_class(parser))
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def parse_fit(parser, parse):
    """``parse()`` (a jsonargparse parse of the fit parser) and instantiation, with every failure turned into one
    :class:`FedlitError` line. Returns ``(cfg, init)``."""
    from jsonargparse import ArgumentError

    try:
        cfg = parse()
    except ArgumentError as e:
        raise FedlitError(friendly(parser, e)) from None
    try:
        init = parser.instantiate(cfg)
    except FedlitError:
        raise
    except Exception as e:  # jsonargparse wraps constructor errors
        cause = e.__cause__ or e.__context__
        if isinstance(cause, FedlitError):
            raise cause from None
        raise FedlitError(friendly(parser, e)) from None
    return cfg, init


def build(parser, cfg, init):
    """Fabric, data, backbone, method and orchestrator of a parsed fit config, in one fixed order (``fedlit fit``
    and the Flower apps share it, so both start from the same tensors). Everything a user can get wrong is
    checked here, before anything is written (the data first: it is cheap). Returns ``(orchestrator, identity)``."""
    import os

    import lightning as L

    from .backbones import load_backbone
    from .orchestrator import Orchestrator

    method, data, trainer = init.method, init.data, init.trainer
    fabric = trainer.make_fabric()
    fabric.launch()
    L.seed_everything(cfg.seed, verbose=False)
    federation = data.setup(cfg.seed, global_eval_set=method.global_eval_set)
    clip = load_backbone(init.backbone.name, init.backbone.pretrained, device=fabric.device)
    if clip.has_text:
        clip.set_text_path(init.backbone.text_path)
    identity = {"method": method.name, "backbone": f"{init.backbone.name}:{init.backbone.pretrained}",
                "dataset": data.dataset, "seed": cfg.seed, "config_digest": config_digest(parser, cfg)}
    settings = {k: v for k, v in vars(data).items() if not k.startswith("_") and k != "names"}
    meta = {"dataset": data.dataset, "backbone": init.backbone.name, "identity": identity, "data": settings}
    orchestrator = Orchestrator(fabric, clip, federation, method, trainer, cfg.seed, meta)
    if getattr(init, "ood", None) is not None and init.ood.enabled:  # fedlit.ood: ID / CACC / FPR95 / AUROC
        from .ood import OODEvaluator

        orchestrator.ood = OODEvaluator(init.ood, orchestrator, data.root or os.environ.get("FEDLIT_DATA"), cfg.seed,
                                        data.dataset_args)
    return orchestrator, identity


def fit(parser, cfg, init) -> int:
    """Build, pick (or resume) the run directory, run the federation, print the final line. Returns 0."""
    from . import checkpoint as ckpt
    from .orchestrator import format_final
    from .trainer import not_in_digest

    method, data = init.method, init.data
    orchestrator, identity = build(parser, cfg, init)
    fabric, federation = orchestrator.fabric, orchestrator.fed
    where = None
    if fabric.global_rank == 0:
        path, resume = run_dir(cfg.out_dir, method.name, data.label, cfg.seed, cfg.overwrite,
                               identity["config_digest"])
        text = parser.dump(cfg, skip_validation=True)
        try:
            if resume is not None:
                state = ckpt.load(resume)
                free = not_in_digest(trainer_class(parser))  # the trainer: keys a resumed run may change
                ckpt.check_identity(resume, state.identity, identity, ckpt.config_diff(path / "config.yaml", text, free))
            # the config this run finishes with (a resumed run may have been given more rounds)
            atomic_write(path / "config.yaml", lambda f: f.write(text), mode="w")
        except BaseException:
            unlock_run_dir(path)
            raise
        where = (str(path), str(resume) if resume else None)
    path, resume = fabric.broadcast(where, src=0)
    try:
        return _train(orchestrator, fabric, path, resume, method, data, init)
    finally:
        unlock_run_dir(Path(path))


def _train(orchestrator, fabric, path, resume, method, data, init) -> int:
    from . import checkpoint as ckpt
    from .orchestrator import format_final

    federation = orchestrator.fed
    state = ckpt.load(resume) if resume else None
    if fabric.global_rank == 0:
        action = f"resuming after round {state.round} from {resume}" if state else f"run dir {path}"
        print(f"fedlit: {method.name} on {data.label} — {len(federation.clients)} clients, "
              f"backbone {init.backbone.name}, {action}")
        print(federation.summary())
    try:
        results = orchestrator.fit(path, resume=state)
    except KeyboardInterrupt:
        if fabric.global_rank == 0:
            saved = ckpt.identity_of(Path(path) / ckpt.NAME) is not None
            print(f"fedlit: stopped; rerun the same command to resume from the last checkpoint in {path}" if saved
                  else f"fedlit: stopped before the first checkpoint of {path}; rerunning the command starts it again",
                  file=sys.stderr)
        raise
    if fabric.global_rank == 0:
        print(format_final(results))
        if "ood" in results:
            from .ood import format_ood

            print(f"{method.name} OOD: {format_ood(results['final'])}")
    return 0


def fit_argv(argv: list[str]) -> int:
    """``fedlit fit ARGS``: parse the arguments, build the run and train it (raises :class:`FedlitError` on bad
    input, ``KeyboardInterrupt`` on Ctrl-C; the CLI turns both into one line)."""
    check_config_files(argv)
    parser = fit_parser()
    cfg, init = parse_fit(parser, lambda: parser.parse_args(rewrite_method_shortcut(argv)))
    return fit(parser, cfg, init)


__all__ = ["Backbone", "build", "check_config_files", "config_digest", "default_run_dir", "fit", "fit_argv",
           "fit_parser", "friendly", "parse_fit", "rewrite_method_shortcut", "run_dir", "run_name"]
