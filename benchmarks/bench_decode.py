"""Matched-population decoding benchmark (issue 8): the batched solver, with scikit-learn as the
same-run reference.

Two cases:

1. MajajHong-sized (``majaj``): 2560 images, 8 categories (320 each), 256 neurons, one region, the
   10 Brain-Score splits (2304 train / 256 test), 100 random populations. Units come from a
   synthetic pool of 4096 correlated, rectified "units" (64 latent factors carrying category and
   object identity plus noise); the matched units are 256 of them and the neurons noisy copies.
   The batched solver decodes all splits the way ``core.analyze`` does
   (``matched_population_decoding_splits``: here the units' and neurons' classifiers of all splits
   in one batch, and each split's null, two chunks, warm-started from the previous split's), timed
   whole (wall and process CPU seconds) and in its parts (z-scoring and validation vs the fits,
   iterations of cold and warm-started fits). Then scikit-learn (one thread, as ``solver="sklearn"`` runs) decodes the
   first ``--sklearn-splits`` splits: its time, extrapolated to all splits, and the largest
   accuracy difference over every fit of those splits (transfer, units, neurons, each null fit).
2. Demo-sized (``demo``): the demo's planted model (``test_convnext``, random weights, seed 0,
   ``stages`` layers) on the demo's 400 generated images (8 categories), 48 planted neurons
   (SNR 1, 8 repeats) in region V4 plus 16 noise neurons, the 10 splits, 100 permutations and
   100 random populations: ``core.analyze`` timed whole and in its decoding step
   (``core.analysis._decode``: random-population gathering plus every fit), ``--repeats`` times
   with the batched solver (and once with scikit-learn with ``--demo-sklearn``).

``--directions two-loop compact`` runs the batched solver once with each way of computing its
L-BFGS directions (``core._logreg._history``; default: the device's own, the recursion on the CPU,
the compact form on CUDA), so that both are timed in one run on the same device. (On the CPU the
float32 phase with the recursion runs compiled, ``core._logreg_kernel``; with the compact form it
is torch's.) ``--directions two-loop two-loop/torch`` times the CPU's compiled float32 phase against
torch's ops in the same run.
``--ops`` (any device) counts, for each of those ways, the operations one fit of 100 demo-sized
problems dispatches per L-BFGS iteration (views left out: each of the rest is a kernel launch on a
GPU) and the host's waits for the device (a tensor's value read on the host: ``.item()``,
``bool()``, ``nonzero``): on a GPU a batch of small problems runs at the rate the host launches
kernels, so these are its cost there.

Run: python benchmarks/bench_decode.py [--cases majaj demo] [--splits 10] [--sklearn-splits 2]
     [--repeats 2] [--device cpu] [--directions two-loop compact] [--quick]
``--quick`` (development): 3 splits, 20 random populations, 1 scikit-learn split, 1 demo run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
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
    # (n_random, images, neurons), float32, contiguous like core.analysis's gathered populations
    populations = np.ascontiguousarray(units[:, draws].transpose(1, 0, 2))
    return labels, unit_x, neurons, populations


@contextlib.contextmanager
def _fit_timer():
    """Record wall / CPU seconds and iterations of every batched fit (``decoding.fit_many``)."""
    import torch

    import unitmatch.core.decoding as decoding

    fit = decoding.fit_many
    rec = {"wall": 0.0, "cpu": 0.0, "cold": [], "warm": [], "calls": 0}

    def timed(*a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fit(*a, **k)
        rec["wall"] += time.perf_counter() - t0
        rec["cpu"] += time.process_time() - c0
        rec["calls"] += 1
        init = k.get("init")  # a problem starting from zeros is a cold start
        cold = (np.ones(len(out.n_iter), bool) if init is None
                else (init.abs().amax(dim=(1, 2)) == 0).cpu().numpy())
        rec["cold"].extend(out.n_iter[torch.from_numpy(cold)].tolist())
        rec["warm"].extend(out.n_iter[torch.from_numpy(~cold)].tolist())
        return out

    decoding.fit_many = timed
    try:
        yield rec
    finally:
        decoding.fit_many = fit


def _clock():
    return time.perf_counter(), time.process_time()


@contextlib.contextmanager
def _directions(how: str | None):
    """The batched solver computes its L-BFGS directions the ``how`` way on every device (None: as is);
    ``"two-loop/torch"``: the two-loop recursion with the float32 phase as torch's ops on the CPU too
    (the compiled phase, ``core._logreg_kernel``, switched off: the same-run reference it replaces)."""
    from unitmatch.core import _logreg

    if how is None:  # as is (also a tree from before the choice, for A/B runs)
        yield
        return
    if how == "two-loop/torch":
        saved_phase = _logreg._compiled_phase
        _logreg._compiled_phase = lambda *args, **kwargs: None
        try:
            with _directions("two-loop"):
                yield
        finally:
            _logreg._compiled_phase = saved_phase
        return
    saved = dict(_logreg._DIRECTIONS)
    _logreg._DIRECTIONS.update({kind: how for kind in ("cpu", "cuda", "mps", "xpu")})
    try:
        yield
    finally:
        _logreg._DIRECTIONS.clear()
        _logreg._DIRECTIONS.update(saved)


def count_ops(directions, device) -> None:
    """Operations and host waits per L-BFGS iteration of one fit of 100 demo-sized problems."""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from unitmatch.core import _logreg

    views = {"alias", "as_strided", "detach", "diagonal", "expand", "lift_fresh", "permute", "select", "slice",
             "split", "squeeze", "t", "transpose", "unbind", "unsqueeze", "view", "_unsafe_view"}
    waits = {"_local_scalar_dense", "nonzero", "is_nonzero", "masked_select"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.waits = 0, collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.ops += name not in views
            if name in waits or (name in ("index", "index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)):
                self.waits[name] += 1  # a boolean mask as an index: a nonzero inside
            return func(*args, **(kwargs or {}))

    rng = np.random.default_rng(0)
    b, n, f, k = 100, 360, 48, 8
    y = rng.integers(0, k, n)
    x = rng.normal(size=(b, n, f)).astype(np.float32) + 0.3 * (np.eye(k)[y] @ rng.normal(size=(f, k)).T)
    xt, yt = torch.from_numpy(x).to(device or "cpu"), torch.from_numpy(y)
    print(f"\n## Operations per L-BFGS iteration: {b} problems of {n} x {f}, {k} classes, device {device or 'cpu'}")
    print("| L-BFGS directions | iterations (longest problem) | ops dispatched per iteration (no views) | "
          "host waits per iteration |")
    print("|---|---|---|---|")
    for how in directions:
        with _directions(how), Count() as counter:
            fit = _logreg.fit_multinomial(xt, yt, k, 1.0)
        it = int(fit.n_iter.max())
        print(f"| {_direction_name(how, device)} | {it} | {counter.ops / it:.0f} | "
              f"{sum(counter.waits.values()) / it:.1f} ({dict(counter.waits)}) |", flush=True)


def _phase_ratios(seconds: dict, device) -> None:
    """Each run's fit seconds against the same run's fits with torch's float32 phase, where timed."""
    reference = seconds.get("two-loop/torch")
    for how, t in seconds.items():
        if reference and how != "two-loop/torch":
            print(f"fits, {_direction_name(how, device)}: {t:.2f} s, {t / reference:.2f}x the time of "
                  f"torch's float32 phase in this run ({reference:.2f} s)")


