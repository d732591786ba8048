"""``compute_gradient_metrics.py`` end to end, on gradients files written here in the real format."""
import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compute_gradient_metrics
from utils.detectors import get_detector
from utils.errors import UserError
from utils.gradients import GradientFileError, gradient_path, load_gradients, new_record, save_gradients
from utils.metrics import METRICS, ood_metrics
from utils.tables import detection_score

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight", "fc.weight")
MODEL = {"name": "resnet", "arch": "resnet20", "in_dataset": "CIFAR-10", "num_classes": 10,
         "checkpoint": "checkpoints/CIFAR-10/resnet/last.pt", "epoch": 100}


def make_record(dataset: str, n: int, shift: float, seed: int, method: str = "norm", score: str | None = "min",
                layers=LAYERS, **model) -> dict:
    """Log-normal layer norms; OOD (shift > 0) has larger norms in deeper layers and lower confidence."""
    rng = np.random.default_rng(seed)
    norms = {k: rng.lognormal(np.log(0.1 * (i + 1)) + shift * i / len(layers), 0.5, n)
             for i, k in enumerate(layers)}
    detector = get_detector(score if method == "norm" else None)
    return new_record({**MODEL, **model}, detector, dataset, norms, {},
                      total=np.sqrt(sum(v.astype(np.float32).astype(np.float64) ** 2 for v in norms.values())),
                      pred=rng.integers(0, 10, n),
                      label=rng.integers(0, 10, n) if dataset == "CIFAR-10" else np.full(n, -1),
                      msp=rng.beta(8 - 3 * shift, 2, n), energy=-rng.normal(8 - 2 * shift, 2, n),
                      **{"class": rng.integers(0, 10, n)})


def write(record: dict, root: Path, name: str = "resnet", score: str | None = "min") -> Path:
    path = gradient_path("CIFAR-10", name, score, record["dataset"], root)
    save_gradients(record, path)
    return path


@pytest.fixture
def roots(tmp_path):
    gradients = tmp_path / "gradients"
    write(make_record("CIFAR-10", 300, 0.0, 0), gradients)
    write(make_record("LSUN", 200, 1.0, 1), gradients)
    write(make_record("SVHN", 120, 0.5, 2), gradients)
    return gradients, tmp_path / "results"


def run(roots, *args: str) -> None:
    compute_gradient_metrics.main([*args, f"--gradient-root={roots[0]}", f"--results-root={roots[1]}"])


NORM_MIN = ("--name=resnet", "--saved_form=norm_single", "--score=min")


def expected_rows(id_record: dict, ood_record: dict, saved_form: str, score: str | None, flip: bool = False):
    """Every row's metrics (%) recomputed from the records with ``ood_metrics``."""
    rows = {name: ood_metrics(detection_score(id_record["layers"][name], saved_form, score, flip),
                              detection_score(ood_record["layers"][name], saved_form, score, flip)) for name in LAYERS}
    rows["total"] = ood_metrics(detection_score(id_record["total"], saved_form, score, flip),
                                detection_score(ood_record["total"], saved_form, score, flip))
    rows["MSP"] = ood_metrics(id_record["msp"], ood_record["msp"])
    rows["Energy"] = ood_metrics(-id_record["energy"].astype(np.float64), -ood_record["energy"].astype(np.float64))
    return {name: {k: 100 * v for k, v in m.items()} for name, m in rows.items()}


