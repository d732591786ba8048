"""import_checkpoint.py: each source's file, built here with that repository's key names and shapes and saved as
its code saves it, imports to a model whose output on [0, 1] images equals the source's own forward on its own
preprocessing. That forward is written here in torch.nn.functional over the source's keys, in float64, from the
repositories' model code (OE/energy_ood ``CIFAR/models/wrn.py``, OpenOOD ``resnet18_32x32.py``, the origin's
``models/resnet.py`` and ``models/purned_model.py``), not with our models."""
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import import_checkpoint
import track_gradient
import track_gradient_original
import train_energy
from utils.checkpoints import load_checkpoint, load_model
from utils.gradients import gradient_path, load_gradients
from utils.runtime import run_script

OE_MEAN, OE_STD = [v / 255 for v in (125.3, 123.0, 113.9)], [v / 255 for v in (63.0, 62.1, 66.7)]
OPENOOD = {"CIFAR-10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),  # openood/preprocessors/transform.py
           "CIFAR-100": ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761])}


# ---- state dicts with each repository's names and shapes, random weights, non-trivial BatchNorm statistics ----

def conv(generator: torch.Generator, out_channels: int, in_channels: int, k: int) -> torch.Tensor:
    return torch.randn(out_channels, in_channels, k, k, generator=generator) * math.sqrt(2 / (in_channels * k * k))


def batch_norm(generator: torch.Generator, prefix: str, channels: int, counters: bool = True) -> dict:
    state = {f"{prefix}weight": 0.5 + torch.rand(channels, generator=generator),
             f"{prefix}bias": 0.2 * torch.randn(channels, generator=generator),
             f"{prefix}running_mean": 0.3 * torch.randn(channels, generator=generator),
             f"{prefix}running_var": 0.5 + 1.5 * torch.rand(channels, generator=generator)}
    if counters:
        state[f"{prefix}num_batches_tracked"] = torch.tensor(1000)
    return state


def linear(generator: torch.Generator, state: dict, name: str, classes: int, features: int) -> None:
    state[f"{name}.weight"] = torch.randn(classes, features, generator=generator) / math.sqrt(features)
    state[f"{name}.bias"] = 0.1 * torch.randn(classes, generator=generator)


def oe_wrn_state(classes: int, depth: int = 40, widen: int = 2, counters: bool = True, seed: int = 0) -> dict:
    """OE's WideResNet: blockK.layer.J.{bn1, conv1, bn2, conv2, convShortcut}, top-level bn1, fc."""
    g = torch.Generator().manual_seed(seed)
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    state = {"conv1.weight": conv(g, 16, 3, 3)}
    for b in (1, 2, 3):
        for j in range((depth - 4) // 6):
            p, cin, cout = f"block{b}.layer.{j}.", widths[b - 1] if j == 0 else widths[b], widths[b]
            state |= batch_norm(g, p + "bn1.", cin, counters)
            state[p + "conv1.weight"] = conv(g, cout, cin, 3)
            state |= batch_norm(g, p + "bn2.", cout, counters)
            state[p + "conv2.weight"] = conv(g, cout, cout, 3)
            if cin != cout:
                state[p + "convShortcut.weight"] = conv(g, cout, cin, 1)
    state |= batch_norm(g, "bn1.", widths[3], counters)
    linear(g, state, "fc", classes, widths[3])
    return state


def resnet_state(classes: int, stages: list[tuple[int, int]], classifier: str, option_b: bool, seed: int = 0
                 ) -> dict:
    """OpenOOD's ResNet18_32x32 / the origin's ResNets: conv1, bn1, layerS.J.{conv1, bn1, conv2, bn2,
    shortcut.0, shortcut.1 (option B)}, then ``classifier``. ``stages``: (channels, blocks) per stage."""
    g = torch.Generator().manual_seed(seed)
    width = stages[0][0]
    state = {"conv1.weight": conv(g, width, 3, 3)} | batch_norm(g, "bn1.", width)
    cin = width
    for s, (cout, blocks) in enumerate(stages, start=1):
        for j in range(blocks):
            p = f"layer{s}.{j}."
            state[p + "conv1.weight"] = conv(g, cout, cin, 3)
            state |= batch_norm(g, p + "bn1.", cout)
            state[p + "conv2.weight"] = conv(g, cout, cout, 3)
            state |= batch_norm(g, p + "bn2.", cout)
            if option_b and cin != cout:
                state[p + "shortcut.0.weight"] = conv(g, cout, cin, 1)
                state |= batch_norm(g, p + "shortcut.1.", cout)
            cin = cout
    linear(g, state, classifier, classes, cin)
    return state


RESNET18 = [(64, 2), (128, 2), (256, 2), (512, 2)]
RESNET20 = [(16, 3), (32, 3), (64, 3)]


def pruned(state: dict, seed: int = 1) -> dict:
    """The origin's PrunedModel state dict: the network under ``model.`` and a 0/1 ``mask_<a___b>`` per Conv2d and
    Linear weight. The weights keep values where masked, as after an optimizer step (momentum, weight decay):
    only its forward's multiplication zeroes them."""
    g = torch.Generator().manual_seed(seed)
    out = {f"model.{key}": value for key, value in state.items()}
    for key, value in state.items():
        if key.endswith("weight") and value.dim() in (2, 4):
            out["mask_" + key.replace(".", "___")] = (torch.rand(value.shape, generator=g) > 0.3).float()
    return out


# ---- each source's forward, in float64 over its own keys ----

def _bn(x: torch.Tensor, s: dict, p: str) -> torch.Tensor:
    return F.batch_norm(x, s[p + "running_mean"], s[p + "running_var"], s[p + "weight"], s[p + "bias"],
                        training=False, eps=1e-5)


def _normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return (x - torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)) / torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)


