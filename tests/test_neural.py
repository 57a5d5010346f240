"""core.neural: NeuralAssembly, load_plain (synthetic and the real V4 session), load_brainio."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from unitmatch.core.neural import NeuralAssembly, load_brainio, load_plain
from unitmatch.core.reliability import split_half_reliability
from unitmatch.core.stimuli import StimulusSet

V4_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "v4_cowley2023_session210325"


def _ids(prefix, n):
    return [f"{prefix}{i}" for i in range(n)]


def _write_images(folder: Path, names) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(folder / name)
    return folder


# ================================================================== NeuralAssembly construction
def test_valid_2d_and_3d_and_dtype():
    a = NeuralAssembly(np.arange(6).reshape(2, 3), ["n0", "n1"], ["V4", "IT"], ["a", "b", "c"])
    assert a.responses.dtype == np.float64
    assert (a.n_neurons, a.n_images, a.has_repeats) == (2, 3, False)
    assert a.neuron_ids.tolist() == ["n0", "n1"]
    assert a.regions.tolist() == ["V4", "IT"]
    assert a.image_ids.tolist() == ["a", "b", "c"]
    b = NeuralAssembly(np.zeros((2, 3, 4)), ["n0", "n1"], ["V4", "V4"], [1, 2, 3])
    assert b.has_repeats and b.n_images == 3
    assert b.image_ids.tolist() == ["1", "2", "3"]  # ids become strings


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5)])
def test_wrong_ndim(shape):
    m = shape[0] if len(shape) > 1 else 1
    with pytest.raises(ValueError, match=r"neurons x images or neurons x images x repeats; got shape"):
        NeuralAssembly(np.zeros(shape), _ids("n", m), ["V4"] * m, _ids("i", 3))


@pytest.mark.parametrize("field, kwargs", [
    ("neuron_ids", dict(neuron_ids=_ids("n", 3))),
    ("regions", dict(regions=["V4"])),
    ("image_ids", dict(image_ids=_ids("i", 4))),
])
def test_length_mismatches(field, kwargs):
    args = dict(responses=np.zeros((2, 3, 2)), neuron_ids=_ids("n", 2), regions=["V4", "V4"],
                image_ids=_ids("i", 3))
    args.update(kwargs)
    what = "images" if field == "image_ids" else "neurons"
    with pytest.raises(ValueError, match=rf"{field} has shape .* but responses \(2, 3, 2\) have \d {what}"):
        NeuralAssembly(**args)


def test_duplicate_neuron_ids():
    with pytest.raises(ValueError, match=r"duplicate neuron_ids: \['n1'\]"):
        NeuralAssembly(np.zeros((3, 2)), ["n0", "n1", "n1"], ["V4"] * 3, ["a", "b"])


def test_duplicate_image_ids():
    with pytest.raises(ValueError, match=r"duplicate image_ids: \['b'\]"):
        NeuralAssembly(np.zeros((1, 3)), ["n0"], ["V4"], ["a", "b", "b"])


def test_all_nan_neuron_is_named():
    r = np.ones((3, 2, 2))
    r[1] = np.nan
    r[2, 0, :] = np.nan  # partly missing is fine
    with pytest.raises(ValueError, match=r"all-NaN neurons.*\['silent'\]"):
        NeuralAssembly(r, ["ok", "silent", "partly"], ["V4"] * 3, ["a", "b"])
    r[1, 1, 0] = 0.0
    NeuralAssembly(r, ["ok", "silent", "partly"], ["V4"] * 3, ["a", "b"])


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_inf_rejected(value):
    r = np.ones((2, 2))
    r[0, 1] = value
    with pytest.raises(ValueError, match="inf"):
        NeuralAssembly(r, ["n0", "n1"], ["V4"] * 2, ["a", "b"])


# ================================================================== mean_responses
def test_mean_responses_nan_aware_by_hand():
    r = np.array([
        [[1.0, 2.0, 3.0], [4.0, np.nan, 8.0], [np.nan, np.nan, np.nan]],
        [[0.0, np.nan, np.nan], [-1.0, 1.0, 3.0], [5.0, 7.0, np.nan]],
    ])
    a = NeuralAssembly(r, ["n0", "n1"], ["V4", "V4"], ["a", "b", "c"])
    expected = np.array([
        [2.0, 6.0, np.nan],
        [0.0, 1.0, 6.0],
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" warnings
        got = a.mean_responses()
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, expected, equal_nan=True)


def test_mean_responses_2d_is_identity():
    r = np.random.default_rng(0).normal(size=(3, 5))
    a = NeuralAssembly(r, _ids("n", 3), ["V4"] * 3, _ids("i", 5))
    np.testing.assert_array_equal(a.mean_responses(), r)


# ================================================================== select
@pytest.fixture
def mixed():
    r = np.arange(4 * 3 * 2, dtype=float).reshape(4, 3, 2)
    meta = pd.DataFrame({"object_name": ["o1", "o2", "o3"]}, index=pd.Index(["a", "b", "c"], name="image_id"))
    return NeuralAssembly(r, ["v1", "i1", "v2", "i2"], ["V4", "IT", "V4", "IT"], ["a", "b", "c"], meta)


def test_select_region(mixed):
    v4 = mixed.select(region="V4")
    assert v4.neuron_ids.tolist() == ["v1", "v2"]
    assert v4.regions.tolist() == ["V4", "V4"]
    np.testing.assert_array_equal(v4.responses, mixed.responses[[0, 2]])
    assert v4.image_ids.tolist() == ["a", "b", "c"]
    assert v4.image_metadata is mixed.image_metadata
    both = mixed.select(region=["IT", "V4"])
    assert both.neuron_ids.tolist() == ["v1", "i1", "v2", "i2"]  # assembly order kept


def test_select_unknown_region(mixed):
    with pytest.raises(ValueError, match=r"unknown region\(s\) \['V1'\]; the assembly has \['IT', 'V4'\]"):
        mixed.select(region="V1")
    with pytest.raises(ValueError, match=r"unknown region\(s\) \['MT'\]"):
        mixed.select(region=["V4", "MT"])


def test_select_neurons(mixed):
    sub = mixed.select(neurons=["i2", "v1"])
    assert sub.neuron_ids.tolist() == ["v1", "i2"]
    np.testing.assert_array_equal(sub.responses, mixed.responses[[0, 3]])
    assert mixed.select(region="IT", neurons=["i1", "v1"]).neuron_ids.tolist() == ["i1"]
    with pytest.raises(ValueError, match=r"unknown neuron ids \['zz'\]"):
        mixed.select(neurons=["zz"])


# ================================================================== align
def test_align_reorders_to_stimulus_set(mixed):
    stim = StimulusSet.from_array(np.zeros((3, 2, 2, 3), np.uint8), image_ids=["c", "a", "b"])
    al = mixed.align(stim)
    assert al.image_ids.tolist() == ["c", "a", "b"]
    np.testing.assert_array_equal(al.responses, mixed.responses[:, [2, 0, 1]])
    np.testing.assert_array_equal(al.mean_responses(), mixed.mean_responses()[:, [2, 0, 1]])
    assert al.image_metadata["object_name"].tolist() == ["o3", "o1", "o2"]
    assert list(al.image_metadata.index) == ["c", "a", "b"]
    assert al.neuron_ids.tolist() == mixed.neuron_ids.tolist()


def test_align_2d_without_metadata():
    r = np.array([[1.0, 2.0, 3.0]])
    a = NeuralAssembly(r, ["n"], ["V4"], ["x", "y", "z"])
    stim = StimulusSet.from_array(np.zeros((3, 2, 2, 3), np.uint8), image_ids=["z", "x", "y"])
    al = a.align(stim)
    assert al.image_metadata is None
    np.testing.assert_array_equal(al.responses, [[3.0, 1.0, 2.0]])


def test_align_mismatch_lists_ids(mixed):
    stim = StimulusSet.from_array(np.zeros((3, 2, 2, 3), np.uint8), image_ids=["a", "b", "zz"])
    with pytest.raises(ValueError, match=r"1 only in the assembly \(e.g. \['c'\]\), 1 only in the stimulus set "
                                         r"\(e.g. \['zz'\]\)"):
        mixed.align(stim)
    fewer = StimulusSet.from_array(np.zeros((2, 2, 2, 3), np.uint8), image_ids=["a", "b"])
    with pytest.raises(ValueError, match=r"disagree on image ids.*\['c'\].*subset"):
        mixed.align(fewer)


# ================================================================== load_plain (synthetic)
def test_load_plain_2d_and_3d(tmp_path):
    folder = _write_images(tmp_path / "imgs", ["s10.png", "s2.png", "s1.png"])
    r2 = np.random.default_rng(0).normal(size=(2, 3))
    np.save(tmp_path / "r2.npy", r2)
    a, stim = load_plain(tmp_path / "r2.npy", folder)
    assert stim.image_ids == ("s1", "s2", "s10")
    assert a.image_ids.tolist() == ["s1", "s2", "s10"]
    assert a.neuron_ids.tolist() == ["n000", "n001"]
    assert a.regions.tolist() == ["unknown", "unknown"]
    np.testing.assert_array_equal(a.responses, r2)

    r3 = np.random.default_rng(1).normal(size=(2, 3, 4))
    r3[0, 1, 2] = np.nan
    np.save(tmp_path / "r3.npy", r3)
    a3, _ = load_plain(str(tmp_path / "r3.npy"), str(folder), region=["V4", "IT"], neuron_ids=["x", "y"])
    assert a3.has_repeats
    np.testing.assert_array_equal(a3.responses, r3)
    assert a3.regions.tolist() == ["V4", "IT"]
    assert a3.neuron_ids.tolist() == ["x", "y"]


def test_load_plain_with_metadata_csv_order(tmp_path):
    folder = _write_images(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    csv = tmp_path / "meta.csv"
    pd.DataFrame({"image_id": ["c", "a", "b"], "category_name": ["x", "y", "x"]}).to_csv(csv, index=False)
    np.save(tmp_path / "r.npy", np.array([[3.0, 1.0, 2.0]]))
    a, stim = load_plain(tmp_path / "r.npy", folder, csv, region="IT")
    assert a.image_ids.tolist() == ["c", "a", "b"] == list(stim.image_ids)
    assert a.image_metadata["category_name"].tolist() == ["x", "y", "x"]
    assert a.regions.tolist() == ["IT"]


def test_load_plain_image_axis_mismatch(tmp_path):
    folder = _write_images(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    np.save(tmp_path / "r.npy", np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match=r"r.npy has 4 images on axis 1 but .* holds 3 images"):
        load_plain(tmp_path / "r.npy", folder)


def test_load_plain_other_errors(tmp_path):
    folder = _write_images(tmp_path / "imgs", ["a.png", "b.png"])
    with pytest.raises(FileNotFoundError, match="responses file .* does not exist"):
        load_plain(tmp_path / "missing.npy", folder)
    np.save(tmp_path / "flat.npy", np.zeros(2))
    with pytest.raises(ValueError, match=r"expected neurons x images \[x repeats\]; got shape \(2,\)"):
        load_plain(tmp_path / "flat.npy", folder)
    np.save(tmp_path / "r.npy", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="regions has shape"):
        load_plain(tmp_path / "r.npy", folder, region=["V4", "IT", "V1"])


# ================================================================== load_plain on the real V4 session
@pytest.fixture(scope="module")
def v4():
    if not (V4_DIR / "responses_raw.npy").exists():
        pytest.skip(f"real V4 data not available at {V4_DIR} (../shared/data is absent in this checkout)")
    return load_plain(V4_DIR / "responses_raw.npy", V4_DIR / "images.zip", region="V4")


def test_v4_shapes_and_ids(v4):
    a, stim = v4
    assert a.responses.shape == (50, 640, 10)
    assert (a.n_neurons, a.n_images) == (50, 640)
    expected_ids = [f"image{i:04d}" for i in range(1, 641)]
    assert list(stim.image_ids) == expected_ids
    assert a.image_ids.tolist() == expected_ids
    assert stim.members[0] == "image0001.jpg" and stim.members[-1] == "image0640.jpg"
    assert a.regions.tolist() == ["V4"] * 50
    assert a.neuron_ids.tolist() == [f"n{i:03d}" for i in range(50)]
    counts = (~np.isnan(a.responses)).sum(axis=2)
    assert counts.min() >= 6 and counts.max() == 10  # README: 6 to 10 recorded repeats per image


def test_v4_repeat_mean_matches_avg(v4):
    a, _ = v4
    avg = np.load(V4_DIR / "responses_avg.npy")
    assert avg.shape == (50, 640)
    np.testing.assert_allclose(a.mean_responses(), avg, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_v4_first_image_loads(v4):
    _, stim = v4
    im = stim.load_image(0)
    assert im.size == (112, 112) and im.mode == "RGB"


def test_v4_reliability(v4):
    a, _ = v4
    rel = split_half_reliability(a.responses)
    assert rel.shape == (50,)
    assert np.isfinite(rel).all()
    in_range = (rel > -1) & (rel <= 1)
    assert in_range.mean() >= 0.9
    assert np.median(rel) > 0


# ================================================================== load_brainio
STIM = ["s0", "s1", "s2", "s3", "s4", "s5"]
OBJECT = {"s0": "car1", "s1": "car2", "s2": "dog1", "s3": "dog2", "s4": "car1", "s5": "dog1"}
CATEGORY = {s: OBJECT[s][:3] for s in STIM}
N_REP = {"s0": 3, "s1": 3, "s2": 2, "s3": 3, "s4": 1, "s5": 2}
NEUROIDS = ["v4_a", "v4_b", "it_a", "it_b", "it_c"]
REGIONS = ["V4", "V4", "IT", "IT", "IT"]


def _presentations(seed=0):
    rows = [(s, rep) for s in STIM for rep in range(N_REP[s])]
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[k] for k in order]


def _write_brainio(path: Path, *, n_bins=1, seed=0, drop=(), id_name="stimulus_id"):
    """A BrainIO-style assembly; returns (expected responses per bin, expected image order)."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    pres = _presentations(seed)
    values = rng.normal(size=(len(pres), len(NEUROIDS), n_bins))
    coords = {
        id_name: ("presentation", [s for s, _ in pres]),
        "object_name": ("presentation", [OBJECT[s] for s, _ in pres]),
        "category_name": ("presentation", [CATEGORY[s] for s, _ in pres]),
        "repetition": ("presentation", [rep for _, rep in pres]),
        "neuroid_id": ("neuroid", NEUROIDS),
        "region": ("neuroid", REGIONS),
        "time_bin_start": ("time_bin", [70 + 10 * b for b in range(n_bins)]),
        "time_bin_end": ("time_bin", [80 + 10 * b for b in range(n_bins)]),
    }
    for name in drop:
        coords.pop(name)
    da = xr.DataArray(values, dims=("presentation", "neuroid", "time_bin"), coords=coords, name="assembly")
    da.to_netcdf(path)
    image_order = list(dict.fromkeys(s for s, _ in pres))  # first appearance
    expected = np.full((n_bins, len(NEUROIDS), len(image_order), max(N_REP.values())), np.nan)
    for p, (s, rep) in enumerate(pres):
        expected[:, :, image_order.index(s), rep] = values[p].T
    return expected, image_order


