"""The privacy mechanism as one small unit any method can use: per-sample gradients → joint clipping → Gaussian
noise → the accountant (issue 21 item 11, issue 24 item 3).

- :func:`per_sample_gradients`: every sample's gradient of its own loss, ``[B, ...]`` per tensor, from ONE forward
  of the text side and one batched backward. For a method whose prompt reaches the loss only through the class
  text features ``T = method.prepare(prompt, clip, task)`` (``[C, D]``, independent of the sample) and whose loss is
  the cross-entropy of ``method.logits(..., prepared=T)`` (DP-FPL: ``per_sample_text_side = True``), the gradient
  of sample i is ``J_Tᵀ δ_i`` with ``δ_i = ∂loss_i/∂T``: the ``δ_i`` come from ``torch.func.vmap`` over the cheap
  logits side and the B vector–Jacobian products through the text tower run as one batched backward
  (``torch.autograd.grad(..., is_grads_batched=True)``). Equal to B one-sample forward + backward passes up to float
  rounding (tested at 1e-6), without B text-tower forwards.
- :func:`clip_per_sample`: DP-SGD's clipping on the JOINT per-sample norm of every tensor that is released with
  noise calibrated to the same sensitivity (``√(Σ_k ‖g_k,i‖²) ≤ C``), so one sample moves the released mean by at
  most C/B and the accountant's ε for the noise multiplier holds; clipping each tensor to C separately lets one
  sample reach ``√K·C`` over K tensors.
- :func:`clip_norm`: the batch rule of ``torch.nn.utils.clip_grad_norm_`` (DP-FPL's official batch clipping).
- :func:`rdp_epsilon`: ε spent, from Opacus' RDP accountant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensors = dict[str, torch.Tensor]


def clip_norm(g: torch.Tensor, c: float) -> torch.Tensor:
    """``g`` scaled to ℓ₂ ≤ ``c`` (``clip_grad_norm_``'s factor ``c / (‖g‖ + 1e-6)`` when below 1)."""
    coef = c / (float(g.norm()) + 1e-6)
    return g * coef if coef < 1 else g


def joint_norms(grads: Tensors, keys) -> torch.Tensor:
    """Per-sample ℓ₂ norm ``[B]`` of the concatenation of ``grads[k]`` (each ``[B, ...]``) over ``keys``."""
    return torch.sqrt(sum(grads[k].flatten(1).double().pow(2).sum(1) for k in keys)).to(grads[keys[0]].dtype)


def clip_per_sample(grads: Tensors, keys, c: float) -> Tensors:
    """Every sample's gradient over ``keys`` jointly scaled by ``min(1, c / (‖g_i‖ + 1e-6))`` (``‖g_i‖`` the joint
    norm, :func:`joint_norms`); tensors outside ``keys`` are returned unchanged. Still ``[B, ...]``."""
    keys = list(dict.fromkeys(k for k in keys if k in grads))
    if not keys:
        return dict(grads)
    coef = (c / (joint_norms(grads, keys) + 1e-6)).clamp(max=1.0)
    return {k: (g * coef.view(-1, *[1] * (g.dim() - 1)).to(g) if k in keys else g) for k, g in grads.items()}


def gaussian(like: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """N(0, std²) noise of ``like``'s shape from the CPU stream ``gen`` (device/dtype of ``like``)."""
    return (torch.randn(like.shape, generator=gen) * std).to(like)


def per_sample_gradients(module, x: torch.Tensor, y: torch.Tensor, task) -> tuple[Tensors, torch.Tensor]:
    """Per-sample gradients ``{name: [B, ...]}`` of the prompt's trainable tensors and the per-sample losses ``[B]``
    for a text-side method (module docstring): one text forward, vmapped logits side, one batched backward."""
    from torch.func import grad_and_value, vmap

    method, prompt, clip = module.method, module.prompt, module.clip
    names, params = zip(*[(k, p) for k, p in prompt.named_parameters() if p.requires_grad])
    text = method.prepare(prompt, clip, task)  # [C, D], the only path from the prompt to the loss

    def one(t, xi, yi):
        logits = method.logits(prompt, clip, xi.unsqueeze(0), task, prepared=t)
        return F.cross_entropy(logits.float(), yi.unsqueeze(0))

    delta, losses = vmap(grad_and_value(one), in_dims=(None, 0, 0))(text.detach(), x, y)
    grads = torch.autograd.grad(text, params, grad_outputs=delta.to(text.dtype), is_grads_batched=True,
                                allow_unused=True)
    return {k: g.detach() for k, g in zip(names, grads) if g is not None}, losses.detach()


def rdp_orders() -> list[float]:
    """Opacus' default RDP orders plus larger ones (DP-FPL's large σ has its optimal order above 63)."""
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS) + [80, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096]


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε spent by ``steps`` sampled-Gaussian steps, from Opacus' RDP accountant (orders :func:`rdp_orders`)."""
    import warnings

    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = rdp_orders()
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only looser
        warnings.simplefilter("ignore", UserWarning)
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


__all__ = ["clip_norm", "clip_per_sample", "gaussian", "joint_norms", "per_sample_gradients", "rdp_epsilon",
           "rdp_orders"]
