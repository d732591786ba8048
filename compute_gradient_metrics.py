"""FPR95 / AUROC / AUPR of per-layer gradient norms, ID test set vs OOD test sets.

    python compute_gradient_metrics.py --name=resnet --saved_form=norm_single --score=min --dataset=LSUN
    python compute_gradient_metrics.py --name=resnet_bce --saved_form=original_single --dataset=all --plot
    python compute_gradient_metrics.py --name=resnet --compare --plot
    python compute_gradient_metrics.py --name=resnet --compare --protocol=energy_ood --ood-positive
    python compute_gradient_metrics.py --name=resnet --compare --layers=last

reads ``<gradient root>/<in-dataset>/<name>/<score or "original">/<in-dataset>.pkl`` (the ID test set) and
the OOD set's file beside it (``--dataset all``: every other ``*.pkl`` there), prints one table per OOD set
(and their average) — every tracked layer, ``total``, and the MSP / Energy baselines of the same samples (and,
fit on the ``train`` file, the ``combined`` row and the feature baselines: Mahalanobis, KNN, ReAct, ASH,
SCALE, ViM, fDBD, GEN, RMDS) —
and writes it to ``<results root>/<in-dataset>/<name>/<saved_form>[-<score>][-flip][-energy_ood]/<dataset>.json|csv``.

``--layers last`` reads the files of ``track_gradient.py --layers=last`` (``<score>-last/``) instead.
``--compare`` reads every detector tracked for the model (each folder under ``<gradient root>/<in-dataset>/<name>/``
named after one) and prints one row per detector, its headline score, and the baselines once, per OOD set
and their average, sorted by average AUROC; written to ``.../<name>/compare[-flip][-energy_ood]/comparison.json|csv``.
``--plot`` draws each tracked layer's AUROC against its depth (``layers.png``; with ``--compare`` one per
detector, ``<detector>_layers.png``).
``--benchmark=openood`` reads the files of ``track_gradient.py --benchmark=openood`` (under
``<gradient root>/openood/``; results under ``<results root>/openood/``), takes OpenOOD's set names, and
``--compare`` prints beside our table OpenOOD's form: AUROC and FPR@95 with OOD as the positive class per set
and the near / far plain means (``openood.json|csv`` beside ``comparison.json|csv``).
``--protocol=energy_ood`` evaluates as energy_ood's and Outlier Exposure's ``test.py`` (10 seeded draws of a
fifth of the ID set's size from each OOD set, mean ± std); ``--ood-positive`` adds OpenOOD's FPR95 (OOD+).

Conventions (``utils/tables.py``, ``utils/metrics.py``): ID is the positive class and the score is higher
for ID, each detector's sign from ``utils/detectors/``: −norm for ``norm_single`` with
``min``/``pred``/``exgrad``, +norm with ``max``/``gradnorm`` and for ``original_single``, +value for ``odin``
(its values are the perturbed max softmax, not norms); ``--flip`` inverts it.
"""
import argparse
from pathlib import Path

import numpy as np

