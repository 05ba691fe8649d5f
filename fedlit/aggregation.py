"""Aggregation rules: pure functions on state dicts (no model, no device, no global state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``Σ_i w_i · state_i / Σ_i w_i`` key by key, accumulated in float64 and returned in each key's dtype.

    Raises ValueError for no states, mismatched keys or shapes, or non-positive total weight.
    """
    if not states:
        raise ValueError("nothing to aggregate")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights sum to {total}")
    keys = list(states[0].keys())
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        acc = None
        for s, w in zip(states, weights):
            if k not in s:
                raise ValueError(f"state is missing key '{k}'")
            t = s[k].detach().to("cpu", torch.float64) * (float(w) / total)
            acc = t if acc is None else acc + t
        out[k] = acc.to(states[0][k].dtype)
    return out


def fedavg(states: Sequence[State], num_samples: Sequence[int]) -> dict[str, torch.Tensor]:
    """FedAvg (McMahan et al. 2017): the mean weighted by each client's number of training samples."""
    return weighted_mean(states, [float(n) for n in num_samples])


def uniform_mean(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """Unweighted mean (FedTPG, official PromptFL): every participating client counts once."""
    return weighted_mean(states, [1.0] * len(states))
