"""timm's RandAugment `rand-m9-mstd0.5-inc1`, as DeiT and Compact Transformers train with it, built from
torchvision's v2 functionals on uint8 tensors: per image for the DataLoader path, per batch on the device.

The policy, read from timm's `auto_augment.py`: each image draws 2 of 15 ops, uniformly and with
replacement; each drawn op is applied with probability 0.5, at a magnitude drawn from N(9, 0.5) and
clipped to [0, 10] (of 10), with a random sign where the op has one. The ops are the "increasing"
set: the stronger the magnitude, the stronger the change (Posterize at m9 keeps 1 bit). Geometric ops
fill with the data set's mean colour and resample bicubic (DeiT) or, per op, bilinear or bicubic
(Compact Transformers' `train_interpolation: random`).

Every image has its own op, magnitude, sign and resampling; ops then run once per group of images
that drew the same op, with the magnitudes as per-image tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip


def draw(n: int, g: torch.Generator | None, magnitude: float = 9.0, interpolation: str = "bicubic") -> dict:
    """The policy's random choices for n images, (n, 2) each: which op, whether it is applied, its
    magnitude (0..10), its sign, and whether a geometric op resamples bicubic (else bilinear)."""
    shape = (n, 2)  # two ops an image
    level = magnitude + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)  # mstd0.5
    if interpolation == "random":
        bicubic = torch.rand(shape, generator=g) < 0.5
    else:
        bicubic = torch.full(shape, interpolation == "bicubic")
    return dict(
        op=torch.randint(len(OPS), shape, generator=g),
        applied=torch.rand(shape, generator=g) < 0.5,
        level=level.clamp(0.0, 10.0),
        negative=torch.rand(shape, generator=g) < 0.5,
        bicubic=bicubic,
    )


def argument(name: str, level: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """timm's level-to-argument rule of each op, for a tensor of magnitudes (0..10) and signs."""
    sign = 1.0 - 2.0 * negative.double()
    frac = level / 10.0
    if name == "Rotate":
        return sign * frac * 30.0  # degrees
    if name == "PosterizeIncreasing":
        return 4 - (frac * 4).long()  # bits kept
    if name == "SolarizeIncreasing":
        return 256 - (frac * 256).long()  # threshold
    if name == "SolarizeAdd":
        return (frac * 110).long()  # added below 128
    if name.endswith("Increasing"):  # Color, Contrast, Brightness, Sharpness: a blend factor, 1 = no change
        return (1.0 + sign * frac * 0.9).clamp(min=0.1)
    if name in ("ShearX", "ShearY"):
        return sign * frac * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * frac * 0.45  # of the image's width or height
    return torch.zeros_like(level)  # AutoContrast, Equalize, Invert take none


def blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's blend of an image with its degenerate version, with one factor per image."""
    f = factor.float().view(-1, 1, 1, 1)
    return (x * f).add_(degenerate * (1.0 - f)).clamp_(0, 255).to(torch.uint8)


def affine(x: torch.Tensor, matrix: torch.Tensor, bicubic: torch.Tensor, fill) -> torch.Tensor:
    """Per-image affine resampling, as PIL's Image.transform (which timm uses): matrix (n, 2, 3) maps each
    output pixel centre to the input point it reads; a point outside the image reads `fill`, one inside
    interpolates with its neighbours clamped to the edge. Bilinear or bicubic per image."""
    n, c, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).to(matrix)  # (H, W, 3)
    source = torch.einsum("nij,hwj->nhwi", matrix, points)  # (n, H, W, 2), pixel units
    inside = ((source >= 0) & (source < torch.tensor([w, h]).to(matrix))).all(dim=-1)  # (n, H, W)
    grid = (source / torch.tensor([w, h]).to(matrix) * 2 - 1).float().to(x.device)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for mode, chosen in (("bilinear", ~bicubic), ("bicubic", bicubic)):
        if chosen.any():
            index = chosen.nonzero()[:, 0].to(x.device)
            out[index] = F.grid_sample(
                x[index].float(), grid[index], mode, padding_mode="border", align_corners=False
            )
    fill = torch.tensor(fill if len(fill) == c else [sum(fill) / len(fill)] * c, dtype=torch.float32)
    out = torch.where(inside.to(x.device)[:, None], out, fill.to(x.device).view(1, c, 1, 1))
    return out.add_(1e-4).floor_().clamp_(0, 255).to(torch.uint8)  # PIL truncates


