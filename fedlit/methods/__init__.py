"""Method registry: short name → class. A method is one file overriding a few hooks of FedMethod."""

from __future__ import annotations

from ..errors import unknown_name
from .base import FedMethod, Update
from .coop import CoOp
from .promptfl import PromptFL
from .zeroshot import ZeroShot

METHODS: dict[str, type[FedMethod]] = {m.name: m for m in (ZeroShot, CoOp, PromptFL)}


def method_class(name: str) -> type[FedMethod]:
    if name not in METHODS:
        raise unknown_name("method", name, list(METHODS))
    return METHODS[name]


def class_path(name: str) -> str:
    cls = method_class(name)
    return f"{cls.__module__}.{cls.__name__}"


__all__ = ["FedMethod", "Update", "ZeroShot", "CoOp", "PromptFL", "METHODS", "method_class", "class_path"]
