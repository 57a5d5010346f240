"""The matching engine's final step: ``MatchEngine.finalize`` with its float64 re-scoring.

After the blocks, every (split, neuron row)'s candidates within ``tie_margin`` of its best are
re-scored in float64 (train r, then the winner's test r) and the result tables are built. With the
default permutation null (100 permutations) that is 25,856 neuron rows x 10 splits at MajajHong's
size, once per model and region, on the host even when the blocks ran on a GPU.

The same-run reference is the textbook computation of the same float64 values: per split, the
train (then test) images of the candidates' columns and of the neuron rows gathered, centred,
normalised and multiplied pair by pair. The ratio printed is finalize / reference (finalize also
builds the tables). The reference's r of each winner is compared with finalize's.

The candidates are synthetic (the blocks are not scored): each row gets 5 distinct units of a pool
of float16 columns, of which the second is within ``tie_margin`` of the first for 5% of the rows.

Cases: the demo's (64 neurons, 400 images) and MajajHong's (256 neurons, 2560 images), 10
Brain-Score splits, ``--permutations`` (100) and a 1-split case without a null (the GPU benchmark's).

Run: python benchmarks/bench_finalize.py [--permutations 100] [--repeats 3] [--units 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TOP_K = 5


def _partial(engine, n_units: int, rng):
    """Synthetic top-k candidates for every (split, neuron row): distinct units, descending r."""
    from unitmatch.core.engine import LayerBest, MatchPartial

    S, M = engine.n_splits, engine.n_rows
    if n_units < 1000 * TOP_K:
        raise ValueError(f"--units must be at least {1000 * TOP_K}; got {n_units}")
    # distinct units a row: a random start, then steps of 1..999
    steps = np.cumsum(rng.integers(1, 1000, (S, M, TOP_K)), axis=2)
    units = (rng.integers(0, n_units, (S, M, 1)) + steps) % n_units
    top_r = np.sort(rng.uniform(0.05, 0.3, (S, M, TOP_K)), axis=2)[..., ::-1].astype(np.float32)
    tie = rng.random((S, M)) < 0.05
    top_r[..., 1] = np.where(tie, top_r[..., 0] - np.float32(engine.tie_margin / 2), top_r[..., 1])
    best = LayerBest(units[..., 0].copy(), top_r[..., 0].astype(np.float64), np.zeros((S, M)))
    return MatchPartial(np.ascontiguousarray(top_r), units.astype(np.int64), {"units": best}, n_units)


def _reference(engine, partial, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """float64 train r of every near candidate, split by split, from gathered and normalised columns."""
    near = (partial.top_unit >= 0) & (partial.top_r >= partial.top_r[..., :1] - engine.tie_margin)
    out = np.full(partial.top_unit.shape, np.nan)
    for s, (train, _) in enumerate(engine.splits):
        j, slot = np.nonzero(near[s])
        units = partial.top_unit[s, j, slot]
        xs = x[np.ix_(train, units)].astype(np.float64).T  # pairs x train images
        ys = y[np.ix_(j, train)]
        xs -= xs.mean(axis=1, keepdims=True)
        ys -= ys.mean(axis=1, keepdims=True)
        out[s, j, slot] = np.einsum("pi,pi->p", xs, ys) / np.sqrt(np.einsum("pi,pi->p", xs, xs)
                                                                    * np.einsum("pi,pi->p", ys, ys))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--permutations", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--units", type=int, default=20000, help="the pool of candidate columns")
    args = ap.parse_args()

    from unitmatch import core
    from unitmatch.core.engine import MatchEngine, stack_permutations
    from unitmatch.core.units import LayerUnits, UnitCatalogue

    rng = np.random.default_rng(0)
    cases = (("demo", 64, 400, 10, args.permutations), ("MajajHong", 256, 2560, 10, args.permutations),
             ("one split, no null", 256, 3200, 1, 0))
    for name, n_neurons, n_images, n_splits, perms in cases:
        responses = rng.standard_normal((n_neurons, n_images)) * 3 + 10
        splits = core.brainscore_splits(n_images=n_images, n_splits=n_splits, stratify=None)
        engine = MatchEngine(responses, splits, n_permutations=perms, device="cpu")
        x = np.maximum(rng.standard_normal((n_images, args.units)), 0).astype(np.float16)
        catalogue = UnitCatalogue([LayerUnits("units", (args.units,), ("unit",))])
        partial = _partial(engine, args.units, rng)
        y = stack_permutations(responses, perms, engine.settings.seed)

        def columns(units):
            return x[:, units]

        times = {"finalize": [], "reference": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            result = engine.finalize(partial, catalogue, columns=columns)
            times["finalize"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = _reference(engine, partial, x, y)
            times["reference"].append(time.perf_counter() - t)
        fin, reference = (float(np.median(times[k])) for k in ("finalize", "reference"))
        # each winner's r against the reference's r of the same (split, row, unit)
        S, M = engine.n_splits, engine.n_rows
        winners = np.concatenate([result.matches.unit.to_numpy().reshape(S, n_neurons),
                                  result.null.unit.transpose(1, 0, 2).reshape(S, -1)], axis=1) \
            if perms else result.matches.unit.to_numpy().reshape(S, M)
        got = np.concatenate([result.matches.train_r.to_numpy().reshape(S, n_neurons),
                              result.null.train_r.transpose(1, 0, 2).reshape(S, -1)], axis=1) \
            if perms else result.matches.train_r.to_numpy().reshape(S, M)
        slot = np.argmax(partial.top_unit == winners[..., None], axis=2)
        want = np.take_along_axis(ref, slot[..., None], axis=2)[..., 0]
        best = np.nanmax(ref, axis=2)
        print(f"{name}: {n_neurons} neurons x {1 + perms} rows = {M} rows, {n_images} images, {n_splits} splits, "
              f"{TOP_K} candidates a row from {args.units} units; medians of {args.repeats}")
        print(f"  finalize {fin:.3f} s ({', '.join(f'{t:.3f}' for t in times['finalize'])}); reference "
              f"(gathered, centred pairs) {reference:.3f} s; ratio {fin / reference:.2f}; winners' r vs the "
              f"reference: max |diff| {np.nanmax(np.abs(got - want)):.1e}, each the row's best: "
              f"{bool(np.allclose(want, best, rtol=0, atol=1e-12))}")


if __name__ == "__main__":
    main()
