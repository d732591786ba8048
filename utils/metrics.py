"""OOD-detection metrics, the sign conventions of gradient-norm scores, and the per-layer result tables.

Every score here is oriented so that **higher means more in-distribution**, and in-distribution (ID) is the
positive class (energy_ood's default; Outlier Exposure, and energy_ood with ``--out_as_pos``, take OOD as
positive); ``ood_metrics`` states the definitions.

Gradient scores (``--saved_form`` of ``compute_gradient_metrics.py``): the files hold per-layer norms, and
each detector's sign (``utils/detectors.py``) makes them a score. ``norm_single`` with ``min``, ``pred`` or
``exgrad`` scores −norm (ID samples have the smaller gradient), with ``max`` or ``gradnorm`` +norm;
``original_single`` (the confounding-label gradient of a BCE model) scores +norm, as in the original
analysis. ``flip`` inverts any of them. The output-based baselines are MSP (higher = ID) and
−E(x) = logsumexp f(x), since the files store the energy E(x) = −logsumexp f(x).
"""
import csv
import io
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from utils.combine import COMBINED_ROW
from utils.detectors import CONFOUNDING, TRACK_GRADIENT_SCORES, Detector, get_detector
from utils.io import atomic_write

METRICS = ("FPR95", "AUROC", "AUPR_IN", "AUPR_OUT")
CSV_COLUMNS = ("ood_dataset", "row", "kind", "score", *METRICS, "id_mean", "id_std", "ood_mean", "ood_std")
SAVED_FORMS = {"norm_single": "norm", "original_single": "original"}  # --saved_form → the file's "method"
BASELINES = {"MSP": ("msp", +1), "Energy": ("energy", -1)}  # row → (record key, sign making higher = ID)
CONVENTIONS = ("ID is the positive class; a higher score means more in-distribution. Metrics in %.",
               "FPR95: the FPR (OOD accepted) at the highest threshold keeping >= 95% of ID, over all distinct "
               "thresholds.",
               "AUROC. AUPR-In: ID positive. AUPR-Out: OOD positive, score negated.",
               "Mean ± std: of the raw values (gradient norm; MSP; energy E(x) = -logsumexp f(x)).",
               "combined: -Mahalanobis distance of the log per-layer norms from a Gaussian fit on ID training "
               "images only (--dataset train).",
               "Baselines: score = MSP and -E(x) = logsumexp f(x); --flip applies to neither them nor combined.")


