"""One table of every tracked detector beside the baselines: which detector wins on which OOD set.

``comparison_table`` takes each detector's detection tables (``utils.tables.detection_table``, one per OOD
set) and keeps one row per detector, its headline score (``Detector.headline_row``: ``total``, the last
layer or an extra row such as ExGrad's ``fc.weight:L1``), its ``combined`` row where the tables have one
(``utils.combine``: fit on training images only), and the baselines once (MSP, Energy, and where fit the
feature baselines of ``utils.feature_baselines``: Mahalanobis, KNN, ReAct, ASH, SCALE, ViM, fDBD, GEN, RMDS),
from the first detector's files (every file stores them for the same samples). Its cells are the per-set
tables' numbers, unchanged; the average column is ``average_table``'s. Rows are sorted by average AUROC.

``openood_table`` recasts a comparison in OpenOOD v1.5's form (``--benchmark=openood``): AUROC and FPR@95
with **OOD as the positive class** (``utils.metrics.openood_fpr95``, as OpenOOD's
``openood/evaluators/metrics.py`` computes it) per set, and the near- and far-OOD figures as plain means over the
group's sets, as its evaluator takes them.
"""
from pathlib import Path

import numpy as np

from utils.combine import COMBINED_ROW
from utils.detectors import DETECTORS, Detector
from utils.feature_baselines import FEATURE_BASELINES
from utils.metrics import OOD_POSITIVE_FPR, OPENOOD_FPR
from utils.tables import (
    METRIC_TITLES,
    RAW_VALUES_CONVENTION,
    average_table,
    metric_cell,
    metric_columns,
    table_protocol,
    write_json_and_csv,
)

OPENOOD_SHOWN = (OPENOOD_FPR, "AUROC")  # OpenOOD's table: FPR@95 (OOD positive, as its evaluator), AUROC
OPENOOD_TITLES = {OPENOOD_FPR: "FPR@95", "AUROC": "AUROC"}
SHOWN = ("FPR95", "AUROC")  # printed per OOD set (and FPR95 (OOD+) where asked); the CSV/JSON hold every metric
CSV_KEYS = ("name", "kind", "row", "score", "ood_dataset")


def tracked_detectors(model_folder: str | Path, last_layer: bool = False) -> list[Detector]:
    """The detectors tracked for a model: the subfolders of ``gradients/<in-dataset>/<name>/`` named after
    one (the confounding label's is ``original``), in ``DETECTORS`` order; other folders are ignored. With
    ``last_layer``, those of ``--layers last`` (``<name>-last``)."""
    detectors = [d.on_last_layer() if last_layer else d for d in DETECTORS.values()
                 if d.has_weight_gradients or not last_layer]
    return [d for d in detectors if (Path(model_folder) / d.folder).is_dir()]


def saved_form_of(detector: Detector) -> tuple[str, str | None]:
    """The ``--saved_form`` and ``--score`` that name ``detector`` in the per-layer tables."""
    return ("original_single", None) if detector.method == "original" else ("norm_single", detector.name)


def _entry(name: str, kind: str, row: str, tables: list[dict]) -> dict:
    """One row of the comparison: ``row`` of each table, its metrics by OOD set (and ``average``)."""
    keys = metric_columns(table_protocol(tables[0]))
    found = [next(r for r in table["rows"] if r["row"] == row) for table in tables]
    return {"name": name, "kind": kind, "row": row, "row_kind": found[0]["kind"], "score": found[0]["score"],
            "results": {table["ood_dataset"]: {k: r[k] for k in keys} for table, r in zip(tables, found)}}


