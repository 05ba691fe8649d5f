"""FedLoCoOp: LoCoOp (Miyai et al., NeurIPS 2023) in federated learning, as the FOCoOp repository ships it (spec
methods-3-b.md §2.9, from PengyangZhou/FOCoOp@f30f6f306377, Apache-2.0: ``src/algorithms/FedLoCoOp/
{client_fedlocoop,loss,server_fedlocoop}.py``, ``src/models/clip_locoop.py``).

**default = code** (the FOCoOp repository's baseline, the runs behind the FOCoOp paper's tables).

Component: a CoOp context of ``n_ctx`` = 16 tokens, N(0, 0.02²), key ``ctx``: shared and FedAvg'd, the only tensor
uploaded (``prompt_learner.ctx``). ⚠ ``class_specific: true`` (**default = code**): the official prompt learner tests
``if class_token_position:`` (``"end"``, always truthy) where it means ``class_specific_context``, so its context is
class-specific, ``[C, n_ctx, W]``, although ``--csc`` is False [code: clip_locoop.py:51-57]; ``class_specific:
false`` is LoCoOp's (and the spec's) one generic context ``[n_ctx, W]``. A class outside the federation's training
classes (a novel class) uses the mean context over the training classes.

Forward [code: clip_locoop.py:158-174] on cached tokens (no image-tower pass per step): token 0 = the pooled image
feature, tokens 1..M = the patches' local features, ``local_features``: ``value`` (**default = code**,
``image_input = "value_tokens"``: each patch through the last block's value path, MaskCLIP-style — ViT
``x + out_proj(v_proj(ln_1 x))``, its MLP, ``ln_post``, ``@ proj``; RN50 ``c_proj(v_proj(x))`` per position
[code: clip_w_local/modified_clip_model_locoop.py:79-113, 223-241, 341-379]) or ``output`` (the final output tokens
as FedOTP uses them, ``image_input = "tokens"``: ViT ``ln_post(x) @ proj``, RN attention pooling with every
position as a query)::

    t_c = norm(TextEnc([SOS, ctx_c, name_c, ".", EOT]))
    z   = s · norm(f_0) · tᵀ              global logits [B, C]   (the only logits evaluation uses)
    z_m = s · norm(f_m) · tᵀ              patch logits  [B, M, C]

Loss [code: client_fedlocoop.py:68-78; loss.py:5-17]: ``CE(z, y) + λ·(−H)``, λ = ``lambda_local`` 0.1, where H
(:func:`ood_entropy`) = the mean over the selected patches of −Σ_c p_c log(p_c + 1e-5), p = softmax(z_m), the
selected patches being those whose top-K classes (K = ``top_k`` 5) do not contain the image's label (LoCoOp's OOD
regularisation: background patches pushed towards a uniform prediction); H = 0 when no patch is selected. K is
capped at the number of classes of the task (the official ``topk`` would fail; with K ≥ C every top-K holds the
label and the term vanishes).

Loop (§2.5 / §2.9, the FOCoOp repository's baselines; policy :data:`~fedlit.methods.roles.FOCOOP_REPO`): SGD
lr 0.001, momentum 0.9, weight decay 5e-4, **one optimiser per client created once and kept** (its momentum
persists across rounds: ``per_client``), no drop_last, Resize + CenterCrop (no augmentation), clients in index order;
server: the mean weighted by each client's number of training batches (``weights: batches`` = the official
``len(loader)``; ``samples``: FedAvg), broadcast to every client.

Departures (not reproduced): fp16 CLIP and the optional AMP of ``--precision amp``; batches of one image are
trained on (the official loop skips them).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FedlitError
from ..prompts import Task, encode_context, prompt_template
from .base import FedMethod, fp32, local_image_input
from .roles import FOCOOP_REPO, batch_weighted, training_batches


# ------------------------------------------------------------------------------------------------ pure parts
def ood_entropy(patch_logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> torch.Tensor:
    """LoCoOp's regulariser H [code: FedLoCoOp/loss.py:5-17]: ``patch_logits [N, C]`` (one row per patch),
    ``labels [N]`` (each patch's image label) → the mean entropy −Σ p log(p + 1e-5) of ``p = softmax(row)`` over
    the rows whose ``top_k`` largest classes do not contain the label; 0 (with a gradient of 0) if there is none."""
    p = patch_logits.softmax(dim=-1)
    k = min(top_k, p.shape[-1])
    hit = (p.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)
    sel = p[~hit]
    if sel.shape[0] == 0:
        return patch_logits.sum() * 0.0
    return -(sel * torch.log(sel + 1e-5)).sum(dim=-1).mean()


class LoCoOpPrompt(nn.Module):
    def __init__(self, classes: int, n_ctx: int, width: int, class_specific: bool):
        super().__init__()
        shape = (classes, n_ctx, width) if class_specific else (n_ctx, width)
        self.ctx = nn.Parameter(torch.randn(*shape) * 0.02)


# ------------------------------------------------------------------------------------------------ the method
class FedLoCoOp(FedMethod):
    """FedLoCoOp: a shared CoOp context trained with LoCoOp's entropy regulariser on background patches.

    Args:
        n_ctx: context tokens (16). class_specific: one context per class (True, the official code) or one generic
            context (False, LoCoOp). lambda_local: λ (0.1). top_k: K of the patch selection (5).
        weights: ``batches`` (official: the number of training batches) or ``samples`` (FedAvg).
        local_features: ``value`` (official: the last block's value path) or ``output`` (the final output tokens).
        lr, momentum, weight_decay: SGD (0.001, 0.9, 5e-4).
    """

    name = "fedlocoop"
    policy = FOCOOP_REPO
    image_input = "value_tokens"

    def __init__(self, n_ctx: int = 16, class_specific: bool = True, lambda_local: float = 0.1, top_k: int = 5,
                 weights: Literal["batches", "samples"] = "batches",
                 local_features: Literal["value", "output"] = "value", lr: float = 0.001, momentum: float = 0.9,
                 weight_decay: float = 5e-4):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=True)
        if n_ctx < 1 or top_k < 1:
            raise FedlitError(f"method.init_args: need n_ctx >= 1 and top_k >= 1 (got {n_ctx}, {top_k})")
        if not math.isfinite(lambda_local) or lambda_local < 0:
            raise FedlitError(f"method.init_args.lambda_local={lambda_local}: must be a finite number >= 0")
        if weights not in ("batches", "samples"):
            raise FedlitError(f"method.init_args.weights={weights!r}: use one of batches, samples")
        self.n_ctx, self.class_specific, self.lambda_local, self.top_k = n_ctx, class_specific, lambda_local, top_k
        self.weights = weights
        self.local_features = local_features
        self.image_input = local_image_input(local_features)
        self._classes: tuple[str, ...] = ()
        self._batches: tuple[int, ...] = ()

    def setup_federation(self, train_task: Task, num_clients: int) -> None:
        self._classes = tuple(train_task.classnames)

    def plan_rounds(self, trainer, num_samples) -> None:
        self._batches = training_batches(trainer, self, num_samples)  # len(train_loader): a batch of one counts

    def build(self, clip):
        if self.class_specific and not self._classes:
            raise FedlitError("fedlocoop: call method.setup_federation(train_task, num_clients) before build()")
        return LoCoOpPrompt(len(self._classes), self.n_ctx, clip.text_width, self.class_specific)

    def is_shared(self, key: str) -> bool:
        return key == "ctx"

    # ----------------------------------------------------------------------------- classification
    def contexts(self, prompt: LoCoOpPrompt, task: Task) -> torch.Tensor:
        """The context of every class of ``task``: ``[C, n, W]`` (class-specific; novel classes: the mean) or the
        generic ``[n, W]``."""
        if not self.class_specific:
            return prompt.ctx
        pos = {c: i for i, c in enumerate(self._classes)}
        idx = [pos.get(c, -1) for c in task.classnames]
        if all(i >= 0 for i in idx):
            return prompt.ctx[idx]
        mean = prompt.ctx.mean(0)
        return torch.stack([prompt.ctx[i] if i >= 0 else mean for i in idx])

    def text_features(self, prompt, clip, task):
        tpl = prompt_template(clip, task, self.n_ctx)
        ctx = self.contexts(prompt, task)
        if ctx.dim() == 2:
            return encode_context(clip, tpl, ctx)
        t = clip.encode_text_embeddings(tpl.splice(ctx), tpl.eot, length=tpl.length)
        return F.normalize(t.float(), dim=-1)

    def logits(self, prompt, clip, x, task, prepared=None):
        if x.dim() != 3:
            raise FedlitError("fedlocoop needs per-patch image tokens [B, 1+M, D] (image_input value_tokens/tokens)")
        return super().logits(prompt, clip, x, task, prepared)

    def loss(self, module, x, y, task, classes=None):
        if x.dim() != 3:
            raise FedlitError("fedlocoop needs per-patch image tokens [B, 1+M, D] (image_input value_tokens/tokens)")
        prompt, clip = module.prompt, module.clip
        t = self.text_features(prompt, clip, task)
        with fp32(x):
            f = F.normalize(x.float(), dim=-1)
            z = clip.logit_scale * f @ t.float().t()  # [B, 1+M, C]: token 0 global, 1..M the patches
            loss = F.cross_entropy(z[:, 0], y)
            if self.lambda_local > 0:
                b, m = z.shape[0], z.shape[1] - 1
                h = ood_entropy(z[:, 1:].reshape(b * m, -1), y.repeat_interleave(m), self.top_k)
                loss = loss - self.lambda_local * h
            return loss

    # ----------------------------------------------------------------------------- server
    @property
    def server(self):
        return batch_weighted(self._batches, self.weights)


__all__ = ["FedLoCoOp", "ood_entropy"]
