"""What ``fedlit methods`` / ``datasets`` / ``backbones`` list, found without importing torch where possible: the
method files are read (not imported) for each class's ``name`` and first docstring line, open_clip's model configs
are read as JSON (the dataset readers import torch lazily, :mod:`fedlit.lazy`). Listing is a lookup, so it must
not cost the seconds that importing torch does.

``fedlit fit --help`` needs every method class (torch, Lightning) to build its parser, so its text is kept in a
cache (:func:`cached_text`) keyed by everything it depends on: the checkout's location, fedlit's source files
(path, size, mtime),
jsonargparse's version, the Python version and the terminal width. The first call builds it (seconds, once per
install: ``make venv`` does it); later calls read it."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

PKG = Path(__file__).resolve().parent


def methods() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every method class in ``fedlit/methods`` (read with ``ast``)."""
    out = {}
    for path in sorted((PKG / "methods").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef):
                continue
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                        and getattr(stmt.targets[0], "id", None) == "name"
                        and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)):
                    doc = (ast.get_docstring(node) or "").strip().split("\n\n")[0]
                    out[stmt.value.value] = " ".join(doc.split())
    return sorted(out.items())


def backbones() -> list[tuple[str, str]]:
    """``(name, description)``: the embedded model, open_clip's plain-CLIP architectures (from its JSON configs)
    and the image-only timm ViTs."""
    out = [("fedlit-toy", "embedded CLIP (2+2 layers, bundled weights, CPU)"),
           ("fedlit-toy-rn", "embedded tiny ModifiedResNet-tower CLIP for the RN50 code paths (random init, CPU)")]
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        tags = pretrained_tags(root / "pretrained.py")
        for path in sorted((root / "model_configs").glob("*.json")):
            cfg = json.loads(path.read_text())
            text = cfg.get("text_cfg", {})
            if cfg.get("custom_text") or "hf_model_name" in text or "multimodal_cfg" in cfg:
                continue  # not a plain CLIP text tower
            known = tags.get(path.stem, [])
            weights = (f"pretrained: {', '.join(known[:3])}{', …' if len(known) > 3 else ''}" if known
                       else "no released weights: pretrained none or a local file")
            out.append((path.stem, f"open_clip CLIP, embed {cfg.get('embed_dim', '?')} ({weights})"))
    out.append(("timm/<model>[@size]", "image-only timm ViT for visual-prompt methods "
                                       "(default timm/vit_base_patch16_224.orig_in21k)"))
    return out


def pretrained_tags(path: Path) -> dict[str, list[str]]:
    """open_clip's pretrained tags per architecture, read from its ``pretrained.py`` with ``ast`` (no import):
    ``_X = dict(tag=…, …)`` tables and the ``_PRETRAINED = {"arch": _X or dict(…)}`` map. ``{}`` if unreadable."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return {}

    def entries(node) -> list[tuple[str, bool]]:  # (tag, quick_gelu)
        pairs = []
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
            pairs = [(k.arg, k.value) for k in node.keywords if k.arg]
        elif isinstance(node, ast.Dict):
            pairs = [(k.value, v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)]
        return [(tag, any(kw.arg == "quick_gelu" and getattr(kw.value, "value", False) is True
                          for kw in getattr(v, "keywords", []))) for tag, v in pairs]

    tables, out = {}, {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "_PRETRAINED" and isinstance(node.value, ast.Dict):
                for k, v in zip(node.value.keys, node.value.values):
                    if isinstance(k, ast.Constant):
                        out[k.value] = tables.get(v.id, []) if isinstance(v, ast.Name) else entries(v)
            else:
                tables[name] = entries(node.value)
    for arch, tags in list(out.items()):  # open_clip adds ARCH-quickgelu with the tags trained with QuickGELU
        quick = [t for t, q in tags if q]
        if quick and f"{arch}-quickgelu" not in out:
            out[f"{arch}-quickgelu"] = [(t, True) for t in quick]
    return {arch: [t for t, _ in tags] for arch, tags in out.items()}


def help_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedlit/cli`` (default ``~/.cache/fedlit/cli``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedlit" / "cli"


def _source_key(kind: str) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{kind}|{sys.version}|{shutil.get_terminal_size().columns}|{PKG}|".encode())  # per checkout
    try:
        from importlib.metadata import version

        h.update(version("jsonargparse").encode())
    except Exception:  # noqa: BLE001 - no metadata: the key still covers fedlit's sources
        pass
    for path in sorted(PKG.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(PKG)}:{st.st_size}:{st.st_mtime_ns}|".encode())
    return h.hexdigest()


def cached_text(kind: str, build: Callable[[], str]) -> str:
    """``build()``'s text, read from :func:`help_cache_dir` when fedlit's sources, jsonargparse, Python and the
    terminal width are what they were when it was written; otherwise built and written (best effort: an
    unwritable cache only costs the time)."""
    install = hashlib.blake2b(str(PKG).encode(), digest_size=4).hexdigest()  # one file per checkout and kind
    path = help_cache_dir() / f"{kind}-{install}-{_source_key(kind)}.txt"
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    text = build()
    try:
        from .atomic import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(f"{kind}-{install}-*.txt"):  # this checkout's older texts only
            old.unlink(missing_ok=True)
        atomic_write(path, lambda f: f.write(text), mode="w", unique=True)
    except OSError:
        pass
    return text


__all__ = ["backbones", "cached_text", "help_cache_dir", "methods"]
