"""Gradient tracking from the command line: what ``track_gradient.py`` and ``track_gradient_original.py`` share.

For each data set asked for, every sample's values under each chosen detector (``utils.detectors``; several
detectors share one forward and one backward pass) and the model's output baselines go to
``gradient_path(in_dataset, name, detector, dataset)``, one record per detector. The in-distribution test
set is tracked first when its file is missing or belongs to another checkpoint, ``--limit`` or detector
option, so that the metrics script has both sides.

``--shard i/n`` splits each data set across processes (``utils.shards``).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from models import ARCHS
from utils import cli
from utils.checkpoints import load_model
from utils.coverage import fit_record, score_record
from utils.data import (
    IMAGENET_OOD_DATASETS,
    IN_DATASETS,
    OOD_DATASETS,
    OOD_GROUPS,
    TRAIN_SPLIT,
    check_dataset_name,
    ood_group,
    resolve,
)
from utils.data.imagenet import CLASS_ORDER_KEY
from utils.data.imagenet import NAME as IMAGENET
from utils.data.transforms import InputTransform
from utils.detectors import (
    SCORE_ALL,
    TRACK_GRADIENT_SCORES,
    Detector,
    get_detector,
    gradient_scores,
    rows_per_sample,
)
from utils.detectors.lowdim import PROJECTIONS as LOWDIM_PROJECTIONS
from utils.detectors.lowdim import SUBSPACES as LOWDIM_SUBSPACES
from utils.energy import energy_score
from utils.errors import UserError
from utils.feature_baselines import PENULTIMATE
from utils.gradients import (
    CHECKPOINT_HASH_KEY,
    MODEL_KEYS,
    GradientFileError,
    gradient_path,
    load_gradients,
    new_record,
    save_gradients,
)
from utils.io import atomic_write
from utils.per_sample import head_module
from utils.runtime import get_device, loader_workers, progress
from utils.shards import Part, merge, parse_shard

DEFAULT_TRAIN_SAMPLES = 5_000
TRAIN_SUBSET_SEED = 0


def add_arguments(parser: argparse.ArgumentParser, with_score: bool) -> None:
    """The options of both tracking scripts; ``--score`` and ``--temperature`` only for ``track_gradient.py``
    (``track_gradient_original.py`` is the confounding label)."""
    parser.add_argument("--name", required=True, help="the run name the model was trained under")
    parser.add_argument("--dataset", required=True,
                        help="the data set to track: one of "
                             f"{', '.join(IN_DATASETS + OOD_DATASETS + IMAGENET_OOD_DATASETS)}, a near-OOD "
                             "set (heldout for a digits split, the other CIFAR for CIFAR); 'near', 'far' or 'all' "
                             "for every near-, far- or any OOD set whose data is present; "
                             f"'{TRAIN_SPLIT}' for a seeded subset of --limit (default {DEFAULT_TRAIN_SAMPLES:,}) "
                             "images of the in-distribution training split, without augmentation (what the "
                             "combined detector and the feature baselines are fit on); with --benchmark=openood, "
                             "OpenOOD's set names (cifar100, tin, mnist, svhn, texture, places365; for ImageNet "
                             "ssb_hard, ninco, inaturalist, textures, openimage_o), its groups, and train from "
                             "its train_<in>.txt")
    if with_score:
        parser.add_argument("--score", choices=(*TRACK_GRADIENT_SCORES, "all"), default="min",
                            help="the detector: min/max/pred keep the smallest, largest or predicted label's of "
                                 "the K cross-entropy gradients; gradnorm (L1, Huang et al. 2021); exgrad (their "
                                 "expectation under the prediction, Igoe et al. 2022); odin (input perturbation, "
                                 "Liang et al. 2018); gaia_a/gaia_z (gradients at BatchNorm outputs, Chen et al. "
                                 f"2023); nac_ue (neuron activation coverage, Liu et al. 2024, fit on --dataset "
                                 f"{TRAIN_SPLIT}, tracked first); grood (gradient to an OOD prototype, ElAraby et al. "
                                 "2025) and lowdim (low-dimensional gradient, Wu et al. 2024), each fit on the "
                                 f"--dataset {TRAIN_SPLIT} images first; all: every one of them but lowdim (its "
                                 "cost: 200 forward-mode passes an image), one file each")
        parser.add_argument("--temperature", type=float, default=1.0, help="GradNorm's temperature T, 1 in the paper")
        parser.add_argument("--odin-temperature", type=float, default=1000.0,
                            help="ODIN's temperature T, 1000 in the paper")
        parser.add_argument("--epsilon", type=float, default=0.0014,
                            help="ODIN's perturbation step on [0, 1] images (the official code's: it divides its "
                                 "step on normalised images by the std); 0.0014 in OpenOOD's CIFAR config")
        parser.add_argument("--lowdim-subspace", choices=LOWDIM_SUBSPACES,
                            help="the low-dimensional gradient's subspace: principal (the top-200 principal "
                                 "directions, KNN k = 5: the paper's CIFAR form) or class_means (each class's mean "
                                 "normalised gradient, KNN k = 10: its ImageNet form); default class_means for "
                                 f"--in-dataset={IMAGENET}, principal otherwise")
        parser.add_argument("--lowdim-projection", choices=LOWDIM_PROJECTIONS, default="jvp",
                            help="how the low-dimensional gradient projects: jvp (forward-mode products, no "
                                 "per-sample gradient formed: a few forward passes per direction) or gradients "
                                 "(per-sample gradients of a few images at a time times the directions: a few "
                                 "forward passes in all, for images x parameters floats of memory)")
    parser.add_argument("--layers", choices=("all", "last"), default="all",
                        help="last: track only the head (a Linear layer, or a 1x1 convolution on a 1x1 map as BiT's), "
                             "from the penultimate features with no backward pass (GradNorm's and ExGrad's paper "
                             "scores at the speed of a forward pass; min/max/exgrad in closed form); its files go to "
                             "<detector>-last/")
    cli.add_in_dataset(parser)
    cli.add_benchmark(parser)
    parser.add_argument("--epoch", type=int, help="the checkpoint's epoch (default: the last)")
    parser.add_argument("--model-arch", choices=ARCHS,
                        help="the architecture expected; an error if the checkpoint holds another")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="gradients back-propagated at once, which bounds memory: an image costs K of them "
                             "for min/max/exgrad (one per class), one for pred/gradnorm/odin/gaia_z/nac_ue/the "
                             "confounding label, two for gaia_a, K + 7 for --score=all; one with --layers last "
                             "(no backward pass). An image whose rows exceed both this and 256 (ImageNet's 1,000 "
                             "classes) is refused before any work")
    parser.add_argument("--limit", type=int, metavar="N",
                        help=f"track only the first N samples of each set (--dataset {TRAIN_SPLIT}: N random images)")
    parser.add_argument("--shard", metavar="I/N", type=parse_shard,
                        help="track only the I-th of N parts of each set (0 <= I < N); the last part to finish "
                             "merges them")
    cli.add_roots(parser, "data", "checkpoint", "gradient")
    cli.add_device(parser)


def track(model: nn.Module, model_info: dict, dataset: Dataset, dataset_name: str, detectors: list[Detector],
          part: Part, device: torch.device, workers: int) -> dict[str, dict]:
    """The gradients record of samples [part.start, part.stop) of ``dataset`` for each detector, by name
    (the format of ``utils.gradients``), with the penultimate features (the last Linear layer's input in the
    same forward pass) and that layer's weight and bias (the feature baselines' logits = W h + b) in each."""
    loader = DataLoader(Subset(dataset, range(part.start, part.stop)), batch_size=part.images_per_batch,
                        num_workers=workers, pin_memory=device.type == "cuda")
    columns: dict[str, list[np.ndarray]] = {}

    def add(key: str, values: torch.Tensor) -> None:
        columns.setdefault(key, []).append(values.cpu().numpy())

    bar = progress(total=part.stop - part.start, unit="img", dynamic_ncols=True,
                   desc=f"{dataset_name} ({', '.join(d.name for d in detectors)})")
    penultimate: list[torch.Tensor] = []  # the head's inputs, one batch's forward passes
    head = head_module(model)
    hook = head.register_forward_hook(lambda module, args, output: penultimate.append(args[0].detach()))
    bias = torch.zeros(len(head.weight)) if head.bias is None else head.bias
    weights = {"weight": head.weight.detach().flatten(1).float().cpu().numpy(),  # a 1x1-conv head as (K, D)
               "bias": bias.detach().float().cpu().numpy()}
    try:
        for images, labels in loader:
            penultimate.clear()
            logits, scores = gradient_scores(model, images.to(device, non_blocking=True), detectors)
            add(f"features/{PENULTIMATE}", penultimate[0].flatten(1).float())  # the first: the images as they are
            for name, out in scores.items():
                for layer, values in out.layers.items():
                    add(f"{name}/layers/{layer}", values.float())
                for row, values in out.extra.items():
                    add(f"{name}/extra/{row}", values.float())
                for vector, values in out.features.items():
                    add(f"{name}/features/{vector}", values.float())
                add(f"{name}/total", out.total.float())
                add(f"{name}/class", out.chosen)
            add("pred", logits.argmax(1))
            add("label", labels)
            add("msp", logits.softmax(1).amax(1).float())
            add("energy", energy_score(logits).float())
            bar.update(len(images))
    finally:
        hook.remove()
        bar.close()
    arrays = {key: np.concatenate(chunks) for key, chunks in columns.items()}

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {key.removeprefix(prefix): value for key, value in arrays.items() if key.startswith(prefix)}

    return {d.name: new_record(model_info, d, dataset_name, group(f"{d.name}/layers/"), group(f"{d.name}/extra/"),
                               {**group("features/"), **group(f"{d.name}/features/")}, weights,
                               total=arrays[f"{d.name}/total"],
                               **{"class": arrays[f"{d.name}/class"]},
                               **{key: arrays[key] for key in ("pred", "label", "msp", "energy")})
            for d in detectors}


def _is_current(path: Path, model_info: dict, num_samples: int | None, options: dict,
                shard: dict | None = None, fit: dict | None = None) -> bool:
    """Whether ``path`` holds a readable record of this model, detector options and ``num_samples`` samples
    (None: any number) and this shard; a NAC-UE record also of the current training file's fit; with ``fit``
    (a ``fit_first`` detector's ``fit_description``), a record of that fit."""
    try:
        record = load_gradients(path)
    except GradientFileError:
        return False
    if fit is not None and record.get("fit") != fit:
        return False
    if "fit" in record and record["dataset"] != TRAIN_SPLIT:
        try:
            fit = load_gradients(path.with_name(f"{TRAIN_SPLIT}.pkl")).get("fit")
        except GradientFileError:
            return False
        if record["fit"] != fit:
            return False
    return (record["model"] == model_info and num_samples in (None, record["num_samples"])
            and record.get("options", {}) == options and record.get("shard") == shard)


def track_and_save(model: nn.Module, model_info: dict, dataset_name: str, dataset: Dataset,
                   detectors: list[Detector], args: argparse.Namespace, device: torch.device, workers: int,
                   only_if_stale: bool) -> None:
    """Track this process's part of ``dataset`` for every detector in one pass and save one record each;
    merge once all parts exist.

    With ``only_if_stale`` a detector whose file (or this part's file) is already current is left out.
    """
    finals = {d.name: gradient_path(model_info["in_dataset"], model_info["name"], d.name, dataset_name,
                                    args.gradient_root, d.last_layer_only) for d in detectors}
    num_samples = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    if only_if_stale:
        current = {d.name for d in detectors
                   if _is_current(finals[d.name], model_info, num_samples, d.options(), fit=_fit_of(d))}
        for name in current:
            print(f"{finals[name]} is up to date ({num_samples} samples)")
        detectors = [d for d in detectors if d.name not in current]
        if not detectors:
            return
    rows = rows_per_sample(detectors, model_info["num_classes"])
    part = Part.of(num_samples, max(1, args.batch_size // rows), args.shard)
    shard = part.describe() if part.count > 1 else None
    if part.stop == part.start:
        print(f"{dataset_name}: shard {part.index}/{part.count} is empty ({num_samples} samples)")
    else:
        todo = [d for d in detectors if not (only_if_stale and _is_current(
            part.path(finals[d.name]), model_info, part.stop - part.start, d.options(), shard, _fit_of(d)))]
        records = track(model, model_info, dataset, dataset_name, todo, part, device, workers) if todo else {}
        for detector in todo:
            if detector.fits_on_training:
                records[detector.name] = score_on_training_fit(records[detector.name], detector, dataset_name, args)
        for name, record in records.items():
            if shard:
                record["shard"] = shard
            path = part.path(finals[name])
            save_gradients(record, path)
            print(f"saved {path} ({record['num_samples']} samples)")
    if part.count > 1:
        for final in finals.values():
            if merge(part, final):
                print(f"merged {part.count} shards into {final}")


def _fit_of(detector: Detector) -> dict | None:
    return detector.fit_description() if detector.fit_first else None


def score_on_training_fit(record: dict, detector: Detector, dataset_name: str, args: argparse.Namespace) -> dict:
    """NAC-UE's rows: the coverage scores of the record's states under the fit on the training split's file
    (``utils.coverage``); the training split itself is scored under its own fit. A ``fit_first`` detector's
    values are final already: its record says what it was fit on."""
    if detector.fit_first:
        return {**record, "fit": detector.fit_description()}
    if dataset_name == TRAIN_SPLIT:
        return score_record(record, fit_record(record))
    path = gradient_path(record["model"]["in_dataset"], record["model"]["name"], detector.name, TRAIN_SPLIT,
                         args.gradient_root)
    train_record = load_gradients(path)
    if train_record["model"] != record["model"]:
        raise UserError(f"{path} comes from another checkpoint than the model tracked now; re-track it with `python "
                        f"track_gradient.py --name={args.name} --dataset={TRAIN_SPLIT} --score={detector.name}`")
    return score_record(record, fit_record(train_record))


def detectors_from(args: argparse.Namespace) -> list[Detector]:
    """The detectors a tracking command asks for: ``--score`` (``all``: every one of ``track_gradient.py``; with
    ``--layers last`` every one that has weight gradients) with its options; the confounding label for
    ``track_gradient_original.py`` (no ``--score``)."""
    score = getattr(args, "score", None)
    names = SCORE_ALL if score == "all" else [score]
    subspace = getattr(args, "lowdim_subspace", None) or ("class_means" if args.in_dataset == IMAGENET else "principal")
    detectors = [get_detector(name, getattr(args, "temperature", 1.0), getattr(args, "odin_temperature", 1000.0),
                              getattr(args, "epsilon", 0.0014), subspace, getattr(args, "lowdim_projection", "jvp"))
                 for name in names]
    if args.layers == "all":
        return detectors
    if score != "all" and not detectors[0].has_weight_gradients:
        raise UserError(f"--layers last tracks the last layer's weight gradient; --score={score} has none "
                        "(ODIN perturbs the input; GAIA and NAC-UE differentiate activations). Leave out --layers.")
    return [d.on_last_layer() for d in detectors if d.has_weight_gradients]


def main(args: argparse.Namespace) -> None:
    """Track ``args.dataset`` (or every available OOD set) with the detectors asked for, after the
    in-distribution test set if its files are missing or stale."""
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--batch-size and --limit must be positive.")
    args = cli.on_benchmark(args, "gradient")
    for option in ("temperature", "odin_temperature"):
        if getattr(args, option, 1.0) <= 0:
            raise UserError(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}.")
    detectors = detectors_from(args)
    unfit = [d.name for d in detectors if d.fits_on_training and (args.dataset == TRAIN_SPLIT or not (
        gradient_path(args.in_dataset, args.name, d.name, TRAIN_SPLIT, args.gradient_root).is_file()))]
    if args.shard and unfit:
        raise UserError(f"{', '.join(unfit)}: fit on the whole training split: track it in one process first "
                        f"(`python track_gradient.py --name={args.name} --dataset={TRAIN_SPLIT} "
                        f"--score={unfit[0] if len(unfit) == 1 else args.score}`), then shard the test sets.")
    device = get_device(args.gpu)
    workers = loader_workers(args.workers, device)
    model, meta = load_model(args.in_dataset, args.name, args.epoch, device, args.checkpoint_root, args.model_arch)
    _warn_on_a_loss_mismatch(meta.get("loss"), detectors[0].script)
    model_info = {key: meta[key] for key in (*MODEL_KEYS, CHECKPOINT_HASH_KEY)}
    refuse_every_layer_rows(detectors, meta["num_classes"], args.batch_size)
    for detector in detectors:  # a detector whose layer choice does not cover this architecture (GAIA on BiT)
        try:
            detector.activations(model)
        except ValueError as error:
            raise UserError(f"--score={detector.name} does not apply to {meta['arch']}: {error}. Pick another "
                            "--score (e.g. gradnorm or pred).") from None
    labels = meta.get(CLASS_ORDER_KEY)  # the model's class order, where it is not sorted wnids (BiT's head)
    if args.dataset in OOD_GROUPS:
        group = ood_group(args.dataset, args.in_dataset, args.benchmark)
        if not group:
            raise UserError(f"{args.in_dataset} has no {args.dataset}-OOD set (a digits split such as digits-012345 "
                            "has heldout, CIFAR-10 and CIFAR-100 each other).")
        sources = [resolve(name, args.in_dataset, args.benchmark, labels) for name in group]
        missing = [source.name for source in sources if not source.available(args.data_root)]
        if missing:
            print(f"--dataset={args.dataset}: no data under {args.data_root} for {', '.join(missing)}; skipping them")
        sources = [source for source in sources if source.name not in missing]
    else:
        name = args.dataset if args.dataset == TRAIN_SPLIT else check_dataset_name(args.dataset, args.benchmark)
        sources = [resolve(name, args.in_dataset, args.benchmark, labels)]
    names = [source.name for source in sources]
    transform = InputTransform.from_meta(meta)
    datasets = {source.name: training_subset(source.build(args.data_root, transform), args.limit)
                if source.role == "train" else source.build(args.data_root, transform)
                for source in [resolve(args.in_dataset, args.in_dataset, args.benchmark, labels), *sources]}
    if any(d.fit_first for d in detectors):  # GROOD's and lowdim's fit, before any pass
        train_set = resolve(TRAIN_SPLIT, args.in_dataset, args.benchmark, labels).build(args.data_root, transform)
        training = training_subset(train_set, args.limit)
        detectors = [fitted_on_training(d, model, model_info, training, args, device, refit=TRAIN_SPLIT in names)
                     if d.fit_first else d for d in detectors]
    fitted = [d for d in detectors if d.fits_on_training and TRAIN_SPLIT not in names and not _is_current(
        gradient_path(args.in_dataset, args.name, d.name, TRAIN_SPLIT, args.gradient_root), model_info, None,
        d.options(), fit=_fit_of(d))]
    if fitted:  # NAC-UE's fit data, of any size: tracked first when missing or of another checkpoint
        train_set = resolve(TRAIN_SPLIT, args.in_dataset, args.benchmark, labels).build(args.data_root, transform)
        track_and_save(model, model_info, TRAIN_SPLIT, training_subset(train_set, args.limit), fitted, args, device,
                       workers, only_if_stale=False)
    if TRAIN_SPLIT in names and any(d.fits_on_training for d in detectors):
        datasets = {TRAIN_SPLIT: datasets.pop(TRAIN_SPLIT), **datasets}  # the fit before the sets scored under it
    for name, dataset in datasets.items():
        track_and_save(model, model_info, name, dataset, detectors, args, device, workers,
                       only_if_stale=name == args.in_dataset)


def fitted_on_training(detector: Detector, model: nn.Module, model_info: dict, training: Dataset,
                       args: argparse.Namespace, device: torch.device, refit: bool) -> Detector:
    """``detector`` fit on the ID training subset ``training`` (``training_subset``: ``--limit`` images), saved
    beside its files as ``fit.pt`` (``torch.save``, read back with ``weights_only=True``) and reused while it is of
    this model and of its options — and, with ``refit`` (``--dataset train``), of this many images."""
    path = gradient_path(args.in_dataset, args.name, detector.name, TRAIN_SPLIT, args.gradient_root).with_name("fit.pt")
    if path.is_file():
        saved = torch.load(path, map_location=device, weights_only=True)
        if (saved["model"] == model_info and saved.get("options", {}) == detector.options()
                and (not refit or saved["state"]["num_train"] == len(training))):
            return detector.from_state(saved["state"])
    print(f"{detector.name}: fitting on {len(training)} in-distribution training images")
    fitted = detector.fit(model, training, device, args.batch_size)
    atomic_write(path, lambda f: torch.save({"model": model_info, "options": detector.options(),
                                             "state": fitted.fitted.state()}, f))
    print(f"saved {path}")
    return fitted


ROWS_AT_ONCE = 256
"""The most gradients one image's rows may back-propagate at once when they exceed ``--batch-size`` (the default
batch; CIFAR-100's 100 per-class rows fit): a batch then holds that one image."""


def refuse_every_layer_rows(detectors: list[Detector], num_classes: int, batch_size: int) -> None:
    """Refuse, before any work, detectors that back-propagate more rows per image than both ``--batch-size`` and
    ``ROWS_AT_ONCE`` (the K per-class gradients of min/max/exgrad/all through every layer, with K = 1,000 on
    ImageNet): one image's rows alone would hold many times the gradients of the batch the option bounds memory
    by, and cost K backward passes' worth of work per image."""
    rows = rows_per_sample(detectors, num_classes)
    if rows <= max(batch_size, ROWS_AT_ONCE):
        return
    names = ", ".join(d.name for d in detectors if not d.last_layer_only)
    raise UserError(f"{names} through every layer back-propagates {rows:,} gradients per image ({num_classes:,} "
                    f"classes): one image alone holds {rows:,} rows of activation gradients at once, more than "
                    f"--batch-size={batch_size} allows (about {rows / batch_size:.0f}x the memory of a training step "
                    f"of {batch_size} images), and each image costs about {rows:,} backward passes' work (on "
                    f"ImageNet's 50,000 images, {rows * 50_000:.1e} image-backward passes). Run --layers last (every "
                    f"detector's last-layer score in closed form, at the speed of a forward pass), or --score=pred or "
                    f"--score=gradnorm (one gradient per image through every layer), or pass --batch-size={rows} or "
                    f"more to accept that memory.")


def training_subset(full: Dataset, limit: int | None) -> Dataset:
    """``limit`` (default ``DEFAULT_TRAIN_SAMPLES``) images of the training split ``full`` (without augmentation),
    drawn without replacement with seed ``TRAIN_SUBSET_SEED``, in index order."""
    count = min(limit or DEFAULT_TRAIN_SAMPLES, len(full))
    indices = np.sort(np.random.default_rng(TRAIN_SUBSET_SEED).choice(len(full), count, replace=False))
    return Subset(full, indices.tolist())


def _warn_on_a_loss_mismatch(loss: str | None, script: str) -> None:
    """The confounding label is meant for a model trained with BCE (``train_original.py``), the other
    detectors for a cross-entropy model (``train_energy.py``); the other pairing runs, with a warning."""
    if loss == "bce" and script == "track_gradient.py":
        print("warning: this model was trained with one sigmoid per class (train_original.py); its "
              "confounding-label gradients are tracked by track_gradient_original.py", file=sys.stderr)
    elif loss in ("energy", "ce", "oe") and script == "track_gradient_original.py":  # "ce", "oe": imported
        print(f"warning: this model was trained with cross-entropy (loss {loss!r}); the confounding label "
              "is meant for a BCE model (train_original.py), and track_gradient.py tracks its cross-entropy "
              "gradients", file=sys.stderr)
