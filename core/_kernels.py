"""Fused CPU kernels (numba): one pass over the block where torch needs several.

The one-split CPU path (:meth:`core.engine.MatchEngine._tiled_products`) gathers a tile's train rows
from the block, casts them to float32 and sums their squares, a chunk of rows at a time, before each
chunk's GEMM. As torch ops that is three passes (a gather into a buffer, a cast, a square-and-add)
and a reduction, and the unit sums a GEMM row of ones; :func:`gather_rows` is one pass that reads
the block's rows as stored and writes the float32 chunk while the squares and the values add up.
The smaller passes around it are fused the same way (torch's version of each took several passes,
and a few microseconds of Python each): the sparse-unit screen (:func:`screen_pairs`: pairs of
rows compared and the equal ones counted per split), the shift estimate (:func:`column_moments`) and
the block leaders' test r (:func:`column_r`). With several splits and a permutation null's many
neuron rows (:meth:`core.engine.MatchEngine._split_top_k`), :func:`split_top_k` reduces every
split's scores to their top k a cache-sized tile at a time, where torch wrote each split's scores
out and read them back for the scaling and the top k.

numba has no float16 type on the CPU, so float16 blocks are read as their bits (``uint16``) and
converted by LLVM's own half-to-float extension where the target converts in hardware (x86 with
F16C, one ``vcvtph2ps`` for a vector of values; ARM64), else exactly by moving the exponent and
significand into a float32's bits and rescaling (normal and subnormal values alike), infinities and
NaNs carried over. (Without F16C, LLVM's extension is a call into a runtime library that numba's
JIT does not link: the process crashes, so it is never compiled there.)
"""

from __future__ import annotations

import platform

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

#: rows whose squares (and values) are summed in float32 before they are added to the float64 sums
#: (adding every square in float64 took half the kernel's time; a multiple of :func:`_gather4`'s four
#: rows, so that :func:`_gather`, which takes the last few rows, flushes at its end only)
_GROUP = 16
#: 2^112: a float16's exponent and significand bits moved into a float32's (13 places up), times this,
#: are its value (exponent biases 15 and 127)
_REBIAS = np.float32(2.0**112)


def gather_rows(values: np.ndarray, row_stride: int, first: int, rows: np.ndarray, shift: np.ndarray | None,
                out: np.ndarray, squares: np.ndarray, sums: np.ndarray | None = None) -> None:
    """``out[i] = float32(block[rows[i], first:first + w]) - shift``, ``squares += sum_i out[i] ** 2``
    and ``sums += sum_i out[i]``.

    Args:
        values: the block flat, row ``r`` starting at ``r * row_stride``: float32, or float16 (read as
            its bits).
        row_stride: elements from one row's start to the next's.
        first: the first column read; ``w = out.shape[1]`` columns are read.
        rows: int64 row indices (each below the block's row count).
        shift: float32 (w,) subtracted from every value, or None.
        out: float32 (len(rows), w), C-contiguous: written; or (1, w), each row written over the
            last (for the squares alone: the row stays in cache).
        squares: float64 (w,): the squares of the rows' (shifted) values added to it, column by column.
        sums: float64 (w,): the rows' (shifted) values added to it, column by column; or None.
    """
    w = out.shape[1]
    if not (out.dtype == np.float32 and out.ndim == 2 and out.flags.c_contiguous and out.shape[0] in (len(rows), 1)
            and squares.dtype == np.float64 and squares.shape == (w,) and rows.dtype == np.int64
            and (shift is None or (shift.dtype == np.float32 and shift.shape == (w,)))
            and (sums is None or (sums.dtype == np.float64 and sums.shape == (w,)))
            and values.ndim == 1 and first >= 0 and first + w <= row_stride):
        raise ValueError(
            f"gather_rows: out {out.dtype}{out.shape}, squares {squares.dtype}{squares.shape}, "
            f"rows {rows.dtype}{rows.shape}, "
            f"shift {None if shift is None else f'{shift.dtype}{shift.shape}'}, "
            f"sums {None if sums is None else f'{sums.dtype}{sums.shape}'}, columns {first}:{first + w} of "
            f"rows {row_stride} apart; expected float32 (rows or 1, w) C-contiguous, float64 (w,), int64, None or "
            f"float32 (w,), None or float64 (w,), columns within a row"
        )
    if len(rows) and (rows.min() < 0 or rows.max() * row_stride + first + w > values.shape[0]):
        raise IndexError(f"gather_rows: rows {int(rows.min())}..{int(rows.max())} reach beyond the block's "
                         f"{_block_rows(values, row_stride)} rows")
    values = _readable(values, "gather_rows")
    # rows four at a time (:func:`_gather4`), the last few one at a time
    n4 = len(rows) - len(rows) % 4
    if n4:
        _gather4(values, row_stride, first, rows[:n4], shift, out[:n4] if len(out) > 1 else out, squares, sums)
    _gather(values, row_stride, first, rows[n4:], shift, out[n4:] if len(out) > 1 else out, squares, sums)


