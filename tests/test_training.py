"""Both training scripts on tiny data (scikit-learn's digits, sample_photos outliers, --limit): checkpoints
that load_model restores exactly, exact --resume, the refusal to overwrite, and a clean missing-data error."""
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_energy
import train_original
from utils import checkpoints, run_folder
from utils.checkpoints import load_model, unwrap
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--in-dataset=digits", "--limit=16", "--batch-size=8", "--workers=0", "--gpu=-1"]
ENERGY = ["--aux-dataset=sample_photos", "--oe-batch-size=8"]
PROBE = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Interrupted(Exception):
    pass


def train(script, root: Path, name: str, *extra: str, stop_after: int | None = None) -> dict:
    """Run ``script.main``; returns {epoch: outputs on PROBE of the model as saved}. With ``stop_after``,
    the run is interrupted right after that epoch's checkpoint."""
    outputs = {}

    def spy(directory, model, meta, train_state=None):
        checkpoints.save_checkpoint(directory, model, meta, train_state)
        with torch.no_grad():
            outputs[meta["epoch"]] = unwrap(model).eval()(PROBE)
        if meta["epoch"] == stop_after:
            raise Interrupted

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_folder, "save_checkpoint", spy)
        try:
            script.main([f"--name={name}", f"--checkpoint-root={root}", *TINY,
                         *(ENERGY if script is train_energy else []), *extra])
        except Interrupted:
            pass
    return outputs


@pytest.fixture(scope="module")
def energy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return root, train(train_energy, root, "energy", "--epochs=1")


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_energy_checkpoint_loads_to_identical_outputs(energy_run):
    root, outputs = energy_run
    model, meta = load_model("digits", "energy", root=root)
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE), outputs[1], rtol=0, atol=0)
    assert (meta["name"], meta["arch"], meta["in_dataset"], meta["loss"], meta["epoch"]) == \
        ("energy", "resnet20", "digits", "energy", 1)
    assert meta["args"]["aux_dataset"] == "sample_photos" and meta["args"]["m_in"] == -25.0
    assert {p.name for p in (root / "digits" / "energy").iterdir()} == \
        {"epoch_1.pt", "last.pt", "meta.json", "log.csv"}
    (row,) = read_log(root / "digits" / "energy" / "log.csv")
    assert {"loss", "train_acc", "test_acc", "energy_in", "energy_out", "lr", "seconds"} <= set(row)
    assert float(row["energy_in"]) < 0 and float(row["lr"]) == 0.1


@pytest.mark.slow
def test_bce_checkpoint_loads_to_identical_outputs(tmp_path):
    outputs = train(train_original, tmp_path, "bce", "--epochs=1")
    model, meta = load_model("digits", "bce", epoch=1, root=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE), outputs[1], rtol=0, atol=0)
    assert meta["loss"] == "bce" and meta["args"]["weight_decay"] == 1e-4
    (row,) = read_log(tmp_path / "digits" / "bce" / "log.csv")
    assert "energy_in" not in row and 0 <= float(row["test_acc"]) <= 100


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    # --workers=1: worker processes draw their augmentation seeds from the restored RNG state.
    args = ("--epochs=2", "--workers=1")
    straight = train(train_energy, tmp_path, "straight", *args)
    train(train_energy, tmp_path, "resumed", *args, stop_after=1)
    assert not (tmp_path / "digits" / "resumed" / "epoch_2.pt").exists()
    resumed = train(train_energy, tmp_path, "resumed", *args, "--resume")

    torch.testing.assert_close(resumed[2], straight[2], rtol=0, atol=0)
    a = torch.load(tmp_path / "digits" / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "digits" / "resumed" / "last.pt", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for state_a, state_b in zip(a["train_state"]["optimizer"]["state"].values(),
                                b["train_state"]["optimizer"]["state"].values()):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])
    drop_time = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert drop_time(read_log(tmp_path / "digits" / "resumed" / "log.csv")) == \
        drop_time(read_log(tmp_path / "digits" / "straight" / "log.csv"))


def test_refuses_to_overwrite_a_trained_run(energy_run):
    root, _ = energy_run
    argv = ["--name=energy", f"--checkpoint-root={root}", *TINY, *ENERGY, "--epochs=1"]
    with pytest.raises(UserError, match="already holds a trained model.*--resume.*--overwrite"):
        train_energy.main(argv)
    with pytest.raises(UserError, match="--lr: 0.1 in the run, 0.5 now"):
        train_energy.main(argv + ["--resume", "--lr=0.5"])
    with pytest.raises(UserError, match="energy loss; resume it with train_energy.py"):
        train_original.main(["--name=energy", f"--checkpoint-root={root}", *TINY, "--epochs=1", "--resume"])
    with pytest.raises(UserError, match="nothing to resume"):
        train_energy.main(["--name=fresh", f"--checkpoint-root={root}", *TINY, *ENERGY, "--resume"])


def test_overwrite_starts_over(energy_run, tmp_path):
    root, outputs = energy_run
    run_dir = tmp_path / "digits" / "energy"
    shutil.copytree(root / "digits" / "energy", run_dir)
    shutil.copy(run_dir / "epoch_1.pt", run_dir / "epoch_2.pt")  # as if the earlier run had been longer
    new = train(train_energy, tmp_path, "energy", "--epochs=1", "--seed=2", "--overwrite")
    assert not (run_dir / "epoch_2.pt").exists()
    assert len(read_log(run_dir / "log.csv")) == 1
    model, meta = load_model("digits", "energy", root=tmp_path)
    assert meta["args"]["seed"] == 2
    assert not torch.equal(new[1], outputs[1])


