"""The dense tasks' scores: COCO's box and mask AP by pycocotools' COCOeval, and ADE20K's mIoU of
MMSegmentation (per-class intersection over union of all the validation pixels, averaged over the classes
that occur), each over every validation image of every process."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dense.data import categories
from dense.segmentation import IGNORE
from training.engine import all_reduce


def coco_results(image_id: int, detections: dict, category_ids: list[int]) -> list[dict]:
    """One image's detections (Mask R-CNN's: boxes x1y1x2y2, labels 1..C, scores, mask probabilities
    (N, 1, H, W)) as COCO's result entries: a box x, y, w, h and a binary mask in RLE."""
    from pycocotools import mask as rle

    boxes = detections["boxes"].tolist()
    masks = (detections["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
    return [
        dict(
            image_id=image_id,
            category_id=category_ids[label - 1],
            bbox=[x1, y1, x2 - x1, y2 - y1],
            score=score,
            segmentation=rle.encode(np.asfortranarray(mask)),
        )
        for (x1, y1, x2, y2), label, score, mask in zip(
            boxes, detections["labels"].tolist(), detections["scores"].tolist(), masks
        )
    ]


def coco_ap(coco, results: list[dict]) -> dict:
    """Box and mask AP (COCO's AP at IoU 0.50:0.95, in percent) of the results against the annotations."""
    from pycocotools.cocoeval import COCOeval

    scores = {}
    for kind, name in (("bbox", "box_ap"), ("segm", "mask_ap")):
        if not results:  # nothing detected: COCO's loadRes refuses an empty list
            scores[name] = 0.0
            continue
        with redirect_stdout(io.StringIO()):  # its tables: the one number is reported
            run = COCOeval(coco, coco.loadRes(results), kind)
            run.evaluate()
            run.accumulate()
            run.summarize()
        scores[name] = 100 * max(float(run.stats[0]), 0.0)  # -1: no annotation to score
    return scores


@torch.no_grad()
def evaluate_coco(model, loader, device, coco) -> dict:
    """Box and mask AP of a Mask R-CNN over the validation images of every process."""
    model.eval()
    results, category_ids = [], categories(coco)
    for images, image_ids in loader:
        for image_id, detections in zip(image_ids, model([img.to(device) for img in images])):
            results += coco_results(image_id, detections, category_ids)
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, results)
        results = [r for rank in every for r in rank]
    return coco_ap(coco, results)


def slide(model, img: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """MMSegmentation's sliding-window inference: crop x crop windows every `stride` pixels (the last flush
    with the far edge), each window's logits added where it lies, and each pixel's sum divided by the number
    of windows that covered it. img (1, 3, H, W) -> logits (1, classes, H, W)."""
    h, w = img.shape[-2:]
    starts = lambda size: [  # noqa: E731
        max(min(i * stride, size - crop), 0) for i in range(max(size - crop + stride - 1, 0) // stride + 1)
    ]
    logits, count = None, img.new_zeros(1, 1, h, w)
    for top in starts(h):
        for left in starts(w):
            window = model(img[..., top : top + crop, left : left + crop])
            logits = window.new_zeros(1, window.shape[1], h, w) if logits is None else logits
            logits[..., top : top + crop, left : left + crop] += window
            count[..., top : top + crop, left : left + crop] += 1
    return logits / count


@torch.no_grad()
def evaluate_ade20k(model, loader, device, num_classes: int, crop: int) -> dict:
    """mIoU and pixel accuracy (aAcc), in percent, with sliding windows of crop x crop, stride 2/3 of it
    (341 at 512); the logits resized to each label's size. Pixels labelled IGNORE are not scored."""
    model.eval()
    hist = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)  # (label, prediction)
    for img, label in loader:  # one image a batch: each its own size
        label = label.to(device)
        logits = slide(model, img.to(device), crop, crop * 2 // 3)
        predicted = F.interpolate(logits, label.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        scored = label != IGNORE
        hist += torch.bincount(label[scored] * num_classes + predicted[scored], minlength=hist.numel())
    hist = all_reduce(hist).view(num_classes, num_classes)
    hits, union = hist.diag(), hist.sum(0) + hist.sum(1) - hist.diag()
    return dict(miou=100 * (hits / union).nanmean().item(), acc=100 * (hits.sum() / hist.sum()).item())
