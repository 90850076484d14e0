"""The paper's analysis as pictures: Figs. 2, 4, 6 (Appendix) and 7, from mpvg.analyse.

python tools/analyze.py runs/vit_lite_mpvg/best.pt --data cifar100 --output-dir runs/analysis
python tools/analyze.py --model deit_tiny --pe lape --output-dir runs/analysis_new   # a new model
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py and mpvg.py, one folder up

import train
from mpvg import Config, VisionTransformer, analyse
from train import build_datasets, build_transforms, load_checkpoint, model_config


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=train.HelpFormatter)
    p.add_argument("analyze", nargs="?", default="new", metavar="CKPT",
                   help="a checkpoint of train.py; without one, a new model from --model and --pe")  # fmt: skip
    train.add_data_flags(p, default="synthetic")
    train.add_model_flags(p)
    train.add_recipe_flags(p)
    g = p.add_argument_group("analysis")
    g.add_argument(
        "--analyze-images", type=int, default=64, help="validation images the analysis averages over"
    )
    g.add_argument("--output-dir", default="runs/analysis", help="where the figures and analysis.json go")
    g.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return train.resolve_recipe(build_parser().parse_args(argv))


def main(argv=None):
    return analyze(parse_args(argv), train.pick_device())


if __name__ == "__main__":
    main()
