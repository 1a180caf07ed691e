"""``--adaptive-k`` of the MNIST command line: flags, run folder, the mean chosen k per epoch."""

import json
from pathlib import Path

import pytest

from experiments.mnist import cli
from meprop_jax import AdaptiveK
from tests.experiments.mnist.test_cli import tiny_args


def _settings(*argv: str):
    return cli.settings_from_args(cli.build_parser().parse_args(list(argv)), devices=1)


def test_flags_make_the_rule_and_name_the_run_folder() -> None:
    assert _settings().adaptive is None
    settings = _settings("--adaptive-k", "--adaptive-k-mass", "0.8", "--adaptive-k-min", "3")
    assert settings.adaptive == AdaptiveK(mass=0.8, k_min=3)
    assert settings.model().adaptive == AdaptiveK(mass=0.8, k_min=3)
    assert _settings("--adaptive-k").adaptive == AdaptiveK(mass=0.9, k_min=1)
    argv = ["--adaptive-k", "--error-feedback", "0.5"]
    out = cli.default_out(_settings(*argv), cli.build_parser().parse_args(argv))
    assert out == Path("runs/mnist-k30-unified-fb0.5-ak0.9m1-h500x2-adam-b50-s0")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--adaptive-k", "--k", "0"], "--adaptive-k needs meProp layers"),
        (["--adaptive-k", "--kdim"], "--adaptive-k needs meProp layers"),
        (["--adaptive-k", "--mode", "per-example"], "--adaptive-k needs --mode unified"),
        (["--adaptive-k", "--adaptive-k-mass", "0"], "--adaptive-k-mass must be in (0, 1]"),
        (["--adaptive-k", "--adaptive-k-min", "31"], "--adaptive-k-min must be in 1..--k (30)"),
        (["--adaptive-k-min", "3"], "--adaptive-k-min only apply with --adaptive-k"),
        (["--adaptive-k", "--sparse-update"], "--adaptive-k does not combine with --sparse-update"),
        (["--adaptive-k", "--mesimp"], "--adaptive-k does not combine with --mesimp"),
    ],
)
def test_bad_flags_name_the_flag(argv, message, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_a_run_reports_the_mean_chosen_k(
    tiny_dir: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ("--mode", "unified", "--adaptive-k", "--adaptive-k-mass", "0.3", "--error-feedback")
    args = tiny_args(tiny_dir, tmp_path, *extra)
    args[args.index("--chunk-steps") + 1] = "100"  # one chunk per epoch: fewer compiles
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["adaptive"] == {"mass": 0.3, "k_min": 1}
    for epoch, record in enumerate(results["epochs"], start=1):
        (event,) = record["events"]
        assert event["epoch"] == epoch
        means = event["adaptive_k_mean"]
        assert set(means) == {"hidden_0", "hidden_1"}
        assert all(1.0 <= k <= 4.0 for k in means.values())
    # 30% of a 16-unit layer's gradient mass often needs fewer than its k=4 columns.
    chosen = [k for r in results["epochs"] for k in r["events"][0]["adaptive_k_mean"].values()]
    assert min(chosen) < 4.0
    assert "epoch 2: mean adaptive k hidden_0" in capsys.readouterr().out
