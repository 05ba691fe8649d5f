"""Visual prompt tuning (VPT-shallow) with a linear head: FedVPT and LocalVPT, the baselines of pFedPG.

The component (:class:`VisualPromptHead`, also pFedPG's client model) is ``K`` learnable prompt tokens inserted
right after the CLS token at the input of the frozen image tower (``[c, P, z]``, spec/pfedpg.md §2.1; no
positional embedding on the prompts, VPT convention) plus a linear head ``Linear(embed_dim → C)`` on the pooled
image feature, ``C`` = the classes of the training task (all base classes). There is no text classifier, so
there is no novel-class evaluation (``text_classifier = False``): on a class split the orchestrator evaluates Local
and Base; on the domain protocol (one client per domain, one class list) Local and Novel = the other domains.

- **FedVPT** (pFedPG paper's baseline, "inserts prompts to the input"): the prompts are averaged by FedAvg;
  the head stays personal. pFedPG's Table 1 gives FedVPT the communication cost 7.68×10³ = K·l = 10·768 floats,
  i.e. the prompts only (spec/pfedpg.md §4) — so ``share_head=False`` by default; ``share_head=True`` also
  averages the head.
- **LocalVPT** (the paper's "SingleSet-VPT"): nothing is shared; each client trains its prompts and head on its
  own data only, persisting across rounds.

Client optimiser (spec/pfedpg.md §2.5, stated for pFedPG and taken for its VPT baselines [inferred]): SGD,
lr 0.25, weight decay 0.001, batch 64, 5 local epochs; momentum 0.9 is VPT's own recipe (not stated) [inferred].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import FedlitError
from ..data.task import Task
from .base import FedMethod, fp32

#: state-dict key of the prompt tokens (the tensor pFedPG generates and FedVPT averages).
PROMPT_KEY = "prompt"


def vpt_init_bound(patch_size: int, width: int) -> float:
    """VPT's uniform prompt initialisation bound ``√(6 / (3·p² + l))`` (Xavier-uniform over the patch
    projection's fan-in 3·p² and the width l); ViT-B/16: √(6/1536) = 0.0625."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + width))


def patch_size_of(clip) -> int:
    size = getattr(clip, "patch_size", None)  # image-only backbones (fedlit.backbones.timm_vit) state it
    if size is not None:
        return int(size)
    conv = clip.model.visual.conv1
    return int(conv.kernel_size[0])


class VisualPromptHead(nn.Module):
    """``n_prompts`` shallow visual prompt tokens ``prompt [K, vision_width]`` + a linear head ``head``.

    Args:
        clip: the frozen backbone (only its sizes are read; it is not stored).
        n_prompts: number of prompt tokens K.
        num_classes: output size of the head.
        normalize: L2-normalise the image feature before the head.
    """

    def __init__(self, clip, n_prompts: int, num_classes: int, normalize: bool = True):
        super().__init__()
        if not clip.is_vit:
            raise FedlitError(f"backbone '{clip.name}' has no ViT image tower; visual prompts need one (e.g. ViT-B-16)")
        width = clip.vision_width
        bound = vpt_init_bound(patch_size_of(clip), width)
        self.prompt = nn.Parameter(torch.empty(n_prompts, width).uniform_(-bound, bound))
        self.head = nn.Linear(clip.embed_dim, num_classes)
        self.normalize = normalize

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def features(self, clip, images: torch.Tensor) -> torch.Tensor:
        """Pooled (projected, not normalised) image features with the prompts inserted after CLS."""
        return clip.encode_image(images, visual_prompts=self.prompt, prompt_position="after_cls")

    def forward(self, clip, images: torch.Tensor) -> torch.Tensor:
        f = self.features(clip, images)
        with fp32(f):  # the head's logits in fp32 whatever the autocast
            f = f.float()
            if self.normalize:
                f = f / f.norm(dim=-1, keepdim=True)
            return self.head(f)


class VPTMethod(FedMethod):
    """Shared behaviour of the linear-head visual-prompt methods (FedVPT, LocalVPT, pFedPG).

    Args:
        n_prompts: number of visual prompt tokens K (10, spec/pfedpg.md §2.5).
        lr: client SGD learning rate (0.25, spec §2.5).
        momentum: client SGD momentum (0.9, VPT's recipe; not stated in the paper [inferred]).
        weight_decay: client SGD weight decay (0.001, spec §2.5).
        normalize_features: L2-normalise the image feature before the linear head (default True, a deviation:
            CLIP's projected image features have norms ≈ 10–17 and the paper's lr 0.25, tuned for an ImageNet-21k
            ViT, makes the head diverge on them — measured on fedlit-toy: loss 7 → 23; ``false`` = the paper's
            literal head on the raw feature).
        weighted: FedAvg weighted by client sample count.
    """

    image_input = "images"
    default_augment = "none"  # no official federated VPT code: fedlit's earlier behaviour kept
    text_classifier = False

    def __init__(self, n_prompts: int = 10, normalize_features: bool = True, lr: float = 0.25, momentum: float = 0.9,
                 weight_decay: float = 0.001, weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        self.normalize_features = normalize_features
        if n_prompts < 1:
            raise FedlitError(f"method.n_prompts={n_prompts}: needs at least 1 prompt token")
        self.n_prompts = n_prompts
        self._num_classes: int | None = None
        self._num_clients: int | None = None

    def setup_federation(self, train_task: Task, num_clients: int) -> None:
        self._num_classes = len(train_task)
        self._num_clients = num_clients

    def build(self, clip):
        if self._num_classes is None:
            raise FedlitError(f"{type(self).__name__}: the head size is unknown; call "
                              "method.setup_federation(train_task, num_clients) before build()")
        return VisualPromptHead(clip, self.n_prompts, self._num_classes, self.normalize_features)

    def prepare(self, prompt, clip, task: Task):
        return None  # no text features: a linear head

    def logits(self, prompt: VisualPromptHead, clip, x: torch.Tensor, task: Task, prepared=None) -> torch.Tensor:
        if len(task) != prompt.num_classes:
            raise FedlitError(f"{self.name}: its linear head classifies among the {prompt.num_classes} training "
                              f"classes, not task '{task.name}' ({len(task)} classes); evaluate Local/Base only")
        return prompt(clip, x)


class FedVPT(VPTMethod):
    """FedVPT: VPT-shallow prompts averaged by FedAvg every round; the linear head is personal.

    Args:
        share_head: also average the head (default False: pFedPG's FedVPT sends K·l floats, the prompts only).
        n_prompts, normalize_features, lr, momentum, weight_decay, weighted: see :class:`VPTMethod`.
    """

    name = "fedvpt"

    def __init__(self, n_prompts: int = 10, share_head: bool = False, normalize_features: bool = True,
                 lr: float = 0.25, momentum: float = 0.9, weight_decay: float = 0.001, weighted: bool = True):
        super().__init__(n_prompts=n_prompts, normalize_features=normalize_features, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, weighted=weighted)
        self.share_head = share_head

    def is_shared(self, key: str) -> bool:
        return key == PROMPT_KEY or (self.share_head and key.startswith("head."))


class LocalVPT(VPTMethod):
    """Local-only VPT (pFedPG's "SingleSet-VPT"): prompts and head are personal, nothing goes to the server."""

    name = "localvpt"

    def is_shared(self, key: str) -> bool:
        return False
