"""The ``unitmatch`` command.

With no arguments it runs the built-in demo (embedded data, no downloads, no credentials). The
Hydra sweep app (zoo extraction on Ray, Dask reduction, W&B) will take over this entry point.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="unitmatch",
        description="Does this single DNN unit behave like this neuron? With no arguments: run the built-in demo.",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="where the demo writes its tables")
    parser.add_argument("--model", default="test_convnext", help="timm model for the demo (random weights)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .demo import run_demo

    run_demo(args.out, model_name=args.model, seed=args.seed)


if __name__ == "__main__":
    main()
