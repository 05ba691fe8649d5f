"""From a dataset name to a federation: clients (data indices only) and evaluation tasks.

The FedPGP/FedOTP base-to-novel protocol (spec §7.4): classes are split CoOp-style into base and novel
halves; the *base* classes are partitioned over clients (pathological disjoint classes, or Dirichlet
label skew); each client holds ``shots`` training images per class of its own and all test images of
its classes. Evaluation tasks: ``base`` (all base classes, whole base test set) and ``novel`` (all
novel classes, whole novel test set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import FedlitError
from ..prompts import Task
from .protocol import (
    base_novel_classes,
    class_histogram,
    format_histogram,
    partition_dirichlet_train_test,
    partition_disjoint,
    relabel,
    sample_kshot,
)
from .registry import ClassificationData, get_dataset


@dataclass
class ClientData:
    """One simulated client: indices into the dataset's splits, labels in the training task's space."""

    cid: int
    classes: list[int]  # original label ids the client holds
    train_idx: np.ndarray
    train_y: np.ndarray
    test_idx: np.ndarray
    test_y: np.ndarray

    @property
    def num_samples(self) -> int:
        return int(len(self.train_idx))


@dataclass
class EvalSet:
    """A task and the test images evaluated on it (labels in the task's space)."""

    task: Task
    idx: np.ndarray
    y: np.ndarray


@dataclass
class Federation:
    data: ClassificationData
    clients: list[ClientData]
    train_task: Task  # the classes clients train among (all base classes)
    evals: dict[str, EvalSet]  # "base", and "novel" when classes were subsampled

    def summary(self) -> str:
        hist = class_histogram([self.data.train.labels[c.train_idx] for c in self.clients], len(self.data.classnames))
        return format_histogram(hist, self.data.classnames)


class FederatedData:
    """How to build the federation (the ``data:`` section of a config).

    Args:
        dataset: a registered dataset name (``fedlit datasets`` lists them).
        root: data root for real datasets (CoOp ``$DATA`` layout); defaults to ``$FEDLIT_DATA``.
        shots: training images per class and client (K-shot); ``-1`` uses every image.
        num_clients: number of simulated clients.
        partition: ``disjoint`` (pathological, FedPGP/FedOTP) or ``dirichlet`` (label skew, ``beta``).
        beta: Dirichlet concentration for ``partition: dirichlet``.
        subsample: ``base`` trains on the base half of the classes and evaluates base and novel;
            ``all`` trains and evaluates on every class.
        partition_seed: seed of the partition and K-shot sampling; ``null`` uses the run's seed
            (the official FedPGP/FedOTP code fixes it to 2023).
        min_samples: minimum training samples per client for the Dirichlet partition.
        dataset_args: extra keyword arguments of the dataset factory (e.g. ``{test_per_class: 8}`` for the
            procedural datasets, ``{image_size: 336}`` for file-backed ones).
    """

    def __init__(
        self,
        dataset: str = "shapes-dark",
        root: str | None = None,
        shots: int = 16,
        num_clients: int = 10,
        partition: Literal["disjoint", "dirichlet"] = "disjoint",
        beta: float = 0.3,
        subsample: Literal["base", "all"] = "base",
        partition_seed: int | None = None,
        min_samples: int = 10,
        dataset_args: dict | None = None,
    ):
        if shots == 0 or shots < -1:
            raise FedlitError(f"data.shots={shots}: use a positive number of images per class, or -1 for all")
        if num_clients < 1:
            raise FedlitError(f"data.num_clients={num_clients}: a federation needs at least 1 client")
        if beta <= 0:
            raise FedlitError(f"data.beta={beta}: the Dirichlet concentration must be > 0")
        self.dataset = dataset
        self.root = root
        self.shots = shots
        self.num_clients = num_clients
        self.partition = partition
        self.beta = beta
        self.subsample = subsample
        self.partition_seed = partition_seed
        self.min_samples = min_samples
        self.dataset_args = dict(dataset_args or {})

    def setup(self, seed: int) -> Federation:
        root = self.root or os.environ.get("FEDLIT_DATA")
        _check_dataset_args(self.dataset, self.dataset_args)
        data = get_dataset(self.dataset, root=root, seed=seed, **self.dataset_args)
        pseed = seed if self.partition_seed is None else self.partition_seed
        n = len(data.classnames)
        if self.subsample == "base":
            train_classes, novel_classes = base_novel_classes(n)
        else:
            train_classes, novel_classes = list(range(n)), []
        train_task = Task("base", tuple(data.classnames[c] for c in train_classes))

        tr_labels, te_labels = data.train.labels, data.test.labels
        if self.partition == "disjoint":
            groups = partition_disjoint(train_classes, self.num_clients, pseed)
            train_parts = [sample_kshot(tr_labels, g, self._shots(), pseed) for g in groups]
            test_parts = [np.flatnonzero(np.isin(te_labels, g)) for g in groups]
        else:
            pool = np.flatnonzero(np.isin(tr_labels, train_classes))
            if self.shots > 0:
                pool = sample_kshot(tr_labels, train_classes, self.shots, pseed)
            test_pool = np.flatnonzero(np.isin(te_labels, train_classes))
            tr_parts, te_parts = partition_dirichlet_train_test(
                tr_labels[pool], te_labels[test_pool], self.num_clients, self.beta, pseed, self.min_samples)
            train_parts = [pool[p] for p in tr_parts]
            test_parts = [test_pool[p] for p in te_parts]
            groups = [sorted(set(tr_labels[p].tolist())) for p in train_parts]

        clients = [
            ClientData(
                cid=i,
                classes=list(groups[i]),
                train_idx=np.asarray(train_parts[i], dtype=np.int64),
                train_y=relabel(tr_labels[train_parts[i]], train_classes),
                test_idx=np.asarray(test_parts[i], dtype=np.int64),
                test_y=relabel(te_labels[test_parts[i]], train_classes),
            )
            for i in range(self.num_clients)
        ]
        base_idx = np.flatnonzero(np.isin(te_labels, train_classes))
        evals = {"base": EvalSet(train_task, base_idx, relabel(te_labels[base_idx], train_classes))}
        if novel_classes:
            novel_idx = np.flatnonzero(np.isin(te_labels, novel_classes))
            novel_task = Task("novel", tuple(data.classnames[c] for c in novel_classes))
            evals["novel"] = EvalSet(novel_task, novel_idx, relabel(te_labels[novel_idx], novel_classes))
        return Federation(data=data, clients=clients, train_task=train_task, evals=evals)

    def _shots(self) -> int:
        return self.shots if self.shots > 0 else 10**9


def _check_dataset_args(name: str, args: dict) -> None:
    """Unknown ``data.dataset_args`` keys → a one-line error listing the accepted ones."""
    import inspect

    from .registry import _FACTORIES

    factory = _FACTORIES.get(name)
    if factory is None or not args:
        return
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in ("root", "seed")]
    bad = sorted(set(args) - set(accepted))
    if bad:
        raise FedlitError(f"data.dataset_args: dataset '{name}' does not take {', '.join(bad)}; "
                          f"it takes: {', '.join(accepted) or 'nothing'}")

