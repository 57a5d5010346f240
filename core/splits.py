"""Train/test splits of the images.

Defaults follow Brain-Score's ``neuron_to_neuron`` cross-validation (brainscore_vision
``metric_helpers.transformations.Split``): sklearn ``StratifiedShuffleSplit`` with 10 splits,
train_size 0.9, random_state 1, stratified by ``object_name``; its indices are reproduced exactly,
so scores computed here are comparable. Like Brain-Score (which asserts the column exists), the
default insists on ``object_name``: unstratified splits (``stratify=None``) and the automatic
choice of another column (``stratify="auto"``) happen only when asked for.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

Split = tuple[np.ndarray, np.ndarray]

#: metadata columns tried, in order, when stratify="auto"
STRATIFY_COLUMNS = ("object_name", "object", "category_name", "category")
#: Brain-Score's stratification column (``Split.Defaults.stratification_coord``)
BRAINSCORE_STRATIFY = "object_name"


def brainscore_splits(
    metadata: pd.DataFrame | None = None,
    *,
    n_images: int | None = None,
    n_splits: int = 10,
    train_size: float = 0.9,
    random_state: int = 1,
    stratify: str | None = BRAINSCORE_STRATIFY,
) -> list[Split]:
    """Brain-Score-compatible splits.

    Args:
        metadata: one row per image, in image order (the stimulus set's metadata).
        n_images: number of images when there is no metadata.
        n_splits, train_size, random_state: as sklearn's (Brain-Score defaults).
        stratify: a metadata column, by default Brain-Score's ``object_name`` (an error when the
            metadata lacks it); None: unstratified (sklearn ``ShuffleSplit``, as Brain-Score with
            ``stratification_coord=None``); ``"auto"``: the first of object_name, object,
            category_name, category present that sklearn can stratify by (a warning says when it
            falls back because a test set cannot hold one image per object), else unstratified.

    Returns:
        A list of (train_idx, test_idx) integer arrays.

    Raises:
        ValueError: the stratification column is not in the metadata (the message says how to ask
            for unstratified splits), or too few images per class to stratify.
    """
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

    if metadata is None and n_images is None:
        raise ValueError("give metadata or n_images")
    n = len(metadata) if metadata is not None else int(n_images)
    column = None
    if stratify == "auto":
        if metadata is not None:
            usable = [c for c in STRATIFY_COLUMNS if c in metadata.columns]
            column = next((c for c in usable if _can_stratify(metadata[c], n, train_size)), None)
            if usable and column != usable[0]:
                log.warning("cannot stratify %d images by %r (too few images per class for a %.0f%% test set); "
                            "stratifying by %r instead", n, usable[0], 100 * (1 - train_size), column)
    elif stratify is not None:
        if metadata is None or stratify not in metadata.columns:
            have = [] if metadata is None else list(metadata.columns)
            default = " (Brain-Score's default)" if stratify == BRAINSCORE_STRATIFY else ""
            raise ValueError(
                f"stratify column {stratify!r}{default} not in the image metadata columns {have}; pass "
                f"stratify=None for unstratified splits, stratify='<column>' for another column, or "
                f"stratify='auto' to take the first usable of {list(STRATIFY_COLUMNS)}"
            )
        column = stratify
    if column is None:
        splitter = ShuffleSplit(n_splits=n_splits, train_size=train_size, random_state=random_state)
        pairs = splitter.split(np.zeros(n))
    else:
        labels = metadata[column].to_numpy()
        splitter = StratifiedShuffleSplit(n_splits=n_splits, train_size=train_size, random_state=random_state)
        try:
            pairs = list(splitter.split(np.zeros(n), labels))
        except ValueError as err:
            raise ValueError(f"cannot stratify by {column!r}: {err}") from err
    return [(np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64)) for tr, te in pairs]


def _can_stratify(labels: pd.Series, n: int, train_size: float) -> bool:
    """sklearn's conditions: every class has 2 images, and each side can hold one image per class."""
    counts = labels.value_counts()
    n_train = int(np.floor(train_size * n))
    return counts.min() >= 2 and min(n_train, n - n_train) >= len(counts)


def validate_splits(splits: Sequence[Split], n_images: int, *, min_train: int = 3, min_test: int = 3) -> list[Split]:
    """Check user-given splits and return them as sorted int64 arrays.

    Each split is (train_idx, test_idx): integer positions into the image axis, disjoint, no
    duplicates. Images in neither set are allowed (they are simply unused by that split).

    Raises:
        ValueError: naming the split and what is wrong with it.
    """
    if len(splits) == 0:
        raise ValueError("no splits given; need at least one (train_idx, test_idx) pair")
    out = []
    for s, pair in enumerate(splits):
        try:
            train, test = pair
        except (TypeError, ValueError):
            raise ValueError(f"split {s} must be a (train_idx, test_idx) pair; got {type(pair).__name__}") from None
        arrays = []
        for name, idx, minimum in (("train", train, min_train), ("test", test, min_test)):
            idx = np.asarray(idx)
            if idx.dtype == bool:
                raise ValueError(f"split {s}: {name} indices must be integer positions, not a boolean mask")
            if idx.ndim == 1 and idx.size == 0:
                idx = idx.astype(np.int64)  # [] is float64 to numpy; an empty set of positions is fine
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise ValueError(f"split {s}: {name} indices must be a 1-D integer array; got {idx.dtype} {idx.shape}")
            if idx.size < minimum:
                raise ValueError(f"split {s}: {name} has {idx.size} images; at least {minimum} are needed")
            if idx.size and (idx.min() < 0 or idx.max() >= n_images):
                raise ValueError(
                    f"split {s}: {name} indices must lie in [0, {n_images}); got range [{idx.min()}, {idx.max()}]"
                )
            if np.unique(idx).size != idx.size:
                raise ValueError(f"split {s}: {name} indices contain duplicates")
            arrays.append(np.sort(idx.astype(np.int64)))
        overlap = np.intersect1d(*arrays)
        if overlap.size:
            raise ValueError(
                f"split {s}: {overlap.size} images are in both train and test, e.g. {overlap[:5].tolist()}")
        out.append((arrays[0], arrays[1]))
    return out
