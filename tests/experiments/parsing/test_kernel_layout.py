"""The parser's hidden kernel stored ``[out, in]`` (``--kernel-layout``): the flag's rule, the
fast decoder in both layouts, and training that does not depend on the layout."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meprop_jax
from experiments.loop import ConfigError
from experiments.parsing import main as parsing
from experiments.parsing.model import ParserMLP, fast_logits, hidden_kernel, hidden_tables
from tests.experiments.common.layouts import train_in_both_layouts
from tests.experiments.parsing.test_cli import expect_error, files, run_main, write_toy

KERNEL_T = meprop_jax.linen.TRANSPOSED_KERNEL


def settings(*argv: str):
    return parsing.settings_from_args(parsing.build_parser().parse_args(list(argv)), devices=1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("toy")
    return {
        "train": write_toy(d / "train.conllu", 40, 0),
        "dev": write_toy(d / "dev.conllu", 6, 1),
        "test": write_toy(d / "test.conllu", 6, 2),
    }


def test_kernel_layout_auto_is_out_in_for_per_row_modes_only() -> None:
    assert settings().kernel_layout == "out_in"  # the default run: per-example, k = 20
    assert settings("--mode", "random").kernel_layout == "out_in"
    assert settings("--mode", "unified").kernel_layout == "in_out"
    assert settings("--k", "0").kernel_layout == "in_out"
    assert settings("--kdim").kernel_layout == "in_out"
    assert settings("--mesimp").kernel_layout == "in_out"
    assert settings("--kernel-layout", "in_out").kernel_layout == "in_out"
    s = settings("--mode", "unified", "--kernel-layout", "out_in")
    assert s.kernel_layout == "out_in"
    vocab = parsing.Vocabularies.build([], 1)
    assert s.model(vocab).kernel_layout == "out_in"
    assert s.model_json()["kernel_layout"] == "out_in"  # load_run rebuilds the saved tree


def test_mesimp_refuses_out_in_in_one_line(toy, tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match=r"--mesimp.*--kernel-layout out_in"):
        settings("--mesimp", "--kernel-layout", "out_in")
    args = [*files(toy), "--mesimp", "--kernel-layout", "out_in", "--out", tmp_path]
    err = expect_error(args, capsys, "--mesimp", "--kernel-layout out_in")
    (line,) = [line for line in err.splitlines() if "error:" in line]  # then a --help hint
    assert "--mesimp" in line and "--kernel-layout out_in" in line and "Traceback" not in err


@pytest.mark.parametrize("labelled", [True, False])
def test_fast_decoder_gives_the_forward_logits_in_both_layouts(labelled: bool) -> None:
    kw = dict(num_words=30, num_tags=9, num_label_ids=5 if labelled else 0, num_transitions=9)
    kw.update(embed_dim=6, hidden=16, k=3, mode="per_example")
    stock = ParserMLP(**kw)
    transposed = ParserMLP(**kw, kernel_layout="out_in")
    # Ids below every table size (the label table has 5 rows).
    features = jax.random.randint(jax.random.key(1), (7, stock.num_features), 0, 5)
    v_in = stock.init(jax.random.key(0), features)
    v_out = transposed.init(jax.random.key(0), features)
    assert KERNEL_T in v_out["params"]["hidden"] and "kernel" not in v_out["params"]["hidden"]
    kernel = v_in["params"]["hidden"]["kernel"]
    assert kernel.shape == (stock.num_features * 6, 16)
    np.testing.assert_array_equal(v_out["params"]["hidden"][KERNEL_T], kernel.T)  # same draw
    expected = stock.apply(v_in, features)
    for model, variables in ((stock, v_in), (transposed, v_out)):
        forward = model.apply(variables, features)
        np.testing.assert_allclose(forward, expected, rtol=1e-5, atol=1e-5)
        fast = fast_logits(model, variables, hidden_tables(model, variables), features)
        np.testing.assert_allclose(fast, forward, rtol=1e-4, atol=1e-4)
    # A stock tree converted by the library decodes the same.
    hidden_only = lambda path: path == ("hidden",)  # the output layer keeps [in, out]
    converted = meprop_jax.to_kernel_layout(v_in["params"], "out_in", where=hidden_only)
    converted = {"params": converted}
    fast = fast_logits(transposed, converted, hidden_tables(transposed, converted), features)
    np.testing.assert_allclose(fast, expected, rtol=1e-4, atol=1e-4)
    # The tables see the kernel: a changed hidden weight changes the fast logits.
    bumped = jax.tree.map(lambda a: a, v_out)
    bumped["params"]["hidden"][KERNEL_T] = v_out["params"]["hidden"][KERNEL_T].at[0, :].add(1.0)
    fast = fast_logits(transposed, bumped, hidden_tables(transposed, bumped), features)
    np.testing.assert_allclose(fast, transposed.apply(bumped, features), rtol=1e-4, atol=1e-4)
    assert not np.allclose(fast, expected, atol=1e-3)


@pytest.mark.slow
def test_training_in_out_in_equals_training_in_in_out(toy, tmp_path, capsys) -> None:
    args = [
        *files(toy), "--hidden", 32, "--k", 4, "--embed-dim", 8, "--epochs", 2,
        "--batch-size", 32, "--lr", 0.01, "--timing-batches", 0,
    ]  # fmt: skip
    results, params = train_in_both_layouts(run_main, parsing.load_run, args, tmp_path)
    hidden_in, hidden_out = (
        params["in_out"]["params"]["hidden"],
        params["out_in"]["params"]["hidden"],
    )
    assert set(hidden_in) == {"kernel", "bias"} and set(hidden_out) == {KERNEL_T, "bias"}
    assert not np.allclose(hidden_in["kernel"], 0.0)
    # The layouts sum their products in different orders, and two epochs of Adam amplify the
    # rounding where a moment is near zero (3e-6 on 2 of 12288 weights on some CPUs).
    np.testing.assert_allclose(hidden_out[KERNEL_T], hidden_in["kernel"].T, rtol=1e-4, atol=1e-5)
    rest_in = {k: v for k, v in params["in_out"]["params"].items() if k != "hidden"}
    rest_out = {k: v for k, v in params["out_in"]["params"].items() if k != "hidden"}
    for a, b in zip(jax.tree.leaves(rest_in), jax.tree.leaves(rest_out), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(results["in_out"]["epochs"], results["out_in"]["epochs"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        for key in ("dev_uas", "test_uas", "dev_las", "test_las"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
    # The layout is part of the run's settings: resuming in the other one is refused.
    resume = [*args, "--kernel-layout", "in_out", "--out", tmp_path / "out_in", "--resume"]
    expect_error(resume, capsys, "kernel_layout ('out_in' there, 'in_out' now)")


def test_hidden_kernel_reads_either_layout() -> None:
    kernel = jnp.arange(12.0).reshape(4, 3)
    stock = {"params": {"hidden": {"kernel": kernel}}}
    transposed = {"params": {"hidden": {KERNEL_T: kernel.T}}}
    np.testing.assert_array_equal(hidden_kernel(stock), kernel)
    np.testing.assert_array_equal(hidden_kernel(transposed), kernel)


@pytest.mark.slow
def test_resume_under_auto_keeps_the_layout_the_run_started_with(toy, tmp_path) -> None:
    # A per-example run started in [in, out] (as before auto picked [out, in]) goes on so.
    args = [
        *files(toy), "--hidden", 32, "--k", 4, "--embed-dim", 8, "--batch-size", 32,
        "--timing-batches", 0, "--out", tmp_path / "run",
    ]  # fmt: skip
    assert run_main([*args, "--epochs", 1, "--kernel-layout", "in_out"]) == 0
    assert run_main([*args, "--epochs", 2, "--resume"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["kernel_layout"] == "in_out"
    assert [e["epoch"] for e in results["epochs"]] == [1, 2]
