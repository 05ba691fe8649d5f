"""The package's shape, enforced: the import graph has no cycles and never points from a lower layer to a higher
one, no module is over 400 non-blank lines, the Fabric round loop stays short, and adding a method is one class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fedlit"

#: layers, lowest first; a module may import only from its own layer or lower ones (prefix match, longest wins)
LAYERS = [
    ("base", ["fedlit.errors", "fedlit.atomic", "fedlit.aggregation", "fedlit.metrics", "fedlit.trainer",
              "fedlit.checkpoint", "fedlit.figures", "fedlit.heap",
              "fedlit.progress", "fedlit.catalog", "fedlit.lazy", "fedlit.settings", "fedlit.privacy", "fedlit.dp_sgd"]),
    ("data", ["fedlit.data"]),
    ("backbones", ["fedlit.backbones", "fedlit.prompts", "fedlit.text_batch", "fedlit.features", "fedlit.feature_store",
                   "fedlit.feature_layout"]),
    ("methods", ["fedlit.methods"]),
    ("client", ["fedlit.client"]),
    ("round loop", ["fedlit.rounds", "fedlit.steps", "fedlit.evaluation", "fedlit.engine", "fedlit.callbacks",
                    "fedlit.orchestrator", "fedlit.ood", "fedlit.optimizer_state", "fedlit.run_plan"]),
    ("experiment", ["fedlit.experiment"]),
    ("integrations", ["fedlit.integrations"]),
    ("apps", ["fedlit.apps"]),
    ("cli", ["fedlit.cli", "fedlit.__main__"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every fedlit module ``name`` imports (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # fedlit.x.y.attr → fedlit.x.y
                t = t.rpartition(".")[0]
            if t.startswith("fedlit") and t != name and t != "fedlit":
                found.add(t)
    return found


def _layer(name: str) -> int:
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if name == p or name.startswith(p + ".")), default=None)
    assert best is not None, f"{name} is in no layer of tests/test_architecture.py"
    return best[1]


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items() if name != "fedlit"}


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [])


def test_no_import_points_to_a_higher_layer():
    bad = [f"{a} ({LAYERS[_layer(a)][0]}) → {b} ({LAYERS[_layer(b)][0]})"
           for a, targets in GRAPH.items() for b in targets if _layer(b) > _layer(a)]
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_the_checker_sees_a_cycle_and_an_upward_arrow(tmp_path):
    """The graph parser resolves relative, from-package and in-function imports (else the tests above prove nothing)."""
    assert "fedlit.rounds" in GRAPH["fedlit.orchestrator"]  # from .rounds import …
    assert "fedlit.data.task" in GRAPH["fedlit.methods.fedtpg"]  # from ..data.task import …
    assert "fedlit.apps.plot" in GRAPH["fedlit.cli"]  # inside a function
    assert "fedlit.data.shapes" in GRAPH["fedlit.data.registry"]  # from fedlit.data import shapes
    assert _layer("fedlit.data.coop") < _layer("fedlit.methods.coop") < _layer("fedlit.orchestrator")


def test_no_module_over_400_non_blank_lines():
    sizes = {str(p.relative_to(PKG.parent)): sum(1 for line in p.read_text().splitlines() if line.strip())
             for p in PKG.rglob("*.py")}
    assert not {k: v for k, v in sizes.items() if v > 400}


def test_the_fabric_round_loop_is_short():
    tree = ast.parse((PKG / "orchestrator.py").read_text())
    fit = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "fit")
    assert fit.end_lineno - fit.lineno + 1 <= 40


def test_a_new_method_is_one_class_found_by_its_name(monkeypatch):
    from fedlit.methods import METHODS, class_path, list_methods, method_class
    from fedlit.methods.coop import CoOp

    monkeypatch.setattr("fedlit.methods.base.METHODS", METHODS)  # the same dict; restored entries below
    list_methods()  # every module imported first: the registry restored below is the complete one
    before = dict(METHODS)
    try:
        class ThrowAway(CoOp):
            name = "throwaway"

        assert method_class("throwaway") is ThrowAway and "throwaway" in list_methods()
        assert class_path("throwaway").endswith("ThrowAway")
        with pytest.raises(Exception, match="taken"):
            type("Other", (CoOp,), {"name": "throwaway"})
    finally:
        METHODS.clear()
        METHODS.update(before)
    assert "throwaway" not in list_methods()


#: module-level names a function may rebind with ``global``: handles initialised once, lazily (never a hook that
#: changes what another module's code does)
LAZY_ONCE = {"fedlit.heap": {"_TRIM"}, "fedlit.methods": {"_loaded"}, "fedlit.data.coop": {"_POOL"}}


def _hook_writes(name: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """Writes that turn module-level state into a hook: ``othermodule.NAME = …`` on an imported fedlit module, and
    ``global NAME`` rebinding outside :data:`LAZY_ONCE`."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    aliases = set()  # local names bound to fedlit modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                base = ".".join(anchor[: len(anchor) - (node.level - 1)] + ([base] if base else []))
            aliases |= {a.asname or a.name for a in node.names if f"{base}.{a.name}" in modules}
        elif isinstance(node, ast.Import):
            aliases |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("fedlit")}
    bad = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AugAssign | ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in aliases:
                bad.append(f"{name}:{node.lineno} assigns {t.value.id}.{t.attr}")
        if isinstance(node, ast.Global):
            extra = set(node.names) - LAZY_ONCE.get(name, set())
            if extra:
                bad.append(f"{name}:{node.lineno} rebinds module-level {sorted(extra)}")
    return bad