def comparison_table(tables: dict[str, list[dict]]) -> dict:
    """Each detector's headline row and the baselines, per OOD set and their average, best average AUROC first.

    ``tables`` maps a detector's name to its detection tables, one per OOD set, the sets in the same order
    for every detector; each table holds at least the detector's headline row and the baselines."""
    columns = {name: per_set + [average_table(per_set)] if len(per_set) > 1 else per_set
               for name, per_set in tables.items()}
    source = next(iter(tables))
    first, last = tables[source][0], columns[source][-1]["ood_dataset"]
    entries = [_entry(name, "detector", per_set[0]["headline"], per_set) for name, per_set in columns.items()]
    entries += [_entry(name, "combined", COMBINED_ROW, per_set) for name, per_set in columns.items()
                if any(row["row"] == COMBINED_ROW for row in per_set[0]["rows"])]
    baselines = [row["row"] for row in columns[source][0]["rows"] if row["kind"] == "baseline"]  # MSP, Energy, …
    entries += [_entry(name, "baseline", name, columns[source]) for name in baselines]
    entries.sort(key=lambda entry: -entry["results"][last]["AUROC"])
    fitted = [name for name in baselines if name in FEATURE_BASELINES]
    norms = {name: per_set[0]["norm"] for name, per_set in tables.items()}
    return {"in_dataset": first["in_dataset"], "model": first["model"], "flip": first["flip"],
            "num_id": first["num_id"], "datasets": [t["ood_dataset"] for t in columns[source]],
            "num_ood": {t["ood_dataset"]: t["num_ood"] for t in tables[source]},
            "protocol": {k: v for k, v in first["protocol"].items() if k != "ood_per_draw"},
            "ood_per_draw": {t["ood_dataset"]: t["protocol"]["ood_per_draw"] for t in tables[source]
                             if "ood_per_draw" in t["protocol"]},
            "norms": norms, "baselines_from": source, "sorted_by": f"AUROC ({last})", "metrics_in": "percent",
            "conventions": (*(line for line in first["conventions"] if line != RAW_VALUES_CONVENTION),
                            "Each detector by its headline row (its paper's score); --flip applies to them only.",
                            f"MSP and Energy from the files of detector {source} (every file stores them for "
                            "the same samples)" + (f"; {', '.join(fitted)} fit on its training file's features."
                                                   if fitted else ".")),
            "rows": entries}


def _label(entry: dict, norms: dict[str, str]) -> str:
    if entry["kind"] == "baseline":
        return f"{entry['name']} ({entry['score']})"
    norm = "" if entry["row_kind"] in ("extra", "combined") or norms[entry["name"]] == "none" else (
        f" {norms[entry['name']]}")  # extra: in its name; none: not a norm (ODIN)
    return f"{entry['name']}: {entry['row']} ({entry['score']}{norm})"


def format_comparison(table: dict) -> str:
    """The comparison as aligned text: a header with the data and conventions, one column group per OOD set."""
    model = table["model"]
    metrics = [*SHOWN, *([OOD_POSITIVE_FPR] if table["protocol"]["ood_positive"] else [])]
    sets = ", ".join(f"{d} ({n})" for d, n in table["num_ood"].items())
    header = [f"== {table['in_dataset']} (ID, {table['num_id']} samples) vs {sets}: every tracked detector ==",
              f"Model {model['name']} ({model['arch']}, {model['num_classes']} classes, epoch {model['epoch']}). "
              f"Sorted by {table['sorted_by']}.", *table["conventions"]]
    if table["ood_per_draw"]:
        header.append("OOD samples per draw: " + ", ".join(
            f"{d} {n}" + (" (all: fewer than a fifth of the ID set)" if n == table["num_ood"][d] else "")
            for d, n in table["ood_per_draw"].items()) + ".")
    if table["flip"]:
        header.append("Gradient scores flipped (--flip).")

    columns = [["detector: headline row (score)", *(_label(e, table["norms"]) for e in table["rows"])]]
    columns += [[METRIC_TITLES[m], *(metric_cell(e["results"][dataset], m) for e in table["rows"])]
                for dataset in table["datasets"] for m in metrics]
    widths = [max(map(len, column)) for column in columns]
    lines = ["  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()
             for cells in zip(*columns)]
    group = len(metrics)
    spans = [sum(widths[1 + k * group:1 + (k + 1) * group]) + 2 * (group - 1) for k in range(len(table["datasets"]))]
    titles = "  ".join([" " * widths[0], *(d.center(span) for d, span in zip(table["datasets"], spans))]).rstrip()
    return "\n".join([*header, "", titles, *lines])


def write_comparison(table: dict, stem: str | Path) -> list[Path]:
    """``<stem>.json`` (the whole table) and ``<stem>.csv`` (one line per row and OOD set, every metric)."""
    rows = ({**{k: entry[k] for k in CSV_KEYS[:-1]}, "ood_dataset": dataset, **metrics}
            for entry in table["rows"] for dataset, metrics in entry["results"].items())
    return write_json_and_csv(table, rows, [*CSV_KEYS, *metric_columns(table_protocol(table))], stem)


