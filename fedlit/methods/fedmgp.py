"""FedMGP (Bo et al., NeurIPS 2025): groups of paired text + visual prompts, similarity-guided group sampling,
rank-wise aggregation with write-back (spec methods-3-a.md §1, from weihao-bo/FedMGP@3a026970df7b).

**default = paper**: the released code cannot have produced the tables (its data layer is not in the repository,
§0.2, and every load restores the *initial* vision prompts, so the trained and aggregated ones never reach an
evaluation, §1.4); the official behaviours that change numbers are named options.

Component (§1.2): G = ``num_groups`` (5) text groups ``ctx [G, n_t, W]`` (n_t = 2; each starts as the first n_t
token embeddings of ``ctx_init`` "a photo of a" plus its own N(0, 0.01²) noise from seed 123 + g; the rest of the
phrase, "of a", stays fixed text) and G vision groups ``vpt [G, n_v, W_v]`` (N(0, 0.02²)), appended after
[CLS, patches] once the positional embedding is added (shallow, depth 1). Forward and loss (§1.3)::

    z_g = 100 · norm(ImgEnc(x; V_g)) · norm(TextEnc([SOS, P_g, "of a", name_c, ".", EOT]))ᵀ
    L   = (1/G) Σ_g CE(z_g, y) + w · D          inference: z = (1/G) Σ_g z_g

D is the mean over the group pairs g < h (per class for text, per image for vision, averaged, then (text + vision)/2)
of the distance ``divergent_type`` (l1: mean |·|, l2: mean (·)², cos: 1 − cos). ``divergent_sign: official``
adds +w·D (the executed code: the |·| of its negative term pulls the groups *together*); ``diverse`` adds −w·D
(the diversity the abstract describes).

Communication (§1.4): after local training a client selects S = ``topk`` (2) groups of each tower. Round 0: the
first S of a permutation from seed 42 + cid (the same draw for text and vision); later rounds: s_g = max_k
cos(vec P_g, vec Ḡ_k) against the previous global ranks, p = softmax(s / T), S draws without replacement from
seed 42 + cid + round (text and vision separately, the same seed). The selected groups, in draw order, are the
shared ``upload_text`` / ``upload_vis``; the server's rank-wise unweighted mean Ḡ_r is written back into rows
``sel[r]`` of every client of that round (kept per client on the server and sent with its payload, so a client not
sampled later keeps its last write-back, as the official loop does). The other G − S groups stay personal.

Option ``vision_prompt_reload``: ``trained`` (default: the trained + written-back vision groups are kept) or
``official_init`` (every load restores the initial vision groups: the released code's key-renaming bug).
Not reproduced: the wall-clock seeds of the vision init and the unseeded runs (fedlit always seeds), the
optimiser shared across clients (momentum leak), fp16 SGD without loss scaling.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import FrozenCLIP
from ..errors import FedlitError
from ..prompts import PromptTemplate, Task, clean_classname, encode_context, text_cache
from .base import FedMethod, fp32

META, WB_TEXT, WB_VIS = "mgp_meta", "mgp_wb_text", "mgp_wb_vis"


def phrase_template(clip: FrozenCLIP, task: Task, phrase: str | None, n: int) -> PromptTemplate:
    """``"{phrase} {class}."`` with positions ``1..n`` learnable (``phrase=None``: ``"X … X {class}."``), cached."""
    cache = text_cache(clip)
    key = ("mgp-phrase", task.key, phrase, n)
    if key not in cache.templates:
        head = phrase if phrase else " ".join(["X"] * n)
        tokens = clip.tokenize([f"{head} {clean_classname(c)}." for c in task.classnames]).to(clip.device)
        eot = clip.eot_index(tokens)
        if int(eot.max()) >= tokens.shape[1] - 1:
            raise FedlitError(f"prompt '{head} {max(task.classnames, key=len)}.' does not fit the text encoder; "
                              "use a shorter ctx_init")
        with torch.no_grad():
            emb = clip.token_embedding(tokens)
        cache.templates[key] = PromptTemplate(prefix=emb[:, :1].detach(), suffix=emb[:, 1 + n:].detach(), eot=eot,
                                              tokens=tokens)
    return cache.templates[key]


def select_groups(groups: torch.Tensor, global_ranks: torch.Tensor | None, k: int, seed: int,
                  temperature: float = 1.0) -> torch.Tensor:
    """Indices of ``k`` groups of ``groups [G, ...]`` in draw order: a random permutation's first ``k`` when
    ``global_ranks`` is None (round 0), else ``k`` draws without replacement from softmax(s / T), with
    s_g = max_j cos(vec groups_g, vec global_ranks_j)."""
    gen = torch.Generator().manual_seed(seed)
    if global_ranks is None:
        return torch.randperm(groups.shape[0], generator=gen)[:k]
    s = (F.normalize(groups.detach().float().flatten(1).cpu(), dim=1)
         @ F.normalize(global_ranks.detach().float().flatten(1).cpu(), dim=1).t()).max(dim=1).values
    return torch.multinomial(torch.softmax(s / temperature, dim=0), k, replacement=False, generator=gen)


def pair_distance(x: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean over pairs g < h of the distance between ``x[g]`` and ``x[h]`` (``x [G, N, D]``), averaged over N."""
    g = x.shape[0]
    if g < 2:
        return x.sum() * 0
    i, j = torch.triu_indices(g, g, 1)
    a, b = x[i], x[j]  # [pairs, N, D]
    if kind == "l1":
        d = (a - b).abs().mean(-1)
    elif kind == "l2":
        d = (a - b).pow(2).mean(-1)
    else:
        d = 1 - F.cosine_similarity(a, b, dim=-1)
    return d.mean()


