"""import_checkpoint.py --source=torchvision|bit: each source's file, built with random weights under that
repository's key names and saved as it saves it, imports to a model whose output on [0, 1] images equals the
source's own forward on its own preprocessing: torchvision's own ResNet with its own ``IMAGENET1K_V1.transforms()``;
for BiT an independent float64 functional forward written here from ``resnetv2.py``'s semantics."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.models.resnet import Bottleneck, ResNet

import import_checkpoint
from utils.checkpoints import load_model
from utils.data.transforms import BIT, IMAGENET_V1, IMAGENET_V2, InputTransform
from utils.released import torchvision_weights
from utils.runtime import run_script

CLASS_LIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet2012_val_list.txt"
if not CLASS_LIST.is_file():
    CLASS_LIST = Path("/work/shared/data/imagenet2012_val_list.txt")
needs_class_list = pytest.mark.skipif(not CLASS_LIST.is_file(), reason="MOS's imagenet2012_val_list.txt is absent")


def run_import(root: Path, *args: str) -> int:
    try:
        run_script(lambda: import_checkpoint.main([*args, "--in-dataset=ImageNet", f"--checkpoint-root={root}"]))
    except SystemExit as exit_:
        return exit_.code
    return 0


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def torchvision_resnet(seed: int = 0) -> ResNet:
    """torchvision's ResNet with one bottleneck a stage (ResNet-50's blocks, reduced), non-trivial BatchNorm."""
    torch.manual_seed(seed)
    model = ResNet(Bottleneck, [1, 1, 1, 1])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_torchvision_file_imports_exactly_with_its_own_transform(tmp_path):
    source = torchvision_resnet()
    torch.save(source.state_dict(), tmp_path / "resnet50-random.pth")
    root = tmp_path / "checkpoints"
    assert run_import(root, str(tmp_path / "resnet50-random.pth"), "--source=torchvision", "--name=rn") == 0
    model, meta = load_model("ImageNet", "rn", root=root)
    assert meta["arch"] == "resnet50" and meta["arch_kwargs"] == {"layers": [1, 1, 1, 1]}
    assert InputTransform.from_meta(meta) == IMAGENET_V1 and meta["source"]["weights"] == "IMAGENET1K_V1"
    assert "class_order" not in meta  # sorted wnids, ImageFolder's order
    theirs = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    for size in ((300, 400), (256, 256), (500, 333)):
        image = photo(size)
        ours = model(IMAGENET_V1.compose()(image)[None])
        reference = source(theirs(image)[None])
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_torchvision_file_is_found_in_the_hub_cache_and_v2_is_chosen(tmp_path, monkeypatch):
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision_resnet().state_dict(), cache / "resnet50-cached.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.chdir(tmp_path)
    assert run_import(tmp_path / "ck", "resnet50-cached.pth", "--source=torchvision", "--name=v2",
                      "--weights=IMAGENET1K_V2") == 0
    meta = json.loads((tmp_path / "ck" / "ImageNet" / "v2" / "meta.json").read_text())
    assert InputTransform.from_meta(meta) == IMAGENET_V2 and meta["source"]["weights"] == "IMAGENET1K_V2"
    assert torchvision_weights("11ad3fa6" + "0" * 56, None) == "IMAGENET1K_V2"
    assert torchvision_weights("0676ba61" + "0" * 56, None) == "IMAGENET1K_V1"
    assert torchvision_weights("deadbeef" + "0" * 56, None) == "IMAGENET1K_V1"


def test_a_missing_torchvision_file_is_one_paragraph(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nothing"))
    monkeypatch.chdir(tmp_path)
    assert run_import(tmp_path / "ck", "resnet50-0676ba61.pth", "--source=torchvision", "--name=x") == 2
    assert "not found: resnet50-0676ba61.pth" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


# ---- BiT: resnetv2.py's names, {'model': state dict} with module. prefixes, as GradNorm's release ----

def std_conv(g: torch.Generator, cout: int, cin: int, k: int) -> torch.Tensor:
    return 0.3 + torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64) * math.sqrt(2 / (cin * k * k))


def group_norm(g: torch.Generator, state: dict, prefix: str, channels: int) -> None:
    state[prefix + "weight"] = 0.5 + torch.rand(channels, generator=g, dtype=torch.float64)
    state[prefix + "bias"] = 0.2 * torch.randn(channels, generator=g, dtype=torch.float64)


def bit_state(units: tuple[int, ...], width: int, classes: int = 1000, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {"root.conv.weight": std_conv(g, width, 3, 7)}
    cin = width
    for b, count in enumerate(units, start=1):
        cmid = width * 2 ** (b - 1)
        cout = 4 * cmid
        for u in range(1, count + 1):
            p = f"body.block{b}.unit{u:02d}."
            unit_in = cin if u == 1 else cout
            group_norm(g, state, p + "gn1.", unit_in)
            state[p + "conv1.weight"] = std_conv(g, cmid, unit_in, 1)
            group_norm(g, state, p + "gn2.", cmid)
            state[p + "conv2.weight"] = std_conv(g, cmid, cmid, 3)
            group_norm(g, state, p + "gn3.", cmid)
            state[p + "conv3.weight"] = std_conv(g, cout, cmid, 1)
            if u == 1:
                state[p + "downsample.weight"] = std_conv(g, cout, unit_in, 1)
        cin = cout
    group_norm(g, state, "before_head.gn.", cin)
    state["head.conv.weight"] = torch.randn(classes, cin, 1, 1, generator=g, dtype=torch.float64) / math.sqrt(cin)
    state["head.conv.bias"] = 0.1 * torch.randn(classes, generator=g, dtype=torch.float64)
    return state


def bit_forward(s: dict, x: torch.Tensor) -> torch.Tensor:
    """resnetv2.py's forward on images already normalised with mean = std = 0.5: weight standardisation over each
    output channel's fan-in (biased variance, ε = 1e-10 inside the root), pre-activation units with the stride on the
    3x3 convolution, GroupNorm(32), the root's zero pad by one then 3x3/2 max-pool, the 1x1-conv head."""
    def standardised(w):
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + 1e-10)

    def pre(out, prefix):
        return F.relu(F.group_norm(out, 32, s[prefix + "weight"], s[prefix + "bias"], eps=1e-5))

    out = F.conv2d(x, standardised(s["root.conv.weight"]), stride=2, padding=3)
    out = F.max_pool2d(F.pad(out, (1, 1, 1, 1)), 3, 2)
    blocks = sorted({int(k.split(".")[1].removeprefix("block")) for k in s if k.startswith("body.")})
    for b in blocks:
        units = sorted({k.split(".")[2] for k in s if k.startswith(f"body.block{b}.")})
        for u in units:
            p = f"body.block{b}.{u}."
            stride = 2 if (b > 1 and u == "unit01") else 1
            h = pre(out, p + "gn1.")
            residual = F.conv2d(h, standardised(s[p + "downsample.weight"]), stride=stride) \
                if p + "downsample.weight" in s else out
            h = F.conv2d(h, standardised(s[p + "conv1.weight"]))
            h = F.conv2d(pre(h, p + "gn2."), standardised(s[p + "conv2.weight"]), stride=stride, padding=1)
            h = F.conv2d(pre(h, p + "gn3."), standardised(s[p + "conv3.weight"]))
            out = h + residual
    out = pre(out, "before_head.gn.").mean((2, 3), keepdim=True)
    return F.conv2d(out, s["head.conv.weight"], s["head.conv.bias"])[:, :, 0, 0]


