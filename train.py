"""Train MPVG models with plain DDP: CIFAR-100, ImageNet (any ImageFolder) or a built-in task.

    python train.py --data synthetic --dim 64 --depth 4                # one process: a CPU or one GPU
    torchrun --standalone --nproc_per_node=8 train.py --data imagenet --data-path /data/imagenet \
        --model deit_small --pe mpvg                                   # the paper's Table 1 recipe
    python train.py --resume auto --output-dir runs/default            # go on where a run stopped
    python train.py --eval-only --resume runs/default/best.pt          # top-1 / top-5 of a checkpoint

The story, top to bottom: the command line; the data; the model, its optimiser and schedule; checkpoints;
the loop. A flag left out takes its recipe's value (training/recipes.py; --help lists them); a resumed
run takes every flag from its checkpoint, and may be given anew only those of MAY_CHANGE.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Subset

import models
from mpvg import PE_MODES, Config
from training import device_data
from training.data import Augmented, DataError, EpochSampler, PlusSigns, build_transforms, chance, seed_of
from training.finetune import load_pretrained
from training.flags import Parser, boolean, layer, typed
from training.mixing import Mixing
from training.recipes import DATA, MODEL_RECIPES, RECIPES

DEFAULTS = dict(  # every other flag's default; the model flags default to the preset's (and --pe's) values
    data="cifar100", data_path="./data", synthetic_size=2560, workers=min(8, os.cpu_count() or 1),
    device_data="auto", model=None, pe="mpvg", seed=0, output_dir="runs/default", resume=None, finetune=None,
    eval_only=False, accum_steps=1, compile=None, log_every=50,
)  # fmt: skip
KNOBS = "pool pe_input pe_layers pe_hierarchical last_pe img_size patch_size dim depth heads window".split()
MAY_CHANGE = set(  # what a resumed run may be given anew: where and how it runs, and for how long
    "resume eval_only output_dir epochs data_path workers device_data accum_steps compile log_every".split()
)
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch's
ON_OFF = ["auto", "on", "off"]
TIMEOUT = timedelta(minutes=5)  # the longest a process waits for another: a hung one, or rank 0's save
MASTER = os.environ.get("RANK", "0") == "0"  # rank 0 of torchrun's processes, or the single process
PROG = Path(sys.argv[0]).name  # what a message begins with, as argparse's do: train.py, or a tool's name


def fail(message: str, every_rank: bool = False):
    """A user's error: one line, no traceback, from rank 0 alone unless only this rank met it."""
    raise SystemExit(f"{PROG}: error: {message}" if every_rank or MASTER else 1)


# The command line


COUNT = typed(int, lambda v: v >= 1, "1 or more")
NATURAL = typed(int, lambda v: v >= 0, "0 or more")
POSITIVE = typed(float, lambda v: 0 < v < math.inf, "positive")
NON_NEGATIVE = typed(float, lambda v: 0 <= v < math.inf, "0 or more")
RATE = typed(float, lambda v: 0 <= v < 1, "in [0, 1)")
PROBABILITY = typed(float, lambda v: 0 <= v <= 1, "in [0, 1]")
FRACTION = typed(float, lambda v: 0 < v <= 1, "in (0, 1]")
MAGNITUDE = typed(int, lambda v: 0 <= v <= 10, "in 0..10")
SEED = typed(int, lambda v: 0 <= v < 2**32, "in 0..2**32 - 1")


