"""MNIST with meProp: an MLP trained by the shared loop (``python -m experiments.mnist``).

Modules: :mod:`~experiments.mnist.data` (the IDX reader and verified download),
:mod:`~experiments.mnist.task` (settings, minibatches, the loss),
:mod:`~experiments.mnist.cnn` (``--model cnn``) and :mod:`~experiments.mnist.cli` (the flags
and ``main``).

The model is the paper's MLP, 784-500-500-10 by default: ``--layers`` hidden layers of
``--hidden`` units, each ``meprop_jax.Dense`` -> ReLU -> optional inverted dropout, then a
10-way output layer. meProp (top-k of the output gradient of each hidden linear layer) is on
by default with ``--k 30 --mode unified`` and minibatches of 50: the unified (batch-shared)
selection is the variant that turns into small dense products on an accelerator, and k = 30
is within the paper's MNIST range (k = 10-30 for h = 500). ``--k 0`` is ordinary backprop;
``--mode per-example`` is the paper's CPU variant (its CPU runs used minibatches of 10);
``--mode random`` the random-k control; ``--kdim`` the "k-dimensional network" baseline, a
dense MLP whose hidden size is k (``--hidden`` and ``--mode`` do not apply to it and are
refused). The output layer stays dense unless ``--k-output`` is set.

``--sparse-update`` (a loop flag, see :mod:`experiments.loop`) builds the hidden layers with
``meprop_jax.Dense(sparse_update=True)``: their kernels' gradients stay compact and the
column-sparse ``--optimizer`` updates only the selected columns (Adam becomes lazy Adam). The
output layer (and ``--k-output``) keeps the masked dense gradient. It needs ``--k >= 1``.
``--kernel-grad compact`` builds the same layers but keeps the authors' update: the optimizer
moves every weight as it would on the masked gradient (``sparse_adam(lazy=False)``), without
a dense kernel gradient. ``--kernel-grad factored`` keeps those gradients as factors (each
row's kept values, their columns and the input rows), which the native Adam pass sums row by
row. It is the default (``--kernel-grad auto``) where the kernels are stored ``[out, in]``
(``--kernel-layout auto`` for the per-row modes), the fastest form there;
``--kernel-grad masked`` builds the dense masked gradient instead.

``--model cnn`` trains :class:`~experiments.mnist.cnn.CNN` instead: two 3x3
``meprop_jax.Conv`` layers (``--channels``, default 32,64), each -> ReLU -> 2x2 max pooling,
then the MLP above as its head. Each convolution keeps ``--k-conv`` output channels (default
``--k``) in the backward pass; ``--kdim``, ``--sparse-update``, ``--error-feedback`` and
``--mesimp`` are refused with it.

Initialisation is Flax's default for ``Dense`` (LeCun-normal kernels, zero biases); the
authors' C# code drew kernels from N(0, sqrt(6 / (fan_in + fan_out))). The data split is the
paper's: the first 5,000 training images are dev, the remaining 55,000 train, plus the
10,000 test images; pixels are scaled to [0, 1].

Examples:
  python -m experiments.mnist --epochs 1 --limit-train 2000
  python -m experiments.mnist --k 0                      # the dense baseline
  python -m experiments.mnist --optimizer adagrad        # lr 0.1, as in the paper
  python -m experiments.mnist --sparse-update            # column-sparse (lazy) Adam
  python -m experiments.mnist --model cnn --k 30 --k-conv 8
"""
