"""The recipes' augmentations: timm's RandAugment built from torchvision's functionals, per image and
batched on the device (the same distribution), Mixup and CutMix as timm's, the loss they train with,
and the PE resized for fine-tuning."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mpvg import create_model
from training import device_data, engine, flags, randaugment
from training.data import EpochSampler, PlusSigns, build_transforms
from training.finetune import resize_pos_embed
from training.mixing import Mixing


def cifar_args(*extra):
    return flags.parse(["--recipe", "cifar", *extra])[0]


def fixed_image(seed=0):
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 255, 32)[None, :].expand(32, 32)
    return (
        (ramp[None] * torch.tensor([1.0, 0.6, 0.2])[:, None, None] + 40 * torch.rand(3, 32, 32, generator=g))
        .clamp(0, 255)
        .to(torch.uint8)
    )


def test_randaugment_ops_equal_torchvisions_functionals_and_pils_transforms():
    """Each op with one argument per image: the pixel ops equal torchvision's functional with that argument
    (the blends may round one level apart); the geometric ops equal PIL's affine transforms, which timm
    uses (a point outside the image reads the fill, neighbours clamp to the edge; PIL truncates)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    fill = (129, 124, 112)
    pixel_ops = [
        ("PosterizeIncreasing", 1, TF.posterize(x, 1)),
        ("PosterizeIncreasing", 0, TF.posterize(x, 0)),
        ("SolarizeIncreasing", 26, TF.solarize(x, 26)),
        ("Invert", 0, TF.invert(x)),
        ("SolarizeAdd", 99, torch.where(x < 128, (x.int() + 99).clamp(max=255), x.int()).to(torch.uint8)),
        ("AutoContrast", 0, TF.autocontrast(x)),
        ("Equalize", 0, TF.equalize(x)),
        ("ColorIncreasing", 0.19, TF.adjust_saturation(x, 0.19)),
        ("ContrastIncreasing", 1.81, TF.adjust_contrast(x, 1.81)),
        ("BrightnessIncreasing", 0.1, TF.adjust_brightness(x, 0.1)),
        ("SharpnessIncreasing", 1.81, TF.adjust_sharpness(x, 1.81)),
    ]

    def pil(img, name, arg):
        im, kw = Image.fromarray(img.permute(1, 2, 0).numpy()), dict(resample=Image.BILINEAR, fillcolor=fill)
        if name == "Rotate":
            return im.rotate(arg, **kw)
        matrix = {
            "ShearX": (1, arg, 0, 0, 1, 0),
            "ShearY": (1, 0, 0, arg, 1, 0),
            "TranslateXRel": (1, 0, arg * 32, 0, 1, 0),
            "TranslateYRel": (1, 0, 0, 0, 1, arg * 32),
        }[name]
        return im.transform(im.size, Image.AFFINE, matrix, **kw)

    geometric = [
        (name, arg, torch.stack([torch.from_numpy(np.array(pil(i, name, arg))).permute(2, 0, 1) for i in x]))
        for name, arg in (
            ("Rotate", 27.0),
            ("Rotate", -13.0),
            ("ShearX", 0.27),
            ("ShearY", -0.2),
            ("TranslateXRel", 0.3),
            ("TranslateYRel", -0.405),
        )
    ]
    for name, arg, expected in pixel_ops + geometric:
        args = torch.full((len(x),), float(arg), dtype=torch.float64)
        out = randaugment.apply_op(name, x, args, torch.zeros(len(x), dtype=torch.bool), fill)
        assert (out.int() - expected.int()).abs().max() <= 1, name
        assert (out != expected).float().mean() < 0.1, name
    one_channel = randaugment.apply_op(
        "Rotate",
        x[:, :1],
        torch.full((3,), 20.0, dtype=torch.float64),
        torch.zeros(3, dtype=torch.bool),
        fill,
    )
    assert one_channel.shape == (3, 1, 32, 32)


def timm_policy_draws(n: int, seed: int = 0) -> list:
    """What timm's rand-m9-mstd0.5-inc1 applies to n images: per image, the (op, argument) it ran."""
    import random

    import numpy as np
    from PIL import Image
    from timm.data import auto_augment

    ran = []
    recorder = lambda name: lambda img, *args, **kw: ran[-1].append((name, args[0] if args else 0.0)) or img  # noqa: E731
    saved = dict(auto_augment.NAME_TO_OP)
    try:
        auto_augment.NAME_TO_OP.update({name: recorder(name) for name in saved})
        transform = auto_augment.rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": (124, 116, 104)})
    finally:
        auto_augment.NAME_TO_OP.update(saved)
    random.seed(seed)
    np.random.seed(seed)
    img = Image.new("RGB", (32, 32))
    for _ in range(n):
        ran.append([])
        transform(img)
    return ran