def oe_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """wrn.py's forward: pre-activation blocks whose projection shortcut takes the activated input."""
    s = {k: v.double() for k, v in state.items()}
    out = F.conv2d(_normalize(x.double(), OE_MEAN, OE_STD), s["conv1.weight"], padding=1)
    for b, first_stride in ((1, 1), (2, 2), (3, 2)):
        j = 0
        while f"block{b}.layer.{j}.conv1.weight" in s:
            p, stride = f"block{b}.layer.{j}.", first_stride if j == 0 else 1
            activated = F.relu(_bn(out, s, p + "bn1."))
            h = F.relu(_bn(F.conv2d(activated, s[p + "conv1.weight"], stride=stride, padding=1), s, p + "bn2."))
            h = F.conv2d(h, s[p + "conv2.weight"], padding=1)
            shortcut = s.get(p + "convShortcut.weight")
            out = h + (out if shortcut is None else F.conv2d(activated, shortcut, stride=stride))
            j += 1
    out = F.avg_pool2d(F.relu(_bn(out, s, "bn1.")), 8).flatten(1)
    return F.linear(out, s["fc.weight"], s["fc.bias"])


def resnet_forward(state: dict, x: torch.Tensor, classifier: str, masks: bool = False) -> torch.Tensor:
    """ResNet18_32x32's and the origin's ResNet forward; option-A shortcuts (no shortcut weights, new channels
    zero-padded planes//4 on each side) where a block changes shape without ``shortcut.0``. ``masks``: the
    PrunedModel's forward, weight × mask."""
    s = {k: v.double() for k, v in state.items()}
    if masks:
        s = {k.removeprefix("model."): v * s.get("mask_" + k.removeprefix("model.").replace(".", "___"), 1.0)
             for k, v in s.items() if not k.startswith("mask_")}
    out = F.relu(_bn(F.conv2d(x.double(), s["conv1.weight"], padding=1), s, "bn1."))
    stage = 1
    while f"layer{stage}.0.conv1.weight" in s:
        j = 0
        while f"layer{stage}.{j}.conv1.weight" in s:
            p, stride = f"layer{stage}.{j}.", 2 if stage > 1 and j == 0 else 1
            h = F.relu(_bn(F.conv2d(out, s[p + "conv1.weight"], stride=stride, padding=1), s, p + "bn1."))
            h = _bn(F.conv2d(h, s[p + "conv2.weight"], padding=1), s, p + "bn2.")
            if p + "shortcut.0.weight" in s:
                shortcut = _bn(F.conv2d(out, s[p + "shortcut.0.weight"], stride=stride), s, p + "shortcut.1.")
            elif h.shape != out.shape:
                planes = h.shape[1]
                shortcut = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            else:
                shortcut = out
            out = F.relu(h + shortcut)
            j += 1
        stage += 1
    out = F.avg_pool2d(out, out.shape[3]).flatten(1)
    return F.linear(out, s[f"{classifier}.weight"], s[f"{classifier}.bias"])