def test_table_json_and_csv_hold_ood_metrics_of_the_files(roots, capsys):
    run(roots, *NORM_MIN, "--dataset=LSUN", "--gpu=0")
    out = capsys.readouterr().out
    folder = roots[1] / "CIFAR-10" / "resnet" / "norm_single-min"
    table = json.loads((folder / "LSUN.json").read_text())
    id_record, ood_record = (load_gradients(gradient_path("CIFAR-10", "resnet", "min", d, roots[0]))
                             for d in ("CIFAR-10", "LSUN"))
    expected = expected_rows(id_record, ood_record, "norm_single", "min")

    assert [r["row"] for r in table["rows"]] == [*LAYERS, "total", "MSP", "Energy"]
    assert table["ood_dataset"] == "LSUN" and table["num_id"] == 300 and table["num_ood"] == 200
    for row in table["rows"]:
        assert {m: row[m] for m in METRICS} == pytest.approx(expected[row["row"]], abs=1e-9)
    total = next(r for r in table["rows"] if r["row"] == "total")
    assert total["id_mean"] == pytest.approx(id_record["total"].mean(dtype=np.float64))
    assert total["ood_std"] == pytest.approx(ood_record["total"].std(dtype=np.float64))
    assert total["AUROC"] > 80 and table["gradient_score"] == "-norm"

    with open(folder / "LSUN.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["row"] for r in csv_rows] == [r["row"] for r in table["rows"]]
    for csv_row, row in zip(csv_rows, table["rows"]):
        assert {m: float(csv_row[m]) for m in METRICS} == {m: row[m] for m in METRICS}

    # the printed table: the header states the conventions; every row shows the JSON's numbers at 2 decimals
    assert "CIFAR-10 (ID, 300 samples) vs LSUN (OOD, 200 samples)" in out
    assert "detection score = -norm" in out and "ID is the positive class" in out
    assert "energy E(x) = -logsumexp f(x)" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for row in table["rows"]:
        cells = lines[row["row"]]
        assert cells[1:5] == [f"{row[m]:.2f}" for m in METRICS]
        assert cells[5:8] == [f"{row['id_mean']:.4g}", "±", f"{row['id_std']:.3g}"]
    assert f"wrote {folder / 'LSUN.json'}" in out and f"wrote {folder / 'LSUN.csv'}" in out
    assert not list(folder.glob("*.png")) and not (folder / "average.json").exists()


def test_readme_commands_with_default_roots(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(make_record("CIFAR-10", 100, 0.0, 0), Path("gradients"))
    write(make_record("LSUN", 80, 1.0, 1), Path("gradients"))
    bce = {"name": "resnet_bce", "checkpoint": "checkpoints/CIFAR-10/resnet_bce/last.pt"}
    for dataset, shift, seed in (("CIFAR-10", 0.0, 2), ("LSUN", -1.0, 3)):
        write(make_record(dataset, 90, shift, seed, method="original", score=None, **bce), Path("gradients"),
              name="resnet_bce", score=None)

    compute_gradient_metrics.main("--name=resnet --saved_form=norm_single --score=min --dataset=LSUN --gpu=0".split())
    compute_gradient_metrics.main("--name=resnet_bce --saved_form=original_single --dataset=LSUN --gpu=0".split())

    assert Path("results/CIFAR-10/resnet/norm_single-min/LSUN.json").is_file()
    table = json.loads(Path("results/CIFAR-10/resnet_bce/original_single/LSUN.csv").with_suffix(".json").read_text())
    assert table["gradient_score"] == "+norm" and table["score"] is None
    assert "gradients original_single: detection score = +norm" in capsys.readouterr().out
    id_record = load_gradients("gradients/CIFAR-10/resnet_bce/original/CIFAR-10.pkl")
    ood_record = load_gradients("gradients/CIFAR-10/resnet_bce/original/LSUN.pkl")
    expected = expected_rows(id_record, ood_record, "original_single", None)
    for row in table["rows"]:
        assert {m: row[m] for m in METRICS} == pytest.approx(expected[row["row"]], abs=1e-9)


def test_all_prints_every_ood_set_and_their_average(roots, capsys):
    run(roots, *NORM_MIN, "--dataset=all")
    out = capsys.readouterr().out
    folder = roots[1] / "CIFAR-10" / "resnet" / "norm_single-min"
    assert out.index("vs LSUN (OOD") < out.index("vs SVHN (OOD") < out.index("vs the average over 2 OOD sets")
    tables = [json.loads((folder / f"{d}.json").read_text()) for d in ("LSUN", "SVHN")]
    average = json.loads((folder / "average.json").read_text())
    assert average["datasets"] == ["LSUN", "SVHN"] and average["num_ood"] == 320
    assert (folder / "average.csv").is_file()
    ood_totals = np.concatenate([load_gradients(gradient_path("CIFAR-10", "resnet", "min", d, roots[0]))["total"]
                                 for d in ("LSUN", "SVHN")]).astype(np.float64)
    for i, row in enumerate(average["rows"]):
        for m in METRICS:
            assert row[m] == pytest.approx((tables[0]["rows"][i][m] + tables[1]["rows"][i][m]) / 2)
        if row["row"] == "total":
            assert row["ood_mean"] == pytest.approx(ood_totals.mean())
            assert row["ood_std"] == pytest.approx(ood_totals.std())


def test_flip_inverts_the_gradient_score_only(roots):
    run(roots, *NORM_MIN, "--dataset=LSUN")
    run(roots, *NORM_MIN, "--dataset=LSUN", "--flip")
    base = roots[1] / "CIFAR-10" / "resnet"
    plain = {r["row"]: r for r in json.loads((base / "norm_single-min" / "LSUN.json").read_text())["rows"]}
    flipped = json.loads((base / "norm_single-min-flip" / "LSUN.json").read_text())
    assert flipped["flip"] and flipped["gradient_score"] == "+norm"
    for row in flipped["rows"]:
        if row["kind"] == "baseline":
            assert row["AUROC"] == pytest.approx(plain[row["row"]]["AUROC"])
        else:
            assert row["AUROC"] == pytest.approx(100 - plain[row["row"]]["AUROC"])
            assert row["AUPR_IN"] != pytest.approx(plain[row["row"]]["AUPR_IN"])


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_plot_writes_histogram_and_roc_figures(roots, capsys):
    run(roots, *NORM_MIN, "--dataset=LSUN", "--plot")
    folder = roots[1] / "CIFAR-10" / "resnet" / "norm_single-min"
    rows = json.loads((folder / "LSUN.json").read_text())["rows"]
    layers = sorted((r for r in rows if r["kind"] == "layer"), key=lambda r: r["AUROC"])
    pngs = {folder / f"LSUN_{name}.png" for name in ("total", layers[-1]["row"], layers[0]["row"])}
    pngs.add(folder / "layers.png")  # each layer's AUROC against its depth
    assert set(folder.glob("*.png")) == pngs
    out = capsys.readouterr().out
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in out


# ---- bad input: a clear error that names the file -------------------------------------------------------------

def test_missing_id_file_says_which_command_makes_it(tmp_path):
    with pytest.raises(GradientFileError) as error:
        run((tmp_path / "gradients", tmp_path / "results"), *NORM_MIN, "--dataset=LSUN")
    message = str(error.value)
    assert str(gradient_path("CIFAR-10", "resnet", "min", "CIFAR-10", tmp_path / "gradients")) in message
    assert "python track_gradient.py --name=resnet --dataset=LSUN --score=min" in message
    assert "tracks the CIFAR-10 test set first" in message


def test_missing_ood_file_says_which_command_makes_it(tmp_path):
    gradients = tmp_path / "gradients"
    write(make_record("CIFAR-10", 50, 0.0, 0, method="original", score=None, name="resnet_bce"), gradients,
          name="resnet_bce", score=None)
    with pytest.raises(GradientFileError) as error:
        run((gradients, tmp_path / "results"), "--name=resnet_bce", "--saved_form=original_single", "--dataset=iSUN")
    assert str(gradient_path("CIFAR-10", "resnet_bce", None, "iSUN", gradients)) in str(error.value)
    assert "python track_gradient_original.py --name=resnet_bce --dataset=iSUN" in str(error.value)


def test_all_without_ood_files(tmp_path):
    write(make_record("CIFAR-10", 50, 0.0, 0), tmp_path / "gradients")
    with pytest.raises(UserError, match="no OOD gradients files .*--dataset=all --score=min"):
        run((tmp_path / "gradients", tmp_path / "results"), *NORM_MIN)


@pytest.mark.parametrize("change, message", [({"epoch": 90}, "different models .*epoch: 100 vs 90"),
                                             ({"layers": LAYERS[:-1]}, "different layers .*only in the ID file: fc"),
                                             ({"layers": LAYERS[::-1]}, "different order")])
def test_files_must_come_from_the_same_model_and_layers(tmp_path, change, message):
    gradients = tmp_path / "gradients"
    write(make_record("CIFAR-10", 50, 0.0, 0), gradients)
    ood = write(make_record("LSUN", 40, 1.0, 1, **change), gradients)
    with pytest.raises(GradientFileError, match=message) as error:
        run((gradients, tmp_path / "results"), *NORM_MIN, "--dataset=LSUN")
    assert str(ood) in str(error.value)


def test_file_that_contradicts_its_path(tmp_path):
    gradients = tmp_path / "gradients"
    write(make_record("CIFAR-10", 50, 0.0, 0), gradients)
    wrong = make_record("LSUN", 40, 1.0, 1, score="max")
    save_gradients(wrong, gradient_path("CIFAR-10", "resnet", "min", "LSUN", gradients))
    with pytest.raises(GradientFileError, match="does not hold what its path says: score 'max'"):
        run((gradients, tmp_path / "results"), *NORM_MIN, "--dataset=LSUN")


def corrupt(record: dict, kind: str) -> dict:
    if kind == "nan":
        record["layers"]["fc.weight"][3] = np.nan
    else:  # every array empty
        record["num_samples"] = 0
        record["layers"] = {k: v[:0] for k, v in record["layers"].items()}
        record.update({k: record[k][:0] for k in ("total", "class", "pred", "label", "msp", "energy")})
    return record


@pytest.mark.parametrize("kind, message", [("nan", "NaN"), ("empty", "no samples")])
@pytest.mark.parametrize("which", ["CIFAR-10", "LSUN"])
def test_nan_or_empty_arrays_are_refused(tmp_path, kind, message, which):
    gradients = tmp_path / "gradients"
    for dataset, shift in (("CIFAR-10", 0.0), ("LSUN", 1.0)):
        record = make_record(dataset, 30, shift, 0)
        path = gradient_path("CIFAR-10", "resnet", "min", dataset, gradients)
        path.parent.mkdir(parents=True, exist_ok=True)
        # written with pickle directly: save_gradients would refuse it
        path.write_bytes(pickle.dumps(corrupt(record, kind) if dataset == which else record))
    with pytest.raises(GradientFileError, match=message) as error:
        run((gradients, tmp_path / "results"), *NORM_MIN, "--dataset=LSUN")
    assert str(gradient_path("CIFAR-10", "resnet", "min", which, gradients)) in str(error.value)


@pytest.mark.parametrize("argv, message", [
    (["--name=resnet", "--saved_form=norm_double", "--score=min"], "invalid choice: 'norm_double'"),
    (["--name=resnet", "--saved_form=norm_single", "--score=median"], "invalid choice: 'median'"),
    (["--name=resnet", "--saved_form=norm_single"], "needs --score"),
    (["--name=resnet", "--saved_form=original_single", "--score=min"], "does not apply"),
    ([*NORM_MIN, "--dataset=CIFAR-10"], "is the in-distribution set"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        compute_gradient_metrics.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


class RunsShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpensFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("payload", [RunsShellCommand, OpensFile])
def test_a_pickle_that_would_run_code_is_refused_unexecuted(tmp_path, payload):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"version": 1, "layers": payload(marker)}))
    with pytest.raises(GradientFileError, match="evil.pkl is not a readable gradients file: refusing"):
        load_gradients(path)
    assert not marker.exists()
    if payload is OpensFile:  # the payload is live: a plain unpickler would have created the marker
        pickle.loads(path.read_bytes())["layers"].close()
        assert marker.exists()


@pytest.mark.parametrize("content", [b"not a pickle at all\n", pickle.dumps([1, 2, 3]), pickle.dumps({"version": 1}),
                                     pickle.dumps({"a": np.zeros(3)})[:20]], ids=["text", "list", "dict", "truncated"])
def test_a_file_that_is_not_a_gradients_file_is_refused(tmp_path, content):
    path = tmp_path / "LSUN.pkl"
    path.write_bytes(content)
    with pytest.raises(GradientFileError, match=f"{path} is not a"):
        load_gradients(path)


@pytest.mark.slow  # a subprocess: python and torch start afresh
def test_script_exits_2_with_one_line_and_runs_no_code(tmp_path):
    gradients = tmp_path / "gradients"
    write(make_record("CIFAR-10", 30, 0.0, 0), gradients)
    marker = tmp_path / "marker"
    evil = gradient_path("CIFAR-10", "resnet", "min", "LSUN", gradients)
    evil.write_bytes(pickle.dumps(RunsShellCommand(marker)))
    result = subprocess.run([sys.executable, "compute_gradient_metrics.py", *NORM_MIN, "--dataset=LSUN", "--gpu=0",
                             f"--gradient-root={gradients}", f"--results-root={tmp_path / 'results'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(evil) in errors[0] and "posix.system" in errors[0]
    assert not marker.exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("score, sign", [("gradnorm", +1), ("exgrad", -1)])
def test_new_detectors_are_scored_with_their_own_sign_and_headline(tmp_path, capsys, score, sign):
    """GradNorm (+L1 norm, the last layer as headline) and ExGrad (−norm, with its extra L1 row)."""
    gradients = tmp_path / "gradients"
    extra_row = "fc.weight:L1"
    records = {}
    for dataset, shift, seed in (("CIFAR-10", 0.0, 0), ("LSUN", 1.0, 1)):
        record = make_record(dataset, 150, shift, seed, score=score)
        record["norm"] = "L1" if score == "gradnorm" else "L2"
        if score == "exgrad":
            record["extra"] = {extra_row: (2 * record["layers"]["fc.weight"]).astype(np.float32)}
        records[dataset] = record
        write(record, gradients, score=score)
    run((gradients, tmp_path / "results"), "--name=resnet", "--saved_form=norm_single", f"--score={score}",
        "--dataset=LSUN")
    out = capsys.readouterr().out
    table = json.loads((tmp_path / "results/CIFAR-10/resnet" / f"norm_single-{score}" / "LSUN.json").read_text())
    headline = "fc.weight" if score == "gradnorm" else extra_row
    assert table["headline"] == headline and f"headline row: {headline}" in out
    assert table["gradient_score"] == ("+norm" if sign > 0 else "-norm")
    rows = {r["row"]: r for r in table["rows"]}
    values = {d: {**r["layers"], **r.get("extra", {})} for d, r in records.items()}
    expected = ood_metrics(sign * values["CIFAR-10"][headline].astype(np.float64),
                           sign * values["LSUN"][headline].astype(np.float64))
    assert rows[headline]["AUROC"] == pytest.approx(100 * expected["AUROC"])
    assert rows[headline]["kind"] == ("layer" if score == "gradnorm" else "extra")


def test_a_data_set_name_is_respelled_or_refused_before_any_file_is_read(tmp_path, capsys):
    with pytest.raises(GradientFileError, match=r"make it with `python track_gradient.py --name=resnet "
                                                 r"--dataset=gaussian --score=min"):
        run((tmp_path / "gradients", tmp_path / "results"), *NORM_MIN, "--dataset=Gaussian")
    with pytest.raises(UserError, match="unknown data set 'Gausian'. Known: "):
        run((tmp_path / "gradients", tmp_path / "results"), *NORM_MIN, "--dataset=Gausian")
