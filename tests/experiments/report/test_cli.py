"""The command line end to end with a stub runner (reuse, resumption, --only, --dry-run,
skipped grids and the written report), and one quick grid with real training runs."""

import json
import os
import re

import pytest

from experiments.report import cli, grids
from tests.experiments.report.stub import PER_EXAMPLE_FILE, StubRunner, all_flags


def _main(tmp_path, *argv, runner=None, flags=None):
    argv = ["--quick", "--out", str(tmp_path / "report"), "--cache", str(tmp_path / "cache"), *argv]
    return cli.main(argv, runner=runner, flags=flags or all_flags())


def _quick_specs(names=grids.GRID_NAMES):
    return list(dict.fromkeys(s for g in grids.build(names, 1, True) for s in g.specs()))


def test_quick_report_end_to_end(tmp_path):
    """The slowest test here (about 3 s of CPU): it draws the three figures, twice."""
    runner = StubRunner()
    assert _main(tmp_path, runner=runner) == 0
    specs = _quick_specs()
    # One call per distinct configuration: Table 1's Adam cells serve Figure 4 too.
    assert sorted(map(repr, (s for s, _ in runner.calls))) == sorted(map(repr, specs))
    assert len(specs) < sum(len(g.specs()) for g in grids.build(grids.GRID_NAMES, 1, True))
    report = tmp_path / "report"
    text = (report / "README.md").read_text()
    for name in ("figure4.png", "accuracy_vs_k.png", "learning_curves.png", "mesimp_sizes.png"):
        assert (report / name).stat().st_size > 1000
        assert f"({name})" in text
    # The paper's numbers sit beside ours, with the verdicts.
    assert "97.82" in text and "98.01" in text and "Quick run" in text
    # The bench records' tables: the per-example section's own, beside Table 1's CPU
    # speedups, and the unified rows beside Table 7's GPU ones; each with its date and load.
    fixture = json.loads(PER_EXAMPLE_FILE.read_text())
    rec = next(
        r
        for r in fixture["records"]
        if r["section"] == "layer" and r["mode"] == "per_example:out_in k=2 [native]"
    )
    row = (
        "| layer backward | 4 × 24→16 | 2 | per_example:out_in | native (C++ FFI) | "
        f"{rec['median_ms']:.3f} | {rec['ratio_vs_dense']:.2f}x"
    )
    assert row in text
    assert "| MNIST | 20 | 169.5 → 7.9 | 21.4x |" in text and "| POS | 5 |" in text
    assert "What is and is not comparable: the paper's CPU speedups are Table 1's" in text
    assert "| 256 | 4096→4096 | 32 | unified | 0.250 | 2.00x | 27.5x (GPU, h=8192) |" in text
    load = ", ".join(f"{x:.2f}" for x in fixture["load_average"])
    assert f"Ran {fixture['date']} on 2 CPUs; load average {load}" in text
    assert text.count("Ran 2026-12-01T20:00:00+00:00 on 2 CPUs; load average 1.00") == 3
    assert re.search(r"\| (holds|within seed spread|does not hold) \|", text)
    links = re.findall(r"\]\(([^)]+results\.json)\)", text)
    assert len(links) > 20
    assert all((report / link).resolve().is_file() for link in links)
    # Run again: everything is reused.
    again = StubRunner()
    assert _main(tmp_path, runner=again) == 0
    assert again.calls == []


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("MEPROP_DATA_DIR"), reason="set MEPROP_DATA_DIR to the folder with mnist/"
)
def test_quick_grid_with_real_training_runs(tmp_path):
    """``--quick --only table6`` with the real runner: two MNIST subprocesses (about 30 s)
    whose numbers reach the written table, and whose records are committed beside it."""
    argv = ["--quick", "--only", "table6", "--out", str(tmp_path / "report")]
    assert cli.main([*argv, "--cache", str(tmp_path / "cache")]) == 0
    runs = sorted((tmp_path / "cache" / "mnist").glob("*/results.json"))
    assert len(runs) == 2
    tests = []
    for path in runs:
        results = json.loads(path.read_text())
        assert results["status"] == "complete" and len(results["epochs"]) == 2
        # No machine paths: the data folder by its name, the patience the grid asked for.
        assert results["config"]["data_source"] == "mnist"
        assert results["config"]["patience"] == grids.PATIENCE
        tests.append(f"{results['best']['test_acc']:.2f}")
    text = (tmp_path / "report" / "README.md").read_text()
    # The Table 6 section only ("Table 6" also appears in the settings notes above it).
    table6 = text[text.index("## Table 6") :].split("\n## ")[0]
    assert "not run yet" not in table6
    assert all(test in table6 for test in tests), (tests, table6)
    assert len(list((tmp_path / "report" / "runs" / "mnist").glob("*/results.json"))) == 2


