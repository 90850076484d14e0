"""CIFAR-100 on the device: the whole set as uint8, the cifar recipe's augmentations run on whole chunks.

Every image still draws its own crop, resampling, flip, RandAugment ops and erasing box, by the rules of
torchvision's and timm's per-image transforms; the work then runs once per chunk of the epoch (or once
per group of images that drew the same op) instead of once per image.
"""

from __future__ import annotations

import math

import torch

from training import randaugment
from training.recipes import NORMALISATION


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


def cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """The bicubic kernel of PIL and torch's antialiased resize (a = -0.5)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def resize_weights(start, length, size: int, extent: int, bicubic) -> torch.Tensor:
    """(n, size, extent): each output pixel's weights over the input pixels of one axis, for crops
    [start, start + length) resized to `size`, as torch's antialiased resize computes them (PIL's rule:
    the kernel widens by the scale when shrinking; taps outside the crop are dropped)."""
    scale = (length / size).double()[:, None, None]  # (n, 1, 1)
    output = torch.arange(size, dtype=torch.float64)[None, :, None] + 0.5  # output pixel centres
    centre = start.double()[:, None, None] + scale * output
    pixel = torch.arange(extent, dtype=torch.float64)[None, None, :] + 0.5
    t = (pixel - centre) / scale.clamp(min=1.0)
    w = torch.where(bicubic[:, None, None], cubic(t), (1 - t.abs()).clamp(min=0))
    inside = (pixel >= start[:, None, None]) & (pixel < (start + length)[:, None, None])
    w = w * inside
    return (w / w.sum(dim=-1, keepdim=True)).float()


def resized_crops(x: torch.Tensor, top, left, h, w, size: int, bicubic) -> torch.Tensor:
    """Each image's own crop, resized to size x size, bilinear or bicubic per image, antialiased as
    torchvision's resized_crop of a uint8 image (and PIL): the horizontal pass, rounded to uint8, then
    the vertical pass, each one batched matrix product."""
    rows = to_device(resize_weights(top, h, size, x.shape[2], bicubic), x.device)  # (n, size, H)
    cols = to_device(resize_weights(left, w, size, x.shape[3], bicubic), x.device)  # (n, size, W)
    wide = torch.einsum("nchw,njw->nchj", x.float(), cols).round_().clamp_(0, 255)
    return torch.einsum("nih,nchj->ncij", rows, wide).round_().clamp_(0, 255).to(torch.uint8)


class BatchAugment:
    """A recipe's per-image training augmentations, for a whole uint8 batch on its device: a random
    resized crop (bilinear or bicubic per image under the cifar recipe's `random`), a flip, timm's
    RandAugment, normalisation and random erasing with per-pixel noise."""

    def __init__(self, args, size: int):
        self.args, self.size = args, size
        mean, std = NORMALISATION[args.recipe]
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
        self.fill = randaugment.fill_colour(mean)

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
        bicubic = (
            (torch.rand(n, generator=g) < 0.5)
            if a.interpolation == "random"
            else torch.full((n,), a.interpolation == "bicubic")
        )
        x = resized_crops(x, top, left, h, w, self.size, bicubic)
        flip = torch.rand(n, generator=g) < a.hflip
        x = torch.where(to_device(flip, device)[:, None, None, None], x.flip(-1), x)
        if a.randaug_magnitude > 0:
            x = randaugment.apply(
                x, randaugment.draw(n, g, a.randaug_magnitude, interpolation=a.interpolation), self.fill
            )
        x = (x.float() / 255 - self.mean) / self.std
        erase = torch.rand(n, generator=g) < a.reprob
        et, el, eh, ew, found = sample_boxes(
            n, self.size, self.size, (0.02, 1 / 3), (0.3, 1 / 0.3), g, "none"
        )
        erase &= found
        if erase.any():
            rows, cols = torch.arange(self.size)[None, :], torch.arange(self.size)[None, :]
            inside_r = (rows >= et[:, None]) & (rows < (et + eh)[:, None])
            inside_c = (cols >= el[:, None]) & (cols < (el + ew)[:, None])
            mask = inside_r[:, :, None] & inside_c[:, None, :] & erase[:, None, None]
            noise = torch.randn(x.shape, generator=g_device or g, device=device)
            x = torch.where(to_device(mask, device)[:, None], noise, x)
        return x


class DeviceLoader:
    """A data set held on the device as one uint8 tensor, served in batches augmented there, a chunk of
    `chunk` images at a time. Batch order comes from the same samplers as the DataLoader path;
    randomness from (seed, epoch, rank). Batches are plain tensors."""

    def __init__(
        self, images, labels, sampler, batch_size: int, transform, seed: int, drop_last=True, chunk=8192
    ):
        self.images, self.labels, self.sampler = images, labels, sampler
        self.batch_size, self.transform, self.seed, self.drop_last = batch_size, transform, seed, drop_last
        self.chunk = max(1, chunk // batch_size) * batch_size  # whole batches

    def __len__(self):
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def __iter__(self):
        keys = list(self.sampler)
        epoch = keys[0][1] if keys and isinstance(keys[0], tuple) else 0
        index = torch.tensor([k[0] if isinstance(k, tuple) else k for k in keys], dtype=torch.long)
        index = index[: len(self) * self.batch_size]  # without drop_last: the slice keeps every key
        seed = ((self.seed * 1_000_003 + epoch) * 1_000_003 + getattr(self.sampler, "rank", 0)) % 2**63
        device = self.images.device
        g = torch.Generator().manual_seed(seed)  # the augmentations' parameters, drawn on the CPU
        g_device = torch.Generator(device).manual_seed(seed) if device.type == "cuda" else None  # noise
        augment = isinstance(self.transform, BatchAugment)
        for start in range(0, len(index), self.chunk):
            chosen = to_device(index[start : start + self.chunk], device)
            x, y = self.images[chosen], self.labels[chosen]
            x = self.transform(x, g, g_device) if augment else self.transform(x)
            for b in range(0, len(chosen), self.batch_size):
                yield x[b : b + self.batch_size], y[b : b + self.batch_size]


def as_tensors(dataset, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A data set of images and labels as (N, C, H, W) uint8 and (N,) int64 tensors on the device."""
    if hasattr(dataset, "data"):  # torchvision's CIFAR: (N, H, W, C) numpy
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    else:
        images = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(len(dataset))])
    return images.to(device), torch.tensor(dataset.targets).to(device)


def loaders(args, train_set, val_set, sampler, val_shard, img_size: int, batch: int, val_transform, device):
    """--device-data's training and validation loaders of `batch` images per process: both sets on the
    device, the training one augmented there by the recipe, the validation one this process's share."""
    augment = BatchAugment(args, img_size)
    train = DeviceLoader(*as_tensors(train_set, device), sampler, batch, augment, args.seed)
    val = DeviceLoader(
        *as_tensors(val_set, device), val_shard, batch, val_transform, args.seed, drop_last=False
    )
    return train, val