def test_brainio_single_bin(tmp_path):
    expected, order = _write_brainio(tmp_path / "a.nc")
    assert order != sorted(order)  # the shuffle matters
    a = load_brainio(tmp_path / "a.nc")
    assert a.responses.shape == (5, 6, 3)
    assert a.image_ids.tolist() == order
    np.testing.assert_allclose(a.responses, expected[0], equal_nan=True)
    counts = (~np.isnan(a.responses[0])).sum(axis=1)
    assert dict(zip(a.image_ids, counts)) == N_REP  # NaN-padded where fewer repeats
    assert a.neuron_ids.tolist() == NEUROIDS
    assert a.regions.tolist() == REGIONS
    meta = a.image_metadata
    assert list(meta.index) == order
    assert meta["object_name"].tolist() == [OBJECT[s] for s in order]
    assert meta["category_name"].tolist() == [CATEGORY[s] for s in order]
    assert "repetition" not in meta.columns and "stimulus_id" not in meta.columns


def test_brainio_region_filter(tmp_path):
    expected, order = _write_brainio(tmp_path / "a.nc", seed=3)
    it = load_brainio(tmp_path / "a.nc", region="IT")
    assert it.neuron_ids.tolist() == ["it_a", "it_b", "it_c"]
    assert it.regions.tolist() == ["IT"] * 3
    np.testing.assert_allclose(it.responses, expected[0][2:], equal_nan=True)
    v4 = load_brainio(tmp_path / "a.nc", region="V4")
    assert v4.neuron_ids.tolist() == ["v4_a", "v4_b"]
    with pytest.raises(ValueError, match="unknown region"):
        load_brainio(tmp_path / "a.nc", region="V1")


