"""The library installs and imports with jax, jaxlib, flax, optax and numpy alone."""

import subprocess
import sys
import tomllib
from pathlib import Path

import meprop_jax

REPO = Path(__file__).resolve().parents[2]
LIBRARY_DEPENDENCIES = {"jax", "jaxlib", "flax", "optax", "numpy"}
EXPERIMENT_ONLY = ("matplotlib", "orbax", "tqdm")


def test_import_pulls_in_no_experiment_dependency():
    # A fresh interpreter: the test session itself has imported the experiments' packages.
    code = (
        "import sys, meprop_jax, meprop_jax.linen, meprop_jax.nnx, meprop_jax.optim\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {EXPERIMENT_ONLY!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


def test_declared_dependencies_are_the_library_five():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {
        req.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip()
        for req in project["dependencies"]
    }
    assert names == LIBRARY_DEPENDENCIES
    extras = project["optional-dependencies"]
    for package in ("orbax-checkpoint", "tqdm", "matplotlib"):
        assert any(req.startswith(package) for req in extras["experiments"]), package


def test_license_file_exists_and_matches_the_declared_licence():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"]["text"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text()
    assert "Version 2.0" in (REPO / "LICENSE").read_text()


def test_public_api_is_exported():
    for name in meprop_jax.__all__:
        assert hasattr(meprop_jax, name), name
