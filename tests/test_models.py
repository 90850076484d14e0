"""The spec of models/: Swin-Ti, CeiT-Ti and T2T-ViT-7 in the paper's four PE modes. Tables 1 and 2's
parameter counts exactly, the PE reaching exactly the layers it should, MPVG as PVG plus a constant on the
logits, every knob each architecture accepts at work and every other refused by models.config in one line,
the official parameter names, Swin's forward against timm's, checkpoints that rebuild any architecture, and
a run of each through train.py."""

import functools
import math
from dataclasses import asdict, fields

import pytest
import torch
from conftest import run_train

import models
import mpvg
import train
from training import engine, flags

MODES = ["default", "lape", "pvg", "mpvg"]
TINY_MODELS = {  # each architecture small enough for a CPU test, every stage and part kept
    "swin_tiny": dict(img_size=32, patch_size=2, dim=8, heads=1, window=4, depth=8),  # stages of 2 blocks
    "ceit_tiny": dict(img_size=32, dim=16, heads=2, depth=3),
    "t2t_vit_7": dict(img_size=32, dim=16, heads=2, depth=3),
}
TINY_VIT = dict(img_size=16, patch_size=4, dim=16, heads=2, depth=3)  # deit_small and _base: deit_tiny here
TINY = {"deit_tiny": TINY_VIT, "vit_lite_7_4": TINY_VIT, **TINY_MODELS}  # every architecture

# From the official model code, and as the paper prints them (millions, truncated): default, LaPE, PVG, MPVG.
COUNTS = {
    ("swin_tiny", 1000): ([28_589_410, 28_598_242, 28_598_242, 28_599_778], [28.589, 28.599, 28.598, 28.599]),
    ("ceit_tiny", 1000): ([6_356_904, 6_361_512, 6_360_744, 6_361_128], [6.356, 6.361, 6.361, 6.361]),
    ("t2t_vit_7", 1000): ([4_310_222, 4_313_806, 4_312_782, 4_313_294], [4.310, 4.313, 4.312, 4.313]),
    ("t2t_vit_7", 100): ([4_078_922, 4_082_506, 4_081_482, 4_081_994], [4.078, 4.082, 4.081, 4.081]),
}
NO_WIRING_FITS = {  # printed values that no consistent wiring gives (docs/models.md)
    ("swin_tiny", 1000, "lape"): "LaPE's 12 LN' (8,832) give 28.598; the paper prints 28.599",
    ("ceit_tiny", 1000, "pvg"): "PVG's 11 LN' give 6.360; the paper prints MPVG's 6.361, one LayerNorm more",
}


def count(name: str, pe: str, num_classes: int) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in models.create_model(name, pe=pe, num_classes=num_classes).parameters())


def tiny(name: str, **knobs):
    torch.manual_seed(0)
    return models.create_model(name, **TINY[name] | knobs).eval()


def swin_blocks(model) -> list[tuple[int, torch.nn.Module]]:  # (stage, block) of each layer l = 0..L
    return [(s, block) for s, stage in enumerate(model.layers) for block in stage.blocks]


def randomise(model):
    """Every parameter random, LayerNorm affines included, the same for models of the same shapes."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.3 * torch.randn(p.shape, generator=g)
            p.copy_(1.0 + noise if name.endswith("weight") and p.ndim == 1 else noise)
    return model


@pytest.mark.parametrize(("name", "classes"), COUNTS)
def test_table_1_and_2_parameter_counts_exactly(name, classes):
    """Tables 1 (ImageNet, 1000 classes) and 2 (CIFAR-100, T2T-ViT-7): every mode's count as the official
    code gives it, the fixed sinusoid PE and performer features of T2T-ViT counted as its main.py does."""
    assert [count(name, pe, classes) for pe in MODES] == COUNTS[name, classes][0]


@pytest.mark.parametrize(
    ("name", "classes", "pe"),
    [
        pytest.param(*key, marks=pytest.mark.xfail(strict=True, reason=NO_WIRING_FITS.get((*key,), "")))
        if key in NO_WIRING_FITS
        else key
        for key in [(n, c, pe) for n, c in COUNTS for pe in MODES]
    ],
)
def test_the_paper_prints_our_counts_truncated(name, classes, pe):
    """The paper's printed millions are our counts truncated, but for the two rows no wiring fits."""
    printed = COUNTS[name, classes][1][MODES.index(pe)]
    assert count(name, pe, classes) // 1000 == round(printed * 1000)


