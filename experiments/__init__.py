"""Experiments and benchmarks for meprop_jax."""
