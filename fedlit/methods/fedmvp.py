"""FedMVP (Singha et al., ICCV 2025): a PromptFormer turns image patches × class-attribute text into visual prompts
(spec methods-3-a.md §3, from mainaksingha01/FedMVP@246800efae53).

**default = paper**: the released model file does not run (it imports a module no commit contains and uses an image
encoder it never builds, §3.9), so the method is built from its description and the parts of the code that are
consistent with it; the official loop's quirks that could matter are named below.

Per class c there are J attribute phrases a_{c,j} (FedMVP's ``attributes/<dataset>.json``: class name → phrases,
read from the user folder ``attributes_dir``, never shipped). Sentences (§3.4.1): ``"{prefix} {c}, {suffix}{conn}
{a}"`` with conn = "which is" (a starts with "a" or "used"), "which" (has/often/typically/may/can), else "which has",
cut to ``truncate_chars`` (77) characters. e_{c,j} = norm(TextEnc(sentence)) (frozen, cached per class list); the
PromptFormer's keys are the same features of all C·J sentences of the task. With no ``attributes_dir`` and the
embedded shapes classes ("{colour} {shape}"), 10 phrases per class are generated from the shapes world's structure
(five about the colour, five about the shape), so the method runs offline.

PromptFormer (§3.2): keys K = Linear(D → W_v)(e); A = MHA_4heads(Q = LN_q(X), K = LN_k(K), V = K) over the patch
tokens X (after the positional embedding, before ``ln_pre``); A' = A + FF(A), FF = LN → Linear(W_v, 8W_v) → GEGLU →
Linear(4W_v, W_v) (no residual to the patches); the 4 prompts are the means of A' over 4 consecutive patch blocks
(``AdaptiveAvgPool1d(4)``), appended after [CLS, patches] before ``ln_pre``. Classifier: z_c = 100 · f̃ · mean_j e_{c,j}
(no learnable text). Loss: CE(z, y) + α · (1 − mean_b cos(f̃_b, f_zs,b)), α = 10, f_zs = the frozen unprompted
image feature of the horizontally flipped batch (``flip: batch_coin``, official: one coin for the whole batch;
``per_image``; ``none``). Everything is shared, unweighted mean; the FedTPG loop: per-client persistent SGD
(lr 0.003, m 0.9, wd 1e-5) with a cosine lr over the client's participations (``schedule_rounds`` = rounds),
global evaluation protocol, no augmentation.

Not reproduced: the official "one SGD step per client per round on the last batch" and the per-client permanent
LoRA switch (loss < 0.5) whose averaged matrices are never used at test (§3.6, §3.9 1–2); fp16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import FrozenCLIP
from ..data.shapes import COLOURS, SHAPES
from ..errors import FedlitError
from ..prompts import Task, clean_classname
from .base import FedMethod, fp32

#: five phrases about each embedded shape (procedural attributes of the shapes world)
_SHAPE_WORDS = {
    "circle": ("round outline", "no corners", "a smooth curved edge", "a filled disc", "equal width in every direction"),
    "square": ("four equal sides", "four right angles", "straight edges", "a filled block", "four corners"),
    "triangle": ("three sides", "three corners", "a pointed top", "straight edges", "a wide base"),
    "cross": ("two crossing bars", "four arms", "a plus sign outline", "right angles", "a centre where bars meet"),
    "ring": ("a hollow centre", "a round outline", "a thin circular band", "no corners", "a hole in the middle"),
    "diamond": ("four sides", "pointed top and bottom", "a rotated square", "two sharp corners", "straight edges"),
}
_COLOUR_TEMPLATES = ("{} colour", "a {} surface", "{} paint", "mostly {} pixels", "a bright {} tone")


def shapes_attributes(classnames) -> dict[str, list[str]] | None:
    """10 phrases per "{colour} {shape}" class of the embedded world, or None if a class is not of that form."""
    out = {}
    for name in classnames:
        parts = clean_classname(name).split()
        if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
            return None
        out[name] = [t.format(parts[0]) for t in _COLOUR_TEMPLATES] + list(_SHAPE_WORDS[parts[1]])
    return out


def load_attributes(folder: str) -> dict[str, list[str]]:
    """Every ``*.json`` of ``folder`` (class name → list of phrases), merged; keys matched case-insensitively."""
    root = Path(folder)
    files = sorted(root.glob("*.json")) if root.is_dir() else []
    if not files:
        raise FedlitError(f"fedmvp: no attribute files in method.init_args.attributes_dir={folder}; it must hold "
                          "<dataset>.json files mapping each class name to a list of phrases (FedMVP's attributes/)")
    out: dict[str, list[str]] = {}
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise FedlitError(f"fedmvp: {f} is not a JSON object of class name → list of phrases ({e})") from None
        if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(a, str) for a in v)
                                                 for v in data.values()):
            raise FedlitError(f"fedmvp: {f} must be a JSON object mapping class names to lists of phrases")
        out.update({k.lower().replace("_", " "): v for k, v in data.items()})
    return out


def connector(attr: str) -> str:
    """The official connector between the class name and an attribute phrase (§3.4.1)."""
    a = attr.lower()
    if a.startswith("a") or a.startswith("used"):
        return "which is"
    if a.split(" ", 1)[0] in ("has", "often", "typically", "may", "can"):
        return "which"
    return "which has"


def sentence(prefix: str, classname: str, suffix: str, attr: str, truncate: int = 77) -> str:
    text = f"{prefix} {clean_classname(classname)}, {suffix}{connector(attr)} {attr}"
    return text[:truncate] if truncate > 0 else text


def band_pool(tokens: torch.Tensor, n: int = 4) -> torch.Tensor:
    """``[B, M, W]`` → ``[B, n, W]``: the means over ``n`` consecutive blocks of the token index."""
    return F.adaptive_avg_pool1d(tokens.transpose(1, 2), n).transpose(1, 2)


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.gelu(gate)


class PromptFormer(nn.Module):
    """Keys projection + cross-attention of the patches over the description keys + GEGLU feed-forward."""

    def __init__(self, dim: int, width: int, heads: int = 4, n_prompts: int = 4):
        super().__init__()
        self.n_prompts = n_prompts
        self.linear = nn.Linear(dim, width)
        self.norm_q, self.norm_k = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 8 * width), GEGLU(), nn.Linear(4 * width, width))

    def forward(self, patches: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``patches [B, M, W]``, ``keys [K, D]`` → prompts ``[B, n_prompts, W]``."""
        kv = self.linear(keys.to(self.linear.weight.dtype)).unsqueeze(0).expand(patches.shape[0], -1, -1)
        a = self.attn(self.norm_q(patches.to(kv.dtype)), self.norm_k(kv), kv, need_weights=False)[0]
        return band_pool(self.ff(a) + a, self.n_prompts)


