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
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py and mpvg.py, one folder up

import train
from mpvg import VisionTransformer, analyse, load_model
from tools import flags, resume
from tools.flags import HelpFormatter, fail, out_of_range
from train import build_datasets, build_transforms, load_checkpoint, model_config


def font(size: int = 14):
    """Pillow's own scalable font at a size whose spaces survive (the bitmap fallback where it lacks one)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


FONT, LINE = font(), 20  # text, and the height of a line of it


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


def heatmap(t: torch.Tensor, signed: bool = True, size: tuple | None = None):
    """A tensor's colour map with its colour scale beneath: the gradient and the values at its ends."""
    im = colour(t, signed)
    im = im.resize(size or im.size, Image.NEAREST)
    t = t.detach().float().cpu()
    lo, hi = (-t.abs().max(), t.abs().max()) if signed else (t.min(), t.max())
    sheet = Image.new("RGB", (im.width, im.height + 10 + LINE), "white")
    sheet.paste(im, (0, 0))
    sheet.paste(
        colour(torch.linspace(float(lo), float(hi), im.width)[None].repeat(6, 1), signed), (0, im.height + 3)
    )
    draw = ImageDraw.Draw(sheet)
    labels = [(0, f"{float(lo) + 0.0:.2g}"), (im.width, f"{float(hi) + 0.0:.2g}")]  # + 0.0: no "-0"
    labels += [(im.width // 2, "0")] if signed else []
    for x, text in labels:
        x = min(max(x - draw.textlength(text, font=FONT) / 2, 0), im.width - draw.textlength(text, font=FONT))
        draw.text((x, im.height + 10), text, fill="black", font=FONT)
    return sheet


def captioned(panels: list, columns: int, title: str):
    """Panels (caption, PIL image) in a grid under a title (lines split at '\n'), each captioned."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = lambda text: int(probe.textlength(text, font=FONT))  # noqa: E731
    w = max(max(im.width for _, im in panels), max(width(c) for c, _ in panels)) + 12
    h = max(im.height for _, im in panels) + LINE + 8
    lines = title.split("\n")
    top = LINE * len(lines) + 12
    rows = math.ceil(len(panels) / columns)
    sheet = Image.new("RGB", (max(columns * w + 8, max(map(width, lines)) + 16), rows * h + top), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(lines):
        draw.text((8, 6 + LINE * i), line, fill="black", font=FONT)
    for i, (caption, im) in enumerate(panels):
        x, y = 8 + (i % columns) * w, top + (i // columns) * h
        draw.text((x, y), caption, fill="black", font=FONT)
        sheet.paste(im, (x, y + LINE))
    return sheet


def bars(values: list, title: str):
    """A bar chart of values in [-1, 1], one bar per layer (None: no bar), with its axes labelled."""
    left, mid, height = 50, 150, 270
    caption = "x: layer l;  y: Pearson r of LN_l(x_l) and the PE layer l receives (no bar: no PE there)"
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = int(max(left + 40 * len(values) + 20, probe.textlength(title, font=FONT) + 16,
                    probe.textlength(caption, font=FONT) + left + 8))  # fmt: skip
    im = Image.new("RGB", (width, height + 36), "white")
    draw = ImageDraw.Draw(im)
    draw.text((8, 6), title, fill="black", font=FONT)
    draw.line((left, mid, left + 40 * len(values) + 10, mid), fill="black")
    for r, label in ((1, "+1"), (0, " 0"), (-1, "-1")):
        draw.text((16, mid - r * 100 - 8), label, fill="black", font=FONT)
    for l, v in enumerate(values):
        x = left + 10 + 40 * l
        if v is not None:
            top, bottom = sorted((mid, mid - v * 100))
            draw.rectangle((x, top, x + 24, bottom), fill="firebrick" if v > 0 else "royalblue")
        draw.text((x + 8, height - 12), str(l), fill="black", font=FONT)
    draw.text((left, height + 10), caption, fill="black", font=FONT)
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
    torch.manual_seed(args.seed)  # a new model's weights, and so its figures, are the same every run
    if args.analyze == "new":
        cfg = model_config(args)
        model = VisionTransformer(cfg)
        source = f"a new {cfg.pe} model"
    else:
        ckpt = args.checkpoint
        try:
            model = load_model(ckpt)
        except (ValueError, RuntimeError) as e:  # fields this mpvg.py lacks; weights that do not fit
            fail(f"{args.analyze}: {str(e).strip().splitlines()[-1].strip()}")
        cfg = model.cfg
        path = Path(args.analyze).resolve()
        source = (
            f"{path.parent.name}/{path.name} (epoch {ckpt['epoch'] + 1})"  # the run, not the machine path
        )
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot write --output-dir {out} ({type(e).__name__}: {e.strerror}); choose another one")
    _, val_set, _ = build_datasets(args, cfg.img_size, noise_classes=cfg.num_classes)
    val_set = train.Augmented(val_set, build_transforms(args, cfg.img_size)[1], args.seed)
    n = min(args.analyze_images, len(val_set))
    spread = torch.linspace(0, len(val_set) - 1, n).long().tolist()  # image folders are sorted by class
    try:
        images = torch.stack([val_set[i][0] for i in spread]).to(device)
    except train.DataError as e:  # an unreadable image, named
        fail(str(e))
    stats = analyse(model.to(device), images)

    zoom = max(1, 160 // max(cfg.num_tokens, cfg.dim))
    panels = []
    for l, (t, p, r) in enumerate(zip(stats["fig2_tokens"], stats["fig2_pos"], stats["fig4_correlation"])):
        size = (t.shape[1] * zoom, t.shape[0] * zoom)
        panels.append((f"layer {l}: LN_l(x_l)", heatmap(t, size=size)))
        pe = heatmap(p, size=size) if p is not None else Image.new("RGB", size, "white")
        panels.append((f"layer {l}: PE, r = {r:+.2f}" if p is not None else f"layer {l}: no PE", pe))
    title = (f"Fig. 2 of {source}: the tokens after LN_l (batch mean) and the PE each layer receives\n"
             f"x: dimension, y: token; blue < 0 < red, each panel on its own scale")  # fmt: skip
    captioned(panels, 4, title).save(out / "fig2_heatmaps.png")
    title = (
        f"Fig. 4 of {source}: correlation of token embedding and PE after their LNs ({cfg.pe}, {cfg.pool})"
    )
    bars(stats["fig4_correlation"], title).save(out / "fig4_correlation.png")
    last, norm = stats["last_ln"], model.norm
    strip = (max(384, cfg.dim), 24)
    strips = [
        ("Last LN gamma - 1, by dimension", heatmap(norm.weight[None] - 1, size=strip)),
        ("Last LN beta, by dimension", heatmap(norm.bias[None], size=strip)),
    ]
    fresh = last["beta_var"] == 0 and last["gamma_var"] == 0
    note = (
        "\nan untrained model: gamma = 1 and beta = 0 everywhere, so both strips are blank" if fresh else ""
    )
    title = (f"Appendix Fig. 6 of {source}: var(beta) {last['beta_var']:.4f}, "
             f"cosine before/after the Last LN {last['cosine']:.4f}{note}")  # fmt: skip
    captioned(strips, 1, title).save(out / "fig6_last_ln.png")

    mean, std = torch.tensor(args.mean)[:, None, None], torch.tensor(args.std)[:, None, None]
    size, panels = (max(128, cfg.img_size),) * 2, []
    for b in sorted(set(torch.linspace(0, n - 1, 4).long().tolist())):  # four images, spread over the classes
        picture = (images[b].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).mul(255).round().to(torch.uint8)
        panels += [
            (f"image {b}", Image.fromarray(picture.numpy()).resize(size, Image.NEAREST)),
            ("norm before the Last LN", heatmap(stats["fig7_norms_pre"][b], signed=False, size=size)),
            ("norm after the Last LN", heatmap(stats["fig7_norms_post"][b], signed=False, size=size)),
        ]
    title = (f"Fig. 7 of {source}: the L2 norm of each patch token before and after the Last LN\n"
             f"per map: white its smallest, red its largest")  # fmt: skip
    captioned(panels, 3, title).save(out / "fig7_token_norms.png")

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, allow_abbrev=False
    )
    p.add_argument("analyze", nargs="?", default="new", metavar="CKPT",
                   help="a checkpoint of train.py, analysed as trained: on its data, recipe and seed unless "
                        "given; without one, a new model from --model and --pe")  # fmt: skip
    train.add_data_flags(p, default="synthetic")
    train.add_model_flags(p, unset="the preset's value; they build a new model, so not with CKPT")
    train.add_recipe_flags(p)
    g = p.add_argument_group("analysis")
    g.add_argument(
        "--analyze-images", type=int, default=64, help="validation images the analysis averages over"
    )
    g.add_argument("--output-dir", default="runs/analysis", help="where the figures and analysis.json go")
    g.add_argument("--seed", type=int, default=0, help="a new model's weights, and the data")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    given = [
        f"--{k.replace('_', '-')}" for k in ["model", *train.MODEL_FLAGS] if getattr(args, k) is not None
    ]
    if given and args.analyze != "new":
        fail(f"{', '.join(given)} build a new model, but {args.analyze} is analysed as it was trained: "
             f"drop them, or drop CKPT to analyse a new model")  # fmt: skip
    checkpoint = load_checkpoint(args.analyze) if args.analyze != "new" else None
    if checkpoint:  # its data, recipe and seed unless given, as train.py's --eval-only takes them
        args = resume.inherit(p, argv, checkpoint, train.INHERITED)
    args = train.resolve_recipe(args)
    if problem := out_of_range(args, {"analyze_images": "[1, inf)"}):
        fail(problem)
    args.checkpoint = checkpoint
    return args


def main(argv=None):
    return analyze(parse_args(argv), train.pick_device())


if __name__ == "__main__":
    flags.PROG = "analyze.py"  # as argparse names it
    main()
