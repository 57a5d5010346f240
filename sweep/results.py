"""The results folder of a sweep: what is written per model, how completion is recorded, how it is read.

Layout::

    <results_dir>/
        models/<key>/       one folder per model: matches, neurons, summary, layer_matches,
                            assignment (and decoding) as Parquet, null.npz, and DONE.json last
        sweep.json          what the folder's results were made from: stimuli, neural data, splits,
                            science settings, a synthetic brain's settings (written on the first
                            analysis; later runs must match)
        failures.json       models that failed, with the stage and the error
        REPORT.json         the inputs of the last report (an unchanged sweep is not re-reported)
        planted_truth.csv   (synthetic neurons only) which neurons copy which unit
        summary.csv ...     the report's aggregated tables (see :mod:`unitmatch.sweep.stages`)

A model's folder is written beside its final place and renamed into it, with ``DONE.json`` (which
carries the fingerprint of what produced it) written inside before the rename: a folder is either
the previous complete result or the new complete one, never a mix. The fingerprint covers the store
identity, the neural data, the splits and the science settings only, so a change of compute
settings (scheduler, block size, device) reuses a finished result.

A sweep folder holds one analysis: ``sweep.json`` records its inputs, a run whose inputs differ is
refused (:func:`check_record`), and :func:`collect` reads only results whose ``DONE.json`` names
that record, so results of other data or settings are never aggregated with it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import warnings
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from unitmatch.core.store import atomic_write

from .config import ConfigError

log = logging.getLogger(__name__)

DONE = "DONE.json"
RECORD = "sweep.json"


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-serialisable parts (numpy arrays via their lists)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_dir(results_dir: Path, key: str) -> Path:
    return Path(results_dir) / "models" / key


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def recover(results_dir: Path, key: str) -> None:
    """Clean up after a writer of ``key`` that was killed (its process is gone) in mid-write.

    Its staging folder is deleted. A kill between moving the previous results aside and renaming the
    new ones into place leaves no model folder and the previous (complete) results in
    ``.<key>.old-<pid>``: they are put back, so the model is not lost (it is then judged by its
    ``DONE.json`` as any other). Folders of live writers are left alone.
    """
    final = model_dir(results_dir, key)
    for stale in sorted(final.parent.glob(f".{glob.escape(key)}.*-*")):
        kind, _, pid = stale.name[len(key) + 2:].rpartition("-")
        if kind not in ("staging", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not final.exists() and (stale / DONE).exists():
            stale.rename(final)
            log.warning("%s: put back the results a killed writer (pid %s) had moved aside", final, pid)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def is_done(results_dir: Path, key: str, fp: str, record: str | None = None) -> bool:
    """Whether the model's results are complete, were produced by exactly ``fp`` and name the sweep record.

    ``record``: the sweep record's fingerprint (:func:`record_fingerprint`) where the caller has it
    (a stage reads it once for all its models); None: read here.
    """
    recover(results_dir, key)
    marker = model_dir(results_dir, key) / DONE
    if not marker.exists():
        return False
    done = json.loads(marker.read_text())
    if done.get("fingerprint") != fp:
        return False
    return done.get("sweep_record") == (record_fingerprint(results_dir) if record is None else record)


def write_model_results(results_dir: Path, key: str, tables: dict[str, pd.DataFrame], null: dict | None,
                        done: dict, records: dict | None = None, record: str | None = None) -> Path:
    """Write one model's tables (Parquet), its null (npz), JSON records and ``DONE.json`` in one rename.

    Args:
        tables: file stem -> table (empty tables are left out).
        null: arrays for ``null.npz``, or None.
        done: what ``DONE.json`` records (must include ``fingerprint``; ``sweep_record`` is added: the
            fingerprint of the folder's ``sweep.json``, which must exist).
        records: file name -> JSON-serialisable content (e.g. ``provenance.json``).
        record: the sweep record's fingerprint, as for :func:`is_done` (None: read here).
    """
    if record is None:
        record = record_fingerprint(results_dir)
    if record is None:
        raise FileNotFoundError(f"{Path(results_dir) / RECORD} is missing: a sweep folder records its inputs "
                                f"(check_record(..., write=True)) before any model's results are written")
    done = {**done, "sweep_record": record}
    final = model_dir(results_dir, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(results_dir, key)
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
        try:
            staging.rename(final)
        except BaseException:
            if old.exists() and not final.exists():  # put the previous complete results back
                old.rename(final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def sweep_record(stimuli: str, splits, analysis: dict, neural_data: str | None = None,
                 neural: dict | None = None) -> dict:
    """What a sweep folder's results are made from (``sweep.json``).

    Args:
        stimuli: the stimulus set's content hash.
        splits: the analysis splits (train indices enter the record as a fingerprint).
        analysis: the science settings.
        neural_data: the neural data's fingerprint (None where it is not known yet: a synthetic brain
            is planted from a store, after extraction).
        neural: the settings a synthetic brain is planted with (known before extraction), or None.
    """
    return {"stimuli": stimuli, "neural_data": neural_data,
            "splits": fingerprint([np.asarray(s[0]).tolist() for s in splits]), "analysis": analysis,
            "neural": neural}


def read_record(results_dir: Path) -> dict | None:
    path = Path(results_dir) / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def check_record(results_dir: Path, record: dict, sweep_name: str, write: bool = False) -> None:
    """Refuse a run whose inputs differ from the sweep folder's record; with ``write``, record them if none is.

    Entries that are None (not known yet) are not compared. Compute settings are not part of the
    record, so changing only them is fine.

    Raises:
        ConfigError: naming each input that differs, with the folder's and this run's values.
    """
    old = read_record(results_dir)
    if old is None:
        if write:
            atomic_write(Path(results_dir) / RECORD, json.dumps(record, indent=2, sort_keys=True).encode())
        return
    diffs = []
    for name in ("stimuli", "neural_data", "splits"):
        if record.get(name) is not None and old.get(name) is not None and record[name] != old[name]:
            diffs.append(f"the {name.replace('_', ' ')} (fingerprint {old[name]} there, {record[name]} now)")
    for group in ("analysis", "neural"):
        if record.get(group) is None and old.get(group) is None:
            continue
        theirs, ours = old.get(group) or {}, record.get(group) or {}
        for key in sorted(set(theirs) | set(ours)):
            if theirs.get(key, "<unset>") != ours.get(key, "<unset>"):
                diffs.append(f"{group}.{key} ({theirs.get(key, '<unset>')!r} there, {ours.get(key, '<unset>')!r} now)")
    if diffs:
        raise ConfigError(f"sweep_name={sweep_name!r}: the sweep folder {str(results_dir)!r} holds results of other "
                          f"inputs; this run differs in {'; '.join(diffs)}. Its results would mix with the folder's: "
                          f"give this run a new sweep_name (e.g. sweep_name={sweep_name}_2), or the folder's settings "
                          f"(recorded in {RECORD}). Compute settings (compute.*, cluster.*) may differ freely.")


def trusted(results_dir: Path) -> dict[str, dict]:
    """The complete model results a report may use: model key -> its ``DONE.json``.

    With a sweep record, only results whose ``DONE.json`` names that record (``sweep_record``) are
    used; the others are named in a warning and left out.
    """
    want = record_fingerprint(results_dir)
    out, skipped = {}, []
    for folder in sorted((Path(results_dir) / "models").glob("[!.]*")):
        marker = folder / DONE
        if not marker.exists():
            continue
        done = json.loads(marker.read_text())
        if want is not None and done.get("sweep_record") != want:
            skipped.append(folder.name)
            continue
        out[folder.name] = done
    if skipped:
        log.warning("%s: results of %s were made from other inputs than the sweep record (%s) and are left out",
                    results_dir, skipped, RECORD)
    return out


def record_fingerprint(results_dir: Path) -> str | None:
    """The fingerprint a model's ``DONE.json`` carries as ``sweep_record`` (None without a record)."""
    record = read_record(results_dir)
    return None if record is None else fingerprint(record)


