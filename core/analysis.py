"""The whole per-model analysis in one call, as tidy tables.

screening (bad neurons flagged) -> matching (with the permutation null in the same pass; all units,
or region-committed) -> noise ceilings -> per-neuron statistics -> strict one-to-one assignment ->
matched-population decoding -> per-region summary.

Bad neurons are flagged, not fatal (:func:`screen_neurons`). What each flag leaves undefined:

- ``missing_images``: no recorded response (every repeat NaN) for some images. The neuron is left
  out of the matching, the strict assignment and the decoding, and all its scores are NaN. Scoring
  it on its own subset of images is not done: a held-out r is compared across neurons split by
  split (Brain-Score's median over neurons per split) on the same test images, the permutation
  null permutes all images, and decoding reads every neuron on every test image. Images with some
  repeats missing are fine: the mean over the recorded repeats is used.
- ``constant_train``: the same (mean) response to every train image of some split: its r with any
  unit is undefined there. It is left out like ``missing_images`` (from every split, so that its
  split-averaged statistic and its null stay over the same splits as every other neuron's).
- ``no_ceiling``: the split-half reliability is undefined (NaN): fewer than 2 recorded repeats
  (a single repeat), or too few images with a response in both halves. The neuron is analysed;
  its ceiled score is NaN and it leaves the ceiled medians and Brain-Score's ceiling (both say how
  many neurons they use); its p-value is defined.

The analysed neurons' results are exactly those of an analysis of the assembly without the flagged
ones; the flagged neurons are listed (``flags``) and counted per region (``n_neurons_flagged``).

Region-committed search (``region_layers``, Brain-Score's convention, beside the memo's all-units
search): each region's neurons are matched only against the units of the layers mapped to it
(:func:`match_by_region`); unit ids stay those of all layers.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from .assignment import InfeasibleAssignment, assignment_drop, strict_assignment
from .decoding import matched_population_decoding_splits
from .engine import MatchResult, MatchSettings, combine_results, default_device, pearson_pairs, run_matching
from .layers import PRESETS, select_names
from .neural import NeuralAssembly
from .reliability import split_half_reliability
from .splits import validate_splits
from .stats import neuron_table, summarize
from .units import UnitCatalogue, as_layers, catalogue_of, gather_columns

log = logging.getLogger(__name__)

#: image metadata columns tried, in order, for the decoding labels
LABEL_COLUMNS = ("category_name", "category")
#: per-neuron flags, in the order ``flags`` lists them (see the module docstring)
FLAGS = ("missing_images", "constant_train", "no_ceiling")
#: the two searches: every unit of every layer (the memo's), or each region's mapped layers only
SEARCHES = ("all_units", "region_committed")
#: the decoding's random populations are read in gathers of at most this many bytes (float64 columns):
#: all 100 of the demo's (48 units x 400 images) in one, MajajHong-sized ones (256 x 2560) in two
GATHER_BYTES = 256 * 2**20
#: candidates drawn at once for each random-population unit that is constant on a train set
REDRAWS = 8


@dataclass
class Analysis:
    """Everything one model's analysis produces.

    Attributes:
        matches: per (neuron, split): the engine's columns plus region.
        layer_matches: per (neuron, split, layer): the layer's best unit (layer profiles).
        neurons: per neuron: see :func:`core.stats.neuron_table`, plus strict_unit / strict_test_r
            (mean over splits under the bijective assignment).
        assignment: per (neuron, split): free unit and test r, strict unit and test r, k_used.
        decoding: per (region, split): see :class:`core.decoding.DecodingResult`.
        summary: per region: see :func:`core.stats.summarize`, plus strict_median_test_r,
            strict_drop, and the decoding means over splits (transfer_accuracy, neuron_accuracy,
            unit_accuracy, chance, null_mean, percentile).
        result: the raw :class:`core.engine.MatchResult` (including the null arrays).
        seconds: wall seconds of the analysis' steps: ``matching`` (absent when a ``result`` was
            given), ``strict_assignment``, ``decoding`` and ``total``.
    """

    matches: pd.DataFrame
    layer_matches: pd.DataFrame
    neurons: pd.DataFrame
    assignment: pd.DataFrame
    decoding: pd.DataFrame
    summary: pd.DataFrame
    result: MatchResult
    seconds: dict = field(default_factory=dict, compare=False)


def analyze(activations, assembly: NeuralAssembly, splits, settings: MatchSettings | None = None, *,
            labels: Sequence | None = None, decode: bool = True, n_random_populations: int = 100,
            alpha: float = 0.05, dims=None, catalogue=None, max_top_k: int = 64, result: MatchResult | None = None,
            region_layers: Mapping[str, Sequence[str]] | None = None, flags: pd.DataFrame | None = None,
            **overrides) -> Analysis:
    """Run the full analysis of one model against one assembly.

    Args:
        activations: ``{layer: (images, *unit_shape)}`` (numpy, torch or 2-D Zarr), images in the
            assembly's order.
        assembly: the neurons (mean over repeats is matched; repeats give the ceiling). Bad neurons
            are flagged and left out where undefined (module docstring, :func:`screen_neurons`).
        splits: (train_idx, test_idx) pairs.
        settings: :class:`core.engine.MatchSettings`; keyword overrides of its fields
            (``n_permutations=100``) are applied on top. ``n_permutations`` > 0 gives p-values;
            ``top_k`` is the strict assignment's starting pool; ``seed`` also seeds the random
            decoding populations.
        labels: category per image for decoding (default: the assembly's image metadata column
            category_name or category).
        decode: run matched-population decoding.
        n_random_populations: random unit populations per (region, split) for the decoding null.
        alpha: FDR level.
        max_top_k: the strict assignment re-runs matching with a doubled top_k while infeasible, up
            to this.
        result: the matching already done elsewhere (e.g. a Dask reduction over a store, with its
            permutation null), of the analysed neurons (those :func:`screen_neurons` does not
            exclude) and with the same search. Its own settings are used; settings given here must
            agree with them.
        region_layers: region-committed search: ``{region: [layer entries]}``, entries as in layer
            selection (names, globs, ``"re:"`` regexes) over the activations' layers; each region's
            neurons are matched (and their strict assignment and random decoding populations drawn)
            among those layers' units only. None: every unit of every layer.
        flags: :func:`screen_neurons` of this assembly and splits, from a caller that screened them
            once for several analyses and reported the flagged neurons then (:func:`analysable`):
            they are not screened or logged again. None: screened here.

    Raises:
        ValueError: settings that disagree with ``result``'s, a ``result`` of other neurons or of
            another search, decoding without category labels (naming the metadata columns
            available), every neuron flagged, a bad ``region_layers`` (naming the region or layer
            and the valid ones), or any input error of the parts (each names the bad value).
    """
    start = time.perf_counter()
    seconds = {}
    layers = as_layers(activations)
    catalogue = catalogue or catalogue_of(layers, dims)
    columns = lambda units: gather_columns(layers, catalogue, units)  # noqa: E731
    if flags is None:
        flags = screen_neurons(assembly, splits)
        analysed = analysable(assembly, flags)
    else:
        flags = flags.copy()  # the caller's table is not changed (no_ceiling is added below)
        analysed = analysable(assembly, flags, report=False)
    committed = resolve_region_layers(region_layers, catalogue, analysed.regions)
    search = "all_units" if committed is None else "region_committed"
    y = analysed.mean_responses()
    if decode:
        labels = _labels(assembly, labels)

    def match(y_, splits_, settings_):
        def one(responses, ids, names):
            return run_matching(layers, responses, splits_, settings_, catalogue=catalogue, neuron_ids=ids,
                                layers=names)
        return match_by_region(one, y_, analysed.neuron_ids, analysed.regions, committed)

    if result is None:
        settings = MatchSettings.resolve(settings, **overrides)
        t0 = time.perf_counter()
        result = match(y, splits, settings)
        seconds["matching"] = time.perf_counter() - t0
    else:
        settings = _settings_of(result, settings, overrides)
        _check_result(result, analysed, committed)
    if settings.n_permutations == 0:
        log.info("no permutation null (n_permutations=0): no p-values or q-values")
    ceiling_all = _ceilings(assembly)
    flags["no_ceiling"] = False if ceiling_all is None else ~np.isfinite(ceiling_all[1])
    keep = flags.analyzed.to_numpy()
    ceiling_splits, ceiling = (None, None) if ceiling_all is None else (ceiling_all[0][:, keep], ceiling_all[1][keep])
    neurons = neuron_table(result, regions=analysed.regions, ceiling=ceiling, alpha=alpha)
    region_of = dict(zip(analysed.neuron_ids, analysed.regions))
    matches = result.matches.assign(region=result.matches.neuron.map(region_of))
    n_nan = int(matches.test_r.isna().sum())
    if n_nan:
        log.info("%d of %d (neuron, split) matches have an undefined held-out r (the selected unit is constant "
                 "on the test images); counted in n_nan_test_r", n_nan, len(matches))

    t0 = time.perf_counter()
    assignment = _strict(y, splits, result, columns, settings, analysed.neuron_ids, max_top_k, match)
    seconds["strict_assignment"] = time.perf_counter() - t0
    assignment["region"] = assignment.neuron.map(region_of)
    strict_mean = assignment.groupby("neuron", sort=False)[["strict_test_r"]].mean()
    neurons = neurons.merge(strict_mean, left_on="neuron", right_index=True, how="left")
    neurons["strict_unit"] = neurons.neuron.map(
        assignment.groupby("neuron").strict_unit.agg(lambda s: s.mode().iloc[0]))

    t0 = time.perf_counter()
    decoding = _decode(y, labels, splits, matches, analysed, catalogue, columns, n_random_populations,
                       settings.seed, settings.device, committed) if decode else pd.DataFrame()
    seconds["decoding"] = time.perf_counter() - t0
    summary = summarize(result, neurons, ceiling_splits)
    extra = []
    for region, part in assignment.groupby("region"):
        drops = [assignment_drop(p.unit, p.free_test_r, p.strict_unit, p.strict_test_r)
                 for _, p in part.groupby("split")]
        extra.append({"region": region,
                      "strict_median_test_r": np.mean([d["strict_median"] for d in drops]),
                      "strict_drop": np.mean([d["drop"] for d in drops]),
                      "strict_n_reassigned": np.mean([d["n_reassigned"] for d in drops])})
    summary = summary.merge(pd.DataFrame(extra), on="region", how="left")
    if len(decoding):
        means = decoding.groupby("region")[["transfer_accuracy", "unit_accuracy", "neuron_accuracy", "chance",
                                            "null_mean", "percentile"]].mean()
        summary = summary.merge(means, left_on="region", right_index=True, how="left")
    neurons, summary = _with_flagged(neurons, summary, flags, ceiling_all)
    searched = {r: ",".join(names) for r, names in (committed or {}).items()}
    summary = summary.assign(search=search, searched_layers=[searched.get(r, "all") for r in summary.region])
    tables = [t.assign(search=search) for t in (matches, result.layer_matches, neurons, assignment, decoding)]
    seconds["total"] = time.perf_counter() - start
    log.info("analysis in %.1f s: %s", seconds["total"],
             ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in seconds.items() if k != "total"))
    return Analysis(*tables, summary, result, seconds)


def screen_neurons(assembly: NeuralAssembly, splits) -> pd.DataFrame:
    """The neurons that cannot be matched, flagged (module docstring): one row per neuron, in order.

    Columns: neuron, region, n_missing_images (images without any recorded response),
    missing_images (> 0 of them), n_constant_train_splits (splits on whose train images the mean
    response is constant), constant_train (> 0 of them), analyzed (neither: the neuron is matched).
    :func:`analyze` adds no_ceiling and flags.
    """
    y = assembly.mean_responses()
    splits = validate_splits(splits, assembly.n_images)
    missing = np.isnan(y).sum(axis=1)
    constant = np.zeros(assembly.n_neurons, np.int64)
    with warnings.catch_warnings():  # all-NaN train rows (a neuron missing them all) are flagged anyway
        warnings.simplefilter("ignore", RuntimeWarning)
        for train, _ in splits:
            constant += (np.nanmax(y[:, train], axis=1) - np.nanmin(y[:, train], axis=1)) == 0
    return pd.DataFrame({
        "neuron": assembly.neuron_ids, "region": assembly.regions,
        "n_missing_images": missing, "missing_images": missing > 0,
        "n_constant_train_splits": constant, "constant_train": constant > 0,
        "analyzed": (missing == 0) & (constant == 0),
    })


def analysable(assembly: NeuralAssembly, flags: pd.DataFrame | None = None, splits=None, *,
               report: bool = True) -> NeuralAssembly:
    """The assembly without the neurons :func:`screen_neurons` excludes from matching (logged by id).

    Args:
        flags: its :func:`screen_neurons` table (None: screened here, with ``splits``).
        report: log the excluded neurons (False where a caller that screened once has reported them).

    Raises:
        ValueError: every neuron is excluded (the message says why for the first ones), or ``flags``
            of other neurons than the assembly's.
    """
    if flags is None:
        flags = screen_neurons(assembly, splits)
    elif flags.neuron.astype(str).tolist() != np.asarray(assembly.neuron_ids).astype(str).tolist():
        raise ValueError(f"flags screen other neurons than the assembly's: {len(flags)} rows (first "
                         f"{flags.neuron.astype(str).tolist()[:3]}) for its {assembly.n_neurons} neurons (first "
                         f"{np.asarray(assembly.neuron_ids).astype(str).tolist()[:3]}); pass screen_neurons(assembly, "
                         f"splits) of this assembly, in its order")
    if flags.analyzed.all():
        return assembly
    bad = flags[~flags.analyzed]
    why = [f"{row.neuron} ({_flag_text(row)})" for row in bad.itertuples()]
    if not flags.analyzed.any():
        raise ValueError(f"no neuron can be matched: all {len(flags)} are flagged, e.g. {why[:5]} (missing_images: "
                         f"no recorded response to some images; constant_train: the same response to every train "
                         f"image of a split)")
    if report:
        log.warning("%d of %d neurons are flagged and left out of the matching: %s%s", len(bad), len(flags),
                    ", ".join(why[:20]), " ..." if len(why) > 20 else "")
    return assembly.select(neurons=flags.neuron[flags.analyzed].tolist())


def resolve_region_layers(region_layers: Mapping[str, Sequence[str]] | None, catalogue: UnitCatalogue | Sequence[str],
                          regions, key: str = "region_layers") -> dict[str, list[str]] | None:
    """``{region: [layer entries]}`` -> ``{region: [layer names]}`` in layer order; None stays None.

    Entries are layer names, globs or ``"re:"`` regexes, as in layer selection (:mod:`core.layers`),
    matched against the layers of the activations (presets need a model and are refused).

    Raises:
        ValueError: not a mapping, a region the neurons do not have or a region of the neurons
            without an entry, an empty entry list, or an entry that matches no layer (each naming
            the region or entry, and the valid regions or layers).
    """
    if region_layers is None:
        return None
    names = [layer.name for layer in catalogue.layers] if isinstance(catalogue, UnitCatalogue) else list(catalogue)
    have = sorted(set(np.asarray(regions).astype(str).tolist()))
    if not isinstance(region_layers, Mapping):
        raise ValueError(f"{key} must map each region to a list of layers, e.g. {{'V4': ['layer3.*']}}; got "
                         f"{region_layers!r}")
    unknown = sorted(set(map(str, region_layers)) - set(have))
    if unknown:
        raise ValueError(f"{key}: unknown region(s) {unknown}; the neurons' regions are {have}")
    unmapped = sorted(set(have) - set(map(str, region_layers)))
    if unmapped:
        raise ValueError(f"{key} has no layers for region(s) {unmapped}: a region-committed search needs an entry "
                         f"for every region of the neurons ({have}); the layers are {names}")
    out = {}
    for region, entries in region_layers.items():
        if isinstance(entries, str) or not isinstance(entries, Sequence) or not len(entries):
            raise ValueError(f"{key}[{region!r}] must be a non-empty list of layer names, globs or 're:' regexes; "
                             f"got {entries!r}; the layers are {names}")
        chosen = set()
        for entry in entries:
            if not isinstance(entry, str) or entry in PRESETS:
                raise ValueError(f"{key}[{region!r}]: {entry!r} is not a layer name, glob or 're:' regex (presets "
                                 f"need a model); the layers are {names}")
            try:
                chosen.update(select_names(names, entry, "the activations", what="layer"))
            except ValueError as err:
                raise ValueError(f"{key}[{region!r}]: {err}; the layers are {names}") from None
        out[str(region)] = [n for n in names if n in chosen]
    return out


def match_by_region(match: Callable, responses: np.ndarray, neuron_ids, regions,
                    region_layers: dict[str, list[str]] | None) -> MatchResult:
    """The region-committed search: ``match(responses, neuron_ids, layers)`` per region, combined.

    Each region's neurons are matched, as a group of their own (their own permutation null), among
    the units of that region's layers; the result is exactly the all-units search run on that
    region's neurons with the activations restricted to those layers, with unit ids of all layers.
    ``region_layers`` None: one all-units search, ``match(responses, neuron_ids, None)``.
    """
    neuron_ids, regions = np.asarray(neuron_ids), np.asarray(regions).astype(str)
    if region_layers is None:
        return match(responses, neuron_ids, None)
    parts = []
    for region, names in region_layers.items():
        idx = np.flatnonzero(regions == region)
        if idx.size:
            parts.append(match(responses[idx], neuron_ids[idx], names))
    return combine_results(parts, neuron_ids)


def _check_result(result: MatchResult, analysed: NeuralAssembly, committed) -> None:
    """A result from elsewhere must hold exactly the analysed neurons, each matched within its search."""
    have = set(pd.unique(result.matches.neuron).astype(str).tolist())
    want = set(analysed.neuron_ids.tolist())
    if have != want:
        raise ValueError(f"result holds other neurons than the analysed ones: {len(have - want)} extra (e.g. "
                         f"{sorted(have - want)[:5]}), {len(want - have)} missing (e.g. {sorted(want - have)[:5]}); "
                         f"match analysable(assembly, screen_neurons(assembly, splits)), which leaves out the "
                         f"flagged neurons")
    if committed is not None:
        region_of = dict(zip(analysed.neuron_ids, analysed.regions))
        for row in result.matches.itertuples():
            layers = committed[region_of[row.neuron]]
            if row.layer not in layers:
                raise ValueError(f"result is not this region-committed search: neuron {row.neuron} is matched in "
                                 f"layer {row.layer!r}, outside its region's layers {layers}")


def _ceilings(assembly: NeuralAssembly):
    """(per-split, per-neuron) split-half reliabilities of every neuron; None without a repeat axis."""
    if not assembly.has_repeats:
        return None
    per_split = split_half_reliability(assembly.responses, per_split=True)
    with warnings.catch_warnings():  # a neuron without a defined ceiling in any repeat split: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return per_split, np.nanmean(per_split, axis=0)


def _flag_text(row) -> str:
    return ",".join(f for f in FLAGS if bool(getattr(row, f, False)))


def _with_flagged(neurons: pd.DataFrame, summary: pd.DataFrame, flags: pd.DataFrame, ceiling_all):
    """Every neuron of the assembly in the neuron table (flagged ones with NaN scores), counts in the summary."""
    flags = flags.assign(flags=[_flag_text(r) for r in flags.itertuples()])
    flags["flagged"] = flags["flags"] != ""
    table = flags.drop(columns="region").merge(neurons.drop(columns="region"), on="neuron", how="left")
    table.insert(1, "region", flags.region.to_numpy())
    excluded = ~table.analyzed
    if ceiling_all is not None and excluded.any():  # a ceiling needs no matching: reported for every neuron
        table.loc[excluded, "ceiling"] = ceiling_all[1][excluded.to_numpy()]
        table["ceiling_ok"] = np.isfinite(table.ceiling) & (table.ceiling > 0)
    if "significant" in table:
        table["significant"] = table.significant.fillna(False).astype(bool)
    table["n_splits"] = table.n_splits.fillna(neurons.n_splits.iloc[0]).astype(int)
    for column in ("unit", "strict_unit"):  # a unit id, or none (<NA>) for a neuron left out
        table[column] = table[column].astype("Int64")
    counts = flags.groupby("region").agg(
        n_neurons=("neuron", "size"), n_analyzed=("analyzed", "sum"), n_neurons_flagged=("flagged", "sum"),
        n_missing_images=("missing_images", "sum"), n_constant_train=("constant_train", "sum"),
        n_no_ceiling=("no_ceiling", "sum")).reset_index()
    summary = counts.merge(summary.drop(columns="n_neurons"), on="region", how="left")
    return table, summary


def _labels(assembly: NeuralAssembly, labels):
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (assembly.n_images,):
            raise ValueError(f"labels must have one category per image ({assembly.n_images}); got {labels.shape}")
        return labels
    meta = assembly.image_metadata
    have = [] if meta is None else list(meta.columns)
    column = next((c for c in LABEL_COLUMNS if c in have), None)
    if column is None:
        raise ValueError(
            f"decoding needs a category per image: none of {list(LABEL_COLUMNS)} is in the image metadata "
            f"(columns: {have}); pass labels=..., or decode=False"
        )
    values = meta[column]
    if values.isna().any():
        missing = meta.index[values.isna()][:5].tolist()
        raise ValueError(f"{values.isna().sum()} images have no {column!r}, e.g. {missing}")
    return values.to_numpy()


def _settings_of(result: MatchResult, settings: MatchSettings | None, overrides: dict) -> MatchSettings:
    """The settings that produced ``result``; given settings or overrides must agree with them."""
    k = len(result.matches.topk_unit.iloc[0])
    own = result.settings
    if own is None:  # a result built by hand: only its top-k and null size are known
        known = {"top_k": k, "n_permutations": 0 if result.null is None else result.null.unit.shape[0]}
        base = MatchSettings.resolve(settings, **overrides)
        differ = {n: (getattr(base, n), v) for n, v in known.items()
                  if (settings is not None or n in overrides) and getattr(base, n) != v}
        own = replace(base, **known)
    elif settings is not None:
        differ = MatchSettings.resolve(settings, **overrides).differences(own)
    else:
        MatchSettings.resolve(own, **overrides)  # unknown names and bad values fail as usual
        differ = {n: (v, getattr(own, n)) for n, v in overrides.items()
                  if n in MatchSettings.RESULT_FIELDS and v != getattr(own, n)}
    if differ:
        said = ", ".join(f"{n}={a!r} (the result has {b!r})" for n, (a, b) in differ.items())
        raise ValueError(f"the settings given disagree with those that produced result: {said}; pass the "
                         f"result's own settings (result.settings) or re-run the matching")
    return own


def _strict(y, splits, result: MatchResult, columns, settings: MatchSettings, neuron_ids, max_top_k: int,
            match: Callable) -> pd.DataFrame:
    """Bijective assignment per split from the top-k candidates; k grows (re-running ``match``) until feasible."""
    order = {n: i for i, n in enumerate(neuron_ids)}

    def in_neuron_order(df: pd.DataFrame) -> pd.DataFrame:
        return df.iloc[np.argsort([order[n] for n in df.neuron])]

    assigned = []
    for s, part in result.matches.groupby("split"):
        part = in_neuron_order(part)
        candidates = part
        k = settings.top_k
        while True:
            try:
                a = strict_assignment(np.stack(candidates.topk_unit.to_numpy()), np.stack(candidates.topk_r.to_numpy()))
                break
            except InfeasibleAssignment:
                if k >= max_top_k:
                    raise
                previous, k = k, min(2 * k, max_top_k)
                log.info("split %d: strict assignment infeasible with top_k=%d candidates; re-running with %d",
                         s, previous, k)
                wider = replace(settings, top_k=k, n_permutations=0)
                candidates = in_neuron_order(match(y, [splits[s]], wider).matches)
        assigned.append((s, part, a))
    # the assigned units of every split in one gather (from a store, each chunk decompressed once)
    union, where = np.unique(np.concatenate([a.units for _, _, a in assigned]), return_inverse=True)
    union_x = columns(union)
    rows, start = [], 0
    for s, part, a in assigned:
        test = splits[s][1]
        cols, start = where[start:start + len(a.units)], start + len(a.units)
        strict_r = pearson_pairs(union_x[test], y[:, test], cols, np.arange(len(y)))
        rows.append(pd.DataFrame({
            "neuron": part.neuron.to_numpy(), "split": s, "unit": part.unit.to_numpy(),
            "free_test_r": part.test_r.to_numpy(), "strict_unit": a.units, "strict_train_r": a.weights,
            "strict_test_r": strict_r, "k_used": a.k_used,
        }))
    return pd.concat(rows, ignore_index=True)


def _decode(y, labels, splits, matches, assembly, catalogue, columns, n_random: int, seed: int,
            device=None, committed: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Matched-population decoding per (region, split), with random-population nulls.

    Every region's random populations are drawn first (region by region, in name order), then the
    activations of all of them and of every region's matched units (all splits) are read in one
    gather where they fit in ``GATHER_BYTES`` (a store's chunk is decompressed whole for any of its
    columns, so each separate gather re-read nearly the whole store: 2-3 s per demo model). Where
    they do not fit, each region reads its populations in as few gathers as fit and its matched
    units in one. A drawn unit that is constant on some split's train images is redrawn after
    that (:func:`_random_populations`). In a region-committed search the random populations are
    drawn from the units of the region's layers only. A region's splits are decoded together
    (:func:`core.decoding.matched_population_decoding_splits`: the fits of several splits in one
    batch, warm-started from the first split's, where they are small; each split's null
    warm-started from the previous split's where they are large), on the matching's device (None:
    cuda when available, as the engine resolves it).
    """
    device = default_device(device)
    rng = np.random.default_rng(seed)
    plans = []
    for region in sorted(set(assembly.regions)):
        idx = np.flatnonzero(assembly.regions == region)
        ids = assembly.neuron_ids[idx]
        units = _unit_ranges(catalogue, None if committed is None else committed[region])
        draws = np.stack([rng.choice(units.n, size=len(idx), replace=False) for _ in range(n_random)])
        matched = [matches[matches.split == s].set_index("neuron").loc[ids].unit.to_numpy()
                   for s in range(len(splits))]
        plans.append((region, idx, units, draws, matched))
    wanted = np.unique(np.concatenate([u for _, _, units, draws, matched in plans
                                       for u in (units(draws).ravel(), *matched)]))
    if 8 * wanted.size * y.shape[1] <= GATHER_BYTES:
        columns = _cached_columns(columns, wanted)
    rows = []
    for region, idx, units, draws, matched in plans:
        pool = _random_populations(lambda i: columns(units(i)), units.n, draws, y.shape[1], splits, rng)
        union, where = np.unique(np.concatenate(matched), return_inverse=True)
        union_x = columns(union)
        units_x = [union_x[:, w] for w in np.split(where, len(splits))]
        results = matched_population_decoding_splits(units_x, y[idx].T, labels, splits,
                                                     random_populations=pool, n_random=n_random,
                                                     device=device)
        rows += [{"region": region, "split": s, **res.as_dict()} for s, res in enumerate(results)]
    return pd.DataFrame(rows)


