"""The round loop, on Lightning Fabric. Reads top to bottom:

    sample clients (a pure function of seed and round) → shard them over processes
    for each client of my shard: load global + personal state → local steps (autocast) → export update
    gather updates → method.aggregate() → new global state; personal state back to its client
    evaluate (Local / Base / Novel / HM per client and overall) → TensorBoard → results.json

One backbone per process; one :class:`~fedlit.client.ClientModule` per process reused for every client;
a client is its data indices plus its personal tensors. Client modules are never DDP-wrapped: different
processes train different clients, and results do not depend on the number of processes (every random
draw is a function of ``(seed, round, client)``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.loggers import TensorBoardLogger

from . import checkpoint as ckpt
from .backbones import FrozenCLIP
from .client import ClientModule, load_optimizer_state, optimizer_state_tensors
from .data.federation import Federation
from .errors import FedlitError
from .evaluation import Evaluator, summarize_clients
from .features import FeatureBank
from .methods.base import FedMethod, Update
from .metrics import harmonic_mean
from .trainer import FedTrainer  # noqa: F401  (re-exported: the trainer section of a config)


def sample_clients(seed: int, rnd: int, num_clients: int, participation: float, first_round_all: bool = True) -> list[int]:
    """Clients of round ``rnd``: ``max(int(participation·K), 1)`` drawn without replacement, sorted.

    With ``first_round_all`` every client trains in round 0 (FedPGP/FedOTP), so each has personal state.
    """
    if participation >= 1.0 or (first_round_all and rnd == 0):
        return list(range(num_clients))
    m = max(int(participation * num_clients), 1)
    rng = np.random.default_rng([seed, rnd, 0x5A])
    return sorted(rng.choice(num_clients, size=m, replace=False).tolist())


def shard(items: list[int], rank: int, world_size: int) -> list[int]:
    """The items a process handles: round-robin, so every rank gets a near-equal share."""
    return items[rank::world_size]


class Orchestrator:
    """Runs one federation: ``Orchestrator(...).fit(run_dir)`` returns the results dict also written there.

    Construction builds everything that can fail on user input (the method's component, the feature bank),
    so a run directory is only created once the run can start.
    """

    def __init__(self, fabric: L.Fabric, clip: FrozenCLIP, federation: Federation, method: FedMethod,
                 trainer: FedTrainer, seed: int, meta: dict | None = None):
        federation = method.arrange_clients(federation)  # Central: pooled training data
        self.fabric, self.clip, self.fed, self.method, self.cfg = fabric, clip, federation, method, trainer
        self.seed, self.meta = seed, dict(meta or {})
        self.run_dir: Path | None = None
        if trainer.prox_mu > 0:
            method.prox_mu = trainer.prox_mu
        if method.text_classifier and not getattr(clip, "has_text", True):
            raise FedlitError(f"method '{method.name}' classifies with text prompts, but backbone {clip.name} has no "
                              f"text tower; use a CLIP backbone (e.g. ViT-B-16) or an image-prompt method")
        tasks = {federation.task_of(c.cid).classnames for c in federation.clients}
        if not method.text_classifier and len(tasks) > 1:
            raise FedlitError(f"method '{method.name}' classifies with a linear head over one class list, but the "
                              f"clients train among {len(tasks)} different class lists (several datasets); use a "
                              f"text-prompt method, or one dataset / partition: domain")
        method.setup_federation(federation.train_task, len(federation.clients))
        self.module = ClientModule(clip, method).to(fabric.device)
        self.bank = FeatureBank(clip, {"train": federation.data.train, "test": federation.data.test},
                                autocast=fabric.autocast,
                                kind=method.image_input, cache=trainer.feature_cache, cache_dir=trainer.cache_dir,
                                augment_views=trainer.augment_views, seed=seed)
        self.bank.expect("train", np.concatenate([c.train_idx for c in federation.clients]))
        self.bank.expect("test", np.concatenate([c.test_idx for c in federation.clients]
                                                + [ev.idx for ev in federation.evals.values()]))
        self.evaluator = Evaluator(federation, method, self.module, self.bank, self._client_model,
                                   trainer.eval_batch_size, fabric.autocast)
        shared, personal = self.module.export()
        self.global_state: dict[str, torch.Tensor] = shared
        self.init_personal = personal  # every client starts from the same initial personal tensors
        self.personal: dict[int, dict[str, torch.Tensor]] = {}  # only clients that trained hold state
        self.client_optim: dict[int, dict[str, torch.Tensor]] = {}  # per-client optimiser state / schedule step
        self.history: list[dict] = []
        self.cumulative_bytes = 0  # up + down over all finished rounds (kept in the checkpoint's extra)
        self.logger: TensorBoardLogger | None = None  # written by rank 0 only


    # ------------------------------------------------------------------------------------ the loop
    def fit(self, run_dir: str | Path, resume: ckpt.RunState | None = None) -> dict:
        fab, cfg, t0 = self.fabric, self.cfg, time.time()
        self.run_dir = Path(run_dir)
        start, metrics = 0, {}
        if resume is not None:
            start, metrics = self.restore(resume), resume.extra.get("metrics", {})
        if fab.global_rank == 0:  # purge_step drops scalars a killed run logged after its last checkpoint
            self.logger = TensorBoardLogger(root_dir=str(self.run_dir), name="tensorboard", version="",
                                            default_hp_metric=False, purge_step=start + 1 if start else None)
        K = len(self.fed.clients)
        bar = self._progress(cfg.rounds * 1)
        if bar is not None and start:
            bar.update(start)
        for rnd in range(start, cfg.rounds):
            selected = sample_clients(self.seed, rnd, K, cfg.participation, cfg.first_round_all)
            if self.method.trainable:
                mine = shard(selected, fab.global_rank, fab.world_size)
                updates = self._gather([self.safe_update(cid, rnd) for cid in mine])
                updates.sort(key=lambda u: u.cid)
                self.apply(updates)
                self.log_round(rnd, selected, updates)
            if (rnd + 1) % cfg.eval_every == 0 or rnd == cfg.rounds - 1 or not self.method.trainable:
                metrics = self.evaluate(rnd)
            if cfg.checkpoint_every and ((rnd + 1) % cfg.checkpoint_every == 0 or rnd == cfg.rounds - 1):
                self.save_checkpoint(rnd + 1, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.1f}" for k, v in metrics.get("mean", {}).items()})
            if not self.method.trainable:  # nothing changes between rounds: one evaluation is the result
                break
        if bar is not None:
            bar.close()
        return self.finish(metrics, time.time() - t0)

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, rounds_done: int, metrics: dict) -> None:
        if self.fabric.global_rank != 0:
            return
        if self.logger is not None:
            self.logger.experiment.flush()  # scalars up to this round are on disk before the checkpoint is
        personal = {c: dict(t) for c, t in self.personal.items()}
        for c, o in self.client_optim.items():  # optimiser state is personal too: stored as personal/<cid>/optim/…
            personal.setdefault(c, {}).update({f"optim/{k}": v for k, v in o.items()})
        state = ckpt.RunState(round=rounds_done, global_state=self.global_state, personal=personal,
                              server=self.method.server_state_dict(), history=self.history,
                              identity=self.meta.get("identity", {}),
                              extra={"metrics": _jsonable(metrics), "cumulative_bytes": self.cumulative_bytes})
        ckpt.save(self.run_dir / ckpt.NAME, state)

    def restore(self, state: ckpt.RunState) -> int:
        """Load a checkpoint's state; returns the number of finished rounds."""
        expected = set(self.global_state)
        if set(state.global_state) != expected:
            raise FedlitError(f"checkpoint holds shared tensors {sorted(state.global_state)} but the method has "
                              f"{sorted(expected)}; it was written by another method configuration")
        self.global_state = dict(state.global_state)
        self.personal, self.client_optim = {}, {}
        for c, tensors in state.personal.items():
            own = {k: v for k, v in tensors.items() if not k.startswith("optim/")}
            optim = {k[len("optim/"):]: v for k, v in tensors.items() if k.startswith("optim/")}
            if own:
                self.personal[int(c)] = own
            if optim:
                self.client_optim[int(c)] = optim
        self.method.load_server_state_dict(state.server)
        self.history = list(state.history)
        self.cumulative_bytes = int(state.extra.get("cumulative_bytes", 0))
        return state.round

    def client_state_of(self, cid: int) -> dict[str, dict[str, torch.Tensor]]:
        """Everything kept for client ``cid`` between rounds, none of it ever sent to the server: ``personal``
        (its personal tensors) and ``optim`` (its optimiser state / schedule step), where it has them."""
        out = {}
        if cid in self.personal:
            out["personal"] = self.personal[cid]
        if cid in self.client_optim:
            out["optim"] = self.client_optim[cid]
        return out

    def load_client_state(self, cid: int, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of :meth:`client_state_of` (a deployment keeps the state where the client lives)."""
        for kind, store in (("personal", self.personal), ("optim", self.client_optim)):
            if state.get(kind):
                store[cid] = dict(state[kind])
            else:
                store.pop(cid, None)

    @staticmethod
    def kept_state(update: Update) -> dict[str, dict[str, torch.Tensor]]:
        """What a finished client update leaves on the client (the :meth:`client_state_of` form)."""
        out = {"personal": update.personal} if update.personal else {}
        if update.extra.get("optim"):
            out["optim"] = update.extra["optim"]
        return out

    # ------------------------------------------------------------------------------------ one client
    def safe_update(self, cid: int, rnd: int) -> Update:
        """:meth:`local_update`, with a raising client turned into a failed update (``on_client_failure``)."""
        ckpt.fault_point(f"client:{rnd + 1}:{cid}")
        try:
            update = self.local_update(cid, rnd)
        except FedlitError:
            raise
        except Exception as e:  # a bug or bad data in one client must not kill a long grid
            update = Update(cid, {}, {}, self.fed.clients[cid].num_samples, float("nan"),
                            error=f"{type(e).__name__}: {e}")
        if not update.ok and self.cfg.on_client_failure == "stop":
            raise FedlitError(f"client {cid} failed in round {rnd + 1}: {update.error} "
                              f"(trainer.on_client_failure=skip leaves such clients out instead)")
        return update

    def local_update(self, cid: int, rnd: int) -> Update:
        """Load (global ∪ personal) → ``local_epochs`` passes over the client's data → export."""
        client, m, cfg = self.fed.clients[cid], self.module, self.cfg
        sent = self.method.client_state(cid, self.global_state)
        m.load_prompt_state(sent, self.personal.get(cid, self.init_personal))
        m.global_state = {k: v.to(self.fabric.device) for k, v in sent.items()}
        m.task, m.cid, m.round = self.fed.task_of(cid), cid, rnd
        pos = {name: i for i, name in enumerate(m.task.classnames)}
        m.client_classes = [pos[self.fed.data.classnames[c]] for c in client.classes]
        m.train()
        optimizer, optim_state, lr = self._client_optimizer(cid)
        losses, step = [], 0
        y_all = torch.as_tensor(client.train_y, device=self.fabric.device)
        for epoch in range(cfg.local_epochs):
            order = np.random.default_rng([self.seed, rnd, cid, epoch]).permutation(client.num_samples)
            for s in range(0, len(order), cfg.batch_size):
                rows = order[s : s + cfg.batch_size]
                x = self.bank.inputs("train", client.train_idx[rows],
                                     views=self.bank.train_views((self.seed, rnd, cid, epoch), client.num_samples, rows))
                with self.fabric.autocast():
                    loss = m.training_step((x, y_all[rows]), step)
                if not torch.isfinite(loss):
                    return Update(cid, {}, {}, client.num_samples, float("nan"), step, error=f"loss became {loss.item()}")
                self.fabric.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
        shared, personal = m.export()
        extra = {"sent": sent} if sent is not self.global_state else {}
        if optim_state is not None:
            extra["optim"] = {**(optimizer_state_tensors(optimizer) if self.method.persistent_optimizer else {}),
                              "participations": optim_state.get("participations", torch.tensor(0)) + 1}
        return Update(cid, shared, personal, client.num_samples, float(np.mean(losses)) if losses else float("nan"),
                      step, extra={**extra, "lr": lr})

    def _client_optimizer(self, cid: int):
        """A fresh optimiser for one client-round, or — for methods with a per-client schedule or persistent
        optimiser (FedTPG) — one restored from the client's own state. Returns (optimizer, state or None, lr)."""
        optimizer = self.module.configure_optimizers()
        tracked = self.method.persistent_optimizer or self.method.lr_schedule != "constant"
        state = self.client_optim.get(cid, {}) if tracked else None
        if state and self.method.persistent_optimizer:
            load_optimizer_state(optimizer, state)
        lr = self.method.lr_at(int(state.get("participations", 0)) if state else 0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return self.fabric.setup_optimizers(optimizer), state, lr

    # ------------------------------------------------------------------------------------ server side
    def apply(self, updates: list[Update]) -> None:
        """Aggregate the successful updates into the global state; keep each client's personal state."""
        ok = [u for u in updates if u.ok]
        if self.fabric.global_rank == 0:
            for u in updates:
                if not u.ok:
                    print(f"warning: client {u.cid} left out of this round's aggregation: {u.error}", file=sys.stderr)
            if updates and not ok:
                print("warning: no client of this round succeeded; the global state stays as it was", file=sys.stderr)
        if not ok:
            return
        self.global_state = self.method.aggregate(ok, self.global_state)
        for u in ok:
            if u.personal:
                self.personal[u.cid] = u.personal
            if "optim" in u.extra:
                self.client_optim[u.cid] = u.extra["optim"]

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self, rnd: int) -> dict:
        """Local / Base / Novel per client (:mod:`fedlit.evaluation`; the two protocols in :mod:`fedlit.metrics`):
        this process's share of the clients, gathered, then recorded."""
        mine = shard(list(range(len(self.fed.clients))), self.fabric.global_rank, self.fabric.world_size)
        per_client = {c: r for part in self._gather_objects(self.evaluate_clients(mine)) for c, r in part.items()}
        return self.record_evaluation(per_client, rnd)

    def evaluate_clients(self, cids: list[int]) -> dict[int, dict[str, float]]:
        """Per-client results of ``cids`` under the method's protocol (no logging, no ``hm``)."""
        if self.method.eval_protocol == "global":
            return self.evaluator.global_(cids)
        return self.evaluator.personalized(cids, lambda cid: cid in self.personal)

    def record_evaluation(self, per_client: dict[int, dict[str, float]], rnd: int) -> dict:
        """Every client's results → ``hm`` per client, means (per group), history, TensorBoard; the round's metrics."""
        for res in per_client.values():
            res["hm"] = harmonic_mean([res[k] for k in ("local", "base", "novel") if k in res])
        mean, per_group = summarize_clients(per_client, self.fed)
        self.history.append({"round": rnd + 1, **mean})
        scalars = {f"eval/{k}": v for k, v in mean.items()}
        for g, res in per_group.items():
            scalars.update({f"eval_group/{k}/{g}": v for k, v in res.items()})
        for cid, res in sorted(per_client.items()):
            scalars.update({f"eval_client/{k}/client_{cid:03d}": v for k, v in res.items()})
        self._log(scalars, rnd + 1)
        self._log_figure(per_client, rnd + 1)
        out = {"round": rnd + 1, "mean": mean, "per_client": per_client}
        if per_group:
            out["per_group"] = per_group
        return out

    def _client_model(self, cid: int | None) -> None:
        """Load client ``cid``'s model (``None``: the global model with initial personal state)."""
        sent = self.global_state if cid is None else self.method.client_state(cid, self.global_state)
        personal = self.init_personal if cid is None else self.personal.get(cid, self.init_personal)
        self.module.load_prompt_state(sent, personal)
        self.module.eval()

    # ------------------------------------------------------------------------------------ plumbing
    def _gather(self, updates: list[Update]) -> list[Update]:
        return [u for part in self._gather_objects(updates) for u in part]

    def _gather_objects(self, obj):
        if self.fabric.world_size == 1:
            return [obj]
        out = [None] * self.fabric.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def log_round(self, rnd: int, selected: list[int], updates: list[Update]) -> None:
        ok = [u for u in updates if u.ok]
        numel = sum(v.numel() * v.element_size() for v in self.global_state.values())
        scalars = {
            "train/loss": float(np.mean([u.loss for u in ok])) if ok else float("nan"),
            "train/clients": len(selected),
            "train/failed_clients": len(updates) - len(ok),
            "train/lr": float(np.mean([u.extra.get("lr", self.method.lr) for u in ok])) if ok else self.method.lr,
            "comm/bytes_up": numel * len(ok),
            "comm/bytes_down": numel * len(selected),
        }
        self.cumulative_bytes += scalars["comm/bytes_up"] + scalars["comm/bytes_down"]
        scalars["comm/cumulative_bytes"] = self.cumulative_bytes
        scalars.update({f"train_client/loss/client_{u.cid:03d}": u.loss for u in ok})
        self._log(scalars, rnd + 1)

    def _log(self, scalars: dict, step: int) -> None:
        if self.logger is not None:
            self.logger.log_metrics(scalars, step=step)

    def _log_figure(self, per_client: dict, step: int) -> None:
        """Image summary ``eval/per_client_accuracy``: Local/Base/Novel bars per client (rank 0, Agg canvas)."""
        if self.logger is None:
            return
        try:
            from .plot import per_client_figure

            fig = per_client_figure(per_client, f"{self.method.name}, round {step}")
        except (ImportError, FedlitError):  # matplotlib missing: scalars only
            return
        self.logger.experiment.add_figure("eval/per_client_accuracy", fig, global_step=step, close=True)

    def _progress(self, total: int):
        show = self.cfg.progress if self.cfg.progress is not None else sys.stderr.isatty()
        if not show or self.fabric.global_rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.rounds if self.method.trainable else 1, desc=f"{self.method.name} rounds",
                    unit="round", dynamic_ncols=True)

    def hparams(self) -> dict[str, int | float | str | bool]:
        """Flat scalars/strings for TensorBoard's HParams view: run meta (``identity/…`` flattened), the
        method's constructor arguments (``method_args/…``) and the trainer settings (``trainer/…``)."""
        import inspect

        def flat(prefix: str, obj) -> dict:
            if isinstance(obj, dict):
                return {k: v for key, val in obj.items() for k, v in flat(f"{prefix}/{key}" if prefix else str(key), val).items()}
            if isinstance(obj, bool | int | float | str):
                return {prefix: obj}
            return {prefix: "none" if obj is None else str(obj)}

        init = inspect.signature(type(self.method).__init__).parameters
        args = {p: getattr(self.method, p) for p in init if p != "self" and hasattr(self.method, p)}
        settings = {k: v for k, v in vars(self.cfg).items() if not k.startswith("_")}
        return flat("", {"method": self.method.name, "seed": self.seed, **self.meta,
                         "method_args": args, "trainer": settings})

    def finish(self, metrics: dict, wall: float) -> dict:
        results = {
            **self.meta,
            "method": self.method.name,
            "seed": self.seed,
            "run_dir": str(self.run_dir),
            "final": metrics.get("mean", {}),
            "per_client": {str(c): r for c, r in sorted(metrics.get("per_client", {}).items())},
            "per_group": metrics.get("per_group", {}),
            "history": self.history,
            "wall_time_s": round(wall, 2),
            "images_encoded": self.bank.encoded,
        }
        if self.fabric.global_rank == 0:
            self.logger.log_hyperparams(self.hparams(),
                                        metrics={f"final/{k}": v for k, v in results["final"].items()})
            self.logger.finalize("success")
            write_json_atomic(self.run_dir / "results.json", results)
        return results


def _jsonable(metrics: dict) -> dict:
    """Metrics with int client keys turned into strings (JSON)."""
    out = dict(metrics)
    if "per_client" in out:
        out["per_client"] = {str(k): v for k, v in out["per_client"].items()}
    return out


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to ``path`` via a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def format_final(results: dict) -> str:
    f = results.get("final", {})
    parts = [f"{k.capitalize() if k != 'hm' else 'HM'} {f[k]:.2f}" for k in ("local", "base", "novel", "hm") if k in f]
    return f"{results.get('method')}: " + "  ".join(parts) if parts else "no evaluation"


__all__ = ["FedTrainer", "Orchestrator", "sample_clients", "shard", "write_json_atomic", "format_final"]
