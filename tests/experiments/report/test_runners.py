"""The two runners with real processes: a fresh interpreter per run, and a process forked from
a server that imported the tasks (what ``--quick`` uses)."""

import json
import sys

import pytest

from experiments.report import cache, cli, grids, runners


def test_forked_and_fresh_interpreters_print_the_same_help(tmp_path):
    code = "some-code-version"
    fresh = cli.help_flags("mnist", tmp_path / "fresh", code)
    forked = cli.help_flags("mnist", tmp_path / "forked", code, forked=True)
    assert fresh is not None and "--k" in fresh and "--mesimp" in fresh
    assert forked == fresh
    saved = [tmp_path / d / "help" / f"mnist-{code}.txt" for d in ("fresh", "forked")]
    assert saved[0].read_text() == saved[1].read_text()
    assert saved[0].read_text().startswith("usage: python -m experiments.mnist")


def test_a_forked_run_returns_its_exit_code_and_writes_its_output(tmp_path):
    env = runners.child_environment(tmp_path)
    output = tmp_path / "out.log"
    assert runners.run_forked("mnist", ["--k", "-3"], output, env) == 2
    assert "--k" in output.read_text() and "Traceback" not in output.read_text()
    # The run sees the environment it is given, not the server's.
    env["MEPROP_DATA_DIR"] = str(tmp_path / "no-such-folder")
    missing = tmp_path / "missing.log"
    args = ["--corpus", "ptb-dep-sample", "--out", str(tmp_path / "r")]
    assert runners.run_forked("parsing", args, missing, env) == 2
    assert "no-such-folder/ptb-dep-sample" in missing.read_text()


@pytest.mark.slow
def test_the_subprocess_runner_runs_the_command_into_the_run_folder(tmp_path):
    spec = grids.RunSpec("bench", ("--section", "layer", "--no-progress", "--quick"), None, 0, 1.0)
    directory = tmp_path / "run"
    directory.mkdir()
    assert runners.subprocess_runner(tmp_path)(spec, directory, "fresh") == 0
    log = (directory / cache.LOG_FILE).read_text()
    # No machine path (the interpreter's) in a log that is committed with the record.
    assert log.startswith("$ python -m experiments.bench --section layer ")
    assert sys.executable not in log
    records = json.loads((directory / cache.BENCH_FILE).read_text())
    assert records and cache.is_complete(spec, directory)
