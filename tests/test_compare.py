"""``--compare``, ``--protocol energy_ood`` and ``--ood-positive`` against the per-detector tables and against
independent computations on the same indices (scikit-learn, counting)."""
import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

import compute_gradient_metrics
from tests.test_compute_gradient_metrics import make_record, write
from utils.errors import UserError
from utils.gradients import gradient_path, load_gradients, ood_dataset_names, save_gradients
from utils.metrics import METRICS, OOD_POSITIVE_FPR, Protocol, fpr95_ood_positive

EXTRA = "fc.weight:L1"
# detector → (shift of its OOD norms, its sign): each separates the sets to a different degree
DETECTORS = {"min": (1.0, -1), "gradnorm": (-0.8, +1), "exgrad": (0.6, -1), "original": (-1.2, +1)}
OOD = {"LSUN": (400, 1), "SVHN": (150, 2)}


def detector_record(dataset: str, n: int, seed: int, detector: str) -> dict:
    shift = 0.0 if dataset == "CIFAR-10" else DETECTORS[detector][0] * (seed / 2)
    record = make_record(dataset, n, shift, seed, method="original" if detector == "original" else "norm",
                         score=None if detector == "original" else detector)
    rng = np.random.default_rng(100 + seed)  # baselines of the same samples: equal in every detector's files
    record["msp"] = rng.beta(8 - 2 * (dataset != "CIFAR-10"), 2, n).astype(np.float32)
    record["energy"] = -rng.normal(8 - 1.5 * (dataset != "CIFAR-10"), 2, n).astype(np.float32)
    if detector == "gradnorm":
        record["norm"] = "L1"
    if detector == "exgrad":
        record["extra"] = {EXTRA: (2 * record["layers"]["fc.weight"] ** 1.5).astype(np.float32)}
    return record


@pytest.fixture
def roots(tmp_path):
    gradients = tmp_path / "gradients"
    for detector in DETECTORS:
        score = None if detector == "original" else detector
        write(detector_record("CIFAR-10", 500, 0, detector), gradients, score=score)
        for dataset, (n, seed) in OOD.items():
            write(detector_record(dataset, n, seed, detector), gradients, score=score)
    # none of these is an OOD set of the comparison
    write(make_record("train", 60, 0.0, 7), gradients)  # the ID training split, the combined row's fit data
    shard = gradient_path("CIFAR-10", "resnet", "min", "iSUN.shard0of2", gradients)
    save_gradients(make_record("iSUN", 30, 1.0, 8), shard)
    (gradients / "CIFAR-10" / "resnet" / "notes").mkdir()
    return gradients, tmp_path / "results"


def run(roots, *args: str) -> None:
    compute_gradient_metrics.main(["--name=resnet", *args, f"--gradient-root={roots[0]}",
                                   f"--results-root={roots[1]}"])


def per_layer_args(detector: str) -> list[str]:
    return ["--saved_form=original_single"] if detector == "original" else ["--saved_form=norm_single",
                                                                            f"--score={detector}"]


def per_layer_table(roots, detector: str, dataset: str, suffix: str = "") -> dict:
    form = "original_single" if detector == "original" else f"norm_single-{detector}"
    return json.loads((roots[1] / "CIFAR-10" / "resnet" / (form + suffix) / f"{dataset}.json").read_text())


def records(roots, detector: str) -> tuple[dict, dict[str, dict]]:
    score = None if detector == "original" else detector
    load = lambda d: load_gradients(gradient_path("CIFAR-10", "resnet", score, d, roots[0]))  # noqa: E731
    return load("CIFAR-10"), {d: load(d) for d in OOD}


# ---- the comparison -------------------------------------------------------------------------------------------

