"""The speed section: the per-example bench's table from a real record file, the paper's
figure beside each row, and the date and load of every record."""

import dataclasses
import json
import re
import statistics

import pytest

from experiments.bench import harness
from experiments.bench.harness import Record
from experiments.report import paper, speed
from tests.experiments.report.stub import PER_EXAMPLE_FILE


@pytest.fixture(scope="module")
def payload():
    return json.loads(PER_EXAMPLE_FILE.read_text())


def _record(payload, section, k, mode):
    """A record of the file's structure, at the paper's k (the quick run's k are tiny)."""
    base = next(r for r in payload["records"] if r["section"] == section)
    return {**base, "k": k, "mode": mode}


def test_the_record_file_has_the_bench_structure(payload):
    """The fixture is what the bench writes: its header and every Record field."""
    assert payload["args"]["section"] == "per_example" and payload["args"]["quick"]
    assert {"date", "load_average", "cpu_count"} <= payload.keys()
    fields = {f.name for f in dataclasses.fields(Record)}
    assert all(set(r) == fields for r in payload["records"])
    assert {r["section"] for r in payload["records"]} == set(speed.PER_EXAMPLE_GROUPS)


def test_per_example_table_has_one_row_per_record_with_its_groups_ratio(payload):
    records = payload["records"]
    rows = speed.per_example_rows(records)
    assert len(rows) == len(records)
    # Each ratio is the dense row's (of the record's group and shape) time over the record's,
    # round by round, as the bench wrote it: the median of the rounds' ratios.
    dense = {}
    for r in records:
        if r["k"] == 0:
            dense[(r["section"], r["batch"], r["d_in"], r["d_out"])] = r["times_ms"]
    for r, row in zip(records, rows, strict=True):
        group, shape, k, variant, path, median, ratio, paper_text = row
        assert group == speed.PER_EXAMPLE_GROUPS[r["section"]]
        reference = dense[(r["section"], r["batch"], r["d_in"], r["d_out"])]
        rounds = zip(reference, r["times_ms"], strict=True)
        expected = statistics.median(d / t for d, t in rounds)
        assert ratio == f"{expected:.2f}x"
        assert median == f"{r['median_ms']:.3f}" and k == str(r["k"])
        assert shape.startswith(f"{r['batch']} × {r['d_in']}")
        # The path is the label's; the variant is the label without its k and path.
        label_path = re.search(r"\[(native|xla)\]$", r["mode"])
        want = {"native": "native (C++ FFI)", "xla": "XLA", None: "XLA"}
        assert path == want[label_path and label_path.group(1)]
        assert variant == re.sub(r" k=\d+| \[(native|xla)\]$", "", r["mode"])
        assert paper_text == "—"  # the quick run's k (1, 2) are none of the paper's
    assert rows[0][:5] == ["layer backward", "4 × 24→16", "0", "dense", "XLA"]
    lstm = next(row for row in rows if row[0] == "LSTM gates backward")
    assert lstm[1] == "2 × 16→32 (4 gates of h=8, [x, h] in)"
    step = next(row for row in rows if row[0] == "whole MNIST step")
    assert step[1] == "4 × 16-12-12-10"
    assert {row[4] for row in rows} == {"XLA", "native (C++ FFI)"}


def test_paper_speed_for_per_example_rows(payload):
    def beside(section, k, mode="per_example k=20 [native]", bench="per_example"):
        return speed._paper_speed(_record(payload, section, k, mode), bench)

    mnist = f"MNIST {paper.CPU_SPEEDUP['mnist']:g}x (CPU, backprop)"
    assert mnist == "MNIST 21.4x (CPU, backprop)"
    assert beside("layer", 20) == mnist
    assert beside("layer+update", 20, "per_example+compact+sparse_adam:out_in [xla]") == mnist
    assert beside("lstm", 5, "per_example k=5 [xla]") == "POS 65.4x (CPU, backprop)"
    # Where the row's k is not the paper's, or the row is dense, there is no paper figure.
    assert beside("lstm", 10, "per_example k=10 [xla]") == "—"
    assert beside("layer", 0, "dense") == "—"
    assert beside("layer+update", 0, "dense+adam") == "—"
    assert beside("parser", 20) == "parsing 18.6x (CPU, backprop)"
    # A whole step has a forward pass: Table 2's FP+BP speedup (240 s / 77 s) beside it.
    assert beside("mnist", 20) == f"{mnist}; 3.1x (CPU, FP+BP)"
    # The layer section's per-example rows are not the paper's CPU setting.
    assert beside("layer", 20, "per_example", bench="layer") == "—"


def test_paper_speed_keeps_table7_beside_unified_rows():
    row = {"section": "layer", "batch": 256, "d_in": 4096, "d_out": 4096, "mode": "unified"}
    assert speed._paper_speed({**row, "k": 32}, "layer") == "27.5x (GPU, h=8192)"
    assert speed._paper_speed({**row, "k": 512}, "steps") == "4.4x (GPU, h=8192)"
    assert speed._paper_speed({**row, "k": 30}, "layer") == "—"
    assert speed._paper_speed({**row, "k": 32, "mode": "per_example"}, "layer") == "—"


def test_paper_cpu_table_gives_table1_beside_our_nearest_rows():
    table = speed.paper_cpu_table()
    assert "| MNIST | 20 | 169.5 → 7.9 | 21.4x | layer backward 784→500" in table
    assert "| POS | 5 | 16,167.3 → 247.2 | 65.4x | LSTM gates backward, h=500, k=5 |" in table
    assert "| parsing | 20 | 9,077.7 → 488.7 | 18.6x | parser hidden layer backward" in table


def test_record_line_states_date_and_load(payload):
    line = speed.record_line(payload)
    assert line.startswith(f"Ran {payload['date']} on {payload['cpu_count']} CPUs; ")
    assert ", ".join(f"{x:.2f}" for x in payload["load_average"]) in line
    assert line.endswith(
        "Each ratio is dense's time over the row's, round by round (their median)."
    )
    # A record of the bench from before it paired its rounds says which ratio it holds.
    assert speed.record_line({}) == (
        "Ran at an unrecorded date; no load average recorded. Each ratio is dense's median "
        "over the row's (written before the bench paired rounds)."
    )


def test_the_report_knows_the_benchs_name_for_paired_ratios():
    assert speed.PAIRED_RATIOS == harness.RATIO_KIND
