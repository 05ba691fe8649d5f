"""pFedMMA (Ghiasvand, Alizadeh, Pedarsani, 2025): multi-modal adapters in both CLIP towers, a shared projection
and personal up/down projections.

Frozen CLIP with the fixed prompt "a photo of a {class}." (no learnable text context). For the transformer blocks
``adapter_start … adapter_end`` (1-based, 5…12 officially) of **both** towers::

    D_ℓᵀ = Linear(W_text → r) + ReLU,  U_ℓᵀ = Linear(r → W_text)          (personal, text)
    D_ℓⱽ = Linear(W_vis → r) + ReLU,   U_ℓⱽ = Linear(r → W_vis)           (personal, vision)
    S_ℓ  = Linear(r → r) + ReLU                                            (shared, one per layer, used by both towers)
    a = s · U_ℓ(S_ℓ(D_ℓ(LN1_ℓ(x))))   added to the block's output: x ← x + Attn(LN1(x)) + MLP(LN2(·)) + a

r = ``adapter_dim`` = 32, s = ``adapter_scale`` = 0.001; Kaiming-normal (fan_out, ReLU) weights, zero biases.
Gradient scaling (official): the branch is the identity in the forward pass, but its input gradient is multiplied
by s and its output gradient by 1/s, so the adapter weights receive the gradient of an *unscaled* adapter (1/s times
plain back-propagation) while the gradient into x is exact. The adapters are attached to the frozen backbone's
blocks with forward hooks only while this method runs (the backbone itself is not changed).

Server: S ← Σ_i n_i S_i / Σ_j n_j; the down/up projections never leave the client. Loss: cross-entropy.

Official quirk (``stale_text_cache``): the official model caches the class text features the first time it
evaluates and never clears them, and one model object serves every client, so every later evaluation reuses those
text-adapter outputs (only the visual adapters still differ). The first evaluation is Dassl's ``after_train`` test
of the FIRST client, right after its own round-1 training and before aggregation (sajjad-ucsb/pFedMMA@84197bb with
Dassl ``engine/trainer.py:427-438``, ``TEST.NO_TEST=False``). ``first_trained`` (default, True): the cache holds
the text features of the first client's model as it left its first local training (per class list and process);
``first_evaluated``: of the first model fedlit evaluates (after aggregation; fedlit's former behaviour); ``off``
(False): recomputed for every client and evaluation (fix). Not reproduced, documented: the official Base/Novel
come from separate ``--eval-only`` runs (``scripts/base2new.sh``, ``federated_main.py:174-191``) that load the
saved checkpoint's clients in order, so their cache is the checkpoint's client 0; fedlit's final Base/Novel use the
run's one cache.
Not reproduced: SGD momentum shared across clients, model selection on the best test round, amp.
``image_input = "images"``: the image tower is changed, nothing is cached.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

from ..backbones import FrozenCLIP
from ..errors import FedlitError
from ..prompts import Task, clean_classname, text_cache
from .base import FedMethod
from .roles import DASSL_FORK

TEMPLATE = "a photo of a {}."


class _GradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _GradScale.apply(x, factor)


def _linear(i: int, o: int) -> nn.Linear:
    lin = nn.Linear(i, o)
    nn.init.kaiming_normal_(lin.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(lin.bias)
    return lin


def adapter_branch(h: torch.Tensor, down: nn.Linear, shared: nn.Linear, up: nn.Linear, scale: float) -> torch.Tensor:
    """``s · U(ReLU(S(ReLU(D(h)))))`` with the official gradient scaling (input grad × s, output grad × 1/s)."""
    z = grad_scale(h, scale)
    z = up(torch.relu(shared(torch.relu(down(z.to(down.weight.dtype))))))
    return scale * grad_scale(z, 1.0 / scale)


class MMAdapters(nn.Module):
    """Per adapted layer: text/vision down and up projections (personal) and the shared projection."""

    def __init__(self, text_width: int, vision_width: int, layers: list[int], dim: int = 32, scale: float = 0.001):
        super().__init__()
        self.layers, self.scale = list(layers), scale
        n = len(layers)
        self.text_down = nn.ModuleList([_linear(text_width, dim) for _ in range(n)])
        self.text_up = nn.ModuleList([_linear(dim, text_width) for _ in range(n)])
        self.vis_down = nn.ModuleList([_linear(vision_width, dim) for _ in range(n)])
        self.vis_up = nn.ModuleList([_linear(dim, vision_width) for _ in range(n)])
        self.shared = nn.ModuleList([_linear(dim, dim) for _ in range(n)])

    @contextlib.contextmanager
    def attached(self, blocks, tower: str):
        """Forward hooks adding the tower's adapter branch to the output of each adapted block."""
        down, up = (self.text_down, self.text_up) if tower == "text" else (self.vis_down, self.vis_up)
        handles = []
        for j, layer in enumerate(self.layers):
            blk = blocks[layer]

            def hook(mod, args, out, j=j):
                a = adapter_branch(mod.ln_1(args[0]), down[j], self.shared[j], up[j], self.scale)
                return out + a.to(out.dtype)

            handles.append(blk.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class PFedMMA(FedMethod):
    """pFedMMA: multi-modal adapters in both towers; the shared projection is averaged, up/down stay personal.

    Args:
        adapter_start, adapter_end: first and last adapted block, 1-based (5, 12 for ViT-B/16; the embedded
            fedlit-toy has 2 blocks: 1, 2).
        adapter_dim: bottleneck width r (32).
        adapter_scale: s (0.001).
        stale_text_cache: reproduce the official stale evaluation text features (see the module docstring).
        lr, momentum, weight_decay: local SGD (0.001 constant, 0.9, 5e-4).
        weighted: FedAvg of the shared projections weighted by client sample count (official).
    """

    name = "pfedmma"
    policy = DASSL_FORK  # Dassl fork: one optimiser for all clients (spec part 2 §0.3 Q-a)
    image_input = "images"

    def __init__(self, adapter_start: int = 5, adapter_end: int = 12, adapter_dim: int = 32,
                 adapter_scale: float = 0.001,
                 stale_text_cache: Literal["first_trained", "first_evaluated", "off"] | bool = "first_trained",
                 lr: float = 0.001,
                 momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        if not 1 <= adapter_start <= adapter_end:
            raise FedlitError(f"method.init_args: need 1 <= adapter_start <= adapter_end, got {adapter_start}, "
                              f"{adapter_end}")
        if adapter_dim < 1 or adapter_scale <= 0:
            raise FedlitError(f"method.init_args: adapter_dim={adapter_dim} must be >= 1 and "
                              f"adapter_scale={adapter_scale} > 0")
        self.adapter_start, self.adapter_end = adapter_start, adapter_end
        mode = {True: "first_trained", False: "off"}.get(stale_text_cache, stale_text_cache)
        if mode not in ("first_trained", "first_evaluated", "off"):
            raise FedlitError(f"method.init_args.stale_text_cache={stale_text_cache!r}: use 'first_trained', "
                              f"'first_evaluated' or 'off'")
        self.adapter_dim, self.adapter_scale, self.stale_text_cache = adapter_dim, adapter_scale, mode
        self._stale: dict = {}
        self._exports = 0  # finish_local calls: the first is at build, the second after the first local training
        self._first_trained: dict | None = None

    def build(self, clip: FrozenCLIP):
        if not clip.is_vit:
            raise FedlitError(f"pfedmma adapts the blocks of a ViT image tower; backbone '{clip.name}' has none "
                              "(use e.g. ViT-B-16)")
        layers = min(len(clip.model.transformer.resblocks), len(clip.model.visual.transformer.resblocks))
        if self.adapter_end > layers:
            raise FedlitError(f"method.init_args.adapter_end={self.adapter_end} exceeds the {layers} transformer "
                              f"layers of backbone '{clip.name}'; use --method.init_args.adapter_end {layers} or less")
        return MMAdapters(clip.text_width, clip.vision_width, list(range(self.adapter_start - 1, self.adapter_end)),
                          self.adapter_dim, self.adapter_scale)

    def is_shared(self, key: str) -> bool:
        return key.startswith("shared.")  # S_ℓ; the down/up projections are personal

    def text_features(self, prompt: MMAdapters, clip, task: Task) -> torch.Tensor:
        cache = text_cache(clip)
        key = ("pfedmma", task.key)
        if key not in cache.templates:
            tokens = clip.tokenize([TEMPLATE.format(clean_classname(c)) for c in task.classnames])
            with torch.no_grad():
                cache.templates[key] = (clip.token_embedding(tokens).detach(), clip.eot_index(tokens))
        emb, eot = cache.templates[key]
        with prompt.attached(clip.model.transformer.resblocks, "text"):
            feats = clip.encode_text_embeddings(emb, eot)
        return feats / feats.norm(dim=-1, keepdim=True)

    def finish_local(self, prompt: MMAdapters) -> None:
        """Keep the first trained client's state (before aggregation) for the ``first_trained`` cache."""
        self._exports += 1
        if self.stale_text_cache == "first_trained" and self._exports == 2:
            self._first_trained = {k: v.detach().clone() for k, v in prompt.state_dict().items()}

    def prepare(self, prompt: MMAdapters, clip, task: Task):
        """Evaluation's class features; with ``stale_text_cache`` the cached ones of this class list."""
        if self.stale_text_cache == "off":
            return self.text_features(prompt, clip, task)
        if task.key not in self._stale:
            source = self._first_trained if self.stale_text_cache == "first_trained" else None
            now = {k: v.detach().clone() for k, v in prompt.state_dict().items()} if source else None
            with torch.no_grad():
                if source:
                    prompt.load_state_dict(source)
                self._stale[task.key] = self.text_features(prompt, clip, task).detach()
                if source:
                    prompt.load_state_dict(now)
        return self._stale[task.key]

    def image_features(self, prompt: MMAdapters, clip, x: torch.Tensor) -> torch.Tensor:
        with prompt.attached(clip.model.visual.transformer.resblocks, "vision"):
            return clip.encode_image(x)


__all__ = ["PFedMMA", "MMAdapters", "adapter_branch", "grad_scale"]