RECEIVING = {  # the layers l whose MSA input gets LN'_l(pos), per mode (Swin: PVG and MPVG include layer 0)
    "swin_tiny": dict(default=[], lape=list(range(8)), pvg=list(range(8)), mpvg=list(range(8))),
    "ceit_tiny": dict(default=[], lape=[0, 1, 2], pvg=[1, 2], mpvg=[1, 2]),
    "t2t_vit_7": dict(default=[], lape=[0, 1, 2], pvg=[1, 2], mpvg=[1, 2]),
}


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("pe", MODES)
def test_the_pe_reaches_exactly_the_layers_it_should(name, pe):
    """Each receiving layer's LN'_l changes the logits when silenced; no other layer has one. Swin's PE
    arrives at each stage's own grid and width, carried by the stage's patch merging."""
    model, img = tiny(name, pe=pe), torch.randn(2, 3, 32, 32)
    blocks = swin_blocks(model) if name == "swin_tiny" else list(enumerate(model.blocks))
    norms = [block.pe_norm for _, block in blocks]
    assert [l for l, n in enumerate(norms) if n is not None] == RECEIVING[name][pe]
    with torch.no_grad():
        for n in norms:
            if n is not None:
                n.weight.normal_(), n.bias.normal_()
        trace = {}
        before = model.forward_features(img, trace)
        for l in RECEIVING[name][pe]:
            if name == "swin_tiny":
                s, block = blocks[l]
                side = 16 >> s
                assert trace["pos"][l].shape == (1, side, side, 8 << s) == (1, *trace["tokens"][l].shape[1:])
                if s and blocks[l - 1][0] < s and l - 1 in RECEIVING[name][pe]:  # a stage's first
                    carried = block.pe_norm(model.layers[s].downsample(trace["pos"][l - 1]))  # by its merging
                    torch.testing.assert_close(trace["pos"][l], carried)
            saved = norms[l].weight.clone(), norms[l].bias.clone()
            norms[l].weight.zero_(), norms[l].bias.zero_()
            assert not torch.allclose(model.forward_features(img), before), f"layer {l}"
            norms[l].weight.copy_(saved[0]), norms[l].bias.copy_(saved[1])


@pytest.mark.parametrize("name", TINY_MODELS)
def test_mpvg_is_pvg_plus_a_constant_on_the_logits(name):
    """Eq. (11) through GAP: with PVG's weights, MPVG's logits are PVG's plus W times the mean of LN(pos_0)
    (for Swin, pos_0 carried by the patch merging to the last grid; for CeiT, LCA's output token)."""
    mpvg_model = tiny(name, pe="mpvg")
    with torch.no_grad():
        mpvg_model.last_pe_norm.weight.normal_(), mpvg_model.last_pe_norm.bias.normal_()
    pvg = tiny(name, pe="pvg")
    pvg.load_state_dict(
        {k: v for k, v in mpvg_model.state_dict().items() if not k.startswith("last_pe_norm")}
    )
    img = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        if name == "swin_tiny":
            pos_0 = mpvg_model.pos_0()  # carried to the last grid by each later stage's patch merging
            for stage in mpvg_model.layers[1:]:
                pos_0 = stage.downsample(pos_0)
            pe, weight = mpvg_model.last_pe_norm(pos_0).mean(dim=(1, 2)), mpvg_model.head.fc.weight
        else:
            pe, weight = mpvg_model.last_pe_norm(mpvg_model.pos_embed).mean(dim=1), mpvg_model.head.weight
        torch.testing.assert_close(
            mpvg_model(img) - pvg(img), (pe @ weight.T).expand(3, -1), atol=1e-5, rtol=1e-4
        )


