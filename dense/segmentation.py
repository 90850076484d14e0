"""UperNet on ViT-Adapter for ADE20K (paper Table 4, recipe Table 9), as MMSegmentation's UPerHead and its
auxiliary FCNHead (upernet_r50 with ViT-Adapter-Ti's upernet_deit_adapter_tiny_512_160k_ade20k config).
Its BatchNorm becomes SyncBatchNorm on several GPUs, as MMSegmentation's SyncBN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dense.adapter import conv_bn_relu

IGNORE = 255  # the label of pixels no loss or score reads (ADE20K's "other", after reduce_zero_label)


def resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, like.shape[-2:], mode="bilinear", align_corners=False)


class UperNet(nn.Module):
    """UPerHead (Xiao et al. 2018): a pyramid pooling module on the coarsest map, an FPN's top-down path, and
    all four levels fused at 1/4 into per-pixel logits (B, classes, H/4, W/4)."""

    def __init__(self, dim: int, num_classes: int, channels: int = 512, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(dim, channels, 1)) for s in pool_scales
        )
        self.bottleneck = conv_bn_relu(dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * channels, channels, 3)
        self.classify = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        top = maps[3]
        pooled = torch.cat([top, *(resize(pool(top), top) for pool in self.ppm)], 1)  # the pyramid pooling
        laterals = [conv(x) for conv, x in zip(self.lateral, maps)] + [self.bottleneck(pooled)]
        for i in (3, 2, 1):  # top-down: each level gets the coarser one, upsampled
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals)] + [laterals[3]]
        return self.classify(self.fuse(torch.cat([resize(x, outs[0]) for x in outs], 1)))


class Segmenter(nn.Module):
    """MMSegmentation's EncoderDecoder: the adapter, UperNet, and in training the auxiliary FCN head on the
    third level (1/16), its loss weighted 0.4. forward(img) gives logits at the image's size; forward(img,
    labels) the two losses, cross-entropy averaged over every pixel, one labelled IGNORE adding 0."""

    def __init__(self, adapter: nn.Module, num_classes: int, channels: int = 512, aux_channels: int = 256):
        super().__init__()
        dim = adapter.out_channels
        self.backbone, self.decode_head = adapter, UperNet(dim, num_classes, channels)
        self.auxiliary_head = nn.Sequential(
            conv_bn_relu(dim, aux_channels, 3), nn.Dropout2d(0.1), nn.Conv2d(aux_channels, num_classes, 1)
        )
        for m in [*self.decode_head.modules(), *self.auxiliary_head.modules()]:
            if isinstance(m, nn.Conv2d):  # MMCV's ConvModule init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for classifier in (self.decode_head.classify[1], self.auxiliary_head[2]):  # MMSegmentation's
            nn.init.normal_(classifier.weight, std=0.01)
            nn.init.zeros_(classifier.bias)

    def forward(self, img: torch.Tensor, labels: torch.Tensor | None = None):
        maps = self.backbone(img)
        logits = self.decode_head(maps)
        if labels is None:
            return resize(logits, img)  # (B, classes, H, W)

        def loss(x):  # MMSegmentation's (0.20): the mean over every pixel, one labelled IGNORE adding 0
            return F.cross_entropy(resize(x, labels), labels, ignore_index=IGNORE, reduction="none").mean()

        return dict(loss_decode=loss(logits), loss_aux=0.4 * loss(self.auxiliary_head(maps[2])))
