"""Fixtures shared by the loop's tests: a compilation cache and reference runs."""

from pathlib import Path
from typing import Any

import pytest

from experiments.loop.driver import train
from experiments.loop.task import RunResult
from tests.experiments.loop.toy import ToyTask, config, quiet
from tests.helpers import persistent_compilation_cache


@pytest.fixture(scope="package", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A persistent XLA cache for these tests: the runs compile the same programs again and
    again (every ``train`` call builds fresh jitted closures)."""
    with persistent_compilation_cache(tmp_path_factory.getbasetemp() / "jax-cache"):
        yield


@pytest.fixture(scope="package")
def reference(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """An uninterrupted 3-epoch run with timing probes."""
    out: Path = tmp_path_factory.mktemp("reference")
    return train(ToyTask(), config(out, epochs=3, timing_batches=3), log=quiet)


@pytest.fixture(scope="package")
def sparse_reference(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """An uninterrupted 3-epoch compact run (lazy Adam) with timing probes."""
    out = tmp_path_factory.mktemp("sparse-reference")
    return train(
        ToyTask(sparse_update=True),
        config(out, epochs=3, timing_batches=3, sparse_update=True),
        log=quiet,
    )
