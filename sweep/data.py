"""The sweep's data: the stimulus set and the neural assembly, from the ``stimuli`` and ``neural`` groups.

Paths are checked by :func:`check_data` before any work; :func:`load_stimuli` and
:func:`load_assembly` read them. The synthetic brain of the demo is planted from random units of one
zoo model's activation store, deterministically in its seed, so every job of a multirun builds the
same neurons.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from unitmatch import core
from unitmatch.core.synthetic import generate_stimuli, plant_neurons
from unitmatch.core.units import gather_columns

from .config import ConfigError

log = logging.getLogger(__name__)


def _existing(value, key: str) -> Path:
    if value is None:
        raise ConfigError(f"{key} is not set; give it on the command line ({key}=/path/to/file)")
    path = Path(str(value))
    if not path.exists():
        raise ConfigError(f"{key}={str(path)!r} does not exist")
    return path


def check_data(cfg: DictConfig) -> None:
    """Every data path the configured stimuli and neurons need exists.

    Raises:
        ConfigError: a path not set or missing, naming its config key.
    """
    if cfg.stimuli.kind == "files":
        _existing(cfg.stimuli.path, "stimuli.path")
        if cfg.stimuli.metadata is not None:
            _existing(cfg.stimuli.metadata, "stimuli.metadata")
    if cfg.neural.kind == "plain":
        _existing(cfg.neural.responses, "neural.responses")
    elif cfg.neural.kind == "brainio":
        _existing(cfg.neural.path, "neural.path")


def load_stimuli(cfg: DictConfig) -> core.StimulusSet:
    s = cfg.stimuli
    if s.kind == "generated":
        return generate_stimuli(s.n_categories, s.objects_per_category, s.variations, s.size, s.seed)
    metadata = None if s.metadata is None else _existing(s.metadata, "stimuli.metadata")
    return core.StimulusSet.from_files(_existing(s.path, "stimuli.path"), metadata)


def make_splits(cfg: DictConfig, stimuli: core.StimulusSet) -> list:
    """The analysis splits of the stimulus set's images (before any extraction: bad settings fail early).

    Raises:
        ConfigError: the images cannot be split as ``analysis.stratify`` asks (the message says why).
    """
    a = cfg.analysis
    meta = stimuli.metadata
    try:
        return core.brainscore_splits(meta if meta is not None and len(meta.columns) else None,
                                      n_images=len(stimuli), n_splits=a.splits, train_size=a.train_size,
                                      random_state=a.random_state, stratify=None if a.stratify == "none" else a.stratify)
    except ValueError as err:
        raise ConfigError(f"analysis.stratify={a.stratify!r}, analysis.splits={a.splits}, analysis.train_size="
                          f"{a.train_size} cannot split the {len(stimuli)} images: {err}. analysis.stratify=auto "
                          f"falls back to a coarser column, analysis.stratify=none does not stratify") from None


def load_assembly(cfg: DictConfig, stimuli: core.StimulusSet, stores: dict) -> core.NeuralAssembly:
    """The neurons, images in the stimulus set's order.

    Args:
        stores: complete activation stores by model key (the synthetic brain is planted from
            ``neural.planted_model``'s store).
    """
    n = cfg.neural
    if n.kind == "plain":
        data = np.load(_existing(n.responses, "neural.responses"))
        return core.NeuralAssembly(data, [f"n{i:03d}" for i in range(len(data))],
                                   np.full(len(data), n.region or "unknown"), stimuli.image_ids, stimuli.metadata)
    if n.kind == "brainio":
        assembly = core.load_brainio(_existing(n.path, "neural.path"), region=n.region, time_bin=n.time_bin)
        return assembly.align(stimuli)
    if n.planted_model not in stores:
        raise ConfigError(f"neural.planted_model={n.planted_model!r} has no complete store in this run "
                          f"(stores: {sorted(stores)})")
    store = stores[n.planted_model]
    rng = np.random.default_rng(n.seed)
    cat = store.catalogue()
    layers = store.layers()
    candidates = np.sort(rng.choice(cat.n_units, size=4 * n.n_planted, replace=False))
    varying = candidates[gather_columns(layers, cat, candidates).std(axis=0) > 0]
    units = rng.choice(varying, size=n.n_planted, replace=False)
    brain = plant_neurons(gather_columns(layers, cat, units), n_planted=n.n_planted, n_noise=n.n_noise, snr=n.snr,
                          units=np.arange(n.n_planted), repeats=n.repeats, seed=n.seed)
    truth = brain.truth.assign(unit=np.concatenate([units, np.full(n.n_noise, -1)]), model=n.planted_model)
    truth.to_csv(Path(cfg.results_dir) / "planted_truth.csv", index=False)
    regions = np.where(truth.planted, "V4", "noise")
    return core.NeuralAssembly(brain.responses, truth.neuron, regions, stimuli.image_ids, stimuli.metadata)
