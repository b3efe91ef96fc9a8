"""data.target=diagnostic: a frame filter's labels, classes and patient-wise split, against the data's flags."""

import dataclasses

import numpy as np
import pytest

from lclsc_jax import data
from lclsc_jax.data import targets
from lclsc_jax.train import config as C
from lclsc_jax.train import loop

OVERRIDES = {"synthetic.nondiagnostic_fraction": 0.3}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    tissue = C.load("tiny", {**OVERRIDES, "data.cache_dir": cache})
    filt = C.load("tiny", {**OVERRIDES, "data.cache_dir": cache, "data.target": "diagnostic"})
    return tissue, loop.load_dataset(tissue), filt, loop.load_dataset(filt)


def test_filter_labels_are_the_diagnostic_flags(datasets):
    _, ds, _, fds = datasets
    assert fds.class_names == ("non_diagnostic", "diagnostic") == data.FILTER_CLASSES
    np.testing.assert_array_equal(fds.labels, ds.diagnostic.astype(int))
    assert 0 < (~ds.diagnostic).sum() < len(ds)  # both classes present
    for i in range(len(fds)):
        assert fds.source[i]["label"] == int(ds.diagnostic[i])
        assert fds.source[i]["patient"] == ds.patients[i]
    got = fds.source.__getitems__([3, 0, 5])
    assert [r["label"] for r in got] == [int(ds.diagnostic[i]) for i in (3, 0, 5)]
    np.testing.assert_array_equal(fds.source[2]["image"], ds.source[2]["image"])


def test_filter_split_is_the_tissue_classifiers(datasets):
    tissue, ds, filt, fds = datasets
    a, b = loop.make_splits(tissue, ds), loop.make_splits(filt, fds)
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(a[k], b[k])
    # Stratified by tissue class: every class has a test patient, as with the tissue labels.
    assert set(ds.labels[b["test"]].tolist()) == set(range(ds.num_classes))


def test_class_target_is_the_identity(datasets):
    _, ds, _, _ = datasets
    assert targets.with_target(ds, "class") is ds


def test_errors(datasets):
    _, ds, _, _ = datasets
    with pytest.raises(data.DataError, match="diagnostic flag"):
        targets.with_target(dataclasses.replace(ds, diagnostic=None), "diagnostic")
    with pytest.raises(data.DataError, match="nothing to learn"):
        targets.with_target(dataclasses.replace(ds, diagnostic=np.ones(len(ds), bool)), "diagnostic")
    with pytest.raises(ValueError, match="data.target"):
        targets.with_target(ds, "tumour")
    with pytest.raises(C.ConfigError, match="data.target"):
        C.load("tiny", {"data.target": "tumour"})


def test_config_lists_the_same_targets():
    assert C.TARGETS == targets.TARGETS
