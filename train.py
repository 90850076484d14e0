"""Train MPVG models with plain DDP: CIFAR-100, ImageNet (any ImageFolder) or synthetic data.

    python train.py --data synthetic --epochs 2                      # one process: a CPU or one GPU
    torchrun --standalone --nproc_per_node=8 train.py --data imagenet --data-path /data/imagenet \
        --model deit_small --pe mpvg                                 # the paper's Table 1 recipe
    python train.py --eval-only --resume runs/mpvg/best.pt          # top-1 / top-5 of a checkpoint

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
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from mpvg import PE_MODES, PRESETS, Config, VisionTransformer, analyse

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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train, evaluate, benchmark or analyse ViT/DeiT with the paper's PE modes.",
        formatter_class=HelpFormatter,
    )

    def recipe_flag(name, type, help):
        key = name.lstrip("-").replace("-", "_")
        values = ", ".join(f"{r}: {RECIPES[r][key]}" for r in RECIPES)
        g.add_argument(name, type=type, default=None, help=f"{help} [from --recipe; {values}]".lstrip())

    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        choices=["cifar100", "imagenet", "synthetic"],
        default=None,
        help="[cifar100; synthetic with --benchmark, --analyze, --workshop]",
    )
    g.add_argument("--data-path", default="./data", help="CIFAR-100 root, or a folder with train/ and val/")
    g.add_argument("--synthetic-size", type=int, default=2560, help="training images of --data synthetic")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers per rank")
    g.add_argument("--device-data", choices=["auto", "on", "off"], default="auto",
                   help="hold the data set on the device as uint8 and augment whole batches there "
                        "(cifar recipe; auto: on for cifar100 on CUDA)")  # fmt: skip
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
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output-dir", default="runs/default", help="checkpoints and metrics.jsonl")
    g.add_argument("--resume", default=None, help="a checkpoint path, or auto: the newest in --output-dir")
    g.add_argument("--eval-only", action="store_true", help="evaluate the --resume checkpoint and stop")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--log-every", type=int, default=20, help="steps between progress updates")
    g = p.add_argument_group(
        "benchmark (--benchmark: training throughput of every PE mode, and timm's, side by side)"
    )
    g.add_argument("--benchmark", action="store_true", help="time training steps on synthetic data and stop")
    g.add_argument("--bench-steps", type=int, default=10, help="timed steps per model per round")
    g.add_argument("--bench-rounds", type=int, default=3, help="rounds, the models taking turns")
    g.add_argument(
        "--bench-warmup", type=int, default=3, help="untimed steps first (compilation happens here)"
    )
    g.add_argument(
        "--peak-tflops", type=float, default=989.4, help="the device's dense bf16 peak, for MFU (H100 SXM)"
    )
    g = p.add_argument_group("the paper's analysis, and a workshop")
    g.add_argument("--analyze", nargs="?", const="new", default=None, metavar="CKPT",
                   help="write Figs. 2, 4, 7 and the Appendix's Last-LN statistics of a checkpoint "
                        "(or, alone, of a new model from --model/--pe) to --output-dir, and stop")  # fmt: skip
    g.add_argument(
        "--analyze-images", type=int, default=64, help="validation images the analysis averages over"
    )
    g.add_argument("--workshop", action="store_true", help="train tiny models of every PE mode on a task that "
                   "only position solves, and compare them (about 5 CPU minutes)")  # fmt: skip
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
    if args.data is None:
        args.data = "synthetic" if args.benchmark or args.analyze or args.workshop else "cifar100"
    if args.recipe is None:
        deit_model = (args.model or "").startswith("deit")
        args.recipe = (
            "deit" if args.data == "imagenet" or (args.data == "synthetic" and deit_model) else "cifar"
        )
    for key, value in RECIPES[args.recipe].items():
        if key != "model" and getattr(args, key, None) is None:  # the model: see model_config
            setattr(args, key, value)
    if args.eval_only and not args.resume_path:
        fail(f"--eval-only needs --resume CHECKPOINT (with auto: none in {args.output_dir} yet)")
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
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
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
    if args.benchmark:
        return benchmark(args, device)
    if args.analyze:
        return analyze(args, device)
    if args.workshop:
        return workshop(args, device)
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
# Benchmark: full training steps on data already on the device, every PE mode and timm side by side


def flops_per_image(cfg: Config) -> float:
    """Forward FLOPs of one image, matmuls only (a multiply-add is 2). LayerNorms, softmax and the
    (1, N, D) PE path are left out: they are under 1% here. A training step is 3x this."""
    t, d, hidden = cfg.num_tokens, cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    patches = 2 * cfg.num_patches * d * cfg.in_chans * cfg.patch_size**2
    layer = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * hidden
    return patches + cfg.depth * layer + 2 * d * cfg.num_classes


def timm_twin(cfg: Config):
    """timm's VisionTransformer built to the same configuration, or None without timm."""
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:
        return None
    cls = cfg.pool == "cls"
    return TimmViT(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        class_token=cls, global_pool="token" if cls else "avg", fc_norm=False, drop_path_rate=cfg.drop_path,
        attn_drop_rate=cfg.attn_drop,
    )  # fmt: skip


