"""The ``trainer:`` section of a config: how the round loop runs (rounds, participation, local work,
evaluation cadence, precision, devices, feature cache, checkpoints, failing clients).

:class:`FedTrainer` is a frozen dataclass; each field says in its metadata whether it changes a run's numbers
(``{"results": True}``: :data:`NUMBERS`) or only where and how fast the run computes (``{"results": False}``:
:data:`SPEED`: devices, caches, threads, lock-step, progress, checkpoint cadence — the same numbers up to kernel
rounding). The run digest (:func:`fedlit.experiment.config_digest`), TensorBoard's HParams and the report groups
(:mod:`fedlit.settings`) are derived from that metadata (:func:`result_fields`, :func:`digest_fields`), so a new
option that changes results is one field here and the code where it acts.
"""

from __future__ import annotations

import functools
import os
import typing
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Literal


from .dp_sgd import PrivacySettings
from .errors import FedlitError

#: metadata of a field that changes the numbers of a run (in the run digest, HParams and report groups).
NUMBERS = MappingProxyType({"results": True})
#: metadata of a field that changes the numbers but not what a run *is*: a resumed run may extend it (``rounds``:
#: rerunning with more rounds continues the run), so it is in HParams and report groups, not in the digest.
EXTENDS = MappingProxyType({"results": True, "digest": False})
#: metadata of a field that changes the numbers and was added after runs existed: at its default value it is left
#: out of the run digest (:func:`fedlit.experiment.config_digest`), so earlier runs are still found and resumed.
ADDED = MappingProxyType({"results": True, "digest_default": False})
#: metadata of a field that changes where and how fast a run computes, not its numbers (beyond kernel rounding).
SPEED = MappingProxyType({"results": False})

#: ``trainer.precision`` values (Lightning's, plus ``auto``: bf16-mixed on CUDA, 32-true elsewhere).
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true",
              "transformer-engine", "transformer-engine-float16", "64", "32", "16", "bf16")


def result_fields(cls) -> tuple[str, ...]:
    """The fields of settings class ``cls`` whose metadata says they change results (``results``; a field that
    says nothing counts as changing them), in declaration order."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("results", True))


def digest_fields(cls) -> tuple[str, ...]:
    """The :func:`result_fields` that identify a run for resuming (all but those a resumed run may extend)."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("results", True) and f.metadata.get("digest", True))


def default_not_in_digest(cls) -> dict[str, object]:
    """The fields of ``cls`` (metadata :data:`ADDED`) left out of the run digest at their default: name -> default."""
    return {f.name: f.default for f in fields(cls) if f.metadata.get("digest_default", True) is False}


def not_in_digest(cls) -> tuple[str, ...]:
    """The fields of ``cls`` the run digest leaves out (speed only, or extended by a resumed run: ``rounds``)."""
    keep = digest_fields(cls)
    return tuple(f.name for f in fields(cls) if f.name not in keep)


