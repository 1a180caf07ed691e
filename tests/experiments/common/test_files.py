"""Paths as records store them: relative to the data folder or the working directory."""

from pathlib import Path

from experiments.common.files import ENV_VAR, recorded_path


def test_recorded_paths_name_no_machine_folders(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "ptb").mkdir(parents=True)
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.setenv(ENV_VAR, str(data))
    monkeypatch.chdir(work)
    assert recorded_path(data / "mnist") == "mnist"
    assert recorded_path(str(data / "ptb" / "train.conllx.gz")) == "ptb/train.conllx.gz"
    assert recorded_path(work / "runs" / "a") == "runs/a"
    assert recorded_path(Path("runs/a")) == "runs/a"  # relative: kept
    assert recorded_path("../data/ptb/dev.gz") == "ptb/dev.gz"
    assert recorded_path(tmp_path / "elsewhere" / "x.txt") == "x.txt"  # only its name
    assert recorded_path("tfds") == "tfds" and recorded_path(None) is None
    monkeypatch.delenv(ENV_VAR)
    assert recorded_path(data / "mnist") == "mnist"
