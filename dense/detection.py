"""Mask R-CNN on ViT-Adapter for COCO (paper Table 3, recipe Table 8): torchvision's MaskRCNN, an FPN on the
adapter's four levels, and MMDetection's settings (mask_rcnn_r50_fpn, as ViT-Adapter's 3x+MS config) where
torchvision has the switch. What torchvision still does its own way:

- RoIAlign without MMDetection's `aligned=True`: sampling points are not shifted by half a pixel.
- Box regression: smooth L1 with beta 1/9 in the RPN and the box head (MMDetection: L1).
- The box head's assigner makes no low-quality matches (MMDetection: match_low_quality=True, min IoU 0.5).
- Anchors are rounded to whole pixels (MMDetection's are not).
- Initialisation: the FPN's convolutions Kaiming-uniform (MMDetection: Xavier-uniform), the box predictor
  PyTorch's Linear default (MMDetection: normal, std 0.01 for scores and 0.001 for boxes).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import LevelMapper


class AdapterFPN(nn.Module):
    """The adapter's maps at 1/4..1/32, `width` channels each through an FPN, and a fifth at 1/64 by max
    pooling (MMDetection's FPN with num_outs=5 and no extra convolutions)."""

    def __init__(self, adapter: nn.Module, width: int = 256):
        super().__init__()
        self.adapter, self.out_channels = adapter, width
        self.fpn = FeaturePyramidNetwork([adapter.out_channels] * 4, width, extra_blocks=LastLevelMaxPool())

    def forward(self, img):
        return self.fpn(OrderedDict(zip("0123", self.adapter(img))))  # "0".."3" and "pool"


def roi_align(size: int) -> MultiScaleRoIAlign:
    """RoIAlign on the FPN's levels 1/4..1/32, each box on the level of its size (MMDetection's rule), and
    sampling_ratio=0 as MMDetection's. The strides are set, not inferred from the first batch as torchvision
    does (from unpadded sizes: 1/2 for a 40 px image padded to 64, kept for every batch after)."""
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], size, sampling_ratio=0)
    pooler.scales, pooler.map_levels = [2.0**-k for k in range(2, 6)], LevelMapper(2, 5)
    return pooler


def build_mask_rcnn(adapter: nn.Module, num_classes: int, crop: int = 1024, width: int = 256) -> MaskRCNN:
    """Mask R-CNN for num_classes (background included). Training images come resized and cropped by the
    data (multi-scale, ViT-Adapter's 3x+MS); evaluation resizes to MMDetection's test scale, 1333 x 800 at
    crop 1024 (a smaller crop scales it alike), and both pad to a multiple of 32 (the adapter's stride).
    width: the FPN's and the mask head's channels, a quarter of the box head's MLP (MMDetection's: 256)."""
    return MaskRCNN(
        AdapterFPN(adapter, width),
        num_classes=None,  # the predictors below are given
        min_size=round(800 * crop / 1024),
        max_size=round(1333 * crop / 1024),
        rpn_post_nms_top_n_train=1000,  # MMDetection's rpn_proposal max_per_img (torchvision: 2000)
        box_roi_pool=roi_align(7),
        box_head=TwoMLPHead(width * 7 * 7, 4 * width),
        box_predictor=FastRCNNPredictor(4 * width, num_classes),
        mask_roi_pool=roi_align(14),
        mask_head=MaskRCNNHeads(width, [width] * 4, 1),
        mask_predictor=MaskRCNNPredictor(width, width, num_classes),
        _skip_resize=True,  # in training only: the data resized each image already
    )
