"""The partitioner registry (``data.partition``): name → a pure function that splits one dataset (or domain)
among its clients.

Every partitioner has the signature ``fn(ds, classes, spec, seed) -> (groups, train_parts, test_parts)``: ``ds`` is
the :class:`~fedlit.data.registry.ClassificationData` of one dataset, ``classes`` its training classes, ``spec`` the
:class:`PartitionSpec` of the ``data:`` section; per client it returns the classes it holds and its row indices into
``ds.train`` and ``ds.test``. It reads labels only (no I/O, no global state), so the same inputs give the same
clients. A partitioner registered with ``layout="domains"`` (``domain``) is applied to every dataset of the list as a
domain sharing one label space; the others (``layout="classes"``) to every dataset on its own, side by side
(:class:`fedlit.data.federation.FederatedData`). Adding one is a decorated function here::

    @partitioner("my_split")
    def my_split(ds, classes, spec, seed): ...
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from ..errors import FedlitError
from .protocol import (partition_contiguous, partition_dirichlet_train_test, partition_disjoint, partition_iid,
                       partition_labeldir100, sample_kshot)


@dataclass(frozen=True)
class PartitionSpec:
    """The ``data:`` settings a partitioner reads; ``dataset``: the name messages give, ``where``: `` of <name>``
    when several datasets are pooled (else empty)."""

    num_clients: int
    shots: int
    beta: float = 0.3
    classes_per_client: int = 20
    min_samples: int = 10
    dataset: str = ""
    where: str = ""

    @property
    def kshot(self) -> int:
        """``shots`` with ``-1`` (every image) as a large number, for :func:`~fedlit.data.protocol.sample_kshot`."""
        return self.shots if self.shots > 0 else 10**9


Parts = tuple[list[list[int]], list[np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class Partitioner:
    name: str
    fn: Callable[..., Parts]
    layout: Literal["classes", "domains"] = "classes"

    def __call__(self, ds, classes, spec: PartitionSpec, seed: int) -> Parts:
        return self.fn(ds, classes, spec, seed)


#: ``data.partition`` name → :class:`Partitioner`.
PARTITIONERS: dict[str, Partitioner] = {}


def partitioner(name: str, layout: Literal["classes", "domains"] = "classes"):
    """Register the decorated function as ``data.partition: name``."""

    def register(fn):
        if name in PARTITIONERS:
            raise ValueError(f"partitioner {name!r} is registered twice")
        PARTITIONERS[name] = Partitioner(name, fn, layout)
        return fn

    return register


def get_partitioner(name: str) -> Partitioner:
    """The partitioner ``name``; an unknown name is one line listing the registered ones."""
    if name not in PARTITIONERS:
        close = difflib.get_close_matches(str(name), list(PARTITIONERS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise FedlitError(f"data.partition={name!r} is not a registered partitioner{hint}; use one of "
                          f"{', '.join(sorted(PARTITIONERS))}")
    return PARTITIONERS[name]


def _class_split(ds, groups: list[list[int]], spec: PartitionSpec, seed: int) -> Parts:
    """Clients holding whole classes: ``shots`` training images of each of their classes, all their test images."""
    train = [sample_kshot(ds.train.labels, c, spec.kshot, seed) for c in groups]
    test = [np.flatnonzero(np.isin(ds.test.labels, c)) for c in groups]
    return groups, train, test


@partitioner("disjoint")
def disjoint(ds, classes, spec: PartitionSpec, seed: int) -> Parts:
    """Pathological non-IID (FedPGP/FedOTP): each client a disjoint share of the classes."""
    try:
        groups = partition_disjoint(classes, spec.num_clients, seed)
    except FedlitError as e:
        raise FedlitError(f"data{spec.where}: {e} (data.num_clients)") from None
    return _class_split(ds, groups, spec, seed)


@partitioner("contiguous")
def contiguous(ds, classes, spec: PartitionSpec, seed: int) -> Parts:
    """FedTPG: ``classes_per_client`` consecutive classes per client (the client count follows from it)."""
    return _class_split(ds, partition_contiguous(classes, spec.classes_per_client), spec, seed)


@partitioner("dirichlet")
def dirichlet(ds, classes, spec: PartitionSpec, seed: int) -> Parts:
    """FedOTP ``noniid-labeldir``: label skew Dir(β) over the K-shot pool, train and test split alike."""
    tr_labels, te_labels = ds.train.labels, ds.test.labels
    pool = np.flatnonzero(np.isin(tr_labels, classes))
    if spec.shots > 0:
        pool = sample_kshot(tr_labels, classes, spec.shots, seed)
    test_pool = np.flatnonzero(np.isin(te_labels, classes))
    tr_parts, te_parts = partition_dirichlet_train_test(
        tr_labels[pool], te_labels[test_pool], spec.num_clients, spec.beta, seed, spec.min_samples)
    train = [pool[p] for p in tr_parts]
    groups = [sorted(set(tr_labels[p].tolist())) for p in train]
    return groups, train, [test_pool[p] for p in te_parts]


@partitioner("labeldir100")
def labeldir100(ds, classes, spec: PartitionSpec, seed: int) -> Parts:
    """FedOTP CIFAR-100: two-level Dirichlet over the train+test pool of the classes; rows map back to splits."""
    coarse = [getattr(s, "meta", {}).get("coarse") for s in (ds.train, ds.test)]
    if any(c is None for c in coarse):
        raise FedlitError(f"data.partition=labeldir100 needs coarse labels (split.meta['coarse']); dataset "
                          f"'{spec.dataset}' has none — use cifar100, or partition: dirichlet")
    tr_rows = np.flatnonzero(np.isin(ds.train.labels, classes))
    te_rows = np.flatnonzero(np.isin(ds.test.labels, classes))
    fine = np.concatenate([ds.train.labels[tr_rows], ds.test.labels[te_rows]])
    coarse_pool = np.concatenate([coarse[0][tr_rows], coarse[1][te_rows]])
    parts = partition_labeldir100(fine, coarse_pool, spec.num_clients, spec.beta, seed)
    n_tr = len(tr_rows)
    train = [tr_rows[p[p < n_tr]] for p in parts]
    test = [te_rows[p[p >= n_tr] - n_tr] for p in parts]
    small = [i for i, p in enumerate(train) if len(p) == 0]
    if small:
        raise FedlitError(f"labeldir100 left client(s) {small[:5]} without training images "
                          f"({len(fine)} samples over {spec.num_clients} clients); lower data.num_clients")
    return [sorted(set(ds.train.labels[p].tolist())) for p in train], train, test


@partitioner("domain", layout="domains")
def domain(ds, classes, spec: PartitionSpec, seed: int) -> Parts:
    """One domain (FedPGP Table 2, pFedPG): ``num_clients`` iid clients over its K-shot pool and its test rows."""
    pool = np.flatnonzero(np.isin(ds.train.labels, classes))
    if spec.shots > 0:
        pool = sample_kshot(ds.train.labels, classes, spec.shots, seed)
    test_pool = np.flatnonzero(np.isin(ds.test.labels, classes))
    try:
        tr_parts = partition_iid(len(pool), spec.num_clients, seed)
        te_parts = partition_iid(len(test_pool), spec.num_clients, seed + 1)
    except FedlitError as e:
        raise FedlitError(f"domain {spec.dataset}: {e}; lower data.num_clients") from None
    train, test = [pool[p] for p in tr_parts], [test_pool[p] for p in te_parts]
    return [sorted(set(ds.train.labels[p].tolist())) for p in train], train, test


__all__ = ["PARTITIONERS", "PartitionSpec", "Partitioner", "get_partitioner", "partitioner"]
