"""FedLAPT (LAPT — label-driven automated prompt tuning, Zhang et al. — run federated as a baseline of FOCoOp's
tables; spec methods-3-b.md §2.9, §2.5, §2.10 Q-F9; from PengyangZhou/FOCoOp@f30f6f306377, Apache-2.0:
``src/algorithms/FedLAPT/{client_fedlapt,mixup,loss,server_fedlapt}.py``, ``src/models/clip_fedlapt.py``,
``config.py:39-53``, ``src/utils/main_utils.py:110-128, 263-287``).

**Default = code**: FedLAPT's numbers in FOCoOp's tables come from this code (no paper of its own is reproduced), so
its behaviour is the default wherever it runs, each departure a named option:

- ``step_per: epoch_last_batch`` (default, code; Q-F9): the loss, backward, optimiser and scheduler steps of
  ``client_fedlapt.py:263-323`` are indented outside the batch loop, so each local epoch runs the forward of every
  batch but takes **one** step, on the epoch's last batch. fedlit feeds only that batch (the other forwards change
  nothing). ``batch``: a step after every batch (what LAPT means).
- ``schedule: cosine_steps`` (default, code): the per-client ``LambdaLR(cosine_annealing(step, E·len(loader), 1,
  1e-8))``, created once per client and stepped with the optimiser, so its step count runs on across rounds (with
  the quirk E steps a round) — :meth:`~fedlit.methods.roles.ClientPolicy.lr_at_step`; ``constant``: lr fixed.
- ``templates: official`` (default, code): the 7 TIP templates of ``src/prompt/prompt_tip.txt`` as the code reads
  them — ``line.strip("'\\"")`` leaves each line's trailing ``',`` in the text ("a bad photo of the {}.',");
  ``clean``: without it.

Component (``prompttype: unified``, the default; ``csc`` False): one CoOp context ``ctx [n, W]`` (n = 16,
N(0, 0.02²)) spliced into both the C class prompts and the K_o = 100 OOD prompts ``[SOS, ctx, word_k, ".", EOT]``
(``ctx_ood`` is the same tensor); ``prompt_type: dis_aware`` gives the OOD prompts their own ``ctx_ood``. Both are
shared (uploaded and averaged). OOD words: FOCoOp's NegLabel words (:func:`fedlit.methods.neglabel.mine_ood_words`).
Frozen hand-crafted features ``h [C, T, D]``: every class under each of the T templates, normalised per template.

Local loss (``mix_strategy: wccm``, ``loss_components: multice``; ``mixup.py:52-60``, ``client_fedlapt.py:146-156,
279-281``), per step, with λ ~ Beta(α, α) (α = ``alpha_mixup`` 0.1; α ≤ 0: λ = 1) folded to λ ← min(λ, 1 − λ)::

    f̃_b = norm(λ·norm(f_b) + (1 − λ)·h[y_b, r_b])         r_b ~ U{0 … T−1}   (cross-modal, within-class mixing)
    z_b = s · f̃_b · [t_1 … t_C, o_1 … o_K]ᵀ               t, o: normalised prompted text features, s = 100
    L   = w · mean_b Σ_k −q_bk · log softmax(z_b)_k          q_b = [onehot(y_b), 0_K]  (soft CE), w = 0.5

(λ ≤ ½, so the mixed feature leans to the class's text feature; with ``mix_strategy: none`` f̃ = norm(f), no
mixing.) Evaluation: the prompted classifier on the plain image features; ``logits`` = the C ID logits (accuracy),
``full_logits`` = all C + K_o (the MSP / energy scores of §2.8 over the whole vector).

Client loop (§2.5, §2.9): SGD lr 0.001, momentum 0.9, wd 5e-4, each client's optimiser (and scheduler) created once
and kept across rounds (``optimizer_state: per_client``); DataLoader batch 32, shuffled, no drop_last; no
augmentation. Server: FedAvg weighted by each client's number of training batches ``len(loader)`` (``weights:
batches``; ``samples``: by images). Draws (λ, r) come from the method's own counter-seeded stream (clients train one
at a time: no lock-step). Not reproduced: fp16 CLIP, per-client CLIP copies, the adjective / noun split of the
WordNet words, the evaluation's argmax over all C + K_o logits (an ID image whose top logit is an OOD prompt counts
wrong there; fedlit's accuracy classifies among the task's classes), the unused branches (mixup, Gaussian queue,
binary / entropy losses).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FedlitError
from ..prompts import Task, encode_context, handcrafted_features, init_context, prompt_template
from .base import FedMethod, fp32
from .neglabel import OODPrompts
from .roles import ClientPolicy, batch_weighted, training_batches

#: ``src/prompt/prompt_tip.txt`` (TIP-Adapter's 7 ImageNet templates), each line as the code reads it
TIP_TEMPLATES_OFFICIAL = tuple(t + ".'," for t in (
    "a bad photo of the {}", "a {} in a video game", "a origami {}", "a photo of the small {}", "art of the {}",
    "a photo of the large {}", "itap of a {}"))
TIP_TEMPLATES_CLEAN = tuple(t[:-2] for t in TIP_TEMPLATES_OFFICIAL)

#: the official FedLAPT client: per-client persistent SGD and LambdaLR, no drop_last, no augmentation, one step per
#: local epoch
FEDLAPT_CLIENT = ClientPolicy(optimizer_state="per_client", drop_last="never", augment="none",
                              lr_schedule="cosine_steps", step_per="epoch_last_batch")


# ------------------------------------------------------------------------------------------------ pure parts
def fold_lambda(lam: float) -> float:
    """``mixup_data``'s λ: values above ½ are mirrored, so λ ∈ [0, ½]."""
    return 1.0 - lam if lam > 0.5 else lam