class MGPPrompt(nn.Module):
    """Text groups ``ctx`` and vision groups ``vpt`` (personal), the uploads (shared) and the selections."""

    def __init__(self, clip: FrozenCLIP, groups: int, n_text: int, n_vision: int, topk: int, ctx_init: str | None):
        super().__init__()
        if ctx_init:
            tokens = clip.tokenize([ctx_init])
            if int(clip.eot_index(tokens)[0]) - 1 < n_text:
                raise FedlitError(f"ctx_init '{ctx_init}' has fewer tokens than n_ctx_text={n_text}")
            with torch.no_grad():
                head = clip.token_embedding(tokens)[0, 1:1 + n_text].detach().float().cpu()
        else:
            head = torch.zeros(n_text, clip.text_width)
        std = 0.01 if ctx_init else 0.02
        noise = [torch.randn(n_text, clip.text_width, generator=torch.Generator().manual_seed(123 + g)) * std
                 for g in range(groups)]
        self.ctx = nn.Parameter(torch.stack([head + e for e in noise]))
        self.vpt = nn.Parameter(torch.randn(groups, n_vision, clip.vision_width) * 0.02)
        self.register_buffer("vpt_init", self.vpt.detach().clone(), persistent=False)
        self.register_buffer("upload_text", self.ctx.detach()[:topk].clone())
        self.register_buffer("upload_vis", self.vpt.detach()[:topk].clone())
        self.register_buffer("sel_text", torch.arange(topk))
        self.register_buffer("sel_vis", torch.arange(topk))
        self.meta: tuple[int, int] | None = None  # (client, round) of the current payload
        self.pending: dict[str, torch.Tensor] = {}
        self.reload_init = False
        self.register_load_state_dict_post_hook(_after_load)


def _after_load(module: MGPPrompt, incompatible) -> None:
    """Write the server's ranks back into the client's selected rows; optionally restore the initial vision groups."""
    with torch.no_grad():
        if WB_TEXT in module.pending:
            module.ctx[module.sel_text] = module.pending[WB_TEXT].to(module.ctx)
            module.vpt[module.sel_vis] = module.pending[WB_VIS].to(module.vpt)
        if module.reload_init:
            module.vpt.copy_(module.vpt_init)
    module.pending = {}