def test_brainio_repetition_order_not_presentation_order(tmp_path):
    """Repeats land on the repeat axis by their repetition value, whatever the presentation order."""
    expected, _ = _write_brainio(tmp_path / "a.nc", seed=7)
    a = load_brainio(tmp_path / "a.nc")
    np.testing.assert_allclose(a.responses, expected[0], equal_nan=True)


def test_brainio_without_repetition_uses_order_of_appearance(tmp_path):
    import xarray as xr

    stim = ["b", "a", "b", "a", "b"]
    values = np.arange(10, dtype=float).reshape(5, 2)
    da = xr.DataArray(values, dims=("presentation", "neuroid"),
                      coords={"stimulus_id": ("presentation", stim), "neuroid_id": ("neuroid", ["n1", "n2"])})
    da.to_netcdf(tmp_path / "norep.nc")
    a = load_brainio(tmp_path / "norep.nc")
    assert a.image_ids.tolist() == ["b", "a"]
    assert a.regions.tolist() == ["unknown", "unknown"]
    expected = np.array([
        [[0, 4, 8], [2, 6, np.nan]],
        [[1, 5, 9], [3, 7, np.nan]],
    ])
    np.testing.assert_allclose(a.responses, expected, equal_nan=True)


def test_brainio_one_presentation_per_stimulus_is_2d(tmp_path):
    import xarray as xr

    da = xr.DataArray(np.array([[1.0], [2.0]]), dims=("presentation", "neuroid"),
                      coords={"image_id": ("presentation", ["y", "x"]), "region": ("neuroid", ["IT"])})
    da.to_netcdf(tmp_path / "flat.nc")
    a = load_brainio(tmp_path / "flat.nc")
    assert not a.has_repeats
    assert a.image_ids.tolist() == ["y", "x"]
    np.testing.assert_array_equal(a.responses, [[1.0, 2.0]])


