"""Matched-population decoding (docs/SCIENCE.md, "Matched-population decoding").

This module owns claim 3 of the reference memo: a category classifier trained only on the matched
model units (unit i standing in for neuron i) decodes stimulus category from the real neurons.

The matched population of a region is one model unit per neuron, column i of the unit responses
being the unit matched to neuron i (chosen on the train images, e.g. by :mod:`core.engine`). Here:

1. A multinomial logistic regression (scikit-learn's ``LogisticRegression(C=C)`` objective: L2
   penalty on the weights, none on the intercept) is fit on the units' responses to the TRAIN
   images, labels = image category. Each unit is z-scored with its own train mean and standard
   deviation.
2. The fitted classifier is applied, unchanged, to the neurons' responses to the TEST images, each
   neuron z-scored with its own TRAIN-image mean and standard deviation (feature i of the
   classifier reads neuron i). Its accuracy is the *transfer accuracy*, reported against chance
   (1 / number of categories).
3. Baselines: the same classifier fit and tested on the neurons (upper bound,
   :func:`neuron_accuracy`), and the transfer accuracy of random unit populations of the same size
   (a null distribution) with the matched population's mid-rank percentile within it.

All response arrays here are images x columns (``(n_images, M)``), i.e. the transpose of the
neurons x images layout of :class:`core.neural.NeuralAssembly`. ``train`` and ``test`` are integer
image indices (as produced by :func:`core.splits.brainscore_splits`) or boolean masks over images.
Only the train and test images are used; other rows may hold anything, NaN included.

Solvers: every fit goes through one of two solvers of the same objective. ``"batched"`` (the
default) fits many problems of one shape at once in torch (:mod:`core._logreg`: the units' and the
neurons' classifiers as one batch, the random populations of the null in a few chunks), on CPU or
a GPU; ``"sklearn"`` fits them one by one with scikit-learn's lbfgs, the reference the batched
solver is tested against (accuracies within 0.01; coefficients within 1e-4 of the largest at a
tight tolerance, observed 4e-6). The batched solver's products are float32 with a float64 finish
(same minimiser and stopping rule, :mod:`core._logreg`); the null's populations are z-scored in
float32 (their classifiers' products are float32 anyway); and ``warm_start`` starts a split's fits
from another split's solutions (``core.analyze`` chains a region's splits: the random populations
of a region are drawn once and shared by its splits, so population i of split s + 1 starts from
population i of split s).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import torch

from ._logreg import fit_many

log = logging.getLogger(__name__)

#: solvers of every fit here: the batched torch L-BFGS, and scikit-learn as the reference
SOLVERS = ("batched", "sklearn")
#: iterations of lbfgs; z-scored features converge well within this
MAX_ITER = 1000
#: stopping tolerance on the largest gradient entry (scikit-learn's default ``tol``)
TOL = 1e-4
#: the null's populations are fitted together in chunks of at most this many bytes of float32
#: train features (100 MajajHong-sized populations, 2304 x 256, take 236 MB: two chunks)
NULL_CHUNK_BYTES = 128 * 2**20
#: a column whose train standard deviation is at most this fraction of its largest train magnitude
#: is treated as constant (z-scoring impossible)
_CONSTANT_RTOL = 1e-12
#: fewer random populations than this give a coarse null; a warning is logged
_MIN_RECOMMENDED_DRAWS = 100

RandomPopulations = Union[np.ndarray, Callable[[int], np.ndarray], None]


# --------------------------------------------------------------------------------------- result
@dataclass
class DecodingResult:
    """Matched-population decoding of one region on one split.

    Attributes:
        transfer_accuracy: classifier fit on the matched units (train images), applied unchanged
            to the neurons' test responses.
        unit_accuracy: the same classifier tested on the units' own test responses (diagnostic).
        neuron_accuracy: a classifier fit and tested on the neurons (upper bound).
        chance: 1 / n_categories.
        null: (n_random,) transfer accuracies of random unit populations of the same size.
        percentile: percent of ``null`` strictly below ``transfer_accuracy`` plus half the ties
            (mid-rank); NaN when ``null`` is empty.
        n_neurons: size of the population (M).
        n_categories: categories among the train images (the classifier's classes).
        fits: the batched solver's fitted parameters, for ``warm_start`` of another split
            (None with scikit-learn); not part of the results table.
    """

    transfer_accuracy: float
    unit_accuracy: float
    neuron_accuracy: float
    chance: float
    null: np.ndarray = field(repr=False)
    percentile: float
    n_neurons: int
    n_categories: int
    #: the batched solver's fitted parameters (``warm_start`` of another split); None with
    #: scikit-learn
    fits: dict | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        """Flat dict of the scalars for a results table.

        Returns:
            The scalar fields plus ``n_random`` (null size), ``null_mean`` and ``null_p95`` (the
            95th percentile of the null); the null statistics are NaN when the null is empty.
        """
        null = np.asarray(self.null, dtype=np.float64)
        empty = null.size == 0
        return {
            "transfer_accuracy": float(self.transfer_accuracy),
            "unit_accuracy": float(self.unit_accuracy),
            "neuron_accuracy": float(self.neuron_accuracy),
            "chance": float(self.chance),
            "percentile": float(self.percentile),
            "n_neurons": int(self.n_neurons),
            "n_categories": int(self.n_categories),
            "n_random": int(null.size),
            "null_mean": float("nan") if empty else float(null.mean()),
            "null_p95": float("nan") if empty else float(np.percentile(null, 95)),
        }


# --------------------------------------------------------------------------------------- validation
def _as_responses(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n_images, M) array; got shape {arr.shape}")
    return arr


def _as_index(split, n_images: int, name: str) -> np.ndarray:
    idx = np.asarray(split)
    if idx.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of image indices or a boolean mask; "
                         f"got shape {idx.shape}")
    if idx.dtype == bool:
        if idx.size != n_images:
            raise ValueError(f"{name} is a boolean mask of length {idx.size}; it must have one "
                             f"entry per image ({n_images})")
        idx = np.flatnonzero(idx)
    elif idx.size == 0:
        idx = idx.astype(np.int64)
    elif not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{name} must hold integer image indices or be a boolean mask; "
                         f"got dtype {idx.dtype}")
    if idx.size == 0:
        raise ValueError(f"{name} selects no images; it needs at least one")
    bad = idx[(idx < 0) | (idx >= n_images)]
    if bad.size:
        raise ValueError(f"{name} holds image index {int(bad[0])}, outside the valid range "
                         f"0..{n_images - 1}")
    uniq, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{name} lists image {int(uniq[counts > 1][0])} more than once; "
                         f"each image may appear once")
    return idx.astype(np.int64)


def _check_finite(x: np.ndarray, rows: np.ndarray, name: str) -> None:
    sub = x[rows]
    bad = ~np.isfinite(sub)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) on the train/test "
                         f"images (first: {sub[r, c]} at image {int(rows[r])}, column {int(c)}); "
                         f"responses must be finite")


def _train_stats(x: np.ndarray, train: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation (ddof=0) over the train images."""
    xt = x[train]
    mean = xt.mean(axis=0)
    std = xt.std(axis=0)
    scale = np.abs(xt).max(axis=0)
    const = std <= _CONSTANT_RTOL * scale
    if const.any():
        cols = np.flatnonzero(const)
        raise ValueError(f"{name} column {int(cols[0])} is constant on the train images "
                         f"(value {float(xt[0, cols[0]])!r}; {cols.size} constant column(s) in all: "
                         f"{cols[:10].tolist()}); z-scoring is impossible, every column needs "
                         f"non-zero variance over the train images")
    return mean, std


@dataclass
class _Problem:
    """Validated labels and split shared by all classifiers of one decoding run."""

    labels: np.ndarray
    train: np.ndarray
    test: np.ndarray
    classes: np.ndarray
    n_images: int
    n_columns: int
    #: train / test labels as indices into ``classes`` (sorted, like scikit-learn's ``classes_``)
    y_train: np.ndarray = field(init=False)
    y_test: np.ndarray = field(init=False)

    def __post_init__(self):
        self.y_train = np.searchsorted(self.classes, self.labels[self.train])
        self.y_test = np.searchsorted(self.classes, self.labels[self.test])


def _validate(labels, train, test, n_images: int, n_columns: int) -> _Problem:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (one category per image); got shape {labels.shape}")
    if labels.shape[0] != n_images:
        raise ValueError(f"labels has {labels.shape[0]} entries but the responses have "
                         f"{n_images} images (rows); give one category per image")
    train_idx = _as_index(train, n_images, "train")
    test_idx = _as_index(test, n_images, "test")
    overlap = np.intersect1d(train_idx, test_idx)
    if overlap.size:
        raise ValueError(f"train and test share {overlap.size} image(s) (e.g. image "
                         f"{int(overlap[0])}); the split must hold disjoint image sets")
    used = np.concatenate([train_idx, test_idx])
    all_classes = np.unique(labels[used])
    if all_classes.size < 2:
        raise ValueError(f"fewer than 2 categories overall (only {all_classes.tolist()!r} among "
                         f"the train/test images); decoding needs at least 2")
    classes = np.unique(labels[train_idx])
    if classes.size < 2:
        raise ValueError(f"the split's train images hold a single category "
                         f"({classes.tolist()[0]!r}); "
                         f"a classifier needs at least 2 categories among the train images")
    unseen = np.setdiff1d(np.unique(labels[test_idx]), classes)
    if unseen.size:
        raise ValueError(f"test images include categor{'y' if unseen.size == 1 else 'ies'} "
                         f"{unseen.tolist()!r} never seen in train (train categories: "
                         f"{classes.tolist()!r}); every test category must occur among the train "
                         f"images")
    if n_columns < classes.size:
        raise ValueError(f"the region has {n_columns} neuron(s) but there are {classes.size} "
                         f"categories; matched-population decoding needs at least as many "
                         f"neurons as categories")
    return _Problem(labels, train_idx, test_idx, classes, n_images, n_columns)


def _check_pair(unit_responses, neuron_responses) -> tuple[np.ndarray, np.ndarray]:
    units = _as_responses(unit_responses, "unit_responses")
    neurons = _as_responses(neuron_responses, "neuron_responses")
    if units.shape[0] != neurons.shape[0]:
        raise ValueError(f"unit_responses has {units.shape[0]} images (rows) but neuron_responses "
                         f"has {neurons.shape[0]}; both must be (n_images, M) over the same images")
    if units.shape[1] != neurons.shape[1]:
        raise ValueError(f"unit_responses has {units.shape[1]} columns (units) but "
                         f"neuron_responses has {neurons.shape[1]} (neurons); column i of each "
                         f"must be matched pair i")
    return units, neurons


def _zscored(x: np.ndarray, p: _Problem, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Train and test rows of x, each column z-scored with its own train statistics."""
    _check_finite(x, np.concatenate([p.train, p.test]), name)
    mean, std = _train_stats(x, p.train, name)
    return (x[p.train] - mean) / std, (x[p.test] - mean) / std


def _zscored_train_stack(x: np.ndarray, p: _Problem, names: Callable[[int], str]) -> np.ndarray:
    """Train rows of a stack (b, n_images, M), each column of each member z-scored with its own
    train statistics: :func:`_zscored` for the null's populations, train rows only (a
    population's classifier is applied to the neurons, never to its own test images).

    In float32, the precision of stored activations (the batched solver's products are float32
    and its float64 finish upcasts these features exactly), in a few multi-threaded torch passes
    over the whole stack instead of a dozen numpy calls and float64 copies per population
    (measured 5x faster). Statistics use torch's blocked float32 sums (relative error about 1e-7;
    a mean's error shifts a feature uniformly, which the classifier's intercept absorbs). The
    checks are :func:`_zscored`'s, on the train images: a non-finite value shows as a non-finite
    column mean, a constant column (in float32) as a zero range, and the member at fault is then
    checked and named by :func:`_check_finite` / :func:`_train_stats`.
    """
    x = np.asarray(x)
    xt = torch.from_numpy(x if all(st >= 0 for st in x.strides) else np.ascontiguousarray(x))
    xt = xt.index_select(1, torch.from_numpy(p.train)).to(torch.float32)  # the train rows, then the cast
    mean = xt.mean(dim=1, keepdim=True)
    for j in (~torch.isfinite(mean).all(dim=2)[:, 0]).nonzero()[:, 0].tolist():
        _check_finite(np.asarray(x[j]), p.train, names(j))
        raise ValueError(f"{names(j)} has values too large for float32 on the train images "
                         f"(magnitude above {np.finfo(np.float32).max:.3g}); rescale the responses")
    flat = xt.amax(dim=1) == xt.amin(dim=1)
    for j in flat.any(dim=1).nonzero()[:, 0].tolist():
        _train_stats(np.asarray(x[j], dtype=np.float64), p.train, names(j))  # raises, naming the column
        c = int(flat[j].nonzero()[0, 0])
        raise ValueError(f"{names(j)} column {c} varies over the train images by less than float32 "
                         f"resolution (value {float(xt[j, 0, c]):.6g}); the null's populations are "
                         f"z-scored in float32: subtract the offset or rescale the responses")
    xt.sub_(mean)
    std = torch.linalg.vector_norm(xt, dim=1, keepdim=True).div_(p.train.size ** 0.5)
    return xt.div_(std).numpy()


# --------------------------------------------------------------------------------------- classifier
def _single_threaded():
    """Context in which BLAS/OpenMP run one thread (the ``"sklearn"`` solver only).

    The scikit-learn fits are small (M features, a few thousand images at most) and many (the
    null). With the default thread pools they were measured 10-25x slower on a loaded 2-core
    machine (pool threads spin-waiting for busy cores: 55 ms instead of 2-4 ms per fit); one
    thread is never slower at this size. The batched solver organises its own threads
    (:func:`core._logreg.fit_many`).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _check_C(C: float) -> float:
    C = float(C)
    if not np.isfinite(C) or C <= 0:
        raise ValueError(f"C (inverse regularisation strength) must be a positive finite number; "
                         f"got {C}")
    return C


def _check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}; got {solver!r}")
    return solver


