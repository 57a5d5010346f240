"""Sparse-unit policy on real data: what ``min_varying_images`` changes, and what it costs the null.

Setup (issue 14): the real V4 session in ../shared/data/v4_cowley2023_session210325 (50 neurons,
640 images, 6-10 repeats), every unit of layer3 + layer4 of a random-weight timm resnet18 (seed 0;
75,264 units; activations cached as float32 under /tmp), the 10 Brain-Score splits (unstratified:
the session has no object labels). Matched together in one pass per policy value: the 50 real
neurons and 50 pure-noise neurons (each real neuron's mean responses shuffled over images once,
so the noise has the real marginals: skewed spike counts), with 100 permutations riding along.

Per value of ``min_varying_images`` it prints:
- real neurons: the fraction of selected (neuron, split) units that vary on <= 2 train images
  (``core.reference.varying_images``, independent of the engine), the fraction of undefined
  (NaN) held-out r, Brain-Score's score / ceiling / ceiled score (``core.stats.brainscore_scores``),
  unitmatch's median r / sqrt(ceiling), and the neurons significant after FDR;
- the null (the permuted copies of the real neurons): the same sparse and NaN fractions, and the
  copies whose statistic is undefined in every split;
- the noise neurons: the false-positive rate P(p <= 0.05) (nominal 5/101 with 100 permutations)
  and the fraction significant after Benjamini-Hochberg (nominal 0); and the same rate with each
  permuted copy of a real neuron in turn tested against the other copies (leave-one-out: 5,000
  null statistics, nominal 5/100).

With --timing it prints only the policy's cost: seconds of the matching of the 50 real neurons (no
permutations) with ``min_varying_images`` 1 (no count) and each value given.

Run (with the package importable: ``pip install -e .``, or PYTHONPATH at the checkout's parent when
the checkout is named unitmatch):
    python benchmarks/bench_sparse_units.py [--values 1 2 3 5 10] [--permutations 100] [--json out.json]
     [--data ../shared/data/v4_cowley2023_session210325] [--cache /tmp/parity/v4_resnet18_seed0_layer3_layer4.npz]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

#: ../shared beside the repository, as in the main checkout; --data points elsewhere
DATA = Path(__file__).resolve().parents[2] / "shared/data/v4_cowley2023_session210325"


def activations(assembly_stimuli, cache: Path) -> dict[str, np.ndarray]:
    """layer3 + layer4 of random-weight resnet18 on the session's images, cached."""
    if cache.exists():
        with np.load(cache) as f:
            return {k: f[k] for k in f.files}
    from unitmatch.core.extract import create_model, extract_activations

    acts = extract_activations(create_model("resnet18", seed=0), assembly_stimuli, ["layer3", "layer4"],
                               dtype=np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **acts)
    return acts


