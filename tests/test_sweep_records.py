"""Five defects found in review, each pinned by a test that fails without its fix: provenance and the
sweep record read once per run, flagged neurons screened (and named) once, failures.json forgets
repaired or deleted unreadable stores, and combine_results orders and checks its parts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from unitmatch import core
from unitmatch.core.engine import combine_results, run_matching

from test_sweep import _compose, outputs  # noqa: F401 - the sweep tests' config and outputs fixture

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


# ------------------------------------------------------- 1-3. one sweep: a store shared by two models
def test_a_sweep_of_two_models_on_one_store_reads_its_records_once_and_names_flagged_neurons_once(
        outputs, tmp_path, monkeypatch, caplog):
    """Two model files of one identity (one store, two results), neural=plain with a constant neuron,
    a region-committed search: every done record of the store is read once for the provenance (and
    once for the chunk digests), sweep.json is hashed once for the stage, and the flagged neuron is
    named once; the recorded provenance and DONE.json equal what a fresh read gives."""
    from unitmatch.core.store import ActivationStore
    from unitmatch.sweep import results
    from unitmatch.sweep.stages import run

    models = tmp_path / "conf" / "models"
    models.mkdir(parents=True)
    (models / "convnext_copy.yaml").write_text("# @package models.convnext_copy\nname: test_convnext\n"
                                               "pretrained: false\nseed: 0\nlayers: stages\n")
    r = np.random.default_rng(0).standard_normal((10, 240, 3))
    r[0] = 1.0  # constant: flagged, left out of the matching
    np.save(tmp_path / "bad.npy", r)
    base = ["logger=none", "stimuli.variations=6", "analysis.n_permutations=9", "analysis.n_random_populations=10",
            "analysis.splits=3", "analysis.stratify=auto", "untrained_controls=[]", "neural=plain",
            "neural.region=V4", f"neural.responses={tmp_path / 'bad.npy'}", "sweep_name=shared",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    run(_compose(base + ["models=[demo_test_convnext]", "stage=extract"]))

    reads, hashes = {}, []
    done_records, record_fingerprint = ActivationStore.done_records, results.record_fingerprint

    def counted_reads(self):
        reads[self.path.name] = reads.get(self.path.name, 0) + 1
        return done_records(self)

    def counted_hash(results_dir):
        hashes.append(results_dir)
        return record_fingerprint(results_dir)

    monkeypatch.setattr(ActivationStore, "done_records", counted_reads)
    monkeypatch.setattr(results, "record_fingerprint", counted_hash)
    caplog.set_level(logging.WARNING, logger="unitmatch")
    cfg = _compose(base + ["models=[demo_test_convnext,convnext_copy]", "analysis.region_layers={V4:[stages.3]}",
                           "stage=analyze"])
    done = run(cfg)
    assert done["analyzed"] == ["demo_test_convnext", "convnext_copy"] and not done["failed"]
    out = Path(cfg.results_dir)
    (store_path,) = [p for p in Path(cfg.store_root).iterdir() if not p.name.startswith(".")]
    # 1. one read for the provenance, one for the chunk digest table: not one more per result
    assert reads == {store_path.name: 2}
    # 2. sweep.json hashed once for the stage (not twice per model)
    assert len(hashes) == 1
    # 3. the flagged neuron named once
    flagged = [r.getMessage() for r in caplog.records if "flagged and left out of the matching" in r.getMessage()]
    assert flagged == ["1 of 10 neurons are flagged and left out of the matching: n000 (constant_train)"]

    # the provenance: every record equals the done records counted here, from the files themselves
    counts = {}
    for f in sorted((store_path / "done").iterdir()):
        info = json.loads(f.read_text())
        label = f"{info['device']} on {info['host']}, tf32 {info['tf32']}"
        counts[label] = counts.get(label, 0) + 1
    sweep_record = json.loads((out / "provenance.json").read_text())["stores"]
    assert {k: v["batches"] for k, v in sweep_record.items()} == {"demo_test_convnext": counts,
                                                                  "convnext_copy": counts}
    record = results.fingerprint(json.loads((out / "sweep.json").read_text()))
    for key in ("demo_test_convnext", "convnext_copy"):
        folder = out / "models" / f"{key}.region_committed"
        assert json.loads((folder / "provenance.json").read_text())["store"]["batches"] == counts
        assert json.loads((folder / "DONE.json").read_text())["sweep_record"] == record
        neurons = pd.read_parquet(folder / "neurons.parquet").set_index("neuron")
        assert neurons.loc["n000", "flags"] == "constant_train,no_ceiling" and not neurons.loc["n000", "analyzed"]
        assert neurons.drop(index="n000").analyzed.all()
    # the two results of one store are the same numbers
    a, b = (pd.read_parquet(out / "models" / f"{k}.region_committed" / "matches.parquet").drop(columns="model")
            for k in ("demo_test_convnext", "convnext_copy"))
    pd.testing.assert_frame_equal(a, b)
    hashes.clear()
    caplog.clear()
    again = run(cfg)  # the record handed on to is_done finds both finished
    assert again["skipped"] == ["demo_test_convnext", "convnext_copy"] and again["analyzed"] == []
    assert len(hashes) == 1
    assert not any("flagged" in r.getMessage() for r in caplog.records)  # nothing analysed: nothing screened


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


def test_analyze_with_the_callers_flags_screens_nothing_again_and_gives_the_same_tables(caplog):
    """core.analyze(flags=screen_neurons(...)) is the analysis without them, logs no second warning and
    leaves the caller's table as it was; flags of other neurons are refused."""
    from test_analysis import _world

    from unitmatch.core.analysis import analysable, analyze, screen_neurons

    layers, assembly, _ = _world(seed=3)
    responses = assembly.responses.copy()
    responses[0] = 1.0  # constant: flagged
    assembly = core.NeuralAssembly(responses, assembly.neuron_ids, assembly.regions, assembly.image_ids,
                                   assembly.image_metadata)
    splits = core.brainscore_splits(assembly.image_metadata, n_splits=2)
    mapping = {"V4": ["conv"], "IT": ["fc"], "noise": ["re:.*"]}
    kwargs = dict(n_permutations=5, n_random_populations=5, top_k=3, region_layers=mapping)
    message = "neurons are flagged and left out of the matching"
    caplog.set_level(logging.WARNING, logger="unitmatch")
    plain = analyze(layers, assembly, splits, **kwargs)
    assert sum(message in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    flags = screen_neurons(assembly, splits)
    before = flags.copy()
    given = analyze(layers, assembly, splits, flags=flags, **kwargs)
    assert not any(message in r.getMessage() for r in caplog.records)
    pd.testing.assert_frame_equal(flags, before)
    for name in ("matches", "layer_matches", "neurons", "assignment", "decoding", "summary"):
        pd.testing.assert_frame_equal(getattr(given, name), getattr(plain, name), obj=name)
    assert given.neurons.set_index("neuron")["flags"].iloc[0].startswith("constant_train")
    with pytest.raises(ValueError, match=r"flags screen other neurons than the assembly's: 35 rows .* for its 36 "
                                         r"neurons .*pass screen_neurons\(assembly, splits\) of this assembly"):
        analysable(assembly, flags.iloc[1:])


# --------------------------------------------------------------- 4. failures.json and unreadable stores
def _verify(root):
    from unitmatch.sweep.stages import run

    return run(_compose(["logger=none", "models=[demo_test_resnet]", "untrained_controls=[]", "sweep_name=verify",
                         "stage=verify", "neural.planted_model=demo_test_resnet", f"store_root={root}"]))


def _failures(outputs) -> dict:
    return json.loads((outputs / "sweeps" / "verify" / "failures.json").read_text())


@pytest.mark.parametrize("fix", ["delete", "repair"])
def test_an_unreadable_stores_failure_ends_when_its_folder_is_deleted_or_verifies_intact(outputs, fix):
    """A store whose key.json cannot be read is recorded as ``store <folder>``; once the folder is gone
    (seen by any stage) or the store verifies intact, the failure leaves failures.json."""
    import shutil

    from test_integrity import LAYERS, N_IMAGES, _write_store

    from unitmatch.sweep import results

    rng = np.random.default_rng(0)
    root = outputs / "stores"
    store = _write_store(root, {layer.name: rng.standard_normal((N_IMAGES, layer.size)).astype(np.float16)
                                for layer in LAYERS})  # demo_test_resnet's identity
    key_file = store.path / "key.json"
    good = key_file.read_bytes()
    key_file.write_text("{not json")
    done = _verify(root)
    name = f"store {store.path.name}"
    assert list(done["failed"]) == [name]
    recorded = _failures(outputs)
    assert list(recorded) == [name] and recorded[name]["stage"] == "verify"
    assert recorded[name]["store"] == str(store.path.resolve()) and "key.json" in recorded[name]["error"]
    # another (legacy, path unknown) store failure and a model's analysis failure are not touched by either fix
    others = {"store elsewhere": {"stage": "verify", "error": "x", "traceback": ""},
              "demo_test_convnext": {"stage": "analyze", "error": "y", "traceback": ""}}
    results.update_failures(outputs / "sweeps" / "verify", others, [])
    if fix == "delete":
        shutil.rmtree(store.path)
        # any later run merging its failures drops it (here: nothing failed, nothing succeeded)
        left = results.update_failures(outputs / "sweeps" / "verify", {}, [])
    else:
        key_file.write_bytes(good)
        done = _verify(root)  # checked as demo_test_resnet's store now, intact
        assert not done["failed"] and done["verified_stores"] == [str(store.path.resolve())]
        left = _failures(outputs)
    assert left == others and _failures(outputs) == others
