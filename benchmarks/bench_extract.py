"""Extraction benchmark: each component of extraction alone, then the pipeline, same model, images and device.

Model (random weights; speed does not depend on them), its ``--layers`` (default ``blocks``) at its
input size, generated images, one process. Measured, in this order:

- (a) bare forward: ``model(x)`` on already preprocessed batches (pinned on CUDA; no hooks, no
  copies, no disk); the best of two passes after a warm-up pass;
- (b) decoding + preprocessing alone: the pipeline's DataLoader (:func:`core.extract.image_batches`,
  Pillow decode, resize, crop, normalize) with ``--workers`` decode workers, no forward;
- (c) device-to-host transfer of the selected outputs: the pipeline's staging
  (:class:`core.extract._Staging`: the float16 cast, then the copy into host buffers, pinned and
  asynchronous on CUDA) timed alone per batch on outputs captured by an untimed forward; beside it
  the alternative of copying float32 to the host and casting there. On the CPU this is the hooks'
  cast-and-copy;
- (d) compression + writes alone: the same float16 bytes written into a fresh store by the
  pipeline's writer pool (``--writer-threads``), codec and layout; ``--d-codecs`` /
  ``--d-threads`` / ``--d-layouts`` / ``--d-unit-chunks`` add (d) variants (written bytes, ratio,
  files; ``--read-back``: checked reads of each store afterwards); ``--codec-table`` measures each
  codec alone on one thread instead;
- the pipeline: :func:`core.extract.extract_to_store` end to end into a fresh (prepared) store.

The pipeline's throughput is reported as a fraction of the slowest component's (the goal on a GPU
node: >= 70%), and its time against (a) + (b) + (d) (on a machine whose cores the components share,
the goal: within 10% of that sum; the same ratio of CPU times is printed too, which other processes
sharing the cores disturb less than wall times). ``--workers`` and ``--writer-threads`` take several values: (b),
(d) and the pipeline are measured for each combination.

Run: .venv/bin/python benchmarks/bench_extract.py [--images 256] [--batch 32] [--device cuda]
     [--model resnet50 --images 512 --batch 64] [--layers stages] [--workers 0 1 2]
     [--writer-threads 1 2 4] [--codec zstd:1] [--unsharded] [--unit-chunk 16384] [--no-pinned]
     [--d-codecs zstd:1 zstd:-1 blosc:lz4:bitshuffle:5 none]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its children that have ended (DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main():
    from unitmatch.core.extract import DEFAULT_WRITER_THREADS
    from unitmatch.core.store import DEFAULT_CODEC, DEFAULT_UNIT_CHUNK

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--layers", default="blocks", help="layer selection (a preset, names, globs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, nargs="+", default=[0], help="DataLoader decode workers (several: each)")
    ap.add_argument("--writer-threads", type=int, nargs="+", default=[DEFAULT_WRITER_THREADS],
                    help="store writer threads (several: each)")
    ap.add_argument("--codec", default=DEFAULT_CODEC, help="store codec of (d) and the pipeline")
    ap.add_argument("--unsharded", action="store_true",
                    help="one file per chunk instead of one shard per batch x layer")
    ap.add_argument("--unit-chunk", type=int, default=DEFAULT_UNIT_CHUNK)
    ap.add_argument("--no-pinned", action="store_true", help="CUDA: pageable host buffers (synchronous copies)")
    ap.add_argument("--sink-queue", type=int, default=None,
                    help="pipeline: image batches that may wait for the disk (core.extract.SINK_QUEUE, default 2)")
    ap.add_argument("--d-codecs", nargs="*", default=[], help="more codecs for (d) alone")
    ap.add_argument("--d-threads", type=int, nargs="*", default=[], help="more writer thread counts for (d) alone")
    ap.add_argument("--d-layouts", nargs="*", default=[], choices=["sharded", "unsharded"],
                    help="more layouts for (d) alone")
    ap.add_argument("--d-unit-chunks", type=int, nargs="*", default=[], help="more unit chunks for (d) alone")
    ap.add_argument("--only-writes", action="store_true",
                    help="only (c) and (d) with its variants: no bare forward, decoding or pipeline runs")
    ap.add_argument("--read-back", action="store_true",
                    help="(d) variants: also read each store back through store.layers() (checked reads, blocks "
                         "of 4 unit chunks), single-threaded")
    ap.add_argument("--codec-table", action="store_true",
                    help="only: each --d-codecs codec alone on one thread (numcodecs, no Zarr), per layer, on the "
                         "first batch's outputs: ratio, encode and decode MiB/s")
    ap.add_argument("--root", default=None, help="folder for the stores (default: a temporary folder)")
    args = ap.parse_args()
    try:
        torch.empty(1, device=args.device)
    except (RuntimeError, AssertionError) as e:
        ap.error(f"--device {args.device!r} is not usable here ({e}); give cpu, cuda or cuda:N")

    from unitmatch.core.extract import (
        DTYPES, ModelSpec, _Staging, _StoreSink, extract_to_store, full_float32, image_batches, prepare_store,
    )
    from unitmatch.core import extract as extract_module
    from unitmatch.core.layers import layer_names, probe_layers
    from unitmatch.core.store import ActivationStore
    from unitmatch.core.synthetic import generate_stimuli

    if args.sink_queue is not None:
        if args.sink_queue < 1:
            ap.error(f"--sink-queue must be a positive number of batches; got {args.sink_queue}")
        extract_module.SINK_QUEUE = args.sink_queue

    n = args.images
    stimuli = generate_stimuli(n_categories=8, objects_per_category=4, variations=-(-n // 32), size=256,
                               seed=0).subset([f"img{i:05d}" for i in range(n)])
    spec = ModelSpec(args.model)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = spec.create()
    cfg = spec.data_config(model)
    names = layer_names(model, args.layers, input_size=tuple(cfg["input_size"]))
    units = probe_layers(model, names, tuple(cfg["input_size"]))
    model = model.to(device)
    n_units = sum(u.size for u in units)
    raw = n * n_units * 2  # float16 bytes
    batch_ids = list(range(-(-n // args.batch)))
    pinned = cuda and not args.no_pinned
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = Path(args.root or tempfile.mkdtemp(prefix="bench-extract-"))
    base.mkdir(parents=True, exist_ok=True)
    counter = itertools.count()

    def fresh_root() -> Path:
        root = base / f"r{next(counter)}"
        shutil.rmtree(root, ignore_errors=True)
        return root

    # (a) bare forward on preprocessed tensors
    loader = image_batches(stimuli, cfg, batch_ids, args.batch, num_workers=0, device=device)
    tensors = [x for _, x in loader]

    def bare_pass() -> tuple[float, float]:
        with full_float32(), torch.inference_mode():  # the pipeline's numerics (no TF32 on CUDA)
            sync()
            t0, c0 = time.perf_counter(), cpu_seconds()
            for x in tensors:
                model(x.to(device, non_blocking=True))
            sync()
            return time.perf_counter() - t0, cpu_seconds() - c0

    bare = bare_cpu = float("nan")
    if not (args.only_writes or args.codec_table):
        bare_pass()  # warm-up: allocations, kernel selection
        bare, bare_cpu = min(bare_pass() for _ in range(2))

    # (b) decoding + preprocessing alone, with the pipeline's decode workers
    def decode(workers: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), cpu_seconds()
        for _, x in image_batches(stimuli, cfg, batch_ids, args.batch, num_workers=workers, device=device):
            pass
        return time.perf_counter() - t0, cpu_seconds() - c0  # workers are joined: their CPU time is counted

    # (c) device-to-host: the pipeline's staging, on outputs captured by an untimed forward
    staging = _Staging(units, args.batch, DTYPES["float16"], device, slots=1, device_copies=cuda, pinned=pinned)
    modules = dict(model.named_modules())
    captured = {}
    hooks = [modules[u.name].register_forward_hook(
        lambda _m, _i, out, name=u.name: captured.__setitem__(name, (out[0] if isinstance(out, (tuple, list)) else out)
                                                              .detach().clone())) for u in units]
    outputs16, d2h, d2h_host_cast = [], 0.0, 0.0
    try:
        with full_float32(), torch.inference_mode():
            for b, x in zip(batch_ids, tensors):
                captured.clear()
                model(x.to(device))
                sync()
                t0 = time.perf_counter()
                staging.begin(len(x))
                for u in units:
                    staging.hook(u.name)(None, None, captured[u.name])
                staging.end(b)
                (_, slot, host), = staging.ready(final=True)
                d2h += time.perf_counter() - t0
                outputs16.append({k: np.array(v).reshape(len(v), -1) for k, v in host.items()})
                staging.release(slot)
                t0 = time.perf_counter()  # the alternative: float32 to the host, cast there
                for u in units:
                    captured[u.name].to("cpu").to(torch.float16)
                d2h_host_cast += time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    captured.clear()
    del staging

    if args.codec_table:
        codec_table(outputs16[0], args.d_codecs or [args.codec], args.unit_chunk)
        return

    # (d) compression + writes alone, with the pipeline's writer pool
    def write(codec: str, sharded: bool, threads: int, unit_chunk: int) -> tuple[float, int, int]:
        root = fresh_root()
        store = prepare_store(spec, stimuli, args.layers, root, batch_size=args.batch, codec=codec, sharded=sharded,
                              unit_chunk=unit_chunk, model=model)
        t0, c0 = time.perf_counter(), cpu_seconds()
        with _StoreSink(store, {"bench": True}, threads=threads) as sink:
            for b, out in zip(batch_ids, outputs16):
                sink.put(b, out, lambda: None)
        seconds, write_cpu[0] = time.perf_counter() - t0, cpu_seconds() - c0
        assert sorted(sink.written) == batch_ids
        files = [p for c in (store.path / "store.zarr").glob("*/activations/c") for p in c.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        if args.read_back:  # checked reads of every layer in blocks of 4 unit chunks, as matching reads them
            store.finalize()
            arrays = ActivationStore.open(store.path).layers()
            t0 = time.perf_counter()
            for a in arrays.values():
                for j in range(0, a.shape[1], 4 * a.chunks[1]):
                    a[:, j:j + 4 * a.chunks[1]]
            read_seconds[0] = time.perf_counter() - t0
        shutil.rmtree(root, ignore_errors=True)
        return seconds, size, len(files)

    sharded = not args.unsharded
    results, write_cpu, read_seconds = [], [0.0], [float("nan")]
    for workers, threads in itertools.product(args.workers, args.writer_threads) if not args.only_writes else ():
        dec, dec_cpu = decode(workers)
        wr, size, files = write(args.codec, sharded, threads, args.unit_chunk)
        wr_cpu = write_cpu[0]
        root = fresh_root()
        kwargs = dict(batch_size=args.batch, codec=args.codec, sharded=sharded, unit_chunk=args.unit_chunk)
        prepare_store(spec, stimuli, args.layers, root, model=model, **kwargs)
        sync()
        t0, c0 = time.perf_counter(), cpu_seconds()
        report = extract_to_store(spec, stimuli, args.layers, root, device=device, num_workers=workers,
                                  writer_threads=threads, pinned=None if not cuda else pinned, model=model, **kwargs)
        pipe, pipe_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        assert report.store.complete and report.written == batch_ids
        shutil.rmtree(root, ignore_errors=True)
        results.append((workers, threads, dec, wr, size, files, pipe, dec_cpu, wr_cpu, pipe_cpu))

    variants = []
    for codec, layout, threads, chunk in itertools.product(args.d_codecs or [args.codec],
                                                           args.d_layouts or ["sharded" if sharded else "unsharded"],
                                                           args.d_threads or [args.writer_threads[0]],
                                                           args.d_unit_chunks or [args.unit_chunk]):
        if (codec, layout == "sharded", threads, chunk) != (args.codec, sharded, args.writer_threads[0],
                                                           args.unit_chunk) or len(results) == 0:
            variants.append((codec, layout, threads, chunk, *write(codec, layout == "sharded", threads, chunk),
                             read_seconds[0]))
    if not args.root:
        shutil.rmtree(base, ignore_errors=True)

    mib = 2 ** 20
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = f", {torch.cuda.get_device_name(device)}" if cuda else ""
    print(f"# bench_extract: {args.model} {args.layers} ({len(names)} layers, {n_units:,} units/image), {n} images at "
          f"{cfg['input_size'][1]} px, batch {args.batch}, device {device}{gpu}, {cpu}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}; store {args.codec}, "
          f"{'sharded' if sharded else 'unsharded'}, unit chunk {args.unit_chunk}, pinned {pinned}, "
          f"sink queue {extract_module.SINK_QUEUE}; "
          f"float16 outputs {raw / mib:.0f} MiB; load average {os.getloadavg()[0]:.2f}")
    print()
    print("| component | seconds | images/s | MiB/s of float16 outputs |")
    print("|---|---|---|---|")
    if not args.only_writes:
        print(f"| (a) bare forward | {bare:.2f} | {n / bare:.1f} | {raw / mib / bare:.0f} |")
    print(f"| (c) device-to-host: float16 cast{' on the device' if cuda else ''} + copy"
          f"{' (pinned, async)' if pinned else ''} | {d2h:.2f} | {n / d2h:.1f} | {raw / mib / d2h:.0f} |")
    print(f"| (c') float32 to the host, cast there (not used) | {d2h_host_cast:.2f} | {n / d2h_host_cast:.1f} | "
          f"{raw / mib / d2h_host_cast:.0f} |")
    for workers, threads, dec, wr, size, files, pipe, *_ in results:
        print(f"| (b) decode + preprocess, {workers} workers | {dec:.2f} | {n / dec:.1f} | |")
        print(f"| (d) compress + write, {threads} threads ({size / mib:.0f} MiB, {raw / size:.2f}x, {files} files) | "
              f"{wr:.2f} | {n / wr:.1f} | {raw / mib / wr:.0f} |")
    print()
    print("| pipeline (extract_to_store) | seconds | images/s | slowest component | fraction of slowest | "
          "vs (a)+(b)+(d) | CPU seconds | CPU vs (a)+(b)+(d) CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for workers, threads, dec, wr, size, files, pipe, dec_cpu, wr_cpu, pipe_cpu in results:
        comps = {"a": bare, "b": dec, "c": d2h, "d": wr}
        slow = max(comps, key=comps.get)
        print(f"| {workers} workers, {threads} writer threads | {pipe:.2f} | {n / pipe:.1f} | ({slow}) "
              f"{n / comps[slow]:.1f} images/s | {comps[slow] / pipe:.0%} | {pipe / (bare + dec + wr):.3f} "
              f"(sum {bare + dec + wr:.2f} s) | {pipe_cpu:.2f} | {pipe_cpu / (bare_cpu + dec_cpu + wr_cpu):.3f} "
              f"(sum {bare_cpu:.2f} + {dec_cpu:.2f} + {wr_cpu:.2f} s) |")
    if variants:
        print()
        print("| (d) alone: codec | layout | threads | unit chunk | seconds | MiB/s | stored MiB | ratio | files | "
              "checked read MiB/s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for codec, layout, threads, chunk, seconds, size, files, read in variants:
            print(f"| {codec} | {layout} | {threads} | {chunk} | {seconds:.2f} | {raw / mib / seconds:.0f} | "
                  f"{size / mib:.0f} | {raw / size:.2f}x | {files} | {raw / mib / read:.0f} |")


def codec_table(outputs: dict, codecs: list, unit_chunk: int) -> None:
    """Each codec alone on one thread, per layer: compression ratio, encode and decode MiB/s."""
    from numcodecs import Blosc, Zstd

    from unitmatch.core.store import parse_codec

    Blosc.use_threads = False
    print("| codec | layer | ratio | encode MiB/s | decode MiB/s |")
    print("|---|---|---|---|---|")
    for codec in codecs:
        parts = parse_codec(codec).split(":")
        if parts[0] == "none":
            continue
        coder = Zstd(int(parts[1]), checksum=True) if parts[0] == "zstd" else Blosc(
            parts[1], int(parts[3]), {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE,
                                      "bitshuffle": Blosc.BITSHUFFLE}[parts[2]])
        for name, values in outputs.items():
            chunks = [np.ascontiguousarray(values[:, j:j + unit_chunk]) for j in range(0, values.shape[1], unit_chunk)]
            t0 = time.perf_counter()
            encoded = [coder.encode(c) for c in chunks]
            enc = time.perf_counter() - t0
            t0 = time.perf_counter()
            for e in encoded:
                coder.decode(e)
            dec = time.perf_counter() - t0
            mib = values.nbytes / 2 ** 20
            print(f"| {codec} | {name} | {values.nbytes / sum(len(e) for e in encoded):.2f}x | {mib / enc:.0f} | "
                  f"{mib / dec:.0f} |")


if __name__ == "__main__":
    main()