def openood_table(table: dict, groups: dict[str, tuple[str, ...]], id_accuracy: float) -> dict:
    """``table`` (``comparison_table``, computed with OpenOOD's FPR@95) in OpenOOD's form: each row's AUROC
    and FPR@95 (OOD positive) per set in ``groups`` order, then per group (``near``, ``far``) their plain mean
    over the group's sets that the table holds; with the model's accuracy (%) on the ID test list."""
    sets = [d for d in table["datasets"] if d != "average"]
    members = {group: [d for d in names if d in sets] for group, names in groups.items()}
    columns = [column for group, chosen in members.items() if chosen for column in (*chosen, group)]
    rows = []
    for entry in table["rows"]:
        results = {d: {m: entry["results"][d][m] for m in OPENOOD_SHOWN} for d in sets}
        results.update({group: {m: float(np.mean([results[d][m] for d in chosen])) for m in OPENOOD_SHOWN}
                        for group, chosen in members.items() if chosen})
        rows.append({**{k: entry[k] for k in ("name", "kind", "row", "row_kind", "score")},
                     "results": {column: results[column] for column in columns}})
    left_out = [d for d in sets if not any(d in chosen for chosen in members.values())]
    return {"form": "openood", "in_dataset": table["in_dataset"], "model": table["model"], "num_id": table["num_id"],
            "num_ood": table["num_ood"], "id_accuracy": id_accuracy, "groups": members, "columns": columns,
            "left_out": left_out, "norms": table["norms"], "metrics_in": "percent",
            "conventions": ("OpenOOD v1.5's form: OOD is the positive class for FPR@95 (the fraction of ID flagged "
                            "as OOD when 95% of OOD is detected), computed as its evaluator computes it; the table "
                            "above takes ID as positive (its FPR95 is another operating point). AUROC is the same "
                            "either way. "
                            "Metrics in %; every score is higher for in-distribution, rows in the order above.",
                            "near / far: plain means over the group's sets, as OpenOOD's evaluator."),
            "rows": rows}


def format_openood(table: dict) -> str:
    """The OpenOOD-form table as aligned text: a header with its conventions, a column pair per set and group."""
    model = table["model"]
    groups = "; ".join(f"{group} {', '.join(chosen) or '-'}" for group, chosen in table["groups"].items())
    header = [f"== {table['in_dataset']} ({table['num_id']} ID samples), OpenOOD v1.5's form: {groups} ==",
              f"Model {model['name']} ({model['arch']}, {model['num_classes']} classes, epoch {model['epoch']}); "
              f"ID accuracy {table['id_accuracy']:.2f} % on the ID test list.", *table["conventions"]]
    if table["left_out"]:
        header.append(f"Not in OpenOOD's groups, left out: {', '.join(table['left_out'])}.")
    columns = [["detector: headline row (score)", *(_label(e, table["norms"]) for e in table["rows"])]]
    columns += [[OPENOOD_TITLES[m], *(metric_cell(e["results"][column], m) for e in table["rows"])]
                for column in table["columns"] for m in OPENOOD_SHOWN]
    widths = [max(map(len, column)) for column in columns]
    lines = ["  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()
             for cells in zip(*columns)]
    pair = len(OPENOOD_SHOWN)
    spans = [sum(widths[1 + k * pair:1 + (k + 1) * pair]) + 2 * (pair - 1) for k in range(len(table["columns"]))]
    titles = "  ".join([" " * widths[0], *(c.center(s) for c, s in zip(table["columns"], spans))]).rstrip()
    return "\n".join([*header, "", titles, *lines])


def write_openood(table: dict, stem: str | Path) -> list[Path]:
    """``<stem>.json`` and ``<stem>.csv`` (one line per row and set or group: AUROC, FPR@95 with OOD positive)."""
    rows = ({**{k: entry[k] for k in CSV_KEYS[:-1]}, "ood_dataset": column, **metrics}
            for entry in table["rows"] for column, metrics in entry["results"].items())
    return write_json_and_csv(table, rows, [*CSV_KEYS, *OPENOOD_SHOWN], stem)
