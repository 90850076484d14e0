"""CIFAR-100 on the device: the whole set as uint8, the cifar recipe's augmentations run on whole batches.

train.py imports this for --device-data; it imports nothing of the project's back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor onto the device without making the host wait for the GPU (pinned, async)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def sample_boxes(n: int, height: int, width: int, scale, ratio, g: torch.Generator, fallback: str):
    """torchvision's box sampling (RandomResizedCrop, RandomErasing) for n images at once: 10 tries
    each of an area fraction and a log-uniform aspect ratio, the first that fits. Returns top, left,
    h, w (n,) and whether a try fitted; `fallback` is "center" (crop) or "none" (erasing)."""
    area = height * width * torch.empty(n, 10).uniform_(scale[0], scale[1], generator=g)
    log_r = torch.empty(n, 10).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    aspect = torch.exp(log_r)
    if fallback == "center":  # RandomResizedCrop: w from area * ratio, must fit inclusive
        w, h = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    else:  # RandomErasing: h from area * ratio, must be strictly smaller
        h, w = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
        fits = (h < height) & (w < width)
    found = fits.any(dim=1)
    first = fits.long().argmax(dim=1)
    h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
    if fallback == "center":
        in_ratio = width / height
        if in_ratio < min(ratio):
            cw, ch = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            cw, ch = int(round(height * max(ratio))), height
        else:
            cw, ch = width, height
        h, w = torch.where(found, h, ch), torch.where(found, w, cw)
    top = (torch.rand(n, generator=g) * (height - h + 1).clamp(min=1)).long()
    left = (torch.rand(n, generator=g) * (width - w + 1).clamp(min=1)).long()
    if fallback == "center":
        top, left = torch.where(found, top, (height - h) // 2), torch.where(found, left, (width - w) // 2)
    return top, left, h, w, found


def resized_crops(x: torch.Tensor, top, left, h, w, size: int) -> torch.Tensor:
    """Each image's own crop, resized bilinearly to size x size (as F.resized_crop, upsampling)."""
    n, _, height, width = x.shape
    steps = (torch.arange(size, device=x.device) + 0.5) / size

    def axis(start, length, extent):  # interpolate's source pixels, clamped to the crop's edges
        start, length = (
            to_device(start.float(), x.device)[:, None],
            to_device(length.float(), x.device)[:, None],
        )
        src = torch.maximum(torch.minimum(start + steps * length - 0.5, start + length - 1), start)
        return (src + 0.5) / extent * 2 - 1  # grid_sample's coordinates, align_corners=False

    gy, gx = axis(top, h, height), axis(left, w, width)
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def rand_augment_op(x: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One RandAugment operation on a uint8 batch, with torchvision's own conventions."""
    nearest = InterpolationMode.NEAREST
    if op in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        shear = [shear, 0.0] if op == "ShearX" else [0.0, shear]
        return TF.affine(
            x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest, center=[0, 0]
        )
    if op in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
        return TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest)
    ops = {
        "Identity": lambda: x,
        "Rotate": lambda: TF.rotate(x, angle=magnitude, interpolation=nearest),
        "Brightness": lambda: TF.adjust_brightness(x, 1.0 + magnitude),
        "Color": lambda: TF.adjust_saturation(x, 1.0 + magnitude),
        "Contrast": lambda: TF.adjust_contrast(x, 1.0 + magnitude),
        "Sharpness": lambda: TF.adjust_sharpness(x, 1.0 + magnitude),
        "Posterize": lambda: TF.posterize(x, bits=int(magnitude)),
        "Solarize": lambda: TF.solarize(x, threshold=255.0 * magnitude),
        "AutoContrast": lambda: TF.autocontrast(x),
        "Equalize": lambda: TF.equalize(x),
    }
    return ops[op]()


def rand_augment_space(magnitude: int, bins: int, height: int, width: int) -> list:
    """(name, magnitude, signed) of torchvision's RandAugment at this magnitude bin, computed as it does."""

    def at(start, end):
        return float(torch.linspace(start, end, bins)[magnitude])

    posterize = float((8 - torch.arange(bins) / ((bins - 1) / 4)).round().int()[magnitude])
    return [
        ("Identity", 0.0, False), ("ShearX", at(0, 0.3), True), ("ShearY", at(0, 0.3), True),
        ("TranslateX", at(0, 150.0 / 331.0 * width), True), ("TranslateY", at(0, 150.0 / 331.0 * height), True),
        ("Rotate", at(0, 30.0), True), ("Brightness", at(0, 0.9), True), ("Color", at(0, 0.9), True),
        ("Contrast", at(0, 0.9), True), ("Sharpness", at(0, 0.9), True), ("Posterize", posterize, False),
        ("Solarize", at(1.0, 0.0), False), ("AutoContrast", 0.0, False), ("Equalize", 0.0, False),
    ]  # fmt: skip


