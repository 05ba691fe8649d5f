"""From dataset names to a federation: clients (data indices only) and evaluation sets.

A federation is made of one or more *groups* — a dataset or a domain — each partitioned into clients on its own:

- **One dataset, class-level** (FedPGP/FedOTP base-to-novel): classes are split CoOp-style into base and novel halves;
  the *base* classes are partitioned over ``num_clients`` clients (pathological ``disjoint`` classes, ``dirichlet``
  label skew, FedTPG ``contiguous`` dealing, or ``labeldir100`` over train+test); each client holds ``shots`` training
  images per class and the test images of its classes. Evaluation sets: ``base`` (all base classes, whole base test
  set) and ``novel``.
- **Several datasets pooled** (FedTPG cross-class): the same per dataset; clients of different datasets train in one
  run, each among its own dataset's classes; evaluation sets ``<dataset>/base`` and ``<dataset>/novel``; summaries
  average clients per dataset, then datasets.
- **Unseen datasets** (``eval_datasets``; FedTPG cross-data and cross-domain): evaluated on all their classes, never
  trained; they count as *novel* for every client.
- **Client 0's sets** (``global_eval_set: official_client0``, which a method asks for through
  :attr:`fedlit.methods.base.FedMethod.global_eval_set`; FedDnC's released code, spec 3a §2.6): every client's *base*
  is the first client's test split (among all base classes) and its *novel* the first client's share of the novel
  classes — the novel half split by the same partitioner and seed — classified among all novel classes (sets
  ``client0/base``, ``client0/novel``); Local is unchanged. ``full_split`` (default): the whole splits.
- **One client per domain** (``partition: domain``; FedPGP Table 2, pFedPG): every dataset of the list is a domain
  with the same classes; each holds ``num_clients`` clients (iid split); a client's *novel* accuracy is the mean over
  the other domains (leave-one-domain-out), or over the ``leave_out`` domains, which get no client.

:class:`Federation` records, per client, which evaluation sets are its ``base`` and ``novel`` ones and which set
holds its own test images (``home``), so evaluation (:mod:`fedlit.evaluation`) is one generic loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..errors import FedlitError
from .task import Task
from .partitioners import PARTITIONERS, PartitionSpec, get_partitioner
from .protocol import base_novel_classes, class_histogram, format_histogram, relabel
from .concat import concat_datasets
from .registry import ClassificationData, get_dataset


#: which test sets give Base and Novel (:meth:`FederatedData.setup`): the whole splits, or client 0's (FedDnC's code)
GLOBAL_EVAL_SETS = ("full_split", "official_client0")


@dataclass
class ClientData:
    """One simulated client: indices into the federation's splits, labels in its training task's space."""

    cid: int
    classes: list[int]  # label ids (in Federation.data's label space) the client holds
    train_idx: np.ndarray
    train_y: np.ndarray
    test_idx: np.ndarray
    test_y: np.ndarray
    group: str = ""  # the dataset / domain the client belongs to
    task: Task | None = None  # the classes it trains among (None: Federation.train_task)

    @property
    def num_samples(self) -> int:
        return int(len(self.train_idx))


@dataclass
class EvalSet:
    """A task and the test images evaluated on it (labels in the task's space)."""

    task: Task
    idx: np.ndarray
    y: np.ndarray
    group: str = ""


@dataclass
class ClientEvals:
    """Which evaluation sets give a client's Base and Novel numbers (each the mean over its sets) and which set
    contains its own test images classified among its training task (Local reuses those predictions)."""

    base: list[str] = field(default_factory=list)
    novel: list[str] = field(default_factory=list)
    home: str | None = None


@dataclass
class Federation:
    data: ClassificationData  # every group's splits side by side (labels offset per dataset)
    clients: list[ClientData]
    train_task: Task  # the first group's training classes (methods with a linear head size it by this)
    evals: dict[str, EvalSet]
    client_evals: dict[int, ClientEvals] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)  # training groups, in order

    def task_of(self, cid: int) -> Task:
        return self.clients[cid].task or self.train_task

    def held_classes(self, cid: int) -> list[int]:
        """Positions in :meth:`task_of` of the classes client ``cid`` holds."""
        pos = {name: i for i, name in enumerate(self.task_of(cid).classnames)}
        return [pos[self.data.classnames[c]] for c in self.clients[cid].classes]

    def evals_of(self, cid: int) -> ClientEvals:
        return self.client_evals.get(cid) or ClientEvals(
            base=[n for n in ("base",) if n in self.evals], novel=[n for n in ("novel",) if n in self.evals],
            home="base" if "base" in self.evals else None)

    def summary(self) -> str:
        hist = class_histogram([self.data.train.labels[c.train_idx] for c in self.clients], len(self.data.classnames))
        text = format_histogram(hist, self.data.classnames)
        if len(self.groups) > 1:
            counts = {g: sum(c.group == g for c in self.clients) for g in self.groups}
            text = "clients per group: " + ", ".join(f"{g} {n}" for g, n in counts.items()) + "\n" + text
        return text


