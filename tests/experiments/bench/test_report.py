"""Tables, memory comparison, JSON and plots of benchmark records."""

import argparse
import json
import re

import pytest

from experiments.bench import harness, layer, report


def _row(mode, k, median_ms, dense_ms, extra=None, section="layer", d_out=8192):
    stats = harness.Stats(median_ms, 0.9 * median_ms, (median_ms,))
    dense = harness.Stats(dense_ms, dense_ms, (dense_ms,))
    return harness._record(
        section, 1024, 8192, d_out, k, mode, "float32", stats, dense, dict(extra or {})
    )


def _column(table, name):
    """The cells of column ``name``, located by the dashes under the header."""
    header, rule, *lines = table.splitlines()
    for dashes in re.finditer("-+", rule):
        if header[dashes.start() : dashes.end()].strip() == name:
            return [line[dashes.start() : dashes.end()].strip() for line in lines]
    raise KeyError(name)


def test_speedup_column_is_dense_median_over_row_median():
    rows = [_row("dense", 0, 300.0, 300.0), _row("unified", 32, 12.0, 300.0)]
    rows.append(_row("forward", 0, 150.0, 300.0))
    table = report.format_table(rows)
    assert _column(table, "speedup") == ["1.00x", "25.00x", "2.00x"]
    assert _column(table, "median ms") == ["300.000", "12.000", "150.000"]


def test_a_table_row_of_an_unknown_mode_fails():
    good = [_row("dense", 0, 3.0, 3.0), _row("unified+sparse_adam", 4, 1.0, 3.0)]
    report.format_table(good)
    with pytest.raises(ValueError, match="unknown mode 'topk'"):
        report.format_table([*good, _row("topk", 4, 1.0, 3.0)])
    # A steps row is not a layer row, and the other way round.
    with pytest.raises(ValueError, match="unknown mode 'meprop"):
        report.format_table([*good, _row("meprop+sparse", 4, 1.0, 3.0)])
    step_rows = [_row(m, 4, 1.0, 3.0, {"sizes": [8, 6, 4]}) for m in ("dense", "forward")]
    assert "forward (bound)" in report.format_steps_table(step_rows)
    with pytest.raises(ValueError, match="unknown mode 'unified'"):
        report.format_steps_table([*step_rows, _row("unified", 4, 1.0, 3.0)])


def _paper_records():
    # Synthetic records: the --paper-table7 shape itself takes minutes on a CPU.
    d_out = layer.PAPER_TABLE7_SHAPE[2]
    records = [_row("dense", 0, 300.0, 300.0)]
    for k, paper in layer.PAPER_TABLE7_SPEEDUP.items():
        extra = {"gflop": 1.0, "ideal_speedup": d_out / k, "paper_speedup": paper}
        records.append(_row("unified", k, 300.0 / (paper / 2), 300.0, extra))
    return records


def test_paper_table7_table_and_plot(tmp_path):
    records = _paper_records()
    table = report.format_table(records)
    lines = table.splitlines()
    assert "paper" in lines[0] and len({len(line) for line in lines[:2]}) == 1
    paper = [f"{p:.1f}x" for p in layer.PAPER_TABLE7_SPEEDUP.values()]
    assert _column(table, "paper") == ["", *paper]
    speedups = _column(table, "speedup")[1:]
    assert speedups == [f"{p / 2:.2f}x" for p in layer.PAPER_TABLE7_SPEEDUP.values()]
    report.plot_speedup(tmp_path / "t7.png", records, paper=True)
    assert (tmp_path / "t7.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no meProp rows"):
        report.plot_speedup(tmp_path / "none.png", records[:1])


def _memory(peak):
    return {"memory": {"peak": peak * 2**20, "temp": 0}}


def test_memory_report_flags_a_compact_path_above_dense():
    rows = [
        _row("dense", 0, 1.0, 1.0, _memory(10), section="layer+update"),
        _row("unified+adam", 4, 1.0, 1.0, _memory(12), section="layer+update"),
        _row("unified+sparse_adam", 4, 1.0, 1.0, _memory(6), section="layer+update"),
        _row("random+sparse_adam", 4, 1.0, 1.0, _memory(15), section="layer+update"),
    ]
    lines = report.memory_report(rows).splitlines()
    assert len(lines) == 2
    unified, random = lines
    assert "unified" in unified and "compact peak 6.00-6.00 MiB" in unified
    assert "masked dense gradient (unified) peaks at 12.00-12.00 MiB" in unified
    assert unified.endswith("OK, not above dense")
    assert "random" in random and "(1.50x dense at most)" in random
    assert random.endswith("ABOVE DENSE")


def test_write_json_round_trips_records(tmp_path):
    records = _paper_records()
    args = argparse.Namespace(paper_table7=True, grid=[(2, 3, 4, 1)], out=tmp_path / "x.json")
    report.write_json(tmp_path / "sub" / "x.json", args, records, ["--paper-table7"])
    data = json.loads((tmp_path / "sub" / "x.json").read_text())
    assert data["argv"] == ["--paper-table7"]
    assert data["args"] == {"paper_table7": True, "grid": [[2, 3, 4, 1]], "out": str(args.out)}
    assert [harness.Record(**r) for r in data["records"]] == records
    assert data["paper_table7"]["speedup"]["8"] == 36.8
    assert data["backend"] == "cpu" and data["cpu_count"] > 0


def test_plot_steps_needs_steps_records(tmp_path):
    rows = [
        _row(m, 0 if m == "dense" else 4, ms, 10.0, {"sizes": [8, 6, 4]}, section="steps")
        for m, ms in (("dense", 10.0), ("meprop", 7.0), ("meprop+sparse", 5.0), ("forward", 3.0))
    ]
    report.plot_steps(tmp_path / "s.png", rows)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no steps records"):
        report.plot_steps(tmp_path / "n.png", rows[:0])
