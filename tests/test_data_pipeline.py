"""grain pipelines: global determinism across process counts, sharding, restore, eval."""

from __future__ import annotations

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lclsc_jax import data
from lclsc_jax.method.transforms import dihedral_np

CFG = data.SyntheticConfig(num_patients=6, images_per_patient=4, image_size=32, seed=1)
TRAIN = np.arange(2, 18)  # 16 records: batches of 4 never straddle an epoch
NO_AUG = data.AugmentConfig(enabled=False)
D4_ONLY = data.AugmentConfig(affine=False, intensity=False)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return data.load(synthetic=CFG, cache_dir=tmp_path_factory.mktemp("cache"))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _it(ds, p=0, n=1, **kw):
    kw.setdefault("global_batch_size", 4)
    kw.setdefault("seed", 3)
    return data.train_iterator(ds, TRAIN, process_index=p, process_count=n, **kw)


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_layout(ds):
    b = next(_it(ds))
    assert set(b) == {"image", "label", "mask", "index"}  # no host-side second view
    assert b["image"].shape == (4, 32, 32, 1) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int64
    assert b["mask"].shape == (4, 32, 32) and b["mask"].dtype == np.uint8
    np.testing.assert_array_equal(b["label"], ds.labels[b["index"]])
    with pytest.raises(TypeError, match="second_view"):  # the train step draws D4 on the device
        _it(ds, second_view=True)


def test_each_epoch_is_a_fresh_permutation_of_the_indices(ds):
    batches = _take(_it(ds, augment=NO_AUG), 8)  # two epochs of 16
    ep0 = np.concatenate([b["index"] for b in batches[:4]])
    ep1 = np.concatenate([b["index"] for b in batches[4:]])
    assert sorted(ep0.tolist()) == TRAIN.tolist() == sorted(ep1.tolist())
    assert not np.array_equal(ep0, ep1)
    assert not np.array_equal(ep0, TRAIN)  # shuffled


def test_unaugmented_images_are_the_normalised_records(ds):
    b = next(_it(ds, augment=NO_AUG))
    for i, rec in enumerate(b["index"]):
        src = ds.source[int(rec)]
        ref = (src["image"].astype(np.float64) / 255 - 0.5) / 0.25
        np.testing.assert_allclose(b["image"][i], ref, atol=1e-6)
        np.testing.assert_array_equal(b["mask"][i], src["mask"])


def test_geometric_augmentation_moves_mask_with_image(ds):
    b = _take(_it(ds, augment=D4_ONLY, seed=11), 3)
    used = set()
    for batch in b:
        for i, rec in enumerate(batch["index"]):
            src = ds.source[int(rec)]
            img = data.normalize_images(src["image"])
            ts = [
                t
                for t in range(8)
                if np.allclose(batch["image"][i], dihedral_np(img, t), atol=1e-6)
                and np.array_equal(batch["mask"][i], dihedral_np(src["mask"], t))
            ]
            assert ts, f"sample {i}: no dihedral transform maps the record to the batch row"
            used.add(ts[0])
    assert len(used) >= 3  # augmentation actually varies


def test_affine_and_intensity_keep_masks_binary_and_images_bounded(ds):
    for b in _take(_it(ds, seed=5), 2):
        assert set(np.unique(b["mask"]).tolist()) <= {0, 1}
        assert b["image"].min() >= -2.0 - 1e-6 and b["image"].max() <= 2.0 + 1e-6


