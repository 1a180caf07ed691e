"""The report's grids of runs: which commands, with which seeds, make each table and figure.

A run is a :class:`RunSpec` (task, flags, seed); a :class:`Cell` is one setting run over the
seeds; a :class:`Grid` is one table or figure. Full-size settings follow the paper where the
command lines allow (per-example top-k and minibatches of 10 for the CPU MNIST tables); the
differences are listed in :data:`SETTINGS_NOTES`. ``quick`` grids are tiny, for tests and a
smoke run.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.common import ConfigError
from experiments.report import paper

TRAIN_TASKS: tuple[str, ...] = ("mnist", "tagging", "parsing")
TASKS: tuple[str, ...] = (*TRAIN_TASKS, "bench")
GRID_NAMES: tuple[str, ...] = (
    "table1",
    "figure4",
    "table4",
    "table5",
    "table6",
    "mesimp",
    "feedback",
    "speed",
)
#: The selection metric each task writes to ``results.json`` (``dev_<metric>``).
METRICS: Mapping[str, str] = {"mnist": "acc", "tagging": "acc", "parsing": "uas"}
TAGGING_CORPORA: tuple[str, ...] = ("conll2000", "ptb-dep-sample")
FIGURE4_KS: tuple[int, ...] = (5, 10, 20, 40, 80, 160)
FEEDBACK_KS: tuple[int, ...] = (5, 10, 20, 40, 80)
TABLE5_LAYERS: tuple[int, ...] = (2, 3, 4, 5)
FEEDBACK_DECAY = 0.1
#: Every full-size run: the authors' 20 epochs, ended early by one rule for every arm (dev
#: has not improved for PATIENCE epochs); the test score is read at the best dev epoch.
EPOCHS = 20
PATIENCE = 5
#: The POS corpus of AdaGrad, Table 4 and meSimp (gold tags; CoNLL-2000's are a tagger's).
PTB_CORPUS = "ptb-dep-sample"
QUICK_EPOCHS = 2

#: Nominal seconds per full-size epoch on a two-core CPU (the estimate before any run of
#: the grid has finished; MNIST scales with the minibatch, tagging with the corpus), from
#: the committed records of the earlier grid (training, evaluation and probes per epoch:
#: MNIST at batch 10 12-16 s, CoNLL-2000 tagging 80-105 s, the PTB sample 34-36 s, parsing
#: 13-14 s). The estimate counts every epoch; early stopping shortens it.
EPOCH_SECONDS: Mapping[str, float] = {"mnist": 2.0, "tagging": 35.0, "parsing": 14.0}
CONLL2000_EPOCH_SECONDS = 90.0
MNIST_SECONDS_PER_STEP_SIZE = 120.0  # MNIST: + this / batch size (steps dominate at batch 10)
QUICK_EPOCH_SECONDS: Mapping[str, float] = {"mnist": 2.0, "tagging": 5.0, "parsing": 3.0}
BENCH_SECONDS: Mapping[str, float] = {
    "layer": 150.0,
    "steps": 300.0,
    "mesimp": 200.0,
    "per_example": 300.0,
}
#: The bench sections of the speed tables, by the names ``--section`` takes; ``per_example``
#: is the paper's CPU setting (per-example top-k, minibatches of 10, at its shapes).
BENCH_SECTIONS: tuple[str, ...] = ("per_example", "layer", "steps", "mesimp")
QUICK_BENCH_SECONDS = 40.0

SETTINGS_NOTES: tuple[str, ...] = (
    f"Every run trains at most {EPOCHS} epochs (the authors' code) and stops early once dev "
    f"has not improved for {PATIENCE} epochs (`--patience {PATIENCE}`), the same rule for "
    "every arm of every comparison; its test score is read at the best dev epoch, as the "
    "paper selects. A meSimp run that stops early has had fewer prune cycles.",
    "MNIST tables 1, 4, 5 and Figure 4 use the paper's CPU setting: per-example top-k, "
    "minibatches of 10, 2 hidden layers of 500 (Table 5: 2 to 5). Table 6 and error "
    "feedback use unified top-k with minibatches of 50; meSimp on MNIST follows the "
    "authors' meSimp settings (k = 160, minibatches of 100, clipping at 5, prune cycles of "
    "5 epochs), in unified and per-example top-k.",
    "POS tagging runs on CoNLL-2000 (Brill-tagger tags, WSJ sections 15-18/20) and on the "
    "10% Penn Treebank sample (gold tags, about 3,400 training sentences), not on the full "
    "WSJ sections 0-18/22-24; minibatches of 8 sentences (the paper: 1), per-example top-k "
    "per LSTM gate. AdaGrad, Table 4 and meSimp (k = 20 of 500) run on the PTB sample only.",
    "Parsing runs on the 10% Penn Treebank sample (about 82,000 tokens), not Chen & "
    "Manning's full WSJ setup; minibatches of 250 transitions (the paper: 10,000), "
    "per-example top-k, cube activation, no dropout except in Table 4 (the parser's own "
    "default is dropout 0.5); meSimp at k = 20 of 500.",
    "Times are from a shared two-core CPU and include JAX's scanned epochs; the paper's are "
    "from its authors' C# framework on a 3.0 GHz Xeon. Compare ratios, not seconds.",
)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One subprocess: ``python -m experiments.<task> *args [--seed seed] --out DIR``.

    Attributes:
      task: ``mnist``, ``tagging``, ``parsing`` or ``bench``.
      args: the task's flags, without ``--seed`` and ``--out``.
      seed: the ``--seed``; None for a bench section.
      epochs: epochs the run trains (0 for bench), for the estimate.
      nominal_s: estimated seconds for the whole run before any run has been measured.
    """

    task: str
    args: tuple[str, ...]
    seed: int | None
    epochs: int = 0
    nominal_s: float = 60.0

    def command(self) -> list[str]:
        seed = [] if self.seed is None else ["--seed", str(self.seed)]
        return ["python", "-m", f"experiments.{self.task}", *self.args, *seed]

    def flags(self) -> list[str]:
        """The long options of ``args``; a bench run's section as ``--section=NAME`` too,
        since a section is a choice of the bench's command line."""
        flags = [a.split("=", 1)[0] for a in self.args if a.startswith("--")]
        section = _flag_value(self.args, "--section")
        return flags + ([f"--section={section}"] if section is not None else [])


