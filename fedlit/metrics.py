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

import math
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


# ------------------------------------------------------------------------------------------ reported statistics
#: Statistics of a run's evaluation history that the papers report (``results.json`` ``statistics``):
#: ``last_round`` the last evaluation; ``best_local`` the evaluated round with the highest mean Local accuracy
#: (ties: the later round, FedPGP's ``>=``) with that round's Base / Novel / HM; ``max`` each metric's maximum over
#: the evaluated rounds; ``last5_mean`` (± ``last5_std``, population std as ``np.std``) the last 5 evaluations.
STATISTICS = ("last_round", "best_local", "max", "last5_mean")

#: What each method's paper table reports (``trainer.statistic: method``); methods not listed: ``last_round``.
#: - FedPGP Table 1 (every row ran in FedPGP's code): the per-round mean Local is tracked and ``save.pt`` written
#:   at the best-Local round (TianyuCuiOvO/FedPGP@d43045b federated_main.py:420-421), and Base / Novel are
#:   evaluated from that checkpoint (scripts/test_base.sh, test_new.sh @ba16025) → ``best_local``.
#: - pFedMMA: ``fedadapter_best.pt`` at the best mean Local, Base/Novel from it (scripts/base2new.sh) → ``best_local``.
#: - IVLP (FedMGP's baselines): the test scripts load ``best_model.pt``, the best-Local round → ``best_local``.
#: - FedTPG: ``--eval-only --load-epoch 500``, the final checkpoint (boschresearch/FedTPG Launch_FL.py) → last.
#: - pFedPG / FedVPT / LocalVPT: no released code; the paper's method, the last round.
PAPER_STATISTIC = {m: "best_local" for m in ("zeroshot", "coop", "promptfl", "fedprox", "fedmaple", "fedcocoop",
                                             "fedotp", "fedpgp", "pfedmma", "ivlp")}
STATISTIC_LABELS = {"last_round": "last round", "best_local": "best-Local round", "max": "max over rounds",
                    "last5_mean": "mean of the last 5 evaluations"}


def statistic_of(method: str, setting: str = "method") -> str:
    """The statistic a run reports as ``final``: ``setting`` unless it is ``method`` (then the paper's)."""
    return PAPER_STATISTIC.get(method, "last_round") if setting == "method" else setting


def _values(entry: dict) -> dict[str, float]:
    return {k: float(v) for k, v in entry.items() if k != "round" and isinstance(v, (int, float)) and v == v}


def _with_hm(values: dict[str, float]) -> dict[str, float]:
    out = {k: v for k, v in values.items() if k != "hm"}
    present = [out[k] for k in ("local", "base", "novel") if k in out]
    if present:
        out["hm"] = harmonic_mean(present)
    return out


def history_statistics(history: Sequence[dict], last_k: int = 5) -> dict:
    """Every statistic of :data:`STATISTICS` from a run's history (one ``{"round", metric: value}`` per
    evaluation, the means over clients). ``max`` and ``last5_mean`` hold each metric's own maximum / mean, their
    ``hm`` the harmonic mean of those Local / Base / Novel (the papers' convention for averaged rows);
    ``last5_std`` the population std of each metric (``hm``: of the per-round HMs) over ``last5_rounds``."""
    evals = [h for h in history if _values(h)]
    if not evals:
        return {}
    keys = sorted({k for h in evals for k in _values(h)})
    series = {k: [(h["round"], _values(h)[k]) for h in evals if k in _values(h)] for k in keys}
    key = "local" if "local" in series else ("hm" if "hm" in series else keys[0])
    best = max(enumerate(evals), key=lambda ih: (_values(ih[1]).get(key, float("-inf")), ih[0]))[1]
    tail = evals[-last_k:]
    mean, std = {}, {}
    for k in keys:
        vals = [_values(h)[k] for h in tail if k in _values(h)]
        if vals:
            m = sum(vals) / len(vals)
            mean[k], std[k] = m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))
    return {
        "last_round": {"round": evals[-1]["round"], **_values(evals[-1])},
        "best_local": {"round": best["round"], **_values(best)},
        "max": _with_hm({k: max(v for _, v in s) for k, s in series.items()}),
        "last5_mean": _with_hm(mean),
        "last5_std": std,
        "last5_rounds": [h["round"] for h in tail],
    }


def selected_values(statistics: dict, selection: str) -> dict[str, float]:
    """The metric values (no ``round``) of one statistic of :func:`history_statistics`."""
    return {k: v for k, v in statistics.get(selection, {}).items() if k != "round"}
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
