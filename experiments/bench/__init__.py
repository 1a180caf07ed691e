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
* ``mesimp`` (``--mesimp [--mesimp-sizes 154,154]``): the MNIST MLP pruned by meSimp, its
  training step (padded, masked, recording) against the full network's dense and meProp steps
  and forward pass, and decoding a test set with the full, padded and exported models. See
  :mod:`experiments.bench.mesimp`.
* ``conv`` (``--conv [--conv-grid BxSIZExINxOUTxK]``): one 3x3 convolution's backward pass,
  dense and meProp over ``k`` output channels, with the forward pass. See
  :mod:`experiments.bench.conv`.

Modules: :mod:`~experiments.bench.harness` (interleaved timing, compilation, memory
figures), :mod:`~experiments.bench.layer`, :mod:`~experiments.bench.steps`,
:mod:`~experiments.bench.mesimp`, :mod:`~experiments.bench.conv`,
:mod:`~experiments.bench.report` (tables, JSON, plots) and :mod:`~experiments.bench.cli` (the
flags, ``--reuse-memory`` and ``main``).

Examples:
  python -m experiments.bench --out bench_out/layer.json
  python -m experiments.bench --paper-table7 --with-update --plot bench_out/table7.png
  python -m experiments.bench --steps --plot bench_out/steps.png
  python -m experiments.bench --mesimp --out bench_out/mesimp.json --plot bench_out/mesimp.png
  python -m experiments.bench --conv --out bench_out/conv.json --plot bench_out/conv.png
"""
