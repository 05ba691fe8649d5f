"""What ``fedlit methods`` / ``datasets`` / ``backbones`` list, found without importing torch where possible: the
method files are read (not imported) for each class's ``name`` and first docstring line, open_clip's model configs
are read as JSON. Listing is a lookup, so it must not cost the seconds that importing torch does."""

from __future__ import annotations

import ast
import importlib.util
import json
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
        for path in sorted(Path(next(iter(spec.submodule_search_locations)), "model_configs").glob("*.json")):
            cfg = json.loads(path.read_text())
            text = cfg.get("text_cfg", {})
            if cfg.get("custom_text") or "hf_model_name" in text or "multimodal_cfg" in cfg:
                continue  # not a plain CLIP text tower
            out.append((path.stem, f"open_clip CLIP, embed {cfg.get('embed_dim', '?')} (pretrained: openai or a tag)"))
    out.append(("timm/<model>[@size]", "image-only timm ViT for visual-prompt methods "
                                       "(default timm/vit_base_patch16_224.orig_in21k)"))
    return out


__all__ = ["backbones", "methods"]