def screen_pairs(values: np.ndarray, row_stride: int, first: int, width: int, masks: np.ndarray,
                 needed: np.ndarray, out: np.ndarray) -> None:
    """The sparse-unit screen's pair test (:meth:`core.engine.MatchEngine._sparse_units`):
    ``out[j] = any_s (sum_p masks[s, p] * (x[2p, j] == x[2p + 1, j]) >= needed[s])`` for the block's
    columns ``first .. first + width``, the values compared as float32 (+0 equals -0, NaN equals
    nothing), as torch compares them in the block's own dtype.

    Args:
        values, row_stride: the block flat, as for :func:`gather_rows` (float16 or float32).
        masks: bool (splits, pairs): which image pairs (rows 2p and 2p + 1) count for each split.
        needed: int64 (splits,): the equal pairs that make a unit a candidate in that split.
        out: bool (width,): written.
    """
    if not (masks.dtype == np.bool_ and masks.ndim == 2 and needed.dtype == np.int64
            and needed.shape == (masks.shape[0],) and out.dtype == np.bool_ and out.shape == (width,)
            and values.ndim == 1 and first >= 0 and width >= 0 and first + width <= row_stride):
        raise ValueError(
            f"screen_pairs: masks {masks.dtype}{masks.shape}, needed {needed.dtype}{needed.shape}, "
            f"out {out.dtype}{out.shape}, columns {first}:{first + width} of rows {row_stride} apart; expected "
            f"bool (splits, pairs), int64 (splits,), bool (width,), columns within a row"
        )
    if masks.shape[1] and (2 * masks.shape[1] - 1) * row_stride + first + width > values.shape[0]:
        raise IndexError(f"screen_pairs: {masks.shape[1]} pairs need {2 * masks.shape[1]} rows; the block has "
                         f"{_block_rows(values, row_stride)}")
    _screen(_readable(values, "screen_pairs"), row_stride, first, width, masks, needed, out)


def column_moments(values: np.ndarray, row_stride: int, first: int, n_rows: int, sums: np.ndarray,
                   squares: np.ndarray) -> None:
    """Over the block's first ``n_rows`` rows, column by column: ``sums`` and ``squares`` (float64,
    (w,), written) of the values of columns ``first .. first + w`` (the engine's shift estimate)."""
    w = sums.shape[0]
    if not (sums.dtype == np.float64 and squares.dtype == np.float64 and sums.shape == (w,) == squares.shape
            and values.ndim == 1 and first >= 0 and first + w <= row_stride and n_rows >= 0):
        raise ValueError(
            f"column_moments: sums {sums.dtype}{sums.shape}, squares {squares.dtype}{squares.shape}, "
            f"columns {first}:{first + w} of rows {row_stride} apart, {n_rows} rows; expected float64 (w,) "
            f"twice, columns within a row, rows >= 0"
        )
    if n_rows and (n_rows - 1) * row_stride + first + w > values.shape[0]:
        raise IndexError(f"column_moments: {n_rows} rows reach beyond the block's "
                         f"{_block_rows(values, row_stride)}")
    _moments(_readable(values, "column_moments"), row_stride, first, n_rows, sums, squares)


