"""ID-vs-OOD figures: a histogram of the raw values beside the ROC curve of the detection score.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas), so plotting never needs a display
and leaves pyplot's global state alone.
"""
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.io import atomic_write
from utils.metrics import fpr_at_tpr, ood_metrics, roc

ID_COLOR, OOD_COLOR = "tab:blue", "tab:orange"
BASELINE_STYLES = {"MSP": ("0.45", "--"), "Energy": ("0.45", ":"), "Mahalanobis": ("tab:cyan", "--"),
                   "KNN": ("tab:olive", ":")}


def shared_bin_edges(id_values: np.ndarray, ood_values: np.ndarray) -> tuple[np.ndarray, bool]:
    """Bin edges common to ID and OOD, and whether they are logarithmic.

    Positive values spanning more than two decades (gradient norms often do) get log-spaced edges. The bin
    count is the Freedman–Diaconis rule on the pooled values, clipped to 10–80 bins.
    """
    pooled = np.concatenate([id_values, ood_values]).astype(np.float64)
    log = bool(pooled.min() > 0 and np.percentile(pooled, 99) > 100 * np.percentile(pooled, 1))
    x = np.log10(pooled) if log else pooled
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    bins = int(np.clip(len(np.histogram_bin_edges(x, bins="fd")) - 1, 10, 80))
    edges = np.linspace(lo, hi, bins + 1)
    return (10 ** edges if log else edges), log


def plot_detection(path: str | Path, id_values, ood_values, sign: int, metrics: dict, *, title: str,
                   value_label: str, score_label: str, in_dataset: str, ood_dataset: str,
                   baselines: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """Save a two-panel PNG: ID and OOD histograms of the raw ``values`` (shared bins, density-normalised,
    the FPR95 threshold marked) and the ROC curve of the score ``sign · values`` (ID positive).

    ``metrics`` is a table row (metrics in %); ``value_label`` names the raw values (x axis), ``score_label``
    the score (ROC legend); ``baselines`` maps a name to (ID scores, OOD scores), drawn as grey reference
    ROC curves.
    """
    id_values, ood_values = np.asarray(id_values, np.float64), np.asarray(ood_values, np.float64)
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    hist_ax, roc_ax = fig.subplots(1, 2, width_ratios=[1.35, 1])
    fig.suptitle(f"{title}\nFPR95 {metrics['FPR95']:.2f}%   AUROC {metrics['AUROC']:.2f}%   "
                 f"AUPR-In {metrics['AUPR_IN']:.2f}%   AUPR-Out {metrics['AUPR_OUT']:.2f}%")

    edges, log = shared_bin_edges(id_values, ood_values)
    widths = np.diff(np.log10(edges)) if log else np.diff(edges)  # density per unit of the x axis
    top = 0.0
    for values, label, color in ((id_values, f"{in_dataset} (ID, n={id_values.size})", ID_COLOR),
                                 (ood_values, f"{ood_dataset} (OOD, n={ood_values.size})", OOD_COLOR)):
        density = np.histogram(values, bins=edges)[0] / (values.size * widths)
        hist_ax.stairs(density, edges, fill=True, alpha=0.35, color=color)
        hist_ax.stairs(density, edges, color=color, linewidth=1.2, label=label)
        top = max(top, density.max())
    hist_ax.set_ylim(0, 1.3 * top)  # headroom for the legend
    fpr95, threshold = fpr_at_tpr(sign * id_values, sign * ood_values)
    hist_ax.axvline(sign * threshold, color="k", linestyle="--", linewidth=1,
                    label=f"accepted as ID at TPR 95%: {'≥' if sign > 0 else '≤'} {sign * threshold:.4g}")
    if log:
        hist_ax.set_xscale("log")
    hist_ax.set_xlabel(value_label + (" (log scale)" if log else ""))
    hist_ax.set_ylabel("density per decade" if log else "density")
    hist_ax.legend(fontsize="small")

    for name, (id_scores, ood_scores) in (baselines or {}).items():
        fpr, tpr, _ = roc(id_scores, ood_scores)
        color, style = BASELINE_STYLES.get(name, ("0.6", "-."))
        roc_ax.plot(fpr, tpr, color=color, linestyle=style, linewidth=1.2,
                    label=f"{name} (AUROC {100 * ood_metrics(id_scores, ood_scores)['AUROC']:.2f}%)")
    fpr, tpr, _ = roc(sign * id_values, sign * ood_values)
    roc_ax.plot(fpr, tpr, color="tab:red", linewidth=2, label=f"{score_label} (AUROC {metrics['AUROC']:.2f}%)")
    roc_ax.plot([0, 1], [0, 1], color="0.8", linewidth=1, label="chance")
    roc_ax.axhline(0.95, color="k", linestyle=":", linewidth=0.8)
    roc_ax.plot([fpr95], [0.95], "o", color="tab:red", label=f"FPR95 = {100 * fpr95:.2f}%")
    roc_ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal",
               xlabel="FPR: OOD samples accepted as ID", ylabel="TPR: ID samples kept")
    roc_ax.legend(fontsize="small", loc="lower right")

    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130))
    return path


