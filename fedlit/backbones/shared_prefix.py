"""Exact text-side savings of a causal CLIP text tower: truncation at the last EOT and a shared prefix.

CLIP's text transformer is causal (``attn_mask`` = −inf above the diagonal): the hidden state at position ``t``
depends only on positions ``≤ t``. Two exact consequences:

* **Truncation.** The pooled feature sits at the EOT position, so every position after the batch's last EOT can be
  dropped before the first block (the positional embedding and the mask are sliced to the kept length).
* **Shared prefix.** In a prompt ``[SOS][ctx × n][class …][.][EOT]`` the first ``Lp`` positions are the same for
  every class of a task, hence so are their hidden states in every layer. :func:`encode_shared_prefix` runs each
  block once over the ``P`` distinct prefixes ``[P, Lp, W]`` and once over the class suffixes ``[P, C, Ls, W]``,
  whose queries attend to the prefix keys/values of their own context plus their own causal keys/values.
  Deep prompts that replace positions inside the prefix keep it shared (MaPLe, FedVLP, FedTPG's deep context).

Each block is open_clip's ``ResidualAttentionBlock`` (``ln_1`` → ``nn.MultiheadAttention`` → ``ls_1`` → residual →
``ln_2`` → ``mlp`` → ``ls_2`` → residual). Its norms, MLP and layer scales are called as modules; only the attention
is re-stated over the block's own ``in_proj`` / ``out_proj`` weights, as ``nn.MultiheadAttention`` computes it
(``softmax(q kᵀ / √d + mask) v`` per head), with the keys split into the prefix part and the suffix part. The result
equals the plain path up to float rounding (tests: 1e-5 in fp32 for features and gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask_ok(model) -> bool:
    """True when the text tower's ``attn_mask`` is the standard causal mask (0 on and below the diagonal, −inf
    above), the property both savings rely on."""
    mask = getattr(model, "attn_mask", None)
    if mask is None or mask.dim() != 2:
        return False
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def blocks_ok(transformer) -> bool:
    """True when every text block is a plain open_clip ``ResidualAttentionBlock`` over ``nn.MultiheadAttention``
    (packed q/k/v weights, no bias_k/bias_v, no zero attention, no cross-attention norm)."""
    from open_clip.transformer import ResidualAttentionBlock

    for blk in transformer.resblocks:
        a = getattr(blk, "attn", None)
        if type(blk) is not ResidualAttentionBlock or not isinstance(a, nn.MultiheadAttention):
            return False
        if not a._qkv_same_embed_dim or a.bias_k is not None or a.add_zero_attn or hasattr(blk, "ln_1_kv"):
            return False
    return True


def _qkv(attn: nn.MultiheadAttention, h: torch.Tensor):
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return q, k, v


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., L, W] -> [..., H, L, W/H]."""
    *lead, length, width = t.shape
    return t.reshape(*lead, length, heads, width // heads).transpose(-3, -2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    """[..., H, L, d] -> [..., L, H·d]."""
    *lead, heads, length, d = t.shape
    return t.transpose(-3, -2).reshape(*lead, length, heads * d)


def _block(blk, xp: torch.Tensor, xs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``ResidualAttentionBlock`` over prefixes ``xp [P, Lp, W]`` and suffixes ``xs [P, C, Ls, W]``."""
    attn = blk.attn
    heads = attn.num_heads
    lp, ls = xp.shape[1], xs.shape[2]
    qp, kp, vp = (_heads(t, heads) for t in _qkv(attn, blk.ln_1(xp)))  # [P, H, Lp, d]
    qs, ks, vs = (_heads(t, heads) for t in _qkv(attn, blk.ln_1(xs)))  # [P, C, H, Ls, d]
    scale = qp.shape[-1] ** -0.5
    mask = mask.to(xp.dtype)
    # prefix: plain causal self-attention among the prefix positions
    sp = (qp * scale) @ kp.transpose(-1, -2) + mask[:lp, :lp]
    op = sp.softmax(dim=-1) @ vp  # [P, H, Lp, d]
    # suffix: keys = the prefix of its own context (all visible) + its own positions (causal)
    p, c = xs.shape[0], xs.shape[1]
    qs = qs * scale
    q_all = qs.transpose(1, 2).reshape(p, heads, c * ls, -1)  # [P, H, C·Ls, d]
    s_pre = (q_all @ kp.transpose(-1, -2)).reshape(p, heads, c, ls, lp).transpose(1, 2)  # [P, C, H, Ls, Lp]
    s_own = qs @ ks.transpose(-1, -2)  # [P, C, H, Ls, Ls]
    s = torch.cat([s_pre + mask[lp:lp + ls, :lp], s_own + mask[lp:lp + ls, lp:lp + ls]], dim=-1).softmax(dim=-1)
    a_pre = s[..., :lp].transpose(1, 2).reshape(p, heads, c * ls, lp)
    o_pre = (a_pre @ vp).reshape(p, heads, c, ls, -1).transpose(1, 2)  # [P, C, H, Ls, d]
    os_ = o_pre + s[..., lp:] @ vs
    out_w, out_b = attn.out_proj.weight, attn.out_proj.bias
    xp = xp + blk.ls_1(F.linear(_merge(op), out_w, out_b))
    xs = xs + blk.ls_1(F.linear(_merge(os_), out_w, out_b))
    xp = xp + blk.ls_2(blk.mlp(blk.ln_2(xp)))
    xs = xs + blk.ls_2(blk.mlp(blk.ln_2(xs)))
    return xp, xs


def deep_prompt_list(deep_prompts, blocks, first: int) -> list:
    """``deep_prompts`` as a list, checked to fit the ``blocks`` from block ``first`` on (both text paths)."""
    prompts = list(deep_prompts) if deep_prompts is not None else []
    if first < 0 or len(prompts) > len(blocks) - first:
        raise ValueError(f"{len(prompts)} deep prompts from block {first} exceed {len(blocks)} blocks")
    return prompts


def _deep(p: torch.Tensor, count: int) -> torch.Tensor:
    """A deep prompt ``[n, W]`` / ``[1, n, W]`` / ``[P, n, W]`` -> ``[P, n, W]``."""
    if p.dim() == 2:
        p = p.unsqueeze(0)
    if p.dim() != 3 or p.shape[0] not in (1, count):
        raise ValueError(f"a shared-prefix deep prompt must have shape [n, W] or [{count}, n, W], got {tuple(p.shape)}")
    return p.expand(count, -1, -1)


def encode_shared_prefix(
    clip,
    prefix: torch.Tensor,
    suffix: torch.Tensor,
    eot_idx: torch.Tensor,
    deep_prompts: Sequence[torch.Tensor | None] | None = None,
    deep_start: int = 1,
    first_deep_block: int = 1,
    length: int | None = None,
) -> torch.Tensor:
    """Text features ``[P, C, embed_dim]`` (not normalised) of the ``P × C`` prompts ``prefix[p] ‖ suffix[c]``.

    Args:
        clip: a :class:`~fedlit.backbones.FrozenCLIP` whose text tower passes :func:`causal_mask_ok` and
            :func:`blocks_ok`.
        prefix: token embeddings ``[P, Lp, W]`` of the ``P`` distinct prefixes (no positional embedding yet).
        suffix: token embeddings ``[C, ≥Ls, W]`` of the class suffixes, positions ``Lp …``; cut at the last EOT.
            ``[P, C, ≥Ls, W]``: a suffix set per prefix (lock-step clients on different class lists).
        eot_idx: ``[C]`` absolute EOT positions (each ``≥ Lp``); ``[P, C]`` with a suffix set per prefix.
        deep_prompts: ``deep_prompts[j]`` (``[n, W]`` or ``[P, n, W]``) replaces positions
            ``deep_start : deep_start + n`` (inside the prefix) at the input of block ``j + first_deep_block``.
        length: ``max(eot_idx) + 1`` when the caller knows it (no device sync); the caller then guarantees
            ``min(eot_idx) ≥ Lp`` (checked here otherwise).
    """
    m = clip.model
    dtype = m.transformer.get_cast_dtype()
    n_pre, lp = prefix.shape[0], prefix.shape[1]
    if length is None:
        length = int(eot_idx.max()) + 1
        if int(eot_idx.min()) < lp:
                raise ValueError(f"an EOT position {int(eot_idx.min())} lies inside the shared prefix of {lp} tokens")
    pos = m.positional_embedding[:length].to(dtype)
    xp = prefix.to(dtype) + pos[:lp]
    if suffix.dim() == 4:  # a suffix set per prefix
        xs = suffix[:, :, : length - lp].to(dtype) + pos[lp:]
    else:
        xs = (suffix[:, : length - lp].to(dtype) + pos[lp:]).unsqueeze(0).expand(n_pre, -1, -1, -1)
    mask = m.attn_mask[:length, :length]
    blocks = m.transformer.resblocks
    prompts = deep_prompt_list(deep_prompts, blocks, first_deep_block)
    for i, blk in enumerate(blocks):
        j = i - first_deep_block
        if 0 <= j < len(prompts) and prompts[j] is not None:
            dp = _deep(prompts[j], n_pre).to(xp.dtype)
            n = dp.shape[1]
            if deep_start < 0 or deep_start + n > lp or dp.shape[-1] != xp.shape[-1]:
                raise ValueError(f"deep prompt of shape {tuple(dp.shape)} at {deep_start} leaves the {lp}-token prefix")
            xp = torch.cat([xp[:, :deep_start], dp, xp[:, deep_start + n:]], dim=1)
        xp, xs = _block(blk, xp, xs, mask)
    cls = torch.arange(xs.shape[1], device=xs.device)
    if eot_idx.dim() == 2:  # per prefix
        x = xs[torch.arange(n_pre, device=xs.device)[:, None], cls[None], (eot_idx - lp).to(xs.device)]
    else:
        x = xs[:, cls, (eot_idx - lp).to(xs.device)]  # [P, C, W]
    x = m.ln_final(x)
    proj = m.text_projection
    if isinstance(proj, nn.Module):
        return proj(x)
    return x @ proj if proj is not None else x