def _split_mean(test_r: np.ndarray) -> np.ndarray:
    """(P, splits, M) -> (P, M): mean over the defined splits (NaN where none), as core.stats does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(test_r, axis=1)


def _leave_one_out_fpr(null_stat: np.ndarray, alpha: float = 0.05) -> float:
    """P(p <= alpha) when each permuted copy in turn plays the observed neuron against the others.

    ``null_stat`` is (P, M), the split-averaged held-out r per copy; a copy whose statistic is
    undefined gets no p-value (as an observed neuron would not), and leaves the others' nulls.
    Exact under the null, and P x M samples instead of a few noise neurons.
    """
    from unitmatch.core.stats import permutation_p_values

    p_values = []
    null_stat = np.asarray(null_stat)
    for i in range(null_stat.shape[0]):
        others = np.delete(null_stat, i, axis=0)
        p_values.append(permutation_p_values(null_stat[i], others))
    p_values = np.concatenate(p_values)
    return float(np.mean(p_values[np.isfinite(p_values)] <= alpha))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--values", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    ap.add_argument("--permutations", type=int, default=100)
    ap.add_argument("--noise-copies", type=int, default=1)
    ap.add_argument("--timing", action="store_true",
                    help="only time the policy's cost: the 50 real neurons, no permutations, values 1 and --values")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/parity/v4_resnet18_seed0_layer3_layer4.npz"))
    args = ap.parse_args()

    from unitmatch import core
    from unitmatch.core.engine import MatchSettings, run_matching
    from unitmatch.core.reference import varying_images
    from unitmatch.core.stats import brainscore_scores, neuron_table
    from unitmatch.core.units import as_layers, catalogue_of

    assembly, stimuli = core.load_plain(args.data / "responses_raw.npy", args.data / "images.zip", region="V4")
    layers = as_layers(activations(stimuli, args.cache))
    catalogue = catalogue_of(layers)
    x_all = np.concatenate([a.reshape(a.shape[0], -1) for a in layers.values()], axis=1)
    real = assembly.mean_responses()
    rng = np.random.default_rng(2026)
    noise = np.concatenate([rng.permuted(real, axis=1) for _ in range(args.noise_copies)])
    y = np.concatenate([real, noise])
    M = len(real)
    regions = np.array(["real"] * M + ["noise"] * len(noise))
    splits = core.brainscore_splits(n_images=assembly.n_images, stratify=None)
    ceiling_splits = core.split_half_reliability(assembly.responses, per_split=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ceiling = np.nanmean(ceiling_splits, axis=0)
    varying = np.stack([varying_images(x_all, train) for train, _ in splits])  # (splits, units)
    print(f"{x_all.shape[1]} units; units varying on exactly one train image per split: "
          f"{np.mean((varying == 1).sum(axis=1)):.0f}; on <= 2: {np.mean((varying <= 2).sum(axis=1)):.0f}")

    if args.timing:
        # the policy's cost is one more sweep over each block (min/max, then equality counts): it shows
        # most where the products are cheapest, few neuron rows
        for value in sorted({1, *args.values}):
            settings = MatchSettings(min_varying_images=value)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                run_matching(layers, real, splits, settings, catalogue=catalogue)
                times.append(time.perf_counter() - t0)
            print(f"min_varying_images={value}: {np.median(times):.2f} s (median of 3; 50 neurons, 10 splits, "
                  f"{x_all.shape[1]} units)", flush=True)
        return

    rows = []
    for value in args.values:
        settings = MatchSettings(n_permutations=args.permutations, seed=0, min_varying_images=value)
        t0 = time.perf_counter()
        result = run_matching(layers, y, splits, settings, catalogue=catalogue)
        seconds = time.perf_counter() - t0
        m = result.matches
        units = m.unit.to_numpy().reshape(len(splits), len(y))
        test_r = m.test_r.to_numpy().reshape(len(splits), len(y))
        sparse = np.take_along_axis(varying, units, axis=1) <= 2
        null_units = result.null.unit[:, :, :M]  # (P, splits, real neurons)
        null_sparse = np.stack([varying[s][null_units[:, s]] for s in range(len(splits))], axis=1) <= 2
        null_test = result.null.test_r[:, :, :M]
        table = neuron_table(result, regions=regions, ceiling=np.concatenate([ceiling, np.full(len(noise), np.nan)]))
        noise_t, real_t = table[table.region == "noise"], table[table.region == "real"]
        bs = brainscore_scores(test_r[:, :M], ceiling_splits)
        row = {
            "min_varying_images": value, "seconds": round(seconds, 1),
            "real_sparse_frac": sparse[:, :M].mean(), "real_nan_frac": np.isnan(test_r[:, :M]).mean(),
            "real_brainscore_score": bs["brainscore_score"], "real_brainscore_ceiling": bs["brainscore_ceiling"],
            "real_brainscore_ceiled": bs["brainscore_ceiled"],
            "real_median_test_r_ceiled": real_t.test_r_ceiled.median(),
            "real_significant": int(real_t.significant.sum()),
            "null_sparse_frac": null_sparse.mean(), "null_nan_frac": np.isnan(null_test).mean(),
            "null_all_nan_copies": int(np.isnan(null_test).all(axis=1).sum()),
            "noise_fpr": (noise_t.p_value <= 0.05).mean(), "noise_fdr_significant": noise_t.significant.mean(),
            "noise_untested": int(noise_t.p_value.isna().sum()),
            "loo_fpr": _leave_one_out_fpr(_split_mean(result.null.test_r)),
        }
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    header = ("| min_varying_images | sparse (<=2) selected, real | NaN test r, real | sparse selected, null | "
              "NaN test r, null | all-NaN null copies | Brain-Score score | ceiling | ceiled | median r/sqrt(c) | "
              "real significant (of 50) | noise FPR p<=0.05 | noise BH-significant | leave-one-out FPR | s |")
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(f"| {r['min_varying_images']} | {r['real_sparse_frac']:.1%} | {r['real_nan_frac']:.1%} | "
              f"{r['null_sparse_frac']:.1%} | {r['null_nan_frac']:.1%} | {r['null_all_nan_copies']} | "
              f"{r['real_brainscore_score']:.4f} | {r['real_brainscore_ceiling']:.4f} | "
              f"{r['real_brainscore_ceiled']:.4f} | {r['real_median_test_r_ceiled']:.4f} | {r['real_significant']} | "
              f"{r['noise_fpr']:.3f} | {r['noise_fdr_significant']:.3f} | {r['loo_fpr']:.3f} | {r['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
