"""The LSTM tagger's kernels stored ``[out, in]`` (``--kernel-layout``): the flag's rule,
training that does not depend on the layout, prediction and resumption in either layout."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.tagging import cli
from experiments.tagging.predict import load_run
from meprop_jax.linen import TRANSPOSED_KERNEL as KERNEL_T
from tests.experiments.common.layouts import train_in_both_layouts
from tests.experiments.tagging.test_cli import expect_error
from tests.experiments.tagging.toy import COMMON, run_main, toy_sentences, write_conllx


def settings(*argv: str):
    return cli.settings_from_args(cli.build_parser().parse_args(list(argv)), devices=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list:
    d = tmp_path_factory.mktemp("conllx")
    return [
        "--train-file", write_conllx(d / "train.conllx", toy_sentences(24, 0)),
        "--dev-file", write_conllx(d / "dev.conllx", toy_sentences(6, 2)),
        "--test-file", write_conllx(d / "test.conllx", toy_sentences(6, 3)),
    ]  # fmt: skip


def test_kernel_layout_auto_is_out_in_for_per_row_lstms_only() -> None:
    assert settings("--k", "5", "--mode", "per-example").kernel_layout == "out_in"
    assert settings("--k", "5", "--mode", "random").kernel_layout == "out_in"
    for argv in (
        ("--k", "5"),  # unified, the default mode
        ("--k", "0", "--mode", "per-example"),
        ("--k", "5", "--mode", "per-example", "--mesimp"),
        ("--k", "5", "--mode", "per-example", "--kernel-layout", "in_out"),
        ("--model", "transformer", "--mode", "per-example"),
    ):
        assert settings(*argv).kernel_layout == "in_out", argv
    s = settings("--k", "5", "--kernel-layout", "out_in")
    assert s.kernel_layout == "out_in" and s.model_json()["kernel_layout"] == "out_in"
    # Runs in the stock layout keep their vocab.json (and so their --resume) as before.
    assert "kernel_layout" not in settings("--k", "5").model_json()


def test_out_in_is_refused_where_it_does_not_apply(corpus, tmp_path, capsys) -> None:
    args = [*corpus, "--out", tmp_path / "run"]
    expect_error(
        [*args, "--model", "transformer", "--kernel-layout", "out_in"], capsys,
        "--kernel-layout out_in", "--model transformer",
    )  # fmt: skip
    expect_error(
        [*args, "--k", 2, "--mesimp", "--kernel-layout", "out_in"], capsys,
        "--mesimp", "--kernel-layout out_in",
    )  # fmt: skip


@pytest.mark.slow
def test_training_in_out_in_equals_training_in_in_out(corpus, tmp_path, capsys) -> None:
    args = [*corpus, *COMMON, "--k", 2, "--mode", "per-example", "--devices", 1]
    results, saved = train_in_both_layouts(run_main, load_run, args, tmp_path)
    params = {layout: v.get("params", v) for layout, v in saved.items()}
    cell_in, cell_out = params["in_out"]["lstm"], params["out_in"]["lstm"]
    assert set(cell_in) == set(cell_out)  # gates by name; their kernels differ in shape
    transposed = 0
    for gate in cell_in:
        names = {"kernel": KERNEL_T} if KERNEL_T in cell_out[gate] else {}
        assert set(cell_out[gate]) == {names.get(n, n) for n in cell_in[gate]}
        for name, a in cell_in[gate].items():
            b = cell_out[gate][names.get(name, name)]
            b = b.T if name in names else b
            transposed += name in names
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=f"{gate}/{name}")
    assert transposed > 0
    for a, b in zip(results["in_out"]["epochs"], results["out_in"]["epochs"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (b["dev_acc"], b["test_acc"]) == pytest.approx((a["dev_acc"], a["test_acc"]))
    # --predict rebuilds the saved layout and tags as the run did.
    capsys.readouterr()
    predicted = tmp_path / "predicted.conllx"
    test_file = corpus[corpus.index("--test-file") + 1]
    run = ["--predict", test_file, "--out", tmp_path / "out_in", "--predict-output", predicted]
    assert run_main(run) == 0
    agreement = float(capsys.readouterr().out.rsplit(": ", 1)[1].rstrip().rstrip("%"))
    assert agreement == pytest.approx(results["out_in"]["best"]["test_acc"], abs=0.006)


@pytest.mark.slow
def test_resume_under_auto_keeps_the_layout_the_run_started_with(corpus, tmp_path) -> None:
    # A per-example run started in [in, out] (as before auto picked [out, in]) goes on so.
    out = tmp_path / "run"
    args = [*corpus, *COMMON, "--k", 2, "--mode", "per-example", "--devices", 1, "--out", out]
    assert run_main([*args, "--epochs", 1, "--kernel-layout", "in_out"]) == 0
    assert run_main([*args, "--resume"]) == 0
    results = json.loads(Path(out / "results.json").read_text())
    assert results["config"]["kernel_layout"] == "in_out"
    assert [e["epoch"] for e in results["epochs"]] == [1, 2]