def _direction_name(how: str | None, device) -> str:
    from unitmatch.core import _logreg

    dev = __import__("torch").device(device or "cpu")
    if how == "two-loop/torch":
        return "two-loop, float32 phase as torch's ops"
    name = how or f"{getattr(_logreg, '_DIRECTIONS', {}).get(dev.type, 'two-loop')} (the device's default)"
    phase = getattr(_logreg, "_compiled_phase", None)  # absent in trees from before it
    if phase is not None and phase(dev, "mixed", None, how) is not None:
        name += ", float32 phase compiled"
    return name


def bench_majaj(n_splits: int, n_sklearn: int, n_random: int, device, directions=(None,)) -> None:
    from unitmatch.core.decoding import matched_population_decoding, matched_population_decoding_splits
    from unitmatch.core.splits import brainscore_splits

    labels, units, neurons, pops = majaj_data(n_random=n_random)
    splits = brainscore_splits(n_images=labels.size, stratify=None)[:n_splits]
    n_fits = 2 + pops.shape[0]
    print(f"\n## MajajHong-sized: {labels.size} images, {np.unique(labels).size} categories, "
          f"{units.shape[1]} neurons, {pops.shape[0]} random populations, {len(splits)} splits "
          f"({n_fits} fits of {splits[0][0].size} x {units.shape[1]} per split), device {device or 'cpu'}")
    decode = functools.partial(matched_population_decoding, random_populations=pops, device=device)
    print("| solver | L-BFGS directions | splits | wall s | CPU s | wall s per split | CPU s per fit | "
          "iterations per fit |")
    print("|---|---|---|---|---|---|---|---|")
    fits, runs = {}, {}
    for how in directions:
        with _directions(how), _fit_timer() as rec:
            t0, c0 = _clock()
            batched = matched_population_decoding_splits([units] * len(splits), neurons, labels, splits,
                                                         random_populations=pops, device=device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        cold, warm = np.array(rec["cold"]), np.array(rec["warm"])
        print(f"| batched (warm starts) | {_direction_name(how, device)} | {len(splits)} | {wall:.1f} | "
              f"{cpu:.1f} | {wall / len(splits):.2f} | {cpu / (n_fits * len(splits)):.3f} | cold median "
              f"{np.median(cold):.0f}, warm median {np.median(warm) if warm.size else float('nan'):.0f} |")
        print(f"  of which fits (fit_many, {rec['calls']} batches): {rec['wall']:.1f} s wall, "
              f"{rec['cpu']:.1f} CPU s; the rest "
              f"(z-scoring, validation, predictions): {wall - rec['wall']:.1f} s wall, "
              f"{cpu - rec['cpu']:.1f} CPU s", flush=True)
        fits[how] = rec["wall"]
        runs[how] = (cpu, batched)
    _phase_ratios(fits, device)
    if n_sklearn:
        t0, c0 = _clock()
        ref = [decode(units, neurons, labels, train, test, solver="sklearn") for train, test in splits[:n_sklearn]]
        sk_wall, sk_cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"| scikit-learn | {n_sklearn} | {sk_wall:.1f} | {sk_cpu:.1f} | {sk_wall / n_sklearn:.2f} | "
              f"{sk_cpu / (n_fits * n_sklearn):.3f} | |")
        print(f"scikit-learn extrapolated to {len(splits)} splits: {sk_wall / n_sklearn * len(splits):.0f} s "
              f"wall, {sk_cpu / n_sklearn * len(splits):.0f} CPU s")
        for how, (cpu, batched) in runs.items():
            diff = max(max(abs(a.transfer_accuracy - b.transfer_accuracy), abs(a.unit_accuracy - b.unit_accuracy),
                           abs(a.neuron_accuracy - b.neuron_accuracy), float(np.abs(a.null - b.null).max()))
                       for a, b in zip(ref, batched))
            print(f"batched ({_direction_name(how, device)}): CPU per split {cpu / len(splits) / (sk_cpu / n_sklearn):.2f}"
                  f"x scikit-learn's; largest accuracy difference from it over all {n_fits * n_sklearn} fits of "
                  f"{n_sklearn} split(s): {diff:.4f} ({splits[0][1].size} test images: one image "
                  f"{1 / splits[0][1].size:.4f})")
    for s, r in enumerate(batched):
        print(f"  split {s}: transfer {r.transfer_accuracy:.3f}, units {r.unit_accuracy:.3f}, neurons "
              f"{r.neuron_accuracy:.3f}, null mean {r.null.mean():.3f}")


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


