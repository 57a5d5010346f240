"""Single-threaded ops in the thread pools that run independent pieces (core._threads)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from threadpoolctl import ThreadpoolController

from unitmatch.core._threads import one_thread_here, single_threaded_ops


def _openmp_threads_here() -> list[int]:
    """The calling thread's OpenMP team size (omp_get_max_threads) in every OpenMP library loaded."""
    return [lib["num_threads"] for lib in ThreadpoolController().select(user_api="openmp").info()]


def _gemm_cpu_over_wall(n: int = 8) -> float:
    """Process CPU time over wall time while this thread runs torch's float32 GEMMs (MKL here): about
    the number of cores the GEMMs keep busy (the test's other threads wait meanwhile)."""
    a, b = torch.randn(256, 1536), torch.randn(1536, 1536)
    out = torch.empty(256, 1536)
    torch.mm(a, b, out=out)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        torch.mm(a, b, out=out)
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def test_the_process_has_openmp_for_these_tests_to_see():
    """The checks below read the OpenMP setting through threadpoolctl: an empty list would pass them."""
    assert _openmp_threads_here(), "torch's OpenMP runtime (libgomp) is not visible to threadpoolctl"


def test_a_pool_thread_started_with_one_thread_here_runs_torchs_gemms_on_one_core():
    """torch.set_num_threads(1) in the section does not reach threads started later: their OpenMP
    setting (MKL's team for torch's GEMMs) comes from the environment, e.g. one thread a CPU;
    one_thread_here sets it to one in the thread itself, and nothing in the calling thread changes.
    (The CPU time of torch's GEMM on a plain thread, two cores busy on this 2-core VM, is not
    asserted: a loaded machine lowers it.)"""
    main_openmp, main_torch = _openmp_threads_here(), torch.get_num_threads()
    with ThreadPoolExecutor(1) as before:  # a thread started outside the section: the environment's
        environment = before.submit(_openmp_threads_here).result()
    with single_threaded_ops():
        with ThreadPoolExecutor(1) as plain:
            plain_openmp = plain.submit(_openmp_threads_here).result()
        with ThreadPoolExecutor(1, initializer=one_thread_here) as pool:
            pool_openmp = pool.submit(_openmp_threads_here).result()
            pool_cores = pool.submit(_gemm_cpu_over_wall).result()
    assert pool_openmp == [1] * len(pool_openmp)
    assert pool_cores < 1.3, f"torch's GEMM on a pool thread kept {pool_cores:.2f} cores busy"
    # the section's torch.set_num_threads(1) left a thread started inside it with the environment's
    # setting (more than one thread where the environment gives several: the failure prevented)
    assert plain_openmp == environment
    assert _openmp_threads_here() == main_openmp and torch.get_num_threads() == main_torch


def test_the_engines_share_threads_and_the_decoders_threads_are_single_threaded(monkeypatch):
    from unitmatch.core import _logreg
    from unitmatch.core.engine import MatchEngine

    rng = np.random.default_rng(0)
    engine = MatchEngine(rng.standard_normal((4, 40)), [(np.arange(30), np.arange(30, 40))], top_k=2)
    both = threading.Barrier(2, timeout=60)

    def on_both_threads():  # each task waits for the other: two pool threads
        both.wait()
        return threading.current_thread().name, _openmp_threads_here()

    try:
        with single_threaded_ops():
            seen = dict(engine._share_pool(2).map(lambda _: on_both_threads(), range(2)))
    finally:
        engine._pool.shutdown()
    assert len(seen) == 2 and all(s == [1] * len(s) for s in seen.values()), seen

    fit = _logreg.fit_multinomial
    teams, names = [], set()

    def recording(*args, **kwargs):
        teams.append(_openmp_threads_here())
        names.add(threading.current_thread().name)
        return fit(*args, **kwargs)

    monkeypatch.setattr(_logreg, "fit_multinomial", recording)
    monkeypatch.setattr(_logreg, "CPU_CHUNK_MIN_PROBLEMS", 1)
    monkeypatch.setattr(_logreg, "CPU_CHUNK_BYTES", 1)  # a chunk a problem
    monkeypatch.setattr(_logreg, "CPU_THREAD_MIN_BYTES", 1)  # on every thread
    y = np.arange(60) % 3
    x = rng.standard_normal((4, 60, 5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _logreg.fit_many(x, y, 3, 1.0)
    finally:
        torch.set_num_threads(threads)
    assert len(teams) == 4 and all(t == [1] * len(t) for t in teams), teams
    assert threading.current_thread().name not in names  # the fits ran on the pool's threads


@pytest.mark.parametrize("threads", [1, 2])
def test_the_gemm_probe_times_both_libraries_on_as_many_threads_as_the_shares(threads, monkeypatch, caplog):
    """The probe multiplies on ``threads`` threads at once, each op single-threaded, as the shares
    do; it is decided once per thread count and follows _NUMPY_GEMM_RATIO."""
    from unitmatch.core import engine as engine_module

    names = set()
    matmul = np.matmul

    def recording(*args, **kwargs):
        names.add((threading.current_thread().name, tuple(_openmp_threads_here())))
        return matmul(*args, **kwargs)

    monkeypatch.setattr(engine_module.np, "matmul", recording)
    try:
        for ratio, numpy_gemm in ((0.0, True), (1e9, False)):
            monkeypatch.setattr(engine_module, "_NUMPY_GEMM_RATIO", ratio)
            engine_module._probe_gemms.cache_clear()
            names.clear()
            caplog.clear()
            with caplog.at_level("INFO", logger="unitmatch.core.engine"):
                assert engine_module._numpy_gemm_faster(threads) is numpy_gemm
            assert engine_module._numpy_gemm_faster(threads) is numpy_gemm
            assert engine_module._probe_gemms.cache_info().misses == 1  # decided once
            assert f"{'numpy' if numpy_gemm else 'torch'}'s GEMMs" in caplog.text
            assert f"on each of {threads} threads" in caplog.text
            assert len({name for name, _ in names}) == threads
            assert all(name.startswith("unitmatch-probe") and set(team) == {1} for name, team in names), names
    finally:
        engine_module._probe_gemms.cache_clear()  # later tests probe this machine again
