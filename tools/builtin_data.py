"""The built-in data sets of `--data synthetic` and `--data noise`: no download, no disk, the same images
every time (each made from its index). train.py imports this; it imports nothing of the project's back.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class PlusSigns(Dataset):
    """Built-in data that only position solves: noise with a bright plus sign and a bright square (3 x 3
    pixels each) anywhere; the label is the cell of a 4 x 4 grid that holds the plus sign's centre."""

    def __init__(self, size: int, img_size: int, seed: int, cells: int = 4):
        if img_size < cells:
            raise ValueError(f"--data synthetic places a 3-pixel plus sign in a {cells} x {cells} grid: it needs "
                             f"--img-size {cells} or more, got {img_size}")  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        self.corners = torch.randint(0, img_size - 2, (size, 2, 2), generator=g)  # (image, plus/square, y/x)
        centre = self.corners[:, 0] + 1
        self.targets = (centre[:, 0] * cells // img_size * cells + centre[:, 1] * cells // img_size).tolist()
        self.img_size, self.seed, self.classes = img_size, seed, cells * cells

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        img = torch.randint(0, 128, (3, self.img_size, self.img_size), dtype=torch.uint8, generator=g)
        (py, px), (sy, sx) = self.corners[i].tolist()
        img[:, sy : sy + 3, sx : sx + 3] = 255
        img[:, py + 1, px : px + 3] = img[:, py : py + 3, px + 1] = 255
        return img, self.targets[i]


class NoiseImages(Dataset):
    """Random uint8 images and labels, made on the fly from the index: nothing to learn (benchmarks)."""

    def __init__(self, size: int, num_classes: int, img_size: int, seed: int):
        self.size, self.img_size, self.seed = size, img_size, seed
        self.targets = torch.randint(
            num_classes, (size,), generator=torch.Generator().manual_seed(seed)
        ).tolist()

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randint(
            0, 256, (3, self.img_size, self.img_size), dtype=torch.uint8, generator=g
        ), self.targets[i]


def builtin_datasets(kind: str, size: int, img_size: int, noise_classes: int, seed: int):
    """(train, val, num_classes) of `--data synthetic` or `--data noise`: `size` training images and a fifth
    as many for validation, made with other seeds."""
    if kind == "noise":
        make = lambda n, seed: NoiseImages(n, noise_classes, img_size, seed)  # noqa: E731
    else:
        make = lambda n, seed: PlusSigns(n, img_size, seed)  # noqa: E731
    train, val = make(size, seed), make(max(size // 5, 1), seed + 1)
    return train, val, noise_classes if kind == "noise" else train.classes
