"""Cache keys, code versions, reuse and resumption of runs, the estimate."""

import dataclasses
import json

from experiments.report import cache, grids, runners
from tests.experiments.report.stub import StubRunner

SPEC = grids.RunSpec("mnist", ("--k", "20", "--epochs", "2"), 0, 2, 30.0)


def test_cache_key_changes_with_task_flags_and_seed_only():
    key = cache.cache_key(SPEC)
    assert cache.cache_key(dataclasses.replace(SPEC)) == key
    # The estimate's numbers are not part of a run's identity, nor is the code version
    # (recorded in spec.json instead, so that a grid keeps its records as the code moves).
    assert cache.cache_key(dataclasses.replace(SPEC, nominal_s=99.0, epochs=7)) == key
    changed = [
        cache.cache_key(dataclasses.replace(SPEC, args=("--k", "10", "--epochs", "2"))),
        cache.cache_key(dataclasses.replace(SPEC, seed=1)),
        cache.cache_key(dataclasses.replace(SPEC, task="parsing")),
    ]
    assert len({key, *changed}) == 4


def _tree(root, files):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_code_version_follows_the_training_path_of_the_task(tmp_path):
    files = {
        "meprop_jax/_linear.py": "a = 1\n",
        "experiments/loop/driver.py": "b = 1\n",
        "experiments/mnist/task.py": "c = 1\n",
        "experiments/tagging/task.py": "d = 1\n",
    }
    _tree(tmp_path, files)
    version = cache.code_version(tmp_path, "mnist")
    assert cache.code_version(tmp_path, "mnist") == version
    # Another task's code and non-Python files leave the version alone.
    _tree(tmp_path, {"experiments/tagging/task.py": "d = 2\n", "experiments/mnist/notes.txt": "x"})
    assert cache.code_version(tmp_path, "mnist") == version
    for name in list(files)[:3]:
        _tree(tmp_path, {name: files[name] + "# changed\n"})
        assert cache.code_version(tmp_path, "mnist") != version
        version = cache.code_version(tmp_path, "mnist")
    _tree(tmp_path, {"experiments/common/new.py": "e = 1\n"})  # a new shared module counts
    assert cache.code_version(tmp_path, "mnist") != version


def test_a_finished_run_is_reused_not_rerun(tmp_path):
    runner = StubRunner()
    first = cache.ensure_run(SPEC, tmp_path / "run", runner)
    assert first.status == "ran" and len(runner.calls) == 1
    assert runner.calls[0][1] == "fresh"
    again = cache.ensure_run(SPEC, tmp_path / "run", runner)
    assert again.status == "reused" and len(runner.calls) == 1
    spec = json.loads((tmp_path / "run" / cache.SPEC_FILE).read_text())
    assert spec == {"task": "mnist", "args": list(SPEC.args), "seed": 0}


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    runner = StubRunner(interrupt_at=0)
    try:
        cache.ensure_run(SPEC, tmp_path / "run", runner)
        raise AssertionError("the interruption did not propagate")
    except cache.Interrupted:
        pass
    assert not cache.is_complete(SPEC, tmp_path / "run")
    assert cache.ensure_run(SPEC, tmp_path / "run", runner).status == "ran"
    assert [mode for _, mode in runner.calls] == ["fresh", "resume"]


def test_a_resume_that_fails_restarts_cleanly(tmp_path):
    calls = []

    def runner(spec, directory, mode):
        calls.append(mode)
        if mode == "resume":
            return 2  # e.g. --resume refused
        StubRunner()(spec, directory, mode)
        return 0

    (tmp_path / "run" / cache.CHECKPOINT_DIR / "3").mkdir(parents=True)
    assert cache.ensure_run(SPEC, tmp_path / "run", runner).status == "ran"
    assert calls == ["resume", "restart"]


def test_an_unfinished_results_file_without_checkpoint_restarts(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / cache.RESULTS_FILE).write_text(json.dumps({"status": "running"}))
    runner = StubRunner()
    cache.ensure_run(SPEC, tmp_path / "run", runner)
    assert runner.calls[0][1] == "restart"
    assert runners.subprocess_command(SPEC, tmp_path, "restart")[-1] == "--overwrite"
    assert runners.subprocess_command(SPEC, tmp_path, "resume")[-1] == "--resume"


def test_a_mesimp_run_needs_its_mesimp_entry(tmp_path):
    spec = dataclasses.replace(SPEC, args=("--k", "160", "--mesimp"))
    (tmp_path / cache.RESULTS_FILE).write_text(json.dumps({"status": "complete"}))
    assert not cache.is_complete(spec, tmp_path)
    assert cache.is_complete(SPEC, tmp_path)


def test_estimate_scales_the_nominal_time_by_finished_runs(tmp_path):
    specs = [dataclasses.replace(SPEC, seed=s, nominal_s=100.0) for s in range(3)]
    dirs = {s: tmp_path / str(s.seed) for s in specs}
    before = cache.estimate(specs, dirs)
    assert (before.done, before.todo, before.seconds) == (0, 3, 300.0)
    cache.ensure_run(specs[0], dirs[specs[0]], StubRunner())
    timing = dirs[specs[0]] / cache.TIMING_FILE
    timing.write_text(json.dumps({"wall_s": 250.0, "mode": "fresh"}))
    after = cache.estimate(specs, dirs)
    assert (after.done, after.todo) == (1, 2)
    assert after.scale == {"mnist": 2.5} and after.seconds == 500.0


def test_run_time_sums_the_finished_runs_and_counts_the_resumed(tmp_path):
    specs = [dataclasses.replace(SPEC, seed=s) for s in range(3)]
    dirs = {s: tmp_path / str(s.seed) for s in specs}
    for spec, (wall, mode) in zip(specs[:2], [(40.0, "fresh"), (25.5, "resume")], strict=True):
        cache.ensure_run(spec, dirs[spec], StubRunner())
        timing = {"wall_s": wall, "mode": mode}
        (dirs[spec] / cache.TIMING_FILE).write_text(json.dumps(timing))
    spent = cache.run_time([*specs, specs[0]], dirs)  # a repeated spec counts once
    assert spent == cache.RunTime(runs=2, seconds=65.5, resumed=1)