def _cached_columns(columns, units: np.ndarray):
    """``columns`` with the columns of the sorted ``units`` read once, now; other units are read as asked."""
    cache = columns(units)

    def cached(asked):
        asked = np.asarray(asked, np.int64)
        at = np.searchsorted(units, asked).clip(max=units.size - 1)
        hit = units[at] == asked
        if hit.all():
            return cache[:, at]
        out = np.empty((cache.shape[0], asked.size))
        out[:, hit] = cache[:, at[hit]]
        out[:, ~hit] = columns(asked[~hit])
        return out

    return cached


def _unit_ranges(catalogue: UnitCatalogue, names: Sequence[str] | None):
    """Index -> global unit id over the units of some layers (all: the identity); ``.n`` units in all."""
    layers = [layer for layer in catalogue.layers if names is None or layer.name in names]
    starts = np.array([catalogue.offset(layer.name) for layer in layers], np.int64)
    sizes = np.array([layer.size for layer in layers], np.int64)
    ends = np.cumsum(sizes)

    def units(i):
        i = np.asarray(i, np.int64)
        k = np.searchsorted(ends, i, side="right")
        return starts[k] + i - (ends[k] - sizes[k])

    units.n = int(ends[-1])
    return units


def _constant_on_a_train_set(x: np.ndarray, splits, axis: int) -> np.ndarray:
    """Over image ``axis`` of ``x``: is each column constant on some split's train images?"""
    flat = None
    for train, _ in splits:
        constant = np.ptp(np.take(x, train, axis=axis), axis=axis) == 0
        flat = constant if flat is None else flat | constant
    return flat


