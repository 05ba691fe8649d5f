"""FedTPG (Qiu et al., ICLR 2024): a text-driven prompt generator shared by all clients (spec §2).

Per task (an ordered class list) the generator reads the frozen, L2-normalised CLIP text features of the
**bare class names** (computed once per class list and cached) and turns them into one context
``[n_ctx, W]`` that is spliced into ``"X X X X {class}."`` for every class of the task (spec §2.1)::

    q  = soft_prompt                                   # [n_ctx·depth, W], N(0, 0.02²)
    kv = text_features(class names)                    # [C, D]
    x  = MHA(LN_q(q), LN_kv(kv), LN_kv(kv))            # 4 heads, batch_first, NO residual
    x  = FF(x) + x                                     # LN → Linear(W, 8W) → GEGLU → Linear(4W, W)
    [model_depth × {x = SelfAttn(LN(x)) + x ; x = FF(x) + x}]      (off by default)
    ctx = x.reshape(depth, n_ctx, W)

``W`` is the backbone's token-embedding width and ``D`` its text-feature width (both 512 on ViT-B/16,
128 on fedlit-toy); nothing is hard-coded. The **whole** generator is shared and averaged **without**
weights (``weighted=False``, as the official server does); nothing is personal. Evaluation follows
FedTPG's protocol (``eval_protocol = "global"``): Local = each client's own test images among its own
classes, Base/Novel = the global model on all base/novel classes. As in the official client, each client
trains among **its own classes** (the generator's context is then the client's class set); the
orchestrator passes the positions of those classes to :meth:`loss` (``classes``).

As in the official client (spec §2.3), each client keeps its SGD momentum buffers across the rounds it
participates in (``persistent_optimizer``, personal state that is never sent) and follows its own cosine
schedule ``lr · (1 + cos(π t / schedule_rounds)) / 2``, ``t`` = the client's number of earlier participations
(``lr_schedule: constant`` and ``persistent_optimizer: false`` switch both off). Not reproduced: pure-fp16
weights and SGD (spec §1.3; fedlit trains in fp32/bf16-mixed).
With ``depth > 1`` the official code injects ``ctx[1:]`` from text layer 0, overwriting ``ctx[0]``
(off-by-one); fedlit injects them from layer 1, and ``official_deep_offset=True`` reproduces the bug.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FedlitError
from ..data.task import Task, client_task
from ..prompts import encode_context, handcrafted_features, prompt_template
from .base import FedMethod


class GEGLU(nn.Module):
    """``a · gelu(b)`` for the two halves ``[a, b]`` of the last dimension (Shazeer 2020)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gates = x.chunk(2, dim=-1)
        return a * F.gelu(gates)


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm → Linear(dim, 2·mult·dim) → GEGLU → Linear(mult·dim, dim) (512 → 4096 → 2048 → 512)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * mult * dim), GEGLU(), nn.Linear(mult * dim, dim))


