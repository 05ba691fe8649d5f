"""FedOTP at its floor: the fp64 scaling-form solvers give the log-domain numbers (within 1e-6), stop where the
official rule stops, fall back to the log domain out of range, and the patch tokens of the view bank are cached
where they fit (toy backbone, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlit import features
from fedlit.features import FeatureBank, view_caching
from fedlit.methods import fedotp
from fedlit.methods.fedotp import cot_log, cot_log_domain, sinkhorn_log, sinkhorn_log_domain


def _toy_costs(toy, b: int = 6, c: int = 5) -> torch.Tensor:
    """``1 − sim`` between the toy's normalised patch tokens and random prompt-like text directions ``[B·C, M, 2]``."""
    g = torch.Generator().manual_seed(0)
    x = toy.normalize_images(torch.rand(b, 3, toy.image_size, toy.image_size, generator=g))
    with torch.no_grad():
        tok = toy.encode_image_tokens(x)[:, 1:].float()
    tok = tok / tok.norm(dim=-1, keepdim=True)
    text = torch.randn(2, c, tok.shape[-1], generator=g)
    text = text / text.norm(dim=-1, keepdim=True)
    sim = torch.einsum("bmd,ncd->bcmn", tok, text)
    return (1.0 - sim).reshape(b * c, tok.shape[1], 2)


@pytest.mark.parametrize("eps,thresh", [(0.1, 0.01), (0.1, 1e-3), (0.01, 1e-3), (0.5, 1e-6)])
def test_scaling_solvers_equal_the_log_domain_within_1e6(toy, eps, thresh):
    cost = _toy_costs(toy)
    p, m, n = cost.shape
    a = torch.full((p, m), 1.0 / m)
    for new, old, mass in ((cot_log, cot_log_domain, 0.8), (sinkhorn_log, sinkhorn_log_domain, 1.0)):
        b = torch.full((p, n), mass / n)
        t_new, t_old = new(cost, a, b, eps, 100, thresh), old(cost, a, b, eps, 100, thresh)
        assert t_new.dtype == torch.float32
        assert float((t_new - t_old).abs().max()) < 1e-6, (new.__name__, eps, thresh)


def test_scaling_solver_stops_at_the_official_iteration(toy):
    """The stopping rule (mean |Δv| over every problem of the batch) ends at the same iteration as the official
    recursion: with ``thresh`` between the changes of iterations 4 and 5, the plan is the one after iteration 5."""
    cost = _toy_costs(toy, b=2, c=3)
    p, m, n = cost.shape
    a, b = torch.full((p, m), 1.0 / m, dtype=torch.float64), torch.full((p, n), 0.4, dtype=torch.float64)
    k = torch.exp(-cost.double() / 0.1)
    u, v, changes, plans = torch.ones(p, m, dtype=torch.float64), torch.ones(p, n, dtype=torch.float64), [], []
    for _ in range(6):  # the official loop by hand (fp64)
        u = torch.minimum(a / (k @ v.unsqueeze(-1)).squeeze(-1), torch.ones((), dtype=torch.float64))
        new = b / (k.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1)
        changes.append(float((new - v).abs().mean()))
        v = new
        plans.append((u.unsqueeze(2) * k * v.unsqueeze(1)).float())
    assert changes[4] < changes[3]
    got = cot_log(cost, a.float(), b.float(), 0.1, max_iter=100, thresh=(changes[3] + changes[4]) / 2)
    assert float((got - plans[4]).abs().max()) < 3e-9  # fp64 iterations (the fp32 log domain is ~1e-8 off)
    assert float((plans[4] - plans[5]).abs().max()) > 1e-6  # one iteration more would be seen


def test_out_of_range_costs_fall_back_to_the_log_domain(monkeypatch):
    """Where ``|C|/ε`` exceeds the fp64 range the log-domain iterations run (and nothing overflows)."""
    g = torch.Generator().manual_seed(1)
    cost = 0.5 + torch.rand(4, 8, 2, generator=g)
    a, b = torch.full((4, 8), 1 / 8), torch.full((4, 2), 0.4)
    eps = float(cost.max()) / (fedotp.SCALING_MAX_EXPONENT + 1)
    got = cot_log(cost, a, b, eps, 50, 1e-3)
    assert torch.equal(got, cot_log_domain(cost, a, b, eps, 50, 1e-3))
    assert torch.isfinite(got).all()
    calls = []
    monkeypatch.setattr(fedotp, "cot_log_domain", lambda *args: calls.append(1) or torch.zeros(4, 8, 2))
    cot_log(cost, a, b, 0.1, 50, 1e-3)
    assert not calls  # in range: the scaling form, not the log domain


def test_patch_tokens_of_the_view_bank_are_cached_when_they_fit(toy, monkeypatch):
    ok, note = view_caching(toy, "tokens", rows=100, views=4, participation=1.0)
    assert ok and note is None
    per_view = toy.encode_image_tokens(torch.zeros(1, 3, toy.image_size, toy.image_size))[0].numel() * 4
    monkeypatch.setattr(features, "TOKEN_VIEW_BUDGET", 100 * 4 * per_view - 1)
    ok, note = view_caching(toy, "tokens", rows=100, views=4, participation=1.0)
    assert not ok and "view-bank budget" in note
    assert view_caching(toy, "features", 10**9, 50, 1.0) == (True, None)
    assert not view_caching(toy, "tokens", 10, 2, 0.5)[0]
    assert view_caching(toy, "tokens", 10, 0, 1.0) == (False, None)


def test_cached_token_views_equal_per_batch_encoding(toy):
    """The cached token views are the tower's tokens of the same views (within float rounding of batching),
    each encoded once however many times it is read."""
    from fedlit.data.registry import get_dataset

    data = get_dataset("shapes-dark")
    split = {"train": data.train}
    rows = np.arange(8)
    kw = dict(kind="tokens", epoch_views=2, local_epochs=1)
    cached = FeatureBank(toy, split, cache_views=True, **kw)
    direct = FeatureBank(toy, split, cache_views=False, **kw)
    views = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    a, b = cached.features("train", rows, views), direct.features("train", rows, views)
    assert a.shape == b.shape and a.shape[1] > 1
    assert torch.allclose(a, b, atol=1e-5)
    cached.features("train", rows, 1 - views)
    assert cached.encoded == 2 * len(rows)  # every view of the rows encoded once, in the first pass
