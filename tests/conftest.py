"""Test set-up: 8 simulated CPU devices (before JAX starts) and hypothesis profiles."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest
from hypothesis import settings

# Each example compiles a small model, so keep the count modest and drop the deadline.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Directory of tiny random transformers checkpoints, one per model family."""
    from hf_peer import PEERS, write

    root = tmp_path_factory.mktemp("hf")
    for name in PEERS:
        write(name, root / name)
    return root