def _random_populations(columns, n_units: int, draws: np.ndarray, n_images: int, splits, rng,
                        tries: int = 20) -> np.ndarray:
    """(n_random, images, size) activations of the drawn units ``draws`` (n_random, size; updated in
    place), each drawn unit that is constant on some split's train images replaced by the first
    varying one of ``REDRAWS`` uniform candidates (at most ``tries`` rounds).

    Read in gathers of at most ``GATHER_BYTES`` of float64 columns.
    """
    n_random, size = draws.shape
    batch = max(1, GATHER_BYTES // (8 * size * n_images))
    out = None
    for start in range(0, n_random, batch):
        block = draws[start:start + batch]
        x = columns(block.ravel()).astype(np.float32)
        if out is None:
            out = np.empty((n_random, x.shape[0], size), np.float32)
        out[start:start + len(block)] = x.reshape(x.shape[0], len(block), size).transpose(1, 0, 2)
    for _ in range(tries):
        flat = _constant_on_a_train_set(out, splits, axis=1)  # (draw, unit)
        if not flat.any():
            return out
        # each such unit is replaced by the first varying one of REDRAWS candidates drawn for it (the
        # first varying of i.i.d. uniform draws, as one by one; in one gather: a store's scattered
        # columns decompress nearly all of it)
        d, u = np.nonzero(flat)
        spare = rng.choice(n_units, size=(d.size, REDRAWS), replace=True)
        x = columns(spare.ravel()).astype(np.float32).reshape(n_images, d.size, REDRAWS)
        varies = ~_constant_on_a_train_set(x, splits, axis=0)  # (slot, candidate)
        pick = np.where(varies.any(axis=1), varies.argmax(axis=1), REDRAWS - 1)  # none: the next round again
        slots = np.arange(d.size)
        draws[d, u] = spare[slots, pick]
        out[d, :, u] = x[:, slots, pick].T
    raise ValueError(f"could not draw {size} random units that vary over the train images; too many constant units")
