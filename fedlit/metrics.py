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