def test_brainio_multi_time_bin(tmp_path):
    path = tmp_path / "bins.nc"
    expected, order = _write_brainio(path, n_bins=3, seed=5)
    with pytest.raises(ValueError, match=r"has 3 time bins; pass time_bin="):
        load_brainio(path)
    with pytest.raises(ValueError, match=r"has 3 time bins.*got 3"):
        load_brainio(path, time_bin=3)
    with pytest.raises(ValueError, match="time bins"):
        load_brainio(path, time_bin="last")
    b0 = load_brainio(path, time_bin=0)
    np.testing.assert_allclose(b0.responses, expected[0], equal_nan=True)
    b2 = load_brainio(path, time_bin=2)
    np.testing.assert_allclose(b2.responses, expected[2], equal_nan=True)
    mean = load_brainio(path, time_bin="mean")
    assert mean.image_ids.tolist() == order
    np.testing.assert_allclose(mean.responses, expected.mean(axis=0), equal_nan=True)
    assert mean.image_metadata["object_name"].tolist() == [OBJECT[s] for s in order]


def test_brainio_missing_stimulus_id(tmp_path):
    _write_brainio(tmp_path / "noid.nc", drop=("stimulus_id",))
    with pytest.raises(ValueError, match=r"no stimulus_id \(or image_id\) coord on presentation"):
        load_brainio(tmp_path / "noid.nc")


