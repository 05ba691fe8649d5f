"""Tests of the data layer: shapes world, registry, protocols (CPU, a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlit.data import protocol as P
from fedlit.data import registry as R
from fedlit.data import shapes as S
from fedlit.errors import FedlitError

# --- base / novel -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "n_base", "n_novel"), [(47, 24, 23), (102, 51, 51), (37, 19, 18), (48, 24, 24)])
def test_base_novel_counts(n, n_base, n_novel):
    base, novel = P.base_novel_classes(n)
    assert (len(base), len(novel)) == (n_base, n_novel)
    assert base + novel == list(range(n))


def test_relabel():
    assert P.relabel(np.array([30, 24, 30, 47]), list(range(24, 48))).tolist() == [6, 0, 6, 23]
    assert P.relabel(np.array([5, 2, 9]), [9, 2, 5]).tolist() == [2, 1, 0]  # position in the given list
    with pytest.raises(FedlitError, match="not among"):
        P.relabel(np.array([1, 3]), [0, 1, 2])


# --- partitioners -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_classes", "sizes"),
    [
        (50, [5] * 10),  # Caltech101 base
        (51, [5] * 9 + [6]),  # Flowers102 base, Food101 base
        (19, [2] * 9 + [1]),  # OxfordPets base
        (24, [2] * 9 + [6]),  # DTD base
        (25, [2] * 9 + [7]),  # round(2.5) == 2: banker's rounding, as Python's round()
        (37, [4] * 9 + [1]),  # OxfordPets all (FedOTP)
        (102, [10] * 9 + [12]),  # Flowers102 all (FedOTP)
    ],
)
def test_partition_disjoint_spec_arithmetic(num_classes, sizes):
    parts = P.partition_disjoint(range(num_classes), 10, seed=2023)
    assert [len(p) for p in parts] == sizes
    flat = [c for p in parts for c in p]
    assert sorted(flat) == list(range(num_classes))  # disjoint and complete


def test_partition_disjoint_seeded_shuffle():
    a = P.partition_disjoint(range(50), 10, seed=2023)
    assert a == P.partition_disjoint(range(50), 10, seed=2023)
    assert a != P.partition_disjoint(range(50), 10, seed=1)
    assert a[0] != list(range(5))  # shuffled, not dealt in order
    # Works on any class list (e.g. base classes that are not 0..C-1).
    assert sorted(c for p in P.partition_disjoint([7, 8, 9, 10], 2, seed=0) for c in p) == [7, 8, 9, 10]


@pytest.mark.parametrize(("num_classes", "k"), [(15, 10), (5, 10), (0, 3)])
def test_partition_disjoint_infeasible(num_classes, k):
    with pytest.raises(FedlitError, match=f"{num_classes} classes disjointly over {k} clients"):
        P.partition_disjoint(range(num_classes), k, seed=0)


def test_partition_contiguous_fedtpg_counts():
    base_sizes = {"caltech": 50, "flowers": 51, "aircraft": 50, "ucf": 51, "pets": 19, "food": 51, "dtd": 24,
                  "cars": 98, "sun": 199}  # fmt: skip
    counts = {k: len(P.partition_contiguous(range(n), 20)) for k, n in base_sizes.items()}
    assert counts == {"caltech": 2, "flowers": 3, "aircraft": 2, "ucf": 3, "pets": 1, "food": 3, "dtd": 1,
                      "cars": 5, "sun": 10}  # fmt: skip
    assert sum(counts.values()) == 30
    cars = P.partition_contiguous(range(98), 20)
    assert [len(p) for p in cars] == [20, 20, 20, 20, 18] and cars[1] == list(range(20, 40))
    assert len(P.partition_contiguous(range(1000), 5)) == 200


def test_partition_dirichlet():
    labels = np.repeat(np.arange(10), 100)  # N = 1000
    parts = P.partition_dirichlet(labels, num_clients=20, beta=0.3, seed=0, min_size=10)
    assert len(parts) == 20
    assert min(len(p) for p in parts) >= 10
    flat = np.concatenate(parts)
    assert np.array_equal(np.sort(flat), np.arange(1000))  # disjoint and complete
    again = P.partition_dirichlet(labels, num_clients=20, beta=0.3, seed=0, min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = P.partition_dirichlet(labels, num_clients=20, beta=0.3, seed=1, min_size=10)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    hist = P.class_histogram([labels[p] for p in parts], 10)
    assert (hist > 0).sum(1).mean() < 9  # label skew: clients do not see every class on average


def test_partition_dirichlet_impossible():
    labels = np.repeat(np.arange(4), 10)
    with pytest.raises(FedlitError, match="5 clients >= 10 samples each from 40"):
        P.partition_dirichlet(labels, 5, 0.5, seed=0, min_size=10)
    with pytest.raises(FedlitError, match="after 3 tries"):  # feasible in principle, too skewed in practice
        P.partition_dirichlet(labels, 4, 0.01, seed=0, min_size=10, max_tries=3)


def test_partition_dirichlet_train_test():
    train, test = np.repeat(np.arange(5), 60), np.repeat(np.arange(5), 20)
    tr, te = P.partition_dirichlet_train_test(train, test, 4, 0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(tr, P.partition_dirichlet(train, 4, 0.5, 3)))
    assert np.array_equal(np.sort(np.concatenate(te)), np.arange(100))
    htr, hte = P.class_histogram([train[i] for i in tr], 5), P.class_histogram([test[i] for i in te], 5)
    assert np.abs(htr / 60 - hte / 20).max() < 0.1  # same per-class fractions (up to rounding)


def test_histogram_and_format():
    hist = P.class_histogram([np.array([0, 0, 2]), np.array([1])], 3)
    assert hist.tolist() == [[2, 0, 1], [0, 1, 0]]
    text = P.format_histogram(hist, ["a", "b", "c"])
    lines = text.splitlines()
    assert len(lines) == 4  # header, 2 clients, total
    assert "a (2), c (1)" in lines[1] and lines[1].split()[:3] == ["0", "3", "2"]
    assert lines[-1].split() == ["total", "4", "3"]


# --- K-shot -------------------------------------------------------------------------------------------------


def test_sample_kshot():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 20)
    idx = P.sample_kshot(labels, [2, 0, 1], shots=4, seed=5)
    assert len(idx) == 4 + 4 + 3  # class 1 has only 3
    assert labels[idx].tolist() == [2] * 4 + [0] * 4 + [1] * 3  # grouped in the given class order
    assert np.array_equal(idx, P.sample_kshot(labels, [2, 0, 1], shots=4, seed=5))
    assert not np.array_equal(idx, P.sample_kshot(labels, [2, 0, 1], shots=4, seed=6))
    assert len(set(idx.tolist())) == len(idx)
    assert len(P.sample_kshot(labels, [0, 1, 2], shots=0, seed=0)) == 33  # 0 = all


# --- shapes world -------------------------------------------------------------------------------------------


def test_shapes_constants():
    assert len(S.COLOURS) == 8 and len(S.SHAPES) == 6 and S.NUM_CLASSES == 48
    names = S.class_names()
    assert names[S.label_of(2, 3)] == f"{S.COLOURS[2]} {S.SHAPES[3]}" and len(set(names)) == 48
    assert len(set(S.HELD_OUT)) == 12
    assert {c for c, _ in S.HELD_OUT} == set(range(8)) and {s for _, s in S.HELD_OUT} == set(range(6))
    assert sum(lbl < 24 for lbl in S.HELD_OUT_LABELS) == 6  # spread over both label halves
    assert len(S.SEEN_LABELS) == 36 and not set(S.SEEN_LABELS) & set(S.HELD_OUT_LABELS)
    assert len(S.TEMPLATES) >= 6 and "a photo of a {colour} {shape}." in S.TEMPLATES
    assert {"clean", "textured", "noisy", "dark", "stripes"} <= set(S.DOMAINS)


def test_render_deterministic():
    colour, shape = np.arange(48) // 6, np.arange(48) % 6
    a, attrs = S.render(colour, shape, "textured", seed=7)
    b, _ = S.render(colour, shape, "textured", seed=7)
    c, _ = S.render(colour, shape, "textured", seed=8)
    assert a.shape == (48, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(attrs) == {"colour", "shape", "size", "pos"}
    assert attrs["size"].max() < 3 and attrs["pos"].max() < 9 and np.array_equal(attrs["shape"], shape)
    assert S.render(0, 0, "clean", seed=0, size=64)[0].shape == (1, 3, 64, 64)


def test_render_object_colour():
    # A large centred red object: centre pixel is close to red on the clean domain.
    img, _ = S.render([0], [0], "clean", seed=0, size_idx=[2], pos_idx=[4])
    r, g, b = img[0, :, 16, 16].tolist()
    assert r > 170 and g < 80 and b < 80


def test_domains_shift_backgrounds():
    n = 200
    colour, shape = np.arange(n) % 8, np.arange(n) % 6
    clean, attrs = S.render(colour, shape, "clean", seed=3)
    for domain in ("textured", "noisy", "dark", "stripes"):
        shifted, attrs_d = S.render(colour, shape, domain, seed=3)
        # Same seed: same objects (attributes are drawn before anything domain-specific) ...
        assert all(np.array_equal(attrs[k], attrs_d[k]) for k in attrs)
        # ... on clearly different backgrounds: corner pixels are background in most images.
        corner = (slice(None), slice(None), slice(0, 3), slice(0, 3))
        diff = (clean[corner].float() - shifted[corner].float()).abs().mean()
        assert diff > 20, (domain, diff)
    # Clean backgrounds are flat; noisy and striped ones are not.
    std = {d: S.render(colour, shape, d, seed=3)[0][:, :, :4, :4].float().std(dim=(2, 3)).mean() for d in S.DOMAINS}
    assert std["clean"] < 6 < std["noisy"] and std["clean"] < std["stripes"] and std["clean"] < std["textured"]
    with pytest.raises(FedlitError, match="unknown domain"):
        S.render(0, 0, "foggy", seed=0)


def test_render_speed_10k():
    import time

    rng = np.random.default_rng(0)
    t = time.perf_counter()
    S.render(rng.integers(0, 8, 10_000), rng.integers(0, 6, 10_000), "textured", seed=0)
    assert time.perf_counter() - t < 4.0  # target < 2 s; slack for loaded CI machines


def test_caption():
    assert S.caption(0, 0, 2, 0, "clean", 0) == "a photo of a red circle."
    assert S.caption("blue", "square", 0, 0, "clean", 2) == "a blue square at the top left."
    assert S.caption(1, 2, 0, 4, "stripes", 4) == "a green triangle on a striped background."
    caps = {S.caption(3, 5, 1, 8, "dark", t) for t in range(len(S.TEMPLATES))}
    assert len(caps) == len(S.TEMPLATES) and all("yellow diamond" in c for c in caps)


def test_pretraining_batch_never_held_out():
    rng = np.random.default_rng(0)
    held = set(S.HELD_OUT_LABELS)
    seen_labels = set()
    for _ in range(5):
        images, captions, labels = S.sample_pretraining_batch(256, rng)
        assert images.shape == (256, 3, 32, 32) and len(captions) == 256
        assert not set(labels.tolist()) & held
        seen_labels |= set(labels.tolist())
        for cap, lbl in zip(captions, labels, strict=True):
            assert S.class_names()[lbl] in cap
    assert seen_labels == set(S.SEEN_LABELS)
    a = S.sample_pretraining_batch(8, np.random.default_rng(1))
    b = S.sample_pretraining_batch(8, np.random.default_rng(1))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


# --- registry -----------------------------------------------------------------------------------------------


def test_registry_round_trip():
    names = R.list_datasets()
    assert {"shapes", "shapes-textured", "shapes-noisy", "shapes-dark", "shapes-stripes"} <= set(names)
    d = R.get_dataset("shapes-dark", seed=1, train_per_class=4, val_per_class=1, test_per_class=2)
    assert d is R.get_dataset("shapes-dark", seed=1, train_per_class=4, val_per_class=1, test_per_class=2)
    assert d.name == "shapes-dark" and d.classnames == S.class_names() and d.num_classes == 48
    assert (len(d.train), len(d.val), len(d.test)) == (48 * 4, 48, 96) and d.image_size == 32
    assert np.array_equal(np.bincount(d.train.labels), np.full(48, 4))  # every class, held-out ones too
    x = d.train.images([0, 5, 7])
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(d.test.images(np.array([1])), d.test.images(slice(1, 2)))
    # Streams differ per split and per seed; the same seed rebuilds identical data.
    assert not torch.equal(d.train.images(slice(0, 4)), d.test.images(slice(0, 4)))
    R.clear_cache()
    d2 = R.get_dataset("shapes-dark", seed=1, train_per_class=4, val_per_class=1, test_per_class=2)
    assert d2 is not d and torch.equal(d2.train.images(), d.train.images())
    d3 = R.get_dataset("shapes-dark", seed=2, train_per_class=4, val_per_class=1, test_per_class=2)
    assert not torch.equal(d3.train.images(), d.train.images())


def test_registry_defaults_and_custom_factory():
    d = R.get_dataset("shapes")
    assert (len(d.train), len(d.val), len(d.test)) == (48 * 64, 48 * 8, 48 * 32)

    @R.register_dataset("_test-tiny")
    def _tiny(root, seed, n=3):
        split = R.TensorImageSplit(np.arange(n) % 2, data=torch.zeros(n, 3, 8, 8, dtype=torch.uint8))
        return R.ClassificationData("_test-tiny", ["a", "b"], split, split, split, image_size=8)

    try:
        assert R.get_dataset("_test-tiny", n=5).train.images().shape == (5, 3, 8, 8)
        with pytest.raises(ValueError, match="already registered"):
            R.register_dataset("_test-tiny")(_tiny)
    finally:
        R._FACTORIES.pop("_test-tiny")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(FedlitError) as info:
        R.get_dataset("shapez")
    msg = str(info.value)
    assert "unknown dataset 'shapez'" in msg and "did you mean 'shapes'" in msg
    if len(R.list_datasets()) > 15:  # long lists are left to `fedlit datasets` (errors.unknown_name)
        assert f"`fedlit datasets` lists the {len(R.list_datasets())} valid ones" in msg
    else:
        for name in R.list_datasets():
            assert name in msg
