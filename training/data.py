"""The data of a run: the data sets (CIFAR-100, an image folder, the built-in task), per-image augmentation
that does not depend on the number of processes or loader workers, the sampler that deals each epoch to
the processes, and the loaders."""

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.transforms import v2

from training import UserError, device_data
from training.randaugment import RandAugment
from training.recipes import NORMALISATION


def seed_of(*keys: int) -> int:
    """One seed from several integers, the same in every process (Python salts the hash of str, not int)."""
    return hash(keys) % 2**63


class PlusSigns(Dataset):
    """The built-in task of --data synthetic: noise with a bright plus sign and a bright square (3 x 3
    pixels each) anywhere; the label is the cell of a 4 x 4 grid that holds the plus sign's centre, so only
    position tells it. Each image is made from its index: nothing to download, the same every time."""

    def __init__(self, size: int, img_size: int, seed: int, cells: int = 4):
        if img_size < cells:
            raise ValueError(f"--data synthetic needs --img-size {cells} or more, got {img_size}")
        g = torch.Generator().manual_seed(seed)
        self.corners = torch.randint(0, img_size - 2, (size, 2, 2), generator=g)  # (image, plus/square, y/x)
        centre = self.corners[:, 0] + 1
        self.targets = (centre[:, 0] * cells // img_size * cells + centre[:, 1] * cells // img_size).tolist()
        self.img_size, self.seed, self.classes = img_size, seed, list(range(cells * cells))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        img = torch.randint(0, 128, (3, self.img_size, self.img_size), dtype=torch.uint8, generator=g)
        (py, px), (sy, sx) = self.corners[i].tolist()
        img[:, sy : sy + 3, sx : sx + 3] = 255
        img[:, py + 1, px : px + 3] = img[:, py : py + 3, px + 1] = 255
        return img, self.targets[i]


def chance(train_set, val_set) -> float:
    """Validation top-1 of always answering the training set's commonest class, in percent: what a model
    that learnt the label frequencies alone scores (the validation set's own commonest would be an oracle)."""
    commonest = torch.bincount(torch.tensor(train_set.targets)).argmax()
    return 100 * (torch.tensor(val_set.targets) == commonest).float().mean().item()


class DataError(Exception):
    """An image that cannot be read; raised in a loader worker, reported in one line."""


class Augmented(Dataset):
    """A data set with a random transform whose randomness depends only on (seed, epoch, copy, index), as
    EpochSampler passes them: an image's augmentation does not depend on the number of processes or
    loader workers, so a resumed run and a run on more GPUs see the same data."""

    def __init__(self, dataset: Dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch, copy = key if isinstance(key, tuple) else (key, 0, 0)  # a plain index: evaluation
        try:
            img, label = self.dataset[index]
        except Exception as e:  # a corrupt, truncated or non-image file: name it
            where = self.dataset.samples[index][0] if hasattr(self.dataset, "samples") else f"image {index}"
            raise DataError(f"cannot read {where} ({type(e).__name__}: {e}); delete or replace it") from None
        with torch.random.fork_rng(devices=[]):  # the CPU's generator, put back after (CUDA's is not touched)
            torch.default_generator.manual_seed(seed_of(self.seed, epoch, copy, index))
            return self.transform(img), label


class EpochSampler(Sampler):
    """Each epoch's shuffled order (seed + epoch), dealt to the processes in turn, as (index, epoch, copy).
    With repeats > 1 it is DeiT's repeated augmentation (its RASampler): each image drawn appears `repeats`
    times side by side, so nearly always in one step, each copy augmented on its own; an epoch keeps
    len(dataset) samples. With repeats = 1 it is torch's DistributedSampler (shuffle, drop_last)."""

    def __init__(self, n: int, world: int, rank: int, seed: int, repeats: int = 1):
        self.n, self.world, self.rank, self.seed, self.repeats, self.epoch = n, world, rank, seed, repeats, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.n // self.world

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order = order.repeat_interleave(self.repeats)
        mine = range(self.rank, self.world * len(self), self.world)
        return ((int(order[k]), self.epoch, k % self.repeats) for k in mine)


def build_transforms(args, img_size: int):
    """A recipe's training and evaluation transforms of one uint8 image (timm's order), each ending in a
    plain tensor (no tv_tensors subclass reaches the model)."""
    mean, std = NORMALISATION[args.recipe]
    mode = lambda name: getattr(v2.InterpolationMode, name.upper())  # noqa: E731
    modes = ("bilinear", "bicubic") if args.interpolation == "random" else (args.interpolation,)
    crops = [
        v2.RandomResizedCrop(img_size, scale=(args.crop_scale, 1.0), interpolation=mode(m))
        if args.train_crop == "resized"
        else v2.Compose([v2.Resize(img_size, mode(m)), v2.RandomCrop(img_size, padding=img_size // 8)])
        for m in modes
    ]  # padded: T2T-ViT's transfer_learning.py
    train = [v2.ToImage(), v2.ToPureTensor(), v2.RandomChoice(crops), v2.RandomHorizontalFlip(args.hflip)]
    if args.randaug_magnitude > 0:
        train.append(RandAugment(args.randaug_magnitude, mean, args.interpolation))
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train += tail
    if args.reprob > 0:
        train.append(v2.RandomErasing(args.reprob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random"))
    resize = v2.Resize(int(img_size / args.eval_crop), mode(args.interpolation.replace("random", "bicubic")))
    val = [v2.ToImage(), v2.ToPureTensor(), resize, v2.CenterCrop(img_size), *tail]
    return v2.Compose(train), v2.Compose(val)


def build_datasets(args, img_size: int) -> tuple[Dataset, Dataset]:
    """The training and validation sets, untransformed; each lists its `classes` and `targets`."""
    root = Path(args.data_path)
    try:
        if args.data == "synthetic":
            size = args.synthetic_size
            return PlusSigns(size, img_size, args.seed), PlusSigns(max(size // 5, 1), img_size, args.seed + 1)
        if args.data == "cifar100":
            if os.environ.get("LOCAL_RANK", "0") == "0":  # one download a machine, the others wait
                torchvision.datasets.CIFAR100(root, download=True)
            if dist.is_initialized():
                dist.barrier()
            return tuple(torchvision.datasets.CIFAR100(root, train=t) for t in (True, False))
        train, val = (torchvision.datasets.ImageFolder(root / split) for split in ("train", "val"))
    except Exception as e:  # offline, a half-downloaded archive, no such folder, no images in one, ...
        raise UserError(
            f"cannot load --data {args.data} from {root} ({type(e).__name__}: {e}); see --data-path"
        ) from None
    if train.classes != val.classes:
        raise UserError(f"{root}/train and {root}/val hold different class folders; they must match")
    return train, val


def make_loaders(args, train_set, val_set, img_size: int, batch: int, device, rank: int, world: int):
    """Loaders of `batch` images per process (the training one's sampler an EpochSampler): DataLoader
    workers by default; with --device-data, the whole set as uint8 on the device, augmented there."""
    train_tf, val_tf = build_transforms(args, img_size)
    sampler = EpochSampler(len(train_set), world, rank, args.seed, args.repeated_aug)
    shard = range(rank, len(val_set), world)  # every validation image once, on one process
    auto = args.data == "cifar100" and device.type == "cuda" and args.train_crop == "resized"
    if args.device_data == "on" or (args.device_data == "auto" and auto):
        if args.data == "imagenet":
            raise UserError(
                "--device-data holds sets of one image size (cifar100, synthetic): use --device-data off"
            )
        if args.train_crop != "resized":
            raise UserError("--device-data crops as RandomResizedCrop only: use --device-data off")
        loaders = device_data.loaders(
            args, train_set, val_set, sampler, shard, img_size, batch, val_tf, device
        )
    else:
        seeds = torch.Generator().manual_seed(args.seed)  # the workers' own, not drawn from the global RNG
        kw = dict(num_workers=args.workers, persistent_workers=args.workers > 0, generator=seeds)
        kw |= dict(prefetch_factor=4 if args.workers else None, pin_memory=device.type == "cuda")
        train = DataLoader(
            Augmented(train_set, train_tf, args.seed), batch, sampler=sampler, drop_last=True, **kw
        )
        loaders = train, DataLoader(Subset(Augmented(val_set, val_tf, args.seed), shard), batch, **kw)
    if len(loaders[0]) < args.accum_steps and not args.eval_only:
        raise UserError(f"{len(sampler)} training images a process make no step: lower --batch-size")
    return loaders


def load(args, img_size: int, ckpt: dict | None):
    """The training and validation sets, and what a checkpoint records of them: their sizes and class names
    (which are the label ids), refused in one line where they differ from the resumed checkpoint's."""
    train_set, val_set = build_datasets(args, img_size)
    data = dict(train=len(train_set), val=len(val_set), classes=list(train_set.classes))
    compared = ["classes"] if args.eval_only else list(data)  # an evaluation may take another split
    if ckpt and (differ := [k for k in compared if ckpt["data"][k] != data[k]]):
        raise UserError(
            f"the data's {' and '.join(differ)} differ from the checkpoint's: use the data it trained on"
        )
    return train_set, val_set, data
