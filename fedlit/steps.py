"""Step-synchronous rounds (FedSGD): the round loop's second mode (``trainer.sync: step``, or a method whose
``sync`` is ``step``, DP-FPL). Any method runs in it.

A round is ``S`` synchronous steps. At every step, for each selected client in client order: load the ONE global
copy of the shared tensors and the client's personal ones → the method's ``prepare_step`` (DP-FPL factorises its
local prompt) → the loss of the client's next batch → backward → the method's ``client_gradient`` (DP-FPL: clip,
local noise). Then the server combines the clients' shared gradients (``server_gradient``: their mean; DP-FPL adds
noise), the global shared tensors take one optimiser step with it, and every client steps its personal tensors
with its own gradient. Every client would apply the same averaged gradient with the same optimiser to identical
copies of the shared tensors, so fedlit keeps one copy and one optimiser state for them (the server's).

- **Data.** Every client trains on a fixed subset of ``n_min`` of its samples (``n_min``: the smallest client's
  count; the subset is drawn once from (seed, client), all samples in order when the client holds ``n_min``), as
  DP-FPL's ``useall`` truncation does, so all clients have the same number of batches:
  ``S = local_epochs × batches(n_min)`` (``trainer.drop_last`` applies). Each epoch reshuffles the subset from
  (seed, round, client, epoch) exactly as a round-mode client does, so one client without noise in step mode is
  local SGD on that client (tested against round mode).
- **Loop policies** (:meth:`~fedlit.trainer.FedTrainer.step_policies`; ``method`` → the method's
  ``loop_defaults``, DP-FPL's official loop). ``optimizer_state``: ``per_client`` (the generic default) — the
  shared tensors' state (momentum) is the server's, each client's personal state its own
  (:class:`~fedlit.rounds.ClientState` ``optim``); ``chain`` — one state for every tensor of every client, stepped
  client after client (every client then keeps its own copy of the shared tensors, in its personal state; the
  global copy is the last client's); ``fresh`` — none carried. States are kept across rounds and in checkpoints.
  ``step_start``: ``previous`` (FedSGD) or ``round`` (every step from the round's starting weights, so only the
  round's last step is kept). ``personal_grad``: ``own`` or ``last_client`` (every client's personal tensors take
  the last client's gradient of the step).
- **Limits.** One process: ``devices``/``num_nodes`` > 1 raise. A client that raises or whose loss is not finite
  stops the run (``on_client_failure`` does not apply: a synchronous step cannot proceed without it). Methods that
  send clients different tensors (pFedPG) are refused. Communication counts S exchanges per round.
"""

from __future__ import annotations

import numpy as np
import torch

from .client import load_optimizer_state, optimizer_state_tensors
from .errors import FedlitError
from .methods.base import FedMethod, StepPlan, Update
from .privacy import per_sample_gradients
from .rounds import ClientState

Tensors = dict[str, torch.Tensor]


def make_stepper(orch) -> StepSync | None:
    """The orchestrator's step runner when its run is step-synchronous, else ``None`` (with the one-line errors)."""
    method, cfg = orch.method, orch.cfg
    mode = cfg.sync_of(method)
    if method.sync == "step" and mode != "step":
        raise FedlitError(f"method '{method.name}' exchanges gradients every batch step: it needs trainer.sync=step "
                          f"(or method), not {cfg.sync!r}")
    if mode != "step" or not method.trainable:
        return None
    return StepSync(orch)


def subset(seed: int, cid: int, num_samples: int, n: int) -> np.ndarray:
    """The ``n`` sample positions client ``cid`` trains on in step mode (all, in order, when it holds ``n``)."""
    if n >= num_samples:
        return np.arange(num_samples)
    return np.sort(np.random.default_rng([seed, cid, 0x57E9]).choice(num_samples, size=n, replace=False))


