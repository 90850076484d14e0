"""The dense tasks' data, read from their standard folders: COCO 2017 through torchvision's CocoDetection
(`train2017/ val2017/ annotations/instances_*.json`) and ADE20K (`images/training`, `annotations/training`,
and `validation`), each augmented as ViT-Adapter's configs do (Mask R-CNN 3x+MS, UperNet 160k); tiny sets
of both written in those formats (--data synthetic); and the order of the training samples, step by step."""

from __future__ import annotations

import io
import itertools
import json
import math
from contextlib import redirect_stdout
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dense.segmentation import IGNORE
from training import UserError
from training.data import DataError, seed_of

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's: MMDetection's and MMSegmentation's


class Stream(Sampler):
    """The training samples of the steps in `steps`, as (index, draw): shuffled passes over the n samples one
    after another (pass p in the order of seed + p), each step's `batch` per process dealt to the processes
    in turn. A run stopped after any step goes on with the very samples an unbroken run would draw."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.steps = range(0)  # set before each round

    def __len__(self):
        return len(self.steps) * self.batch

    def __iter__(self):
        order, held = None, -1
        for step, j in itertools.product(self.steps, range(self.batch)):
            draw = (step * self.world + self.rank) * self.batch + j  # its place among all processes' draws
            if draw // self.n != held:
                held = draw // self.n
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + held))
            yield int(order[draw % self.n]), draw


class Seeded(Dataset):
    """A data set's samples through a transform whose randomness comes from (seed, draw) alone, not from the
    number of processes or loader workers; a plain index (evaluation) is its own draw."""

    def __init__(self, dataset: Dataset, transform, file, seed: int = 0):
        self.dataset, self.transform, self.file, self.seed = (
            dataset,
            transform,
            file,
            seed,
        )  # file(index): path

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, draw = key if isinstance(key, tuple) else (key, key)
        try:
            sample = self.dataset[index]
        except Exception as e:  # a missing, truncated or non-image file: named in one line by the command
            raise DataError(f"cannot read {self.file(index)} ({type(e).__name__}: {e}); replace it") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(self.seed, draw))
            return self.transform(*sample)


def as_lists(batch: list[tuple]) -> tuple[list, list]:  # COCO's images differ in size: lists, not stacks
    return tuple(list(column) for column in zip(*batch))


# COCO: Mask R-CNN 3x+MS (ViT-Adapter's train_pipeline, DETR's augmentation) at crop 1024, or scaled


class CropUpTo(v2.Transform):
    """MMDetection's RandomCrop(crop_type="absolute_range"): a height and a width drawn from [low, high], each
    at most the image's, at a random place; boxes are clipped, masks cropped."""

    def __init__(self, low: int, high: int):
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        height, width = (int(torch.randint(min(s, self.low), min(s, self.high) + 1, ())) for s in (h, w))
        top, left = int(torch.randint(h - height + 1, ())), int(torch.randint(w - width + 1, ()))
        return dict(top=top, left=left, height=height, width=width)

    def transform(self, inpt, params):
        return self._call_kernel(TF.crop, inpt, **params)


def coco_train(crop: int) -> v2.Compose:
    """Flip; then either a short side of 480..800, or DETR's crop policy (short side 400..600, crop
    384..600, short side 480..800), long sides at most 1333; then a crop of at most crop x crop. Every size
    scales with crop (1024: ViT-Adapter's)."""
    at = lambda size: round(size * crop / 1024)  # noqa: E731
    # MMDetection's Resize: cv2's bilinear, without antialiasing
    scales = v2.RandomShortestSize([at(s) for s in range(480, 801, 32)], at(1333), antialias=False)
    shorter = v2.RandomShortestSize([at(400), at(500), at(600)], at(1333), antialias=False)
    crops = v2.Compose([shorter, CropUpTo(at(384), at(600))])
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomChoice([scales, v2.Compose([crops, scales])]),  # MMDetection's AutoAugment
            CropUpTo(crop, crop),
            v2.SanitizeBoundingBoxes(),  # boxes cropped away, with their labels and masks
            v2.ToDtype(torch.float32, scale=True),
            v2.ToPureTensor(),
        ]
    )


