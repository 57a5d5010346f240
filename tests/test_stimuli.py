"""core.stimuli.StimulusSet: loading from folders / zips / arrays, metadata, ordering, hashing, errors."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from unitmatch.core.stimuli import StimulusSet


# ------------------------------------------------------------------ helpers
def _pixels(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _write_folder(folder: Path, names_seeds: dict[str, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in names_seeds.items():
        fmt = "JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_encode(_pixels(seed), fmt))
    return folder


def _zip_folder(folder: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return zip_path


NAMES = {"img10.png": 10, "img2.png": 2, "img1.png": 1, "img3.jpg": 3}
NATURAL = ("img1", "img2", "img3", "img10")


@pytest.fixture
def folder(tmp_path) -> Path:
    return _write_folder(tmp_path / "images", NAMES)


@pytest.fixture
def zipped(tmp_path, folder) -> Path:
    return _zip_folder(folder, tmp_path / "images.zip")


# ------------------------------------------------------------------ from_files without metadata
def test_folder_natural_sort_order_without_metadata(folder):
    s = StimulusSet.from_files(folder)
    assert s.image_ids == NATURAL  # img2 before img10 (plain sort would give img1, img10, img2, img3)
    assert s.members == ("img1.png", "img2.png", "img3.jpg", "img10.png")
    assert len(s) == 4
    assert list(s.metadata.index) == list(NATURAL)
    assert s.metadata.index.name == "image_id"
    assert s.source == folder


def test_folder_accepts_str_path_and_ignores_non_images(folder):
    (folder / "notes.txt").write_text("not an image")
    (folder / "README").write_text("nope")
    s = StimulusSet.from_files(str(folder))
    assert s.image_ids == NATURAL


def test_zip_natural_sort_order_without_metadata(zipped):
    s = StimulusSet.from_files(zipped)
    assert s.image_ids == NATURAL
    assert s.members == ("img1.png", "img2.png", "img3.jpg", "img10.png")


def test_folder_with_subfolders(tmp_path):
    root = _write_folder(tmp_path / "nested", {"a/x1.png": 1, "b/x2.png": 2})
    s = StimulusSet.from_files(root)
    assert s.image_ids == ("x1", "x2")
    assert s.members == ("a/x1.png", "b/x2.png")
    np.testing.assert_array_equal(np.asarray(s.load_image(1)), _pixels(2))


def test_load_image_folder_and_zip_give_the_pixels(folder, zipped):
    for src in (folder, zipped):
        s = StimulusSet.from_files(src)
        im = s.load_image(s.image_ids.index("img10"))
        assert im.mode == "RGB"
        assert im.size == (8, 8)
        np.testing.assert_array_equal(np.asarray(im), _pixels(10))  # PNG is lossless
        jpg = np.asarray(s.load_image(s.image_ids.index("img3")))
        assert jpg.shape == (8, 8, 3)
        assert s.image_bytes(0) == (folder / "img1.png").read_bytes()


def test_load_image_grayscale_is_converted_to_rgb(tmp_path):
    d = tmp_path / "gray"
    d.mkdir()
    Image.fromarray(np.full((5, 6), 77, np.uint8), mode="L").save(d / "g.png")
    im = StimulusSet.from_files(d).load_image(0)
    assert im.mode == "RGB"
    assert np.asarray(im).shape == (5, 6, 3)
    assert (np.asarray(im) == 77).all()


# ------------------------------------------------------------------ from_files with metadata
def test_metadata_csv_defines_order_ids_and_columns(folder, tmp_path):
    csv = tmp_path / "meta.csv"
    pd.DataFrame({
        "image_id": ["img10", "img1", "img3", "img2"],
        "category_name": ["car", "dog", "dog", "car"],
        "object_name": ["car1", "dog1", "dog2", "car2"],
        "variation": [0, 3, 3, 6],
    }).to_csv(csv, index=False)
    s = StimulusSet.from_files(folder, csv)
    assert s.image_ids == ("img10", "img1", "img3", "img2")  # row order, not natural order
    assert s.members == ("img10.png", "img1.png", "img3.jpg", "img2.png")  # found by stem
    assert s.metadata.index.name == "image_id"
    assert list(s.metadata.index) == list(s.image_ids)
    assert "image_id" not in s.metadata.columns
    assert s.metadata.loc["img3", "category_name"] == "dog"
    assert s.metadata.loc["img2", "object_name"] == "car2"
    assert s.metadata.loc["img2", "variation"] == 6
    np.testing.assert_array_equal(np.asarray(s.load_image(0)), _pixels(10))


def test_metadata_with_filename_column(folder, tmp_path):
    csv = tmp_path / "meta.csv"
    pd.DataFrame({
        "image_id": ["a", "b", "c"],
        "filename": ["img2.png", "img10.png", "img3.jpg"],
        "category": ["x", "y", "x"],
    }).to_csv(csv, index=False)
    for src in (folder, _zip_folder(folder, tmp_path / "z.zip")):
        s = StimulusSet.from_files(src, csv)
        assert s.image_ids == ("a", "b", "c")
        assert s.members == ("img2.png", "img10.png", "img3.jpg")
        assert list(s.metadata["category"]) == ["x", "y", "x"]
        np.testing.assert_array_equal(np.asarray(s.load_image(1)), _pixels(10))


def test_metadata_ids_with_suffix_and_stimulus_id_column(folder, tmp_path):
    csv = tmp_path / "meta.csv"
    pd.DataFrame({"stimulus_id": ["img1.png", "img2"], "object": ["o1", "o2"]}).to_csv(csv, index=False)
    s = StimulusSet.from_files(folder, csv)
    assert s.image_ids == ("img1.png", "img2")
    assert s.members == ("img1.png", "img2.png")
    assert list(s.metadata["object"]) == ["o1", "o2"]


def test_metadata_dataframe_and_explicit_columns(folder):
    table = pd.DataFrame({"my_id": ["p", "q"], "file": ["img1.png", "img10.png"], "label": [1, 2]})
    s = StimulusSet.from_files(folder, table, id_column="my_id", file_column="file")
    assert s.image_ids == ("p", "q")
    assert s.members == ("img1.png", "img10.png")
    assert list(s.metadata["label"]) == [1, 2]
    assert "my_id" in table.columns  # the caller's table is not modified


def test_metadata_numeric_looking_ids_keep_leading_zeros(tmp_path):
    d = _write_folder(tmp_path / "num", {"0001.png": 1, "0002.png": 2, "0010.png": 3})
    csv = tmp_path / "meta.csv"
    csv.write_text("image_id,category\n0010,a\n0001,b\n0002,a\n")
    s = StimulusSet.from_files(d, csv)
    assert s.image_ids == ("0010", "0001", "0002")
    assert s.members == ("0010.png", "0001.png", "0002.png")


def test_metadata_subset_of_images_is_allowed(folder, tmp_path):
    csv = tmp_path / "meta.csv"
    pd.DataFrame({"image_id": ["img3"]}).to_csv(csv, index=False)
    s = StimulusSet.from_files(folder, csv)
    assert s.image_ids == ("img3",)


# ------------------------------------------------------------------ from_array
def test_from_array_defaults_and_pixels():
    images = np.stack([_pixels(i) for i in range(3)])
    s = StimulusSet.from_array(images)
    assert s.image_ids == ("img00000", "img00001", "img00002")
    assert s.members is None
    assert len(s) == 3
    np.testing.assert_array_equal(np.asarray(s.load_image(2)), images[2])
    with pytest.raises(TypeError, match="in-memory"):
        s.image_bytes(0)


def test_from_array_ids_and_metadata():
    images = np.stack([_pixels(i) for i in range(3)])
    meta = pd.DataFrame({"category_name": ["a", "b", "a"]}, index=[10, 11, 12])
    s = StimulusSet.from_array(images, image_ids=[5, 6, 7], metadata=meta)
    assert s.image_ids == ("5", "6", "7")
    assert list(s.metadata.index) == ["5", "6", "7"]
    assert list(s.metadata["category_name"]) == ["a", "b", "a"]
    with pytest.raises(ValueError, match="metadata has 2 rows for 3 images"):
        StimulusSet.from_array(images, metadata=meta.iloc[:2])


@pytest.mark.parametrize("bad", [
    np.zeros((2, 4, 4, 3), np.float32),  # wrong dtype
    np.zeros((2, 4, 4), np.uint8),       # no channel axis
    np.zeros((2, 4, 4, 4), np.uint8),    # RGBA
])
def test_from_array_rejects_bad_arrays(bad):
    with pytest.raises(ValueError, match=r"uint8 of shape \(N, H, W, 3\)"):
        StimulusSet.from_array(bad)


def test_from_array_id_count_mismatch():
    with pytest.raises(ValueError, match="2 images for 3 image ids"):
        StimulusSet.from_array(np.zeros((2, 4, 4, 3), np.uint8), image_ids=["a", "b", "c"])


def test_from_array_duplicate_ids():
    with pytest.raises(ValueError, match="duplicate image ids.*'a'"):
        StimulusSet.from_array(np.zeros((2, 4, 4, 3), np.uint8), image_ids=["a", "a"])


# ------------------------------------------------------------------ content hash
def test_hash_stable_across_loads(folder, zipped):
    h1 = StimulusSet.from_files(folder).content_hash
    h2 = StimulusSet.from_files(folder).content_hash
    assert h1 == h2
    assert len(h1) == 64 and int(h1, 16) >= 0
    assert StimulusSet.from_files(zipped).content_hash == StimulusSet.from_files(zipped).content_hash


def test_hash_same_for_folder_and_zip_with_same_bytes_and_ids(folder, zipped):
    assert StimulusSet.from_files(folder).content_hash == StimulusSet.from_files(zipped).content_hash


def test_hash_changes_when_one_image_changes(folder, tmp_path):
    before = StimulusSet.from_files(folder).content_hash
    (folder / "img2.png").write_bytes(_encode(_pixels(999)))
    after = StimulusSet.from_files(folder).content_hash
    assert after != before
    # folder vs zip: differing bytes -> different hashes
    other = _write_folder(tmp_path / "other", NAMES)
    zipped_original = _zip_folder(other, tmp_path / "original.zip")
    assert StimulusSet.from_files(zipped_original).content_hash == before
    assert StimulusSet.from_files(zipped_original).content_hash != after


def test_hash_changes_when_ids_change(folder, tmp_path):
    base = pd.DataFrame({"image_id": ["a", "b"], "filename": ["img1.png", "img2.png"]})
    renamed = base.assign(image_id=["a", "c"])
    swapped = pd.DataFrame({"image_id": ["b", "a"], "filename": ["img2.png", "img1.png"]})
    h_base = StimulusSet.from_files(folder, base).content_hash
    assert StimulusSet.from_files(folder, base.copy()).content_hash == h_base
    assert StimulusSet.from_files(folder, renamed).content_hash != h_base
    assert StimulusSet.from_files(folder, swapped).content_hash != h_base  # order matters too


def test_hash_of_arrays():
    images = np.stack([_pixels(i) for i in range(3)])
    h = StimulusSet.from_array(images).content_hash
    assert StimulusSet.from_array(images.copy()).content_hash == h
    changed = images.copy()
    changed[1, 0, 0, 0] ^= 1
    assert StimulusSet.from_array(changed).content_hash != h
    assert StimulusSet.from_array(images, image_ids=["x", "y", "z"]).content_hash != h


def test_hash_is_cached(folder):
    s = StimulusSet.from_files(folder)
    h = s.content_hash
    (folder / "img1.png").write_bytes(_encode(_pixels(12345)))
    assert s.content_hash == h  # computed once per object


# ------------------------------------------------------------------ subset
def test_subset_files(folder):
    s = StimulusSet.from_files(folder)
    sub = s.subset(["img10", "img1"])
    assert sub.image_ids == ("img10", "img1")
    assert sub.members == ("img10.png", "img1.png")
    assert list(sub.metadata.index) == ["img10", "img1"]
    assert sub.source == s.source
    np.testing.assert_array_equal(np.asarray(sub.load_image(0)), _pixels(10))
    assert sub.content_hash != s.content_hash
    with pytest.raises(KeyError, match="1 image ids not in the stimulus set.*nope"):
        s.subset(["img1", "nope"])


def test_subset_array_keeps_metadata():
    images = np.stack([_pixels(i) for i in range(4)])
    meta = pd.DataFrame({"c": ["w", "x", "y", "z"]})
    s = StimulusSet.from_array(images, image_ids=list("abcd"), metadata=meta)
    sub = s.subset(["d", "b"])
    assert sub.image_ids == ("d", "b")
    assert list(sub.metadata["c"]) == ["z", "x"]
    np.testing.assert_array_equal(sub.source, images[[3, 1]])
    assert sub.content_hash == StimulusSet.from_array(images[[3, 1]], image_ids=["d", "b"]).content_hash


# ------------------------------------------------------------------ corrupt images
@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_load_image_corrupt_names_the_image(folder, tmp_path, corruption):
    good = (folder / "img2.png").read_bytes()
    bad = b"this is not an image" if corruption == "garbage" else good[: len(good) // 2]
    (folder / "img2.png").write_bytes(bad)
    for src in (folder, _zip_folder(folder, tmp_path / f"{corruption}.zip")):
        s = StimulusSet.from_files(src)
        assert s.image_ids == NATURAL  # listing does not decode
        np.asarray(s.load_image(0))  # the good ones still load
        with pytest.raises(ValueError, match=r"image 'img2'.*cannot be decoded"):
            s.load_image(1)


# ------------------------------------------------------------------ errors
def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StimulusSet.from_files(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StimulusSet.from_files(tmp_path / "nowhere.zip")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .* found in"):
        StimulusSet.from_files(tmp_path / "empty")


def test_empty_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "e.zip", "w") as zf:
        zf.writestr("readme.txt", "nothing")
    with pytest.raises(ValueError, match="no images .* found in"):
        StimulusSet.from_files(tmp_path / "e.zip")


def test_source_that_is_neither_folder_nor_zip(tmp_path):
    f = tmp_path / "images.tar"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="must be a folder or a .zip"):
        StimulusSet.from_files(f)


def test_duplicate_ids_from_stems(tmp_path):
    d = _write_folder(tmp_path / "dup", {"a.png": 1, "a.jpg": 2, "b.png": 3})
    with pytest.raises(ValueError, match="duplicate image ids.*'a'"):
        StimulusSet.from_files(d)


def test_duplicate_ids_in_metadata(folder):
    table = pd.DataFrame({"image_id": ["x", "x"], "filename": ["img1.png", "img2.png"]})
    with pytest.raises(ValueError, match="duplicate image ids.*'x'"):
        StimulusSet.from_files(folder, table)


def test_metadata_lists_missing_file(folder, tmp_path):
    csv = tmp_path / "meta.csv"
    pd.DataFrame({"image_id": ["img1", "ghost", "img2"]}).to_csv(csv, index=False)
    with pytest.raises(FileNotFoundError, match=r"1 images listed in the metadata are not in .*ghost"):
        StimulusSet.from_files(folder, csv)


def test_metadata_filename_missing(folder):
    table = pd.DataFrame({"image_id": ["a"], "filename": ["ghost.png"]})
    with pytest.raises(FileNotFoundError, match="ghost.png"):
        StimulusSet.from_files(folder, table)


def test_metadata_without_id_column(folder, tmp_path):
    csv = tmp_path / "meta.csv"
    pd.DataFrame({"name": ["img1"], "category": ["a"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"metadata needs an image id column.*\['name', 'category'\]"):
        StimulusSet.from_files(folder, csv)
    with pytest.raises(ValueError, match="metadata needs an image id column"):
        StimulusSet.from_files(folder, csv, id_column="not_there")


def test_metadata_unknown_file_column(folder):
    table = pd.DataFrame({"image_id": ["img1"]})
    with pytest.raises(ValueError, match="file_column 'fname' not in metadata columns"):
        StimulusSet.from_files(folder, table, file_column="fname")


def test_direct_construction_checks(folder):
    with pytest.raises(ValueError, match="at least one image"):
        StimulusSet((), pd.DataFrame(index=pd.Index([], name="image_id")), folder, ())
    with pytest.raises(ValueError, match="metadata must be indexed by image_ids"):
        StimulusSet(("a", "b"), pd.DataFrame(index=["b", "a"]), folder, ("a.png", "b.png"))
    with pytest.raises(ValueError, match="one member name per image id"):
        StimulusSet(("a", "b"), pd.DataFrame(index=["a", "b"]), folder, ("a.png",))
