"""The fused gather-cast-square kernel of the one-split CPU path (core/_kernels.py), against numpy."""

import logging
import sys

import numpy as np
import pytest

from unitmatch.core import _kernels


def _gather(block: np.ndarray, first: int, w: int, rows: np.ndarray, shift=None):
    out = np.full((len(rows), w), np.nan, np.float32)
    squares = np.full(w, 0.25)  # added to, not overwritten
    _kernels.gather_rows(block.reshape(-1), block.shape[1], first, rows, shift, out, squares)
    return out, squares - 0.25


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
    out, _ = _gather(block, 0, 256, np.arange(256, dtype=np.int64))
    _assert_cast_as_numpy(out, block)


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
    and the squares its float64 sums of squares to 1e-6."""
    rng = np.random.default_rng(0)
    block = (rng.standard_normal((300, 90)) * np.exp(rng.uniform(-8, 8, (300, 90)))).astype(dtype)
    rows = rng.integers(0, 300, 123).astype(np.int64)
    first, w = 7, 61
    shift = rng.standard_normal(w).astype(np.float32) * 10 if shifted else None
    out, squares = _gather(block, first, w, rows, shift)
    want = block[rows, first:first + w].astype(np.float32)
    if shifted:
        want = want - shift
    np.testing.assert_array_equal(out, want)
    ref = (want.astype(np.float64) ** 2).sum(axis=0)
    np.testing.assert_allclose(squares, ref, rtol=1e-6, atol=0)


def test_a_one_row_out_gives_the_same_squares():
    """The squares alone (the engine's check of the rows outside the train set): every row cast
    into one row of ``out``, the last row's values left there, the same sums of squares."""
    rng = np.random.default_rng(1)
    block = rng.standard_normal((50, 30)).astype(np.float16)
    rows = rng.permutation(50)[:37].astype(np.int64)
    full, squares = _gather(block, 2, 20, rows)
    one, squares_one = np.zeros((1, 20), np.float32), np.zeros(20)
    _kernels.gather_rows(block.reshape(-1), 30, 2, rows, None, one, squares_one)
    np.testing.assert_array_equal(squares_one, squares)
    np.testing.assert_array_equal(one[0], full[-1])


def test_non_finite_values_reach_the_squares():
    """A NaN or an infinity in a gathered float16 row makes its column's sum of squares non-finite
    (what the engine's check reads)."""
    block = np.ones((40, 8), np.float16)
    block[3, 1], block[30, 5], block[31, 6] = np.nan, np.inf, -np.inf
    _, squares = _gather(block, 0, 8, np.arange(40, dtype=np.int64))
    assert np.isnan(squares[1]) and np.isinf(squares[5]) and np.isinf(squares[6])
    assert np.isfinite(np.delete(squares, [1, 5, 6])).all()


@pytest.mark.parametrize("case, error", [
    ("out float64", "expected float32 \\(rows or 1, w\\) C-contiguous"),
    ("out not contiguous", "expected float32 \\(rows or 1, w\\) C-contiguous"),
    ("out of 2 rows for 4", "out float32\\(2, 8\\)"),
    ("rows int32", "rows int32"),
    ("squares float32", "squares float32"),
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
    out, squares, first = np.zeros((4, 8), np.float32), np.zeros(8), 0
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
    elif case == "columns past the row":
        first = 5
    elif case == "row past the block":
        rows = np.array([0, 12, 2, 3], np.int64)
    elif case == "negative row":
        rows = np.array([0, 3, -1, 2], np.int64)
    elif case == "float64 block":
        block = block.astype(np.float64)
    with pytest.raises((ValueError, IndexError), match=error):
        _kernels.gather_rows(block.reshape(-1), 10, first, rows, None, out, squares)


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