class SelfAttentionBlock(nn.Module):
    """``x = SelfAttn(LN(x)) + x ; x = FF(x) + x`` (the optional ``model_depth`` blocks)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = feed_forward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = self.attn(h, h, h, need_weights=False)[0] + x
        return self.ff(x) + x


class PromptGenerator(nn.Module):
    """FedTPG's ``PromptTranslator``: class-name text features ``[C, text_dim]`` → context ``[depth, n_ctx, dim]``.

    Args:
        dim: prompt (token-embedding) width W.
        text_dim: width D of the class-name text features (keys/values of the cross-attention).
        n_ctx: context tokens per layer.
        depth: context layers (1 = shallow prompt).
        model_depth: extra self-attention blocks after the cross-attention block.
        heads: attention heads.
    """

    def __init__(self, dim: int, text_dim: int, n_ctx: int = 4, depth: int = 1, model_depth: int = 0, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise FedlitError(f"method.init_args.heads={heads} must divide the prompt width {dim}")
        self.dim, self.n_ctx, self.depth = dim, n_ctx, depth
        self.soft_prompt = nn.Parameter(torch.randn(n_ctx * depth, dim) * 0.02)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(text_dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
        self.ff = feed_forward(dim)
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, heads) for _ in range(model_depth))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(self.soft_prompt).unsqueeze(0)  # [1, n_ctx·depth, W]
        kv = self.norm_kv(context.to(self.soft_prompt.dtype)).unsqueeze(0)  # [1, C, D]
        x = self.cross_attn(q, kv, kv, need_weights=False)[0]  # no residual (official)
        x = self.ff(x) + x
        for blk in self.blocks:
            x = blk(x)
        return x.reshape(self.depth, self.n_ctx, self.dim)


class FedTPG(FedMethod):
    """FedTPG: one prompt generator, trained by every client and averaged without weights.

    Args:
        n_ctx: generated context tokens (4).
        depth: context depth ``depth_ctx`` (1: only the input context; >1 adds deep text prompts).
        model_depth: self-attention blocks in the generator (0).
        heads: attention heads of the generator (4).
        official_deep_offset: with ``depth > 1``, inject the deep prompts from text layer 0 as the official
            code does (overwriting the input context); default False injects them from layer 1.
        lr, momentum, weight_decay: local SGD (official 0.003, 0.9, 1e-5).
        weighted: FedAvg weights ∝ sample count; default False = the official unweighted mean.
        lr_schedule: ``cosine`` (official CosineAnnealingLR per client, stepped per participation) or ``constant``.
        schedule_rounds: the cosine's ``T_max`` (official 500 = the number of rounds).
        persistent_optimizer: keep each client's momentum buffers across its participations (official).
    """

    name = "fedtpg"
    default_drop_last = "never"  # boschresearch/FedTPG dm_federated.py:91-97: no drop_last
    default_augment = "none"  # FedTPG's code: CLIP's test transform for training too (spec §1.4)
    eval_protocol = "global"

    def __init__(self, n_ctx: int = 4, depth: int = 1, model_depth: int = 0, heads: int = 4,
                 official_deep_offset: bool = False, lr: float = 0.003, momentum: float = 0.9,
                 weight_decay: float = 1e-5, weighted: bool = False,
                 lr_schedule: Literal["cosine", "constant"] = "cosine", schedule_rounds: int = 500,
                 persistent_optimizer: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        for key, val, low in (("n_ctx", n_ctx, 1), ("depth", depth, 1), ("model_depth", model_depth, 0), ("heads", heads, 1)):
            if val < low:
                raise FedlitError(f"method.init_args.{key}={val}: must be >= {low}")
        self.n_ctx, self.depth, self.model_depth, self.heads = n_ctx, depth, model_depth, heads
        self.official_deep_offset = official_deep_offset
        self.set_client_schedule(lr_schedule, schedule_rounds, persistent_optimizer)

    def build(self, clip):
        return PromptGenerator(clip.text_width, clip.embed_dim, self.n_ctx, self.depth, self.model_depth, self.heads)

    def is_shared(self, key: str) -> bool:
        return True  # the whole generator

    @staticmethod
    def class_context(clip, task: Task) -> torch.Tensor:
        """Frozen, L2-normalised text features of the bare class names (cached per class list)."""
        return handcrafted_features(clip, task, "{}")

    def text_features(self, prompt: PromptGenerator, clip, task: Task) -> torch.Tensor:
        ctx = prompt(self.class_context(clip, task))  # [depth, n_ctx, W]
        tpl = prompt_template(clip, task, self.n_ctx)
        deep = list(ctx[1:]) if self.depth > 1 else None
        first = 0 if self.official_deep_offset else 1
        return encode_context(clip, tpl, ctx[0], deep_prompts=deep, first_deep_block=first)

    def loss(self, module, x, y, task, classes=None):
        own, y_own = client_task(task, classes, y)
        return F.cross_entropy(self.logits(module.prompt, module.clip, x, own).float(), y_own)
