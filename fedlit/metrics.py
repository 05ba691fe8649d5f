"""Accuracy per client and per task, and the harmonic mean of the papers' summaries (the means over clients
and groups are :func:`fedlit.evaluation.mean_with_hm`).

FedPGP semantics (spec §7.4), the default ``eval_protocol: personalized``:

- **Local**: each client's (personalised) model on its *own* test images, classified among all
  classes of the training task (all base classes);
- **Base**: each client's model on the *whole* base test set;
- **Novel**: each client's model on the whole novel test set, classified among the novel classes;
- each averaged over clients (unweighted), in percent; **HM** = harmonic mean of the three.

Accuracies are top-1, micro-averaged (``correct / total``, Dassl's), computed with torchmetrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_accuracy


def accuracy(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Top-1 accuracy in percent (``nan`` for an empty set)."""
    if target.numel() == 0:
        return float("nan")
    if num_classes < 2:  # a one-class task (torchmetrics refuses it): the plain fraction correct
        return 100.0 * float((preds.cpu() == target.cpu()).float().mean())
    acc = multiclass_accuracy(preds.cpu(), target.cpu(), num_classes=num_classes, average="micro", top_k=1)
    return 100.0 * float(acc)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (e.g. HM(95.67, 85.69, 81.75) = 87.33, FedPGP's average row)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan")
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


# ---------------------------------------------------------------------------------------- OOD detection
# Scores are "higher = more in-distribution" (FOCoOp spec §2.8/§3.2); computed from a logit vector z [N, C]
# (CLIP's logit scale included). ``negatives``: logits of the same images against negative labels [N, M].

def msp_score(z: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability ``max_c softmax(z)_c`` (MCM with τ = 1/logit_scale)."""
    return torch.softmax(z.float(), dim=-1).max(dim=-1).values


def energy_score(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative energy ``T · log Σ_c exp(z_c / T)`` (higher = ID; FOCoOp stores its negative, E = −LSE)."""
    return temperature * torch.logsumexp(z.float() / temperature, dim=-1)


def neglabel_score(z: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """NegLabel (Jiang et al., ICLR 2024): ``Σ_{c ∈ ID} e^{z_c} / (Σ_{c ∈ ID} e^{z_c} + Σ_{m ∈ neg} e^{z_m})``,
    computed stably as ``exp(LSE(z) − LSE([z, negatives]))``."""
    z, negatives = z.float(), negatives.float()
    return torch.exp(torch.logsumexp(z, -1) - torch.logsumexp(torch.cat([z, negatives], -1), -1))


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve, ID positive: ``P(s_id > s_ood) + ½ P(s_id = s_ood)`` over all (ID, OOD) pairs
    (the Mann–Whitney rank formula, ties counted ½), in percent; ``nan`` when either set is empty."""
    a, b = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return float("nan")
    values, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # 0-based rank of each distinct value's first copy
    ranks = (first + (counts - 1) / 2.0 + 1.0)[inverse]  # average 1-based ranks of ties
    u = ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0
    return 100.0 * float(u / (a.size * b.size))


def fpr_at_95_tpr(id_scores, ood_scores, convention: str = "id_positive", tpr: float = 0.95) -> float:
    """FPR at 95 % TPR, in percent, without interpolation; ``nan`` when either set is empty.

    - ``id_positive`` (OpenOOD / MCM, the default): τ = the largest threshold with at least ``tpr`` of the ID
      scores ``>= τ``; the value is the fraction of OOD scores ``>= τ`` (an OOD score equal to τ is accepted as ID).
      ID {0.9, 0.8, 0.7, 0.6}, OOD {0.65, 0.5}: τ = 0.6, FPR95 = 50.
    - ``ood_positive`` (Outlier Exposure; FOCoOp's msp/neglabel branch): the same with the roles swapped and the
      scores negated: τ = the smallest threshold with at least ``tpr`` of the OOD scores ``<= τ``; the value is the
      fraction of ID scores ``<= τ`` (ID rejected). Same example: τ = 0.65, value = 25.
    """
    if convention == "ood_positive":
        return fpr_at_95_tpr(-np.asarray(ood_scores, dtype=np.float64), -np.asarray(id_scores, dtype=np.float64),
                             "id_positive", tpr)
    if convention != "id_positive":
        raise ValueError(f"unknown FPR95 convention {convention!r}")
    pos, neg = np.sort(np.asarray(id_scores, dtype=np.float64))[::-1], np.asarray(ood_scores, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    k = int(np.ceil(tpr * pos.size - 1e-9))  # positives that must be accepted
    tau = pos[max(k, 1) - 1]
    return 100.0 * float((neg >= tau).mean())
