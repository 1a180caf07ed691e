"""The report's speed section: each ``python -m experiments.bench`` section's records as a
table, beside the paper's figures, with the date and the load of every record used.

The ``per_example`` section (the paper's CPU setting: per-example top-k, minibatches of 10)
gets a table of its own, one row per record group and variant, beside Table 1's CPU backprop
speedups; unified rows of the other sections sit beside Table 7's GPU speedups at the same k.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.report import cache, paper
from experiments.report.tables import CellResult, fmt, markdown, relative

PER_EXAMPLE = "per_example"
#: A bench record's ``"ratio"`` when its ratios pair the rounds (the bench's ``RATIO_KIND``).
PAIRED_RATIOS = "paired"

#: The per-example section's record groups (``record["section"]``): what each row times.
PER_EXAMPLE_GROUPS: Mapping[str, str] = {
    "layer": "layer backward",
    "layer+update": "backward + Adam",
    "lstm": "LSTM gates backward",
    "mnist": "whole MNIST step",
    "parser": "parser hidden layer backward",
}
#: The paper's task whose Table 1 row each group is nearest to.
PER_EXAMPLE_TASKS: Mapping[str, str] = {
    "layer": "mnist",
    "layer+update": "mnist",
    "lstm": "pos",
    "mnist": "mnist",
    "parser": "parsing",
}
TASK_LABELS: Mapping[str, str] = {"mnist": "MNIST", "pos": "POS", "parsing": "parsing"}
_PATH = re.compile(r"^(?P<variant>.*?)(?: \[(?P<path>native|xla)\])?$")
_K = re.compile(r" k=\d+")


def paper_k(task: str) -> int:
    """The paper's k for ``task`` in Table 1 (Adam), the row of :data:`paper.CPU_SPEEDUP`."""
    return int(paper.TABLE1[(task, "adam")]["meprop"]["k"])


def _paper_speed(record: Mapping[str, Any], section: str | None = None) -> str:
    """The paper's figure beside one record of the bench section ``section``.

    Per-example rows: Table 1's CPU backprop speedup of the task the group is nearest to,
    where the row's k is the paper's (whole MNIST steps also Table 2's forward + backward
    speedup, since a step has a forward pass). Unified rows: Table 7's GPU speedup at the
    same k. Dense rows and the rest: "—".
    """
    k = record.get("k")
    if section == PER_EXAMPLE:
        task = PER_EXAMPLE_TASKS.get(record.get("section", ""))
        if not k or task is None or k != paper_k(task):
            return "—"
        text = f"{TASK_LABELS[task]} {paper.CPU_SPEEDUP[task]:g}x (CPU, backprop)"
        if record.get("section") == "mnist":
            text += f"; {paper.CPU_OVERALL_SPEEDUP[task]:.1f}x (CPU, FP+BP)"
        return text
    if record.get("mode") == "unified" and k in paper.TABLE7:
        return f"{paper.TABLE7[k][1]:g}x (GPU, h=8192)"
    return "—"


def _bench_rows(records: Sequence[Mapping[str, Any]], section: str | None) -> list[list[str]]:
    rows = []
    for r in records:
        shape = f"{r.get('d_in', '?')}→{r.get('d_out', '?')}"
        ratio = r.get("ratio_vs_dense")
        rows.append(
            [
                str(r.get("batch", "—")),
                shape,
                str(r.get("k", "—")),
                str(r.get("mode", "—")),
                fmt(r.get("median_ms"), 3),
                "—" if ratio is None else f"{ratio:.2f}x",
                _paper_speed(r, section),
            ]
        )
    return rows


BENCH_HEADER = ("batch", "shape", "k", "mode", "median ms", "ours: speedup vs dense", "paper")