@pytest.mark.parametrize("n_proc", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_global_batch(ds, n_proc):
    ref = _take(_it(ds), 6)
    shards = [_take(_it(ds, p, n_proc), 6) for p in range(n_proc)]
    for s, full in enumerate(ref):
        parts = [shards[p][s] for p in range(n_proc)]
        for p, part in enumerate(parts):
            assert part["image"].shape[0] == 4 // n_proc
            # process p holds rows [p*B_local, (p+1)*B_local) of the global batch
            np.testing.assert_array_equal(part["index"], full["index"][p * (4 // n_proc) : (p + 1) * (4 // n_proc)])
        idx = [set(part["index"].tolist()) for part in parts]
        for p in range(n_proc):
            for q in range(p + 1, n_proc):
                assert not idx[p] & idx[q]
        _assert_batches_equal({k: np.concatenate([q[k] for q in parts]) for k in full}, full)


def test_get_state_set_state_resumes_exactly(ds):
    it = _it(ds, seed=4)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 5)  # crosses an epoch boundary
    fresh = _it(ds, seed=4)
    fresh.set_state(state)
    for a, b in zip(_take(fresh, 5), expected):
        _assert_batches_equal(a, b)


def test_orbax_checkpoint_round_trip(ds, tmp_path):
    it = _it(ds, seed=9)
    _take(it, 2)
    mgr = ocp.CheckpointManager(tmp_path / "ckpt")
    mgr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    expected = _take(it, 4)
    fresh = _it(ds, seed=9)
    restored = mgr.restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    for a, b in zip(_take(restored["data_iter"], 4), expected):
        _assert_batches_equal(a, b)
    mgr.close()


def test_seed_changes_order_and_augmentation(ds):
    a = next(_it(ds, seed=0))
    b = next(_it(ds, seed=1))
    assert not np.array_equal(a["index"], b["index"]) or not np.array_equal(a["image"], b["image"])


def test_bad_batch_size_for_process_count(ds):
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        _it(ds, 0, 3, global_batch_size=4)
    with pytest.raises(ValueError, match="out of range"):
        data.train_iterator(ds, [0, 999], global_batch_size=2, seed=0, process_index=0, process_count=1)


@pytest.mark.parametrize("n_proc", [1, 2])
def test_eval_batches_cover_once_with_padding(ds, n_proc):
    idx = np.array([5, 1, 7, 3, 9, 11, 2])  # 7 records, global batch 4 -> 2 batches, 1 padded row
    per_proc = [list(data.eval_batches(ds, idx, 4, process_index=p, process_count=n_proc)) for p in range(n_proc)]
    assert all(len(b) == 2 for b in per_proc)
    got_idx, got_valid = [], []
    for s in range(2):
        for p in range(n_proc):
            b = per_proc[p][s]
            assert b["image"].shape == (4 // n_proc, 32, 32, 1)
            got_idx += b["index"].tolist()
            got_valid += b["valid"].tolist()
            for i, rec in enumerate(b["index"]):
                src = ds.source[int(rec)]
                np.testing.assert_array_equal(b["image"][i], data.normalize_images(src["image"]))
                assert b["label"][i] == ds.labels[rec] and b["patient"][i] == ds.patients[rec]
    assert got_idx == idx.tolist() + [5]  # padding repeats the first record
    assert got_valid == [True] * 7 + [False]


def test_normalisation_round_trip():
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    x = data.normalize_images(u8)
    np.testing.assert_allclose(x[0, 0, 0], -2.0) and np.testing.assert_allclose(x[-1, -1, 0], 2.0)
    np.testing.assert_allclose(data.denormalize_images(x) * 255, u8.astype(np.float32), atol=1e-4)


@pytest.mark.slow
def test_multiprocess_workers_give_the_same_batches(ds):
    ref = _take(_it(ds, seed=6), 4)
    it = _it(ds, seed=6, num_workers=2)
    try:
        got = _take(it, 4)
        state = it.get_state()
        more = _take(it, 2)
    finally:
        it.close()
    for a, b in zip(got, ref):
        _assert_batches_equal(a, b)
    fresh = _it(ds, seed=6, num_workers=2)
    try:
        fresh.set_state(state)
        for a, b in zip(_take(fresh, 2), more):
            _assert_batches_equal(a, b)
    finally:
        fresh.close()
