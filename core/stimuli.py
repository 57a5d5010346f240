"""Stimulus sets: ordered image ids, where each image lives, its metadata, and a content hash.

The content hash covers every image's bytes and id in order, so an activation store keyed by it can
never be reused for a different image set (Brain-Score's pickle cache forgot the image size once;
users got stale activations).
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


@dataclass(frozen=True, eq=False)
class StimulusSet:
    """N images in a fixed order.

    Attributes:
        image_ids: unique string id per image; the order is the order of every image axis downstream.
        metadata: one row per image, indexed by image id (category, object, variation, ... whatever
            the source had).
        source: where pixels come from: a folder (``Path``), a zip archive (``Path`` ending .zip), or
            an in-memory uint8 array of shape (N, H, W, 3).
        members: per image, its file name relative to the folder or its member name in the zip
            (None for in-memory images).
    """

    image_ids: tuple[str, ...]
    metadata: pd.DataFrame
    source: Path | np.ndarray
    members: tuple[str, ...] | None = None
    _hash: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        ids = list(self.image_ids)
        if not ids:
            raise ValueError("a stimulus set needs at least one image; got none")
        dup = pd.Index(ids)[pd.Index(ids).duplicated()].unique().tolist()
        if dup:
            raise ValueError(f"duplicate image ids in stimulus set: {dup[:10]}")
        if list(self.metadata.index) != ids:
            raise ValueError("metadata must be indexed by image_ids in the same order")
        if isinstance(self.source, np.ndarray):
            if self.source.ndim != 4 or self.source.shape[-1] != 3 or self.source.dtype != np.uint8:
                raise ValueError(
                    f"in-memory images must be uint8 of shape (N, H, W, 3); got {self.source.dtype} "
                    f"{self.source.shape}"
                )
            if len(self.source) != len(ids):
                raise ValueError(f"{len(self.source)} images for {len(ids)} image ids")
        elif self.members is None or len(self.members) != len(ids):
            raise ValueError("file-backed stimulus sets need one member name per image id")

    def __len__(self) -> int:
        return len(self.image_ids)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_files(
        cls,
        source: str | Path,
        metadata: str | Path | pd.DataFrame | None = None,
        *,
        id_column: str | None = None,
        file_column: str | None = None,
    ) -> "StimulusSet":
        """Images in a folder or a zip archive, with an optional metadata CSV.

        Without metadata the images are ordered by natural sort of their names and each id is the
        file stem. With metadata, its row order is the image order; ``id_column`` (default: the
        first of image_id, stimulus_id present) names the ids and ``file_column`` (default:
        filename if present, else the id itself, with or without an image suffix) the files.

        Raises:
            FileNotFoundError: the source or a listed image does not exist.
            ValueError: metadata without an id column, duplicate ids, no images found.
        """
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"stimulus source {str(source)!r} does not exist (a folder or a .zip)")
        available = _list_images(source)
        if metadata is None:
            names = sorted(available, key=_natural_key)
            if not names:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {str(source)!r}")
            ids = [Path(n).stem for n in names]
            table = pd.DataFrame(index=pd.Index(ids, name="image_id"))
            return cls(tuple(ids), table, source, tuple(names))

        if isinstance(metadata, pd.DataFrame):
            table = metadata.copy()
        else:  # ids and file names stay strings: '0001' must not become 1
            as_str = {c: str for c in ("image_id", "stimulus_id", "filename", id_column, file_column) if c}
            table = pd.read_csv(metadata, dtype=as_str)
        id_column = id_column or next((c for c in ("image_id", "stimulus_id") if c in table.columns), None)
        if id_column is None or id_column not in table.columns:
            raise ValueError(
                f"metadata needs an image id column (image_id or stimulus_id, or pass id_column=); "
                f"columns are {list(table.columns)}"
            )
        ids = table[id_column].astype(str).tolist()
        if file_column is None and "filename" in table.columns:
            file_column = "filename"
        if file_column is not None:
            if file_column not in table.columns:
                raise ValueError(f"file_column {file_column!r} not in metadata columns {list(table.columns)}")
            names = table[file_column].astype(str).tolist()
        else:
            by_stem = {Path(n).stem: n for n in available}
            names = [i if i in available else by_stem.get(i, i) for i in ids]
        missing = [n for n in names if n not in available]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images listed in the metadata are not in {str(source)!r}, e.g. {missing[:5]}"
            )
        table = table.drop(columns=[id_column]).set_index(pd.Index(ids, name="image_id"))
        return cls(tuple(ids), table, source, tuple(names))

    @classmethod
    def from_array(
        cls, images: np.ndarray, image_ids: Sequence[str] | None = None, metadata: pd.DataFrame | None = None
    ) -> "StimulusSet":
        """In-memory images (uint8, N x H x W x 3), e.g. generated stimuli for demos and tests."""
        images = np.ascontiguousarray(images)
        ids = [f"img{i:05d}" for i in range(len(images))] if image_ids is None else [str(i) for i in image_ids]
        table = pd.DataFrame(index=pd.Index(ids, name="image_id"))
        if metadata is not None:
            if len(metadata) != len(ids):
                raise ValueError(f"metadata has {len(metadata)} rows for {len(ids)} images")
            table = metadata.reset_index(drop=True).set_index(table.index)
        return cls(tuple(ids), table, images, None)

    # ---------------------------------------------------------------- access
    def image_bytes(self, i: int) -> bytes:
        """The encoded bytes of image ``i`` (file-backed sets only)."""
        if isinstance(self.source, np.ndarray):
            raise TypeError("in-memory stimulus sets have no encoded bytes; use load_image()")
        if self.source.suffix.lower() == ".zip":
            with zipfile.ZipFile(self.source) as zf:
                return zf.read(self.members[i])
        return (self.source / self.members[i]).read_bytes()

    def load_image(self, i: int):
        """Image ``i`` as an RGB ``PIL.Image`` (decoded with Pillow).

        Raises:
            ValueError: the file cannot be decoded; the message names the image.
        """
        from PIL import Image, UnidentifiedImageError

        if isinstance(self.source, np.ndarray):
            return Image.fromarray(self.source[i])
        try:
            with Image.open(io.BytesIO(self.image_bytes(i))) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(
                f"image {self.image_ids[i]!r} ({self.members[i]} in {self.source}) cannot be decoded: {err}"
            ) from err

    @property
    def content_hash(self) -> str:
        """sha256 over (id, image bytes) of every image in order; computed once."""
        if not self._hash:
            h = hashlib.sha256()
            if isinstance(self.source, np.ndarray):
                h.update(repr(self.source.shape).encode())
                for image_id, image in zip(self.image_ids, self.source):
                    h.update(image_id.encode() + b"\0")
                    h.update(image.tobytes())
            elif self.source.suffix.lower() == ".zip":
                with zipfile.ZipFile(self.source) as zf:
                    for image_id, member in zip(self.image_ids, self.members):
                        h.update(image_id.encode() + b"\0")
                        h.update(hashlib.sha256(zf.read(member)).digest())
            else:
                for image_id, member in zip(self.image_ids, self.members):
                    h.update(image_id.encode() + b"\0")
                    h.update(hashlib.sha256((self.source / member).read_bytes()).digest())
            self._hash.append(h.hexdigest())
        return self._hash[0]

    def subset(self, image_ids: Sequence[str]) -> "StimulusSet":
        """The images with these ids, in the order given."""
        pos = {i: k for k, i in enumerate(self.image_ids)}
        missing = [i for i in image_ids if i not in pos]
        if missing:
            raise KeyError(f"{len(missing)} image ids not in the stimulus set, e.g. {list(missing)[:5]}")
        idx = [pos[i] for i in image_ids]
        table = self.metadata.iloc[idx]
        if isinstance(self.source, np.ndarray):
            return StimulusSet(tuple(image_ids), table, self.source[idx], None)
        return StimulusSet(tuple(image_ids), table, self.source, tuple(self.members[k] for k in idx))


def _list_images(source: Path) -> set[str]:
    if source.is_dir():
        return {
            str(p.relative_to(source))
            for p in source.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        }
    if source.suffix.lower() == ".zip":
        with zipfile.ZipFile(source) as zf:
            return {n for n in zf.namelist() if Path(n).suffix.lower() in IMAGE_SUFFIXES}
    raise ValueError(f"stimulus source {str(source)!r} must be a folder or a .zip archive")
