"""The torchvision import guard: repairs exactly the CPU-torch / CUDA-torchvision failure, else inert."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_guard_makes_timm_importable_and_models_run():
    out = _run(
        """
        import torch
        from unitmatch.core._compat import import_timm
        timm = import_timm()
        model = timm.create_model("test_resnet", pretrained=False).eval()
        with torch.inference_mode():
            print(tuple(model(torch.zeros(1, 3, 64, 64)).shape))
        import torchvision.transforms  # transforms work after the guard
        print("ok")
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(1,", "1000)", "ok"]


def test_guard_only_acts_on_the_known_failure():
    """Where plain `import torchvision` works the guard defines nothing; where it fails it defines nms/qnms."""
    plain = _run("import torchvision")
    guarded = _run(
        """
        from unitmatch.core import _compat
        _compat.import_torchvision()
        print(len(_compat._libraries))
        """
    )
    assert guarded.returncode == 0, guarded.stderr
    if plain.returncode == 0:
        assert guarded.stdout.strip() == "0"
    else:
        assert "operator torchvision::nms does not exist" in plain.stderr
        assert guarded.stdout.strip() == "2"


def test_guard_reraises_other_errors(monkeypatch):
    import builtins

    from unitmatch.core import _compat

    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError("something else entirely")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing)
    with pytest.raises(RuntimeError, match="something else entirely"):
        _compat.import_torchvision()
