"""The ``unitmatch`` command (also ``python -m unitmatch.sweep``): the Hydra sweep app.

With no arguments it runs the built-in demo: generated stimuli, a zoo of random-weight timm test
models, a synthetic brain planted from one of them, local Ray, local Dask, W&B offline. Everything is
overridable: ``unitmatch zoo=classic cluster=ray analysis.n_permutations=1000``; ``--multirun`` works;
``unitmatch --help`` lists the config groups; ``unitmatch --cfg job`` prints the resolved config.

Exit status: 0 when every model of the job finished; 1 when any failed (after the others finished;
the failures are printed and kept in ``<results_dir>/failures.json``), so schedulers (sbatch, ray job)
see a failed sweep as failed; 2 for a configuration error, before any work.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from . import config  # registers the schema that conf/config.yaml starts from

#: the configs ship inside the package, so an installed wheel finds them wherever it runs
CONFIG_PATH = "pkg://unitmatch.conf"


class SweepFailed(RuntimeError):
    """Some models failed; the others finished."""


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> None:
    from .stages import print_summary, run

    logging.getLogger("unitmatch").setLevel(logging.INFO)
    os.environ.setdefault("WANDB_SILENT", "true")  # one line per run is enough; WANDB_SILENT=false for more
    try:
        done = run(cfg)
    except config.ConfigError as err:
        print(f"unitmatch: configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    print_summary(cfg, done)
    if done["failed"]:
        raise SweepFailed(f"{len(done['failed'])} model(s) failed: {sorted(done['failed'])} "
                          f"(details above and in {cfg.results_dir}/failures.json)")


if __name__ == "__main__":
    main()
