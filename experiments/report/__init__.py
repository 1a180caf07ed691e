"""``python -m experiments.report``: runs (or reuses) the grids of experiment runs and writes a
Markdown report with figures that puts every number beside the meProp paper's.

Modules: :mod:`~experiments.report.paper` (the paper's numbers),
:mod:`~experiments.report.grids` (the runs of each table and figure),
:mod:`~experiments.report.cache` (cache keys, the runner, resuming, the time estimate),
:mod:`~experiments.report.tables` (aggregation over seeds, verdicts, Markdown tables),
:mod:`~experiments.report.sections` (one section per grid),
:mod:`~experiments.report.figures` (PNG figures), :mod:`~experiments.report.write` (the
report) and :mod:`~experiments.report.cli` (the command line).
"""