def ours_policy_draws(n: int, seed: int = 0) -> list:
    choices = randaugment.draw(n, torch.Generator().manual_seed(seed), 9.0, interpolation="random")
    ran = [[] for _ in range(n)]
    for layer in range(2):
        for i in range(n):
            if choices["applied"][i, layer]:
                name = randaugment.OPS[int(choices["op"][i, layer])]
                arg = randaugment.argument(
                    name, choices["level"][i : i + 1, layer], choices["negative"][i : i + 1, layer]
                )
                ran[i].append((name, float(arg)))
    return ran


def test_randaugment_draws_ops_and_magnitudes_as_timm():
    """timm's policy (read through its own code, its ops replaced by recorders) against ours: the share of
    each op, the number of ops per image, and each op's arguments (KS test), over 6000 images each."""
    pytest.importorskip("timm")
    theirs, ours = timm_policy_draws(6000), ours_policy_draws(6000)
    for counts in ([len(r) for r in theirs], [len(r) for r in ours]):
        share = torch.bincount(torch.tensor(counts), minlength=3).double() / len(counts)
        torch.testing.assert_close(
            share, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64), atol=0.025, rtol=0
        )

    def by_op(runs):
        return {
            op: torch.tensor([a for r in runs for n, a in r if n == op], dtype=torch.float64)
            for op in randaugment.OPS
        }

    theirs_total, ours_total = sum(map(len, theirs)), sum(map(len, ours))
    theirs, ours = by_op(theirs), by_op(ours)
    for name in randaugment.OPS:
        for applied, total in ((len(theirs[name]), theirs_total), (len(ours[name]), ours_total)):
            sd = math.sqrt(total * (1 / 15) * (14 / 15))  # each op 1/15 of the applied ones: binomial
            assert abs(applied - total / 15) < 4.5 * sd, name
        n, m = len(theirs[name]), len(ours[name])
        assert ks_statistic(theirs[name], ours[name]) < 1.95 * math.sqrt((n + m) / (n * m)), (
            name
        )  # alpha 0.001


def test_batched_resized_crops_equal_torchvisions_per_image():
    """Bilinear and bicubic, upsampling and shrinking: torchvision's antialiased resized_crop of a uint8
    image, to its fixed-point rounding."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(2)
    for height, scale in ((32, (0.8, 1.0)), (64, (0.08, 1.0))):
        x = torch.randint(0, 256, (24, 3, height, height), dtype=torch.uint8, generator=g)
        top, left, h, w, _ = device_data.sample_boxes(24, height, height, scale, (3 / 4, 4 / 3), g, "center")
        for bicubic in (False, True):
            ours = device_data.resized_crops(x, top, left, h, w, 32, torch.full((24,), bicubic))
            mode = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
            theirs = torch.stack(
                [
                    TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32], mode)
                    for i in range(24)
                ]
            )
            error = (ours.int() - theirs.int()).abs()
            assert error.max() <= 2  # rounding: torchvision's uint8 kernels differ from version to version
            assert error.float().mean() < 0.25  # seen: up to 0.04 levels (torchvision 0.29), 0.16 (0.19)


def test_batch_augment_applies_its_own_draw_to_each_image():
    """What each image of a batch comes out as, not what was drawn: 512 copies of one image give ~512
    different outputs; against the same draws without flips (or without erasing), half of the images (a
    quarter) come out otherwise, and an erased image differs from its twin in one box only."""
    img = fixed_image().repeat(512, 1, 1, 1)

    def out(*flags):
        return device_data.BatchAugment(cifar_args(*flags), 32)(img, torch.Generator().manual_seed(0))

    base = out()
    assert len({hash(o.numpy().tobytes()) for o in base}) > 500 and type(base) is torch.Tensor
    flipped = (out("--hflip", "0") != base).flatten(1).any(dim=1)
    assert 0.42 < flipped.float().mean() < 0.58
    erased = out("--reprob", "0") != base
    images = erased.flatten(1).any(dim=1)
    assert 0.18 < images.float().mean() < 0.32
    for mask in erased[images][:, 0]:
        rows, cols = mask.any(dim=1), mask.any(dim=0)
        assert torch.equal(mask, rows[:, None] & cols[None, :])  # one rectangle


def ks_statistic(a, b):
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs. Values are
    rounded to 4 decimals first, so that one pixel level computed by two paths is one value (ties)."""
    a, b = a.double().round(decimals=4), b.double().round(decimals=4)
    grid = torch.cat([a, b]).sort().values
    cdf = lambda s: torch.searchsorted(s.sort().values, grid, right=True) / len(s)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