def coco_objects(transform, labels: dict[int, int], img, target: dict):
    """An image's objects as Mask R-CNN reads them, augmented: crowd regions left out (MMDetection ignores
    them in training), and COCO's category ids as labels 1..C (0 is torchvision's background)."""
    keep = torch.tensor(target["iscrowd"]) == 0
    boxes = tv_tensors.wrap(target["boxes"][keep].float(), like=target["boxes"])
    classes = torch.tensor([labels[c] for c in target["labels"][keep].tolist()], dtype=torch.int64)
    return transform(
        TF.to_image(img), dict(boxes=boxes, labels=classes, masks=tv_tensors.Mask(target["masks"][keep]))
    )


def coco_image(img, target: dict):  # evaluation: the image whole (Mask R-CNN resizes it) and its COCO id
    return TF.to_dtype(TF.to_image(img), torch.float32, scale=True), target["image_id"]


def needs_pycocotools():  # torchvision's COCO reader and COCOeval import it
    try:
        import pycocotools.mask  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("COCO needs pycocotools: pip install -r requirements-dense.txt") from None


def categories(coco) -> list[int]:  # COCO's category ids, in the order of the labels 1..C
    return sorted(coco.getCatIds())


def load_coco(root: Path, crop: int, seed: int):
    """COCO's training set (images with annotations only, MMDetection's filter_empty_gt), its validation
    set, the class names, and the validation annotations' COCO API, which COCOeval compares with."""
    needs_pycocotools()
    sets = []
    for split in ("train", "val"):
        images, annotations = root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"
        if not images.is_dir() or not annotations.is_file():
            raise UserError(f"no {images}/ or {annotations}: give --data-path COCO's folder")
        try:
            with redirect_stdout(io.StringIO()):  # pycocotools' messages while it indexes
                sets.append(CocoDetection(images, annotations))
            lacks = {"images", "annotations", "categories"} - set(sets[-1].coco.dataset)
        except (ValueError, KeyError, TypeError, AssertionError) as e:  # cut short, or not a dict
            raise UserError(f"cannot read {annotations} ({type(e).__name__}: {e}): replace it") from None
        if lacks:
            raise UserError(f"{annotations} is not COCO's: it has no {', '.join(sorted(lacks))}; replace it")
    train, val = sets
    train.ids = [i for i in train.ids if train.coco.getAnnIds(imgIds=i)]
    labels = {c: k + 1 for k, c in enumerate(categories(val.coco))}
    keys = {"boxes", "labels", "masks", "iscrowd"}
    objects = partial(coco_objects, coco_train(crop), labels)
    file = lambda coco: lambda i: Path(coco.root) / coco.coco.imgs[coco.ids[i]]["file_name"]  # noqa: E731
    train_set = Seeded(wrap_dataset_for_transforms_v2(train, keys), objects, file(train), seed)
    val_set = Seeded(wrap_dataset_for_transforms_v2(val, {"image_id"}), coco_image, file(val))
    return train_set, val_set, [val.coco.cats[c]["name"] for c in labels], val.coco


# ADE20K: UperNet 160k (MMSegmentation's ade20k pipeline) at crop 512, or scaled


class ADE20K(Dataset):
    """ADEChallengeData2016's images/{split}/*.jpg and annotations/{split}/*.png, read with MMSegmentation's
    reduce_zero_label: 0 ("other") becomes IGNORE, and the 150 classes 1..150 become 0..149."""

    classes = 150

    def __init__(self, root: Path, split: str):
        self.root, self.split = root, split
        self.images = sorted((root / "images" / split).glob("*.jpg"))
        if not self.images:
            raise UserError(f"no images in {root / 'images' / split}: give --data-path ADE20K's folder")
        unlabelled = [i.name for i in self.images if not self.label(i).is_file()]
        if unlabelled:
            raise UserError(
                f"{len(unlabelled)} image(s) of {root / 'images' / split} without a label map in "
                f"{root / 'annotations' / split} ({unlabelled[0]}, ...): give both, or neither"
            )

    def label(self, image: Path) -> Path:
        return self.root / "annotations" / self.split / f"{image.stem}.png"

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = TF.pil_to_tensor(Image.open(self.images[i]).convert("RGB"))
        label = TF.pil_to_tensor(Image.open(self.label(self.images[i])))[0]
        label = label.long() - 1
        return img, label.masked_fill(label < 0, IGNORE)


