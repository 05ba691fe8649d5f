"""``fedlit config [NAME]``: the YAML configs, also from a wheel install (no checkout).

A checkout reads them from its ``configs/`` folder; a wheel carries the same files as data files under
``<prefix>/share/fedlit/configs`` (pyproject ``[tool.setuptools.data-files]``). ``fedlit config`` lists the
names, ``fedlit config NAME`` prints one (``quickstart``, ``protocols/fedtpg_cross_class``, ``official/…``), to save
and pass to ``fedlit fit --config``.
"""

from __future__ import annotations

import site
import sys
import sysconfig
from pathlib import Path

from ..errors import FedlitError

USAGE = "usage: fedlit config [NAME]  (no NAME: list them; NAME: print it, e.g. fedlit config quickstart > q.yaml)"
CHECKOUT = Path(__file__).resolve().parents[2] / "configs"


def config_dirs() -> list[Path]:
    """Where configs are looked for, first match wins: the checkout, then every install prefix's share folder."""
    prefixes = [sysconfig.get_path("data"), sys.prefix, getattr(site, "USER_BASE", None) or ""]
    dirs = [CHECKOUT] + [Path(p) / "share" / "fedlit" / "configs" for p in prefixes if p]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d not in dirs[:i]]


def config_names(root: Path) -> list[str]:
    """Every ``*.yaml`` under ``root``, as a name without the suffix (``protocols/fedtpg_cross_class``)."""
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def find_config(name: str) -> Path:
    """The file of config ``name`` (``quickstart``, ``quickstart.yaml`` or ``configs/quickstart.yaml``)."""
    stem = name.removeprefix("configs/").removesuffix(".yaml")
    dirs = config_dirs()
    if not dirs:
        raise FedlitError("no configs found (neither a checkout's configs/ nor an installed share/fedlit/configs); "
                          "reinstall fedlit from its wheel or checkout")
    for d in dirs:
        if (d / f"{stem}.yaml").is_file():
            return d / f"{stem}.yaml"
    known = config_names(dirs[0])
    near = [n for n in known if stem.split("/")[-1] in n][:5]
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    raise FedlitError(f"no config named '{name}'{hint}; `fedlit config` lists them")


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if len(argv) > 1:
        raise FedlitError(f"fedlit config takes one NAME, got {len(argv)}; {USAGE}")
    if not argv:
        dirs = config_dirs()
        if not dirs:
            raise FedlitError("no configs found; reinstall fedlit from its wheel or checkout")
        print(f"# {dirs[0]}")
        print("\n".join(config_names(dirs[0])))
        return 0
    print(find_config(argv[0]).read_text(), end="")
    return 0
