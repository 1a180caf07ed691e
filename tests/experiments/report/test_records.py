"""The committed records as the report's cache: reuse without the run cache, a grid that
continues from them, the missing cells, records without machine paths, and paired
schedules."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from experiments.report import cache, cli, grids, records
from tests.experiments.report.stub import StubRunner, all_flags

REPO = Path(__file__).resolve().parents[3]


def _main(tmp_path, *argv, runner, cache_name="cache"):
    argv = ["--out", str(tmp_path / "report"), "--cache", str(tmp_path / cache_name), *argv]
    return cli.main(["--quick", *argv], runner=runner, flags=all_flags())


def _specs(names, seeds=1):
    return cache.unique(s for g in grids.build(names, seeds, True) for s in g.specs())


def test_committed_records_are_reused_without_the_run_cache(tmp_path):
    assert _main(tmp_path, "--only", "table6,mesimp", runner=StubRunner()) == 0
    shutil.rmtree(tmp_path / "cache")  # a fresh checkout: only the committed records
    again = StubRunner()
    assert _main(tmp_path, "--only", "table6,mesimp", runner=again, cache_name="c2") == 0
    assert again.calls == []
    for spec in _specs(["table6", "mesimp"]):
        folder = records.record_dir(tmp_path / "report", spec)
        meta = json.loads((folder / cache.SPEC_FILE).read_text())
        assert meta["args"] == list(spec.args) and meta["seed"] == spec.seed
        assert meta["code_version"] == cache.code_version(REPO, spec.task)
        assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"] or "0" * 40)
        assert json.loads((folder / cache.RESULTS_FILE).read_text())["status"] == "complete"
        assert json.loads((folder / cache.TIMING_FILE).read_text())["wall_s"] >= 0


def test_an_interrupted_grid_continues_from_its_records(tmp_path, capsys):
    assert _main(tmp_path, "--only", "table5,table6", runner=StubRunner(interrupt_at=2)) == 130
    shutil.rmtree(tmp_path / "cache")  # its checkpoint is lost too: that run starts afresh
    second = StubRunner()
    assert _main(tmp_path, "--only", "table5,table6", runner=second, cache_name="c2") == 0
    specs = _specs(["table5", "table6"])
    assert [s for s, _ in second.calls] == specs[2:]
    assert all(mode == "fresh" for _, mode in second.calls)


def test_the_report_lists_the_missing_cells_and_partial_seeds(tmp_path):
    # Two seeds; the second run (dense, seed 1) is interrupted: dense has 1 of 2 seeds.
    argv = ("--only", "table6", "--seeds", "2")
    assert _main(tmp_path, *argv, runner=StubRunner(interrupt_at=1)) == 130
    assert _main(tmp_path, *argv, "--write-only", runner=StubRunner()) == 0
    text = (tmp_path / "report" / "README.md").read_text()
    missing = text[text.index("## Missing cells") :].split("\n## ")[0]
    # Every grid is reported; the other grids' settings, never run, are listed too.
    assert re.search(r"\d+ settings have fewer finished runs than seeds", missing)
    assert len([ln for ln in missing.splitlines() if ln.startswith("- table6:")]) == 2
    assert "- table6: mnist, layers=2, model=dense, k=0: 1 of 2 seeds" in missing
    assert "- table6: mnist, layers=2, model=meprop, k=30: 0 of 2 seeds" in missing
    table6 = text[text.index("## Table 6") :]
    assert re.search(r"\[\d+\.\d\d\]\([^)]+\) \(1 of 2 seeds\)", table6)
    # With every run of the grid done, none of its cells is missing.
    assert _main(tmp_path, *argv, runner=StubRunner()) == 0
    text = (tmp_path / "report" / "README.md").read_text()
    missing = text[text.index("## Missing cells") :].split("\n## ")[0]
    assert "- table6:" not in missing
    assert "of 2 seeds)" not in text[text.index("## Table 6") :].split("\n## ")[0]


def test_the_report_lists_the_runs_that_stopped_early(tmp_path):
    # Table 6's meProp runs end after their first epoch of two, as the patience rule ends a
    # run; the dense ones train both.
    stub = StubRunner(stop_early=lambda spec: spec.args[spec.args.index("--k") + 1] != "0")
    assert _main(tmp_path, "--only", "table6", "--seeds", "2", runner=stub) == 0
    text = (tmp_path / "report" / "README.md").read_text()
    section = text[text.index("## Early stopping") :].split("\n## ")[0]
    assert "2 of the 4 finished training runs stopped before their last epoch" in section
    assert "By arm: dense 0 of 2, meprop 2 of 2." in section
    for seed in (0, 1):
        line = f"- table6: mnist, layers=2, model=meprop, k=30, seed {seed}: 1 of 2 epochs"
        assert f"{line}, best dev epoch 1" in section
    assert "model=dense" not in section
    # With every run trained to its last epoch, the section is left out.
    assert _main(tmp_path / "all", "--only", "table6", runner=StubRunner()) == 0
    assert "## Early stopping" not in (tmp_path / "all" / "report" / "README.md").read_text()


def test_finished_bench_sections_are_not_missing_cells(tmp_path):
    # A bench section's record is its bench.json (no results.json): once it is there, the
    # section is done, and the list of missing cells leaves it out.
    assert _main(tmp_path, "--only", "speed", runner=StubRunner()) == 0
    assert _main(tmp_path, "--only", "speed", "--write-only", runner=StubRunner()) == 0
    text = (tmp_path / "report" / "README.md").read_text()
    missing = text[text.index("## Missing cells") :].split("\n## ")[0]
    assert "- speed:" not in missing
    assert "- table6:" in missing  # the grids never run are still listed


def test_a_missing_bench_section_is_said_plainly(tmp_path):
    flags = all_flags()
    flags["bench"] = flags["bench"] - {"--section=per_example"}
    runner = StubRunner()
    argv = ["--quick", "--only", "speed", "--out", str(tmp_path / "r")]
    assert cli.main([*argv, "--cache", str(tmp_path / "c")], runner=runner, flags=flags) == 0
    assert [s.args[1] for s, _ in runner.calls] == ["layer", "steps", "mesimp"]
    text = (tmp_path / "r" / "README.md").read_text()
    note = "section=per_example: not available (experiments.bench --section=per_example)"
    assert f"Missing: {note}." in text and f"- speed: {note}" in text


def test_commit_each_commits_every_record_with_the_report(tmp_path, monkeypatch):
    commits = []
    monkeypatch.setattr(records, "commit", lambda paths, msg, root: commits.append(paths))
    assert _main(tmp_path, "--only", "table6", "--commit-each", runner=StubRunner()) == 0
    specs = _specs(["table6"])
    assert len(commits) == len(specs)
    for spec, paths in zip(specs, commits, strict=True):
        assert paths[0] == records.record_dir(tmp_path / "report", spec)
        assert paths[1] == tmp_path / "report" / "README.md"


def test_commit_takes_only_the_named_paths(tmp_path):
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "r@example.com")
    git("config", "user.name", "r")
    (tmp_path / "other.txt").write_text("staged, not committed\n")
    git("add", "other.txt")
    record = tmp_path / "report" / "runs" / "mnist" / "abc"
    record.mkdir(parents=True)
    (record / "results.json").write_text("{}\n")
    assert records.commit([record, tmp_path / "gone.png"], "report run: x", tmp_path) is None
    assert git("show", "--name-only", "--format=%s").stdout.decode().split() == [
        "report",
        "run:",
        "x",
        "report/runs/mnist/abc/results.json",
    ]
    assert "A  other.txt" in git("status", "--short").stdout.decode()


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


MACHINE_PATH = re.compile(r"^(/|~|[A-Za-z]:\\)|/(home|Users|work|tmp)/")


@pytest.mark.parametrize("name", ["results.json", "spec.json"])
def test_committed_records_hold_no_machine_paths(name):
    found = sorted((REPO / "docs" / "report" / "runs").rglob(name))
    assert found, "no committed records"
    for path in found:
        bad = [s for s in _strings(json.loads(path.read_text())) if MACHINE_PATH.search(s)]
        assert not bad, (path, bad)


def test_committed_records_sit_at_their_keys():
    """Each committed record's folder is the key of the command its spec.json names."""
    for meta_path in (REPO / "docs" / "report" / "runs").rglob("spec.json"):
        meta = json.loads(meta_path.read_text())
        spec = grids.RunSpec(meta["task"], tuple(meta["args"]), meta["seed"])
        assert meta_path.parent.name == cache.cache_key(spec)
        assert meta_path.parent.parent.name == meta["task"]