def _scores_and_labels(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    if id_scores.size == 0 or ood_scores.size == 0:
        raise ValueError(f"need ID and OOD scores, got {id_scores.size} ID and {ood_scores.size} OOD")
    scores = np.concatenate([id_scores, ood_scores])
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    labels = np.concatenate([np.ones(id_scores.size), np.zeros(ood_scores.size)])
    return scores, labels


def roc(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, TPR, thresholds) at every distinct threshold, ID positive, thresholds decreasing."""
    scores, labels = _scores_and_labels(id_scores, ood_scores)
    return roc_curve(labels, scores, drop_intermediate=False)


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> tuple[float, float]:
    """(FPR, threshold) at the highest threshold whose TPR ≥ ``tpr`` (ID positive, higher = ID)."""
    fprs, tprs, thresholds = roc(id_scores, ood_scores)
    i = int(np.argmax(tprs >= tpr))  # TPR rises as the threshold falls: the first hit is the highest threshold
    return float(fprs[i]), float(thresholds[i])


def ood_metrics(id_scores, ood_scores) -> dict[str, float]:
    """FPR95, AUROC, AUPR_IN and AUPR_OUT as fractions in [0, 1]; ID is positive, higher score = more ID.

    A threshold t accepts a sample as ID when its score is ≥ t, so TPR(t) = #{ID ≥ t}/n_id (ID kept) and
    FPR(t) = #{OOD ≥ t}/n_ood (OOD wrongly accepted).

    * FPR95    — FPR(t*) at the highest threshold t* with TPR(t*) ≥ 0.95, searched over every distinct score
                 (``sklearn.metrics.roc_curve(..., drop_intermediate=False)``; the default
                 ``drop_intermediate=True`` removes collinear ROC points, which can skip t* when scores tie).
    * AUROC    — ``sklearn.metrics.roc_auc_score`` = P(s_id > s_ood) + ½·P(s_id = s_ood), the Mann–Whitney
                 U statistic divided by n_id·n_ood.
    * AUPR_IN  — ``sklearn.metrics.average_precision_score`` with ID positive: Σ_k (R_k − R_{k−1})·P_k over
                 the distinct thresholds in decreasing order (precision P_k, recall R_k), no interpolation.
    * AUPR_OUT — the same with OOD positive and the score negated.

    OpenOOD and pytorch-ood take **OOD as the positive class** instead: their "FPR@95TPR" is the fraction
    of ID samples flagged as OOD when 95% of the OOD samples are detected — a different operating point
    and in general a different number. AUROC is the same under both conventions; AUPR-In and AUPR-Out
    trade places.
    """
    scores, labels = _scores_and_labels(id_scores, ood_scores)
    return {"FPR95": fpr_at_tpr(id_scores, ood_scores)[0],
            "AUROC": float(roc_auc_score(labels, scores)),
            "AUPR_IN": float(average_precision_score(labels, scores)),
            "AUPR_OUT": float(average_precision_score(1 - labels, -scores))}


def detector_of(saved_form: str, score: str | None) -> Detector:
    """The detector a ``--saved_form``/``--score`` pair names: ``norm_single`` with one of
    ``track_gradient.py``'s scores, or ``original_single`` (the confounding label) with none."""
    if saved_form == "norm_single" and score in TRACK_GRADIENT_SCORES:
        return get_detector(score)
    if saved_form == "original_single" and score is None:
        return CONFOUNDING
    raise ValueError(f"no detector (and so no score orientation) for saved_form={saved_form!r}, score={score!r}; known: "
                     f"{', '.join(f'norm_single/{s}' for s in TRACK_GRADIENT_SCORES)}, original_single")


def score_sign(saved_form: str, score: str | None, flip: bool = False) -> int:
    """+1 or −1: the factor that turns a gradient norm into a detection score (higher = ID)."""
    sign = detector_of(saved_form, score).sign
    return -sign if flip else sign


def detection_score(values, saved_form: str, score: str | None, flip: bool = False) -> np.ndarray:
    """The detection score (higher = more in-distribution) of gradient norms ``values``.

    ``norm_single``: −norm for ``min``, ``pred`` and ``exgrad``, +norm for ``max`` and ``gradnorm``;
    ``original_single``: +norm.
    ``flip`` inverts the sign.
    """
    return score_sign(saved_form, score, flip) * np.asarray(values, dtype=np.float64)


def gradient_rows(record: dict) -> dict[str, np.ndarray]:
    """The gradient-norm arrays of a gradients record: every tracked layer in model order, ``total``, then the
    detector's extra rows (ExGrad's paper form)."""
    return {**record["layers"], "total": record["total"], **record.get("extra", {})}


def _row_kind(record: dict, name: str) -> str:
    return "total" if name == "total" else "layer" if name in record["layers"] else "extra"


def baseline_scores(record: dict) -> dict[str, np.ndarray]:
    """MSP (higher = ID) and the negated energy −E(x) = logsumexp f(x) of a gradients record."""
    return {row: sign * np.asarray(record[key], dtype=np.float64) for row, (key, sign) in BASELINES.items()}


def _row(name: str, kind: str, score: str, id_values, ood_values, sign: int) -> dict:
    id_values, ood_values = np.asarray(id_values, np.float64), np.asarray(ood_values, np.float64)
    metrics = ood_metrics(sign * id_values, sign * ood_values)
    return {"row": name, "kind": kind, "score": score, **{k: 100 * v for k, v in metrics.items()},
            "id_mean": float(id_values.mean()), "id_std": float(id_values.std()),
            "ood_mean": float(ood_values.mean()), "ood_std": float(ood_values.std())}


def detection_table(id_record: dict, ood_record: dict, saved_form: str, score: str | None,
                    flip: bool = False, combined: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Metrics (in %) of every layer, ``total``, the detector's extra rows, the ``combined`` row (when
    ``combined`` gives the ID and OOD Mahalanobis distances of ``utils.combine``) and the MSP / Energy
    baselines for one ID–OOD pair.

    Each row also holds the mean and (population) standard deviation of the raw values: gradient norms,
    distances, MSP, and the stored energy E(x). ``flip`` applies to the gradient rows only.
    """
    sign = score_sign(saved_form, score, flip)
    gradient_label = "+norm" if sign > 0 else "-norm"
    id_rows, ood_rows = gradient_rows(id_record), gradient_rows(ood_record)
    rows = [_row(name, _row_kind(id_record, name), gradient_label, id_rows[name], ood_rows[name], sign)
            for name in id_rows]
    if combined is not None:
        rows.append(_row(COMBINED_ROW, "combined", "-distance", *combined, -1))
    rows += [_row(name, "baseline", ("-" if b_sign < 0 else "") + key, id_record[key], ood_record[key], b_sign)
             for name, (key, b_sign) in BASELINES.items()]
    headline = detector_of(saved_form, score).headline_row(list(id_record["layers"]))
    return {"in_dataset": id_record["dataset"], "ood_dataset": ood_record["dataset"], "model": id_record["model"],
            "saved_form": saved_form, "score": score, "flip": flip, "gradient_score": gradient_label,
            "norm": id_record.get("norm", "L2"), "headline": headline,
            "num_id": id_record["num_samples"], "num_ood": ood_record["num_samples"],
            "metrics_in": "percent", "conventions": CONVENTIONS, "rows": rows}


def average_table(tables: list[dict]) -> dict:
    """The unweighted mean of each metric over OOD sets; the OOD mean ± std pool all their samples."""
    n = np.array([t["num_ood"] for t in tables], dtype=np.float64)
    rows = []
    for per_set in zip(*(t["rows"] for t in tables)):
        row = {k: per_set[0][k] for k in ("row", "kind", "score", "id_mean", "id_std")}
        row.update({m: float(np.mean([r[m] for r in per_set])) for m in METRICS})
        means = np.array([r["ood_mean"] for r in per_set])
        second_moments = np.array([r["ood_std"] ** 2 + r["ood_mean"] ** 2 for r in per_set])
        row["ood_mean"] = float(n @ means / n.sum())
        row["ood_std"] = float(np.sqrt(max(n @ second_moments / n.sum() - row["ood_mean"] ** 2, 0.0)))
        rows.append(row)
    return {**{k: v for k, v in tables[0].items() if k not in ("ood_dataset", "num_ood", "rows")},
            "ood_dataset": "average", "datasets": [t["ood_dataset"] for t in tables], "num_ood": int(n.sum()),
            "rows": rows}


def best_and_worst_layers(table: dict) -> tuple[str, str]:
    """The tracked layers with the highest and the lowest AUROC."""
    layers = sorted((r for r in table["rows"] if r["kind"] == "layer"), key=lambda r: r["AUROC"])
    return layers[-1]["row"], layers[0]["row"]


def format_table(table: dict) -> str:
    """The table as aligned text, under a header that states the data, the score and the conventions."""
    model = table["model"]
    ood = (f"the average over {len(table['datasets'])} OOD sets ({', '.join(table['datasets'])})"
           if "datasets" in table else f"{table['ood_dataset']} (OOD, {table['num_ood']} samples)")
    form = table["saved_form"] + (f", score={table['score']}" if table["score"] else "") + (
        ", flipped" if table["flip"] else "")
    header = [f"== {table['in_dataset']} (ID, {table['num_id']} samples) vs {ood} ==",
              f"Model {model['name']} ({model['arch']}, {model['num_classes']} classes, epoch {model['epoch']}), "
              f"gradients {form}: detection score = {table['gradient_score']} ({table['norm']} norms); "
              f"headline row: {table['headline']}.",
              *table["conventions"]]
    if "datasets" in table:
        header.append(f"Average: metrics are the unweighted mean over the OOD sets; OOD mean ± std pools their "
                      f"{table['num_ood']} samples.")

    rows = table["rows"]
    columns = [["layer", *(r["row"] for r in rows)]]
    columns += [[title, *(f"{r[m]:.2f}" for r in rows)]
                for title, m in zip(("FPR95", "AUROC", "AUPR-In", "AUPR-Out"), METRICS)]
    for side in ("ID", "OOD"):  # "mean ± std" cells aligned on the ±
        means = [f"{side} mean", *(f"{r[f'{side.lower()}_mean']:.4g}" for r in rows)]
        stds = ["std", *(f"{r[f'{side.lower()}_std']:.3g}" for r in rows)]
        wm, ws = max(map(len, means)), max(map(len, stds))
        columns.append([f"{m.rjust(wm)} ± {s.ljust(ws)}" for m, s in zip(means, stds)])
    widths = [max(map(len, column)) for column in columns]
    lines = ["  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()
             for cells in zip(*columns)]
    rule = "-" * max(map(len, lines))
    body = [lines[0]]
    for previous, row, text in zip([None, *rows], rows, lines[1:]):
        if previous is not None and previous["kind"] != row["kind"]:
            body.append(rule)
        body.append(text)
    best, worst = best_and_worst_layers(table)
    auroc = {r["row"]: r["AUROC"] for r in rows}
    footer = f"Best layer by AUROC: {best} ({auroc[best]:.2f}); worst: {worst} ({auroc[worst]:.2f})."
    return "\n".join([*header, "", *body, footer])


def write_table(table: dict, stem: str | Path) -> list[Path]:
    """Write ``<stem>.json`` (the whole table) and ``<stem>.csv`` (one line a row) atomically; return the paths."""
    json_path, csv_path = Path(f"{stem}.json"), Path(f"{stem}.csv")
    text = json.dumps(table, indent=2, ensure_ascii=False, default=str) + "\n"
    atomic_write(json_path, lambda f: f.write(text.encode()))
    rows = io.StringIO()
    writer = csv.DictWriter(rows, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "ood_dataset": table["ood_dataset"]} for row in table["rows"])
    atomic_write(csv_path, lambda f: f.write(rows.getvalue().encode()))
    return [json_path, csv_path]
