"""The ``unitmatch`` command (also ``python -m unitmatch.sweep``): the Hydra sweep app.

With no arguments it runs the built-in demo: generated stimuli, a zoo of random-weight timm test
models, a synthetic brain planted from one of them, local Ray, local Dask, W&B offline. Everything is
overridable: ``unitmatch zoo=classic cluster=ray analysis.n_permutations=1000``; ``--multirun`` works;
``unitmatch --help`` lists the config groups; ``unitmatch --cfg job`` prints the resolved config.
"""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig

#: the configs ship inside the package, so an installed wheel finds them wherever it runs
CONFIG_PATH = "pkg://unitmatch.conf"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> None:
    from .app import print_summary, run

    logging.getLogger("unitmatch").setLevel(logging.INFO)
    os.environ.setdefault("WANDB_SILENT", "true")  # one line per run is enough; WANDB_SILENT=false for more
    done = run(cfg)
    print_summary(cfg, done)


if __name__ == "__main__":
    main()