def distort(img: torch.Tensor) -> torch.Tensor:
    """MMSegmentation's PhotoMetricDistortion of a uint8 image, to floats in [0, 1]: each change with
    probability 0.5, brightness +-32, contrast x 0.5..1.5 (first or last), saturation x 0.5..1.5
    (torchvision's blend with grey; MMSegmentation scales HSV's S), hue -36..+34 degrees."""
    coin = lambda: bool(torch.rand(()) < 0.5)  # noqa: E731
    uniform = lambda low, high: float(torch.empty(()).uniform_(low, high))  # noqa: E731
    contrast = lambda x: (x * uniform(0.5, 1.5)).clamp(0, 1) if coin() else x  # noqa: E731
    x = img.float() / 255
    if coin():
        x = (x + uniform(-32, 32) / 255).clamp(0, 1)
    contrast_last = coin()
    x = x if contrast_last else contrast(x)
    if coin():
        x = TF.adjust_saturation(x, uniform(0.5, 1.5))
    if coin():  # numpy's randint(-18, 18) in OpenCV's hue units of 2 degrees
        x = TF.adjust_hue(x, int(torch.randint(-18, 18, ())) * 2 / 360)
    return contrast(x) if contrast_last else x


def ade_train(crop: int, img: torch.Tensor, label: torch.Tensor):
    """Resize to a random ratio 0.5..2 of 2048 x 512 (keeping the aspect), crop crop x crop where no class
    covers 3/4 of the labelled pixels (10 tries), flip, distort the colours, pad to crop x crop."""
    h, w = img.shape[-2:]
    ratio = float(torch.empty(()).uniform_(0.5, 2.0))
    scale = min(4 * crop * ratio / max(h, w), crop * ratio / min(h, w))
    size = [int(h * scale + 0.5), int(w * scale + 0.5)]
    img = TF.resize(img, size, antialias=False)  # MMCV's cv2 bilinear: no antialiasing
    label = TF.resize(label[None], size, v2.InterpolationMode.NEAREST)[0]
    place = lambda: [int(torch.randint(max(s - crop, 0) + 1, ())) for s in size]  # noqa: E731
    top, left = place()
    for _ in range(10):  # MMSegmentation's cat_max_ratio=0.75
        window = label[top : top + crop, left : left + crop]
        counts = torch.bincount(window[window != IGNORE])
        if (counts > 0).sum() > 1 and counts.max() < 0.75 * counts.sum():
            break
        top, left = place()
    img, label = img[:, top : top + crop, left : left + crop], label[top : top + crop, left : left + crop]
    if torch.rand(()) < 0.5:
        img, label = img.flip(-1), label.flip(-1)
    pad = [0, crop - img.shape[-1], 0, crop - img.shape[-2]]  # right and bottom, as MMSegmentation's Pad
    return F.pad(TF.normalize(distort(img), MEAN, STD), pad), F.pad(label, pad, value=IGNORE)


def ade_val(crop: int, img: torch.Tensor, label: torch.Tensor):
    """Resize to 2048 x 512 keeping the aspect, then up to a multiple of 32 (ViT-Adapter's ResizeToMultiple);
    the label stays at the image's own size, where the score is taken."""
    h, w = img.shape[-2:]
    scale = min(4 * crop / max(h, w), crop / min(h, w))
    size = [math.ceil(int(s * scale + 0.5) / 32) * 32 for s in (h, w)]
    return TF.normalize(TF.resize(img, size, antialias=False).float() / 255, MEAN, STD), label


