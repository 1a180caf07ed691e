"""A task trained in both kernel layouts on the XLA path, for the tasks' layout tests."""

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from meprop_jax._src import native


def train_in_both_layouts(
    run_main: Callable[[list], int],
    load_run: Callable[[Path], tuple],
    args: Sequence[Any],
    tmp_path: Path,
) -> tuple[dict[str, dict], dict[str, Any]]:
    """Trains ``args`` with ``--kernel-layout in_out`` and ``out_in`` under
    ``MEPROP_JAX_NATIVE``-off (the same math in both layouts) and checks that each run saved
    and reloads its layout.

    Returns:
      ``(results, variables)``: each layout's ``results.json`` and saved variables (the third
      item of the task's ``load_run``).
    """
    results, variables = {}, {}
    for layout in ("in_out", "out_in"):
        out = tmp_path / layout
        with native.disabled():
            assert run_main([*args, "--kernel-layout", layout, "--out", out]) == 0
        results[layout] = json.loads((out / "results.json").read_text())
        assert results[layout]["config"]["kernel_layout"] == layout
        _, model, variables[layout], _ = load_run(out)
        assert model.kernel_layout == layout
    return results, variables
