"""The paper's analysis as pictures: Figs. 2, 4, 6 (Appendix) and 7, of a checkpoint or of a new model.

    python -m tools.analyze --checkpoint runs/default/best.pt --out runs/analysis   # on its own data
    python -m tools.analyze --model deit_tiny --pe lape --out runs/analysis_new        # a new model

Any other flag is train.py's: a checkpoint is read as `train.py --eval-only --resume CKPT` reads it (its
data, recipe and seed, unless given anew); a new model is built as train.py builds it (--data synthetic
unless given).
"""

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import models
from mpvg import VisionTransformer
from training import UserError, flags
from training.data import Augmented, DataError, build_datasets, build_transforms
from training.engine import model_config
from training.recipes import NORMALISATION


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
    width = max(left + 40 * len(values) + 20, probe.textlength(title, font=FONT) + 16)
    width = int(max(width, probe.textlength(caption, font=FONT) + left + 8))
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


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's correlation coefficient over all entries of two tensors of one shape."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


@torch.no_grad()
def analyse(model, images: torch.Tensor) -> dict:
    """What the paper's analysis reads, from one traced forward over a batch of images.

    fig2_tokens[l], fig2_pos[l]: LN_l(x_l) averaged over the batch, and the PE layer l received
        (both after their LayerNorms, as they enter the MSA), (N, D) each; pos None where none.
    fig4_correlation[l]: Pearson's r between those two heatmaps (Figs. 2b and 4); None without PE.
    last_ln: the Last LN's beta and gamma variances (population) and the cosine similarity of the
        pooled representation (class token, or token mean) before and after it, Eq. (11) included,
        each averaged over the batch first (Appendix, Fig. 6).
    fig7_norms_pre, fig7_norms_post: per-patch-token L2 norms before and after the Last LN,
        (B, H/P, W/P) (Appendix, Fig. 7); None for CeiT, whose Last LN reads one token.
    """
    model.eval()
    trace = {}
    model.forward_features(images, trace=trace)
    tokens = [block.norm1(x).mean(dim=0) for block, x in zip(model.blocks, trace["tokens"])]
    pos = [None if p is None else p[0] for p in trace["pos"]]
    pre, post = trace["pre_norm"], trace["post_norm"]
    grid = model.cfg.img_size // model.cfg.patch_size
    patch_norms = lambda t: t[:, t.shape[1] - grid * grid :].norm(dim=-1).unflatten(1, (grid, grid))  # noqa: E731
    per_patch = pre.shape[1] >= grid * grid  # not CeiT's: its Last LN reads LCA's one token
    cosine = F.cosine_similarity(model.pool(pre).mean(dim=0), model.pool(post).mean(dim=0), dim=0)
    return dict(
        fig2_tokens=tokens,
        fig2_pos=pos,
        fig4_correlation=[None if p is None else pearson(t, p) for t, p in zip(tokens, pos)],
        last_ln=dict(
            beta_var=float(model.norm.bias.var(unbiased=False)),
            gamma_var=float(model.norm.weight.var(unbiased=False)),
            cosine=float(cosine),
        ),
        fig7_norms_pre=patch_norms(pre) if per_patch else None,
        fig7_norms_post=patch_norms(post) if per_patch else None,
    )