REFERENCE_STYLES = {"total": ("tab:red", "-"), "combined": ("tab:purple", "-."), **BASELINE_STYLES}  # extra rows: pink


def plot_layer_auroc(path: str | Path, tables: list[dict], *, title: str) -> Path:
    """Save a PNG of where in the network the signal lives: each tracked layer's AUROC against its depth.

    ``tables`` are one detector's detection tables (every row, metrics in %), one per OOD set, then their
    average if there are several: one line each, the last one (the average, or the only set) thick. Its
    rows that are no layer (``total``, extra rows, the MSP / Energy baselines) are horizontal references,
    the detector's headline layer is starred, and a mean over draws shows its ± std as a band.
    """
    reference = tables[-1]
    layers = [r["row"] for r in reference["rows"] if r["kind"] == "layer"]
    depth = np.arange(len(layers))
    fig = Figure(figsize=(max(8.0, 3.5 + 0.32 * len(layers)), 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = iter(("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                   "tab:olive", "tab:cyan"))
    lowest = 100.0
    for table in tables:
        rows = {r["row"]: r for r in table["rows"]}
        auroc = np.array([rows[name]["AUROC"] for name in layers])
        lowest = min(lowest, auroc.min())
        thick = table is reference and len(tables) > 1
        color = "k" if thick else next(colors)
        label = (f"average over {len(table['datasets'])} OOD sets" if "datasets" in table
                 else f"{table['ood_dataset']} (n={table['num_ood']})")
        drawn = "AUROC_std" in rows[layers[0]]
        ax.plot(depth, auroc, marker="o", markersize=3.5 if thick else 3, linewidth=2.4 if thick else 1.2,
                color=color, label=label + (" (band: ± std over draws)" if drawn and thick else ""),
                zorder=3 if thick else 2)
        if drawn:
            std = np.array([rows[name]["AUROC_std"] for name in layers])
            ax.fill_between(depth, auroc - std, auroc + std, color=color, alpha=0.15, linewidth=0)
    where = "average" if len(tables) > 1 else reference["ood_dataset"]
    for row in (r for r in reference["rows"] if r["kind"] != "layer"):
        color, style = REFERENCE_STYLES.get(row["row"], ("tab:pink", "-."))
        headline = ", headline row" if row["row"] == reference["headline"] else ""
        ax.axhline(row["AUROC"], color=color, linestyle=style, linewidth=1.1,
                   label=f"{row['row']} ({where}{headline}): {row['AUROC']:.1f}%")
        lowest = min(lowest, row["AUROC"])
    if reference["headline"] in layers:
        headline = next(r for r in reference["rows"] if r["row"] == reference["headline"])
        ax.plot([layers.index(reference["headline"])], [headline["AUROC"]], "*", color="gold", markersize=15,
                markeredgecolor="k", zorder=4, label=f"headline row: {reference['headline']}")
    if lowest < 60:
        ax.axhline(50, color="0.8", linewidth=1, zorder=1, label="chance (50%)")
    ax.set_xticks(depth, [name.removesuffix(".weight") for name in layers], rotation=60, ha="right",
                  rotation_mode="anchor", fontsize="small")
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.set_xlabel("tracked weight tensor, input to output (names without .weight)")
    ax.set_ylabel("AUROC (%), ID positive")
    ax.grid(axis="y", color="0.9")
    fig.suptitle(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)

    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130))
    return path