ALTERNATIVES = dict(  # a field -> another value each tiny model accepts (overridden per model below)
    img_size=48,
    patch_size=8,
    in_chans=1,
    num_classes=5,
    dim=32,
    depth=2,
    heads=4,
    mlp_ratio=3.0,
    norm_eps=1e-2,
    drop_path=0.5,
    attn_drop=0.5,
    pe="lape",
    pool="cls",
    pe_input=False,
    pe_layers="all",
    pe_hierarchical=False,
    last_pe=1,
)
SWIN_ALTERNATIVES = dict(img_size=16, patch_size=4, dim=16, depth=9, heads=2, pe_layers="skip0", window=2)
REFUSED = {  # (model, field): a value the model cannot honour, and what models.config's message says
    ("swin_tiny", "init"): ("cct", "Swin initialises as its official code .*: leave init 'deit'"),
    ("swin_tiny", "pool"): ("cls", "Swin has no class token .*: pool 'gap', not 'cls'"),
    ("swin_tiny", "depth"): (6, r"four stages, 2, 2, depth - 6 and 2 .*: give depth 7 or more, not 6"),
    ("swin_tiny", "window"): (
        3,
        r"grids \[16, 8, 4, 2\] must halve .*: choose img_size, patch_size and window",
    ),
    ("ceit_tiny", "patch_size"): (2, "CeiT's stem halves the image twice .*a multiple of 4 .*not 2"),
    ("t2t_vit_7", "patch_size"): (8, "T2T-ViT's soft splits stride .*: give patch_size 16, not 8"),
    ("t2t_vit_7", "init"): ("cct", "T2T-ViT has a fixed sinusoid PE .*: leave init 'deit'"),
    **{
        (name, "window"): (4, f"{name} has no 'window': leave it out") for name in TINY if name != "swin_tiny"
    },
}
FIXED = {("swin_tiny", "init"), ("swin_tiny", "pool"), ("t2t_vit_7", "patch_size"), ("t2t_vit_7", "init")}


def alternative(name: str, field: str):
    """Another value of field that the model accepts, from its tiny PVG base."""
    base = models.config(name, **TINY[name] | {"pe": "pvg"})
    if field in ("qkv_bias", "init"):  # the other of two values
        return {"qkv_bias": not base.qkv_bias, "init": "deit" if base.init == "cct" else "cct"}[field]
    return (SWIN_ALTERNATIVES if name == "swin_tiny" else {}).get(field, ALTERNATIVES.get(field))


def fingerprint(name: str, **knobs) -> list:
    """What a model is: its parameter shapes, its initial weights and, with every weight set alike where
    the shapes allow, its output in evaluation and, from a fixed seed, in training."""
    model = tiny(name, **{"pe": "pvg"} | knobs)
    initial = [p.detach().clone() for p in model.parameters()]
    randomise(model)
    cfg = model.cfg
    img = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    with torch.no_grad():
        out = [model.eval()(img), model.train()(img)]
    return [{k: v.shape for k, v in model.state_dict().items()}, initial, out]


base_fingerprint = functools.cache(fingerprint)  # the tiny PVG model's, computed once


ACCEPTED = [
    (name, f.name)
    for name in TINY
    for f in fields(models.ARCHITECTURES[name][1])  # the config class
    if (name, f.name) not in FIXED
]