@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_compare_equals_the_per_detector_tables(roots, capsys):
    run(roots, "--compare", "--combine=none")
    out = capsys.readouterr().out
    folder = roots[1] / "CIFAR-10" / "resnet" / "compare"
    table = json.loads((folder / "comparison.json").read_text())
    headlines = {"min": "total", "gradnorm": "fc.weight", "exgrad": EXTRA, "original": "total"}
    assert table["datasets"] == ["LSUN", "SVHN", "average"] and table["baselines_from"] == "min"
    assert sorted(e["name"] for e in table["rows"]) == sorted([*DETECTORS, "MSP", "Energy"])
    averages = [e["results"]["average"]["AUROC"] for e in table["rows"]]
    assert averages == sorted(averages, reverse=True)

    for detector in DETECTORS:  # the per-layer mode's numbers, the same file by file
        run(roots, *per_layer_args(detector), "--dataset=all")
    for entry in table["rows"]:
        detector = "min" if entry["kind"] == "baseline" else entry["name"]
        assert entry["row"] == (entry["name"] if entry["kind"] == "baseline" else headlines[detector])
        for dataset in ("LSUN", "SVHN", "average"):
            row = next(r for r in per_layer_table(roots, detector, dataset)["rows"] if r["row"] == entry["row"])
            assert entry["results"][dataset] == {m: row[m] for m in METRICS}

    # printed: one line per detector and baseline, FPR95 and AUROC per set and for the average
    lines = {line.split(":")[0].split(" (")[0]: line for line in out.splitlines()}
    exgrad = next(e for e in table["rows"] if e["name"] == "exgrad")
    cells = lines["exgrad"].split()[-6:]
    assert cells == [f"{exgrad['results'][d][m]:.2f}" for d in ("LSUN", "SVHN", "average") for m in ("FPR95", "AUROC")]
    assert "gradnorm: fc.weight (+norm L1)" in out and "MSP and Energy from the files of detector min" in out
    assert "iSUN" not in out and "train" not in out.split("==")[1]

    with open(folder / "comparison.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 6 * 3
    first = csv_rows[0]
    assert first["name"] == table["rows"][0]["name"] and first["ood_dataset"] == "LSUN"
    assert {m: float(first[m]) for m in METRICS} == table["rows"][0]["results"]["LSUN"]


def test_compare_flip_inverts_the_detectors_only(roots):  # not the baselines, nor the combined row
    run(roots, "--compare")
    run(roots, "--compare", "--flip")
    base = roots[1] / "CIFAR-10" / "resnet"
    plain = {(e["name"], e["kind"]): e for e in json.loads((base / "compare" / "comparison.json").read_text())["rows"]}
    flipped = json.loads((base / "compare-flip" / "comparison.json").read_text())
    assert flipped["flip"] and ("min", "combined") in plain
    for entry in flipped["rows"]:
        auroc = plain[entry["name"], entry["kind"]]["results"]["LSUN"]["AUROC"]
        expected = auroc if entry["kind"] in ("baseline", "combined") else 100 - auroc
        assert entry["results"]["LSUN"]["AUROC"] == pytest.approx(expected)


def test_compare_with_one_detector_and_one_ood_set(tmp_path, capsys):
    gradients = tmp_path / "gradients"
    for dataset, n, seed in (("CIFAR-10", 120, 0), ("LSUN", 90, 1)):
        write(detector_record(dataset, n, seed, "original"), gradients, score=None)
    run((gradients, tmp_path / "results"), "--compare", "--gpu=0")
    table = json.loads((tmp_path / "results/CIFAR-10/resnet/compare/comparison.json").read_text())
    assert table["datasets"] == ["LSUN"] and [e["name"] for e in table["rows"]].count("original") == 1
    assert len(table["rows"]) == 3 and "original: total (+norm L2)" in capsys.readouterr().out


def test_compare_leaves_out_sets_not_tracked_for_every_detector(roots, capsys):
    write(detector_record("iSUN", 50, 3, "min"), roots[0])
    run(roots, "--compare")
    out = capsys.readouterr().out
    assert "left out of the comparison (not tracked for every detector): iSUN of min" in out
    assert json.loads((roots[1] / "CIFAR-10/resnet/compare/comparison.json").read_text())["datasets"] == [
        "LSUN", "SVHN", "average"]


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_compare_plot_writes_a_layer_figure_per_detector(roots, capsys):
    run(roots, "--compare", "--plot")
    folder = roots[1] / "CIFAR-10" / "resnet" / "compare"
    pngs = {folder / f"{d}_layers.png" for d in DETECTORS}
    assert set(folder.glob("*.png")) == pngs
    out = capsys.readouterr().out
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in out


@pytest.mark.parametrize("argv, message", [
    (["--name=resnet", "--compare", "--saved_form=norm_single", "--score=min"], "leave out --saved_form"),
    (["--name=resnet", "--compare", "--score=min"], "leave out --saved_form and --score"),
    (["--name=resnet", "--score=min"], "--saved_form is required"),
    (["--name=resnet", "--compare", "--protocol=oe"], "invalid choice: 'oe'"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        compute_gradient_metrics.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_compare_without_any_detector_says_how_to_track(tmp_path):
    with pytest.raises(UserError, match="no detector tracked .*--score=all"):
        run((tmp_path / "gradients", tmp_path / "results"), "--compare")


def test_ood_sets_skip_the_training_split_and_shard_parts(roots):
    folder = gradient_path("CIFAR-10", "resnet", "min", "x", roots[0]).parent
    assert ood_dataset_names(folder, "CIFAR-10") == ["LSUN", "SVHN"]
    run(roots, "--saved_form=norm_single", "--score=min", "--dataset=all")
    assert json.loads((roots[1] / "CIFAR-10/resnet/norm_single-min/average.json").read_text())["datasets"] == [
        "LSUN", "SVHN"]


# ---- the energy_ood protocol and the OOD-positive FPR95 ------------------------------------------------------

def test_draws_have_the_documented_size_and_come_from_the_seed():
    protocol = Protocol("energy_ood", seed=1)
    draws = protocol.subsets(10_000, 8_000, "LSUN")
    assert len(draws) == 10
    for idx in draws:
        assert idx.shape == (2_000,) and len(np.unique(idx)) == 2_000 and 0 <= idx.min() and idx.max() < 8_000
    again = Protocol("energy_ood", seed=1).subsets(10_000, 8_000, "LSUN")
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))
    assert not np.array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], Protocol("energy_ood", seed=2).subsets(10_000, 8_000, "LSUN")[0])
    assert not np.array_equal(draws[0], protocol.subsets(10_000, 8_000, "SVHN")[0])
    small = protocol.subsets(10_000, 1_500, "iSUN")  # fewer than 2,000: all of them, every draw
    assert all(np.array_equal(idx, np.arange(1_500)) for idx in small)
    assert Protocol().subsets(10_000, 8_000, "LSUN") is None


