"""Modules imported on first use, so that light commands (``fedlit datasets``, listing and help) do not pay the
seconds that importing torch costs.

``torch = lazy("torch", __name__, "torch")`` at the top of a module binds a proxy; the first attribute read
imports the real module and writes it over the proxy in that module's globals, so later calls see torch itself.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["lazy"]


class _Lazy:
    __slots__ = ("_module", "_owner", "_name")

    def __init__(self, module: str, owner: str, name: str):
        self._module, self._owner, self._name = module, owner, name

    def __getattr__(self, attr: str):
        mod = importlib.import_module(self._module)
        owner = sys.modules.get(self._owner)
        if owner is not None and getattr(owner, self._name, None) is self:
            setattr(owner, self._name, mod)
        return getattr(mod, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._module!r}>"


def lazy(module: str, owner: str, name: str) -> _Lazy:
    """A proxy for ``module`` bound to the global ``name`` of module ``owner`` (see the module docstring)."""
    return _Lazy(module, owner, name)
