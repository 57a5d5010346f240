"""The numba kernels against independent references: the one-split CPU path's fused passes
(core/_kernels.py) against numpy, and the decoders' compiled float32 L-BFGS phase
(core/_logreg_kernel.py) against float64 numpy and torch's phase of the same algorithm.

The GPU session's suite leaves this file out (its machine has no numba; the code falls back to
torch's ops there, which the other test files cover)."""

import logging
import platform
import sys

import numpy as np
import pytest

from unitmatch.core import _kernels


def _gather(block: np.ndarray, first: int, w: int, rows: np.ndarray, shift=None):
    """The kernel's rows, sums of squares and sums (the same rows gathered again without sums: the
    same rows and squares)."""
    out = np.full((len(rows), w), np.nan, np.float32)
    squares, sums = np.full(w, 0.25), np.full(w, -0.5)  # added to, not overwritten
    _kernels.gather_rows(block.reshape(-1), block.shape[1], first, rows, shift, out, squares, sums)
    again, squares_again = np.full_like(out, np.nan), np.full(w, 0.25)
    _kernels.gather_rows(block.reshape(-1), block.shape[1], first, rows, shift, again, squares_again)
    np.testing.assert_array_equal(again, out)
    np.testing.assert_array_equal(squares_again, squares)
    return out, squares - 0.25, sums + 0.5


def _every_float16() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)


def _assert_cast_as_numpy(out: np.ndarray, block: np.ndarray) -> None:
    want = block.astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out.view(np.uint32)[~nan], want.view(np.uint32)[~nan])  # signs of zeros too


def test_every_float16_value_is_cast_exactly():
    """All 65,536 float16 bit patterns (normal, subnormal, signed zeros, infinities, NaNs) cast as
    numpy casts them, bit for bit where numbers (NaN stays NaN), by the conversion this machine's
    kernel was compiled with."""
    block = _every_float16().reshape(256, 256)
    for rows in (np.arange(256, dtype=np.int64), np.arange(1, 256, dtype=np.int64)):  # 255: both loops
        out, _, _ = _gather(block, 0, 256, rows)
        _assert_cast_as_numpy(out, block[rows])


def test_the_bit_moving_conversion_is_exact_too():
    """The conversion compiled where LLVM has no hardware float16 conversion (x86 without F16C), run
    here on all 65,536 patterns."""
    import numba

    @numba.njit
    def convert(bits, out):
        for i in range(bits.shape[0]):
            out[i] = _kernels._half_from_bits(bits[i])

    values = _every_float16()
    out = np.empty(values.shape, np.float32)
    convert(values.view(np.uint16), out)
    _assert_cast_as_numpy(out, values)


@pytest.mark.parametrize("machine, features, host_f16c, want", [
    ("x86_64", "", True, True),
    ("x86_64", "", False, False),
    ("x86_64", "+sse2,+avx,+f16c", False, True),  # NUMBA_CPU_FEATURES, not the host, decides
    ("x86_64", "+sse2,+avx,-f16c", True, False),
    ("aarch64", "", False, True),
    ("ppc64le", "", True, False),
])
def test_hardware_conversion_only_where_llvm_has_it(monkeypatch, machine, features, host_f16c, want):
    """LLVM's float16 extension without F16C calls a runtime function numba does not link (the
    process crashes): it is chosen only for x86 targets with F16C and for ARM64."""
    import llvmlite.binding
    import numba

    monkeypatch.setattr(_kernels.platform, "machine", lambda: machine)
    monkeypatch.setattr(numba.config, "CPU_FEATURES", features)
    monkeypatch.setattr(llvmlite.binding, "get_host_cpu_features", lambda: {"f16c": host_f16c})
    assert _kernels._hardware_half() is want


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shifted", [False, True])
def test_rows_gathered_cast_shifted_and_squared_as_numpy(dtype, shifted):
    """Unsorted, repeated rows of a column range that starts inside a row, over more rows than one
    float32 partial sum (``_GROUP``): the chunk equals numpy's float32 ``block[rows, cols] - shift``
    and the squares and sums its float64 sums of squares and sums to 1e-6 (of the sum of |values|)."""
    rng = np.random.default_rng(0)
    block = (rng.standard_normal((300, 90)) * np.exp(rng.uniform(-8, 8, (300, 90)))).astype(dtype)
    rows = rng.integers(0, 300, 123).astype(np.int64)
    first, w = 7, 61
    shift = rng.standard_normal(w).astype(np.float32) * 10 if shifted else None
    out, squares, sums = _gather(block, first, w, rows, shift)
    want = block[rows, first:first + w].astype(np.float32)
    if shifted:
        want = want - shift
    np.testing.assert_array_equal(out, want)
    ref = (want.astype(np.float64) ** 2).sum(axis=0)
    np.testing.assert_allclose(squares, ref, rtol=1e-6, atol=0)
    scale = np.abs(want.astype(np.float64)).sum(axis=0)
    assert (np.abs(sums - want.astype(np.float64).sum(axis=0)) <= 1e-6 * scale).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n_rows", [0, 1, 3, 4, 5, 16, 17, 20])
def test_rows_four_at_a_time_and_the_rest_one_at_a_time(dtype, n_rows):
    """Rows are read four at a time and the remainder one at a time: every count around the
    multiples of four and of ``_GROUP`` gathers numpy's rows and float64 sums of squares."""
    rng = np.random.default_rng(n_rows)
    block = rng.standard_normal((40, 50)).astype(dtype)
    rows = rng.integers(0, 40, n_rows).astype(np.int64)
    out, squares, sums = _gather(block, 3, 45, rows)
    want = block[rows, 3:48].astype(np.float32)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_allclose(squares, (want.astype(np.float64) ** 2).sum(axis=0), rtol=1e-6, atol=0)
    scale = np.abs(want.astype(np.float64)).sum(axis=0)
    assert (np.abs(sums - want.astype(np.float64).sum(axis=0)) <= 1e-6 * scale).all()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 assembly")
