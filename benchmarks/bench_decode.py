"""Matched-population decoding benchmark (issue 8): batched torch solver vs scikit-learn, same run.

Two cases:

1. MajajHong-sized (``majaj``): 2560 images, 8 categories (320 each), 256 neurons, one region, the
   10 Brain-Score splits (2304 train / 256 test), 100 random populations per split. Units come
   from a synthetic pool of 4096 correlated, rectified "units" (64 latent factors carrying
   category and object identity plus noise); the matched units are 256 of them and the neurons
   noisy copies. Each split is decoded by ``matched_population_decoding`` with
   ``solver="sklearn"`` and ``solver="batched"``, alternating which goes first, so both see the
   same machine load. Printed: wall and CPU (process) seconds per split and in total, the ratios,
   the iterations, and the largest accuracy difference over every fit (transfer, units, neurons
   and the 100 null fits). CPU seconds are less sensitive to other processes on the machine.
2. Demo-sized (``demo``): the demo's planted model (``test_convnext``, random weights, seed 0,
   ``stages`` layers) on the demo's 400 generated images (8 categories), 48 planted neurons
   (SNR 1, 8 repeats) in region V4 plus 16 noise neurons, the 10 splits, 100 permutations and
   100 random populations: ``core.analyze`` timed whole and in its decoding step
   (``core.analysis._decode``: random-population gathering plus every fit), once with each
   solver, alternating, ``--repeats`` times.

Run: python benchmarks/bench_decode.py [--cases majaj demo] [--splits 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np


def majaj_data(seed: int = 0, n_images: int = 2560, n_categories: int = 8, n_neurons: int = 256,
               pool: int = 4096, n_random: int = 100):
    """Labels, matched units, neurons and random populations of a MajajHong-sized region."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_categories), n_images // n_categories)
    objects = rng.integers(0, 8, n_images)
    n_latent = 64
    latent = (rng.normal(size=(n_categories, n_latent))[labels]
              + 0.7 * rng.normal(size=(n_categories, 8, n_latent))[labels, objects]
              + 4.0 * rng.normal(size=(n_images, n_latent)))
    units = latent @ (rng.normal(size=(n_latent, pool)) / np.sqrt(n_latent))
    units = np.maximum(units + 2.0 * rng.normal(size=units.shape), 0).astype(np.float32)
    matched = rng.choice(pool, n_neurons, replace=False)
    unit_x = units[:, matched].astype(np.float64)
    neurons = unit_x + unit_x.std(axis=0) * rng.normal(size=unit_x.shape)
    draws = np.stack([rng.choice(pool, n_neurons, replace=False) for _ in range(n_random)])
    populations = units[:, draws].transpose(1, 0, 2)  # (n_random, images, neurons), float32
    return labels, unit_x, neurons, populations


def bench_majaj(n_splits: int) -> None:
    import unitmatch.core.decoding as decoding
    from unitmatch.core.decoding import matched_population_decoding
    from unitmatch.core.splits import brainscore_splits

    labels, units, neurons, pops = majaj_data()
    splits = brainscore_splits(n_images=labels.size)[:n_splits]
    iters = []
    fit = decoding.fit_many

    def counting(*a, **k):  # records the batched solver's iterations per fit
        out = fit(*a, **k)
        iters.extend(out.n_iter.tolist())
        return out

    decoding.fit_many = counting
    print(f"\n## MajajHong-sized: {labels.size} images, {np.unique(labels).size} categories, "
          f"{units.shape[1]} neurons, {pops.shape[0]} random populations, {len(splits)} splits")
    print("| split | sklearn s | batched s | ratio | sklearn CPU s | batched CPU s | CPU ratio | "
          "max abs accuracy diff |")
    print("|---|---|---|---|---|---|---|---|")
    t_sk, t_b, c_sk, c_b, diffs = [], [], [], [], []
    try:
        _majaj_splits(splits, labels, units, neurons, pops, matched_population_decoding,
                      (t_sk, t_b, c_sk, c_b), diffs)
    finally:
        decoding.fit_many = fit
    print(f"| total | {sum(t_sk):.1f} | {sum(t_b):.1f} | {sum(t_sk) / sum(t_b):.2f}x | {sum(c_sk):.1f} | "
          f"{sum(c_b):.1f} | {sum(c_sk) / sum(c_b):.2f}x | {max(diffs):.4f} |")
    it = np.array(iters)
    print(f"batched L-BFGS iterations per fit: median {np.median(it):.0f}, max {it.max()}; {it.size} fits")