def independent_fpr95(positive, negative) -> float:
    """FPR at the highest threshold keeping ≥ 95% of ``positive`` (higher = positive), by counting."""
    for t in sorted(set(np.concatenate([positive, negative])), reverse=True):
        if np.mean(positive >= t) >= 0.95:
            return float(np.mean(negative >= t))
    raise AssertionError("unreachable")


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_protocol_mean_and_std_match_an_independent_computation_on_the_same_indices(roots):
    run(roots, "--saved_form=norm_single", "--score=min", "--dataset=all", "--protocol=energy_ood",
        "--ood-positive", "--seed=3")
    id_record, ood_records = records(roots, "min")
    id_scores = -id_record["total"].astype(np.float64)
    for dataset, ood_record in ood_records.items():
        table = per_layer_table(roots, "min", dataset, "-energy_ood")
        assert table["protocol"] == {"name": "energy_ood", "ood_positive": True, "draws": 10, "seed": 3,
                                     "ood_per_draw": 100, "std": "population (ddof=0)"}
        row = next(r for r in table["rows"] if r["row"] == "total")
        draws = Protocol("energy_ood", seed=3).subsets(500, ood_record["num_samples"], dataset)
        ood_all = -ood_record["total"].astype(np.float64)
        auroc = [roc_auc_score(np.r_[np.ones(500), np.zeros(100)], np.r_[id_scores, ood_all[i]]) for i in draws]
        fpr = [independent_fpr95(id_scores, ood_all[i]) for i in draws]
        fpr_ood = [independent_fpr95(-ood_all[i], -id_scores) for i in draws]  # OOD positive, score negated
        for key, values in (("AUROC", auroc), ("FPR95", fpr), (OOD_POSITIVE_FPR, fpr_ood)):
            assert row[key] == pytest.approx(100 * np.mean(values), abs=1e-9)
            assert row[f"{key}_std"] == pytest.approx(100 * np.std(values), abs=1e-9)
            assert row["draws"][key] == pytest.approx(100 * np.array(values), abs=1e-9)
    average = next(r for r in per_layer_table(roots, "min", "average", "-energy_ood")["rows"] if r["row"] == "total")
    per_set = [next(r for r in per_layer_table(roots, "min", d, "-energy_ood")["rows"] if r["row"] == "total")
               for d in OOD]
    assert average["AUROC"] == pytest.approx(np.mean([r["AUROC"] for r in per_set]))
    assert average["AUROC_std"] == pytest.approx(np.std(np.mean([r["draws"]["AUROC"] for r in per_set], axis=0)))