@pytest.mark.parametrize("shifted", [False, True])
def test_the_gather_loops_compile_without_vector_gather_instructions(shifted):
    """The row loops read each row's values one after the other: compiled for this x86 CPU, no loop
    uses AVX2/AVX-512 gathers (``vgather*``), which index value by value. (``values[start + j]``,
    an index LLVM cannot prove non-negative, kept numba's wraparound and compiled to gathers: the
    float32 gather 1.7x slower on an AMD EPYC; benchmarks/RESULTS.md.) Compiled afresh (numba
    shows no assembly of cached code)."""
    import numba

    block = np.arange(40 * 50, dtype=np.float32)
    rows = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int64)
    shift = np.ones(45, np.float32) if shifted else None
    half = block.astype(np.float16).view(np.uint16)  # float16 values as the kernels read them
    for loop, values in ((_kernels._gather4, block), (_kernels._gather, block), (_kernels._gather4, half),
                         (_kernels._gather, half)):
        fresh = numba.njit(nogil=True, boundscheck=False)(loop.py_func)
        for sums in (None, np.zeros(45)):
            fresh(values, 50, 3, rows, shift, np.empty((8, 45), np.float32), np.zeros(45), sums)
        for signature, asm in fresh.inspect_asm().items():
            assert "vgather" not in asm, f"{loop.__name__} {signature} compiles to vector gathers"


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n_rows", [36, 37])
def test_a_one_row_out_gives_the_same_squares(dtype, n_rows):
    """The squares alone (the engine's check of the rows outside the train set): every row cast
    into one row of ``out``, the last row's values left there (read four at a time and the last
    few one at a time), the same sums of squares."""
    rng = np.random.default_rng(1)
    block = rng.standard_normal((50, 30)).astype(dtype)
    rows = rng.permutation(50)[:n_rows].astype(np.int64)
    full, squares, _ = _gather(block, 2, 20, rows)
    one, squares_one = np.zeros((1, 20), np.float32), np.zeros(20)
    _kernels.gather_rows(block.reshape(-1), 30, 2, rows, None, one, squares_one)
    np.testing.assert_array_equal(squares_one, squares)
    np.testing.assert_array_equal(one[0], full[-1])


def test_non_finite_values_reach_the_squares():
    """A NaN or an infinity in a gathered float16 row makes its column's sum of squares non-finite
    (what the engine's check reads)."""
    block = np.ones((40, 8), np.float16)
    block[3, 1], block[30, 5], block[31, 6] = np.nan, np.inf, -np.inf
    _, squares, _ = _gather(block, 0, 8, np.arange(40, dtype=np.int64))
    assert np.isnan(squares[1]) and np.isinf(squares[5]) and np.isinf(squares[6])
    assert np.isfinite(np.delete(squares, [1, 5, 6])).all()


@pytest.mark.parametrize("case, error", [
    ("out float64", "expected float32 \\(rows or 1, w\\) C-contiguous"),
    ("out not contiguous", "expected float32 \\(rows or 1, w\\) C-contiguous"),
    ("out of 2 rows for 4", "out float32\\(2, 8\\)"),
    ("rows int32", "rows int32"),
    ("squares float32", "squares float32"),
    ("sums of 7 columns", "sums float64\\(7,\\)"),
    ("sums float32", "sums float32\\(8,\\)"),
    ("columns past the row", "columns 5:13 of rows 10 apart"),
    ("row past the block", "rows 0..12 reach beyond the block's 12 rows"),
    ("negative row", "rows -1..3 reach beyond"),
    ("float64 block", "values of dtype float64; expected float16 or float32"),
])
def test_bad_arguments_are_refused_with_what_was_given(case, error):
    """The kernel reads and writes without bounds checks, so its wrapper refuses arguments that do not
    fit, naming them, before anything is read."""
    block = np.zeros((12, 10), np.float16)
    rows = np.arange(4, dtype=np.int64)
    out, squares, sums, first = np.zeros((4, 8), np.float32), np.zeros(8), None, 0
    if case == "out float64":
        out = out.astype(np.float64)
    elif case == "out of 2 rows for 4":
        out = np.zeros((2, 8), np.float32)
    elif case == "out not contiguous":
        out = np.zeros((4, 16), np.float32)[:, ::2]
    elif case == "rows int32":
        rows = rows.astype(np.int32)
    elif case == "squares float32":
        squares = squares.astype(np.float32)
    elif case == "sums of 7 columns":
        sums = np.zeros(7)
    elif case == "sums float32":
        sums = np.zeros(8, np.float32)
    elif case == "columns past the row":
        first = 5
    elif case == "row past the block":
        rows = np.array([0, 12, 2, 3], np.int64)
    elif case == "negative row":
        rows = np.array([0, 3, -1, 2], np.int64)
    elif case == "float64 block":
        block = block.astype(np.float64)
    with pytest.raises((ValueError, IndexError), match=error):
        _kernels.gather_rows(block.reshape(-1), 10, first, rows, None, out, squares, sums)


def _screen_torch(block: np.ndarray, masks: np.ndarray, needed: np.ndarray) -> np.ndarray:
    """The engine's torch screen: equal pairs compared in the block's dtype, counted with the masks."""
    import torch

    pairs = torch.from_numpy(block[: 2 * masks.shape[1]])
    equal = (pairs[0::2] == pairs[1::2]).to(torch.float32)
    counts = torch.from_numpy(masks.astype(np.float32)) @ equal
    return (counts >= torch.from_numpy(needed.astype(np.float32))[:, None]).any(dim=0).numpy()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_the_pair_screen_agrees_with_torchs(dtype):
    """Units with many equal pairs (zeros, +0 against -0, repeated values), NaNs (equal to nothing),
    three splits with their own pairs and thresholds, a column range inside the rows: the screen's
    candidates are torch's."""
    rng = np.random.default_rng(4)
    n_rows, n_cols, n_pairs = 60, 200, 25
    block = rng.standard_normal((n_rows, n_cols)).astype(dtype)
    sparse = rng.random((n_rows, n_cols)) < np.linspace(0, 1, n_cols)  # from dense to almost all equal
    block[sparse] = 0
    block[::2, 150:160] = -0.0  # -0 against +0: equal
    block[:, 160:170] = 3.0
    block[rng.random((n_rows, n_cols)) < 0.03] = np.nan
    masks = rng.random((3, n_pairs)) < 0.7
    needed = np.array([masks[0].sum() - 2, masks[1].sum(), 5], np.int64)
    first, width = 13, 171
    got = np.zeros(width, bool)
    _kernels.screen_pairs(block.reshape(-1), n_cols, first, width, masks, needed, got)
    want = _screen_torch(block[:, first:first + width], masks, needed)
    np.testing.assert_array_equal(got, want)
    assert 0 < got.sum() < width  # both kinds of unit


