"""Shared fixtures: one small synthetic Imagenette written once per session (and prepared at 64 px), a cloud trash."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shared_data import trash_safe
from shared_data.prepare import PreparedData, prepare_data
from shared_data.synthetic import write_synthetic
from tests import stacks

SYNTHETIC_SIZE = "tiny"  # 20 train + 10 val images per class
SYNTHETIC_SEED = 0


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --data-dir holding the tiny synthetic dataset (seed 0): pass it with synthetic_size="tiny"."""
    data_dir = tmp_path_factory.mktemp("data")
    write_synthetic(data_dir, size=SYNTHETIC_SIZE, seed=SYNTHETIC_SEED, progress=False)
    return data_dir


@pytest.fixture(scope="session")
def prepared_data(synthetic_data_dir: Path) -> PreparedData:
    """The tiny synthetic dataset decoded at img_size 64 (stored 73 px): 200 train, 100 val images."""
    return prepare_data("synthetic", synthetic_data_dir, 64, seed=SYNTHETIC_SEED, synthetic_size=SYNTHETIC_SIZE,
                        progress=False)


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the session's Flax runs, in-process and in subprocesses: compile each step once."""
    import jax
    folder = str(tmp_path_factory.mktemp("jax-cache"))
    from jax._src import compilation_cache as cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (folder, 0, 0)):
        jax.config.update(name, value)
    cache.reset_cache()
    yield {"JAX_COMPILATION_CACHE_DIR": folder, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    for name, value in before.items():
        jax.config.update(name, value)
    cache.reset_cache()


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test, restored after it (tests.stacks.torch_threads)."""
    with stacks.torch_threads(1):
        yield


@pytest.fixture
def trash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cloud drive's trash: whatever trash_safe unlinks is moved into this folder instead of freed."""
    folder = tmp_path / "trash"
    folder.mkdir()
    counter = iter(range(10**6))

    def move_to_trash(path):
        shutil.move(os.fspath(path), folder / f"{next(counter)}-{Path(path).name}")

    monkeypatch.setattr(trash_safe, "_unlink", move_to_trash)
    return folder