def test_no_module_level_mutable_hooks():
    """State that changes behaviour is passed explicitly (e.g. lock-step's FusedText service, set on the backbone
    object it serves), never stored in a module-level hook another module rebinds (issue 22)."""
    modules = _modules()
    bad = [b for name, path in modules.items() for b in _hook_writes(name, path, modules)]
    assert not bad, "module-level hooks:\n" + "\n".join(bad)


def test_the_hook_checker_sees_a_hook(tmp_path):
    mod = tmp_path / "x.py"
    mod.write_text("from . import prompts\n\ndef f():\n    global HOOK\n    prompts.ENCODE_HOOK = f\n    HOOK = 1\n")
    found = _hook_writes("fedlit.x", mod, {**_modules(), "fedlit.x": mod})
    assert any("assigns prompts.ENCODE_HOOK" in b for b in found) and any("['HOOK']" in b for b in found)


#: client code: what a client runs with what it was sent; it is handed a ClientRuntime, never the orchestrator
CLIENT_CODE = ["fedlit.engine", "fedlit.steps", "fedlit.client", "fedlit.evaluation", "fedlit.optimizer_state",
               "fedlit.methods", "fedlit.text_batch", "fedlit.privacy"]
#: the entry points of client code: none of them is handed the orchestrator
CLIENT_ENTRIES = {"LocalRun", "Clients", "ClientRuntime", "StepSync", "make_stepper", "train_alone", "train_lockstep"}
#: Flower's ClientApp functions: they use the runtime's client engine, states and evaluator only
FLOWER_CLIENT = {"client_train", "client_evaluate", "client_query", "_instruction"}


def _orchestrator_passing(name: str, path: Path) -> list[str]:
    """Where ``name`` hands the orchestrator to client code, or client code reaches for it."""
    tree = ast.parse(path.read_text())
    client = any(name == c or name.startswith(c + ".") for c in CLIENT_CODE)
    bad = []
    for node in ast.walk(tree):
        if client and isinstance(node, ast.Attribute) and node.attr in ("orchestrator", "orch"):
            bad.append(f"{name}:{node.lineno} reads .{node.attr}")
        if client and isinstance(node, ast.arg) and node.arg in ("orch", "orchestrator"):
            bad.append(f"{name}:{node.lineno} takes an argument '{node.arg}'")
        if client and isinstance(node, ast.ImportFrom) and (node.module or "").endswith("orchestrator"):
            bad.append(f"{name}:{node.lineno} imports the orchestrator")
        if isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if fn in CLIENT_ENTRIES:
                for a in [*node.args, *(k.value for k in node.keywords)]:
                    if isinstance(a, ast.Name) and a.id in ("self", "orch", "orchestrator", "o"):
                        bad.append(f"{name}:{node.lineno} passes '{a.id}' to {fn}")
        if isinstance(node, ast.FunctionDef) and node.name in FLOWER_CLIENT and name.endswith("flower"):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and sub.attr in ("orchestrator", "orch"):
                    bad.append(f"{name}:{sub.lineno} ClientApp function {node.name} reads .{sub.attr}")
    return bad


def test_client_code_is_never_handed_the_orchestrator():
    """Local training, step mode, Flower's ClientApp and the benchmarks get a ClientRuntime (issue 22)."""
    paths = {**_modules(), **{f"benchmarks.{p.stem}": p for p in (PKG.parent / "benchmarks").glob("*.py")}}
    bad = [b for name, path in paths.items() for b in _orchestrator_passing(name, path)]
    assert not bad, "the orchestrator reaches client code:\n" + "\n".join(bad)


def test_the_orchestrator_checker_sees_it(tmp_path):
    mod = tmp_path / "x.py"
    mod.write_text("def f(orch):\n    return LocalRun(self, 1)\n\ndef g(rt):\n    return rt.orchestrator.clients\n")
    found = _orchestrator_passing("fedlit.engine", mod)
    assert any("argument 'orch'" in b for b in found) and any("passes 'self' to LocalRun" in b for b in found)
    assert any("reads .orchestrator" in b for b in found)
