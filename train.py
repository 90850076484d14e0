"""Train MPVG models with plain DDP: CIFAR-100, ImageNet (any ImageFolder) or synthetic data.

    python train.py --data synthetic --epochs 2                      # one process: a CPU or one GPU
    torchrun --standalone --nproc_per_node=8 train.py --data imagenet --data-path /data/imagenet \
        --model deit_small --pe mpvg                                 # the paper's Table 1 recipe
    python train.py --eval-only --resume runs/mpvg/best.pt          # top-1 / top-5 of a checkpoint

The benchmark, the paper's analysis figures, the workshop and the batched device augmentation live in
tools/, one file each.

Every recipe value (paper Table 7, with the anchors' details) is a flag; `--help` lists them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from tqdm import tqdm

from mpvg import PE_MODES, PRESETS, Config, VisionTransformer
from tools.device_data import BatchAugment, DeviceLoader, as_tensors

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)

# Paper Table 7 with the anchors' defaults: facebookresearch/deit (ImageNet) and
# SHI-Labs/Compact-Transformers configs/datasets/cifar100.yml (CIFAR-100).
RECIPES = {
    "deit": dict(
        model="deit_tiny", epochs=300, cooldown_epochs=0, batch_size=1024, lr=5e-4, lr_batch_scale=512,
        min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=5, weight_decay=0.05, drop_path=0.1, attn_drop=0.0,
        smoothing=0.1, mixup=0.8, cutmix=1.0, randaug_magnitude=9, reprob=0.25, repeated_aug=3,
        crop_scale=0.08, eval_crop=0.875, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ),
    "cifar": dict(
        model="vit_lite_7_4", epochs=310, cooldown_epochs=10, batch_size=128, lr=6e-4, lr_batch_scale=0,
        min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=10, weight_decay=0.06, drop_path=0.1, attn_drop=0.1,
        smoothing=0.1, mixup=0.8, cutmix=1.0, randaug_magnitude=9, reprob=0.25, repeated_aug=1,
        crop_scale=0.8, eval_crop=1.0, interpolation="bilinear", mean=CIFAR100_MEAN, std=CIFAR100_STD,
    ),
}  # fmt: skip

MODEL_FLAGS = [  # flag dest -> Config field; None on the command line means "from the preset"
    "pe", "pool", "pe_input", "pe_layers", "pe_hierarchical", "last_pe",
    "img_size", "patch_size", "dim", "depth", "heads",
]  # fmt: skip


def fail(message: str):
    """A user error: one clear line, no traceback."""
    raise SystemExit(f"train.py: error: {message}")


# ----------------------------------------------------------------------------------------------
# Command line


def boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def layer_or_none(text: str) -> int | str:
    return "none" if text.lower() == "none" else int(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one; flags whose default comes from elsewhere say so."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def add_data_flags(p: argparse.ArgumentParser, default: str = "cifar100"):
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=["cifar100", "imagenet", "synthetic"], default=default)
    g.add_argument("--data-path", default="./data", help="CIFAR-100 root, or a folder with train/ and val/")
    g.add_argument("--synthetic-size", type=int, default=2560, help="training images of --data synthetic")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers per rank")
    g.add_argument("--device-data", choices=["auto", "on", "off"], default="auto",
                   help="hold the data set on the device as uint8 and augment whole batches there "
                        "(cifar recipe; auto: on for cifar100 on CUDA)")  # fmt: skip


def add_model_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("model (unset: the preset's value, or the checkpoint's on --resume)")
    g.add_argument("--model", choices=list(PRESETS), default=None, help="preset [from --recipe]")
    g.add_argument("--pe", choices=list(PE_MODES), default=None, help="PE mode [mpvg]")
    g.add_argument("--pool", choices=["cls", "gap"], default=None, help="[from --pe]")
    g.add_argument(
        "--pe-input", type=boolean, default=None, help="add PE before layer 0, Eq. 1/8 [from --pe]"
    )
    g.add_argument("--pe-layers", choices=["none", "all", "skip0"], default=None, help="Eq. 6/9 [from --pe]")
    g.add_argument("--pe-hierarchical", type=boolean, default=None, help="Eq. 7/10 vs Table 6 [from --pe]")
    g.add_argument(
        "--last-pe", type=layer_or_none, default=None, help="k of LN(pos_k), Eq. 11, or none [from --pe]"
    )
    for name in ("--img-size", "--patch-size", "--dim", "--depth", "--heads"):
        g.add_argument(name, type=int, default=None, help="[the preset's]")


def add_recipe_flags(p: argparse.ArgumentParser):
    def recipe_flag(name, type, help):
        key = name.lstrip("-").replace("-", "_")
        values = ", ".join(f"{r}: {RECIPES[r][key]}" for r in RECIPES)
        g.add_argument(name, type=type, default=None, help=f"{help} [from --recipe; {values}]".lstrip())

    g = p.add_argument_group("recipe (--recipe deit: ImageNet, DeiT; cifar: CIFAR-100, ViT-Lite)")
    g.add_argument("--recipe", choices=list(RECIPES), default=None, help="[deit for imagenet, else cifar]")
    recipe_flag("--epochs", int, "epochs in all, cooldown included")
    recipe_flag("--cooldown-epochs", int, "last epochs held at --min-lr")
    recipe_flag("--batch-size", int, "global batch, split over the ranks")
    recipe_flag("--lr", float, "peak learning rate, before the batch scaling")
    recipe_flag("--lr-batch-scale", int, "lr is scaled by batch / this (0: no scaling)")
    recipe_flag("--min-lr", float, "end of the cosine")
    recipe_flag("--warmup-lr", float, "linear warmup starts here")
    recipe_flag("--warmup-epochs", int, "")
    recipe_flag("--weight-decay", float, "AdamW, not on biases, norms, pos_embed, cls_token")
    recipe_flag("--drop-path", float, "stochastic depth of the last layer")
    recipe_flag("--attn-drop", float, "dropout on attention weights")
    recipe_flag("--smoothing", float, "label smoothing")
    recipe_flag("--mixup", float, "Mixup alpha (0: off)")
    recipe_flag("--cutmix", float, "CutMix alpha (0: off); with both on, one of the two per batch")
    recipe_flag("--randaug-magnitude", int, "RandAugment, 2 ops, magnitude of 10 (0: off)")
    recipe_flag("--reprob", float, "random erasing probability, per-pixel noise")
    recipe_flag("--repeated-aug", int, "repeated augmentation count in distributed runs (1: off)")
    recipe_flag("--crop-scale", float, "smallest area of RandomResizedCrop")
    recipe_flag("--eval-crop", float, "center crop over resize at evaluation")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train or evaluate ViT/DeiT with the paper's PE modes.", formatter_class=HelpFormatter
    )
    add_data_flags(p)
    add_model_flags(p)
    add_recipe_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output-dir", default="runs/default", help="checkpoints and metrics.jsonl")
    g.add_argument("--resume", default=None, help="a checkpoint path, or auto: the newest in --output-dir")
    g.add_argument("--eval-only", action="store_true", help="evaluate the --resume checkpoint and stop")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--log-every", type=int, default=20, help="steps between progress updates")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    given = {
        a.dest for a in p._actions for o in a.option_strings for x in argv if x == o or x.startswith(o + "=")
    }
    args.resume_path, args.resume_state = find_checkpoint(args), None
    if args.resume_path:  # a resumed run is the same run: what is not given again comes from it
        args.resume_state = load_checkpoint(args.resume_path)
        for key, value in args.resume_state["args"].items():
            if key in INHERITED and key not in given:
                setattr(args, key, value)
    if args.eval_only and not args.resume_path:
        fail(f"--eval-only needs --resume CHECKPOINT (with auto: none in {args.output_dir} yet)")
    return resolve_recipe(args)


INHERITED = {
    "data",
    "data_path",
    "synthetic_size",
    "recipe",
    "seed",
    *(k for k in RECIPES["deit"] if k != "model"),
}


def find_checkpoint(args) -> Path | None:
    """--resume PATH, or with auto the newest checkpoint in --output-dir (None: none yet)."""
    if args.resume == "auto":
        newest = Path(args.output_dir) / "checkpoint.pt"
        return newest if newest.is_file() else None
    return Path(args.resume) if args.resume else None


def resolve_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """The recipe's value for every recipe flag left unset."""
    if args.recipe is None:
        deit_model = (args.model or "").startswith("deit")
        args.recipe = (
            "deit" if args.data == "imagenet" or (args.data == "synthetic" and deit_model) else "cifar"
        )
    for key, value in RECIPES[args.recipe].items():
        if key != "model" and getattr(args, key, None) is None:  # the model: see model_config
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------------------------
# Data