@pytest.mark.parametrize("case, error", [
    ("masks float", "masks float32"),
    ("needed int32", "needed int32"),
    ("out too short", "out bool\\(7,\\)"),
    ("columns past the row", "columns 4:12 of rows 10 apart"),
    ("too many pairs", "7 pairs need 14 rows; the block has 12"),
    ("float64 block", "values of dtype float64; expected float16 or float32"),
])
def test_bad_screen_arguments_are_refused(case, error):
    block = np.zeros((12, 10), np.float16)
    masks, needed, out, first, width = np.ones((2, 5), bool), np.array([3, 4]), np.zeros(8, bool), 0, 8
    if case == "masks float":
        masks = masks.astype(np.float32)
    elif case == "needed int32":
        needed = needed.astype(np.int32)
    elif case == "out too short":
        out = np.zeros(7, bool)
    elif case == "columns past the row":
        first = 4
    elif case == "too many pairs":
        masks = np.ones((2, 7), bool)
    elif case == "float64 block":
        block = block.astype(np.float64)
    with pytest.raises((ValueError, IndexError), match=error):
        _kernels.screen_pairs(block.reshape(-1), 10, first, width, masks, needed, out)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_column_moments_are_numpys_float64_sums(dtype):
    rng = np.random.default_rng(5)
    block = (rng.standard_normal((70, 40)) * 100 + 1000).astype(dtype)
    sums, squares = np.full(31, np.nan), np.full(31, np.nan)
    _kernels.column_moments(block.reshape(-1), 40, 6, 64, sums, squares)
    head = block[:64, 6:37].astype(np.float64)
    np.testing.assert_allclose(sums, head.sum(axis=0), rtol=1e-13)
    np.testing.assert_allclose(squares, (head * head).sum(axis=0), rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_column_r_is_numpys_float64_pearson_r(dtype):
    """Unsorted rows, repeated columns, a column constant on the rows (NaN), no column (-1, NaN) and a
    constant y row (NaN)."""
    rng = np.random.default_rng(6)
    block = rng.standard_normal((90, 50)).astype(dtype)
    rows = rng.permutation(90)[:33].astype(np.int64)
    block[rows, 7] = 2.5
    columns = np.array([3, 7, 49, -1, 3, 20], np.int64)
    y = rng.standard_normal((6, 33))
    y[5] = 1.0
    y -= y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        y /= np.sqrt((y * y).sum(axis=1, keepdims=True))
    r = np.full(6, 7.0)
    _kernels.column_r(block.reshape(-1), 50, rows, columns, y, r)
    want = np.full(6, np.nan)
    for m in (0, 2, 4):
        want[m] = np.corrcoef(block[rows, columns[m]].astype(np.float64), y[m])[0, 1]
    np.testing.assert_allclose(r, want, rtol=1e-12, atol=1e-14)
    assert np.isnan(r[[1, 3, 5]]).all()


@pytest.mark.parametrize("call, error", [
    (lambda b: _kernels.column_moments(b, 10, 0, 4, np.zeros(8, np.float32), np.zeros(8)), "sums float32"),
    (lambda b: _kernels.column_moments(b, 10, 3, 4, np.zeros(8), np.zeros(8)), "columns 3:11 of rows 10"),
    (lambda b: _kernels.column_moments(b, 10, 0, 13, np.zeros(8), np.zeros(8)), "13 rows reach beyond"),
    (lambda b: _kernels.column_r(b, 10, np.arange(4), np.arange(2), np.zeros((2, 3)), np.zeros(2)),
     "y float64\\(2, 3\\)"),
    (lambda b: _kernels.column_r(b, 10, np.arange(4), np.array([1, 10]), np.zeros((2, 4)), np.zeros(2)),
     "columns up to 10 reach beyond"),
    (lambda b: _kernels.column_r(b, 10, np.array([0, 12]), np.arange(2), np.zeros((2, 2)), np.zeros(2)),
     "rows 0..12"),
    (lambda b: _kernels.column_r(b, 10, np.zeros(0, np.int64), np.array([11]), np.zeros((1, 0)), np.zeros(1)),
     "no rows, columns up to 11 reach beyond"),
    (lambda b: _kernels.column_r(b.astype(np.float64), 10, np.arange(2), np.arange(2), np.zeros((2, 2)),
                                 np.zeros(2)), "column_r: values of dtype float64"),
])
def test_bad_moment_and_r_arguments_are_refused(call, error):
    with pytest.raises((ValueError, IndexError), match=error):
        call(np.zeros(120, np.float16))


# ------------------------------------------- the several-split path's fused scores and top k (split_top_k)
def _split_case(rows=41, units=300, splits=3, widths=(7, 5, 7), tile=96, seed=8):
    """Products, each split's correction rows (zero past its own width) and columns (tiled, zero
    padded), scales and never-chosen columns, and the float64 scores they stand for."""
    rng = np.random.default_rng(seed)
    width = max(widths)
    products = rng.standard_normal((rows, units)).astype(np.float32)
    a = np.zeros((splits, rows, width), np.float32)
    o = np.zeros((splits, width, units), np.float32)
    for s, w in enumerate(widths):
        a[s, :, :w] = rng.standard_normal((rows, w))
        o[s, :w] = rng.standard_normal((w, units))
    scale = rng.uniform(0.5, 2.0, (splits, units)).astype(np.float32)
    neg = np.zeros((splits, units), np.float32)
    neg[:, 13::29] = -np.inf  # never chosen
    scale[neg == -np.inf] = 0.0
    n_tiles = -(-units // tile)
    od = np.full((splits, n_tiles, width, tile), np.nan, np.float32)  # past the units: never read back
    padded = np.zeros((splits, width, n_tiles * tile), np.float32)
    padded[:, :, :units] = o * scale[:, None, :]
    od[:] = padded.reshape(splits, width, n_tiles, tile).transpose(0, 2, 1, 3)
    od[:, -1, :, units - (n_tiles - 1) * tile:] = np.nan
    want = (products.astype(np.float64)[None] * scale[:, None, :]
            - np.einsum("srk,sku->sru", a.astype(np.float64), od_columns(od, units)) + neg[:, None, :])
    return products, a, od, scale, neg, want


def od_columns(od, units):
    """(splits, K, units) back from the tiled correction columns."""
    splits, n_tiles, width, tile = od.shape
    return od.transpose(0, 2, 1, 3).reshape(splits, width, n_tiles * tile)[:, :, :units].astype(np.float64)


def _split_top_k(products, a, od, scale, neg, k, bounds=None, rows_per_tile=5, column_tiles=None):
    """The kernel over row shares (``bounds``) and over successive column ranges of ``column_tiles``
    tiles each (None: all at once), accumulating into one top k."""
    splits, rows = a.shape[:2]
    top_v = np.full((splits, rows, k), -np.inf, np.float32)
    top_u = np.full((splits, rows, k), -1, np.int64)
    corr = np.full((rows_per_tile, od.shape[3]), np.nan, np.float32)
    step = column_tiles or od.shape[1]
    for t0 in range(0, od.shape[1], step):
        tiles = np.ascontiguousarray(od[:, t0:t0 + step])
        for r0, r1 in bounds or [(0, rows)]:
            _kernels.split_top_k(products, a, tiles, scale, neg, t0 * od.shape[3], r0, r1, rows_per_tile, corr,
                                 top_v, top_u)
    return top_v, top_u


@pytest.mark.parametrize("units, tile, rows_per_tile, column_tiles", [
    (300, 96, 5, None), (300, 96, 5, 2), (300, 64, 41, None), (300, 64, 41, 1), (70, 128, 3, None),
    (40, 96, 8, None)], ids=["tiles-and-a-rest", "two-column-ranges", "whole-tiles", "a-range-a-tile",
                             "one-partial-tile", "fewer-than-a-group"])
def test_split_top_k_is_the_float64_top_k(units, tile, rows_per_tile, column_tiles):
    """Each split's k best scores and columns (float64 reference, the float32 scores within 1e-5),
    over tiles of units and of rows that do not divide the block, calls over successive column
    ranges accumulating, splits of different widths; the never-chosen columns are never taken."""
    products, a, od, scale, neg, want = _split_case(units=units, tile=tile)
    k = 4
    top_v, top_u = _split_top_k(products, a, od, scale, neg, k, rows_per_tile=rows_per_tile,
                                column_tiles=column_tiles)
    order = np.argsort(-want, axis=2, kind="stable")[:, :, :k]
    np.testing.assert_allclose(top_v, np.take_along_axis(want, order, axis=2), rtol=0, atol=1e-5)
    gaps = -np.diff(np.sort(want, axis=2)[:, :, ::-1][:, :, :k + 1], axis=2)  # where no two are within rounding
    clear = (gaps > 1e-4).all(axis=2)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(top_u[clear], order[clear])
    assert not np.isin(top_u, np.flatnonzero(neg[0] == -np.inf)).any()


def test_split_top_k_ties_rows_short_of_k_and_row_shares():
    """Equal scores: the lower column first (here two identical columns); a row with fewer than k
    choosable units ends in -inf / -1; two calls over shares of the rows write what one call does."""
    products, a, od, scale, neg, want = _split_case(rows=12, units=200, splits=2, widths=(4, 4), tile=64)
    products[:, 150] = products[:, 20]  # the same products, correction columns and scale: the same score
    scale[:, 150] = scale[:, 20]
    od[:, 150 // 64, :, 150 % 64] = od[:, 20 // 64, :, 20 % 64]
    products[3, 20] = products[3, 150] = 1e4  # row 3's best, twice
    # within one tile, the higher column read first: 65 is in group 1 of tile 1, 66 in group 2
    # (read later), 127 in group 63; 66 and 127 the same unit as 65
    for j in (66, 127):
        products[:, j] = products[:, 65]
        scale[:, j] = scale[:, 65]
        od[:, 1, :, j - 64] = od[:, 1, :, 1]
    products[7, [65, 66, 127]] = 1e4
    k = 3
    top_v, top_u = _split_top_k(products, a, od, scale, neg, k)
    assert (top_u[:, 3, :2] == [20, 150]).all() and (top_v[:, 3, 0] == top_v[:, 3, 1]).all()
    assert (top_u[:, 7] == [65, 66, 127]).all() and (top_v[:, 7, 0] == top_v[:, 7, 2]).all()
    few = neg.copy()
    few[:, 2:] = -np.inf  # two choosable units: k = 3 leaves one slot empty
    v, u = _split_top_k(products, a, od, scale, few, k)
    assert (u[:, :, 2] == -1).all() and np.isneginf(v[:, :, 2]).all() and (u[:, :, :2] >= 0).all()
    shared = _split_top_k(products, a, od, scale, neg, k, bounds=[(0, 5), (5, 12)])
    np.testing.assert_array_equal(shared[0], top_v)
    np.testing.assert_array_equal(shared[1], top_u)


@pytest.mark.parametrize("change, error", [
    (lambda c: c.update(products=c["products"].astype(np.float64)), "products float64"),
    (lambda c: c.update(od=c["od"][:, ::2]), r"od float32\(2, 2, 4, 64\) from column 0"),  # not contiguous
    (lambda c: c.update(first_column=10), "from column 10"),  # its 4th tile would start past the units
    (lambda c: c.update(first_column=200), "from column 200"),
    (lambda c: c.update(a=c["a"][0]), "expected 2, 3, 4 and 3 dimensions"),
    (lambda c: c["top_v"].setflags(write=False), "writeable float32"),
    (lambda c: c.update(scale=c["scale"][:, :-1]), r"scale float32\(2, 199\)"),
    (lambda c: c.update(corr=np.zeros((5, 32), np.float32)), r"corr float32\(5, 32\)"),
    (lambda c: c.update(end_row=13), "rows 0:13 by 5"),
    (lambda c: c.update(top_u=c["top_u"].astype(np.int32)), "top_u int32"),
])
def test_bad_split_top_k_arguments_are_refused(change, error):
    products, a, od, scale, neg, _ = _split_case(rows=12, units=200, splits=2, widths=(4, 4), tile=64)
    case = dict(products=products, a=a, od=od, scale=scale, neg=neg, first_column=0, first_row=0, end_row=12,
                rows_per_tile=5,
                corr=np.zeros((5, 64), np.float32), top_v=np.zeros((2, 12, 3), np.float32),
                top_u=np.zeros((2, 12, 3), np.int64))
    change(case)
    with pytest.raises(ValueError, match=error):
        _kernels.split_top_k(**case)


def test_the_kernel_compiles_where_numba_has_no_writable_cache(monkeypatch):
    """A read-only install with no writable home: numba cannot cache the kernel on disk (it refuses
    at import), so the kernel is compiled without a cache, and works the same."""
    import importlib

    import numba.core.caching

    def nowhere(self):
        raise OSError("read-only")

    from unitmatch import core

    monkeypatch.setattr(numba.core.caching._CacheLocator, "ensure_cache_path", nowhere)
    monkeypatch.delitem(sys.modules, "unitmatch.core._kernels")
    monkeypatch.setattr(core, "_kernels", _kernels)  # the package's attribute restored afterwards too
    fresh = importlib.import_module("unitmatch.core._kernels")
    assert fresh is not _kernels
    assert isinstance(fresh._gather._cache, numba.core.caching.NullCache)  # no disk cache
    assert not isinstance(_kernels._gather._cache, numba.core.caching.NullCache)  # where one is writable
    block = np.arange(60, dtype=np.float16).reshape(6, 10)
    out, squares = np.zeros((2, 4), np.float32), np.zeros(4)
    fresh.gather_rows(block.reshape(-1), 10, 3, np.array([5, 1], np.int64), None, out, squares)
    np.testing.assert_array_equal(out, block[[5, 1], 3:7].astype(np.float32))
    np.testing.assert_array_equal(squares, (block[[5, 1], 3:7].astype(np.float64) ** 2).sum(axis=0))


def test_without_numba_the_engine_uses_torchs_ops_and_says_so(monkeypatch, caplog):
    """numba is a declared dependency; where it cannot be imported the one-split CPU path falls back
    to torch's ops (one warning), and scores the same."""
    import torch

    from unitmatch import core
    from unitmatch.core import engine as engine_module
    from unitmatch.core.engine import MatchEngine
    from unitmatch.core.units import UnitBlock

    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((400, 3000)), 0).astype(np.float16)
    y = x[:, [10, 2000]].T.astype(np.float64) + 0.1 * rng.standard_normal((2, 400))
    splits = core.brainscore_splits(n_images=400, n_splits=1, stratify=None)
    assert engine_module._fused(torch.from_numpy(x)) is not None  # numba here: the kernel
    fused = MatchEngine(y, splits, top_k=3, device="cpu").process(UnitBlock(x, "l", 0))
    engine_module._kernels.cache_clear()
    monkeypatch.delitem(sys.modules, "unitmatch.core._kernels", raising=False)
    monkeypatch.delattr(core, "_kernels", raising=False)  # else `from . import _kernels` finds it there
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    try:
        with caplog.at_level(logging.WARNING, logger="unitmatch.core.engine"):
            assert engine_module._kernels() is None
            assert engine_module._fused(torch.from_numpy(x)) is None
            plain = MatchEngine(y, splits, top_k=3, device="cpu").process(UnitBlock(x, "l", 0))
        assert "numba is not importable" in caplog.text
    finally:
        engine_module._kernels.cache_clear()
    np.testing.assert_array_equal(fused.top_unit, plain.top_unit)
    np.testing.assert_allclose(fused.top_r, plain.top_r, rtol=0, atol=1e-6)
    assert list(plain.top_unit[0, :, 0]) == [10, 2000]


# --------------------------------------------------- the decoders' compiled float32 phase (core/_logreg_kernel.py)
def test_exp32_is_within_two_float32_ulp_of_the_exponential():
    """The softmax's exponential (a polynomial that vectorises) on [-87, 0], dense and at random,
    against float64 numpy: at most 2 float32 ulp (observed 1.02); below -87 clamped to e^-87, which
    against a normaliser of at least 1 is nothing."""
    import numba

    from unitmatch.core import _logreg_kernel

    @numba.njit
    def evaluate(v, out):
        for i in range(v.shape[0]):
            out[i] = _logreg_kernel._exp32(v[i])

    rng = np.random.default_rng(0)
    v = np.concatenate([np.linspace(-87, 0, 1_000_001, dtype=np.float32), [np.float32(-0.0), np.float32(-1e-30)],
                        -rng.exponential(3, 200_000).astype(np.float32).clip(max=87)])
    out = np.empty_like(v)
    evaluate(v, out)
    want = np.exp(v.astype(np.float64))
    ulp = np.abs(out - want) / np.spacing(want.astype(np.float32)).astype(np.float64)
    assert ulp.max() <= 2.0, ulp.max()
    assert out[v == 0].tolist() == [1.0, 1.0]
    low = np.array([-88.0, -200.0, -np.inf], np.float32)
    evaluate(low, out[:3])
    assert np.all(out[:3] == np.float32(np.exp(np.float32(-87.0)))) and out[0] < 1e-37


def _logistic_reference(x, y, theta, k, l2):
    """float64 numpy: scikit-learn's mean multinomial loss + l2 ||W||^2 / 2, its gradient (per
    class the weights' then the intercept's), and the curvature 1 - mean_i sum_k p_ik^2."""
    f = x.shape[1]
    t = theta.reshape(k, f + 1)
    w, b = t[:, :f], t[:, f]
    z = x.astype(np.float64) @ w.T + b
    top = z.max(axis=1, keepdims=True)
    p = np.exp(z - top)
    lse = np.log(p.sum(axis=1)) + top[:, 0]
    p /= p.sum(axis=1, keepdims=True)
    loss = np.mean(lse - z[np.arange(y.size), y]) + 0.5 * l2 * np.square(w).sum()
    r = p - np.eye(k)[y]
    grad = np.concatenate([r.T @ x / y.size + l2 * w, r.mean(axis=0)[:, None]], axis=1).ravel()
    return loss, grad, 1.0 - np.square(p).sum(axis=1).mean()


@pytest.mark.parametrize("n, f, k", [(700, 20, 5), (300, 7, 2), (64, 3, 9), (1200, 90, 4)])
def test_compiled_objective_matches_float64_numpy(n, f, k):
    """The loss, gradient and curvature of one problem, at a point with saturated and flat classes,
    with two classes, with more classes than features, and with more features than ``_TALL`` (the
    scores' GEMM the other way round), against float64 numpy on the same float32 features: loss within 1e-6 (relative),
    gradient within 1e-5 of its largest entry, curvature within 1e-6 (float32 products)."""
    from unitmatch.core import _logreg_kernel

    rng = np.random.default_rng(n + k)
    x = rng.normal(size=(n, f)).astype(np.float32)
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)
    theta = rng.normal(scale=0.8, size=k * (f + 1))
    theta[f] = 6.0  # class 0's intercept: its probability near 1 for most samples
    l2 = 0.37 / n
    work = (x, np.ascontiguousarray(x.T), np.empty((k, n), np.float32), np.empty((n, k), np.float32),
            np.empty(n, np.float32), np.empty(n, np.float32), np.empty((k, f), np.float32),
            np.empty((f, k), np.float32))
    grad = np.full(k * (f + 1), np.nan)
    loss, curvature = _logreg_kernel._objective(work, y.astype(np.int64), k, theta, l2, grad, True)
    want_loss, want_grad, want_curvature = _logistic_reference(x, y, theta, k, l2)
    assert abs(loss - want_loss) <= 1e-6 * abs(want_loss)
    np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-5 * np.abs(want_grad).max())
    assert abs(curvature - want_curvature) <= 1e-6
    assert _logreg_kernel._objective(work, y.astype(np.int64), k, theta, l2, grad, False)[1] == 0.0


