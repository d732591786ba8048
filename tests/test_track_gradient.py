"""track_gradient.py and track_gradient_original.py end to end, on a random model checkpointed for ``digits``
(in-distribution) and the generated OOD sets."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
import track_gradient
import track_gradient_original
from utils.checkpoints import save_checkpoint
from utils.data import NORMALIZATION, get_dataset
from utils.detectors import DETECTORS, SCORE_ALL, gradient_scores
from utils.gradients import CHECKPOINT_HASH_KEY, MODEL_KEYS, gradient_path, load_gradients
from utils.runtime import run_script
from utils.shards import Part
from utils.tracking import TRAIN_SUBSET_SEED

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = ("gaussian", "rademacher", "blobs")


def make_checkpoint(root: Path, name: str, arch: str = "resnet20", in_dataset: str = "digits",
                    seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    mean, std = NORMALIZATION["digits"]
    model = models.get_model(arch, 10, mean, std)
    save_checkpoint(root / "digits" / name, model,
                    {"name": name, "arch": arch, "in_dataset": in_dataset, "num_classes": 10, "mean": mean,
                     "std": std, "arch_kwargs": {}, "loss": "energy", "epoch": 1, "args": {}})
    return model.eval()


@pytest.fixture
def roots(tmp_path):
    return {"checkpoint": tmp_path / "checkpoints", "gradient": tmp_path / "gradients", "data": tmp_path / "datasets"}


def run(script, roots: dict, *args: str) -> None:
    run_script(lambda: script.main([*args, "--in-dataset=digits", "--gpu=-1", "--workers=0",
                                    f"--checkpoint-root={roots['checkpoint']}", f"--gradient-root={roots['gradient']}",
                                    f"--data-root={roots['data']}"]))


def load(roots: dict, name: str, score: str | None, dataset: str) -> dict:
    return load_gradients(gradient_path("digits", name, score, dataset, roots["gradient"]))


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_tracks_the_ood_set_and_first_the_in_distribution_set(roots):
    model = make_checkpoint(roots["checkpoint"], "net")
    run(track_gradient, roots, "--name=net", "--dataset=rademacher", "--score=max", "--limit=7", "--batch-size=30")

    for dataset in ("digits", "rademacher"):
        record = load(roots, "net", "max", dataset)
        assert (record["method"], record["score"], record["dataset"], record["num_samples"]) == (
            "norm", "max", dataset, 7)
        assert list(record["model"]) == [*MODEL_KEYS, CHECKPOINT_HASH_KEY]
        assert record["model"]["arch"] == "resnet20" and record["model"]["epoch"] == 1
        assert list(record["layers"]) == list(models.tracked_parameters(model))
        assert all(v.dtype == np.float32 for v in [*record["layers"].values(), record["total"], record["msp"]])
        assert all(record[k].dtype == np.int64 for k in ("class", "pred", "label"))

        # the same numbers as the engine on the first 7 images, batched 3 at a time (30 rows / 10 classes)
        images, labels = zip(*(get_dataset(dataset, roots["data"])[i] for i in range(7)))
        x = torch.stack(images)
        out = [gradient_scores(model, x[i:i + 3], [DETECTORS["max"]]) for i in range(0, 7, 3)]
        np.testing.assert_array_equal(record["total"], torch.cat([o["max"].total for _, o in out]).numpy())
        np.testing.assert_array_equal(record["class"], torch.cat([o["max"].chosen for _, o in out]).numpy())
        np.testing.assert_array_equal(record["label"], np.array(labels))
        logits = torch.cat([z for z, _ in out])
        np.testing.assert_array_equal(record["pred"], logits.argmax(1).numpy())
        np.testing.assert_allclose(record["msp"], logits.softmax(1).amax(1).numpy(), rtol=1e-6)
        np.testing.assert_allclose(record["energy"], -torch.logsumexp(logits, 1).numpy(), rtol=1e-6)
        layers = np.stack(list(record["layers"].values()))
        np.testing.assert_allclose(record["total"], np.sqrt((layers.astype(np.float64) ** 2).sum(0)), rtol=1e-5)
    assert (load(roots, "net", "max", "rademacher")["label"] == -1).all()


def test_original_tracks_every_available_ood_set_against_the_confounding_label(roots, capsys):
    make_checkpoint(roots["checkpoint"], "bce")
    run(track_gradient_original, roots, "--name=bce", "--dataset=all", "--limit=4")
    for dataset in ("digits", *SYNTHETIC):
        record = load(roots, "bce", None, dataset)
        assert (record["method"], record["score"], record["num_samples"]) == ("original", None, 4)
        assert (record["class"] == -1).all()
    assert sorted(p.name for p in (roots["gradient"] / "digits" / "bce" / "original").iterdir()) == \
        sorted(f"{d}.pkl" for d in ("digits", *SYNTHETIC))
    assert "skipping" in capsys.readouterr().out  # the OOD sets without data under the data root


def test_the_in_distribution_file_is_reused_only_while_current(roots):
    make_checkpoint(roots["checkpoint"], "net")
    args = ("--name=net", "--score=pred", "--batch-size=4")
    run(track_gradient, roots, *args, "--dataset=gaussian", "--limit=3")
    id_file = gradient_path("digits", "net", "pred", "digits", roots["gradient"])
    written = id_file.stat().st_mtime_ns
    run(track_gradient, roots, *args, "--dataset=blobs", "--limit=3")
    assert id_file.stat().st_mtime_ns == written
    run(track_gradient, roots, *args, "--dataset=blobs", "--limit=5")
    assert load(roots, "net", "pred", "digits")["num_samples"] == 5
    written = id_file.stat().st_mtime_ns
    make_checkpoint(roots["checkpoint"], "net", seed=1)  # retrained: same name, same epoch, other weights
    run(track_gradient, roots, *args, "--dataset=blobs", "--limit=5")
    assert id_file.stat().st_mtime_ns != written
    assert load(roots, "net", "pred", "digits")["model"] == load(roots, "net", "pred", "blobs")["model"]


def exit_message(script, roots: dict, capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(script, roots, *args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_missing_or_mismatched_checkpoint_names_the_command_that_makes_it(roots, capsys):
    message = exit_message(track_gradient, roots, capsys, "--name=net", "--dataset=gaussian")
    assert "train_energy.py --name=net" in message
    make_checkpoint(roots["checkpoint"], "net")
    message = exit_message(track_gradient, roots, capsys, "--name=net", "--dataset=gaussian", "--model-arch=wrn40_2")
    assert "resnet20" in message and "--model-arch=wrn40_2" in message
    make_checkpoint(roots["checkpoint"], "other", in_dataset="CIFAR-10")  # saved under digits/, trained on CIFAR-10
    message = exit_message(track_gradient_original, roots, capsys, "--name=other", "--dataset=gaussian")
    assert "CIFAR-10" in message and "train_energy.py --name=other --in-dataset=digits" in message


@pytest.mark.slow  # subprocesses: python and torch start afresh for each command
@pytest.mark.parametrize("command", [
    ["track_gradient.py", "--name=resnet", "--dataset=LSUN", "--score=min", "--gpu=0"],
    ["track_gradient_original.py", "--name=resnet_bce", "--dataset=LSUN", "--gpu=0"],
])
def test_the_readme_commands_parse_and_fail_cleanly_without_a_model(tmp_path, command):
    result = subprocess.run([sys.executable, str(REPO / command[0]), *command[1:]], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "train_" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
@pytest.mark.parametrize("score", ["min", "exgrad"])
def test_shards_merge_into_the_single_process_file(roots, score):
    make_checkpoint(roots["checkpoint"], "net")
    common = ("--name=net", "--dataset=blobs", f"--score={score}", "--limit=9", "--batch-size=20")  # 2 images a batch
    run(track_gradient, roots, *common)
    single = {d: load(roots, "net", score, d) for d in ("digits", "blobs")}
    roots["gradient"] = roots["gradient"].with_name("sharded")

    run(track_gradient, roots, *common, "--shard=2/3")
    run(track_gradient, roots, *common, "--shard=0/3")
    folder = roots["gradient"] / "digits" / "net" / score
    assert sorted(p.name for p in folder.iterdir()) == ["blobs.shard0of3.pkl", "blobs.shard2of3.pkl",
                                                        "digits.shard0of3.pkl", "digits.shard2of3.pkl"]
    run(track_gradient, roots, *common, "--shard=1/3")  # the last part merges
    assert sorted(p.name for p in folder.iterdir()) == ["blobs.pkl", "digits.pkl"]
    for dataset, expected in single.items():
        merged = load(roots, "net", score, dataset)
        assert merged.keys() == expected.keys()
        for key, value in expected.items():
            if key in ("layers", "extra", "features", "head"):
                assert list(merged[key]) == list(value)
                assert all(np.array_equal(merged[key][k], v) for k, v in value.items())
            elif isinstance(value, np.ndarray):
                assert np.array_equal(merged[key], value) and merged[key].dtype == value.dtype
            else:
                assert merged[key] == value


def test_shards_are_cut_at_batch_boundaries():
    parts = [Part.of(10, 3, (i, 3)) for i in range(3)]  # 4 batches: [0, 3) [3, 6) [6, 9) [9, 10)
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 10)]
    assert [(p.start, p.stop) for p in (Part.of(2, 4, (i, 2)) for i in range(2))] == [(0, 0), (0, 2)]


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_score_all_writes_each_detector_s_file_as_its_own_run_would(roots):
    """One forward and one backward pass for every detector of track_gradient.py; each file holds what the
    single-detector run writes (the same batches of 2 images: 34 rows = 2 × (K + 7) here, 2 × K, 2 × 2 (GAIA-A)
    or 2 × 1 alone). NAC-UE's training split is tracked first, so its fit is the same in both runs."""
    make_checkpoint(roots["checkpoint"], "net")
    run(track_gradient, roots, "--name=net", "--dataset=gaussian", "--score=all", "--limit=5", "--batch-size=34")
    together = {name: load(roots, "net", name, "gaussian") for name in SCORE_ALL}
    roots["gradient"] = roots["gradient"].with_name("alone")
    for name, expected in together.items():
        rows = 20 if name in ("min", "max", "exgrad") else 4 if name == "gaia_a" else 2
        run(track_gradient, roots, "--name=net", "--dataset=gaussian", f"--score={name}", "--limit=5",
            f"--batch-size={rows}")
        alone = load(roots, "net", name, "gaussian")
        assert alone.keys() == expected.keys()
        assert (alone["norm"], alone["options"], alone["score"]) == (expected["norm"], expected["options"], name)
        for group in ("layers", "extra"):
            assert list(alone[group]) == list(expected[group])
            for layer, values in alone[group].items():
                np.testing.assert_allclose(expected[group][layer], values, rtol=1e-5)
        np.testing.assert_allclose(expected["total"], alone["total"], rtol=1e-5)
        for key in ("class", "pred", "label"):
            np.testing.assert_array_equal(expected[key], alone[key])
    assert together["gradnorm"]["norm"] == "L1" and together["gradnorm"]["options"] == {"temperature": 1.0}
    assert list(together["exgrad"]["extra"]) == ["fc.weight:L1"] and together["min"]["extra"] == {}
    assert (gradient_path("digits", "net", "gradnorm", "digits", roots["gradient"].with_name("gradients"))).is_file()


