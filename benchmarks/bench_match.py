"""Matching-engine benchmark: engine vs the per-neuron loop vs the machine's float32 GEMM, same run.

Setup (issue 2): 3200 images, one Brain-Score split of 2880 train / 320 test (and the 10 default
splits), 256 neurons (192 planted at SNR 0.5 from the units, 64 pure noise), units in
{10k, 100k, 1M}. Units stream as blocks cycled from a fixed pool of distinct random blocks, so the
input's memory is the same at every size and the peak RSS shows the engine's own memory.

Per size it prints:
- engine seconds for 1 split and for 10 splits (including the final float64 re-scoring),
- the per-neuron loop (Brain-Score's SingleRegression algorithm: for each neuron, Pearson r with all
  units in float64, argmax), timed on a subset of neurons and extrapolated to 256, and the speedup,
- numpy float32 GEMM of the same shapes, (256 x 2880) @ (2880 x units), and its GFLOP/s,
- the engine's achieved GFLOP/s (2 * 2880 * 256 * units / seconds, one split) and its ratio to GEMM,
- the 10-split / 1-split time ratio, and the peak RSS of the engine process.

Run: .venv/bin/python benchmarks/bench_match.py [--sizes 10000 100000 1000000] [--dtype float16 float32]
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


def _setup(units: int, dtype: str):
    from unitmatch import core
    from unitmatch.core.engine import default_block_units
    from unitmatch.core.synthetic import plant_neurons

    block = min(default_block_units(N_IMAGES), units)
    pool = _pool(dtype, block)
    brain = plant_neurons(pool[0].astype(np.float32), n_planted=192, n_noise=64, snr=0.5, seed=1)
    widths = [min(block, units - s) for s in range(0, units, block)]
    return core, pool, brain.responses, widths, block


def _blocks(core, pool, widths, block):
    from unitmatch.core.units import UnitBlock

    for i, w in enumerate(widths):
        yield UnitBlock(pool[i % POOL][:, :w], "units", i * block)


def _columns(pool, block, n_images):
    def fetch(units):
        out = np.empty((n_images, len(units)))
        for k, u in enumerate(units):
            out[:, k] = pool[(u // block) % POOL][:, u % block]
        return out
    return fetch


def worker_engine(units: int, dtype: str) -> dict:
    core, pool, y, widths, block = _setup(units, dtype)
    from unitmatch.core.engine import MatchEngine, stream_match
    from unitmatch.core.units import LayerUnits, UnitBlock, UnitCatalogue

    catalogue = UnitCatalogue([LayerUnits("units", (units,), ("unit",))])
    out = {"block_units": block}
    for n_splits in (1, 10):
        splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=n_splits, stratify=None)
        engine = MatchEngine(y, splits, top_k=5)
        engine.process(UnitBlock(pool[0][:, :256], "units", 0))  # warm-up (allocations, threads)
        t0 = time.perf_counter()
        res = stream_match(engine, _blocks(core, pool, widths, block), catalogue,
                           columns=_columns(pool, block, N_IMAGES))
        out[f"engine_s_{n_splits}"] = time.perf_counter() - t0
        if n_splits == 1:
            out["units_split0"] = res.matches.unit.tolist()
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["pool_mib"] = sum(a.nbytes for a in pool) / 2**20
    return out


def worker_reference(units: int, dtype: str, n_ref: int) -> dict:
    core, pool, y, widths, block = _setup(units, dtype)
    train = core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None)[0][0]
    # the machine's float32 GEMM on the same shapes, per distinct block width, summed over the stream
    yt = np.ascontiguousarray(y[:, train].astype(np.float32))
    gemm = 0.0
    per_width = {}
    for w in sorted(set(widths)):
        xt = np.ascontiguousarray(pool[0][train, :w].astype(np.float32))
        yt @ xt
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            yt @ xt
            times.append(time.perf_counter() - t0)
        per_width[w] = min(times)
    gemm = sum(per_width[w] for w in widths)
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
    return {"gemm_s": gemm, "loop_s_per_neuron": loop / n_ref, "loop_best": best}


def run_size(units: int, dtype: str) -> dict:
    n_ref = 16 if units <= 10_000 else 4 if units <= 100_000 else 1
    py = [sys.executable, __file__, "--worker"]
    eng = json.loads(subprocess.run(py + ["engine", str(units), dtype], check=True, capture_output=True,
                                    text=True).stdout.splitlines()[-1])
    ref = json.loads(subprocess.run(py + ["reference", str(units), dtype, str(n_ref)], check=True,
                                    capture_output=True, text=True).stdout.splitlines()[-1])
    agree = all(eng["units_split0"][int(j)] == u for j, u in ref["loop_best"].items())
    flops = 2 * 2880 * N_NEURONS * units
    return {
        "units": units, "dtype": dtype, "block_units": eng["block_units"],
        "engine_s_1split": eng["engine_s_1"], "engine_s_10splits": eng["engine_s_10"],
        "loop_s_extrapolated": ref["loop_s_per_neuron"] * N_NEURONS, "loop_neurons_timed": n_ref,
        "speedup_vs_loop": ref["loop_s_per_neuron"] * N_NEURONS / eng["engine_s_1"],
        "gemm_s": ref["gemm_s"], "gemm_gflops": flops / ref["gemm_s"] / 1e9,
        "engine_gflops": flops / eng["engine_s_1"] / 1e9, "ratio_to_gemm": ref["gemm_s"] / eng["engine_s_1"],
        "splits10_over_1": eng["engine_s_10"] / eng["engine_s_1"],
        "peak_rss_mib": eng["peak_rss_mib"], "input_pool_mib": eng["pool_mib"],
        "argmax_agrees_with_loop": agree,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dtype", nargs="+", default=["float16", "float32"], choices=["float16", "float32"])
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        what, units, dtype, *rest = args.worker
        fn = worker_engine if what == "engine" else worker_reference
        print(json.dumps(fn(int(units), dtype, *map(int, rest))))
        return
    print(f"# bench_match: {N_IMAGES} images (2880 train / 320 test), {N_NEURONS} neurons, "
          f"torch threads={os.environ.get('OMP_NUM_THREADS', 'default')}, cpus={os.cpu_count()}")
    header = ("units", "dtype", "engine 1 split s", "engine 10 splits s", "10/1", "loop s (extrap.)",
              "speedup", "GEMM s", "GEMM GF/s", "engine GF/s", "engine/GEMM", "peak RSS MiB", "argmax=loop")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for dtype in args.dtype:
        for units in args.sizes:
            r = run_size(units, dtype)
            rows.append(r)
            print(f"| {units:,} | {dtype} | {r['engine_s_1split']:.2f} | {r['engine_s_10splits']:.2f} | "
                  f"{r['splits10_over_1']:.2f}x | {r['loop_s_extrapolated']:.0f} | {r['speedup_vs_loop']:.0f}x | "
                  f"{r['gemm_s']:.2f} | {r['gemm_gflops']:.0f} | {r['engine_gflops']:.0f} | "
                  f"{r['ratio_to_gemm']:.0%} | {r['peak_rss_mib']:.0f} | {r['argmax_agrees_with_loop']} |",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
