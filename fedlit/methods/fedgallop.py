"""FedGalLoP: GalLoP (Lafon et al., ECCV 2024) in federated learning, as the FOCoOp repository ships it (spec
methods-3-b.md §2.9, from PengyangZhou/FOCoOp@f30f6f306377, Apache-2.0: ``src/algorithms/FedGalLop/
{client_fedgallop,loss,server_fedgallop}.py``, ``src/models/clip_gallop.py``, ``src/utils/main_utils.py:89-108,
244-259``).

**default = code** (the FOCoOp repository's baseline, the runs behind the FOCoOp paper's tables).

Component: ``global_prompt [G, n, W]`` (G = ``num_global`` 1; **shared**, the only tensor uploaded),
``local_prompts [L, n, W]`` (L = ``num_local`` 4; personal) and ``local_proj`` (a D × D linear map without bias,
identity-initialised; personal). Every prompt starts as the token embeddings of ``ctx_init`` "A photo of a {}" with
the ``{}`` removed (n = 4 tokens) [code: clip_gallop.py:166-177, 236-254, 512-530]. Text features of prompt j and
class c: ``t_jc = norm(TextEnc([SOS, prompt_j, name_c, ".", EOT]))``.

Forward [code: clip_gallop.py:381-432; FedGalLop/loss.py:11-34] on cached tokens: token 0 = the pooled image
feature f, tokens 1..M the patches' local features f_m, ``local_features`` ``value`` (**default = code**, the last
block's value path, ``image_input = "value_tokens"``, as in :mod:`fedlit.methods.fedlocoop`) or ``output`` (the
final output tokens, ``tokens``)::

    g[b, c, j] = ⟨norm(f), t_jc⟩                      global prompts j = 1..G
    l[b, m, c, i] = ⟨norm(P f_m), t_ic⟩               local prompts i = 1..L, P = local_proj
    l_i[b, c] = mean of the top-k_i values of l[b, :, c, i] over the patches, k = ``top_k`` (5, 10, 15, 20)
              (:func:`topk_reduce`; k_i capped at M)

Loss [code: FedGalLop/loss.py:53-89; client_fedgallop.py:63-71]: CE(s·l_i, y) averaged over the local prompts +
CE(s·ĝ, y), ĝ = the mean of ``keep = max(1, G − ⌊p·G⌋)`` global prompts drawn per image with replacement
(:func:`prompt_dropout`, p = ``global_dropout`` 0.9: with G = 1 it keeps the one prompt). With G >
``prompts_batch_size`` (2), a training step first encodes a random subset of that many global prompts
[code: clip_gallop.py:356-360].

Evaluation (``eval_output``) [code: clip_gallop.py:428-432, 585-604; base/client_base.py:60-79]: the official
client scores ``forward(x)``, which returns the **probabilities** ``softmax(s·(ḡ + l̄)/2)`` (ḡ: mean over global
prompts, l̄: mean over local prompts of l_i): accuracy is their argmax (= global + local combined) and MSP / energy
are computed on these probabilities, i.e. a second softmax (``probs``, **default = code**). ``logits``:
``s·(ḡ + l̄)/2`` (GalLoP's global-local prediction; same accuracy, standard OOD scores); ``global``: ``s·ḡ`` only.

Loop: as FedLoCoOp (:mod:`fedlit.methods.fedlocoop`; policy :data:`~fedlit.methods.roles.FOCOOP_REPO`): SGD lr
0.001, momentum 0.9, weight decay 5e-4 on every trainable tensor, one optimiser per client kept across rounds, no
drop_last, no augmentation; server: mean of the global prompts weighted by training batches (``weights``),
broadcast to every client; local prompts and projection never leave the client.

Departures (not reproduced): on a ViT the official ``local_proj`` acts in the tower's **width** space, before
``visual.proj``; here it acts on the cached **projected** patch features (D × D, after ``proj``; for RN50 both are
the embedding space). The official text prompt has no "." after the class name. fp16 CLIP; batches of one image are
trained on (the official loop skips them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FedlitError
from ..prompts import Task, encode_context, prompt_template
from .base import FedMethod, fp32, local_image_input
from .roles import FOCOOP_REPO, batch_weighted, training_batches


# ------------------------------------------------------------------------------------------------ pure parts
def topk_reduce(local: torch.Tensor, topk: Sequence[int]) -> torch.Tensor:
    """``local [B, M, C, L]`` (patch × class × local prompt) → ``[B, C, L]``: for prompt i the mean of its
    ``topk[i]`` largest patch values (one k for every prompt if ``topk`` has one entry); k capped at M."""
    m, n = local.shape[1], local.shape[-1]
    if len(topk) not in (1, n):
        raise FedlitError(f"top_k has {len(topk)} entries for {n} local prompts: give one k per prompt or one")
    top = local.topk(min(max(topk), m), dim=1).values
    if len(topk) == 1:
        return top.mean(dim=1)
    return torch.stack([top[:, :k, :, i].mean(dim=1) for i, k in enumerate(topk)], dim=-1)


def keep_count(n: int, p: float) -> int:
    """How many of ``n`` global prompts prompt dropout keeps: ``max(n − ⌊p·n⌋, 1)``."""
    return max(n - int(p * n), 1)


def prompt_dropout(glob: torch.Tensor, p: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """``glob [B, C, G]`` → ``[B, C]``: per image the mean over :func:`keep_count` global prompts drawn uniformly
    with replacement (the same draw for every class)."""
    b, c, g = glob.shape
    keep = keep_count(g, p)
    if g == 1:
        return glob[..., 0]
    idx = (torch.randint(g, (b, 1, keep), generator=gen) if gen is not None
           else torch.randint(g, (b, 1, keep), device=glob.device))
    return glob.gather(-1, idx.to(glob.device).expand(-1, c, -1)).mean(-1)


def template_context(template: str) -> str:
    """The official context words of a GalLoP template: ``{}`` and ``_`` replaced by spaces, stripped."""
    return template.replace("{}", " ").replace("_", " ").strip()


class GalLoPPrompt(nn.Module):
    def __init__(self, init: torch.Tensor, num_global: int, num_local: int, dim: int):
        super().__init__()
        self.global_prompt = nn.Parameter(init.expand(num_global, -1, -1).clone())
        self.local_prompts = nn.Parameter(init.expand(num_local, -1, -1).clone())
        self.local_proj = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.local_proj.weight.copy_(torch.eye(dim))


# ------------------------------------------------------------------------------------------------ the method
class FedGalLoP(FedMethod):
    """FedGalLoP: a shared global prompt, personal local prompts on the top-k patches and a personal projection.

    Args:
        ctx_init: the template whose words initialise every prompt ("A photo of a {}": 4 tokens).
        num_global: global prompts G (1). num_local: local prompts L (4). top_k: k per local prompt (5, 10, 15, 20).
        global_dropout: prompt dropout p (0.9). prompts_batch_size: global prompts encoded per training step (2).
        eval_output: ``probs`` (official: the probabilities of global + local), ``logits`` (their logits) or
            ``global`` (global logits only).
        weights: ``batches`` (official: the number of training batches) or ``samples`` (FedAvg).
        local_features: ``value`` (official: the last block's value path) or ``output`` (the final output tokens).
        lr, momentum, weight_decay: SGD (0.001, 0.9, 5e-4).
    """

    name = "fedgallop"
    policy = FOCOOP_REPO
    image_input = "value_tokens"

    def __init__(self, ctx_init: str = "A photo of a {}", num_global: int = 1, num_local: int = 4,
                 top_k: list[int] | None = None, global_dropout: float = 0.9, prompts_batch_size: int = 2,
                 eval_output: Literal["probs", "logits", "global"] = "probs",
                 weights: Literal["batches", "samples"] = "batches",
                 local_features: Literal["value", "output"] = "value", lr: float = 0.001, momentum: float = 0.9,
                 weight_decay: float = 5e-4):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=True)
        self.local_features = local_features
        self.image_input = local_image_input(local_features)
        top_k = [5, 10, 15, 20] if top_k is None else [int(k) for k in top_k]
        checks = [
            (bool(template_context(ctx_init)), f"method.init_args.ctx_init={ctx_init!r}: needs at least one word"),
            (num_global >= 1 and num_local >= 1, "method.init_args: need num_global >= 1 and num_local >= 1"),
            (len(top_k) in (1, num_local) and all(k >= 1 for k in top_k),
             f"method.init_args.top_k={top_k}: give one k >= 1 per local prompt ({num_local}) or one for all"),
            (math.isfinite(global_dropout) and 0 <= global_dropout <= 1,
             f"method.init_args.global_dropout={global_dropout}: a fraction in [0, 1]"),
            (prompts_batch_size >= 1, f"method.init_args.prompts_batch_size={prompts_batch_size}: must be >= 1"),
            (eval_output in ("probs", "logits", "global"),
             f"method.init_args.eval_output={eval_output!r}: use one of probs, logits, global"),
            (weights in ("batches", "samples"), f"method.init_args.weights={weights!r}: use one of batches, samples"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FedlitError(msg)
        self.ctx_init, self.num_global, self.num_local, self.top_k = ctx_init, num_global, num_local, top_k
        self.global_dropout, self.prompts_batch_size = global_dropout, prompts_batch_size
        self.eval_output, self.weights = eval_output, weights
        self.n_ctx = 0
        self._batches: tuple[int, ...] = ()

    @property
    def lockstep(self) -> bool:
        return self.num_global == 1  # several global prompts: per-step random draws from the global RNG

    def plan_rounds(self, trainer, num_samples) -> None:
        self._batches = training_batches(trainer, self, num_samples)

    def build(self, clip):
        words = template_context(self.ctx_init)
        tokens = clip.tokenize([words]).to(clip.device)
        self.n_ctx = int(clip.eot_index(tokens)[0]) - 1
        with torch.no_grad():
            init = clip.token_embedding(tokens)[0, 1:1 + self.n_ctx].detach().float()
        return GalLoPPrompt(init, self.num_global, self.num_local, clip.embed_dim)

    def is_shared(self, key: str) -> bool:
        return key == "global_prompt"

    # ----------------------------------------------------------------------------- forward
    def prepare(self, prompt: GalLoPPrompt, clip, task: Task, glob: torch.Tensor | None = None):
        """Text features ``([G, C, D] global, [L, C, D] local)`` in one pass (``glob``: the global prompts to use)."""
        glob = prompt.global_prompt if glob is None else glob
        feats = encode_context(clip, prompt_template(clip, task, self.n_ctx), torch.cat([glob, prompt.local_prompts]))
        return feats[:glob.shape[0]].float(), feats[glob.shape[0]:].float()

    def text_features(self, prompt, clip, task):
        return F.normalize(self.prepare(prompt, clip, task)[0].mean(0), dim=-1)  # the global prompts' mean direction

    def similarities(self, prompt: GalLoPPrompt, x: torch.Tensor, text) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosines ``g [B, C, G]`` (pooled feature × global prompts) and ``l [B, M, C, L]`` (projected patches ×
        local prompts)."""
        if x.dim() != 3:
            raise FedlitError("fedgallop needs per-patch image tokens [B, 1+M, D] (image_input value_tokens/tokens)")
        tg, tl = text
        f = F.normalize(x[:, 0].float(), dim=-1)
        loc = F.normalize(prompt.local_proj(x[:, 1:].float()), dim=-1)
        return torch.einsum("bd,gcd->bcg", f, tg), torch.einsum("bmd,lcd->bmcl", loc, tl)

    def logits(self, prompt, clip, x, task, prepared=None):
        text = prepared if prepared is not None else self.prepare(prompt, clip, task)
        with fp32(x):
            g, loc = self.similarities(prompt, x, text)
            g = g.mean(-1)
            if self.eval_output == "global":
                return clip.logit_scale * g
            z = clip.logit_scale * (g + topk_reduce(loc, self.top_k).mean(-1)) / 2
            return z.softmax(dim=-1) if self.eval_output == "probs" else z

    def loss(self, module, x, y, task, classes=None):
        prompt, clip = module.prompt, module.clip
        glob = prompt.global_prompt
        if self.num_global > self.prompts_batch_size:
            glob = glob[torch.randperm(self.num_global)[:self.prompts_batch_size]]
        text = self.prepare(prompt, clip, task, glob)
        with fp32(x):
            g, loc = self.similarities(prompt, x, text)
            s = clip.logit_scale
            local = topk_reduce(loc, self.top_k)  # [B, C, L]
            local_loss = F.cross_entropy(s * local, y[:, None].expand(-1, local.shape[-1]))
            global_loss = F.cross_entropy(s * prompt_dropout(g, self.global_dropout), y)
            return global_loss + local_loss

    # ----------------------------------------------------------------------------- server
    @property
    def server(self):
        return batch_weighted(self._batches, self.weights)


__all__ = ["FedGalLoP", "keep_count", "prompt_dropout", "template_context", "topk_reduce"]