class FedMGP(FedMethod):
    """FedMGP: multi-group text + visual prompts, similarity-guided sampling, rank-wise aggregation.

    Args:
        num_groups: G (5). n_ctx_text, n_ctx_vision: tokens per group (2, 2). topk: S groups shared (2).
        temperature: T of the selection softmax (1.0). ctx_init: "a photo of a".
        divergent_weight: w (1.0; 0 = off). divergent_type: ``l1`` (official) / ``l2`` / ``cos``.
        divergent_sign: ``official`` (+w·D, pulls groups together, as executed) or ``diverse`` (−w·D).
        vision_prompt_reload: ``trained`` (default, paper) or ``official_init`` (released code's reset).
        lr, momentum, weight_decay: SGD (0.001 constant, 0.9, 5e-4).
    """

    name = "fedmgp"
    image_input = "images"
    server_bank = False

    def __init__(self, num_groups: int = 5, n_ctx_text: int = 2, n_ctx_vision: int = 2, topk: int = 2,
                 temperature: float = 1.0, ctx_init: str | None = "a photo of a", divergent_weight: float = 1.0,
                 divergent_type: Literal["l1", "l2", "cos"] = "l1",
                 divergent_sign: Literal["official", "diverse"] = "official",
                 vision_prompt_reload: Literal["trained", "official_init"] = "trained", lr: float = 0.001,
                 momentum: float = 0.9, weight_decay: float = 5e-4):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=False)
        if min(num_groups, n_ctx_text, n_ctx_vision, topk) < 1 or topk > num_groups:
            raise FedlitError(f"method.init_args: need 1 <= topk={topk} <= num_groups={num_groups} and >= 1 tokens")
        for key, val, ok in (("divergent_type", divergent_type, ("l1", "l2", "cos")),
                             ("divergent_sign", divergent_sign, ("official", "diverse")),
                             ("vision_prompt_reload", vision_prompt_reload, ("trained", "official_init"))):
            if val not in ok:
                raise FedlitError(f"method.init_args.{key}={val!r}: use one of {', '.join(ok)}")
        if temperature <= 0:
            raise FedlitError(f"method.init_args.temperature={temperature}: must be > 0")
        self.num_groups, self.n_ctx_text, self.n_ctx_vision, self.topk = num_groups, n_ctx_text, n_ctx_vision, topk
        self.temperature, self.ctx_init = temperature, ctx_init
        self.divergent_weight, self.divergent_type, self.divergent_sign = (divergent_weight, divergent_type,
                                                                           divergent_sign)
        self.vision_prompt_reload = vision_prompt_reload
        self._round = 0
        self._writeback: dict[int, dict[str, torch.Tensor]] = {}

    # ----------------------------------------------------------------------------- the component
    def build(self, clip: FrozenCLIP):
        if not clip.is_vit:
            raise FedlitError(f"fedmgp prompts a ViT image tower; backbone '{clip.name}' has none (use e.g. ViT-B-16)")
        module = MGPPrompt(clip, self.num_groups, self.n_ctx_text, self.n_ctx_vision, self.topk, self.ctx_init)
        module.reload_init = self.vision_prompt_reload == "official_init"
        return module

    def is_shared(self, key: str) -> bool:
        return key in ("upload_text", "upload_vis")

    def _phrase(self) -> str | None:
        return self.ctx_init if self.ctx_init else None

    def text_features(self, prompt: MGPPrompt, clip, task: Task) -> torch.Tensor:
        """``[G, C, D]``: every text group's normalised class features in one pass."""
        return encode_context(clip, phrase_template(clip, task, self._phrase(), self.n_ctx_text), prompt.ctx)

    def image_features(self, prompt: MGPPrompt, clip, x: torch.Tensor) -> torch.Tensor:
        """``[G, B, D]``: the batch through the image tower once per vision group (one G·B pass)."""
        g, b = prompt.vpt.shape[0], x.shape[0]
        feats = clip.encode_image(x.repeat(g, 1, 1, 1), visual_prompts=prompt.vpt.repeat_interleave(b, dim=0),
                                  prompt_position="append")
        return feats.view(g, b, -1)

    def group_logits(self, prompt, clip, x, task, prepared=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z ``[G, B, C]``, normalised image features ``[G, B, D]``, text features ``[G, C, D]``)."""
        t = prepared if prepared is not None else self.text_features(prompt, clip, task)
        f = self.image_features(prompt, clip, x)
        with fp32(f):
            f = F.normalize(f.float(), dim=-1)
            return clip.logit_scale * torch.einsum("gbd,gcd->gbc", f, t.float()), f, t.float()

    def logits(self, prompt, clip, x, task, prepared=None) -> torch.Tensor:
        return self.group_logits(prompt, clip, x, task, prepared)[0].mean(0)  # INFERENCE_MODE "average"

    def loss(self, module, x, y, task, classes=None):
        z, f, t = self.group_logits(module.prompt, module.clip, x, task)
        with fp32(z):
            ce = torch.stack([F.cross_entropy(zg, y) for zg in z]).mean()
            if self.divergent_weight == 0:
                return ce
            d = 0.5 * (pair_distance(t, self.divergent_type) + pair_distance(f, self.divergent_type))
            sign = 1.0 if self.divergent_sign == "official" else -1.0
            return ce + sign * self.divergent_weight * d

    # ----------------------------------------------------------------------------- communication
    def finish_local(self, prompt: MGPPrompt) -> None:
        """Select the S shared groups of each tower (module docstring) and expose them in draw order."""
        with torch.no_grad():
            if prompt.meta is None:  # at build: the initial global ranks
                sel_t = sel_v = torch.arange(self.topk)
            else:
                cid, rnd = prompt.meta
                if rnd == 0:
                    sel_t = sel_v = select_groups(prompt.ctx, None, self.topk, 42 + cid)
                else:
                    seed = 42 + cid + rnd
                    sel_t = select_groups(prompt.ctx, prompt.upload_text, self.topk, seed, self.temperature)
                    sel_v = select_groups(prompt.vpt, prompt.upload_vis, self.topk, seed, self.temperature)
            prompt.sel_text.copy_(sel_t)
            prompt.sel_vis.copy_(sel_v)
            prompt.upload_text.copy_(prompt.ctx[sel_t.to(prompt.ctx.device)])
            prompt.upload_vis.copy_(prompt.vpt[sel_v.to(prompt.vpt.device)])

    def server_payload(self, cid, global_state, bank, seed: int = 0) -> dict[str, torch.Tensor]:
        out = {META: torch.tensor([cid, self._round])}
        wb = self._writeback.get(cid)
        if wb is not None:
            out.update({WB_TEXT: wb["upload_text"], WB_VIS: wb["upload_vis"]})
        return out

    def receive_payload(self, prompt: MGPPrompt, extra: dict[str, torch.Tensor]) -> None:
        unknown = set(extra) - {META, WB_TEXT, WB_VIS}
        if unknown:
            raise RuntimeError(f"fedmgp was sent unknown tensors {sorted(unknown)}")
        prompt.meta = tuple(int(v) for v in extra[META]) if META in extra else None
        prompt.pending = {k: v for k, v in extra.items() if k in (WB_TEXT, WB_VIS)}

    def aggregate(self, updates, global_state):
        new = super().aggregate(updates, global_state)  # rank-wise unweighted mean (weighted=False)
        for u in updates:
            self._writeback[u.cid] = new
        self._round += 1
        return new

    def server_state_dict(self) -> dict[str, torch.Tensor]:
        out = {"round": torch.tensor(self._round)}
        for cid, wb in self._writeback.items():
            out.update({f"wb/{cid}/{k}": v.clone() for k, v in wb.items()})
        return out

    def load_server_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._round = int(state.get("round", torch.tensor(0)))
        self._writeback = {}
        for key, v in state.items():
            if key.startswith("wb/"):
                _, cid, name = key.split("/", 2)
                self._writeback.setdefault(int(cid), {})[name] = v


__all__ = ["FedMGP", "MGPPrompt", "pair_distance", "phrase_template", "select_groups"]