@pytest.mark.slow
def test_compare_under_the_protocol_equals_the_per_detector_tables_and_is_reproducible(roots, capsys):
    def compared(*extra: str) -> dict:
        run(roots, "--compare", "--protocol=energy_ood", "--ood-positive", *extra)
        return json.loads((roots[1] / "CIFAR-10/resnet/compare-energy_ood/comparison.json").read_text())

    table = compared()
    out = capsys.readouterr().out
    assert "FPR95 (OOD+)" in out and "Protocol energy_ood" in out and "OOD samples per draw: LSUN 100, SVHN 100" in out
    assert compared() == table and compared("--seed=2") != table
    run(roots, "--saved_form=norm_single", "--score=exgrad", "--dataset=all", "--protocol=energy_ood", "--ood-positive")
    exgrad = next(e for e in table["rows"] if e["name"] == "exgrad")
    for dataset in ("LSUN", "SVHN", "average"):
        row = next(r for r in per_layer_table(roots, "exgrad", dataset, "-energy_ood")["rows"] if r["row"] == EXTRA)
        keys = [*METRICS, OOD_POSITIVE_FPR]
        assert exgrad["results"][dataset] == {k: row[k] for k in [*keys, *(f"{k}_std" for k in keys)]}
    line = next(line for line in out.splitlines() if line.startswith("exgrad:"))
    lsun = exgrad["results"]["LSUN"]
    assert f"{lsun['AUROC']:.2f} ± {lsun['AUROC_std']:5.2f}" in line


def test_ood_positive_fpr95_is_openoods_operating_point():
    # OOD positive, score negated: the fraction of ID flagged at the threshold that detects >= 95% of OOD
    rng = np.random.default_rng(5)
    id_scores, ood_scores = rng.normal(1, 1, 300), rng.normal(0, 1.5, 120)
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(300), np.ones(120)], -np.r_[id_scores, ood_scores], drop_intermediate=False)
    assert fpr95_ood_positive(id_scores, ood_scores) == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    assert fpr95_ood_positive(id_scores, ood_scores) == pytest.approx(independent_fpr95(-ood_scores, -id_scores))
    assert fpr95_ood_positive([5, 6, 7], [1, 2]) == 0


def test_compare_adds_the_combined_row_of_each_detector_with_a_training_file(roots, capsys):
    run(roots, "--compare")
    table = json.loads((roots[1] / "CIFAR-10" / "resnet" / "compare" / "comparison.json").read_text())
    combined = [e for e in table["rows"] if e["kind"] == "combined"]
    assert [(e["name"], e["row"]) for e in combined] == [("min", "combined")]  # only min has a train.pkl
    assert "min: combined (-distance)" in capsys.readouterr().out
    run(roots, *per_layer_args("min"), "--dataset=all")
    for dataset in (*OOD, "average"):
        expected = {r["row"]: r for r in per_layer_table(roots, "min", dataset)["rows"]}["combined"]
        assert combined[0]["results"][dataset]["AUROC"] == pytest.approx(expected["AUROC"])
