"""Client-side DP-SGD as a trainer option any round-mode method uses (``trainer.privacy``, issue 22).

Every local step of a client, instead of ``loss.backward()`` (:func:`private_backward`):

1. per-sample gradients ``g_i`` of the batch's trainable prompt tensors: one text forward and one batched backward
   (:func:`fedlit.privacy.per_sample_gradients`) where the prompt reaches the loss only through the class text
   features (the caller says so: ``text_side``; FedProx's term, the same for every sample, is added to each), else
   ``B`` one-sample forward/backward passes of ``module.training_step`` (any loss);
2. joint clipping over the chosen tensors (``tensors``: ``all`` trainable tensors, or only the ``shared`` ones the
   server receives): ``g_i · min(1, C / (‖g_i‖ + 1e-6))``, ``‖·‖`` over all of them together (Opacus' factor);
3. ``(Σ_i clipped g_i + N(0, σ²C²)) / B`` written into their ``.grad`` (``B``: the batch's size); tensors outside
   the chosen set get their ordinary mean gradient. The noise stream is a function of (seed, round, client, step).

Accounting (:func:`privacy_report`): each client's ε from Opacus' RDP accountant (:func:`fedlit.privacy.rdp_epsilon`)
at its own sample rate ``q = B / n_client`` over the DP steps it has taken in all its rounds (kept in its
:class:`~fedlit.rounds.ClientState` ``optim`` under :data:`STEPS_KEY`, so checkpoints carry them). The accountant
assumes Poisson sampling at rate ``q``; the batches are a shuffled partition of the client's data per epoch (as in
Opacus without ``poisson_sampling``): the usual approximation. With ``tensors: shared`` the ε covers only the
released (shared) tensors; the personal ones never leave the client.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from . import privacy
from .errors import FedlitError

Tensors = dict[str, torch.Tensor]

#: the key of a client's DP step count in its :class:`~fedlit.rounds.ClientState` ``optim``
STEPS_KEY = "dp_steps"


@dataclass(frozen=True)
class PrivacySettings:
    """Client-side DP-SGD (``trainer.privacy``).

    Args:
        clip: C, the bound on every sample's joint ℓ₂ gradient norm over the noised tensors.
        noise_multiplier: σ (the noise's std is σC on the clipped sum); give it or ``target_epsilon``.
        target_epsilon: the ε every client may spend over the run: σ is calibrated with Opacus'
            ``get_noise_multiplier`` at the sample rate B/n and the step count of the client that needs the most
            noise, assuming it takes part in every round.
        delta: δ of the (ε, δ) guarantee.
        tensors: what is clipped and noised together: ``all`` trainable tensors of the prompt, or only the
            ``shared`` ones (sent to the server; the others keep their ordinary gradient and the ε covers only the
            released tensors).
    """

    clip: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    tensors: Literal["all", "shared"] = "all"

    def __post_init__(self):
        both = (self.noise_multiplier is None) == (self.target_epsilon is None)
        checks = [
            (not both, "trainer.privacy: give exactly one of noise_multiplier (σ) and target_epsilon (ε), not "
                       f"{'both' if self.noise_multiplier is not None else 'neither'}"),
            (self.clip > 0, f"trainer.privacy.clip={self.clip}: the per-sample norm bound C must be > 0"),
            (self.noise_multiplier is None or self.noise_multiplier >= 0,
             f"trainer.privacy.noise_multiplier={self.noise_multiplier}: must be >= 0"),
            (self.target_epsilon is None or self.target_epsilon > 0,
             f"trainer.privacy.target_epsilon={self.target_epsilon}: must be > 0"),
            (0 < self.delta < 1, f"trainer.privacy.delta={self.delta}: must be in (0, 1)"),
            (self.tensors in ("all", "shared"), f"trainer.privacy.tensors={self.tensors!r}: use 'all' or 'shared'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FedlitError(msg)


# ------------------------------------------------------------------------------------------------ calibration
def sample_rate(batch_size: int, n: int) -> float:
    """A client's sampling rate ``q = B / n`` (1 when it holds at most one batch)."""
    return min(1.0, batch_size / max(n, 1))


@lru_cache(maxsize=256)
def _calibrated(target: float, delta: float, q: float, steps: int) -> float:
    return privacy.noise_multiplier(target, delta, q, steps)


def client_sizes(trainer, clients) -> dict[int, int]:
    """cid → training-sample count of the clients that can train (``trainer.skip_clients`` left out)."""
    return {c.cid: c.num_samples for c in clients if c.cid not in trainer.skip_clients}


def sigma_of(settings: PrivacySettings, trainer, sizes: tuple[int, ...], batch_starts) -> float:
    """σ of a run: ``noise_multiplier``, or the largest σ any client (of ``sizes`` samples each) needs to stay
    within ``target_epsilon`` over ``trainer.rounds`` rounds of its ``local_epochs`` × batches steps
    (``batch_starts(n)``: the run's batches of a client of ``n`` samples, :meth:`fedlit.run_plan.RunPlan.batch_starts`)."""
    if settings.noise_multiplier is not None:
        return float(settings.noise_multiplier)
    need = {(sample_rate(trainer.batch_size, n), trainer.rounds * trainer.local_epochs * len(batch_starts(n)))
            for n in sizes if n > 0}
    return max((_calibrated(settings.target_epsilon, settings.delta, q, t) for q, t in need), default=0.0)


@lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, q: float) -> tuple[float, ...]:
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=privacy.rdp_orders()))