@pytest.mark.parametrize(("name", "field"), ACCEPTED)
def test_every_knob_an_architecture_accepts_changes_it(name, field):
    """No knob is ignored: each field of each architecture's config, changed alone to a value it accepts,
    changes the parameters, their initialisation or the output (dropout and stochastic depth: in training).
    The size fields, init, pool and the four PE knobs included."""
    value = alternative(name, field)
    assert getattr(models.config(name, **TINY[name] | {"pe": "pvg", field: value}), field) == value
    a, b = base_fingerprint(name), fingerprint(name, **{field: value})
    same_shapes = a[0] == b[0]
    assert not same_shapes or any(not torch.equal(x, y) for x, y in zip(a[1] + a[2], b[1] + b[2])), (
        f"{name}: {field}={value!r} changes nothing"
    )


@pytest.mark.parametrize(("name", "field"), REFUSED)
def test_a_knob_an_architecture_cannot_honour_is_one_line_from_models_config(name, field):
    """A value an architecture cannot honour is refused by models.config (and so by create_model, and by
    train.py's flags), in one ValueError of one line that says what is wrong and what to do."""
    value, message = REFUSED[name, field]
    with pytest.raises(ValueError, match=message) as refused:
        models.config(name, **TINY[name] | {field: value})
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match=message):
        models.create_model(name, **TINY[name] | {field: value})


def test_ceit_honours_init_cct_as_vit_lite_does():
    """Config.init="cct" (Compact Transformers' ViT-Lite), against "deit", on CeiT: the PE truncated normal
    with std 0.2 (not 0.02), the class token 0, and the patch convolution (I2T's last) Kaiming normal,
    std sqrt(2 / fan_in), not PyTorch's default (uniform within 1 / sqrt(fan_in)). ViT's: test_mpvg.py."""
    size = dict(img_size=64, dim=64, heads=2, depth=1, pe="lape")  # a class token and a PE
    deit, cct = (models.create_model("ceit_tiny", **size, init=init) for init in ("deit", "cct"))
    assert deit.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert cct.pos_embed.std().item() == pytest.approx(0.2, rel=0.1)
    assert deit.cls_token.abs().max() > 0 and not cct.cls_token.any()
    fan_in = cct.i2t.proj.weight[0].numel()
    assert cct.i2t.proj.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert deit.i2t.proj.weight.abs().max().item() <= 1 / math.sqrt(fan_in)


@pytest.mark.parametrize("name", TINY)
def test_models_load_model_rebuilds_any_architecture_from_its_checkpoint(tmp_path, name):
    """A checkpoint as train.py writes it, {"model": weights, "model_config": {"model": name, **config}},
    is enough for models.load_model: the same class and configuration, the same logits, in eval mode."""
    model = randomise(tiny(name, pe="mpvg"))
    model_config = {"model": name, **asdict(model.cfg)}
    torch.save({"model": model.state_dict(), "model_config": model_config}, tmp_path / "checkpoint.pt")
    loaded = models.load_model(tmp_path / "checkpoint.pt")
    assert type(loaded) is type(model) and loaded.cfg == model.cfg and not loaded.training
    img = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(img), model(img), rtol=0, atol=0)


def test_mpvg_load_model_refuses_another_architecture_in_one_line():
    """mpvg.py, copied alone, loads its own presets' checkpoints; another architecture's it refuses in one
    line that names models.load_model."""
    model = tiny("swin_tiny")
    checkpoint = {"model": model.state_dict(), "model_config": {"model": "swin_tiny", **asdict(model.cfg)}}
    with pytest.raises(ValueError, match=r"'swin_tiny'.*models\.load_model") as refused:
        mpvg.load_model(checkpoint)
    assert "\n" not in str(refused.value)


def block_keys(prefix: str, shapes: dict, n: int) -> dict:
    return {f"{prefix}.{i}.{k}": s for i in range(n) for k, s in shapes.items()}


def bn(c: int) -> dict:
    return {
        "weight": (c,),
        "bias": (c,),
        "running_mean": (c,),
        "running_var": (c,),
        "num_batches_tracked": (),
    }


def prefixed(prefix: str, shapes: dict) -> dict:
    return {f"{prefix}.{k}": s for k, s in shapes.items()}


