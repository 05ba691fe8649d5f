"""The frozen-image-feature cache (fedlit.features): memory and disk give the uncached values; the disk cache is
reused across banks/runs, keyed so that a changed backbone / data / transform never reads a stale file, and a
damaged file is detected and rebuilt; augmented views are seeded, fixed and trainable. No test measures time."""

from __future__ import annotations

import copy
import gc
import json
import warnings

import numpy as np
import pytest
import torch

from fedlit.backbones import load_backbone
from fedlit.data.federation import FederatedData
from fedlit.data.registry import TensorImageSplit, get_dataset
from fedlit.errors import FedlitError
from fedlit.features import FeatureBank, augment_params
from fedlit.orchestrator import Orchestrator
from fedlit.trainer import FedTrainer
from fedlit.methods.promptfl import PromptFL
from fedlit.prompts import Task

ROWS = np.array([5, 3, 3, 100, 7, 191])


@pytest.fixture(scope="module")
def clip():
    return load_backbone("fedlit-toy")


@pytest.fixture(scope="module")
def data():
    return get_dataset("shapes-dark", seed=0, train_per_class=4, val_per_class=1, test_per_class=2)


def _splits(data):
    return {"train": data.train, "test": data.test}


@torch.no_grad()
def _uncached(clip, split, idx, encode=None, block=32):
    """The bank's layout, row by row: row ``r`` alone at position ``r % B`` of a pass of ``B`` images whose other
    positions are zeros. The bank encodes many rows per pass, so equality also shows that a row's feature does not
    depend on the other rows of its pass."""
    encode = encode or clip.encode_image
    b = min(block, len(split))
    out = []
    for r in np.asarray(idx):
        x = clip.normalize_images(split.images(np.array([r])))
        full = x.new_zeros(b, *x.shape[1:])
        full[r % b] = x[0]
        out.append(encode(full)[r % b])
    return torch.stack(out)


@torch.no_grad()
def _plain(clip, split, idx, encode=None):
    """One ordinary batch of the requested rows: equal to the cache up to kernel rounding only."""
    return (encode or clip.encode_image)(clip.normalize_images(split.images(np.asarray(idx))))


def _disk(clip, data, tmp_path, **kw):
    return FeatureBank(clip, _splits(data), cache="disk", cache_dir=tmp_path, **kw)


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["features", "tokens"])
def test_memory_and_disk_cache_equal_the_uncached_features_and_logits(clip, data, tmp_path, kind):
    encode = clip.encode_image_tokens if kind == "tokens" else clip.encode_image
    ref = _uncached(clip, data.train, ROWS, encode)
    mem = FeatureBank(clip, _splits(data), kind=kind)
    disk = _disk(clip, data, tmp_path, kind=kind)
    for bank in (mem, disk):
        assert torch.equal(bank.features("train", ROWS), ref)
        assert torch.equal(bank.features("train", ROWS), ref)  # second read: from the cache
        assert bank.encoded == len(np.unique(ROWS))
    if kind == "features":  # the logits a method computes from them are the same too
        method = PromptFL(n_ctx=4, ctx_init="a photo of a")
        prompt = method.build(clip)
        fed_task = Task("five", tuple(data.classnames[:5]))
        with torch.no_grad():
            want = method.logits(prompt, clip, ref, fed_task)
            for bank in (mem, disk):
                assert torch.equal(method.logits(prompt, clip, bank.inputs("train", ROWS), fed_task), want)


def test_disk_cache_is_reused_across_orchestrators_with_the_same_results(clip, tmp_path):
    fed = FederatedData(num_clients=2, shots=2, dataset_args={"train_per_class": 4, "test_per_class": 1}).setup(seed=0)

    def run(cache):
        trainer = FedTrainer(rounds=1, batch_size=4, checkpoint_every=0, progress=False, feature_cache=cache,
                             cache_dir=str(tmp_path / "cache"))
        orch = Orchestrator(trainer.make_fabric(), clip, fed, PromptFL(n_ctx=4, ctx_init="a photo of a", lr=0.01),
                            trainer, seed=0)
        orch.apply([orch.safe_update(c, 0) for c in range(2)])
        res = orch.evaluate(0)
        orch.bank.flush()
        return orch, res

    mem, res_mem = run("memory")
    first, res_first = run("disk")
    second, res_second = run("disk")
    assert first.bank.encoded == mem.bank.encoded > 0
    assert second.bank.encoded == 0  # every train and test row came from the files the first one wrote
    assert res_mem["mean"] == res_first["mean"] == res_second["mean"]
    for k, v in mem.global_state.items():
        assert torch.equal(v, second.global_state[k])