def epsilon_of(sigma: float, q: float, steps: int, delta: float) -> float:
    """:func:`fedlit.privacy.rdp_epsilon` (Opacus' RDP accountant, the same orders), with the per-step RDP of
    (σ, q) computed once: RDP composes linearly in the steps, so clients of equal size cost one evaluation."""
    import warnings

    from opacus.accountants.analysis.rdp import get_privacy_spent

    if steps <= 0:
        return 0.0
    rdp = np.asarray(_rdp_per_step(float(sigma), float(q))) * steps
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only looser
        warnings.simplefilter("ignore", UserWarning)
        return float(get_privacy_spent(orders=privacy.rdp_orders(), rdp=rdp, delta=delta)[0])


def noise_generator(seed: int, rnd: int, cid: int, step: int) -> torch.Generator:
    """The CPU noise stream of one client's step: a function of (seed, round, client, step) only."""
    key = np.random.SeedSequence([seed, rnd, cid, step, 0xD95]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(key >> 1))


# ------------------------------------------------------------------------------------------------ the mechanism
def sample_gradients(module, batch, step: int, task, classes, received,
                     text_side: bool) -> tuple[Tensors, torch.Tensor]:
    """Per-sample gradients ``{name: [B, ...]}`` of the prompt's trainable tensors (those that get one) and the
    per-sample losses ``[B]`` (module docstring, step 1)."""
    x, y = batch
    if text_side:
        grads, losses = privacy.per_sample_gradients(module, x, y, task)
        return _with_proximal(module, grads, losses, received)
    names, params = zip(*[(k, p) for k, p in module.prompt.named_parameters() if p.requires_grad])
    per: list[tuple] = []
    losses = []
    for i in range(len(y)):
        loss = module.training_step((x[i : i + 1], y[i : i + 1]), step, task, classes, received)
        per.append(torch.autograd.grad(loss, params, allow_unused=True))
        losses.append(loss.detach().float())
    grads = {}
    for j, (k, p) in enumerate(zip(names, params)):
        if all(g[j] is None for g in per):
            continue  # no sample reaches this tensor: it keeps no gradient, as after an ordinary backward
        grads[k] = torch.stack([torch.zeros_like(p) if g[j] is None else g[j].detach() for g in per])
    return grads, torch.stack(losses)


def _with_proximal(module, grads: Tensors, losses: torch.Tensor, received) -> tuple[Tensors, torch.Tensor]:
    """FedProx's term (the same for every sample: no data in it) added to every per-sample loss and gradient, as a
    one-sample ``training_step`` has it; computed once."""
    mu = module.prox_mu  # the run plan's (trainer.prox_mu, else the method's)
    if mu <= 0:
        return grads, losses
    named = [(k, p) for k, p in module.prompt.named_parameters() if p.requires_grad]
    term = module.proximal_term(mu, received or {}, detached=module.prox_detached)
    extra = torch.autograd.grad(term, [p for _, p in named], allow_unused=True) if term.requires_grad else ()
    grads = dict(grads)
    for (k, p), g in zip(named, extra):
        if g is not None:
            grads[k] = (grads[k] if k in grads else torch.zeros((len(losses), *p.shape), device=p.device)) + g
    return grads, losses + term.detach().float()


