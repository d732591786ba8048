"""The per-layer result tables of ``compute_gradient_metrics.py``: which sign turns a detector's norms into a
score, one table per ID–OOD pair (every layer, ``total``, extra rows, the ``combined`` row, the baselines), their
average over OOD sets, the printed form and the JSON/CSV files.

Gradient scores (``--saved_form``): the files hold per-layer norms, and each detector's sign
(``utils/detectors/``) makes them a score. ``norm_single`` with ``min``, ``pred`` or ``exgrad`` scores −norm (ID
samples have the smaller gradient), with ``max`` or ``gradnorm`` +norm; ``original_single`` (the
confounding-label gradient of a BCE model) scores +norm, as in the original analysis. ``flip`` inverts any of
them. The output-based baselines are MSP (higher = ID) and −E(x) = logsumexp f(x), since the files store the
energy E(x) = −logsumexp f(x). The metrics themselves are ``utils.metrics``'.
"""
import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from utils.combine import COMBINED_ROW
from utils.detectors import CONFOUNDING, TRACK_GRADIENT_SCORES, Detector, get_detector
from utils.feature_baselines import FEATURE_BASELINES
from utils.io import atomic_write
from utils.metrics import FULL, OOD_POSITIVE_FPR, OPENOOD_FPR, Protocol

METRIC_TITLES = {"FPR95": "FPR95", "AUROC": "AUROC", "AUPR_IN": "AUPR-In", "AUPR_OUT": "AUPR-Out",
                 OOD_POSITIVE_FPR: "FPR95 (OOD+)", OPENOOD_FPR: "FPR@95 (OpenOOD)"}
RAW_STATISTICS = ("id_mean", "id_std", "ood_mean", "ood_std")
SAVED_FORMS = {"norm_single": "norm", "original_single": "original"}  # --saved_form → the file's "method"
BASELINES = {"MSP": ("msp", +1), "Energy": ("energy", -1)}  # row → (record key, sign making higher = ID)
RAW_VALUES_CONVENTION = "Mean ± std: of the raw values (gradient norm; MSP; energy E(x) = -logsumexp f(x))."
CONVENTIONS = ("ID is the positive class; a higher score means more in-distribution. Metrics in %.",
               "FPR95: the FPR (OOD accepted) at the highest threshold keeping >= 95% of ID, over all distinct "
               "thresholds.",
               "AUROC. AUPR-In: ID positive. AUPR-Out: OOD positive, score negated.",
               RAW_VALUES_CONVENTION,
               "combined: -Mahalanobis distance of the log per-layer norms from a Gaussian fit on ID training "
               "images only (--dataset train).",
               "Baselines: score = MSP and -E(x) = logsumexp f(x); --flip applies to neither them nor combined.")
FEATURE_CONVENTION = ("Feature baselines (Mahalanobis, KNN, ReAct, ASH, SCALE, ViM, fDBD, GEN, RMDS; "
                      "utils/feature_baselines/) on the penultimate features and the head, OpenOOD's defaults, fit "
                      "on ID training images only (--dataset train); mean ± std of their raw values (Mahalanobis "
                      "and KNN: the distance).")


def metric_cell(row: dict, metric: str) -> str:
    """A metric as printed: ``12.34``, or `` 12.34 ±  0.56`` where it is a mean over draws (padded, so that a
    right-aligned column lines up on the ±)."""
    std = row.get(f"{metric}_std")
    return f"{row[metric]:.2f}" if std is None else f"{row[metric]:6.2f} ± {std:5.2f}"


def metric_columns(protocol: Protocol) -> list[str]:
    """The CSV columns of the metrics: each one, then its std over draws where there are draws."""
    return [*protocol.metrics, *([f"{m}_std" for m in protocol.metrics] if protocol.drawn else [])]


def detector_of(saved_form: str, score: str | None) -> Detector:
    """The detector a ``--saved_form``/``--score`` pair names: ``norm_single`` with one of
    ``track_gradient.py``'s scores, or ``original_single`` (the confounding label) with none."""
    if saved_form == "norm_single" and score in TRACK_GRADIENT_SCORES:
        return get_detector(score)
    if saved_form == "original_single" and score is None:
        return CONFOUNDING
    raise ValueError(f"no detector (and so no score orientation) for saved_form={saved_form!r}, score={score!r}; "
                     f"known: {', '.join(f'norm_single/{s}' for s in TRACK_GRADIENT_SCORES)}, original_single")


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