class SyntheticImages(Dataset):
    """Random uint8 images and labels, made on the fly from the index: no disk, same every time."""

    def __init__(self, size: int, num_classes: int, img_size: int, seed: int):
        self.size, self.num_classes, self.img_size, self.seed = size, num_classes, img_size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        img = torch.randint(0, 256, (3, self.img_size, self.img_size), dtype=torch.uint8, generator=g)
        return img, int(torch.randint(self.num_classes, (), generator=g))


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
        img, label = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(
                (((self.seed * 1_000_003 + epoch) * 101 + copy) * 1_000_000_007 + index) % 2**63
            )
            return self.transform(img), label


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (shuffle with seed + epoch, rank::world), yielding (index, epoch, 0)."""

    def __iter__(self):
        return ((i, self.epoch, 0) for i in super().__iter__())


class RepeatedAugSampler(Sampler):
    """DeiT's repeated augmentation, which torchvision lacks: each image appears `repeats` times per epoch,
    spread over the ranks so that each copy gets its own augmentation. An epoch still has len(dataset)
    samples in all (DeiT also rounds that down to a multiple of 256; we do not)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, repeats: int, seed: int):
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
        mine = mine[torch.randperm(len(mine), generator=g)]  # copies not at the same step on every rank
        return ((int(order[k]), self.epoch, int(copy[k])) for k in mine)


