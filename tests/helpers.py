"""Helpers shared by several test modules."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as cc


@contextlib.contextmanager
def persistent_compilation_cache(path: Path) -> Iterator[Path]:
    """Enables JAX's on-disk compilation cache in ``path`` for the block, then restores;
    yields the folder in use, for the processes a test starts.

    Under the test suite's own cache (``tests/conftest.py``) it keeps that one, which every
    test and every process they start shares: a program compiled once is read back by all.
    """
    if jax.config.jax_compilation_cache_dir:
        yield Path(jax.config.jax_compilation_cache_dir)
        return
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    try:
        yield path
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        cc.reset_cache()


def forward_products(fn, *args) -> list[tuple]:
    """Every product (``dot_general``) and convolution of ``fn(*args)``'s program, sorted.

    Each is named by its primitive, its operands' shapes and dtypes and its parameters, so
    two programs with equal lists contract the same operands the same way: the float
    rounding of their products is the same on any CPU.
    """
    from jax.extend import core

    found = []

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                operands = tuple((v.aval.shape, str(v.aval.dtype)) for v in eqn.invars)
                params = tuple(sorted((name, repr(value)) for name, value in eqn.params.items()))
                found.append((eqn.primitive.name, operands, params))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return sorted(found)