from utils import cli
from utils.combine import SHRINKAGE
from utils.compare import (
    comparison_table,
    format_comparison,
    format_openood,
    openood_table,
    saved_form_of,
    tracked_detectors,
    write_comparison,
    write_openood,
)
from utils.data import DEFAULT_BENCHMARK, OOD_GROUPS, check_dataset_name, ood_group, resolve
from utils.detectors import TRACK_GRADIENT_SCORES, Detector
from utils.errors import UserError
from utils.gradients import gradient_path, ood_dataset_names
from utils.metric_files import check_same_model, last_layer, load_records, ood_datasets, training_record
from utils.metrics import PROTOCOLS, Protocol
from utils.plots import plot_detection, plot_layer_auroc
from utils.runtime import run_script
from utils.tables import (
    SAVED_FORMS,
    average_table,
    baseline_scores,
    best_and_worst_layers,
    detection_table,
    format_table,
    gradient_rows,
    score_sign,
    write_table,
)
from utils.tracking import TRAIN_SPLIT
from utils.train_fits import baseline_values, combined_fit, distances, feature_fit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--name", required=True, help="model name, as given to train_*.py and track_*.py")
    parser.add_argument("--saved_form", "--saved-form", choices=SAVED_FORMS,
                        help="norm_single: track_gradient.py's files; original_single: track_gradient_original.py's "
                             "(required without --compare)")
    parser.add_argument("--score", choices=TRACK_GRADIENT_SCORES,
                        help="the detector tracked by track_gradient.py (norm_single only, where it is required)")
    parser.add_argument("--dataset", default="all", help="OOD set, or 'all' for every tracked one")
    parser.add_argument("--layers", choices=("all", "last"), default="all",
                        help="last: the files of track_gradient.py --layers=last (the last layer only, in "
                             "<detector>-last/)")
    cli.add_in_dataset(parser)
    cli.add_benchmark(parser)
    parser.add_argument("--compare", action="store_true",
                        help="one table of every detector tracked for the model (its headline score) and the "
                             "MSP / Energy baselines, per OOD set and their average")
    parser.add_argument("--flip", action="store_true", help="invert the gradient score's sign")
    parser.add_argument("--combine", choices=(*SHRINKAGE, "none"), default="ledoitwolf",
                        help="the 'combined' row: a Gaussian on the log per-layer norms of the in-distribution "
                             "training images (track with --dataset train), covariance shrunk by this estimator; "
                             "skipped with a note when that file is missing")
    parser.add_argument("--knn-k", type=int, metavar="K",
                        help="the KNN baseline's k (default: 50 per 50,000 training images, at least 1, as Sun et al. "
                             "scale it with the share of the training set)")
    parser.add_argument("--plot", action="store_true",
                        help="save each tracked layer's AUROC against its depth (with --compare: per detector) and, "
                             "without --compare, ID-vs-OOD histograms and ROC curves of total and the best and "
                             "worst layer")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="full",
                        help="full: every sample of each OOD set; energy_ood: as energy_ood's and OE's "
                             "test.py, 10 random subsets of each OOD set of a fifth of the ID set's size, mean ± std")
    parser.add_argument("--seed", type=int, default=1, help="the seed of --protocol=energy_ood's draws")
    parser.add_argument("--ood-positive", action="store_true",
                        help="add FPR95 (OOD+): OOD the positive class, as OpenOOD and OE report it (always with "
                             "--benchmark=openood)")
    parser.add_argument("--gpu", help="accepted for symmetry with the other scripts; metrics run on the CPU")
    cli.add_roots(parser, "gradient", "results")
    args = parser.parse_args(argv)
    if args.compare:
        if args.saved_form or args.score:
            parser.error("--compare reads every tracked detector; leave out --saved_form and --score")
    elif args.saved_form is None:
        parser.error("--saved_form is required (or --compare for every tracked detector)")
    elif args.saved_form == "norm_single" and args.score is None:
        parser.error(f"--saved_form=norm_single needs --score={'|'.join(TRACK_GRADIENT_SCORES)}")
    if args.saved_form == "original_single" and args.score is not None:
        parser.error("--score does not apply to --saved_form=original_single (one confounding-label gradient "
                     "per sample); leave it out")
    if args.dataset not in ("all", TRAIN_SPLIT):
        # a UserError for an unknown name, before any file is read
        args.dataset = check_dataset_name(args.dataset, args.benchmark)
    if args.benchmark != DEFAULT_BENCHMARK and args.dataset != "all":
        args.dataset = resolve(args.dataset, args.in_dataset, args.benchmark).name  # OpenOOD's cifar10: CIFAR-10
    if args.dataset in (args.in_dataset, TRAIN_SPLIT):
        parser.error(f"--dataset={args.dataset} is the in-distribution set (its test split, or the training split "
                     "the combined row is fit on); name an OOD set or 'all'")
    if args.benchmark != DEFAULT_BENCHMARK:
        args.ood_positive = True  # OpenOOD's FPR@95
    return cli.on_benchmark(args, "gradient", "results")


