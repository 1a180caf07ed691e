"""``--model cnn``: the flags, the model the settings build, meProp gradients of its
convolutions, and a short run on the real MNIST."""

import doctest
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from experiments.common.models import MLP
from experiments.mnist import cli, cnn
from experiments.mnist.data import Mnist
from experiments.mnist.task import MnistSettings, MnistTask
from tests.helpers import persistent_compilation_cache

REAL_DATA_DIR = os.environ.get("MEPROP_DATA_DIR")


def settings(*argv: str) -> MnistSettings:
    return cli.settings_from_args(cli.build_parser().parse_args(list(argv)), 1)


def test_doctests() -> None:
    result = doctest.testmod(cnn)
    assert result.attempted > 0 and result.failed == 0


def test_flags_build_the_cnn_and_its_run_folder() -> None:
    s = settings("--model", "cnn", "--k", "8")
    assert (s.network, s.channels, s.k_conv, s.k, s.hidden, s.layers) == (
        "cnn",
        (32, 64),
        8,
        8,
        500,
        2,
    )
    model = s.model()
    assert isinstance(model, cnn.CNN) and model.hidden == (500, 500) and model.k_conv == 8
    args = cli.build_parser().parse_args([])
    assert str(cli.default_out(s, args)) == "runs/mnist-cnn32x64kc8-k8-unified-h500x2-adam-b50-s0"
    s = settings("--model", "cnn", "--k", "0", "--channels", "4,8", "--k-conv", "2")
    assert (s.channels, s.k_conv, s.k) == ((4, 8), 2, 0)
    assert str(cli.default_out(s, args)).startswith("runs/mnist-cnn4x8kc2-dense-")
    assert settings().network == "mlp" and type(settings().model()) is MLP


def _images(n: int, side: int) -> Mnist:
    x = np.random.default_rng(0).random((n, side * side), dtype=np.float32)
    y = np.arange(n, dtype=np.int32) % 10
    return Mnist(x, y, x, y, x, y, "x")


def _config_keys(s: MnistSettings) -> set[str]:
    return set(MnistTask(_images(1, 28), s).config())


def test_configuration_names_the_cnn_only_for_the_cnn() -> None:
    cnn_keys = {"network", "channels", "k_conv"}
    assert cnn_keys <= _config_keys(settings("--model", "cnn", "--k", "8"))
    assert not cnn_keys & _config_keys(settings())


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--model", "cnn", "--sparse-update"], "--sparse-update"),
        (["--model", "cnn", "--kdim", "--k", "8"], "--kdim"),
        (["--model", "cnn", "--error-feedback"], "--error-feedback"),
        (["--model", "cnn", "--mesimp", "--k", "8"], "--mesimp"),
        (["--model", "cnn", "--k", "40"], "--k-conv (from --k) 40"),
        (["--model", "cnn", "--k-conv", "-1"], "--k-conv must be >= 0"),
        (["--model", "cnn", "--channels", "4,x"], "--channels"),
        (["--channels", "4,8"], "--channels configures --model cnn"),
        (["--k-conv", "2"], "--k-conv configures --model cnn"),
    ],
)
def test_flags_that_make_no_sense_with_the_cnn_are_refused(
    argv: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "results.json").exists()


def test_convolution_gradients_keep_the_top_k_channels() -> None:
    """The second convolution's kernel gradient is the dense one of its output cotangent with
    all but the k channels of largest sum |g| (over batch and space) zeroed; the first
    convolution's touches k channels too."""
    k_conv, side, batch = 2, 8, 3
    s = MnistSettings(network="cnn", channels=(4, 6), k_conv=k_conv, hidden=16, layers=1, k=4)
    data = _images(batch, side)
    task = MnistTask(data, s)
    params = jax.jit(task.init)(jax.random.key(0))
    x, y = jnp.asarray(data.train_x), jnp.asarray(data.train_y)
    batch_ = {"x": x, "y": y, "mask": jnp.ones(batch, jnp.float32)}
    grad_fn = jax.jit(jax.grad(lambda p: task.loss_fn(p, batch_, jax.random.key(1), True)[0]))
    grads = grad_fn(params)["params"]
    p = params["params"]

    # The cotangent of the second convolution's output, from the same (meProp) head.
    def conv(name, features, h):
        return nn.Conv(features, cnn.KERNEL_SIZE).apply({"params": p[name]}, h)

    h0 = nn.max_pool(nn.relu(conv("conv_0", 4, x.reshape(batch, side, side, 1))), (2, 2), (2, 2))
    y1 = conv("conv_1", 6, h0)

    def loss_from_y1(y1):
        feats = nn.max_pool(nn.relu(y1), (2, 2), (2, 2)).reshape(batch, -1)
        head = MLP(hidden=(16,), k=4, num_classes=10)
        logits = head.apply({"params": p["head"]}, feats, True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    g1 = jax.grad(loss_from_y1)(y1)
    kept = np.argsort(-np.abs(np.asarray(g1)).sum(axis=(0, 1, 2)), kind="stable")[:k_conv]
    g1_kept = jnp.where(jnp.isin(jnp.arange(6), kept), g1, 0.0)
    (dw_ref,) = jax.vjp(lambda w: _conv_w(h0, w), p["conv_1"]["kernel"])[1](g1_kept)
    np.testing.assert_allclose(grads["conv_1"]["kernel"], dw_ref, rtol=1e-5, atol=1e-6)
    for name in ("conv_0", "conv_1"):
        touched = np.any(np.asarray(grads[name]["kernel"]) != 0, axis=(0, 1, 2))
        assert touched.sum() == k_conv
        assert np.all(np.asarray(grads[name]["bias"]) != 0)  # the bias gradient stays dense
    hidden = np.any(np.asarray(grads["head"]["hidden_0"]["kernel"]) != 0, axis=0)
    assert hidden.sum() == 4


def _conv_w(h, w):
    return jax.lax.conv_general_dilated(
        h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.skipif(not REAL_DATA_DIR, reason="set MEPROP_DATA_DIR to the folder with mnist/")
def test_tiny_cnn_learns_a_few_hundred_real_images(tmp_path: Path) -> None:
    """End to end through the command line (about a minute on a loaded 2-core machine, most
    of it compiling and evaluating 15,000 images): meProp convolutions and head, 300 images."""
    argv = ["--model", "cnn", "--channels", "4,8", "--k-conv", "2", "--hidden", "32"]
    argv += ["--layers", "1", "--k", "4", "--limit-train", "300", "--batch-size", "10"]
    argv += ["--epochs", "3", "--timing-batches", "0", "--devices", "1", "--lr", "3e-3"]
    argv += ["--data-dir", str(REAL_DATA_DIR), "--out", str(tmp_path / "run")]
    with persistent_compilation_cache(tmp_path / "cache"):
        assert cli.main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    cfg = results["config"]
    assert cfg["network"] == "cnn" and cfg["channels"] == [4, 8] and cfg["k_conv"] == 2
    assert cfg["train_size"] == 300 and cfg["test_size"] == 10000
    assert results["status"] == "complete" and len(results["epochs"]) == 3
    assert results["best"]["test_acc"] > 30.0  # chance is 10%
