"""The command line of train.py and the tools: every flag with its range, checked as it is read, and the
run's flags layered from the defaults, the recipe (or the checkpoint of a resume) and the command line."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import models
from mpvg import PE_MODES
from training import UserError, checkpoint
from training.recipes import DATA, MODEL_RECIPES, RECIPES

DEFAULTS = dict(  # every other flag's default; the model flags default to the preset's (and --pe's) values
    data="cifar100", data_path="./data", synthetic_size=2560, workers=min(8, os.cpu_count() or 1),
    device_data="auto", model=None, pe="mpvg", seed=0, output_dir="runs/default", resume=None, finetune=None,
    eval_only=False, accum_steps=1, compile=None, log_every=50,
)  # fmt: skip
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch's


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage of fifty flags above it
        self.exit(2, f"{self.prog}: error: {message}\n")


def typed(kind, ok, rule: str):
    """An argparse type: the text read as `kind`, refused in one line unless ok(value) (nan never is)."""

    def parse(text: str):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value: ..." names the type
    return parse


def boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def layer(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("got an empty path (is a shell variable unset?)")
    return text


# Each range is one that the arithmetic after it survives (an lr of 1e39 is no float32; Beta(1e-7, 1e-7)
# draws 0.5 in float32, always; a crop of 1e-9 resizes to a billion pixels).
COUNT = typed(int, lambda v: v >= 1, "1 or more")
NATURAL = typed(int, lambda v: v >= 0, "0 or more")
LR = typed(float, lambda v: 0 < v <= 10, "in (0, 10]")
LR_OR_0 = typed(float, lambda v: 0 <= v <= 10, "in [0, 10]")
POSITIVE = typed(float, lambda v: 0 < v < math.inf, "positive")
NON_NEGATIVE = typed(float, lambda v: 0 <= v < math.inf, "0 or more")
ALPHA = typed(float, lambda v: v == 0 or 1e-3 <= v <= 1e3, "0 (off) or in [0.001, 1000]")
RATE = typed(float, lambda v: 0 <= v < 1, "in [0, 1)")
PROBABILITY = typed(float, lambda v: 0 <= v <= 1, "in [0, 1]")
FRACTION = typed(float, lambda v: 0.01 <= v <= 1, "in [0.01, 1]")
CROP = typed(float, lambda v: 0.1 <= v <= 1, "in [0.1, 1]")
MAGNITUDE = typed(int, lambda v: 0 <= v <= 10, "in 0..10")
SEED = typed(int, lambda v: 0 <= v < 2**32, "in 0..2**32 - 1")


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    about = (
        "Train or evaluate the paper's models in its PE modes. [...]: the default, or each recipe's value. "
        "A resume takes every flag from its checkpoint; of them it may be given anew only --epochs, --lr, "
        "--output-dir, --data-path, --workers, --device-data, --accum-steps, --compile and --log-every."
    )
    p = Parser(description=about, argument_default=argparse.SUPPRESS, allow_abbrev=False, add_help=add_help)

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
    g = p.add_argument_group("model (left out: the preset's value, or the --pe mode's; docs/models.md)")
    add(g, "--model", "preset [from --recipe]", choices=list(models.ARCHITECTURES))
    add(g, "--pe", "PE mode", choices=list(PE_MODES))
    add(
        g,
        "--pool",
        "cls: read the class token; gap: average the tokens [the --pe mode's]",
        choices=["cls", "gap"],
    )
    add(g, "--pe-input", "add PE before layer 0, Eq. 1/8 (true, false)", type=boolean)
    add(g, "--pe-layers", "the layers whose MSA input gets PE, Eq. 6/9", choices=["none", "all", "skip0"])
    add(g, "--pe-hierarchical", "pos_l = LN'_l(pos_{l-1}), Eq. 7/10 (false: Table 6)", type=boolean)
    add(g, "--last-pe", "k of LN(pos_k) at the Last LN, Eq. 11, or none", type=layer)
    add(
        g,
        "--img-size",
        "side of the square input, in pixels [the preset's: 224; vit_lite_7_4: 32]",
        type=COUNT,
    )
    add(
        g,
        "--patch-size",
        "side of a patch, in pixels [the preset's: 16; vit_lite_7_4: 4, swin: 4]",
        type=COUNT,
    )
    add(g, "--dim", "width of a token, D [the preset's]", type=COUNT)
    add(g, "--depth", "layers, L + 1 [the preset's: 12; vit_lite_7_4, t2t_vit_7: 7]", type=COUNT)
    add(g, "--heads", "attention heads [the preset's]", type=COUNT)
    add(g, "--window", "swin_tiny's attention window, M [7]", type=COUNT)
    g = p.add_argument_group("recipe (each anchor's, docs/training.md; synthetic: the built-in task's)")
    add(g, "--recipe", "[the --model's anchor's for --data, else by --data]", choices=list(RECIPES))
    add(g, "--epochs", "epochs in all, cooldown included", type=COUNT)
    add(g, "--cooldown-epochs", "last epochs held at --min-lr", type=NATURAL)
    add(g, "--batch-size", "global batch, split over the processes (and --accum-steps)", type=COUNT)
    add(g, "--lr", "peak learning rate, before the batch scaling", type=LR)
    add(g, "--lr-batch-scale", "lr is scaled by batch / this (0: no scaling)", type=NATURAL)
    add(g, "--min-lr", "end of the cosine", type=LR_OR_0)
    add(g, "--warmup-lr", "linear warmup starts here", type=LR_OR_0)
    add(g, "--warmup-epochs", "epochs of linear warmup", type=NATURAL)
    add(g, "--warmup-prefix", "the cosine spans the epochs after the warmup, not all from 0", type=boolean)
    add(g, "--optimizer", "sgd: momentum 0.9", choices=["adamw", "sgd"])
    add(g, "--backbone-lr", "every weight but the head's at --lr times this", type=LR)
    add(g, "--weight-decay", "never on biases and norms", type=NON_NEGATIVE)
    add(g, "--clip-grad", "largest gradient norm (0: no clipping)", type=NON_NEGATIVE)
    add(g, "--model-ema", "decay of an EMA of the weights, saved with them (0: none)", type=RATE)
    add(g, "--eval-ema", "evaluate the EMA weights, and choose best.pt by them", type=boolean)
    add(g, "--decay-pos-embed", "weight decay on pos_embed and cls_token too", type=boolean)
    add(g, "--drop-path", "stochastic depth of the last layer", type=RATE)
    add(g, "--attn-drop", "dropout on attention weights", type=RATE)
    add(g, "--smoothing", "label smoothing", type=RATE)
    add(g, "--mixup", "Mixup alpha (0: off)", type=ALPHA)
    add(g, "--cutmix", "CutMix alpha (0: off); with both on, one of the two per batch", type=ALPHA)
    add(g, "--randaug-magnitude", "timm's RandAugment rand-mM-mstd0.5-inc1 (0: off)", type=MAGNITUDE)
    add(g, "--reprob", "random erasing probability, per-pixel noise", type=PROBABILITY)
    add(g, "--repeated-aug", "copies of each image drawn, side by side (1: off)", type=COUNT)
    add(g, "--train-crop", "padded: resize, then RandomCrop padded by 1/8", choices=["resized", "padded"])
    add(g, "--crop-scale", "smallest area of RandomResizedCrop", type=FRACTION)
    add(g, "--hflip", "horizontal flip probability", type=PROBABILITY)
    add(g, "--eval-crop", "center crop over resize at evaluation", type=CROP)
    add(g, "--interpolation", "of the crop and RandAugment", choices=["bilinear", "bicubic", "random"])
    g = p.add_argument_group("run")
    add(g, "--seed", "initialisation, data order and augmentation", type=SEED)
    add(g, "--output-dir", "the run's checkpoints and metrics.jsonl", type=path)
    add(g, "--resume", "go on with a run: the newest checkpoint in --output-dir (auto), or PATH", type=path)
    add(
        g,
        "--finetune",
        "start a new run from these weights (train.py's, DeiT's or timm's)",
        metavar="CKPT",
        type=path,
    )
    add(g, "--eval-only", "evaluate the --resume checkpoint and stop", action="store_true")
    add(g, "--accum-steps", "micro-batches per step: the same update in less memory", type=COUNT)
    add(g, "--compile", "torch.compile the model", nargs="?", const="default", choices=COMPILE_MODES)
    add(g, "--log-every", "steps between progress lines (each waits for the device)", type=COUNT)
    return p


ON_OFF = ["auto", "on", "off"]


def parse(argv=None) -> tuple[argparse.Namespace, tuple[Path, dict] | None]:
    """The run's flags, layered: the defaults, the recipe's values (on a resume: the checkpoint's flags),
    then the command line's; and on a resume the checkpoint it goes on from, and its path."""
    given = vars(build_parser().parse_args(argv))
    if "finetune" in given and given.get("resume", "auto") != "auto":  # auto: fine-tune, or go on with it
        raise UserError("--resume PATH goes on with a run and --finetune starts a new one: give one of them")
    out = Path(given.get("output_dir", DEFAULTS["output_dir"]))
    resumed = checkpoint.resume(given, out) if given.get("resume") else None
    if resumed:
        args = argparse.Namespace(**resumed[1]["args"] | given)
        if missing := set(DEFAULTS) - set(vars(args)) or set(RECIPES["deit"]) - set(vars(args)):
            raise UserError(
                f"{resumed[0]}'s flags lack --{sorted(missing)[0].replace('_', '-')}: a hand-edited file"
            )
        if not args.eval_only and (done := resumed[1]["epoch"] + 1) >= args.epochs:
            raise UserError(
                f"nothing to train: the checkpoint holds epoch {done} of --epochs {args.epochs}; give more"
            )
        return args, resumed
    if given.get("eval_only"):
        raise UserError(
            "--eval-only needs a checkpoint: --resume PATH, or --resume auto with one in --output-dir"
        )
    if given.get("resume") and os.environ.get("RANK", "0") == "0":
        print(f"--resume auto: no checkpoint in {out}, starting a new run")
    data = given.get("data", DEFAULTS["data"])
    recipe = given.get("recipe") or MODEL_RECIPES.get((data, given.get("model"))) or DATA[data]
    return argparse.Namespace(**DEFAULTS | RECIPES[recipe] | given | dict(recipe=recipe, resume=None)), None
