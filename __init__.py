"""unitmatch: does this single DNN unit behave like this neuron?

The distribution has two packages under one namespace:

- :mod:`unitmatch.core`: the science as a plain library (numpy / torch / zarr; no Ray, Hydra or W&B);
- :mod:`unitmatch.sweep`: orchestration of zoo sweeps (Hydra app, Ray actors, Dask reduction, W&B).

This module imports neither, so ``import unitmatch.core`` stays light.
"""

__version__ = "0.2.0"