def analyze(args, resumed: tuple[Path, dict] | None, ours, device) -> dict:
    """The figures and analysis.json of the checkpoint `resumed` (its path and contents), or of a new model
    of the flags."""
    torch.manual_seed(args.seed)  # a new model's weights, and so its figures, are the same every run
    if resumed:
        path, ckpt = resumed
        try:
            model = models.load_model(ckpt)
        except (TypeError, ValueError, RuntimeError) as e:  # a config or weights of another mpvg.py
            raise UserError(f"{path}: {str(e).strip().splitlines()[-1]}") from None
        path = path.resolve()
        source = f"{path.parent.name}/{path.name} (epoch {ckpt['epoch'] + 1})"  # the run, not the machine's
    cfg = model.cfg if resumed else model_config(args)
    _, val_set = build_datasets(args, cfg.img_size)
    if not resumed:
        cfg = replace(cfg, num_classes=len(val_set.classes))
        model, source = models.create_model(args.model, **asdict(cfg)), f"a new {cfg.pe} model"
    if not isinstance(model, VisionTransformer):
        raise UserError(
            f"the analysis reads one token grid a layer, as ViT, CeiT and T2T-ViT have: not {args.model}'s"
        )
    out = Path(ours.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot write --out {out} ({type(e).__name__}: {e.strerror}): choose another folder"
        ) from None
    val_set = Augmented(val_set, build_transforms(args, cfg.img_size)[1], args.seed)
    n = min(ours.images, len(val_set))
    spread = torch.linspace(0, len(val_set) - 1, n).long().tolist()  # image folders are sorted by class
    try:
        images = torch.stack([val_set[i][0] for i in spread]).to(device)
    except DataError as e:  # an unreadable image, named
        raise UserError(str(e)) from None
    stats = analyse(model.to(device), images)

    zoom = max(1, 160 // max(cfg.num_tokens, cfg.dim))
    panels = []
    for l, (t, p, r) in enumerate(zip(stats["fig2_tokens"], stats["fig2_pos"], stats["fig4_correlation"])):
        size = (t.shape[1] * zoom, t.shape[0] * zoom)
        panels.append((f"layer {l}: LN_l(x_l)", heatmap(t, size=size)))
        pe = heatmap(p, size=size) if p is not None else Image.new("RGB", size, "white")
        panels.append((f"layer {l}: PE, r = {r:+.2f}" if p is not None else f"layer {l}: no PE", pe))
    title = (
        f"Fig. 2 of {source}: the tokens after LN_l (batch mean) and the PE each layer receives\n"
        "x: dimension, y: token; blue < 0 < red, each panel on its own scale"
    )
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
    title = (
        f"Appendix Fig. 6 of {source}: var(beta) {last['beta_var']:.4f}, "
        f"cosine before/after the Last LN {last['cosine']:.4f}{note}"
    )
    captioned(strips, 1, title).save(out / "fig6_last_ln.png")

    mean, std = (torch.tensor(v)[:, None, None] for v in NORMALISATION[args.recipe])
    size, panels = (max(128, cfg.img_size),) * 2, []
    shown = [] if stats["fig7_norms_pre"] is None else torch.linspace(0, n - 1, 4).long().tolist()
    for b in sorted(set(shown)):  # four images, spread over the classes
        picture = (images[b].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).mul(255).round().to(torch.uint8)
        panels += [
            (f"image {b}", Image.fromarray(picture.numpy()).resize(size, Image.NEAREST)),
            ("norm before the Last LN", heatmap(stats["fig7_norms_pre"][b], signed=False, size=size)),
            ("norm after the Last LN", heatmap(stats["fig7_norms_post"][b], signed=False, size=size)),
        ]
    title = (
        f"Fig. 7 of {source}: the L2 norm of each patch token before and after the Last LN\n"
        "per map: white its smallest, red its largest"
    )
    figures = ["fig2_heatmaps.png", "fig4_correlation.png", "fig6_last_ln.png"]
    if panels:
        captioned(panels, 3, title).save(out / "fig7_token_norms.png")
        figures.append("fig7_token_norms.png")

    report = dict(source=source, model_config=asdict(cfg), images=n, data=args.data, **stats)
    (out / "analysis.json").write_text(json.dumps(rounded(report)))
    print(f"analysis of {source} over {n} {args.data} images -> {out}/")
    print(f"{'layer':>5}  {'Fig. 4 r':>9}")
    for l, r in enumerate(stats["fig4_correlation"]):
        print(f"{l:>5}  {'-' if r is None else f'{r:+.4f}':>9}")
    print(
        f"Last LN: var(beta) {last['beta_var']:.4f}  var(gamma) {last['gamma_var']:.4f}  "
        f"cosine before/after {last['cosine']:.4f}"
    )
    print(f"wrote {', '.join(figures)}, analysis.json")
    return report


def build_parser(train_flags: bool = True):
    """The analysis's own flags, and (for --help and their checks) train.py's."""
    parents = [flags.build_parser(add_help=False)] if train_flags else []
    p = flags.Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False, parents=parents)
    p.add_argument("--checkpoint", metavar="CKPT", help="a checkpoint of train.py [none: a new model]")
    p.add_argument("--images", type=flags.COUNT, default=64, help="validation images averaged over [64]")
    p.add_argument("--out", default="runs/analysis", help="the folder of the figures and analysis.json")
    return p


def main(argv=None):
    build_parser().parse_args(argv)  # every flag, train.py's too, checked as --help lists them
    ours, rest = build_parser(train_flags=False).parse_known_args(argv)
    train_flags = ["--eval-only", "--resume", ours.checkpoint] if ours.checkpoint else ["--data", "synthetic"]
    try:
        args, resumed = flags.parse([*train_flags, *rest])
        return analyze(args, resumed, ours, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except UserError as e:
        raise SystemExit(f"analyze.py: error: {e}") from None


if __name__ == "__main__":
    main()