def _problems(seed, b, n, f, k, shared):
    rng = np.random.default_rng(seed)
    y = np.stack([rng.permutation(np.arange(n) % k) for _ in range(b)])
    y = y[:1] if shared else y
    x = rng.normal(size=(b, n, f)) + 0.6 * rng.normal(size=(b, k, f))[np.arange(b)[:, None], y]
    return x.astype(np.float32), y.astype(np.int64)


@pytest.mark.parametrize("b, n, f, k, shared", [(6, 700, 20, 5, True), (6, 300, 10, 2, False),
                                                (5, 240, 30, 8, False), (2, 1100, 100, 3, True)])
def test_compiled_phase_follows_torchs_float32_phase(b, n, f, k, shared):
    """The compiled loop runs torch's float32 phase (core._logreg._lbfgs) problem by problem: from
    the same start, with the same preconditioner and stopping rule, both converge, in as many
    iterations up to float32 rounding (within 3; observed within 2), to points whose float64
    gradient meets the tolerance (within 1.5x: the stop was decided on float32 products). Where they
    stop within the tolerance differs as another batch layout's does (parameters observed within
    2e-4 of the largest; test_decoding compares whole fits with scikit-learn's)."""
    import torch

    from unitmatch.core import _logreg, _logreg_kernel

    x, y = _problems(b * n, b, n, f, k, shared)
    yt = torch.from_numpy(y[0] if shared else y)
    l2, tol = 1.0 / n, 1e-5
    start = torch.zeros(b, k * (f + 1), dtype=torch.float64)
    budget = torch.full((b,), 1000)
    theta_t, iter_t, conv_t = _logreg._lbfgs(_logreg._Objective(torch.from_numpy(x), yt, k, l2), start.clone(),
                                             budget.clone(), tol=tol, history=10, max_line_search=10)
    g_inv = _logreg.preconditioner(torch.from_numpy(x), k, l2)
    theta_k = start.clone().numpy()
    iter_k, conv_k = _logreg_kernel.fit_float32(x, y, k, theta_k, g_inv.numpy(), budget.numpy().copy(), l2=l2,
                                                tol=tol, ftol=_logreg._FTOL, c1=_logreg._C1, history=10,
                                                max_line_search=10)
    assert conv_t.all() and conv_k.all()
    assert np.abs(iter_k - iter_t.numpy()).max() <= 3, (iter_k, iter_t)
    exact = _logreg._Objective(torch.from_numpy(x).double(), yt, k, l2)
    for theta in (torch.from_numpy(theta_k), theta_t):
        assert exact(theta)[1].abs().max() <= 1.5 * tol