def build_transforms(args: argparse.Namespace, img_size: int):
    interpolation = getattr(InterpolationMode, args.interpolation.upper())
    train = [
        v2.ToImage(),
        v2.RandomResizedCrop(img_size, scale=(args.crop_scale, 1.0), interpolation=interpolation),
        v2.RandomHorizontalFlip(),
    ]
    if args.randaug_magnitude > 0:  # timm's m9 is 9 of 10: magnitude bins 0..10 (see README)
        train.append(v2.RandAugment(num_ops=2, magnitude=args.randaug_magnitude, num_magnitude_bins=11))
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(args.mean, args.std)]
    train += tail
    if args.reprob > 0:
        train.append(v2.RandomErasing(p=args.reprob, value="random"))
    resize = int(img_size / args.eval_crop)
    val = [v2.ToImage(), v2.Resize(resize, interpolation=interpolation), v2.CenterCrop(img_size), *tail]
    return v2.Compose(train), v2.Compose(val)


def build_datasets(args: argparse.Namespace, img_size: int, synthetic_classes: int):
    """(train, val, num_classes), each set without transforms."""
    root = Path(args.data_path)
    if args.data == "synthetic":
        val_size = max(args.synthetic_size // 5, 1)
        return (
            SyntheticImages(args.synthetic_size, synthetic_classes, img_size, seed=args.seed),
            SyntheticImages(val_size, synthetic_classes, img_size, seed=args.seed + 1),
            synthetic_classes,
        )
    if args.data == "cifar100":
        try:
            train = torchvision.datasets.CIFAR100(root, train=True, download=True)
            val = torchvision.datasets.CIFAR100(root, train=False, download=True)
        except Exception as e:  # offline, a half-downloaded archive, no permission, ...
            fail(
                f"could not load CIFAR-100 under --data-path {root} ({type(e).__name__}: {e}); put "
                f"cifar-100-python/ there (or allow the download), or use --data synthetic"
            )
        return train, val, 100
    for split in ("train", "val"):
        if not (root / split).is_dir():
            fail(f"--data imagenet expects {root / split}/ with one folder per class; check --data-path")
    try:
        train = torchvision.datasets.ImageFolder(root / "train")
        val = torchvision.datasets.ImageFolder(root / "val")
    except (FileNotFoundError, OSError) as e:
        fail(f"could not read the image folders under {root}: {e}")
    if train.classes != val.classes:
        fail(f"{root}/train and {root}/val hold different class folders; they must match")
    return train, val, len(train.classes)


# ----------------------------------------------------------------------------------------------
# Model, optimiser and schedule


def model_config(args, saved: dict | None = None) -> Config:
    """The model this run asks for. On resume, what the flags leave unset comes from the checkpoint,
    and what they set must equal it. (num_classes is the preset's until the data set is known.)"""
    try:
        return requested_config(args, saved)
    except ValueError as e:  # Config's own checks: say it in one line, as for any flag
        fail(str(e))


def requested_config(args, saved: dict | None) -> Config:
    explicit = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if explicit.get("last_pe") == "none":
        explicit["last_pe"] = None
    regularisation = dict(drop_path=args.drop_path, attn_drop=args.attn_drop)
    if saved is None:
        preset = args.model or RECIPES[args.recipe]["model"]
        return Config(**{**PRESETS[preset], "pe": "mpvg", **explicit, **regularisation})
    wanted = {**(PRESETS[args.model] if args.model else {}), **explicit}
    wanted.pop("num_classes", None)  # checked against the data set instead
    if "pe" in wanted and wanted["pe"] != saved["pe"]:  # a new mode re-derives the knobs left unset
        wanted = {**PE_MODES[wanted["pe"]], **wanted}
    diffs = [f"{k}={saved[k]!r} there but {v!r} here" for k, v in wanted.items() if saved.get(k) != v]
    if diffs:
        fail(
            f"the checkpoint was trained with another model: {'; '.join(diffs)}. Resume with the "
            f"checkpoint's settings, or start a new run in another --output-dir"
        )
    return Config(**{**saved, **regularisation})


def build_optimizer(model, args, lr: float, device: torch.device):
    """AdamW without weight decay on what no_weight_decay() names (timm's ViT too: plus all 1-D)."""
    skip = set(model.no_weight_decay()) | {n for n, p in model.named_parameters() if p.ndim <= 1}
    groups = [
        dict(
            params=[p for n, p in model.named_parameters() if n not in skip], weight_decay=args.weight_decay
        ),
        dict(params=[p for n, p in model.named_parameters() if n in skip], weight_decay=0.0),
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


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


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing, for class ids (B,) or Mixup/CutMix soft targets (B, C)."""
    logits = logits.float()
    if target.ndim == 1:
        return F.cross_entropy(logits, target, label_smoothing=smoothing)
    target = target * (1.0 - smoothing) + smoothing / logits.shape[-1]
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def build_mixing(args, num_classes: int):
    mixes = [v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []
    mixes += [v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else []
    return v2.RandomChoice(mixes) if mixes else None  # one of the two per batch, each with p = 0.5


# ----------------------------------------------------------------------------------------------
# Checkpoints: written atomically, read with weights_only, never replaced by a bad one


def save_checkpoint(path: Path, state: dict):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint whole


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        fail(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(
            f"cannot read checkpoint {path}: it is truncated or corrupt ({type(e).__name__}); use another one"
        )
    if not isinstance(state, dict) or not {"model", "model_config", "epoch"} <= set(state):
        fail(f"{path} is not a checkpoint written by train.py")
    return state


def rng_state(device: torch.device) -> dict:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return dict(torch=torch.get_rng_state(), cuda=cuda, python=random.getstate())


def set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])


# ----------------------------------------------------------------------------------------------
# Distributed set-up: torchrun's environment, or one process


def distributed_env():
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world, int(os.environ.get("LOCAL_RANK", 0))


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


# ----------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def evaluate(model, loader, device, amp: bool) -> dict:
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top-1, top-5, count
    for img, target in loader:
        img, target = img.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(img)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == target[:, None]
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
        counts = [loss, hits[:, 0].sum(), hits.any(-1).sum(), torch.tensor(len(target), device=device)]
        sums += torch.stack([c.to(torch.float64) for c in counts])  # all on the device: no sync per batch
    loss, top1, top5, n = all_reduce(sums).tolist()
    return dict(val_loss=loss / max(n, 1), val_top1=100 * top1 / max(n, 1), val_top5=100 * top5 / max(n, 1))


def train_step(model, optimizer, img, target, smoothing: float, amp: bool) -> torch.Tensor:
    """One full training step: forward (bf16 autocast on CUDA), loss, backward, optimizer step."""
    with torch.autocast(img.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(img)
    loss = soft_cross_entropy(logits, target, smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def train_one_epoch(model, loader, optimizer, mixing, args, epoch, device, amp, rank) -> dict:
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen, start = 0, time.perf_counter()
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{args.epochs}",
        disable=True if rank else None,
        leave=False,
        dynamic_ncols=True,
    )
    for step, (img, target) in enumerate(bar):
        img, target = img.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if mixing is not None:
            img, target = mixing(img, target)
        loss = train_step(model, optimizer, img, target, args.smoothing, amp)
        loss_sum += loss.detach() * len(img)
        seen += len(img) * args.world
        if (step + 1) % args.log_every == 0:  # the only host-device syncs of the loop
            current = all_reduce(loss.detach().clone()).item() / args.world
            check_finite(current, epoch, step, args)
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(
                loss=f"{current:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", img_s=f"{rate:.0f}"
            )
    seconds = time.perf_counter() - start
    total = all_reduce(
        torch.stack([loss_sum, torch.tensor(seen / args.world, device=device, dtype=torch.float64)])
    )
    train_loss = (total[0] / total[1].clamp(min=1)).item()
    check_finite(train_loss, epoch, None, args)
    return dict(train_loss=train_loss, images_per_sec=seen / seconds, seconds=seconds)


def check_finite(loss: float, epoch: int, step: int | None, args):
    if not math.isfinite(loss):
        where = f"epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
        fail(
            f"the training loss became {loss} at {where}; stopped without saving, so the last good checkpoint "
            f"in {args.output_dir} is untouched. Lower --lr or check the data, then --resume auto"
        )


def make_loaders(args, train_set, val_set, img_size: int, per_rank: int, device):
    """Training and validation loaders: DataLoader workers by default; with --device-data, the whole
    set as uint8 on the device and the augmentations batched there (the cifar recipe)."""
    rank, world = args.rank, args.world
    train_tf, val_tf = build_transforms(args, img_size)
    if args.repeated_aug > 1 and world > 1:
        sampler = RepeatedAugSampler(train_set, world, rank, args.repeated_aug, args.seed)
    else:
        sampler = EpochSampler(
            train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True
        )
    if use_device_data(args, device):
        augment = BatchAugment(args, img_size)
        train = DeviceLoader(*as_tensors(train_set, device), sampler, per_rank, augment, args.seed)
        shard = list(range(rank, len(val_set), world))
        val = DeviceLoader(*as_tensors(val_set, device), shard, per_rank, val_tf, args.seed, drop_last=False)
        return train, val, sampler
    train_set, val_set = Augmented(train_set, train_tf, args.seed), Augmented(val_set, val_tf, args.seed)
    workers = dict(
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )  # fmt: skip
    # own generators: worker seeds must not draw on the global RNG (dropout, Mixup), whatever --workers is
    workers["generator"] = torch.Generator().manual_seed(args.seed)
    train = DataLoader(train_set, batch_size=per_rank, sampler=sampler, drop_last=True, **workers)
    shard = Subset(val_set, range(rank, len(val_set), world))  # every image once, none padded
    val = DataLoader(shard, batch_size=per_rank, shuffle=False, **workers)
    return train, val, sampler


def main(argv=None):
    args = parse_args(argv)
    args.rank, args.world, local_rank = distributed_env()
    if args.batch_size % args.world:
        fail(
            f"--batch-size {args.batch_size} is not divisible by the {args.world} processes: choose a multiple "
            f"of {args.world} (the global batch is split evenly over the ranks)"
        )
    device = pick_device(local_rank)
    if args.world > 1:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    try:
        return run(args, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, device):
    master = args.rank == 0
    torch.manual_seed(args.seed + args.rank)
    random.seed(args.seed + args.rank)
    amp = device.type == "cuda"  # bf16 autocast on CUDA, fp32 on a CPU
    out = Path(args.output_dir)

    resume, ckpt = args.resume_path, args.resume_state
    if master and args.resume == "auto" and resume is None:
        print(f"--resume auto: no checkpoint in {out}, starting a new run")

    cfg = model_config(args, ckpt["model_config"] if ckpt else None)
    train_set, val_set, num_classes = build_datasets(args, cfg.img_size, synthetic_classes=cfg.num_classes)
    if ckpt and num_classes != cfg.num_classes:
        fail(f"the checkpoint has {cfg.num_classes} classes but this data set has {num_classes}")
    cfg = replace(cfg, num_classes=num_classes)
    per_rank = args.batch_size // args.world

    model = VisionTransformer(cfg).to(device)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    compiled = torch.compile(model) if args.compile else model
    train_loader, val_loader, sampler = make_loaders(args, train_set, val_set, cfg.img_size, per_rank, device)

    if args.eval_only:
        metrics = evaluate(compiled, val_loader, device, amp)
        if master:
            print(f"{resume}: top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%  "
                  f"loss {metrics['val_loss']:.4f} on {len(val_set)} images")  # fmt: skip
        return metrics

    ddp = (
        DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None)
        if args.world > 1
        else compiled
    )
    optimizer = build_optimizer(model, args, lr_at(0, args), device)
    mixing = build_mixing(args, num_classes)
    start_epoch, best = 0, dict(val_top1=-1.0, epoch=-1)
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best = ckpt["epoch"] + 1, ckpt["best"]
        states = ckpt["rng"]
        if len(states) != args.world:
            fail(
                f"the checkpoint was written by {len(states)} processes; resume it with {len(states)}, not {args.world}"
            )
        set_rng_state(states[args.rank], device)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        trim_metrics(out / "metrics.jsonl", start_epoch)
        params = sum(p.numel() for p in model.parameters())
        if args.epochs <= args.warmup_epochs + args.cooldown_epochs:
            print(f"note: --epochs {args.epochs} leaves no cosine phase after {args.warmup_epochs} warmup and "
                  f"{args.cooldown_epochs} cooldown epochs; set --warmup-epochs and --cooldown-epochs for short runs")  # fmt: skip
        print(f"{args.recipe} recipe, {cfg.pe} ({cfg.pool}), {params:,} parameters, {len(train_set)} training "
              f"images, {args.world} process(es) on {device.type}, batch {args.batch_size}, peak lr {peak_lr(args):.3g}")  # fmt: skip

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        lr = lr_at(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics = dict(
            epoch=epoch + 1,
            **train_one_epoch(ddp, train_loader, optimizer, mixing, args, epoch, device, amp, args.rank),
        )
        metrics.update(evaluate(compiled, val_loader, device, amp), lr=lr)
        if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():  # one sync an epoch
            fail(f"the weights became non-finite in epoch {epoch + 1}; nothing was saved, so the last good "
                 f"checkpoint in {args.output_dir} is untouched. Lower --lr, then --resume auto")  # fmt: skip
        is_best = metrics["val_top1"] > best["val_top1"]
        if is_best:
            best = dict(val_top1=metrics["val_top1"], epoch=epoch + 1)
        states = [None] * args.world
        if dist.is_initialized():
            dist.all_gather_object(states, rng_state(device))
        else:
            states = [rng_state(device)]
        if master:
            state = dict(
                model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch, best=best,
                model_config=asdict(cfg), args={k: v for k, v in vars(args).items() if is_plain(v)},
                rng=states, lr=lr,
            )  # fmt: skip
            with open(out / "metrics.jsonl", "a") as f:  # first: a resume trims what no checkpoint holds
                f.write(json.dumps(metrics) + "\n")
            save_checkpoint(out / "checkpoint.pt", state)
            if is_best:
                save_checkpoint(out / "best.pt", state)
            print(f"epoch {epoch + 1}/{args.epochs}  train loss {metrics['train_loss']:.4f}  val loss "
                  f"{metrics['val_loss']:.4f}  top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%  "
                  f"lr {lr:.2e}  {metrics['images_per_sec']:.0f} img/s  {metrics['seconds']:.1f}s")  # fmt: skip
    if master:
        print(
            f"best top-1 {best['val_top1']:.2f}% at epoch {best['epoch']}; checkpoints in {out}/ (best.pt, checkpoint.pt)"
        )
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while rank 0 is still writing
    return best


# ----------------------------------------------------------------------------------------------


def use_device_data(args, device) -> bool:
    if args.device_data == "off" or (
        args.device_data == "auto" and (device.type != "cuda" or args.data != "cifar100")
    ):
        return False
    if args.recipe != "cifar":
        fail(
            "--device-data implements the cifar recipe's augmentations; use --device-data off with --recipe deit"
        )
    if args.data == "imagenet":
        fail(
            "--device-data holds fixed-size sets (cifar100, synthetic); image folders load with --device-data off"
        )
    return True


def is_plain(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, tuple))


def trim_metrics(path: Path, start_epoch: int):
    """On resume, drop metrics of epochs the checkpoint does not hold (a run that died after logging)."""
    if not path.exists():
        return
    lines = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= start_epoch
    ]
    path.write_text("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main(sys.argv[1:])
