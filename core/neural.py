"""Neural assemblies: responses of M neurons to N images, optionally with repeats, and their loaders.

Two on-disk layouts are read:
- the plain layout: a responses ``.npy`` (neurons x images, or neurons x images x repeats with NaN
  where a repeat was not recorded), images in a folder or zip, an optional metadata CSV;
- Brain-Score / BrainIO netCDF assemblies: dims presentation x neuroid (x time_bin), coords
  stimulus_id, object_name, category_name, repetition, region.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .stimuli import StimulusSet


@dataclass(frozen=True, eq=False)
class NeuralAssembly:
    """Responses of neurons (or multi-unit sites) to images.

    Attributes:
        responses: float64, (M, N) or (M, N, R); NaN where a repeat was not recorded.
        neuron_ids: (M,) unique strings.
        regions: (M,) brain region per neuron (V4, IT, ...).
        image_ids: (N,) unique strings; the order of the image axis.
        image_metadata: optional per-image table indexed by image id (object_name, category_name...),
            as found in the source file.
    """

    responses: np.ndarray
    neuron_ids: np.ndarray
    regions: np.ndarray
    image_ids: np.ndarray
    image_metadata: pd.DataFrame | None = None

    def __post_init__(self):
        r = np.asarray(self.responses, dtype=np.float64)
        object.__setattr__(self, "responses", r)
        if r.ndim not in (2, 3):
            raise ValueError(
                f"responses must be neurons x images or neurons x images x repeats; got shape {r.shape}"
            )
        m, n = r.shape[:2]
        if m == 0 or n == 0:
            raise ValueError(f"an assembly needs at least one neuron and one image; got responses of shape {r.shape}")
        for name, n_expected, what in (("neuron_ids", m, "neurons"), ("regions", m, "neurons"),
                                       ("image_ids", n, "images")):
            values = np.asarray(getattr(self, name), dtype=object).astype(str)  # also from numpy StringDType
            object.__setattr__(self, name, values)
            if values.shape != (n_expected,):
                raise ValueError(
                    f"{name} has shape {values.shape} but responses {r.shape} have {n_expected} {what}"
                )
        for name in ("neuron_ids", "image_ids"):
            values = pd.Index(getattr(self, name))
            dup = values[values.duplicated()].unique().tolist()
            if dup:
                raise ValueError(f"duplicate {name}: {dup[:10]}")
        if np.isinf(r).any():
            raise ValueError("responses contain inf; only NaN (missing repeat) is allowed")
        empty = np.isnan(r.reshape(m, -1)).all(axis=1)
        if empty.any():
            raise ValueError(f"all-NaN neurons (no recorded response at all): {self.neuron_ids[empty][:10].tolist()}")

    @property
    def n_neurons(self) -> int:
        return self.responses.shape[0]

    @property
    def n_images(self) -> int:
        return self.responses.shape[1]

    @property
    def has_repeats(self) -> bool:
        return self.responses.ndim == 3

    def mean_responses(self) -> np.ndarray:
        """(M, N) responses averaged over recorded repeats (NaN where an image has none)."""
        if not self.has_repeats:
            return self.responses
        counts = np.sum(~np.isnan(self.responses), axis=2)
        sums = np.nansum(self.responses, axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    def select(self, *, region: str | Sequence[str] | None = None, neurons: Sequence[str] | None = None):
        """A sub-assembly by region and/or neuron ids."""
        keep = np.ones(self.n_neurons, bool)
        if region is not None:
            regions = [region] if isinstance(region, str) else list(region)
            have = set(self.regions.tolist())  # plain str, so messages do not read np.str_('V4')
            unknown = sorted(set(regions) - have)
            if unknown:
                raise ValueError(f"unknown region(s) {unknown}; the assembly has {sorted(have)}")
            keep &= np.isin(self.regions, regions)
        if neurons is not None:
            unknown = sorted(set(neurons) - set(self.neuron_ids.tolist()))
            if unknown:
                raise ValueError(f"unknown neuron ids {unknown[:10]}")
            keep &= np.isin(self.neuron_ids, list(neurons))
        if not keep.any():
            raise ValueError(f"no neuron matches region={region!r}, neurons={neurons!r}")
        return NeuralAssembly(self.responses[keep], self.neuron_ids[keep], self.regions[keep],
                              self.image_ids, self.image_metadata)

    def align(self, stimuli: StimulusSet) -> "NeuralAssembly":
        """Reorder the image axis to the stimulus set's order.

        Raises:
            ValueError: the two sets of image ids differ (the message lists examples both ways).
        """
        ours, theirs = set(self.image_ids.tolist()), set(stimuli.image_ids)
        if ours != theirs:
            only_ours = sorted(ours - theirs)[:5]
            only_theirs = sorted(theirs - ours)[:5]
            raise ValueError(
                f"assembly and stimulus set disagree on image ids: {len(ours - theirs)} only in the "
                f"assembly (e.g. {only_ours}), {len(theirs - ours)} only in the stimulus set "
                f"(e.g. {only_theirs}); use StimulusSet.subset(assembly.image_ids) to restrict the stimuli"
            )
        pos = {i: k for k, i in enumerate(self.image_ids)}
        order = np.array([pos[i] for i in stimuli.image_ids])
        meta = None if self.image_metadata is None else self.image_metadata.loc[list(stimuli.image_ids)]
        return NeuralAssembly(self.responses[:, order], self.neuron_ids, self.regions,
                              self.image_ids[order], meta)


def load_plain(
    responses: str | Path,
    images: str | Path,
    metadata: str | Path | None = None,
    *,
    region: str | Sequence[str] = "unknown",
    neuron_ids: Sequence[str] | None = None,
) -> tuple[NeuralAssembly, StimulusSet]:
    """Load the plain layout: responses .npy + image folder or zip + optional metadata CSV.

    The image axis of the responses follows the stimulus set's order (natural sort of file names
    without a CSV, the CSV's row order with one).

    Args:
        responses: .npy of shape (neurons, images) or (neurons, images, repeats), NaN = missing.
        images: folder or .zip of images.
        metadata: optional CSV with an image_id (or stimulus_id) column and any metadata columns.
        region: one region for all neurons, or one per neuron.
        neuron_ids: optional ids (default n000, n001, ...).

    Raises:
        ValueError: the responses' image axis does not match the number of images.
    """
    path = Path(responses)
    if not path.exists():
        raise FileNotFoundError(f"responses file {str(path)!r} does not exist")
    data = np.load(path)
    stimuli = StimulusSet.from_files(images, metadata)
    if data.ndim not in (2, 3):
        raise ValueError(f"{path.name}: expected neurons x images [x repeats]; got shape {data.shape}")
    if data.shape[1] != len(stimuli):
        raise ValueError(
            f"{path.name} has {data.shape[1]} images on axis 1 but {images} holds {len(stimuli)} images"
        )
    m = data.shape[0]
    ids = [f"n{i:03d}" for i in range(m)] if neuron_ids is None else list(neuron_ids)
    regions = np.full(m, region) if isinstance(region, str) else np.asarray(region)
    assembly = NeuralAssembly(data, ids, regions, stimuli.image_ids, stimuli.metadata)
    return assembly, stimuli


def load_brainio(
    path: str | Path,
    *,
    time_bin: int | str | None = None,
    region: str | None = None,
) -> NeuralAssembly:
    """Load a Brain-Score / BrainIO netCDF neural assembly.

    Presentations are grouped by stimulus_id; repeats become the third axis, NaN where a stimulus
    lacks one. With a ``repetition`` coord, position k of that axis holds the k-th smallest
    repetition value present in the assembly, for every stimulus: the axis is indexed by value, as
    Brain-Score's ``InternalConsistency`` splits halves (``np.unique`` of the repetition values,
    then ``ShuffleSplit``), so :func:`core.split_half_reliability` draws the same halves of values
    even when the values are not contiguous or some stimuli lack some of them. Without the coord,
    repeats are numbered by order of appearance.

    Args:
        path: the .nc file.
        time_bin: which time bin when the assembly has several: an index, or ``"mean"`` to average.
        region: keep only neurons of this region.

    Raises:
        ValueError: missing dims/coords, several time bins without ``time_bin``, a stimulus with the
            same repetition value twice.
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"assembly file {str(path)!r} does not exist")
    da = xr.open_dataarray(path).load()
    for dim in ("presentation", "neuroid"):
        if dim not in da.dims:
            raise ValueError(f"{path.name}: expected dims presentation x neuroid [x time_bin]; got {da.dims}")
    if "time_bin" in da.dims:
        n_bins = da.sizes["time_bin"]
        if time_bin == "mean":
            da = da.mean("time_bin")
        elif time_bin is None and n_bins == 1:
            da = da.isel(time_bin=0)
        elif isinstance(time_bin, numbers.Integral) and 0 <= time_bin < n_bins:
            da = da.isel(time_bin=time_bin)
        else:
            raise ValueError(
                f"{path.name} has {n_bins} time bins; pass time_bin= an index in [0, {n_bins}) or 'mean' "
                f"(got {time_bin!r})"
            )
    da = da.transpose("presentation", "neuroid")
    pres = {name: coord.values for name, coord in da.coords.items() if coord.dims == ("presentation",)}
    neur = {name: coord.values for name, coord in da.coords.items() if coord.dims == ("neuroid",)}
    id_coord = next((c for c in ("stimulus_id", "image_id") if c in pres), None)
    if id_coord is None:
        raise ValueError(f"{path.name}: no stimulus_id (or image_id) coord on presentation; has {sorted(pres)}")
    stim = pd.Series(pres[id_coord]).astype(str)
    image_ids = stim.drop_duplicates().to_numpy()
    image_pos = pd.Series(np.arange(len(image_ids)), index=image_ids)[stim].to_numpy()
    if "repetition" in pres:
        rep_values = np.asarray(pres["repetition"])
        rep_pos = np.searchsorted(np.unique(rep_values), rep_values)
        twice = pd.DataFrame({"stimulus": stim.to_numpy(), "repetition": rep_pos}).duplicated()
        if twice.any():
            k = int(np.flatnonzero(twice.to_numpy())[0])
            raise ValueError(
                f"{path.name}: stimulus {stim.iloc[k]!r} has repetition {rep_values[k].item()!r} more than once; each "
                f"(stimulus_id, repetition) pair must be one presentation"
            )
    else:
        rep_pos = stim.groupby(stim.to_numpy()).cumcount().to_numpy()
    n_rep = int(rep_pos.max()) + 1
    values = np.asarray(da.values, dtype=np.float64)  # (presentation, neuroid)
    out = np.full((values.shape[1], len(image_ids), n_rep), np.nan)
    out[:, image_pos, rep_pos] = values.T
    if n_rep == 1:
        out = out[:, :, 0]

    neuroid_ids = neur.get("neuroid_id", np.array([f"n{i:04d}" for i in range(values.shape[1])]))
    regions = neur.get("region", np.full(values.shape[1], "unknown"))
    first = ~stim.duplicated().to_numpy()
    meta_cols = {k: v[first] for k, v in pres.items() if k not in (id_coord, "repetition", "presentation")}
    meta = pd.DataFrame(meta_cols, index=pd.Index(image_ids, name="image_id"))
    assembly = NeuralAssembly(out, neuroid_ids, regions, image_ids, meta)
    return assembly.select(region=region) if region is not None else assembly
