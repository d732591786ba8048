"""The combined detector against the single rows it combines, on tracked gradients files (e.g. the demo's).

For every detector tracked for a model, and every OOD set: the AUROC (%) of

* ``combined``  — −Mahalanobis distance of the log per-layer norms from a Gaussian fit on the ``train`` file;
* ``total``     — the norm over all tracked layers, with the detector's sign;
* ``headline``  — the detector's paper row (GradNorm: the last layer; ExGrad: the last layer's L1 form);
* ``train-picked layer`` — one layer chosen on the training file alone: the layer whose log-norm varies least
  across the training images (the smallest standard deviation), the detector's sign;
* ``oracle layer`` — the layer with the best average test AUROC: tuned on the test sets, an upper reference
  that no honest detector can claim;
* MSP and Energy, from the same samples.

    python bench/combine_study.py --gradient-root=demo_output/gradients --in-dataset=digits --name=energy --name=bce
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.combine import combined_score, fit_gaussian, log_norms  # noqa: E402
from utils.detectors import get_detector  # noqa: E402
from utils.gradients import load_gradients  # noqa: E402
from utils.metrics import ood_metrics  # noqa: E402
from utils.tracking import TRAIN_SPLIT  # noqa: E402


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    return 100 * ood_metrics(id_scores, ood_scores)["AUROC"]


def study(folder: Path, in_dataset: str) -> list[dict]:
    """One row per OOD set (and their average) of the AUROCs above, for the detector tracked in ``folder``."""
    detector = get_detector(folder.name)
    records = {path.stem: load_gradients(path) for path in sorted(folder.glob("*.pkl")) if ".shard" not in path.stem}
    train, id_record = records.pop(TRAIN_SPLIT), records.pop(in_dataset)
    layers = list(id_record["layers"])
    fit = fit_gaussian(train)
    sign = detector.sign
    picked = layers[int(np.argmin(log_norms(train).std(0)))]
    headline = detector.headline_row(layers)

    def value(record: dict, row: str) -> np.ndarray:
        return sign * np.asarray({**record["layers"], "total": record["total"], **record.get("extra", {})}[row],
                                 np.float64)

    per_layer = {layer: [auroc(value(id_record, layer), value(r, layer)) for r in records.values()] for layer in layers}
    oracle = max(per_layer, key=lambda layer: np.mean(per_layer[layer]))
    rows = []
    for i, (dataset, ood) in enumerate(records.items()):
        rows.append({"OOD set": dataset,
                     "combined": auroc(combined_score(fit, id_record), combined_score(fit, ood)),
                     "total": auroc(value(id_record, "total"), value(ood, "total")),
                     "headline": auroc(value(id_record, headline), value(ood, headline)),
                     "train-picked layer": per_layer[picked][i], "oracle layer": per_layer[oracle][i],
                     "MSP": auroc(id_record["msp"], ood["msp"]),
                     "Energy": auroc(-id_record["energy"].astype(np.float64), -ood["energy"].astype(np.float64))})
    rows.append({"OOD set": "average", **{k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "OOD set"}})
    for row in rows:
        row.update(detector=detector.name, picked=picked, oracle=oracle, headline_row=headline)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gradient-root", default="demo_output/gradients")
    parser.add_argument("--in-dataset", default="digits")
    parser.add_argument("--name", action="append", required=True, help="a model name; repeat for several")
    args = parser.parse_args()
    columns = ("combined", "total", "headline", "train-picked layer", "oracle layer", "MSP", "Energy")
    print("| model | detector | OOD set | " + " | ".join(columns) + " |")
    print("|---" * (3 + len(columns)) + "|")
    for name in args.name:
        for folder in sorted((Path(args.gradient_root) / args.in_dataset / name).iterdir()):
            if not (folder / f"{TRAIN_SPLIT}.pkl").is_file():
                print(f"skipping {folder}: no {TRAIN_SPLIT}.pkl (track it with --dataset train)", file=sys.stderr)
                continue
            for row in study(folder, args.in_dataset):
                cells = [f"**{row[c]:.1f}**" if row["OOD set"] == "average" else f"{row[c]:.1f}" for c in columns]
                print(f"| {name} | {row['detector']} | {row['OOD set']} | " + " | ".join(cells) + " |")
            print(f"<!-- {name}/{row['detector']}: headline {row['headline_row']}, train-picked {row['picked']}, "
                  f"oracle {row['oracle']} -->")


if __name__ == "__main__":
    main()