def collect(results_dir: Path, with_matches: bool = False, keys=None):
    """Every trusted model's summary and neuron tables in a sweep folder, and each model's pooled null.

    Trusted: complete and made from the sweep record's inputs (:func:`trusted`; ``keys``: those
    already found by a call of it). With ``with_matches`` also the per-(model, neuron, split) table
    joined with the neuron statistics.
    """
    summaries, neurons, nulls, matches = [], [], {}, []
    for key in trusted(results_dir) if keys is None else keys:
        folder = model_dir(results_dir, key)
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


#: how failures.json names the verify failure of a store whose key cannot be read (no model owns it)
STORE_FAILURE = "store "


def store_failure(folder: Path, error: str) -> dict:
    """The failures.json record of an unreadable store (key ``store <folder name>``): stage, error and its path."""
    return {"stage": "verify", "error": error, "traceback": "", "store": str(Path(folder).resolve())}


def update_failures(results_dir: Path, failed: dict, succeeded: list[str], verified: list[str] = (),
                    verified_stores: list[str] = ()) -> dict:
    """Merge this run's failures into ``failures.json``; models that succeeded now are removed.

    ``verified``: models whose stores the ``verify`` stage found intact now; only their ``verify``
    failures are removed (a failed analysis stays until the model is analysed). ``verified_stores``:
    the store folders (resolved paths) it found intact now. The failure of a store whose key could
    not be read (``store <folder>``, :func:`store_failure`) is removed once a verify finds its folder
    intact, or (by any stage) once the folder no longer exists.

    Nothing is written when nothing changed (a rerun of a finished sweep writes nothing).
    """
    path = Path(results_dir) / "failures.json"
    old = json.loads(path.read_text()) if path.exists() else None
    failures = dict(old or {})
    failures.update(failed)
    for key in succeeded:
        failures.pop(key, None)
    for key in verified:
        if key not in failed and failures.get(key, {}).get("stage") == "verify":
            del failures[key]
    for key, failure in list(failures.items()):
        if key not in failed and key.startswith(STORE_FAILURE) and failure.get("stage") == "verify":
            folder = failure.get("store")
            if folder is None:  # recorded before the path was: known by its folder's name only
                gone = any(Path(p).name == key[len(STORE_FAILURE):] for p in verified_stores)
            else:
                gone = folder in verified_stores or not Path(folder).exists()
            if gone:
                del failures[key]
    if failures != old and (failures or old is not None):
        atomic_write(path, json.dumps(failures, indent=2).encode())
    return failures
