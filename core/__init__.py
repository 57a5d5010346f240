"""unitmatch.core: the science as a plain library (numpy / torch / zarr; no Ray, Hydra or W&B).

Usable from a notebook with numpy arrays::

    from unitmatch import core
    splits = core.brainscore_splits(n_images=640, stratify=None)
    matches = core.match_neurons(activations, responses, splits)
    settings = core.MatchSettings(n_permutations=100)          # the matching settings, one object
    analysis = core.analyze(activations, assembly, splits, settings)  # + null, ceilings, one-to-one, decoding

The names below are the public surface; everything else lives in the submodules (``core.engine``,
``core.stats``, ``core.store``, ``core.extract`` ...), importable by their full names.
"""

from .analysis import Analysis, analyze
from .engine import MatchSettings, match_neurons, run_matching
from .neural import NeuralAssembly, load_brainio, load_plain
from .reliability import split_half_reliability
from .splits import brainscore_splits
from .stimuli import StimulusSet

__all__ = [
    "Analysis", "MatchSettings", "NeuralAssembly", "StimulusSet", "analyze", "brainscore_splits", "load_brainio",
    "load_plain", "match_neurons", "run_matching", "split_half_reliability",
]