@dataclasses.dataclass(frozen=True)
class Cell:
    """One setting, run once per seed. ``key`` names it for the tables and figures (for
    example ``{"task": "mnist", "optimizer": "adam", "model": "meprop", "k": 20}``)."""

    key: Mapping[str, Any]
    specs: tuple[RunSpec, ...]

    def matches(self, **want: Any) -> bool:
        return all(self.key.get(name) == value for name, value in want.items())


@dataclasses.dataclass(frozen=True)
class Grid:
    """One table or figure of the report; ``skipped`` says why it was not run, ``left_out``
    which cells of a grid of independent cells (``independent``) were left out and why."""

    name: str
    title: str
    cells: tuple[Cell, ...]
    skipped: str | None = None
    independent: bool = False
    left_out: tuple[str, ...] = ()

    def find(self, **want: Any) -> Cell | None:
        return next((c for c in self.cells if c.matches(**want)), None)

    def specs(self) -> list[RunSpec]:
        return [s for c in self.cells for s in c.specs]


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _nominal(task: str, args: Sequence[str], epochs: int, quick: bool) -> float:
    if quick:
        return 20.0 + epochs * QUICK_EPOCH_SECONDS[task]
    per_epoch = EPOCH_SECONDS[task]
    if task == "tagging" and (_flag_value(args, "--corpus") or "conll2000") == "conll2000":
        per_epoch = CONLL2000_EPOCH_SECONDS
    if task == "mnist":
        batch = int(_flag_value(args, "--batch-size") or 50)
        per_epoch += MNIST_SECONDS_PER_STEP_SIZE / batch
    return 30.0 + epochs * per_epoch


