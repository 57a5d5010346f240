"""Extraction benchmark: images/s into a float16 store vs a bare forward pass, same model, same run.

Model: resnet18 (random weights; speed does not depend on the weights), its 8 block outputs
(0.75 M units per image) at 224 px, batch 32, float16 store with zstd. Measured, in this order and
in one process:
- bare: ``model(x)`` on already preprocessed batches (no hooks, no copies, no disk),
- bare + preprocessing: Pillow decode/resize/crop/normalize of each batch, then ``model(x)``,
- memory: :func:`core.extract.extract_activations`, the same extraction loop (decode, forward with
  hooks, float16 copies to the host) into in-memory arrays: the loop's cost without the disk,
- store: :func:`core.extract.extract_to_store` end to end (the same loop, background zstd writes of
  whole chunks, completion records) into a fresh store.
The overhead of each is reported against both references.

Run: .venv/bin/python benchmarks/bench_extract.py [--images 256] [--batch 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader decode workers for the store run")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, -1], help="zstd levels of the store runs")
    args = ap.parse_args()

    from unitmatch.core.extract import ModelSpec, eval_transform, extract_activations, extract_to_store
    from unitmatch.core.layers import layer_names, probe_layers
    from unitmatch.core.synthetic import generate_stimuli

    stimuli = generate_stimuli(n_categories=8, objects_per_category=4, variations=-(-args.images // 32), size=256,
                               seed=0).subset([f"img{i:05d}" for i in range(args.images)])
    spec = ModelSpec(args.model)
    device = torch.device(args.device)
    model = spec.create().to(device)
    cfg = spec.data_config(model)
    transform = eval_transform(cfg)
    names = layer_names(model, "blocks")
    units = sum(info.size for info in probe_layers(model, names, tuple(cfg["input_size"])))
    batches = [range(i, min(i + args.batch, args.images)) for i in range(0, args.images, args.batch)]

    def preprocess(idx):
        return torch.stack([transform(stimuli.load_image(i)) for i in idx])

    tensors = [preprocess(idx) for idx in batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    def bare_pass(pre: bool) -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for x, idx in zip(tensors, batches):
                model((preprocess(idx) if pre else x).to(device))
            sync()
            return time.perf_counter() - t0

    bare_pass(False)  # warm-up: allocations, kernel selection
    bare = min(bare_pass(False) for _ in range(2))
    bare_pre = min(bare_pass(True) for _ in range(2))
    t0 = time.perf_counter()
    extract_activations(model, stimuli, names, batch_size=args.batch, device=device, num_workers=args.workers)
    memory = time.perf_counter() - t0
    rows = []
    for level in args.levels:
        with tempfile.TemporaryDirectory() as root:
            report = extract_to_store(spec, stimuli, "blocks", root, batch_size=args.batch, device=device,
                                      num_workers=args.workers, model=model, compression_level=level)
            assert report.store.complete
            size = sum(p.stat().st_size for p in Path(report.store.path).rglob("*") if p.is_file())
            rows.append((level, report.seconds, size))
    n = args.images
    raw = n * units * 2
    print(f"# bench_extract: {args.model} blocks ({len(names)} layers, {units:,} units/image), {n} images "
          f"at {cfg['input_size'][1]} px, batch {args.batch}, device {device}, torch threads {torch.get_num_threads()}")
    print("| run | seconds | images/s | overhead vs bare | vs bare + preprocessing | store size |")
    print("|---|---|---|---|---|---|")
    print(f"| bare forward (preprocessed tensors) | {bare:.2f} | {n / bare:.1f} | | | |")
    print(f"| bare forward + preprocessing | {bare_pre:.2f} | {n / bare_pre:.1f} | {bare_pre / bare - 1:+.1%} | | |")
    print(f"| extract_activations float16 (memory) | {memory:.2f} | {n / memory:.1f} | {memory / bare - 1:+.1%} | "
          f"{memory / bare_pre - 1:+.1%} | |")
    for level, seconds, size in rows:
        print(f"| extract_to_store float16, zstd {level} | {seconds:.2f} | {n / seconds:.1f} | "
              f"{seconds / bare - 1:+.1%} | {seconds / bare_pre - 1:+.1%} | "
              f"{size / 2**20:.0f} MiB ({raw / size:.2f}x of {raw / 2**20:.0f} MiB) |")

if __name__ == "__main__":
    main()
