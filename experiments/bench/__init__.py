"""Wall-clock benchmarks of meProp's backward pass against dense backprop.

Run as ``python -m experiments.bench``. Sections:

* ``layer`` (default): one linear layer's backward pass -- dense, each meProp mode and the
  forward pass alone -- on a grid of ``(batch, in, out, k)``; with ``--with-update`` its
  backward and Adam update (masked dense gradient + optax Adam, compact gradient +
  ``sparse_adam``); ``--paper-table7`` times the paper's GPU shape beside its published
  speedups. See :mod:`experiments.bench.layer`.
* ``steps`` (``--steps``): whole training steps of the MNIST MLP with the training loop's
  optimizers, the bound dense / forward and the update estimates. See
  :mod:`experiments.bench.steps`.

Modules: :mod:`~experiments.bench.harness` (interleaved timing, compilation, memory
figures), :mod:`~experiments.bench.layer`, :mod:`~experiments.bench.steps`,
:mod:`~experiments.bench.report` (tables, JSON, plots) and :mod:`~experiments.bench.cli` (the
flags, ``--reuse-memory`` and ``main``).

Examples:
  python -m experiments.bench --out bench_out/layer.json
  python -m experiments.bench --paper-table7 --with-update --plot bench_out/table7.png
  python -m experiments.bench --steps --plot bench_out/steps.png
"""
