"""Matching-engine benchmark: engine vs the per-neuron loop vs the machine's float32 GEMM, same run.

Setup (issue 2): 3200 images, one Brain-Score split of 2880 train / 320 test (and the 10 default
splits), 256 neurons (192 planted at SNR 0.5 from the units, 64 pure noise), units in
{10k, 100k, 1M}. Units stream as blocks cycled from a fixed pool of distinct random blocks, so the
input's memory is the same at every size and the peak RSS shows the engine's own memory.

Per size it prints:
- engine seconds for 1 split and for 10 splits (including the final float64 re-scoring),
- the per-neuron loop (Brain-Score's SingleRegression algorithm: for each neuron, Pearson r with all
  units in float64, argmax), timed on a subset of neurons and extrapolated to 256, and the speedup,
- numpy's float32 GEMM of the same shapes, (256 x 2880) @ (2880 x units), one GEMM per block of the
  stream, timed in the engine's process right before and right after the engine's one-split run
  (the mean of the two is the reference; both are printed), and its GFLOP/s,
- the engine's achieved GFLOP/s (2 * 2880 * 256 * units / seconds, one split) and its ratio to GEMM,
- the 10-split / 1-split time ratio, and the peak RSS of the engine's runs (Linux's VmHWM, reset
  before them: the references' float32 copy is not counted),
- torch's float32 GEMM (MKL here), streamed the same way, and the engine's ratio to it;
- with ``--permutations N``: 10 splits with N permuted copies of every neuron (a sweep's default work,
  N = 100: 25,856 neuron rows) over ``--null-images`` images (default 640, the demo's), in the engine's
  default block for that many rows, in one process: the engine with its fused scores and top k (timed
  twice) and with torch's passes over written-out scores, against the engine's GEMMs alone (products
  and each split's correction, torch), which of the two the engine takes by default, and whether both
  chose the same units (null included).

``--device cuda`` (issue 8) instead measures, in one process on the GPU, per size:
- the engine from host float16 blocks (pageable numpy arrays, staged through pinned buffers with
  copies overlapping compute: the default on CUDA), and without staging;
- a host-to-device copy of the same bytes from pinned memory and from pageable memory, and the
  engine's ratio to each (goal: >= 80% of the pinned copy's rate);
- the engine with the blocks already on the GPU, against the device's float32 GEMM of the same
  shapes, (256 x 2880) @ (2880 x units) (goal: >= 50%);
- 10 splits (from the device blocks and from host), and the peak device memory of the engine
  (``torch.cuda.max_memory_allocated`` during the runs, less what was allocated before them: the
  device copy of the input pool and the engine's constants);
- whether every variant chose the same units;
- with ``--permutations N``: 10 splits with N permuted copies of every neuron (a sweep's default work,
  N = 100: 25,856 neuron rows), from the device blocks cut to the engine's default block for that many
  rows, with the default and with float32 GEMMs, the share of ``finalize``, and peak memory;
- the device GEMM of the engine's own whole-block shapes: (256 x 3200) @ (3200 x units), its GEMM
  on CUDA, and with a row of ones under the neurons (257 rows: the unit sums as a GEMM row, as before
  the sums were taken apart on CUDA);
- the engine with its float32 GEMMs (``MatchSettings.gemm="float32"``: a float32 copy of each block)
  beside the default (float16 blocks through two float16 tensor-core GEMMs with float32 sums, the
  neuron rows split in two float16 parts), from the device blocks, 1 and 10 splits, and one float16
  GEMM of the same shapes with float32 output (``out_dtype``).
Engine times include the final float64 re-scoring, as on CPU. Two components explain them: the
share of ``finalize`` in an on-device run (the float64 re-scoring, on the device from columns copied
from the host, and the result tables on the host, timed alone; the GEMM is also compared with the
on-device time less that share), and the host half of the
staging (the pageable blocks' bytes copied into a pinned buffer, alone). ``--profile`` adds
torch.profiler's table of one on-device run (one split), ops by device time.

Run: .venv/bin/python benchmarks/bench_match.py [--sizes 10000 100000 1000000] [--dtype float16 float32]
     [--splits 1 10] [--quick] [--permutations 100] [--device cuda [--profile]]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_IMAGES, N_NEURONS, POOL = 3200, 256, 3


def _pool(dtype: str, block: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.maximum(rng.standard_normal((N_IMAGES, block), dtype=np.float32), 0).astype(dtype) for _ in range(POOL)]


def _setup(units: int, dtype: str, device: str = "cpu", block_units: int | None = None):
    from unitmatch import core
    from unitmatch.core.engine import default_block_units
    from unitmatch.core.synthetic import plant_neurons

    block = min(block_units or default_block_units(N_IMAGES, device=device), units)
    pool = _pool(dtype, block)
    brain = plant_neurons(pool[0].astype(np.float32), n_planted=192, n_noise=64, snr=0.5, seed=1)
    widths = [min(block, units - s) for s in range(0, units, block)]
    return core, pool, brain.responses, widths, block


def _blocks(core, pool, widths, block):
    from unitmatch.core.units import UnitBlock

    for i, w in enumerate(widths):
        yield UnitBlock(pool[i % POOL][:, :w], "units", i * block)


def _columns(pool, block, n_images):
    def fetch(units):  # a pool block's columns at a time, as a store reads a chunk's
        units = np.asarray(units)
        out = np.empty((n_images, len(units)))
        which = (units // block) % POOL
        for p in np.unique(which):
            here = which == p
            out[:, here] = pool[p][:, units[here] % block]
        return out
    return fetch


def _torch_gemm_s(y, pool, widths, train, device="cpu", ones_row: bool = False, half: bool = False) -> float:
    """float32 GEMM of (neurons x train) @ (train x width) with torch on ``device``, summed over the
    stream; ``ones_row``: with a row of ones under the neurons (a unit-sum row: 257 rows); ``half``:
    float16 operands with float32 output and sums instead (``out_dtype``, CUDA: one of the two GEMMs
    of the engine's float16 path)."""
    import torch

    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    dtype = torch.float16 if half else torch.float32
    kw = {"out_dtype": torch.float32} if half else {}
    yt = torch.as_tensor(y[:, train], dtype=torch.float32, device=device)
    if ones_row:
        yt = torch.cat([yt, torch.ones_like(yt[:1])])
    yt = yt.to(dtype)
    per_width = {}
    for w in sorted(set(widths)):
        xt = torch.as_tensor(pool[0][train, :w], device=device).to(dtype).contiguous()
        out = torch.empty((yt.shape[0], w), device=device)
        torch.mm(yt, xt, out=out, **kw)
        times = []
        for _ in range(5):
            sync()
            t0 = time.perf_counter()
            torch.mm(yt, xt, out=out, **kw)
            sync()
            times.append(time.perf_counter() - t0)
        per_width[w] = min(times)
        del xt, out
    return sum(per_width[w] for w in widths)


def _gemm_streams_s(y, pool, widths, train) -> dict:
    """The CPU references: numpy's and torch's float32 GEMM, (neurons x train) @ (train x width), once
    per block of the stream, in this process (the engine's), on a contiguous float32 copy of the
    first pool block's train rows (212 MB at 18,432 units: no block stays in cache, as in the
    engine's stream). The copy is freed before returning."""
    import torch

    yt = np.ascontiguousarray(y[:, train], dtype=np.float32)
    xt = np.ascontiguousarray(pool[0][train].astype(np.float32))
    out = np.empty((yt.shape[0], xt.shape[1]), np.float32)
    yt_t, xt_t, out_t = torch.from_numpy(yt), torch.from_numpy(xt), torch.from_numpy(out)
    np.matmul(yt, xt, out=out)
    torch.mm(yt_t, xt_t, out=out_t)  # warm-up (threads, first touch of the output)
    result = {}
    for lib, gemm in (("numpy", lambda w: np.matmul(yt, xt[:, :w], out=out[:, :w])),
                      ("torch", lambda w: torch.mm(yt_t, xt_t[:, :w], out=out_t[:, :w]))):
        t0 = time.perf_counter()
        for w in widths:
            gemm(w)
        result[lib] = time.perf_counter() - t0
    return result


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux: VmHWM) so that it shows what follows; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """The process's peak RSS since the last reset (Linux's VmHWM), else since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_engine(units: int, dtype: str, splits_mask: int = 3) -> dict:
    """The engine's stream, with the GEMM references streamed right before and right after its
    one-split run in the same process (so that the ratios do not move with the machine's load
    between processes or minutes)."""
    core, pool, y, widths, block = _setup(units, dtype)
    from unitmatch.core.engine import MatchEngine, stream_match
    from unitmatch.core.units import LayerUnits, UnitBlock, UnitCatalogue

    catalogue = UnitCatalogue([LayerUnits("units", (units,), ("unit",))])
    train = core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None)[0][0]
    out = {"block_units": block, "gemm_before": _gemm_streams_s(y, pool, widths, train)}
    peaks, reset = [], True
    for n_splits in [n for n, bit in ((1, 1), (10, 2)) if splits_mask & bit]:
        splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=n_splits, stratify=None)
        engine = MatchEngine(y, splits, top_k=5)
        # warm-up on a block of the stream's width: the one-time costs (the share threads and their
        # buffers, the once-per-process GEMM probe, about a quarter of a second) are not the stream's
        engine.process(UnitBlock(pool[0][:, :widths[0]], "units", 0))
        reset &= _reset_peak_rss()
        t0 = time.perf_counter()
        res = stream_match(engine, _blocks(core, pool, widths, block), catalogue,
                           columns=_columns(pool, block, N_IMAGES))
        out[f"engine_s_{n_splits}"] = time.perf_counter() - t0
        peaks.append(_peak_rss_mib())
        del engine
        if n_splits == 1:
            out["units_split0"] = res.matches.unit.tolist()
            out["gemm_after"] = _gemm_streams_s(y, pool, widths, train)
    for lib in ("numpy", "torch"):
        out[f"{lib}_gemm_s"] = (out["gemm_before"][lib] + out["gemm_after"][lib]) / 2
    # without a reset (not Linux), the peak includes the references' float32 copy
    out["peak_rss_mib"] = max(peaks) if reset else _peak_rss_mib()
    out["pool_mib"] = sum(a.nbytes for a in pool) / 2**20
    return out


def worker_reference(units: int, dtype: str, n_ref: int) -> dict:
    core, pool, y, widths, block = _setup(units, dtype)
    train = core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None)[0][0]
    # Brain-Score's per-neuron loop on the first n_ref neurons, block by block (same arithmetic as one pass)
    rng = np.random.default_rng(0)
    neurons = rng.choice(N_NEURONS, size=n_ref, replace=False)
    best = {}
    t0 = time.perf_counter()
    for j in neurons:
        yj = y[j, train].astype(np.float64)
        yc = yj - yj.mean()
        top = (-np.inf, -1)
        for i, w in enumerate(widths):
            x = pool[i % POOL][train, :w].astype(np.float64)
            xc = x - x.mean(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                r = (xc * yc[:, None]).sum(axis=0) / np.sqrt((xc * xc).sum(axis=0) * (yc * yc).sum())
            k = int(np.nanargmax(r))
            if r[k] > top[0]:
                top = (r[k], i * block + k)
        best[int(j)] = top[1]
    loop = time.perf_counter() - t0
    return {"loop_s_per_neuron": loop / n_ref, "loop_best": best}


def worker_null(units: int, dtype: str, permutations: int, n_images: int) -> dict:
    """CPU, 10 splits with ``permutations`` permuted copies of every neuron (a sweep's default work) over
    ``n_images`` images, in one process: the engine with its fused scores and top k
    (``core.engine._SPLIT_FUSED = True``), the engine with torch's passes over written-out scores
    (``False``), and its GEMMs alone (torch, the engine's threads): the products (rows + 1 x images @
    images x width) and each split's correction (rows x outside + 1 @ outside + 1 x width) once per
    block of the stream, before and after the engine runs. Final re-scoring included in the engine's
    times, as above; which of the two the engine's rule takes by default is reported."""
    import torch

    import unitmatch.core.engine as engine_module
    from unitmatch import core
    from unitmatch.core.engine import MatchEngine, default_block_units, stream_match
    from unitmatch.core.synthetic import plant_neurons
    from unitmatch.core.units import LayerUnits, UnitBlock, UnitCatalogue

    rows = N_NEURONS * (1 + permutations)
    block = min(default_block_units(n_images, rows), units)
    rng = np.random.default_rng(0)
    pool = [np.maximum(rng.standard_normal((n_images, block), dtype=np.float32), 0).astype(dtype) for _ in range(POOL)]
    y = plant_neurons(pool[0].astype(np.float32), n_planted=192, n_noise=64, snr=0.5, seed=1).responses
    widths = [min(block, units - s) for s in range(0, units, block)]
    catalogue = UnitCatalogue([LayerUnits("units", (units,), ("unit",))])
    splits = core.brainscore_splits(n_images=n_images, n_splits=10, stratify=None)
    engine = MatchEngine(y, splits, top_k=5, n_permutations=permutations)
    outside = [n_images - len(train) + 1 for train, _ in splits]

    def gemms() -> float:
        full = torch.randn(rows + 1, n_images)
        a = [torch.randn(rows, k) for k in outside]
        x = torch.from_numpy(pool[0].astype(np.float32))
        out = torch.empty(rows + 1, block)
        o = [x[:k, :block].contiguous() for k in outside]
        torch.mm(full, x[:, :block], out=out)
        t0 = time.perf_counter()
        for w in widths:
            torch.mm(full, x[:, :w], out=out[:, :w])
            for s, k in enumerate(outside):
                torch.mm(a[s], o[s][:, :w], out=out[:rows, :w])
        return time.perf_counter() - t0

    out = {"block_units": block, "rows": rows, "n_images": n_images, "split_columns": max(outside),
           "rule_takes_fused": engine._split_fused(), "gemm_before": gemms()}
    results = {}
    try:
        for fused in (True, False):  # warm-ups: threads, buffers, compiles
            engine_module._SPLIT_FUSED = fused
            engine.process(UnitBlock(pool[0][:, :widths[0]], "units", 0))
        for fused in (True, False, True):
            engine_module._SPLIT_FUSED = fused
            t0 = time.perf_counter()
            res = stream_match(engine, _blocks(core, pool, widths, block), catalogue,
                               columns=_columns(pool, block, n_images))
            out.setdefault(f"engine_s_{'fused' if fused else 'torch'}", []).append(time.perf_counter() - t0)
            results[fused] = res
    finally:
        engine_module._SPLIT_FUSED = None
    out["gemm_after"] = gemms()
    out["same_units"] = bool((results[True].matches.unit.to_numpy() == results[False].matches.unit.to_numpy()).all()
                             and (results[True].null.unit == results[False].null.unit).all())
    return out


def run_null(units: int, dtype: str, permutations: int, n_images: int) -> dict:
    py = [sys.executable, __file__, "--worker", "null", str(units), dtype, str(permutations), str(n_images)]
    r = json.loads(subprocess.run(py, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    gemm = (r["gemm_before"] + r["gemm_after"]) / 2
    fused, plain = min(r["engine_s_fused"]), r["engine_s_torch"][0]
    return {**r, "units": units, "dtype": dtype, "permutations": permutations, "gemm_s": gemm,
            "ratio_fused": gemm / fused, "ratio_torch": gemm / plain, "fused_over_torch": fused / plain}


def run_size(units: int, dtype: str, splits: list[int]) -> dict:
    n_ref = 16 if units <= 10_000 else 4 if units <= 100_000 else 1
    py = [sys.executable, __file__, "--worker"]
    mask = (1 if 1 in splits else 0) | (2 if 10 in splits else 0)
    eng = json.loads(subprocess.run(py + ["engine", str(units), dtype, str(mask)], check=True, capture_output=True,
                                    text=True).stdout.splitlines()[-1])
    ref = json.loads(subprocess.run(py + ["reference", str(units), dtype, str(n_ref)], check=True,
                                    capture_output=True, text=True).stdout.splitlines()[-1])
    agree = all(eng["units_split0"][int(j)] == u for j, u in ref["loop_best"].items())
    flops = 2 * 2880 * N_NEURONS * units
    nan = float("nan")
    return {
        "units": units, "dtype": dtype, "block_units": eng["block_units"],
        "engine_s_1split": eng["engine_s_1"], "engine_s_10splits": eng.get("engine_s_10", nan),
        "loop_s_extrapolated": ref["loop_s_per_neuron"] * N_NEURONS, "loop_neurons_timed": n_ref,
        "speedup_vs_loop": ref["loop_s_per_neuron"] * N_NEURONS / eng["engine_s_1"],
        "gemm_s": eng["numpy_gemm_s"], "gemm_gflops": flops / eng["numpy_gemm_s"] / 1e9,
        "gemm_before_after_s": [eng["gemm_before"]["numpy"], eng["gemm_after"]["numpy"]],
        "engine_gflops": flops / eng["engine_s_1"] / 1e9, "ratio_to_gemm": eng["numpy_gemm_s"] / eng["engine_s_1"],
        "torch_gemm_s": eng["torch_gemm_s"], "ratio_to_torch_gemm": eng["torch_gemm_s"] / eng["engine_s_1"],
        "splits10_over_1": eng.get("engine_s_10", nan) / eng["engine_s_1"],
        "peak_rss_mib": eng["peak_rss_mib"], "input_pool_mib": eng["pool_mib"],
        "argmax_agrees_with_loop": agree,
    }


def _profile_table(fn, cuda: bool, rows: int = 20) -> str:
    """torch.profiler's table of the ops of one call of ``fn``, by device time (CUDA kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = ("cpu_time_total" if not cuda else
           "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total")
    return events.table(sort_by=key, row_limit=rows)


def worker_cuda(units: int, dtype: str, block_units: int, splits: list[int], profile: bool = False,
                dry: bool = False, permutations: int = 0) -> dict:
    """The --device cuda measurements, in this process (see the module docstring). ``dry``: the same
    steps on the CPU (no pinned memory, no memory statistics), to check the script without a GPU.
    ``permutations``: also 10 splits with that many permuted copies of every neuron (a sweep's
    default work), from device blocks, with each GEMM setting."""
    import torch

    if not dry and not torch.cuda.is_available():
        raise SystemExit("bench_match.py --device cuda needs a CUDA GPU, but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}); run without --device for the CPU benchmark")
    from unitmatch.core.engine import MatchEngine, merge, stream_match
    from unitmatch.core.units import LayerUnits, UnitBlock, UnitCatalogue

    cuda = not dry
    dev = torch.device("cuda" if cuda else "cpu")
    gpu = torch.cuda if cuda else None
    core, pool, y, widths, block = _setup(units, dtype, device=dev.type, block_units=block_units or None)
    catalogue = UnitCatalogue([LayerUnits("units", (units,), ("unit",))])
    train = core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None)[0][0]
    nbytes = [N_IMAGES * w * pool[0].itemsize for w in widths]
    out = {"device_name": gpu.get_device_name(dev) if cuda else "cpu (dry run)", "block_units": block,
           "gib": sum(nbytes) / 2**30}
    sync = gpu.synchronize if cuda else (lambda: None)

    def timed(fn, repeat=3):
        fn()  # warm-up
        times = []
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    # host-to-device copies of the same bytes, block by block, from pinned and from pageable memory
    buf = {"device": torch.empty(max(nbytes), dtype=torch.uint8, device=dev),
           "pinned": torch.empty(max(nbytes), dtype=torch.uint8, pin_memory=cuda)}
    buf["pinned"].copy_(torch.from_numpy(pool[0].view(np.uint8).reshape(-1)))
    pageable = [torch.from_numpy(a.view(np.uint8).reshape(-1)) for a in pool]

    def copy_pinned():
        for n in nbytes:
            buf["device"][:n].copy_(buf["pinned"][:n], non_blocking=True)

    def copy_pageable():
        for i, n in enumerate(nbytes):
            buf["device"][:n].copy_(pageable[i % POOL][:n])

    def copy_into_pinned():  # the host half of the staging: pageable block bytes into a pinned buffer
        for i, n in enumerate(nbytes):
            buf["pinned"][:n].copy_(pageable[i % POOL][:n])

    out["copy_pinned_s"] = timed(copy_pinned)
    out["copy_pageable_s"] = timed(copy_pageable)
    out["copy_into_pinned_s"] = timed(copy_into_pinned)
    buf.clear()
    out["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    out["gemm_s"] = _torch_gemm_s(y, pool, widths, train, device=dev.type)
    # the engine's own whole-block shapes: every image, the neurons alone (its GEMM on CUDA) and with a
    # unit-sum row under them (before the sums were apart): 257 rows are one past a multiple of the tiles
    every = np.arange(N_IMAGES)
    out["gemm_all_s"] = _torch_gemm_s(y, pool, widths, every, device=dev.type)
    out["gemm_all_257_s"] = _torch_gemm_s(y, pool, widths, every, device=dev.type, ones_row=True)
    if cuda:  # the float16 tensor-core GEMM with float32 sums, (256 x 3200) @ (3200 x units): the default path's twice
        out["gemm_half_s"] = _torch_gemm_s(y, pool, widths, every, device=dev.type, half=True)
        gpu.empty_cache()

    dpool = [torch.from_numpy(a).to(dev) for a in pool]

    def blocks(source):
        return [UnitBlock(source[i % POOL][:, :w], "units", i * block) for i, w in enumerate(widths)]

    chosen = {}
    for n_splits in splits:
        split_set = core.brainscore_splits(n_images=N_IMAGES, n_splits=n_splits, stratify=None)
        # the default GEMMs (float16 blocks: float16 tensor-core GEMMs of the split neuron rows) and, from
        # the device blocks, the float32 GEMMs of a float32 copy (MatchSettings.gemm="float32")
        variants = {"device": (dpool, False, "auto"), "device_f32": (dpool, False, "float32"),
                    "host_staged": (pool, True, "auto")}
        if n_splits == 1:
            variants["host_plain"] = (pool, False, "auto")
        for name, (source, staging, gemm) in variants.items():
            result = {}
            # a fresh engine per variant: its scratch buffers (sized by the first full block) count in its peak
            engine = _cuda_engine(y, split_set, dev, dry, gemm)
            engine.process(UnitBlock(dpool[0][:, :256], "units", 0))  # warm-up (kernels; small buffers)

            def run():
                result["r"] = stream_match(engine, blocks(source), catalogue, staging=staging,
                                           columns=_columns(pool, block, N_IMAGES))

            if cuda:
                gpu.empty_cache()
                gpu.reset_peak_memory_stats(dev)
            before = gpu.memory_allocated(dev) if cuda else 0  # the blocks on the device, the engine's constants
            out[f"{name}_s_{n_splits}"] = timed(run, repeat=2)
            out[f"{name}_peak_gib_{n_splits}"] = (gpu.max_memory_allocated(dev) - before) / 2**30 if cuda else 0.0
            chosen[f"{name}_{n_splits}"] = result["r"].matches.unit.tolist()
            if name == "device":
                # finalize's share of an on-device run: the float64 re-scoring and the result tables
                total = engine.empty()
                for b in blocks(dpool):
                    total = merge(total, engine.process(b))
                columns = _columns(pool, block, N_IMAGES)
                out[f"finalize_s_{n_splits}"] = timed(lambda: engine.finalize(total, catalogue, None, columns))
                if profile and n_splits == 1:
                    out["profile"] = _profile_table(run, cuda)
    out["same_units"] = all(chosen[k] == chosen["device_1"] for k in chosen if k.endswith("_1"))
    if permutations:
        out.update(_null_runs(core, y, pool, dpool, widths, block, catalogue, permutations, dev, dry, timed))
    if units <= 500_000:  # and the CPU engine's choice
        engine = MatchEngine(y, core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None), device="cpu")
        res = stream_match(engine, blocks(pool), catalogue, columns=_columns(pool, block, N_IMAGES))
        out["same_units_as_cpu"] = res.matches.unit.tolist() == chosen["device_1"]
    return out


def _cuda_engine(y, splits, dev, dry: bool, gemm: str, **settings):
    """The engine of a --device cuda variant (top-k 5); ``dry``: the CUDA default's float16 steps on the CPU."""
    from unitmatch.core.engine import MatchEngine

    engine = MatchEngine(y, splits, top_k=5, device=dev.type, gemm=gemm, **settings)
    if dry and gemm == "auto":
        engine._half = True
    return engine


def _null_runs(core, y, pool, dpool, widths, block, catalogue, permutations, dev, dry, timed) -> dict:
    """10 splits with ``permutations`` permuted copies of every neuron, from the device blocks cut to the
    engine's default block for that many rows, with the default GEMMs and with float32 GEMMs: seconds
    (one run after a warm-up), the share of ``finalize``, peak device memory, and whether both
    chose the same units for the neurons and for the null."""
    import torch

    from unitmatch.core.engine import default_block_units, merge_all, stream_match
    from unitmatch.core.units import UnitBlock

    cuda = dev.type == "cuda"
    rows = N_NEURONS * (1 + permutations)
    step = min(block, default_block_units(N_IMAGES, n_neurons=rows, device=dev.type))
    pieces = [UnitBlock(dpool[i % POOL][:, a:min(a + step, w)], "units", i * block + a)
              for i, w in enumerate(widths) for a in range(0, w, step)]
    split_set = core.brainscore_splits(n_images=N_IMAGES, n_splits=10, stratify=None)
    out, chosen = {"null_rows": rows, "null_block_units": step}, {}
    for name, gemm in (("null", "auto"), ("null_f32", "float32")):
        engine = _cuda_engine(y, split_set, dev, dry, gemm, n_permutations=permutations)
        result = {}

        def run():
            result["r"] = stream_match(engine, pieces, catalogue, staging=False, columns=_columns(pool, block, N_IMAGES))

        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev) if cuda else 0
        out[f"{name}_s"] = timed(run, repeat=1)
        out[f"{name}_peak_gib"] = (torch.cuda.max_memory_allocated(dev) - before) / 2**30 if cuda else 0.0
        chosen[name] = (result["r"].matches.unit.tolist(), result["r"].null.unit.tolist())
        if gemm == "auto":
            total = merge_all(engine.process(b) for b in pieces)
            out["null_finalize_s"] = timed(lambda: engine.finalize(total, catalogue, None, _columns(pool, block, N_IMAGES)),
                                           repeat=1)
    out["null_same_units"] = chosen["null"] == chosen["null_f32"]
    return out


def run_size_cuda(units: int, dtype: str, block_units: int | None, splits: list[int], profile: bool = False,
                  dry: bool = False, permutations: int = 0) -> dict:
    kind = "cuda" + ("-dry" if dry else "") + ("-profile" if profile else "")
    py = [sys.executable, __file__, "--worker", kind, str(units), dtype, str(block_units or 0), str(permutations),
          *map(str, splits)]
    proc = subprocess.run(py, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the cuda worker for {units:,} {dtype} units failed (exit {proc.returncode})")
    r = json.loads(proc.stdout.splitlines()[-1])
    r.update(units=units, dtype=dtype)
    r["ratio_host_to_pinned_copy"] = r["copy_pinned_s"] / r["host_staged_s_1"]
    r["ratio_host_to_pageable_copy"] = r["copy_pageable_s"] / r["host_staged_s_1"]
    r["ratio_device_to_gemm"] = r["gemm_s"] / r["device_s_1"]
    r["ratio_device_blocks_to_gemm"] = r["gemm_s"] / max(r["device_s_1"] - r["finalize_s_1"], 1e-9)
    r["ratio_host_to_copy_into_pinned"] = r["copy_into_pinned_s"] / r["host_staged_s_1"]
    if 10 in splits:
        r["device_splits10_over_1"] = r["device_s_10"] / r["device_s_1"]
        r["host_splits10_over_1"] = r["host_staged_s_10"] / r["host_staged_s_1"]
    return r


def main_cuda(args):
    print(f"# bench_match --device cuda: {N_IMAGES} images (2880 train / 320 test), {N_NEURONS} neurons, "
          f"blocks of {args.block_units or 'default_block_units'} units; best of 2 engine runs (copies and "
          f"GEMM: best of 3-5), each after a warm-up")
    header = ("units", "dtype", "GPU", "GiB", "pinned copy s", "pageable copy s", "engine host staged s",
              "engine host plain s", "pinned copy/staged", "pageable copy/staged", "engine on-device s",
              "device GEMM s", "GEMM/on-device", "of which finalize s", "GEMM/on-device blocks",
              "copy into pinned s", "copy into pinned/staged", "10 splits on-device s", "10/1",
              "10 splits host s", "peak GiB 1 / 10 splits", "same units",
              f"GEMM {N_NEURONS} x {N_IMAGES} s / {N_NEURONS + 1} x {N_IMAGES} s",
              "on-device, float32 GEMMs s: 1 / 10 splits", "peak GiB float32 GEMMs 1 split",
              f"float16 GEMM {N_NEURONS} x {N_IMAGES} s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for dtype in args.dtype:
        for units in args.sizes:
            r = run_size_cuda(units, dtype, args.block_units, args.splits, args.profile, args.dry, args.permutations)
            rows.append(r)

            def f(key, fmt="{:.3f}"):
                return fmt.format(r[key]) if key in r else "-"

            same = str(r["same_units"]) + ("" if "same_units_as_cpu" not in r else f", cpu {r['same_units_as_cpu']}")
            print(f"| {units:,} | {dtype} | {r['device_name']} | {r['gib']:.2f} | {r['copy_pinned_s']:.3f} | "
                  f"{r['copy_pageable_s']:.3f} | {r['host_staged_s_1']:.3f} | {r['host_plain_s_1']:.3f} | "
                  f"{r['ratio_host_to_pinned_copy']:.0%} | {r['ratio_host_to_pageable_copy']:.0%} | "
                  f"{r['device_s_1']:.3f} | {r['gemm_s']:.4f} | {r['ratio_device_to_gemm']:.0%} | "
                  f"{r['finalize_s_1']:.3f} | {r['ratio_device_blocks_to_gemm']:.0%} | "
                  f"{r['copy_into_pinned_s']:.3f} | {r['ratio_host_to_copy_into_pinned']:.0%} | "
                  f"{f('device_s_10')} | {f('device_splits10_over_1', '{:.2f}x')} | {f('host_staged_s_10')} | "
                  f"{r['device_peak_gib_1']:.2f} / {f('device_peak_gib_10', '{:.2f}')} | {same} | "
                  f"{r['gemm_all_s']:.4f} / {r['gemm_all_257_s']:.4f} | "
                  f"{r['device_f32_s_1']:.3f} / {f('device_f32_s_10')} | {r['device_f32_peak_gib_1']:.2f} | "
                  f"{f('gemm_half_s', '{:.4f}')} |", flush=True)
    if args.permutations:
        print(f"\n10 splits with {args.permutations} permuted copies of each neuron, from device blocks "
              "(one run after a warm-up):\n")
        head = ("units", "dtype", "neuron rows", "block units", "default GEMMs s", "of which finalize s",
                "float32 GEMMs s", "float32 / default", "peak GiB default / float32", "same units and null")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print(f"| {r['units']:,} | {r['dtype']} | {r['null_rows']:,} | {r['null_block_units']:,} | "
                  f"{r['null_s']:.3f} | {r['null_finalize_s']:.3f} | {r['null_f32_s']:.3f} | "
                  f"{r['null_f32_s'] / r['null_s']:.2f}x | {r['null_peak_gib']:.2f} / {r['null_f32_peak_gib']:.2f} | "
                  f"{r['null_same_units']} |", flush=True)
    for r in rows:
        if "profile" in r:
            print(f"\n### {r['units']:,} {r['dtype']} units, one split, on-device: ops by device time\n")
            print(r["profile"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", help="units per run (default 10k 100k 1M on cpu, 1M on cuda)")
    ap.add_argument("--dtype", nargs="+", choices=["float16", "float32"],
                    help="activation dtypes (default float16 float32 on cpu, float16 on cuda)")
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 10], choices=[1, 10],
                    help="split counts to time (1 is always timed: the ratios are per split)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--block-units", type=int,
                    help="units per block on cuda (default: the engine's default_block_units for the GPU)")
    ap.add_argument("--quick", action="store_true",
                    help="development run: 100,000 units, float16 (cuda: 400,000 units in blocks of 100,000), "
                         "unless --sizes/--dtype/--block-units say otherwise")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--profile", action="store_true",
                    help="cuda: also torch.profiler's table of one on-device run (one split), ops by device time")
    ap.add_argument("--permutations", type=int, default=0,
                    help="also 10 splits with this many permuted copies of every neuron (a sweep's default: 100): "
                         "on cpu the fused top k against torch's passes and the GEMMs alone; on cuda with the "
                         "default and the float32 GEMMs")
    ap.add_argument("--null-images", type=int, default=640,
                    help="cpu, --permutations: images of that case (default 640, the demo's: a split's correction "
                         "of 65 columns; 3200 as above: 321)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--dry", action="store_true", help=argparse.SUPPRESS)  # --device cuda's steps on the CPU
    args = ap.parse_args()
    if args.worker:
        what, units, dtype, *rest = args.worker
        if what.startswith("cuda"):  # cuda, cuda-profile; cuda-dry(-profile): the same steps on the CPU
            print(json.dumps(worker_cuda(int(units), dtype, int(rest[0]), [int(n) for n in rest[2:]],
                                         profile="profile" in what, dry="dry" in what, permutations=int(rest[1]))))
            return
        fn = {"engine": worker_engine, "reference": worker_reference, "null": worker_null}[what]
        print(json.dumps(fn(int(units), dtype, *map(int, rest))))
        return
    if any(n <= 0 for n in args.sizes or []):
        ap.error(f"--sizes must be positive unit counts; got {args.sizes}")
    if args.permutations < 0:
        ap.error(f"--permutations must be >= 0; got {args.permutations}")
    if args.null_images < 20:
        ap.error(f"--null-images must be at least 20 (10 splits); got {args.null_images}")
    if args.profile and args.device != "cuda":
        ap.error("--profile profiles the --device cuda runs; add --device cuda")
    if args.block_units is not None and (args.block_units <= 0 or args.device != "cuda"):
        ap.error(f"--block-units must be a positive unit count, with --device cuda; got {args.block_units}")
    args.splits = sorted(set(args.splits) | {1})
    cuda = args.device == "cuda"
    if args.sizes is None:
        args.sizes = [400_000 if cuda else 100_000] if args.quick else [1_000_000] if cuda else [10_000, 100_000, 1_000_000]
    if cuda and args.quick and args.block_units is None:
        args.block_units = 100_000
    if args.dtype is None:
        args.dtype = ["float16"] if args.quick or cuda else ["float16", "float32"]
    if cuda:
        import torch

        if not torch.cuda.is_available() and not args.dry:
            ap.error(f"--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False (torch "
                     f"{torch.__version__}); run without --device for the CPU benchmark")
        main_cuda(args)
        return
    print(f"# bench_match: {N_IMAGES} images (2880 train / 320 test), {N_NEURONS} neurons, "
          f"torch threads={os.environ.get('OMP_NUM_THREADS', 'default')}, cpus={os.cpu_count()}")
    header = ("units", "dtype", "engine 1 split s", "engine 10 splits s", "10/1", "loop s (extrap.)",
              "speedup", "GEMM s (before / after)", "GEMM GF/s", "engine GF/s", "engine/GEMM", "torch GEMM s",
              "engine/torch GEMM", "peak RSS MiB", "argmax=loop")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for dtype in args.dtype:
        for units in args.sizes:
            r = run_size(units, dtype, args.splits)
            rows.append(r)
            ten = (f"{r['engine_s_10splits']:.2f} | {r['splits10_over_1']:.2f}x" if 10 in args.splits
                   else "- (not timed) | -")
            print(f"| {units:,} | {dtype} | {r['engine_s_1split']:.2f} | {ten} | "
                  f"{r['loop_s_extrapolated']:.0f} | {r['speedup_vs_loop']:.0f}x | "
                  f"{r['gemm_s']:.2f} ({r['gemm_before_after_s'][0]:.2f} / {r['gemm_before_after_s'][1]:.2f}) | "
                  f"{r['gemm_gflops']:.0f} | {r['engine_gflops']:.0f} | "
                  f"{r['ratio_to_gemm']:.0%} | {r['torch_gemm_s']:.2f} | {r['ratio_to_torch_gemm']:.0%} | "
                  f"{r['peak_rss_mib']:.0f} | {r['argmax_agrees_with_loop']} |",
                  flush=True)
    if args.permutations:
        print(f"\n10 splits with {args.permutations} permuted copies of each neuron "
              f"({N_NEURONS * (1 + args.permutations):,} neuron rows), the engine's default block for them; "
              "GEMMs: its products and corrections alone (torch), before / after")
        header = ("images", "units", "dtype", "block", "engine s (fused top k)", "engine s (torch's passes)",
                  "fused / torch", "GEMMs s (before / after)", "GEMMs / fused", "GEMMs / torch's passes",
                  "the rule takes", "same units")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for dtype in args.dtype:
            for units in args.sizes:
                r = run_null(units, dtype, args.permutations, args.null_images)
                rows.append(r)
                print(f"| {args.null_images} | {units:,} | {dtype} | {r['block_units']} | "
                      f"{' / '.join(f'{v:.2f}' for v in r['engine_s_fused'])} | {r['engine_s_torch'][0]:.2f} | "
                      f"{r['fused_over_torch']:.2f}x | {r['gemm_s']:.2f} ({r['gemm_before']:.2f} / "
                      f"{r['gemm_after']:.2f}) | {r['ratio_fused']:.0%} | {r['ratio_torch']:.0%} | "
                      f"{'fused' if r['rule_takes_fused'] else 'passes'} | {r['same_units']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
