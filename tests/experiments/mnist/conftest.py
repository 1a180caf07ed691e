"""Fixtures shared by the MNIST command-line tests: tiny IDX files and one XLA cache."""

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from experiments.mnist import task as mnist_task
from experiments.mnist.data import FileSpec, load_mnist
from tests.experiments.mnist.test_cli import write_tiny_mnist
from tests.helpers import persistent_compilation_cache


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One XLA cache for a module and its subprocesses (they compile the same programs): the
    suite's own, which the other modules' runs have filled too."""
    with persistent_compilation_cache(tmp_path_factory.getbasetemp() / "jax-cache") as path:
        yield path


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, FileSpec]]:
    folder = tmp_path_factory.mktemp("tiny") / "mnist"
    return folder, write_tiny_mnist(folder)


@pytest.fixture
def tiny_dir(tiny_files: tuple[Path, dict[str, FileSpec]], monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny files, with the experiment's reader told to accept their shapes."""
    folder, specs = tiny_files
    monkeypatch.setattr(mnist_task, "load_mnist", functools.partial(load_mnist, expected=specs))
    return folder