def test_a_finished_fit_claims_its_rows_for_the_next_run_in_the_same_process(clip, tmp_path, monkeypatch):
    """A grid runs its cells in one process: the next cell must read what a finished one encoded, while the
    finished run's objects may still be alive (no finaliser has flushed) and the periodic flush not yet due."""
    monkeypatch.setattr("fedlit.feature_store._FLUSH_EVERY_S", 1e9)
    fed = FederatedData(num_clients=2, shots=2, dataset_args={"train_per_class": 4, "test_per_class": 1}).setup(seed=0)

    def orch():
        trainer = FedTrainer(rounds=1, batch_size=4, checkpoint_every=0, progress=False, feature_cache="disk",
                             cache_dir=str(tmp_path / "cache"))
        return Orchestrator(trainer.make_fabric(), clip, fed, PromptFL(n_ctx=4, ctx_init="a photo of a", lr=0.01),
                            trainer, seed=0, callbacks=[])

    (tmp_path / "run1").mkdir()
    (tmp_path / "run2").mkdir()
    first = orch()
    first.fit(tmp_path / "run1")
    second = orch()  # ``first`` still alive
    second.fit(tmp_path / "run2")
    assert first.bank.encoded > 0 and second.bank.encoded == 0


def test_rows_are_claimed_only_after_a_flush_and_a_dropped_bank_flushes(clip, data, tmp_path, monkeypatch):
    monkeypatch.setattr("fedlit.feature_store._FLUSH_EVERY_S", 1e9)  # no periodic flush during this test
    bank = _disk(clip, data, tmp_path)
    bank.features("train", ROWS)
    index = bank.cache_path("train") / "index.npy"
    assert not (np.load(index) >> 32).any()  # written rows, not yet claimed: a crash now re-encodes them
    del bank
    gc.collect()  # the finaliser flushes (also at interpreter exit)
    assert (np.load(index) >> 32).sum() == len(np.unique(ROWS))
    again = _disk(clip, data, tmp_path)
    assert torch.equal(again.features("train", ROWS), _uncached(clip, data.train, ROWS)) and again.encoded == 0


def test_block_layout_places_each_row_at_its_fixed_slot_once():
    from fedlit.features import block_layout

    rows = np.array([0, 1, 4, 5, 8, 9, 12, 30])
    passes = block_layout(rows, 4)
    assert [p[0].tolist() for p in passes] == [[0, 1, 30], [4, 5], [8, 9], [12]]
    for got_rows, slots in passes:
        assert slots.tolist() == (got_rows % 4).tolist() and len(set(slots.tolist())) == len(slots)
    assert len(block_layout(np.arange(10), 4)) == 3  # a contiguous range fills whole passes
    assert block_layout(np.array([], dtype=np.int64), 4) == []


def test_an_announced_subset_fills_whole_passes_and_its_values_are_fixed_by_its_layout(clip, data):
    """The rows a run announces (``expect``: its clients' K-shot rows, a scattered subset of the split) sit at the
    slots of their ranks among them: ``ceil(n / block)`` full passes, where slots by row (``r % block``) left
    passes half empty. Same layout: the same bits whatever the request order; the cache key names the layout."""
    from fedlit.features import block_layout, layout_positions

    rows = np.array([0, 1, 4, 7, 8, 16, 23, 24, 26, 28, 33, 42, 44, 53, 58, 61])  # K-shot-like, r % 8 collide
    assert len(block_layout(rows, 8)) == 4  # by row: slot 0 holds 0, 8, 16, 24 -> 4 passes for 16 rows
    assert len(block_layout(rows, 8, layout_positions(rows, rows))) == 2  # by rank: 2 full passes
    assert layout_positions(np.array([4, 5]), rows).tolist() == [2, len(rows) + 5]  # 5 was not announced
    block, seen = 8, []
    a = FeatureBank(clip, _splits(data), block_size=block)
    tower = a._tower
    a._tower = lambda x: seen.append(len(x)) or tower(x)
    a.expect("train", rows)
    got = a.features("train", rows[::-1].copy())
    assert seen == [block, block] and a.encoded == len(rows)  # 16 rows, 2 passes, no zero slot
    b = FeatureBank(clip, _splits(data), block_size=block)
    b.expect("train", rows)
    for part in (rows[5:], rows[:5]):  # another order, another grouping
        b.features("train", part)
    assert torch.equal(b.features("train", rows[::-1].copy()), got)
    c = FeatureBank(clip, _splits(data), block_size=block)  # no announcement: slots by row
    assert c.cache_key("train")["layout"] is None and a.cache_key("train")["layout"] is not None
    assert torch.allclose(c.features("train", rows[::-1].copy()), got, rtol=1e-4, atol=1e-5)