def benchmark(args, device):
    cuda = device.type == "cuda"  # and so bf16 autocast
    base = model_config(args)
    modes = [args.pe] if args.pe else ["default", "lape", "pvg", "mpvg"]
    configs = {
        f"mpvg.py {m}": replace(
            base, pe=m, **{k: PE_MODES[m][k] for k in PE_MODES[m] if getattr(args, k) is None}
        )
        for m in modes
    }
    builders = {name: (lambda c=c: VisionTransformer(c)) for name, c in configs.items()}
    reference = configs[f"mpvg.py {modes[0]}"]  # timm's twin is built like the first row
    twin = timm_twin(reference)
    if twin is not None:
        builders[f"timm ViT ({reference.pool})"] = lambda: twin
    batch = args.batch_size
    img = torch.randn(batch, base.in_chans, base.img_size, base.img_size, device=device)
    target = torch.randint(base.num_classes, (batch,), device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    steps, peak_mib, params = {}, {}, {}
    for name, build in builders.items():  # one at a time, so that each peak is its own
        model = build().to(device)
        params[name] = sum(p.numel() for p in model.parameters())
        optimizer = build_optimizer(model, args, 1e-4, device)
        compiled = torch.compile(model) if args.compile else model

        def step(model=compiled, optimizer=optimizer):  # exactly the training loop's step
            train_step(model, optimizer, img, target, args.smoothing, amp=cuda)

        held = torch.cuda.memory_allocated(device) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.bench_warmup):
            step()
        sync()
        peak_mib[name] = (torch.cuda.max_memory_allocated(device) - held) / 2**20 if cuda else None
        steps[name] = step

    seconds = {name: [] for name in steps}
    for _ in range(args.bench_rounds):  # the models take turns, so drifts in clock or heat hit all alike
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.bench_steps):
                step()
            sync()
            seconds[name].append((time.perf_counter() - start) / args.bench_steps)

    device_name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"\nbenchmark: {args.model or RECIPES[args.recipe]['model']} ({base.dim}d x {base.depth}), batch {batch}, "
          f"{base.img_size} px, {'bf16' if cuda else 'fp32'} on {device_name}, compile {'on' if args.compile else 'off'}; "
          f"{args.bench_warmup} warm-up, then {args.bench_rounds} rounds of {args.bench_steps} steps, median of rounds")  # fmt: skip
    timm_name = next((n for n in steps if n.startswith("timm")), None)
    rows = {}
    print(
        f"{'model':<22}{'params':>12}{'img/s':>10}{'ms/step':>10}{'peak MiB':>10}{'MFU':>8}{'vs timm':>9}{'vs default':>11}"
    )
    for name in steps:
        ms = sorted(seconds[name])[len(seconds[name]) // 2] * 1e3
        rate = batch / ms * 1e3
        cfg = configs.get(name, reference)
        mfu = 3 * flops_per_image(cfg) * rate / (args.peak_tflops * 1e12) if cuda else None
        rows[name] = dict(
            params=params[name], images_per_sec=rate, ms_per_step=ms, peak_mib=peak_mib[name], mfu=mfu
        )
    for name, r in rows.items():
        vs_timm = f"{r['images_per_sec'] / rows[timm_name]['images_per_sec']:.3f}" if timm_name else "-"
        default = rows.get("mpvg.py default")
        vs_default = f"{r['images_per_sec'] / default['images_per_sec']:.3f}" if default else "-"
        memory = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(
            f"{name:<22}{r['params']:>12,}{r['images_per_sec']:>10.1f}{r['ms_per_step']:>10.1f}{memory:>10}{mfu:>8}{vs_timm:>9}{vs_default:>11}"
        )
    rows["data loader"] = dict(images_per_sec=time_data_loader(args, base, device))
    return rows


def time_data_loader(args, cfg: Config, device, batches: int = 10) -> float:
    """Images/s that the training loader delivers with the recipe's augmentations, model aside."""
    train_set, val_set, _ = build_datasets(args, cfg.img_size, synthetic_classes=cfg.num_classes)
    loader, _, _ = make_loaders(args, train_set, val_set, cfg.img_size, args.batch_size, device)
    it = iter(loader)
    next(it)  # workers start, or the data set moves to the device
    start, seen = time.perf_counter(), 0
    for _, (img, _) in zip(range(batches), it):
        seen += len(img.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = seen / (time.perf_counter() - start)
    how = "on the device, batched" if use_device_data(args, device) else f"{args.workers} workers"
    print(f"data loader alone: {rate:.0f} img/s ({args.data}, {args.recipe} recipe augmentations, {how})")
    return rate


# ----------------------------------------------------------------------------------------------
# The paper's analysis as pictures: Figs. 2, 4, 6 (Appendix) and 7, from mpvg.analyse


def colour(t: torch.Tensor, signed: bool = True):
    """A 2-D tensor as an RGB image: blue < 0 < red (white at 0) if signed, else white (the
    smallest value) to red (the largest)."""
    t = t.detach().float().cpu()
    if signed:
        v = (t / t.abs().max().clamp_min(1e-12)).clamp(-1, 1)
    else:
        v = (t - t.min()) / (t.max() - t.min()).clamp_min(1e-12)
    rgb = torch.stack([1 + v.clamp(max=0), 1 - v.abs(), 1 - v.clamp(min=0)], dim=-1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())


def captioned(panels: list, columns: int, title: str, zoom: int = 1):
    """Panels (caption, PIL image) in a grid under a title, each captioned and enlarged `zoom` times."""
    panels = [(c, im.resize((im.width * zoom, im.height * zoom), Image.NEAREST)) for c, im in panels]
    w = max(max(im.width for _, im in panels), 6 * max(len(c) for c, _ in panels) + 4)
    h = max(im.height for _, im in panels)
    rows = math.ceil(len(panels) / columns)
    sheet = Image.new("RGB", (max(columns * (w + 8) + 8, 6 * len(title) + 16), rows * (h + 22) + 30), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), title, fill="black")
    for i, (caption, im) in enumerate(panels):
        x, y = 8 + (i % columns) * (w + 8), 30 + (i // columns) * (h + 22)
        draw.text((x, y), caption, fill="black")
        sheet.paste(im, (x, y + 14))
    return sheet


def bars(values: list, title: str):
    """A bar chart of values in [-1, 1], one bar per layer (None: no bar), with its axes labelled."""
    left, mid, height = 50, 140, 260
    width = max(left + 40 * len(values) + 20, 6 * len(title) + 16)
    im = Image.new("RGB", (width, height + 30), "white")
    draw = ImageDraw.Draw(im)
    draw.text((8, 6), title, fill="black")
    draw.line((left, mid, left + 40 * len(values) + 10, mid), fill="black")
    for r, label in ((1, "+1"), (0, " 0"), (-1, "-1")):
        draw.text((20, mid - r * 100 - 6), label, fill="black")
    for l, v in enumerate(values):
        x = left + 10 + 40 * l
        if v is not None:
            top, bottom = sorted((mid, mid - v * 100))
            draw.rectangle((x, top, x + 24, bottom), fill="firebrick" if v > 0 else "royalblue")
        draw.text((x + 8, height - 10), str(l), fill="black")
    draw.text(
        (left, height + 8), "x: layer l;  y: Pearson r of LN_l(x_l) and the PE layer l receives", fill="black"
    )
    return im


def rounded(x):
    """Numbers for analysis.json: tensors as nested lists, 5 significant digits."""
    if isinstance(x, torch.Tensor):
        return rounded(x.tolist())
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return float(f"{x:.5g}") if isinstance(x, float) else x


def analyze(args, device):
    if args.analyze == "new":
        cfg = model_config(args)
        model = VisionTransformer(cfg)
        source = f"a new {cfg.pe} model (no checkpoint)"
    else:
        ckpt = load_checkpoint(args.analyze)
        cfg = Config(**ckpt["model_config"])
        model = VisionTransformer(cfg)
        model.load_state_dict(ckpt["model"])
        source = args.analyze
    _, val_set, _ = build_datasets(args, cfg.img_size, synthetic_classes=cfg.num_classes)
    _, val_tf = build_transforms(args, cfg.img_size)
    n = min(args.analyze_images, len(val_set))
    spread = torch.linspace(0, len(val_set) - 1, n).long().tolist()  # image folders are sorted by class
    images = torch.stack([val_tf(val_set[i][0]) for i in spread]).to(device)
    stats = analyse(model.to(device), images)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    zoom = max(1, 96 // max(cfg.num_tokens, cfg.dim))
    panels = []
    for l, (t, p, r) in enumerate(zip(stats["fig2_tokens"], stats["fig2_pos"], stats["fig4_correlation"])):
        panels.append((f"layer {l}: LN(x)", colour(t)))
        pe = colour(p) if p is not None else colour(torch.zeros_like(t))
        panels.append((f"layer {l}: PE, r={r:+.2f}" if p is not None else f"layer {l}: no PE", pe))
    title = "Fig. 2: tokens after LN_l (batch mean) and the PE each layer receives. x: dimension, y: token"
    captioned(panels, 4, f"{title}; blue < 0 < red. {source}", zoom).save(out / "fig2_heatmaps.png")
    title = f"Fig. 4: correlation of token embedding and PE after their LNs ({cfg.pe}, {cfg.pool})"
    bars(stats["fig4_correlation"], title).save(out / "fig4_correlation.png")
    last, norm = stats["last_ln"], model.norm
    strips = [
        ("Last LN gamma - 1", colour(norm.weight[None].repeat(8, 1) - 1)),
        ("Last LN beta", colour(norm.bias[None].repeat(8, 1))),
    ]
    title = f"Appendix Fig. 6: x: dimension. var(beta) {last['beta_var']:.4f}, cosine before/after {last['cosine']:.4f}"
    captioned(strips, 1, title, max(1, 384 // cfg.dim)).save(out / "fig6_last_ln.png")

    mean, std = torch.tensor(args.mean)[:, None, None], torch.tensor(args.std)[:, None, None]
    size, panels = (cfg.img_size, cfg.img_size), []
    for b in sorted(set(torch.linspace(0, n - 1, 4).long().tolist())):  # four images, spread over the classes
        picture = (images[b].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).mul(255).round().to(torch.uint8)
        panels += [
            (f"image {b}", Image.fromarray(picture.numpy())),
            (
                "norm before Last LN",
                colour(stats["fig7_norms_pre"][b], signed=False).resize(size, Image.NEAREST),
            ),
            (
                "norm after Last LN",
                colour(stats["fig7_norms_post"][b], signed=False).resize(size, Image.NEAREST),
            ),
        ]
    title = "Fig. 7: L2 norm of each patch token before and after the Last LN (per image: white its smallest, red its largest)"
    captioned(panels, 3, title, max(1, 128 // cfg.img_size)).save(out / "fig7_token_norms.png")

    report = dict(source=source, model_config=asdict(cfg), images=n, data=args.data, **stats)
    (out / "analysis.json").write_text(json.dumps(rounded(report)))
    print(f"analysis of {source} over {n} {args.data} images -> {out}/")
    print(f"{'layer':>5}  {'Fig. 4 r':>9}")
    for l, r in enumerate(stats["fig4_correlation"]):
        print(f"{l:>5}  {'-' if r is None else f'{r:+.4f}':>9}")
    print(f"Last LN: var(beta) {last['beta_var']:.4f}  var(gamma) {last['gamma_var']:.4f}  "
          f"cosine before/after {last['cosine']:.4f}")  # fmt: skip
    print(
        "wrote fig2_heatmaps.png, fig4_correlation.png, fig6_last_ln.png, fig7_token_norms.png, analysis.json"
    )
    return report


# ----------------------------------------------------------------------------------------------
# A workshop on a laptop: tiny models, and a task that only position solves


class WhereIsThePlus(Dataset):
    """16 x 16 noise images with a plus sign and a square, each at any pixel position; the label is
    the cell of the 4 x 4 patch grid that holds the plus sign's centre. Centres are uniform over pixels
    1..14, so the four middle cells are likelier: the commonest holds (4/14)^2 = 8.2% of the labels,
    about what a model without position information can reach."""

    PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32)

    def __init__(self, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, 3, 16, 16, generator=g) * 0.5
        corners = torch.randint(0, 14, (size, 2, 2), generator=g)  # (image, plus/square, y/x) of 3 x 3 marks
        for i in range(size):
            for (y, x), mark in zip(corners[i].tolist(), (self.PLUS, torch.ones(3, 3))):
                self.images[i, :, y : y + 3, x : x + 3] += mark
        centre = corners[:, 0] + 1
        self.labels = centre[:, 0] // 4 * 4 + centre[:, 1] // 4
        self.images = (self.images - 0.75) / 0.5

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


WORKSHOP_MODELS = [  # (pe, pool): every pairing of the paper's Fig. 1, and no PE at all
    ("none", "gap"), ("default", "cls"), ("default", "gap"), ("lape", "cls"), ("lape", "gap"), ("pvg", "gap"), ("mpvg", "gap"),
]  # fmt: skip


def workshop(args, device, epochs: int = 10, train_size: int = 4096, val_size: int = 1024):
    train_set, val_set = WhereIsThePlus(train_size, args.seed), WhereIsThePlus(val_size, args.seed + 1)
    print(f"workshop: {len(WORKSHOP_MODELS)} tiny ViTs (16 px, 4 px patches, 48 wide, 4 deep) learn where a plus "
          f"sign is (16 classes; the commonest holds 8.2% of labels); {train_size} training images, {epochs} epochs, seed {args.seed}")  # fmt: skip
    rows = []
    for pe, pool in WORKSHOP_MODELS:
        torch.manual_seed(args.seed)
        cfg = Config(
            img_size=16,
            patch_size=4,
            num_classes=16,
            dim=48,
            depth=4,
            heads=3,
            mlp_ratio=2.0,
            pe=pe,
            pool=pool,
        )
        model = VisionTransformer(cfg).to(device)
        loader = DataLoader(train_set, batch_size=64, shuffle=True, drop_last=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, 2e-3, total_steps=epochs * len(loader), pct_start=0.1
        )
        start = time.perf_counter()
        model.train()
        for _ in tqdm(range(epochs), desc=f"{pe} ({pool})", leave=False, disable=None):
            for img, target in loader:
                train_step(model, optimizer, img.to(device), target.to(device), smoothing=0.0, amp=False)
                schedule.step()
        top1 = evaluate(model, DataLoader(val_set, batch_size=256), device, amp=False)["val_top1"]
        stats = analyse(model, val_set.images[:64].to(device))
        r = [x for x in stats["fig4_correlation"] if x is not None]
        rows.append(dict(pe=pe, pool=pool, params=sum(p.numel() for p in model.parameters()), top1=top1,
                         r_first=r[0] if r else None, r_last=r[-1] if r else None,
                         beta_var=stats["last_ln"]["beta_var"], seconds=time.perf_counter() - start))  # fmt: skip
    print(
        f"{'PE':<9}{'pool':<6}{'params':>8}{'top-1':>8}  {'Fig. 4 r, first -> last PE layer':<34}{'var(beta)':>9}{'s':>5}"
    )
    for row in rows:
        r = "-" if row["r_first"] is None else f"{row['r_first']:+.3f} -> {row['r_last']:+.3f}"
        print(f"{row['pe']:<9}{row['pool']:<6}{row['params']:>8,}{row['top1']:>7.1f}%  {r:<34}"
              f"{row['beta_var']:>9.4f}{row['seconds']:>5.0f}")  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------
# CIFAR-100 on the device: the whole set as uint8, the recipe's augmentations run on whole batches


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