@pytest.mark.parametrize("history", [10, 2])
def test_compiled_phase_takes_torchs_steps(history):
    """Step for step the same iterates as torch's phase: after 1, 2, 5 and 12 iterations (budgets)
    the parameters agree within float32 rounding (1e-5 of the largest; observed 4e-7 to 1.3e-6),
    with a memory of 10 pairs and of 2 (the ring wraps around from the third iteration)."""
    import torch

    from unitmatch.core import _logreg, _logreg_kernel

    x, y = _problems(11, 4, 300, 12, 4, False)
    l2 = 1.0 / 300
    g_inv = _logreg.preconditioner(torch.from_numpy(x), 4, l2)
    for budget in (1, 2, 5, 12):
        start = torch.zeros(4, 4 * 13, dtype=torch.float64)
        want, used_t, _ = _logreg._lbfgs(_logreg._Objective(torch.from_numpy(x), torch.from_numpy(y), 4, l2),
                                         start.clone(), torch.full((4,), budget), tol=1e-5, history=history,
                                         max_line_search=10)
        got = start.clone().numpy()
        used, _ = _logreg_kernel.fit_float32(x, y, 4, got, g_inv.numpy(), np.full(4, budget), l2=l2, tol=1e-5,
                                             ftol=_logreg._FTOL, c1=_logreg._C1, history=history,
                                             max_line_search=10)
        assert used.tolist() == used_t.tolist() == [budget] * 4
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5 * want.abs().max().item(),
                                   err_msg=f"after {budget} iterations")


