"""ImageNet-1K's data sets in their real layouts (small JPEGs of several sizes), read through the model's input
transform and class order, and GradNorm tracked end to end on both imported models, per image and in file order,
against the official code written here: gradnorm_ood's ``iterate_data_gradnorm`` (BiT, its 480-px
preprocessing, a batch of one) and OpenOOD v1.5's ``GradNormPostprocessor`` (ResNet-50, 224 px)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import compute_gradient_metrics
import track_gradient
from tests.test_imagenet_import import CLASS_LIST, bit_state, needs_class_list, run_import, save_bit, torchvision_resnet
from utils.checkpoints import load_model
from utils.data import dataset_available, get_dataset, ood_group, ood_test_set
from utils.data.transforms import BIT, InputTransform
from utils.errors import DataNotFoundError, UserError
from utils.gradients import gradient_path, load_gradients
from utils.runtime import run_script

WNIDS = ("n01440764", "n01443537", "n01751748")
SIZES = ((64, 48), (50, 80), (120, 90), (33, 33))


def write_jpeg(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


def write_imagenet(root: Path, split: str = "val", per_class: int = 2) -> None:
    for c, wnid in enumerate(WNIDS):
        for i in range(per_class):
            number = 1 + c * per_class + i
            write_jpeg(root / "imagenet" / split / wnid / f"ILSVRC2012_{split}_{number:08d}.JPEG",
                       SIZES[number % len(SIZES)], number)


def write_ood(root: Path, name: str, count: int = 3) -> None:
    for i in range(count):  # at any depth, as MOS's archives unpack (e.g. iNaturalist/images/<file>.jpg)
        folder = root / "ood_datasets" / name / ("images" if i % 2 else "images/deeper")
        write_jpeg(folder / f"{name}_{i}.jpg", SIZES[i % len(SIZES)], 100 + i)


def test_validation_images_in_imagefolder_order_with_the_models_labels(tmp_path):
    write_imagenet(tmp_path)
    small = InputTransform((40, 40), None)
    data = get_dataset("ImageNet", tmp_path, transform=small)
    official = torchvision.datasets.ImageFolder(tmp_path / "imagenet" / "val")  # GradNorm's reader
    assert [str(p) for p in data.paths] == [path for path, _ in official.samples]
    assert [data[i][1] for i in range(len(data))] == [label for _, label in official.samples]
    assert all(data[i][0].shape == (3, 40, 40) for i in range(len(data)))
    order = [f"n{i:08d}" for i in range(997)] + list(reversed(WNIDS))
    relabelled = get_dataset("ImageNet", tmp_path, transform=small, class_order=order)
    assert [relabelled[i][1] for i in range(len(relabelled))] == [999, 999, 998, 998, 997, 997]
    with pytest.raises(DataNotFoundError, match="n01440764"):
        get_dataset("ImageNet", tmp_path, class_order=order[:998])


def test_ood_sets_at_any_depth_and_the_far_group(tmp_path):
    assert ood_group("far", "ImageNet") == ("iNaturalist", "SUN", "Places", "dtd")
    assert "iNaturalist" not in ood_group("far", "CIFAR-10")
    for name in ("iNaturalist", "SUN", "Places"):
        assert not dataset_available(name, tmp_path)
        write_ood(tmp_path, name)
        data = ood_test_set(name, "ImageNet", tmp_path, transform=BIT)
        assert len(data) == 3 and data[0][0].shape == (3, 480, 480) and data[0][1] == -1
        official = torchvision.datasets.ImageFolder(tmp_path / "ood_datasets" / name)  # GradNorm's reader
        assert [str(p) for p in data.paths] == [path for path, _ in official.samples]
    for i in range(2):
        write_jpeg(tmp_path / "ood_datasets" / "dtd" / "images" / "banded" / f"banded_{i}.jpg", SIZES[i], i)
    assert ood_test_set("dtd", "ImageNet", tmp_path, transform=BIT)[0][0].shape == (3, 480, 480)
    assert ood_test_set("dtd", "CIFAR-10", tmp_path)[0][0].shape == (3, 32, 32)  # CIFAR's default unchanged


def test_missing_sets_and_mismatched_transforms_are_one_paragraph(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        get_dataset("ImageNet", tmp_path, train=True, augment=False)
    assert "imagenet/train" in str(error.value) and "--dataset train" in str(error.value)
    assert "image-net.org" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DataNotFoundError, match="large_scale_ood"):
        get_dataset("SUN", tmp_path)
    with pytest.raises(UserError, match="32x32"):
        get_dataset("gaussian", tmp_path, transform=BIT)
    with pytest.raises(UserError, match="not trained here"):
        get_dataset("ImageNet", tmp_path, train=True)


def track(roots: Path, *args: str) -> None:
    run_script(lambda: track_gradient.main([*args, "--in-dataset=ImageNet", "--gpu=-1", "--workers=0",
                                            f"--checkpoint-root={roots / 'checkpoints'}",
                                            f"--gradient-root={roots / 'gradients'}",
                                            f"--data-root={roots / 'datasets'}"]))


def load(roots: Path, name: str, folder: str, dataset: str) -> dict:
    score, last = folder.removesuffix("-last"), folder.endswith("-last")
    return load_gradients(gradient_path("ImageNet", name, score, dataset, roots / "gradients", last))


@pytest.mark.slow
@needs_class_list
def test_bit_gradnorm_equals_gradnorm_oods_batch_of_one_loop(tmp_path):
    """gradnorm_ood's ``iterate_data_gradnorm``: ImageFolder over the OOD folder in its order, Resize((480, 480)),
    ToTensor, Normalize(0.5, 0.5), a batch of one; loss = mean over the batch of Σ_k −log softmax(f(x)/T)_k with
    T = 1; backward; Σ |head.conv.weight.grad|. Our files of --layers last and of every layer (its head), from
    batches of several images, equal it image by image, in file order. A reduced BiT (one unit a block, width 32)
    keeps the 480-px images fast."""
    save_bit(tmp_path / "bit.pth.tar", bit_state((1, 1, 1, 1), 32))
    assert run_import(tmp_path / "checkpoints", str(tmp_path / "bit.pth.tar"), "--source=bit", "--name=bit",
                      f"--class-list={CLASS_LIST}") == 0
    data_root = tmp_path / "datasets"
    write_imagenet(data_root, per_class=1)
    write_ood(data_root, "iNaturalist")
    track(tmp_path, "--name=bit", "--dataset=iNaturalist", "--score=gradnorm", "--layers=last", "--batch-size=2")
    track(tmp_path, "--name=bit", "--dataset=iNaturalist", "--score=gradnorm", "--batch-size=2")
    model, meta = load_model("ImageNet", "bit", root=tmp_path / "checkpoints")
    official_set = torchvision.datasets.ImageFolder(
        data_root / "ood_datasets" / "iNaturalist",
        torchvision.transforms.Compose([torchvision.transforms.Resize((480, 480)), torchvision.transforms.ToTensor(),
                                        torchvision.transforms.Normalize((0.5,) * 3, (0.5,) * 3)]))
    network = ResNetV2Forward(model)
    official = []
    for x, _ in torch.utils.data.DataLoader(official_set, batch_size=1, shuffle=False):
        model.zero_grad()
        outputs = network(x.requires_grad_())
        targets = torch.ones((x.shape[0], outputs.shape[1]))
        loss = torch.mean(torch.sum(-targets * F.log_softmax(outputs / 1.0, dim=-1), dim=-1))
        loss.backward()
        official.append(model.head.conv.weight.grad.abs().sum().item())
    last = load(tmp_path, "bit", "gradnorm-last", "iNaturalist")
    full = load(tmp_path, "bit", "gradnorm", "iNaturalist")
    np.testing.assert_allclose(last["total"], official, rtol=1e-4)
    np.testing.assert_allclose(full["layers"]["head.conv.weight"], official, rtol=1e-4)
    in_record = load(tmp_path, "bit", "gradnorm-last", "ImageNet")
    assert in_record["label"].tolist() == [meta["class_order"].index(wnid) for wnid in WNIDS]


class ResNetV2Forward(torch.nn.Module):
    """resnetv2.py's ``forward`` on normalised images: root, body, before_head, head, ``[..., 0, 0]``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.head(m.before_head(m.body(m.root(x))))[..., 0, 0]


