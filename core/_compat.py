"""Import guards for the vision stack.

timm hard-requires torchvision. On CPU-only machines the only torchvision on the registry is a CUDA
build whose compiled operators cannot load next to a CPU torch; its import then dies with
``RuntimeError: operator torchvision::nms does not exist`` because two fake-kernel registrations
(``nms``, ``qnms``) are not guarded. :func:`import_timm` works around exactly that failure: it
defines the two operator schemas with ``torch.library`` and imports again. Where the real import
works (CUDA clusters, matching CPU builds) it does nothing but import.

Every module that needs timm or torchvision, including code that runs inside Ray workers, must get
them through :func:`import_timm` / :func:`import_torchvision` rather than a bare ``import``.

Also here: :func:`forced_tf32`, the environment settings that make CUDA matmuls use TF32 whatever
torch's own settings say.
"""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType

log = logging.getLogger(__name__)

_MISSING_OP_MESSAGE = "operator torchvision::nms does not exist"
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# torch.library.Library objects must stay alive for their definitions to stay registered.
_libraries: list = []


def _drop_torchvision_modules() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def _define_missing_operators() -> list[str]:
    import torch

    defined = []
    for name, schema in _SCHEMAS.items():
        try:
            getattr(torch.ops.torchvision, name)
            continue  # already registered (a real build, or an earlier guard)
        except (AttributeError, RuntimeError):
            pass
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define(schema)
        _libraries.append(lib)
        defined.append(name)
    return defined


def import_torchvision() -> ModuleType:
    """Import torchvision, repairing the CPU-torch / CUDA-torchvision mismatch if that is the failure.

    Returns:
        The torchvision module.

    Raises:
        RuntimeError: any import failure other than the known missing-operator one.
    """
    try:
        import torchvision
    except RuntimeError as err:
        if _MISSING_OP_MESSAGE not in str(err):
            raise
        _drop_torchvision_modules()
        defined = _define_missing_operators()
        log.info(
            "torchvision's compiled operators are unavailable (CPU torch with a CUDA torchvision); "
            "defined schemas for %s so timm can import. torchvision ops and its JPEG decoder will not work.",
            defined,
        )
        import torchvision
    return torchvision


def import_timm() -> ModuleType:
    """Import timm after making sure torchvision imports (see module docstring)."""
    import_torchvision()
    import timm

    return timm


#: environment variables with which torch runs float32 cuBLAS matmuls in TF32 whatever its settings
#: say (NGC's PyTorch containers set ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1``)
TF32_OVERRIDES = ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",)


def forced_tf32() -> list[str]:
    """``NAME=value`` of each :data:`TF32_OVERRIDES` variable set to something other than off."""
    return [f"{name}={os.environ[name]}" for name in TF32_OVERRIDES
            if os.environ.get(name, "").strip().lower() not in ("", "0", "false", "off", "no")]