def draw_lambda(rng: np.random.Generator, alpha: float) -> float:
    """λ ~ Beta(α, α) folded to [0, ½] (α ≤ 0: λ = 1 → folded to 0, as the code does)."""
    return fold_lambda(float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0)


def wccm_mix(f: torch.Tensor, h: torch.Tensor, y: torch.Tensor, r: torch.Tensor, lam: float) -> torch.Tensor:
    """Within-class cross-modal mixing: ``norm(λ·f + (1 − λ)·h[y, r])`` for normalised image features ``f [B, D]``,
    frozen class text features ``h [C, T, D]``, labels ``y [B]`` and template picks ``r [B]``."""
    return F.normalize(lam * f + (1.0 - lam) * h[y, r], dim=-1)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_b Σ_k −q_bk · log softmax(z_b)_k`` (``loss.py``'s SoftCrossEntropyFunction, reduction mean)."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and soft targets {tuple(target.shape)} differ in shape")
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def padded_onehot(y: torch.Tensor, classes: int, extra: int) -> torch.Tensor:
    """``[onehot(y) over classes, 0 × extra]``: the multice target (the OOD classes get no mass)."""
    return torch.cat([F.one_hot(y, classes).float(), y.new_zeros((y.shape[0], extra), dtype=torch.float)], dim=1)


# ------------------------------------------------------------------------------------------------ the method
class LAPTPrompt(nn.Module):
    def __init__(self, clip, n_ctx: int, separate_ood: bool):
        super().__init__()
        self.ctx = nn.Parameter(init_context(clip, n_ctx, None))
        if separate_ood:
            self.ctx_ood = nn.Parameter(init_context(clip, n_ctx, None))

    def ood_context(self) -> torch.Tensor:
        return self.ctx_ood if hasattr(self, "ctx_ood") else self.ctx


class FedLAPT(OODPrompts, FedMethod):
    """FedLAPT: CoOp context + NegLabel OOD prompts, cross-modal mixing, soft CE over C + K_o classes.

    Args:
        n_ctx: context tokens (16). num_ood_prompts: K_o (100).
        prompt_type: ``unified`` (official default: one context for ID and OOD prompts) or ``dis_aware`` (its own
            OOD context); both shared.
        mix_strategy: ``wccm`` (official: within-class cross-modal mixing) or ``none`` (plain image features).
        alpha_mixup: α of λ ~ Beta(α, α) (0.1). loss_weight: multice weight (0.5, ``--loss_weights`` 0.5-0.5).
        templates: ``official`` (TIP templates with the code's trailing ``',``) or ``clean``.
        step_per: ``epoch_last_batch`` (official quirk: one step per epoch) or ``batch``.
        schedule: ``cosine_steps`` (official per-step LambdaLR over E·len(loader)) or ``constant``.
        weights: ``batches`` (official: number of training batches) or ``samples``.
        ood_words_file, ood_candidates: the NegLabel candidates (as FOCoOp).
        lr, momentum, weight_decay: SGD (0.001, 0.9, 5e-4).
    """

    name = "fedlapt"
    policy = FEDLAPT_CLIENT

    def __init__(self, n_ctx: int = 16, num_ood_prompts: int = 100,
                 prompt_type: Literal["unified", "dis_aware"] = "unified",
                 mix_strategy: Literal["wccm", "none"] = "wccm", alpha_mixup: float = 0.1, loss_weight: float = 0.5,
                 templates: Literal["official", "clean"] = "official",
                 step_per: Literal["epoch_last_batch", "batch"] = "epoch_last_batch",
                 schedule: Literal["cosine_steps", "constant"] = "cosine_steps",
                 weights: Literal["batches", "samples"] = "batches", ood_words_file: str | None = None,
                 ood_candidates: int = 2000, lr: float = 0.001, momentum: float = 0.9, weight_decay: float = 5e-4):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=True)
        if n_ctx < 1 or num_ood_prompts < 1 or loss_weight <= 0:
            raise FedlitError("method.init_args: need n_ctx >= 1, num_ood_prompts >= 1 and loss_weight > 0")
        for key, val, ok in (("prompt_type", prompt_type, ("unified", "dis_aware")),
                             ("mix_strategy", mix_strategy, ("wccm", "none")),
                             ("templates", templates, ("official", "clean")),
                             ("step_per", step_per, ("epoch_last_batch", "batch")),
                             ("schedule", schedule, ("cosine_steps", "constant")),
                             ("weights", weights, ("batches", "samples"))):
            if val not in ok:
                raise FedlitError(f"method.init_args.{key}={val!r}: use one of {', '.join(ok)}")
        self.word_source(num_ood_prompts, ood_words_file, ood_candidates)
        self.n_ctx, self.prompt_type = n_ctx, prompt_type
        self.mix_strategy, self.alpha_mixup, self.loss_weight, self.templates = mix_strategy, alpha_mixup, loss_weight, templates
        self.step_per, self.schedule, self.weights = step_per, schedule, weights
        self.policy = self.policy.replace(step_per=step_per, lr_schedule=schedule)
        self._batches: tuple[int, ...] = ()
        self._draws = 0

    @property
    def lockstep(self) -> bool:
        return False  # λ and the template picks come from one counter-seeded stream, in training order

    def plan_rounds(self, trainer, num_samples) -> None:
        self._batches = training_batches(trainer, self, num_samples)  # len(train_loader)

    def build(self, clip):
        self.mine_words(clip)
        return LAPTPrompt(clip, self.n_ctx, self.prompt_type == "dis_aware")

    def is_shared(self, key: str) -> bool:
        return True  # ctx (and ctx_ood): both context tensors are uploaded

    # ----------------------------------------------------------------------------- classification
    def prepare(self, prompt: LAPTPrompt, clip, task: Task):
        t = encode_context(clip, prompt_template(clip, task, self.n_ctx), prompt.ctx)
        o = encode_context(clip, prompt_template(clip, Task("fedlapt-ood", self.ood_words), self.n_ctx),
                           prompt.ood_context())
        return t.float(), o.float()

    def text_features(self, prompt, clip, task):
        return self.prepare(prompt, clip, task)[0]

    def class_text_bank(self, clip, task: Task) -> torch.Tensor:
        """Frozen hand-crafted features ``[C, T, D]`` of ``task``'s classes, normalised per template."""
        tpls = TIP_TEMPLATES_OFFICIAL if self.templates == "official" else TIP_TEMPLATES_CLEAN
        return torch.stack([handcrafted_features(clip, task, t) for t in tpls], dim=1)

    def loss(self, module, x, y, task, classes=None):
        prompt, clip = module.prompt, module.clip
        t, o = self.prepare(prompt, clip, task)
        f = self.image_features(prompt, clip, x)
        with fp32(f):
            f = F.normalize(f.float(), dim=-1)
            if self.mix_strategy == "wccm":
                rng = np.random.default_rng([0x1A97, self._draws])
                self._draws += 1
                h = self.class_text_bank(clip, task).to(f.device)
                lam = draw_lambda(rng, self.alpha_mixup)
                r = torch.as_tensor(rng.integers(0, h.shape[1], size=len(y)), device=f.device)
                f = wccm_mix(f, h, y, r, lam)
            z = clip.logit_scale * f @ torch.cat([t, o]).t()
            return self.loss_weight * soft_cross_entropy(z, padded_onehot(y, t.shape[0], o.shape[0]))

    # ----------------------------------------------------------------------------- server
    @property
    def server(self):
        return batch_weighted(self._batches, self.weights)

    def server_state_dict(self):
        return {"draws": torch.tensor(self._draws)}

    def load_server_state_dict(self, state):
        self._draws = int(state.get("draws", torch.tensor(0)))


__all__ = ["FEDLAPT_CLIENT", "FedLAPT", "LAPTPrompt", "TIP_TEMPLATES_CLEAN", "TIP_TEMPLATES_OFFICIAL", "draw_lambda",
           "fold_lambda", "padded_onehot", "soft_cross_entropy", "wccm_mix"]
