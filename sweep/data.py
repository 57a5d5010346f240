"""The sweep's data: the stimulus set and the neural assembly, from the ``stimuli`` and ``neural`` groups.

Paths are checked by :func:`check_data` before any work; :func:`load_stimuli` and
:func:`load_recorded` read them, also before any work (recorded responses must fit the stimuli). The
synthetic brain of the demo is planted (:func:`plant_assembly`) from random units of one zoo model's
activation store, deterministically in its seed, so every job of a multirun builds the same neurons.
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


#: the synthetic brain's regions: neurons planted from units, and pure-noise neurons
PLANTED_REGION, NOISE_REGION = "V4", "noise"


def _existing(value, key: str) -> Path:
    if value is None:
        raise ConfigError(f"{key} is not set; give it on the command line ({key}=/path/to/file)")
    path = Path(str(value))
    if not path.exists():
        raise ConfigError(f"{key}={str(path)!r} does not exist")
    return path


def check_data(cfg: DictConfig, entries=()) -> None:
    """Every file the models (``entries``: the planned ones), stimuli and neurons need exists.

    Raises:
        ConfigError: a path not set or missing, naming its config key.
    """
    for entry in entries:
        if entry.spec.checkpoint is not None:
            path = _existing(entry.spec.checkpoint, f"models.{entry.key}.checkpoint")
            if not path.is_file():
                raise ConfigError(f"models.{entry.key}.checkpoint={str(path)!r} is not a file (a saved state dict)")
    if cfg.stimuli.kind == "files":
        _existing(cfg.stimuli.path, "stimuli.path")
        if cfg.stimuli.metadata is not None:
            _existing(cfg.stimuli.metadata, "stimuli.metadata")
    if cfg.neural.kind == "plain":
        _existing(cfg.neural.responses, "neural.responses")
    elif cfg.neural.kind == "brainio":
        _existing(cfg.neural.path, "neural.path")


def n_neurons(cfg: DictConfig, assembly: core.NeuralAssembly | None) -> int:
    """How many neurons the job matches: the recorded ones, or the synthetic brain's (known from its config)."""
    if assembly is not None:
        return assembly.n_neurons
    return int(cfg.neural.n_planted + cfg.neural.n_noise)


def neuron_regions(cfg: DictConfig, assembly: core.NeuralAssembly | None) -> list[str]:
    """The regions of the job's neurons: the recorded ones', or the synthetic brain's (from its config)."""
    if assembly is not None:
        return sorted(set(np.asarray(assembly.regions).astype(str).tolist()))
    return sorted({PLANTED_REGION} | ({NOISE_REGION} if cfg.neural.n_noise else set()))


def load_stimuli(cfg: DictConfig) -> core.StimulusSet:
    s = cfg.stimuli
    if s.kind == "generated":
        return generate_stimuli(s.n_categories, s.objects_per_category, s.variations, s.size, s.seed)
    metadata = None if s.metadata is None else _existing(s.metadata, "stimuli.metadata")
    try:
        return core.StimulusSet.from_files(_existing(s.path, "stimuli.path"), metadata)
    except (OSError, ValueError) as err:
        raise ConfigError(f"stimuli.path={str(s.path)!r} (stimuli.metadata={s.metadata!r}) cannot be read as a "
                          f"stimulus set: {err}") from None


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


def load_recorded(cfg: DictConfig, stimuli: core.StimulusSet) -> core.NeuralAssembly:
    """The recorded neurons (``neural=plain`` or ``brainio``), images in the stimulus set's order.

    Read before any extraction, so a file that is not an array, or responses whose images are not the
    stimulus set's, fail before any work.

    Raises:
        ConfigError: the file cannot be read as responses, or its images do not match the stimuli;
            the message names the config key, the path and what was expected.
    """
    n = cfg.neural
    if n.kind == "plain":
        path = _existing(n.responses, "neural.responses")
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ConfigError(f"neural.responses={str(path)!r} is not a numpy .npy array of responses (neurons x "
                              f"images [x repeats]): {err}") from None
        if not isinstance(data, np.ndarray) or data.ndim not in (2, 3) or not np.issubdtype(data.dtype, np.number):
            what = f"an array of shape {data.shape} and dtype {data.dtype}" if isinstance(data, np.ndarray) else \
                "an .npz archive"
            raise ConfigError(f"neural.responses={str(path)!r} holds {what}; expected numbers of shape neurons x "
                              f"images [x repeats]")
        if data.shape[1] != len(stimuli):
            raise ConfigError(f"neural.responses={str(path)!r} has {data.shape[1]} images on axis 1 but the stimuli "
                              f"(stimuli.kind={cfg.stimuli.kind}, stimuli.path={cfg.stimuli.path!r}) hold "
                              f"{len(stimuli)}: the responses' image axis must follow the stimulus set's order")
        try:
            return core.NeuralAssembly(data, [f"n{i:03d}" for i in range(len(data))],
                                       np.full(len(data), n.region or "unknown"), stimuli.image_ids, stimuli.metadata)
        except ValueError as err:
            raise ConfigError(f"neural.responses={str(path)!r}: {err}") from None
    path = _existing(n.path, "neural.path")
    try:
        assembly = core.load_brainio(path, region=n.region, time_bin=n.time_bin)
        return assembly.align(stimuli)
    except (OSError, KeyError, ValueError) as err:
        raise ConfigError(f"neural.path={str(path)!r} (neural.region={n.region!r}, neural.time_bin={n.time_bin!r}) "
                          f"does not fit the stimuli (stimuli.path={cfg.stimuli.path!r}): {err}") from None


def plant_assembly(cfg: DictConfig, stimuli: core.StimulusSet, stores: dict):
    """The synthetic brain (``neural=synthetic``), planted from ``neural.planted_model``'s complete store.

    Returns:
        (assembly, truth): the neurons, images in the stimulus set's order, and which neuron copies
        which unit (the caller writes it as ``planted_truth.csv`` once the sweep folder accepts the run).
    """
    n = cfg.neural
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
    regions = np.where(truth.planted, PLANTED_REGION, NOISE_REGION)
    return core.NeuralAssembly(brain.responses, truth.neuron, regions, stimuli.image_ids, stimuli.metadata), truth
