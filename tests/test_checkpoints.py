"""Reading checkpoints back: a truncated, corrupt or foreign file, a wrong --model-arch and a missing epoch
are each one paragraph that says what to do, never a traceback."""
import pytest
import torch

import models
import train_original
from utils.checkpoints import describe_checkpoints, load_checkpoint, load_model, save_checkpoint
from utils.data import NORMALIZATION
from utils.errors import UnreadableFileError, UserError
from utils.runtime import run_script


def save_run(root, name: str = "net", epochs: int = 2) -> torch.nn.Module:
    """A random ResNet-20 for ``digits`` saved as ``epochs`` epochs of run ``name``; the last epoch's model."""
    mean, std = NORMALIZATION["digits"]
    for epoch in range(1, epochs + 1):
        torch.manual_seed(epoch)
        model = models.get_model("resnet20", 10, mean, std)
        save_checkpoint(root / "digits" / name, model,
                        {"name": name, "arch": "resnet20", "in_dataset": "digits", "num_classes": 10, "mean": mean,
                         "std": std, "arch_kwargs": {}, "loss": "bce", "epoch": epoch, "args": {}})
    return model


def one_line_error(capsys, load) -> str:
    """What ``run_script`` prints for ``load()``: exit status 2 and one line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run_script(load)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_a_checkpoint_loads(tmp_path):
    model = save_run(tmp_path)
    loaded, meta = load_model("digits", "net", root=tmp_path)
    assert meta["epoch"] == 2 and meta["checkpoint"] == str(tmp_path / "digits" / "net" / "last.pt")
    probe = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(probe), model.eval()(probe))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_truncated_or_corrupt_checkpoint_says_which_file_and_what_to_do(tmp_path, capsys, damage):
    save_run(tmp_path)
    path = tmp_path / "digits" / "net" / "last.pt"
    content = path.read_bytes()
    path.write_bytes({"truncated": content[:len(content) // 2], "garbage": b"not a checkpoint\n" * 50,
                      "empty": b""}[damage])
    with pytest.raises(UnreadableFileError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and "truncated or corrupt" in str(error.value)
    message = one_line_error(capsys, lambda: load_model("digits", "net", root=tmp_path))
    assert str(path) in message and "truncated or corrupt" in message
    assert "python train_energy.py --name=net --in-dataset=digits" in message
    assert load_model("digits", "net", epoch=1, root=tmp_path)[1]["epoch"] == 1  # the other files are fine


@pytest.mark.parametrize("kind", ["state dict", "tensor", "checkpoint without metadata"])
def test_a_torch_file_that_is_not_a_checkpoint_says_what_it_holds(tmp_path, capsys, kind):
    model = save_run(tmp_path, epochs=1)
    keys = ", ".join(repr(key) for key in list(model.state_dict())[:4])
    no_metadata = {"state_dict": model.state_dict(), "meta": {"arch": "resnet20"}}
    content, described = {"state dict": (model.state_dict(), f"a dict with keys {keys} …"),
                          "tensor": (torch.zeros(3), "a Tensor"),
                          "checkpoint without metadata": (no_metadata, "a dict with keys 'state_dict', 'meta'")}[kind]
    path = tmp_path / "digits" / "net" / "last.pt"
    torch.save(content, path)
    message = one_line_error(capsys, lambda: load_model("digits", "net", root=tmp_path))
    assert f"{path} holds {described}, not a checkpoint of train_energy.py or train_original.py" in message
    with pytest.raises(UnreadableFileError, match="a bare state dict lacks it"):
        load_checkpoint(path)


def test_wrong_model_arch_names_the_flag_that_fixes_it(tmp_path, capsys):
    save_run(tmp_path)
    message = one_line_error(capsys, lambda: load_model("digits", "net", root=tmp_path, arch="wrn40_2"))
    assert "holds a resnet20, not the wrn40_2 that --model-arch=wrn40_2 asks for" in message
    assert "pass --model-arch=resnet20 (or leave it out)" in message and "train_energy" not in message


def test_missing_epoch_lists_the_epochs_present(tmp_path, capsys):
    save_run(tmp_path, epochs=3)
    message = one_line_error(capsys, lambda: load_model("digits", "net", epoch=7, root=tmp_path))
    assert "has no epoch 7" in message and "holds epochs 1 to 3: use one of these with --epoch" in message
    assert "train_energy" not in message
    never_trained = one_line_error(capsys, lambda: load_model("digits", "other", epoch=7, root=tmp_path))
    assert "train_energy.py --name=other" in never_trained


def test_describe_checkpoints_names_every_epoch_in_numeric_order(tmp_path):
    for name in ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "epoch_10.pt", "epoch_12.pt", "last.pt", "epoch_x.pt"]:
        (tmp_path / name).touch()
    assert describe_checkpoints(tmp_path) == "epoch_1.pt to epoch_3.pt, epoch_10.pt, epoch_12.pt, last.pt"
    (tmp_path / "last.pt").unlink()
    assert describe_checkpoints(tmp_path) == "epoch_1.pt to epoch_3.pt, epoch_10.pt, epoch_12.pt"


def test_training_refuses_a_trained_folder_naming_all_it_holds(tmp_path):
    folder = tmp_path / "digits" / "net"
    folder.mkdir(parents=True)
    for name in ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "last.pt"]:
        (folder / name).touch()
    with pytest.raises(UserError, match=r"already holds a trained model \(epoch_1.pt to epoch_3.pt, last.pt\)"):
        train_original.main(["--name=net", f"--checkpoint-root={tmp_path}", "--in-dataset=digits", "--gpu=-1"])
