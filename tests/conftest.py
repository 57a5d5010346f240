"""Test environment: no network, no credentials, a private local Ray per session that needs it."""

from __future__ import annotations

import os

for name, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline",
                    "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(name, value)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A fresh local Ray instance (never a stale cluster address), shut down afterwards."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), configure_logging=False)
    yield ray
    ray.shutdown()