def bench_demo(repeats: int, with_sklearn: bool, device, directions=(None,)) -> None:
    import unitmatch.core.analysis as analysis
    from unitmatch.core.decoding import matched_population_decoding_splits

    acts, assembly, splits, n_units = demo_case()
    print(f"\n## Demo-sized core.analyze: {assembly.n_images} images, {assembly.n_neurons} neurons "
          f"(48 V4 + 16 noise), {n_units:,} units (test_convnext stages), {len(splits)} splits, "
          f"100 permutations, 100 random populations, device {device or 'cpu'}")
    print("| solver | L-BFGS directions | run | analyze s | decoding s | decoding share | "
          "decoding fits s (CPU s; batches) |")
    print("|---|---|---|---|---|---|---|")
    decode = analysis._decode
    spent = []

    def timed_decode(*a, **k):
        t0 = time.perf_counter()
        try:
            return decode(*a, **k)
        finally:
            spent.append(time.perf_counter() - t0)

    analysis._decode = timed_decode
    runs = [("batched", how) for _ in range(repeats) for how in directions]
    runs += [("sklearn", None)] if with_sklearn else []
    rows = {}
    fit_walls = {}
    results = {}
    extra = {} if device is None else {"device": device}
    try:
        for r, (solver, how) in enumerate(runs):
            analysis.matched_population_decoding_splits = functools.partial(
                matched_population_decoding_splits, solver=solver)
            name = solver if solver == "sklearn" else f"{solver}, {_direction_name(how, device)}"
            with _directions(how), _fit_timer() as rec:
                t0 = time.perf_counter()
                results[solver] = analysis.analyze(acts, assembly, splits, n_permutations=100,
                                                   n_random_populations=100, seed=0, **extra)
                total = time.perf_counter() - t0
            rows.setdefault(name, []).append((total, spent[-1]))
            if solver == "batched":
                fit_walls.setdefault(how, []).append(rec["wall"])
            fits = f"{rec['wall']:.1f} ({rec['cpu']:.1f}; {rec['calls']} batches)" if solver == "batched" else ""
            shown = "-" if solver == "sklearn" else _direction_name(how, device)
            print(f"| {solver} | {shown} | {r} | {total:.1f} | {spent[-1]:.1f} | {spent[-1] / total:.0%} | {fits} |",
                  flush=True)
    finally:
        analysis._decode = decode
        analysis.matched_population_decoding_splits = matched_population_decoding_splits
    for name, vals in rows.items():
        t = np.median([v[0] for v in vals])
        d = np.median([v[1] for v in vals])
        print(f"{name}: median analyze {t:.1f} s, decoding {d:.1f} s ({d / t:.0%})")
    _phase_ratios({how: float(np.median(v)) for how, v in fit_walls.items()}, device)
    if "sklearn" in results:
        cols = ["transfer_accuracy", "unit_accuracy", "neuron_accuracy", "null_mean"]
        diff = np.abs(results["sklearn"].decoding[cols].to_numpy()
                      - results["batched"].decoding[cols].to_numpy()).max()
        print(f"largest difference in the decoding table (transfer, units, neurons, null mean) "
              f"between solvers: {diff:.4f} (40 test images per split: one image 0.025)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["majaj", "demo"], choices=["majaj", "demo"])
    ap.add_argument("--splits", type=int, default=10, help="MajajHong-sized case: splits (1-10)")
    ap.add_argument("--sklearn-splits", type=int, default=2,
                    help="MajajHong-sized case: splits also decoded by scikit-learn (0: none)")
    ap.add_argument("--random", type=int, default=100, help="MajajHong-sized case: random populations")
    ap.add_argument("--repeats", type=int, default=2, help="demo case: analyze runs, batched solver")
    ap.add_argument("--demo-sklearn", action="store_true", help="demo case: one more run with scikit-learn")
    ap.add_argument("--device", default=None, help="torch device of the batched solver (default cpu)")
    ap.add_argument("--directions", nargs="+", default=[None], choices=["two-loop", "compact", "two-loop/torch"],
                    help="the batched solver's L-BFGS directions, one run each (default: the device's own); "
                         "two-loop/torch: the CPU's float32 phase as torch's ops instead of compiled")
    ap.add_argument("--ops", action="store_true",
                    help="only count operations and host waits per L-BFGS iteration (each --directions)")
    ap.add_argument("--quick", action="store_true",
                    help="development: 3 splits, 20 random populations, 1 scikit-learn split, 1 demo run")
    args = ap.parse_args()
    if args.quick:
        args.splits, args.random, args.sklearn_splits, args.repeats = 3, 20, 1, 1
    if not 1 <= args.splits <= 10:
        ap.error(f"--splits must be 1..10 (the Brain-Score splits); got {args.splits}")
    if not 0 <= args.sklearn_splits <= args.splits:
        ap.error(f"--sklearn-splits must be 0..--splits ({args.splits}); got {args.sklearn_splits}")
    if args.random < 1 or args.repeats < 0:
        ap.error(f"--random must be >= 1 and --repeats >= 0; got {args.random}, {args.repeats}")
    import torch

    if args.device is not None:
        try:  # an unavailable device fails here, before any work
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as e:
            ap.error(f"--device {args.device!r} is not usable here ({e}); give cpu, cuda or cuda:N")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.ops:
        count_ops(args.directions, args.device)
        return
    if "majaj" in args.cases:
        bench_majaj(args.splits, args.sklearn_splits, args.random, args.device, args.directions)
    if "demo" in args.cases:
        bench_demo(args.repeats, args.demo_sklearn, args.device, args.directions)
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
