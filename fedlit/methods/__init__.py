"""Method registry: short name → class. A method is one file overriding a few hooks of FedMethod.

Classes are imported lazily (``method_class``), so a method's optional dependencies cost nothing to
runs that do not use it.
"""

from __future__ import annotations

import importlib

from ..errors import unknown_name
from .base import FedMethod, Update
from .coop import CoOp
from .promptfl import PromptFL
from .zeroshot import ZeroShot

#: short name → "module:Class" (modules relative to this package).
REGISTRY: dict[str, str] = {
    "zeroshot": "zeroshot:ZeroShot",
    "coop": "coop:CoOp",
    "promptfl": "promptfl:PromptFL",
    "fedprox": "fedprox:FedProx",
    "fedkgcoop": "fedkgcoop:FedKgCoOp",
    "fedcocoop": "fedcocoop:FedCoCoOp",
    "fedmaple": "fedmaple:FedMaPLe",
    "fedvlp": "fedvlp:FedVLP",
    "fedotp": "fedotp:FedOTP",
    "fedpgp": "fedpgp:FedPGP",
    "fedtpg": "fedtpg:FedTPG",
    "pfedpg": "pfedpg:PFedPG",
    "fedvpt": "vpt:FedVPT",
    "localvpt": "vpt:LocalVPT",
    "central": "central:Central",
    "ivlp": "ivlp:IVLP",
    "promptfolio": "promptfolio:PromptFolio",
    "fedpha": "fedpha:FedPHA",
    "pfedmma": "pfedmma:PFedMMA",
}


def _available() -> dict[str, str]:
    return {k: v for k, v in REGISTRY.items() if importlib.util.find_spec(f"{__name__}.{v.split(':')[0]}") is not None}


def method_class(name: str) -> type[FedMethod]:
    avail = _available()
    if name not in avail:
        raise unknown_name("method", name, list(avail))
    module, cls = avail[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def class_path(name: str) -> str:
    cls = method_class(name)
    return f"{cls.__module__}.{cls.__name__}"


def list_methods() -> list[str]:
    return list(_available())


__all__ = ["FedMethod", "Update", "ZeroShot", "CoOp", "PromptFL", "REGISTRY", "method_class", "class_path",
           "list_methods"]
