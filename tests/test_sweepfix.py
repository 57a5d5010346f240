"""Five defects found in review, each pinned by a test that fails without its fix: provenance and the
sweep record read once per run, flagged neurons screened (and named) once, failures.json forgets
repaired or deleted unreadable stores, and combine_results orders and checks its parts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from unitmatch import core
from unitmatch.core.engine import combine_results, run_matching

N_IMAGES = 120


# ------------------------------------------------------------------------- 5. combine_results
def _result(n_neurons=6, offset=0, n_splits=3, n_images=N_IMAGES, **settings):
    """A matching of ``n_neurons`` random neurons (ids n<offset>...) over two layers."""
    rng = np.random.default_rng(offset)
    layers = {"conv": rng.standard_normal((n_images, 2, 3, 3)).astype(np.float32),
              "fc": rng.standard_normal((n_images, 10)).astype(np.float32)}
    y = rng.standard_normal((n_neurons, n_images))
    splits = core.brainscore_splits(n_images=n_images, n_splits=n_splits, stratify=None)
    ids = [f"n{offset + i:03d}" for i in range(n_neurons)]
    return run_matching(layers, y, splits, neuron_ids=ids, top_k=2, n_permutations=settings.pop("n_permutations", 3),
                        **settings)


def _expected_order(df: pd.DataFrame, ids) -> pd.DataFrame:
    """The documented order, built independently: split, then position in ids, then layer (conv before fc)."""
    pos = {n: i for i, n in enumerate(ids)}
    keys = df.assign(_pos=df.neuron.map(pos), _layer=df.get("layer", pd.Series("", index=df.index)).map(
        {"conv": 0, "fc": 1, "": 0}))
    return df.loc[keys.sort_values(["split", "_pos", "_layer"]).index].reset_index(drop=True)


def test_combine_results_orders_rows_by_split_then_neuron_ids_for_one_part_as_for_several():
    a, b = _result(4, offset=0), _result(3, offset=4)
    ids = [f"n{i:03d}" for i in (5, 0, 6, 1, 2, 4, 3)]  # interleaved: neither part's own order
    for parts, want in (([a], ids[1:2] + ids[3:5] + ids[6:]), ([a, b], ids)):
        want = [n for n in ids if n in set(want)]
        got = combine_results(parts, want)
        source = pd.concat([p.matches for p in parts], ignore_index=True)
        pd.testing.assert_frame_equal(got.matches, _expected_order(source, want))
        layers = pd.concat([p.layer_matches for p in parts], ignore_index=True)
        pd.testing.assert_frame_equal(got.layer_matches, _expected_order(layers, want))
        # the null's neuron axis follows the same order
        null = np.concatenate([p.null.test_r for p in parts], axis=2)
        own = [n for p in parts for n in pd.unique(p.matches.neuron)]
        np.testing.assert_array_equal(got.null.test_r, null[:, :, [own.index(n) for n in want]])
    # one part in its own order: the engine writes layer_matches layer by layer; combined it is split-major
    one = combine_results([a], list(pd.unique(a.matches.neuron)))
    assert list(one.layer_matches.split) == sorted(a.layer_matches.split)


def test_combine_results_refuses_parts_of_other_splits_or_settings_naming_what_differs():
    a = _result(4, offset=0)
    ids = [f"n{i:03d}" for i in range(7)]
    other_sizes = _result(3, offset=4, n_images=90)  # same split numbers, other train and test sizes
    n_train, n_test = a.matches.n_train.iloc[0], a.matches.n_test.iloc[0]
    with pytest.raises(ValueError, match=rf"different splits .*split 0: \({n_train}, {n_test}\) in part 0, "
                                         rf"\({other_sizes.matches.n_train.iloc[0]}, "):
        combine_results([a, other_sizes], ids)
    fewer = _result(3, offset=4, n_splits=2)
    with pytest.raises(ValueError, match=r"different splits .*split 2: \(\d+, \d+\) in part 0, absent in part 1"):
        combine_results([a, fewer], ids)
    with pytest.raises(ValueError, match=r"different settings: n_permutations: 3 in part 0, 5 in part 1"):
        combine_results([a, _result(3, offset=4, n_permutations=5)], ids)
    with pytest.raises(ValueError, match=r"expected each of 5 neurons once"):  # one part is checked too
        combine_results([a], ids[:5])


# ------------------------------------------------------------------ 1. provenance
def test_provenance_reads_a_store_again_once_its_done_records_change(tmp_path, monkeypatch):
    from test_integrity import LAYERS, N_IMAGES, _write_store

    from unitmatch.core.store import ActivationStore
    from unitmatch.sweep import provenance

    rng = np.random.default_rng(0)
    store = _write_store(tmp_path / "stores", {layer.name: rng.standard_normal((N_IMAGES, layer.size)).astype(
        np.float16) for layer in LAYERS})  # its done records say device "cpu", no host or tf32
    reads = []
    done_records = ActivationStore.done_records
    monkeypatch.setattr(ActivationStore, "done_records", lambda self: reads.append(1) or done_records(self))
    first = [provenance.store_record(store) for _ in range(3)]
    assert len(reads) == 1 and first[0] == first[1] == first[2]
    assert first[0]["batches"] == {"cpu on unrecorded host, tf32 unrecorded": store.n_batches}
    # a batch redone elsewhere (its record rewritten): read afresh, the new device counted
    record_file = store.path / "done" / "b000000"
    record_file.write_text(json.dumps({**json.loads(record_file.read_text()), "device": "cuda:0", "host": "gpu1"}))
    changed = provenance.store_record(ActivationStore.open(store.path))
    assert len(reads) == 2
    assert changed["batches"] == {"cpu on unrecorded host, tf32 unrecorded": store.n_batches - 1,
                                  "cuda:0 on gpu1, tf32 unrecorded": 1}
