"""Method registry: short name → class. A method is one file overriding a few hooks of FedMethod.

Adding a method is one file here (a :class:`FedMethod` subclass with its own ``name``) and one config: a subclass
registers itself under its ``name`` when its module is imported (``FedMethod.__init_subclass__``), and the first
lookup imports every module of this package (they depend on torch only, so this is cheap). A method defined
elsewhere (a notebook, a test, a plug-in) is found once its module is imported. ``fedlit.methods.<ClassName>`` also
resolves every registered method (the class paths configs use).
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import unknown_name
from .base import METHODS, FedMethod, Update

_loaded = False


def _discover() -> dict[str, type[FedMethod]]:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True
    return METHODS


def method_class(name: str) -> type[FedMethod]:
    methods = _discover()
    if name not in methods:
        raise unknown_name("method", name, list(methods))
    return methods[name]


def class_path(name: str) -> str:
    cls = method_class(name)
    return f"{cls.__module__}.{cls.__qualname__}"


def list_methods() -> list[str]:
    return sorted(_discover())


def __getattr__(attr: str) -> type[FedMethod]:
    """``fedlit.methods.<ClassName>`` (configs write ``class_path: fedlit.methods.PromptFL``): any registered method."""
    for cls in _discover().values():
        if cls.__name__ == attr:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["FedMethod", "Update", "METHODS", "method_class", "class_path", "list_methods"]
