"""The client: one LightningModule reused for every simulated client.

``ClientModule`` wraps the process's single frozen backbone and the method's prompt component. A
simulated client is *not* an object holding a model: it is its data indices plus its personal tensors,
which the orchestrator loads into this module (:meth:`load_prompt_state`), trains, and exports again
(:meth:`export`). Memory therefore grows with the number of clients only by their personal state.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from .backbones import FrozenCLIP
from .data.task import Task
from .methods.base import FedMethod


class ClientModule(L.LightningModule):
    """Frozen CLIP + a method's prompt component.

    Why a LightningModule whose hooks are called by hand: Lightning's ``Trainer``/``fabric.fit`` loop owns one
    model and one dataloader per run, while a federation trains *many* clients through *one* module, each for a
    few steps on cached features, with per-client state swapped in and out between them. So the orchestrator
    runs the local loop itself with Fabric's primitives (``fabric.autocast``, ``fabric.backward``,
    ``fabric.setup_optimizers``, ``fabric.launch``/collectives, Fabric's TensorBoard logger) and this module keeps
    Lightning's vocabulary (``forward``, ``training_step``, ``configure_optimizers``) so the method reads as
    Lightning code. It is never wrapped by ``fabric.setup`` (no DDP: different processes train different
    clients). Everything a training step depends on besides the batch is passed to it as an argument.

    Args:
        clip: the frozen backbone (shared, never copied).
        method: the method; its :meth:`~FedMethod.build` gives the trainable component.
        prox_mu, prox_detached: FedProx's term on the local loss (the run plan's; default the method's own).
    """

    def __init__(self, clip: FrozenCLIP, method: FedMethod, prox_mu: float | None = None,
                 prox_detached: bool | None = None):
        super().__init__()
        self.clip = clip
        self.method = method
        self.prox_mu = method.prox_mu if prox_mu is None else prox_mu
        self.prox_detached = method.prox_detached if prox_detached is None else prox_detached
        self.prompt = method.build(clip)

    # ------------------------------------------------------------------ state in / out
    def prompt_state(self) -> dict[str, torch.Tensor]:
        """A detached CPU copy of every tensor of the prompt component."""
        if self.prompt is None:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.prompt.state_dict().items()}

    def split_state(self, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        shared = {k: v for k, v in state.items() if self.method.is_shared(k)}
        personal = {k: v for k, v in state.items() if not self.method.is_shared(k)}
        return shared, personal

    def load_prompt_state(self, *states: dict[str, torch.Tensor]) -> None:
        """Load the union of ``states`` (e.g. global shared + the client's personal) into the component; tensors
        that are not keys of the component (a method's :meth:`~FedMethod.server_payload`) go to the method's
        :meth:`~FedMethod.receive_payload`."""
        if self.prompt is None:
            return
        merged: dict[str, torch.Tensor] = {}
        for s in states:
            merged.update(s)
        own = set(self.prompt.state_dict())
        self.method.receive_payload(self.prompt, {k: v for k, v in merged.items() if k not in own})
        merged = {k: v for k, v in merged.items() if k in own}
        missing = set(self.prompt.state_dict()) - set(merged)
        if missing:
            raise RuntimeError(f"prompt state is missing {sorted(missing)}")
        self.prompt.load_state_dict(merged, strict=True)

    def export(self) -> tuple[dict, dict]:
        """(shared, personal) tensors after local training."""
        self.method.finish_local(self.prompt)
        return self.split_state(self.prompt_state())

    # ------------------------------------------------------------------ Lightning hooks
    def forward(self, x: torch.Tensor, task: Task) -> torch.Tensor:
        return self.method.logits(self.prompt, self.clip, x, task)

    def training_step(self, batch, batch_idx: int, task: Task, classes: Sequence[int] | None = None,
                      received: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The local loss of one batch: the client trains among ``task`` and holds the classes at positions
        ``classes`` of it; ``received`` is what the server sent it this round (FedProx's anchor)."""
        x, y = batch
        loss = self.method.loss(self, x, y, task, classes=classes)
        if self.prox_mu > 0:
            loss = loss + self.proximal_term(self.prox_mu, received or {}, detached=self.prox_detached)
        return loss

    def proximal_term(self, mu: float, received: dict[str, torch.Tensor], detached: bool = False) -> torch.Tensor:
        """FedProx: ``μ/2 · Σ_k ‖θ_k − θ_k^global‖²`` over the shared tensors ``received`` this round.

        On the live parameters, so it has a gradient ``μ(θ − θ_global)``; ``detached=True`` reproduces the
        official FedOTP-codebase term computed from ``state_dict()`` (no gradient, spec §4.6).
        """
        params = dict(self.prompt.named_parameters()) if self.prompt is not None else {}
        term = torch.zeros((), device=self.device)
        for k, g in received.items():
            if k in params:
                p = params[k].detach() if detached else params[k]
                term = term + (p.float() - g.to(p.device).float()).pow(2).sum()
        return 0.5 * mu * term

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.prompt.parameters() if p.requires_grad]
        return self.method.configure_optimizer(params)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimiser's per-parameter state as flat CPU tensors ``"<param index>/<name>"`` (e.g. SGD's
    ``0/momentum_buffer``), for keeping it with a client between rounds and in safetensors checkpoints."""
    out = {}
    for i, st in optimizer.state_dict()["state"].items():
        for name, v in st.items():
            if v is None:
                continue
            out[f"{i}/{name}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().to("cpu").clone()
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_state_tensors` (keys without a ``/`` — e.g. ``participations`` — are skipped)."""
    sd = optimizer.state_dict()
    state: dict[int, dict] = {}
    for key, v in flat.items():
        if "/" in key:
            i, name = key.split("/", 1)
            state.setdefault(int(i), {})[name] = v.clone()  # the optimiser steps in place: keep the client's own
    sd["state"] = state
    optimizer.load_state_dict(sd)
