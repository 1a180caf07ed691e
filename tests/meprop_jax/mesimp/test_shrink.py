"""Examples of meSimp's shrinking module (its behaviour is tested through ``mesimp``)."""

import doctest
import importlib

_mesimp_shrink = importlib.import_module("meprop_jax.mesimp.shrink")


def test_doctests():
    result = doctest.testmod(_mesimp_shrink, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
