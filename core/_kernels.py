"""Fused CPU kernels (numba): one pass over the block where torch needs several.

The one-split CPU path (:meth:`core.engine.MatchEngine._tiled_products`) gathers a tile's train rows
from the block, casts them to float32 and sums their squares, a chunk of rows at a time, before each
chunk's GEMM. As torch ops that is three passes (a gather into a buffer, a cast, a square-and-add)
and a reduction; :func:`gather_rows` is one pass that reads the block's rows as stored and writes
the float32 chunk while the squares add up.

numba has no float16 type on the CPU: float16 blocks are read as their bits (``uint16``) and
converted exactly, the exponent and significand moved into a float32's bits and rescaled (normal
and subnormal values alike), infinities and NaNs carried over.
"""

from __future__ import annotations

import numba
import numpy as np

#: rows whose squares are summed in float32 before they are added to the float64 sums (adding every
#: square in float64 took half the kernel's time); each partial sum is rounded at most 15 times
_GROUP = 16
#: 2^112: a float16's exponent and significand bits moved into a float32's (13 places up), times this,
#: are its value (exponent biases 15 and 127)
_REBIAS = np.float32(2.0**112)


def gather_rows(values: np.ndarray, row_stride: int, first: int, rows: np.ndarray, shift: np.ndarray | None,
                out: np.ndarray, squares: np.ndarray) -> None:
    """``out[i] = float32(block[rows[i], first:first + w]) - shift`` and ``squares += sum_i out[i] ** 2``.

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
    """
    w = out.shape[1]
    if not (out.dtype == np.float32 and out.ndim == 2 and out.flags.c_contiguous and out.shape[0] in (len(rows), 1)
            and squares.dtype == np.float64 and squares.shape == (w,) and rows.dtype == np.int64
            and (shift is None or (shift.dtype == np.float32 and shift.shape == (w,)))
            and values.ndim == 1 and first >= 0 and first + w <= row_stride):
        raise ValueError(
            f"gather_rows: out {out.dtype}{out.shape}, squares {squares.dtype}{squares.shape}, "
            f"rows {rows.dtype}{rows.shape}, "
            f"shift {None if shift is None else (shift.dtype, shift.shape)}, columns {first}:{first + w} of "
            f"rows {row_stride} apart; expected float32 (rows or 1, w) C-contiguous, float64 (w,), int64, None or "
            f"float32 (w,), columns within a row"
        )
    if len(rows) and (rows.min() < 0 or rows.max() * row_stride + first + w > values.shape[0]):
        raise IndexError(f"gather_rows: rows {int(rows.min())}..{int(rows.max())} reach beyond the block's "
                         f"{-(-values.shape[0] // row_stride)} rows")
    if values.dtype == np.float16:
        scratch = np.empty(w, np.uint32)
        _gather(values.view(np.uint16), row_stride, first, rows, shift, out, squares,
                scratch, scratch.view(np.float32))
    elif values.dtype == np.float32:
        _gather(values, row_stride, first, rows, shift, out, squares, None, None)
    else:
        raise ValueError(f"gather_rows: values of dtype {values.dtype}; expected float16 or float32")


def _compiled(function):
    """``function`` compiled by numba on first use (no bounds checks, the GIL released), cached on
    disk where numba finds a writable place (beside this file, else the user's cache folder), else
    compiled anew in each process (about a second)."""
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available": a read-only install, no home
        return numba.njit(nogil=True, cache=False, boundscheck=False)(function)


@_compiled
def _gather(values, row_stride, first, rows, shift, out, squares, scratch, magnitude):  # pragma: no cover
    """:func:`gather_rows`' loop. ``scratch``: uint32 (w,) where ``values`` are float16 bits, and
    ``magnitude`` its float32 view; both None where the values are float32 (numba compiles each case
    apart, the other branch left out).

    float16 bits are converted exactly: exponent and significand moved 13 places up into a float32's
    and rescaled by 2^112 (normal and subnormal values alike), then infinities, NaNs and signs.
    """
    w = out.shape[1]
    partial = np.zeros(w, np.float32)
    n, last = rows.shape[0], out.shape[0] - 1
    for i in range(n):
        start = rows[i] * row_stride + first
        row = values[start:start + w]
        dest = out[min(i, last)]
        if scratch is not None:
            for j in range(w):
                scratch[j] = np.uint32(row[j] & 0x7FFF) << 13
            for j in range(w):
                h = row[j]
                v = magnitude[j] * _REBIAS
                e = h & 0x7FFF
                if e >= 0x7C00:  # infinity (significand 0) or NaN
                    v = np.float32(np.inf) if e == 0x7C00 else np.float32(np.nan)
                if h & 0x8000:
                    v = -v
                if shift is not None:
                    v -= shift[j]
                dest[j] = v
                partial[j] += v * v
        else:
            for j in range(w):
                v = row[j]
                if shift is not None:
                    v -= shift[j]
                dest[j] = v
                partial[j] += v * v
        if i % _GROUP == _GROUP - 1 or i == n - 1:
            for j in range(w):
                squares[j] += partial[j]
                partial[j] = 0.0
