"""The partitioner registry (``data.partition``): every documented name registered, an unknown name refused in one
line listing the registry, a registered partitioner usable without editing the federation code."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedlit.data import partitioners
from fedlit.data.federation import FederatedData
from fedlit.data.partitioners import PARTITIONERS, PartitionSpec, partitioner
from fedlit.errors import FedlitError

DOCUMENTED = {"disjoint", "dirichlet", "labeldir100", "contiguous", "domain"}


def test_the_registry_has_every_documented_name():
    doc = re.search(r"\n\s+partition: (.*?)\n\s+beta:", FederatedData.__doc__, re.S).group(1)
    assert set(re.findall(r"``(\w+)``", doc)) >= DOCUMENTED  # the Args of the data: section name them
    assert set(PARTITIONERS) == DOCUMENTED
    assert {n for n, p in PARTITIONERS.items() if p.layout == "domains"} == {"domain"}


def test_an_unknown_partition_is_one_line_listing_the_registry():
    with pytest.raises(FedlitError) as err:
        FederatedData(partition="dirichlet2")
    msg = str(err.value)
    assert "\n" not in msg and "data.partition" in msg and "did you mean 'dirichlet'?" in msg
    assert all(name in msg for name in DOCUMENTED)


def test_an_unknown_partition_through_the_cli_is_one_line():
    from fedlit import experiment

    parser = experiment.fit_parser()
    with pytest.raises(FedlitError, match=r"^data\.partition='iid' is not a registered partitioner; use one of "
                                          r"contiguous, dirichlet, disjoint, domain, labeldir100$"):
        experiment.parse_fit(parser, lambda: parser.parse_args(
            ["--config", "configs/quickstart.yaml", "--data.partition", "iid"]))


def test_disjoint_by_hand():
    """8 classes over 2 clients, 1 shot: each client 4 whole classes, its 4 training rows and every test row of them."""
    labels = np.repeat(np.arange(8), 3)  # rows 3c, 3c+1, 3c+2 are class c
    ds = type("DS", (), {"train": type("S", (), {"labels": labels}), "test": type("S", (), {"labels": labels})})
    groups, train, test = PARTITIONERS["disjoint"](ds, list(range(8)), PartitionSpec(num_clients=2, shots=1), 0)
    assert sorted(c for g in groups for c in g) == list(range(8)) and [len(g) for g in groups] == [4, 4]
    for g, tr, te in zip(groups, train, test):
        assert sorted(labels[tr].tolist()) == sorted(g)  # one image of each of its classes
        assert te.tolist() == [3 * c + k for c in sorted(g) for k in range(3)]


def test_a_registered_partitioner_is_used_by_name(monkeypatch):
    """A new partitioner is one decorated function; the federation code uses it by name."""
    monkeypatch.setattr(partitioners, "PARTITIONERS", dict(PARTITIONERS))
    monkeypatch.setattr("fedlit.data.federation.PARTITIONERS", partitioners.PARTITIONERS)

    @partitioner("halves")
    def halves(ds, classes, spec, seed):
        groups = [list(classes[: len(classes) // 2]), list(classes[len(classes) // 2:])]
        return (groups, [np.flatnonzero(np.isin(ds.train.labels, g)) for g in groups],
                [np.flatnonzero(np.isin(ds.test.labels, g)) for g in groups])

    fed = FederatedData(partition="halves", shots=-1).setup(0)
    assert len(fed.clients) == 2
    assert not set(fed.clients[0].classes) & set(fed.clients[1].classes)
    with pytest.raises(ValueError, match="registered twice"):
        partitioner("halves")(halves)