def test_gradnorm_temperature_is_recorded_and_a_file_of_another_temperature_is_retracked(roots):
    make_checkpoint(roots["checkpoint"], "net")
    common = ("--name=net", "--dataset=gaussian", "--score=gradnorm", "--limit=3")
    run(track_gradient, roots, *common)
    at_one = load(roots, "net", "gradnorm", "digits")
    run(track_gradient, roots, *common, "--temperature=1000")
    at_1000 = load(roots, "net", "gradnorm", "digits")
    assert (at_one["options"], at_1000["options"]) == ({"temperature": 1.0}, {"temperature": 1000.0})
    assert not np.allclose(at_one["total"], at_1000["total"])


def test_the_training_split_is_a_seeded_unaugmented_subset(roots):
    """--dataset train: --limit images of the in-distribution training split, drawn with a fixed seed, without
    augmentation, written as train.pkl beside the test files (what the combined detector is fit on)."""
    model = make_checkpoint(roots["checkpoint"], "net")
    run(track_gradient, roots, "--name=net", "--dataset=train", "--score=pred", "--limit=6")
    record = load(roots, "net", "pred", "train")
    assert (record["dataset"], record["num_samples"]) == ("train", 6)
    indices = np.sort(np.random.default_rng(TRAIN_SUBSET_SEED).choice(1297, 6, replace=False))
    train_set = get_dataset("digits", roots["data"], train=True, augment=False)
    images, labels = zip(*(train_set[int(i)] for i in indices))
    np.testing.assert_array_equal(record["label"], labels)
    _, scores = gradient_scores(model, torch.stack(images), [DETECTORS["pred"]])
    np.testing.assert_allclose(record["total"], scores["pred"].total.numpy(), rtol=1e-6)
    assert load(roots, "net", "pred", "digits")["num_samples"] == 6  # the ID test set, tracked first as always
