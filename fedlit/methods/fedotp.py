"""FedOTP (Li, Huang, Wang, Shi, CVPR 2024): global + local prompts matched to image patches by optimal transport.

Prompts (spec §4.1): ``ctx ∈ R^{N×n_ctx×W}`` (N = 2), N(0, 0.02²). The first ``num_global`` prompts (``ctx[0]``) are
the **global** prompt, shared and averaged (weighted by sample count); the rest (``ctx[1]``) are the client's
**local** prompt, personal and persistent. They are stored as two tensors, ``ctx_global`` and ``ctx_local``, so that
the state-dict split is exact; :attr:`OTPrompt.ctx` concatenates them.

Forward (spec §4.2-4.3), for image b and class c:
``sim[m, n] = ⟨f_m(x_b), t_{n,c}⟩`` between the M normalised patch tokens (CLS ignored, as in the official code;
``use_cls=True`` adds it as one more source) and the N normalised prompt text features; cost ``C = 1 − sim``;
a transport plan ``T`` (computed under ``no_grad``: a constant for back-prop) with marginals ``a = 1/M`` over
patches and ``b = top_percent/N`` (COT, unbalanced, the default) or ``1/N`` (balanced Sinkhorn) over prompts;
``logits = logit_scale · Σ_{m,n} T_mn sim_mn``. Loss: plain cross-entropy.

The image tower is untouched, so the projected output tokens are cached (``image_input = "tokens"``).

OT solvers (pure functions below, batched over the ``B·C`` problems):

* ``ot_precision="fp32_log"`` (**fixed**, default; the name is kept for configs): the official recursion in fp64
  scaling form (``exp(−C/ε)`` representable for ``C/ε`` up to 600), or in fp32 in the log domain (log-sum-exp)
  beyond that, so it never underflows; the stopping criterion is the official one. Returns fp32 plans.
* ``ot_precision="official_fp16"`` (**official**): ``K = exp(−C/ε)`` and the scaling iterations in fp16 as in
  ``trainers/GLP_OT.py``. For costs above ~17·ε, ``K`` underflows to 0, ``v = b/0 = inf`` and ``T = 0·inf = NaN``
  (spec §4.3; "the logits has nan value at the beginning", FedOTP issue #1). Kept only to reproduce that failure.

Defaults: n_ctx 16, N 2, COT, ε 0.1, top_percent 0.8, thresh 1e-3, max_iter 100, SGD lr 0.001, momentum 0.9,
weight decay 5e-4, FedAvg weighted by n_i (spec §4.4-4.5; the FedPGP-code runs of FedOTP as a baseline, §3.5, use
ε 0.1 and thresh 0.01, see ``configs/fedotp.yaml``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..backbones import FrozenCLIP
from ..errors import FedlitError
from ..prompts import Task, encode_context, prompt_template
from .base import FedMethod
from .roles import DASSL_CHAIN

OTKind = Literal["cot", "sinkhorn"]
OTPrecision = Literal["fp32_log", "official_fp16"]


# ============================================================================================ OT solvers
def _lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log-sum-exp over ``dim``; over a short last dimension (the N prompts) a ``logaddexp`` chain, which is
    several times faster on CPU than ``torch.logsumexp`` reducing a size-2 axis."""
    if dim in (-1, x.dim() - 1) and x.shape[-1] <= 8:
        out = x[..., 0]
        for i in range(1, x.shape[-1]):
            out = torch.logaddexp(out, x[..., i])
        return out
    return torch.logsumexp(x, dim=dim)


def _mean_abs_change(new_log: torch.Tensor, old_log: torch.Tensor) -> float:
    """``mean|exp(new) − exp(old)|`` (the official criterion on the scaling vector), in fp64 so that large
    scalings (small ε) do not overflow."""
    return float((new_log.double().exp() - old_log.double().exp()).abs().mean())


# Scaling-domain iterations in fp64 (the default solvers): no exp/log per iteration, only products and sums over
# the N prompts and the M patches, several times faster than the log domain. In fp64, ``K = exp(−C/ε)`` and the
# scalings stay finite for ``C/ε`` up to ~700 (C ≤ 2: ε ≥ 0.003); beyond :data:`SCALING_MAX_EXPONENT`, or if a
# scaling still overflows, the same iterations run in the log domain (:func:`cot_log_domain`). Both are the
# official recursion with the official stopping rule (``mean|Δ|`` over every problem of the batch, as the official
# code batches every image × class of a step into one tensor); they agree to ~1e-8 (tests/test_fedotp_speed.py).
SCALING_MAX_EXPONENT = 600.0