class FedMVP(FedMethod):
    """FedMVP: PromptFormer visual prompts from image patches and class-attribute descriptions.

    Args:
        attributes_dir: folder of ``<dataset>.json`` attribute files (class name → phrases); None: the embedded
            shapes classes get procedural attributes (any other dataset then needs the folder).
        prefix, suffix: sentence template parts ("a photo of a", ""; e.g. suffix "a type of flower, ").
        truncate_chars: cut sentences to this many characters (77, official; 0 = no cut).
        heads: attention heads (4). n_prompts: visual prompt tokens (4, hard-coded officially).
        alpha: consistency weight α (10). flip: ``batch_coin`` (official) / ``per_image`` / ``none``.
        lr, momentum, weight_decay: SGD (0.003, 0.9, 1e-5). schedule_rounds: cosine period (= rounds, 100).
        persistent_optimizer: per-client momentum across rounds (the FedTPG loop, True).
    """

    name = "fedmvp"
    image_input = "images"
    eval_protocol = "global"
    default_augment = "none"

    def __init__(self, attributes_dir: str | None = None, prefix: str = "a photo of a", suffix: str = "",
                 truncate_chars: int = 77, heads: int = 4, n_prompts: int = 4, alpha: float = 10.0,
                 flip: Literal["batch_coin", "per_image", "none"] = "batch_coin", lr: float = 0.003,
                 momentum: float = 0.9, weight_decay: float = 1e-5, schedule_rounds: int = 100,
                 lr_schedule: str = "cosine", persistent_optimizer: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=False)
        if flip not in ("batch_coin", "per_image", "none"):
            raise FedlitError(f"method.init_args.flip={flip!r}: use batch_coin, per_image or none")
        if n_prompts < 1 or heads < 1:
            raise FedlitError("method.init_args: n_prompts and heads must be >= 1")
        self.set_client_schedule(lr_schedule, schedule_rounds, persistent_optimizer)
        self.attributes_dir, self.prefix, self.suffix, self.truncate_chars = (attributes_dir, prefix, suffix,
                                                                              truncate_chars)
        self.heads, self.n_prompts, self.alpha, self.flip = heads, n_prompts, alpha, flip
        self._attributes = load_attributes(attributes_dir) if attributes_dir is not None else None
        self._features: dict[tuple, torch.Tensor] = {}

    def setup_federation(self, train_task: Task, num_clients: int) -> None:
        self.phrases(train_task)  # fails here, before a run directory exists, if a class has no attributes

    def build(self, clip: FrozenCLIP):
        if not clip.is_vit:
            raise FedlitError(f"fedmvp prompts a ViT image tower; backbone '{clip.name}' has none (use e.g. ViT-B-16)")
        if clip.vision_width % self.heads:
            raise FedlitError(f"method.init_args.heads={self.heads} does not divide the vision width {clip.vision_width}")
        return PromptFormer(clip.embed_dim, clip.vision_width, self.heads, self.n_prompts)

    def is_shared(self, key: str) -> bool:
        return True

    # ----------------------------------------------------------------------------- descriptions
    def encodes_any_label(self, classnames) -> bool:
        """Only classes with attribute phrases (the user's files, or the embedded shapes classes)."""
        if self._attributes is None:
            return shapes_attributes(classnames) is not None
        return all(clean_classname(c).lower() in self._attributes for c in classnames)

    def phrases(self, task: Task) -> list[list[str]]:
        """The attribute phrases of every class of ``task`` (checked: every class present, the same count)."""
        if self._attributes is None:
            attrs = shapes_attributes(task.classnames)
            if attrs is None:
                raise FedlitError("fedmvp needs class attributes for these classes: set method.init_args."
                                  "attributes_dir to a folder of <dataset>.json files (class name → list of phrases)")
            return [attrs[c] for c in task.classnames]
        out = []
        for c in task.classnames:
            key = clean_classname(c).lower()
            if key not in self._attributes:
                raise FedlitError(f"fedmvp: class '{c}' has no entry in the attribute files of "
                                  f"{self.attributes_dir} (keys: class names, values: lists of phrases)")
            out.append(self._attributes[key])
        if len({len(p) for p in out}) > 1:
            raise FedlitError(f"fedmvp: the classes of {self.attributes_dir} have different numbers of phrases; "
                              "every class needs the same number")
        return out

    def description_features(self, clip: FrozenCLIP, task: Task) -> torch.Tensor:
        """``[C, J, D]`` normalised features of every (class, attribute) sentence (frozen, cached per class list)."""
        key = (id(clip), task.key)
        if key not in self._features:
            phrases = self.phrases(task)
            texts = [sentence(self.prefix, c, self.suffix, a, self.truncate_chars)
                     for c, ps in zip(task.classnames, phrases) for a in ps]
            with torch.no_grad():
                feats = torch.cat([clip.encode_tokens(clip.tokenize(texts[i:i + 512])).float()
                                   for i in range(0, len(texts), 512)])
            self._features[key] = F.normalize(feats, dim=-1).view(len(task), -1, feats.shape[-1])
        return self._features[key]

    # ----------------------------------------------------------------------------- classification
    def prepare(self, prompt, clip, task):
        e = self.description_features(clip, task)
        return e.mean(1), e.flatten(0, 1)  # classifier [C, D], keys [C·J, D]

    def text_features(self, prompt, clip, task):
        return self.prepare(prompt, clip, task)[0]

    def image_features(self, prompt: PromptFormer, clip, x, keys=None) -> torch.Tensor:
        return clip.encode_image(x, visual_prompts=lambda patches: prompt(patches, keys), prompt_position="append")

    def logits(self, prompt, clip, x, task, prepared=None):
        t, keys = prepared if prepared is not None else self.prepare(prompt, clip, task)
        f = self.image_features(prompt, clip, x, keys)
        with fp32(f):
            return clip.logit_scale * F.normalize(f.float(), dim=-1) @ t.float().t()

    def _flipped(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip == "none":
            return x
        if self.flip == "batch_coin":
            return x.flip(-1) if bool(torch.rand(()) < 0.5) else x
        coins = torch.rand(x.shape[0], device=x.device) < 0.5
        return torch.where(coins.view(-1, 1, 1, 1), x.flip(-1), x)

    def loss(self, module, x, y, task, classes=None):
        prompt, clip = module.prompt, module.clip
        t, keys = self.prepare(prompt, clip, task)
        f = self.image_features(prompt, clip, x, keys)
        with torch.no_grad():
            f_zs = clip.encode_image(self._flipped(x))
        with fp32(f):
            f = F.normalize(f.float(), dim=-1)
            ce = F.cross_entropy(clip.logit_scale * f @ t.float().t(), y)
            consistency = 1 - F.cosine_similarity(f, F.normalize(f_zs.float(), dim=-1), dim=-1).mean()
            return ce + self.alpha * consistency


__all__ = ["FedMVP", "PromptFormer", "band_pool", "connector", "load_attributes", "sentence", "shapes_attributes"]
