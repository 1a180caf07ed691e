"""The paper's numbers (Sun et al., ICML 2017, meProp; the meSimp README) that the report
compares with. Accuracies are percent (UAS for parsing); times are seconds per epoch on the
authors' CPU. Figure 4 values are read off the plot by eye.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Table 1: ``(task, optimizer) -> {model: {"iter", "bp_s", "dev", "test"}}`` with the
#: paper's k for meProp. ``bp_s`` is the linear-transformation backprop time per epoch.
TABLE1: Mapping[tuple[str, str], Mapping[str, Mapping[str, float]]] = {
    ("pos", "adagrad"): {
        "dense": {"iter": 4, "bp_s": 17534.4, "dev": 96.89, "test": 96.93},
        "meprop": {"k": 5, "iter": 4, "bp_s": 253.2, "dev": 97.18, "test": 97.25},
    },
    ("parsing", "adagrad"): {
        "dense": {"iter": 11, "bp_s": 8899.7, "dev": 89.07, "test": 88.92},
        "meprop": {"k": 20, "iter": 8, "bp_s": 492.3, "dev": 89.17, "test": 88.95},
    },
    ("mnist", "adagrad"): {
        "dense": {"iter": 8, "bp_s": 171.0, "dev": 98.20, "test": 97.52},
        "meprop": {"k": 10, "iter": 16, "bp_s": 4.1, "dev": 98.20, "test": 98.00},
    },
    ("pos", "adam"): {
        "dense": {"iter": 2, "bp_s": 16167.3, "dev": 97.18, "test": 97.07},
        "meprop": {"k": 5, "iter": 5, "bp_s": 247.2, "dev": 97.14, "test": 97.12},
    },
    ("parsing", "adam"): {
        "dense": {"iter": 14, "bp_s": 9077.7, "dev": 90.12, "test": 89.84},
        "meprop": {"k": 20, "iter": 6, "bp_s": 488.7, "dev": 90.02, "test": 90.01},
    },
    ("mnist", "adam"): {
        "dense": {"iter": 17, "bp_s": 169.5, "dev": 98.32, "test": 97.82},
        "meprop": {"k": 20, "iter": 15, "bp_s": 7.9, "dev": 98.22, "test": 98.01},
    },
}

#: Figure 4 (MNIST, Adam, h = 500): test accuracy per k; None where the plot has no point.
FIGURE4_DENSE = 97.82
FIGURE4_TOPK: Mapping[int, float | None] = {
    5: 96.0,
    10: None,
    20: 98.01,
    40: 98.11,
    80: 98.15,
    160: 98.02,
}
FIGURE4_RANDOM: Mapping[int, float | None] = {5: 86.8, 10: 90.5, 20: 92.2, 40: 94.1, 80: 96.0}
FIGURE4_KDIM: Mapping[int, float | None] = {5: 90.6, 10: 94.1, 20: 96.4, 40: 97.1, 50: 97.3}

#: Table 4 (Adam, dropout tuned per task): ``task -> (k, dropout, dense test, meProp test)``.
TABLE4: Mapping[str, tuple[int, float, float, float]] = {
    "pos": (20, 0.5, 97.20, 97.31),
    "parsing": (40, 0.5, 91.53, 91.99),
    "mnist": (25, 0.2, 98.09, 98.32),
}

#: Table 5 (MNIST, Adam, dropout 0.1, k = 25): hidden layers -> (dense test, meProp test).
TABLE5_K = 25
TABLE5_DROPOUT = 0.1
TABLE5: Mapping[int, tuple[float, float]] = {
    2: (98.10, 98.20),
    3: (98.21, 98.37),
    4: (98.10, 98.15),
    5: (98.05, 98.21),
}

#: Table 6 (MNIST, unified top-k, minibatch 50): hidden layers -> (k, dense, meProp).
TABLE6_BATCH = 50
TABLE6: Mapping[int, tuple[int, float, float]] = {2: (30, 97.97, 98.08), 5: (50, 98.09, 98.36)}

#: meSimp README (Adam, CPU): per task the dense test score (UAS for parsing), meSimp's, its
#: average hidden dimension and k.
MESIMP: Mapping[str, Mapping[str, float]] = {
    "pos": {"dense_test": 97.22, "test": 97.25, "dimension": 60, "hidden": 500, "k": 20},
    "parsing": {"dense_test": 89.80, "test": 90.11, "dimension": 51, "hidden": 500, "k": 20},
    "mnist": {"dense_test": 98.20, "test": 98.31, "dimension": 154, "hidden": 500, "k": 160},
}

#: Table 1's backprop speedups on the authors' CPU (per-example top-k, Adam), by task.
CPU_SPEEDUP: Mapping[str, float] = {"mnist": 21.4, "pos": 65.4, "parsing": 18.6}

#: Table 2 (Adam, CPU): overall forward + backward seconds per epoch, ``task -> (dense,
#: meProp)``; like Table 1 it leaves out graph building and the parameter update.
TABLE2_OVERALL: Mapping[str, tuple[float, float]] = {
    "pos": (23856.0, 7903.0),
    "parsing": (13020.0, 4516.0),
    "mnist": (240.0, 77.0),
}
CPU_OVERALL_SPEEDUP: Mapping[str, float] = {t: d / m for t, (d, m) in TABLE2_OVERALL.items()}

#: Table 7 (GPU, GTX 1080, unified top-k; synthetic matrix multiplication, batch 1024,
#: h = 8192): k -> (backprop ms, speedup); the dense baseline takes 308.00 ms.
TABLE7_DENSE_MS = 308.00
TABLE7: Mapping[int, tuple[float, float]] = {
    8: (8.37, 36.8),
    16: (9.16, 33.6),
    32: (11.20, 27.5),
    64: (14.38, 21.4),
    128: (21.28, 14.5),
    256: (38.57, 8.0),
    512: (69.95, 4.4),
}

SOURCE = (
    "Sun, Ren, Ma, Wang, *meProp: Sparsified Back Propagation for Accelerated Deep Learning "
    "with Reduced Overfitting*, ICML 2017 (Tables 1, 2, 4, 5, 6, 7; Figure 4 read off the plot, "
    "marked ≈); meSimp numbers from the README of the authors' meSimp repository."
)
