"""fedlit.privacy: FedSEPT's per-sample DP test semantics (spec 3b §1.5) and the noise / calibration checks."""

from __future__ import annotations

import pytest
import torch

from fedlit import privacy


def _linear_case():
    w = torch.tensor([[0.2, -0.3], [0.4, 0.1]], requires_grad=True)
    b = torch.tensor([0.05, -0.02], requires_grad=True)
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.25, -0.75], [2.0, -1.0]])
    t = torch.tensor([[0.2, -0.1], [0.5, 0.3], [-0.2, 0.7], [1.0, -0.5]])
    return w, b, x, t


@pytest.mark.parametrize("clip", [0.7, 0.1])
def test_chunked_joint_clipping_matches_a_per_sample_loop(clip):
    """Spec 3b §1.5 test 1 (C = 0.7, the peer's; C = 0.1 clips every sample): 2 chunks of 2 rows + ordinary
    backward + overwrite == a loop over the samples with one joint norm over (W, b)."""
    w, b, x, t = _linear_case()
    ref_w, ref_b = torch.zeros_like(w), torch.zeros_like(b)
    for i in range(4):
        loss = ((x[i] @ w.t() + b - t[i]) ** 2).mean()
        gw, gb = torch.autograd.grad(loss, [w, b])
        norm = torch.sqrt(gw.pow(2).sum() + gb.pow(2).sum())
        f = min(1.0, clip / max(float(norm), 1e-12))
        ref_w += f * gw / 4
        ref_b += f * gb / 4
    losses = ((x @ w.t() + b - t) ** 2).mean(1)
    private = privacy.dp_gradients(losses, [w, b], clip, sigma=1e-12, chunk=2)
    over = privacy.GradientOverride()
    over.set([w, b], private)
    losses.mean().backward(retain_graph=True)
    torch.testing.assert_close(w.grad, ref_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.grad, ref_b, atol=1e-6, rtol=0)
    if clip > 0.5:
        return
    # every sample is clipped, and the joint norm differs from tensor-by-tensor clipping here
    g = privacy.per_sample_grads(losses, [w, b])
    _, factor = privacy.joint_clip(g, clip)
    assert (factor < 1).all()
    sep_w = sum(gw_i * min(1.0, clip / float(gw_i.norm())) for gw_i in g[0]) / 4
    assert not torch.allclose(sep_w, ref_w, atol=1e-6)


def test_prompt_prefix_keeps_private_tail_gradient():
    """Spec 3b §1.5 test 2: DP on rows 0–3 of a 6 × 2 tensor; rows 4–5 keep exactly the ordinary gradient."""
    p = (torch.arange(12.0) / 10).view(6, 2).requires_grad_()
    a = torch.tensor([[1.0, 0.5], [-0.25, 0.75], [0.4, -0.6]])
    losses = torch.stack([(p * ak).sum() ** 2 for ak in a])
    ordinary = torch.autograd.grad(losses.mean(), p, retain_graph=True)[0]
    private = privacy.dp_gradients(losses, [p], 0.5, sigma=1e-12, rows=[4])
    over = privacy.GradientOverride()
    over.set([p], private, rows=[4])
    losses.mean().backward()
    assert torch.equal(p.grad[4:], ordinary[4:])
    assert not torch.allclose(p.grad[:4], ordinary[:4])
    assert float(p.grad[:4].norm()) <= 0.5 + 1e-6  # the mean of clipped gradients


def test_noise_std_on_the_mean_is_sigma_c_over_b():
    sigma, clip, batch = 2.0, 0.5, 4
    gen = torch.Generator().manual_seed(0)
    zeros = [torch.zeros(batch, 20000)]
    out = privacy.private_mean(zeros, clip, sigma, gen)[0]
    assert abs(float(out.std()) - sigma * clip / batch) < 0.01 * sigma * clip / batch * 3


def test_calibration_reproduces_the_spec_table_and_the_accountant_spends_at_most_epsilon():
    """Spec 3b §1.4: q 0.2, T 250, ε 1, δ 1e-5 → σ 12.97 (Opacus' RDP bisection, its default orders)."""
    sigma = privacy.noise_multiplier(1.0, 1e-5, 0.2, 250)
    assert sigma == pytest.approx(12.97, abs=0.01)
    assert privacy.epsilon(sigma, 0.2, 250, 1e-5) <= 1.0 + 1e-6
    assert privacy.epsilon(sigma, 0.2, 0, 1e-5) == 0.0