class BatchAugment:
    """The cifar recipe's per-image augmentations for a whole uint8 batch on its device.

    Every image draws its own crop box, flip, two RandAugment operations with their signs, and
    erasing box, by torchvision's own rules; torchvision's functionals then run once per group of
    images that drew the same operation. The same parameters give the per-image path's output.
    """

    def __init__(self, args, size: int):
        self.args, self.size = args, size
        self.mean = torch.tensor(args.mean)[:, None, None]
        self.std = torch.tensor(args.std)[:, None, None]
        self.last = {}  # the parameters of the last batch, for tests and the curious

    def __call__(
        self, x: torch.Tensor, g: torch.Generator, g_device: torch.Generator | None = None
    ) -> torch.Tensor:
        """x: (B, C, H, W) uint8 on its device. g draws the parameters (on the CPU, then moved without
        a sync); g_device the erasing noise on x's device (g itself when that is the CPU)."""
        a, n, device = self.args, x.shape[0], x.device
        if self.mean.device != device:
            self.mean, self.std = to_device(self.mean, device), to_device(self.std, device)
        top, left, h, w, _ = sample_boxes(
            n, x.shape[2], x.shape[3], (a.crop_scale, 1.0), (3 / 4, 4 / 3), g, "center"
        )
        x = resized_crops(x, top, left, h, w, self.size)
        flip = torch.rand(n, generator=g) < 0.5
        x = torch.where(to_device(flip, device)[:, None, None, None], x.flip(-1), x)
        ops, signs = [], []
        if a.randaug_magnitude > 0:
            space = rand_augment_space(a.randaug_magnitude, 11, self.size, self.size)
            for _ in range(2):
                op = torch.randint(len(space), (n,), generator=g)
                negative = torch.rand(n, generator=g) <= 0.5
                ops.append(op), signs.append(negative)
                for k, (name, magnitude, signed) in enumerate(space):
                    for neg in (False, True) if signed else (False,):
                        chosen = torch.nonzero((op == k) & (negative == neg) if signed else op == k)[:, 0]
                        if len(chosen):
                            chosen = to_device(chosen, device)
                            x[chosen] = rand_augment_op(x[chosen], name, -magnitude if neg else magnitude)
        x = (x.float() / 255 - self.mean) / self.std
        erase = torch.rand(n, generator=g) < a.reprob
        et, el, eh, ew, found = sample_boxes(n, self.size, self.size, (0.02, 0.33), (0.3, 3.3), g, "none")
        erase &= found
        if erase.any():
            rows, cols = torch.arange(self.size)[None, :], torch.arange(self.size)[None, :]
            inside_r = (rows >= et[:, None]) & (rows < (et + eh)[:, None])
            inside_c = (cols >= el[:, None]) & (cols < (el + ew)[:, None])
            mask = to_device(inside_r[:, :, None] & inside_c[:, None, :] & erase[:, None, None], device)[
                :, None
            ]
            noise = torch.randn(x.shape, generator=g_device or g, device=device)
            x = torch.where(mask, noise, x)
        self.last = dict(
            crop=torch.stack([top, left, h, w], 1), flip=flip, ops=ops, negative=signs, erase=erase
        )
        return x


class DeviceLoader:
    """A data set held on the device as one uint8 tensor, served in batches augmented there.
    Batch order comes from the same samplers as the DataLoader path; randomness from (seed, epoch, rank)."""

    def __init__(
        self, images, labels, sampler, batch_size: int, transform, seed: int, drop_last: bool = True
    ):
        self.images, self.labels, self.sampler = images, labels, sampler
        self.batch_size, self.transform, self.seed, self.drop_last = batch_size, transform, seed, drop_last

    def __len__(self):
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def __iter__(self):
        keys = list(self.sampler)
        epoch = keys[0][1] if keys and isinstance(keys[0], tuple) else 0
        index = torch.tensor([k[0] if isinstance(k, tuple) else k for k in keys])
        seed = (self.seed * 1_000_003 + epoch) * 1_000_003 + getattr(self.sampler, "rank", 0)
        device = self.images.device
        g = torch.Generator().manual_seed(seed)  # the augmentations' parameters, drawn on the CPU
        g_device = torch.Generator(device).manual_seed(seed) if device.type == "cuda" else None  # noise
        augment = isinstance(self.transform, BatchAugment)
        for b in range(len(self)):
            chosen = to_device(index[b * self.batch_size : (b + 1) * self.batch_size], device)
            x, y = self.images[chosen], self.labels[chosen]
            yield (self.transform(x, g, g_device) if augment else self.transform(x)), y


def as_tensors(dataset, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A data set of images and labels as (N, C, H, W) uint8 and (N,) int64 tensors on the device."""
    if hasattr(dataset, "data") and hasattr(dataset, "targets"):  # torchvision's CIFAR: (N, H, W, C) numpy
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(dataset.targets)
    else:
        images = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(len(dataset))])
        labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    return images.to(device), labels.to(device)
