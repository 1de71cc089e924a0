"""Test set-up: 8 simulated CPU devices (before JAX starts) and hypothesis profiles."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Indexes of data files go to a directory of this session's, not the user's cache.
os.environ.setdefault("LORA_JAX_CACHE", tempfile.mkdtemp(prefix="lora_jax_cache_"))
# TFDS datasets the tests build, and the ones they find missing: never the user's.
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="lora_jax_tfds_")

import pytest
from hypothesis import settings

# Each example compiles a small model, so keep the count modest and drop the deadline.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Frees each test module's compiled XLA programs when it ends. Every CPU executable maps
    its code into the process (about 80 mappings for a zoo model's gradient), and the whole
    suite's together passed the kernel's limit (vm.max_map_count, 65530), where XLA's
    compiler crashed with a segfault 400 tests in; jax.clear_caches() unmaps them."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture
def compilations():
    """The compile-stage events (jax.monitoring's: tracing, lowering, backend_compile) that
    happen during the test, to assert that a program is compiled once, then reused."""
    import jax

    events = []

    def count(event, duration, **kwargs):
        if "/compile/" in event:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    yield events
    jax.monitoring.unregister_event_duration_listener(count)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Directory of tiny random transformers checkpoints, one per model family."""
    from hf_peer import PEERS, write

    root = tmp_path_factory.mktemp("hf")
    for name in PEERS:
        write(name, root / name)
    return root


@pytest.fixture(scope="session")
def sft(checkpoints, tmp_path_factory):
    """The tiny Llama checkpoint with a word-level tokenizer.json, and a learnable SFT set:
    the response is the prompt's words reversed and shifted, so only the model can tell."""
    import shutil

    from hf_peer import write_reversal_set, write_word_tokenizer

    root = tmp_path_factory.mktemp("sft")
    model = root / "llama"
    shutil.copytree(checkpoints / "llama", model)
    write_word_tokenizer(model)
    write_reversal_set(root, {"train": 64, "eval": 16}, words=5)
    return root


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A GCS server on localhost (tests/buckets.py) for the session; STORAGE_EMULATOR_HOST
    names it to this process and every process it starts."""
    from buckets import Server

    from lora_jax import files

    server = Server(str(tmp_path_factory.mktemp("gcs")))
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    files.path(server.folder())  # this process's clients pointed at it too
    yield server
    del os.environ["STORAGE_EMULATOR_HOST"]
    server.stop()
