"""Visual prompt tokens spliced into a ViT's token sequence and removed again (VPT, MaPLe, FedVLP, pFedPG), one
implementation for both image towers (:mod:`.frozen_clip`'s open_clip ViT and :mod:`.timm_vit`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

POSITIONS = ("after_cls", "append")


def expand(p: torch.Tensor, batch: int) -> torch.Tensor:
    """[n, W] or [B, n, W] -> [B, n, W]."""
    if p.dim() == 2:
        return p.unsqueeze(0).expand(batch, -1, -1)
    if p.dim() == 3 and p.shape[0] in (1, batch):
        return p.expand(batch, -1, -1)
    raise ValueError(f"prompt must have shape [n, W] or [{batch}, n, W], got {tuple(p.shape)}")


def check_position(prompt_position: str) -> None:
    if prompt_position not in POSITIONS:
        raise ValueError(f"prompt_position must be 'after_cls' or 'append', got {prompt_position!r}")


def insert(x: torch.Tensor, visual_prompts: torch.Tensor | None, prefix: int,
           prompt_position: str) -> tuple[torch.Tensor, int, int]:
    """Tokens ``x`` [B, L, W] with the prompts inserted after the ``prefix`` tokens (``after_cls``) or appended;
    returns ``(tokens, start, n)``: the prompts occupy positions ``start … start+n-1``."""
    if visual_prompts is None:
        return x, 0, 0
    p = expand(visual_prompts, x.shape[0]).to(x.dtype)
    start = prefix if prompt_position == "after_cls" else x.shape[1]
    return torch.cat([x[:, :start], p, x[:, start:]], dim=1), start, p.shape[1]


def check_deep(deep_visual_prompts: Sequence[torch.Tensor | None] | None, n: int) -> list[torch.Tensor | None]:
    """The deep prompts as a list, each with the ``n`` tokens of the input-layer prompts."""
    deep = list(deep_visual_prompts or [])
    if deep and n == 0:
        raise ValueError("deep_visual_prompts need visual_prompts (the input-layer prompt tokens)")
    if any(d is not None and d.shape[-2] != n for d in deep):
        raise ValueError(f"every deep visual prompt must have the same {n} tokens as visual_prompts")
    return deep


def remove(x: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Inverse of :func:`insert` after the blocks: the tokens without the ``n`` prompt tokens at ``start``."""
    return torch.cat([x[:, :start], x[:, start + n:]], dim=1) if n else x


__all__ = ["POSITIONS", "check_deep", "check_position", "expand", "insert", "remove"]
