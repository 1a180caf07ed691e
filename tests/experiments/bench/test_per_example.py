"""Section ``per_example`` of the benchmarks, on its quick shapes."""

import math

from experiments.bench import cli
from experiments.bench.per_example import bench_per_example, format_per_example


def test_quick_section_times_every_group_against_its_dense_row():
    records = bench_per_example(quick=True, repeats=1, warmup=0, seed=0)
    groups = {r.section for r in records}
    assert groups == {"layer", "layer+update", "lstm", "mnist", "parser"}
    for group in groups:
        rows = [r for r in records if r.section == group]
        dense = [r for r in rows if r.mode.startswith("dense")]
        assert len(dense) == 1 and dense[0].ratio_vs_dense == 1.0
        assert len(rows) > 1
        assert all(math.isfinite(r.median_ms) and r.median_ms > 0 for r in rows)
    modes = {r.mode for r in records if r.section == "layer"}
    assert any("+compact:out_in" in m and m.endswith("[xla]") for m in modes)
    text = format_per_example(records)
    assert len(text.splitlines()) == len(records) + 1


def test_cli_flag_selects_the_section():
    args = cli.parse_args(["--per-example", "--quick"])
    assert args.section == "per_example"
