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
- :func:`per_sample_grads`, :func:`joint_clip`, :func:`private_mean`, :func:`dp_gradients`, :class:`GradientOverride`:
  the same mechanism on a per-sample loss vector of any forward (FedSEPT, spec 3b §1.4):
  One step, from the per-sample loss vector ``ℓ`` ``[B]`` of a forward pass (graph kept):

  1. :func:`per_sample_grads` — ``g_b = ∇ ℓ_b`` for every target tensor, by batched vector–Jacobian products
     (one-hot cotangent rows, ``chunk`` rows per backward call; a plain loop over the samples where an operator has
     no batched backward).
  2. :func:`joint_clip` — one factor per sample, ``c_b = min(1, C / max(‖g_b‖, 1e-12))``, the norm taken over **all**
     target tensors together (FedSEPT's joint clipping; tensor-by-tensor clipping equals it for one tensor).
  3. :func:`private_mean` — ``ĝ = (Σ_b c_b g_b + ξ) / B``, ``ξ ~ N(0, σ² C² I)`` drawn from a ``torch.Generator``.
  4. :class:`GradientOverride` — the ordinary backward of the mean loss fills every trainable tensor's gradient;
     ĝ then **replaces** the gradient of the targets (of their protected rows only: a partially protected tensor
     keeps the ordinary gradient on its other rows), through one-shot tensor hooks.

  Calibration and accounting (Opacus' RDP analysis): :func:`noise_multiplier` (σ for a target ε, δ, sample rate q
  and steps T) and :func:`epsilon` (ε spent by T steps at σ, q). The ε is that of the targets' gradient mechanism,
  conditional on the non-private tensors (spec 3b §1.4 caveats): not an end-to-end guarantee.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

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
    clipped, _ = joint_clip([grads[k] for k in keys], c, guard="add")
    return {**grads, **dict(zip(keys, clipped))}


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


def per_sample_grads(losses: torch.Tensor, tensors: Sequence[torch.Tensor], chunk: int | None = None,
                     retain_graph: bool = True) -> list[torch.Tensor]:
    """``[B, *t.shape]`` per target tensor ``t``: the gradient of each ``losses[b]`` alone (fp32)."""
    b = losses.shape[0]
    chunk = b if not chunk or chunk <= 0 else chunk
    eye = torch.eye(b, device=losses.device, dtype=losses.dtype)
    parts: list[list[torch.Tensor]] = [[] for _ in tensors]
    try:
        for s in range(0, b, chunk):
            rows = eye[s:s + chunk]
            grads = torch.autograd.grad(losses, list(tensors), grad_outputs=rows, is_grads_batched=True,
                                        retain_graph=True, allow_unused=True)
            for i, (g, t) in enumerate(zip(grads, tensors)):
                parts[i].append(torch.zeros((rows.shape[0], *t.shape), device=t.device) if g is None else g.float())
    except RuntimeError:  # an operator without a batched backward: one backward per sample
        parts = [[] for _ in tensors]
        for k in range(b):
            grads = torch.autograd.grad(losses[k], list(tensors), retain_graph=True, allow_unused=True)
            for i, (g, t) in enumerate(zip(grads, tensors)):
                parts[i].append((torch.zeros_like(t, dtype=torch.float32) if g is None else g.float()).unsqueeze(0))
    out = [torch.cat(p) for p in parts]
    if not retain_graph:
        del eye
    return out


def joint_clip(grads: Sequence[torch.Tensor], clip: float, guard: str = "max") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample gradients ``[B, ...]`` scaled by ``c_b = min(1, C / max(‖g_b‖, 1e-12))`` (``guard="max"``,
    FedSEPT's) or ``min(1, C / (‖g_b‖ + 1e-6))`` (``guard="add"``, Opacus'), ‖·‖ over all of them together (in
    float64); returns (clipped, c)."""
    norm = torch.sqrt(sum(g.flatten(1).double().pow(2).sum(1) for g in grads))
    norm = norm.clamp_min(1e-12) if guard == "max" else norm + 1e-6
    factor = (clip / norm).clamp(max=1.0).to(grads[0].dtype)
    return [g * factor.view(-1, *([1] * (g.dim() - 1))) for g in grads], factor


def private_mean(clipped: Sequence[torch.Tensor], clip: float, sigma: float,
                 gen: torch.Generator | None = None) -> list[torch.Tensor]:
    """``(Σ_b g_b + N(0, σ²C²)) / B`` per tensor (noise drawn on the CPU from ``gen``: reproducible anywhere)."""
    out = []
    for g in clipped:
        total = g.sum(0)
        if sigma > 0:
            total = total + (torch.randn(total.shape, generator=gen) * (sigma * clip)).to(total)
        out.append(total / g.shape[0])
    return out


def dp_gradients(losses: torch.Tensor, tensors: Sequence[torch.Tensor], clip: float, sigma: float,
                 gen: torch.Generator | None = None, rows: Sequence[int | None] | None = None,
                 chunk: int | None = None) -> list[torch.Tensor]:
    """Steps 1–3: the private gradient of each target (of its first ``rows[i]`` rows when given, else all)."""
    grads = per_sample_grads(losses, tensors, chunk)
    rows = list(rows) if rows is not None else [None] * len(grads)
    grads = [g if r is None else g[:, :r] for g, r in zip(grads, rows)]
    clipped, _ = joint_clip(grads, clip)
    return private_mean(clipped, clip, sigma, gen)


class GradientOverride:
    """Step 4: one-shot hooks that replace the gradient reaching each target (its first ``rows`` rows) by ĝ."""

    def __init__(self):
        self.handles: list = []

    def clear(self) -> None:
        """Drop hooks that never fired (a step whose loss was not back-propagated)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def set(self, tensors: Sequence[torch.Tensor], private: Sequence[torch.Tensor],
            rows: Sequence[int | None] | None = None) -> None:
        self.clear()
        rows = list(rows) if rows is not None else [None] * len(tensors)
        for t, g, r in zip(tensors, private, rows):
            self.handles.append(t.register_hook(self._replacer(len(self.handles), g.detach(), r)))

    def _replacer(self, i: int, private: torch.Tensor, rows: int | None):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            self.handles[i].remove()  # one shot: the next gradient of this tensor is an ordinary one again
            return private.to(grad) if rows is None else torch.cat([private.to(grad), grad[rows:]])
        return hook


# ------------------------------------------------------------------------------------------------ accounting
def rdp_orders() -> list[float]:
    """Opacus' default RDP orders plus larger ones (DP-FPL's large σ has its optimal order above 63)."""
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS) + [80, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096]


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε spent by ``steps`` sampled-Gaussian steps, from Opacus' RDP accountant (orders :func:`rdp_orders`)."""
    import warnings

    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if steps <= 0:
        return 0.0
    orders = rdp_orders()
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only looser
        warnings.simplefilter("ignore", UserWarning)
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     default_orders: bool = True) -> float:
    """σ for ``steps`` sampled-Gaussian steps at rate ``sample_rate`` to spend ``target_epsilon`` (Opacus'
    ``get_noise_multiplier``, RDP accountant, bisection tolerance 0.01; ``default_orders``: Opacus' own orders, as
    FedSEPT calls it)."""
    from opacus.accountants.utils import get_noise_multiplier

    kw = {} if default_orders else {"alphas": rdp_orders()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=max(int(steps), 1), accountant="rdp", **kw))



#: FedSEPT's name for :func:`rdp_epsilon`
epsilon = rdp_epsilon

__all__ = ["GradientOverride", "clip_norm", "clip_per_sample", "dp_gradients", "epsilon", "gaussian", "joint_clip",
           "joint_norms", "noise_multiplier", "per_sample_gradients", "per_sample_grads", "private_mean",
           "rdp_epsilon", "rdp_orders"]