def column_r(values: np.ndarray, row_stride: int, rows: np.ndarray, columns: np.ndarray, y: np.ndarray,
             out: np.ndarray) -> None:
    """Pearson r over the block's ``rows`` between column ``columns[m]`` and ``y[m]``, in float64:
    ``out[m]``; NaN where ``columns[m] < 0`` (no column) or the column is constant on those rows.

    Args:
        values, row_stride: the block flat, as for :func:`gather_rows` (float16 or float32).
        rows: int64 (n,) row indices.
        columns: int64 (m,) column indices, or -1.
        y: float64 (m, n): rows already centred and scaled to unit norm (NaN rows give NaN).
        out: float64 (m,): written.
    """
    m = columns.shape[0]
    if not (rows.dtype == np.int64 and columns.dtype == np.int64 and rows.ndim == 1 and columns.ndim == 1
            and y.dtype == np.float64 and y.shape == (m, rows.shape[0]) and out.dtype == np.float64
            and out.shape == (m,) and values.ndim == 1):
        raise ValueError(
            f"column_r: rows {rows.dtype}{rows.shape}, columns {columns.dtype}{columns.shape}, "
            f"y {y.dtype}{y.shape}, out {out.dtype}{out.shape}; expected int64 (n,), int64 (m,), "
            f"float64 (m, n), float64 (m,)"
        )
    if m and (columns.max() >= row_stride or (len(rows) and (rows.min() < 0 or rows.max() * row_stride
                                                            + columns.max() >= values.shape[0]))):
        span = f"rows {int(rows.min())}..{int(rows.max())}" if len(rows) else "no rows"
        raise IndexError(f"column_r: {span}, columns up to {int(columns.max())} reach beyond the block "
                         f"({row_stride} columns a row, {_block_rows(values, row_stride)} rows)")
    chosen = columns >= 0
    distinct, at = np.unique(columns[chosen], return_inverse=True)
    which = np.full(m, -1, np.int64)
    which[chosen] = at
    _column_r(_readable(values, "column_r"), row_stride, rows, distinct, which, y, out)