def _kv(kt: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``K v`` from ``kt = Kᵀ [P, N, M]``: over a few prompts a multiply-add chain of ``[P, M]`` rows (a batched
    matrix product with an inner dimension of 2 is several times slower on CPU)."""
    if kt.shape[1] > 8:
        return torch.bmm(kt.transpose(1, 2), v.unsqueeze(-1)).squeeze(-1)
    out = kt[:, 0] * v[:, :1]
    for n in range(1, kt.shape[1]):
        out = torch.addcmul(out, kt[:, n], v[:, n:n + 1])
    return out


def _scaling(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int, thresh: float,
             unbalanced: bool) -> torch.Tensor | None:
    """The iterations in fp64 scaling form, batched over ``P``; ``None`` if the exponents are out of range."""
    if float(cost.abs().max()) / eps > SCALING_MAX_EXPONENT:
        return None
    # unshifted K: the clamp at 1 and the stopping rule see the official scale
    kt = torch.exp(-cost.double().transpose(1, 2) / eps).contiguous()  # Kᵀ [P, N, M]
    a, b = a.double(), b.double()
    u, v = torch.ones_like(a), torch.ones_like(b)
    one = torch.ones((), dtype=kt.dtype, device=kt.device)
    for _ in range(max_iter):
        if unbalanced:  # COT: u = min(a/(Kv), 1), v = b/(Kᵀu); stop on mean|Δv|
            u = torch.minimum(a / _kv(kt, v), one)
            new, old = b / torch.bmm(kt, u.unsqueeze(-1)).squeeze(-1), v
            v = new
        else:  # Sinkhorn: r = a/(Kc), c = b/(Kᵀr); stop on mean|Δr|
            new, old = a / _kv(kt, v), u
            u = new
            v = b / torch.bmm(kt, u.unsqueeze(-1)).squeeze(-1)
        if float((new - old).abs().mean()) < thresh:
            break
    plan = (u.unsqueeze(1) * kt * v.unsqueeze(2)).transpose(1, 2)
    return plan.float() if bool(torch.isfinite(plan).all()) else None


def cot_log(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int = 100,
            thresh: float = 1e-3) -> torch.Tensor:
    """Entropic unbalanced ("COT") transport, batched: ``cost [P, M, N]``, ``a [P, M]``, ``b [P, N]``; iterates
    ``u = min(a/(Kv), 1)``, ``v = b/(Kᵀu)`` with ``K = exp(−cost/ε)`` from ``u = v = 1``, stopping when
    ``mean|Δv| < thresh`` or after ``max_iter``. Returns ``T = diag(u) K diag(v)`` (fp32): column sums = ``b``
    exactly, row sums ≤ ``a``. fp64 scaling form, or the log domain where that would overflow."""
    plan = _scaling(cost, a, b, eps, max_iter, thresh, unbalanced=True)
    return plan if plan is not None else cot_log_domain(cost, a, b, eps, max_iter, thresh)


def sinkhorn_log(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int = 100,
                 thresh: float = 1e-3) -> torch.Tensor:
    """Balanced entropic Sinkhorn, batched: ``r = a/(Kc)``, ``c = b/(Kᵀr)`` from ``r = c = 1``, stopping when
    ``mean|Δr| < thresh`` or after ``max_iter``. Returns ``T = diag(r) K diag(c)`` (fp32)."""
    plan = _scaling(cost, a, b, eps, max_iter, thresh, unbalanced=False)
    return plan if plan is not None else sinkhorn_log_domain(cost, a, b, eps, max_iter, thresh)


def cot_log_domain(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int = 100,
                   thresh: float = 1e-3) -> torch.Tensor:
    """:func:`cot_log` in fp32 in the log domain (log-sum-exp): ``exp(−C/ε)`` never underflows, for any ε."""
    log_k = -cost.float() / eps
    log_a, log_b = a.float().log(), b.float().log()
    log_u = torch.zeros_like(log_a)
    log_v = torch.zeros_like(log_b)
    for _ in range(max_iter):
        log_u = torch.clamp(log_a - _lse(log_k + log_v.unsqueeze(1), dim=2), max=0.0)
        new_v = log_b - _lse(log_k + log_u.unsqueeze(2), dim=1)
        err = _mean_abs_change(new_v, log_v)
        log_v = new_v
        if err < thresh:
            break
    return (log_u.unsqueeze(2) + log_k + log_v.unsqueeze(1)).exp()


def sinkhorn_log_domain(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int = 100,
                        thresh: float = 1e-3) -> torch.Tensor:
    """:func:`sinkhorn_log` in fp32 in the log domain."""
    log_k = -cost.float() / eps
    log_a, log_b = a.float().log(), b.float().log()
    log_r = torch.zeros_like(log_a)
    log_c = torch.zeros_like(log_b)
    for _ in range(max_iter):
        new_r = log_a - _lse(log_k + log_c.unsqueeze(1), dim=2)
        log_c = log_b - _lse(log_k + new_r.unsqueeze(2), dim=1)
        err = _mean_abs_change(new_r, log_r)
        log_r = new_r
        if err < thresh:
            break
    return (log_r.unsqueeze(2) + log_k + log_c.unsqueeze(1)).exp()


def cot_fp16(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int = 100,
             thresh: float = 1e-3) -> torch.Tensor:
    """The official solver's arithmetic: ``K = exp(−cost/ε)`` and the COT iterations in fp16 (underflows)."""
    cost, a, b = cost.half(), a.half(), b.half()
    k = torch.exp(-cost / eps)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(max_iter):
        prev = v
        u = torch.minimum(a / torch.bmm(k, v.unsqueeze(-1)).squeeze(-1), torch.ones_like(a))
        v = b / torch.bmm(k.transpose(1, 2), u.unsqueeze(-1)).squeeze(-1)
        if (v - prev).abs().float().mean().item() < thresh:  # NaN never passes: runs to max_iter, as officially
            break
    return u.unsqueeze(-1) * k * v.unsqueeze(-2)


def sinkhorn_fp16(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int = 100,
                  thresh: float = 1e-3) -> torch.Tensor:
    """The official balanced Sinkhorn in fp16 (underflows like :func:`cot_fp16`)."""
    cost, a, b = cost.half(), a.half(), b.half()
    k = torch.exp(-cost / eps)
    r, c = torch.ones_like(a), torch.ones_like(b)
    for _ in range(max_iter):
        prev = r
        r = a / torch.bmm(k, c.unsqueeze(-1)).squeeze(-1)
        c = b / torch.bmm(k.transpose(1, 2), r.unsqueeze(-1)).squeeze(-1)
        if (r - prev).abs().float().mean().item() < thresh:
            break
    return r.unsqueeze(-1) * k * c.unsqueeze(-2)


_SOLVERS = {("cot", "fp32_log"): cot_log, ("sinkhorn", "fp32_log"): sinkhorn_log,
            ("cot", "official_fp16"): cot_fp16, ("sinkhorn", "official_fp16"): sinkhorn_fp16}


def transport_plan(cost: torch.Tensor, ot: OTKind = "cot", eps: float = 0.1, top_percent: float = 0.8,
                   max_iter: int = 100, thresh: float = 1e-3, precision: OTPrecision = "fp32_log") -> torch.Tensor:
    """FedOTP's plan for a batch of costs ``[P, M, N]``: ``a = 1/M``; ``b = top_percent/N`` (COT, with
    ``top_percent ≤ Σa = 1``) or ``1/N`` (Sinkhorn). No gradient flows through the plan."""
    if (ot, precision) not in _SOLVERS:
        raise FedlitError(f"unknown OT solver ot={ot!r}, ot_precision={precision!r}; use ot in {{cot, sinkhorn}} "
                          "and ot_precision in {fp32_log, official_fp16}")
    p, m, n = cost.shape
    with torch.no_grad():
        a = torch.full((p, m), 1.0 / m, device=cost.device)
        mass = min(1.0, top_percent) if ot == "cot" else 1.0
        b = torch.full((p, n), mass / n, device=cost.device)
        return _SOLVERS[ot, precision](cost.detach(), a, b, eps, max_iter, thresh)


# ============================================================================================ the method
class OTPrompt(nn.Module):
    """``N`` CoOp contexts: ``ctx_global [G, n_ctx, W]`` (shared) and ``ctx_local [N−G, n_ctx, W]`` (personal)."""

    def __init__(self, clip: FrozenCLIP, n_ctx: int = 16, num_prompts: int = 2, num_global: int = 1,
                 std: float = 0.02):
        super().__init__()
        self.n_ctx = n_ctx
        ctx = torch.randn(num_prompts, n_ctx, clip.text_width) * std  # one draw, then split (as ctx[:G], ctx[G:])
        self.ctx_global = nn.Parameter(ctx[:num_global].clone())
        self.ctx_local = nn.Parameter(ctx[num_global:].clone())

    @property
    def ctx(self) -> torch.Tensor:
        return torch.cat([self.ctx_global, self.ctx_local], dim=0)

    def text_features(self, clip: FrozenCLIP, task: Task) -> torch.Tensor:
        """Normalised text features ``[N, C, D]`` of every (prompt, class) pair, one batched pass."""
        return encode_context(clip, prompt_template(clip, task, self.n_ctx), self.ctx)


class FedOTP(FedMethod):
    """FedOTP: a shared global prompt and a personal local prompt, combined per image by optimal transport.

    Args:
        n_ctx: context tokens per prompt (16 few-shot, 4 CIFAR-100).
        num_prompts: N, prompts per class (2).
        num_global: how many of them are global/shared (``--avg_prompt``, 1 → ``ctx[0]``).
        ot: ``cot`` (unbalanced, the default of the scripts) or ``sinkhorn`` (balanced).
        eps: entropic regularisation ε.
        top_percent: COT transported mass (prompt marginal ``top_percent/N``).
        thresh: stop when the mean change of the scaling vector is below this.
        max_iter: maximum OT iterations.
        ot_precision: ``fp32_log`` (fixed: fp32, log domain, cannot underflow) or ``official_fp16`` (reproduces
            the official fp16 solver, which yields NaN when ``exp(−C/ε)`` underflows).
        use_cls: also transport the CLS token (the official code ignores it).
        lr, momentum, weight_decay, weighted: see :class:`FedMethod`.
    """

    name = "fedotp"
    # one local_trainer (FedOTP@9948611 federated_main.py:161); round 0 in index order, then np.random.choice order
    # (federated_main.py:356-360)
    policy = DASSL_CHAIN
    image_input = "tokens"

    def __init__(self, n_ctx: int = 16, num_prompts: int = 2, num_global: int = 1, ot: OTKind = "cot",
                 eps: float = 0.1, top_percent: float = 0.8, thresh: float = 1e-3, max_iter: int = 100,
                 ot_precision: OTPrecision = "fp32_log", use_cls: bool = False, lr: float = 0.001,
                 momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        checks = [
            (n_ctx >= 1, f"method.init_args.n_ctx={n_ctx}: needs at least 1 context token"),
            (num_prompts >= 1, f"method.init_args.num_prompts={num_prompts}: needs at least 1 prompt"),
            (0 <= num_global <= num_prompts,
             f"method.init_args.num_global={num_global}: must be between 0 and num_prompts={num_prompts}"),
            (ot in ("cot", "sinkhorn"), f"method.init_args.ot={ot!r}: use 'cot' or 'sinkhorn'"),
            (ot_precision in ("fp32_log", "official_fp16"),
             f"method.init_args.ot_precision={ot_precision!r}: use 'fp32_log' or 'official_fp16'"),
            (eps > 0, f"method.init_args.eps={eps}: the entropic regularisation must be > 0"),
            (0 < top_percent <= 1, f"method.init_args.top_percent={top_percent}: a fraction in (0, 1]"),
            (max_iter >= 1, f"method.init_args.max_iter={max_iter}: needs at least 1 iteration"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FedlitError(msg)
        self.n_ctx = n_ctx
        self.num_prompts = num_prompts
        self.num_global = num_global
        self.ot = ot
        self.eps = eps
        self.top_percent = top_percent
        self.thresh = thresh
        self.max_iter = max_iter
        self.ot_precision = ot_precision
        self.use_cls = use_cls

    def build(self, clip):
        return OTPrompt(clip, self.n_ctx, self.num_prompts, self.num_global)

    def is_shared(self, key: str) -> bool:
        return key == "ctx_global"

    def prepare(self, prompt: OTPrompt, clip, task: Task):
        return prompt.text_features(clip, task)  # [N, C, D]: image-independent

    def plan(self, cost: torch.Tensor) -> torch.Tensor:
        return transport_plan(cost, self.ot, self.eps, self.top_percent, self.max_iter, self.thresh,
                              self.ot_precision)

    def logits(self, prompt: OTPrompt, clip, x: torch.Tensor, task: Task, prepared=None) -> torch.Tensor:
        text = prepared if prepared is not None else prompt.text_features(clip, task)  # [N, C, D]
        if x.dim() != 3:
            raise FedlitError("fedotp needs per-patch image tokens [B, 1+M, D] (image_input='tokens')")
        feats = (x if self.use_cls else x[:, 1:]).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        with torch.autocast(device_type=feats.device.type, enabled=False):  # similarities and plan in fp32
            sim = torch.einsum("bmd,ncd->bcmn", feats, text.float())  # [B, C, M, N]
            b, c, m, n = sim.shape
            plan = self.plan((1.0 - sim).reshape(b * c, m, n)).reshape(b, c, m, n)
            return clip.logit_scale * (plan.to(sim.dtype) * sim).sum(dim=(2, 3))