def build_parser() -> argparse.ArgumentParser:
    about = (
        "Train or evaluate the paper's models in its PE modes. [...]: the default, or each recipe's value. "
        "A resume takes every flag from its checkpoint; of them it may be given anew only --epochs, "
        "--output-dir, --data-path, --workers, --device-data, --accum-steps, --compile and --log-every."
    )
    p = Parser(description=about, argument_default=argparse.SUPPRESS, allow_abbrev=False)

    def add(group, name: str, help: str, **kw):  # the help ends in the default, or in each recipe's value
        key = name[2:].replace("-", "_")
        shown = "; ".join(f"{r}: {RECIPES[r][key]}" for r in RECIPES) if key in RECIPES["deit"] else None
        shown = shown or DEFAULTS.get(key)
        group.add_argument(name, help=f"{help} [{shown}]" if shown is not None else help, **kw)

    g = p.add_argument_group("data")
    add(g, "--data", "synthetic: built in; only position solves it", choices=list(DATA))
    add(g, "--data-path", "where CIFAR-100 is (or is downloaded to), or a folder with train/ and val/")
    add(g, "--synthetic-size", "training images of --data synthetic, a fifth as many to validate", type=COUNT)
    add(g, "--workers", "loader workers per process: min(8, CPU cores)", type=NATURAL)
    add(g, "--device-data", "on the device, augmented there (auto: for cifar100 on a GPU)", choices=ON_OFF)
    g = p.add_argument_group("model (left out: the preset's value, or the --pe mode's)")
    add(g, "--model", "preset [from --recipe]", choices=list(models.ARCHITECTURES))
    add(g, "--pe", "PE mode", choices=list(PE_MODES))
    add(g, "--pool", "class token or global average pooling", choices=["cls", "gap"])
    add(g, "--pe-input", "add PE before layer 0, Eq. 1/8 (true, false)", type=boolean)
    add(g, "--pe-layers", "the layers whose MSA input gets PE, Eq. 6/9", choices=["none", "all", "skip0"])
    add(g, "--pe-hierarchical", "pos_l = LN'_l(pos_{l-1}), Eq. 7/10 (false: Table 6)", type=boolean)
    add(g, "--last-pe", "k of LN(pos_k) at the Last LN, Eq. 11, or none", type=layer)
    add(g, "--window", "swin_tiny's attention window, M", type=COUNT)
    for name in ("--img-size", "--patch-size", "--dim", "--depth", "--heads"):
        add(g, name, "", type=COUNT)
    g = p.add_argument_group("recipe (each anchor's, docs/training.md; synthetic: the built-in task's)")
    add(g, "--recipe", "[the --model's anchor's for --data, else by --data]", choices=list(RECIPES))
    add(g, "--epochs", "epochs in all, cooldown included", type=COUNT)
    add(g, "--cooldown-epochs", "last epochs held at --min-lr", type=NATURAL)
    add(g, "--batch-size", "global batch, split over the processes (and --accum-steps)", type=COUNT)
    add(g, "--lr", "peak learning rate, before the batch scaling", type=POSITIVE)
    add(g, "--lr-batch-scale", "lr is scaled by batch / this (0: no scaling)", type=NATURAL)
    add(g, "--min-lr", "end of the cosine", type=NON_NEGATIVE)
    add(g, "--warmup-lr", "linear warmup starts here", type=NON_NEGATIVE)
    add(g, "--warmup-epochs", "", type=NATURAL)
    add(g, "--optimizer", "sgd: momentum 0.9", choices=["adamw", "sgd"])
    add(g, "--backbone-lr", "every weight but the head's at --lr times this", type=POSITIVE)
    add(g, "--weight-decay", "never on biases and norms", type=NON_NEGATIVE)
    add(g, "--clip-grad", "largest gradient norm (0: no clipping)", type=NON_NEGATIVE)
    add(g, "--model-ema", "decay of an EMA of the weights, saved with them (0: none)", type=RATE)
    add(g, "--eval-ema", "evaluate the EMA weights, and choose best.pt by them", type=boolean)
    add(g, "--decay-pos-embed", "weight decay on pos_embed and cls_token too", type=boolean)
    add(g, "--drop-path", "stochastic depth of the last layer", type=RATE)
    add(g, "--attn-drop", "dropout on attention weights", type=RATE)
    add(g, "--smoothing", "label smoothing", type=RATE)
    add(g, "--mixup", "Mixup alpha (0: off)", type=NON_NEGATIVE)
    add(g, "--cutmix", "CutMix alpha (0: off); with both on, one of the two per batch", type=NON_NEGATIVE)
    add(g, "--randaug-magnitude", "timm's RandAugment rand-mM-mstd0.5-inc1 (0: off)", type=MAGNITUDE)
    add(g, "--reprob", "random erasing probability, per-pixel noise", type=PROBABILITY)
    add(g, "--repeated-aug", "copies of each image drawn, side by side (1: off)", type=COUNT)
    add(g, "--train-crop", "padded: resize, then RandomCrop padded by 1/8", choices=["resized", "padded"])
    add(g, "--crop-scale", "smallest area of RandomResizedCrop", type=FRACTION)
    add(g, "--hflip", "horizontal flip probability", type=PROBABILITY)
    add(g, "--eval-crop", "center crop over resize at evaluation", type=FRACTION)
    add(g, "--interpolation", "of the crop and RandAugment", choices=["bilinear", "bicubic", "random"])
    g = p.add_argument_group("run")
    add(g, "--seed", "initialisation, data order and augmentation", type=SEED)
    add(g, "--output-dir", "the run's checkpoints and metrics.jsonl")
    add(g, "--resume", "go on with a run: the newest checkpoint in --output-dir (auto), or PATH")
    add(g, "--finetune", "start a new run from these weights (train.py's, DeiT's or timm's)", metavar="CKPT")
    add(g, "--eval-only", "evaluate the --resume checkpoint and stop", action="store_true")
    add(g, "--accum-steps", "micro-batches per step: the same update in less memory", type=COUNT)
    add(g, "--compile", "torch.compile the model", nargs="?", const="default", choices=COMPILE_MODES)
    add(g, "--log-every", "steps between progress lines (each waits for the device)", type=COUNT)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The run's flags, layered: the defaults, the recipe's values (on a resume: the checkpoint's flags),
    then the command line's. A resume may not change a flag outside MAY_CHANGE, write outside its run's
    folder, or write an older checkpoint over its run's newer one."""
    given = vars(build_parser().parse_args(argv))
    if "" in (given.get("resume"), given.get("finetune")):
        fail("--resume or --finetune got an empty path (is a shell variable unset?)")
    if "finetune" in given and given.get("resume", "auto") != "auto":  # auto: fine-tune, or go on with it
        fail("--resume PATH goes on with a run and --finetune starts a new one: give one of them")
    resume, evaluating = given.get("resume"), given.get("eval_only")
    out = Path(given.get("output_dir", DEFAULTS["output_dir"]))
    path = newest(out) if resume == "auto" else resume and Path(resume)
    if not path:
        if evaluating:
            fail("--eval-only needs a checkpoint: --resume PATH, or --resume auto with one in --output-dir")
        if resume and MASTER:
            print(f"--resume auto: no checkpoint in {out}, starting a new run")
        data = given.get("data", DEFAULTS["data"])
        recipe = given.get("recipe") or MODEL_RECIPES.get((data, given.get("model"))) or DATA[data]
        return argparse.Namespace(**DEFAULTS | RECIPES[recipe] | given | dict(recipe=recipe, resume=None))
    saved = load_checkpoint(path, mmap=True)
    fixed = {*KNOBS, "model", "pe"} if evaluating else set(given) - MAY_CHANGE  # an evaluation writes nothing
    for key in (k for k in fixed & set(given) if given[k] != saved["args"].get(k)):
        fail(f"--{key.replace('_', '-')} differs from the checkpoint's, which a resume keeps: drop it")
    if not evaluating and "output_dir" in given and out.resolve() != path.parent.resolve():
        fail(f"a resume writes into its run's own folder, {path.parent}: drop --output-dir")
    for other in (
        [] if evaluating else [path.parent / n for n in ("checkpoint.pt", "best.pt") if n != path.name]
    ):
        theirs = load_checkpoint(other, mmap=True) if other.exists() else saved
        if any(theirs["args"].get(k) != v for k, v in saved["args"].items() if k not in MAY_CHANGE):
            fail(
                f"{path.parent} holds another run ({other.name}): resume a checkpoint in its own run's folder"
            )
        if theirs["epoch"] > saved["epoch"]:
            fail(f"{other} holds a newer epoch than {path}, which a resume would write over: resume from it")
    return argparse.Namespace(**saved["args"] | given | {"output_dir": str(path.parent), "resume": str(path)})


# The data


def build_datasets(args, img_size: int) -> tuple[Dataset, Dataset]:
    """The training and validation sets, untransformed; each lists its `classes` and `targets`."""
    root = Path(args.data_path)
    try:
        if args.data == "synthetic":
            size = args.synthetic_size
            return PlusSigns(size, img_size, args.seed), PlusSigns(max(size // 5, 1), img_size, args.seed + 1)
        if args.data == "cifar100":
            if os.environ.get("LOCAL_RANK", "0") == "0":  # one download a machine, the others wait
                torchvision.datasets.CIFAR100(root, download=True)
            if dist.is_initialized():
                dist.barrier()
            return tuple(torchvision.datasets.CIFAR100(root, train=t) for t in (True, False))
        train, val = (torchvision.datasets.ImageFolder(root / split) for split in ("train", "val"))
    except Exception as e:  # offline, a half-downloaded archive, no such folder, no images in one, ...
        fail(f"cannot load --data {args.data} from {root} ({type(e).__name__}: {e}); see --data-path")
    if train.classes != val.classes:
        fail(f"{root}/train and {root}/val hold different class folders; they must match")
    return train, val


def make_loaders(args, train_set, val_set, img_size: int, batch: int, device, rank: int, world: int):
    """Loaders of `batch` images per process (the training one's sampler an EpochSampler): DataLoader
    workers by default; with --device-data, the whole set as uint8 on the device, augmented there."""
    train_tf, val_tf = build_transforms(args, img_size)
    sampler = EpochSampler(len(train_set), world, rank, args.seed, args.repeated_aug)
    shard = range(rank, len(val_set), world)  # every validation image once, on one process
    auto = args.data == "cifar100" and device.type == "cuda" and args.train_crop == "resized"
    if args.device_data == "on" or (args.device_data == "auto" and auto):
        if args.data == "imagenet":
            fail("--device-data holds sets of one image size (cifar100, synthetic): use --device-data off")
        if args.train_crop != "resized":
            fail("--device-data crops as RandomResizedCrop only: use --device-data off")
        return device_data.loaders(args, train_set, val_set, sampler, shard, img_size, batch, val_tf, device)
    seeds = torch.Generator().manual_seed(args.seed)  # the workers' own, not drawn from the global RNG
    kw = dict(num_workers=args.workers, persistent_workers=args.workers > 0, generator=seeds)
    kw |= dict(prefetch_factor=4 if args.workers else None, pin_memory=device.type == "cuda")
    train = Augmented(train_set, train_tf, args.seed)
    train = DataLoader(train, batch, sampler=sampler, drop_last=True, **kw)
    return train, DataLoader(Subset(Augmented(val_set, val_tf, args.seed), shard), batch, **kw)


# The model, its optimiser and schedule


def model_config(args) -> Config:
    """The model the flags ask for: the preset, its knobs set by --pe, then the model flags given."""
    knobs = dict(pe=args.pe, drop_path=args.drop_path, attn_drop=args.attn_drop)
    knobs |= {k: getattr(args, k) for k in KNOBS if hasattr(args, k)}  # the model flags given
    try:
        return models.config(args.model, **knobs)
    except ValueError as e:  # Config's own checks, said in one line as for any flag
        fail(str(e))


def build_optimizer(model, args, device: torch.device):
    """AdamW (or SGD with momentum 0.9), no weight decay on biases and norms (all 1-D parameters, as timm's
    optimizer factory), nor on model.no_weight_decay() (DeiT: pos_embed, cls_token) unless
    --decay-pos-embed. Each group's lr_scale: 1 for the head, --backbone-lr for the rest."""
    skip = {n for n, p in model.named_parameters() if p.ndim <= 1}
    skip |= set() if args.decay_pos_embed else model.no_weight_decay()
    named, groups = list(model.named_parameters()), []
    for decayed, head in itertools.product((True, False), (False, True)):
        params = [p for n, p in named if (n not in skip) == decayed and n.startswith("head.") == head]
        scale = 1.0 if head else args.backbone_lr
        groups += (
            [dict(params=params, weight_decay=args.weight_decay * decayed, lr_scale=scale)] if params else []
        )
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr_at(0, args), momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr_at(0, args), eps=1e-8, fused=device.type == "cuda")


def lr_at(epoch: int, args) -> float:
    """timm's per-epoch cosine schedule, as DeiT and Compact Transformers use it: linear warmup from
    warmup_lr, cosine from the peak to min_lr over epochs - cooldown_epochs, then min_lr. The peak is
    --lr, scaled by batch / --lr-batch-scale unless that is 0 (DeiT: 5e-4 x batch / 512)."""
    peak = args.lr * (args.batch_size / args.lr_batch_scale if args.lr_batch_scale else 1)
    cosine_epochs = args.epochs - args.cooldown_epochs
    if epoch < args.warmup_epochs:
        return args.warmup_lr + epoch * (peak - args.warmup_lr) / args.warmup_epochs
    if epoch >= cosine_epochs:
        return args.min_lr
    return args.min_lr + 0.5 * (peak - args.min_lr) * (1 + math.cos(math.pi * epoch / cosine_epochs))


def compile_model(model, mode: str | None):
    """torch.compile with static shapes (the CUDA graphs of reduce-overhead replay one shape)."""
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False) if mode else model


# Checkpoints: written whole or not at all, read back as tensors and plain values only

CHECKPOINT_KEYS = {"model", "ema", "model_config", "optimizer", "epoch", "args", "history", "data"}


def save(path: Path, obj):
    """torch.save(obj) (bytes: as they are) to a temporary file, flushed to the disk, then renamed over
    path: a crash, a kill or a full disk leaves the file before it whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes on the disk before the rename...
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        os.fsync(folder)  # ...and the rename itself
        os.close(folder)
    except (OSError, RuntimeError) as e:  # a full disk reaches torch.save as either
        tmp.unlink(missing_ok=True)
        fail(f"could not write {path} ({e}); the one before is whole: free space, then --resume auto")


def newest(out: Path) -> Path | None:
    """The checkpoint of --output-dir that holds the latest epoch: checkpoint.pt, or best.pt where a run
    stopped between the two saves of a best epoch; None in a folder of no run."""
    found = [p for p in (out / "checkpoint.pt", out / "best.pt") if p.exists()]
    return max(found, key=lambda p: load_checkpoint(p, mmap=True)["epoch"], default=None)


def load_checkpoint(path: Path, keys=CHECKPOINT_KEYS, mmap: bool = False) -> dict:
    """A checkpoint, loaded with weights_only=True (so no pickled code runs), that holds every key of
    `keys`, or one line that says why not. mmap: its tensors are read only where they are used."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # no such file, a folder, no permission, cut short, not torch's, pickled objects
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        fail(f"cannot read checkpoint {path} ({why}): give a .pt file that torch.save wrote, of tensors")
    if not isinstance(ckpt, dict) or not keys <= set(ckpt):
        held = f"no {', '.join(sorted(keys - set(ckpt)))}" if isinstance(ckpt, dict) else type(ckpt).__name__
        fail(f"{path} is not a checkpoint of train.py ({held}): pass its checkpoint.pt or best.pt")
    return ckpt


# The loop


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model, loader, device, batch: int | None = None) -> dict:
    """Loss, top-1 and top-5 over every validation image of every process. With `batch`, a short last batch
    is padded to that size and the padding ignored, so a compiled model sees one shape."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top-1, top-5, count
    for img, target in loader:
        img, target = img.to(device, non_blocking=True), target.to(device, non_blocking=True)
        n = len(target)
        if batch and n < batch:
            img = torch.cat([img, img[:1].expand(batch - n, *img.shape[1:])])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(img)[:n]
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == target[:, None]
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
        counts = [loss, hits[:, 0].sum(), hits.any(-1).sum(), torch.tensor(n, device=device)]
        sums += torch.stack([c.to(torch.float64) for c in counts])  # all on the device: no sync per batch
    loss, top1, top5, n = all_reduce(sums).tolist()
    return dict(val_loss=loss / max(n, 1), val_top1=100 * top1 / max(n, 1), val_top5=100 * top5 / max(n, 1))


def train_step(model, optimizer, micro_batches, smoothing: float, clip: float = 0.0) -> torch.Tensor:
    """One optimizer step over one or more micro-batches [(img, target)]: the gradient of their mean loss,
    exactly as one batch of them all (no BatchNorm here); DDP syncs gradients on the last one only.
    Targets are class ids (B,) or Mixup's soft targets (B, C): cross_entropy smooths either as timm."""
    total = 0.0
    for i, (img, target) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
            with torch.autocast(img.device.type, dtype=torch.bfloat16, enabled=img.is_cuda):  # bf16 on a GPU
                logits = model(img)
            logits = logits.float() if img.is_cuda else logits  # the loss in float32 at least
            loss = F.cross_entropy(logits, target, label_smoothing=smoothing) / len(micro_batches)
            loss.backward()
        total = total + loss.detach()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def check_finite(loss: float, where: str):
    if not math.isfinite(loss):
        fail(f"the loss became {loss} in {where}; stopped before saving it. Lower --lr, then --resume auto")