@functools.cache
def _literals(cls) -> dict[str, tuple]:
    """``{field: allowed values}`` of the ``Literal``-typed fields of ``cls`` (``X | None`` included)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        options = [hint] if typing.get_origin(hint) is Literal else list(typing.get_args(hint))
        allowed = [a for o in options if typing.get_origin(o) is Literal for a in typing.get_args(o)]
        if allowed:
            out[name] = tuple(allowed) + ((None,) if type(None) in typing.get_args(hint) else ())
    return out


@dataclass(frozen=True)
class FedTrainer:
    """Federation settings (the ``trainer:`` section of a config).

    Args:
        rounds: communication rounds.
        participation: fraction of clients sampled per round (``--frac`` in the official code).
        local_epochs: passes over its data a client makes per round.
        batch_size: local training batch size (FedPGP uses ``shots``).
        eval_every: evaluate every N rounds (the last round is always evaluated).
        first_round_all: all clients train in round 0 (FedPGP/FedOTP).
        eval_batch_size: batch size of evaluation and feature encoding.
        precision: Fabric precision; ``auto`` = ``bf16-mixed`` on GPU, ``32-true`` on CPU.
        accelerator: ``auto``, ``cpu``, ``cuda`` …
        devices: number of processes/devices (clients are sharded over them).
        num_nodes: nodes for multi-node runs (Fabric / SLURM / torchrun).
        strategy: Fabric strategy for several processes (``ddp`` launches them; results are gathered
            with collectives, modules are not wrapped).
        prox_mu: add FedProx's proximal term μ/2‖θ − θ_global‖² to any method's local loss (0: off).
        checkpoint_every: write ``checkpoint.safetensors`` every N rounds (0: never); a run directory holding
            a checkpoint and no results is resumed automatically.
        on_client_failure: ``skip`` leaves a client whose update raises or whose loss is NaN/inf out of the
            round's aggregation (logged and counted); ``stop`` ends the run with an error.
        progress: ``true``: a progress bar; ``false``: nothing; ``null`` (default): the bar when stderr is a
            terminal, else one plain line per round on stdout (round, seconds, loss, latest Local/Base/Novel/HM).
        feature_cache: where frozen image features are cached: ``memory`` (per process) or ``disk``
            (memory-mapped files under ``cache_dir``, keyed by backbone weights, data, split, transform and
            augmentation; reused across runs and processes). Same values either way.
        cache_dir: directory of the disk cache (``null``: ``$FEDLIT_CACHE``, else ``~/.cache/fedlit/features``).
        threads: intra-op CPU threads of every process of the run (``torch.set_num_threads``, and
            ``OMP_NUM_THREADS`` for the processes Fabric launches). ``null``: torch's choice, which Lightning
            lowers to cores ÷ processes when it launches several. CPU kernels round differently with a different
            thread count, so runs are bit-identical across process counts only when this is set (the same).
        augment: training augmentation. ``method`` (default): each method's official one
            (:attr:`~fedlit.methods.base.FedMethod.default_augment`: ``dassl`` for the FedPGP/FedOTP/PromptFL/CoOp/
            CoCoOp/MaPLe family, ``none`` for the FedTPG family); ``dassl``: random resized crop of the original
            image (scale (0.08, 1), bicubic) + flip, one fresh view per image and local epoch (the view bank of
            :mod:`fedlit.features`); ``none``: no augmentation — exact cached features, fastest, but it changes the
            numbers of the Dassl-family methods. Evaluation is never augmented.
        train_pixel_norm: how training images reach the image tower: ``clip`` (default) resized and mean/std
            normalised like the test images; ``none`` resized only, values left in [0, 1] — FLiP's quirk F1 (its
            training transform has the ``Normalize`` line commented out while its test transform normalises,
            flip@ec3a848 ``imageloader.py:131-153``, spec 3c §0.7), which every FLiP row ran with. Test images and
            zero-shot references are unchanged; features computed on training images (ProGrad's and PromptSRC's
            teachers included) see the un-normalised pixels, as in FLiP. Not combinable with a dataset's own
            pre-processing (``data.dataset_args.preprocess: official``).
        augment_views: legacy K-view augmentation, overrides ``augment``: 0 = off (default); K > 0 = K fixed
            random-resized-crop + flip views per training image (cut from the stored image), one drawn per sample
            and step from (seed, round, client, epoch).
        drop_last: ``method`` (default): the method's official loaders
            (:attr:`~fedlit.methods.base.FedMethod.default_drop_last`: ``dassl`` for the Dassl family, ``never`` for
            FedTPG's code base, ``dm_federated.py:91-97``); ``dassl`` (the FedPGP/FedOTP/PromptFL loaders): a client
            drops its last incomplete batch whenever it holds at least one full batch (``len(data) >= batch_size``),
            otherwise it trains on its one short batch; ``never`` keeps every last batch.
        sync: how a round federates. ``method`` (default): the method's own mode (``step`` for DP-FPL, ``round``
            for the others); ``round``: local epochs then the server aggregates the shared tensors (FedAvg);
            ``step``: step-synchronous FedSGD (:mod:`fedlit.steps`): at every batch step every selected client
            sends the gradient of its shared tensors, the server averages it, every client applies it. One
            process only (``devices: 1``).
        lockstep: clients of a round trained together in one process (:mod:`fedlit.engine`): ``1``
            (default) one at a time; ``M`` > 1 groups of M; ``0`` all of the process's clients. A group's text passes
            are one joint pass per step; each client keeps its own tensors, optimiser, data order and step count, so
            the results equal one-at-a-time up to float rounding. Methods that prompt the image tower ignore it.
        eval_last: also evaluate each of the last K rounds (0: off), whatever ``eval_every`` says — the official
            FedPGP/FedOTP CIFAR runs evaluate every one of their last 10 rounds (``federated_main.py:355-385``), so
            the best-Local round and the last-5 mean need them.
        statistic: which statistic of the evaluation history ``results.json`` reports as ``final``
            (:data:`fedlit.metrics.STATISTICS`; every one is kept under ``statistics``): ``method`` (default) the
            one the method's paper table reports (:data:`fedlit.metrics.PAPER_STATISTIC`: ``best_local`` for
            FedPGP's Table-1 rows, pFedMMA and IVLP, ``last_round`` otherwise); ``last_round``; ``best_local`` (the
            round of the best mean Local accuracy, with its Base / Novel / HM: a test-set-selected round, as the
            official code does); ``max``; ``last5_mean``.
        step_start: what a step of a step-synchronous round (``sync: step``) starts from. ``method`` (default): the
            method's (:attr:`~fedlit.methods.base.FedMethod.loop_defaults`; ``round`` for DP-FPL, ``previous``
            otherwise); ``previous``: the previous step's result (FedSGD); ``round``: the weights the round started
            with — DP-FPL's official loop (``federated_main.py:149,170-177`` reloads forward-time copies), so a round
            keeps only its last step's update.
        personal_grad: the gradient a client's personal tensors are stepped with in step mode. ``method``
            (default); ``own``: its own; ``last_client``: the last client's of the step, for every client —
            DP-FPL's official ``model_update()`` after the forward loop (``DP_FPL.py:264-329``).
        optimizer_state: the optimiser's lifecycle in ``round`` mode. ``method`` (default): the method's official
            policy (:meth:`~fedlit.methods.base.FedMethod.optimizer_policy`: ``chain`` for the Dassl code bases —
            FedPGP, PromptFL, Prompt+Prox, CoOp, FedOTP, FedCoCoOp, FedMaPLe, PromptFolio, FedPHA, pFedMoAP, pFedMMA —
            ``per_client`` for FedTPG/FedKgCoOp/FedVLP, ``fresh`` for pFedPG/VPT); ``chain``: ONE optimiser state
            (SGD momentum buffers) handed from client to client in the official training order, across rounds, as
            one Dassl ``local_trainer`` does (its ``single_step`` scheduler with γ = 1 keeps the lr constant, so
            nothing else carries); the round's clients then train one after the other in one process, so
            ``devices``/``num_nodes`` > 1, ``lockstep`` ≠ 1 and Flower are refused; ``fresh``: a new optimiser per
            client-round (momentum restarts at every client); ``per_client``: each client keeps its own optimiser
            state across its participations (FedTPG's code base). In step mode (``sync: step``) the same key chooses the step
            loop's state (:meth:`step_policies`; ``method`` = DP-FPL's ``chain``, its single optimiser,
            ``DP_FPL.py:248``, where every client also keeps its own copy of the shared tensors, stepped with the
            chained momentum; ``per_client``: the server's state for the shared tensors, each client's own for its
            personal ones; ``fresh``: no state carried from one step to the next). ``results.json`` says which
            policy ran.
        eval_from: the first round (1-based) that ``eval_every`` evaluates; earlier rounds are not evaluated (the
            official CIFAR-100 FedOTP script evaluates every round from round 141 of 150: ``eval_every: 1``,
            ``eval_from: 141``). The last round is always evaluated.
        skip_clients: clients that neither train nor are evaluated (default none). ``[5]`` reproduces FedPGP's
            released ``fedavg``/``local`` branches (PromptFL, CoOp: ``idxs_users.pop(5)``, ``federated_main.py:236-237,
            288-289``), which fedlit does not take for the Table-1 rows (README "Training as the papers trained").
        privacy: client-side DP-SGD (:class:`~fedlit.dp_sgd.PrivacySettings`; default off): every local step clips
            each sample's joint gradient norm to ``clip``, adds N(0, σ²C²) to the sum, and ``results.json`` reports
            each client's ε (Opacus' RDP accountant). ``--trainer.privacy.clip 1.0
            --trainer.privacy.noise_multiplier 1.1`` (or ``target_epsilon``); round mode, one client at a time.
    """

    rounds: int = field(default=10, metadata=EXTENDS)
    participation: float = field(default=1.0, metadata=NUMBERS)
    local_epochs: int = field(default=1, metadata=NUMBERS)
    batch_size: int = field(default=16, metadata=NUMBERS)
    eval_every: int = field(default=1, metadata=NUMBERS)
    first_round_all: bool = field(default=True, metadata=NUMBERS)
    eval_batch_size: int = field(default=256, metadata=NUMBERS)
    precision: Literal[PRECISIONS] = field(default="auto", metadata=NUMBERS)
    accelerator: str = field(default="auto", metadata=SPEED)
    devices: int = field(default=1, metadata=SPEED)
    num_nodes: int = field(default=1, metadata=SPEED)
    strategy: str = field(default="auto", metadata=SPEED)
    prox_mu: float = field(default=0.0, metadata=NUMBERS)
    checkpoint_every: int = field(default=1, metadata=SPEED)
    on_client_failure: Literal["skip", "stop"] = field(default="skip", metadata=NUMBERS)
    progress: bool | None = field(default=None, metadata=SPEED)
    feature_cache: Literal["memory", "disk"] = field(default="memory", metadata=SPEED)
    cache_dir: str | None = field(default=None, metadata=SPEED)
    augment: Literal["method", "dassl", "none"] = field(default="method", metadata=NUMBERS)
    augment_views: int = field(default=0, metadata=NUMBERS)
    train_pixel_norm: Literal["clip", "none"] = field(default="clip", metadata=ADDED)
    threads: int | None = field(default=None, metadata=SPEED)
    drop_last: Literal["method", "dassl", "never"] = field(default="method", metadata=NUMBERS)
    sync: Literal["method", "round", "step"] = field(default="method", metadata=NUMBERS)
    lockstep: int = field(default=1, metadata=SPEED)
    eval_last: int = field(default=0, metadata=NUMBERS)
    statistic: Literal["method", "last_round", "best_local", "max", "last5_mean"] = field(default="method",
                                                                                         metadata=NUMBERS)
    step_start: Literal["method", "previous", "round"] = field(default="method", metadata=NUMBERS)
    optimizer_state: Literal["method", "chain", "fresh", "per_client"] = field(default="method", metadata=NUMBERS)
    personal_grad: Literal["method", "own", "last_client"] = field(default="method", metadata=NUMBERS)
    eval_from: int = field(default=1, metadata=NUMBERS)
    skip_clients: list[int] | None = field(default=None, metadata=NUMBERS)
    privacy: PrivacySettings | None = field(default=None, metadata=NUMBERS)

    def __post_init__(self):
        """The checks a type cannot express (ranges), one line each naming the fix; then the value of every
        ``Literal`` field against its type (the CLI's parser checks those first, in its own words)."""
        ranges = [
            (self.rounds >= 1, f"trainer.rounds={self.rounds}: needs at least 1 round"),
            (0 < self.participation <= 1, f"trainer.participation={self.participation}: a fraction in (0, 1]"),
            (self.local_epochs >= 1, f"trainer.local_epochs={self.local_epochs}: needs at least 1"),
            (self.batch_size >= 1, f"trainer.batch_size={self.batch_size}: needs at least 1"),
            (self.eval_batch_size >= 1, f"trainer.eval_batch_size={self.eval_batch_size}: needs at least 1"),
            (self.eval_every >= 1, f"trainer.eval_every={self.eval_every}: needs at least 1"),
            (self.devices >= 1, f"trainer.devices={self.devices}: needs at least 1"),
            (self.num_nodes >= 1, f"trainer.num_nodes={self.num_nodes}: needs at least 1"),
            (self.prox_mu >= 0, f"trainer.prox_mu={self.prox_mu}: must be >= 0"),
            (self.checkpoint_every >= 0, f"trainer.checkpoint_every={self.checkpoint_every}: must be >= 0 (0 = never)"),
            (self.threads is None or self.threads >= 1,
             f"trainer.threads={self.threads}: use null (torch's choice) or >= 1"),
            (self.augment_views >= 0,
             f"trainer.augment_views={self.augment_views}: use 0 (no augmentation) or a number of views"),
            (self.eval_from >= 1, f"trainer.eval_from={self.eval_from}: the first round evaluated, >= 1"),
            (self.eval_last >= 0,
             f"trainer.eval_last={self.eval_last}: use 0 (off) or the number of final rounds to evaluate"),
            (self.lockstep >= 0, f"trainer.lockstep={self.lockstep}: use 1 (one client at a time), M > 1 (groups of "
                                 f"M) or 0 (all of the process's clients)"),
        ]
        for ok, msg in ranges:
            if not ok:
                raise FedlitError(msg)
        for name, allowed in _literals(type(self)).items():
            value = getattr(self, name)
            if value not in allowed and str(value) not in allowed:
                raise FedlitError(f"trainer.{name}={value!r}: use one of {', '.join(map(str, allowed))}")
        object.__setattr__(self, "skip_clients", sorted(set(self.skip_clients or [])))

    def drop_last_of(self, method) -> str:
        """The last-batch rule (``dassl`` / ``never``) a run of ``method`` uses under these settings."""
        return method.default_drop_last if self.drop_last == "method" else self.drop_last

    def sync_of(self, method) -> str:
        """``round`` or ``step``: the mode a run of ``method`` uses under these settings."""
        return method.sync if self.sync == "method" else self.sync

    def step_policies(self, method) -> dict[str, str]:
        """The step-mode loop policies of a run of ``method`` (``method`` resolved to the method's defaults)."""
        own = {"step_start": "previous", "optimizer_state": "per_client", "personal_grad": "own",
               **method.loop_defaults}
        return {k: own[k] if getattr(self, k) == "method" else getattr(self, k) for k in
                ("step_start", "optimizer_state", "personal_grad")}

    def optimizer_state_of(self, method) -> str:
        """The round-mode optimiser-state policy a run of ``method`` uses: ``chain``, ``fresh``, ``per_client``, or
        ``step`` in step mode (whose own policy is :meth:`step_policies`' ``optimizer_state``)."""
        if self.sync_of(method) == "step":
            return "step"
        return method.optimizer_policy() if self.optimizer_state == "method" else self.optimizer_state

    def batch_starts(self, n: int, rule: str) -> range:
        """Start rows of a client's training batches over ``n`` samples under the resolved last-batch ``rule``
        (``dassl`` / ``never``: :meth:`drop_last_of`)."""
        bs = self.batch_size
        if rule == "dassl" and n >= bs:
            return range(0, n - bs + 1, bs)
        return range(0, n, bs)

    def make_fabric(self) -> L.Fabric:
        """The run's Fabric (not launched). With ``threads`` set, this process and every process Fabric
        launches compute with that many intra-op threads."""
        import lightning as L
        import torch

        if self.threads is not None:
            os.environ["OMP_NUM_THREADS"] = str(self.threads)  # inherited by launched processes; Lightning keeps it
            torch.set_num_threads(self.threads)
        gpu = self.accelerator in ("cuda", "gpu", "mps")
        if gpu and not (torch.cuda.is_available() or (self.accelerator != "cuda" and torch.backends.mps.is_available())):
            raise FedlitError(f"trainer.accelerator={self.accelerator}: this machine has no usable GPU; "
                              "use trainer.accelerator=cpu (or auto)")
        cores = os.cpu_count() or 1
        if not gpu and not torch.cuda.is_available() and self.devices > cores:
            raise FedlitError(f"trainer.devices={self.devices} processes on {cores} CPU cores would oversubscribe "
                              f"them; use trainer.devices={cores} or fewer")
        cuda = torch.cuda.is_available() and self.accelerator in ("auto", "cuda", "gpu")
        precision = self.precision if self.precision != "auto" else ("bf16-mixed" if cuda else "32-true")
        strategy = self.strategy
        if strategy == "auto" and self.devices * self.num_nodes > 1:
            strategy = "ddp"
        return L.Fabric(accelerator=self.accelerator, devices=self.devices, num_nodes=self.num_nodes,
                        strategy=strategy, precision=precision)
