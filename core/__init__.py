"""unitmatch core: the science as a plain library (numpy / torch / zarr; no Ray, Hydra or W&B).

Usable from a notebook with numpy arrays::

    import core
    splits = core.brainscore_splits(n_images=640)
    matches = core.match_neurons(activations, responses, splits)
    analysis = core.analyze(activations, assembly, splits)   # + null, ceilings, one-to-one, decoding
"""

from .analysis import Analysis, analyze
from .assignment import Assignment, InfeasibleAssignment, assignment_drop, strict_assignment
from .decoding import DecodingResult, matched_population_decoding, neuron_accuracy, transfer_accuracy
from .engine import (
    MatchEngine,
    MatchPartial,
    MatchResult,
    NullDistribution,
    match_neurons,
    merge,
    merge_all,
    run_matching,
    stream_match,
)
from .neural import NeuralAssembly, load_brainio, load_plain
from .reliability import spearman_brown, split_half_reliability
from .splits import brainscore_splits, validate_splits
from .stats import fdr_bh, neuron_table, permutation_p_values, summarize
from .stimuli import StimulusSet
from .synthetic import SyntheticBrain, plant_neurons
from .units import LayerUnits, UnitBlock, UnitCatalogue

__version__ = "0.1.0"

__all__ = [
    "Analysis", "Assignment", "DecodingResult", "InfeasibleAssignment", "NullDistribution", "analyze",
    "assignment_drop", "fdr_bh", "matched_population_decoding", "neuron_accuracy", "neuron_table",
    "permutation_p_values", "strict_assignment", "summarize", "transfer_accuracy",
    "LayerUnits", "MatchEngine", "MatchPartial", "MatchResult", "NeuralAssembly", "StimulusSet",
    "SyntheticBrain", "UnitBlock", "UnitCatalogue", "brainscore_splits", "load_brainio", "load_plain",
    "match_neurons", "merge", "merge_all", "plant_neurons", "run_matching", "spearman_brown",
    "split_half_reliability", "stream_match", "validate_splits",
]