def test_brainio_other_errors(tmp_path):
    import xarray as xr

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_brainio(tmp_path / "nope.nc")
    xr.DataArray(np.zeros((2, 3)), dims=("image", "cell")).to_netcdf(tmp_path / "dims.nc")
    with pytest.raises(ValueError, match="expected dims presentation x neuroid"):
        load_brainio(tmp_path / "dims.nc")


def test_empty_selection_and_numpy_time_bin_are_handled(tmp_path):
    import xarray as xr

    assembly = NeuralAssembly(np.ones((2, 3)), ["a", "b"], ["V4", "IT"], ["i0", "i1", "i2"])
    with pytest.raises(ValueError, match="no neuron matches"):
        assembly.select(region="V4", neurons=["b"])
    with pytest.raises(ValueError, match="at least one neuron and one image"):
        NeuralAssembly(np.ones((0, 3)), [], [], ["i0", "i1", "i2"])
    da = xr.DataArray(
        np.arange(12.0).reshape(3, 2, 2), dims=("presentation", "neuroid", "time_bin"),
        coords={"stimulus_id": ("presentation", ["s0", "s1", "s2"]), "neuroid_id": ("neuroid", ["n0", "n1"]),
                "region": ("neuroid", ["IT", "IT"])},
    )
    path = tmp_path / "two_bins.nc"
    da.to_netcdf(path)
    loaded = load_brainio(path, time_bin=np.int64(1))
    np.testing.assert_array_equal(loaded.responses, da.isel(time_bin=1).values.T)


