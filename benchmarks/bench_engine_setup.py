"""Matching engine construction benchmark: ``MatchEngine(responses, splits, n_permutations=...)``.

Before any block is scored, the engine stacks the permuted copies of the neurons, z-scores every
row, checks that no row is constant on a train set, and builds each split's neuron-side matrices.
With a permutation null that is thousands of rows (256 neurons x 101 = 25,856 rows at MajajHong's
size), and every Ray worker that scores blocks builds its own engine.

The same-run reference is what any construction must do at least: stacking the permuted copies
(``stack_permutations``, the same draws) and one float64 pass that centres every row. The ratio
printed is construction / reference.

Cases: the demo's (64 neurons, 400 images) and MajajHong's (256 neurons, 2560 images), each with
10 Brain-Score splits (90% train) and ``--permutations`` (100).

Run: python benchmarks/bench_engine_setup.py [--permutations 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--permutations", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from unitmatch import core
    from unitmatch.core.engine import MatchEngine, stack_permutations

    rng = np.random.default_rng(0)
    for name, n_neurons, n_images in (("demo", 64, 400), ("MajajHong", 256, 2560)):
        responses = rng.standard_normal((n_neurons, n_images))
        splits = core.brainscore_splits(n_images=n_images, n_splits=10, stratify=None)

        def reference():
            y = stack_permutations(responses, args.permutations, 0)
            return y - y.mean(axis=1, keepdims=True)

        times = {"engine": [], "reference": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            MatchEngine(responses, splits, n_permutations=args.permutations, device="cpu")
            times["engine"].append(time.perf_counter() - t)
            t = time.perf_counter()
            reference()
            times["reference"].append(time.perf_counter() - t)
        engine, ref = (float(np.median(times[k])) for k in ("engine", "reference"))
        rows = n_neurons * (1 + args.permutations)
        print(f"{name}: {n_neurons} neurons x {1 + args.permutations} rows = {rows} rows, {n_images} images, "
              f"10 splits; medians of {args.repeats}")
        print(f"  construction {engine:.2f} s ({', '.join(f'{t:.2f}' for t in times['engine'])}); reference "
              f"(stack the copies, centre the rows) {ref:.2f} s; ratio {engine / ref:.1f}")


if __name__ == "__main__":
    main()
