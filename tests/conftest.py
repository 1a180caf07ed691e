"""Test configuration: strict dtype promotion and eight simulated CPU devices."""

import jax

# Must run before any JAX computation so that the sharding tests see eight devices.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