class _Classifiers:
    """B multinomial logistic regressions fit on (B, n_train, M) z-scored train features.

    All problems share the train labels; ``y_train`` holds class indices into ``p.classes``
    (sorted, as scikit-learn's ``classes_``), so predictions compare with the test labels' indices.
    """

    def __init__(self, z_train: np.ndarray, y_train: np.ndarray, n_classes: int, C: float,
                 solver: str, device, init: torch.Tensor | None = None):
        self.solver = solver
        if solver == "sklearn":
            from sklearn.linear_model import LogisticRegression

            with _single_threaded():
                self.models = [LogisticRegression(C=C, solver="lbfgs", max_iter=MAX_ITER, tol=TOL)
                               .fit(z, y_train) for z in z_train]
        else:
            self.fit = fit_many(z_train, y_train, n_classes, C, device=device, tol=TOL,
                                max_iter=MAX_ITER, init=init)

    @property
    def theta(self) -> torch.Tensor | None:
        """(B, K, F + 1) fitted parameters of the batched solver (a warm start), else None."""
        return None if self.solver == "sklearn" else self.fit.theta

    def accuracy(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(B,) accuracy of each classifier on features z (n, M), shared by all, labels y (n,)."""
        if self.solver == "sklearn":
            with _single_threaded():
                return np.array([np.mean(m.predict(z) == y) for m in self.models], dtype=np.float64)
        pred = self.fit.predict(torch.from_numpy(np.ascontiguousarray(z, dtype=np.float64)))
        return (pred.cpu().numpy() == y).mean(axis=1).astype(np.float64)

    def accuracy_each(self, zs: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(B,) accuracy of classifier b on its own features zs[b] (B, n, M), labels y (n,)."""
        if self.solver == "sklearn":
            with _single_threaded():
                return np.array([np.mean(m.predict(z) == y) for m, z in zip(self.models, zs)],
                                dtype=np.float64)
        pred = self.fit.predict(torch.from_numpy(np.ascontiguousarray(zs, dtype=np.float64)))
        return (pred.cpu().numpy() == y).mean(axis=1).astype(np.float64)


# --------------------------------------------------------------------------------------- public API
def transfer_accuracy(unit_responses, neuron_responses, labels, train, test, *,
                      C: float = 1.0, solver: str = "batched", device=None) -> tuple[float, float]:
    """Accuracy of a unit-trained classifier applied unchanged to the matched neurons.

    Args:
        unit_responses: (n_images, M) responses of the matched units.
        neuron_responses: (n_images, M) responses of the neurons; column i of each array is
            matched pair i.
        labels: (n_images,) category of each image (any hashable values).
        train: train image indices (or a boolean mask); the classifier and all z-scoring
            statistics come from these images only.
        test: test image indices (or a boolean mask), disjoint from ``train``.
        C: inverse L2 regularisation strength of the logistic regression.
        solver: ``"batched"`` (torch L-BFGS, :mod:`core._logreg`) or ``"sklearn"``
            (scikit-learn's ``LogisticRegression``); both minimise the same objective.
        device: torch device of the batched solver (default cpu).

    Returns:
        (transfer accuracy on the neurons' test responses, accuracy on the units' own test
        responses).

    Raises:
        ValueError: disagreeing shapes, bad labels or split, fewer neurons than categories,
            non-finite responses, a column constant on the train images, a bad C or solver.
    """
    C, solver = _check_C(C), _check_solver(solver)
    units, neurons = _check_pair(unit_responses, neuron_responses)
    p = _validate(labels, train, test, *units.shape)
    _, zn_test = _zscored(neurons, p, "neuron_responses")
    zu_train, zu_test = _zscored(units, p, "unit_responses")
    clf = _Classifiers(zu_train[None], p.y_train, p.classes.size, C, solver, device)
    return float(clf.accuracy(zn_test, p.y_test)[0]), float(clf.accuracy(zu_test, p.y_test)[0])


def neuron_accuracy(neuron_responses, labels, train, test, *, C: float = 1.0,
                    solver: str = "batched", device=None) -> float:
    """Accuracy of the same classifier fit and tested on the neurons (the upper bound).

    Args:
        neuron_responses: (n_images, M) responses of the neurons.
        labels: (n_images,) category of each image.
        train: train image indices (or a boolean mask).
        test: test image indices (or a boolean mask), disjoint from ``train``.
        C: inverse L2 regularisation strength of the logistic regression.
        solver: ``"batched"`` or ``"sklearn"``, as :func:`transfer_accuracy`.
        device: torch device of the batched solver (default cpu).

    Returns:
        Accuracy on the neurons' test responses.

    Raises:
        ValueError: as :func:`transfer_accuracy`.
    """
    C, solver = _check_C(C), _check_solver(solver)
    neurons = _as_responses(neuron_responses, "neuron_responses")
    p = _validate(labels, train, test, *neurons.shape)
    zn_train, zn_test = _zscored(neurons, p, "neuron_responses")
    clf = _Classifiers(zn_train[None], p.y_train, p.classes.size, C, solver, device)
    return float(clf.accuracy(zn_test, p.y_test)[0])


def null_percentile(value: float, null) -> float:
    """Mid-rank percentile of ``value`` within a null distribution.

    Args:
        value: the observed statistic.
        null: 1-D sample of the statistic under the null.

    Returns:
        100 * (number of null values strictly below ``value`` + half the number equal to it)
        / len(null); NaN when ``null`` is empty.

    Raises:
        ValueError: ``null`` is not 1-D or holds non-finite values.
    """
    null = np.asarray(null, dtype=np.float64)
    if null.ndim != 1:
        raise ValueError(f"null must be 1-D; got shape {null.shape}")
    if null.size == 0:
        return float("nan")
    if not np.isfinite(null).all():
        raise ValueError(f"null holds {int((~np.isfinite(null)).sum())} non-finite value(s); "
                         f"all values must be finite")
    below = np.count_nonzero(null < value)
    ties = np.count_nonzero(null == value)
    return float(100.0 * (below + 0.5 * ties) / null.size)


def matched_population_decoding(unit_responses, neuron_responses, labels, train, test, *,
                                random_populations: RandomPopulations = None,
                                n_random: int = 100, C: float = 1.0, solver: str = "batched",
                                device=None, warm_start: DecodingResult | None = None) -> DecodingResult:
    """Transfer decoding of one region's matched population, with both baselines.

    Args:
        unit_responses: (n_images, M) responses of the matched units (column i = unit matched to
            neuron i on the train images).
        neuron_responses: (n_images, M) responses of the region's neurons.
        labels: (n_images,) category of each image.
        train: train image indices (or a boolean mask).
        test: test image indices (or a boolean mask), disjoint from ``train``.
        random_populations: the null. An array (n_draws, n_images, M) of random units' responses
            (all n_draws are used; ``n_random`` is ignored), or a callable ``rng_draw(i)``
            returning the i-th random population as an (n_images, M) array (called for
            i = 0 .. n_random - 1, in order), or None (no null: ``null`` is empty and
            ``percentile`` NaN). Column i of a random population is read as neuron i's stand-in,
            like the matched units; each population is z-scored with its own train statistics
            (and checked on the train images, the only ones its classifier reads).
        n_random: number of draws from a callable ``random_populations``.
        C: inverse L2 regularisation strength of every logistic regression fit here.
        solver: ``"batched"`` (default: the null's populations fitted together, in chunks of at
            most ``NULL_CHUNK_BYTES`` of features, by :mod:`core._logreg`) or ``"sklearn"`` (one
            scikit-learn fit after another); both minimise the same objective.
        device: torch device of the batched solver (default cpu).
        warm_start: the result of another split of the same region, with the same random
            populations (e.g. the previous split): the batched solver starts each fit (units,
            neurons, null population i) from that split's solution instead of zero. The
            objective and stopping rule are unchanged, so the fits reach the same minimisers to
            the same tolerance in fewer iterations (the splits share most train images). Used
            only where it fits: a batched-solver result with the same categories, neurons and
            number of draws; otherwise (and with ``solver="sklearn"``) the fits start from zero.

    Returns:
        A :class:`DecodingResult`.

    Raises:
        ValueError: as :func:`transfer_accuracy`; also a random population of the wrong shape,
            with non-finite values or a column constant on the train images (named by its draw),
            a non-positive ``n_random`` with a callable, a ``random_populations`` that is
            neither an array nor a callable, or a ``warm_start`` that is not a DecodingResult.
    """
    C, solver = _check_C(C), _check_solver(solver)
    units, neurons = _check_pair(unit_responses, neuron_responses)
    p = _validate(labels, train, test, *units.shape)
    if warm_start is not None and not isinstance(warm_start, DecodingResult):
        raise ValueError(f"warm_start must be the DecodingResult of another split (or None); got "
                         f"{type(warm_start).__name__}")
    warm = warm_start.fits if warm_start is not None and solver == "batched" else None
    if warm is not None and not np.array_equal(warm["classes"], p.classes):
        warm = None

    zn_train, zn_test = _zscored(neurons, p, "neuron_responses")
    zu_train, zu_test = _zscored(units, p, "unit_responses")
    # classifier 0 on the units, 1 on the neurons: one batch
    init = None if warm is None or warm["pair"].shape[2] != p.n_columns + 1 else warm["pair"]
    clf = _Classifiers(np.stack([zu_train, zn_train]), p.y_train, p.classes.size, C, solver, device,
                       init=init)
    transfer, neuron_acc = clf.accuracy(zn_test, p.y_test).tolist()
    unit_acc = float(clf.accuracy(zu_test, p.y_test)[0])
    null, null_theta = _null_distribution(random_populations, n_random, p, zn_test, C, solver, device,
                                          None if warm is None else warm["null"])
    percentile = null_percentile(transfer, null)
    chance = 1.0 / p.classes.size
    result = DecodingResult(
        transfer_accuracy=transfer, unit_accuracy=unit_acc, neuron_accuracy=neuron_acc,
        chance=chance, null=null, percentile=percentile, n_neurons=p.n_columns,
        n_categories=int(p.classes.size),
        fits=None if solver == "sklearn" else {"classes": p.classes, "pair": clf.theta, "null": null_theta},
    )
    log.info("matched-population decoding: %d neurons, %d categories: transfer %.3f, units %.3f, "
             "neurons %.3f, chance %.3f, null n=%d, percentile %.1f", p.n_columns,
             p.classes.size, transfer, unit_acc, neuron_acc, chance, null.size, percentile)
    return result


def _null_distribution(random_populations: RandomPopulations, n_random: int, p: _Problem,
                       zn_test: np.ndarray, C: float, solver: str, device,
                       init: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor | None]:
    """Transfer accuracies of random unit populations applied to the (z-scored) neurons.

    Populations are drawn, z-scored and fitted in chunks whose float32 train features stay
    within ``NULL_CHUNK_BYTES`` (all of a MajajHong-sized null in two chunks). ``init``: the
    (n_draws, K, M + 1) starting parameters of the batched fits (a warm start; ignored if its
    shape does not fit). Returns the accuracies and the fitted parameters (batched solver; None
    with scikit-learn or no null).
    """
    if random_populations is None:
        return np.empty(0, dtype=np.float64), None
    expected = (p.n_images, p.n_columns)
    if callable(random_populations):
        if isinstance(n_random, bool) or not isinstance(n_random, (int, np.integer)) or n_random < 1:
            raise ValueError(f"n_random must be a positive integer (number of random populations "
                             f"to draw); got {n_random!r}")
        n_draws = int(n_random)

        def draws(chunk: np.ndarray) -> np.ndarray:
            out = []
            for i in chunk:
                pop = np.asarray(random_populations(int(i)))
                if pop.shape != expected:
                    raise ValueError(f"random population {i} has shape {pop.shape}; it must be "
                                     f"(n_images, M) = {expected}, like the matched units")
                out.append(pop)
            return np.stack(out)
    elif isinstance(random_populations, np.ndarray) or hasattr(random_populations, "__array__"):
        pops = np.asarray(random_populations)
        if pops.ndim != 3 or pops.shape[1:] != expected:
            raise ValueError(f"random_populations array must have shape (n_draws, {expected[0]}, "
                             f"{expected[1]}) (draws x images x neurons); got {pops.shape}")
        if pops.shape[0] == 0:
            raise ValueError("random_populations array holds 0 draws; give at least one, or None "
                             "for no null")
        n_draws = pops.shape[0]

        def draws(chunk: np.ndarray) -> np.ndarray:
            return pops[chunk[0]:chunk[-1] + 1]
    else:
        raise ValueError(f"random_populations must be an (n_draws, n_images, M) array, a "
                         f"callable rng_draw(i) -> (n_images, M) array, or None; got "
                         f"{type(random_populations).__name__}")
    if n_draws < _MIN_RECOMMENDED_DRAWS:
        log.warning("null of %d random populations (at least %d recommended): percentile "
                    "resolution is coarse", n_draws, _MIN_RECOMMENDED_DRAWS)
    if init is not None and tuple(init.shape) != (n_draws, p.classes.size, p.n_columns + 1):
        init = None

    per_draw = p.train.size * p.n_columns * 4
    n_chunks = -(-n_draws // max(1, NULL_CHUNK_BYTES // per_draw))
    null = np.empty(n_draws, dtype=np.float64)
    thetas = []
    for chunk in np.array_split(np.arange(n_draws), n_chunks):
        z_train = _zscored_train_stack(draws(chunk), p, lambda j: f"random population {chunk[j]}")
        clf = _Classifiers(z_train, p.y_train, p.classes.size, C, solver, device,
                           init=None if init is None else init[chunk[0]:chunk[-1] + 1])
        null[chunk] = clf.accuracy(zn_test, p.y_test)
        thetas.append(clf.theta)
    return null, (None if solver == "sklearn" else torch.cat(thetas))