@pytest.mark.parametrize(
    "recipe_flags", [[], ["--randaug-magnitude", "5", "--reprob", "0.5", "--interpolation", "bilinear"]]
)
def test_batched_and_per_image_paths_give_one_distribution(recipe_flags):
    """On a fixed input, 2000 outputs of each path: every summary statistic passes a two-sample KS test
    (critical value about 0.062 at alpha = 0.001 for 2000 + 2000 samples)."""
    args, n = cifar_args(*recipe_flags), 2000
    img = fixed_image()
    per_image, _ = build_transforms(args, 32)
    slow = []
    for i in range(n):
        torch.default_generator.manual_seed(i)  # the CPU alone: fast
        slow.append(per_image(img))
    slow = torch.stack(slow)
    fast = device_data.BatchAugment(args, 32)(img.repeat(n, 1, 1, 1), torch.Generator().manual_seed(0))

    def summaries(x):
        return {
            "mean": x.mean((1, 2, 3)),
            "std": x.std((1, 2, 3)),
            "left - right": x[..., :16].mean((1, 2, 3)) - x[..., 16:].mean((1, 2, 3)),
            "red - blue": (x[:, 0] - x[:, 2]).mean((1, 2)),
            "corner pixel": x[:, 1, 0, 0],
            "centre pixel": x[:, 0, 16, 16],
        }

    for name, (a, b) in {k: (v, summaries(fast)[k]) for k, v in summaries(slow).items()}.items():
        assert ks_statistic(a, b) < 0.062, name


def device_batches(epoch: int, chunk: int = 8192):
    data = PlusSigns(96, 32, seed=0)
    images, labels = device_data.as_tensors(data, torch.device("cpu"))
    sampler = EpochSampler(len(data), world=1, rank=0, seed=0)
    sampler.set_epoch(epoch)
    augment = device_data.BatchAugment(cifar_args(), 32)
    return list(device_data.DeviceLoader(images, labels, sampler, 16, augment, seed=0, chunk=chunk))


def test_the_device_loader_draws_anew_for_each_batch_and_epoch_and_repeats_an_epoch():
    first, again, second = device_batches(0), device_batches(0), device_batches(1)
    assert len(first) == 6 and all(type(x) is torch.Tensor and x.shape == (16, 3, 32, 32) for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(PlusSigns(96, 32, seed=0).targets)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, second))  # another epoch, another draw
    data = PlusSigns(32, 32, seed=0)
    same_order = [[(i, epoch, 0) for i in range(32)] for epoch in (0, 1)]  # the same images in the same order
    images, labels = device_data.as_tensors(data, torch.device("cpu"))
    augment = device_data.BatchAugment(cifar_args(), 32)
    a, b = (
        torch.cat([x for x, _ in device_data.DeviceLoader(images, labels, keys, 16, augment, seed=0)])
        for keys in same_order
    )
    assert not any(torch.equal(u, v) for u, v in zip(a, b))  # each image drawn anew in the next epoch
    outputs = torch.cat([x for x, _ in first])
    assert len({hash(o.numpy().tobytes()) for o in outputs}) == 96  # every image, batch after batch, its own
    small = device_batches(0, chunk=32)  # chunks of two batches: the same batches in the same order
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, small))


