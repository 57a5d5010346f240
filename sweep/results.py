"""The results folder of a sweep: what is written per model, how completion is recorded, how it is read.

Layout::

    <results_dir>/
        models/<key>/       one folder per model: matches, neurons, summary, layer_matches,
                            assignment (and decoding) as Parquet, null.npz, and DONE.json last
        failures.json       models that failed, with the stage and the error
        planted_truth.csv   (synthetic neurons only) which neurons copy which unit
        summary.csv ...     the report's aggregated tables (see :mod:`unitmatch.sweep.stages`)

A model's folder is written beside its final place and renamed into it, with ``DONE.json`` (which
carries the fingerprint of what produced it) written inside before the rename: a folder is either
the previous complete result or the new complete one, never a mix. The fingerprint covers the store
identity, the neural data, the splits and the science settings only, so a change of compute
settings (scheduler, block size, device) reuses a finished result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

DONE = "DONE.json"


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-serialisable parts (numpy arrays via their lists)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_dir(results_dir: Path, key: str) -> Path:
    return Path(results_dir) / "models" / key


def is_done(results_dir: Path, key: str, fp: str) -> bool:
    """Whether the model's results are complete and were produced by exactly ``fp``."""
    marker = model_dir(results_dir, key) / DONE
    return marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fp


def write_model_results(results_dir: Path, key: str, tables: dict[str, pd.DataFrame], null: dict | None,
                        done: dict, records: dict | None = None) -> Path:
    """Write one model's tables (Parquet), its null (npz), JSON records and ``DONE.json`` in one rename.

    Args:
        tables: file stem -> table (empty tables are left out).
        null: arrays for ``null.npz``, or None.
        done: what ``DONE.json`` records (must include ``fingerprint``).
        records: file name -> JSON-serialisable content (e.g. ``provenance.json``).
    """
    final = model_dir(results_dir, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{key}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for stem, table in tables.items():
            if len(table):
                table.to_parquet(staging / f"{stem}.parquet", index=False)
        if null is not None:
            np.savez_compressed(staging / "null.npz", **null)
        for name, content in (records or {}).items():
            (staging / name).write_text(json.dumps(content, indent=2, default=str))
        (staging / DONE).write_text(json.dumps(done, indent=2))
        old = final.parent / f".{key}.old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def collect(results_dir: Path, with_matches: bool = False):
    """Every complete model's summary and neuron tables in a sweep folder, and each model's pooled null.

    With ``with_matches`` also the per-(model, neuron, split) table joined with the neuron statistics.
    """
    summaries, neurons, nulls, matches = [], [], {}, []
    for folder in sorted((Path(results_dir) / "models").glob("[!.]*")):
        if not (folder / DONE).exists():
            continue
        summaries.append(pd.read_parquet(folder / "summary.parquet"))
        neurons.append(pd.read_parquet(folder / "neurons.parquet"))
        if with_matches:
            stats = [c for c in ("p_value", "q_value", "significant", "ceiling", "ceiling_ok", "null_test_r")
                     if c in neurons[-1]]
            m = pd.read_parquet(folder / "matches.parquet").drop(columns=["topk_unit", "topk_r"])
            matches.append(m.merge(neurons[-1][["neuron", *stats]], on="neuron", how="left"))
        if (folder / "null.npz").exists():
            with warnings.catch_warnings():  # all-NaN (flat on the test images) copies stay NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                nulls[folder.name] = np.nanmean(np.load(folder / "null.npz")["test_r"], axis=1).ravel()
    if not summaries:
        empty = (pd.DataFrame(), pd.DataFrame(), {})
        return (*empty, pd.DataFrame()) if with_matches else empty
    out = (pd.concat(summaries, ignore_index=True), pd.concat(neurons, ignore_index=True), nulls)
    return (*out, pd.concat(matches, ignore_index=True)) if with_matches else out


def update_failures(results_dir: Path, failed: dict, succeeded: list[str]) -> dict:
    """Merge this run's failures into ``failures.json``; models that succeeded now are removed."""
    path = Path(results_dir) / "failures.json"
    failures = json.loads(path.read_text()) if path.exists() else {}
    failures.update(failed)
    for key in succeeded:
        failures.pop(key, None)
    path.write_text(json.dumps(failures, indent=2))
    return failures