def _majaj_splits(splits, labels, units, neurons, pops, decode, times, diffs) -> None:
    t_sk, t_b, c_sk, c_b = times
    for s, (train, test) in enumerate(splits):
        out = {}
        for solver in (("sklearn", "batched") if s % 2 == 0 else ("batched", "sklearn")):
            t0, c0 = time.perf_counter(), time.process_time()
            out[solver] = decode(units, neurons, labels, train, test, random_populations=pops,
                                 solver=solver)
            out[solver + "_s"] = time.perf_counter() - t0
            out[solver + "_cpu"] = time.process_time() - c0
        a, b = out["sklearn"], out["batched"]
        d = max(abs(a.transfer_accuracy - b.transfer_accuracy), abs(a.unit_accuracy - b.unit_accuracy),
                abs(a.neuron_accuracy - b.neuron_accuracy), float(np.abs(a.null - b.null).max()))
        t_sk.append(out["sklearn_s"])
        t_b.append(out["batched_s"])
        c_sk.append(out["sklearn_cpu"])
        c_b.append(out["batched_cpu"])
        diffs.append(d)
        print(f"| {s} | {t_sk[-1]:.1f} | {t_b[-1]:.1f} | {t_sk[-1] / t_b[-1]:.2f}x | {c_sk[-1]:.1f} | "
              f"{c_b[-1]:.1f} | {c_sk[-1] / c_b[-1]:.2f}x | {d:.4f} |"
              f" transfer {b.transfer_accuracy:.3f}, neurons {b.neuron_accuracy:.3f}, null mean "
              f"{b.null.mean():.3f}", flush=True)


def demo_case():
    """Activations of the demo's planted model and the demo's synthetic brain, in memory."""
    from unitmatch.core.extract import create_model, extract_activations
    from unitmatch.core.layers import layer_names
    from unitmatch.core.neural import NeuralAssembly
    from unitmatch.core.splits import brainscore_splits
    from unitmatch.core.synthetic import generate_stimuli, plant_neurons
    from unitmatch.core.units import catalogue_of, gather_columns

    stimuli = generate_stimuli(n_categories=8, objects_per_category=5, variations=10, size=96, seed=0)
    model = create_model("test_convnext", seed=0)
    acts = extract_activations(model, stimuli, layer_names(model, "stages"))
    cat = catalogue_of(acts)
    x = gather_columns(acts, cat, np.arange(cat.n_units))
    rng = np.random.default_rng(0)
    units = rng.choice(np.flatnonzero(x.std(axis=0) > 0), 48, replace=False)
    brain = plant_neurons(x[:, units], n_planted=48, n_noise=16, snr=1.0, units=np.arange(48),
                          repeats=8, seed=0)
    regions = np.where(brain.truth.planted, "V4", "noise")
    assembly = NeuralAssembly(brain.responses, brain.truth.neuron, regions, stimuli.image_ids,
                              stimuli.metadata)
    splits = brainscore_splits(stimuli.metadata, n_images=assembly.n_images)
    return acts, assembly, splits, cat.n_units


def bench_demo(repeats: int) -> None:
    import unitmatch.core.analysis as analysis
    from unitmatch.core.decoding import matched_population_decoding

    acts, assembly, splits, n_units = demo_case()
    print(f"\n## Demo-sized core.analyze: {assembly.n_images} images, {assembly.n_neurons} neurons "
          f"(48 V4 + 16 noise), {n_units:,} units (test_convnext stages), {len(splits)} splits, "
          f"100 permutations, 100 random populations")
    print("| solver | run | analyze s | decoding s | decoding share |")
    print("|---|---|---|---|---|")
    decode = analysis._decode
    spent = []

    def timed_decode(*a, **k):
        t0 = time.perf_counter()
        try:
            return decode(*a, **k)
        finally:
            spent.append(time.perf_counter() - t0)

    analysis._decode = timed_decode
    rows = {"sklearn": [], "batched": []}
    results = {}
    try:
        for r in range(repeats):
            for solver in (("sklearn", "batched") if r % 2 == 0 else ("batched", "sklearn")):
                analysis.matched_population_decoding = functools.partial(matched_population_decoding,
                                                                         solver=solver)
                t0 = time.perf_counter()
                results[solver] = analysis.analyze(acts, assembly, splits, n_permutations=100,
                                                   n_random_populations=100, seed=0)
                total = time.perf_counter() - t0
                rows[solver].append((total, spent[-1]))
                print(f"| {solver} | {r} | {total:.1f} | {spent[-1]:.1f} | {spent[-1] / total:.0%} |",
                      flush=True)
    finally:
        analysis._decode = decode
        analysis.matched_population_decoding = matched_population_decoding
    cols = ["transfer_accuracy", "unit_accuracy", "neuron_accuracy", "null_mean"]
    diff = np.abs(results["sklearn"].decoding[cols].to_numpy()
                  - results["batched"].decoding[cols].to_numpy()).max()
    for solver, vals in rows.items():
        t = np.median([v[0] for v in vals])
        d = np.median([v[1] for v in vals])
        print(f"{solver}: median analyze {t:.1f} s, decoding {d:.1f} s ({d / t:.0%})")
    print(f"largest difference in the decoding table (transfer, units, neurons, null mean) "
          f"between solvers: {diff:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["majaj", "demo"], choices=["majaj", "demo"])
    ap.add_argument("--splits", type=int, default=10, help="MajajHong-sized case: splits to run")
    ap.add_argument("--repeats", type=int, default=2, help="demo case: analyze runs per solver")
    args = ap.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "majaj" in args.cases:
        bench_majaj(args.splits)
    if "demo" in args.cases:
        bench_demo(args.repeats)


if __name__ == "__main__":
    main()
