"""The built-in demo: the whole core pipeline on embedded data, no downloads, no credentials.

Generated stimuli -> a random-weight timm model's stage outputs (every unit) -> a synthetic brain
with planted neurons (noisy copies of chosen units, 8 repeats) and pure-noise neurons -> Brain-Score
splits -> core.analyze: matching with a permutation null in the same pass, noise ceilings, p-values
and FDR, strict one-to-one assignment, matched-population decoding -> tables and a printed summary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

import core
from core.extract import create_model, extract_activations, stage_layers

log = logging.getLogger(__name__)


def run_demo(out_dir: Path, *, model_name: str = "test_convnext", n_planted: int = 48, n_noise: int = 16,
             snr: float = 1.0, n_permutations: int = 100, seed: int = 0) -> pd.DataFrame:
    """Run the demo and write its tables to ``out_dir``; returns the per-neuron summary table."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    stimuli = core.synthetic.generate_stimuli(seed=seed)
    model = create_model(model_name, seed=seed)
    layers = stage_layers(model)
    acts = extract_activations(model, stimuli, layers)
    n_units = sum(int(np.prod(a.shape[1:])) for a in acts.values())
    print(f"stimuli: {len(stimuli)} generated images, {stimuli.metadata.category_name.nunique()} categories, "
          f"{stimuli.metadata.object_name.nunique()} objects")
    print(f"model: {model_name} (random weights, seed {seed}), layers {layers}: {n_units:,} units")

    flat = np.concatenate([a.reshape(len(stimuli), -1) for a in acts.values()], axis=1)
    brain = core.plant_neurons(flat.astype(np.float32), n_planted=n_planted, n_noise=n_noise, snr=snr,
                               repeats=8, seed=seed + 1)
    truth = brain.truth
    regions = np.where(truth.planted, "V4", "noise")
    print(f"brain: {n_planted} planted neurons (region V4, SNR {snr} for the 8-repeat mean) + {n_noise} "
          f"pure-noise neurons (region 'noise')")

    splits = core.brainscore_splits(stimuli.metadata)
    assembly = core.NeuralAssembly(brain.responses, truth.neuron, regions, stimuli.image_ids, stimuli.metadata)
    analysis = core.analyze(acts, assembly, splits, n_permutations=n_permutations, seed=seed,
                            dims={name: ("channel", "y", "x") for name in acts})
    truth_unit = dict(zip(truth.neuron, truth.unit))
    matches = analysis.matches.assign(planted_unit=analysis.matches.neuron.map(truth_unit))
    matches["recovered"] = matches.unit == matches.planted_unit
    matches.drop(columns=["topk_unit", "topk_r"]).to_csv(out_dir / "matches.csv", index=False)
    matches.to_parquet(out_dir / "matches.parquet", index=False)
    analysis.layer_matches.to_parquet(out_dir / "layer_matches.parquet", index=False)
    neurons = analysis.neurons.merge(truth[["neuron", "planted"]], on="neuron")
    neurons.to_csv(out_dir / "neurons.csv", index=False)
    analysis.summary.to_csv(out_dir / "summary.csv", index=False)
    analysis.decoding.to_csv(out_dir / "decoding.csv", index=False)

    s = analysis.summary.set_index("region")
    planted = matches[matches.planted_unit >= 0]
    print(f"analysis: {len(splits)} splits x {len(neurons)} neurons x {n_units:,} units, {n_permutations} "
          f"permutations in the same pass, {time.perf_counter() - t0:.1f} s total")
    print(f"  planted units recovered in {planted.recovered.mean():.0%} of (neuron, split) pairs; best layers: "
          + ", ".join(f"{k} {v}" for k, v in planted.layer.value_counts().sort_index().items()))
    for region in s.index:
        r = s.loc[region]
        print(f"  {region:>5}: held-out r median {r.median_test_r:.2f} +- {r.median_test_r_sem:.2f} "
              f"(ceiled {r.median_test_r_ceiled:.2f}); null: max train r {r.median_null_train_r:.2f}, "
              f"held-out {r.median_null_test_r:.2f}; significant (BH q<=0.05) {r.frac_significant:.0%}; "
              f"one-to-one drop {r.strict_drop:.3f}; decoding {r.transfer_accuracy:.2f} transferred to neurons "
              f"(neurons {r.neuron_accuracy:.2f}, random units {r.null_mean:.2f}, chance {r.chance:.2f})")
    print(f"tables: {out_dir}/ matches.parquet (per neuron and split), neurons.csv, summary.csv, decoding.csv")
    return neurons