def _row(name: str, kind: str, score: str, id_values, ood_values, sign: int, protocol: Protocol,
         subsets: list[np.ndarray] | None) -> dict:
    id_values, ood_values = np.asarray(id_values, np.float64), np.asarray(ood_values, np.float64)
    metrics = protocol.evaluate(sign * id_values, sign * ood_values, subsets)
    return {"row": name, "kind": kind, "score": score, **metrics,
            "id_mean": float(id_values.mean()), "id_std": float(id_values.std()),
            "ood_mean": float(ood_values.mean()), "ood_std": float(ood_values.std())}


def detection_table(id_record: dict, ood_record: dict, saved_form: str, score: str | None,
                    flip: bool = False, combined: tuple[np.ndarray, np.ndarray] | None = None,
                    protocol: Protocol = FULL, only: Sequence[str] | None = None,
                    features: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """Metrics (in %) of every layer, ``total``, the detector's extra rows, the ``combined`` row (when
    ``combined`` gives the ID and OOD Mahalanobis distances of ``utils.combine``) and the MSP / Energy
    baselines for one ID–OOD pair.

    Each row also holds the mean and (population) standard deviation of the raw values: gradient norms,
    distances, MSP, and the stored energy E(x). ``flip`` applies to the gradient rows only. ``protocol`` says
    which OOD samples count (every row of the table uses the same draws); ``only`` limits the gradient rows to
    those named. ``features`` gives each feature baseline's ID and OOD raw values (``utils.feature_baselines``:
    its score times its sign), rows beside MSP and Energy.
    """
    sign = score_sign(saved_form, score, flip)
    value = "norm" if id_record.get("norm", "L2") != "none" else "value"  # ODIN's values are not norms
    gradient_label = f"{'+' if sign > 0 else '-'}{value}"
    id_rows, ood_rows = gradient_rows(id_record), gradient_rows(ood_record)
    num_id, num_ood = id_record["num_samples"], ood_record["num_samples"]
    subsets = protocol.subsets(num_id, num_ood, ood_record["dataset"])
    rows = [_row(name, _row_kind(id_record, name), gradient_label, id_rows[name], ood_rows[name], sign, protocol,
                 subsets)
            for name in id_rows if only is None or name in only]
    if combined is not None:
        rows.append(_row(COMBINED_ROW, "combined", "-distance", *combined, -1, protocol, subsets))
    rows += [_row(name, "baseline", ("-" if b_sign < 0 else "") + key, id_record[key], ood_record[key], b_sign,
                  protocol, subsets)
             for name, (key, b_sign) in BASELINES.items()]
    rows += [_row(name, "baseline", FEATURE_BASELINES[name].score, *values, FEATURE_BASELINES[name].sign, protocol,
                  subsets)
             for name, values in (features or {}).items()]
    headline = detector_of(saved_form, score).headline_row(list(id_record["layers"]))
    return {"in_dataset": id_record["dataset"], "ood_dataset": ood_record["dataset"], "model": id_record["model"],
            "saved_form": saved_form, "score": score, "flip": flip, "gradient_score": gradient_label,
            "norm": id_record.get("norm", "L2"), "headline": headline, "num_id": num_id, "num_ood": num_ood,
            "protocol": protocol.describe(num_id, num_ood), "metrics_in": "percent",
            "conventions": CONVENTIONS + (FEATURE_CONVENTION,) * bool(features) + protocol.conventions(),
            "rows": rows}


def table_protocol(table: dict) -> Protocol:
    """The protocol a table was made with (tables without one: ``full``)."""
    described = table.get("protocol", {})
    return Protocol(**{k: described[k] for k in ("name", "seed", "draws", "ood_positive", "openood")
                       if k in described})


def _average_metrics(per_set: Sequence[dict], metrics: Sequence[str]) -> dict:
    """The unweighted mean over OOD sets of each metric; over draws, the mean and std of each draw's average
    (draw i of every set together)."""
    if "draws" not in per_set[0]:
        return {m: float(np.mean([r[m] for r in per_set])) for m in metrics}
    averages = {m: np.mean([r["draws"][m] for r in per_set], axis=0) for m in metrics}
    return {**{m: float(v.mean()) for m, v in averages.items()},
            **{f"{m}_std": float(v.std()) for m, v in averages.items()},
            "draws": {m: v.tolist() for m, v in averages.items()}}


def average_table(tables: list[dict]) -> dict:
    """The unweighted mean of each metric over OOD sets; the OOD mean ± std pool all their samples."""
    n = np.array([t["num_ood"] for t in tables], dtype=np.float64)
    metrics = table_protocol(tables[0]).metrics
    rows = []
    for per_set in zip(*(t["rows"] for t in tables)):
        row = {k: per_set[0][k] for k in ("row", "kind", "score", "id_mean", "id_std")}
        row.update(_average_metrics(per_set, metrics))
        means = np.array([r["ood_mean"] for r in per_set])
        second_moments = np.array([r["ood_std"] ** 2 + r["ood_mean"] ** 2 for r in per_set])
        row["ood_mean"] = float(n @ means / n.sum())
        row["ood_std"] = float(np.sqrt(max(n @ second_moments / n.sum() - row["ood_mean"] ** 2, 0.0)))
        rows.append(row)
    return {**{k: v for k, v in tables[0].items() if k not in ("ood_dataset", "num_ood", "protocol", "rows")},
            "ood_dataset": "average", "datasets": [t["ood_dataset"] for t in tables], "num_ood": int(n.sum()),
            "protocol": {k: v for k, v in tables[0].get("protocol", {}).items() if k != "ood_per_draw"}, "rows": rows}


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
    norms = "" if table["norm"] == "none" else f" ({table['norm']} norms)"
    header = [f"== {table['in_dataset']} (ID, {table['num_id']} samples) vs {ood} ==",
              f"Model {model['name']} ({model['arch']}, {model['num_classes']} classes, epoch {model['epoch']}), "
              f"gradients {form}: detection score = {table['gradient_score']}{norms}; "
              f"headline row: {table['headline']}.",
              *table["conventions"]]
    if "datasets" in table:
        header.append(f"Average: metrics are the unweighted mean over the OOD sets; OOD mean ± std pools their "
                      f"{table['num_ood']} samples.")

    if "ood_per_draw" in table.get("protocol", {}):
        ood_per_draw = table["protocol"]["ood_per_draw"]
        header.append(f"{ood_per_draw} of the {table['num_ood']} OOD samples per draw"
                      + (" (all of them: the set is smaller than a fifth of the ID set)."
                         if ood_per_draw == table["num_ood"] else "."))

    rows = table["rows"]
    columns = [["layer", *(r["row"] for r in rows)]]
    columns += [[METRIC_TITLES[m], *(metric_cell(r, m) for r in rows)] for m in table_protocol(table).metrics]
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
    columns = ["ood_dataset", "row", "kind", "score", *metric_columns(table_protocol(table)), *RAW_STATISTICS]
    return write_json_and_csv(table, ({**row, "ood_dataset": table["ood_dataset"]} for row in table["rows"]),
                              columns, stem)


def write_json_and_csv(table: dict, csv_rows: Iterable[dict], columns: Sequence[str], stem: str | Path) -> list[Path]:
    """Write ``table`` as ``<stem>.json`` and ``csv_rows`` (their ``columns``) as ``<stem>.csv``, atomically."""
    json_path, csv_path = Path(f"{stem}.json"), Path(f"{stem}.csv")
    text = json.dumps(table, indent=2, ensure_ascii=False, default=str) + "\n"
    atomic_write(json_path, lambda f: f.write(text.encode()))
    rows = io.StringIO()
    writer = csv.DictWriter(rows, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows)
    atomic_write(csv_path, lambda f: f.write(rows.getvalue().encode()))
    return [json_path, csv_path]
