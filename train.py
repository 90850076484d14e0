"""Train MPVG models with plain DDP: CIFAR-100, ImageNet (any ImageFolder) or built-in data.

    python train.py --data synthetic --epochs 3                      # one process: a CPU or one GPU
    torchrun --standalone --nproc_per_node=8 train.py --data imagenet --data-path /data/imagenet \
        --model deit_small --pe mpvg                                 # the paper's Table 1 recipe
    python train.py --eval-only --resume runs/mpvg/best.pt          # top-1 / top-5 of a checkpoint

Every recipe value (paper Table 7, with the anchors' details) but mean and std is a flag; `--help` lists
them. The benchmark, the analysis figures, the workshop and the device augmentation live in tools/, and
so do the details of resuming, fine-tuning and the run's folder.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from tqdm import tqdm

from mpvg import PE_MODES, PRESETS, Config, VisionTransformer
from tools import device_data, pretrained, resume
from tools.builtin_data import builtin_datasets
from tools.flags import HelpFormatter, boolean, fail, layer_or_none, out_of_range
from tools.mixing import Mixing
from tools.randaugment import RandAugment
from tools.run_folder import FolderError, RunFolder, on_rank_0, read_checkpoint

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)

# Paper Table 7 with the anchors' values: facebookresearch/deit main.py (ImageNet) and
# SHI-Labs/Compact-Transformers configs/datasets/cifar100.yml (CIFAR-100); the README cites each row.
RECIPES = {
    "deit": dict(
        model="deit_tiny", epochs=300, cooldown_epochs=0, batch_size=1024, lr=5e-4, lr_batch_scale=512,
        min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=5, weight_decay=0.05, decay_pos_embed=False,
        drop_path=0.1, attn_drop=0.0, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug_magnitude=9, reprob=0.25,
        repeated_aug=3, crop_scale=0.08, hflip=0.5, eval_crop=0.875, interpolation="bicubic",
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ),
    "cifar": dict(
        model="vit_lite_7_4", epochs=310, cooldown_epochs=10, batch_size=128, lr=6e-4, lr_batch_scale=0,
        min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=10, weight_decay=0.06, decay_pos_embed=True,
        drop_path=0.1, attn_drop=0.1, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug_magnitude=9, reprob=0.25,
        repeated_aug=1, crop_scale=0.8, hflip=0.5, eval_crop=1.0, interpolation="random",
        mean=CIFAR100_MEAN, std=CIFAR100_STD,
    ),
    # The built-in position task (--data synthetic): CPU minutes, nothing that moves or mixes pixels.
    "synthetic": dict(
        model="vit_lite_7_4", epochs=10, cooldown_epochs=0, batch_size=64, lr=1e-3, lr_batch_scale=0,
        min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=1, weight_decay=0.05, decay_pos_embed=False,
        drop_path=0.0, attn_drop=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, randaug_magnitude=0, reprob=0.0,
        repeated_aug=1, crop_scale=1.0, hflip=0.0, eval_crop=1.0, interpolation="bicubic",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    ),
}  # fmt: skip

MODEL_FLAGS = [  # flag dest -> Config field; None on the command line means "from the preset"
    "pe", "pool", "pe_input", "pe_layers", "pe_hierarchical", "last_pe",
    "img_size", "patch_size", "dim", "depth", "heads",
]  # fmt: skip
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch's
RANGES = {  # every numeric flag's allowed values: [ and ] include the bound, ( and ) exclude it
    "epochs": "[1, inf)", "cooldown_epochs": "[0, inf)", "warmup_epochs": "[0, inf)", "batch_size": "[1, inf)",
    "accum_steps": "[1, inf)", "lr": "(0, inf)", "lr_batch_scale": "[0, inf)", "min_lr": "[0, inf)",
    "warmup_lr": "[0, inf)", "weight_decay": "[0, inf)", "drop_path": "[0, 1)", "attn_drop": "[0, 1)",
    "smoothing": "[0, 1)", "mixup": "[0, inf)", "cutmix": "[0, inf)", "randaug_magnitude": "[0, 10]",
    "reprob": "[0, 1]", "repeated_aug": "[1, inf)", "crop_scale": "(0, 1]", "hflip": "[0, 1]",
    "eval_crop": "(0, 1]", "synthetic_size": "[1, inf)", "workers": "[0, inf)", "log_every": "[1, inf)",
    "seed": "[0, 4294967296)",  # 2 ** 32: the seeds derived from it stay within torch's 64 bits
}  # fmt: skip


class DataError(Exception):
    """A training image that cannot be read; raised in a loader worker, reported in one line."""


# Command line


def add_data_flags(p: argparse.ArgumentParser, default: str = "cifar100"):
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=["cifar100", "imagenet", "synthetic", "noise"], default=default,
                   help="synthetic: a built-in task that only position solves; noise: random images and "
                        "labels (for benchmarks)")  # fmt: skip
    g.add_argument("--data-path", default="./data", help="CIFAR-100 root, or a folder with train/ and val/")
    g.add_argument("--synthetic-size", type=int, default=2560, help="training images of synthetic and noise")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="loader workers per rank: min(8, CPU cores)")  # fmt: skip
    g.add_argument("--device-data", choices=["auto", "on", "off"], default="auto",
                   help="hold the data set on the device as uint8 and augment whole chunks there "
                        "(fixed-size sets; auto: on for cifar100 on CUDA)")  # fmt: skip


def add_model_flags(
    p: argparse.ArgumentParser, unset="the preset's value, or the checkpoint's on --resume", pe="mpvg"
):
    g = p.add_argument_group(f"model (unset: {unset})")
    models = ", ".join(f"{r}: {RECIPES[r]['model']}" for r in RECIPES)
    g.add_argument("--model", choices=list(PRESETS), default=None, help=f"preset [from --recipe; {models}]")
    g.add_argument("--pe", choices=list(PE_MODES), default=None, help=f"PE mode [{pe}]")
    g.add_argument("--pool", choices=["cls", "gap"], default=None, help="[from --pe]")
    g.add_argument("--pe-input", type=boolean, default=None,
                   help="add PE before layer 0, Eq. 1/8 [from --pe]")  # fmt: skip
    g.add_argument("--pe-layers", choices=["none", "all", "skip0"], default=None, help="Eq. 6/9 [from --pe]")
    g.add_argument("--pe-hierarchical", type=boolean, default=None, help="Eq. 7/10 vs Table 6 [from --pe]")
    g.add_argument("--last-pe", type=layer_or_none, default=None,
                   help="k of LN(pos_k), Eq. 11, or none [from --pe]")  # fmt: skip
    for name in ("--img-size", "--patch-size", "--dim", "--depth", "--heads"):
        g.add_argument(name, type=int, default=None, help="[the preset's]")


def add_recipe_flags(p: argparse.ArgumentParser):
    def recipe_flag(name, type, help, **kw):
        key = name.lstrip("-").replace("-", "_")
        values = ", ".join(f"{r}: {RECIPES[r][key]}" for r in RECIPES)
        g.add_argument(name, type=type, default=None, help=f"{help} [from --recipe; {values}]".lstrip(), **kw)

    g = p.add_argument_group("recipe (deit: ImageNet, DeiT; cifar: CIFAR-100, ViT-Lite; synthetic: built-in)")
    g.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="[deit for imagenet and DeiT models on noise; synthetic for synthetic; else cifar]")  # fmt: skip
    recipe_flag("--epochs", int, "epochs in all, cooldown included")
    recipe_flag("--cooldown-epochs", int, "last epochs held at --min-lr")
    recipe_flag("--batch-size", int, "global batch, split over the ranks (and --accum-steps)")
    recipe_flag("--lr", float, "peak learning rate, before the batch scaling")
    recipe_flag("--lr-batch-scale", int, "lr is scaled by batch / this (0: no scaling)")
    recipe_flag("--min-lr", float, "end of the cosine")
    recipe_flag("--warmup-lr", float, "linear warmup starts here")
    recipe_flag("--warmup-epochs", int, "")
    recipe_flag("--weight-decay", float, "AdamW; never on biases and LayerNorms")
    recipe_flag("--decay-pos-embed", boolean, "weight decay on pos_embed and cls_token too")
    recipe_flag("--drop-path", float, "stochastic depth of the last layer")
    recipe_flag("--attn-drop", float, "dropout on attention weights")
    recipe_flag("--smoothing", float, "label smoothing")
    recipe_flag("--mixup", float, "Mixup alpha (0: off)")
    recipe_flag("--cutmix", float, "CutMix alpha (0: off); with both on, one of the two per batch")
    recipe_flag("--randaug-magnitude", int, "timm's RandAugment rand-mM-mstd0.5-inc1, M of 10 (0: off)")
    recipe_flag("--reprob", float, "random erasing probability, per-pixel noise")
    recipe_flag("--repeated-aug", int, "copies of each image drawn, side by side (so almost always in one "
                "step); an epoch stays len(dataset) samples (1: off)")  # fmt: skip
    recipe_flag("--crop-scale", float, "smallest area of RandomResizedCrop")
    recipe_flag("--hflip", float, "horizontal flip probability")
    recipe_flag("--eval-crop", float, "center crop over resize at evaluation")
    recipe_flag("--interpolation", str, "of the training crop and RandAugment (evaluation: bicubic for random)",
                choices=["bilinear", "bicubic", "random"])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    about = ("Train or evaluate ViT/DeiT with the paper's PE modes. On --resume, a flag not given takes the "
             "checkpoint's value, not the default shown, except --workers, --compile and --log-every.")  # fmt: skip
    p = argparse.ArgumentParser(description=about, formatter_class=HelpFormatter, allow_abbrev=False)
    add_data_flags(p)
    add_model_flags(p)
    add_recipe_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation")
    g.add_argument("--output-dir", default="runs/default", help="checkpoints and metrics.jsonl of one run")
    g.add_argument("--resume", default=None,
                   help="continue a run from its checkpoint: a path (the run's own folder is written), or "
                        "auto: the newest in --output-dir")  # fmt: skip
    g.add_argument("--finetune", default=None, metavar="CKPT",
                   help="start a new run from these weights (train.py's, DeiT's or timm's): a new head "
                        "for another class count, pos_embed resized to --img-size")  # fmt: skip
    g.add_argument("--eval-only", action="store_true", help="evaluate the --resume checkpoint and stop")
    g.add_argument("--accum-steps", type=int, default=1, help="micro-batches per step: the same update as "
                   "the whole --batch-size at once, in less memory")  # fmt: skip
    g.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the model, in this mode (reduce-overhead: CUDA graphs)")  # fmt: skip
    g.add_argument("--log-every", type=int, default=20, help="steps between progress updates")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    path = resume.checkpoint_to_resume(args)  # None for a new run
    state = load_checkpoint(path) if path else None
    if state:  # a resumed run is the same run: what the command line does not give again comes from it
        if not args.eval_only:  # an evaluation builds no optimizer: it may change these
            resume.check_unchanged(args, state, path)
        own = {} if args.resume == "auto" else dict(output_dir=str(path.parent))  # not runs/default
        args = resume.inherit(p, argv, state, INHERITED, **own)
    args.resume_path, args.resume_state = path, state
    return resolve_recipe(args)


INHERITED = {"data", "data_path", "synthetic_size", "device_data", "recipe", "seed", "accum_steps",
             *(k for k in RECIPES["deit"] if k != "model")}  # fmt: skip


def resolve_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """The recipe's value for every recipe flag left unset, then every number checked."""
    if args.recipe is None:
        deit = args.data == "imagenet" or (args.data == "noise" and (args.model or "").startswith("deit"))
        args.recipe = "synthetic" if args.data == "synthetic" else "deit" if deit else "cifar"
    for key, value in RECIPES[args.recipe].items():
        if key != "model" and getattr(args, key, None) is None:  # the model: see model_config
            setattr(args, key, value)
    if problem := out_of_range(args, RANGES):
        fail(problem)
    return args


