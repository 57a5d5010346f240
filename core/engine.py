"""The streaming one-to-one matching engine.

For every split (train images T, test images H) and neuron j it finds the unit u*(j) with the
highest Pearson r over T among all candidate units, and reports that unit's r over H.

How, per block of units (images x units, one layer):

1. Preparation, one cache-friendly sweep over row chunks: cast to float32, subtract a per-unit shift
   (the mean of a few rows, so float32 products do not lose digits to large unit means), and
   accumulate sums of squares.
2. Products as one matrix multiply. With one split, directly over T. With several splits, the work
   is shared: products over all images minus products over the images outside T give every split's
   train products (SCIENCE.md), so 10 splits cost about 2x one split instead of 9x. The neuron
   side is augmented so the same GEMM also yields each unit's sum, and the train-mean correction is
   folded into the subtraction: no separate pass.
3. r for every (neuron, unit) pair of the block is screened in float32 and a running top-k is kept.
   The block's leaders within ``tie_margin`` of its best are re-scored in float64 from the original
   activations; the float64 train r decides the best unit, and its test r is computed in float64.
   The reported r therefore agree with a float64 reference to float64 precision, and the chosen unit
   is the float64 argmax unless more than k units sit within float32 error of each other.

Never built: an all-units array, or a neurons x units array beyond one block.

Partial results (:class:`MatchPartial`) are pure functions of their block and merge associatively
and commutatively (ties are broken by the lower global unit id), so any order or grouping of blocks,
e.g. a Dask tree reduction, gives the identical answer.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .splits import Split, validate_splits
from .units import UnitBlock, UnitCatalogue

log = logging.getLogger(__name__)

#: rows of the shift estimate and of each preparation chunk (chunks stay in L2 with 16k units)
_SHIFT_ROWS = 64
_CHUNK_ROWS = 16
#: a unit whose train sum of squares about its mean is below this fraction of its raw sum of
#: squares is treated as constant on the train images (float32 cannot resolve its variance)
_CONSTANT_TOL = 1e-5


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
class MatchResult:
    """Final tables.

    Attributes:
        matches: one row per (neuron, split): neuron, split, unit, layer, unit coordinates, train_r,
            test_r, second_r, gap, topk_unit, topk_r, n_train, n_test.
        layer_matches: one row per (neuron, split, layer): that layer's best unit, train_r, test_r.
    """

    matches: pd.DataFrame
    layer_matches: pd.DataFrame


# ---------------------------------------------------------------------------------------- engine
class _SplitPlan:
    """Per-split constants: indices, neuron-side matrices for the GEMMs, float64 re-scoring data."""

    def __init__(self, y64: np.ndarray, yz: np.ndarray, train: np.ndarray, test: np.ndarray, shared: bool,
                 device: torch.device):
        n_images = y64.shape[1]
        self.train, self.test = train, test
        self.n_train = len(train)
        mz = yz[:, train].mean(axis=1)  # train mean of the z-scored responses
        ssz = ((yz[:, train] - mz[:, None]) ** 2).sum(axis=1)
        #: divides the screening score into r
        self.y_scale = np.sqrt(ssz)
        if shared:
            outside = np.setdiff1d(np.arange(n_images), train)
            self.outside = torch.as_tensor(outside, device=device)
            # rows: images outside T, then one extra row; columns: neurons, then the unit-sum column
            a = np.zeros((len(outside) + 1, yz.shape[0] + 1))
            a[:-1, :-1] = yz[:, outside].T - mz
            a[:-1, -1] = 1.0
            a[-1, :-1] = mz
            self.a_t = torch.as_tensor(np.ascontiguousarray(a.T), dtype=torch.float32, device=device)
        else:
            self.rows = torch.as_tensor(train, device=device)
            self.not_train = torch.as_tensor(np.setdiff1d(np.arange(n_images), train), device=device)
            d = np.empty((yz.shape[0] + 1, len(train)))
            d[:-1] = yz[:, train] - mz[:, None]
            d[-1] = 1.0
            self.d_t = torch.as_tensor(d, dtype=torch.float32, device=device)
        self.yn_train = torch.as_tensor(_unit_columns(y64[:, train].T), device=device)  # (n_T, M)
        self.yn_test = torch.as_tensor(_unit_columns(y64[:, test].T), device=device)  # (n_H, M)


def _unit_columns(a: np.ndarray) -> np.ndarray:
    """Center and scale each column to unit norm (NaN for constant columns), float64."""
    a = a - a.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return a / np.sqrt((a * a).sum(axis=0))


class MatchEngine:
    """Streams blocks of units against a fixed set of neurons and splits.

    Args:
        responses: (neurons, images) mean responses; finite.
        splits: (train_idx, test_idx) pairs of image positions.
        top_k: candidates kept per (split, neuron) (>= 2, so the best-vs-second gap is defined).
        device: torch device for the products ("cpu", "cuda", ...); default cuda when available.
        tie_margin: block leaders within this r of the block's best are re-scored in float64.

    Use :meth:`process` on each block, :func:`merge` / :func:`merge_all` on the partials, then
    :meth:`finalize`.
    """

    def __init__(self, responses: np.ndarray, splits: Sequence[Split], *, top_k: int = 5, device=None,
                 tie_margin: float = 1e-4):
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
        if not isinstance(top_k, (int, np.integer)) or top_k < 2:
            raise ValueError(f"top_k must be an integer >= 2; got {top_k!r}")
        self.n_neurons, self.n_images = y.shape
        self.splits = validate_splits(splits, self.n_images)
        for s, (train, _) in enumerate(self.splits):
            flat = np.ptp(y[:, train], axis=1) == 0
            if flat.any():
                raise ValueError(
                    f"neurons {np.flatnonzero(flat)[:10].tolist()} have the same response to every train image "
                    f"of split {s}: their correlation with any unit is undefined"
                )
        self.top_k = int(top_k)
        self.tie_margin = float(tie_margin)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.shared = len(self.splits) > 1
        yz = (y - y.mean(axis=1, keepdims=True)) / y.std(axis=1, keepdims=True)
        self._plans = [_SplitPlan(y, yz, tr, te, self.shared, self.device) for tr, te in self.splits]
        if self.shared:
            full = np.concatenate([yz, np.ones((1, self.n_images))])
            self._full_t = torch.as_tensor(full, dtype=torch.float32, device=self.device)
        self._local = threading.local()  # per-thread scratch buffers (Dask may run blocks in threads)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_local")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    @property
    def n_splits(self) -> int:
        return len(self.splits)

    def empty(self) -> MatchPartial:
        shape = (self.n_splits, self.n_neurons, self.top_k)
        return MatchPartial(np.full(shape, -np.inf, np.float32), np.full(shape, -1, np.int64))

    # ---------------------------------------------------------------- scratch memory
    def _buffer(self, name: str, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
        """A reusable buffer of at least this size (per thread), viewed to ``shape``."""
        pool = self._local.__dict__.setdefault("pool", {})
        n = int(np.prod(shape))
        buf = pool.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(n, dtype=dtype, device=self.device)
            pool[name] = buf
        return buf[:n].view(shape)

    # ---------------------------------------------------------------- one block
    def process(self, block: UnitBlock) -> MatchPartial:
        """Score one block of units against every neuron and split."""
        xb = _as_tensor(block.data, self.device)
        if xb.ndim != 2 or xb.shape[0] != self.n_images:
            raise ValueError(
                f"block of layer {block.layer!r} has shape {tuple(xb.shape)}; expected ({self.n_images}, units)"
            )
        if xb.dtype not in (torch.float16, torch.float32, torch.bfloat16, torch.float64):
            raise ValueError(f"block of layer {block.layer!r} has dtype {xb.dtype}; expected a float type")
        n_units = xb.shape[1]
        partial = self.empty()
        partial.n_units = n_units
        if n_units == 0:
            return partial
        if self.shared:
            x, sxx = self._prepare(xb, None)
            _check_finite(sxx, block)
            sx, products = self._shared_products(x)
            per_split = (self._split_scores_shared(p, x, sx, sxx, products) for p in self._plans)
        else:
            plan = self._plans[0]
            x, sxx = self._prepare(xb, plan.rows)
            _check_finite(sxx, block)
            _check_finite(xb.index_select(0, plan.not_train), block)
            products = self._buffer("products", (self.n_neurons + 1, n_units))
            torch.mm(plan.d_t, x, out=products)
            per_split = [self._finish_scores(plan, products, sxx)]
        best = LayerBest(np.full((self.n_splits, self.n_neurons), -1, np.int64),
                         np.full((self.n_splits, self.n_neurons), -np.inf),
                         np.full((self.n_splits, self.n_neurons), np.nan))
        for s, scores in enumerate(per_split):
            top_r, top_local = self._top_k(scores, self._plans[s])
            k = top_r.shape[1]
            partial.top_r[s, :, :k] = top_r
            partial.top_unit[s, :, :k] = np.where(np.isfinite(top_r), top_local + block.first_unit, -1)
            self._rescore(s, xb, top_r, top_local, block.first_unit, best)
        partial.layers[block.layer] = best
        return partial

    def _prepare(self, xb: torch.Tensor, rows: torch.Tensor | None):
        """float32 copy of the block (the given rows, or all), shifted per unit; raw sums of squares."""
        n_rows = self.n_images if rows is None else len(rows)
        n_units = xb.shape[1]
        head = xb[:_SHIFT_ROWS] if rows is None else xb.index_select(0, rows[:_SHIFT_ROWS])
        shift = head.to(torch.float32).mean(dim=0)
        x = self._buffer("x", (n_rows, n_units))
        if self.device.type != "cpu":
            x.copy_(xb if rows is None else xb.index_select(0, rows)).sub_(shift)
            return x, torch.einsum("ij,ij->j", x, x)
        chunk = _CHUNK_ROWS
        acc = self._buffer("acc", (chunk, n_units))
        acc.zero_()
        staging = self._buffer("staging", (chunk, n_units), xb.dtype) if rows is not None else None
        for r0 in range(0, n_rows, chunk):
            r1 = min(r0 + chunk, n_rows)
            dst = x[r0:r1]
            if rows is None:
                dst.copy_(xb[r0:r1])
            else:
                src = staging[: r1 - r0]
                torch.index_select(xb, 0, rows[r0:r1], out=src)
                dst.copy_(src)
            dst.sub_(shift)
            acc[: r1 - r0].addcmul_(dst, dst)
        return x, acc.sum(dim=0)

    def _shared_products(self, x: torch.Tensor):
        """Products of [z-scored neurons; ones] with all images: (M+1, units); last row = unit sums."""
        products = self._buffer("products", (self.n_neurons + 1, x.shape[1]))
        torch.mm(self._full_t, x, out=products)
        return products[-1].clone(), products

    def _split_scores_shared(self, plan: _SplitPlan, x, sx_all, sxx_all, products):
        """Train products of one split by subtracting the images outside T (one GEMM)."""
        n_out = len(plan.outside)
        outside = self._buffer("outside", (n_out + 1, x.shape[1]))
        torch.index_select(x, 0, plan.outside, out=outside[:n_out])
        outside[n_out].copy_(sx_all)
        sxx_out = torch.einsum("ij,ij->j", outside[:n_out], outside[:n_out])
        scores = self._buffer("scores", products.shape)
        torch.addmm(products, plan.a_t, outside, beta=1.0, alpha=-1.0, out=scores)
        return self._finish_scores(plan, scores, sxx_all - sxx_out)

    def _finish_scores(self, plan: _SplitPlan, scores: torch.Tensor, sxx_train: torch.Tensor):
        """Turn train cross-products (rows :M) and unit sums (row M) into ranking scores in place."""
        sx = scores[-1].double()
        ss = sxx_train.double() - sx * sx / plan.n_train  # train sum of squares about the mean
        constant = ss <= _CONSTANT_TOL * sxx_train.double().clamp_min(0)
        inv_sd = torch.where(constant, 0.0, ss.clamp_min(1e-300).rsqrt()).to(torch.float32)
        body = scores[:-1]
        body.mul_(inv_sd)
        if bool(constant.any()):
            body.index_fill_(1, torch.nonzero(constant).flatten(), -torch.inf)
        return body

    def _top_k(self, scores, plan: _SplitPlan):
        k = min(self.top_k, scores.shape[1])
        values, local = torch.topk(scores, k, dim=1)
        top_r = (values.double().cpu().numpy() / plan.y_scale[:, None]).astype(np.float32)
        return top_r, local.cpu().numpy()

    # ---------------------------------------------------------------- float64 re-scoring
    def _rescore(self, s: int, xb: torch.Tensor, top_r: np.ndarray, top_local: np.ndarray, first_unit: int,
                 best: LayerBest):
        """Float64 train r of the block leaders; the winner per neuron and its float64 test r."""
        plan = self._plans[s]
        near = np.isfinite(top_r) & (top_r >= top_r[:, :1] - self.tie_margin)
        neuron_idx, slot = np.nonzero(near)
        if neuron_idx.size == 0:
            return
        local = top_local[neuron_idx, slot]
        cols, col_of_pair = np.unique(local, return_inverse=True)
        cols_t = torch.as_tensor(cols, device=self.device)
        xc = xb.index_select(1, cols_t).double()  # (images, candidates)
        train_cols = _unit_columns_t(xc.index_select(0, torch.as_tensor(plan.train, device=self.device)))
        pair_cols = torch.as_tensor(col_of_pair, device=self.device)
        pair_neurons = torch.as_tensor(neuron_idx, device=self.device)
        r64 = (train_cols[:, pair_cols] * plan.yn_train[:, pair_neurons]).sum(0).cpu().numpy()
        r64 = np.where(np.isfinite(r64), r64, -np.inf)
        units = local + first_unit
        # per neuron: highest float64 r, then lowest unit id
        order = np.lexsort((units, -r64, neuron_idx))
        first = np.ones(order.size, bool)
        first[1:] = neuron_idx[order][1:] != neuron_idx[order][:-1]
        win = order[first]
        j = neuron_idx[win]
        best.unit[s, j] = units[win]
        best.train_r[s, j] = r64[win]
        test_cols = _unit_columns_t(xc.index_select(0, torch.as_tensor(plan.test, device=self.device)))
        win_t = torch.as_tensor(win, device=self.device)
        best.test_r[s, j] = (
            (test_cols[:, pair_cols[win_t]] * plan.yn_test[:, pair_neurons[win_t]]).sum(0).cpu().numpy()
        )

    # ---------------------------------------------------------------- final tables
    def finalize(self, partial: MatchPartial, catalogue: UnitCatalogue, neuron_ids: Sequence[str] | None = None
                 ) -> MatchResult:
        """Assemble the per-(neuron, split) and per-(neuron, split, layer) tables."""
        ids = np.asarray([f"n{i:03d}" for i in range(self.n_neurons)] if neuron_ids is None else neuron_ids)
        if ids.shape != (self.n_neurons,):
            raise ValueError(f"{len(ids)} neuron ids for {self.n_neurons} neurons")
        S, M = self.n_splits, self.n_neurons
        names = [layer.name for layer in catalogue.layers if layer.name in partial.layers]
        if not names:
            raise ValueError("no layer produced a candidate unit (were all units constant?)")
        stack = [partial.layers[n] for n in names]
        unit = np.stack([lb.unit for lb in stack])
        train_r = np.stack([lb.train_r for lb in stack])
        test_r = np.stack([lb.test_r for lb in stack])
        # best layer per (split, neuron): highest float64 train r, then lowest unit id
        key_u = np.where(unit < 0, np.iinfo(np.int64).max, unit)
        order = np.lexsort((key_u, -np.where(unit < 0, -np.inf, train_r)), axis=0)[0]
        pick = lambda a: np.take_along_axis(a, order[None], 0)[0]  # noqa: E731
        b_unit, b_train, b_test = pick(unit), pick(train_r), pick(test_r)
        second = np.where(partial.top_unit[..., 0] == b_unit, partial.top_r[..., 1], partial.top_r[..., 0])
        second = np.where(np.isfinite(second), second, np.nan).astype(np.float64)
        split_col = np.repeat(np.arange(S), M)
        base = pd.DataFrame({
            "neuron": np.tile(ids, S),
            "split": split_col,
        })
        described = catalogue.describe(b_unit.ravel())
        matches = pd.concat([base, described], axis=1)
        matches["train_r"] = b_train.ravel()
        matches["test_r"] = b_test.ravel()
        matches["second_r"] = second.ravel()
        matches["gap"] = matches["train_r"] - matches["second_r"]
        matches["topk_unit"] = list(partial.top_unit.reshape(S * M, -1))
        matches["topk_r"] = list(partial.top_r.reshape(S * M, -1).astype(np.float64))
        matches["n_train"] = np.repeat([len(tr) for tr, _ in self.splits], M)
        matches["n_test"] = np.repeat([len(te) for _, te in self.splits], M)
        layer_rows = pd.DataFrame({
            "neuron": np.tile(np.tile(ids, S), len(names)),
            "split": np.tile(split_col, len(names)),
            "layer": np.repeat(names, S * M),
            "unit": unit.ravel(),
            "train_r": train_r.ravel(),
            "test_r": test_r.ravel(),
        })
        return MatchResult(matches, layer_rows)


def _check_finite(values: torch.Tensor, block: UnitBlock) -> None:
    """Raise if any unit has a NaN/inf activation (a sum of squares or the values themselves)."""
    bad = ~torch.isfinite(values)
    if bad.ndim == 2:
        bad = bad.any(dim=0)
    if bool(bad.any()):
        units = (torch.nonzero(bad).flatten()[:5].cpu().numpy() + block.first_unit).tolist()
        raise ValueError(
            f"activations of layer {block.layer!r} contain NaN or inf (e.g. global units {units}); "
            f"check the model's outputs for that layer"
        )


def _unit_columns_t(a: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(dim=0)
    return a / a.norm(dim=0)


def _as_tensor(data, device: torch.device) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.to(device)
    a = np.asarray(data)
    if a.dtype.kind != "f":
        raise ValueError(f"activations must be float16 or float32; got {a.dtype}")
    if a.strides and any(st < 0 for st in a.strides):
        a = np.ascontiguousarray(a)
    return torch.from_numpy(a).to(device)


# ------------------------------------------------------------------------------------ public API
def default_block_units(n_images: int, budget_bytes: int = 128 << 20) -> int:
    """Units per block so the float32 working copy of a block takes about ``budget_bytes``."""
    return max(1024, (budget_bytes // (4 * max(n_images, 1))) // 1024 * 1024)


def stream_match(engine: MatchEngine, blocks: Iterable[UnitBlock], catalogue: UnitCatalogue,
                 neuron_ids: Sequence[str] | None = None, progress: bool = False) -> MatchResult:
    """Run the engine over a stream of blocks (memory, Zarr...) in one process."""
    from tqdm.auto import tqdm

    total = engine.empty()
    for block in tqdm(blocks, desc="matching", unit="block", disable=not progress):
        total = merge(total, engine.process(block))
    return engine.finalize(total, catalogue, neuron_ids)


def run_matching(activations, responses, splits, *, top_k: int = 5, block_units: int | None = None, device=None,
                 neuron_ids: Sequence[str] | None = None, dims=None, progress: bool = False) -> MatchResult:
    """Match every neuron to its best unit, with per-layer bests.

    Args:
        activations: (images, units) array, or ``{layer: (images, *unit_shape)}`` arrays
            (float16 or float32, numpy or torch).
        responses: (neurons, images) mean responses, images in the same order.
        splits: (train_idx, test_idx) pairs, e.g. :func:`core.splits.brainscore_splits`.
        top_k: candidates reported per (neuron, split).
        block_units: units per block (default: about 128 MiB of float32 per block).
        device: torch device for the products (default cuda when available).
        neuron_ids: names for the neuron column (default n000, n001, ...).
        dims: optional ``{layer: dim names}`` for unit coordinates (default by rank: channel / token,
            channel / channel, y, x).
        progress: show a progress bar.
    """
    from .units import as_layers, catalogue_of, iter_blocks

    layers = as_layers(activations)
    catalogue = catalogue_of(layers, dims)
    engine = MatchEngine(responses, splits, top_k=top_k, device=device)
    n_images = next(iter(layers.values())).shape[0]
    if n_images != engine.n_images:
        raise ValueError(f"activations have {n_images} images but responses have {engine.n_images}")
    size = block_units or default_block_units(n_images)
    return stream_match(engine, iter_blocks(layers, catalogue, size), catalogue, neuron_ids, progress)


def match_neurons(activations, responses, splits, *, top_k: int = 5, **kwargs) -> pd.DataFrame:
    """The best unit per (neuron, split) as a DataFrame; see :func:`run_matching` for the arguments.

    Columns: neuron, split, unit, layer, unit coordinates (channel, y, x, token... as the layers
    have them; -1 where not applicable), train_r, test_r (float64), second_r, gap, topk_unit,
    topk_r (float32 screening values), n_train, n_test.
    """
    return run_matching(activations, responses, splits, top_k=top_k, **kwargs).matches
