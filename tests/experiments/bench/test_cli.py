"""The command line: flags, user errors, the allocator tunables and quick end-to-end runs."""

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.bench import cli, layer, mesimp, steps


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    # One line and a pointer to --help, never argparse's whole usage block.
    error, pointer = capsys.readouterr().err.strip().splitlines()
    assert pointer == "see 'python -m experiments.bench --help'"
    return error


def test_grid_and_modes_parsing(capsys):
    args = cli.parse_args(["--grid", "2x3x4x1", "--grid", "2X3X4X2", "--modes", "per-example"])
    assert args.grid == [(2, 3, 4, 1), (2, 3, 4, 2)]
    assert args.modes == ["per_example"]
    assert cli.layer_grid(args) == [(2, 3, 4, 1), (2, 3, 4, 2)]
    assert "--grid" in _usage_error(["--grid", "2x3x4"], capsys)
    assert "unknown mode 'topk'" in _usage_error(["--modes", "topk"], capsys)
    assert cli.layer_grid(cli.parse_args(["--paper-table7"]))[0] == (1024, 8192, 8192, 8)
    assert cli.layer_grid(cli.parse_args(["--quick"])) == list(layer.QUICK_GRID)


@pytest.mark.parametrize("entry", ["8x64x48x48", "8x64x48x100"])
def test_grid_k_not_below_out_is_a_usage_error(entry, capsys):
    line = _usage_error(["--grid", "8x64x48x4", "--grid", entry], capsys)
    assert line.startswith("python -m experiments.bench: error: argument --grid:")
    assert repr(entry) in line and "must be below OUT (48)" in line