def split_top_k(products: np.ndarray, a: np.ndarray, od: np.ndarray, scale: np.ndarray, neg: np.ndarray,
                first_column: int, first_row: int, end_row: int, rows_per_tile: int, corr: np.ndarray,
                top_v: np.ndarray, top_u: np.ndarray) -> None:
    """The several-split path's scores merged into each row's top k, the scores never stored
    (:meth:`core.engine.MatchEngine._split_top_k`).

    For split ``s``, row ``i`` (``first_row <= i < end_row``) and column ``j`` of the ``w`` columns
    from ``first_column`` on, the score is ``products[i, j] * scale[s, j] - (a[s, i] @ odj) + neg[s, j]``,
    ``odj`` being column ``j - first_column`` of ``od[s]`` (tile ``(j - first_column) // TU``, column
    ``(j - first_column) % TU``). A tile of rows x ``TU`` columns at a time: the correction by one BLAS
    GEMM (numba's ``np.dot``) into ``corr``, then one pass over the tile's scores takes, per row, the
    maxima of 64 interleaved groups of columns (column ``j`` of a tile in group ``j % 64``: a vector
    loop), and only the groups whose maximum reaches the row's k-th best so far are read again, value
    by value, into the row's top k. Calls over successive column ranges accumulate.

    Args:
        products: float32 (rows, units), C-contiguous.
        a: float32 (splits, rows, K): each split's correction rows (zeros where a split has fewer).
        od: float32 (splits, tiles, K, TU): each split's correction columns for this call's columns,
            tile by tile (columns past them are not read back; rows past a split's own K must be
            zero, as ``a``'s columns there are).
        scale, neg: float32 (splits, units): the columns' scale, and 0 or -inf (never chosen).
        first_column: the first column scored; ``w = min(tiles * TU, units - first_column)``.
        first_row, end_row: the rows scored here; rows_per_tile: rows a GEMM at a time.
        corr: float32 (rows_per_tile, TU), C-contiguous: scratch.
        top_v, top_u: float32 and int64 (splits, rows, k), writeable: each row's k best scores so far,
            highest first (ties: the lower column first), and their columns, -inf and -1 in empty
            slots (fill them so before the first call): updated. Only scores above -inf are taken
            (never-chosen columns never are); a NaN score is never taken (the engine's blocks are
            finite, and so are their scores).
    """
    if not (a.ndim == 3 and od.ndim == 4 and products.ndim == 2 and top_v.ndim == 3):
        raise ValueError(f"split_top_k: products {products.shape}, a {a.shape}, od {od.shape}, top_v {top_v.shape}; "
                         f"expected 2, 3, 4 and 3 dimensions")
    S, M, K = a.shape
    U = products.shape[1]
    T, TU = od.shape[1], od.shape[3]
    k = top_v.shape[2]
    if not (products.dtype == a.dtype == od.dtype == scale.dtype == neg.dtype == corr.dtype == top_v.dtype == np.float32
            and products.shape[0] == M and products.flags.c_contiguous
            and od.shape[0] == S and od.shape[2] == K and 0 <= first_column < U and 0 < T and (T - 1) * TU < U - first_column
            and a.flags.c_contiguous and od.flags.c_contiguous and scale.shape == neg.shape == (S, U)
            and corr.shape == (rows_per_tile, TU) and corr.flags.c_contiguous and rows_per_tile > 0
            and top_v.shape[:2] == (S, M) and k > 0 and top_u.shape == top_v.shape and top_u.dtype == np.int64
            and top_v.flags.writeable and top_u.flags.writeable and 0 <= first_row <= end_row <= M):
        raise ValueError(
            f"split_top_k: products {products.dtype}{products.shape}, a {a.dtype}{a.shape}, od {od.dtype}{od.shape} "
            f"from column {first_column}, scale {scale.dtype}{scale.shape}, neg {neg.dtype}{neg.shape}, "
            f"corr {corr.dtype}{corr.shape}, top_v {top_v.dtype}{top_v.shape}, top_u {top_u.dtype}{top_u.shape}, "
            f"rows {first_row}:{end_row} by {rows_per_tile}; expected float32 (rows, units) C-contiguous, "
            f"(splits, rows, K), (splits, tiles, K, TU) with its last tile within the units, (splits, units) twice, "
            f"(rows_per_tile, TU), writeable float32 and int64 (splits, rows, k), rows within the products"
        )
    _split_top_k(products, a, od, scale, neg, first_column, first_row, end_row, rows_per_tile, corr, top_v, top_u)


