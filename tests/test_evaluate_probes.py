"""k-NN and linear probes of frozen embeddings against NumPy brute force and scikit-learn."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lclsc_jax import evaluate
from lclsc_jax.evaluate import probes


def _knn_brute(train, labels, test, c, k, t):
    """DINO's eval_knn vote as a loop: top-k cosine neighbours, weight exp(sim / T), normalised per row."""
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    te = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = np.zeros((len(te), c))
    for i, q in enumerate(te):
        sim = tr @ q
        for j in np.argsort(-sim)[:k]:
            out[i, labels[j]] += np.exp(sim[j] / t)
    return out / out.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def emb():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 2
    y_tr, y_te = rng.integers(0, 3, 60), rng.integers(0, 3, 25)
    return (centres[y_tr] + rng.normal(size=(60, 8)), y_tr, centres[y_te] + rng.normal(size=(25, 8)), y_te)


@pytest.mark.parametrize("k,t", [(7, 0.07), (20, 0.5), (100, 0.07)])  # k > N: every training embedding votes
def test_knn_matches_a_brute_force_loop_in_any_chunking(emb, k, t):
    tr, ytr, te, _ = emb
    want = _knn_brute(tr, ytr, te, 3, k, t)
    for chunk in (1, 4, 25, 1024):
        got = probes.knn_predict(tr, ytr, te, 3, k=k, temperature=t, chunk=chunk)
        assert got.shape == (25, 3)
        np.testing.assert_allclose(got, want, rtol=1e-9)


def test_knn_equals_sklearns_cosine_neighbours_with_exponential_weights(emb):
    tr, ytr, te, yte = emb
    t = 0.1
    ref = KNeighborsClassifier(n_neighbors=9, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / t)).fit(tr, ytr)
    probs = probes.knn_predict(tr, ytr, te, 3, k=9, temperature=t)
    np.testing.assert_allclose(probs, ref.predict_proba(te), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(probs.argmax(1), ref.predict(te))
    assert probes.knn_accuracy(tr, ytr, te, yte, 3, k=9, temperature=t) == pytest.approx(ref.score(te, yte))


def test_knn_with_a_huge_temperature_is_sklearns_uniform_cosine_vote(emb):
    tr, ytr, te, yte = emb
    ref = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute").fit(tr, ytr)
    probs = probes.knn_predict(tr, ytr, te, 3, k=5, temperature=1e9)
    np.testing.assert_allclose(probs, ref.predict_proba(te), atol=1e-6)
    assert probes.knn_accuracy(tr, ytr, te, yte, 3, k=5, temperature=1e9) == pytest.approx(ref.score(te, yte))


def test_knn_with_a_tiny_temperature_is_finite_and_the_nearest_neighbours_vote(emb):
    tr, ytr, te, _ = emb
    probs = probes.knn_predict(tr, ytr, te, 3, k=20, temperature=1e-5)  # exp(1 / 1e-5) would overflow
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(1), 1.0)
    nearest = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(tr, ytr)
    np.testing.assert_array_equal(probs.argmax(1), nearest.predict(te))


def test_knn_counts_a_test_embedding_equal_to_a_training_one():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    probs = probes.knn_predict(train, np.array([0, 1, 1]), train[:1] * 3.0, 2, k=1, temperature=0.07)
    np.testing.assert_allclose(probs, [[1.0, 0.0]])


def test_knn_refuses_bad_settings(emb):
    tr, ytr, te, _ = emb
    with pytest.raises(ValueError):
        probes.knn_predict(tr[:0], ytr[:0], te, 3)
    with pytest.raises(ValueError):
        probes.knn_predict(tr, ytr, te, 3, k=0)
    with pytest.raises(ValueError):
        probes.knn_predict(tr, ytr, te, 2)  # a label 2 with 2 classes
    with pytest.raises(ValueError):
        probes.knn_predict(tr, ytr, te[:, :4], 3)


def test_linear_probe_with_a_fixed_c_is_sklearns_logistic_regression(emb):
    tr, ytr, te, yte = emb
    got = probes.linear_probe(tr, ytr, te, yte, c=0.5)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)).fit(tr, ytr)
    pred = ref.predict(te)
    assert got["C"] == 0.5
    assert got["accuracy"] == pytest.approx(np.mean(pred == yte))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yte, pred))
    assert probes.linear_probe(tr, ytr, te, yte)["C"] == 1.0  # no groups: C = 1


def test_linear_probe_chooses_c_as_a_grouped_grid_search_on_the_training_embeddings(emb):
    tr, ytr, te, yte = emb
    groups = np.repeat(np.arange(12), 5)
    got = evaluate.linear_probe(tr, ytr, te, yte, train_groups=groups)
    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                          {"logisticregression__C": list(probes.PROBE_CS)}, cv=GroupKFold(n_splits=3),
                          scoring="accuracy").fit(tr, ytr, groups=groups)
    assert got["C"] == search.best_params_["logisticregression__C"]
    assert got["accuracy"] == pytest.approx(search.score(te, yte))
    assert got == evaluate.linear_probe(tr, ytr, te, yte, train_groups=groups)  # deterministic
    # the test set plays no part in the choice
    flipped = evaluate.linear_probe(tr, ytr, te, (yte + 1) % 3, train_groups=groups)
    assert flipped["C"] == got["C"]


def test_linear_probe_separates_separable_classes():
    rng = np.random.default_rng(1)
    x = np.concatenate([np.zeros((10, 2)), np.ones((10, 2)) * 5]) + rng.normal(size=(20, 2)) * 0.1
    y = np.repeat([0, 1], 10)
    res = probes.linear_probe(x, y, x, y, train_groups=np.arange(20) % 5)
    assert res["accuracy"] == 1.0 and res["balanced_accuracy"] == 1.0


def test_linear_probe_refuses_a_single_class():
    with pytest.raises(ValueError):
        probes.linear_probe(np.ones((4, 2)), np.zeros(4), np.ones((2, 2)), np.zeros(2))