def private_gradients(grads: Tensors, targets: list[str], clip: float, sigma: float,
                      gen: torch.Generator) -> Tensors:
    """Steps 2–3 on per-sample gradients ``{name: [B, ...]}``: the ``targets`` jointly clipped, summed, noised
    (N(0, σ²C²) per coordinate, drawn in the order of ``targets``) and divided by B; the others' mean."""
    keys = [k for k in targets if k in grads]
    out = {k: g.mean(0) for k, g in grads.items() if k not in keys}
    if keys:
        clipped = privacy.clip_per_sample(grads, keys, clip)
        out.update(zip(keys, privacy.private_mean([clipped[k] for k in keys], clip, sigma, gen)))
    return out


def private_backward(module, batch, step: int, task, classes, received, settings: PrivacySettings, sigma: float,
                     gen: torch.Generator, text_side: bool = False) -> torch.Tensor:
    """DP-SGD's replacement of ``loss.backward()`` for one batch: the private gradient is written into the prompt
    tensors' ``.grad`` (nothing is written when a loss is not finite). Returns the batch's mean loss (logging and
    the divergence check)."""
    grads, losses = sample_gradients(module, batch, step, task, classes, received, text_side)
    loss = losses.mean()
    module.prompt.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return loss
    method = module.method
    targets = [k for k in grads if settings.tensors == "all" or method.is_shared(k)]
    if not targets:
        raise FedlitError(f"trainer.privacy.tensors=shared: {method.name} sends no trainable tensor to the server; "
                          "use trainer.privacy.tensors=all")
    private = private_gradients(grads, targets, settings.clip, sigma, gen)
    for k, p in module.prompt.named_parameters():
        if k in private:
            p.grad = private[k].to(p.device, p.dtype)
    return loss


# ------------------------------------------------------------------------------------------------ accounting
def with_steps(optim: Tensors | None, kept: Tensors, steps: int) -> Tensors:
    """A client's ``optim`` state after a round of ``steps`` DP steps (``optim``: the round's, ``None`` = unchanged
    ``kept``): its DP step count raised by ``steps``."""
    before = int(kept.get(STEPS_KEY, torch.tensor(0)))
    return {**(kept if optim is None else optim), STEPS_KEY: torch.tensor(before + steps)}


def privacy_report(trainer, sizes: dict[int, int], states: dict, sigma: float) -> dict:
    """``results.json``'s ``privacy`` block (``{}`` without ``trainer.privacy``): ε per client from its DP steps
    (``states``: cid → :class:`~fedlit.rounds.ClientState`) at ``q = B / n``; ``epsilon``: the largest (``None``
    with σ = 0: no guarantee)."""
    settings = getattr(trainer, "privacy", None)
    if settings is None:
        return {}
    steps = {c: int(states[c].optim.get(STEPS_KEY, 0)) if c in states else 0 for c in sorted(sizes)}
    eps = {c: (epsilon_of(sigma, sample_rate(trainer.batch_size, sizes[c]), t, settings.delta)
               if sigma > 0 or t == 0 else None) for c, t in steps.items()}
    finite = [e for e in eps.values() if e is not None]
    rates = {str(c): sample_rate(trainer.batch_size, n) for c, n in sizes.items()}
    return {"privacy": {"mechanism": "dp-sgd", **asdict(settings), "noise_multiplier": sigma,
                        "calibrated": settings.target_epsilon is not None,
                        "epsilon": max(finite) if len(finite) == len(eps) else None,
                        "epsilon_per_client": {str(c): e for c, e in eps.items()},
                        "steps_per_client": {str(c): t for c, t in steps.items()},
                        "sample_rate_per_client": rates}}


__all__ = ["PrivacySettings", "STEPS_KEY", "client_sizes", "epsilon_of", "noise_generator", "privacy_report",
           "private_backward", "private_gradients", "sample_gradients", "sample_rate", "sigma_of", "with_steps"]
