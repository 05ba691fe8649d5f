"""The round loop, on Lightning Fabric. Reads top to bottom:

    the round protocol picks the clients and what each is sent (:mod:`fedlit.rounds`) → shard them over processes
    for each client of my shard: load what it was sent + its own state → local steps (autocast) → an Update
    gather the updates → the protocol aggregates them (method.aggregate) and keeps each client's state
    evaluate (Local / Base / Novel / HM per client and overall) → TensorBoard → results.json

One backbone per process; one :class:`~fedlit.client.ClientModule` per process reused for every client;
a client is its data indices plus its :class:`~fedlit.rounds.ClientState`. Client modules are never DDP-wrapped:
different processes train different clients, and results do not depend on the number of processes (every random
draw is a function of ``(seed, round, client)``).
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from . import checkpoint as ckpt
from .atomic import write_json_atomic
from .backbones import FrozenCLIP
from .callbacks import TensorBoard, default_callbacks
from .client import ClientModule
from .data.federation import Federation
from .data.registry import unnormalised
from .engine import ClientRuntime, Clients, LocalRun, train_alone
from .dp_sgd import client_sizes, privacy_report
from .errors import FedlitError
from .evaluation import Evaluator, summarize_clients
from .features import FeatureBank
from .heap import release_free_memory
from .methods.base import FedMethod, Update
from .metrics import STATISTIC_LABELS, harmonic_mean, history_statistics, selected_values
from .optimizer_state import OptimizerLifecycle, training_order
from .rounds import ClientState, RoundProtocol, shard
from .run_plan import RunPlan
from .steps import make_stepper
from .trainer import FedTrainer


class Orchestrator:
    """Runs one federation: ``Orchestrator(...).fit(run_dir)`` returns the results dict also written there.

    Construction builds everything that can fail on user input (the method's component, the feature bank),
    so a run directory is only created once the run can start.
    """

    def __init__(self, fabric: L.Fabric, clip: FrozenCLIP, federation: Federation, method: FedMethod,
                 trainer: FedTrainer, seed: int, meta: dict | None = None, callbacks: list | None = None):
        federation = method.arrange_clients(federation)  # Central: pooled training data
        self.plan = plan = RunPlan.resolve(trainer, method, world_size=fabric.world_size, clip=clip,
                                           train_rows=len(federation.data.train),
                                           client_sizes=tuple(client_sizes(trainer, federation.clients).values()))
        self.fabric, self.clip, self.fed, self.method, self.cfg = fabric, clip, federation, method, trainer
        self.seed, self.meta = seed, dict(meta or {})
        self.run_dir: Path | None = None
        if method.text_classifier and not getattr(clip, "has_text", True):
            raise FedlitError(f"method '{method.name}' classifies with text prompts, but backbone {clip.name} has no "
                              f"text tower; use a CLIP backbone (e.g. ViT-B-16) or an image-prompt method")
        tasks = {federation.task_of(c.cid).classnames for c in federation.clients}
        if not method.text_classifier and len(tasks) > 1:
            raise FedlitError(f"method '{method.name}' classifies with a linear head over one class list, but the "
                              f"clients train among {len(tasks)} different class lists (several datasets); use a "
                              f"text-prompt method, or one dataset / partition: domain")
        method.setup_federation(federation.train_task, len(federation.clients))
        method.plan_rounds(trainer, [c.num_samples for c in federation.clients])
        self.module = self.new_module()
        if fabric.global_rank == 0:
            for line in (plan.describe(), *plan.notes):
                print(f"fedlit: {line}")
        train = federation.data.train if trainer.train_pixel_norm == "clip" else unnormalised(federation.data.train)
        self.bank = FeatureBank(clip, {"train": train, "test": federation.data.test},
                                autocast=fabric.autocast,
                                kind=method.image_input, cache=trainer.feature_cache, cache_dir=trainer.cache_dir,
                                augment_views=trainer.augment_views, seed=seed, local_epochs=trainer.local_epochs,
                                epoch_views=plan.epoch_views, cache_views=plan.cache_views)
        self.bank.expect("train", np.concatenate([c.train_idx for c in federation.clients]))
        self.bank.expect("test", np.concatenate([c.test_idx for c in federation.clients]
                                                + [ev.idx for ev in federation.evals.values()]))
        self.evaluator = Evaluator(federation, method, self.module, self.bank, self.load_client_model,
                                   trainer.eval_batch_size, fabric.autocast)
        shared, personal = self.module.export()
        self.init_personal = personal  # every client starts from the same initial personal tensors
        self.optim = OptimizerLifecycle(plan.optimizer_state, method)  # the optimiser-state store
        self.runtime = ClientRuntime(fabric, federation, self.bank, method, plan, seed, personal, self.optim)
        self.clients = Clients(self.runtime, self.module, self.new_module, verbose=fabric.global_rank == 0)
        self.protocol = RoundProtocol(method, trainer, seed, [c.num_samples for c in federation.clients], shared,
                                      verbose=fabric.global_rank == 0)
        self.history: list[dict] = []
        self.best_eval: dict = {}  # the evaluation of the best mean Local so far (ties: the later), all its clients
        self.cumulative_bytes = 0  # up + down over all finished rounds (kept in the checkpoint's extra)
        self.callbacks = default_callbacks() if callbacks is None else list(callbacks)
        self.stepper = make_stepper(self.runtime, self.protocol, self.module)  # sync=step: FedSGD (fedlit.steps)
        self.ood = None  # the ``ood:`` section's evaluator (fedlit.ood.OODEvaluator), set by experiment.build

    def new_module(self) -> ClientModule:
        """A client module of this run (the backbone shared; FedProx's term as the plan says)."""
        return ClientModule(self.clip, self.method, self.plan.prox_mu, self.plan.prox_detached).to(self.fabric.device)

    def call(self, hook: str, **kwargs) -> None:
        """Every callback's ``hook`` (:mod:`fedlit.callbacks`), in order."""
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, **kwargs)

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        return self.protocol.global_state

    # ------------------------------------------------------------------------------------ the loop
    def fit(self, run_dir: str | Path, resume: ckpt.RunState | None = None) -> dict:
        t0, start, metrics = time.time(), 0, {}
        if resume is not None:
            start, metrics = self.restore(resume), resume.extra.get("metrics", {})
        self.open_run(run_dir, start)
        self.call("on_fit_start", start=start)
        for rnd in range(start, self.cfg.rounds):
            loss = self.train_round(rnd) if self.method.trainable else None
            if self.protocol.eval_due(rnd):
                metrics = self.evaluate(rnd)
            self.call("on_round_end", rnd=rnd, metrics=metrics, loss=loss)  # checkpoint, progress
            if not self.method.trainable:  # nothing changes between rounds: one evaluation is the result
                break
        self.call("on_fit_end")
        self.bank.flush()  # disk cache: the rows this run encoded are claimed now, for the next cell of a grid
        return self.finish(metrics, time.time() - t0)

    def train_round(self, rnd: int) -> float:
        """The protocol's clients and payloads → my shard's local updates → all updates → aggregation → logs.
        Returns the round's mean training loss."""
        if self.stepper is not None:
            return self.log_round(rnd, *self.stepper.run_round(rnd))
        sent = self.protocol.configure(rnd)
        mine = shard(list(sent), self.fabric.global_rank, self.fabric.world_size)
        if self.plan.optimizer_state == "chain":  # one optimiser state handed on: the official order matters
            mine = training_order(self.seed, rnd, mine, self.plan.train_order == "drawn", self.cfg.first_round_all)
        updates = self.apply(self._gather(self.clients.train(mine, rnd, sent, self.protocol.state_of)))
        return self.log_round(rnd, list(sent), updates)

    def apply(self, updates: list[Update]) -> list[Update]:
        """The round's updates into the global state and the clients' states (:meth:`RoundProtocol.aggregate`)."""
        return self.protocol.aggregate(updates)

    def open_run(self, run_dir: str | Path, start: int = 0) -> None:
        """Where the run writes (``results.json``, TensorBoard on rank 0); ``start`` rounds are already done."""
        self.run_dir = Path(run_dir)
        self.call("on_run_open", run_dir=self.run_dir, start=start)

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, rounds_done: int, metrics: dict) -> None:
        if self.fabric.global_rank != 0:
            return
        for cb in self.callbacks:  # scalars up to this round are on disk before the checkpoint is
            if isinstance(cb, TensorBoard):
                cb.flush()
        personal = {}  # optimiser state is personal too: stored as personal/<cid>/optim/…
        for c, st in self.protocol.clients.items():
            personal[c] = {**st.personal, **{f"optim/{k}": v for k, v in st.optim.items()}}
        state = ckpt.RunState(round=rounds_done, global_state=self.global_state, personal=personal,
                              server={**self.method.server_state_dict(), **self.optim.state(),
                                      **(self.stepper.state() if self.stepper else {})},
                              bank=self.protocol.bank, history=self.history,
                              identity=self.meta.get("identity", {}),
                              extra={"metrics": _jsonable(metrics), "cumulative_bytes": self.cumulative_bytes,
                                     "best_metrics": _jsonable(self.best_eval)})
        ckpt.save(self.run_dir / ckpt.NAME, state)

    def restore(self, state: ckpt.RunState) -> int:
        """Load a checkpoint's state; returns the number of finished rounds."""
        expected = set(self.global_state)
        if set(state.global_state) != expected:
            raise FedlitError(f"checkpoint holds shared tensors {sorted(state.global_state)} but the method has "
                              f"{sorted(expected)}; it was written by another method configuration")
        self.protocol.global_state = dict(state.global_state)
        self.protocol.clients = {}
        for c, tensors in state.personal.items():
            own = {k: v for k, v in tensors.items() if not k.startswith("optim/")}
            optim = {k[len("optim/"):]: v for k, v in tensors.items() if k.startswith("optim/")}
            self.protocol.load(int(c), ClientState(own, optim))
        server = self.optim.load_state(state.server)
        server = self.stepper.load_state(server) if self.stepper else server
        self.method.load_server_state_dict(server)
        self.protocol.bank = {int(c): dict(t) for c, t in state.bank.items()}
        self.history = list(state.history)
        self.cumulative_bytes = int(state.extra.get("cumulative_bytes", 0))
        self.best_eval = dict(state.extra.get("best_metrics") or {})
        return state.round

    # ------------------------------------------------------------------------------------ one client
    def safe_update(self, cid: int, rnd: int, sent: dict[str, torch.Tensor] | None = None) -> Update:
        """Client ``cid``'s round through the client engine (:class:`fedlit.engine.Clients`: a raising client is a
        failed update); ``sent``: what it was sent (default: the protocol's payload for it)."""
        return self.clients.update(cid, rnd, self.protocol.payload(cid) if sent is None else sent,
                                   self.protocol.state_of(cid))

    def local_update(self, cid: int, rnd: int, sent: dict[str, torch.Tensor] | None = None) -> Update:
        """Load (``sent`` ∪ the client's personal state) → ``local_epochs`` passes over its data → an Update."""
        sent = self.protocol.payload(cid) if sent is None else sent
        return train_alone(self.fabric, LocalRun(self.runtime, self.module, cid, rnd, sent, self.protocol.state_of(cid)))

    def train_clients(self, cids: list[int], rnd: int, sent: dict[int, dict[str, torch.Tensor]]) -> list[Update]:
        """This process's clients of the round (one at a time or in lock-step, :class:`fedlit.engine.Clients`)."""
        return self.clients.train(cids, rnd, sent, self.protocol.state_of)

    def _client_optimizer(self, own: ClientState, module: ClientModule | None = None):
        """The optimiser of one client-round (:meth:`fedlit.engine.ClientRuntime.optimizer`)."""
        return self.runtime.optimizer(self.module if module is None else module, own)

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self, rnd: int) -> dict:
        """Local / Base / Novel per client (:mod:`fedlit.evaluation`; the two protocols in :mod:`fedlit.metrics`):
        this process's share of the clients, gathered, then recorded."""
        mine = shard(self.protocol.evaluated(), self.fabric.global_rank, self.fabric.world_size)
        part = self.evaluate_clients(mine)
        if self.ood is not None and self.ood.due(rnd):  # ID / CACC / FPR95 / AUROC (fedlit.ood)
            for c, res in self.ood.evaluate(mine).items():
                part[c].update(res)
        per_client = {c: r for part in self._gather_objects(part) for c, r in part.items()}
        return self.record_evaluation(per_client, rnd)

    def evaluate_clients(self, cids: list[int]) -> dict[int, dict[str, float]]:
        """Per-client results of ``cids`` under the method's protocol (no logging, no ``hm``)."""
        if self.method.eval_protocol == "global":
            return self.evaluator.global_(cids)
        return self.evaluator.personalized(cids, self.protocol.has_personal)

    def record_evaluation(self, per_client: dict[int, dict[str, float]], rnd: int) -> dict:
        """Every client's results → ``hm`` per client, means (per group), history, TensorBoard; the round's metrics."""
        for res in per_client.values():
            res["hm"] = harmonic_mean([res[k] for k in ("local", "base", "novel") if k in res])
        mean, per_group = summarize_clients(per_client, self.fed)
        self.history.append({"round": rnd + 1, **mean})
        scalars = {f"eval/{k}": v for k, v in mean.items()}
        for g, res in per_group.items():
            scalars.update({f"eval_group/{k}/{g}": v for k, v in res.items()})
        reference = dict(scalars)
        for cid, res in sorted(per_client.items()):
            scalars.update({f"eval_client/{k}/client_{cid:03d}": v for k, v in res.items()})
        self.call("on_scalars", scalars=scalars, step=rnd + 1)
        if not self.method.trainable:  # one evaluation (zero-shot): a flat reference line over the rounds, as in plot
            for step in range(rnd + 2, self.cfg.rounds + 1):
                self.call("on_scalars", scalars=reference, step=step)
        self.call("on_evaluation", per_client=per_client, step=rnd + 1)
        out = {"round": rnd + 1, "mean": mean, "per_client": per_client}
        if per_group:
            out["per_group"] = per_group
        key = "local" if "local" in mean else "hm"  # as fedlit.metrics.history_statistics picks the best round
        if not self.best_eval or mean.get(key, float("nan")) >= self.best_eval["mean"].get(key, float("-inf")):
            self.best_eval = out
        return out

    def load_client_model(self, cid: int | None) -> None:
        """Load client ``cid``'s model (``None``: the global model with initial personal state)."""
        sent = self.global_state if cid is None else self.protocol.payload(cid)
        personal = (None if cid is None else self.protocol.state_of(cid).personal) or self.init_personal
        self.module.load_prompt_state(sent, personal)
        self.module.eval()
        release_free_memory()

    # ------------------------------------------------------------------------------------ plumbing
    def _gather(self, updates: list[Update]) -> list[Update]:
        return [u for part in self._gather_objects(updates) for u in part]

    def _gather_objects(self, obj):
        if self.fabric.world_size == 1:
            return [obj]
        out = [None] * self.fabric.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def log_round(self, rnd: int, selected: list[int], updates: list[Update]) -> float:
        """The round's scalars to TensorBoard; returns its mean training loss."""
        scalars = self.protocol.round_scalars(selected, updates, self.stepper.steps_per_round if self.stepper else 1)
        self.cumulative_bytes += scalars["transfer/bytes_up"] + scalars["transfer/bytes_down"]
        scalars["transfer/cumulative_bytes"] = self.cumulative_bytes
        scalars.update({f"train_client/loss/client_{u.cid:03d}": u.loss for u in updates if u.ok and u.steps})
        self.call("on_scalars", scalars=scalars, step=rnd + 1)
        return scalars["train/loss"]

    def client_groups(self) -> dict[str, str]:
        """Each client's domain / dataset in a run of several (figure labels), {} in a run of one."""
        groups = {str(c.cid): c.group for c in self.fed.clients}
        return groups if len(set(groups.values())) > 1 else {}

    def hparams(self) -> dict[str, int | float | str | bool]:
        """TensorBoard's HParams view of this run (:func:`fedlit.settings.hparams`)."""
        from .settings import hparams

        return hparams(self.method, self.cfg, self.meta, self.seed, self.plan)

    def finish(self, metrics: dict, wall: float) -> dict:
        """``results.json``: ``final`` = the ``selection`` statistic of the history (``trainer.statistic``; every
        statistic under ``statistics``); ``per_client`` / ``per_group`` of the round ``final`` comes from
        (``per_client_round``; the last round for ``max`` / ``last5_mean``, which no single round holds)."""
        stats = history_statistics(self.history)
        selection = self.plan.statistic
        chosen = self.best_eval if selection == "best_local" and self.best_eval else metrics
        results = {
            **self.meta,
            "method": self.method.name,
            "seed": self.seed,
            "run_dir": str(self.run_dir),
            "selection": selection,
            "final": selected_values(stats, selection) or metrics.get("mean", {}),
            "final_round": stats.get(selection, {}).get("round"),
            "statistics": stats,
            "per_client_round": chosen.get("round"),
            "per_client": {str(c): r for c, r in sorted(chosen.get("per_client", {}).items(), key=lambda cr: int(cr[0]))},
            "per_group": chosen.get("per_group", {}),
            "client_groups": self.client_groups(),
            "history": self.history,
            "wall_time_s": round(wall, 2),
            "images_encoded": self.bank.encoded,
            "sync": self.plan.sync,
            "optimizer_state": self.plan.optimizer_state,
            **({"step_loop": self.cfg.step_policies(self.method)} if self.plan.sync == "step" else {}),
            "plan": self.plan.as_dict(),
            "plan_digest": self.plan.digest(),
            **self.method.run_report(),
            **(privacy_report(self.cfg, client_sizes(self.cfg, self.fed.clients), self.protocol.clients,
                              self.plan.noise_multiplier)
               if self.cfg.privacy is not None else {}),  # trainer.privacy: each client's ε (fedlit.dp_sgd)
            **(self.ood.report() if self.ood is not None else {}),
        }
        if self.fabric.global_rank == 0:
            self.call("on_finish", results=results)  # TensorBoard's HParams view
            write_json_atomic(self.run_dir / "results.json", results)
        return results


