"""The gradients file format (``utils.gradients``): building, merging, saving and loading records."""
import pickle

import numpy as np
import pytest

from utils.detectors import DETECTORS, get_detector
from utils.gradients import (
    PER_SAMPLE_KEYS,
    GradientFileError,
    concatenate_records,
    gradient_path,
    load_gradients,
    new_record,
    save_gradients,
)

MODEL = {"name": "net", "arch": "resnet20", "in_dataset": "digits", "num_classes": 10,
         "checkpoint": "checkpoints/digits/net/last.pt", "epoch": 3}


def record(detector_name: str | None, n: int, seed: int, dataset: str = "gaussian") -> dict:
    rng = np.random.default_rng(seed)
    detector = get_detector(detector_name)
    extra = {"fc.weight:L1": rng.random(n)} if detector.name == "exgrad" else {}
    return new_record(MODEL, detector, dataset, {"conv1.weight": rng.random(n), "fc.weight": rng.random(n)}, extra,
                      total=rng.random(n), pred=rng.integers(0, 10, n), label=np.full(n, -1), msp=rng.random(n),
                      energy=-rng.random(n), **{"class": rng.integers(-1, 10, n)})


@pytest.mark.parametrize("name", list(DETECTORS))
def test_a_record_of_every_detector_round_trips(tmp_path, name):
    built = record(None if name == "original" else name, 5, 0)
    detector = DETECTORS[name]
    assert (built["method"], built["score"], built["norm"]) == (
        detector.method, None if name == "original" else name, "none" if detector.norm is None else f"L{detector.norm}")
    assert all(built[key].dtype == dtype for key, dtype in PER_SAMPLE_KEYS.items())
    path = gradient_path("digits", "net", None if name == "original" else name, "gaussian", tmp_path)
    assert path.parent.name == name
    save_gradients(built, path)
    loaded = load_gradients(path)
    assert loaded.keys() == built.keys() and loaded["options"] == built["options"]
    for group in ("layers", "extra"):
        assert all(np.array_equal(loaded[group][k], v) for k, v in built[group].items())


def test_parts_concatenate_in_order():
    parts = [record("exgrad", n, seed) for n, seed in ((3, 1), (4, 2), (2, 3))]
    parts[0]["shard"] = {"index": 0}
    merged = concatenate_records(parts)
    assert merged["num_samples"] == 9 and "shard" not in merged
    for key in PER_SAMPLE_KEYS:
        np.testing.assert_array_equal(merged[key], np.concatenate([p[key] for p in parts]))
    np.testing.assert_array_equal(merged["extra"]["fc.weight:L1"],
                                  np.concatenate([p["extra"]["fc.weight:L1"] for p in parts]))


def test_features_round_trip_and_concatenate(tmp_path):
    """Per-sample vectors (N, D), e.g. penultimate features for the feature baselines, travel in the file."""
    rng = np.random.default_rng(5)
    parts = []
    for n in (3, 2):
        built = record("pred", n, n)
        parts.append(new_record(MODEL, get_detector("pred"), "gaussian", built["layers"], {},
                                features={"penultimate": rng.random((n, 4))},
                                **{k: built[k] for k in PER_SAMPLE_KEYS}))
    merged = concatenate_records(parts)
    save_gradients(merged, tmp_path / "f.pkl")
    loaded = load_gradients(tmp_path / "f.pkl")["features"]["penultimate"]
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, np.concatenate([p["features"]["penultimate"] for p in parts]))


def test_a_file_of_the_seed_format_still_loads(tmp_path):
    """Files written before detectors had norms, extra rows and options: L2, nothing extra."""
    old = {key: value for key, value in record("min", 4, 0).items() if key not in ("norm", "extra", "options")}
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps(old))
    assert load_gradients(path)["score"] == "min"


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(norm="L3"), "unknown norm"),
    (lambda r: r.update(extra=[1, 2]), "'extra' must be a dict"),
    (lambda r: r["extra"].update(bad=np.ones(2)), r"extra\['bad'\] must be an array of shape \(4,\)"),
    (lambda r: r.update(score="no_such_detector"), "unknown score"),
    (lambda r: r.update(features={"penultimate": np.ones(4)}), r"features\['penultimate'\] must be a float array"),
    (lambda r: r.update(features={"penultimate": np.full((4, 2), np.nan)}), "NaN"),
])
def test_a_malformed_record_is_refused_with_its_reason(tmp_path, change, message):
    bad = record("exgrad", 4, 0)
    change(bad)
    with pytest.raises(GradientFileError, match=message):
        save_gradients(bad, tmp_path / "bad.pkl")
    assert not (tmp_path / "bad.pkl").exists()
