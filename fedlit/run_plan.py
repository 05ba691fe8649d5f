"""The run plan: a run's trainer settings × its method's loop resolved ONCE, when the run is built, into an
immutable, typed :class:`RunPlan` — the mode (round / step), the optimiser-state policy and training order, lock-step,
the last-batch rule, the augmentation and whether its views are cached, the proximal term, the failure policy and
the statistic reported. Every incompatible combination is refused here with one line naming the fix; the settings
a method runs without are announced once (:func:`fallback_notes`). The plan is printed in the run's log
(:meth:`RunPlan.describe`) and stored in ``results.json`` (``plan``, :meth:`RunPlan.as_dict`); its fields marked
``results`` (dataclass metadata) are what change the numbers, and :meth:`RunPlan.digest` is derived from them.

Client code reads the plan, never the raw settings and the method's flags (:class:`fedlit.engine.ClientRuntime`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from .errors import FedlitError
from .methods.base import FedMethod
from .metrics import statistic_of
from .trainer import FedTrainer, result_fields

NUMBERS = {"results": True}  #: field metadata: the field changes the numbers of a run
SPEED = {"results": False}  #: field metadata: the field changes only how fast / where a run computes


@dataclass(frozen=True)
class StepLoop:
    """The loop policies of a step-synchronous run (``sync: step``, :mod:`fedlit.steps`)."""

    step_start: str = field(default="previous", metadata=NUMBERS)  #: ``previous`` (FedSGD) or ``round``
    optimizer_state: str = field(default="per_client", metadata=NUMBERS)  #: ``per_client`` / ``chain`` / ``fresh``
    personal_grad: str = field(default="own", metadata=NUMBERS)  #: ``own`` or ``last_client``
    samples: str = field(default="n_min", metadata=NUMBERS)  #: every client trains on n_min of its samples


@dataclass(frozen=True)
class RunPlan:
    """What a run of ``method`` under ``settings`` does (module docstring). Build it with :meth:`resolve`."""

    method: str = field(metadata=NUMBERS)
    sync: str = field(metadata=NUMBERS)  #: ``round`` (local epochs, then aggregation) or ``step`` (FedSGD)
    #: ``chain`` / ``fresh`` / ``per_client`` in round mode, ``step`` in step mode (its own: :attr:`step_loop`)
    optimizer_state: str = field(metadata=NUMBERS)
    train_order: str = field(metadata=NUMBERS)  #: ``sorted`` or ``drawn`` (the order a chained round trains in)
    step_loop: StepLoop | None = field(metadata=NUMBERS)
    drop_last: str = field(metadata=NUMBERS)  #: ``dassl`` or ``never``
    augment: str = field(metadata=NUMBERS)  #: ``none`` / ``dassl`` / ``views-K``
    epoch_views: int = field(metadata=NUMBERS)  #: fresh views a training image gets over the run (``dassl``)
    restart_personal: bool = field(metadata=NUMBERS)  #: local training restarts from the initial personal tensors
    #: ``batch`` (a step per batch) or ``epoch_last_batch`` (one step per local epoch on its last batch: FedLAPT)
    step_per: str = field(metadata=NUMBERS)
    #: ``constant`` / ``cosine`` (over participations: FedTPG) / ``cosine_steps`` (per step: FedLAPT)
    lr_schedule: str = field(metadata=NUMBERS)
    #: the sets that give Base / Novel: ``full_split`` or ``official_client0`` (FedDnC's code: client 0's sets)
    global_eval_set: str = field(metadata=NUMBERS)
    prox_mu: float = field(metadata=NUMBERS)  #: FedProx's μ in use (``trainer.prox_mu``, else the method's)
    prox_detached: bool = field(metadata=NUMBERS)  #: the official zero-gradient FedProx term (FedOTP code base)
    on_client_failure: str = field(metadata=NUMBERS)  #: ``skip`` / ``stop`` (step mode: always ``stop``)
    statistic: str = field(metadata=NUMBERS)  #: the statistic reported as ``final``
    #: client-side DP-SGD (``trainer.privacy``, :mod:`fedlit.dp_sgd`) and its noise multiplier σ (resolved from a
    #: target ε for the run's clients, or as given); ``None`` / 0: off
    privacy: object = field(metadata=NUMBERS)
    noise_multiplier: float = field(metadata=NUMBERS)
    lockstep: int = field(metadata=SPEED)  #: clients trained together: 1 = one at a time, 0 = all of a process's
    cache_views: bool = field(metadata=SPEED)  #: every augmented view encoded once into the cache
    settings: FedTrainer = field(metadata=NUMBERS, repr=False)  #: the trainer settings the plan was resolved from
    notes: tuple[str, ...] = field(default=(), metadata=SPEED)  #: settings the method runs without (one line each)

    # ------------------------------------------------------------------------------------ resolution
    @classmethod
    def resolve(cls, trainer: FedTrainer, method: FedMethod, *, world_size: int = 1, clip=None,
                train_rows: int = 0, client_sizes: tuple[int, ...] = ()) -> RunPlan:
        """The plan of a run of ``method`` under ``trainer`` on ``world_size`` processes (``clip`` and
        ``train_rows``: the backbone and the number of training images, for the view-cache decision;
        ``client_sizes``: the training clients' sample counts, for a DP noise calibrated to a target ε)."""
        from .features import view_caching

        sync = trainer.sync_of(method)
        step_loop = None
        if method.sync == "step" and sync != "step":
            raise FedlitError(f"method '{method.name}' exchanges gradients every batch step: it needs "
                              f"trainer.sync=step (or method), not {trainer.sync!r}")
        if sync == "step" and method.trainable:
            _check_step_mode(trainer, method, world_size)
            if method.policy.step_per != "batch":
                raise FedlitError(f"method '{method.name}' steps once per local epoch (step_per="
                                  f"{method.policy.step_per}); trainer.sync=step steps every batch: use "
                                  "trainer.sync=round, or method.init_args.step_per=batch")
            step_loop = StepLoop(**trainer.step_policies(method))
        check_privacy(trainer, method)
        augment = method.augmentation(trainer)
        views = trainer.rounds * trainer.local_epochs if augment == "dassl" else 0
        cache_views, note = (view_caching(clip, method.image_input, train_rows, views, trainer.participation)
                             if clip is not None else (False, None))
        notes = ([f"{method.name}: {note}"] if note else []) + fallback_notes(method, trainer)
        if sync == "step" and method.trainable and trainer.on_client_failure == "skip":
            notes.append("trainer.on_client_failure=skip: a step-synchronous round cannot proceed without a client, "
                         "so a failing client stops the run")
        return cls(
            method=method.name, sync=sync, optimizer_state=checked_policy(trainer, method),
            train_order=method.train_order, step_loop=step_loop, drop_last=trainer.drop_last_of(method),
            augment=augment, epoch_views=views, restart_personal=method.restart_personal,
            step_per=method.policy.step_per, lr_schedule=method.lr_schedule,
            global_eval_set=method.global_eval_set,
            prox_mu=float(trainer.prox_mu if trainer.prox_mu > 0 else method.prox_mu),
            prox_detached=bool(method.prox_detached),
            on_client_failure="stop" if step_loop is not None else trainer.on_client_failure,
            statistic=statistic_of(method.name, trainer.statistic), privacy=trainer.privacy,
            noise_multiplier=_sigma(trainer, method, client_sizes),
            lockstep=(trainer.lockstep if method.lockstep and step_loop is None else 1),
            cache_views=cache_views, settings=trainer, notes=tuple(notes))

    # ------------------------------------------------------------------------------------ what it says
    def batch_starts(self, n: int) -> range:
        """Start rows of a client's training batches over ``n`` samples under :attr:`drop_last`
        (:meth:`~fedlit.trainer.FedTrainer.batch_starts`)."""
        return self.settings.batch_starts(n, self.drop_last)

    def as_dict(self) -> dict:
        """The plan for ``results.json``: every field but the raw settings and the notes (JSON types)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("settings", "notes")}
        out["step_loop"] = dataclasses.asdict(self.step_loop) if self.step_loop is not None else None
        out["privacy"] = dataclasses.asdict(self.privacy) if self.privacy is not None else None
        return out

    def digest(self) -> str:
        """12 hex digits of the fields that change the numbers (metadata ``results``; the trainer's likewise)."""
        numbers = {k: v for k, v in self.as_dict().items() if _changes_results(type(self), k)}
        numbers["settings"] = {k: getattr(self.settings, k) for k in result_fields(type(self.settings))}
        return hashlib.sha256(json.dumps(numbers, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def describe(self) -> str:
        """One line for the run's log."""
        parts = [f"sync={self.sync}"]
        if self.step_loop is not None:
            s = self.step_loop
            parts.append(f"step_loop=({s.step_start}, {s.optimizer_state}, personal_grad {s.personal_grad}, "
                         f"{s.samples} samples)")
        else:
            order = f" ({self.train_order} order)" if self.optimizer_state == "chain" else ""
            parts.append(f"optimizer_state={self.optimizer_state}{order}")
        parts += [f"drop_last={self.drop_last}",
                  f"augment={self.augment}" + (" (views cached)" if self.cache_views and self.epoch_views else ""),
                  *(["train_pixel_norm=none (training images not normalised: FLiP F1)"]
                    if self.settings.train_pixel_norm == "none" else []),
                  *([f"prox_mu={self.prox_mu:g}" + (" (detached)" if self.prox_detached else "")]
                    if self.prox_mu > 0 else []),
                  *(["restart_personal"] if self.restart_personal else []),
                  *([f"step_per={self.step_per}"] if self.step_per != "batch" else []),
                  *([f"lr_schedule={self.lr_schedule}"] if self.lr_schedule != "constant" else []),
                  *([f"global_eval_set={self.global_eval_set}"] if self.global_eval_set != "full_split" else []),
                  *([f"privacy=dp-sgd (C={self.privacy.clip:g}, sigma={self.noise_multiplier:.4g}, "
                     f"{self.privacy.tensors} tensors)"] if self.privacy is not None else []),
                  f"lockstep={self.lockstep}", f"on_client_failure={self.on_client_failure}",
                  f"statistic={self.statistic}"]
        return f"plan: {self.method}: " + ", ".join(parts)


def _sigma(trainer: FedTrainer, method: FedMethod, sizes: tuple[int, ...]) -> float:
    """DP-SGD's σ for the run (0 without ``trainer.privacy``)."""
    if trainer.privacy is None:
        return 0.0
    from .dp_sgd import sigma_of

    rule = trainer.drop_last_of(method)
    return sigma_of(trainer.privacy, trainer, tuple(sizes), lambda n: trainer.batch_starts(n, rule))


def _changes_results(cls, name: str) -> bool:
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("results", True)


def _check_step_mode(trainer: FedTrainer, method: FedMethod, world_size: int) -> None:
    """What a step-synchronous run cannot do, refused with one line each."""
    if world_size > 1 or trainer.devices * trainer.num_nodes > 1:
        raise FedlitError("trainer.sync=step runs in one process for now: set trainer.devices=1 and num_nodes=1")
    if method.client_specific:
        raise FedlitError(f"method '{method.name}' sends each client its own tensors; trainer.sync=step needs one "
                          f"global copy of the shared tensors (use trainer.sync=round)")
    if trainer.lockstep != 1 and method.lockstep:
        raise FedlitError(f"trainer.lockstep={trainer.lockstep}: a step-synchronous round (trainer.sync=step) already "
                          f"steps its clients together; use trainer.lockstep=1")


def checked_policy(trainer: FedTrainer, method: FedMethod) -> str:
    """The run's optimiser-state policy; ``chain`` refuses what cannot train a round's clients in sequence."""
    policy = trainer.optimizer_state_of(method)
    if policy == "chain":
        fix = "; use --trainer.optimizer_state fresh (a new optimiser per client-round) to train clients in parallel"
        if trainer.devices * trainer.num_nodes > 1:
            raise FedlitError(f"trainer.optimizer_state=chain ({method.name}'s official optimiser, handed from client "
                              f"to client) trains a round's clients in sequence in one process, not on "
                              f"trainer.devices={trainer.devices} x num_nodes={trainer.num_nodes}{fix}")
        if trainer.lockstep != 1 and method.lockstep:
            raise FedlitError(f"trainer.optimizer_state=chain ({method.name}'s official optimiser, handed from client "
                              f"to client) trains a round's clients one after the other, not in lock-step "
                              f"(trainer.lockstep={trainer.lockstep}){fix}")
    return policy


#: methods with their own DP mechanism (method.init_args), which trainer.privacy does not stack on
OWN_DP = {"dpfpl": "DP-FPL", "fedsept": "FedSEPT"}


def check_privacy(trainer: FedTrainer, method: FedMethod) -> None:
    """Refuse, in one line each, the runs client-side DP-SGD (``trainer.privacy``, :mod:`fedlit.dp_sgd`) cannot be."""
    if trainer.privacy is None:
        return
    if method.name in OWN_DP:
        raise FedlitError(f"trainer.privacy: {OWN_DP[method.name]} has its own DP (method.init_args); drop "
                          "trainer.privacy or use another method")
    if not method.trainable:
        raise FedlitError(f"trainer.privacy: {method.name} does not train; drop trainer.privacy")
    if trainer.sync_of(method) == "step":
        raise FedlitError("trainer.privacy is DP-SGD on round-mode clients, not trainer.sync=step; use "
                          "trainer.sync=round (DP-FPL is the step-mode private method)")
    if trainer.lockstep != 1:
        raise FedlitError(f"trainer.privacy computes per-sample gradients one client at a time, not in lock-step "
                          f"(trainer.lockstep={trainer.lockstep}); use trainer.lockstep=1")
    if str(trainer.precision) in ("16-mixed", "16"):
        raise FedlitError(f"trainer.privacy writes the private gradient itself, which the fp16 loss scaler of "
                          f"trainer.precision={trainer.precision} would rescale; use bf16-mixed or 32-true")


def fallback_notes(method, trainer) -> list[str]:
    """Settings of ``trainer`` that ``method`` runs without (speed only, or nothing to act on): one line each,
    printed once when the run is built; the README lists them. Settings that would change numbers are refused."""
    notes = []
    if trainer.lockstep != 1 and not method.lockstep and method.trainable:
        notes.append(f"trainer.lockstep={trainer.lockstep}: {method.name} cannot train clients in lock-step; "
                     "they train one at a time (same numbers)")
    if trainer.feature_cache == "disk" and method.image_input == "images":
        notes.append(f"trainer.feature_cache=disk: {method.name} prompts the image tower, so no image feature is "
                     "cached (the tower runs on every batch)")
    if not method.trainable and (trainer.augment != "method" or trainer.augment_views):
        notes.append(f"trainer.augment: {method.name} does not train, so no training augmentation is used")
    if not method.trainable and trainer.sync == "step":
        notes.append(f"trainer.sync=step: {method.name} does not train; nothing is exchanged")
    if trainer.augment_views > 0 and trainer.augment != "method" and method.trainable:
        notes.append(f"trainer.augment_views={trainer.augment_views} (the legacy K-view bank) replaces "
                     f"trainer.augment={trainer.augment}")
    return notes


__all__ = ["RunPlan", "StepLoop", "check_privacy", "checked_policy", "fallback_notes"]