def load_ade20k(root: Path, crop: int, seed: int):
    """ADE20K's training and validation sets, and its classes (by number: objectInfo150 names them)."""
    train, val = ADE20K(root, "training"), ADE20K(root, "validation")
    classes = [str(k) for k in range(ADE20K.classes)]
    train_set = Seeded(train, partial(ade_train, crop), train.images.__getitem__, seed)
    return train_set, Seeded(val, partial(ade_val, crop), val.images.__getitem__), classes, None


# --data synthetic: tiny sets in the real formats, written where the run reads them


def write_coco(root: Path, sizes=(16, 8), side: int = 128, seed: int = 0):
    """A tiny COCO in its own layout: noise images, each with a square (category 1, a polygon), a bar
    (category 3, compressed RLE) and a crowd region (uncompressed RLE, iscrowd 1), as COCO's files hold
    them; each object bright in a channel of its own."""
    needs_pycocotools()
    from pycocotools import mask as rle

    g, ann_id = torch.Generator().manual_seed(seed), 0
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "val"), sizes):
        (root / f"{split}2017").mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            img = torch.randint(0, 100, (3, side, side), dtype=torch.uint8, generator=g)
            third = side // 3
            for k, (category, crowd) in enumerate(((1, 0), (3, 0), (1, 1))):  # one object in each third
                h, w = (int(torch.randint(third // 3, third, (), generator=g)) for _ in range(2))
                h = h if category == 1 else max(h // 3, 2)
                y, x = (int(torch.randint(room, (), generator=g)) for room in (side - h, third - w))
                x += k * third
                img[k, y : y + h, x : x + w] = 255
                m = torch.zeros(side, side, dtype=torch.uint8)
                m[y : y + h, x : x + w] = 1
                if crowd:  # COCO's crowd regions: run lengths down the columns, starting with a run of 0s
                    runs = [len(list(r)) for _, r in itertools.groupby(m.T.flatten().tolist())]
                    segmentation = dict(size=[side, side], counts=[0] * bool(m[0, 0]) + runs)
                elif category == 3:
                    segmentation = rle.encode(np.asfortranarray(m.numpy()))
                    segmentation["counts"] = segmentation["counts"].decode()
                else:
                    segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                ann_id += 1
                annotations.append(
                    dict(
                        id=ann_id,
                        image_id=i + 1,
                        category_id=category,
                        segmentation=segmentation,
                        area=h * w,
                        bbox=[x, y, w, h],
                        iscrowd=crowd,
                    )
                )
            images.append(dict(id=i + 1, file_name=f"{i + 1:012d}.jpg", height=side, width=side))
            TF.to_pil_image(img).save(root / f"{split}2017" / images[-1]["file_name"], quality=95)
        kinds = [dict(id=1, name="square"), dict(id=3, name="bar")]
        content = dict(images=images, annotations=annotations, categories=kinds)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(content))


def write_ade20k(root: Path, sizes=(16, 8), side: int = 128, seed: int = 0, classes: int = 4):
    """A tiny ADE20K in its own layout: noise images with rectangles of classes 1..classes, each its own
    colour, over "other" (0) in uint8 PNG label maps."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (classes + 1, 3), generator=g, dtype=torch.uint8)
    for split, n in zip(("training", "validation"), sizes):
        for folder in ("images", "annotations"):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = torch.randint(0, 100, (3, side, side), dtype=torch.uint8, generator=g)
            label = torch.zeros(side, side, dtype=torch.uint8)
            for k in range(1, classes + 1):
                y, x = torch.randint(side * 3 // 4, (2,), generator=g).tolist()
                label[y : y + side // 4, x : x + side // 4] = k
            img = torch.where(label > 0, colours[label.long()].permute(2, 0, 1), img)
            TF.to_pil_image(img).save(root / "images" / split / f"ADE_{split}_{i + 1:08d}.jpg", quality=95)
            TF.to_pil_image(label).save(root / "annotations" / split / f"ADE_{split}_{i + 1:08d}.png")
