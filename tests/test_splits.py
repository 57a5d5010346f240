"""core.splits: Brain-Score-compatible splits (exact sklearn reproduction) and validation of user splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

from unitmatch.core.splits import STRATIFY_COLUMNS, brainscore_splits, validate_splits

N = 120


def _labels(n_classes: int, seed: int) -> np.ndarray:
    """Shuffled class labels, n // n_classes images per class."""
    labels = np.repeat([f"c{k}" for k in range(n_classes)], N // n_classes)
    return np.random.default_rng(seed).permutation(labels)


@pytest.fixture
def table():
    return pd.DataFrame({
        "object_name": _labels(12, 0),
        "object": _labels(10, 1),
        "category_name": _labels(4, 2),
        "category": _labels(3, 3),
        "variation": np.arange(N) % 3,
    }, index=[f"img{i}" for i in range(N)])


def _sklearn_stratified(labels):
    sss = StratifiedShuffleSplit(n_splits=10, train_size=0.9, random_state=1)
    return list(sss.split(np.zeros(len(labels)), labels))


def _sklearn_plain(n):
    return list(ShuffleSplit(n_splits=10, train_size=0.9, random_state=1).split(np.zeros(n)))


def _assert_same(got, expected):
    assert len(got) == len(expected) == 10
    for (tr, te), (etr, ete) in zip(got, expected):
        assert tr.dtype == np.int64 and te.dtype == np.int64
        np.testing.assert_array_equal(tr, etr)
        np.testing.assert_array_equal(te, ete)


def _differs(a, b) -> bool:
    return any(not np.array_equal(x[1], y[1]) for x, y in zip(a, b))


def test_stratify_columns_order():
    assert STRATIFY_COLUMNS == ("object_name", "object", "category_name", "category")


@pytest.mark.parametrize("present, picked", [
    (["object_name", "object", "category_name", "category"], "object_name"),
    (["object", "category_name", "category"], "object"),
    (["category_name", "category"], "category_name"),
    (["category"], "category"),
])
def test_auto_picks_first_present_column_exactly_like_sklearn(table, present, picked):
    meta = table[present + ["variation"]]
    got = brainscore_splits(meta, stratify="auto")
    _assert_same(got, _sklearn_stratified(meta[picked].to_numpy()))
    # the choice matters: the other candidate columns would give different splits
    for other in present:
        if other != picked:
            assert _differs(got, _sklearn_stratified(meta[other].to_numpy()))
    assert _differs(got, _sklearn_plain(N))


def test_auto_without_stratify_columns_is_shufflesplit(table):
    got = brainscore_splits(table[["variation"]], stratify="auto")
    _assert_same(got, _sklearn_plain(N))
    _assert_same(brainscore_splits(n_images=N, stratify="auto"), _sklearn_plain(N))
    _assert_same(brainscore_splits(pd.DataFrame(index=range(N)), stratify="auto"), _sklearn_plain(N))
    _assert_same(brainscore_splits(n_images=N, stratify=None), _sklearn_plain(N))


def test_default_is_brainscores_object_name_stratification_exactly(table):
    _assert_same(brainscore_splits(table), _sklearn_stratified(table["object_name"].to_numpy()))


@pytest.mark.parametrize("how", ["metadata without object_name", "no metadata"])
def test_default_without_object_name_is_an_error_that_names_the_unstratified_choice(table, how):
    """Brain-Score asserts that object_name exists; falling back is only for stratify='auto'."""
    args = (table.drop(columns="object_name"),) if how == "metadata without object_name" else ()
    kwargs = {} if args else {"n_images": N}
    with pytest.raises(ValueError, match=r"stratify column 'object_name' \(Brain-Score's default\) not in the "
                                         r"image metadata columns .*stratify=None for unstratified splits.*'auto'"):
        brainscore_splits(*args, **kwargs)


def test_stratify_none_ignores_columns(table):
    _assert_same(brainscore_splits(table, stratify=None), _sklearn_plain(N))


def test_explicit_stratify_column(table):
    _assert_same(brainscore_splits(table, stratify="category"), _sklearn_stratified(table["category"].to_numpy()))
    _assert_same(brainscore_splits(table, stratify="variation"),
                 _sklearn_stratified(table["variation"].to_numpy()))


def test_split_properties(table):
    splits = brainscore_splits(table)
    for tr, te in splits:
        assert len(tr) == 108 and len(te) == 12
        assert np.intersect1d(tr, te).size == 0
        assert np.union1d(tr, te).tolist() == list(range(N))
        # stratified by object_name: 12 objects x 10 images -> one test image per object
        assert sorted(table["object_name"].to_numpy()[te]) == sorted(f"c{k}" for k in range(12))
    validate_splits(splits, N)  # brainscore splits pass our own validation


def test_other_parameters_forwarded(table):
    got = brainscore_splits(table, n_splits=3, train_size=0.75, random_state=7)
    expected = list(StratifiedShuffleSplit(n_splits=3, train_size=0.75, random_state=7)
                    .split(np.zeros(N), table["object_name"].to_numpy()))
    assert len(got) == 3
    for (tr, te), (etr, ete) in zip(got, expected):
        np.testing.assert_array_equal(tr, etr)
        np.testing.assert_array_equal(te, ete)


def test_explicit_stratify_column_missing(table):
    with pytest.raises(ValueError, match=r"stratify column 'object_id' not in the image metadata columns \["):
        brainscore_splits(table, stratify="object_id")
    with pytest.raises(ValueError, match=r"stratify column 'object_name' .*not in the image metadata columns \[\]"):
        brainscore_splits(n_images=N, stratify="object_name")


def test_needs_metadata_or_n_images():
    with pytest.raises(ValueError, match="give metadata or n_images"):
        brainscore_splits()


def test_too_few_per_class(caplog):
    import logging

    meta = pd.DataFrame({"object_name": ["a"] * 19 + ["lonely"]})
    with pytest.raises(ValueError, match="cannot stratify by 'object_name'"):
        brainscore_splits(meta, stratify="object_name")
    with caplog.at_level(logging.WARNING):  # auto: no usable column, so unstratified, with a warning
        splits = brainscore_splits(meta, stratify="auto")
    assert "cannot stratify 20 images by 'object_name'" in caplog.text
    expected = ShuffleSplit(n_splits=10, train_size=0.9, random_state=1).split(np.zeros(20))
    for (train, test), (etr, ete) in zip(splits, expected):
        np.testing.assert_array_equal(train, etr)
        np.testing.assert_array_equal(test, ete)


# ------------------------------------------------------------------ validate_splits
def test_validate_good_splits_sorted_int64():
    splits = [
        ([5, 1, 3, 0], np.array([9, 2, 7], dtype=np.int32)),
        (np.array([8, 9, 6], dtype=np.uint16), (4, 0, 1, 2)),  # images in neither set are allowed
    ]
    out = validate_splits(splits, 10)
    assert len(out) == 2
    expected = [([0, 1, 3, 5], [2, 7, 9]), ([6, 8, 9], [0, 1, 2, 4])]
    for (tr, te), (etr, ete) in zip(out, expected):
        assert tr.dtype == np.int64 and te.dtype == np.int64
        assert tr.tolist() == etr and te.tolist() == ete
    assert splits[0][1].tolist() == [9, 2, 7]  # the input is not modified


def test_validate_empty_list():
    with pytest.raises(ValueError, match="no splits given"):
        validate_splits([], 10)


def test_validate_overlap_counts():
    with pytest.raises(ValueError, match=r"split 1: 2 images are in both train and test, e.g. \[3, 4\]"):
        validate_splits([([0, 1, 2], [5, 6, 7]), ([0, 1, 2, 3, 4], [3, 4, 8])], 10)


@pytest.mark.parametrize("train, test, n", [
    ([0, 1, 10], [4, 5, 6], 10),
    ([0, 1, 2], [-1, 5, 6], 10),
])
def test_validate_out_of_range(train, test, n):
    with pytest.raises(ValueError, match=r"split 0: (train|test) indices must lie in \[0, 10\); got range"):
        validate_splits([(train, test)], n)


def test_validate_boolean_mask():
    mask = np.zeros(10, bool)
    mask[:5] = True
    with pytest.raises(ValueError, match="split 0: train indices must be integer positions, not a boolean mask"):
        validate_splits([(mask, ~mask)], 10)


def test_validate_non_integer():
    with pytest.raises(ValueError, match=r"split 0: test indices must be a 1-D integer array; got float64"):
        validate_splits([([0, 1, 2], [3.0, 4.0, 5.0])], 10)
    with pytest.raises(ValueError, match=r"must be a 1-D integer array.*\(2, 2\)"):
        validate_splits([([0, 1, 2], [[3, 4], [5, 6]])], 10)


def test_validate_duplicates():
    with pytest.raises(ValueError, match="split 0: train indices contain duplicates"):
        validate_splits([([0, 1, 1, 2], [3, 4, 5])], 10)


def test_validate_too_few_images():
    with pytest.raises(ValueError, match="split 0: train has 2 images; at least 3 are needed"):
        validate_splits([([0, 1], [3, 4, 5])], 10)
    with pytest.raises(ValueError, match="split 0: test has 1 images; at least 2 are needed"):
        validate_splits([([0, 1], [3])], 10, min_train=2, min_test=2)
    with pytest.raises(ValueError, match="split 0: test has 0 images; at least 3 are needed"):
        validate_splits([([0, 1, 2], [])], 10)
    out = validate_splits([([0, 1], [3])], 10, min_train=2, min_test=1)
    assert out[0][1].tolist() == [3]


def test_validate_empty_side_allowed_when_minimum_is_zero():
    out = validate_splits([([0, 1, 2], [])], 10, min_test=0)
    assert out[0][1].dtype == np.int64 and out[0][1].size == 0


@pytest.mark.parametrize("entry", [5, (np.arange(3),), ([0, 1, 2], [3, 4, 5], [6])])
def test_validate_non_pair_entries(entry):
    with pytest.raises(ValueError, match=r"split 1 must be a \(train_idx, test_idx\) pair; got"):
        validate_splits([([0, 1, 2], [3, 4, 5]), entry], 10)


def test_auto_falls_back_to_category_when_objects_outnumber_test_images(caplog):
    import logging

    from sklearn.model_selection import StratifiedShuffleSplit

    meta = pd.DataFrame({"object_name": [f"o{i % 40}" for i in range(120)],
                         "category_name": [f"c{i % 8}" for i in range(120)]})
    with caplog.at_level(logging.WARNING):
        splits = brainscore_splits(meta, stratify="auto")
    assert "stratifying by 'category_name' instead" in caplog.text
    expected = StratifiedShuffleSplit(n_splits=10, train_size=0.9, random_state=1).split(
        np.zeros(120), meta.category_name.to_numpy())
    for (train, test), (etr, ete) in zip(splits, expected):
        np.testing.assert_array_equal(train, etr)
        np.testing.assert_array_equal(test, ete)
    with pytest.raises(ValueError, match="cannot stratify by 'object_name'"):
        brainscore_splits(meta, stratify="object_name")
