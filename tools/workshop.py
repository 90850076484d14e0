"""A workshop on a laptop: tiny ViTs of every PE mode learn train.py's built-in task, which only
position solves.

    python -m tools.workshop            # a few minutes on a 2-core CPU

Each image is noise with a plus sign and a square at random pixels; the label is the cell of the 4 x 4
patch grid that holds the plus sign's centre. The table: each model's parameters and validation top-1.
"""

import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mpvg import Config, VisionTransformer
from training import flags
from training.data import PlusSigns
from training.engine import evaluate, train_step

TINY_VIT = dict(img_size=16, patch_size=4, num_classes=16, dim=48, depth=4, heads=3, mlp_ratio=2.0)
MODELS = [  # (pe, pool): every pairing of the paper's Fig. 1, and no PE at all
    ("none", "gap"),
    ("default", "cls"),
    ("default", "gap"),
    ("lape", "cls"),
    ("lape", "gap"),
    ("pvg", "gap"),
    ("mpvg", "gap"),
]


def as_tensors(data: PlusSigns) -> list:
    """The whole set as normalised float images: at 16 px it fits in memory many times over."""
    return [((img.float() / 255 - 0.5) / 0.5, label) for img, label in (data[i] for i in range(len(data)))]


def workshop(seed: int = 0, epochs: int = 10, train_size: int = 4096, val_size: int = 1024, models=MODELS):
    train_set = as_tensors(PlusSigns(train_size, 16, seed))
    val_set = as_tensors(PlusSigns(val_size, 16, seed + 1))
    labels = torch.tensor([label for _, label in train_set])
    commonest = torch.bincount(labels).max().item() / len(labels)
    print(
        f"workshop: {len(models)} tiny ViTs (16 px, 4 px patches, 48 wide, 4 deep) learn where a plus sign "
        f"is (16 classes; the commonest holds {100 * commonest:.1f}% of the training labels); {train_size} "
        f"training images, {epochs} epochs, seed {seed}"
    )
    rows = []
    print(f"{'PE':<9}{'pool':<6}{'params':>8}{'top-1':>8}{'s':>5}")  # a row as each model is done
    for pe, pool in models:
        torch.manual_seed(seed)
        cfg = Config(**TINY_VIT, pe=pe, pool=pool)
        model = VisionTransformer(cfg)
        loader = DataLoader(train_set, batch_size=64, shuffle=True, drop_last=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        steps = epochs * len(loader)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps, pct_start=0.1)
        start = time.perf_counter()
        model.train()
        for _ in tqdm(range(epochs), desc=f"{pe} ({pool})", leave=False, disable=None):
            for batch in loader:
                train_step(model, optimizer, [batch], smoothing=0.0)
                schedule.step()
        top1 = evaluate(model, DataLoader(val_set, batch_size=256), torch.device("cpu"))["val_top1"]
        params = sum(p.numel() for p in model.parameters())
        rows.append(dict(pe=pe, pool=pool, params=params, top1=top1, seconds=time.perf_counter() - start))
        print(f"{pe:<9}{pool:<6}{params:>8,}{top1:>7.1f}%{rows[-1]['seconds']:>5.0f}", flush=True)
    return rows


def build_parser():
    p = flags.Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--seed", type=flags.SEED, default=0, help="data and initialisation [0]")
    return p


def main(argv=None):
    try:
        return workshop(build_parser().parse_args(argv).seed)
    except KeyboardInterrupt:  # nothing to save: the rows printed so far are the workshop's
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
