"""Provenance: what produced a results folder, written beside the results.

``<results_dir>/provenance.json`` (rewritten by each analyze run) records the resolved config, the
versions of the packages that decide the numbers, the git commit of the code when it runs from a
checkout, the host and Python, the neural data's and stimuli's content hashes, and every model's
store identity. Each model's folder holds its own ``provenance.json``: its weights, its store's key and
how the store was extracted (device, TF32 policy, unitmatch version), written in the same rename as
its results.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

#: distributions whose versions are recorded
PACKAGES = ("unitmatch", "torch", "timm", "numpy", "scipy", "scikit-learn", "pandas", "zarr", "dask", "ray",
            "hydra-core", "wandb", "xarray")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict | None:
    """The commit of the code that runs (and whether the work tree had changes); None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


#: per store folder: the state of its done records and the extraction records read from them
_EXTRACTION: dict[Path, tuple[tuple, dict[str, int]]] = {}


def _extraction_records(store) -> dict[str, int]:
    """``store.extraction_records()``, read once per store folder while its done records are unchanged.

    The sweep's provenance and every result of the store record the same counts: reading every done
    record for each would grow with the number of results. The cache key is the folder, the names,
    sizes and modification times of its done records and the store's TF32 attribute, so a store
    deleted and extracted again, or a batch redone, is read afresh.
    """
    done = store.path / "done"
    files = sorted(os.scandir(done), key=lambda e: e.name) if done.is_dir() else []
    state = (json.dumps(store.attrs.get("tf32"), default=str),
             tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in files if e.name.startswith("b")))
    folder = store.path.resolve()
    cached = _EXTRACTION.get(folder)
    if cached is None or cached[0] != state:
        cached = _EXTRACTION[folder] = (state, store.extraction_records())
    return dict(cached[1])


def store_record(store) -> dict:
    """A store's identity and how it was extracted (its Zarr group's attributes)."""
    extraction = {k: v for k, v in store.attrs.items() if k != "layers"}  # the root group's, read on open
    return {"path": str(store.path), "digest": store.path.name, "key": store.key, "extraction": extraction,
            "batches": _extraction_records(store)}


def model_record(entry, store) -> dict:
    return {"model": entry.key, "weights": entry.weights, "control": entry.control,
            "imagenet_top1": entry.imagenet_top1, "imagenet_top1_source": entry.imagenet_top1_source,
            "imagenet_top1_illustrative": entry.top1_illustrative, "store": store_record(store)}


def write_sweep(cfg: DictConfig, neural_hash: str, assembly, stores: dict) -> Path:
    path = Path(cfg.results_dir) / "provenance.json"
    record = {
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "packages": package_versions(),
        "git": git_commit(),
        "python": platform.python_version(),
        "host": platform.node(),
        "platform": platform.platform(),
        "neural_data": {"sha256_16": neural_hash, "n_neurons": int(assembly.n_neurons),
                        "n_images": int(assembly.n_images)},
        "stores": {key: store_record(store) for key, store in stores.items()},
    }
    path.write_text(json.dumps(record, indent=2, default=str))
    return path