def train_one_epoch(model, loader, optimizer, mixing, ema, args, epoch: int, device, world: int):
    """One epoch (the EMA, if any, updated after each step); returns its mean training loss over every
    process, and images per second."""
    model.train()
    loss_sum, seen, start = torch.zeros((), device=device, dtype=torch.float64), 0, time.perf_counter()
    batches, step, steps = [], 0, len(loader) // args.accum_steps
    for img, target in loader:
        img, target = img.to(device, non_blocking=True), target.to(device, non_blocking=True)
        batches.append((img, target))
        if len(batches) < args.accum_steps:
            continue
        img, target = (torch.cat(t) for t in zip(*batches))  # the step's batch, mixed whole as without accum
        img, target = mixing(img, target) if mixing else (img, target)
        batches = list(zip(img.chunk(args.accum_steps), target.chunk(args.accum_steps)))
        loss, n = train_step(model, optimizer, batches, args.smoothing, args.clip_grad), len(img)
        if ema:
            ema.update_parameters(model)
        loss_sum, seen, batches, step = loss_sum + loss * n, seen + n * world, [], step + 1
        if step % args.log_every == 0:  # the loop's only waits for the device
            current = all_reduce(loss.clone()).item() / world
            check_finite(current, f"epoch {epoch + 1}, step {step}")
            if MASTER:
                rate = seen / (time.perf_counter() - start)
                print(f"epoch {epoch + 1} step {step}/{steps}  loss {current:.4f}  {rate:.0f} img/s")
    count = torch.tensor(seen / world, device=device, dtype=torch.float64)
    total = all_reduce(torch.stack([loss_sum, count]))
    return (total[0] / total[1].clamp(min=1)).item(), seen / (time.perf_counter() - start)