def test_brainio_repeat_axis_is_indexed_by_repetition_value_as_brainscore_halves_it(tmp_path):
    """Non-contiguous repetition values, some missing per stimulus: axis position k holds the k-th
    smallest value for every stimulus, so split-half reliability draws Brain-Score's halves of values
    (InternalConsistency: ShuffleSplit(0.5, random_state=1) over np.unique(repetition), each half
    averaged per stimulus, Pearson r per neuroid, Spearman-Brown), checked against that procedure
    run on the presentations themselves."""
    import scipy.stats
    import xarray as xr
    from sklearn.model_selection import ShuffleSplit

    from unitmatch.core.reliability import split_half_reliability

    rng = np.random.default_rng(11)
    levels = np.array([0, 3, 4, 9, 12, 20])
    n_stim, n_neuroid = 40, 3
    signal = rng.normal(size=(n_stim, n_neuroid))
    rows, values = [], []
    for i in range(n_stim):
        have = levels if i % 3 else np.sort(rng.choice(levels, 4, replace=False))  # a third lack two values
        for rep in have:
            rows.append((f"s{i:02d}", int(rep)))
            values.append(signal[i] + rng.normal(scale=1.0, size=n_neuroid))
    order = rng.permutation(len(rows))
    rows, values = [rows[k] for k in order], np.array(values)[order]
    da = xr.DataArray(values, dims=("presentation", "neuroid"), coords={
        "stimulus_id": ("presentation", [s for s, _ in rows]),
        "repetition": ("presentation", [r for _, r in rows]),
        "neuroid_id": ("neuroid", [f"n{j}" for j in range(n_neuroid)]),
    })
    da.to_netcdf(tmp_path / "gaps.nc")
    a = load_brainio(tmp_path / "gaps.nc")
    assert a.responses.shape == (n_neuroid, n_stim, len(levels))
    pos = {s: k for k, s in enumerate(a.image_ids)}
    for p, (s, rep) in enumerate(rows):
        np.testing.assert_array_equal(a.responses[:, pos[s], int(np.searchsorted(levels, rep))], values[p])

    expected = []
    stim, rep = np.array([s for s, _ in rows]), np.array([r for _, r in rows])
    for h1, h2 in ShuffleSplit(n_splits=10, train_size=0.5, random_state=1).split(np.zeros(len(levels))):
        halves = [pd.DataFrame(values[np.isin(rep, levels[h])], index=stim[np.isin(rep, levels[h])])
                  .groupby(level=0).mean() for h in (h1, h2)]
        first, second = halves[0].align(halves[1], join="inner", axis=0)  # stimuli present in both halves
        r = np.array([scipy.stats.pearsonr(first[j], second[j])[0] for j in range(n_neuroid)])
        expected.append(2 * r / (1 + r))
    np.testing.assert_allclose(split_half_reliability(a.responses, per_split=True), expected, atol=1e-12)


def test_brainio_same_repetition_twice_is_an_error(tmp_path):
    import xarray as xr

    da = xr.DataArray(np.arange(6.0).reshape(3, 2), dims=("presentation", "neuroid"), coords={
        "stimulus_id": ("presentation", ["a", "a", "b"]), "repetition": ("presentation", [1, 1, 0])})
    da.to_netcdf(tmp_path / "twice.nc")
    with pytest.raises(ValueError, match=r"stimulus 'a' has repetition 1 more than once"):
        load_brainio(tmp_path / "twice.nc")