# ---- helpers ----

def images(n: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def run_import(root: Path, *args: str) -> int:
    """import_checkpoint.py's exit status (0, or 2 for a user error)."""
    try:
        run_script(lambda: import_checkpoint.main([*args, f"--checkpoint-root={root}"]))
    except SystemExit as exit_:
        return exit_.code
    return 0


def assert_same_outputs(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Our float32 model against the source's forward in float64, to float32 precision."""
    scale = theirs.abs().max().item()
    assert scale > 1e-3
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-5 * scale)


@pytest.fixture
def root(tmp_path):
    return tmp_path / "checkpoints"


# ---- tests ----

@pytest.mark.parametrize("in_dataset, data_parallel, counters", [("CIFAR-10", False, True),
                                                                   ("CIFAR-100", True, False)])
def test_oe_wrn_imports_exactly(tmp_path, root, in_dataset, data_parallel, counters):
    """OE/energy_ood's WRN-40-2, bare (as --ngpu=1 saves it) or with DataParallel's module. prefixes; with the
    BatchNorm counters, or without them and in the pre-1.6 serialisation, as PyTorch 0.4.0 wrote OE's files; OE's
    normalisation for CIFAR-100 too."""
    classes = 10 if in_dataset == "CIFAR-10" else 100
    state = oe_wrn_state(classes, counters=counters)
    path = tmp_path / "cifar_wrn_pretrained_epoch_99.pt"
    torch.save({f"module.{k}" if data_parallel else k: v for k, v in state.items()}, path,
               _use_new_zipfile_serialization=counters)

    assert run_import(root, str(path), "--source=oe", f"--in-dataset={in_dataset}", "--name=oe") == 0
    model, meta = load_model(in_dataset, "oe", root=root)
    assert (meta["arch"], meta["num_classes"], meta["loss"], meta["epoch"]) == ("wrn40_2", classes, "ce", 0)
    assert meta["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    x = images()
    with torch.no_grad():
        assert_same_outputs(model(x), oe_forward(state, x))


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
@pytest.mark.parametrize("in_dataset", ["CIFAR-10", "CIFAR-100"])
def test_openood_resnet18_imports_exactly_with_its_own_normalisation(tmp_path, root, in_dataset):
    classes = 10 if in_dataset == "CIFAR-10" else 100
    state = resnet_state(classes, RESNET18, "fc", option_b=True)
    path = tmp_path / "best.ckpt"
    torch.save(state, path)

    assert run_import(root, str(path), "--source=openood", f"--in-dataset={in_dataset}", "--name=oo") == 0
    model, meta = load_model(in_dataset, "oo", root=root)
    assert (meta["arch"], meta["loss"]) == ("resnet18", "ce")
    x = images(2)
    with torch.no_grad():
        assert_same_outputs(model(x), resnet_forward(state, _normalize(x.double(), *OPENOOD[in_dataset]), "fc"))


def test_origin_pruned_resnet20_applies_the_masks(tmp_path, root):
    """supplementary/train_original.py's PrunedModel: model. prefixes, mask_ buffers multiplied into the
    weights, no normalisation, BCE by default."""
    state = pruned(resnet_state(10, RESNET20, "linear", option_b=False))
    masked_out = [k for k in state if k.startswith("mask_") and (state[k] == 0).any()]
    assert masked_out and all(state["model." + k[5:].replace("___", ".")].ne(0).all() for k in masked_out)
    path = tmp_path / "level0_ep100.pth"
    torch.save(state, path)

    assert run_import(root, str(path), "--source=origin", "--in-dataset=CIFAR-10", "--name=bce") == 0
    model, meta = load_model("CIFAR-10", "bce", root=root)
    assert (meta["arch"], meta["loss"], meta["mean"], meta["std"]) == ("resnet20", "bce", [0, 0, 0], [1, 1, 1])
    assert meta["source"]["masks_applied"] == sum(k.startswith("mask_") for k in state)
    x = images()
    with torch.no_grad():
        assert_same_outputs(model(x), resnet_forward(state, x, "linear", masks=True))


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_origin_resnet18_and_overrides(tmp_path, root):
    """The origin's train.py ResNet-18 (``linear``, cross-entropy), with --mean/--std and --loss given."""
    state = resnet_state(10, RESNET18, "linear", option_b=True, seed=3)
    path = tmp_path / "epoch_100.pth"
    torch.save(state, path)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    assert run_import(root, str(path), "--source=origin", "--name=r18", "--mean", *map(str, mean),
                      "--std", *map(str, std), "--loss=energy") == 0
    model, meta = load_model("CIFAR-10", "r18", root=root)
    assert (meta["arch"], meta["loss"]) == ("resnet18", "energy")
    x = images(2)
    with torch.no_grad():
        assert_same_outputs(model(x), resnet_forward(state, _normalize(x.double(), mean, std), "linear"))


def test_a_file_of_another_architecture_names_the_unmatched_keys(tmp_path, root, capsys):
    """An origin ResNet-32 given as OpenOOD's ResNet-18, and a WRN-16-2 given as OE's WRN-40-2."""
    resnet32 = tmp_path / "resnet32.pth"
    torch.save(resnet_state(10, [(16, 5), (32, 5), (64, 5)], "fc", option_b=False), resnet32)
    assert run_import(root, str(resnet32), "--source=openood", "--name=x") == 2
    error = capsys.readouterr().err
    assert "does not map onto resnet18" in error and "modules in the file only: layer1.2.conv1," in error
    assert "missing from the file: layer2.0.shortcut.0," in error
    assert "shapes differ: conv1.weight (16, 3, 3, 3) (expected (64, 3, 3, 3))" in error

    wrn16 = tmp_path / "wrn16.pt"
    torch.save(oe_wrn_state(10, depth=16), wrn16)
    assert run_import(root, str(wrn16), "--source=oe", "--name=x") == 2
    error = capsys.readouterr().err
    assert "does not map onto wrn40_2" in error and "missing from the file: block1.2.bn1," in error
    assert not root.exists()


def test_wrong_classes_corrupt_and_foreign_files_are_one_paragraph_errors(tmp_path, root, capsys):
    good = tmp_path / "good.pt"
    torch.save(oe_wrn_state(100, depth=16), good)
    assert run_import(root, str(good), "--source=oe", "--name=x", "--in-dataset=CIFAR-10") == 2
    assert "classifies 100 classes, but CIFAR-10 has 10" in capsys.readouterr().err

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    for path in (truncated, text):
        assert run_import(root, str(path), "--source=oe", "--name=x") == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: {path} is not a readable PyTorch checkpoint") and "Traceback" not in error

    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    assert run_import(root, str(listing), "--source=oe", "--name=x") == 2
    assert "not a dict of tensors" in capsys.readouterr().err
    assert run_import(root, str(tmp_path / "missing.pt"), "--source=oe", "--name=x") == 2
    assert "not found" in capsys.readouterr().err

    resnet18 = tmp_path / "best.ckpt"
    torch.save(resnet_state(10, RESNET18, "fc", option_b=True), resnet18)
    assert run_import(root, str(resnet18), "--source=openood", "--name=x", "--in-dataset=digits") == 2
    assert "normalisation constants for CIFAR-10, CIFAR-100 only, not digits" in capsys.readouterr().err
    assert run_import(root, str(resnet18), "--source=openood", "--name=x", "--mean", "0", "0", "0") == 2
    assert "pass --mean and --std together" in capsys.readouterr().err
    ours = tmp_path / "last.pt"
    torch.save({"state_dict": {}, "meta": {}}, ours)
    assert run_import(root, str(ours), "--source=oe", "--name=x") == 2
    assert "already a checkpoint of these scripts" in capsys.readouterr().err
    assert not root.exists()


def test_refuses_to_overwrite_a_model(tmp_path, root, capsys):
    path = tmp_path / "r20.pth"
    torch.save(resnet_state(10, RESNET20, "linear", option_b=False), path)
    assert run_import(root, str(path), "--source=origin", "--name=r20") == 0
    written = {p.name: p.stat().st_mtime_ns for p in (root / "CIFAR-10" / "r20").iterdir()}
    assert set(written) == {"last.pt", "epoch_0.pt", "meta.json"}
    assert json.loads((root / "CIFAR-10" / "r20" / "meta.json").read_text())["source"]["kind"] == "origin"

    assert run_import(root, str(path), "--source=origin", "--name=r20") == 2
    assert "already holds a model (epoch_0.pt, last.pt)" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (root / "CIFAR-10" / "r20").iterdir()} == written


@pytest.mark.slow
def test_an_imported_model_is_tracked_and_fine_tunable(tmp_path, root, capsys):
    """track_gradient.py runs on an imported model unchanged (a hand-converted file used to die with
    KeyError: 'name'), and train_energy.py's --pretrained reads the imported last.pt."""
    path = tmp_path / "level0_ep100.pth"
    torch.save(pruned(resnet_state(10, RESNET20, "linear", option_b=False)), path)
    assert run_import(root, str(path), "--source=origin", "--in-dataset=digits", "--name=imp") == 0
    gradients, data = tmp_path / "gradients", tmp_path / "datasets"
    run_script(lambda: track_gradient.main(["--name=imp", "--in-dataset=digits", "--dataset=gaussian", "--score=min",
                                            "--limit=4", "--gpu=-1", "--workers=0", f"--checkpoint-root={root}",
                                            f"--gradient-root={gradients}", f"--data-root={data}"]))
    assert "trained with one sigmoid per class" in capsys.readouterr().err  # the loss recorded: bce
    for dataset in ("digits", "gaussian"):
        record = load_gradients(gradient_path("digits", "imp", "min", dataset, gradients))
        assert record["num_samples"] == 4 and record["model"]["name"] == "imp" and record["model"]["epoch"] == 0
        assert len(record["layers"]) == 20

    checkpoint = load_checkpoint(root / "digits" / "imp" / "last.pt")
    assert checkpoint["meta"]["arch"] == "resnet20" and checkpoint["meta"]["in_dataset"] == "digits"


@pytest.mark.slow
def test_train_energy_fine_tunes_an_imported_model(tmp_path, root, capsys):
    """energy_ood's recipe from a released model: train_energy.py --pretrained=<imported last.pt> with its margins.
    The imported cross-entropy model also draws track_gradient_original.py's mismatch warning."""
    path = tmp_path / "epoch_100.pth"
    torch.save(resnet_state(10, [(16, 5), (32, 5), (64, 5)], "linear", option_b=False), path)  # ResNet-32
    assert run_import(root, str(path), "--source=origin", "--in-dataset=digits", "--name=imp", "--loss=ce") == 0
    run_script(lambda: track_gradient_original.main([
        "--name=imp", "--in-dataset=digits", "--dataset=gaussian", "--limit=2", "--gpu=-1", "--workers=0",
        f"--checkpoint-root={root}", f"--gradient-root={tmp_path / 'gradients'}", f"--data-root={tmp_path}"]))
    assert "trained with cross-entropy (loss 'ce')" in capsys.readouterr().err
    run_script(lambda: train_energy.main([
        "--name=ft", f"--pretrained={root / 'digits' / 'imp' / 'last.pt'}", "--in-dataset=digits",
        "--aux-dataset=sample_photos", "--m_in=-23", "--m_out=-5", "--epochs=1",
        "--limit=16", "--batch-size=16", "--oe-batch-size=16", "--gpu=-1", "--workers=0",
        f"--checkpoint-root={root}", f"--data-root={tmp_path / 'datasets'}"]))
    meta = json.loads((root / "digits" / "ft" / "meta.json").read_text())
    # the architecture comes from the file (no --model-arch given)
    assert (meta["arch"], meta["loss"], meta["epoch"], meta["args"]["lr"]) == ("resnet32", "energy", 1, 0.001)