def _jsonable(metrics: dict) -> dict:
    """Metrics with int client keys turned into strings (JSON)."""
    out = dict(metrics)
    if "per_client" in out:
        out["per_client"] = {str(k): v for k, v in out["per_client"].items()}
    return out


def format_final(results: dict) -> str:
    """``method: Local … Base … Novel … HM …`` of ``final``; where that is not the last round, the statistic named
    and the last round's values beside it."""
    def values(f: dict) -> str:
        return "  ".join(f"{k.capitalize() if k != 'hm' else 'HM'} {f[k]:.2f}"
                         for k in ("local", "base", "novel", "hm") if k in f)

    f, sel = results.get("final", {}), results.get("selection", "last_round")
    if not values(f):
        return "no evaluation"
    line = f"{results.get('method')}: {values(f)}"
    last = (results.get("statistics") or {}).get("last_round")
    if sel != "last_round" and last and len(results.get("history") or []) > 1:  # zero-shot: one evaluation
        where = f" {results['final_round']}" if results.get("final_round") else ""
        same = results.get("final_round") == last["round"]
        line += (f"  ({STATISTIC_LABELS.get(sel, sel)}{where} = the last)" if same else
                 f"  ({STATISTIC_LABELS.get(sel, sel)}{where}; last round {last['round']}: {values(last)})")
    return line


__all__ = ["Orchestrator", "format_final"]