class FederatedData:
    """How to build the federation (the ``data:`` section of a config).

    Args:
        dataset: a registered dataset name (``fedlit datasets`` lists them), or a list of them: several datasets
            pooled in one federation (FedTPG cross-class), or the domains of ``partition: domain``.
        root: data root for real datasets (CoOp ``$DATA`` layout); defaults to ``$FEDLIT_DATA``.
        shots: training images per class and client (K-shot); ``-1`` uses every image.
        num_clients: number of clients per dataset (per domain for ``partition: domain``); ignored by
            ``contiguous``, whose client count follows from ``classes_per_client``.
        partition: a registered partitioner (:data:`fedlit.data.partitioners.PARTITIONERS`): ``disjoint``
            (pathological classes, FedPGP/FedOTP), ``dirichlet`` (label skew ``beta``, FedOTP ``noniid-labeldir``),
            ``labeldir100`` (two-level Dirichlet over train+test, FedOTP CIFAR-100; needs coarse labels),
            ``contiguous`` (FedTPG: ``classes_per_client`` consecutive classes per client) or ``domain`` (every
            dataset of the list is a domain with the same classes; ``num_clients`` iid clients per domain).
        beta: Dirichlet concentration for ``dirichlet`` / ``labeldir100``.
        classes_per_client: classes per client for ``contiguous`` (20 cross-class, 5 cross-data).
        subsample: ``base`` trains on the base half of the classes and evaluates base and novel;
            ``all`` trains and evaluates on every class.
        partition_seed: seed of the partition and K-shot sampling; ``null`` uses the run's seed
            (the official FedPGP/FedOTP code fixes it to 2023, labeldir100 to 12345).
        min_samples: minimum training samples per client for the Dirichlet partition.
        eval_datasets: datasets evaluated on all their classes and never trained (FedTPG cross-data /
            cross-domain); each counts as novel for every client.
        leave_out: with ``partition: domain``, domains (names from ``dataset``) that get no client and are the
            unseen domains every client is tested on.
        dataset_args: extra keyword arguments of the dataset factory, applied to every dataset (e.g.
            ``{test_per_class: 8}`` for the procedural datasets, ``{image_size: 336}`` for file-backed ones).
    """

    def __init__(
        self,
        dataset: str | list[str] = "shapes-dark",
        root: str | None = None,
        shots: int = 16,
        num_clients: int = 10,
        partition: str = "disjoint",
        beta: float = 0.3,
        classes_per_client: int = 20,
        subsample: Literal["base", "all"] = "base",
        partition_seed: int | None = None,
        min_samples: int = 10,
        eval_datasets: list[str] | None = None,
        leave_out: list[str] | None = None,
        dataset_args: dict | None = None,
    ):
        if partition not in PARTITIONERS:
            get_partitioner(partition)  # an unknown name: one line listing the registered partitioners
        if shots == 0 or shots < -1:
            raise FedlitError(f"data.shots={shots}: use a positive number of images per class, or -1 for all")
        if num_clients < 1:
            raise FedlitError(f"data.num_clients={num_clients}: a federation needs at least 1 client")
        if beta <= 0:
            raise FedlitError(f"data.beta={beta}: the Dirichlet concentration must be > 0")
        if classes_per_client < 1:
            raise FedlitError(f"data.classes_per_client={classes_per_client}: use a positive number of classes")
        names = [dataset] if isinstance(dataset, str) else list(dataset)
        if not names:
            raise FedlitError("data.dataset is empty: name at least one dataset (fedlit datasets lists them)")
        eval_only, leave_out = list(eval_datasets or []), list(leave_out or [])
        for what, lst in (("data.dataset", names), ("data.eval_datasets", eval_only)):
            dup = sorted({n for n in lst if lst.count(n) > 1})
            if dup:
                raise FedlitError(f"{what} lists {', '.join(dup)} twice; name each dataset once")
        both = sorted(set(names) & set(eval_only))
        if both:
            raise FedlitError(f"{', '.join(both)} is both trained (data.dataset) and in data.eval_datasets; "
                              f"keep it in one of them")
        if leave_out and PARTITIONERS[partition].layout != "domains":
            raise FedlitError("data.leave_out needs data.partition: domain (it names domains that get no client)")
        unknown = sorted(set(leave_out) - set(names))
        if unknown:
            raise FedlitError(f"data.leave_out: {', '.join(unknown)} not in data.dataset ({', '.join(names)})")
        if leave_out and len(leave_out) == len(names):
            raise FedlitError("data.leave_out leaves out every domain; keep at least one domain for training")
        self.dataset = dataset
        self.names = names
        self.root = root
        self.shots = shots
        self.num_clients = num_clients
        self.partition = partition
        self.beta = beta
        self.classes_per_client = classes_per_client
        self.subsample = subsample
        self.partition_seed = partition_seed
        self.min_samples = min_samples
        self.eval_datasets = eval_only
        self.leave_out = leave_out
        self.dataset_args = dict(dataset_args or {})

    @property
    def label(self) -> str:
        """A short name for run directories and messages: ``a``, ``a+b+c``, or ``a+8-more`` for long lists."""
        names = self.names + self.eval_datasets
        return "+".join(names) if len(names) <= 3 else f"{names[0]}+{len(names) - 1}-more"

    # ------------------------------------------------------------------------------------ building
    def setup(self, seed: int, global_eval_set: str = "full_split") -> Federation:
        """The federation of run seed ``seed``; ``global_eval_set`` (``full_split`` / ``official_client0``) picks the
        sets that give Base and Novel (module docstring)."""
        if global_eval_set not in GLOBAL_EVAL_SETS:
            raise FedlitError(f"global_eval_set={global_eval_set!r}: use one of {', '.join(GLOBAL_EVAL_SETS)}")
        root = self.root or os.environ.get("FEDLIT_DATA")
        for name in self.names + self.eval_datasets:
            _check_dataset_args(name, self.dataset_args)
        datasets = {n: get_dataset(n, root=root, seed=seed, **self.dataset_args)
                    for n in self.names + self.eval_datasets}
        pseed = seed if self.partition_seed is None else self.partition_seed
        if get_partitioner(self.partition).layout == "domains":
            if global_eval_set != "full_split":
                raise FedlitError(f"global_eval_set={global_eval_set}: client 0's sets need a class-level partition, "
                                  f"not data.partition={self.partition}; use global_eval_set full_split")
            return self._domains(datasets, pseed)
        fed = self._classes(datasets, pseed)
        return self._client0_sets(fed, datasets, pseed) if global_eval_set == "official_client0" else fed

    def _classes(self, datasets: dict[str, ClassificationData], pseed: int) -> Federation:
        """Class-level federations: each dataset of ``dataset`` partitioned on its own, side by side."""
        order = self.names + self.eval_datasets
        data = concat_datasets([datasets[n] for n in order], shared_labels=False)
        multi = len(order) > 1
        label_off = _offsets(order, lambda n: len(datasets[n].classnames))
        tr_off = _offsets(order, lambda n: len(datasets[n].train))
        te_off = _offsets(order, lambda n: len(datasets[n].test))
        clients, evals, client_evals, first_task = [], {}, {}, None
        for g in self.names:
            ds = datasets[g]
            n = len(ds.classnames)
            train_classes, novel_classes = (base_novel_classes(n) if self.subsample == "base"
                                            else (list(range(n)), []))
            task = Task(f"{g}/base" if multi else "base", tuple(ds.classnames[c] for c in train_classes))
            first_task = task if first_task is None else first_task
            groups, train_parts, test_parts = self._partition(ds, g, train_classes, pseed)
            key = (lambda role: f"{g}/{role}") if multi else (lambda role: role)
            base_idx = np.flatnonzero(np.isin(ds.test.labels, train_classes))
            evals[key("base")] = EvalSet(task, base_idx + te_off[g], relabel(ds.test.labels[base_idx], train_classes), g)
            if novel_classes:
                novel_idx = np.flatnonzero(np.isin(ds.test.labels, novel_classes))
                ntask = Task(key("novel"), tuple(ds.classnames[c] for c in novel_classes))
                evals[key("novel")] = EvalSet(ntask, novel_idx + te_off[g],
                                              relabel(ds.test.labels[novel_idx], novel_classes), g)
            for i in range(len(train_parts)):
                cid = len(clients)
                clients.append(ClientData(
                    cid=cid, classes=[c + label_off[g] for c in groups[i]],
                    train_idx=np.asarray(train_parts[i], dtype=np.int64) + tr_off[g],
                    train_y=relabel(ds.train.labels[train_parts[i]], train_classes),
                    test_idx=np.asarray(test_parts[i], dtype=np.int64) + te_off[g],
                    test_y=relabel(ds.test.labels[test_parts[i]], train_classes),
                    group=g, task=task))
                client_evals[cid] = ClientEvals(base=[key("base")], home=key("base"),
                                                novel=[key("novel")] if novel_classes else [])
        for g in self.eval_datasets:  # unseen datasets: every class, novel for every client
            ds = datasets[g]
            evals[g] = EvalSet(Task(g, tuple(ds.classnames)), np.arange(len(ds.test)) + te_off[g],
                               ds.test.labels.copy(), g)
            for ce in client_evals.values():
                ce.novel.append(g)
        return Federation(data=data, clients=clients, train_task=first_task, evals=evals,
                          client_evals=client_evals, groups=list(self.names))

    def _client0_sets(self, fed: Federation, datasets: dict[str, ClassificationData], pseed: int) -> Federation:
        """``official_client0``: per trained dataset, Base / Novel of every client = the sets of its first client."""
        te_off = _offsets(self.names + self.eval_datasets, lambda n: len(datasets[n].test))
        multi = len(self.names + self.eval_datasets) > 1
        for g in self.names:
            ds = datasets[g]
            key = (lambda role: f"{g}/{role}") if multi else (lambda role: role)
            first = next(c for c in fed.clients if c.group == g)
            base = fed.evals[key("base")]
            fed.evals[key("client0/base")] = EvalSet(base.task, first.test_idx.copy(), first.test_y.copy(), g)
            names = [key("client0/base")]
            novel_names = []
            if key("novel") in fed.evals:
                novel_classes = base_novel_classes(len(ds.classnames))[1]
                _, _, tests = get_partitioner(self.partition)(ds, novel_classes, self._spec(g), pseed)
                rows = np.asarray(tests[0], dtype=np.int64)
                fed.evals[key("client0/novel")] = EvalSet(fed.evals[key("novel")].task, rows + te_off[g],
                                                          relabel(ds.test.labels[rows], novel_classes), g)
                del fed.evals[key("novel")]  # unused: no client is scored on the whole novel split
                novel_names = [key("client0/novel")]
            for c in fed.clients:
                if c.group == g:
                    ce = fed.client_evals[c.cid]
                    ce.base = list(names)
                    ce.novel = novel_names + [n for n in ce.novel if n != key("novel")]
        return fed

    def _partition(self, ds: ClassificationData, g: str, train_classes: list[int], pseed: int):
        """Per client of one dataset: (classes, train indices, test indices), indices into ``ds``'s splits
        (the registered partitioner ``data.partition``: :data:`fedlit.data.partitioners.PARTITIONERS`)."""
        tr_labels = ds.train.labels
        fewest = int(np.bincount(tr_labels, minlength=max(train_classes) + 1)[train_classes].min()) if train_classes else 0
        if 0 < fewest < self.shots:
            print(f"fedlit: data.shots={self.shots}, but {g} has only {fewest} training images in its smallest class: "
                  f"classes with fewer than {self.shots} images use all of them (set data.shots={fewest} or -1 to "
                  "say so)")
        return get_partitioner(self.partition)(ds, train_classes, self._spec(g), pseed)

    def _spec(self, g: str) -> PartitionSpec:
        """What a partitioner reads of these settings, for dataset (or domain) ``g``."""
        return PartitionSpec(num_clients=self.num_clients, shots=self.shots, beta=self.beta,
                             classes_per_client=self.classes_per_client, min_samples=self.min_samples, dataset=g,
                             where=f" of {g}" if len(self.names) > 1 else "")

    def _domains(self, datasets: dict[str, ClassificationData], pseed: int) -> Federation:
        """One client (or ``num_clients`` iid clients) per domain; novel = the other / left-out domains."""
        order = self.names + self.eval_datasets
        ref = datasets[order[0]].classnames
        for n in order[1:]:
            if list(datasets[n].classnames) != list(ref):
                raise FedlitError(f"data.partition=domain needs the same classes in every domain; '{n}' has "
                                  f"{len(datasets[n].classnames)} classes that differ from '{order[0]}''s "
                                  f"{len(ref)}; pool different datasets with partition: disjoint/contiguous")
        data = concat_datasets([datasets[n] for n in order], shared_labels=True)
        n_cls = len(ref)
        train_classes = base_novel_classes(n_cls)[0] if self.subsample == "base" else list(range(n_cls))
        task = Task("domains", tuple(ref[c] for c in train_classes))
        tr_off = _offsets(order, lambda n: len(datasets[n].train))
        te_off = _offsets(order, lambda n: len(datasets[n].test))
        evals = {}
        for d in order:
            te = datasets[d].test.labels
            rows = np.flatnonzero(np.isin(te, train_classes))
            evals[d] = EvalSet(task, rows + te_off[d], relabel(te[rows], train_classes), d)
        trained = [d for d in self.names if d not in self.leave_out]
        unseen = [d for d in order if d not in trained]
        clients, client_evals = [], {}
        for d in trained:
            ds = datasets[d]
            for held, tr, te in zip(*get_partitioner(self.partition)(ds, train_classes, self._spec(d), pseed)):
                cid = len(clients)
                clients.append(ClientData(
                    cid=cid, classes=held,
                    train_idx=tr + tr_off[d], train_y=relabel(ds.train.labels[tr], train_classes),
                    test_idx=te + te_off[d], test_y=relabel(ds.test.labels[te], train_classes),
                    group=d, task=task))
                others = unseen if unseen else [o for o in trained if o != d]
                client_evals[cid] = ClientEvals(base=[], novel=list(others), home=d)
        return Federation(data=data, clients=clients, train_task=task, evals=evals, client_evals=client_evals,
                          groups=trained)


def _offsets(order: list[str], size) -> dict[str, int]:
    """Where each dataset of ``order`` starts when their rows (or labels) are laid side by side."""
    starts = np.cumsum([0] + [size(n) for n in order[:-1]]).tolist()
    return dict(zip(order, starts))


def _check_dataset_args(name: str, args: dict) -> None:
    """Unknown ``data.dataset_args`` keys → a one-line error listing the accepted ones."""
    import inspect

    from .registry import _FACTORIES

    params = inspect.signature(_FACTORIES[name]).parameters if name in _FACTORIES and args else {}
    if not params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in ("root", "seed")]
    bad = sorted(set(args) - set(accepted))
    if bad:
        raise FedlitError(f"data.dataset_args: dataset '{name}' does not take {', '.join(bad)}; "
                          f"it takes: {', '.join(accepted) or 'nothing'}")
