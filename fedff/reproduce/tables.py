"""The README's results tables as named sets of runs (`fedff reproduce TABLE`).

Each row is one fedff command (train, simulate or pipeline) on a named config with the
overrides the README used, the published figure it is compared with, the figure the
README reports, and a rough cost on the reference machine (2 cores, seconds) that
weights the overall progress bar's ETA. Figures are percentages in the row's metric:
test error, or AUROC for one-class rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    name: str
    config: str
    overrides: tuple[str, ...] = ()
    command: str = "train"  # train | simulate | pipeline
    reference: str = ""  # the published figure, in words
    reference_value: float | None = None  # the same, in the metric's unit (percent)
    readme_value: float | None = None  # what the README reports for this row
    seconds: float = 60.0  # about how long the full run takes on 2 cores
    metric: str = "test_error"  # test_error | auroc
    workers: int = 0  # pipeline rows: local workers


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    rows: tuple[Row, ...]
    metric_label: str = "test error"
    notes: tuple[str, ...] = field(default=())
    mean_row: bool = False  # rows are one experiment's parts (e.g. one class each)


RANDOM = ("train.negatives=random",)
DIRICHLET = ("federation.partitioner=dirichlet", "federation.alpha=0.5")
DEEP_SVDD = (98.0, 99.7, 91.7, 91.9, 94.9, 88.5, 98.3, 94.6, 93.9, 96.5)  # Ruff et al. 2018
ONECLASS_README = (99.2, 99.8, 94.7, 96.1, 96.1, 92.8, 98.4, 96.9, 93.6, 96.3)

TABLES: dict[str, Table] = {t.name: t for t in (
    Table("supervised", "Supervised and unsupervised FF, Collaborative FF (README: Results)", (
        Row("supervised FF, MNIST, 3 x 1000, 100 epochs", "mnist-ff-3x1000",
            reference="Matlab 1.47 %, best PyTorch port 1.45 %", reference_value=1.47,
            readme_value=1.41, seconds=3000),
        Row("supervised FF, MNIST, 3 x 1000, 10 epochs", "mnist-ff-3x1000-short",
            readme_value=1.82, seconds=250),
        Row("unsupervised FF, MNIST, 3 x 1000, 50 epochs", "mnist-ff-unsup-3x1000",
            ("train.epochs=50",), reference="paper 1.37 % (4 x 2000, 100 epochs)",
            reference_value=1.37, readme_value=1.60, seconds=1800),
        Row("FF, Fashion-MNIST, 3 x 1000, 20 epochs", "fashion-ff-3x1000",
            reference="CFF paper: FF 13.2 %", reference_value=13.2, readme_value=11.39,
            seconds=480),
        Row("Collaborative FF (all layers), Fashion-MNIST, 20 epochs", "fashion-cff-3x1000",
            reference="CFF paper: CFF 11.6 %", reference_value=11.6, readme_value=11.22,
            seconds=480),
    )),
    Table("uff", "Unsupervised Forward-Forward cells, MNIST, linear probe (README: UFF)", (
        Row("UFF, 3 x 1000 dae cells", "mnist-uff-dae", readme_value=1.72, seconds=370),
        Row("UFF, 3 x 1000 gan cells", "mnist-uff-dae", ("model.cell=gan",),
            readme_value=2.53, seconds=580),
        Row("UFF, 3 x 1000 ae cells", "mnist-uff-dae", ("model.cell=ae",), readme_value=7.45,
            seconds=340),
        Row("UFF, conv-dae cells 32/64/128", "mnist-uff-conv", ("model.cell=conv-dae",),
            readme_value=3.44, seconds=410),
        Row("UFF, conv-ae cells 32/64/128", "mnist-uff-conv", readme_value=5.34, seconds=280),
    ), notes=("The UFF paper reports that conv-autoencoder cells do best among UFF "
              "variants; its exact MNIST table was not available, so no published "
              "figure stands beside these rows.",)),
    Table("federation", "Federation: 10 simulated clients, MNIST, 3 x 1000 (README: "
          "Federation)", (
        Row("IID, 20 rounds x 5 local epochs, batch 50 per client", "mnist-ff-3x1000-fed10",
            command="simulate", reference="centralized, same recipe: 1.46 %",
            reference_value=1.46, readme_value=1.59, seconds=2100),
        Row("IID, 10 rounds x 1 local epoch", "mnist-ff-3x1000-short", command="simulate",
            reference="centralized, 10 epochs: 1.79 %", reference_value=1.79,
            readme_value=5.65, seconds=330),
        Row("Dirichlet(0.5) label skew, 10 rounds x 1 local epoch", "mnist-ff-3x1000-short",
            DIRICHLET, command="simulate", readme_value=5.36, seconds=330),
        Row("UFF dae cells, Dirichlet(0.5), no labels at the clients", "mnist-uff-dae",
            DIRICHLET, command="simulate", reference="centralized UFF: 1.72 %",
            reference_value=1.72, readme_value=2.51, seconds=600),
    )),
    Table("workers", "Layer workers: a 3-worker chain against one process (README: Layer "
          "workers)", (
        Row("3-worker chain, 10 epochs, random negatives", "mnist-ff-3x1000-short", RANDOM,
            command="pipeline", workers=3, reference="one process: 2.43 % (bit-identical)",
            reference_value=2.43, readme_value=2.43, seconds=200),
        Row("one process, the same", "mnist-ff-3x1000-short", RANDOM, readme_value=2.43,
            seconds=240),
    )),
    Table("pepita", "PEPITA, MNIST (README: PEPITA)", (
        Row("784-1024-10, fixed F, 100 epochs", "mnist-pepita-1x1024",
            reference="ICML 2022: 98.01 % accuracy (1.99 % error)", reference_value=1.99,
            readme_value=1.88, seconds=620),
        Row("the same with weight mirroring", "mnist-pepita-1x1024",
            ("pepita.feedback=mirror",), reference="ICLR 2024: better than fixed F (no figure)",
            readme_value=1.98, seconds=770),
        Row("784-1024-1024-10, fixed F, 30 epochs", "mnist-pepita-1x1024",
            ("model.hidden=1024,1024,10", "train.epochs=30", "optim.milestones=18,27"),
            readme_value=1.90, seconds=380),
        Row("3 x 1024, length-normalised, fixed F, 30 epochs", "mnist-pepita-wm-3x1024",
            ("pepita.feedback=fixed", "train.epochs=30", "optim.milestones=18,27"),
            readme_value=1.86, seconds=925),
        Row("the same with weight mirroring", "mnist-pepita-wm-3x1024",
            ("train.epochs=30", "optim.milestones=18,27"), readme_value=1.98, seconds=1170),
    )),
    Table("oneclass", "One-class FF, MNIST one-vs-rest, hb-svdd (README: One-class FF)",
          tuple(Row(f"normal class {k}", "mnist-oneclass", (f"oneclass.normal={k}",),
                    reference=f"Deep SVDD {DEEP_SVDD[k]} %", reference_value=DEEP_SVDD[k],
                    readme_value=ONECLASS_README[k], seconds=12, metric="auroc")
                for k in range(10)),
          metric_label="test AUROC", mean_row=True),
)}
