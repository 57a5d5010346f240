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
(same minimiser and stopping rule, :mod:`core._logreg`; on the CPU the float32 phase is compiled,
:mod:`core._logreg_kernel`); the null's populations are z-scored in
float32 (their classifiers' products are float32 anyway); and ``warm_start`` starts a split's fits
from another split's solutions. ``core.analyze`` decodes a region's splits together
(:func:`matched_population_decoding_splits`): its random populations are drawn once and shared by
its splits, so population i of a later split starts from population i of an earlier one (from the
first split where the splits' fits share batches, from the previous split where they are large; on
a GPU in as few batches as its memory allows, the first split not alone, see ``GPU_BATCH_FRACTION``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Union

import numpy as np
import torch

from . import _logreg
from ._logreg import BatchedFit, fit_many
from ._threads import single_threaded_ops
from .engine import default_device

log = logging.getLogger(__name__)

#: solvers of every fit here: the batched torch L-BFGS, and scikit-learn as the reference
SOLVERS = ("batched", "sklearn")
#: iterations of lbfgs; z-scored features converge well within this
MAX_ITER = 1000
#: stopping tolerance on the largest gradient entry (scikit-learn's default ``tol``)
TOL = 1e-4
#: the batched solver fits problems together in batches of at most this many bytes of train
#: features: the null's populations (float32) of as many splits as fit, the units' and neurons'
#: classifiers (float64) of as many splits as fit; a larger piece is fitted alone, cut in chunks
#: (100 MajajHong-sized populations, 2304 x 256, take 236 MB: two chunks per split). On the CPU.
BATCH_BYTES = 128 * 2**20
#: on a GPU, batches of up to this fraction of the device's memory (within ``GPU_BATCH_BYTES``),
#: the first split not fitted alone (a batch after the first, where a region needs several, starts
#: from the solutions before it): there a batch of small fits runs at the rate the host launches kernels,
#: not at its arithmetic's (an H200 took 3.4 s for the MajajHong-sized fits: 22 batches, 681 L-BFGS
#: iterations in sequence, 5 ms each, where reading a batch's 118 MB of features a few times takes
#: a tenth of a millisecond at its memory's bandwidth), so fewer, larger batches cost less;
#: the CPU's first split alone (a warm start for the others, 12% fewer iterations) would cost one
#: more batch in sequence. Peak device memory about 4x the batch (its float64 phase, the stacks).
GPU_BATCH_FRACTION = 1 / 32
GPU_BATCH_BYTES = (BATCH_BYTES, 2 * 2**30)
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


def _zscored_train_stack(x: np.ndarray, p: _Problem, names: Callable[[int], str], device=None) -> torch.Tensor:
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

    The train rows are gathered on the host by numpy (3.6x faster than torch's ``index_select``
    of the same rows, on 2 cores), then moved to ``device`` (default cpu), where the statistics run
    and the returned tensor lives: on a GPU the batched solver takes it as it is. A float32 tensor
    ``x`` (the null's populations kept on a GPU for all splits, :func:`_null_draws`) is gathered
    where it is.
    """
    if isinstance(x, torch.Tensor):
        xt = x.index_select(1, torch.as_tensor(p.train, device=x.device))

        def member(j: int) -> np.ndarray:
            return x[j].cpu().numpy()
    else:
        x = np.asarray(x)
        train = np.take(x, p.train, axis=1)  # the train rows (contiguous), then the cast
        xt = torch.from_numpy(train if train.dtype == np.float32 else train.astype(np.float32))
        xt = xt.to(torch.device(device) if device is not None else "cpu")

        def member(j: int) -> np.ndarray:
            return np.asarray(x[j])
    mean = xt.mean(dim=1, keepdim=True)
    for j in (~torch.isfinite(mean).all(dim=2)[:, 0]).nonzero()[:, 0].tolist():
        _check_finite(member(j), p.train, names(j))
        raise ValueError(f"{names(j)} has values too large for float32 on the train images "
                         f"(magnitude above {np.finfo(np.float32).max:.3g}); rescale the responses")
    flat = xt.amax(dim=1) == xt.amin(dim=1)
    for j in flat.any(dim=1).nonzero()[:, 0].tolist():
        _train_stats(member(j).astype(np.float64), p.train, names(j))  # raises, naming the column
        c = int(flat[j].nonzero()[0, 0])
        raise ValueError(f"{names(j)} column {c} varies over the train images by less than float32 "
                         f"resolution (value {float(xt[j, 0, c]):.6g}); the null's populations are "
                         f"z-scored in float32: subtract the offset or rescale the responses")
    xt.sub_(mean)
    return xt.div_(_column_norms(xt).div_(p.train.size ** 0.5))


def _column_norms(x: torch.Tensor) -> torch.Tensor:
    """(b, 1, M) Euclidean norms of the columns of each member of a (b, n, M) stack.

    On the CPU the squares are summed over chunks of rows that stay in cache: on a (50, 2304, 256)
    float32 stack 8 ms against 62 ms for ``torch.linalg.vector_norm`` over the rows and 33 ms for
    squaring the whole stack first (one thread; relative error up to 3.5e-7 against float64, the
    norm's 1.5e-6). Elsewhere in one pass (a loop of small kernels would wait on launches on a GPU).
    """
    b, n, m = x.shape
    step = n if x.device.type != "cpu" else max(1, (1 << 20) // max(1, 4 * b * m))
    out = torch.zeros((b, 1, m), dtype=x.dtype, device=x.device)
    for r0 in range(0, n, step):
        chunk = x[:, r0:r0 + step]
        out.add_(torch.mul(chunk, chunk).sum(dim=1, keepdim=True))
    return out.sqrt_()


# --------------------------------------------------------------------------------------- classifier
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

    ``y_train`` holds class indices into the problems' sorted classes (as scikit-learn's
    ``classes_``), so predictions compare with the test labels' indices: (n_train,) shared by all
    problems, or (B, n_train), each problem's own (problems of several splits).
    """

    def __init__(self, z_train: np.ndarray | torch.Tensor, y_train: np.ndarray, n_classes: int, C: float,
                 solver: str, device, init: torch.Tensor | None = None):
        self.solver = solver
        if solver == "sklearn":
            z_train = z_train.cpu().numpy() if isinstance(z_train, torch.Tensor) else z_train
            from sklearn.linear_model import LogisticRegression

            ys = y_train if y_train.ndim == 2 else [y_train] * len(z_train)
            # small fits: one BLAS thread is never slower, and multi-threaded pools were measured
            # 10-25x slower on a loaded 2-core machine (55 ms instead of 2-4 ms per fit)
            with single_threaded_ops():
                self.models = [LogisticRegression(C=C, solver="lbfgs", max_iter=MAX_ITER, tol=TOL)
                               .fit(z, y) for z, y in zip(z_train, ys)]
        else:
            self.fit = fit_many(z_train, y_train, n_classes, C, device=device, tol=TOL,
                                max_iter=MAX_ITER, init=init)

    @property
    def theta(self) -> torch.Tensor | None:
        """(B, K, F + 1) fitted parameters of the batched solver (a warm start), else None."""
        return None if self.solver == "sklearn" else self.fit.theta

    def accuracy(self, z: np.ndarray, y: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """Accuracy of each classifier of ``rows`` (default all) on features z (n, M), shared by
        them, labels y (n,)."""
        if self.solver == "sklearn":
            with single_threaded_ops():
                return np.array([np.mean(m.predict(z) == y) for m in self.models[rows]], dtype=np.float64)
        f = self.fit
        part = BatchedFit(f.coef[rows], f.intercept[rows], f.n_iter[rows], f.converged[rows])
        pred = part.predict(torch.from_numpy(np.ascontiguousarray(z, dtype=np.float64)))
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


def warm_up(device=None) -> bool:
    """Make the batched solver's compiled CPU phase ready (compiled, or loaded from numba's disk
    cache) before the first decoding needs it, e.g. in a background thread while activations are
    extracted; ``device`` as the decoding's (None: cuda when available, as ``core.analyze``
    resolves it). Compiling takes several seconds, once per machine. Returns whether the compiled
    phase applies there (not on a GPU, nor without numba)."""
    return _logreg.warm_up(default_device(device))


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
        solver: ``"batched"`` (default: the null's populations fitted together, in batches of at
            most ``BATCH_BYTES`` of features, by :mod:`core._logreg`) or ``"sklearn"`` (one
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
    return matched_population_decoding_splits(
        [unit_responses], neuron_responses, labels, [(train, test)], random_populations=random_populations,
        n_random=n_random, C=C, solver=solver, device=device, warm_start=warm_start)[0]


def matched_population_decoding_splits(unit_responses, neuron_responses, labels, splits, *,
                                       random_populations: RandomPopulations = None, n_random: int = 100,
                                       C: float = 1.0, solver: str = "batched", device=None,
                                       warm_start: DecodingResult | None = None) -> list[DecodingResult]:
    """:func:`matched_population_decoding` on every split of one region, the splits' fits batched.

    The answers are those of :func:`matched_population_decoding` split by split (same objective,
    stopping rule and random populations); only how the batched solver groups its fits differs.
    Every fit is a separate problem with its own split's train images and labels, and the solver
    fits problems of several splits at once, in batches of at most ``BATCH_BYTES`` (CPU) of train
    features: the units' and neurons' classifiers of the splits, and the null's populations of as
    many consecutive splits as fit (a split's null larger than that is fitted in chunks, alone).
    On the CPU the first split is fitted alone, and each later batch starts from the latest
    solutions of the same classifiers in an earlier batch (population i from population i: a warm
    start, as ``warm_start`` below; the first split from ``warm_start``, or from zero). Many small
    problems (the demo: 10 splits x 100 populations of 360 x 48) then cost two batches per region
    instead of two per split, the second on all cores and warm-started from the first split (12%
    fewer iterations than cold, measured on the demo); with large problems, one split's null per
    batch, split s starts from split s - 1. On a GPU, batches hold up to ``GPU_BATCH_FRACTION`` of
    its memory and the first split is not fitted alone (a batch there costs its number of
    iterations, whatever its size): the demo's region is one batch of classifier pairs and one of
    null fits, a MajajHong-sized null two.

    Args:
        unit_responses: one (n_images, M) array per split (a list, or an (n_splits, n_images, M)
            array): the units matched to the neurons on that split's train images, column i
            standing in for neuron i.
        neuron_responses: (n_images, M) responses of the region's neurons.
        labels: (n_images,) category of each image.
        splits: (train, test) pairs of image indices or boolean masks, as ``train`` and ``test``
            of :func:`matched_population_decoding`.
        random_populations: the null, shared by all splits: as :func:`matched_population_decoding`
            (a callable is called for every draw once per split).
        n_random, C, solver, device: as :func:`matched_population_decoding`.
        warm_start: a :class:`DecodingResult` of the same region (e.g. another run's last split):
            the first fits start from its solutions where they fit; as
            :func:`matched_population_decoding`.

    Returns:
        One :class:`DecodingResult` per split, in order.

    Raises:
        ValueError: as :func:`matched_population_decoding` (a split's error says which split);
            also no splits, or not one unit array per split.
    """
    C, solver = _check_C(C), _check_solver(solver)
    neurons = _as_responses(neuron_responses, "neuron_responses")
    splits = list(splits)
    if not splits:
        raise ValueError("splits is empty; give at least one (train, test) pair of image indices")
    if ((isinstance(unit_responses, np.ndarray) and unit_responses.ndim != 3)
            or len(unit_responses) != len(splits)):
        got = (f"an array of shape {unit_responses.shape}" if isinstance(unit_responses, np.ndarray)
               else f"{len(unit_responses)} arrays")
        raise ValueError(f"unit_responses must hold one (n_images, M) array per split ({len(splits)} "
                         f"splits); got {got}")
    if warm_start is not None and not isinstance(warm_start, DecodingResult):
        raise ValueError(f"warm_start must be the DecodingResult of another split (or None); got "
                         f"{type(warm_start).__name__}")

    def per_split(s: int, check: Callable):
        if len(splits) == 1:
            return check()
        try:
            return check()
        except ValueError as e:
            raise ValueError(f"split {s}: {e}") from None

    split_data = []
    for s, (units, (train, test)) in enumerate(zip(unit_responses, splits)):
        def prepare(units=units, train=train, test=test):
            units_, neurons_ = _check_pair(units, neurons)
            p = _validate(labels, train, test, *units_.shape)
            return _SplitData(p, *_zscored(units_, p, "unit_responses"), *_zscored(neurons_, p, "neuron_responses"))
        split_data.append(per_split(s, prepare))
    problems = [d.problem for d in split_data]
    batched = solver == "batched"
    warm = warm_start.fits if warm_start is not None and batched else None
    limit, first_alone = _batch_plan(device, solver)
    n_draws, draws = _null_draws(random_populations, n_random, (problems[0].n_images, problems[0].n_columns),
                                 device=device if batched else None, limit=limit)

    def key(s: int) -> tuple:  # problems that can share a batch: same train size and classes
        return problems[s].train.size, tuple(problems[s].classes.tolist())

    def start(shape: tuple, previous: torch.Tensor | None) -> torch.Tensor | None:
        """Starting parameters of a batch: the previous ones if they fit, else zeros (a cold start)."""
        if not batched:
            return None
        if previous is not None and tuple(previous.shape) == shape:
            return previous
        return torch.zeros(shape, dtype=torch.float64)

    def labels_of(pieces: list[tuple[int, int]]) -> np.ndarray:
        """Train labels of the problems of (split, count) pieces: shared (n,) or per problem (B, n)."""
        ys = [problems[s].y_train for s, _ in pieces]
        if all(np.array_equal(y, ys[0]) for y in ys[1:]):
            return ys[0]
        return np.concatenate([np.broadcast_to(y, (n, y.size)) for y, (_, n) in zip(ys, pieces)])

    m = problems[0].n_columns
    first_key = key(0)
    warm_ok = warm is not None and np.array_equal(warm["classes"], problems[0].classes)
    k = len(first_key[1])
    # the units' (0) and the neurons' (1) classifiers of each split
    pair = start((2, k, m + 1), warm["pair"] if warm_ok else None)
    pair_key, accs, pair_theta = first_key, {}, {}
    for batch in _pack(range(len(splits)), lambda s: 2 * problems[s].train.size * m * 8,
                       lambda s: (key(s), first_alone and s == 0), limit):
        if key(batch[0]) != pair_key:
            pair, pair_key = None, key(batch[0])
        k = len(pair_key[1])
        pair = start((2, k, m + 1), pair)
        x = np.concatenate([np.stack([split_data[s].units_train, split_data[s].neurons_train]) for s in batch])
        clf = _Classifiers(x, labels_of([(s, 2) for s in batch]), k, C, solver, device,
                           init=None if pair is None else pair.repeat(len(batch), 1, 1))
        for j, s in enumerate(batch):
            d, rows = split_data[s], slice(2 * j, 2 * j + 2)
            transfer, neuron_acc = clf.accuracy(d.neurons_test, d.problem.y_test, rows).tolist()
            unit_acc = float(clf.accuracy(d.units_test, d.problem.y_test, slice(2 * j, 2 * j + 1))[0])
            accs[s] = (transfer, unit_acc, neuron_acc)
            pair_theta[s] = None if clf.theta is None else clf.theta[rows]
        pair = pair_theta[batch[-1]]
    null = {s: np.empty(n_draws, dtype=np.float64) for s in range(len(splits))}
    null_theta = {s: [] for s in range(len(splits))}
    if draws is not None:
        pieces = []
        for s, p in enumerate(problems):
            per_draw = p.train.size * m * 4
            n_chunks = -(-n_draws // max(1, limit // per_draw))
            pieces += [(s, chunk) for chunk in np.array_split(np.arange(n_draws), n_chunks)]
        k = len(first_key[1])
        current = start((n_draws, k, m + 1), warm["null"] if warm_ok else None)
        null_key = first_key
        for batch in _pack(pieces, lambda pc: pc[1].size * problems[pc[0]].train.size * m * 4,
                           lambda pc: (key(pc[0]), first_alone and pc[0] == 0), limit):
            if key(batch[0][0]) != null_key:
                current, null_key = None, key(batch[0][0])
            current = start((n_draws, len(null_key[1]), m + 1), current)
            stacks = [per_split(s, lambda s=s, chunk=chunk: _zscored_train_stack(
                draws(chunk), problems[s], lambda j: f"random population {chunk[j]}",
                device=device if batched else None)) for s, chunk in batch]
            x = stacks[0] if len(stacks) == 1 else torch.cat(stacks)
            del stacks
            clf = _Classifiers(x, labels_of([(s, chunk.size) for s, chunk in batch]), len(null_key[1]), C,
                               solver, device, init=None if current is None else
                               torch.cat([current[chunk] for _, chunk in batch]))
            del x
            offset, updated = 0, None if current is None else current.clone()
            for s, chunk in batch:
                rows, d = slice(offset, offset + chunk.size), split_data[s]
                null[s][chunk] = clf.accuracy(d.neurons_test, d.problem.y_test, rows)
                if clf.theta is not None:
                    null_theta[s].append(clf.theta[rows])
                    updated[chunk] = clf.theta[rows].to(updated)
                offset += chunk.size
            current = updated
    results = []
    for s, p in enumerate(problems):
        transfer, unit_acc, neuron_acc = accs[s]
        percentile = null_percentile(transfer, null[s])
        result = DecodingResult(
            transfer_accuracy=transfer, unit_accuracy=unit_acc, neuron_accuracy=neuron_acc,
            chance=1.0 / p.classes.size, null=null[s], percentile=percentile, n_neurons=p.n_columns,
            n_categories=int(p.classes.size),
            fits=None if not batched else {"classes": p.classes, "pair": pair_theta[s],
                                           "null": torch.cat(null_theta[s]) if null_theta[s] else None},
        )
        log.info("matched-population decoding, split %d: %d neurons, %d categories: transfer %.3f, units "
                 "%.3f, neurons %.3f, chance %.3f, null n=%d, percentile %.1f", s, p.n_columns,
                 p.classes.size, transfer, unit_acc, neuron_acc, result.chance, null[s].size, percentile)
        results.append(result)
    return results


class _SplitData(NamedTuple):
    """One split's validated problem and z-scored train / test responses."""

    problem: _Problem
    units_train: np.ndarray
    units_test: np.ndarray
    neurons_train: np.ndarray
    neurons_test: np.ndarray


def _batch_plan(device, solver: str) -> tuple[int, bool]:
    """(bytes of features per batch, fit the first split alone) for the batched solver on ``device``:
    ``BATCH_BYTES`` and the first split alone on the CPU (and for scikit-learn, which fits one
    problem at a time anyway); on a GPU a ``GPU_BATCH_FRACTION`` of its memory and the first split
    not alone (see ``GPU_BATCH_FRACTION``)."""
    dev = torch.device(device if device is not None else "cpu")
    if solver != "batched" or dev.type != "cuda":
        return BATCH_BYTES, True
    low, high = GPU_BATCH_BYTES
    total = torch.cuda.get_device_properties(dev).total_memory
    return int(min(high, max(low, total * GPU_BATCH_FRACTION))), False


def _pack(pieces, nbytes: Callable, key: Callable, limit: int):
    """Consecutive pieces in batches of at most ``limit`` bytes (``nbytes(piece)`` each; a larger
    piece alone), the pieces of a batch having the same ``key`` (the caller's: problems that can
    share a batch, and the first split apart from the others where it is fitted alone)."""
    batch, size = [], 0
    for piece in pieces:
        if batch and (key(piece) != key(batch[0]) or size + nbytes(piece) > limit):
            yield batch
            batch, size = [], 0
        batch.append(piece)
        size += nbytes(piece)
    if batch:
        yield batch


def _null_draws(random_populations: RandomPopulations, n_random: int, expected: tuple[int, int],
                device=None, limit: int = 0) -> tuple[int, Callable[[np.ndarray], np.ndarray] | None]:
    """(number of draws, ``draws(indices)`` -> (len, n_images, M) populations) of a null; (0, None)
    without one. Checks the array's shape (a callable's populations are checked as drawn).

    A float32 array of at most ``limit`` bytes goes to ``device`` once when that is not the CPU
    (a GPU): every split then gathers its train rows there, where the array would otherwise be
    gathered on the host and copied over once per split (10 times with Brain-Score's splits).
    """
    if random_populations is None:
        return 0, None
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
        if (device is not None and torch.device(device).type != "cpu" and pops.dtype == np.float32
                and pops.nbytes <= limit):
            pops = torch.as_tensor(pops).to(device)

        def draws(chunk: np.ndarray) -> np.ndarray:
            return pops[chunk[0]:chunk[-1] + 1]
    else:
        raise ValueError(f"random_populations must be an (n_draws, n_images, M) array, a "
                         f"callable rng_draw(i) -> (n_images, M) array, or None; got "
                         f"{type(random_populations).__name__}")
    if n_draws < _MIN_RECOMMENDED_DRAWS:
        log.warning("null of %d random populations (at least %d recommended): percentile "
                    "resolution is coarse", n_draws, _MIN_RECOMMENDED_DRAWS)
    return n_draws, draws