def linear(out: int, inp: int, bias: bool = True) -> dict:
    return {"weight": (out, inp), **({"bias": (out,)} if bias else {})}


def ln(c: int) -> dict:
    return {"weight": (c,), "bias": (c,)}


def performer(dim: int) -> dict:  # T2T-ViT's Token_performer, 64 channels out
    parts = dict(kqv=linear(192, dim), proj=linear(64, 64), norm1=ln(dim), norm2=ln(64))
    parts |= {"mlp.0": linear(64, 64), "mlp.2": linear(64, 64)}
    return {f"{p}.{k}": s for p, d in parts.items() for k, s in d.items()} | {"w": (32, 64)}


def attention_block(dim: int, qkv_bias: bool) -> dict:  # the LayerNorms and attention of a block
    parts = dict(norm1=ln(dim), norm2=ln(dim), **{"attn.qkv": linear(3 * dim, dim, qkv_bias)})
    parts |= {"attn.proj": linear(dim, dim)}
    return {f"{p}.{k}": s for p, d in parts.items() for k, s in d.items()}


# The default models' state_dict keys and shapes, written down from the official code.
T2T_VIT_7_KEYS = {
    "cls_token": (1, 1, 256),
    "pos_embed": (1, 197, 256),
    **prefixed("tokens_to_token.attention1", performer(147)),
    **prefixed("tokens_to_token.attention2", performer(576)),
    **prefixed("tokens_to_token.project", linear(256, 576)),
    **block_keys(
        "blocks",
        attention_block(256, False)
        | prefixed("mlp.fc1", linear(512, 256))
        | prefixed("mlp.fc2", linear(256, 512)),
        7,
    ),
    **prefixed("norm", ln(256)),
    **prefixed("head", linear(1000, 256)),
}
LEFF = {
    "leff.conv1.weight": (768, 192, 1, 1),
    "leff.conv1.bias": (768,),
    "leff.conv2.weight": (768, 1, 3, 3),
    "leff.conv2.bias": (768,),
    "leff.conv3.weight": (192, 768, 1, 1),
    "leff.conv3.bias": (192,),
    **prefixed("leff.bn1", bn(768)),
    **prefixed("leff.bn2", bn(768)),
    **prefixed("leff.bn3", bn(192)),
}
CEIT_TINY_KEYS = {
    "cls_token": (1, 1, 192),
    "pos_embed": (1, 197, 192),
    "i2t.backbone.conv.weight": (64, 3, 7, 7),
    **prefixed("i2t.backbone.bn", bn(64)),
    "i2t.proj.weight": (192, 64, 4, 4),
    "i2t.proj.bias": (192,),
    **block_keys("blocks", attention_block(192, True) | LEFF, 12),
    **prefixed("lca", attention_block(192, True)),
    **prefixed("lca.feedforward.fc1", linear(768, 192)),
    **prefixed("lca.feedforward.fc2", linear(192, 768)),
    "pos_layer_embed": (1, 12, 192),
    **prefixed("norm", ln(192)),
    **prefixed("head", linear(1000, 192)),
}


@pytest.mark.parametrize(("name", "keys"), [("t2t_vit_7", T2T_VIT_7_KEYS), ("ceit_tiny", CEIT_TINY_KEYS)])
def test_the_official_checkpoints_load_strictly(name, keys):
    """The default model's weights have the official code's names and shapes: its checkpoints load as is."""
    model = models.create_model(name, pe="default")
    model.load_state_dict({k: torch.zeros(s) for k, s in keys.items()}, strict=True)


def test_t2t_vits_pe_is_the_fixed_sinusoid_table():
    """T2T-ViT's PE is never trained: row p, channels 2i and 2i + 1, are sin and cos of p / 10000^(2i / D)."""
    model = tiny("t2t_vit_7", pe="mpvg")
    p, i, d = torch.arange(4.0)[:, None], torch.arange(8.0), 16
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0, :4, 0::2], torch.sin(p / 10000 ** (2 * i / d)))
    torch.testing.assert_close(model.pos_embed[0, :4, 1::2], torch.cos(p / 10000 ** (2 * i / d)))


