"""Tests of experiments.loop.config: optimizers, devices and batch sizes."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.common import ConfigError
from experiments.loop import config


def test_adagrad_is_the_papers() -> None:
    """w -= lr * g / sqrt(sum g^2 + 1e-6), accumulator from 0; clipping first."""
    tx = config.make_optimizer("adagrad", 0.1, clip=5.0)
    params = jnp.zeros(2)
    state = tx.init(params)
    grads = jnp.array([10.0, 0.5])
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = tx.update(grads, state, params)
    clipped = np.array([5.0, 0.5])
    np.testing.assert_allclose(updates, -0.1 * clipped / np.sqrt(clipped**2 + 1e-6), rtol=1e-6)
    assert config.TrainConfig(out=Path("x"), optimizer="adagrad").learning_rate == 0.1
    assert config.TrainConfig(out=Path("x"), optimizer="sgd", lr=0.5).learning_rate == 0.5


def test_check_divisible_names_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"--batch-size 50 .* 8 devices: pass --devices 5 "):
        config.check_divisible(50, 8)
    with pytest.raises(ConfigError, match=r"--eval-batch-size 9 .*--devices 3 .*multiple of 4"):
        config.check_divisible(9, 4, "--eval-batch-size")
    config.check_divisible(48, 8)


def test_default_devices_are_the_most_that_divide_the_batches() -> None:
    assert jax.local_device_count() == 8
    assert config.resolve_devices(None) == 8
    assert config.resolve_devices(None, [50]) == 5
    assert config.resolve_devices(None, [48, 100]) == 4
    assert config.resolve_devices(None, [6]) == 6
    assert config.resolve_devices(None, [7, 5]) == 1
    assert config.resolve_devices(3, [50]) == 3  # an explicit count is not second-guessed
    with pytest.raises(ConfigError, match="--devices must be between 1 and 8"):
        config.resolve_devices(9)


def test_eval_batch_rounds_up_to_the_devices() -> None:
    assert config.resolve_eval_batch(None, 1000, 3) == 1002
    assert config.resolve_eval_batch(12, 1000, 3) == 12
    with pytest.raises(ConfigError, match="--eval-batch-size 10 cannot be split over 3"):
        config.resolve_eval_batch(10, 1000, 3)


def test_timing_batches_default_is_the_documented_one() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    config.add_train_arguments(parser)
    args = parser.parse_args([])
    cfg = config.train_config_from_args(args, Path("runs/x"))
    assert cfg.timing_batches == config.DEFAULT_TIMING_BATCHES == 20
    assert cfg == config.TrainConfig(out=Path("runs/x"))