def run(args, device, rank: int, world: int):
    out = Path(args.output_dir)
    ckpt = load_checkpoint(Path(args.resume)) if args.resume else None
    try:
        cfg = models.config(args.model, **ckpt["model_config"]) if ckpt else model_config(args)
    except (TypeError, ValueError) as e:  # a checkpoint of another mpvg.py
        fail(f"{args.resume}'s model_config does not fit this mpvg.py ({e})")
    train_set, val_set = build_datasets(args, cfg.img_size)
    data = dict(train=len(train_set), val=len(val_set), classes=list(train_set.classes))  # names: label ids
    compared = ["classes"] if args.eval_only else list(data)  # an evaluation may take another split
    if ckpt and (differ := [k for k in compared if ckpt["data"][k] != data[k]]):
        fail(f"the data's {' and '.join(differ)} differ from the checkpoint's: use the data it trained on")
    torch.manual_seed(args.seed)  # the initial weights, the same in every process
    model_class = models.ARCHITECTURES[args.model][0]
    model = model_class(cfg := replace(cfg, num_classes=len(data["classes"]))).to(device)
    try:
        if ckpt:
            model.load_state_dict(ckpt["model"])
        elif args.finetune:
            notes = load_pretrained(model, load_checkpoint(Path(args.finetune), keys=set()))
            if MASTER:
                print(f"--finetune {args.finetune}: loaded" + "".join(f"; {n}" for n in notes))
    except RuntimeError as e:  # weights that do not fit their own config: a damaged or hand-edited file
        fail(f"{args.resume}'s weights do not fit its model_config ({str(e).strip().splitlines()[-1]})")
    except ValueError as e:  # weights of another model
        fail(f"--finetune {args.finetune} {e}")
    if args.eval_ema and not args.model_ema:
        fail("--eval-ema evaluates the EMA of --model-ema: give its decay too")
    ema = None
    if args.model_ema:  # timm's ModelEmaV2: from the first weights, buffers (BatchNorm's) averaged too
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.model_ema), use_buffers=True)
        ema.load_state_dict(ckpt["ema"]) if ckpt else ema.update_parameters(model)
    batch = args.batch_size // (world * args.accum_steps)  # each process's, each micro-batch's
    loaders = make_loaders(args, train_set, val_set, cfg.img_size, batch, device, rank, world)
    train_loader, val_loader = loaders
    compiled = compile_model(model, args.compile)
    static = batch if args.compile else None  # one shape for the compiled graph
    judged = ema.module if args.eval_ema else compiled  # what evaluation, and so best.pt, reads
    if args.eval_only:
        metrics = evaluate(judged, val_loader, device, static)
        if MASTER:
            print(f"{args.resume}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics
    if len(train_loader) < args.accum_steps:
        fail(f"{len(train_loader.sampler)} training images a process make no step: lower --batch-size")
    optimizer, start, history = build_optimizer(model, args, device), 0, []
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        start, history = ckpt["epoch"] + 1, ckpt["history"]
        del ckpt  # applied: its weights and optimizer state are not held for the rest of the run
        if start >= args.epochs:
            fail(f"nothing to train: the checkpoint holds epoch {start} of --epochs {args.epochs}; give more")
    elif any((out / name).exists() for name in ("checkpoint.pt", "best.pt", "metrics.jsonl")):
        fail(f"{out} holds a run's files: continue it with --resume auto, or choose another --output-dir")
    if MASTER:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"cannot make --output-dir {out} ({e.strerror}): choose a folder you can write")
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{args.recipe} recipe, {cfg.pe} ({cfg.pool}), {params:,} parameters, {world} process(es) on "
            f"{device.type}, {len(train_set)} training images; chance: {chance(train_set, val_set):.2f}%"
        )
    gpu = [device.index] if device.type == "cuda" else None
    ddp = DDP(compiled, device_ids=gpu) if world > 1 else compiled
    mixing = Mixing(args.mixup, args.cutmix, cfg.num_classes) if args.mixup > 0 or args.cutmix > 0 else None
    for epoch in range(start, args.epochs):
        torch.manual_seed(seed_of(args.seed, epoch, rank))  # dropout, drop path, Mixup: no RNG state to keep
        train_loader.sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, args) * group["lr_scale"]
        begin = time.perf_counter()
        train_loss, rate = train_one_epoch(
            ddp, train_loader, optimizer, mixing, ema, args, epoch, device, world
        )
        metrics = dict(epoch=epoch + 1, train_loss=train_loss)
        metrics |= evaluate(judged, val_loader, device, static)
        check_finite(train_loss + metrics["val_loss"], f"epoch {epoch + 1}")
        metrics.update(lr=lr_at(epoch, args), images_per_sec=rate, seconds=time.perf_counter() - begin)
        is_best = metrics["val_top1"] > max((m["val_top1"] for m in history), default=-1.0)
        history.append(metrics)
        if MASTER:  # best.pt first: checkpoint.pt never names a best epoch whose file is not there
            state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch, data=data)
            state |= dict(ema=ema.state_dict() if ema else None)
            state |= dict(model_config=asdict(cfg), args=vars(args), history=history)
            for name in ("best.pt", "checkpoint.pt") if is_best else ("checkpoint.pt",):
                save(out / name, state)
            save(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history).encode())
            print("  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    best = max(history, key=lambda m: m["val_top1"])
    if MASTER:
        print(f"best val_top1 {best['val_top1']:.2f} at epoch {best['epoch']}: {out}/best.pt")
    return best


def main(argv=None):
    """Parse, join torchrun's processes (or run as one), train, and on an interrupt say what is saved."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % (world * args.accum_steps):
        fail(f"--batch-size {args.batch_size} does not split evenly over {world} process(es) x --accum-steps")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        return run(args, device, rank, world)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a scheduler's, torchrun's): see the end of the file
        if MASTER:
            print(f"\n{PROG}: {interrupted(Path(args.output_dir), argv, world)}", file=sys.stderr)
        raise SystemExit(130) from None
    except DataError as e:  # from a loader worker, whose traceback's last line is the error itself
        fail(str(e).strip().splitlines()[-1].split("DataError: ")[-1], every_rank=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def interrupted(out: Path, argv: list[str], world: int) -> str:
    """What an interrupted run has saved, and the command that goes on from there."""
    local = os.environ.get("LOCAL_WORLD_SIZE", world)  # the launcher's node flags are the user's to add
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={local}"
    if not (path := newest(out)):
        return f"interrupted before its first checkpoint. Start again: {launcher} train.py {shlex.join(argv)}"
    again = f"{launcher} train.py --resume auto --output-dir {out}"
    return f"interrupted; {path} holds epoch {load_checkpoint(path, mmap=True)['epoch'] + 1}. Go on: {again}"


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a preemption ends the run as Ctrl-C does
    main()
