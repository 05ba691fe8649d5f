"""DP-FPL (Tran, Sun, Patterson, Milanova, ICLR 2025): a global prompt with global DP and a low-rank + residual
local prompt with local DP, trained step-synchronously (FedSGD: gradients are exchanged every batch step, spec §4.4;
the round loop's ``trainer.sync: step``, :mod:`fedlit.steps`; ``round`` is refused).

Tensors (spec §4.2): ``G`` (global, shared), ``L`` (local, full), ``u`` ``[n_ctx, r]``, ``v`` ``[r, W]`` (personal;
``u``, ``v`` are derived from ``L``), all N(0, 0.02²). Before every training forward ``L`` is factorised outside
autograd (spec §4.3, :func:`factorise`): ``Ω ~ N(0,1)^{W×r}`` fresh, ``u = orth(L Ω)``, ``v = orth(Lᵀ u)ᵀ``,
``R = L − u v``; the client context is ``G + u v + R`` (= ``G + L`` numerically; ``L`` gets its gradient only
through ``u``, ``v``). ``factorization`` picks the context (the official ``--factorization``): ``promptfl`` (G),
``fedotp`` (G + L), ``fedpgp`` (G + u v, free u, v), ``dplora`` (G + u v from factorising L, no residual),
``dpfpl`` (default).

One step (spec §4.4), with ε > 0: each client clips its **batch** gradient g_G to ℓ₂ ≤ C and, by mode, clips and adds
N(0, σ_loc²) to g_G (promptfl), g_L (fedotp) or g_u, g_v (fedpgp, dplora, dpfpl); then (dplora, dpfpl) rebuilds
``g_L = (g_u v + u g_v + u uᵀ g_u v) / 10`` (:func:`local_gradient`; the official hard-coded 1/10 is
``grad_divisor``). The server takes the unweighted mean of the K clients' g_G and adds N(0, (σ_loc/K)²); every
client applies it (one G in fedlit) and steps SGD on its own L, u, v. Clipping is ``torch.nn.utils.clip_grad_norm_``'s
rule (factor ``C / (‖g‖ + 1e-6)`` when below 1).

Clipping (``clipping``): ``batch`` (official, default) clips each client's batch gradient; ``per_sample`` is DP-SGD:
every sample's gradient (of a one-sample loss) is clipped to C on the JOINT norm of everything released with noise
of that calibration (g_G, which the server noises, and the locally noised tensors: ‖(g_G, g_u, g_v)_i‖ ≤ C,
:func:`fedlit.privacy.clip_per_sample`), and the noisy tensors get the same N(0, σ_loc²) on the mean of the clipped
gradients (σ_loc = σ C / B: noise multiplier σ for a per-sample sensitivity C / B of the mean), so the accountant's
ε below holds for that mechanism (up to the shuffled, not Poisson, batches). Clipping each tensor separately (the
official per-tensor rule applied per sample) would let one sample reach √2·C over (g_u, g_v), √3·C with g_G. The
per-sample gradients come from one text forward and one batched backward (:func:`fedlit.privacy.per_sample_gradients`,
``per_sample_text_side``).

Calibration (``calibration``, spec §4.5): ``dpfpl_legacy`` (default, the official closed form, no accountant):
``σ = sqrt(T ln(1/δ)) / ε`` with T = **rounds**, ``σ_loc = σ · C / B`` (B: the largest batch), server std σ_loc/K.
``rdp``: σ chosen by Opacus' RDP accountant so that ``rounds × S`` steps of the sampled Gaussian (sample rate B/n)
spend ε. Either way ``results.json`` carries ``privacy``: the calibration used, σ, the stds, and the ε that Opacus'
RDP accountant (``opacus.accountants.analysis.rdp``) gives for the noise multiplier σ, the sample rate B/n and the
steps actually run, next to the closed form's ε. That accounting assumes a per-sample sensitivity C/B, which batch
clipping does not guarantee (spec §4.5 caveat; ``clipping: per_sample`` does), and Poisson sampling (clients
shuffle).

Official quirks: reproduced by default — the closed-form calibration with T = rounds (``calibration: rdp`` is the
fix), batch-level clipping, the 1/10 of g_L (``grad_divisor``), uniform server mean (``weighted: false``), ``useall``
truncation of every client to the smallest client's count (the step loop, :mod:`fedlit.steps`), σ_loc from the
configured batch even when a client holds fewer samples (``DP_FPL.py:253-261``; ``sensitivity_batch: used`` is the
fix, which only matters when a client holds fewer than B samples), and the dplora evaluation re-factorising L with a
fresh Ω in every evaluation forward (``DP_FPL.py:165-172``: ``PromptLearner.forward`` factorises in eval mode too;
``eval_refactorise: false`` evaluates with the last training factorisation; dpfpl's G + u v + R = G + L is unaffected).
The official loop (linhhtran/DP-FPL@cce74b4) is reproduced by the run's step-loop policies, the method's
:attr:`loop_defaults` (``trainer.step_start`` / ``optimizer_state`` / ``personal_grad``, recorded in
``results.json`` ``step_loop``): ``step_start: round`` — every forward loads the weights the round started with
(``federated_main.py:149``; the update loop writes back forward-time copies, ``:170-177``; only the test block
stores post-step values, ``:193-198``), so a round makes one effective update (its last step's, with the momentum
the earlier steps built up) — fix: ``previous``; ``optimizer_state: chain`` — one SGD optimiser for every client
(``DP_FPL.py:248``), so momentum carries from client to client and each client's G is its own copy stepped with
it — fix: ``per_client``; ``personal_grad: last_client`` — ``model_update()`` steps every client's L, u, v with the
``.grad`` left by the last client's forward (``federated_main.py:158-181``, ``DP_FPL.py:264-329``), so the official
personal prompt is one prompt trained on the last client's data — fix: ``own``. The repository's ``table.py`` prints
the paper's tables from these runs' pickles, so the released loop is taken to be what produced them. Evaluation: Local (the client's own test images) plus the official "neighbor" accuracy (``neighbor`` in
``results.json``: the other clients' test images of the evaluation set, among the same classes). Not built: the
membership-inference attack.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ..errors import FedlitError
from ..prompts import Task, encode_context, prompt_template
from ..privacy import clip_norm, clip_per_sample, gaussian, rdp_epsilon, rdp_orders
from .base import FedMethod, StepPlan
from .roles import ClientPolicy

FACTORIZATIONS = ("promptfl", "fedotp", "fedpgp", "dplora", "dpfpl")
#: which gradients get the local noise, by factorisation (spec §4.3)
NOISY = {"promptfl": ("G",), "fedotp": ("L",), "fedpgp": ("u", "v"), "dplora": ("u", "v"), "dpfpl": ("u", "v")}


def orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """Gram–Schmidt on the columns of ``a`` (QR with the signs fixed so that R's diagonal is positive)."""
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    return q * torch.where(d == 0, torch.ones_like(d), d)


def factorise(L: torch.Tensor, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec §4.3: ``u = orth(L Ω)``, ``v = orth(Lᵀ u)ᵀ``, ``R = L − u v``. ``L`` ``[n, W]``, ``Ω`` ``[W, r]``."""
    u = orthonormal_columns(L @ omega)
    v = orthonormal_columns(L.t() @ u).t()
    return u, v, L - u @ v


def local_gradient(u, v, g_u, g_v, divisor: float = 10.0) -> torch.Tensor:
    """Spec §4.4 step 3: ``g_L = (g_u v + u g_v + u uᵀ g_u v) / divisor``."""
    return (g_u @ v + u @ g_v + u @ u.t() @ g_u @ v) / divisor


def legacy_sigma(epsilon: float, delta: float, rounds: int) -> float:
    """The official closed form ``σ = q · sqrt(T ln(1/δ)) / ε`` with q = 1, T = rounds (spec §4.5)."""
    return math.sqrt(rounds * math.log(1 / delta)) / epsilon


class DPFPLPrompt(nn.Module):
    """G (global), L, u, v (local). ``residual`` is set by the factorisation before a training forward."""

    def __init__(self, width: int, n_ctx: int = 16, rank: int = 8, std: float = 0.02):
        super().__init__()
        self.G = nn.Parameter(torch.randn(n_ctx, width) * std)
        self.L = nn.Parameter(torch.randn(n_ctx, width) * std)
        self.u = nn.Parameter(torch.randn(n_ctx, rank) * std)
        self.v = nn.Parameter(torch.randn(rank, width) * std)
        self.residual: torch.Tensor | None = None


class DPFPL(FedMethod):
    """DP-FPL: global prompt with global DP, low-rank + residual local prompt with local DP (FedSGD).

    Args:
        n_ctx: context tokens (16).
        rank: r of the factorisation (8; official grid 1, 2, 4, 8); at most ``n_ctx``.
        factorization: ``dpfpl`` (default), ``dplora``, ``fedpgp``, ``fedotp`` or ``promptfl`` (module docstring).
        epsilon: ε (the official ``--noise``; 0 = no DP; grid 0.1, 0.2, 0.4).
        delta: δ (1e-5).
        clip: C, the ℓ₂ clipping threshold (10).
        calibration: ``dpfpl_legacy`` (official closed form, default) or ``rdp`` (σ from Opacus' RDP accountant).
        clipping: ``batch`` (official: the batch gradient, default) or ``per_sample`` (DP-SGD, module docstring).
        grad_divisor: the official 1/10 in the rebuilt g_L (10).
        sensitivity_batch: ``configured`` (official: σ_loc = σ C / B with the configured B) or ``used`` (the batch
            actually used, min(B, n)).
        eval_refactorise: dplora evaluation re-factorises L with a fresh Ω every forward (official, default True).
        lr, momentum, weight_decay: SGD (0.001, 0.9, 5e-4, constant).
        weighted: server mean weighted by sample count (default False: the official 1/K).
    """

    name = "dpfpl"
    #: step-synchronous, every step from the round's weights, one chained optimiser, the last client's personal
    #: gradient (DP-FPL's official loop, :class:`~fedlit.methods.roles.ClientPolicy`)
    policy = ClientPolicy(sync="step", step_loop=(("optimizer_state", "chain"), ("personal_grad", "last_client"),
                                                  ("step_start", "round")))
    per_sample_text_side = True  # the prompt reaches the loss only through the class text features
    neighbor_accuracy = True

    def __init__(self, n_ctx: int = 16, rank: int = 8,
                 factorization: Literal["promptfl", "fedotp", "fedpgp", "dplora", "dpfpl"] = "dpfpl",
                 epsilon: float = 0.0, delta: float = 1e-5, clip: float = 10.0,
                 calibration: Literal["dpfpl_legacy", "rdp"] = "dpfpl_legacy",
                 clipping: Literal["batch", "per_sample"] = "batch", grad_divisor: float = 10.0,
                 sensitivity_batch: Literal["configured", "used"] = "configured", eval_refactorise: bool = True,
                 lr: float = 0.001, momentum: float = 0.9, weight_decay: float = 5e-4,
                 weighted: bool = False):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        checks = [
            (n_ctx >= 1, f"method.init_args.n_ctx={n_ctx}: must be >= 1"),
            (1 <= rank <= n_ctx, f"method.init_args.rank={rank}: must be in [1, n_ctx={n_ctx}]"),
            (factorization in FACTORIZATIONS, f"method.init_args.factorization={factorization!r}: use one of "
                                              f"{', '.join(FACTORIZATIONS)}"),
            (epsilon >= 0, f"method.init_args.epsilon={epsilon}: must be >= 0 (0 = no DP)"),
            (0 < delta < 1, f"method.init_args.delta={delta}: must be in (0, 1)"),
            (clip > 0, f"method.init_args.clip={clip}: must be > 0"),
            (calibration in ("dpfpl_legacy", "rdp"), f"method.init_args.calibration={calibration!r}: use "
                                                     f"'dpfpl_legacy' or 'rdp'"),
            (clipping in ("batch", "per_sample"), f"method.init_args.clipping={clipping!r}: use 'batch' or "
                                                  f"'per_sample'"),
            (grad_divisor > 0, f"method.init_args.grad_divisor={grad_divisor}: must be > 0"),
            (sensitivity_batch in ("configured", "used"), f"method.init_args.sensitivity_batch="
                                                          f"{sensitivity_batch!r}: use 'configured' or 'used'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FedlitError(msg)
        self.n_ctx, self.rank, self.factorization = n_ctx, rank, factorization
        self.epsilon, self.delta, self.clip, self.calibration = epsilon, delta, clip, calibration
        self.grad_divisor, self.clipping = grad_divisor, clipping
        self.sensitivity_batch, self.eval_refactorise = sensitivity_batch, eval_refactorise
        self.eval_gen = torch.Generator().manual_seed(0xE7A1)
        self.per_sample_gradients = clipping == "per_sample"
        self.noise_multiplier = self.local_std = 0.0
        self.plan: StepPlan | None = None

    def build(self, clip):
        return DPFPLPrompt(clip.text_width, self.n_ctx, self.rank)

    def is_shared(self, key: str) -> bool:
        return key == "G"  # L, u, v stay on the client

    # ------------------------------------------------------------------------------------ classification
    def context(self, prompt: DPFPLPrompt) -> torch.Tensor:
        """The client's context ``[n_ctx, W]`` under ``factorization`` (evaluation: dpfpl's G + u v + R = G + L)."""
        f = self.factorization
        if f == "promptfl":
            return prompt.G
        if f == "fedotp":
            return prompt.G + prompt.L
        if f == "dpfpl":
            if prompt.training and prompt.residual is not None:
                return prompt.G + prompt.u @ prompt.v + prompt.residual
            return prompt.G + prompt.L
        if self.refactorises(prompt):  # official dplora evaluation: a fresh Ω in every forward
            L = prompt.L.detach().float()
            u, v, _ = factorise(L, torch.randn(L.shape[1], self.rank, generator=self.eval_gen).to(L))
            return prompt.G + (u @ v).to(prompt.G.dtype)
        return prompt.G + prompt.u @ prompt.v

    def refactorises(self, prompt: DPFPLPrompt) -> bool:
        return self.factorization == "dplora" and self.eval_refactorise and not prompt.training

    def prepare(self, prompt: DPFPLPrompt, clip, task: Task):
        """Text features once per task, except the official dplora evaluation (a new factorisation per batch)."""
        return None if self.refactorises(prompt) else super().prepare(prompt, clip, task)

    def text_features(self, prompt: DPFPLPrompt, clip, task: Task) -> torch.Tensor:
        return encode_context(clip, prompt_template(clip, task, self.n_ctx), self.context(prompt))

    # ------------------------------------------------------------------------------------ the step hooks
    def plan_steps(self, plan: StepPlan) -> None:
        """The noise calibration for the run's plan (spec §4.5)."""
        self.plan = plan
        if self.epsilon <= 0:
            self.noise_multiplier = self.local_std = 0.0
            return
        if self.calibration == "dpfpl_legacy":
            self.noise_multiplier = legacy_sigma(self.epsilon, self.delta, plan.rounds)
        else:
            from opacus.accountants.utils import get_noise_multiplier

            self.noise_multiplier = float(get_noise_multiplier(target_epsilon=self.epsilon, target_delta=self.delta,
                                                               sample_rate=plan.sample_rate, steps=plan.steps,
                                                               accountant="rdp", alphas=rdp_orders()))
        self.local_std = self.noise_multiplier * self.clip / self.sensitivity_b(plan)

    def sensitivity_b(self, plan: StepPlan) -> int:
        """The B of σ_loc = σ C / B: the configured batch (official) or the one used (``sensitivity_batch``)."""
        return (plan.configured_batch or plan.batch_size) if self.sensitivity_batch == "configured" else plan.batch_size

    def prepare_step(self, prompt: DPFPLPrompt, gen: torch.Generator) -> None:
        """Factorise L (dplora, dpfpl) with a fresh Ω from ``gen``; u, v are overwritten, R kept for the forward."""
        prompt.residual = None
        if self.factorization not in ("dplora", "dpfpl"):
            return
        L = prompt.L.detach()
        omega = torch.randn(L.shape[1], self.rank, generator=gen).to(L)
        u, v, r = factorise(L.float(), omega.float())
        prompt.u.data.copy_(u)
        prompt.v.data.copy_(v)
        prompt.residual = r.to(L.dtype) if self.factorization == "dpfpl" else None

    def client_gradient(self, prompt: DPFPLPrompt, grads, gen: torch.Generator):
        """Clip g_G; clip + local noise on the mode's gradients; rebuild g_L from g_u, g_v (dplora, dpfpl)."""
        out = dict(grads)
        clipped = ("G", *NOISY[self.factorization]) if self.epsilon > 0 else ()
        if self.per_sample_gradients:  # [B, ...] per sample: clip each sample's joint norm, then the mean
            out = {k: v.mean(0) for k, v in clip_per_sample(out, clipped, self.clip).items()}
        elif self.epsilon > 0:
            out["G"] = clip_norm(out["G"], self.clip)
            for k in NOISY[self.factorization]:
                out[k] = clip_norm(out[k], self.clip)
        if self.epsilon > 0:
            for k in NOISY[self.factorization]:
                out[k] = out[k] + gaussian(out[k], self.local_std, gen)
        if self.factorization in ("dplora", "dpfpl"):
            u, v = prompt.u.detach().to(out["u"]), prompt.v.detach().to(out["v"])
            out["L"] = local_gradient(u, v, out["u"], out["v"], self.grad_divisor)
        return out

    def server_gradient(self, grads, num_samples, gen: torch.Generator):
        """The clients' mean g_G (unweighted by default) + N(0, (σ_loc / K)²) when ε > 0."""
        mean = super().server_gradient(grads, num_samples, gen)  # FedAvg's mean (weighted only if ``weighted``)
        if self.epsilon > 0:
            std = self.local_std / len(grads)
            mean = {k: v + torch.randn(v.shape, generator=gen).to(v) * std for k, v in mean.items()}
        return mean

    def run_report(self) -> dict:
        """``privacy``: the calibration used and the ε Opacus' RDP accountant gives for what was run."""
        p = self.plan
        out = {"dp": self.epsilon > 0, "calibration": self.calibration, "clipping": self.clipping,
               "epsilon_target": self.epsilon,
               "delta": self.delta, "clip": self.clip, "factorization": self.factorization,
               "sensitivity_batch": self.sensitivity_batch}
        if p is None:
            return {"privacy": out}
        out.update(steps=p.steps, rounds=p.rounds, steps_per_round=p.steps_per_round, batch_size=p.batch_size,
                   sensitivity_b=self.sensitivity_b(p),
                   clients_per_step=p.clients, sample_rate=p.sample_rate)
        if self.epsilon > 0:
            out.update(noise_multiplier=self.noise_multiplier, local_noise_std=self.local_std,
                       server_noise_std=self.local_std / max(p.clients, 1),
                       epsilon_closed_form=math.sqrt(p.rounds * math.log(1 / self.delta)) / self.noise_multiplier,
                       epsilon_rdp=rdp_epsilon(self.noise_multiplier, p.sample_rate, p.steps, self.delta),
                       accountant="opacus.accountants.analysis.rdp (RDPAccountant.DEFAULT_ALPHAS + orders up to 4096)",
                       assumes=("per-sample sensitivity C/B and Poisson sampling at rate B/n; "
                                + ("per-sample clipping gives the first, shuffled batches approximate the second"
                                   if self.per_sample_gradients else
                                   "the official batch clipping bounds neither (spec 4.5)")))
        return {"privacy": out}


__all__ = ["DPFPL", "DPFPLPrompt", "clip_norm", "factorise", "legacy_sigma", "local_gradient", "orthonormal_columns",
           "rdp_epsilon", "rdp_orders"]