def test_an_interrupted_grid_resumes_where_it_stopped(tmp_path, capsys):
    first = StubRunner(interrupt_at=2)
    assert _main(tmp_path, "--only", "table5,table6", runner=first) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert len(first.calls) == 3
    second = StubRunner()
    assert _main(tmp_path, "--only", "table5,table6", runner=second) == 0
    specs = _quick_specs(["table5", "table6"])
    assert second.calls[0] == (first.calls[2][0], "resume")
    assert [s for s, _ in second.calls] == specs[2:]
    assert all(mode == "fresh" for _, mode in second.calls[1:])


def test_only_runs_the_named_grids(tmp_path):
    runner = StubRunner()
    assert _main(tmp_path, "--only", "speed,table6", runner=runner) == 0
    assert {s.task for s, _ in runner.calls} == {"bench", "mnist"}
    assert [s for s, _ in runner.calls] == _quick_specs(["table6", "speed"])
    text = (tmp_path / "report" / "README.md").read_text()
    assert "## Table 6" in text and "## Speed" in text
    # The report still covers every grid: the others' cells are listed as not run yet.
    table5 = text[text.index("## Table 5") :].split("\n## ")[0]
    assert "not run yet" in table5


def test_only_keeps_what_other_grids_recorded_in_the_report(tmp_path):
    """A grid run with --only (and --commit-each) rewrites the whole report, keeping the
    cells that other grids already recorded."""
    assert _main(tmp_path, "--only", "table5", runner=StubRunner()) == 0
    before = (tmp_path / "report" / "README.md").read_text()
    table5 = before[before.index("## Table 5") :].split("\n## ")[0]
    assert "not run yet" not in table5
    runner = StubRunner()
    assert _main(tmp_path, "--only", "table6", runner=runner) == 0
    assert {s.task for s, _ in runner.calls} == {"mnist"}
    after = (tmp_path / "report" / "README.md").read_text()
    assert after[after.index("## Table 5") :].split("\n## ")[0] == table5


