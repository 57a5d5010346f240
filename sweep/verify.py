"""The ``verify`` stage: checks every activation store of the selected models, end to end.

A model's stores are the folders under ``store_root`` whose ``key.json`` names its identity (every
layer selection, dtype and stimulus set it was extracted with); a folder whose key cannot be read
belongs to no model and is checked too (a run whose store lands there would fail on it). Each store
gets :func:`core.store.verify_store`: key, metadata files, done records, and every chunk decoded and
compared with its recorded digest. OK stores are logged; a damaged one is logged with each damaged
chunk and recorded as its model's failure (stage ``verify``), so the command exits with status 1.
A store whose key cannot be read is recorded as ``store <folder>`` (with its path), a failure that
ends once a verify finds the folder intact or the folder is deleted (:func:`results.update_failures`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from unitmatch.core.store import VerifyReport, verify_store

from .results import STORE_FAILURE, store_failure

log = logging.getLogger("unitmatch")


def stage_verify(store_root: str | Path, entries, done: dict) -> list[VerifyReport]:
    """Verify the stores of ``entries`` (sweep :class:`~sweep.zoo.ModelEntry`) under ``store_root``.

    Damaged stores go into ``done["failed"]`` under their model's key (or ``store <folder>`` for a
    store whose key cannot be read), with every problem in the error text; models whose stores are
    all OK go into ``done["verified_ok"]`` (an earlier ``verify`` failure of theirs is then cleared),
    and every intact store folder (resolved path) into ``done["verified_stores"]``.
    """
    root = Path(store_root)
    # a store folder holds key.json and store.zarr (staging folders start with a dot)
    folders = sorted(p for p in root.iterdir() if not p.name.startswith(".") and
                     ((p / "key.json").exists() or (p / "store.zarr").exists())) if root.is_dir() else []
    owners: dict[Path, str | None] = {}
    for folder in folders:
        try:
            owners[folder] = json.loads((folder / "key.json").read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            owners[folder] = None  # unreadable key: verify_store says why
    reports = []
    for entry in entries:
        identity = entry.spec.identity()
        mine = [f for f, model in owners.items() if model == identity]
        if not mine:
            log.info("verify %s: no store of %s under %s (nothing to check)", entry.key, identity, root)
        checked = [_check(folder, entry.key, done) for folder in mine]
        reports += checked
        if checked and all(r.ok for r in checked):
            done.setdefault("verified_ok", []).append(entry.key)
    for folder in (f for f, model in owners.items() if model is None):
        reports.append(_check(folder, None, done))
    log.info("verify: %d store(s) checked under %s, %d damaged", len(reports), root,
             sum(not r.ok for r in reports))
    return reports


def _check(folder: Path, key: str | None, done: dict) -> VerifyReport:
    """Verify one store folder of model ``key`` (None: a store whose key cannot be read); record the outcome."""
    report = verify_store(folder)
    name = f"{STORE_FAILURE}{folder.name}" if key is None else key
    if report.ok:
        log.info("verify %s: %s", name, report.describe())
        done.setdefault("verified_stores", []).append(str(folder.resolve()))
        return report
    log.error("verify %s: %s", name, report.describe())
    error = f"StoreDamagedError: {report.describe()}"
    if key is None:
        done["failed"][name] = store_failure(folder, error)
    else:
        previous = done["failed"].get(key, {}).get("error")
        done["failed"][key] = {"stage": "verify", "error": f"{previous}\n{error}" if previous else error,
                               "traceback": ""}
    return report