def test_cached_features_do_not_depend_on_request_order_and_match_a_plain_batch(clip, data):
    """Two banks asked for rows in different orders and groupings (as two processes or a resumed run would)
    hold bit-identical rows; a plain batch of the same images differs from them only by kernel rounding."""
    a, b = FeatureBank(clip, _splits(data)), FeatureBank(clip, _splits(data))
    every = np.arange(len(data.train))
    got_a = a.features("train", every)  # all at once
    for part in np.array_split(np.random.default_rng(0).permutation(every), 7):  # scattered groups
        b.features("train", part)
    assert torch.equal(b.features("train", every), got_a)
    c = FeatureBank(clip, _splits(data))  # told which rows will come: the first request encodes them all
    c.expect("train", every[::3])  # (in passes laid out by their ranks: same values up to kernel rounding)
    assert torch.allclose(c.features("train", every[3:9:3]), got_a[3:9:3], rtol=1e-4, atol=1e-5)
    assert c.encoded == len(every[::3])
    assert torch.allclose(c.features("train", every[::3]), got_a[::3], rtol=1e-4, atol=1e-5)
    assert c.encoded == len(every[::3])
    plain = _plain(clip, data.train, every)
    assert torch.allclose(got_a, plain, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- keys
def test_a_changed_key_uses_another_cache_file_never_a_stale_one(clip, data, tmp_path):
    base = _disk(clip, data, tmp_path)
    base.features("train", ROWS)
    base.flush()
    path = base.cache_path("train")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["key"]["backbone"]["name"] == "fedlit-toy" and meta["key"]["dataset"]["name"] == "shapes-dark"
    assert meta["key"]["dataset"]["args"]["train_per_class"] == "4"

    other_args = get_dataset("shapes-dark", seed=0, train_per_class=5, val_per_class=1, test_per_class=2)
    other_seed = get_dataset("shapes-dark", seed=1, train_per_class=4, val_per_class=1, test_per_class=2)
    other_size = get_dataset("shapes-dark", seed=0, train_per_class=4, val_per_class=1, test_per_class=2, image_size=24)
    random_clip = load_backbone("fedlit-toy", "none")
    nudged = copy.deepcopy(clip)
    with torch.no_grad():
        nudged.model.visual.conv1.weight[0, 0, 0, 0] += 1e-3  # one weight of the image tower
    renormed = copy.deepcopy(clip)
    renormed.mean = (0.5, 0.5, 0.5)  # the backbone's input transform
    cases = [(clip, other_args), (clip, other_seed), (clip, other_size), (random_clip, data), (nudged, data),
             (renormed, data)]
    paths = {path}
    for c, d in cases:
        bank = _disk(c, d, tmp_path)
        p = bank.cache_path("train")
        assert p not in paths
        paths.add(p)
        got = bank.features("train", ROWS)
        assert bank.encoded == len(np.unique(ROWS))  # nothing read from another key's file
        assert torch.equal(got, _uncached(c, d.train, ROWS))
    assert _disk(clip, data, tmp_path).cache_path("test") not in paths  # split is part of the key
    assert _disk(clip, data, tmp_path, kind="tokens").cache_path("train") not in paths
    assert _disk(clip, data, tmp_path, augment_views=2).cache_path("train") == path  # only what is augmented
    assert _disk(clip, data, tmp_path, augment_views=2).cache_path("train", augmented=True) not in paths


def test_split_cache_key_covers_content_and_identity(data):
    a = TensorImageSplit(np.array([0, 1]), data=torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    b = TensorImageSplit(np.array([0, 1]), data=torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    assert a.cache_key() == b.cache_key()
    c = TensorImageSplit(np.array([0, 1]), data=torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    c.data[1, 0, 0, 0] = 1  # one pixel
    assert c.cache_key() != a.cache_key()
    assert TensorImageSplit(np.array([0, 2]), data=a.data).cache_key() != a.cache_key()  # labels
    assert data.train._dataset_identity["name"] == "shapes-dark" and data.train.cache_key() != data.test.cache_key()


def test_a_key_mismatch_inside_the_directory_is_not_read(clip, data, tmp_path):
    """Even a digest collision (simulated: another key's files under this key's directory) reads nothing stale."""
    nudged = copy.deepcopy(clip)
    with torch.no_grad():
        nudged.model.visual.conv1.weight.mul_(1.5)
    first = _disk(nudged, data, tmp_path)
    first.features("train", ROWS)
    first.flush()
    target = _disk(clip, data, tmp_path).cache_path("train")
    first.cache_path("train").rename(target)
    with pytest.warns(RuntimeWarning, match="another key"):
        bank = _disk(clip, data, tmp_path)
        got = bank.features("train", ROWS)
    assert bank.encoded == len(np.unique(ROWS)) and torch.equal(got, _uncached(clip, data.train, ROWS))


# ------------------------------------------------------------------------------------------- damage
def _filled_cache(clip, data, tmp_path):
    bank = _disk(clip, data, tmp_path)
    want = bank.features("train", np.arange(len(data.train)))
    bank.flush()
    return bank.cache_path("train"), want


def test_truncated_or_unreadable_cache_files_are_rebuilt(clip, data, tmp_path):
    path, want = _filled_cache(clip, data, tmp_path)
    n = len(data.train)
    damage = {
        "data.npy": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),  # truncated
        "index.npy": lambda p: p.write_bytes(b"not a numpy file"),
        "meta.json": lambda p: p.write_text("{"),
    }
    for name, hurt in damage.items():
        hurt(path / name)
        with pytest.warns(RuntimeWarning, match="unusable"):
            bank = _disk(clip, data, tmp_path)
            got = bank.features("train", np.arange(n))
        assert bank.encoded == n, name
        assert torch.equal(got, want), name
        bank.flush()
    (path / "meta.json").unlink()  # a creation that never finished (meta.json is written last): silently redone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bank = _disk(clip, data, tmp_path)
        assert torch.equal(bank.features("train", np.arange(n)), want) and bank.encoded == n


def test_damaged_rows_fail_their_crc_and_are_re_encoded(clip, data, tmp_path):
    path, want = _filled_cache(clip, data, tmp_path)
    mm = np.load(path / "data.npy", mmap_mode="r+")
    mm[[3, 7]] += 1.0  # silent corruption of two rows (header and size intact)
    mm.flush()
    del mm
    with pytest.warns(RuntimeWarning, match="2 damaged rows"):
        bank = _disk(clip, data, tmp_path)
        got = bank.features("train", ROWS)
    assert bank.corrupt_rows == 2 and bank.encoded == 2  # only the damaged rows (3 and 7) were re-encoded
    assert torch.equal(got, want[torch.as_tensor(ROWS)])


# ------------------------------------------------------------------------------------------- augmentation
def test_augment_params_are_seeded_valid_crops():
    draws = [augment_params(0, r, v, 32, 32) for r in range(20) for v in range(3)]
    assert draws == [augment_params(0, r, v, 32, 32) for r in range(20) for v in range(3)]  # deterministic
    assert draws != [augment_params(1, r, v, 32, 32) for r in range(20) for v in range(3)]  # seed matters
    assert len(set(draws)) == len(draws)  # views and images differ
    for top, left, h, w, flip in draws:
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32 and h >= 1 and w >= 1
        assert 0.08 * 32 * 32 * 0.5 <= h * w <= 32 * 32
    assert {f for *_, f in draws} == {True, False}


def test_augmented_views_are_fixed_per_seed_and_cached(clip, data, tmp_path):
    k = 3
    bank = FeatureBank(clip, _splits(data), augment_views=k, seed=7)
    views = np.array([0, 1, 2, 2, 0, 1])
    imgs = bank.augmented_images("train", ROWS, views)
    assert imgs.shape == (len(ROWS), 3, 32, 32)
    assert torch.equal(imgs, FeatureBank(clip, _splits(data), augment_views=k, seed=7).augmented_images("train", ROWS, views))
    assert not torch.equal(imgs, FeatureBank(clip, _splits(data), augment_views=k, seed=8).augmented_images("train", ROWS, views))
    assert not torch.equal(imgs[2], imgs[1])  # row 3, views 2 and 1

    got = bank.features("train", ROWS, views=views)
    assert got.shape == (len(ROWS), clip.embed_dim)
    assert bank.encoded == k * len(np.unique(ROWS))  # K views of each distinct image, once
    store = bank._stores[("train", True)]
    assert tuple(store.data.shape) == (len(data.train), k, clip.embed_dim)
    with torch.no_grad():
        assert torch.allclose(got, clip.encode_image(imgs), atol=1e-5)
    bank.features("train", ROWS, views=(views + 1) % k)
    assert bank.encoded == k * len(np.unique(ROWS))  # other views of the same images: no new encoding
    # evaluation is never augmented
    plain = FeatureBank(clip, _splits(data))
    assert torch.equal(bank.inputs("test", ROWS % 96), plain.inputs("test", ROWS % 96))
    # disk: same values, K views per row in the file
    disk = _disk(clip, data, tmp_path, augment_views=k, seed=7)
    assert torch.equal(disk.features("train", ROWS, views=views), got)
    disk.flush()
    assert np.load(disk.cache_path("train", augmented=True) / "data.npy", mmap_mode="r").shape == (len(data.train), k, clip.embed_dim)
    # methods that prompt the image tower get the same views built on the fly
    images = FeatureBank(clip, _splits(data), kind="images", augment_views=k, seed=7)
    assert torch.equal(images.inputs("train", ROWS, views=views), imgs)


def test_train_views_are_a_pure_function_of_seed_round_client_epoch_and_position(clip, data):
    bank = FeatureBank(clip, _splits(data), augment_views=4)
    assert FeatureBank(clip, _splits(data)).train_views((0, 1, 2, 0), 10, np.arange(10)) is None
    full = bank.train_views((0, 1, 2, 0), 50, np.arange(50))
    assert full.min() >= 0 and full.max() < 4 and len(set(full.tolist())) == 4
    rows = np.array([7, 3, 41])
    assert np.array_equal(bank.train_views((0, 1, 2, 0), 50, rows), full[rows])  # batch-independent
    assert not np.array_equal(bank.train_views((0, 2, 2, 0), 50, np.arange(50)), full)  # another round


def test_one_round_with_augment_views_trains(clip, tmp_path):
    fed = FederatedData(num_clients=2, shots=2, dataset_args={"train_per_class": 4, "test_per_class": 1}).setup(seed=0)

    def orchestrator(views):
        trainer = FedTrainer(rounds=1, batch_size=8, checkpoint_every=0, progress=False, augment_views=views)
        return Orchestrator(trainer.make_fabric(), clip, fed, PromptFL(n_ctx=4, ctx_init="a photo of a", lr=0.01),
                            trainer, seed=0)

    orch = orchestrator(2)
    init = {k: v.clone() for k, v in orch.global_state.items()}
    res = orch.fit(tmp_path / "aug2")
    n_train = len({int(i) for c in fed.clients for i in c.train_idx})
    assert res["images_encoded"] == 2 * n_train + len(fed.data.test)  # K views per training image + plain test
    assert not torch.equal(orch.global_state["ctx"], init["ctx"]) and np.isfinite(res["final"]["hm"])
    with_views, without = orchestrator(2).safe_update(0, 0), orchestrator(0).safe_update(0, 0)
    assert with_views.ok and without.ok
    assert not torch.equal(with_views.shared["ctx"], without.shared["ctx"])  # the views were used


def test_bad_cache_options_are_user_errors():
    with pytest.raises(FedlitError, match="feature_cache"):
        FedTrainer(feature_cache="ram")
    with pytest.raises(FedlitError, match="augment_views"):
        FedTrainer(augment_views=-1)