def test_compiled_phase_on_threads_is_the_serial_one_bit_for_bit():
    """Problems fitted on two threads at once (the GIL released) are fitted exactly as one after the
    other: every problem's work is its own."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from unitmatch.core import _logreg, _logreg_kernel

    x, y = _problems(12, 8, 200, 10, 3, False)
    g_inv = _logreg.preconditioner(torch.from_numpy(x), 3, 1 / 200).numpy()
    kw = dict(l2=1 / 200, tol=1e-5, ftol=_logreg._FTOL, c1=_logreg._C1, history=10, max_line_search=10)

    def fit(part):
        theta = np.zeros((part.stop - part.start, 3 * 11))
        used, _ = _logreg_kernel.fit_float32(x[part], y[part], 3, theta, g_inv[part], np.full(theta.shape[0], 500),
                                             **kw)
        return theta, used

    serial = fit(slice(0, 8))
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            first, second = pool.map(fit, [slice(0, 4), slice(4, 8)])
            np.testing.assert_array_equal(np.concatenate([first[0], second[0]]), serial[0])
            np.testing.assert_array_equal(np.concatenate([first[1], second[1]]), serial[1])


def test_a_saturated_or_non_finite_start_is_handled_as_torch_handles_it():
    """A warm start where every sample's softmax is one-hot in floating point (the softmax
    curvature, which scales the first step, is 0) converges, compiled and with torch's ops, to the
    fit from zero; a NaN start stops unconverged (a NaN gradient meets no tolerance) in both."""
    import torch

    from unitmatch.core import _logreg, _logreg_kernel

    x = torch.linspace(-1.0, 1.0, 12, dtype=torch.float32).reshape(1, 6, 2)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    init = torch.tensor([[[0.0, 0.0, 100.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)  # class 0 by 100
    cold = _logreg.fit_multinomial(x, y, 2, 1.0, tol=1e-10, compiled=False)
    for compiled in (True, False):
        fit = _logreg.fit_multinomial(x, y, 2, 1.0, tol=1e-10, init=init, compiled=compiled)
        assert fit.converged.all(), compiled
        np.testing.assert_allclose(fit.coef.numpy(), cold.coef.numpy(), rtol=0, atol=1e-6)
    theta = np.full((1, 6), np.nan)
    g_inv = _logreg.preconditioner(x, 2, 1 / 12).numpy()
    used, conv = _logreg_kernel.fit_float32(x.numpy(), y.numpy()[None], 2, theta, g_inv, np.full(1, 50), l2=1 / 12,
                                            tol=1e-5, ftol=_logreg._FTOL, c1=_logreg._C1, history=10,
                                            max_line_search=10)
    torch_conv = _logreg._lbfgs(_logreg._Objective(x, y, 2, 1 / 12), torch.full((1, 6), float("nan"),
                                dtype=torch.float64), torch.full((1,), 50), tol=1e-5, history=10,
                                max_line_search=10)[2]
    assert not conv[0] and not torch_conv[0] and used[0] <= 1
    assert np.isnan(_logreg_kernel._abs_max(np.array([1.0, np.nan, 0.5])))


def test_compiled_phase_stops_at_its_budget_and_starts_where_told():
    """A budget of 3 iterations stops every problem after 3, unconverged; problems whose start
    already meets the tolerance take no iteration and stay where they are; warm starts from the
    solutions of slightly different problems converge in fewer iterations than starts from zero."""
    import torch

    from unitmatch.core import _logreg, _logreg_kernel

    x, y = _problems(4, 3, 200, 6, 3, True)
    l2 = 1.0 / 200
    g_inv = _logreg.preconditioner(torch.from_numpy(x), 3, l2).numpy()
    kw = dict(l2=l2, tol=1e-5, ftol=_logreg._FTOL, c1=_logreg._C1, history=10, max_line_search=10)
    theta = np.zeros((3, 21))
    used, conv = _logreg_kernel.fit_float32(x, y, 3, theta, g_inv, np.full(3, 3), **kw)
    assert used.tolist() == [3, 3, 3] and not conv.any() and np.abs(theta).max() > 0
    cold = np.zeros((3, 21))
    _logreg_kernel.fit_float32(x, y, 3, cold, g_inv, np.full(3, 500), **kw)
    untouched = np.zeros((3, 21))
    used_none, conv_none = _logreg_kernel.fit_float32(x, y, 3, untouched, g_inv, np.full(3, 500),
                                                      **{**kw, "tol": 100.0})  # met at the start
    assert used_none.tolist() == [0, 0, 0] and conv_none.all() and not untouched.any()
    near = cold.copy()
    x2 = x.copy()
    x2[:, :10] = 0.0  # 5% of the samples changed
    g2 = _logreg.preconditioner(torch.from_numpy(x2), 3, l2).numpy()
    # at 1e-4 (float32 products resolve the loss's decrease near 1e-5 no longer: a line search may
    # fail there, from any start, and leave the problem to the float64 phase)
    loose = {**kw, "tol": 1e-4}
    used_warm, conv_warm = _logreg_kernel.fit_float32(x2, y, 3, near, g2, np.full(3, 500), **loose)
    used_zero, _ = _logreg_kernel.fit_float32(x2, y, 3, np.zeros((3, 21)), g2, np.full(3, 500), **loose)
    assert conv_warm.all() and used_warm.sum() < used_zero.sum(), (used_warm, used_zero)


@pytest.mark.parametrize("case", ["noisy", "separable", "binary", "wide"])
def test_fits_with_the_compiled_phase_equal_those_with_torchs(case):
    """Through :func:`core._logreg.fit_many` (threaded chunks, the float64 finish): with the compiled
    float32 phase and with torch's, the same minimiser at a tight tolerance (within 1e-5 of the
    largest coefficient: both finish in float64) and, at the default tolerance, the same test
    predictions for at least 99% of the samples; with per-problem labels and a warm start too."""
    import torch

    from unitmatch.core import _logreg
    from test_decoding import _logreg_case

    x_train, y_train, x_test, _, k = _logreg_case(case)
    mu, sd = x_train.mean(0), x_train.std(0)
    z, z_test = (x_train - mu) / sd, torch.from_numpy((x_test - mu) / sd)
    batch = np.stack([z, z[:, ::-1], z[::-1].copy()]).astype(np.float32)
    labels = np.stack([y_train, y_train, y_train[::-1]])
    for tol in (1e-10, 1e-4):
        fits = [_logreg.fit_many(batch, labels, k, 1.0, tol=tol, max_iter=5000, compiled=c) for c in (True, False)]
        assert fits[0].converged.all() and fits[1].converged.all()
        if tol < 1e-6:
            scale = np.abs(fits[1].coef.numpy()).max()
            np.testing.assert_allclose(fits[0].coef.numpy(), fits[1].coef.numpy(), rtol=0, atol=1e-5 * scale)
        else:
            agree = (fits[0].predict(z_test) == fits[1].predict(z_test)).float().mean()
            assert agree >= 0.99, agree
    warm = [_logreg.fit_many(batch, labels, k, 1.0, tol=1e-10, max_iter=5000, init=fits[1].theta * 0.9,
                             compiled=c) for c in (True, False)]
    np.testing.assert_allclose(warm[0].coef.numpy(), warm[1].coef.numpy(), rtol=0,
                               atol=1e-5 * np.abs(warm[1].coef.numpy()).max())


def test_compiled_phase_refuses_what_it_cannot_run_and_names_it(monkeypatch):
    """compiled=True where the phase cannot run compiled, and bad arrays handed to the kernel, are
    errors that name the value; compiled=None falls back to torch's ops where numba is missing."""
    import torch

    from unitmatch.core import _logreg, _logreg_kernel

    x, y = _problems(1, 2, 50, 3, 2, True)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y[0])
    with pytest.raises(ValueError, match=r"compiled=True: .* precision is 'float64' \(no float32 phase\)"):
        _logreg.fit_multinomial(xt, yt, 2, 1.0, precision="float64", compiled=True)
    with pytest.raises(ValueError, match=r"compiled=True: .* the features are on meta"):
        _logreg._compiled_phase(torch.device("meta"), "mixed", True)
    with pytest.raises(ValueError, match=r"compiled=True: .* directions by the compact form"):
        _logreg.fit_multinomial(xt, yt, 2, 1.0, direction="compact", compiled=True)
    assert _logreg._compiled_phase(torch.device("cpu"), "mixed", None, "compact") is None  # torch's, as asked
    g_inv = np.tile(np.eye(4), (2, 1, 1))
    kw = dict(l2=0.01, tol=1e-5, ftol=1e-14, c1=1e-4, history=10, max_line_search=10)
    with pytest.raises(ValueError, match=r"fit_float32: x float64\(2, 50, 3\).*expected float32 \(B, n >= 1, F\)"):
        _logreg_kernel.fit_float32(x.astype(np.float64), y, 2, np.zeros((2, 8)), g_inv, np.full(2, 9), **kw)
    with pytest.raises(ValueError, match=r"theta float64\(2, 6\)"):
        _logreg_kernel.fit_float32(x, y, 2, np.zeros((2, 6)), g_inv, np.full(2, 9), **kw)
    frozen = np.zeros((2, 8))
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match=r"C-contiguous and writeable"):
        _logreg_kernel.fit_float32(x, y, 2, frozen, g_inv, np.full(2, 9), **kw)
    with pytest.raises(ValueError, match=r"history 2.5"):
        _logreg_kernel.fit_float32(x, y, 2, np.zeros((2, 8)), g_inv, np.full(2, 9), **{**kw, "history": 2.5})
    with pytest.raises(ValueError, match=r"direction must be 'two-loop', 'compact' or None \(the device's own\); got 'bfgs'"):
        _logreg.fit_multinomial(xt, yt, 2, 1.0, direction="bfgs")
    bad = y.copy()
    bad[0, 5] = 2
    with pytest.raises(ValueError, match=r"labels span 0..2; expected 0..1 for 2 classes"):
        _logreg_kernel.fit_float32(x, bad, 2, np.zeros((2, 8)), g_inv, np.full(2, 9), **kw)
    plain = _logreg.fit_multinomial(xt, yt, 2, 1.0, compiled=False)
    monkeypatch.setattr(_logreg, "_logreg_kernel", lambda: None)  # numba not importable
    fallback = _logreg.fit_multinomial(xt, yt, 2, 1.0)
    np.testing.assert_array_equal(fallback.coef.numpy(), plain.coef.numpy())
    with pytest.raises(ValueError, match="compiled=True: the float32 phase cannot run compiled here: numba is not importable"):
        _logreg.fit_multinomial(xt, yt, 2, 1.0, compiled=True)


def test_warm_up_readies_the_compiled_phase_where_it_applies(monkeypatch):
    """core.decoding.warm_up compiles (or loads) the CPU's phase and says so; on another device, or
    without numba, there is nothing to prepare."""
    from unitmatch.core import _logreg, decoding

    assert decoding.warm_up("cpu") is True
    assert decoding.warm_up("meta") is False
    monkeypatch.setattr(_logreg, "_logreg_kernel", lambda: None)  # numba not importable
    assert decoding.warm_up("cpu") is False
