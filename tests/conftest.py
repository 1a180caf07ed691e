"""Test configuration: strict dtype promotion, eight simulated CPU devices, and one on-disk
compilation cache for the whole run."""

import getpass
import os
import tempfile
from pathlib import Path

import jax
import pytest

# The tests' programs are tiny and compiled once or twice each, so the time goes into
# compiling them: XLA's CPU backend at its lowest optimization level compiles about twice as
# fast (the whole suite uses half the CPU time). It changes how fast the code runs, not what it
# computes. Set before the backend starts, and inherited by the experiments the tests start.
# MEPROP_TEST_XLA_DEFAULT=1 leaves XLA at its default level, as users run the code: .ci/run's
# second opinion runs the tests marked ``xla_default`` so (see XLA_DEFAULT_MODULES).
XLA_DEFAULT = os.environ.get("MEPROP_TEST_XLA_DEFAULT") == "1"
if not XLA_DEFAULT and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

# The modules marked ``xla_default``: those that test what the optimizing compiler rewrites,
# the linear op's layout barriers (lax.optimization_barrier) and sharded products, and the
# in-place column updates of donated buffers by the compact optimizers, the Linen TrainState
# and the NNX Optimizer. The layers above them run the same ops: their tests would add
# compile time, not coverage of what the optimizing passes change.
XLA_DEFAULT_MODULES = frozenset(
    {
        "tests/meprop_jax/_src/test_linear.py",
        "tests/meprop_jax/test_optim.py",
        "tests/meprop_jax/linen/test_train_state.py",
        "tests/meprop_jax/nnx/test_optimizer.py",
    }
)
_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.resolve().relative_to(_ROOT).as_posix() in XLA_DEFAULT_MODULES:
            item.add_marker(pytest.mark.xla_default)


# Must run before any JAX computation so that the sharding tests see eight devices.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Many tests build fresh jitted closures of the same programs (every CLI run, every model
# test), and the test workers are separate processes: a shared on-disk cache compiles each
# program once. XLA keys an entry by the program and the compiler, so a hit is the same code.
# Every program is kept, however quickly it compiled: the operations that tests run eagerly
# compile one small program each, hundreds per test, and reading one back takes a few
# milliseconds against tens to compile it (tagging's model tests and parsing's meSimp tests,
# run again: 72.7 s with a 0.1 s threshold, 48.7 s with none).
_CACHE = Path(tempfile.gettempdir()) / f"meprop-jax-tests-{getpass.getuser()}" / "jax-cache"
_SETTINGS = {
    "jax_compilation_cache_dir": str(_CACHE),
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}
for _name, _value in _SETTINGS.items():
    jax.config.update(_name, _value)
    os.environ[_name.upper()] = str(_value)  # and the experiments the tests start as processes
