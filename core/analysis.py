"""The whole per-model analysis in one call, as tidy tables.

matching (with the permutation null in the same pass) -> noise ceilings -> per-neuron statistics ->
strict one-to-one assignment -> matched-population decoding -> per-region summary.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import pandas as pd

from .assignment import InfeasibleAssignment, assignment_drop, strict_assignment
from .decoding import matched_population_decoding
from .engine import MatchResult, MatchSettings, pearson_pairs, run_matching
from .neural import NeuralAssembly
from .reliability import split_half_reliability
from .stats import neuron_table, summarize
from .units import as_layers, catalogue_of, gather_columns

log = logging.getLogger(__name__)

#: image metadata columns tried, in order, for the decoding labels
LABEL_COLUMNS = ("category_name", "category")


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
    """

    matches: pd.DataFrame
    layer_matches: pd.DataFrame
    neurons: pd.DataFrame
    assignment: pd.DataFrame
    decoding: pd.DataFrame
    summary: pd.DataFrame
    result: MatchResult


def analyze(activations, assembly: NeuralAssembly, splits, settings: MatchSettings | None = None, *,
            labels: Sequence | None = None, decode: bool = True, n_random_populations: int = 100,
            alpha: float = 0.05, dims=None, catalogue=None, max_top_k: int = 64, result: MatchResult | None = None,
            **overrides) -> Analysis:
    """Run the full analysis of one model against one assembly.

    Args:
        activations: ``{layer: (images, *unit_shape)}`` (numpy, torch or 2-D Zarr), images in the
            assembly's order.
        assembly: the neurons (mean over repeats is matched; repeats give the ceiling).
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
            permutation null). Its own settings are used; settings given here must agree with them.

    Raises:
        ValueError: settings that disagree with ``result``'s, decoding without category labels
            (naming the metadata columns available), or any input error of the parts (each names the
            bad value).
    """
    layers = as_layers(activations)
    catalogue = catalogue or catalogue_of(layers, dims)
    columns = lambda units: gather_columns(layers, catalogue, units)  # noqa: E731
    y = assembly.mean_responses()
    if decode:
        labels = _labels(assembly, labels)
    if result is None:
        settings = MatchSettings.resolve(settings, **overrides)
        result = run_matching(layers, y, splits, settings, catalogue=catalogue, neuron_ids=assembly.neuron_ids)
    else:
        settings = _settings_of(result, settings, overrides)
    if settings.n_permutations == 0:
        log.info("no permutation null (n_permutations=0): no p-values or q-values")
    ceiling_splits = split_half_reliability(assembly.responses, per_split=True) if assembly.has_repeats else None
    with warnings.catch_warnings():  # a neuron without a defined ceiling in any repeat split: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        ceiling = None if ceiling_splits is None else np.nanmean(ceiling_splits, axis=0)
    neurons = neuron_table(result, regions=assembly.regions, ceiling=ceiling, alpha=alpha)
    region_of = dict(zip(assembly.neuron_ids, assembly.regions))
    matches = result.matches.assign(region=result.matches.neuron.map(region_of))
    n_nan = int(matches.test_r.isna().sum())
    if n_nan:
        log.info("%d of %d (neuron, split) matches have an undefined held-out r (the selected unit is constant "
                 "on the test images); counted in n_nan_test_r", n_nan, len(matches))

    assignment = _strict(layers, y, splits, result, columns, settings, assembly.neuron_ids, catalogue, max_top_k)
    assignment["region"] = assignment.neuron.map(region_of)
    strict_mean = assignment.groupby("neuron", sort=False)[["strict_test_r"]].mean()
    neurons = neurons.merge(strict_mean, left_on="neuron", right_index=True, how="left")
    neurons["strict_unit"] = neurons.neuron.map(
        assignment.groupby("neuron").strict_unit.agg(lambda s: s.mode().iloc[0]))

    decoding = _decode(y, labels, splits, matches, assembly, catalogue, columns, n_random_populations,
                       settings.seed, settings.device) if decode else pd.DataFrame()
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
    return Analysis(matches, result.layer_matches, neurons, assignment, decoding, summary, result)


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


def _strict(layers, y, splits, result: MatchResult, columns, settings: MatchSettings, neuron_ids, catalogue,
            max_top_k: int) -> pd.DataFrame:
    """Bijective assignment per split from the top-k candidates; k grows (re-running) until feasible."""
    order = {n: i for i, n in enumerate(neuron_ids)}

    def in_neuron_order(df: pd.DataFrame) -> pd.DataFrame:
        return df.iloc[np.argsort([order[n] for n in df.neuron])]

    rows = []
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
                candidates = in_neuron_order(run_matching(layers, y, [splits[s]], wider, catalogue=catalogue,
                                                          neuron_ids=neuron_ids).matches)
        units, inverse = np.unique(a.units, return_inverse=True)
        strict_r = pearson_pairs(columns(units)[splits[s][1]], y[:, splits[s][1]], inverse, np.arange(len(y)))
        rows.append(pd.DataFrame({
            "neuron": part.neuron.to_numpy(), "split": s, "unit": part.unit.to_numpy(),
            "free_test_r": part.test_r.to_numpy(), "strict_unit": a.units, "strict_train_r": a.weights,
            "strict_test_r": strict_r, "k_used": a.k_used,
        }))
    return pd.concat(rows, ignore_index=True)


def _decode(y, labels, splits, matches, assembly, catalogue, columns, n_random: int, seed: int,
            device=None) -> pd.DataFrame:
    """Matched-population decoding per (region, split), with random-population nulls.

    The random populations of a region are drawn once and their activations read in a few batched
    gathers (from a store, one read per chunk instead of one per population), then reused by every split.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for region in sorted(set(assembly.regions)):
        idx = np.flatnonzero(assembly.regions == region)
        ids = assembly.neuron_ids[idx]
        neurons_x = y[idx].T  # (images, neurons of the region)
        pool = _random_populations(columns, catalogue.n_units, n_random, len(idx), splits, rng)
        for s, (train, test) in enumerate(splits):
            part = matches[(matches.split == s)].set_index("neuron").loc[ids]
            units_x = columns(part.unit.to_numpy())
            res = matched_population_decoding(units_x, neurons_x, labels, train, test,
                                              random_populations=pool, n_random=n_random, device=device)
            rows.append({"region": region, "split": s, **res.as_dict()})
    return pd.DataFrame(rows)


def _random_populations(columns, n_units: int, n_random: int, size: int, splits, rng, batch: int = 25,
                        tries: int = 20) -> np.ndarray:
    """(n_random, images, size) activations of random distinct units that vary over every split's train images."""
    draws = np.stack([rng.choice(n_units, size=size, replace=False) for _ in range(n_random)])
    out = None
    for start in range(0, n_random, batch):
        block = draws[start:start + batch]
        x = columns(block.ravel()).astype(np.float32)
        if out is None:
            out = np.empty((n_random, x.shape[0], size), np.float32)
        out[start:start + len(block)] = x.reshape(x.shape[0], len(block), size).transpose(1, 0, 2)
    for _ in range(tries):
        flat = np.zeros(out.shape[0::2], bool)  # (draw, unit) constant on some split's train images
        for train, _ in splits:
            flat |= np.ptp(out[:, train, :], axis=1) == 0
        if not flat.any():
            return out
        d, u = np.nonzero(flat)
        draws[d, u] = rng.choice(n_units, size=d.size, replace=True)
        out[d, :, u] = columns(draws[d, u]).astype(np.float32).T
    raise ValueError(f"could not draw {size} random units that vary over the train images; too many constant units")
