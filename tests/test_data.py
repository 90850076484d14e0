"""The data: CIFAR-100 and image folders in their real on-disk formats, the built-in task, the chance
level, and the sampler that deals each epoch to the processes (with DeiT's repeated augmentation)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import folder_run, write_cifar100, write_image_folder

import train
from training import flags
from training.data import Augmented, EpochSampler, PlusSigns, build_transforms, chance


def test_cifar100_loads_from_the_real_pickle_layout(tmp_path, monkeypatch):
    """torchvision's CIFAR100 on a tiny set in its real on-disk format (the md5 check aside: a tiny file
    cannot have the real archive's)."""
    write_cifar100(tmp_path / "data")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    flags = [
        "--data",
        "cifar100",
        "--data-path",
        str(tmp_path / "data"),
        "--output-dir",
        str(tmp_path / "run"),
    ]
    train.main(
        [
            *flags,
            "--epochs",
            "1",
            "--dim",
            "32",
            "--depth",
            "1",
            "--heads",
            "2",
            "--batch-size",
            "16",
            "--workers",
            "0",
        ]
    )
    ckpt = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    assert ckpt["data"] == dict(train=48, val=16, classes=[f"class{i}" for i in range(100)])
    assert ckpt["model_config"]["num_classes"] == 100 and ckpt["args"]["recipe"] == "cifar"


def test_an_image_folder_loads_its_jpegs_and_counts_its_classes(tmp_path):
    write_image_folder(tmp_path / "data")
    train.main(folder_run(tmp_path / "data", "--epochs", "1", "--output-dir", str(tmp_path / "run")))
    ckpt = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    assert (
        ckpt["data"] == dict(train=24, val=12, classes=["cat", "dog", "emu"])
        and ckpt["args"]["recipe"] == "deit"
    )


def test_plus_signs_label_the_cell_of_the_plus_centre():
    """The built-in task: the label is the 4 x 4 grid cell of the plus sign's centre, found here from the
    pixels alone (a bright plus, not the bright square)."""
    data = PlusSigns(400, img_size=32, seed=3)
    plus = torch.tensor([[0.0, 1, 0], [1, 1, 1], [0, 1, 0]])
    for i in range(0, 400, 7):
        img, label = data[i]
        bright = (img[0] == 255).float()[None, None]
        pluses = F.conv2d(bright, plus[None, None])[0, 0]
        squares = F.conv2d(bright, torch.ones(1, 1, 3, 3))[0, 0]
        ys, xs = torch.nonzero((pluses == 5) & (squares < 9), as_tuple=True)
        assert any(
            (y + 1) * 4 // 32 * 4 + (x + 1) * 4 // 32 == label for y, x in zip(ys.tolist(), xs.tolist())
        )


def test_chance_is_the_training_sets_commonest_class_on_the_validation_set():
    """What a model that learnt only the label frequencies scores; the validation set's own commonest class
    would be an oracle. At 32 px plus-sign centres are uniform over 1..30, so cells hold 7, 8, 8 and 7."""
    train_set, val_set = SimpleNamespace(targets=[0, 0, 1]), SimpleNamespace(targets=[1, 1, 1, 0])
    assert chance(train_set, val_set) == 25.0
    big = PlusSigns(20000, img_size=32, seed=4)
    assert chance(big, big) == pytest.approx(100 * 8 * 8 / 900, abs=0.5)


@pytest.mark.parametrize("n, world", [(64, 1), (67, 3), (10, 4)])
def test_one_copy_per_image_is_torchs_distributed_sampler(n, world):
    """repeats = 1: the order torch's DistributedSampler (shuffle, drop_last) gives, in every process and
    epoch."""
    for rank in range(world):
        ours = EpochSampler(n, world, rank, seed=5)
        theirs = torch.utils.data.DistributedSampler(
            range(n), world, rank, shuffle=True, seed=5, drop_last=True
        )
        for epoch in (0, 3):
            ours.set_epoch(epoch), theirs.set_epoch(epoch)
            assert [k[0] for k in ours] == list(theirs) and {k[1:] for k in ours} == {(epoch, 0)}


def test_repeated_augmentation_puts_an_images_copies_side_by_side_each_augmented_on_its_own():
    """DeiT's RASampler: at 4 processes with 16 images each a step, nearly every image's 3 copies are in
    one global step (on one process, in one batch); an epoch is len(dataset) samples, a third of the images
    three times; and each copy has its own augmentation, the same every time it is drawn."""

    def share_in_one_step(world, per_rank):
        steps = {}
        for rank in range(world):
            for position, (index, _, _) in enumerate(EpochSampler(960, world, rank, seed=0, repeats=3)):
                steps.setdefault(index, set()).add(position // per_rank)
        return sum(len(s) == 1 for s in steps.values()) / len(steps), len(steps)

    (four, _), (one, images) = share_in_one_step(4, 16), share_in_one_step(1, 64)
    assert four > 0.95 and one > 0.95 and images == 320
    keys = [k for rank in range(3) for k in EpochSampler(30, 3, rank, seed=0, repeats=3)]
    assert sorted(k[0] for k in keys) == sorted(k[0] for k in keys[::3] for _ in range(3))
    assert {frozenset(c for i, _, c in keys if i == index) for index, _, _ in keys} == {frozenset({0, 1, 2})}
    args = flags.parse(["--recipe", "cifar"])[0]
    augmented = Augmented(PlusSigns(30, 32, seed=0), build_transforms(args, 32)[0], seed=0)
    copies = [augmented[(5, 0, c)][0] for c in range(3)]
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])
    assert torch.equal(augmented[(5, 0, 1)][0], copies[1])
    assert flags.parse(["--data", "imagenet"])[0].repeated_aug == 3  # on one process too, as DeiT's main.py