def test_swin_is_timms_with_the_absolute_pe():
    """pe="none" is timm's Swin: swin_tiny_patch4_window7_224's names and shapes, and at a small size timm's
    weights load strictly and give its logits. The default adds the official absolute PE (ape=True) alone,
    and is timm's model when that PE is 0."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        names = {
            k: v.shape for k, v in timm.create_model("swin_tiny_patch4_window7_224").state_dict().items()
        }
        ours = models.create_model("swin_tiny", pe="none").state_dict()
        default = models.create_model("swin_tiny").state_dict()
    assert {k: v.shape for k, v in ours.items()} == names
    assert {k: v.shape for k, v in default.items()} == names | {"absolute_pos_embed": (1, 3136, 96)}
    torch.manual_seed(0)
    size = dict(img_size=32, patch_size=2, embed_dim=8, num_heads=(1, 2, 4, 8), window_size=4)
    theirs = timm.models.swin_transformer.SwinTransformer(**size, depths=(2, 2, 2, 2)).eval()
    ours, default = tiny("swin_tiny", pe="none"), tiny("swin_tiny")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    default.load_state_dict(theirs.state_dict() | {"absolute_pos_embed": torch.zeros(1, 256, 8)})
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(img)
        torch.testing.assert_close(ours(img), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(default(img), expected, atol=1e-5, rtol=1e-4)


def test_the_swin_stages_follow_the_paper():
    """Swin-T: four stages of 2, 2, 6, 2 blocks on 56, 28, 14, 7 grids of 96 to 768 channels, windows of 7
    shifted by 3 in every second block but on the last grid (one window there), a mask where shifted."""
    model = models.create_model("swin_tiny", pe="mpvg")
    blocks = swin_blocks(model)
    assert [s for s, _ in blocks] == [0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3]
    assert [b.attn.shift for _, b in blocks] == [0, 3, 0, 3, 0, 3, 0, 3, 0, 3, 0, 0]
    assert [b.norm1.normalized_shape[0] for _, b in blocks][::2] == [96, 192, 384, 384, 384, 768]
    assert [None if b.attn.attn_mask is None else tuple(b.attn.attn_mask.shape) for _, b in blocks][:4] == [
        None,
        (64, 49, 49),
        None,
        (16, 49, 49),
    ]


def test_swins_stochastic_depth_rises_linearly_across_all_stages():
    """The official Swin's schedule, dpr = torch.linspace(0, drop_path_rate, sum(depths)): block l of the
    L + 1 blocks of all four stages drops its branches with rate l / L x drop_path, one line from the first
    stage's first block to the last stage's last, never restarting at a stage (Swin-T's recipe: 0.2)."""
    model = tiny("swin_tiny", depth=9, drop_path=0.4)  # stages of 2, 2, 3 and 2 blocks
    assert [b.drop_prob for _, b in swin_blocks(model)] == pytest.approx([0.4 * l / 8 for l in range(9)])
    with torch.device("meta"):
        swin_t = models.create_model("swin_tiny", drop_path=0.2)
    assert [b.drop_prob for _, b in swin_blocks(swin_t)] == pytest.approx([0.2 * l / 11 for l in range(12)])


@pytest.mark.parametrize("pe", MODES)
def test_swin_decays_neither_its_position_tables_nor_its_1d_parameters(pe):
    """The official Swin's optimizer: no weight decay on absolute_pos_embed (its no_weight_decay), on any
    relative_position_bias_table (its no_weight_decay_keywords), nor on 1-D parameters; every other weight
    decays. So says model.no_weight_decay(), and so the optimizer of the swin recipe groups them."""
    model = tiny("swin_tiny", pe=pe)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    tables = {n for n in shapes if n.endswith("relative_position_bias_table")}
    assert len(tables) == model.cfg.depth and "absolute_pos_embed" in shapes  # a table per block
    exempt = {n for n, shape in shapes.items() if len(shape) == 1} | tables | {"absolute_pos_embed"}
    assert model.no_weight_decay() == exempt
    args = flags.parse(["--recipe", "swin"])[0]
    optimizer = engine.build_optimizer(model, args, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert args.weight_decay > 0 and decayed == set(shapes) - exempt


def test_swins_attention_dropout_acts_in_training_only():
    """Swin's attention dropout (attn_drop_rate) draws a new mask each training call and none in evaluation:
    there the model repeats bit for bit and is the attn_drop=0 model with the same weights."""
    model, plain = tiny("swin_tiny", attn_drop=0.5), tiny("swin_tiny", attn_drop=0.0)
    plain.load_state_dict(model.state_dict())
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        evaluated = model.eval()(img)
        assert torch.equal(evaluated, model(img))
        torch.testing.assert_close(evaluated, plain.eval()(img), rtol=0, atol=0)
        torch.manual_seed(0)
        model.train()
        assert not torch.allclose(model(img), model(img))


@pytest.mark.parametrize(
    ("name", "size"),
    [
        (
            "swin_tiny",
            [
                "--img-size",
                "16",
                "--patch-size",
                "2",
                "--window",
                "2",
                "--dim",
                "8",
                "--heads",
                "1",
                "--depth",
                "12",
            ],
        ),
        ("ceit_tiny", ["--img-size", "32"]),
        ("t2t_vit_7", ["--img-size", "32"]),
    ],
)
def test_each_model_trains_resumes_and_evaluates_through_train_py(tmp_path, name, size):
    """train.py --model NAME: a run, its resume and its evaluation, in MPVG."""
    flags = ["--model", name, *size, "--synthetic-size", "32", "--pe", "mpvg"]
    run_train(tmp_path, *flags, "--epochs", "1")
    train.main(["--resume", "auto", "--output-dir", str(tmp_path / "run"), "--epochs", "2"])
    ckpt = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["model"] == name
    result = train.main(["--eval-only", "--resume", str(tmp_path / "run/checkpoint.pt")])
    assert result["val_top1"] == ckpt["history"][-1]["val_top1"]


def test_ceits_lca_is_full_attention_read_at_the_last_token():
    """LCA's attention (the query from the last layer's token only) is the last row of full multi-head
    self-attention with the same weights: the official code's split of qkv into q and kv, read literally."""
    lca = tiny("ceit_tiny").lca.attn
    lca_cfg = models.config("ceit_tiny", **TINY["ceit_tiny"])
    full = mpvg.Attention(lca_cfg.dim, lca_cfg.heads, lca_cfg.qkv_bias)
    full.load_state_dict(lca.state_dict())
    layers = torch.randn(2, lca_cfg.depth, lca_cfg.dim)
    with torch.no_grad():
        torch.testing.assert_close(lca(layers), full(layers)[:, -1:])


def literal_leff(leff, x: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """The official CeiT's LocallyEnhancedFeedForward (with_bn=True), written out from leff's parameters: the
    patch tokens as a grid through a 1 x 1 convolution, BatchNorm, GELU, a depthwise 3 x 3 convolution (zero
    padding), BatchNorm, GELU, a 1 x 1 convolution and BatchNorm; the class token passes unchanged. Each
    BatchNorm normalises each channel by its batch statistics in training (biased variance), by its running
    ones in evaluation."""
    cls, tokens = x[:, :has_cls], x[:, has_cls:]
    side = math.isqrt(tokens.shape[1])

    def pointwise(t, conv):  # a 1 x 1 convolution: the same linear map of every token
        return t @ conv.weight[:, :, 0, 0].T + conv.bias

    def depthwise(t, conv):  # (B, h, w, C): each channel its own 3 x 3 filter over the zero-padded grid
        padded = torch.nn.functional.pad(t, (0, 0, 1, 1, 1, 1))
        out = sum(
            padded[:, i : i + side, j : j + side] * conv.weight[:, 0, i, j]
            for i in range(3)
            for j in range(3)
        )
        return out + conv.bias

    def batch_norm(t, bn):  # per channel, over the batch and the grid
        if leff.training:
            mean, var = t.mean(dim=(0, 1, 2)), t.var(dim=(0, 1, 2), unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        return (t - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias

    def gelu(t):
        return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))

    h = tokens.reshape(x.shape[0], side, side, -1)  # (B, h, w, D), row-major patches
    h = gelu(batch_norm(pointwise(h, leff.conv1), leff.bn1))
    h = gelu(batch_norm(depthwise(h, leff.conv2), leff.bn2))
    h = batch_norm(pointwise(h, leff.conv3), leff.bn3)
    return torch.cat([cls, h.reshape(x.shape[0], side * side, -1)], dim=1)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("pe", ["lape", "pvg"])  # a class token, and GAP
def test_ceits_leff_is_the_official_one_with_its_three_batchnorms(pe, training):
    """Table 1's CeiT-Ti: its LeFF is the official code's, read literally, three convolutions, each with its
    BatchNorm, every BatchNorm at work in training and in evaluation, and a class token passed unchanged."""
    model = randomise(tiny("ceit_tiny", pe=pe)).double()
    leff = model.blocks[0].leff
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (leff.bn1, leff.bn2, leff.bn3):  # evaluation's statistics, none of them 0 and 1
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=torch.float64))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g, dtype=torch.float64))
        grid = 16  # a 4 x 4 grid of patch tokens, after a class token where there is one
        x = torch.randn(3, (pe == "lape") + grid, model.cfg.dim, generator=g, dtype=torch.float64)
        expected = literal_leff(leff.train(training), x, pe == "lape")
        torch.testing.assert_close(leff(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pe", MODES)
def test_ceits_lca_reads_each_layers_class_token_or_token_mean(pe):
    """Table 1's CeiT-Ti: LCA attends over what layers 1 .. L + 1 hand it, plus its own PE (pos_layer_embed):
    with a class token, each layer's output class token, as the official CeiT; under GAP, which has none,
    each layer's output averaged over all its tokens. The trace's `layers` holds the same."""
    model = randomise(tiny("ceit_tiny", pe=pe))
    pool = {"default": "cls", "lape": "cls", "pvg": "gap", "mpvg": "gap"}[pe]
    outputs, handed = [], []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
    model.lca.register_forward_pre_hook(lambda module, args: handed.append(args[0]))
    trace = {}
    with torch.no_grad():
        model.forward_features(torch.randn(2, 3, 32, 32), trace)
    assert len(outputs) == model.cfg.depth and len(handed) == 1
    layers = torch.stack([out[:, 0] if pool == "cls" else out.mean(dim=1) for out in outputs], dim=1)
    torch.testing.assert_close(handed[0], layers + model.pos_layer_embed)
    torch.testing.assert_close(trace["layers"], layers)


def test_ceit_reads_another_size_with_its_pe_there_and_swin_refuses_one():
    """CeiT at twice its img_size: Eq. (11)'s LN(pos_0) is the PE resized to that grid, one row per patch
    there; Swin, whose windows and stages are built for one grid, says so in one line."""
    ceit, img = tiny("ceit_tiny", pe="mpvg"), torch.randn(2, 3, 64, 64)
    trace = {}
    ceit.forward_features(img, trace=trace)
    pos_0 = ceit.pos_at((4, 4))  # 64 px in patches of 16
    torch.testing.assert_close(
        trace["post_norm"] - ceit.norm(trace["pre_norm"]), ceit.last_pe_norm(pos_0).expand(2, -1, -1)
    )
    with pytest.raises(
        ValueError, match="Swin reads images of its img_size, 32 px, alone: got .2, 3, 64, 64."
    ):
        tiny("swin_tiny")(img)