def test_only_rejects_an_unknown_grid(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _main(tmp_path, "--only", "table1,table9", runner=StubRunner())
    assert exc.value.code == 2
    assert "--only: unknown grid table9" in capsys.readouterr().err


def test_dry_run_prints_the_grid_and_estimate_and_runs_nothing(tmp_path, capsys):
    runner = StubRunner()
    assert _main(tmp_path, "--dry-run", "--seeds", "2", "--only", "table6", runner=runner) == 0
    out = capsys.readouterr().out
    assert runner.calls == []
    assert out.count("[to run] python -m experiments.mnist") == 4
    assert "--seed 1" in out
    assert re.search(r"4 runs: 0 done, 4 to run; estimated \d+ (s|min)", out)
    assert not (tmp_path / "report").exists()


def test_a_grid_whose_flags_are_missing_is_skipped_with_the_reason(tmp_path):
    flags = all_flags()
    flags["mnist"] = flags["mnist"] - {"--error-feedback"}
    runner = StubRunner()
    assert _main(tmp_path, "--only", "feedback,table6", runner=runner, flags=flags) == 0
    assert all("--error-feedback" not in s.args for s, _ in runner.calls)
    text = (tmp_path / "report" / "README.md").read_text()
    assert "Skipped: flags not available: experiments.mnist --error-feedback." in text


def test_parse_help_flags():
    text = "usage: x [-h] [--k K] [--error-feedback [DECAY]]\n  --mesimp-cycle N  (default 5)"
    assert grids.parse_help_flags(text) == {"--k", "--error-feedback", "--mesimp-cycle"}


@pytest.mark.parametrize("task", grids.TASKS)
def test_the_tasks_command_lines_have_every_flag_the_grids_use(task, capsys):
    """Each task's real ``--help``, printed in-process (a subprocess costs a JAX import)."""
    import importlib

    module, entry = {"parsing": ("main", "main"), "bench": ("cli", "parse_args")}.get(
        task, ("cli", "main")
    )
    with pytest.raises(SystemExit):
        getattr(importlib.import_module(f"experiments.{task}.{module}"), entry)(["--help"])
    known = grids.parse_help_flags(capsys.readouterr().out)
    assert "--seed" in known or task == "bench"
    assert all_flags(quick=True)[task] <= known
    assert all_flags(quick=False)[task] <= known


@pytest.mark.parametrize("quick", [True, False])
def test_the_speed_grid_runs_every_bench_section_it_names(quick, capsys):
    """The bench's real ``--help``: a section renamed there must fail here, not vanish from
    the report as "not available"."""
    from experiments.bench import cli as bench_cli

    with pytest.raises(SystemExit):
        bench_cli.parse_args(["--help"])
    known = grids.parse_help_flags(capsys.readouterr().out)
    assert {f"--section={s}" for s in bench_cli.SECTIONS} <= known
    speed = grids.check_flags(grids.build(["speed"], 1, quick)[0], {"bench": known})
    assert speed.left_out == ()
    assert [c.key["section"] for c in speed.cells] == list(grids.BENCH_SECTIONS)
    assert "per_example" in grids.BENCH_SECTIONS
    # Each spec's command line is one the bench's parser takes, for the section it names.
    for spec in speed.specs():
        args = bench_cli.parse_args(list(spec.args))
        assert args.section == spec.args[spec.args.index("--section") + 1]
        assert args.quick == quick


def test_write_only_reports_finished_runs_and_runs_nothing(tmp_path):
    """After an interrupted grid, ``--write-only`` writes the finished cells (linked to the
    report's own copies of their records) and marks the rest as not run."""
    assert _main(tmp_path, "--only", "table6", runner=StubRunner(interrupt_at=1)) == 130
    runner = StubRunner()
    assert _main(tmp_path, "--only", "table6", "--write-only", runner=runner) == 0
    assert runner.calls == []
    report = tmp_path / "report"
    text = (report / "README.md").read_text()
    total = len(_quick_specs())  # the report covers every grid, --only or not
    assert f"1 reused, 0 failed, {total - 1} not run yet" in text
    assert f"- Run time: 1 of the {total} runs have a timing record; they took" in text
    table6 = text[text.index("## Table 6") :].split("\n## ")[0]
    assert table6.count("(not run yet)") + table6.count("(not finished)") == 1
    links = re.findall(r"\]\(([^)]+results\.json)\)", text)
    assert links and all(link.startswith("runs/mnist/") for link in links)
    assert all((report / link).is_file() for link in links)
    # Every setting's command is written beside its table.
    for spec in grids.build(["table6"], 1, True)[0].specs():
        assert " ".join(spec.command()[:-2]) + " --seed S --out DIR" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--seeds", "x"], "--seeds: invalid int value"), (["--bogus"], "unrecognized arguments")],
)
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    error, pointer = capsys.readouterr().err.strip().splitlines()
    assert message in error and error.startswith("python -m experiments.report: error:")
    assert pointer == "see 'python -m experiments.report --help'"