@pytest.mark.parametrize("quick", [False, True])
def test_every_cell_has_the_same_schedule(quick):
    """Any two arms compared are paired: the same epochs and the same early-stopping rule,
    at the paper's 20 epochs with patience >= 5 for the full grids."""
    for grid in grids.build(grids.GRID_NAMES, 3, quick):
        for spec in grid.specs():
            if spec.task == "bench":
                continue
            epochs = grids._flag_value(spec.args, "--epochs")
            patience = grids._flag_value(spec.args, "--patience")
            assert (epochs, patience) == (
                str(grids.QUICK_EPOCHS if quick else grids.EPOCHS),
                str(grids.PATIENCE),
            ), (grid.name, spec)
    assert grids.EPOCHS == 20 and grids.PATIENCE >= 5


def test_mesimp_is_paired_with_dense_on_the_same_flags():
    grid = grids.build(["mesimp"], 3, False)[0]
    model_flags = {"--k", "--mode", "--mesimp"}

    def rest(spec):
        args, out, i = spec.args, [], 0
        while i < len(args):
            if args[i] in model_flags:
                i += 1 if args[i] == "--mesimp" else 2
                continue
            out.append(args[i])
            i += 1
        return out

    for task in ("mnist", "pos", "parsing"):
        dense = grid.find(paper_task=task, model="dense")
        mesimps = [c for c in grid.cells if c.matches(paper_task=task, model="mesimp")]
        assert dense is not None and mesimps, task
        for cell in mesimps:
            for a, b in zip(dense.specs, cell.specs, strict=True):
                assert rest(a) == rest(b) and a.seed == b.seed, (task, a, b)
                assert grids._flag_value(b.args, "--k") == str(int(grids.paper.MESIMP[task]["k"]))


def test_mesimp_dense_arms_are_table1_runs():
    """The dense arms of meSimp on tagging and parsing are Table 1's Adam runs."""
    table1 = set(grids.build(["table1"], 3, False)[0].specs())
    grid = grids.build(["mesimp"], 3, False)[0]
    for task in ("pos", "parsing"):
        assert set(grid.find(paper_task=task, model="dense").specs) <= table1


def test_mesimp_size_curve_steps_through_the_prunes_to_the_last_epoch():
    from experiments.report.figures import _size_curve

    events = [{"epoch": 1, "prune": p, "sizes": [400 - 100 * p, 300], "widths": []} for p in (1, 2)]
    results = {
        "config": {"hidden": 500},
        "epochs": [{"epoch": 1, "events": events}, {"epoch": 2}, {"epoch": 3}],
    }
    assert _size_curve(results) == ([0.0, 0.5, 1.0, 3.0], [500.0, 300.0, 250.0, 250.0])