def plot_table(table: dict, id_record: dict, ood_record: dict, sign: int, folder: Path) -> list[Path]:
    """Histogram + ROC figures of ``total``, the detector's headline row, and the best and worst layer by AUROC."""
    best, worst = best_and_worst_layers(table)
    rows = {r["row"]: r for r in table["rows"]}
    id_values, ood_values = gradient_rows(id_record), gradient_rows(ood_record)
    id_baselines, ood_baselines = baseline_scores(id_record), baseline_scores(ood_record)
    baselines = {name: (id_baselines[name], ood_baselines[name]) for name in id_baselines}
    roles = {"total": "all tracked layers"}
    roles.setdefault(table["headline"], "the detector's headline row")
    roles.setdefault(best, "best layer by AUROC")
    roles.setdefault(worst, "worst layer by AUROC")
    return [plot_detection(
        folder / f"{table['ood_dataset']}_{row}.png", id_values[row], ood_values[row], sign, rows[row],
        title=f"{table['model']['name']}: {table['in_dataset']} vs {table['ood_dataset']} — {row} ({role})",
        value_label=row if table["norm"] == "none" else (
            f"gradient {table['norm']} norm of " + ("all tracked layers" if row == "total" else row)),
        score_label=f"score = {table['gradient_score']}", in_dataset=table["in_dataset"],
        ood_dataset=table["ood_dataset"], baselines=baselines)
        for row, role in roles.items()]


def results_folder(args: argparse.Namespace) -> Path:
    """``<results root>/<in-dataset>/<name>/<saved_form>[-<score>][-flip][-<protocol>]`` (``compare`` for the
    comparison); the default protocol adds nothing."""
    form = "-".join(["compare"] if args.compare else [args.saved_form, *([args.score] if args.score else [])])
    form += "-last" * last_layer(args) + "-flip" * args.flip + (f"-{args.protocol}" if args.protocol != "full" else "")
    return Path(args.results_root) / args.in_dataset / args.name / form


def protocol_of(args: argparse.Namespace) -> Protocol:
    return Protocol(args.protocol, seed=args.seed, ood_positive=args.ood_positive,
                    openood=args.benchmark != DEFAULT_BENCHMARK)


def report(table: dict, written: list[Path]) -> None:
    print(format_table(table))
    print("".join(f"wrote {path}\n" for path in written))


def per_layer_tables(args: argparse.Namespace) -> None:
    """One detector's table per OOD set (and their average for ``--dataset all``), every tracked layer a row."""
    # Load the ID file and every OOD file first, so that a bad file stops the run before anything is written.
    id_folder = gradient_path(args.in_dataset, args.name, args.score, args.in_dataset, args.gradient_root,
                              last_layer(args)).parent
    id_path, id_record, ood_records = load_records(args, ood_datasets(args, id_folder))

    train_record = training_record(args, id_record, id_path)
    fit, baselines = combined_fit(args, train_record), feature_fit(args, train_record)
    sign = score_sign(args.saved_form, args.score, args.flip)
    folder = results_folder(args)
    combined, features = distances(fit, id_record, ood_records), baseline_values(baselines, id_record, ood_records)
    tables = []
    for dataset, ood_record in ood_records.items():
        table = detection_table(id_record, ood_record, args.saved_form, args.score, args.flip,
                                combined=combined[dataset], protocol=protocol_of(args), features=features[dataset])
        if fit:
            table["combined"] = fit.describe()  # what it was fit on: the same for every OOD set
        if baselines:
            table["feature_baselines"] = baselines.describe()
        written = write_table(table, folder / dataset)
        if args.plot:
            written += plot_table(table, id_record, ood_record, sign, folder)
        report(table, written)
        tables.append(table)
    if args.dataset == "all":
        average = average_table(tables)
        report(average, write_table(average, folder / "average"))
    if args.plot:
        print(f"wrote {plot_layers(tables, folder / 'layers.png')}")


def detector_args(args: argparse.Namespace, detector: Detector) -> argparse.Namespace:
    """``args`` as the per-layer mode would have them for ``detector`` (its ``--saved_form`` and ``--score``)."""
    saved_form, score = saved_form_of(detector)
    return argparse.Namespace(**{**vars(args), "saved_form": saved_form, "score": score})