class _Builder:
    """Makes the cells of one grid size (full or quick) over ``seeds``."""

    def __init__(self, seeds: int, quick: bool):
        self.seeds = tuple(range(seeds))
        self.quick = quick

    def base(self, task: str) -> tuple[str, ...]:
        if task == "mnist":
            if self.quick:
                return ("--limit-train", "500", "--timing-batches", "2")
            return ()
        if task == "tagging":
            # One minibatch of 40 sentences is one length bucket: one training program to
            # compile instead of one per bucket.
            quick = ("--limit-train", "40", "--hidden", "64", "--batch-size", "40")
            return quick if self.quick else ()
        extra = ("--limit-train", "40", "--hidden", "64", "--timing-batches", "2")
        return ("--corpus", "ptb-dep-sample", *(extra if self.quick else ()))

    def cell(self, task: str, flags: Sequence[str], **key: Any) -> Cell:
        """One setting; every cell has the same schedule (epochs, and the patience rule),
        so that any two cells compared are paired."""
        epochs = QUICK_EPOCHS if self.quick else EPOCHS
        args = (*self.base(task), *flags, "--epochs", str(epochs), "--patience", str(PATIENCE))
        nominal = _nominal(task, args, epochs, self.quick)
        specs = tuple(RunSpec(task, args, s, epochs, nominal) for s in self.seeds)
        return Cell({"task": task, **key}, specs)

    def mnist_cpu(self, k: int, *extra: str, **key: Any) -> Cell:
        """MNIST as the paper's CPU runs: per-example top-k, minibatches of 10."""
        mode = ("--mode", "per-example") if k else ()
        model = "meprop" if k else "dense"
        flags = ("--k", str(k), *mode, "--batch-size", "10", *extra)
        return self.cell("mnist", flags, model=key.pop("model", model), k=k, **key)


def table1(b: _Builder) -> Grid:
    cells = []
    for optimizer in ("adam", "adagrad"):
        # Adam is every task's default: no flag, so the cells match Figure 4's.
        opt = ("--optimizer", optimizer) if optimizer != "adam" else ()
        k = int(paper.TABLE1[("mnist", optimizer)]["meprop"]["k"])
        cells += [b.mnist_cpu(kk, *opt, optimizer=optimizer) for kk in (0, k)]
        if b.quick and optimizer == "adagrad":
            continue  # the smoke run: AdaGrad on MNIST only, one tagging corpus
        k = int(paper.TABLE1[("pos", optimizer)]["meprop"]["k"])
        corpora = TAGGING_CORPORA[1:] if b.quick or optimizer == "adagrad" else TAGGING_CORPORA
        for corpus in corpora:
            for kk in (0, k):
                mode = ("--mode", "per-example") if kk else ()
                flags = ("--corpus", corpus, "--k", str(kk), *mode, *opt)
                model = "meprop" if kk else "dense"
                cells.append(
                    b.cell("tagging", flags, corpus=corpus, optimizer=optimizer, model=model, k=kk)
                )
        k = int(paper.TABLE1[("parsing", optimizer)]["meprop"]["k"])
        for kk in (0, k):
            mode = ("--mode", "per-example") if kk else ()
            model = "meprop" if kk else "dense"
            # The paper's Table 1 has no dropout; the parser's default is 0.5.
            flags = ("--k", str(kk), *mode, "--dropout", "0", *opt)
            cells.append(b.cell("parsing", flags, optimizer=optimizer, model=model, k=kk))
    return Grid("table1", "Table 1: dense vs meProp at the paper's k", tuple(cells))


def figure4(b: _Builder) -> Grid:
    ks = (20,) if b.quick else FIGURE4_KS
    cells = [b.mnist_cpu(0, optimizer="adam")]
    for k in ks:
        cells.append(b.mnist_cpu(k, optimizer="adam"))
        random = ("--k", str(k), "--mode", "random", "--batch-size", "10")
        cells.append(b.cell("mnist", random, model="random", k=k, optimizer="adam"))
        kdim = ("--kdim", "--k", str(k), "--batch-size", "10")
        cells.append(b.cell("mnist", kdim, model="kdim", k=k, optimizer="adam"))
    return Grid("figure4", "Figure 4: k, top-k vs random-k, meProp vs the k-wide MLP", tuple(cells))