def _shape(r: Mapping[str, Any]) -> str:
    """``[batch] x in -> out`` of a per-example row; the MLP's sizes for a whole step."""
    batch = r.get("batch", "?")
    if r.get("section") == "mnist" and (r.get("extra") or {}).get("sizes"):
        return f"{batch} × " + "-".join(str(s) for s in r["extra"]["sizes"])
    shape = f"{batch} × {r.get('d_in', '?')}→{r.get('d_out', '?')}"
    if r.get("section") == "lstm" and isinstance(r.get("d_out"), int):
        shape += f" (4 gates of h={r['d_out'] // 4}, [x, h] in)"
    return shape


def variant_and_path(mode: str) -> tuple[str, str]:
    """``"per_example+compact:out_in k=20 [native]"`` -> ``("per_example+compact:out_in",
    "native")``: the variant without its k, and the backward's path (``XLA`` where the label
    names none, as for dense)."""
    m = _PATH.match(mode)
    assert m is not None  # the pattern matches every string
    path = {"native": "native (C++ FFI)", "xla": "XLA", None: "XLA"}[m.group("path")]
    return _K.sub("", m.group("variant")), path


def per_example_rows(records: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """One row per record of the ``per_example`` section, in the bench's order: group,
    shape, k, variant, path, median ms per step, ratio vs the group's dense row, paper."""
    rows = []
    for r in records:
        variant, path = variant_and_path(str(r.get("mode", "—")))
        ratio = r.get("ratio_vs_dense")
        rows.append(
            [
                PER_EXAMPLE_GROUPS.get(r.get("section", ""), str(r.get("section", "—"))),
                _shape(r),
                str(r.get("k", "—")),
                variant,
                path,
                fmt(r.get("median_ms"), 3),
                "—" if ratio is None else f"{ratio:.2f}x",
                _paper_speed(r, PER_EXAMPLE),
            ]
        )
    return rows


PER_EXAMPLE_HEADER = (
    "group",
    "batch × shape",
    "k",
    "variant",
    "path",
    "median ms/step",
    "ours: vs dense of the group",
    "paper (Table 1; Table 2 FP+BP)",
)

#: Which of our per-example rows each Table 1 task is nearest to.
NEAREST_ROWS: Mapping[str, str] = {
    "mnist": "layer backward 784→500 and 500→500, k=20 (the whole step has more in it)",
    "pos": "LSTM gates backward, h=500, k=5",
    "parsing": "parser hidden layer backward, 250 × 2400→500, k=20 (its rows cover the layer)",
}


def paper_cpu_table() -> str:
    """Table 1's CPU backprop speedups (Adam), with the rows of ours nearest to each."""
    rows = []
    for task, speedup in paper.CPU_SPEEDUP.items():
        numbers = paper.TABLE1[(task, "adam")]
        dense, meprop = numbers["dense"]["bp_s"], numbers["meprop"]["bp_s"]
        rows.append(
            [
                TASK_LABELS[task],
                str(paper_k(task)),
                f"{dense:,.1f} → {meprop:,.1f}",
                f"{speedup:g}x",
                NEAREST_ROWS[task],
            ]
        )
    header = ["task", "k of 500", "paper backprop s/epoch (dense → meProp)", "paper", "ours"]
    return markdown(header, rows)


VARIANT_LEGEND = (
    "Variants: `per_example` hands the optimizer the masked dense weight gradient (the "
    "authors' form); `+compact` the selected columns' block (`CompactGrad`); `+factored` the "
    "kept values, their columns and the input rows (`FactoredGrad`: the backward is the "
    "selection and `dx` alone); `:out_in` stores the kernel `[out, in]`; `+sparse_adam` and "
    "`+sparse` update lazily (selected rows only), and the MNIST steps without them update "
    "every weight (the authors' rule)."
)

PER_EXAMPLE_NOTE = (
    "What is and is not comparable: the paper's CPU speedups are Table 1's 'backprop time' "
    "per epoch, the backward of the linear transformations alone (in the authors' MNIST "
    "code, the hidden layers' with their top-k selection; no activations, forward pass or "
    "update), in its authors' C# framework, which runs one example at a time as "
    "matrix–vector products; ours are JAX steps of 10 examples (LSTM: 8) inside one jitted "
    "`lax.scan`, timed per step. So the layer and LSTM gate rows time the same kind of "
    "work, but our dense row multiplies all examples of a step at once, reading each "
    "weight once per step where the authors' loop reads it once per example, and the ratios "
    "need not match; the rows with an update or a whole step time more than the paper did "
    "(Table 2's FP+BP leaves the update out too)."
)


def record_line(record: Mapping[str, Any]) -> str:
    """When and under what load a bench record ran: its ``date``, ``cpu_count`` and
    ``load_average`` (taken as the bench finished, its own process counted)."""
    date = record.get("date") or "at an unrecorded date"
    load = record.get("load_average")
    cpus = record.get("cpu_count")
    where = f" on {cpus} CPUs" if cpus else ""
    if record.get("ratio") == PAIRED_RATIOS:
        ratios = " Each ratio is dense's time over the row's, round by round (their median)."
    else:
        ratios = (
            " Each ratio is dense's median over the row's (written before the bench paired rounds)."
        )
    if not load:
        return f"Ran {date}{where}; no load average recorded.{ratios}"
    loads = ", ".join(f"{x:.2f}" for x in load)
    return (
        f"Ran {date}{where}; load average {loads} (1, 5, 15 min, as it finished, its own "
        f"process counted).{ratios}"
    )


def speed(results: Sequence[CellResult], out: Path) -> str:
    """Each bench section's records as a table, beside the paper's figures: Table 1's CPU
    backprop speedups (MNIST 21.4x, POS 65.4x, parsing 18.6x; per-example top-k) beside the
    ``per_example`` section, Table 7's GPU speedups (unified top-k, h = 8192, batch 1024)
    beside unified rows."""
    table7 = ", ".join(f"k={k}: {x:g}x" for k, (_, x) in paper.TABLE7.items())
    parts = [
        "Speedups are ratios against dense from the same interleaved run; each record "
        "states its date and the machine's load. The paper's CPU figures are Table 1's "
        "backprop speedups per epoch in its authors' C# code (MNIST 21.4x, POS 65.4x, "
        "parsing 18.6x), beside the per-example section's rows; its GPU Table 7 (GTX 1080, "
        "unified top-k, synthetic data, batch 1024, h = 8192, dense "
        f"{paper.TABLE7_DENSE_MS:.2f} ms) gives {table7}, beside our unified rows at the same k."
    ]
    for result in results:
        section = result.cell.key.get("section")
        run = result.runs[0]
        parts.append(f"**{section}** (`{' '.join(run.spec.command())}`)")
        record = cache.read_json(run.directory / cache.BENCH_FILE)
        if not cache.is_complete(run.spec, run.directory) or record is None:
            parts.append("Missing: this section has not run yet.")
            continue
        parts.append(record_line(record))
        records = record.get("records") or []
        if section == PER_EXAMPLE:
            parts += [
                "The paper's CPU setting: per-example top-k, minibatches of 10, at the "
                "paper's shapes. Median time per step; each ratio is against the dense row "
                "of its group and shape. The path is the backward's: the native CPU kernel "
                "(`jax.ffi`) where it is built, or pure XLA. " + VARIANT_LEGEND,
                markdown(PER_EXAMPLE_HEADER, per_example_rows(records)),
                "The paper's Table 1 CPU backprop speedups (Adam), beside the rows of ours "
                "nearest to each:",
                paper_cpu_table(),
                PER_EXAMPLE_NOTE,
            ]
        else:
            parts.append(markdown(BENCH_HEADER, _bench_rows(records, section)))
        link = relative(run.directory / cache.BENCH_FILE, out)
        parts.append(f"Record: [{cache.BENCH_FILE}]({link}).")
    return "\n\n".join(parts)
