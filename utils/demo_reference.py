"""How far a demo run is from the documented one, measured against the spread of the demo's recipe over seeds.

A trained network's numbers depend on more than its seed: the thread count, the CPU's instruction set (which
kernels torch, oneDNN and MKL pick) and the library versions all change the rounding, and after a few hundred
optimizer steps the rounding has grown into a different model. So the demo's documented table is a claim with
a spread: ``bench/demo_spread.py`` runs the demo's recipe with several seeds and writes, for every row of the
demo's ``--compare`` tables, the documented value (seed 1) and the range over the seeds to
``docs/demo_spread.json``; ``demo.py`` prints its own values beside them (``format_check``), so a newcomer sees
at once whether a run is within the expected spread.

A row is keyed ``"<model>: <detector or baseline>"`` (``combined`` rows: ``"<model>: <detector> combined"``);
its values are AUROC in % on the near-OOD set (``heldout``) and the average over the OOD sets.
"""
import json
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "demo_spread.json"
MODELS = ("energy", "bce")
COLUMNS = ("heldout", "average")  # near-OOD, and the mean over every OOD set
METRIC = "AUROC"


def comparison_path(results_root: Path, in_dataset: str, model: str) -> Path:
    """Where ``compute_gradient_metrics.py --compare`` writes ``model``'s table (``results_folder``)."""
    return Path(results_root) / in_dataset / model / "compare" / "comparison.json"


def run_values(results_root: Path, in_dataset: str) -> dict[str, dict[str, float]]:
    """Every row of the demo's comparison tables: ``{row key: {column: AUROC %}}``."""
    values = {}
    for model in MODELS:
        table = json.loads(comparison_path(results_root, in_dataset, model).read_text())
        for entry in table["rows"]:
            key = f"{model}: {entry['name']}" + (" combined" if entry["kind"] == "combined" else "")
            values[key] = {column: round(entry["results"][column][METRIC], 2) for column in COLUMNS}
    return values


def spread(runs: dict[int, dict[str, dict[str, float]]], documented_seed: int) -> dict:
    """The reference ``bench/demo_spread.py`` writes: each row's documented value and its range over ``runs``
    (by seed), for the rows every run has."""
    keys = [key for key in runs[documented_seed] if all(key in values for values in runs.values())]
    return {"metric": f"{METRIC} (%)", "columns": list(COLUMNS), "seeds": sorted(runs),
            "documented_seed": documented_seed,
            "rows": {key: {column: {"documented": runs[documented_seed][key][column],
                                    "min": min(values[key][column] for values in runs.values()),
                                    "max": max(values[key][column] for values in runs.values())}
                           for column in COLUMNS} for key in keys}}


def format_check(values: dict[str, dict[str, float]], reference: dict) -> str:
    """This run's rows beside the documented value and the range over seeds; values outside the range marked."""
    seeds = reference["seeds"]
    header = (f"How this run compares with the documented demo (docs/demo.md; {reference['metric']}; the range "
              f"is over seeds {', '.join(map(str, seeds))} of the same recipe, documented = seed "
              f"{reference['documented_seed']}):")
    rows, outside = [["row"] + [f"{column}: this run | documented | range" for column in reference["columns"]]], 0
    for key, this in values.items():
        known = reference["rows"].get(key)
        cells = [key]
        for column in reference["columns"]:
            if known is None:
                cells.append(f"{this[column]:6.2f} |   -    |      -")
                continue
            ref = known[column]
            inside = ref["min"] <= this[column] <= ref["max"]
            outside += not inside
            cells.append(f"{this[column]:6.2f} | {ref['documented']:6.2f} | {ref['min']:6.2f}-{ref['max']:6.2f}"
                         + ("" if inside else "  outside"))
        rows.append(cells)
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    compared = len(reference["columns"]) * sum(key in reference["rows"] for key in values)
    summary = [f"{compared - outside} of {compared} values within the range of {len(seeds)} seeds."]
    if outside:
        summary.append(f"{outside} outside: {len(seeds)} seeds do not bound every run, but many outside means "
                       "another machine, library or thread count (see docs/demo.md).")
    if compared < len(reference["columns"]) * len(values):
        summary.append("Rows without a reference (new since it was measured) show '-'.")
    missing = sorted(set(reference["rows"]) - set(values))
    if missing:
        summary.append(f"Documented rows this run lacks: {', '.join(missing)}.")
    return "\n".join([header, *table, " ".join(summary)])


def load_reference(path: Path = REFERENCE) -> dict | None:
    """The reference, or None when it is missing or unreadable (the check is then skipped)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