@pytest.mark.slow  # a subprocess: python and torch start afresh
def test_missing_auxiliary_data_is_one_clean_error(tmp_path):
    data_root = tmp_path / "empty"
    data_root.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_energy.py"), "--name=x", "--aux-dataset=tinyimages",
         f"--data-root={data_root}", f"--checkpoint-root={tmp_path / 'checkpoints'}", "--in-dataset=digits",
         "--gpu=-1", "--epochs=1"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert str(data_root / "unlabeled_datasets" / "80M_Tiny_Images" / "tiny_images.bin") in result.stderr
    assert not list((tmp_path / "checkpoints").rglob("*.pt"))


def test_pretrained_fine_tunes_with_the_papers_defaults(energy_run, tmp_path):
    root, _ = energy_run
    checkpoint = str(root / "digits" / "energy" / "last.pt")
    args = train_energy.parse_args(["--name=x", f"--pretrained={checkpoint}"])
    assert (args.epochs, args.lr) == (10, 0.001)
    assert (train_energy.parse_args(["--name=x"]).epochs, train_energy.parse_args(["--name=x"]).lr) == (100, 0.1)

    train(train_energy, tmp_path, "tuned", "--epochs=1", f"--pretrained={checkpoint}")
    (row,) = read_log(tmp_path / "digits" / "tuned" / "log.csv")
    assert float(row["lr"]) == 0.001
    train(train_energy, tmp_path, "scratch", "--epochs=1", "--lr=0.001")

    def distance_from_pretrained(name: str) -> float:
        weights = torch.load(tmp_path / "digits" / name / "last.pt", weights_only=True)["state_dict"]
        pretrained = torch.load(checkpoint, weights_only=True)["state_dict"]
        return sum((weights[key] - pretrained[key]).norm().item() for key in pretrained if key.endswith("weight"))

    # two small steps from the pretrained weights stay near them; the same steps from scratch do not
    assert distance_from_pretrained("tuned") < 0.1 * distance_from_pretrained("scratch")
    with pytest.raises(UserError, match="is a resnet20 trained on digits"):
        train_energy.main(["--name=y", f"--checkpoint-root={tmp_path}", *TINY, *ENERGY,
                           "--model-arch=resnet32", f"--pretrained={checkpoint}"])


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_warm_up_trains_cross_entropy_alone_then_lambda_ramps_up(tmp_path, capsys):
    schedule = ("--epochs=3", "--energy-warmup=0.34", "--energy-ramp=0.34")  # 1 epoch each: λ = 0, λ/2, λ
    warm = train(train_energy, tmp_path, "warm", *schedule)
    assert "cross-entropy alone in epochs 1-1; λ rising linearly in epochs 2-2" in capsys.readouterr().out
    plain = train(train_energy, tmp_path, "plain", "--epochs=3", "--lamb=0")
    # λ = 0 in epoch 1: the same weights as cross-entropy alone; the regulariser moves them in epoch 2
    torch.testing.assert_close(warm[1], plain[1])
    assert (warm[2] - plain[2]).abs().max() > 1e-3

    rows = [{k: float(v) for k, v in row.items()} for row in read_log(tmp_path / "digits" / "warm" / "log.csv")]
    assert [row["lamb"] for row in rows] == [0.0, 0.05, 0.1]
    for row in rows:  # the logged terms make up the logged loss
        assert row["loss"] == pytest.approx(row["ce"] + row["lamb"] * row["energy_reg"], rel=1e-5)
    assert rows[0]["energy_reg"] > 0 and rows[2]["loss"] > rows[2]["ce"]


def test_lamb_zero_logs_cross_entropy_without_a_regularizer(tmp_path, capsys):
    train(train_energy, tmp_path, "ce", "--epochs=1", "--lamb=0")
    assert "no energy regulariser" in capsys.readouterr().out
    (row,) = read_log(tmp_path / "digits" / "ce" / "log.csv")
    assert "energy_reg" not in row and "lamb" not in row
    assert float(row["loss"]) == pytest.approx(float(row["ce"]), rel=1e-6)
    assert float(row["energy_in"]) < 0


def test_energy_schedule_defaults_and_phases():
    scratch = train_energy.parse_args(["--name=x"])
    assert (scratch.energy_warmup, scratch.energy_ramp) == (train_energy.WARMUP, train_energy.RAMP) == (0, 0.5)
    tuned = train_energy.parse_args(["--name=x", "--pretrained=ckpt.pt"])
    assert (tuned.energy_warmup, tuned.energy_ramp) == (0, 0)
    # 100 epochs, the defaults: k/51 · λ in the k-th of 50 epochs, then λ; with a warm-up of 25 first
    weights = [train_energy.energy_weight(epoch, 100, 0.1, 0, 0.5) for epoch in range(100)]
    assert weights[:50] == pytest.approx([0.1 * k / 51 for k in range(1, 51)]) and weights[50:] == [0.1] * 50
    weights = [train_energy.energy_weight(epoch, 100, 0.1, 0.25, 0.5) for epoch in range(100)]
    assert weights[:25] == [0] * 25
    assert weights[25:75] == pytest.approx([0.1 * k / 51 for k in range(1, 51)])
    assert weights[75:] == [0.1] * 25
    assert [train_energy.energy_weight(epoch, 10, 0.1, 0, 0) for epoch in range(10)] == [0.1] * 10
    assert train_energy.energy_phases(100, 0.29, 0.07) == (29, 7) and train_energy.energy_phases(3, 0.25, 0.5) == (0, 1)
    for bad in ("--energy-warmup=1", "--energy-ramp=-0.1"):
        with pytest.raises(UserError, match="is a fraction of the epochs"):
            train_energy.parse_args(["--name=x", bad])
    with pytest.raises(UserError, match="must be below 1"):
        train_energy.parse_args(["--name=x", "--energy-warmup=0.5", "--energy-ramp=0.5"])