def generator(*key: int) -> torch.Generator:
    """A CPU random stream that is a function of ``key`` only (non-negative ints)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1))


def sgd_step(method: FedMethod, tensors: Tensors, grads: Tensors, state: Tensors) -> tuple[Tensors, Tensors]:
    """One step of the method's optimiser on ``tensors`` with ``grads`` (only the keys that have one) from optimiser
    ``state`` (flat, as :func:`~fedlit.client.optimizer_state_tensors`). Returns (new tensors, new state)."""
    if not grads:
        return tensors, state
    keys = sorted(grads)
    params = [torch.nn.Parameter(tensors[k].detach().clone()) for k in keys]
    opt = method.configure_optimizer(params)
    if state:
        load_optimizer_state(opt, state)
    for k, p in zip(keys, params):
        p.grad = grads[k].to(p.device, p.dtype)
    opt.step()
    return {**tensors, **{k: p.detach() for k, p in zip(keys, params)}}, optimizer_state_tensors(opt)


class StepSync:
    """Runs the rounds of one step-synchronous federation through the orchestrator's module, data and protocol."""

    def __init__(self, orch):
        self.o = orch
        cfg, fed, method = orch.cfg, orch.fed, orch.method
        if orch.fabric.world_size > 1:
            raise FedlitError("trainer.sync=step runs in one process for now: set trainer.devices=1 and num_nodes=1")
        if method.client_specific:
            raise FedlitError(f"method '{method.name}' sends each client its own tensors; trainer.sync=step needs one "
                              f"global copy of the shared tensors (use trainer.sync=round)")
        self.n = min(c.num_samples for c in fed.clients)
        if self.n < 1:
            raise FedlitError("trainer.sync=step needs training data on every client (a client holds none)")
        self.subsets = {c.cid: subset(orch.seed, c.cid, c.num_samples, self.n) for c in fed.clients}
        self.starts = list(cfg.batch_starts(self.n, cfg.drop_last_of(method)))
        self.steps_per_round = cfg.local_epochs * len(self.starts)
        self.server_optim: Tensors = {}
        self.policies = cfg.step_policies(method)
        method.plan_steps(StepPlan(cfg.rounds, self.steps_per_round, min(cfg.batch_size, self.n),
                                   len(orch.protocol.select(cfg.rounds - 1)), self.n, cfg.batch_size))

    # ------------------------------------------------------------------------------------ checkpoints
    def state(self) -> Tensors:
        return {f"sync/{k}": v for k, v in self.server_optim.items()}

    def load_state(self, server: Tensors) -> Tensors:
        """Take this runner's entries out of a checkpoint's server tensors; returns the others."""
        self.server_optim = {k[5:]: v for k, v in server.items() if k.startswith("sync/")}
        return {k: v for k, v in server.items() if not k.startswith("sync/")}

    # ------------------------------------------------------------------------------------ a round
    def run_round(self, rnd: int) -> tuple[list[int], list[Update]]:
        """The round's ``S`` synchronous steps under the run's loop policies (:meth:`FedTrainer.step_policies`).
        Returns (selected clients, one Update per client: loss, steps)."""
        o, method, cfg = self.o, self.o.method, self.o.cfg
        pol = self.policies
        chain, fresh = pol["optimizer_state"] == "chain", pol["optimizer_state"] == "fresh"
        cids = list(o.protocol.configure(rnd))
        shared = dict(o.protocol.global_state)
        personal = {c: dict(o.protocol.state_of(c).personal or o.init_personal) for c in cids}
        if chain:  # every client steps its own copy of the shared tensors with the one chained state
            personal = {c: {**shared, **p} for c, p in personal.items()}
        optim = {c: dict(o.protocol.state_of(c).optim) for c in cids}
        start = (dict(shared), {c: dict(p) for c, p in personal.items()})
        losses: dict[int, list[float]] = {c: [] for c in cids}
        o.module.train()
        step = 0
        for epoch in range(cfg.local_epochs):
            orders = {c: np.random.default_rng([o.seed, rnd, c, epoch]).permutation(self.n) for c in cids}
            for s in self.starts:
                if pol["step_start"] == "round":  # every forward from the round's weights (DP-FPL's loop)
                    shared, personal = dict(start[0]), {c: dict(p) for c, p in start[1].items()}
                sent, own = [], {}
                for c in cids:
                    view = {**shared, **{k: v for k, v in personal[c].items() if k in shared}}
                    g, fwd, loss = self.client_step(c, rnd, epoch, step, view, personal[c],
                                                    orders[c][s : s + cfg.batch_size])
                    personal[c] = {**{k: personal[c][k] for k in shared if k in personal[c]}, **fwd}
                    sent.append({k: v for k, v in g.items() if k in shared})
                    own[c] = {k: v for k, v in g.items() if k not in shared}
                    losses[c].append(loss)
                g = method.server_gradient(sent, [self.n] * len(cids), generator(o.seed, rnd, step, 0x5E7))
                if pol["personal_grad"] == "last_client":  # DP-FPL's model_update(): the last forward's .grad
                    own = {c: own[cids[-1]] for c in cids}
                if chain:
                    for c in cids:
                        personal[c], self.server_optim = sgd_step(method, personal[c], {**g, **own[c]},
                                                                  self.server_optim)
                    shared = {**shared, **{k: personal[cids[-1]][k].clone() for k in shared}}
                else:
                    shared, st = sgd_step(method, shared, g, {} if fresh else self.server_optim)
                    self.server_optim = {} if fresh else st
                    for c in cids:
                        personal[c], st = sgd_step(method, personal[c], own[c], {} if fresh else optim[c])
                        optim[c] = {} if fresh else st
                step += 1
        o.protocol.global_state = shared
        updates = []
        for c in cids:
            o.protocol.load(c, ClientState(personal[c], optim[c]))
            updates.append(Update(c, {}, personal[c], self.n, float(np.mean(losses[c])), step))
        return cids, updates

    def client_step(self, cid: int, rnd: int, epoch: int, step: int, shared: Tensors, own: Tensors,
                    rows: np.ndarray) -> tuple[Tensors, Tensors, float]:
        """Client ``cid``'s gradient on its batch ``rows`` (positions in its step-mode subset), after the method's
        ``client_gradient``. Returns (gradients on CPU, its personal tensors after the forward, the loss)."""
        o, m, method = self.o, self.o.module, self.o.method
        client, dev = o.fed.clients[cid], o.fabric.device
        m.load_prompt_state(shared, own)
        gen = generator(o.seed, rnd, step, cid, 0xC11)
        with torch.no_grad():
            method.prepare_step(m.prompt, gen)
        idx = self.subsets[cid][rows]
        task, classes = o.fed.task_of(cid), o.fed.held_classes(cid)
        x = o.bank.inputs("train", client.train_idx[idx],
                          views=o.bank.train_views((o.seed, rnd, cid, epoch), client.num_samples, idx))
        y = torch.as_tensor(client.train_y, device=dev)[idx]
        sent = {k: v.to(dev) for k, v in shared.items()}
        if method.per_sample_gradients and getattr(method, "per_sample_text_side", False) and not method.prox_mu:
            with o.fabric.autocast():  # one text forward, one batched backward (fedlit.privacy)
                grads, per_loss = per_sample_gradients(m, x, y, task)
            m.prompt.zero_grad(set_to_none=True)
            if not torch.isfinite(per_loss).all():
                raise FedlitError(f"client {cid}: loss became {per_loss.mean().item()} in round {rnd + 1}, step "
                                  f"{step + 1} (trainer.sync=step cannot leave a client out of a synchronous step)")
            grads = {k: g.to("cpu") for k, g in grads.items()}
            return method.client_gradient(m.prompt, grads, gen), m.export()[1], float(per_loss.mean())
        # per-sample mode, generic: B one-sample losses, gradients stacked [B, ...]; loss = their mean
        parts = [(x[i : i + 1], y[i : i + 1]) for i in range(len(y))] if method.per_sample_gradients else [(x, y)]
        per, losses = [], []
        for batch in parts:
            with o.fabric.autocast():
                loss = m.training_step(batch, step, task, classes, sent)
            if not torch.isfinite(loss):
                raise FedlitError(f"client {cid}: loss became {loss.item()} in round {rnd + 1}, step {step + 1} "
                                  f"(trainer.sync=step cannot leave a client out of a synchronous step)")
            o.fabric.backward(loss)
            per.append(self._grads(m))
            losses.append(loss.item())
        grads = {k: torch.stack([g[k] for g in per]) for k in per[0]} if method.per_sample_gradients else per[0]
        grads = method.client_gradient(m.prompt, grads, gen)
        return grads, m.export()[1], float(np.mean(losses))

    @staticmethod
    def _grads(m) -> Tensors:
        grads = {k: p.grad.detach().to("cpu", copy=True) for k, p in m.prompt.named_parameters() if p.grad is not None}
        m.prompt.zero_grad(set_to_none=True)
        return grads


__all__ = ["StepSync", "generator", "make_stepper", "sgd_step", "subset"]