def geometric_matrix(name: str, arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, 2, 3) float64: PIL's inverse maps of timm's geometric ops (rotation about the centre)."""
    m = torch.zeros(len(arg), 2, 3, dtype=torch.float64)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    if name == "ShearX":
        m[:, 0, 1] = arg
    elif name == "ShearY":
        m[:, 1, 0] = arg
    elif name == "TranslateXRel":
        m[:, 0, 2] = arg * w
    elif name == "TranslateYRel":
        m[:, 1, 2] = arg * h
    else:  # Rotate, counter-clockwise by arg degrees about the centre, as PIL's Image.rotate
        a = -torch.deg2rad(arg)
        cos, sin = torch.cos(a), torch.sin(a)
        cx, cy = w / 2, h / 2
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, sin, -sin, cos
        m[:, 0, 2] = cx - cos * cx - sin * cy
        m[:, 1, 2] = cy + sin * cx - cos * cy
    return m


def apply_op(name: str, x: torch.Tensor, arg: torch.Tensor, bicubic: torch.Tensor, fill) -> torch.Tensor:
    """One op on a uint8 batch (n, C, H, W), each image with its own argument (n,)."""
    column = arg.to(x.device).view(-1, 1, 1, 1)
    if name == "AutoContrast":
        return TF.autocontrast(x)
    if name == "Equalize":
        return TF.equalize(x)
    if name == "Invert":
        return TF.invert(x)
    if name == "PosterizeIncreasing":  # keep the `bits` most significant bits
        mask = ((0xFF << (8 - column.long())) & 0xFF).to(torch.uint8)
        return x & mask
    if name == "SolarizeIncreasing":  # invert the pixels at or above the threshold
        return torch.where(x >= column.long(), 255 - x, x)
    if name == "SolarizeAdd":  # add to the pixels below 128
        return torch.where(x < 128, (x.long() + column.long()).clamp(max=255).to(torch.uint8), x)
    if name == "ColorIncreasing":
        return blend(x, TF.rgb_to_grayscale(x).float(), arg)
    if name == "ContrastIncreasing":
        return blend(x, TF.rgb_to_grayscale(x).float().mean(dim=(-3, -2, -1), keepdim=True), arg)
    if name == "BrightnessIncreasing":
        return blend(x, torch.zeros_like(x, dtype=torch.float32), arg)
    if name == "SharpnessIncreasing":
        return blend(x, TF.adjust_sharpness(x, 0.0).float(), arg)
    return affine(x, geometric_matrix(name, arg, x.shape[-2], x.shape[-1]), bicubic, fill)


def apply(x: torch.Tensor, choices: dict, fill) -> torch.Tensor:
    """The drawn ops on a uint8 batch (n, C, H, W), in order; each op runs once on the images that drew it."""
    x = x.clone()
    for layer in range(choices["op"].shape[1]):
        op, applied = choices["op"][:, layer], choices["applied"][:, layer]
        for k, name in enumerate(OPS):
            chosen = (applied & (op == k)).nonzero()[:, 0]
            if len(chosen):
                arg = argument(name, choices["level"][chosen, layer], choices["negative"][chosen, layer])
                index = chosen.to(x.device)
                x[index] = apply_op(name, x[index], arg, choices["bicubic"][chosen, layer], fill)
    return x


def fill_colour(mean) -> tuple:
    """timm's fill for geometric ops: the data set's mean colour on the 0..255 scale."""
    return tuple(min(255, round(255 * m)) for m in mean)


class RandAugment:
    """The per-image transform (C, H, W) uint8 -> uint8, drawing from torch's global RNG (which
    train.py's Augmented data set seeds per image)."""

    def __init__(self, magnitude: float, mean, interpolation: str):
        self.magnitude, self.fill, self.interpolation = magnitude, fill_colour(mean), interpolation

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        choices = draw(1, None, self.magnitude, self.interpolation)
        return apply(img[None], choices, self.fill)[0]