def save_bit(path: Path, state: dict) -> None:
    torch.save({"step": 1000, "model": {f"module.{k}": v.float() for k, v in state.items()}}, path)


@needs_class_list
def test_bit_file_imports_exactly_with_mos_class_order(tmp_path):
    state = bit_state((1, 1, 1, 1), 32)
    save_bit(tmp_path / "BiT-S-tiny.pth.tar", state)
    root = tmp_path / "checkpoints"
    assert run_import(root, str(tmp_path / "BiT-S-tiny.pth.tar"), "--source=bit", "--name=bit",
                      f"--class-list={CLASS_LIST}") == 0
    model, meta = load_model("ImageNet", "bit", root=root)
    assert meta["arch"] == "bit_r50x1" and meta["arch_kwargs"] == {"block_units": [1, 1, 1, 1], "width": 32}
    assert InputTransform.from_meta(meta) == BIT and meta["mean"] == meta["std"] == [0.5, 0.5, 0.5]
    order = meta["class_order"]
    assert len(order) == 1000 and order[448] == "n01440764" and order[489] == "n01751748"
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    reference = bit_forward({k: v.float().double() for k, v in state.items()}, (x.double() - 0.5) / 0.5)
    torch.testing.assert_close(model(x).double(), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_bit_architecture_is_read_from_keys_and_shapes():
    from utils.released import _infer_bit

    def keys(units: tuple[int, ...], width: int) -> dict:
        state = {f"body.block{b}.unit{u:02d}.conv1.weight": torch.empty(0)
                 for b, count in enumerate(units, 1) for u in range(1, count + 1)}
        return {"root.conv.weight": torch.empty(width, 3, 7, 7), **state}

    assert _infer_bit(keys((3, 4, 23, 3), 64)) == ("bit_r101x1", {})
    assert _infer_bit(keys((3, 4, 6, 3), 64)) == ("bit_r50x1", {})
    assert _infer_bit(keys((1, 2, 1, 1), 32)) == ("bit_r50x1", {"block_units": [1, 2, 1, 1], "width": 32})


def test_bit_without_its_class_list_is_one_paragraph(tmp_path, capsys):
    save_bit(tmp_path / "bit.pth.tar", bit_state((1, 1, 1, 1), 32))
    assert run_import(tmp_path / "ck", str(tmp_path / "bit.pth.tar"), "--source=bit", "--name=b",
                      f"--data-root={tmp_path}") == 2
    err = capsys.readouterr().err
    assert "imagenet2012_val_list.txt" in err and "gradnorm_ood" in err and "--class-list" in err
    assert not (tmp_path / "ck").exists()
