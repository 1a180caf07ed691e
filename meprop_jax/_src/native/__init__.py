"""Optional native CPU kernels of the per-row backward pass, through ``jax.ffi``.

``rowwise.cc`` and ``adam.cc`` hold five XLA FFI handlers. ``meprop_select``: each row's top-k
indices. ``meprop_products``: from them, ``dx`` and the compact weight gradient over the rows'
union of columns, whose math (see :mod:`meprop_jax._src.rowwise`) they share with the pure-XLA
path, column order and padding included. ``meprop_select_factors``: the per-example selection
by ``|g|`` with the kept values, for a gradient kept as factors
(:class:`meprop_jax.FactoredGrad`). ``meprop_adam_rows``: lazy Adam in place on the selected
rows of a kernel stored ``[out, in]`` (for :func:`meprop_jax.optim.sparse_adam`; see
:mod:`meprop_jax._src.fused`), or Adam on every row of it from the compact gradient (the
authors' rule, ``lazy=False``). ``meprop_adam_factored``: the same two updates from factors,
which never writes the ``[N*S, in]`` block. In the paper's setting (minibatches of 10,
``k = 20``) they save XLA's per-op overhead and pick each row's columns in about half of
``lax.top_k``'s time. Each handler splits its rows over XLA's own intra-op thread
pool (``ffi.ThreadPool``), as XLA's dense products use every core; every output element is
still computed by one thread in the sequential order, so the results do not depend on the
number of threads. ``MEPROP_JAX_NATIVE_THREADS=N`` caps them at ``N`` (read at every call).
Their speed against dense backprop is measured by ``python -m experiments.bench
--per-example`` (see the README).

The library is built on first use with the system C++ compiler (``$CXX``, else ``g++``,
``c++`` or ``clang++``) against ``jax.ffi.include_dir()`` into a cache directory outside the
package (``$MEPROP_JAX_CACHE``, else ``$XDG_CACHE_HOME/meprop_jax``, else
``~/.cache/meprop_jax``), named by a hash of the sources, the compiler, the flags, the jax
version and the CPU, so that it is rebuilt when any of them changes. Without a compiler (or
when the build fails) the pure-XLA path runs instead and one log line says why. Setting
``MEPROP_JAX_NATIVE=0`` turns the kernels off; :func:`disabled` does so within a block.

The kernels cover float32 inputs on unsharded arrays, when the union of the rows' columns is
smaller than ``out``; everything else takes the XLA path. A traced call picks its path when
it is traced: a ``jit``-compiled function keeps the path it was compiled with.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_log = logging.getLogger("meprop_jax")
_HERE = Path(__file__).parent
# Compiled together into one library; the header is part of what names a build.
_SOURCES = (_HERE / "rowwise.cc", _HERE / "adam.cc")
_HEADERS = (_HERE / "shared.h",)
# -fno-math-errno: sqrt without errno, so that the Adam loop vectorizes.
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {
    "meprop_select": "MepropSelect",
    "meprop_products": "MepropProducts",
    "meprop_adam_rows": "MepropAdamRows",
    "meprop_adam_factored": "MepropAdamFactored",
    "meprop_select_factors": "MepropSelectFactors",
}

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_switch = {"on": True}


def cache_dir() -> Path:
    """Where the compiled library lives (outside the package)."""
    if os.environ.get("MEPROP_JAX_CACHE"):
        return Path(os.environ["MEPROP_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "meprop_jax"


def _compiler() -> str | None:
    return os.environ.get("CXX") or next(
        (c for c in ("g++", "c++", "clang++") if shutil.which(c)), None
    )


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next((ln for ln in text.splitlines() if ln.startswith("model name")), text[:200])
    except OSError:
        return platform.processor() or platform.machine()


def _build() -> Path:
    """Compiles the library into the cache (once per source, compiler, flags, jax and CPU)."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    key = hashlib.sha256(
        b"\0".join(
            part if isinstance(part, bytes) else part.encode()
            for part in (
                *(f.read_bytes() for f in (*_SOURCES, *_HEADERS)),
                cxx,
                " ".join(_FLAGS),
                jax.__version__,
                _cpu(),
            )
        )
    ).hexdigest()[:16]
    lib = cache_dir() / f"meprop_rowwise-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    includes = ["-I", jax.ffi.include_dir(), "-I", str(_HERE)]
    cmd = [cxx, *_FLAGS, *includes, *map(str, _SOURCES), "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-500:]}")
    os.replace(tmp, lib)  # atomic: concurrent builders leave one whole library
    return lib