def compared_datasets(args: argparse.Namespace, model_folder: Path, detectors: list[Detector]) -> list[str]:
    """``--dataset``, or for ``all`` the OOD sets tracked for every detector (saying which are left out)."""
    if args.dataset != "all":
        return [args.dataset]
    tracked = {d.name: ood_dataset_names(model_folder / d.folder, args.in_dataset) for d in detectors}
    common = [name for name in next(iter(tracked.values())) if all(name in names for names in tracked.values())]
    for detector, names in tracked.items():
        if set(names) - set(common):
            print(f"left out of the comparison (not tracked for every detector): "
                  f"{', '.join(sorted(set(names) - set(common)))} of {detector}")
    if not common:
        listing = "; ".join(f"{d}: {', '.join(names) or '-'}" for d, names in tracked.items())
        raise UserError(f"no OOD set is tracked for every detector under {model_folder} ({listing}); track the same "
                        f"sets for each, e.g. `python track_gradient.py --name={args.name} --dataset=all --score=all`")
    return common


def plot_layers(per_set: list[dict], path: Path) -> Path:
    """One detector's per-layer AUROC against depth: a line per OOD set, and their average if there are several."""
    first = per_set[0]
    norm = "" if first["norm"] == "none" else f", {first['norm']}"
    title = (f"Where the signal lives: AUROC of each tracked layer\ndetector {first['score'] or 'original'} "
             f"({first['gradient_score']}{norm}), model {first['model']['name']} on {first['in_dataset']}")
    return plot_layer_auroc(path, per_set + [average_table(per_set)] * (len(per_set) > 1), title=title)


def compare(args: argparse.Namespace) -> None:
    """Every tracked detector's headline row and the baselines, in one table (and ``--plot``: per-layer AUROC)."""
    model_folder = Path(args.gradient_root) / args.in_dataset / args.name
    detectors = tracked_detectors(model_folder, last_layer(args))
    if not detectors:
        command = f"python track_gradient.py --name={args.name} --dataset=all --score=all" + (
            " --layers=last" * last_layer(args))
        raise UserError(f"no detector tracked for model {args.name} in {model_folder}; track some with `{command}`")
    datasets = compared_datasets(args, model_folder, detectors)
    loaded = {d.name: load_records(detector_args(args, d), datasets) for d in detectors}
    (first_path, first_id, _), *others = loaded.values()
    for id_path, id_record, _ in others:
        check_same_model(first_id, first_path, id_record, id_path, same_layers=False)  # rows differ (ODIN, GAIA, NAC)

    folder, protocol = results_folder(args), protocol_of(args)
    tables, written = {}, []
    for detector in detectors:
        id_path, id_record, ood_records = loaded[detector.name]
        saved_form, score = saved_form_of(detector)
        train_record = training_record(detector_args(args, detector), id_record, id_path)
        fit = combined_fit(args, train_record)
        baselines = feature_fit(args, train_record) if detector is detectors[0] else None  # shown once, as MSP's
        only = None if args.plot else [detector.headline_row(list(id_record["layers"]))]
        combined = distances(fit, id_record, ood_records)
        features = baseline_values(baselines, id_record, ood_records)
        tables[detector.name] = [detection_table(id_record, ood_record, saved_form, score, args.flip,
                                                 combined=combined[dataset], protocol=protocol, only=only,
                                                 features=features[dataset])
                                 for dataset, ood_record in ood_records.items()]
        if args.plot:
            written.append(plot_layers(tables[detector.name], folder / f"{detector.name}_layers.png"))
    table = comparison_table(tables)
    print(format_comparison(table))
    written = write_comparison(table, folder / "comparison") + written
    if args.benchmark != DEFAULT_BENCHMARK:
        accuracy = 100 * float(np.mean(first_id["pred"] == first_id["label"]))
        form = openood_table(table, {group: ood_group(group, args.in_dataset, args.benchmark)
                                     for group in OOD_GROUPS if group != "all"}, accuracy)
        print("\n" + format_openood(form))
        written += write_openood(form, folder / "openood")
    print("".join(f"wrote {path}\n" for path in written))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compare:
        compare(args)
    else:
        per_layer_tables(args)


if __name__ == "__main__":
    run_script(main)