def table4(b: _Builder) -> Grid:
    cells = []
    for task, (k, rate, _, _) in paper.TABLE4.items():
        drop = ("--dropout", f"{rate:g}")
        for kk in (0, k):
            model = "meprop" if kk else "dense"
            if task == "mnist":
                cells.append(b.mnist_cpu(kk, *drop, paper_task=task, dropout=rate))
                continue
            if b.quick:
                continue
            mode = ("--mode", "per-example") if kk else ()
            flags = ("--k", str(kk), *mode, *drop)
            run_task = "parsing" if task == "parsing" else "tagging"
            if run_task == "tagging":
                flags = ("--corpus", PTB_CORPUS, *flags)
            key = {"paper_task": task, "model": model, "k": kk, "dropout": rate}
            cells.append(b.cell(run_task, flags, **key))
    return Grid("table4", "Table 4: meProp with dropout", tuple(cells))


def table5(b: _Builder) -> Grid:
    layers = (3,) if b.quick else TABLE5_LAYERS
    drop = ("--dropout", f"{paper.TABLE5_DROPOUT:g}")
    cells = [
        b.mnist_cpu(k, "--layers", str(n), *drop, layers=n)
        for n in layers
        for k in (0, paper.TABLE5_K)
    ]
    return Grid("table5", "Table 5: deeper MLPs (dropout 0.1, k = 25)", tuple(cells))


def table6(b: _Builder) -> Grid:
    cells = []
    for n, (k, _, _) in paper.TABLE6.items():
        if b.quick and n != 2:
            continue
        for kk in (0, k):
            flags = ("--k", str(kk), "--mode", "unified", "--batch-size", str(paper.TABLE6_BATCH))
            flags = (*flags, "--layers", str(n))
            model = "meprop" if kk else "dense"
            cells.append(b.cell("mnist", flags, layers=n, model=model, k=kk))
    return Grid("table6", "Table 6: unified top-k, minibatch 50", tuple(cells))


def mesimp(b: _Builder) -> Grid:
    """meSimp at the authors' settings for each task, beside dense with the same flags."""
    k = str(paper.MESIMP["mnist"]["k"])
    common = ("--batch-size", "100", "--clip", "5")
    quick = ("--mesimp-cycle", "1", "--mesimp-prunes-per-epoch", "2") if b.quick else ()
    flags = ("--k", k, "--mesimp", *quick, *common)
    cells = [b.cell("mnist", flags, paper_task="mnist", model="mesimp", mode="unified")]
    if b.quick:
        return Grid("mesimp", "meSimp: hidden sizes and accuracy", tuple(cells))
    flags = ("--k", k, "--mode", "per-example", "--mesimp", *common)
    cells.append(b.cell("mnist", flags, paper_task="mnist", model="mesimp", mode="per-example"))
    cells.append(b.cell("mnist", ("--k", "0", *common), paper_task="mnist", model="dense"))
    # The dense arms are Table 1's Adam cells (the same command lines, so the same runs).
    for task, before, after in (
        ("pos", ("--corpus", PTB_CORPUS), ()),
        ("parsing", (), ("--dropout", "0")),  # as Table 1: the parser's default is 0.5
    ):
        run_task = "tagging" if task == "pos" else "parsing"
        k = str(paper.MESIMP[task]["k"])
        flags = (*before, "--k", k, "--mode", "per-example", *after, "--mesimp")
        key = {"paper_task": task, "mode": "per-example"}
        cells.append(b.cell(run_task, flags, model="mesimp", **key))
        dense = (*before, "--k", "0", *after)
        cells.append(b.cell(run_task, dense, paper_task=task, model="dense"))
    return Grid("mesimp", "meSimp: hidden sizes and accuracy", tuple(cells))


