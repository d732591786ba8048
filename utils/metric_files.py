"""Reading a model's gradients files for ``compute_gradient_metrics.py``: each file checked against what its path
says (model, in-dataset, method, score, layers, data set), ID and OOD files from one checkpoint, and for a
missing file the command that makes it."""
import argparse
from pathlib import Path

from utils import cli
from utils.data import DEFAULT_BENCHMARK
from utils.errors import UserError
from utils.gradients import GRADIENT_ROOT, GradientFileError, gradient_path, load_gradients, ood_dataset_names
from utils.tables import SAVED_FORMS
from utils.tracking import TRAIN_SPLIT


def track_command(args: argparse.Namespace, dataset: str) -> str:
    """The command that writes the gradients file of ``dataset`` (and the ID test set's first)."""
    command = ("python track_gradient_original.py" if args.saved_form == "original_single"
               else "python track_gradient.py")
    command += f" --name={args.name} --dataset={dataset}" + (f" --score={args.score}" if args.score else "")
    command += " --layers=last" * (args.layers == "last")
    if args.in_dataset != cli.DEFAULT_IN_DATASET:
        command += f" --in-dataset={args.in_dataset}"
    benchmark = getattr(args, "benchmark", DEFAULT_BENCHMARK)
    if benchmark != DEFAULT_BENCHMARK:
        command += f" --benchmark={benchmark}"
    if args.gradient_root != cli.benchmark_root(GRADIENT_ROOT, benchmark):
        given = args.gradient_root if benchmark == DEFAULT_BENCHMARK else Path(args.gradient_root).parent
        command += f" --gradient-root={given}"
    return command


def load_record(path: Path, args: argparse.Namespace, dataset: str) -> dict:
    """Load a gradients file and check that it is the one asked for (model, in-dataset, method, score, set)."""
    if not path.is_file():
        if dataset == args.in_dataset:
            hint = f"`{track_command(args, args.dataset)}`, which tracks the {args.in_dataset} test set first"
        else:
            hint = f"`{track_command(args, dataset)}`"
        raise GradientFileError(f"gradients file not found: {path}; make it with {hint}")
    record = load_gradients(path)
    expected = {"model name": (record["model"]["name"], args.name),
                "in-dataset": (record["model"]["in_dataset"], args.in_dataset),
                "method": (record["method"], SAVED_FORMS[args.saved_form]),
                "score": (record["score"], args.score),
                "layers": (record.get("options", {}).get("layers", "all"), args.layers),
                "dataset": (record["dataset"], dataset)}
    wrong = [f"{key} {found!r} (expected {wanted!r})" for key, (found, wanted) in expected.items() if found != wanted]
    if wrong:
        raise GradientFileError(f"{path} does not hold what its path says: {'; '.join(wrong)}")
    return record


def check_same_model(id_record: dict, id_path: Path, ood_record: dict, ood_path: Path,
                     same_layers: bool = True) -> None:
    """ID and OOD files must come from the same checkpoint and (``same_layers``: files of one detector) track the
    same layers, in the same order."""
    id_model, ood_model = id_record["model"], ood_record["model"]
    differ = [f"{k}: {id_model.get(k)!r} vs {ood_model.get(k)!r}"
              for k in sorted(set(id_model) | set(ood_model)) if id_model.get(k) != ood_model.get(k)]
    if differ:
        raise GradientFileError(f"{id_path} and {ood_path} come from different models ({'; '.join(differ)}); "
                                "track both with the same checkpoint")
    id_layers, ood_layers = list(id_record["layers"]), list(ood_record["layers"])
    if same_layers and id_layers != ood_layers:
        only_id, only_ood = set(id_layers) - set(ood_layers), set(ood_layers) - set(id_layers)
        detail = (f"only in the ID file: {', '.join(sorted(only_id)) or '-'}; "
                  f"only in the OOD file: {', '.join(sorted(only_ood)) or '-'}" if only_id or only_ood
                  else "the same layers in a different order")
        raise GradientFileError(f"{id_path} and {ood_path} track different layers ({detail})")


def ood_datasets(args: argparse.Namespace, folder: Path) -> list[str]:
    """``--dataset``, or for ``all`` every OOD set tracked in ``folder``, in alphabetical order."""
    if args.dataset != "all":
        return [args.dataset]
    names = ood_dataset_names(folder, args.in_dataset)
    if not names:
        raise UserError(f"no OOD gradients files in {folder}; make them with `{track_command(args, 'all')}`")
    return names


def last_layer(args: argparse.Namespace) -> bool:
    return args.layers == "last"


def load_records(args: argparse.Namespace, datasets: list[str]) -> tuple[Path, dict, dict[str, dict]]:
    """The ID file's path and record and each OOD set's record, checked to come from the same model."""
    id_path = gradient_path(args.in_dataset, args.name, args.score, args.in_dataset, args.gradient_root,
                            last_layer(args))
    id_record = load_record(id_path, args, args.in_dataset)
    ood_records = {}
    for dataset in datasets:
        path = gradient_path(args.in_dataset, args.name, args.score, dataset, args.gradient_root, last_layer(args))
        ood_records[dataset] = load_record(path, args, dataset)
        check_same_model(id_record, id_path, ood_records[dataset], path)
    return id_path, id_record, ood_records


def training_record(args: argparse.Namespace, id_record: dict, id_path: Path) -> dict | None:
    """The training split's file (what the ``combined`` row and the feature baselines are fit on), checked to
    come from the model of ``id_record``; None, with a note, when it is missing."""
    path = gradient_path(args.in_dataset, args.name, args.score, TRAIN_SPLIT, args.gradient_root, last_layer(args))
    if not path.is_file():
        rows = ("feature baselines (Mahalanobis, KNN, …)" if args.combine == "none"
                else "'combined' row (nor feature baselines: Mahalanobis, KNN, …)")
        print(f"No {rows}: {path} (the in-distribution training images they are fit on) is missing; make it with "
              f"`{track_command(args, TRAIN_SPLIT)}`.\n")
        return None
    train_record = load_record(path, args, TRAIN_SPLIT)
    check_same_model(id_record, id_path, train_record, path)
    return train_record
