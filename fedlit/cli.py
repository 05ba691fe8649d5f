"""``fedlit`` command line (jsonargparse, LightningCLI conventions).

    fedlit fit --config configs/quickstart.yaml                  # train a federation
    fedlit fit --config configs/quickstart.yaml --method zeroshot --trainer.rounds 5
    fedlit fit --config configs/promptfl.yaml --print_config     # the full resolved config
    fedlit plot runs --out runs/figures                          # figures (PNG + PDF) of finished runs
    fedlit summarize runs/a runs/b --out results/summary         # mean ± std table (.md + .csv), paper beside
    fedlit pretrain-toy                                          # pretrain the embedded model again
    fedlit flower --config configs/quickstart.yaml               # the same run as a real Flower federation
    fedlit datasets | methods | backbones                        # list registered names
    fedlit config [NAME]                                         # list the configs / print one (also from a wheel)

``fit`` takes ``--config`` (several compose in order), dotted overrides (``--data.shots 8``),
``class_path``/``init_args`` for the method (or ``--method NAME``), ``--seed``, ``--out_dir``. The
resolved config is saved as ``config.yaml`` in the run directory, beside ``results.json`` and the
TensorBoard files. User errors print one line, ``error: …``, and exit with status 2. This module only maps
commands to their functions (:mod:`fedlit.experiment` parses, builds and names runs).
"""

from __future__ import annotations

import os
import sys
import warnings

from .errors import FedlitError


def cmd_fit(argv: list[str]) -> int:
    if argv in (["--help"], ["-h"]):  # the full help without importing torch (see fedlit.catalog.cached_text)
        from .catalog import cached_text

        print(cached_text("fit-help", _fit_help), end="")
        return 0
    from .experiment import fit_argv

    return fit_argv(argv)


def _fit_help() -> str:
    from .experiment import fit_parser

    return fit_parser().format_help()


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
    """``fedlit methods | datasets | backbones``: one line each, with what it is (methods and backbones are read
    without importing torch)."""
    from . import catalog

    if what == "datasets":
        from .data.registry import describe_dataset, list_datasets

        rows = [(n, describe_dataset(n)) for n in list_datasets()]
    elif what == "methods":
        rows = catalog.methods()
    else:
        rows = catalog.backbones()
    width = max(len(n) for n, _ in rows)
    print("\n".join(f"{n:<{width}}  {d}".rstrip() for n, d in rows))
    return 0


def cmd_plot(argv: list[str]) -> int:
    """``fedlit plot RUN_DIR… --out DIR``: figures of finished runs (see :mod:`fedlit.apps.plot`)."""
    from jsonargparse import ArgumentError, ArgumentParser

    from .apps.plot import plot_runs

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
    """``fedlit summarize RUN_DIR… [--out PREFIX] [--paper NAME]``: mean ± std table (see :mod:`fedlit.apps.summarize`)."""
    from jsonargparse import ArgumentError, ArgumentParser

    from .apps.summarize import PAPER_CHOICES, summarize

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


def cmd_config(argv: list[str]) -> int:
    """``fedlit config [NAME]``: list the YAML configs or print one (see :mod:`fedlit.apps.config_files`)."""
    from .apps.config_files import main as config_main

    return config_main(argv)


def cmd_flower(argv: list[str]) -> int:
    """``fedlit flower --config …``: the config as a Flower app + deployment commands (see
    :mod:`fedlit.integrations.flower`; needs ``pip install 'fedlit[flower]'``)."""
    from .integrations.flower_deploy import main as flower_main

    return flower_main(argv)


COMMANDS = {"fit": cmd_fit, "pretrain-toy": cmd_pretrain_toy, "plot": cmd_plot, "summarize": cmd_summarize,
            "flower": cmd_flower, "config": cmd_config}
USAGE = "usage: fedlit {fit,flower,plot,summarize,pretrain-toy,config,datasets,methods,backbones} [--help]"


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
    except BrokenPipeError:  # `fedlit datasets | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
