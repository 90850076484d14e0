"""timm's Mixup and CutMix in batch mode, as DeiT and Compact Transformers train with them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Mixing:
    """timm's Mixup in batch mode, as DeiT and Compact Transformers use it: per batch, CutMix or Mixup (each
    with p = 0.5 when both are on) at lam ~ Beta(alpha, alpha), every image mixed with its mirror in the
    batch (i with B-1-i, timm's pairing: repeated copies sit side by side, so a neighbour would often be the
    same image), CutMix's lam corrected to the box's area. Parameters come from the CPU's RNG: no step
    waits for the GPU. Returns the mixed images and soft targets (B, C)."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int):
        self.mixup, self.cutmix, self.num_classes = mixup, cutmix, num_classes

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or float(torch.rand(())) < 0.5)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        if use_cutmix:  # a box of area (1 - lam) at a uniform centre, clipped to the image
            (h, w), cut = x.shape[-2:], math.sqrt(1 - lam)
            cy, cx = (int(torch.randint(n, ())) for n in (h, w))
            top, bottom = max(cy - int(h * cut) // 2, 0), min(cy + (int(h * cut) + 1) // 2, h)
            left, right = max(cx - int(w * cut) // 2, 0), min(cx + (int(w * cut) + 1) // 2, w)
            x = x.clone()
            x[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (h * w)
        else:
            x = x * lam + x.flip(0) * (1 - lam)
        one_hot = F.one_hot(y, self.num_classes).float()
        return x, one_hot * lam + one_hot.flip(0) * (1 - lam)