def _load() -> bool:
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                lib = ctypes.cdll.LoadLibrary(str(_build()))
                for target, symbol in _TARGETS.items():
                    capsule = jax.ffi.pycapsule(getattr(lib, symbol))
                    jax.ffi.register_ffi_target(target, capsule, platform="cpu")
                _loaded = True
            except Exception as e:  # any failure means the XLA path, never an error
                _log.warning("meprop_jax: native CPU kernels unavailable (%s); using XLA", e)
                _loaded = False
        return _loaded


def enabled() -> bool:
    """True when the native kernels are switched on and built (building them if needed)."""
    if os.environ.get("MEPROP_JAX_NATIVE", "1") == "0" or not _switch["on"]:
        return False
    return _load()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Traces within the block take the pure-XLA path (already compiled functions do not
    change: clear ``jax``'s caches or trace anew)."""
    before = _switch["on"]
    _switch["on"] = False
    try:
        yield
    finally:
        _switch["on"] = before


def _unsharded(*arrays: Array) -> bool:
    """No array is split over devices (a one-device mesh, as a data-parallel loop makes on a
    single CPU, splits nothing)."""
    for a in arrays:
        mesh = getattr(jax.typeof(a).sharding, "mesh", None)
        if mesh is not None and not mesh.empty and mesh.size > 1:
            return False
    return True


def _typed_like(out: Array, like: Array, replicated: bool = False) -> Array:
    """``out`` with the sharding type of ``like`` (or replicated over its mesh) under a
    one-device mesh, where an FFI call's results carry none; unchanged without a mesh."""
    sharding = jax.typeof(like).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return out
    spec = jax.sharding.PartitionSpec() if replicated else sharding.spec
    return jax.sharding.reshard(out, jax.sharding.NamedSharding(mesh, spec))


def runs(*arrays: Array) -> bool:
    """Whether the native kernels can take these arrays: float32, unsharded, on a CPU, with
    the kernels switched on and built."""
    return (
        jax.default_backend() == "cpu"
        and all(jnp.dtype(a.dtype) == jnp.float32 for a in arrays)
        and _unsharded(*arrays)
        and enabled()
    )


def applies(g: Array, xs, kernels) -> bool:
    """Whether the native kernels can run this backward pass (see the module docstring)."""
    return runs(g, *xs, *kernels)


def select(scores: Array, k: int, groups: int) -> Array:
    """Each row's top ``k`` per group, ``[N, groups * k]`` int32 (NaN must already be +inf)."""
    n = scores.shape[0]
    call = jax.ffi.ffi_call(
        "meprop_select",
        jax.ShapeDtypeStruct((n, groups * k), jnp.int32),
        vmap_method="sequential",
    )
    return _typed_like(call(scores, k=np.int64(k), groups=np.int64(groups)), scores)


def select_factors(g: Array, k: int, groups: int) -> tuple[Array, Array, Array]:
    """Per-example selection by ``|g|`` for a factored gradient: ``(idx [N, groups * k] int32,
    values [N, groups * k], uses [])``, ``uses`` 1 or NaN as :class:`meprop_jax.FactoredGrad`
    defines it. The indices are :func:`select`'s for the scores ``|g|`` (NaN as +inf)."""
    n = g.shape[0]
    call = jax.ffi.ffi_call(
        "meprop_select_factors",
        (
            jax.ShapeDtypeStruct((n, groups * k), jnp.int32),
            jax.ShapeDtypeStruct((n, groups * k), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.float32),
        ),
        vmap_method="sequential",
    )
    idx, values, uses = call(g, k=np.int64(k), groups=np.int64(groups))
    return _typed_like(idx, g), _typed_like(values, g), _typed_like(uses, g, True)


def products(g: Array, idx: Array, x: Array, kernel: Array, transposed: bool, block=True, dx=True):
    """``(dx [N, in], block, cols)`` for one input (see ``rowwise.cc``).

    ``block``: True for the union's compact gradient, ``block [N*S, in]`` and ``cols [N*S]``
    int32; ``"dense"`` for the whole weight gradient of an ``[out, in]`` kernel, ``[out, in]``
    (``cols`` empty; for rows that cover the layer); False for ``dx`` alone (both empty).
    """
    n, s = idx.shape
    d_in, out = x.shape[-1], g.shape[-1]
    dense = block == "dense"
    if dense and not transposed:
        raise ValueError("a dense weight gradient needs a kernel stored [out, in]")
    rows = out if dense else (n * s if block else 0)
    call = jax.ffi.ffi_call(
        "meprop_products",
        (
            jax.ShapeDtypeStruct((n if dx else 0, d_in), jnp.float32),
            jax.ShapeDtypeStruct((rows, d_in), jnp.float32),
            jax.ShapeDtypeStruct((0 if dense else rows,), jnp.int32),
        ),
        vmap_method="sequential",
    )
    grad_x, block, cols = call(
        g, idx, x, kernel, transposed=np.int64(bool(transposed)), dense_rows=np.int64(dense)
    )
    return _typed_like(grad_x, x, not dx), _typed_like(block, x, True), _typed_like(cols, x, True)


def adam_rows(
    p: Array, mu: Array, nu: Array, cols: Array, g: Array, hyper: Array, lazy: bool = True
):
    """Lazy Adam in place on the rows ``cols`` ``[K]`` of ``p``, ``mu``, ``nu`` ``[out, in]``
    from ``g`` ``[K, in]``; ``hyper`` ``[6]``: b1, b2, 1 - b1^t, 1 - b2^t, learning rate, eps.

    With ``lazy=False``, Adam on every row, the gradient being zero outside ``cols`` (which
    must then be distinct): ``optax.adam`` on the masked dense gradient.

    Returns the new ``(p, mu, nu)``, which XLA aliases to the inputs (donate them, or run
    inside ``lax.scan``, to avoid copies).
    """
    return _adam_in_place("meprop_adam_rows", (p, mu, nu), (cols, g, hyper), lazy)


def _adam_in_place(target: str, state, operands, lazy: bool):
    """``target`` on the kernel and moments ``state``, results aliased to them."""
    like = jax.ShapeDtypeStruct(state[0].shape, jnp.float32)
    call = jax.ffi.ffi_call(
        target,
        (like, like, like),
        input_output_aliases={0: 0, 1: 1, 2: 2},
        vmap_method="sequential",
    )
    new = call(*state, *operands, lazy=np.int64(bool(lazy)))
    return tuple(_typed_like(a, old) for a, old in zip(new, state, strict=True))


def adam_factored(
    p: Array,
    mu: Array,
    nu: Array,
    values: Array,
    idx: Array,
    x: Array,
    hyper: Array,
    lazy: bool = True,
):
    """Adam in place on a kernel ``p`` ``[out, in]`` and its moments from a factored gradient.

    Row ``c`` of the gradient is the sum, over the slots ``(n, s)`` with ``idx[n, s] == c`` in
    order, of ``values[n, s] * x[n]``; ``values`` and ``idx`` (int32) are ``[N, S]`` and ``x``
    ``[N, in]``; an index outside ``[0, out)`` names no row. ``hyper`` ``[7]``: that of
    :func:`adam_rows`, then the clip bound (``inf`` for none). ``lazy``: only the rows some
    slot names move; otherwise every row moves, with a zero gradient where none does.

    Returns the new ``(p, mu, nu)``, aliased to the inputs as in :func:`adam_rows`.
    """
    return _adam_in_place("meprop_adam_factored", (p, mu, nu), (values, idx, x, hyper), lazy)
