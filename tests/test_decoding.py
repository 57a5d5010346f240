"""core.decoding: matched-population decoding (unit-trained classifier applied to the neurons)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from unitmatch.core.decoding import (
    DecodingResult,
    matched_population_decoding,
    neuron_accuracy,
    null_percentile,
    transfer_accuracy,
)

N_CAT, PER_CAT, N_TRAIN_PER_CAT, M = 6, 60, 40, 30
CHANCE = 1 / N_CAT


def _split(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: N_TRAIN_PER_CAT train images per category, the rest test."""
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:N_TRAIN_PER_CAT])
        test.append(idx[N_TRAIN_PER_CAT:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _population(rng: np.random.Generator, labels: np.ndarray, m: int, sep: float = 0.6):
    """m units with category-dependent means (sd sep across categories) plus unit-variance noise."""
    means = rng.normal(scale=sep, size=(N_CAT, m))
    return means[labels] + rng.normal(size=(labels.size, m))


def _planted(seed: int, noise: float = 0.3):
    """Linearly decodable units; neurons are noisy copies of them (high SNR)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_CAT), PER_CAT)
    units = _population(rng, labels, M)
    neurons = units + noise * rng.normal(size=units.shape)
    train, test = _split(labels, rng)
    return rng, labels, units, neurons, train, test


# --------------------------------------------------------------------------------- the science
def test_planted_neurons_transfer_near_upper_bound_and_beat_null():
    rng, labels, units, neurons, train, test = _planted(0)
    # null: random units drawn from a pool of other units whose category structure is unrelated
    pool = _population(rng, labels, 300)
    pops = np.stack([pool[:, rng.choice(300, M, replace=False)] for _ in range(100)])

    res = matched_population_decoding(units, neurons, labels, train, test, random_populations=pops)

    assert isinstance(res, DecodingResult)
    assert res.n_neurons == M and res.n_categories == N_CAT
    assert res.chance == pytest.approx(CHANCE)
    assert res.neuron_accuracy > 0.7
    assert res.transfer_accuracy > 0.7 > CHANCE + 0.5
    assert abs(res.transfer_accuracy - res.neuron_accuracy) < 0.1
    assert abs(res.unit_accuracy - res.transfer_accuracy) < 0.1
    assert res.null.shape == (100,)
    assert abs(res.null.mean() - CHANCE) < 0.05
    assert res.null.max() < res.transfer_accuracy
    assert res.percentile > 95
    # the functional pieces agree with the combined call
    assert transfer_accuracy(units, neurons, labels, train, test) == (
        res.transfer_accuracy, res.unit_accuracy)
    assert neuron_accuracy(neurons, labels, train, test) == res.neuron_accuracy

    d = res.as_dict()
    assert d["transfer_accuracy"] == res.transfer_accuracy
    assert d["n_random"] == 100 and d["n_categories"] == N_CAT and d["n_neurons"] == M
    assert d["null_mean"] == pytest.approx(res.null.mean())
    assert d["null_p95"] == pytest.approx(np.percentile(res.null, 95))
    assert all(np.isscalar(v) for v in d.values())


def test_noise_neurons_decode_at_chance():
    transfer, upper = [], []
    for seed in range(3):
        rng, labels, units, _, train, test = _planted(10 + seed)
        noise = rng.normal(size=units.shape)  # no relation to the images
        transfer.append(transfer_accuracy(units, noise, labels, train, test)[0])
        upper.append(neuron_accuracy(noise, labels, train, test))
    assert abs(np.mean(transfer) - CHANCE) < 0.1
    assert abs(np.mean(upper) - CHANCE) < 0.1


def test_no_null_gives_empty_null_and_nan_percentile():
    _, labels, units, neurons, train, test = _planted(1)
    res = matched_population_decoding(units, neurons, labels, train, test)
    assert res.null.shape == (0,) and np.isnan(res.percentile)
    d = res.as_dict()
    assert d["n_random"] == 0 and np.isnan(d["null_mean"]) and np.isnan(d["null_p95"])


# --------------------------------------------------------------------------------- mechanics
def test_affine_maps_of_neurons_and_units_do_not_change_accuracies():
    """Each feature is z-scored with its own train statistics: positive affine maps are invisible."""
    rng, labels, units, neurons, train, test = _planted(2, noise=1.0)
    acc = transfer_accuracy(units, neurons, labels, train, test)
    up = neuron_accuracy(neurons, labels, train, test)
    assert 0 < acc[0] < 1  # not saturated, so a change would show

    scale = rng.uniform(0.01, 100.0, size=M)
    offset = rng.uniform(-50.0, 50.0, size=M)
    neurons2 = neurons * scale + offset
    units2 = units * scale[::-1] - offset
    assert transfer_accuracy(units, neurons2, labels, train, test) == acc
    assert transfer_accuracy(units2, neurons, labels, train, test) == acc
    assert neuron_accuracy(neurons2, labels, train, test) == up
    # a map of one neuron only (its own statistics, not a shared one)
    one = neurons.copy()
    one[:, 3] = 1e3 * one[:, 3] + 7e3
    assert transfer_accuracy(units, one, labels, train, test) == acc


def test_transfer_matches_a_manual_sklearn_fit():
    _, labels, units, neurons, train, test = _planted(3, noise=1.0)
    y_train, y_test = labels[train], labels[test]

    def z(x):
        mu, sd = x[train].mean(0), x[train].std(0)
        return (x[train] - mu) / sd, (x[test] - mu) / sd

    zu_train, zu_test = z(units)
    _, zn_test = z(neurons)
    clf = LogisticRegression(C=0.5, max_iter=1000).fit(zu_train, y_train)
    manual_transfer = np.mean(clf.predict(zn_test) == y_test)
    manual_units = np.mean(clf.predict(zu_test) == y_test)

    got = transfer_accuracy(units, neurons, labels, train, test, C=0.5)
    assert got == (manual_transfer, manual_units)
    # a different C gives a different classifier (the parameter is used)
    clf_small = LogisticRegression(C=1e-4, max_iter=1000).fit(zu_train, y_train)
    assert transfer_accuracy(units, neurons, labels, train, test, C=1e-4)[0] == np.mean(
        clf_small.predict(zn_test) == y_test)


def test_string_labels_and_boolean_masks():
    _, labels, units, neurons, train, test = _planted(4)
    names = np.array(["cat", "dog", "car", "face", "fruit", "chair"])[labels]
    train_mask = np.zeros(labels.size, bool)
    train_mask[train] = True
    test_mask = np.zeros(labels.size, bool)
    test_mask[test] = True
    assert transfer_accuracy(units, neurons, names, train_mask, test_mask) == transfer_accuracy(
        units, neurons, labels, train, test)


def test_null_percentile_mid_rank():
    null = [0.1, 0.2, 0.3, 0.3, 0.5]
    assert null_percentile(0.3, null) == pytest.approx(60.0)  # (2 below + 2 ties / 2) / 5
    assert null_percentile(0.6, null) == 100.0
    assert null_percentile(0.05, null) == 0.0
    assert null_percentile(0.2, null) == pytest.approx(30.0)  # (1 + 0.5) / 5
    assert null_percentile(0.4, [0.4] * 4) == 50.0
    assert np.isnan(null_percentile(0.4, []))


def test_callable_and_array_random_populations_agree(caplog):
    rng, labels, units, neurons, train, test = _planted(5)
    # null: the matched units themselves, randomly permuted across neurons
    perms = [rng.permutation(M) for _ in range(20)]
    pops = np.stack([units[:, p] for p in perms])
    calls = []

    def draw(i):
        calls.append(i)
        return units[:, perms[i]]

    with caplog.at_level(logging.WARNING, logger="unitmatch.core.decoding"):
        a = matched_population_decoding(units, neurons, labels, train, test,
                                        random_populations=pops)
        b = matched_population_decoding(units, neurons, labels, train, test,
                                        random_populations=draw, n_random=20)
    assert calls == list(range(20))
    np.testing.assert_array_equal(a.null, b.null)
    assert a.percentile == b.percentile and a.transfer_accuracy == b.transfer_accuracy
    assert a.percentile == null_percentile(a.transfer_accuracy, a.null)
    assert a.percentile > 95 and a.null.mean() < 0.3  # misaligned features lose the code
    assert "coarse" in caplog.text  # 20 < 100 draws is flagged


# --------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(3), 10)
    units = rng.normal(size=(30, 4))
    neurons = rng.normal(size=(30, 4))
    train = np.array([i for i in range(30) if i % 10 < 7])
    test = np.array([i for i in range(30) if i % 10 >= 7])
    return units, neurons, labels, train, test


def test_error_shapes_disagree(small):
    units, neurons, labels, train, test = small
    with pytest.raises(ValueError, match=r"4 columns \(units\) but neuron_responses has 3"):
        transfer_accuracy(units, neurons[:, :3], labels, train, test)
    with pytest.raises(ValueError, match=r"30 images \(rows\) but neuron_responses has 29"):
        matched_population_decoding(units, neurons[:29], labels, train, test)
    with pytest.raises(ValueError, match=r"2-D \(n_images, M\) array; got shape \(30,\)"):
        neuron_accuracy(neurons[:, 0], labels, train, test)


def test_error_labels_length(small):
    units, neurons, labels, train, test = small
    with pytest.raises(ValueError, match=r"labels has 29 entries but the responses have 30"):
        transfer_accuracy(units, neurons, labels[:29], train, test)


def test_error_fewer_neurons_than_categories(small):
    units, neurons, labels, train, test = small
    with pytest.raises(ValueError, match="needs at least as many neurons as categories"):
        matched_population_decoding(units[:, :2], neurons[:, :2], labels, train, test)
    with pytest.raises(ValueError, match=r"2 neuron\(s\) but there are 3 categories"):
        neuron_accuracy(neurons[:, :2], labels, train, test)


def test_error_fewer_than_two_categories(small):
    units, neurons, _, train, test = small
    with pytest.raises(ValueError, match=r"fewer than 2 categories overall \(only \['a'\]"):
        transfer_accuracy(units, neurons, np.array(["a"] * 30), train, test)


def test_error_train_holds_a_single_class(small):
    units, neurons, _, _, _ = small
    labels = np.array(["face"] * 20 + ["car"] * 10)
    with pytest.raises(ValueError, match=r"train images hold a single category \('face'\)"):
        transfer_accuracy(units, neurons, labels, np.arange(10), np.arange(15, 30))


def test_error_test_category_unseen_in_train(small):
    units, neurons, labels, _, _ = small
    train = np.arange(20)  # categories 0 and 1 only
    with pytest.raises(ValueError, match=r"categor.* \[2\] never seen in train"):
        matched_population_decoding(units, neurons, labels, train, np.arange(20, 30))
    with pytest.raises(ValueError, match=r"never seen in train"):
        neuron_accuracy(neurons, labels, train, np.array([25]))


@pytest.mark.parametrize("which", ["units", "neurons"])
def test_error_non_finite(small, which):
    units, neurons, labels, train, test = small
    bad = (units if which == "units" else neurons).copy()
    bad[test[1], 2] = np.nan
    args = (bad, neurons) if which == "units" else (units, bad)
    name = "unit_responses" if which == "units" else "neuron_responses"
    with pytest.raises(ValueError, match=rf"{name} has 1 non-finite value.*image {test[1]}, "
                                         r"column 2"):
        transfer_accuracy(*args, labels, train, test)
    # images outside the split may hold anything
    outside = bad.copy()
    outside[test[1], 2] = 0.0
    outside[9, :] = np.inf
    args = (outside, neurons) if which == "units" else (units, outside)
    acc = transfer_accuracy(*args, labels, train, test[test != 9])[0]
    assert 0.0 <= acc <= 1.0


def test_error_constant_column(small):
    units, neurons, labels, train, test = small
    const = units.copy()
    const[train, 3] = 2.5  # constant on the train images only
    with pytest.raises(ValueError, match=r"unit_responses column 3 is constant on the train"):
        transfer_accuracy(const, neurons, labels, train, test)
    constn = neurons.copy()
    constn[:, 1] = 0.1
    with pytest.raises(ValueError, match=r"neuron_responses column 1 is constant"):
        neuron_accuracy(constn, labels, train, test)
    with pytest.raises(ValueError, match=r"random population 1 column 3 is constant"):
        matched_population_decoding(units, neurons, labels, train, test,
                                    random_populations=np.stack([units, const]))


def test_error_train_test_overlap(small):
    units, neurons, labels, train, test = small
    with pytest.raises(ValueError, match=r"train and test share 1 image\(s\) \(e.g. image 5\)"):
        transfer_accuracy(units, neurons, labels, train, np.append(test, 5))


def test_error_bad_split_indices(small):
    units, neurons, labels, train, test = small
    with pytest.raises(ValueError, match=r"test holds image index 30, outside the valid range"):
        neuron_accuracy(neurons, labels, train, np.array([30]))
    with pytest.raises(ValueError, match=r"train selects no images"):
        neuron_accuracy(neurons, labels, np.array([], int), test)
    with pytest.raises(ValueError, match=r"train lists image 0 more than once"):
        neuron_accuracy(neurons, labels, np.append(train, 0), test)
    with pytest.raises(ValueError, match=r"boolean mask of length 3"):
        neuron_accuracy(neurons, labels, np.ones(3, bool), test)


def test_error_bad_random_populations_and_C(small):
    units, neurons, labels, train, test = small
    with pytest.raises(ValueError, match=r"shape \(n_draws, 30, 4\).*got \(2, 30, 3\)"):
        matched_population_decoding(units, neurons, labels, train, test,
                                    random_populations=np.zeros((2, 30, 3)))
    with pytest.raises(ValueError, match=r"random population 0 has shape \(30, 5\)"):
        matched_population_decoding(units, neurons, labels, train, test,
                                    random_populations=lambda i: np.ones((30, 5)), n_random=2)
    with pytest.raises(ValueError, match=r"n_random must be a positive integer.*got 0"):
        matched_population_decoding(units, neurons, labels, train, test,
                                    random_populations=lambda i: units, n_random=0)
    with pytest.raises(ValueError, match=r"array, a callable .* or None; got str"):
        matched_population_decoding(units, neurons, labels, train, test,
                                    random_populations="random")
    with pytest.raises(ValueError, match=r"C .* must be a positive finite number; got -1.0"):
        transfer_accuracy(units, neurons, labels, train, test, C=-1)
