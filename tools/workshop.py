"""A workshop on a laptop: tiny ViTs of every PE mode learn a task that only position solves.

python tools/workshop.py            # about a minute on a 2-core CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py and mpvg.py, one folder up

import train
from mpvg import Config, VisionTransformer, analyse
from tools import flags
from tools.flags import fail, out_of_range
from train import evaluate, pick_device, train_step


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


def workshop(args, device, epochs: int = 10, train_size: int = 4096, val_size: int = 1024, models=None):
    train_set, val_set = WhereIsThePlus(train_size, args.seed), WhereIsThePlus(val_size, args.seed + 1)
    models = models or WORKSHOP_MODELS
    print(f"workshop: {len(models)} tiny ViTs (16 px, 4 px patches, 48 wide, 4 deep) learn where a plus "
          f"sign is (16 classes; the commonest holds 8.2% of labels); {train_size} training images, {epochs} epochs, seed {args.seed}")  # fmt: skip
    rows = []
    for pe, pool in models:
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
                train_step(model, optimizer, [(img.to(device), target.to(device))], smoothing=0.0, amp=False)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--seed", type=int, default=0, help="data and model initialisation")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if problem := out_of_range(args, {"seed": train.RANGES["seed"]}):  # as train.py's
        fail(problem)
    return args


def main(argv=None):
    return workshop(parse_args(argv), pick_device())


if __name__ == "__main__":
    flags.PROG = "workshop.py"  # as argparse names it
    main()