def test_mixing_pairs_each_image_with_its_mirror_as_timm():
    """Batch-mode Mixup/CutMix: image i is mixed with image B-1-i (so repeated copies, side by side, are not
    mixed with each other), Mixup is lam x + (1 - lam) x.flip(0), CutMix pastes one box and its lam is the
    part of the image left, and the targets carry the same lam."""
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 0, 0, 1, 1, 1])  # two images, three copies each, as the sampler deals them
    torch.manual_seed(0)
    mixed, target = Mixing(0.8, 0.0, 4)(x, y)
    lam = float(target[0, 0])
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    assert (target[:3, 1] > 0).all() and torch.allclose(
        target.sum(1), torch.ones(6)
    )  # copies mixed with the other image
    torch.manual_seed(1)
    mixed, target = Mixing(0.0, 1.0, 4)(x, y)
    pasted = (mixed != x).any(dim=1)[0]
    rows, cols = pasted.any(dim=1), pasted.any(dim=0)
    assert torch.equal(pasted, rows[:, None] & cols[None, :])  # one box
    assert torch.equal(mixed[0][:, pasted], x[5][:, pasted])  # from the mirror image
    assert float(target[0, 1]) == pytest.approx(
        pasted.float().mean().item()
    )  # its area, from image 5's label
    lams = []
    for seed in range(300):
        torch.manual_seed(seed)
        lams.append(float(Mixing(0.8, 0.0, 4)(x, y)[1][0, 0]))
    beta = (
        torch.distributions.Beta(0.8, 0.8)
        .sample(
            (3000,),
        )
        .double()
    )
    assert ks_statistic(torch.tensor(lams), beta) < 1.95 * math.sqrt(
        3300 / (300 * 3000)
    )  # lam ~ Beta(0.8, 0.8)


class FixedLogits(torch.nn.Module):
    """A model whose logits are its one parameter, whatever the images."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, img):
        return self.logits


@given(st.integers(2, 6), st.floats(0.0, 0.3), st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_the_loss_smooths_mixed_targets_as_timm(classes, smoothing, lam, seed):
    """train_step's loss on Mixup/CutMix targets, as timm's mixup_target with SoftTargetCrossEntropy: each
    one-hot target smoothed to (1 - s) + s / C and s / C, then mixed with lam; and on class ids, the same
    as on their one-hot targets."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, classes, generator=g, dtype=torch.float64)
    y = torch.randint(classes, (4,), generator=g)
    smooth = lambda t: F.one_hot(t, classes).double() * (1 - smoothing) + smoothing / classes  # noqa: E731
    expected = -(lam * smooth(y) + (1 - lam) * smooth(y.flip(0))) * F.log_softmax(logits, dim=-1)
    mixed = F.one_hot(y, classes).double() * lam + F.one_hot(y.flip(0), classes).double() * (1 - lam)

    def loss(target):
        model = FixedLogits(logits.clone())
        return float(
            engine.train_step(
                model, torch.optim.SGD(model.parameters(), lr=0.0), [(torch.zeros(4), target)], smoothing
            )
        )

    assert loss(mixed) == pytest.approx(float(expected.sum(-1).mean()), rel=1e-12)
    assert loss(y) == pytest.approx(loss(F.one_hot(y, classes).double()), rel=1e-12)


def test_evaluate_pads_a_short_batch_without_counting_the_padding():
    model = create_model(
        "deit_tiny", img_size=16, patch_size=8, dim=16, heads=2, depth=1, num_classes=3
    ).eval()
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 3, 16, 16, generator=g), torch.randint(3, (4,), generator=g)) for _ in range(2)
    ]
    batches[1] = (batches[1][0][:3], batches[1][1][:3])
    plain = engine.evaluate(model, batches, torch.device("cpu"))
    padded = engine.evaluate(model, batches, torch.device("cpu"), batch=4)
    assert plain == pytest.approx(padded)


@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 8))
def test_resize_pos_embed_keeps_a_grid_and_a_constant(n, grid, dim):
    """Resized to its own grid the PE is unchanged; a PE that is the same for every patch stays the same
    (the bicubic weights sum to one); any grid gets its grid * grid rows."""
    pos = torch.randn(1, n * n, dim, dtype=torch.float64)
    torch.testing.assert_close(resize_pos_embed(pos, n), pos)
    assert resize_pos_embed(pos, grid).shape == (1, grid * grid, dim)
    constant = torch.randn(1, 1, dim, dtype=torch.float64).expand(1, n * n, dim)
    torch.testing.assert_close(resize_pos_embed(constant, grid), constant[:, :1].expand(1, grid * grid, dim))
    with pytest.raises(ValueError, match="no square grid"):
        resize_pos_embed(torch.zeros(1, 5, 2), 2)
