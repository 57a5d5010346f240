"""The streaming one-to-one matching engine.

For every split (train images T, test images H) and neuron j it finds the unit u*(j) with the
highest Pearson r over T among all candidate units, and reports that unit's r over H.

How, per block of units (images x units, one layer):

1. Preparation, one cache-friendly sweep over row chunks: cast to float32, subtract a per-unit shift
   where a unit's mean dwarfs its spread (float32 products would lose digits), square, and sum the
   squares over all images and over each split's train images (a small GEMM with the train masks).
   float32 blocks that need no shift are used as they are, without a copy.
2. Products as one matrix multiply. With one split, the z-scored neurons (zero outside T) times the
   block; on CPU steps 1 and 2 are fused tile by tile (:meth:`MatchEngine._tiled_products`: a
   tile's train rows are gathered, cast and squared 720 rows at a time in one pass of a numba kernel
   (:mod:`core._kernels`), and each chunk multiplied while in cache, over the train rows only), so
   the block is read once in its own dtype. With several
   splits the work is shared: products over all images minus products over the
   images outside T give every split's train products (docs/SCIENCE.md), so 10 splits cost about 2-3x
   one split instead of 9x. The neuron side is augmented so the same GEMM also yields each unit's
   sum, and the train-mean correction is folded into the subtraction: no separate pass. On CUDA a
   float16 block is not copied to float32 (``MatchSettings.gemm``, "auto"): the neuron rows are split
   into two float16 parts and multiplied with the block as stored by float16 tensor-core GEMMs with
   float32 sums (:meth:`MatchEngine._half_products`; each split's correction likewise,
   :meth:`MatchEngine._half_split_scores`), about as accurate as a float32 GEMM.
3. r for every (neuron, unit) pair of the block is screened in float32 and a running top-k is kept,
   with each layer's leader and the leader's test r (read from the block's test rows).
4. At the end (:meth:`MatchEngine.finalize`), each neuron's candidates within ``tie_margin`` of its
   best are re-scored in float64 from the activations (only those columns are read again): the
   float64 train r decides the best unit and its test r is computed in float64. The chosen unit is
   therefore the float64 argmax unless more than k units sit within float32 error of each other.

Permutation nulls ride along as extra neuron rows of the same products (``n_permutations``).

Which units may be chosen: a unit whose train variance is zero, or which varies on fewer than
``min_varying_images`` train images of a split, is never chosen in that split. "Varies on n
images" counts the train images whose activation differs from the unit's most populated extreme
(its minimum over all images, e.g. a ReLU's zero, or its maximum, e.g. a saturated unit): a unit
non-zero on one train image varies on one. The rule acts on units, before any neuron is looked at,
so observed and permuted neurons face the same candidates. ``min_varying_images=1`` excludes only
constant units, which is Brain-Score's ``SingleRegression`` (``nanargmax``) selection. The counts are
exact; a screen on 128 image pairs (:meth:`MatchEngine._sparse_units`) only spares the units that
certainly vary on enough images from being counted.

Streams of blocks (:func:`stream_match`) can be staged (:func:`staged_blocks`): read and copied
ahead of the compute through a ring of buffers, pinned and copied on a separate CUDA stream on GPUs.
The result is the same.

All matching settings travel as one frozen :class:`MatchSettings`, the one source of their defaults.

Never built: an all-units array, or a neurons x units array beyond one block.

Partial results (:class:`MatchPartial`) are pure functions of their block and merge associatively
and commutatively (ties are broken by the lower global unit id), so any order or grouping of blocks,
e.g. a Dask tree reduction, gives the identical answer.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import numbers
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ._threads import one_thread_here, single_threaded_ops
from .splits import Split, validate_splits
from .units import UnitBlock, UnitCatalogue, check_layer_subset

log = logging.getLogger(__name__)

#: rows of the shift estimate and of each preparation chunk (chunks stay in L2 with 16k units)
_SHIFT_ROWS = 64
_CHUNK_ROWS = 32
#: one split on CPU: blocks wider than this many units are shared out over the threads
#: (:meth:`MatchEngine._in_shares`), at most one share per this many units
_TILE_UNITS = 2048
#: ... with numpy's GEMMs (:meth:`MatchEngine._tiled_products`): units per tile at most, and train rows
#: per cast chunk. Tiles of 4480 units (a 51.6 MB tile of 2880 train rows) made 1M-unit float32 streams
#: 3-4% faster than 2048 in the same process on the 2-core AMD EPYC Zen 4 VM (1536-8960 measured: the
#: wider the faster, 8960 as 4480; benchmarks/RESULTS.md). With more train rows a tile stays within
#: _NUMPY_TILE_BYTES, or _NUMPY_TILE_MIN_UNITS wide (the width before) where that is more.
_NUMPY_TILE_UNITS = 4480
_NUMPY_TILE_BYTES = 2880 * 4480 * 4
_NUMPY_TILE_MIN_UNITS = 2048
_TILE_ROWS = 256
#: ... with torch's GEMMs, which add each chunk's products to the tile's: units per tile and train rows
#: per chunk (5.6 MiB of float32; on the 2-core Intel Xeon with its 2 MiB L2 a core, rows of 8 KB
#: gathered four at a time made whole streams of blocks 1-3% faster than 1024 x 720 in every one of
#: three in-process comparisons, benchmarks/RESULTS.md; before the four-row gather no shape led)
_KCHUNK_UNITS = 2048
_KCHUNK_ROWS = 720
#: several splits on CPU (:meth:`MatchEngine._split_top_k`): units and neuron rows per tile of the fused
#: scores and top k (a tile's products, correction and each split's correction columns stay in a core's
#: L2 cache; 512 x 128 was the fastest of seven shapes on the 2-core Intel Xeon, benchmarks/RESULTS.md)
_SPLIT_TILE_UNITS = 512
_SPLIT_TILE_ROWS = 128
#: ... taken where a split's correction is narrow (at most this many columns: images outside its train
#: set, plus one) and the neuron rows are at least this many times as many: there it saved 10-30% of a
#: block (its GEMMs are OpenBLAS's, slower than MKL's, and each split's correction columns are copied
#: into tiles); with 321 columns (3200 images) or with as few rows as columns, torch's passes were as
#: fast or faster (benchmarks/RESULTS.md). Whole blocks were measured at 65, 129, 161 and 321 columns
#: and the kernel alone also at 193 (0.62 of torch's passes' time with 6464 rows): the bound lies between
#: the last whole-block gain (129 columns, 0.90) and the loss at 321, not measured at 192 itself
_SPLIT_FUSED_MAX_K = 192
_SPLIT_FUSED_ROWS_PER_K = 3
#: ... its tiled correction columns at most this many bytes: a block's units a chunk at a time beyond
_SPLIT_OD_BYTES = 32 << 20
#: None: by that rule; True / False: always (where numba is) / never (bench_match.py times both)
_SPLIT_FUSED: bool | None = None
#: image pairs read by the sparse-unit screen (MatchEngine._sparse_units)
_SCREEN_PAIRS = 128
#: a unit whose train sum of squares about its mean is below this fraction of its raw sum of
#: squares is treated as constant on the train images (float32 cannot resolve its variance)
_CONSTANT_TOL = 1e-5
#: CPU top-k through group maxima (:func:`_top_k_columns`): columns per group, and the fewest scores
_TOPK_GROUP = 64
_GROUPED_TOPK_MIN = 1 << 20
#: CUDA, float16 blocks (MatchSettings.gemm "auto"): float32 columns cast at a time for the block's
#: statistics (small enough to stay in an H100's or H200's 50 MB L2 cache between the cast, the
#: squares and their two mask GEMMs: expected, not measured), and the buffer of the second (lo)
#: float16 GEMM's products
_HALF_STATS_BYTES = 32 << 20
_HALF_LO_BYTES = 256 << 20
#: guards the creation of an engine's share-thread pool (and of the staging copy streams)
_POOL_LOCK = threading.Lock()
#: whether the TF32 warning was given (:func:`_warn_forced_tf32`)
_tf32_warned = False


# -------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class MatchSettings:
    """Everything that decides how neurons are matched to units: one object from config to engine.

    Attributes:
        top_k: candidates kept per (split, neuron), >= 2 (so the best-vs-second gap is defined);
            also the strict one-to-one assignment's starting pool.
        n_permutations: permuted copies of every neuron that ride along in the same pass for the
            selection-aware null (0: no null, no p-values).
        seed: seeds the permutations (and, in :func:`core.analyze`, the random decoding populations).
        block_units: units per streamed block; None sizes blocks to about 256 MiB of float32 (in
            ``run_matching`` over a store's layers, a multiple of its unit chunk: at least one chunk).
        device: torch device of the products ("cpu", "cuda", "cuda:1"...); None: cuda when available.
        tie_margin: final candidates within this train r of a neuron's best are re-scored in float64.
        min_varying_images: a unit that varies on fewer than this many train images of a split is
            never chosen in that split (see the module docstring). 1 excludes only constant units
            (Brain-Score's selection). The default, 10, was chosen on the real V4 session with
            random-weight resnet18 units (benchmarks/RESULTS.md, "Sparse units"): a unit that varies
            on k train images varies on about k / 9 images of a 10% test set, so below about 9 its
            held-out r is more often undefined than not (NaN held-out r: 8.2% of matches and 38%
            of the null at 1, 0.8% and 8.8% at 10); the null's false-positive rate stays nominal
            at every value, and 10 is the largest value tried that left unitmatch's per-neuron
            scores unchanged (20 lowered them).
        gemm: how the products of float16 blocks are computed on a CUDA device. "auto": float16
            tensor-core GEMMs with float32 accumulation, the neuron side split into two float16
            parts (about float32's accuracy; the blocks are used as stored, without a float32 copy),
            where torch has them (``torch.mm(..., out_dtype=torch.float32)``); "float32": a float32
            copy of the block and float32 GEMMs. Other dtypes and devices always use float32. The
            screen differs by rounding only; the float64 re-scoring decides either way.

    Raises:
        ValueError: a field outside its valid range (naming the field, the value and the range).
    """

    top_k: int = 5
    n_permutations: int = 0
    seed: int = 0
    block_units: int | None = None
    device: str | None = None
    tie_margin: float = 1e-4
    min_varying_images: int = 10
    gemm: str = "auto"

    #: the values of ``gemm``
    GEMMS = ("auto", "float32")

    def __post_init__(self):
        def integer(name, minimum, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                valid = f"an integer >= {minimum}" + (" or None" if optional else "")
                raise ValueError(f"MatchSettings.{name} must be {valid}; got {value!r}")
            object.__setattr__(self, name, int(value))

        integer("top_k", 2)
        integer("n_permutations", 0)
        integer("seed", 0)
        integer("block_units", 1, optional=True)
        integer("min_varying_images", 1)
        margin = self.tie_margin
        if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not (0 <= margin < math.inf):
            raise ValueError(f"MatchSettings.tie_margin must be a finite number >= 0; got {margin!r}")
        object.__setattr__(self, "tie_margin", float(margin))
        object.__setattr__(self, "gemm", getattr(self.gemm, "value", self.gemm))  # a config's str enum: its value
        if self.gemm not in self.GEMMS:
            raise ValueError(f"MatchSettings.gemm must be one of {list(self.GEMMS)}; got {self.gemm!r}")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"MatchSettings.device must be None or a torch device such as 'cpu', 'cuda' "
                                 f"or 'cuda:0'; got {self.device!r} ({err})") from None
            object.__setattr__(self, "device", str(device))

    @classmethod
    def resolve(cls, settings: "MatchSettings | None" = None, **overrides) -> "MatchSettings":
        """``settings`` (default: the defaults) with some fields replaced, for keyword-style callers.

        Raises:
            TypeError: an override that is not a field (the fields are listed).
            ValueError: a bad value (see the class).
        """
        if settings is not None and not isinstance(settings, cls):
            raise TypeError(f"settings must be a MatchSettings; got {type(settings).__name__}")
        unknown = sorted(set(overrides) - cls.field_names())
        if unknown:
            raise TypeError(f"unknown matching settings {unknown}; the fields are {sorted(cls.field_names())}")
        base = settings if settings is not None else cls()
        return replace(base, **overrides) if overrides else base

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    #: fields that change a result (block size, device and GEMM do not: partials merge exactly, and the
    #: float64 re-scoring decides)
    RESULT_FIELDS = ("top_k", "n_permutations", "seed", "tie_margin", "min_varying_images")

    def differences(self, other: "MatchSettings", names: Iterable[str] = RESULT_FIELDS) -> dict:
        """``{field: (self's value, other's value)}`` for the named fields that differ."""
        return {n: (getattr(self, n), getattr(other, n)) for n in names if getattr(self, n) != getattr(other, n)}


# --------------------------------------------------------------------------------------- results
@dataclass
class LayerBest:
    """Best unit of one layer per (split, neuron), decided and scored in float64."""

    unit: np.ndarray  # (S, M) int64 global id, -1: none
    train_r: np.ndarray  # (S, M) float64, -inf: none
    test_r: np.ndarray  # (S, M) float64, NaN: undefined


@dataclass
class MatchPartial:
    """Mergeable summary of some blocks.

    Attributes:
        top_r: (S, M, k) float32 screening train r of the running top-k, -inf where empty.
        top_unit: (S, M, k) int64 global unit ids, -1 where empty.
        layers: per layer name, its best unit per (split, neuron).
        n_units: units seen.
    """

    top_r: np.ndarray
    top_unit: np.ndarray
    layers: dict[str, LayerBest] = field(default_factory=dict)
    n_units: int = 0


def _better(r_a, u_a, r_b, u_b):
    """Elementwise: is candidate a strictly better than b (higher r, then lower unit id)?"""
    valid_a = u_a >= 0
    return valid_a & ((u_b < 0) | (r_a > r_b) | ((r_a == r_b) & (u_a < u_b)))


def merge(a: MatchPartial, b: MatchPartial) -> MatchPartial:
    """Merge two partial results (associative, commutative, pure)."""
    if a.top_r.shape != b.top_r.shape:
        raise ValueError(f"cannot merge partials of shapes {a.top_r.shape} and {b.top_r.shape}")
    k = a.top_r.shape[-1]
    r = np.concatenate([a.top_r, b.top_r], axis=-1)
    u = np.concatenate([a.top_unit, b.top_unit], axis=-1)
    # sort by r descending, then unit ascending; empty slots (-inf, -1) sort last
    order = np.lexsort((np.where(u < 0, np.iinfo(np.int64).max, u), -r), axis=-1)[..., :k]
    layers = dict(a.layers)
    for name, lb in b.layers.items():
        if name not in layers:
            layers[name] = lb
            continue
        la = layers[name]
        take_b = _better(lb.train_r, lb.unit, la.train_r, la.unit)
        layers[name] = LayerBest(
            np.where(take_b, lb.unit, la.unit),
            np.where(take_b, lb.train_r, la.train_r),
            np.where(take_b, lb.test_r, la.test_r),
        )
    return MatchPartial(
        np.take_along_axis(r, order, -1), np.take_along_axis(u, order, -1), layers, a.n_units + b.n_units
    )


def merge_all(partials: Iterable[MatchPartial]) -> MatchPartial:
    """Pairwise tree merge of any number of partials."""
    items = list(partials)
    if not items:
        raise ValueError("nothing to merge: no blocks were processed")
    while len(items) > 1:
        items = [merge(items[i], items[i + 1]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


@dataclass
class NullDistribution:
    """The whole selection redone on permuted neurons: arrays of shape (permutations, splits, neurons).

    Attributes:
        unit: the unit selected for each permuted copy.
        train_r: its train r: the maximum over all units, what selection alone achieves on noise.
        test_r: its held-out r: the null of the correspondence score.
    """

    unit: np.ndarray
    train_r: np.ndarray
    test_r: np.ndarray


@dataclass
class MatchResult:
    """Final tables.

    Attributes:
        matches: one row per (neuron, split): neuron, split, unit, layer, unit coordinates, train_r,
            test_r, second_r, gap, topk_unit, topk_r, n_train, n_test.
        layer_matches: one row per (neuron, split, layer): that layer's best unit, train_r, test_r.
        null: the selection redone on permuted copies of every neuron (when asked for).
        settings: the settings that produced it.
    """

    matches: pd.DataFrame
    layer_matches: pd.DataFrame
    null: NullDistribution | None = None
    settings: MatchSettings | None = None


# ---------------------------------------------------------------------------------------- engine
class _SplitPlan:
    """Per-split constants: indices and the neuron-side matrices of the GEMMs.

    The neuron rows' train statistics come from their sums over all images (``sums``: the
    z-scored rows' sums and sums of squares, computed once for every split) minus those over the
    images outside T, which are few. With a permutation null's thousands of rows, gathering each
    split's train columns took seconds per split: MatchEngine's construction for 256 neurons x 101
    rows x 2560 images and 10 splits took 36.5-43.8 s, 2.2 s of it per split; 6.6-6.7 s now
    (benchmarks/RESULTS.md, bench_engine_setup.py).
    """

    def __init__(self, yz: np.ndarray, train: np.ndarray, test: np.ndarray, shared: bool, device: torch.device,
                 sums: tuple[np.ndarray, np.ndarray], outside: np.ndarray, y_out: np.ndarray, y_test: np.ndarray):
        """``outside``: the images outside T; ``y_out``, ``y_test``: yz's columns of those and of the test images."""
        n_images = yz.shape[1]
        self.train, self.test = train, test
        self.n_train = len(train)
        self.outside = torch.as_tensor(outside, dtype=torch.int64, device=device)
        self.train_t = torch.as_tensor(train, dtype=torch.int64, device=device)
        self.test_t = torch.as_tensor(test, device=device)
        train_sum, train_squares = _train_sums(sums, y_out)
        mz = train_sum / self.n_train  # train mean of the z-scored responses
        ss = train_squares - self.n_train * mz * mz
        #: divides the screening score into r (the train sum of squares about the mean, as a norm)
        self.y_scale = np.sqrt(np.maximum(ss, 0.0))
        if shared:
            # rows: neurons; columns: images outside T, then the unit-sum column.
            # products_all - a^T [x_outside; sum_all x] = train cross-products about the train mean
            # (built as a^T, row by neuron row: no transposed copies of the permutation null's rows)
            a_t = torch.empty((yz.shape[0], len(outside) + 1), dtype=torch.float32)
            a_t[:, :-1] = torch.from_numpy(y_out - mz[:, None])
            a_t[:, -1] = torch.from_numpy(mz)
            self.a_t = a_t.to(device)
        else:
            # the train rows: centred neurons, then a row of ones for the unit sums (left out where
            # the fused kernel sums the units' train values itself)
            d = np.ones((yz.shape[0] + 1, len(train)))
            d[:-1] = yz[:, train] - mz[:, None]
            #: over the train rows alone (the tiled CPU path gathers them while casting)
            self.d_train = torch.as_tensor(d, dtype=torch.float32, device=device)
            self._n_images = n_images
        yt = y_test - y_test.mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            yt = yt / np.sqrt((yt * yt).sum(axis=1, keepdims=True))  # NaN where constant on test
        self.yn_test = yt  # (M, |H|) float64

    @functools.cached_property
    def yn_test_t(self) -> torch.Tensor:
        """``yn_test`` on the engine's device (on the CPU the same memory; not pickled): the block
        leaders' test r are computed there."""
        return torch.as_tensor(self.yn_test, device=self.test_t.device)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("yn_test_t", None)  # a copy of yn_test, rebuilt where used
        a_t = state.get("a_t")
        if a_t is not None and a_t.untyped_storage().nbytes() > a_t.numel() * a_t.element_size():
            state["a_t"] = a_t.clone()  # a view of the engine's stacked rows: pickled alone, not with every split's
        return state

    @functools.cached_property
    def d_t(self) -> torch.Tensor:
        """``d_train`` over all images, zero outside T: one GEMM over the block as it is (no row gather).

        Built on first use (the untiled path: GPUs), so the tiled CPU path never holds both.
        """
        d_t = torch.zeros((self.d_train.shape[0], self._n_images), dtype=torch.float32, device=self.d_train.device)
        d_t[:, self.train_t] = self.d_train
        return d_t


def default_device(device=None) -> torch.device:
    """``device`` as a torch device; None: cuda when torch sees a GPU, else cpu (matching, decoding and
    extraction all resolve an unset device by this rule)."""
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


class MatchEngine:
    """Streams blocks of units against a fixed set of neurons and splits.

    Args:
        responses: (neurons, images) mean responses; finite.
        splits: (train_idx, test_idx) pairs of image positions.
        settings: the matching settings (:class:`MatchSettings`); keyword overrides of its fields
            (``top_k=3``) are applied on top. The permuted copies (``n_permutations``) ride along
            as extra neuron rows of the same products (one independent permutation of image order
            per neuron and copy, the same for its train and test images), for a null distribution
            that includes the selection over all units: they cost compute, never another read of
            the activations.

    Use :meth:`process` on each block, :func:`merge` / :func:`merge_all` on the partials (or
    :meth:`process_blocks` on a stream of blocks in one process), then :meth:`finalize`.
    """

    def __init__(self, responses: np.ndarray, splits: Sequence[Split], settings: MatchSettings | None = None,
                 **overrides):
        settings = MatchSettings.resolve(settings, **overrides)
        self.settings = settings
        y = np.asarray(responses)
        if y.ndim != 2:
            raise ValueError(f"responses must be neurons x images (mean over repeats); got shape {y.shape}")
        y = y.astype(np.float64)
        bad = ~np.isfinite(y).all(axis=1)
        if bad.any():
            raise ValueError(
                f"responses of neurons {np.flatnonzero(bad)[:10].tolist()} contain NaN/inf; the engine needs a "
                f"response to every image (drop those neurons, or the images they lack)"
            )
        self.n_neurons, self.n_images = y.shape
        self.n_permutations = settings.n_permutations
        self.splits = validate_splits(splits, self.n_images)
        self.min_varying_images = settings.min_varying_images
        for s, (train, _) in enumerate(self.splits):
            if len(train) < self.min_varying_images:
                raise ValueError(
                    f"split {s} has {len(train)} train images, fewer than min_varying_images="
                    f"{self.min_varying_images}: no unit could be chosen; lower min_varying_images"
                )
        y = stack_permutations(y, self.n_permutations, settings.seed)
        #: neuron rows of the products: the neurons, then each permutation's copy of them
        self.n_rows = y.shape[0]
        with np.errstate(over="ignore"):
            totals = _row_sums(y)
        outsides = [np.setdiff1d(np.arange(self.n_images), train) for train, _ in self.splits]
        S = len(self.splits)
        cols = _columns(y, outsides + [test for _, test in self.splits])  # each split's outside, then test images
        for s, (train, _) in enumerate(self.splits):
            flat = _constant_rows(y, train, totals, cols[s])
            if flat.size:
                neurons = sorted({int(r % self.n_neurons) for r in flat})
                raise ValueError(
                    f"neurons {neurons[:10]} have the same response to every train image of split {s}"
                    f"{' (in a permuted copy)' if flat.min() >= self.n_neurons else ''}: their correlation with "
                    f"any unit is undefined"
                )
        self.top_k = settings.top_k
        self.tie_margin = settings.tie_margin
        device = settings.device
        self.device = default_device(device)
        if self.device.type == "cuda":
            _warn_forced_tf32()
        self.shared = len(self.splits) > 1
        # z-scored over all images, in place (y is this engine's own copy; fresh pages of a permutation
        # null's rows cost seconds on a VM)
        mean = y.mean(axis=1, keepdims=True)
        yz = y
        yz -= mean
        sd = np.sqrt(np.einsum("ij,ij->i", yz, yz) / self.n_images)[:, None]
        yz /= sd
        for c in cols:  # the same columns of yz (the same operations, value by value)
            c -= mean
            c /= sd
        self._yz = yz  # float64 (rows x images), for the final re-scoring
        sums = _row_sums(yz)
        self._plans = [_SplitPlan(yz, tr, te, self.shared, self.device, sums, outsides[s], cols[s], cols[S + s])
                       for s, (tr, te) in enumerate(self.splits)]
        masks = np.zeros((1 + self.n_splits, self.n_images), np.float32)
        masks[0] = 1.0
        for s, (train, _) in enumerate(self.splits):
            masks[1 + s, train] = 1.0
        self._row_masks = torch.as_tensor(masks, device=self.device)
        #: one split on CPU: products over the train rows, tile by tile (else over the whole block)
        self._tiled = self.device.type == "cpu" and not self.shared
        #: CPU: statistics row chunk by row chunk while it is in cache (else over the whole block at once)
        self._chunked = self.device.type == "cpu"
        #: CUDA: the whole-block GEMM over the neuron rows alone and the unit sums by a product with
        #: the row masks (one more read of the block). 256 neurons + a unit-sum row is one row past a
        #: multiple of GPU GEMM kernels' tiles (64-256 rows), so a whole tile row of padding: up to
        #: 1.5x the GEMM's work for 256 neurons (expected, not yet measured: ``bench_match.py
        #: --device cuda`` times both shapes). CPU BLAS kernels work in slices of a few rows: on CPU
        #: the sums stay a row of the GEMM.
        self._sums_apart = self.device.type == "cuda"
        #: CUDA, float16 blocks (``settings.gemm == "auto"``): the products and the splits' corrections from
        #: float16 tensor-core GEMMs (:meth:`_half_products`, :meth:`_half_split_scores`), the block's
        #: statistics from float32 copies of a few columns at a time
        self._half = settings.gemm == "auto" and self.device.type == "cuda" and _half_gemm_available(str(self.device))
        #: their float16 parts, built on first use (not pickled): the neuron rows' (2, rows, images), and
        #: per split the outside columns of a^T as [hi | lo] (rows, 2 x outside images)
        self._half_rows: torch.Tensor | None = None
        self._half_a: dict[int, torch.Tensor] = {}
        #: the float64 neuron rows on a GPU for the re-scoring (:meth:`_yz_device`; not pickled)
        self._yz_t: torch.Tensor | None = None
        # the sparse-unit screen (_sparse_units): image pairs (0, 1), (2, 3)... and, per split, which
        # pairs are two train images and how many of them a sparse unit holds equal at least
        n_pairs = min(_SCREEN_PAIRS, self.n_images // 2)
        first = np.arange(0, 2 * n_pairs, 2)
        pair_masks = np.stack([np.isin(first, tr) & np.isin(first + 1, tr) for tr, _ in self.splits])
        self._n_pairs = n_pairs
        needed = pair_masks.sum(axis=1) - (self.min_varying_images - 1)
        self._pair_test = (pair_masks, needed.astype(np.int64))  # for the fused screen (core._kernels)
        self._pair_masks = torch.as_tensor(pair_masks, dtype=torch.float32, device=self.device)
        self._pairs_needed = torch.as_tensor(needed[:, None], dtype=torch.float32, device=self.device)
        if self.shared:  # the z-scored rows, then a row of ones for the unit sums
            full = torch.ones((self.n_rows + 1, self.n_images), dtype=torch.float32)
            full[:-1] = torch.from_numpy(yz)
            self._full_t = full.to(self.device)
        self._local = threading.local()  # per-thread scratch buffers (Dask may run blocks in threads)
        self._pool: ThreadPoolExecutor | None = None  # share threads (CPU), started on first use
        #: several splits on CPU: the plans' a^T stacked (:meth:`_stacked_a`), built on first use (not pickled)
        self._split_a: torch.Tensor | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_local")
        state.pop("_pool")
        # copies of other state, rebuilt where used
        state["_half_rows"], state["_half_a"], state["_yz_t"], state["_split_a"] = None, {}, None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_split_a", None)
        self._local = threading.local()
        self._pool = None

    @property
    def n_splits(self) -> int:
        return len(self.splits)

    def empty(self) -> MatchPartial:
        shape = (self.n_splits, self.n_rows, self.top_k)
        return MatchPartial(np.full(shape, -np.inf, np.float32), np.full(shape, -1, np.int64))

    # ---------------------------------------------------------------- scratch memory
    def _buffer(self, name: str, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
        """A reusable buffer of at least this size (per thread), viewed to ``shape``."""
        pool = self._local.__dict__.setdefault("pool", {})
        n = math.prod(shape)
        buf = pool.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(n, dtype=dtype, device=self.device)
            pool[name] = buf
        return buf[:n].view(shape)

    def scratch_bytes(self, n_units: int) -> int:
        """About the most memory one thread's scratch takes on the engine's device for a block of
        ``n_units`` on the untiled path (GPUs): the products of every neuron row and the unit-sum
        row; with several splits also a split's scores and its outside rows; and per image a float32
        copy of the block with its squares (or the sparse screen's, or the float16 path's column
        buffers, which are smaller), 9 bytes an image and unit. Kept between blocks, per thread
        (:meth:`_buffer`), until :meth:`release_scratch`."""
        rows = 4 * (self.n_rows + 1)
        if self.shared:
            rows += 4 * self.n_rows + 4 * (max(len(plan.outside) for plan in self._plans) + 1)
        return (rows + 9 * self.n_images) * int(n_units)

    def resident_bytes(self) -> int:
        """About the most memory the engine itself keeps on a GPU, beside each thread's scratch
        (:meth:`scratch_bytes`), in a process that matches blocks (not :meth:`finalize`'s float64
        rows): the neuron rows (with several splits, float32 and a row of ones), their float16 halves
        (the tensor-core path), and per split the float64 test rows, the float32 corrections over the
        images outside its train set and their float16 halves, or with one split the train rows
        twice (float32). 2.0 GB for 256 neurons with the default 100 permutations, 3200 images and 10
        splits. Counted whether or not this engine is on a GPU, for sizing the block tasks of one."""
        rows, images = self.n_rows + 1, self.n_images
        total = 4 * rows * images  # the float16 halves of the neuron rows
        total += 4 * (1 + self.n_splits) * images + 4 * self.n_splits * (self._n_pairs + 1)  # the masks
        for plan in self._plans:
            total += 8 * self.n_rows * len(plan.test) + 8 * (len(plan.outside) + plan.n_train + len(plan.test))
            if self.shared:
                total += 4 * self.n_rows * (len(plan.outside) + 1) + 4 * self.n_rows * len(plan.outside)
            else:
                total += 4 * rows * (plan.n_train + images)
        if self.shared:
            total += 4 * rows * images
        return int(total)

    def release_scratch(self) -> None:
        """Drop every thread's scratch buffers (the next block allocates its own again): after a
        reduction whose threads each held a block's working set on a GPU."""
        self._local = threading.local()

    # ---------------------------------------------------------------- one block
    def process(self, block: UnitBlock) -> MatchPartial:
        """Score one block of units against every neuron and split.

        One split on CPU, a block wider than ``_TILE_UNITS`` and torch on several threads: the block's units
        are shared out over Python threads (:meth:`_in_shares`); elsewhere the block is scored whole.
        """
        xb = self._block_tensor(block)
        if self._tiled and xb.shape[1] > _TILE_UNITS and torch.get_num_threads() >= 2:
            return self._in_shares([(xb, block)])
        return self._process(xb, block, torch_gemm=True)

    def process_blocks(self, blocks: Iterable[UnitBlock], overlap: bool = True) -> MatchPartial:
        """Every block scored, the partials merged: what :func:`merge` of :meth:`process` over the
        blocks gives (the same result), for a stream in one process.

        One split on CPU (the shares of :meth:`_in_shares`): the blocks' shares flow through the
        share threads back to back, and the single-threaded section opens once for the stream.
        Block by block, each block's end left a core idle while the other finished its share (2.5 ms
        of a 116 ms float32 block, median, on the 2-core Intel Xeon of benchmarks/RESULTS.md), and
        the section's opening and the shares' start took 2.1 ms more. Two blocks are held at most
        (block by block: one). Elsewhere (several splits, CUDA, one torch thread) the blocks go
        through :meth:`process` one at a time.

        Args:
            blocks: the blocks, in any order.
            overlap: queue the next block while the current one runs, as above. A block's data must
                then stay valid until the block after the next is asked for (arrays and their views,
                :func:`core.units.iter_blocks`' blocks), and the source is read inside the
                single-threaded section (torch's ops and the BLAS on one thread, in the source too).
                False: block by block, for a source whose block is valid only until the next is
                asked for (:func:`staged_blocks`' ring) or which computes with torch on the CPU.
        """
        if not overlap or not self._tiled or torch.get_num_threads() < 2:
            total = self.empty()
            for block in blocks:
                total = merge(total, self.process(block))
            return total
        return self._in_shares((self._block_tensor(block), block) for block in blocks)

    def _in_shares(self, tensors: Iterable[tuple[torch.Tensor, UnitBlock]]) -> MatchPartial:
        """One split on CPU: each block's units shared out over Python threads, each share scored
        as a block of its own (tiles, sparse screen, top-k, leader), the partials merged; ``tensors``:
        ``(xb, block)`` pairs (:meth:`_block_tensor`), taken one at a time inside the section.

        Every op is single-threaded (:func:`core._threads.single_threaded_ops`): independent shares
        on separate threads have no barrier to wait at, and all the work around the GEMMs (the
        gathers, casts and squares, the screen, the top-k) runs on every core. A block's shares are
        queued as soon as it is read; the next block is read once the block before this one has
        ended, so two blocks are held at most: the one whose shares run and the one being read.
        Each share's GEMMs are torch's (a chunk of rows at a time, added up) or numpy's (a tile of
        all train rows at once), whichever multiplied a tile the faster here timed as the shares run
        (:func:`_torch_gemm`, :func:`_numpy_gemm_faster`). Measured (benchmarks/RESULTS.md): on a
        2-core Intel Xeon (AVX-512) the shares with torch's chunked GEMMs and the fused kernel took
        106-119 ms a float16 block of 18,432 units, where the whole block with torch's 2-thread ops
        and GEMMs (the design before) took 128-133 ms and with the kernel on one thread 141-143 ms;
        on a 2-core AMD EPYC (AVX2) OpenBLAS was 1.46x as fast as MKL per thread, and the shares
        with numpy's GEMMs were the faster design.
        """
        total = self.empty()
        queued = collections.deque()  # a list of its shares' futures a block, in block order

        def merge_oldest() -> None:  # the oldest queued block, merged as it ends
            nonlocal total
            for future in queued[0]:
                total = merge(total, future.result())
            queued.popleft()  # (kept until then: a failure's finally waits for its shares)

        with single_threaded_ops() as threads:
            pool = self._share_pool(threads)
            try:
                for xb, block in tensors:
                    # probed for the pool's threads, which a stream's shares keep busy (not per
                    # block: a narrow last block's fewer shares run beside the block before it)
                    gemm = _torch_gemm(xb.shape[1], threads)
                    queued.append([pool.submit(self._process, share.data, share, torch_gemm=gemm)
                                   for share in self._shares(xb, block, threads)])
                    while len(queued) > 1:  # the block before this one
                        merge_oldest()
                while queued:
                    merge_oldest()
            finally:  # on a failure (a share's, the source's): nothing new starts, every share ends
                futures = [future for shares in queued for future in shares]
                for future in futures:
                    future.cancel()
                wait(futures)
        return total

    def _block_tensor(self, block: UnitBlock) -> torch.Tensor:
        """The block's values as a tensor on the engine's device, checked."""
        xb = _as_tensor(block.data, self.device)
        if xb.ndim != 2 or xb.shape[0] != self.n_images:
            raise ValueError(
                f"block of layer {block.layer!r} has shape {tuple(xb.shape)}; expected ({self.n_images}, units)"
            )
        if xb.dtype not in (torch.float16, torch.float32, torch.bfloat16, torch.float64):
            raise ValueError(f"block of layer {block.layer!r} has dtype {xb.dtype}; expected a float type")
        return xb

    @staticmethod
    def _shares(xb: torch.Tensor, block: UnitBlock, threads: int) -> list[UnitBlock]:
        """The block's units in equal shares: one a thread, and no more shares than tiles of units."""
        n_units = xb.shape[1]
        n = max(1, min(threads, -(-n_units // _TILE_UNITS)))
        bounds = np.linspace(0, n_units, n + 1).round().astype(int)
        return [UnitBlock(xb[:, a:b], block.layer, block.first_unit + a)
                for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]

    def _process(self, xb: torch.Tensor, block: UnitBlock, torch_gemm: bool) -> MatchPartial:
        """Score the units of ``xb`` (the columns of ``block`` from its ``first_unit`` on);
        ``torch_gemm``: the tiled path's GEMMs with torch (else numpy's)."""
        n_units = xb.shape[1]
        partial = self.empty()
        partial.n_units = n_units
        if n_units == 0:
            return partial
        shift = self._shift(xb)
        half = False  # the float16 GEMMs (CUDA): decided below for the untiled path
        if self._tiled:
            products, sxx, sxx_rest = self._tiled_products(xb, shift, self._plans[0], torch_gemm=torch_gemm)
            _check_finite(sxx[0] + sxx_rest, block)
        else:
            half = self._half and xb.dtype == torch.float16 and shift is None and not _fp16_accumulation()
            if half:  # the block used as stored (exact float16 values), never copied whole
                sx_masks, sxx_all = self._half_statistics(xb)
            else:
                x, sxx_all = self._prepare(xb, shift)
            _check_finite(sxx_all[0], block)
            sxx = sxx_all[1:]
            products = self._buffer("products", (self.n_rows + 1, n_units))
            rows = self._full_t if self.shared else self._plans[0].d_t  # neuron rows, then a unit-sum row
            if half:
                self._half_products(xb, products[:-1])
                # the unit sums: over all images (several splits) or the train images (one)
                products[-1].copy_(sx_masks[0 if self.shared else 1])
            elif self._sums_apart:
                torch.mm(rows[:-1], x, out=products[:-1])
                # the unit-sum row's own sums: over all images (several splits) or the train images (one)
                torch.mv(x.T, self._row_masks[0 if self.shared else 1], out=products[-1])
            else:
                torch.mm(rows, x, out=products)
            if self.shared:
                sx_all = products[-1]  # the products are only read below
        # (splits, units): fewer varying train images than the policy asks for; None: no policy beyond constancy
        sparse = None
        if self.min_varying_images > 1:
            sparse = self._sparse_units(xb)
        S, M = self.n_splits, self.n_rows
        leader = LayerBest(np.full((S, M), -1, np.int64), np.full((S, M), -np.inf), np.full((S, M), np.nan))
        fused_top = None  # several splits on CPU: every split's top k from one fused pass (numba)
        if self.shared and not half and self._split_fused() and _kernels() is not None:
            fused_top = self._split_top_k(x, products, sx_all, sxx, sparse)
        for s, plan in enumerate(self._plans):
            excluded = None if sparse is None else sparse[s]
            if fused_top is not None:
                top_r, top_local = self._as_r(fused_top[0][s], fused_top[1][s], plan)
            elif half and self.shared:
                body = self._half_split_scores(s, xb, products, sx_masks[1 + s], sxx[s], excluded)
            elif self.shared:
                # scaled first, then corrected in place: (products - a^T o) diag(1/sd) =
                # products diag(1/sd) - a^T (o diag(1/sd)): one pass writes the scores, where a copy
                # of the products and a scaling pass did (6% less time a block for the demo's 10
                # splits and 6400 permuted rows; benchmarks/RESULTS.md)
                n_out = len(plan.outside)
                outside = self._buffer("outside", (n_out + 1, n_units))
                torch.index_select(x, 0, plan.outside, out=outside[:n_out])
                outside[n_out].copy_(sx_all)
                inv_sd, never = self._scaling(plan, sx_all - outside[:n_out].sum(dim=0), sxx[s], excluded)
                body = torch.mul(products[:-1], inv_sd, out=self._buffer("scores", (self.n_rows, n_units)))
                body.addmm_(plan.a_t, outside.mul_(inv_sd), alpha=-1.0)
                _never_chosen(body, never)
            else:
                body = self._finish_scores(plan, products, sxx[s], excluded)
            if fused_top is None:
                top_r, top_local = self._top_k(body, plan)
            k = top_r.shape[1]
            found = np.isfinite(top_r)
            partial.top_r[s, :, :k] = top_r
            partial.top_unit[s, :, :k] = np.where(found, top_local + block.first_unit, -1)
            has = found[:, 0]
            leader.unit[s, has] = top_local[has, 0] + block.first_unit
            leader.train_r[s, has] = top_r[has, 0]
            leader.test_r[s] = self._leader_test_r(xb, plan, top_local[:, 0], has)
        partial.layers[block.layer] = leader
        return partial

    @staticmethod
    def _shift(xb: torch.Tensor) -> torch.Tensor | None:
        """Per-unit shift (float32) when some unit's mean dwarfs its spread, else None.

        float32 products lose digits when a unit's mean dwarfs its spread; r is shift-invariant, so
        such blocks are matched as ``x - shift``, with the shift estimated from the first rows (their
        sums and squares in one pass where the fused kernels serve the block, in float64).
        """
        fused = _fused(xb)
        n = min(_SHIFT_ROWS, xb.shape[0])
        if fused is None:
            head = xb[:n].to(torch.float32)
            mean, mean_square = head.mean(dim=0), (head * head).mean(dim=0)
        else:
            kernels, flat, row_stride = fused
            sums, squares = np.empty(xb.shape[1]), np.empty(xb.shape[1])
            kernels.column_moments(flat, row_stride, 0, n, sums, squares)
            mean, mean_square = torch.from_numpy(sums / n), torch.from_numpy(squares / n)
        var = mean_square - mean * mean  # NaN where the head holds inf or NaN: refused later
        return mean.to(torch.float32) if bool((mean * mean > 16 * var).any()) else None

    def _prepare(self, xb: torch.Tensor, shift: torch.Tensor | None):
        """The whole block as float32 (shifted where needed) and its per-unit sums of squares.

        Used with several splits (the shared products need every image) and on GPUs. float32
        blocks that need no shift are used as they are (no copy). On CPU one sweep of row chunks
        casts, shifts and squares while the chunk is in cache.

        Returns:
            x (images, units) and sums of squares (1 + splits, units): over all images, then over
            each split's train images (one small GEMM with the train masks per row chunk).
        """
        n_rows, n_units = xb.shape
        zero_copy = shift is None and xb.dtype == torch.float32 and xb.stride(1) == 1
        x = xb if zero_copy else self._buffer("x", (n_rows, n_units))
        if not self._chunked:
            if not zero_copy:
                x.copy_(xb)
                if shift is not None:
                    x.sub_(shift)
            return x, self._row_masks @ (x * x)
        sums = self._buffer("sxx", (self._row_masks.shape[0], n_units))
        sums.zero_()
        for r0 in range(0, n_rows, _CHUNK_ROWS):
            r1 = min(r0 + _CHUNK_ROWS, n_rows)
            chunk = x[r0:r1]
            if not zero_copy:
                chunk.copy_(xb[r0:r1])
                if shift is not None:
                    chunk.sub_(shift)
            sums.addmm_(self._row_masks[:, r0:r1], torch.mul(chunk, chunk, out=self._buffer("sq", (r1 - r0, n_units))))
        return x, sums

    def _half_statistics(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A float16 block's sums and sums of squares (1 + splits, units) in float32: over all images,
        then over each split's train images (GEMMs with the row masks).

        Columns are cast to float32 ``_HALF_STATS_BYTES`` at a time (a float16 value's square is
        exact in float32), so the block is never copied whole; each split's train sums are its own
        (not all images' less the others': that difference loses a unit that is constant on the
        train images among the rounding of its other images).
        """
        n_rows, n_units = xb.shape
        masks = self._row_masks
        sums = self._buffer("sx", (masks.shape[0], n_units))
        squares = self._buffer("sxx", (masks.shape[0], n_units))
        step = _aligned_columns(_HALF_STATS_BYTES // (4 * n_rows))
        for c0 in range(0, n_units, step):
            c1 = min(c0 + step, n_units)
            cols = self._buffer("columns", (n_rows, c1 - c0))
            cols.copy_(xb[:, c0:c1])
            torch.mm(masks, cols, out=sums[:, c0:c1])
            torch.mm(masks, cols.square_(), out=squares[:, c0:c1])
        return sums, squares

    def _half_products(self, xb: torch.Tensor, out: torch.Tensor) -> None:
        """``out = rows @ xb`` for a float16 block, the neuron rows (the one split's train rows, or the
        shared rows over all images) split into float16 parts (:func:`_split_half`): two
        float16 GEMMs with float32 accumulation, the second a column chunk at a time into a buffer
        of ``_HALF_LO_BYTES``. The block is read as stored (no float32 copy)."""
        if self._half_rows is None:
            rows = self._full_t if self.shared else self._plans[0].d_t
            self._half_rows = _split_half(rows[:-1])
        hi, lo = self._half_rows
        _mm_float32(hi, xb, out)
        n_units = xb.shape[1]
        step = _aligned_columns(_HALF_LO_BYTES // (4 * out.shape[0]))
        for c0 in range(0, n_units, step):
            c1 = min(c0 + step, n_units)
            part = self._buffer("lo_products", (out.shape[0], c1 - c0))
            _mm_float32(lo, xb[:, c0:c1], part)
            out[:, c0:c1].add_(part, alpha=1.0 / _LO_SCALE)

    def _half_split_scores(self, s: int, xb: torch.Tensor, products: torch.Tensor, sx_train: torch.Tensor,
                           sxx_train: torch.Tensor, excluded: torch.Tensor | None) -> torch.Tensor:
        """Split ``s``'s scores from the shared products of a float16 block (several splits, float16 GEMMs).

        The correction by the images outside T, ``a^T [x_outside; sum_all x]``, as one float16 GEMM
        with float32 sums: the outside columns of ``a^T`` split into float16 parts side by side,
        ``[hi | lo]`` (the rows are z-scored, so the unscaled remainder's error is negligible on
        their scale), times the block's outside rows as stored, twice, ``[x_out; x_out]`` (exact);
        the unit-sum column's term is a float32 rank-1 update. Then ``(products - correction)
        diag(1/sd)`` in place.
        """
        plan = self._plans[s]
        n_out, n_units = len(plan.outside), xb.shape[1]
        a_half = self._half_a.get(s)
        if a_half is None:
            a_half = self._half_a[s] = torch.cat(tuple(_split_half(plan.a_t[:, :-1], scale=1.0)), dim=1)
        rows = self._buffer("outside16", (2 * n_out, n_units), torch.float16)
        torch.index_select(xb, 0, plan.outside, out=rows[:n_out])
        rows[n_out:].copy_(rows[:n_out])
        body = self._buffer("scores", (self.n_rows, n_units))
        _mm_float32(a_half, rows, body)
        torch.sub(products[:-1], body, out=body)
        body.addr_(plan.a_t[:, -1], products[-1], alpha=-1.0)  # the train means times the unit sums
        inv_sd, never = self._scaling(plan, sx_train, sxx_train, excluded)
        body.mul_(inv_sd)
        _never_chosen(body, never)
        return body

    def _tiled_products(self, xb: torch.Tensor, shift: torch.Tensor | None, plan: "_SplitPlan", torch_gemm: bool):
        """One split on CPU: the train products of the block, tile by tile, and its sums of squares.

        The block is read once, in its own dtype: a tile's train rows are gathered and cast to
        float32 a chunk of rows at a time, and squared and summed while in cache, in one pass for
        float16 and float32 blocks (:func:`core._kernels.gather_rows`; float64 sums, the unit sums
        too, so that the GEMMs multiply the neuron rows alone) or with torch's ops (the unit sums
        from a GEMM row of ones). With ``torch_gemm`` each chunk is multiplied at once, torch's GEMM adding it to the
        tile's products (beta = 1): the cast rows never leave the core's cache. Otherwise (numpy's
        GEMM, which cannot add into its output) the chunks fill a tile of all train rows and one
        GEMM over it follows (``_SplitPlan.d_train``). The other rows are squared and summed only
        to check that they are finite (by the kernel in one call over all columns, after the tiles).

        Returns:
            products (neuron rows + 1, units): train cross-products and, in the last row, train
            sums; sums of squares over the train rows (1, units) and over the other rows (units,).
        """
        n_units = xb.shape[1]
        products = self._buffer("products", (self.n_rows + 1, n_units))
        sxx = self._buffer("sxx", (2, n_units))  # every column written below, tile by tile
        n_train, n_rest = plan.n_train, len(plan.outside)
        if torch_gemm:
            tile_units, tile_rows = _KCHUNK_UNITS, _KCHUNK_ROWS
        else:  # tiles of about equal width, at most _numpy_tile_units (no narrow last tile: the
            # wider a tile, the faster OpenBLAS's GEMM a unit)
            widest = _numpy_tile_units(n_train)
            tile_units, tile_rows = -(-n_units // max(1, -(-n_units // widest))), _TILE_ROWS
        fused = _fused(xb)
        # the row chunks: (0 for the train rows, 1 for the others; first; end; the rows; their columns
        # of d_train): slices taken once, not per tile (each Python step between the kernel and GEMM
        # calls costs tens of microseconds there, their data having left the core's caches); the
        # fused kernel checks the other rows once, over all the block's columns, after the tiles
        row_sets = (plan.train_t, plan.outside) if fused is None else (plan.train,)
        # the fused kernel sums the train values too: the GEMMs then leave out d_train's row of ones
        # (on an AMD EPYC VM OpenBLAS's 257-row GEMM took 2.8% longer than the 256-row one; float16
        # blocks 5% faster, float32 blocks the same, the kernel's extra sums taking what was saved)
        d_rows = plan.d_train if fused is None else plan.d_train[:-1]
        chunks = [(k, r0, min(r0 + tile_rows, len(rows)), rows[r0:r0 + tile_rows],
                   d_rows[:, r0:r0 + tile_rows] if k == 0 else None)
                  for k, rows in enumerate(row_sets) for r0 in range(0, len(rows), tile_rows)]
        if fused is not None:
            kernels, flat, row_stride = fused
            # float64 sums: squares of the train rows, of the others, and the train sums
            squares = self._buffer("squares64", (3, n_units), torch.float64).zero_()
            squares_np = squares.numpy()
        buffers = {}  # (rows, width): a chunk buffer and its numpy view
        for c0 in range(0, n_units, tile_units):
            c1 = min(c0 + tile_units, n_units)
            width = c1 - c0
            src = xb[:, c0:c1]
            step = shift[c0:c1] if shift is not None else None
            out = products[:, c0:c1] if fused is None else products[:-1, c0:c1]
            tile = None if torch_gemm else self._buffer("tile", (n_train, width))
            if fused is not None:
                step_np = None if step is None else step.numpy()
                sums_np, train_sums_np = squares_np[0, c0:c1], squares_np[2, c0:c1]
            else:
                # squares summed elementwise over the row chunks while in cache, then once over the
                # accumulator's rows (one op per chunk: measured twice as fast as squaring into a buffer
                # and summing it)
                sums = self._buffer("squares", (min(tile_rows, max(n_train, n_rest)), width))
            for k, r0, r1, rows, d_part in chunks:
                if tile is not None and k == 0:
                    chunk = tile[r0:r1]
                    chunk_np = chunk.numpy()
                else:
                    if (r1 - r0, width) not in buffers:
                        view = self._buffer(f"rest{len(buffers)}", (r1 - r0, width))
                        buffers[r1 - r0, width] = view, view.numpy()
                    chunk, chunk_np = buffers[r1 - r0, width]
                if fused is not None:
                    kernels.gather_rows(flat, row_stride, c0, rows, step_np, chunk_np, sums_np, train_sums_np)
                else:
                    self._gather_rows(src, rows, chunk, step)
                    if r0 == 0:
                        torch.mul(chunk, chunk, out=sums[: r1 - r0])
                    else:
                        sums[: r1 - r0].addcmul_(chunk, chunk)
                    if r1 == (n_train, n_rest)[k]:
                        torch.sum(sums[: min(r1, tile_rows)], dim=0, out=sxx[k, c0:c1])
                if tile is None and k == 0:
                    torch.addmm(out, d_part, chunk, beta=0.0 if r0 == 0 else 1.0, out=out)
            if tile is not None:
                np.matmul(d_rows.numpy(), tile.numpy(), out=out.numpy())
        if fused is not None:  # the other rows' squares, each row cast over the last (in cache)
            kernels.gather_rows(flat, row_stride, 0, plan.outside.numpy(), None if shift is None else shift.numpy(),
                                self._buffer("row", (1, n_units)).numpy(), squares_np[1])
            sxx.copy_(squares[:2])
            products[-1].copy_(squares[2])
        return products, sxx[:1], sxx[1]

    def _share_pool(self, n: int) -> ThreadPoolExecutor:
        """The engine's share threads (kept, with their scratch buffers, from block to block; a
        larger pool replaces a smaller one, which finishes the shares it holds)."""
        with _POOL_LOCK:  # Dask may run blocks on one engine from several threads
            if self._pool is None or self._pool_size < n:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="unitmatch-shares",
                                                initializer=one_thread_here)
                self._pool_size = n
            return self._pool

    def _gather_rows(self, src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, shift: torch.Tensor | None):
        """``out = float32(src[rows]) - shift``: rows of a tile, cast into a cache-resident buffer."""
        if src.dtype == torch.float32:
            torch.index_select(src, 0, rows, out=out)
        else:
            out.copy_(_take_rows(src, rows, self._buffer("raw", tuple(out.shape), src.dtype)))
        if shift is not None:
            out.sub_(shift)

    def _sparse_units(self, xb: torch.Tensor) -> torch.Tensor:
        """(splits, units) bool: units that vary on fewer than ``min_varying_images`` train images.

        Counting equality with the extremes for every unit costs as much as the products, so a
        screen that reads a few rows comes first. The first images are paired, (0, 1), (2, 3)...;
        a unit that varies on v train images of a split (differs from its most populated extreme
        E on v of them) breaks at most v of that split's pairs of train images (each image is in
        one pair), so at least ``pairs - v`` of them hold two equal values. A unit with fewer equal
        pairs than ``pairs - (min_varying_images - 1)`` in every split therefore varies on enough
        images; only the others are counted exactly (:meth:`_varying_train_images`, on their
        columns in the block's own dtype).
        """
        fused = _fused(xb)
        if fused is not None:  # one pass over the pairs (core._kernels.screen_pairs)
            kernels, flat, row_stride = fused
            maybe = torch.empty(xb.shape[1], dtype=torch.bool)
            kernels.screen_pairs(flat, row_stride, 0, xb.shape[1], *self._pair_test, maybe.numpy())
        else:
            pairs = xb[: 2 * self._n_pairs]
            equal = (pairs[0::2] == pairs[1::2]).to(torch.float32)  # row views: no copies
            maybe = ((self._pair_masks @ equal) >= self._pairs_needed).any(dim=0)
        sparse = torch.zeros((self.n_splits, xb.shape[1]), dtype=torch.bool, device=self.device)
        check = torch.nonzero(maybe).flatten()
        if check.numel():
            counts = self._varying_train_images(xb.index_select(1, check))[1:]
            sparse[:, check] = counts < self.min_varying_images
        return sparse

    def _varying_train_images(self, xb: torch.Tensor) -> torch.Tensor:
        """Per unit, over all images and then each split's train images: images off its most populated extreme.

        The extremes are the unit's minimum and maximum over all images, compared in the block's own
        dtype (exact); the counts come from small GEMMs of equality indicators with the train masks,
        row chunk by row chunk, as the sums of squares do. (Counting over all images first and
        per split only for the units near the threshold was measured slower: torch's boolean
        column sums cost more than these GEMMs.)

        Returns:
            (1 + splits, units) float32 counts (exact integers).
        """
        low, high = torch.aminmax(xb, dim=0)
        n_rows, n_units = xb.shape
        masks = self._row_masks
        at_low = torch.zeros((masks.shape[0], n_units), dtype=torch.float32, device=self.device)
        at_high = torch.zeros_like(at_low)
        step = _CHUNK_ROWS if self._chunked else n_rows
        for r0 in range(0, n_rows, step):
            r1 = min(r0 + step, n_rows)
            chunk = xb[r0:r1]
            at_low.addmm_(masks[:, r0:r1], (chunk == low).to(torch.float32))
            at_high.addmm_(masks[:, r0:r1], (chunk == high).to(torch.float32))
        totals = masks.sum(dim=1, keepdim=True)
        return totals - torch.maximum(at_low, at_high)

    def _finish_scores(self, plan: _SplitPlan, scores: torch.Tensor, sxx_train: torch.Tensor,
                       excluded: torch.Tensor | None = None):
        """Turn train cross-products (rows :M) and unit sums (row M) into ranking scores in place.

        Units that are constant on the train images, or ``excluded`` (the sparse-unit policy), get
        -inf: never chosen.
        """
        inv_sd, never = self._scaling(plan, scores[-1], sxx_train, excluded)
        body = scores[:-1]
        body.mul_(inv_sd)
        _never_chosen(body, never)
        return body

    @staticmethod
    def _scaling(plan: _SplitPlan, sx: torch.Tensor, sxx_train: torch.Tensor, excluded: torch.Tensor | None):
        """Per unit, from its train sum ``sx`` and sum of squares: 1 / its train norm about the mean
        (float32; 0 where never chosen), and the units never chosen (constant on the train images,
        or ``excluded``)."""
        sx = sx.double()
        ss = sxx_train.double() - sx * sx / plan.n_train  # train sum of squares about the mean
        never = ss <= _CONSTANT_TOL * sxx_train.double().clamp_min(0)
        if excluded is not None:
            never |= excluded
        return torch.where(never, 0.0, ss.clamp_min(1e-300).rsqrt()).to(torch.float32), never

    def _top_k(self, scores, plan: _SplitPlan):
        k = min(self.top_k, scores.shape[1])
        values, local = _top_k_columns(scores, k)
        return self._as_r(values, local, plan)

    @staticmethod
    def _as_r(values: torch.Tensor, local: torch.Tensor, plan: _SplitPlan) -> tuple[np.ndarray, np.ndarray]:
        """Each row's top scores as r (float32; -inf where none), and their columns, on the host."""
        top_r = (values.double().cpu().numpy() / plan.y_scale[:, None]).astype(np.float32)
        return top_r, local.cpu().numpy()

    def _split_top_k(self, x: torch.Tensor, products: torch.Tensor, sx_all: torch.Tensor, sxx: torch.Tensor,
                     sparse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Several splits on CPU: every split's top k of every neuron row, the scores never stored.

        Split ``s``'s scores are ``products diag(1/sd) - a^T (o diag(1/sd))`` (as in the torch path:
        ``o`` the block's rows outside the split's train images and its unit sums), -inf for units
        never chosen. Written out, each split's (rows x units) scores were written by its correction
        GEMM, then read and written by the scaling, read by the top-k's group maxima and again for
        its candidates: memory traffic, not arithmetic, set the time (6464 neuron rows x 9600 units,
        10 splits, 2 cores: the corrections' GEMMs 0.50 s, the scaling and the group maxima alone
        0.37 s). :func:`core._kernels.split_top_k` takes a tile of rows x units at a time: the
        correction of each split by a BLAS GEMM into a scratch tile in cache, then one pass to the
        rows' top k; the products are read from memory once for all splits. The rows are shared out
        over the share threads (each op single-threaded, :func:`core._threads.single_threaded_ops`).

        Returns:
            (splits, rows, k) values (float32; -inf where a row has fewer than k choosable units) and
            their columns in the block (int64; -1 there).
        """
        kernels = _kernels()
        S, M = self.n_splits, self.n_rows
        n_units = x.shape[1]
        k = min(self.top_k, n_units)
        a = self._stacked_a()
        width = a.shape[2]
        # the splits' correction columns, tiled, for a chunk of the block's units at a time (at most
        # _SPLIT_OD_BYTES: with few neuron rows, a wide block's would outgrow its scores)
        per_tile = S * width * _SPLIT_TILE_UNITS * 4
        chunk = max(1, _SPLIT_OD_BYTES // per_tile) * _SPLIT_TILE_UNITS
        scale = self._buffer("split_scale", (S, n_units))
        neg = self._buffer("split_neg", (S, n_units))
        top_v = torch.full((S, M, k), -torch.inf, dtype=torch.float32)
        top_u = torch.full((S, M, k), -1, dtype=torch.int64)
        with single_threaded_ops() as threads:
            n = max(1, min(threads, -(-M // _SPLIT_TILE_ROWS)))
            bounds = np.linspace(0, M, n + 1).round().astype(int).tolist()
            pool = self._share_pool(n)
            for c0 in range(0, n_units, chunk):
                c1 = min(c0 + chunk, n_units)
                tiles = self._buffer("split_od", (S, -(-(c1 - c0) // _SPLIT_TILE_UNITS), width, _SPLIT_TILE_UNITS))
                for s, plan in enumerate(self._plans):
                    # the chunk's units' scale (per unit, from its sums) and o diag(1/sd): the outside
                    # rows, then the unit sums
                    n_out = len(plan.outside)
                    cols = self._buffer("outside", (n_out + 1, c1 - c0))
                    torch.index_select(x[:, c0:c1], 0, plan.outside, out=cols[:n_out])
                    cols[n_out].copy_(sx_all[c0:c1])
                    inv_sd, never = self._scaling(plan, sx_all[c0:c1] - cols[:n_out].sum(dim=0), sxx[s, c0:c1],
                                                  None if sparse is None else sparse[s, c0:c1])
                    scale[s, c0:c1] = inv_sd
                    neg[s, c0:c1].zero_().masked_fill_(never, -torch.inf)
                    _tile_columns(s, cols.mul_(inv_sd), tiles)
                args = (products[:-1].numpy(), a, tiles.numpy(), scale.numpy(), neg.numpy(), c0)
                work = [pool.submit(self._split_top_k_rows, kernels, args, r0, r1, top_v, top_u)
                        for r0, r1 in zip(bounds[:-1], bounds[1:])]
                wait(work)  # every share ends inside the section, even when one of them failed
                for w in work:
                    w.result()
        return top_v, top_u

    def _split_top_k_rows(self, kernels, args: tuple, r0: int, r1: int, top_v: torch.Tensor, top_u: torch.Tensor):
        """One share of the rows of :meth:`_split_top_k`, on a share thread (with its own scratch tile)."""
        corr = self._buffer("split_corr", (_SPLIT_TILE_ROWS, _SPLIT_TILE_UNITS)).numpy()
        kernels.split_top_k(*args, r0, r1, _SPLIT_TILE_ROWS, corr, top_v.numpy(), top_u.numpy())

    def _split_fused(self) -> bool:
        """Several splits on CPU: the fused scores and top k (:meth:`_split_top_k`) rather than torch's passes?"""
        if self.device.type != "cpu" or _SPLIT_FUSED is False:
            return False
        k = max(len(plan.outside) for plan in self._plans) + 1
        return _SPLIT_FUSED is True or (k <= _SPLIT_FUSED_MAX_K and self.n_rows >= _SPLIT_FUSED_ROWS_PER_K * k)

    def _stacked_a(self) -> np.ndarray:
        """The splits' correction rows ``a^T`` as one (splits, rows, K) float32 array (zeros past a split's
        own K): built on first use, the plans' ``a_t`` then views of it (no second copy of a permutation
        null's rows; each plan pickles its own, :meth:`_SplitPlan.__getstate__`)."""
        with _POOL_LOCK:
            if self._split_a is None:
                widths = [plan.a_t.shape[1] for plan in self._plans]
                stacked = torch.zeros((self.n_splits, self.n_rows, max(widths)), dtype=torch.float32)
                for s, (plan, width) in enumerate(zip(self._plans, widths)):
                    stacked[s, :, :width] = plan.a_t
                    plan.a_t = stacked[s, :, :width]
                self._split_a = stacked
            return self._split_a.numpy()

    def _leader_test_r(self, xb: torch.Tensor, plan: _SplitPlan, leaders: np.ndarray, has: np.ndarray) -> np.ndarray:
        """float64 test r of each neuron row's block leader, from the block's test rows (a few values, as
        stored), on the engine's device: only the r come back (with a permutation null's thousands of
        rows the products are a host's milliseconds per split and block). On the CPU, one fused pass
        (:func:`core._kernels.column_r`) where torch gathered, cast and reduced in several."""
        fused = _fused(xb)
        if fused is not None:
            kernels, flat, row_stride = fused
            r = np.empty(len(leaders))
            kernels.column_r(flat, row_stride, plan.test, np.where(has, leaders, -1).astype(np.int64),
                             plan.yn_test, r)
            return r
        cols = torch.as_tensor(leaders, device=self.device)
        xt = xb[plan.test_t[:, None], cols[None, :]].double()  # (|H|, rows)
        xt -= xt.mean(dim=0)
        r = (xt * plan.yn_test_t.T).sum(dim=0)
        r /= xt.square_().sum(dim=0).sqrt_()  # NaN where the leader is constant on the test images
        return np.where(has, r.cpu().numpy(), np.nan)

    # ---------------------------------------------------------------- final tables
    def finalize(self, partial: MatchPartial, catalogue: UnitCatalogue, neuron_ids: Sequence[str] | None = None,
                 columns: Callable[[np.ndarray], np.ndarray] | None = None) -> MatchResult:
        """Assemble the per-(neuron, split) and per-(neuron, split, layer) tables.

        Args:
            partial: the merge of all blocks.
            catalogue: the layers the unit ids refer to.
            neuron_ids: names for the neuron column.
            columns: ``columns(units) -> (images, len(units))`` activations of those global unit ids.
                When given (``run_matching`` always gives it), every (neuron, split)'s candidates
                within ``tie_margin`` of its best are re-scored in float64: the best unit is the
                float64 argmax and train_r / test_r are float64. Without it they are the float32
                screening values (about 1e-6 from float64).
        """
        ids = np.asarray([f"n{i:03d}" for i in range(self.n_neurons)] if neuron_ids is None else neuron_ids)
        if ids.shape != (self.n_neurons,):
            raise ValueError(f"{len(ids)} neuron ids for {self.n_neurons} neurons")
        S, M = self.n_splits, self.n_neurons
        names = [layer.name for layer in catalogue.layers if layer.name in partial.layers]
        if not names or (partial.top_unit[..., 0] < 0).all():
            raise ValueError("no candidate unit was found (no blocks processed, or every unit is constant)")
        b_unit = partial.top_unit[..., 0].copy()
        b_train = partial.top_r[..., 0].astype(np.float64)
        b_test = self._layer_test_r(partial, catalogue, b_unit)
        rescored = columns is not None
        if rescored:
            b_unit, b_train, b_test = self._rescore(partial, columns)
        null = None
        if self.n_permutations:
            P = self.n_permutations
            shape = (S, P, M)  # rows M + p * M + j -> (split, permutation, neuron)
            null = NullDistribution(
                unit=b_unit[:, M:].reshape(shape).transpose(1, 0, 2),
                train_r=b_train[:, M:].reshape(shape).transpose(1, 0, 2),
                test_r=b_test[:, M:].reshape(shape).transpose(1, 0, 2),
            )
            partial = MatchPartial(partial.top_r[:, :M], partial.top_unit[:, :M], {
                name: LayerBest(lb.unit[:, :M], lb.train_r[:, :M], lb.test_r[:, :M])
                for name, lb in partial.layers.items()
            }, partial.n_units)
            b_unit, b_train, b_test = b_unit[:, :M], b_train[:, :M], b_test[:, :M]
        second = np.where(partial.top_unit[..., 0] == b_unit, partial.top_r[..., 1], partial.top_r[..., 0])
        second = np.where(np.isfinite(second), second, np.nan).astype(np.float64)
        split_col = np.repeat(np.arange(S), M)
        matches = pd.concat([
            pd.DataFrame({"neuron": np.tile(ids, S), "split": split_col}),
            catalogue.describe(b_unit.ravel()),
        ], axis=1)
        matches["train_r"] = np.where(b_unit >= 0, b_train, np.nan).ravel()
        matches["test_r"] = b_test.ravel()
        matches["second_r"] = second.ravel()
        matches["gap"] = matches["train_r"] - matches["second_r"]
        matches["topk_unit"] = list(partial.top_unit.reshape(S * M, -1))
        matches["topk_r"] = list(partial.top_r.reshape(S * M, -1).astype(np.float64))
        matches["n_train"] = np.repeat([len(tr) for tr, _ in self.splits], M)
        matches["n_test"] = np.repeat([len(te) for _, te in self.splits], M)
        matches["float64"] = rescored
        stack = [partial.layers[n] for n in names]
        layer_rows = pd.DataFrame({
            "neuron": np.tile(np.tile(ids, S), len(names)),
            "split": np.tile(split_col, len(names)),
            "layer": np.repeat(names, S * M),
            "unit": np.concatenate([lb.unit.ravel() for lb in stack]),
            "train_r": np.concatenate([lb.train_r.ravel() for lb in stack]),
            "test_r": np.concatenate([lb.test_r.ravel() for lb in stack]),
        })
        layer_rows.loc[layer_rows["unit"] < 0, "train_r"] = np.nan
        return MatchResult(matches, layer_rows, null, self.settings)

    @staticmethod
    def _layer_test_r(partial: MatchPartial, catalogue: UnitCatalogue, units: np.ndarray) -> np.ndarray:
        """Test r of each best unit, read from its layer's leader record (they are the same unit)."""
        out = np.full(units.shape, np.nan)
        layer_of = catalogue.describe(units.ravel())["layer"].to_numpy().reshape(units.shape)
        for name, lb in partial.layers.items():
            sel = (layer_of == name) & (lb.unit == units)
            out[sel] = lb.test_r[sel]
        return out

    def _yz_device(self) -> torch.Tensor:
        """The z-scored neuron rows (float64) on the engine's device, for the re-scoring (on the CPU the
        same memory; on a GPU a copy kept for the next call, not pickled)."""
        if self.device.type == "cpu":
            return torch.from_numpy(self._yz)
        if self._yz_t is None:
            self._yz_t = torch.as_tensor(self._yz, device=self.device)
        return self._yz_t

    def _rescore(self, partial: MatchPartial, columns):
        """float64 re-scoring of every (split, neuron)'s candidates within tie_margin of its best.

        Works on (neuron, candidate) pairs, so the cost grows with the number of neuron rows, not
        neuron rows x candidates (permutation nulls stack many neuron rows). The neuron rows are
        used as they are (z-scored over all images; their train norms are the split plans'): only
        the candidates' rows are centred on each split's images, so no split gathers or normalises
        the thousands of rows of a permutation null (which took about 3 s per split for 100
        permutations of 256 neurons; benchmarks/RESULTS.md).
        """
        near = (partial.top_unit >= 0) & (partial.top_r >= partial.top_r[..., :1] - self.tie_margin)
        units, inverse = np.unique(partial.top_unit[near], return_inverse=True)
        xc = np.asarray(columns(units))
        if xc.shape != (self.n_images, units.size):
            raise ValueError(f"columns() returned shape {xc.shape}; expected ({self.n_images}, {units.size})")
        dev = self.device
        # units x images, float64, on the engine's device (the columns travel as stored): each split
        # takes its candidates' rows
        xu = torch.empty((units.size, self.n_images), dtype=torch.float64, device=dev)
        native = np.ascontiguousarray(xc, dtype=xc.dtype.newbyteorder("="))  # torch takes native byte order only
        xu.copy_(torch.as_tensor(native).to(dev).T)  # cast and transposed in one pass
        yz = self._yz_device()
        cand = np.full(partial.top_unit.shape, -1, np.int64)
        cand[near] = inverse
        S, M, _ = cand.shape
        b_unit = np.full((S, M), -1, np.int64)
        b_train = np.full((S, M), np.nan)
        b_test = np.full((S, M), np.nan)
        for s, ((train, test), plan) in enumerate(zip(self.splits, self._plans)):
            slot, j = np.nonzero(cand[s].T >= 0)  # slot-major: the rows of slot 0 are consecutive
            used, c = np.unique(cand[s, j, slot], return_inverse=True)  # this split's candidates only
            used_t = torch.as_tensor(used, device=dev)
            in_train = torch.zeros(self.n_images, dtype=torch.float64, device=dev)
            in_train[plan.train_t] = 1.0
            r = _pair_r(xu[used_t], yz, torch.as_tensor(plan.y_scale, device=dev), c, j, in_train)
            r = np.nan_to_num(r, nan=-np.inf)
            # per neuron row: highest float64 r, then lowest unit id
            order = np.lexsort((partial.top_unit[s, j, slot], -r, j))
            first = np.ones(order.size, bool)
            first[1:] = j[order][1:] != j[order][:-1]
            win = order[first]
            b_unit[s, j[win]] = partial.top_unit[s, j[win], slot[win]]
            b_train[s, j[win]] = r[win]
            test_x = xu[used_t[:, None], plan.test_t[None, :]]
            b_test[s, j[win]] = _pair_r(test_x, plan.yn_test_t, None, c[win], j[win])
        return b_unit, b_train, b_test


def combine_results(parts: Sequence[MatchResult], neuron_ids: Sequence[str]) -> MatchResult:
    """One result from results over disjoint groups of neurons (e.g. one per region), in ``neuron_ids`` order.

    Each part is used as it is (its own permutation null, its own searched layers); the parts must
    share settings, splits and unit numbering, and together hold every neuron of ``neuron_ids`` once.
    The rows are ordered by split, then by the neuron's position in ``neuron_ids`` (``layer_matches``:
    then each part's own layer order), whatever the number of parts, one included.

    Raises:
        ValueError: parts with different settings (naming the fields), different splits (as far as a
            result records them: the split numbers and each split's train and test sizes; naming the
            splits that differ), or neurons missing, repeated or not in ``neuron_ids``.
    """
    ids = np.asarray(neuron_ids).astype(str)
    order = {n: i for i, n in enumerate(ids)}
    _check_same_settings([p.settings for p in parts])
    _check_same_splits(parts)
    got = np.concatenate([pd.unique(p.matches.neuron).astype(str) for p in parts])
    if len(got) != len(ids) or set(got.tolist()) != set(ids.tolist()):
        raise ValueError(f"the parts hold neurons {sorted(got.tolist())[:10]}...; expected each of {len(ids)} "
                         f"neurons once")

    def in_order(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        df = df.assign(_pos=df.neuron.astype(str).map(order))
        return df.sort_values(keys, kind="stable").drop(columns="_pos").reset_index(drop=True)

    matches = in_order(pd.concat([p.matches for p in parts], ignore_index=True), ["split", "_pos"])
    layer_matches = in_order(pd.concat([p.layer_matches for p in parts], ignore_index=True), ["split", "_pos"])
    null = None
    if parts[0].null is not None:
        perm = np.argsort([order[n] for n in got])
        null = NullDistribution(*(np.concatenate([getattr(p.null, f) for p in parts], axis=2)[:, :, perm]
                                  for f in ("unit", "train_r", "test_r")))
    return MatchResult(matches, layer_matches, null, parts[0].settings)


def _check_same_settings(settings: Sequence[MatchSettings | None]) -> None:
    first = settings[0]
    for i, other in enumerate(settings[1:], 1):
        if other == first:
            continue
        if isinstance(first, MatchSettings) and isinstance(other, MatchSettings):
            what = "; ".join(f"{f.name}: {getattr(first, f.name)!r} in part 0, {getattr(other, f.name)!r} in part {i}"
                             for f in fields(MatchSettings) if getattr(first, f.name) != getattr(other, f.name))
        else:
            what = f"{first!r} in part 0, {other!r} in part {i}"
        raise ValueError(f"cannot combine results of different settings: {what}")


def _check_same_splits(parts: Sequence[MatchResult]) -> None:
    """The splits as a result records them (split -> (n_train, n_test)) must be the same in every part."""
    def splits(result: MatchResult) -> dict[int, tuple[int, int]]:
        sizes = result.matches.groupby("split", sort=True)[["n_train", "n_test"]].first()
        return {int(s): (int(a), int(b)) for s, (a, b) in zip(sizes.index, sizes.to_numpy())}

    first = splits(parts[0])
    for i, part in enumerate(parts[1:], 1):
        other = splits(part)
        if other != first:
            what = "; ".join(f"split {s}: {first.get(s, 'absent')} in part 0, {other.get(s, 'absent')} in part {i}"
                             for s in sorted(set(first) | set(other)) if first.get(s) != other.get(s))
            raise ValueError(f"cannot combine results of different splits ((n_train, n_test) per split): {what}")


def stack_permutations(responses: np.ndarray, n_permutations: int, seed: int = 0) -> np.ndarray:
    """The neurons, then ``n_permutations`` copies of them, each row's images independently permuted.

    Row ``(1 + p) * M + j`` is neuron j under permutation p.
    """
    if n_permutations == 0:
        return responses
    rng = np.random.default_rng(seed)
    M = responses.shape[0]
    out = np.empty(((1 + n_permutations) * M, responses.shape[1]), dtype=responses.dtype)
    out[:M] = responses
    for p in range(1, 1 + n_permutations):  # each copy shuffled where it lands (no list of copies to concatenate)
        rng.permuted(responses, axis=1, out=out[p * M:(p + 1) * M])
    return out


def _columns(a: np.ndarray, indices: Sequence[np.ndarray], block_bytes: int = 4 << 20) -> list[np.ndarray]:
    """``[a[:, index] for index in indices]`` for a 2-D array of many rows, in one pass over them.

    Rows are taken a block of about ``block_bytes`` at a time, and every index takes its columns
    while the block is in cache. Taking a few hundred scattered columns of a permutation null's
    rows (25,856 x 2560 float64) read the whole array from memory for each index: 0.2-0.3 s each,
    30 of them per 10-split engine.
    """
    a = np.ascontiguousarray(a)
    out = [np.empty((a.shape[0], len(index)), dtype=a.dtype) for index in indices]
    step = max(1, block_bytes // max(1, a.shape[1] * a.itemsize))
    for r0 in range(0, a.shape[0], step):
        block = a[r0:r0 + step]
        for o, index in zip(out, indices):
            np.take(block, index, axis=1, out=o[r0:r0 + step])
    return out


def _row_sums(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's sum and sum of squares (a: rows x images)."""
    return a.sum(axis=1), np.einsum("ij,ij->i", a, a)


def _train_sums(totals: tuple[np.ndarray, np.ndarray], y_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's sum and sum of squares over a train set: ``totals`` (over all images,
    :func:`_row_sums`) less those over the images outside it (``y_out``: their columns, few)."""
    out = _row_sums(y_out)
    return totals[0] - out[0], totals[1] - out[1]


def _constant_rows(y: np.ndarray, train: np.ndarray, totals: tuple[np.ndarray, np.ndarray],
                   y_out: np.ndarray) -> np.ndarray:
    """Rows of y (rows x images) with the same value at every image of ``train``.

    A screen on float64 sums first: ``totals`` (each row's sum and sum of squares over all
    images) minus those over the images outside ``train`` (``y_out``, their columns: few; a gather
    of the train columns of a permutation null's thousands of rows took about 0.7 s per split). A
    row whose computed variance exceeds 1e-9 of its mean square varies for certain (the sums'
    rounding is about 1e-16 of it); only the others are compared value by value.
    """
    n = len(train)
    with np.errstate(over="ignore", invalid="ignore"):  # overflowed sums give NaN: those rows are compared too
        train_sum, train_squares = _train_sums(totals, y_out)
        mean, square = train_sum / n, train_squares / n
        maybe = np.flatnonzero(~(square - mean * mean > 1e-9 * square))
    return maybe[np.ptp(y[np.ix_(maybe, train)], axis=1) == 0]


def pearson_pairs(x: np.ndarray, y: np.ndarray, cols: np.ndarray, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """float64 Pearson r of x[:, cols[p]] (images, units) with y[rows[p]] (neurons, images), per pair p."""
    cols, rows = np.asarray(cols), np.asarray(rows)
    units, at = np.unique(cols, return_inverse=True)  # only the units the pairs use are normalised
    xu = np.array(np.asarray(x)[:, units].T, dtype=np.float64, order="C")  # units x images: rows gathered per pair
    yc = np.asarray(y, dtype=np.float64)
    yc = yc - yc.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        yn = yc / np.sqrt(np.einsum("ij,ij->i", yc, yc))[:, None]
    return _pair_r(torch.from_numpy(xu), torch.from_numpy(yn), None, at, rows, chunk=chunk)


def _pair_r(x: torch.Tensor, y: torch.Tensor, y_norm: torch.Tensor | None, cols: np.ndarray, rows: np.ndarray,
            mask: torch.Tensor | None = None, chunk: int | None = None) -> np.ndarray:
    """float64 Pearson r of unit row ``x[cols[p]]`` with neuron row ``y[rows[p]]``, per pair p.

    ``x``, ``y``, ``y_norm`` and ``mask``: float64 tensors on one device, where the products run;
    ``cols``, ``rows``: the pairs (numpy); the r come back as numpy. Over the images where ``mask``
    is 1 (a 0/1 vector over x's and y's columns; None: all). x (units x images) is overwritten:
    each row is centred on the masked images and zeroed off them, so its products with a y row
    need that row neither gathered nor centred, only its norm about its mean over those images
    (``y_norm`` per row; None: y's rows are already centred and of norm 1 there). NaN where either
    side is constant. Pairs go ``chunk`` at a time (default: 256 on the CPU, where a chunk's
    gathered rows stay in cache; elsewhere about 64 MiB of them).
    """
    cols, rows = np.asarray(cols, dtype=np.int64), np.asarray(rows, dtype=np.int64)  # torch indexes with int64
    if mask is None:
        x -= x.mean(dim=1, keepdim=True)
    else:
        x -= (x @ mask / mask.sum())[:, None]
        x *= mask
    norm = torch.linalg.vector_norm(x, dim=1)
    if chunk is None:
        chunk = 256 if x.device.type == "cpu" else max(256, (64 << 20) // (8 * max(1, x.shape[1])))
    cols_t = torch.as_tensor(cols, device=x.device)
    rows_t = torch.as_tensor(rows, device=x.device)
    out = torch.empty(cols.size, dtype=x.dtype, device=x.device)
    for a in range(0, cols.size, chunk):
        sl = slice(a, a + chunk)
        at = rows[sl]
        # consecutive rows (most pairs: one candidate per neuron row) are read in place, not gathered
        ys = y[at[0]:at[0] + at.size] if np.array_equal(at, np.arange(at[0], at[0] + at.size)) else y[rows_t[sl]]
        torch.sum(x[cols_t[sl]] * ys, dim=1, out=out[sl])
    norms = norm[cols_t] if y_norm is None else norm[cols_t] * y_norm[rows_t]
    r = out / norms
    r[norms == 0] = float("nan")  # not the rounding residue of a product over a constant side
    return r.cpu().numpy()


def _fused(xb: torch.Tensor):
    """The fused CPU kernels (:mod:`core._kernels`: the one-split path's gather-cast-square, the
    sparse-unit screen, the shift estimate, the leaders' test r), the block as a flat numpy view and
    its row stride; None where torch's ops do that work (blocks of other dtypes or devices, columns
    not contiguous, numba not importable)."""
    if xb.device.type != "cpu" or xb.stride(1) != 1 or xb.dtype not in (torch.float16, torch.float32):
        return None
    kernels = _kernels()
    if kernels is None:
        return None
    span = (xb.shape[0] - 1) * xb.stride(0) + xb.shape[1]
    return kernels, torch.as_strided(xb, (span,), (1,)).numpy(), xb.stride(0)


@functools.lru_cache(maxsize=None)
def _kernels():
    """:mod:`core._kernels` (numba, compiled on first use, cached on disk), or None where numba cannot
    be imported (then torch's ops, about a tenth slower on a block: benchmarks/RESULTS.md)."""
    try:
        from . import _kernels as kernels
    except ImportError as e:  # a declared dependency; missing only in hand-made environments
        log.warning("numba is not importable (%s): CPU blocks are gathered, cast and screened with torch's ops", e)
        return None
    return kernels


def _in_words(src: torch.Tensor) -> bool:
    """Are the rows of this 2-D tensor of 16-bit values whole, aligned runs of 64-bit words?"""
    per = 8 // src.element_size()
    return (src.element_size() == 2 and src.stride(1) == 1 and not src.shape[1] % per and not src.stride(0) % per
            and not src.storage_offset() % per and not src.data_ptr() % 8)


def _take_rows(src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = src[rows]`` (same dtype). Rows of 16-bit values are gathered as 64-bit words where
    :func:`_in_words` (four values a word; measured 1.4x faster than gathering the values)."""
    if _in_words(src):
        torch.index_select(src.view(torch.int64), 0, rows, out=out.view(torch.int64))
    else:
        torch.index_select(src, 0, rows, out=out)
    return out


#: the float16 split's remainder is stored times this (:func:`_split_half`)
_LO_SCALE = 2048.0


def _split_half(rows: torch.Tensor, scale: float = _LO_SCALE) -> torch.Tensor:
    """(2, *rows.shape) float16 ``hi, lo`` with ``hi + lo / scale = rows`` to about 2^-22 of each value.

    ``hi`` is ``rows`` rounded to float16 and ``lo`` the remainder (exact in float32) times ``scale``
    (2^11 by default), rounded to float16: scaled so that it stays in float16's normal range for
    values down to about 2^-14 (below that its error is at most 2^-36 in absolute terms; unscaled,
    ``scale=1``, 2^-25). Products of float16 values are
    exact in float32, so ``hi @ x + (lo @ x) / _LO_SCALE`` for a float16 ``x`` with float32 sums is
    about as accurate as a float32 GEMM with ``rows``. Values must lie within float16's range
    (z-scored neuron rows do: |z| <= sqrt(images)).
    """
    hi = rows.to(torch.float16)
    lo = ((rows - hi.to(rows.dtype)) * scale).to(torch.float16)
    return torch.stack([hi, lo])


def _aligned_columns(n: int) -> int:
    """A column chunk's width: ``n`` rounded down to a multiple of 128, at least 128, so that every chunk
    of a float16 or float32 row starts 256-byte aligned (cuBLAS picks slower kernels for operands that
    are not 16-byte aligned)."""
    return max(128, n // 128 * 128)


def _fp16_accumulation() -> bool:
    """Whether torch is set to accumulate float16 GEMMs in float16 (``torch.backends.cuda.matmul.
    allow_fp16_accumulation``, torch 2.7 on), under which torch refuses float16 GEMMs into float32:
    the engine then uses float32 GEMMs."""
    return bool(getattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", False))


def _mm_float32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` for float16 ``a`` and ``b``: float32 products and sums into float32 ``out``.

    On CUDA one float16 tensor-core GEMM with float32 accumulation (``out_dtype``); on other devices
    (tests on the CPU) the same products through float32 copies, summed in float32."""
    if a.device.type == "cuda":
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        torch.mm(a.to(torch.float32), b.to(torch.float32), out=out)


def _numpy_tile_units(n_train: int) -> int:
    """The widest tile of numpy's one-split GEMMs for ``n_train`` train rows: ``_NUMPY_TILE_UNITS``,
    fewer where its float32 tile would exceed ``_NUMPY_TILE_BYTES``, but never fewer than
    ``_NUMPY_TILE_MIN_UNITS`` (nor more than ``_NUMPY_TILE_UNITS``)."""
    fits = _NUMPY_TILE_BYTES // (4 * max(1, n_train))
    return min(_NUMPY_TILE_UNITS, max(_NUMPY_TILE_MIN_UNITS, fits))


def _torch_gemm(n_units: int, threads: int = 1) -> bool:
    """Whether a one-split CPU block of ``n_units`` is multiplied with torch's GEMMs: a block wider
    than ``_TILE_UNITS`` goes to the share threads (a pool of ``threads``), whose BLAS
    :func:`_numpy_gemm_faster` picks; a narrower one is scored whole on torch's."""
    return n_units <= _TILE_UNITS or not _numpy_gemm_faster(threads)


def _numpy_gemm_faster(threads: int = 1) -> bool:
    """Whether the ``threads`` share threads of a one-split CPU block multiply with numpy's BLAS
    rather than torch's (:func:`_probe_gemms`, run once per thread count; threads that ask meanwhile
    wait for its answer rather than time GEMMs against it)."""
    with _PROBE_LOCK:
        return _probe_gemms(max(1, threads))


_PROBE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _probe_gemms(threads: int) -> bool:
    """Whether numpy's BLAS (OpenBLAS) multiplies the share threads' tiles faster than torch's (MKL),
    each the way the engine calls it: numpy's one GEMM over a tile of all train rows,
    (256 x 2880) @ (2880 x ``_NUMPY_TILE_UNITS``) float32, torch's (256 x 2880) @ (2880 x
    ``_KCHUNK_UNITS``) a chunk of ``_KCHUNK_ROWS`` rows at a time added up (``addmm``, beta = 1),
    compared per unit; each on ``threads`` Python threads at once, every op
    single-threaded, as the shares run (the two libraries, alternating, best of three each). Then a
    one-split CPU block's share threads use numpy's GEMMs where they were at least
    ``_NUMPY_GEMM_RATIO`` times as fast, else torch's. Decided once per process and thread count:
    about 0.6 s on two threads.

    Measured (benchmarks/RESULTS.md): on a 2-core AMD EPYC (AVX2) OpenBLAS was 1.46x as fast as MKL
    per thread; on a 2-core Intel Xeon with AVX-512 and AMX MKL was 1.1x as fast as OpenBLAS. On a
    2-core AMD EPYC Zen 4 the two took the same time on one thread alone, and the probe, timing them
    so, mostly picked MKL; in the engine's stream, both share threads busy, a float32 block's GEMMs
    took 135-139 ms with OpenBLAS's tiles and 143-155 ms with MKL's chunks (145-173 ms while each
    share's MKL GEMM still ran a team of two threads: :func:`core._threads.one_thread_here`).
    """
    import time

    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 2880), dtype=np.float32)
    width = max(_NUMPY_TILE_UNITS, _KCHUNK_UNITS)
    tiles = [rng.random((2880, width), dtype=np.float32) for _ in range(threads)]
    outs = [np.empty((256, width), np.float32) for _ in range(threads)]
    at = torch.from_numpy(a)

    def numpy_tile(i: int) -> None:
        np.matmul(a, tiles[i][:, :_NUMPY_TILE_UNITS], out=outs[i][:, :_NUMPY_TILE_UNITS])

    def torch_chunks(i: int) -> None:
        bt, ot = torch.from_numpy(tiles[i][:, :_KCHUNK_UNITS]), torch.from_numpy(outs[i][:, :_KCHUNK_UNITS])
        for r0 in range(0, a.shape[1], _KCHUNK_ROWS):
            r1 = r0 + _KCHUNK_ROWS
            torch.addmm(ot, at[:, r0:r1], bt[r0:r1], beta=0.0 if r0 == 0 else 1.0, out=ot)

    start = threading.Barrier(threads, timeout=120)  # a thread that never arrives: an error, not a hang

    def together(multiply, i: int) -> None:
        start.wait()
        multiply(i)

    def on_every_thread(multiply) -> float:  # wall time of one call on each thread, started together
        t0 = time.perf_counter()
        for future in [pool.submit(together, multiply, i) for i in range(threads)]:
            future.result()
        return time.perf_counter() - t0

    times = {numpy_tile: [], torch_chunks: []}
    with single_threaded_ops(), ThreadPoolExecutor(max_workers=threads, thread_name_prefix="unitmatch-probe",
                                                         initializer=one_thread_here) as pool:
        for multiply in times:  # warm-ups: the threads, first touch of the outputs
            on_every_thread(multiply)
        for _ in range(3):
            for multiply, taken in times.items():
                taken.append(on_every_thread(multiply))
    # seconds per unit: the two tiles' widths may differ
    numpy_s = min(times[numpy_tile]) / _NUMPY_TILE_UNITS
    torch_s = min(times[torch_chunks]) / _KCHUNK_UNITS
    faster = torch_s >= _NUMPY_GEMM_RATIO * numpy_s
    log.info("one-split CPU blocks: %s's GEMMs in the share threads (a tile's GEMMs on each of %d threads took "
             "%.2f ms per 1000 units with numpy, %.2f ms with torch)", "numpy" if faster else "torch", threads,
             1e6 * numpy_s, 1e6 * torch_s)
    return faster


#: :func:`_probe_gemms`: how much faster numpy's GEMMs must be than torch's to be used (timed as the
#: share threads run them, the faster one is taken)
_NUMPY_GEMM_RATIO = 1.0


@functools.lru_cache(maxsize=None)
def _half_gemm_available(device: str) -> bool:
    """Whether torch on this CUDA device multiplies float16 matrices into float32 (``torch.mm``'s
    ``out_dtype``, torch 2.8 on); where not, the engine uses float32 GEMMs."""
    try:
        a = torch.full((2, 2), 3.0, dtype=torch.float16, device=device)
        out = torch.mm(a, a, out_dtype=torch.float32)
        ok = out.dtype == torch.float32 and bool((out == 18.0).all())
    except (TypeError, RuntimeError, NotImplementedError) as err:
        log.info("float16 GEMMs into float32 unavailable on %s (%s): the engine's GEMMs run in float32", device, err)
        return False
    return ok


def _warn_forced_tf32() -> None:
    """Warn (once per process) where the environment forces TF32 on the engine's CUDA GEMMs."""
    global _tf32_warned
    from ._compat import forced_tf32

    forced = forced_tf32()
    if forced and not _tf32_warned:
        _tf32_warned = True
        log.warning(
            "%s makes torch run the engine's CUDA float32 GEMMs in TF32 (NGC's PyTorch containers set it): "
            "screening r then carry errors of about 1e-4 instead of 1e-6, so a unit within that of a neuron's "
            "best may be missed before the float64 re-scoring; unset it (or set it to 0) for exact matching",
            ", ".join(forced))


def _top_k_columns(scores: torch.Tensor, k: int):
    """``torch.topk(scores, k, dim=1)`` (values, column indices), through group maxima on CPU.

    For a large CPU matrix: each row's columns are cut into groups of ``_TOPK_GROUP``; a row's k
    largest values lie in its k groups with the largest maxima (a value outside them is beaten by
    those k maxima, each from another group), so one pass of group maxima and a top-k over the
    candidates of k groups replace a top-k over the whole row: 2.4-3x faster for the 10-split
    path's (6465 x 9600) scores and a share's (256 x 9216) (benchmarks/RESULTS.md). The values
    equal ``torch.topk``'s; among equal values the chosen columns may differ, as they may between
    torch versions. Elsewhere (GPUs, small matrices) it is ``torch.topk``.
    """
    rows, n = scores.shape
    groups = n // _TOPK_GROUP
    if scores.device.type != "cpu" or scores.numel() < _GROUPED_TOPK_MIN or groups <= k:
        return torch.topk(scores, k, dim=1)
    body = scores[:, : groups * _TOPK_GROUP]
    if not body.is_contiguous():
        body = body.contiguous()
    maxima = body.reshape(rows, groups, _TOPK_GROUP).amax(dim=2)
    best = torch.topk(maxima, k, dim=1).indices  # (rows, k) group ids
    picked = (torch.arange(rows, device=scores.device)[:, None] * groups + best).reshape(-1)
    candidates = body.reshape(rows * groups, _TOPK_GROUP).index_select(0, picked).view(rows, k * _TOPK_GROUP)
    if groups * _TOPK_GROUP < n:  # the columns after the last whole group are candidates too
        candidates = torch.cat([candidates, scores[:, groups * _TOPK_GROUP:]], dim=1)
    values, at = torch.topk(candidates, k, dim=1)
    in_group = at < k * _TOPK_GROUP
    column = torch.gather(best, 1, (at // _TOPK_GROUP).clamp_max(k - 1)) * _TOPK_GROUP + at % _TOPK_GROUP
    return values, torch.where(in_group, column, groups * _TOPK_GROUP + at - k * _TOPK_GROUP)


def _tile_columns(s: int, cols: torch.Tensor, tiles: torch.Tensor) -> None:
    """Split ``s``'s correction columns (K_s, w) into its tiles (splits, tiles, K, TU): tile t holds
    columns t * TU ..; zeros in the rows past K_s and past the last column."""
    n_tiles, tile = tiles.shape[1], tiles.shape[3]
    k_s, w = cols.shape
    whole = (w // tile) * tile
    tiles[s, :, k_s:].zero_()
    if whole:
        tiles[s, :whole // tile, :k_s].copy_(cols[:, :whole].unflatten(1, (-1, tile)).transpose(0, 1))
    if whole < w:
        tiles[s, n_tiles - 1, :k_s, :w - whole].copy_(cols[:, whole:])
        tiles[s, n_tiles - 1, :, w - whole:].zero_()


def _never_chosen(scores: torch.Tensor, never: torch.Tensor) -> None:
    """-inf in the score columns of the units that must never be chosen."""
    if bool(never.any()):
        scores.index_fill_(1, torch.nonzero(never).flatten(), -torch.inf)


def _check_finite(sxx: torch.Tensor, block: UnitBlock) -> None:
    """Raise if any unit has a NaN/inf activation: its sum of squares over all images is then not finite."""
    bad = ~torch.isfinite(sxx)
    if bool(bad.any()):
        units = (torch.nonzero(bad).flatten()[:5].cpu().numpy() + block.first_unit).tolist()
        raise ValueError(
            f"activations of layer {block.layer!r} contain NaN or inf (e.g. global units {units}); "
            f"check the model's outputs for that layer"
        )


def _as_tensor(data, device: torch.device) -> torch.Tensor:
    return _host_tensor(data).to(device)


# ------------------------------------------------------------------------------------- staging
#: staging slots: one block in compute, the next ones in flight or waiting
STAGING_BUFFERS = 3


class _Slot:
    """One staging slot: a host buffer (pinned on CUDA) and, on CUDA, a device buffer and two events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.host = torch.empty(0, dtype=torch.uint8)
        self.dev = torch.empty(0, dtype=torch.uint8, device=device)
        #: the host-to-device copy out of this slot finished (the host buffer may be refilled)
        self.copied = torch.cuda.Event() if self.cuda else None
        #: the compute that read this slot's device buffer finished (it may be overwritten)
        self.computed = torch.cuda.Event() if self.cuda else None
        self.keep = None  # a pinned source copied from directly, held until its copy is done

    def view(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """This slot's host or device buffer as a contiguous (shape, dtype) tensor, grown if needed."""
        nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        buf = getattr(self, name)
        if buf.numel() < nbytes:
            if name == "host":
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            setattr(self, name, buf)
        return buf[:nbytes].view(dtype).view(shape)


class _End:
    """The producer's last item."""


def _float_torch_dtype(dtype) -> torch.dtype:
    """torch's dtype for a numpy float dtype; ValueError for any other."""
    if np.dtype(dtype).kind != "f":
        raise ValueError(f"activations must be float16 or float32; got {dtype}")
    return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype


def _host_tensor(data) -> torch.Tensor:
    """A block's data as a CPU tensor without copying (numpy arrays are wrapped)."""
    if isinstance(data, torch.Tensor):
        return data
    a = np.asarray(data)
    _float_torch_dtype(a.dtype)
    if a.strides and any(st < 0 for st in a.strides):
        a = np.ascontiguousarray(a)
    return torch.from_numpy(a)


_COPY_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    """The process's host-to-device copy stream for ``device``, one for every :func:`staged_blocks`
    call: the staging buffers are allocated on it, and the caching allocator reuses a stream's
    freed blocks only on that stream (a new stream per call would let reserved memory grow)."""
    with _POOL_LOCK:
        if device not in _COPY_STREAMS:
            _COPY_STREAMS[device] = torch.cuda.Stream(device)
        return _COPY_STREAMS[device]


def staged_blocks(blocks: Iterable[UnitBlock], device: torch.device, n_buffers: int = STAGING_BUFFERS):
    """Yield the blocks with their data on ``device``, copied ahead of use through a ring of buffers.

    A producer thread reads the blocks (so a store's reads and decompression overlap the compute
    too), copies each into a free slot's host buffer and, on CUDA, from there to the slot's device
    buffer with an asynchronous copy on a separate copy stream. The consumer's current (compute)
    stream waits for that copy's event before the block is used. A slot is refilled only after the
    block it held is given back (the consumer asks for the next one) and, on CUDA, its copy has
    finished (host side) and the compute that read it has finished (device side, ordered by an
    event on the copy stream). The host buffers are pinned on CUDA, so the copies are true DMA
    transfers; a block that is already pinned is copied from directly, one already on the device
    passes through, and a store's block not read yet (:class:`core.units.BlockRead`) is read
    straight into the slot's host buffer. On CPU the same ring runs with ordinary buffers and no
    streams (the "device" buffer is the host buffer).

    The data of a yielded block is valid until the next block is asked for.

    Raises:
        ValueError: ``n_buffers`` below 2; any error of the block source, re-raised in the consumer.
    """
    if isinstance(n_buffers, bool) or not isinstance(n_buffers, numbers.Integral) or n_buffers < 2:
        raise ValueError(f"n_buffers must be an integer >= 2 (one block in compute, one in flight); got {n_buffers!r}")
    import queue

    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"staging to {device} needs CUDA, which torch does not see here")
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # blocks on it pass through
    slots = [_Slot(device) for _ in range(n_buffers)]
    free: "queue.Queue[_Slot]" = queue.Queue()
    for slot in slots:
        free.put(slot)
    ready: "queue.Queue" = queue.Queue()
    stop = threading.Event()
    copy_stream = _copy_stream(device) if cuda else None

    def take_slot():
        while not stop.is_set():
            try:
                return free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def produce():
        try:
            if cuda:
                torch.cuda.set_device(device)
            for block in blocks:
                if stop.is_set():
                    return
                data = block.data
                if isinstance(data, torch.Tensor) and data.device == device and device.type != "cpu":
                    ready.put((None, block))
                    continue
                slot = take_slot()
                if slot is None:
                    return
                deferred = hasattr(data, "read_into")  # a store's block (core.units.BlockRead), not read yet
                src = None if deferred else _host_tensor(data)
                if src is not None and src.device.type != "cpu":
                    src = src.cpu()  # on another device: through host memory
                if cuda:
                    slot.copied.synchronize()  # the last copy out of this host buffer is done
                if deferred:  # read straight into the slot's (pinned) host buffer: no copy in between
                    host = slot.view("host", tuple(data.shape), _float_torch_dtype(data.dtype))
                    data.read_into(host.numpy())
                elif cuda and src.is_pinned() and src.is_contiguous():
                    host = src  # DMA straight from the caller's pinned memory
                else:
                    host = slot.view("host", tuple(src.shape), src.dtype)
                    host.copy_(src)
                if not cuda:
                    ready.put((slot, UnitBlock(host, block.layer, block.first_unit)))
                    continue
                slot.keep = host
                with torch.cuda.stream(copy_stream):
                    copy_stream.wait_event(slot.computed)  # the last compute on the device buffer is done
                    dev = slot.view("dev", tuple(host.shape), host.dtype)
                    dev.copy_(host, non_blocking=True)
                    slot.copied.record(copy_stream)
                ready.put((slot, UnitBlock(dev, block.layer, block.first_unit)))
        except BaseException as err:  # handed to the consumer, which re-raises it
            ready.put(err)
        finally:
            ready.put(_End)

    thread = threading.Thread(target=produce, name="unitmatch-staging", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _End:
                break
            if isinstance(item, BaseException):
                raise item
            slot, block = item
            if slot is not None and cuda:
                torch.cuda.current_stream(device).wait_event(slot.copied)
            yield block
            if slot is not None:
                if cuda:
                    slot.computed.record(torch.cuda.current_stream(device))
                free.put(slot)
    finally:
        stop.set()
        thread.join()
        if cuda:
            torch.cuda.current_stream(device).synchronize()
            copy_stream.synchronize()


# ------------------------------------------------------------------------------------ public API
def default_block_units(n_images: int, n_neurons: int = 256, budget_bytes: int | None = None,
                        device: str | torch.device | None = None) -> int:
    """Units per block so a block's float32 working set (its copy, products, scores) is about ``budget_bytes``.

    The default budget is 256 MiB on CPU; on a CUDA device a sixteenth of its memory, between
    256 MiB and 4 GiB (fewer, larger blocks keep a GPU's per-block fixed costs, its synchronisations
    and the host's work on the top-k, small next to its fast products). The budget is the working
    set only: :func:`staged_blocks` also holds ``STAGING_BUFFERS`` (3) device copies of a block as
    stored (float16: 2 bytes per activation, half the float32 copy's), so a float16 stream peaks
    near 2.5 budgets of device memory (a float32 stream near 4): at most a quarter of the device.
    """
    if budget_bytes is None:
        budget_bytes = 256 << 20
        if device is not None and torch.device(device).type == "cuda":
            total = torch.cuda.get_device_properties(torch.device(device)).total_memory
            budget_bytes = min(4 << 30, max(256 << 20, total // 16))
    per_unit = 4 * (max(n_images, 1) + 2 * (n_neurons + 1))
    return max(256, (budget_bytes // per_unit) // 256 * 256)


def stream_match(engine: MatchEngine, blocks: Iterable[UnitBlock], catalogue: UnitCatalogue,
                 neuron_ids: Sequence[str] | None = None, columns=None, progress: bool = False,
                 staging: bool | None = None) -> MatchResult:
    """Run the engine over a stream of blocks (memory, Zarr...) in one process.

    ``columns(units) -> (images, n)`` enables the final float64 re-scoring (see
    :meth:`MatchEngine.finalize`). ``staging`` reads and copies blocks ahead of the compute
    (:func:`staged_blocks`; None: on when the engine runs on CUDA); the result is the same. Without
    staging the blocks go through :meth:`MatchEngine.process_blocks`, which with one split on CPU
    reads the next block while the current one is scored: a block's data must stay valid until
    the block after the next is asked for (arrays, a store's reads), and the source is read with
    torch's ops on one thread (a source that reuses one buffer, or computes with torch on the CPU:
    call ``engine.process_blocks(blocks, overlap=False)`` and :meth:`MatchEngine.finalize`).
    """
    from contextlib import closing, nullcontext

    from tqdm.auto import tqdm

    if staging is None:
        staging = engine.device.type == "cuda"
    source = staged_blocks(blocks, engine.device) if staging else iter(blocks)
    with closing(source) if staging else nullcontext():
        # staged blocks are valid until the next is asked for: those are not queued ahead
        total = engine.process_blocks(tqdm(source, desc="matching", unit="block", disable=not progress),
                                      overlap=not staging)
    return engine.finalize(total, catalogue, neuron_ids, columns)


def run_matching(activations, responses, splits, settings: MatchSettings | None = None, *,
                 neuron_ids: Sequence[str] | None = None, dims=None, catalogue: UnitCatalogue | None = None,
                 layers: Sequence[str] | None = None, progress: bool = False, **overrides) -> MatchResult:
    """Match every neuron to its best unit, with per-layer bests.

    Args:
        activations: (images, units) array, or ``{layer: (images, *unit_shape)}`` arrays
            (float16 or float32, numpy or torch).
        responses: (neurons, images) mean responses, images in the same order.
        splits: (train_idx, test_idx) pairs, e.g. :func:`core.splits.brainscore_splits`.
        settings: :class:`MatchSettings` (top_k, n_permutations, seed, block_units, device,
            tie_margin, min_varying_images); keyword overrides of its fields (``top_k=3``) are
            applied on top. With ``n_permutations`` the result's ``null`` holds the permutation null.
        neuron_ids: names for the neuron column (default n000, n001, ...).
        dims: optional ``{layer: dim names}`` for unit coordinates (default by rank: channel / token,
            channel / channel, y, x).
        catalogue: the layers' unit shapes when the arrays are stored flat (e.g. 2-D Zarr arrays of
            images x units); its layer names must be the keys of ``activations``, in order.
        layers: search only the units of these layers (names of ``activations``); unit ids stay
            those of all the layers, so results of different searches share one numbering (the
            region-committed search, :func:`core.analysis.match_by_region`). None: every layer.
        progress: show a progress bar.
    """
    from .integrity import read_threads
    from .units import as_layers, catalogue_of, chunk_aligned, gather_columns, iter_blocks

    searched = layers
    layers = as_layers(activations)
    if catalogue is None:
        catalogue = catalogue_of(layers, dims)
    elif [layer.name for layer in catalogue.layers] != list(layers):
        raise ValueError(f"catalogue layers {[layer.name for layer in catalogue.layers]} do not match the "
                         f"activations' layers {list(layers)}")
    for layer in catalogue.layers:
        stored = int(np.prod(layers[layer.name].shape[1:]))
        if stored != layer.size:
            raise ValueError(f"layer {layer.name!r} stores {stored} units per image; the catalogue says "
                             f"{layer.size} {layer.shape}")
    engine = MatchEngine(responses, splits, MatchSettings.resolve(settings, **overrides))
    n_images = next(iter(layers.values())).shape[0]
    if n_images != engine.n_images:
        raise ValueError(f"activations have {n_images} images but responses have {engine.n_images}")
    size = engine.settings.block_units or chunk_aligned(
        default_block_units(n_images, engine.n_rows, device=engine.device), layers)
    # a store's blocks are read on read_threads() threads, each tile of whole chunks read into its
    # place in the block: on CUDA by the staging thread, straight into its pinned buffers (deferred
    # reads), beside the GPU; with several splits on CPU between the blocks' products; with one split
    # on CPU while both cores score the block before (2.21 s against 2.40 s on one read thread for a
    # 1.3 GB store on 2 cores: benchmarks/RESULTS.md)
    threads, deferred = read_threads(), engine.device.type == "cuda"
    if searched is not None:
        wanted = check_layer_subset(searched, list(layers), "the activations have")
        layers_read = {name: layers[name] for name in layers if name in wanted}
    else:
        layers_read = layers
    blocks = iter_blocks(layers_read, catalogue, size, read_threads=threads, deferred=deferred)
    return stream_match(engine, blocks, catalogue, neuron_ids,
                        columns=lambda units: gather_columns(layers, catalogue, units, dtype=None),
                        progress=progress)


def match_neurons(activations, responses, splits, settings: MatchSettings | None = None, **kwargs) -> pd.DataFrame:
    """The best unit per (neuron, split) as a DataFrame; see :func:`run_matching` for the arguments.

    Columns: neuron, split, unit, layer, unit coordinates (channel, y, x, token... as the layers
    have them; -1 where not applicable), train_r, test_r (float64), second_r, gap, topk_unit,
    topk_r (float32 screening values), n_train, n_test.
    """
    return run_matching(activations, responses, splits, settings, **kwargs).matches