def _block_rows(values: np.ndarray, row_stride: int) -> int:
    """The rows a flat block of ``row_stride`` values a row holds (its last may be cut short)."""
    return -(-values.shape[0] // row_stride)


def _readable(values: np.ndarray, name: str) -> np.ndarray:
    """The block's values as the kernels read them: float16 as its bits, float32 as it is."""
    if values.dtype == np.float16:
        return values.view(np.uint16)
    if values.dtype == np.float32:
        return values
    raise ValueError(f"{name}: values of dtype {values.dtype}; expected float16 or float32")


def _hardware_half() -> bool:
    """Does LLVM convert float16 to float32 in hardware on the target numba compiles for? x86 with
    F16C (the host's features, or ``NUMBA_CPU_FEATURES`` where set), and ARM64."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64"):
        return False
    if numba.config.CPU_FEATURES:
        return "+f16c" in numba.config.CPU_FEATURES.split(",")
    return bool(llvmlite.binding.get_host_cpu_features().get("f16c", False))


#: how :func:`_float32` converts float16 here (a constant of the compiled code; numba's disk cache
#: keeps the code of each CPU and feature set apart)
_HALF_IN_HARDWARE = _hardware_half()


def _compiled(function=None, *, fastmath=False):
    """``function`` compiled by numba on first use (no bounds checks, the GIL released), cached on
    disk where numba finds a writable place (beside this file, else the user's cache folder), else
    compiled anew in each process (about a second). ``fastmath``: numba's option (e.g.
    ``{"reassoc"}`` lets LLVM vectorise a sum by reordering it); used as ``@_compiled(fastmath=...)``."""
    if function is None:
        return lambda f: _compiled(f, fastmath=fastmath)
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=fastmath)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available": a read-only install, no home
        return numba.njit(nogil=True, cache=False, boundscheck=False, fastmath=fastmath)(function)


@intrinsic
def _extend_half(typingctx, bits):
    """float32 of a float16 given as its bits (uint16): LLVM's ``fpext half``."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bits are ``bits`` (uint32)."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@numba.njit(inline="always")
def _half_from_bits(h):  # pragma: no cover (compiled)
    """Exponent and significand moved 13 places up into a float32's and rescaled by 2^112 (normal and
    subnormal values alike), then infinities, NaNs and the sign."""
    e = h & 0x7FFF
    v = _float_from_bits(np.uint32(np.uint32(e) << 13)) * _REBIAS
    if e >= 0x7C00:  # infinity (significand 0) or NaN
        v = np.float32(np.inf) if e == 0x7C00 else np.float32(np.nan)
    return -v if h & 0x8000 else v


def _float32(v):
    """float32 of a value as the kernels read it: float16 bits (uint16) or a float32 (compiled only)."""
    raise NotImplementedError("compiled by numba only")


@overload(_float32, inline="always")
def _float32_compiled(v):
    if v == types.uint16:
        if _HALF_IN_HARDWARE:
            return lambda v: _extend_half(v)
        return lambda v: _half_from_bits(v)
    if v == types.float32:
        return lambda v: v
    return None


@_compiled
def _gather(values, row_stride, first, rows, shift, out, squares, sums):  # pragma: no cover
    """:func:`gather_rows`' loop, compiled apart for float16 bits and float32 ``values``, with and
    without ``shift`` and ``sums``."""
    w = out.shape[1]
    partial = np.zeros(w, np.float32)
    partial_sums = np.zeros(w if sums is not None else 0, np.float32)
    n, last = rows.shape[0], out.shape[0] - 1
    for i in range(n):
        start = rows[i] * row_stride + first
        row = values[start:start + w]
        dest = out[min(i, last)]
        for j in range(w):
            v = _float32(row[j])
            if shift is not None:
                v -= shift[j]
            dest[j] = v
            partial[j] += v * v
            if sums is not None:
                partial_sums[j] += v
        if i % _GROUP == _GROUP - 1 or i == n - 1:
            _flush(partial, squares, partial_sums, sums)


@_compiled
def _gather4(values, row_stride, first, rows, shift, out, squares, sums):  # pragma: no cover
    """:func:`_gather` for a multiple of four rows, read four at a time: four streams from memory in
    flight, where one row at a time leaves the core waiting at each row's start (a share's float32
    gather 1.2-1.3x faster on an Intel Xeon; float16 1.18x on an AMD EPYC; RESULTS.md)."""
    w = out.shape[1]
    partial = np.zeros(w, np.float32)
    partial_sums = np.zeros(w if sums is not None else 0, np.float32)
    n, last = rows.shape[0], out.shape[0] - 1
    for i in range(0, n, 4):
        # the rows as slices, indexed from 0: indexed as values[s0 + j], an index LLVM cannot prove
        # non-negative, the loop kept numba's wraparound and was vectorised as AVX-512 gathers
        # (vgatherqps), 1.7x slower on an AMD EPYC (Zen 4) VM, and float16 bits' conversions were
        # not vectorised at all (RESULTS.md)
        s0, s1 = rows[i] * row_stride + first, rows[i + 1] * row_stride + first
        s2, s3 = rows[i + 2] * row_stride + first, rows[i + 3] * row_stride + first
        r0, r1, r2, r3 = values[s0:s0 + w], values[s1:s1 + w], values[s2:s2 + w], values[s3:s3 + w]
        d0, d1 = out[min(i, last)], out[min(i + 1, last)]
        d2, d3 = out[min(i + 2, last)], out[min(i + 3, last)]
        for j in range(w):
            a, b, c, d = _float32(r0[j]), _float32(r1[j]), _float32(r2[j]), _float32(r3[j])
            if shift is not None:
                a, b, c, d = a - shift[j], b - shift[j], c - shift[j], d - shift[j]
            d0[j], d1[j], d2[j], d3[j] = a, b, c, d
            partial[j] += (a * a + b * b) + (c * c + d * d)
            if sums is not None:
                partial_sums[j] += (a + b) + (c + d)
        if (i + 4) % _GROUP == 0 or i + 4 == n:
            _flush(partial, squares, partial_sums, sums)


@numba.njit(inline="always")
def _flush(partial, squares, partial_sums, sums):  # pragma: no cover (compiled)
    """The float32 partial sums of a group of rows added to the float64 totals, and reset."""
    for j in range(partial.shape[0]):
        squares[j] += partial[j]
        partial[j] = 0.0
    if sums is not None:
        for j in range(partial.shape[0]):
            sums[j] += partial_sums[j]
            partial_sums[j] = 0.0


@_compiled
def _screen(values, row_stride, first, width, masks, needed, out):  # pragma: no cover
    """:func:`screen_pairs`' loop: equal pairs counted per split, a row pair at a time."""
    n_splits, n_pairs = masks.shape
    counts = np.zeros((n_splits, width), np.int64)
    for p in range(n_pairs):
        a = values[2 * p * row_stride + first:2 * p * row_stride + first + width]
        b = values[(2 * p + 1) * row_stride + first:(2 * p + 1) * row_stride + first + width]
        for s in range(n_splits):
            if masks[s, p]:
                count = counts[s]
                for j in range(width):
                    count[j] += _float32(a[j]) == _float32(b[j])
    for j in range(width):
        candidate = False
        for s in range(n_splits):
            candidate |= counts[s, j] >= needed[s]
        out[j] = candidate


@_compiled
def _moments(values, row_stride, first, n_rows, sums, squares):  # pragma: no cover
    """:func:`column_moments`' loop."""
    w = sums.shape[0]
    sums[:] = 0.0
    squares[:] = 0.0
    for i in range(n_rows):
        row = values[i * row_stride + first:i * row_stride + first + w]
        for j in range(w):
            v = np.float64(_float32(row[j]))
            sums[j] += v
            squares[j] += v * v


@_compiled
def _column_r(values, row_stride, rows, distinct, which, y, out):  # pragma: no cover
    """:func:`column_r`' loop: each distinct column's values gathered a row at a time (float64; within
    a row they are close together, where a column at a time touches a new page with every value),
    centred and normed once, then each output's dot product with its y row. A permutation null's
    thousands of rows share the block's few distinct columns: gathering per output instead wrote
    rows x outputs values (66 MB a split for 25,856 rows and 320 test images)."""
    n, d = rows.shape[0], distinct.shape[0]
    x = np.empty((d, n), np.float64)
    for i in range(n):
        row = values[rows[i] * row_stride:rows[i] * row_stride + row_stride]
        for c in range(d):
            x[c, i] = np.float64(_float32(row[distinct[c]]))
    norm = np.empty(d, np.float64)
    for c in range(d):
        total = 0.0
        for i in range(n):
            total += x[c, i]
        mean = total / n if n else 0.0
        ss = 0.0
        for i in range(n):
            v = x[c, i] - mean
            x[c, i] = v
            ss += v * v
        norm[c] = np.sqrt(ss)
    for m in range(which.shape[0]):
        c = which[m]
        if c < 0 or n == 0 or not norm[c] > 0.0:
            out[m] = np.nan
            continue
        out[m] = _dot64(x[c], y[m]) / norm[c]


@_compiled(fastmath={"reassoc", "contract"})
def _dot64(a, b):  # pragma: no cover
    """Dot product summed in float64 (reordered, multiplies and adds contracted, so that it vectorises);
    also the decoders' compiled phase's (:mod:`core._logreg_kernel`)."""
    total = 0.0
    for i in range(a.shape[0]):
        total += a[i] * b[i]
    return total


#: interleaved column groups of :func:`split_top_k`'s pass (a vector loop over them: LLVM vectorises
#: the maxima's loop only when it runs at least 32 times)
_LANES = 64


@_compiled
def _insert(top_v, top_u, v, column):  # pragma: no cover
    """``v`` at ``column`` into a row's top k (highest first; ties: the lower column first), if it belongs
    (-inf, a never-chosen column, and NaN never do)."""
    k = top_v.shape[0]
    if not (v > -np.inf and (v > top_v[k - 1] or (v == top_v[k - 1] and (top_u[k - 1] < 0 or column < top_u[k - 1])))):
        return
    p = k - 1
    while p > 0 and (v > top_v[p - 1] or (v == top_v[p - 1] and column < top_u[p - 1])):
        top_v[p] = top_v[p - 1]
        top_u[p] = top_u[p - 1]
        p -= 1
    top_v[p] = v
    top_u[p] = column


@_compiled
def _split_top_k(products, a, od, scale, neg, first_column, first_row, end_row, rows_per_tile, corr,
                 top_v, top_u):  # pragma: no cover
    """:func:`split_top_k`'s loops: tiles of columns, then of rows, then splits (a tile of products
    read from memory once for every split; each split's correction columns for the tile stay in cache
    over its rows)."""
    S = a.shape[0]
    T, TU = od.shape[1], od.shape[3]
    U = products.shape[1]
    k = top_v.shape[2]
    maxima = np.empty(_LANES, np.float32)
    for t in range(T):
        u0 = first_column + t * TU
        w = min(TU, U - u0)
        n_q = w // _LANES
        whole = n_q * _LANES
        for r0 in range(first_row, end_row, rows_per_tile):
            r1 = min(r0 + rows_per_tile, end_row)
            c = corr[:r1 - r0]
            for s in range(S):
                np.dot(a[s, r0:r1], od[s, t], c)
                sc = scale[s, u0:u0 + w]
                nv = neg[s, u0:u0 + w]
                for i in range(r1 - r0):
                    p_row = products[r0 + i, u0:u0 + w]
                    c_row = c[i]
                    tv = top_v[s, r0 + i]
                    tu = top_u[s, r0 + i]
                    for g in range(_LANES):
                        maxima[g] = -np.inf
                    for q in range(n_q):
                        o = q * _LANES
                        p_q, c_q, s_q, z_q = p_row[o:o + _LANES], c_row[o:o + _LANES], sc[o:o + _LANES], nv[o:o + _LANES]
                        for g in range(_LANES):
                            v = p_q[g] * s_q[g] - c_q[g] + z_q[g]
                            maxima[g] = v if v > maxima[g] else maxima[g]
                    for g in range(_LANES):
                        if maxima[g] > -np.inf and maxima[g] >= tv[k - 1]:
                            for q in range(n_q):
                                j = q * _LANES + g
                                _insert(tv, tu, p_row[j] * sc[j] - c_row[j] + nv[j], u0 + j)
                    for j in range(whole, w):
                        _insert(tv, tu, p_row[j] * sc[j] - c_row[j] + nv[j], u0 + j)