def feedback(b: _Builder) -> Grid:
    ks = (20,) if b.quick else FEEDBACK_KS
    cells = []
    for k in ks:
        flags = ("--k", str(k), "--mode", "unified", "--batch-size", "50")
        cells.append(b.cell("mnist", flags, model="plain", k=k))
        fb = ("--error-feedback", f"{FEEDBACK_DECAY:g}")
        cells.append(b.cell("mnist", (*flags, *fb), model="feedback", k=k))
    return Grid("feedback", "Error feedback vs plain meProp (MNIST, unified)", tuple(cells))


def speed(b: _Builder) -> Grid:
    cells = []
    for section in BENCH_SECTIONS:
        args = ("--section", section, "--no-progress", *(("--quick",) if b.quick else ()))
        nominal = QUICK_BENCH_SECONDS if b.quick else BENCH_SECONDS[section]
        spec = RunSpec("bench", args, None, 0, nominal)
        cells.append(Cell({"task": "bench", "section": section}, (spec,)))
    title = "Speed: python -m experiments.bench"
    return Grid("speed", title, tuple(cells), independent=True)


BUILDERS = {
    "table1": table1,
    "figure4": figure4,
    "table4": table4,
    "table5": table5,
    "table6": table6,
    "mesimp": mesimp,
    "feedback": feedback,
    "speed": speed,
}


def parse_only(text: str | None) -> tuple[str, ...]:
    """The grid names of ``--only NAME[,NAME]`` (all of them when None).

    Raises:
      ConfigError: naming ``--only`` and the known names.
    """
    if text is None:
        return GRID_NAMES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in GRID_NAMES]
    if unknown or not names:
        raise ConfigError(
            f"--only: unknown grid {', '.join(unknown) or repr(text)}; choose from "
            + ", ".join(GRID_NAMES)
        )
    return tuple(n for n in GRID_NAMES if n in names)


def build(names: Sequence[str], seeds: int, quick: bool) -> list[Grid]:
    """The grids ``names`` with ``seeds`` seeds each (0..seeds-1)."""
    b = _Builder(seeds, quick)
    return [BUILDERS[name](b) for name in names]


def parse_help_flags(help_text: str) -> frozenset[str]:
    """The long options an argparse ``--help`` text lists, and ``--section=NAME`` for each
    choice of a ``--section {a,b}`` option."""
    flags = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", help_text))
    for choices in re.findall(r"--section \{([^}]*)\}", help_text):
        flags.update(f"--section={c.strip()}" for c in choices.split(","))
    return frozenset(flags)


def _missing_flags(spec: RunSpec, flags: Mapping[str, frozenset[str] | None]) -> list[str]:
    known = flags.get(spec.task)
    if known is None:
        return [f"`python -m experiments.{spec.task} --help` failed"]
    return [f"experiments.{spec.task} {f}" for f in spec.flags() if f not in known]


def check_flags(grid: Grid, flags: Mapping[str, frozenset[str] | None]) -> Grid:
    """``grid``, marked skipped (with the reason) when one of its runs uses a flag that its
    task's command line lacks, or when the task could not be asked. A grid of independent
    cells loses only the cells concerned, each named in ``left_out``."""
    if grid.independent:
        kept, left_out = [], []
        for cell in grid.cells:
            missing = [m for spec in cell.specs for m in _missing_flags(spec, flags)]
            if missing:
                setting = ", ".join(f"{k}={v}" for k, v in cell.key.items() if k != "task")
                left_out.append(f"{setting}: not available ({', '.join(dict.fromkeys(missing))})")
            else:
                kept.append(cell)
        return dataclasses.replace(grid, cells=tuple(kept), left_out=tuple(left_out))
    missing = [m for spec in grid.specs() for m in _missing_flags(spec, flags)]
    if any(m.endswith("--help` failed") for m in missing):
        return dataclasses.replace(grid, skipped=next(m for m in missing if "--help" in m))
    if missing:
        names = ", ".join(dict.fromkeys(missing))
        return dataclasses.replace(grid, skipped=f"flags not available: {names}")
    return grid