@pytest.mark.slow
def test_resnet50_gradnorm_equals_openoods_postprocessor(tmp_path):
    """OpenOOD v1.5's ``GradNormPostprocessor``: the penultimate features of its ResNet50 (torchvision's, on its
    test transform Resize(256) + CenterCrop(224) + Normalize), then per feature vector a fresh Linear with the fc's
    weight and bias, loss = mean Σ_k −log softmax(fc(h))_k, backward, Σ |fc.weight.grad|. Ours (--layers last, and
    the every-layer file's fc) equal it per image in file order."""
    source = torchvision_resnet()
    torch.save(source.state_dict(), tmp_path / "resnet50.pth")
    assert run_import(tmp_path / "checkpoints", str(tmp_path / "resnet50.pth"), "--source=torchvision",
                      "--name=rn") == 0
    data_root = tmp_path / "datasets"
    write_imagenet(data_root, per_class=1)
    for i in range(3):
        write_jpeg(data_root / "ood_datasets" / "dtd" / "images" / "banded" / f"banded_{i}.jpg",
                   (300 + 40 * i, 260), 50 + i)
    track(tmp_path, "--name=rn", "--dataset=dtd", "--score=gradnorm", "--layers=last", "--batch-size=3")
    track(tmp_path, "--name=rn", "--dataset=dtd", "--score=gradnorm", "--batch-size=3")
    preprocess = torchvision.transforms.Compose([
        torchvision.transforms.Resize(256), torchvision.transforms.CenterCrop(224), torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    paths = sorted((data_root / "ood_datasets" / "dtd" / "images").rglob("*.jpg"))
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        h = source.avgpool(source.layer4(source.layer3(source.layer2(source.layer1(
            source.maxpool(source.relu(source.bn1(source.conv1(x))))))))).flatten(1)
    w, b = source.fc.weight.detach().numpy(), source.fc.bias.detach().numpy()
    fc = torch.nn.Linear(*w.shape[::-1])
    fc.weight.data[...], fc.bias.data[...] = torch.from_numpy(w), torch.from_numpy(b)
    official = []
    for feature in h:
        fc.zero_grad()
        targets = torch.ones((1, w.shape[0]))
        loss = torch.mean(torch.sum(-targets * F.log_softmax(fc(feature[None]), dim=-1), dim=-1))
        loss.backward()
        official.append(fc.weight.grad.abs().sum().item())
    np.testing.assert_allclose(load(tmp_path, "rn", "gradnorm-last", "dtd")["total"], official, rtol=1e-4)
    np.testing.assert_allclose(load(tmp_path, "rn", "gradnorm", "dtd")["layers"]["fc.weight"], official, rtol=1e-4)
    run_script(lambda: compute_gradient_metrics.main([
        "--name=rn", "--in-dataset=ImageNet", "--saved_form=norm_single", "--score=gradnorm", "--layers=last",
        f"--gradient-root={tmp_path / 'gradients'}", f"--results-root={tmp_path / 'results'}"]))
    assert (tmp_path / "results" / "ImageNet" / "rn" / "norm_single-gradnorm-last" / "dtd.json").is_file()


@pytest.mark.slow  # over a second here: in the full suite, out of the fast loop
def test_tracking_refuses_k_rows_and_a_missing_training_split_before_any_work(tmp_path, capsys):
    torch.save(torchvision_resnet().state_dict(), tmp_path / "resnet50.pth")
    assert run_import(tmp_path / "checkpoints", str(tmp_path / "resnet50.pth"), "--source=torchvision",
                      "--name=rn") == 0
    write_imagenet(tmp_path / "datasets", per_class=1)
    for args, expected in ((("--dataset=dtd", "--score=min"), "1,000 gradients per image"),
                           (("--dataset=train", "--score=gradnorm"), "imagenet/train not found")):
        with pytest.raises(SystemExit) as exit_:
            track(tmp_path, "--name=rn", *args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "gradients").exists()


def test_activation_detectors_outside_their_layer_choice_are_one_paragraph(tmp_path, capsys):
    save_bit(tmp_path / "bit.pth.tar", bit_state((1, 1, 1, 1), 32))
    list_file = tmp_path / "val_list.txt"  # a class list in MOS's format, 1,000 wnids
    list_file.write_text("".join(f"val/n{i:08d}/x_{i}.JPEG {i}\n" for i in range(1000)))
    assert run_import(tmp_path / "checkpoints", str(tmp_path / "bit.pth.tar"), "--source=bit", "--name=bit",
                      f"--class-list={list_file}") == 0
    for score in ("gaia_a", "gaia_z"):
        with pytest.raises(SystemExit):
            track(tmp_path, "--name=bit", "--dataset=dtd", f"--score={score}")
        err = capsys.readouterr().err
        assert f"--score={score} does not apply to bit_r50x1" in err and err.count("\n") == 1, err
