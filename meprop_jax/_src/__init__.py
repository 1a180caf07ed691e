"""Framework-free internals of meprop_jax (no Flax imports)."""