def test_steps_arguments(capsys):
    args = cli.parse_args(["--steps", "--mlp", "784-500-500-10:50:30", "--mlp", "8-6-4:2:1:3"])
    assert args.section == "steps" and args.repeats == 7 and args.warmup == 1
    assert args.mlp == [((784, 500, 500, 10), 50, 30, 10), ((8, 6, 4), 2, 1, 3)]
    assert cli.steps_configs(args) == args.mlp
    for bad in (["--mlp", "784-10:50:30"], ["--mlp", "8-6-4:2"]):
        assert "--mlp" in _usage_error(["--steps", *bad], capsys)
    assert "k must be below every hidden size" in _usage_error(
        ["--steps", "--mlp", "8-6-4:2:6"], capsys
    )
    for bad, message in (
        (["--steps", "--paper-table7"], "options of the layer section"),
        (["--steps", "--with-update"], "options of the layer section"),
        (["--mlp", "8-6-4:2:1"], "--mlp configures --steps"),
        (["--steps", "--modes", "unified", "random"], "a single --modes value"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ):
        assert message in _usage_error(bad, capsys)


def test_merge_tunables_keeps_the_users_settings():
    ours = cli.REUSE_MEMORY_TUNABLES
    assert cli.merge_tunables(None) == ours
    assert cli.merge_tunables("") == ours
    user = "glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0"
    merged = cli.merge_tunables(user)
    assert merged == (
        "glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0:"
        "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"
    )
    # Idempotent: the restarted process finds its tunables set and runs on.
    assert cli.merge_tunables(merged) == merged
    assert cli.merge_tunables(ours) == ours


def test_doctests():
    result = doctest.testmod(cli)
    assert result.attempted > 0 and result.failed == 0


def test_reuse_memory_merges_with_the_users_tunables(tmp_path):
    out = tmp_path / "reuse.json"
    user = "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0"
    argv = ["--quick", "--modes", "unified", "--repeats", "1", "--reuse-memory", "--no-progress"]
    subprocess.run(
        [sys.executable, "-m", "experiments.bench", *argv, "--out", str(out)],
        check=True,
        cwd=Path(__file__).resolve().parents[3],
        env={**os.environ, "GLIBC_TUNABLES": user},
        capture_output=True,
    )
    recorded = json.loads(out.read_text())["env"]["GLIBC_TUNABLES"]
    assert recorded == cli.merge_tunables(user)
    assert recorded.startswith(user + ":") and "glibc.malloc.arena_max=1" not in recorded


def test_quick_layer_run_writes_json_and_plot(tmp_path):
    out, plot = tmp_path / "b.json", tmp_path / "p.png"
    records = cli.main(["--quick", "--out", str(out), "--plot", str(plot)])
    assert plot.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(out.read_text())
    for key in ("jax_version", "backend", "device_kind", "cpu_count", "date", "env", "argv"):
        assert key in data, key
    assert data["args"]["quick"] is True and data["args"]["repeats"] == 3
    assert len(data["records"]) == len(records) > 0
    seen = []
    for rec in data["records"]:
        assert rec["section"] == "layer" and len(rec["times_ms"]) == 3
        assert rec["min_ms"] == min(rec["times_ms"]) > 0
        seen.append((rec["batch"], rec["d_in"], rec["d_out"], rec["k"], rec["mode"]))
    # Per shape: dense, every quick k in every mode, then the forward pass; nothing else.
    shapes = {(b, i, o) for b, i, o, _ in layer.QUICK_GRID}
    want = []
    for shape in sorted(shapes):
        ks = [k for *s, k in layer.QUICK_GRID if tuple(s) == shape]
        want += [(*shape, 0, "dense")]
        want += [(*shape, k, m) for k in ks for m in layer.DEFAULT_MODES]
        want += [(*shape, 0, "forward")]
    assert seen == want


def test_quick_layer_with_update_run(tmp_path):
    out, plot = tmp_path / "u.json", tmp_path / "u.png"
    argv = ["--quick", "--with-update", "--modes", "unified", "--out", str(out)]
    cli.main([*argv, "--plot", str(plot), "--no-progress"])
    assert plot.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(out.read_text())
    seen = {(r["d_out"], r["k"], r["mode"]) for r in data["records"]}
    for _, _, d_out, k in layer.QUICK_GRID:
        assert {(d_out, k, "unified+adam"), (d_out, k, "unified+sparse_adam")} <= seen
        assert {(d_out, 0, "dense"), (d_out, 0, "forward")} <= seen
    for rec in data["records"]:
        assert rec["section"] == "layer+update" and rec["extra"]["memory"]["peak"] > 0
    assert any("unified, k=" in line for line in data["memory_report"])


def test_quick_steps_run_writes_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "s.json", tmp_path / "s.png"
    records = cli.main(["--steps", "--quick", "--out", str(out), "--plot", str(plot)])
    assert plot.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(out.read_text())
    assert data["args"]["section"] == "steps" and len(data["records"]) == len(records)
    ((sizes, batch, k, n_steps),) = steps.QUICK_STEP_CONFIGS
    modes = [r["mode"] for r in data["records"]]
    fwd_bwd = [v + steps.FWD_BWD for v in steps.STEP_VARIANTS]
    assert modes == [*steps.STEP_VARIANTS, *fwd_bwd, "forward"]
    for rec in data["records"]:
        assert rec["section"] == "steps" and rec["batch"] == batch
        assert rec["extra"]["sizes"] == list(sizes) and rec["extra"]["steps_per_call"] == n_steps
        assert len(rec["times_ms"]) == 3 and rec["extra"]["memory"]["peak"] > 0
    assert any("memory (steps" in line for line in data["memory_report"])
    printed = capsys.readouterr().out
    assert "forward (bound)" in printed and f"k {k}" in printed and f"wrote {out}" in printed


def test_mesimp_arguments(capsys):
    args = cli.parse_args(["--mesimp"])
    assert args.section == "mesimp" and args.repeats == 7 and args.warmup == 1
    assert cli.mesimp_config(args) == mesimp.PAPER_CONFIG
    args = cli.parse_args(["--mesimp", "--mesimp-sizes", "100,60"])
    assert cli.mesimp_config(args).units == (100, 60)
    assert cli.mesimp_config(args).widths == (112, 64)
    for bad, message in (
        (["--mesimp", "--mesimp-sizes", "154"], "give 2 sizes, each at most the hidden size"),
        (["--mesimp", "--mesimp-sizes", "154,501"], "(500,500); got 154,501"),
        (["--mesimp", "--mesimp-sizes", "154,x"], "argument --mesimp-sizes: expected"),
        (["--mesimp", "--mesimp-sizes", "0,5"], "argument --mesimp-sizes: expected"),
        (["--mesimp-sizes", "154,154"], "--mesimp-sizes configures --mesimp"),
        (["--mesimp", "--steps"], "separate sections"),
        (["--mesimp", "--grid", "2x3x4x1"], "options of the layer section"),
        (["--mesimp", "--modes", "unified", "random"], "a single --modes value"),
        (["--mesimp", "--dtype", "bfloat16"], "float32 models only"),
    ):
        assert message in _usage_error(bad, capsys), bad


def test_quick_mesimp_run_writes_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "m.json", tmp_path / "m.png"
    argv = ["--mesimp", "--quick", "--mesimp-sizes", "12,5", "--repeats", "2", "--no-progress"]
    cli.main([*argv, "--out", str(out), "--plot", str(plot)])
    assert plot.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["records"]] == list(mesimp.ROWS)
    sizes = {r["mode"]: r["extra"]["sizes"] for r in data["records"]}
    assert sizes["dense"] == sizes["decode:full"] == list(mesimp.QUICK_CONFIG.sizes)
    assert sizes["mesimp"] == sizes["decode:padded"] == [16, 16, 16, 10]
    assert sizes["decode:exported"] == [16, 12, 5, 10]
    for rec in data["records"]:
        assert len(rec["times_ms"]) == 2 and rec["min_ms"] == min(rec["times_ms"]) > 0
    printed = capsys.readouterr().out
    assert "meSimp step: " in printed and "decoding: exported 16-12-5-10 " in printed
