"""Test configuration: strict dtype promotion, eight simulated CPU devices, and one on-disk
compilation cache for the whole run."""

import getpass
import os
import tempfile
from pathlib import Path

import jax

# The tests' programs are tiny and compiled once or twice each, so the time goes into
# compiling them: XLA's CPU backend at its lowest optimization level compiles about twice as
# fast (the whole suite uses half the CPU time). It changes how fast the code runs, not what it
# computes. Set before the backend starts, and inherited by the experiments the tests start.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

# Must run before any JAX computation so that the sharding tests see eight devices.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Many tests build fresh jitted closures of the same programs (every CLI run, every model
# test), and the test workers are separate processes: a shared on-disk cache compiles each
# program once. XLA keys an entry by the program and the compiler, so a hit is the same code.
_CACHE = Path(tempfile.gettempdir()) / f"meprop-jax-tests-{getpass.getuser()}" / "jax-cache"
_SETTINGS = {
    "jax_compilation_cache_dir": str(_CACHE),
    "jax_persistent_cache_min_compile_time_secs": 0.1,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}
for _name, _value in _SETTINGS.items():
    jax.config.update(_name, _value)
    os.environ[_name.upper()] = str(_value)  # and the experiments the tests start as processes