# Data


class Augmented(Dataset):
    """A data set with a random transform whose randomness depends only on (seed, epoch, index, copy).

    The samplers below pass (index, epoch, copy): each image gets the same augmentation whatever the
    number of ranks or loader workers, so a resumed run and a run on more GPUs see exactly the same
    data; the copies of repeated augmentation each get their own.
    """

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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(
                (((self.seed * 1_000_003 + epoch) * 101 + copy) * 1_000_000_007 + index) % 2**63
            )
            return self.transform(img), label


class EpochSampler(Sampler):
    """Each epoch's shuffled order (seed + epoch), dealt to the ranks in turn, as (index, epoch, copy).
    With repeats > 1 it is DeiT's repeated augmentation (its RASampler, on any number of processes): each
    image drawn appears `repeats` times, each copy with its own augmentation, side by side in the order and
    so in the same global step unless a step boundary falls between them. An epoch keeps len(dataset)
    samples, so it draws len(dataset) / repeats images, the last partial round dropped (DeiT also rounds it
    down to a multiple of 256; we do not). With repeats = 1 this is torch's DistributedSampler with shuffle
    and drop_last, to the index."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, repeats: int = 1):
        self.n, self.world, self.rank, self.repeats, self.seed, self.epoch = (
            len(dataset), num_replicas, rank, repeats, seed, 0,
        )  # fmt: skip
        self.num_samples = self.n // num_replicas

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).repeat_interleave(self.repeats)
        copy = torch.arange(len(order)) % self.repeats  # which of the repeats: each its own augmentation
        mine = torch.arange(self.rank, len(order), self.world)[: self.num_samples]
        return ((int(order[k]), self.epoch, int(copy[k])) for k in mine)


def build_transforms(args: argparse.Namespace, img_size: int):
    """The recipe's per-image training and evaluation transforms (timm's order), on uint8 tensors;
    both end in plain tensors (no tv_tensors subclass reaches the model)."""
    mode = lambda name: getattr(InterpolationMode, name.upper())  # noqa: E731
    crops = [v2.RandomResizedCrop(img_size, scale=(args.crop_scale, 1.0), interpolation=mode(m))
             for m in (("bilinear", "bicubic") if args.interpolation == "random" else (args.interpolation,))]  # fmt: skip
    train = [v2.ToImage(), v2.ToPureTensor(), v2.RandomChoice(crops), v2.RandomHorizontalFlip(args.hflip)]
    if args.randaug_magnitude > 0:
        train.append(RandAugment(args.randaug_magnitude, args.mean, args.interpolation))
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(args.mean, args.std)]
    train += tail
    if args.reprob > 0:
        train.append(v2.RandomErasing(args.reprob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random"))
    resize = v2.Resize(int(img_size / args.eval_crop), mode(args.interpolation.replace("random", "bicubic")))
    val = [v2.ToImage(), v2.ToPureTensor(), resize, v2.CenterCrop(img_size), *tail]
    return v2.Compose(train), v2.Compose(val)


def build_datasets(args: argparse.Namespace, img_size: int, noise_classes: int):
    """(train, val, num_classes), each set without transforms."""
    root = Path(args.data_path)
    if args.data in ("synthetic", "noise"):
        try:
            return builtin_datasets(args.data, args.synthetic_size, img_size, noise_classes, args.seed)
        except ValueError as e:
            fail(str(e))
    if args.data == "cifar100":
        try:
            train = torchvision.datasets.CIFAR100(root, train=True, download=True)
            val = torchvision.datasets.CIFAR100(root, train=False, download=True)
        except Exception as e:  # offline, a half-downloaded archive, no permission, ...
            fail(f"could not load CIFAR-100 under --data-path {root} ({type(e).__name__}: {e}); put "
                 f"cifar-100-python/ there (or allow the download), or use --data synthetic")  # fmt: skip
        return train, val, 100
    try:
        train, val = (torchvision.datasets.ImageFolder(root / split) for split in ("train", "val"))
    except OSError as e:  # no such folder, no class folders, no images in one, no permission
        fail(f"--data imagenet expects {root}/train/ and {root}/val/, one folder of images per class ({e}); "
             f"check --data-path")  # fmt: skip
    if train.classes != val.classes:
        fail(f"{root}/train and {root}/val hold different class folders; they must match")
    return train, val, len(train.classes)


def chance(train_set, val_set) -> float:
    """Validation top-1 of always answering the training set's commonest class, in percent (what a model
    that learnt nothing but the label frequencies scores; the validation set's own commonest would be an
    oracle)."""
    commonest = torch.bincount(torch.tensor(train_set.targets)).argmax()
    return 100 * (torch.tensor(val_set.targets) == commonest).float().mean().item()


def make_loaders(args, train_set, val_set, img_size: int, batch: int, device):
    """Training and validation loaders of `batch` images per rank: DataLoader workers by default; with
    --device-data, the whole set as uint8 on the device and the augmentations batched there."""
    rank, world = args.rank, args.world
    train_tf, val_tf = build_transforms(args, img_size)
    sampler = EpochSampler(train_set, world, rank, args.seed, repeats=args.repeated_aug)
    if device_data.wanted(args, device):
        train, val = device_data.loaders(args, train_set, val_set, sampler, img_size, batch, val_tf, device)
        return train, val, sampler
    train_set, val_set = Augmented(train_set, train_tf, args.seed), Augmented(val_set, val_tf, args.seed)
    seeds = torch.Generator().manual_seed(args.seed)  # the workers': not from the global RNG (dropout, Mixup)
    workers = dict(num_workers=args.workers, prefetch_factor=4 if args.workers else None, generator=seeds,
                   persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")  # fmt: skip
    train = DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=True, **workers)
    shard = Subset(val_set, range(rank, len(val_set), world))  # every image once, none padded
    val = DataLoader(shard, batch_size=batch, shuffle=False, **workers)
    return train, val, sampler


# Model, optimiser and schedule


def model_config(args, saved: dict | None = None, strict: bool = True) -> Config:
    """The model this run asks for. From a checkpoint's config, what the flags leave unset comes from it;
    what they set must equal it on resume (strict) and replaces it on --finetune. (num_classes is the
    preset's until the data set is known.)"""
    explicit = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if explicit.get("last_pe") == "none":
        explicit["last_pe"] = None
    if saved is None:
        fields = {**PRESETS[args.model or RECIPES[args.recipe]["model"]], "pe": "mpvg", **explicit}
    else:
        wanted = {**(PRESETS[args.model] if args.model else {}), **explicit}
        wanted.pop("num_classes", None)  # checked against the data set instead
        if "pe" in wanted and wanted["pe"] != saved["pe"]:  # a new mode re-derives the knobs left unset
            wanted = {**PE_MODES[wanted["pe"]], **wanted}
        diffs = [f"{k}={saved[k]!r} there but {v!r} here" for k, v in wanted.items() if saved.get(k) != v]
        if strict and diffs:
            fail(f"the checkpoint was trained with another model: {'; '.join(diffs)}. Resume with the "
                 f"checkpoint's settings, or start a new run in another --output-dir")  # fmt: skip
        fields = {**saved, **wanted}
    try:
        return Config.from_dict({**fields, "drop_path": args.drop_path, "attn_drop": args.attn_drop})
    except ValueError as e:  # Config's own checks: say it in one line, as for any flag
        fail(str(e))


def build_optimizer(model, args, lr: float, device: torch.device):
    """AdamW, no weight decay on biases and LayerNorms (all 1-D parameters, as timm's optimizer factory),
    nor on pos_embed and cls_token unless --decay-pos-embed (DeiT exempts them, Compact Transformers not)."""
    skip = {n for n, p in model.named_parameters() if p.ndim <= 1}
    if not args.decay_pos_embed:
        skip |= set(model.no_weight_decay())
    params = list(model.named_parameters())
    groups = [
        dict(params=[p for n, p in params if n not in skip], weight_decay=args.weight_decay),
        dict(params=[p for n, p in params if n in skip], weight_decay=0.0),
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


def peak_lr(args) -> float:
    return args.lr * args.batch_size / args.lr_batch_scale if args.lr_batch_scale else args.lr


def lr_at(epoch: int, args) -> float:
    """timm's per-epoch cosine schedule, as DeiT and Compact Transformers use it: linear warmup from
    warmup_lr, cosine from the peak to min_lr over epochs - cooldown_epochs, then min_lr."""
    peak, cosine_epochs = peak_lr(args), args.epochs - args.cooldown_epochs
    if epoch < args.warmup_epochs:
        return args.warmup_lr + epoch * (peak - args.warmup_lr) / args.warmup_epochs
    if epoch >= cosine_epochs:
        return args.min_lr
    return args.min_lr + 0.5 * (peak - args.min_lr) * (1 + math.cos(math.pi * epoch / cosine_epochs))


def compile_model(model, mode: str | None):
    """torch.compile in one of COMPILE_MODES with static shapes (the CUDA graphs of reduce-overhead replay
    one shape), or the model itself when mode is None."""
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False) if mode else model


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing, for class ids (B,) or Mixup/CutMix soft targets (B, C)."""
    logits = logits.float()
    if target.ndim == 1:
        return F.cross_entropy(logits, target, label_smoothing=smoothing)
    target = target * (1.0 - smoothing) + smoothing / logits.shape[-1]
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


# Checkpoints: what one holds and how it is read (tools/run_folder.py writes them, tools/resume.py resumes)


CHECKPOINT_KEYS = {"model", "model_config", "epoch", "optimizer", "args", "rng", "best", "run_id"}


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint of train.py (with every key of CHECKPOINT_KEYS), or one line for what is wrong with it."""
    try:
        return read_checkpoint(Path(path), CHECKPOINT_KEYS)
    except FolderError as e:
        fail(str(e))


# Distributed set-up: torchrun's ranks (RANK, WORLD_SIZE and LOCAL_RANK, read in main), or one process


def pick_device(local_rank: int = 0) -> torch.device:
    """This rank's GPU where there is one, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# Training and evaluation


@torch.no_grad()
def evaluate(model, loader, device, amp: bool, batch: int | None = None) -> dict:
    """Loss, top-1 and top-5 over every validation image of every rank. With `batch`, a short last batch
    is padded to that size and the padding ignored, so a compiled model sees one shape."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top-1, top-5, count
    for img, target in loader:
        img, target = img.to(device, non_blocking=True), target.to(device, non_blocking=True)
        n = len(target)
        if batch and n < batch:
            img = torch.cat([img, img[:1].expand(batch - n, *img.shape[1:])])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(img)[:n]
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == target[:, None]
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
        counts = [loss, hits[:, 0].sum(), hits.any(-1).sum(), torch.tensor(n, device=device)]
        sums += torch.stack([c.to(torch.float64) for c in counts])  # all on the device: no sync per batch
    loss, top1, top5, n = all_reduce(sums).tolist()
    return dict(val_loss=loss / max(n, 1), val_top1=100 * top1 / max(n, 1), val_top5=100 * top5 / max(n, 1))


def train_step(model, optimizer, micro_batches, smoothing: float, amp: bool) -> torch.Tensor:
    """One optimizer step over one or more micro-batches [(img, target)]: the gradient of their mean loss,
    exactly as one batch of them all (no BatchNorm here). DDP syncs gradients on the last one only."""
    last = len(micro_batches) - 1
    total = 0.0
    for i, (img, target) in enumerate(micro_batches):
        sync = model.no_sync() if i < last and isinstance(model, DDP) else contextlib.nullcontext()
        with sync:
            with torch.autocast(img.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(img)
            loss = soft_cross_entropy(logits, target, smoothing) / len(micro_batches)
            loss.backward()
        total = total + loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def train_one_epoch(model, loader, optimizer, mixing, args, epoch, device, amp) -> dict:
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen, start, steps = 0, time.perf_counter(), len(loader) // args.accum_steps
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", disable=True if args.rank else None,
               leave=False, dynamic_ncols=True)  # fmt: skip
    batches, step = [], 0
    for img, target in loader:
        img, target = img.to(device, non_blocking=True), target.to(device, non_blocking=True)
        batches.append(mixing(img, target) if mixing is not None else (img, target))
        if len(batches) < args.accum_steps:
            continue
        loss = train_step(model, optimizer, batches, args.smoothing, amp)
        loss_sum += loss * sum(len(b[0]) for b in batches)
        seen += sum(len(b[0]) for b in batches) * args.world
        batches, step = [], step + 1
        bar.update()
        if step % args.log_every == 0:  # the only host-device syncs of the loop
            current = all_reduce(loss.clone()).item() / args.world
            check_finite(current, epoch, step, args)
            bar.set_postfix(loss=f"{current:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}")  # fmt: skip
    bar.close()
    seconds = time.perf_counter() - start
    total = all_reduce(
        torch.stack([loss_sum, torch.tensor(seen / args.world, device=device, dtype=torch.float64)])
    )
    train_loss = (total[0] / total[1].clamp(min=1)).item()
    check_finite(train_loss, epoch, None, args)
    return dict(train_loss=train_loss, images_per_sec=seen / seconds, seconds=seconds)


def check_finite(loss: float, epoch: int, step: int | None, args):
    if not math.isfinite(loss):
        where = f"epoch {epoch + 1}" + (f", step {step}" if step is not None else "")
        fail(
            f"the training loss became {loss} at {where}; stopped without saving, so the last good checkpoint "
            f"in {args.output_dir} is untouched. Lower --lr or check the data, then --resume auto"
        )


def main(argv=None):
    args = parse_args(argv)
    args.rank, args.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    if args.batch_size % (args.world * args.accum_steps):
        fail(f"--batch-size {args.batch_size} is not divisible by {args.world} process(es) x {args.accum_steps} "
             f"accumulation step(s): the global batch is split evenly over them")  # fmt: skip
    device = pick_device(int(os.environ.get("LOCAL_RANK", 0)))
    args.progress = dict(epoch=None)  # the epoch an interrupt reports
    try:
        with resume.interruptible(args):  # says what is saved before the teardown below
            if args.world > 1:
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                        device_id=device if device.type == "cuda" else None)  # fmt: skip
            return run(args, device)
    except DataError as e:  # raised in a loader worker: its last line is ours; the image is this rank's
        fail(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1], every_rank=True)
    except FolderError as e:
        fail(str(e))
    finally:
        if getattr(args, "folder", None) and args.folder.lock:
            args.folder.lock.close()  # the OS lock goes with it (as it would with the process)
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, device):
    master = args.rank == 0
    torch.manual_seed(args.seed + args.rank)
    random.seed(args.seed + args.rank)
    amp = device.type == "cuda"  # bf16 autocast on CUDA, fp32 on a CPU
    out, ckpt = Path(args.output_dir), args.resume_state
    if master and args.resume == "auto" and ckpt is None:
        print(f"--resume auto: no checkpoint in {out}, starting a new run")
    weights, saved = pretrained.read(args.finetune) if args.finetune else (None, None)
    cfg = model_config(args, ckpt["model_config"] if ckpt else saved, strict=ckpt is not None)
    train_set, val_set, num_classes = build_datasets(args, cfg.img_size, noise_classes=cfg.num_classes)
    cfg = replace(cfg, num_classes=num_classes)
    per_rank = args.batch_size // (args.world * args.accum_steps)

    model = VisionTransformer(cfg).to(device)
    if ckpt:
        resume.load_weights(model, ckpt, args.resume_path)
    elif weights is not None:
        pretrained.finetune(model, weights, args.finetune)
    compiled = compile_model(model, args.compile)
    train_loader, val_loader, sampler = make_loaders(args, train_set, val_set, cfg.img_size, per_rank, device)
    static = per_rank if args.compile else None  # one shape for the compiled graph

    if args.eval_only:
        metrics = evaluate(compiled, val_loader, device, amp, static)
        if master:
            print(f"{args.resume_path}: top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%  "
                  f"loss {metrics['val_loss']:.4f} on {len(val_set)} images")  # fmt: skip
        return metrics
    if len(train_loader) < args.accum_steps:
        fail(f"the training set gives {len(sampler)} images per process, fewer than one step of "
             f"{args.batch_size // args.world}: lower --batch-size (or --accum-steps), or add data")  # fmt: skip

    cuda = [device.index] if device.type == "cuda" else None
    ddp = DDP(compiled, device_ids=cuda) if args.world > 1 else compiled
    optimizer = build_optimizer(model, args, lr_at(0, args), device)
    mixing = Mixing(args.mixup, args.cutmix, num_classes) if args.mixup > 0 or args.cutmix > 0 else None
    start_epoch, best, run_id = 0, dict(val_top1=-1.0, epoch=-1), uuid.uuid4().hex
    if ckpt:
        start_epoch, best, run_id = resume.restore(ckpt, optimizer, args, device)
    folder, chance_top1 = RunFolder(out), chance(train_set, val_set)
    args.folder = folder
    claimed = on_rank_0(args.rank, device, folder.claim, run_id, start_epoch - 1)  # drops later metrics
    if master:
        if claimed != run_id:  # a fork, in a folder of its own: its best is among the epochs it trains
            run_id, best = claimed, dict(val_top1=-1.0, epoch=-1)
        params = sum(p.numel() for p in model.parameters())
        if args.epochs <= args.warmup_epochs + args.cooldown_epochs:
            print(f"note: --epochs {args.epochs} leaves no cosine phase after {args.warmup_epochs} warmup and "
                  f"{args.cooldown_epochs} cooldown epochs; set --warmup-epochs and --cooldown-epochs for short runs")  # fmt: skip
        print(f"{args.recipe} recipe, {cfg.pe} ({cfg.pool}), {params:,} parameters, {len(train_set)} training "
              f"images, {args.world} process(es) on {device.type}, batch {args.batch_size}, peak lr {peak_lr(args):.3g}; "
              f"chance: {chance_top1:.2f}% (always the training set's commonest class)")  # fmt: skip

    for epoch in range(start_epoch, args.epochs):
        args.progress["epoch"] = epoch
        sampler.set_epoch(epoch)
        lr = lr_at(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics = dict(
            epoch=epoch + 1, **train_one_epoch(ddp, train_loader, optimizer, mixing, args, epoch, device, amp)
        )
        metrics.update(evaluate(compiled, val_loader, device, amp, static), lr=lr)
        if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():  # one sync an epoch
            fail(f"the weights became non-finite in epoch {epoch + 1}; nothing was saved, so the last good "
                 f"checkpoint in {args.output_dir} is untouched. Lower --lr, then --resume auto")  # fmt: skip
        is_best = metrics["val_top1"] > best["val_top1"]
        if is_best:
            best = dict(val_top1=metrics["val_top1"], epoch=epoch + 1)
        state = dict(  # on every rank (references, no copies); rank 0 writes it
            model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch, best=best, run_id=run_id,
            model_config=asdict(cfg), rng=resume.rng_states(device, args.world), lr=lr,
            args={k: v for k, v in vars(args).items() if v is None or isinstance(v, (str, int, float, bool, list, tuple))},
        )  # fmt: skip
        on_rank_0(args.rank, device, folder.save, epoch, metrics, state, is_best)
        if master:
            print(f"epoch {epoch + 1}/{args.epochs}  train loss {metrics['train_loss']:.4f}  val loss "
                  f"{metrics['val_loss']:.4f}  top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%  "
                  f"lr {lr:.2e}  {metrics['images_per_sec']:.0f} img/s  {metrics['seconds']:.1f}s")  # fmt: skip
    if master:
        files = ", ".join(f.name for f in (out / "best.pt", out / "checkpoint.pt") if f.exists())
        print(f"best top-1 {best['val_top1']:.2f}% at epoch {best['epoch']} (chance {chance_top1:.2f}%); "
              f"{out}/ holds {files}, metrics.jsonl")  # fmt: skip
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while rank 0 is still writing
    return best


if __name__ == "__main__":
    main(sys.argv[1:])
