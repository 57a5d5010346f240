"""Store read benchmark: checked reads (every chunk against its recorded CRC-32) vs bare Zarr reads.

A float16 store of ``--images`` images x ``--layers`` layers of ``--units`` units (half-rectified
normal values, the default codec and layout: Blosc lz4 + shuffle, one shard per batch of 32 images x
layer, 16,384-unit chunks) is written to a temporary
folder; then every layer is read in blocks of one unit chunk, as the matching reduction reads it,
alternately through :meth:`ActivationStore.layers` (checked) and through the bare Zarr arrays, and
the medians of ``--repeats`` interleaved rounds are reported, in wall and in CPU time (CPU time is
the steadier figure on a shared machine), with :meth:`ActivationStore.verify`'s time.

Then one analysis' reads, without and within :meth:`ActivationStore.chunk_cache`: the matching's
block reads, then three gathers of scattered columns as the float64 re-scoring, the strict
assignment and the decoding make them (``--gather`` columns each, drawn at random); each gather
decodes every chunk that holds one of its columns.

Last, the float64 re-scoring's read after a permutation null (issue 8): ``--null-columns`` columns
drawn at random (default half the units: a null's 25,856 rows x 10 splits have candidates in every
chunk), read as ``MatchEngine.finalize`` reads them (:func:`core.units.gather_columns` with
``dtype=None``, the stored float16) on the read threads (:func:`core.integrity.read_threads`) and on
one, and as float64; against the reference of the same run, a checked read of every layer block by
block on one thread (every chunk decoded and checked once).

With ``--match-neurons N`` (issue 8), last: one-split matching of N neurons from the store
(:func:`core.units.iter_blocks` over the checked layers, ``MatchEngine.process_blocks``) as
``run_matching`` streamed it before (the engine's default block, 17,920 units for 3200 images,
straddling the 16,384-unit chunks; block by block: the reference), in whole chunks block by block,
and as it streams it now (whole chunks, the next block read while the current one is scored),
alternating, with the reads alone; the same units are asserted. With ``--stream-device D`` as well,
instead: the stream from the store on device D (cpu, cuda) as ``run_matching`` reads it there, against
the reads alone and the same matching from host memory (:func:`_stream_from_store`).

Run: .venv/bin/python benchmarks/bench_store_read.py [--images 256] [--layers 2] [--units 65536]
     [--null-columns 100000] [--match-neurons 256 [--stream-device cuda [--stream-block-units N]]]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--units", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--gather", type=int, default=2000, help="columns per scattered gather")
    ap.add_argument("--null-columns", type=int, default=None,
                    help="columns of the null's re-scoring read (default: half the units)")
    ap.add_argument("--match-neurons", type=int, default=0,
                    help="also time one-split matching of this many neurons from the store (0: not)")
    ap.add_argument("--stream-device", default=None,
                    help="with --match-neurons: instead of the CPU block variants, the stream from the store on "
                         "this device (cpu, cuda) against its reads and the same matching from host memory")
    ap.add_argument("--stream-block-units", type=int, default=None,
                    help="units a block for --stream-device (whole chunks; default: the engine's default for the "
                         "device, which on a GPU makes a 262,144-unit layer one block: nothing to overlap)")
    args = ap.parse_args()

    from unitmatch.core.store import DEFAULT_UNIT_CHUNK, ActivationStore, StoreKey
    from unitmatch.core.units import LayerUnits

    layers = [LayerUnits(f"layer{i}", (args.units,), ("channel",)) for i in range(args.layers)]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        key = StoreKey("bench@random:0", {}, "bench", tuple(layer.name for layer in layers))
        store = ActivationStore.create(root, key, layers, [f"im{i}" for i in range(args.images)], batch_size=32)
        writer = store.writer()
        for b in range(store.n_batches):
            n = len(range(*store.batch_rows(b).indices(args.images)))
            writer.write(b, {layer.name: np.maximum(rng.standard_normal((n, args.units)), 0).astype(np.float16)
                             for layer in layers})
        store.finalize()
        store = ActivationStore.open(store.path)
        checked, bare = store.layers(), store._arrays("r")

        def read(arrays):
            wall, cpu = time.perf_counter(), time.process_time()
            for a in arrays.values():
                for start in range(0, args.units, DEFAULT_UNIT_CHUNK):
                    np.asarray(a[:, start:start + DEFAULT_UNIT_CHUNK])
            return time.perf_counter() - wall, time.process_time() - cpu

        read(bare), read(checked)  # warm the page cache and zarr
        rounds = [(read(bare), read(checked)) for _ in range(args.repeats)]
        mb = args.images * args.units * args.layers * 2 / 1e6
        print(f"{args.images} images x {args.layers} x {args.units} units float16 ({mb:.0f} MB), "
              f"medians of {args.repeats} interleaved rounds")
        for k, label in ((0, "wall"), (1, "cpu")):
            b = float(np.median([r[0][k] for r in rounds]))
            c = float(np.median([r[1][k] for r in rounds]))
            print(f"  {label:4s}: bare zarr {b:.3f} s, checked {c:.3f} s, ratio {c / b:.2f}")
        t = time.perf_counter()
        report = store.verify()
        print(f"  verify: {time.perf_counter() - t:.3f} s, {report.n_chunks} chunks, ok={report.ok}")

        from unitmatch.core.units import gather_columns

        catalogue = store.catalogue()
        gathers = [np.sort(rng.choice(catalogue.n_units, min(args.gather, catalogue.n_units), replace=False))
                   for _ in range(3)]

        def analysis():
            """(block reads, the three gathers) wall seconds of one analysis' reads"""
            t0 = time.perf_counter()
            read(store.layers())
            t1 = time.perf_counter()
            values = [gather_columns(store.layers(), catalogue, units) for units in gathers]
            return t1 - t0, time.perf_counter() - t1, values

        times = {"plain": [], "cached": []}
        for _ in range(max(1, args.repeats // 5)):
            blocks, cols, plain = analysis()
            times["plain"].append((blocks, cols))
            with store.chunk_cache() as cache:
                blocks, cols, cached = analysis()
            times["cached"].append((blocks, cols))
            assert all(np.array_equal(a, b) for a, b in zip(plain, cached))
        (pb, pg), (cb, cg) = (np.median(times[k], axis=0) for k in ("plain", "cached"))
        print(f"one analysis' reads (block reads, then 3 gathers of {args.gather} scattered columns; medians of "
              f"{len(times['plain'])} rounds; {cache})")
        print(f"  plain reads: blocks {pb:.3f} s, gathers {pg:.3f} s")
        print(f"  chunk cache: blocks {cb:.3f} s, gathers {cg:.3f} s; the gathers take {cg / pg:.3f}x, "
              f"all reads {(cb + cg) / (pb + pg):.2f}x the plain reads' time")

        from unitmatch.core import integrity

        n_null = min(catalogue.n_units, args.null_columns or catalogue.n_units // 2)
        units = np.sort(rng.choice(catalogue.n_units, n_null, replace=False))
        threads = integrity.read_threads()

        def gather(n_threads: int | None, dtype):
            limit = integrity.MAX_READ_THREADS
            integrity.MAX_READ_THREADS = n_threads or limit
            try:
                t0 = time.perf_counter()
                values = gather_columns(store.layers(), catalogue, units, dtype=dtype)
                return time.perf_counter() - t0, values
            finally:
                integrity.MAX_READ_THREADS = limit

        runs = {"full": [], "threads": [], "one": [], "float64": []}
        for _ in range(max(1, args.repeats // 5)):
            runs["full"].append(read(store.layers())[0])
            t, stored = gather(None, None)
            runs["threads"].append(t)
            runs["one"].append(gather(1, None)[0])
            t, wide = gather(None, np.float64)
            runs["float64"].append(t)
        assert stored.dtype == np.float16 and np.array_equal(stored.astype(np.float64), wide)
        full, th, one, f64 = (float(np.median(runs[k])) for k in ("full", "threads", "one", "float64"))
        print(f"the re-scoring's read of a null's candidates: {n_null} columns of {catalogue.n_units} "
              f"(medians of {len(runs['full'])} rounds)")
        print(f"  reference, a checked read of every layer by blocks, 1 thread: {full:.3f} s")
        print(f"  as stored (float16), {threads} read threads: {th:.3f} s ({th / full:.2f}x the reference); "
              f"1 thread: {one:.3f} s ({one / full:.2f}x); as float64, {threads} threads: {f64:.3f} s")
        if args.match_neurons and args.stream_device is None:
            _match_from_store(store, rng, args)
        elif args.match_neurons:
            _stream_from_store(store, rng, args)


def _one_split_engine(store, rng, args, device: str):
    """The store's checked layers, its catalogue, a one-split engine of ``--match-neurons`` random
    neurons on ``device`` and those neurons' responses."""
    from unitmatch import core
    from unitmatch.core.engine import MatchEngine

    y = rng.standard_normal((args.match_neurons, args.images))
    engine = MatchEngine(y, core.brainscore_splits(n_images=args.images, n_splits=1, stratify=None), device=device)
    return store.layers(), store.catalogue(), engine, y


def _read_alone(layers, catalogue, size: int, threads: int = 1) -> float:
    """Seconds to read every block of ``size`` units (on ``threads`` read threads), nothing else."""
    from unitmatch.core.units import iter_blocks

    t0 = time.perf_counter()
    for block in iter_blocks(layers, catalogue, size, read_threads=threads):
        np.asarray(block.data)
    return time.perf_counter() - t0


def _alternating(variants: dict, run, reads: dict, rounds: int) -> tuple[dict, dict]:
    """Median seconds of ``run(*variants[name])`` (returning (seconds, result)) per variant, in
    ``rounds`` rounds whose order alternates, and of each ``reads[key]()`` once a round."""
    times, read_times = {name: [] for name in variants}, {key: [] for key in reads}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            times[name].append(run(*variants[name])[0])
        for key, read in reads.items():
            read_times[key].append(read())
    return ({name: float(np.median(v)) for name, v in times.items()},
            {key: float(np.median(v)) for key, v in read_times.items()})


def _match_from_store(store, rng, args):
    """One-split matching from the store, as ``run_matching`` streamed it before issue 8's fourteenth
    session (the engine's default block, block by block) and as it streams it now (whole unit chunks
    a block, the next block read while the current one is scored), with the step between."""
    from unitmatch.core.engine import default_block_units
    from unitmatch.core.units import chunk_aligned, iter_blocks

    layers, catalogue, engine, _ = _one_split_engine(store, rng, args, "cpu")
    default = default_block_units(args.images, engine.n_rows, device=engine.device)
    aligned = chunk_aligned(default, layers)
    variants = {f"blocks of {default} units, block by block (the reference)": (default, False),
                f"blocks of {aligned} (whole chunks), block by block": (aligned, False),
                f"blocks of {aligned}, the next block read while one is scored": (aligned, True)}

    def run(size: int, overlap: bool):
        t0 = time.perf_counter()
        partial = engine.process_blocks(iter_blocks(layers, catalogue, size), overlap=overlap)
        return time.perf_counter() - t0, partial

    first = None
    for size, overlap in variants.values():  # warm-up: threads, buffers, the page cache
        partial = run(size, overlap)[1]
        first = first or partial
        assert np.array_equal(partial.top_unit, first.top_unit)
        np.testing.assert_allclose(partial.top_r, first.top_r, rtol=0, atol=1e-6)
    rounds = max(2, args.repeats // 5)
    med, reads = _alternating(variants, run, {size: functools.partial(_read_alone, layers, catalogue, size)
                                              for size in (default, aligned)}, rounds)
    print(f"one-split matching of {args.match_neurons} neurons from the store ({catalogue.n_units} units; medians "
          f"of {rounds} rounds, alternating; the same units)")
    reference = med[next(iter(variants))]
    for name, t in med.items():
        print(f"  {name}: {t:.3f} s ({t / reference:.3f}x)")
    print("  the reads alone: " + ", ".join(f"blocks of {size}: {t:.3f} s" for size, t in reads.items()))


def _stream_from_store(store, rng, args):
    """One-split matching of the store's blocks on ``--stream-device`` as ``run_matching`` streams them
    there (:func:`core.engine.stream_match`; each block read on :func:`core.integrity.read_threads`
    threads, on CUDA straight into the staging thread's pinned buffers), against its two components
    alone in the same run: the checked reads of the same blocks (on those threads, and on one) and
    the same matching of the same values already in host memory; the stream's time as a fraction of
    the slower. These leave out the float64 re-scoring at the end (its read of the candidates'
    columns). With it: the whole of ``run_matching`` (the same stream, then the re-scoring's column
    reads from the store), beside the sweep's reduction of the same blocks, which does the same
    work (:func:`sweep.reduce.match_store`, Dask's threaded scheduler on as many threads as read
    threads; on a GPU each block task staged in pieces, :func:`sweep.reduce.process_staged`)."""
    from unitmatch.core import integrity
    from unitmatch.core.engine import default_block_units, stream_match
    from unitmatch.core.units import chunk_aligned, gather_columns, iter_blocks
    from unitmatch.sweep.reduce import match_store

    layers, catalogue, engine, responses = _one_split_engine(store, rng, args, args.stream_device)
    size = chunk_aligned(args.stream_block_units or default_block_units(args.images, engine.n_rows, device=engine.device),
                         layers)
    threads = integrity.read_threads()  # as run_matching reads a store's blocks
    in_memory = {name: np.asarray(a[:]) for name, a in layers.items()}

    def stream(source, n_threads: int, rescore: bool = False):
        t0 = time.perf_counter()
        if source is store:  # the sweep's reduction: n_threads Dask threads
            result = match_store(store, responses, engine.splits, device=args.stream_device,
                                 block_units=size, scheduler="threads", num_workers=n_threads)
        else:
            blocks = iter_blocks(source, catalogue, size, read_threads=n_threads, deferred=engine.device.type == "cuda")
            columns = (lambda units: gather_columns(source, catalogue, units, dtype=None)) if rescore else None
            result = stream_match(engine, blocks, catalogue, columns=columns)
        return time.perf_counter() - t0, result

    memory = "from host memory (numpy, already read)"
    variants = {f"from the store, {threads} read thread(s), as run_matching reads it": (layers, threads)}
    if threads > 1:
        variants["from the store, 1 read thread(s)"] = (layers, 1)
    variants[memory] = (in_memory, 1)
    whole = f"run_matching from the store, with the float64 re-scoring ({threads} read thread(s))"
    variants[whole] = (layers, threads, True)
    variants[f"the sweep's reduction of the store, the same work (match_store, {threads} Dask threads)"] = (store,
                                                                                                           threads)
    first = {}  # the first result without and with the float64 re-scoring (a near tie may differ between them)
    for variant in variants.values():  # warm-up: CUDA kernels, pinned buffers, the page cache
        result = stream(*variant)[1]
        rescored = variant[0] is store or len(variant) > 2
        first.setdefault(rescored, result)
        assert np.array_equal(result.matches["unit"].to_numpy(), first[rescored].matches["unit"].to_numpy())
    rounds = max(2, args.repeats // 5)
    med, reads = _alternating(variants, stream, {n: functools.partial(_read_alone, layers, catalogue, size, n)
                                                 for n in sorted({threads, 1}, reverse=True)}, rounds)
    print(f"one-split matching of {args.match_neurons} neurons from the store on {engine.device} "
          f"({catalogue.n_units} units, blocks of {size}; medians of {rounds} rounds, alternating; the same units)")
    for name, t in med.items():
        print(f"  {name}: {t:.3f} s")
    print("  the reads alone: " + ", ".join(f"{n} thread(s) {t:.3f} s" for n, t in reads.items()))
    limit = max(reads[threads], med[memory])
    first_name, reduction = next(iter(med)), list(med)[-1]
    print(f"  {first_name}: {limit / med[first_name]:.0%} of the slower component alone ({limit:.3f} s: max(the "
          f"reads on {threads} thread(s), the matching from memory))")
    print(f"  the sweep's reduction: {med[reduction] / med[whole]:.2f}x run_matching's time for the same work")


if __name__ == "__main__":
    main()
