"""Property tests of mpvg.py: each test names the equation or table of the paper that it checks."""

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mpvg import PE_MODES, PRESETS, Config, create_model

settings.register_profile(
    "mpvg", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("mpvg")

MODES = ["default", "lape", "pvg", "mpvg"]


# ----------------------------------------------------------------------------------------------
# Drawn configurations


def receiving_layers(pe_layers, depth):
    """Layers whose MSA input gets PE, spelled out from the paper's text (not from mpvg.py)."""
    return {"none": [], "all": list(range(depth)), "skip0": list(range(1, depth))}[pe_layers]


@st.composite
def structures(draw):
    patch, heads = draw(st.sampled_from([2, 4])), draw(st.integers(1, 2))
    return dict(
        img_size=patch * draw(st.integers(1, 3)),
        patch_size=patch,
        in_chans=draw(st.sampled_from([1, 3])),
        num_classes=draw(st.integers(1, 5)),
        dim=heads * draw(st.sampled_from([4, 8])),
        depth=draw(st.integers(1, 4)),
        heads=heads,
        mlp_ratio=draw(st.sampled_from([1.0, 2.0])),
        qkv_bias=draw(st.booleans()),
        norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
    )


@st.composite
def configs(draw, modes=tuple(PE_MODES)):
    """A small model: a PE mode, and often some of its knobs overridden (every valid combination)."""
    kw = draw(structures())
    kw["pe"] = draw(st.sampled_from(modes))
    if draw(st.booleans()):
        choices = dict(
            pool=["cls", "gap"],
            pe_input=[True, False],
            pe_layers=["none", "all", "skip0"],
            pe_hierarchical=[True, False],
        )
        for name, values in choices.items():
            if draw(st.booleans()):
                kw[name] = draw(st.sampled_from(values))
        knobs = {**PE_MODES[kw["pe"]], **kw}
        gap = knobs["pool"] == "gap"
        kw["last_pe"] = draw(
            st.sampled_from([None] + ([0, *receiving_layers(knobs["pe_layers"], kw["depth"])] if gap else []))
        )
    return kw


def randomise(model, seed=0):
    """Every parameter random, LayerNorm affines included, so that no zero bias hides a wiring error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_ln_weight = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + 0.3 * noise if is_ln_weight else 0.3 * noise)
    return model


def build(kw, seed=0):
    return randomise(create_model("deit_tiny", **kw), seed).double().eval()


def images(model, batch=2, seed=1):
    c = model.cfg
    shape = (batch, c.in_chans, c.img_size, c.img_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# A literal, functional reading of Eqs. (1)-(11), computed from the model's own parameters


def reference_logits(model, img):
    cfg, P = model.cfg, dict(model.named_parameters())
    D, H, p, L1 = cfg.dim, cfg.heads, cfg.patch_size, cfg.depth
    B, g = img.shape[0], cfg.img_size // p

    def LN(t, name):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + cfg.norm_eps) * P[f"{name}.weight"] + P[f"{name}.bias"]

    def linear(t, name):
        b = P.get(f"{name}.bias")
        return t @ P[f"{name}.weight"].T + (0 if b is None else b)

    def MSA(a, l):
        qkv = linear(a, f"blocks.{l}.attn.qkv")
        d = D // H
        heads = []
        for j in range(H):
            q, k, v = (qkv[..., s * D + j * d : s * D + (j + 1) * d] for s in range(3))
            heads.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v)
        return linear(torch.cat(heads, -1), f"blocks.{l}.attn.proj")

    def MLP(a, l):
        h = linear(a, f"blocks.{l}.mlp.fc1")
        return linear(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), f"blocks.{l}.mlp.fc2")

    # p^n: the n-th P x P patch (row-major), flattened and linearly embedded
    W = P["patch_embed.proj.weight"].reshape(D, -1)
    cells = [
        img[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(B, -1) for i in range(g) for j in range(g)
    ]
    x = torch.stack([c @ W.T + P["patch_embed.proj.bias"] for c in cells], dim=1)
    if cfg.pool == "cls":
        x = torch.cat([P["cls_token"].expand(B, 1, D), x], dim=1)  # [x_cls; p^1; ...; p^N]
    pos = P.get("pos_embed")
    if cfg.pe_input:
        x = x + pos  # Eq. (1) / (8); otherwise Eq. (5)

    # The PE that each layer l receives, in each equation's own indexing.
    layers = receiving_layers(cfg.pe_layers, L1)
    received = {}
    if not cfg.pe_hierarchical:  # Table 6, "not hierarchical": LN'_l(pos_0)
        received = {l: LN(pos, f"blocks.{l}.pe_norm") for l in layers}
    elif (
        cfg.pe_layers == "all"
    ):  # Eq. (7): pos_0 = pos, pos_l = LN'_{l-1}(pos_{l-1}); layer l gets LN'_l(pos_l)
        pos_eq7 = [pos]
        for l in range(1, L1):
            pos_eq7.append(LN(pos_eq7[l - 1], f"blocks.{l - 1}.pe_norm"))
        received = {l: LN(pos_eq7[l], f"blocks.{l}.pe_norm") for l in layers}
    elif cfg.pe_layers == "skip0":  # Eq. (10): pos_l = LN'_l(pos_{l-1}); Eq. (9): layer l >= 1 gets pos_l
        pos_eq10 = [pos]
        for l in range(1, L1):
            pos_eq10.append(LN(pos_eq10[l - 1], f"blocks.{l}.pe_norm"))
        received = {l: pos_eq10[l] for l in layers}

    for l in range(L1):
        a = LN(x, f"blocks.{l}.norm1")
        if l in received:
            a = a + received[l]  # Eq. (6) / (9)
        x = MSA(a, l) + x  # Eq. (2): x'_l
        x = MLP(LN(x, f"blocks.{l}.norm2"), l) + x  # Eq. (3): x_{l+1}
    y = LN(x, "norm")  # Eq. (4)
    if cfg.last_pe is not None:
        k = cfg.last_pe  # Table 5: pos_k, the PE input of layer k; pos_0 the raw PE
        y = y + LN(pos if k == 0 else received[k], "norm_pe")  # Eq. (11)
    pooled = y[:, 0] if cfg.pool == "cls" else y.mean(dim=1)
    return linear(pooled, "head")


@given(configs())
def test_forward_equals_literal_reading_of_eqs_1_to_11(kw):
    """Eqs. (1)-(11), Table 5 and Table 6: the model is the paper's equations, for every knob combination."""
    model = build(kw)
    img = images(model)
    torch.testing.assert_close(model(img), reference_logits(model, img), rtol=1e-9, atol=1e-9)


def test_pe_modes_are_the_papers_table():
    """Fig. 3 and NOTES.md: the knob values of each mode."""
    assert {m: PE_MODES[m] for m in MODES} == {
        "default": dict(pe_input=True, pe_layers="none", pe_hierarchical=True, last_pe=None, pool="cls"),
        "lape": dict(pe_input=False, pe_layers="all", pe_hierarchical=True, last_pe=None, pool="cls"),
        "pvg": dict(pe_input=True, pe_layers="skip0", pe_hierarchical=True, last_pe=None, pool="gap"),
        "mpvg": dict(pe_input=True, pe_layers="skip0", pe_hierarchical=True, last_pe=0, pool="gap"),
    }


@given(st.integers(1, 3), st.integers(1, 8), st.integers(1, 3), st.sampled_from([2, 4, 8]), st.booleans())
def test_sdpa_equals_plain_softmax_attention(batch, tokens, heads, head_dim, qkv_bias):
    """The MSA of Eq. (2): F.scaled_dot_product_attention computes softmax(q k^T / sqrt(d)) v."""
    cfg = dict(dim=heads * head_dim, heads=heads, depth=1, img_size=4, patch_size=4, qkv_bias=qkv_bias)
    attn = randomise(create_model("deit_tiny", **cfg)).double().blocks[0].attn
    x = torch.randn(batch, tokens, heads * head_dim, dtype=torch.float64)
    q, k, v = rearrange(attn.qkv(x), "b n (s h d) -> s b h n d", s=3, h=heads)
    plain = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) @ v
    torch.testing.assert_close(attn(x), attn.proj(rearrange(plain, "b h n d -> b n (h d)")))


# ----------------------------------------------------------------------------------------------
# Shapes, batch independence, determinism, gradients


@given(configs(), st.integers(1, 3))
def test_output_shapes_and_trace(kw, batch):
    """Eqs. (1)-(4): (B, C, H, W) -> tokens (B, N(+1), D) -> logits (B, classes); the trace is the forward's."""
    model = build(kw)
    cfg, img = model.cfg, images(model, batch)
    trace = {}
    y = model.forward_features(img, trace=trace)
    n = (cfg.img_size // cfg.patch_size) ** 2 + (cfg.pool == "cls")
    assert y.shape == (batch, n, cfg.dim)
    assert model.forward_head(y).shape == (batch, cfg.num_classes)
    assert len(trace["tokens"]) == len(trace["pos"]) == cfg.depth
    assert all(t.shape == (batch, n, cfg.dim) for t in trace["tokens"])
    receiving = receiving_layers(cfg.pe_layers, cfg.depth)
    assert [l for l, pe in enumerate(trace["pos"]) if pe is not None] == receiving
    assert all(
        trace["pos"][l].shape == (1, n, cfg.dim) for l in receiving
    )  # once per forward, not per sample
    torch.testing.assert_close(trace["post_norm"], y)
    assert trace["pre_norm"].shape == y.shape
    # x_{l+1} = block_l(x_l, pos_l): the trace holds the values the forward used
    last = model.blocks[-1](trace["tokens"][-1], trace["pos"][-1])
    torch.testing.assert_close(last, trace["pre_norm"])


@given(configs(), st.integers(2, 4))
def test_batch_independence_and_determinism_in_eval(kw, batch):
    """Eval mode: each sample's logits depend on that sample alone, and repeat bit for bit."""
    model = build(kw)
    img = images(model, batch)
    out = model(img)
    assert torch.equal(out, model(img))
    for i in range(batch):
        torch.testing.assert_close(model(img[i : i + 1]), out[i : i + 1], rtol=1e-10, atol=1e-10)
    torch.manual_seed(3)
    a = create_model("deit_tiny", **kw)
    torch.manual_seed(3)
    b = create_model("deit_tiny", **kw)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@given(configs())
def test_every_parameter_receives_a_gradient(kw):
    """No module exists unless the forward uses it, so the parameter counts of Tables 1-2 are exact."""
    model = build(kw).train()
    img = images(model, 3)
    weights = torch.randn(
        3, model.cfg.num_classes, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    (model(img) * weights).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} receives no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name} has a zero gradient"


def test_stochastic_depth_follows_deits_linear_schedule():
    model = create_model("deit_tiny", depth=5, drop_path=0.2, img_size=32, patch_size=16)
    assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_no_weight_decay_names_pos_cls_biases_and_norms():
    model = create_model("deit_tiny", pe="lape", depth=2, img_size=32, patch_size=16)
    skip = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.pe_norm.weight", "norm.bias", "head.bias"} <= skip
    assert not {"head.weight", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight"} & skip
    assert skip == {n for n, p in model.named_parameters() if p.ndim <= 1 or n in ("pos_embed", "cls_token")}


def test_config_round_trips_through_asdict():
    """A resolved config (as a checkpoint stores it) rebuilds the same model."""
    cfg = create_model("vit_lite_7_4", pe="mpvg", last_pe=3).cfg
    assert Config(**asdict(cfg)) == cfg and cfg.last_pe == 3 and cfg.pool == "gap"


# ----------------------------------------------------------------------------------------------
# Reductions that must hold exactly


def copy_into(target_kw, source, drop=()):
    """A model of another configuration carrying the source's parameters (strict load, minus `drop`)."""
    target = create_model("deit_tiny", **target_kw).double().eval()
    state = {k: v for k, v in source.state_dict().items() if not any(k.endswith(d) for d in drop)}
    target.load_state_dict(state, strict=True)
    return target


@given(structures())
def test_pvg_with_zero_pe_norms_is_the_gap_default(kw):
    """Eqs. (8)-(10): with LN'_l's affine at zero, PVG's layer-wise PE vanishes and Eqs. (1)-(4) with GAP remain."""
    pvg = build({**kw, "pe": "pvg"})
    with torch.no_grad():
        for block in pvg.blocks:
            if block.pe_norm is not None:
                block.pe_norm.weight.zero_()
                block.pe_norm.bias.zero_()
    default_gap = copy_into(
        {**kw, "pe": "default", "pool": "gap"}, pvg, drop=("pe_norm.weight", "pe_norm.bias")
    )
    img = images(pvg)
    torch.testing.assert_close(pvg(img), default_gap(img), rtol=0, atol=0)


@given(structures(), st.data())
def test_mpvg_with_zero_norm_pe_is_pvg(kw, data):
    """Eq. (11) vs Eq. (4): MPVG with its Last-LN PE norm at zero is PVG."""
    mpvg = build({**kw, "pe": "mpvg", "last_pe": data.draw(st.sampled_from([0, *range(1, kw["depth"])]))})
    with torch.no_grad():
        mpvg.norm_pe.weight.zero_()
        mpvg.norm_pe.bias.zero_()
    pvg = copy_into({**kw, "pe": "pvg"}, mpvg, drop=("norm_pe.weight", "norm_pe.bias"))
    img = images(mpvg)
    torch.testing.assert_close(mpvg(img), pvg(img), rtol=0, atol=0)


@given(structures(), st.data())
def test_mpvg_is_pvg_with_another_head_bias(kw, data):
    """NOTES.md: with GAP, mean_n(LN(x)_n + LN(pos_k)_n) = mean_n LN(x)_n + c, so MPVG = PVG with bias b + W c."""
    k = data.draw(st.sampled_from([0, *range(1, kw["depth"])]))
    mpvg = build({**kw, "pe": "mpvg", "last_pe": k})
    trace = {}
    mpvg.forward_features(images(mpvg), trace=trace)
    pos_k = mpvg.pos_embed if k == 0 else trace["pos"][k]
    norm_pe = mpvg.norm_pe
    c = F.layer_norm(pos_k, (kw["dim"],), norm_pe.weight, norm_pe.bias, kw["norm_eps"]).mean(dim=1)[0]
    pvg = copy_into({**kw, "pe": "pvg"}, mpvg, drop=("norm_pe.weight", "norm_pe.bias"))
    with torch.no_grad():
        pvg.head.bias.add_(pvg.head.weight @ c)
    img = images(mpvg, 3)
    torch.testing.assert_close(mpvg(img), pvg(img), rtol=1e-12, atol=1e-12)


def permute_patches(img, perm, p):
    g = img.shape[-1] // p
    patches = rearrange(img, "b c (h p1) (w p2) -> b (h w) c p1 p2", p1=p, p2=p)
    return rearrange(patches[:, perm], "b (h w) c p1 p2 -> b c (h p1) (w p2)", h=g, w=g)


@given(configs(), st.data())
def test_gap_is_blind_to_patch_order_exactly_when_no_pe_reaches_the_tokens(kw, data):
    """Self-attention is permutation-equivariant and GAP invariant; PE (Eq. 1/8 or 6/9) breaks that.

    PE at the Last LN alone (Eq. 11) adds the same vector to every image's pooled tokens, so it
    leaves a GAP model blind to patch order: the NOTES.md equivalence seen from another side.
    """
    model = build(kw)
    cfg = model.cfg
    n = (cfg.img_size // cfg.patch_size) ** 2
    assume(cfg.pool == "gap" and n >= 2)
    perm = data.draw(st.permutations(range(n)))
    assume(perm != list(range(n)))
    img = images(model)
    moved = model(permute_patches(img, perm, cfg.patch_size))
    pe_in_tokens = cfg.pe_input or bool(receiving_layers(cfg.pe_layers, cfg.depth))
    if pe_in_tokens:
        assert not torch.allclose(model(img), moved, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(model(img), moved, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Parameter counts, Tables 1 and 2

EXACT = {  # NOTES.md: timm 1.0 for default, by hand for the rest
    "deit_tiny": dict(default=5_717_416, lape=5_722_024, pvg=5_721_256, mpvg=5_721_640),
    "deit_small": dict(default=22_050_664, lape=22_059_880, pvg=22_058_344, mpvg=22_059_112),
    "deit_base": dict(default=86_567_656, lape=86_586_088, pvg=86_583_016, mpvg=86_584_552),
    "vit_lite_7_4": dict(default=3_740_004, lape=3_743_588, pvg=3_742_564, mpvg=3_743_076),
}
PAPER = {  # Table 1 (DeiT) and Table 2 (ViT-Lite), millions as printed
    "deit_tiny": dict(default="5.717", lape="5.721", pvg="5.721", mpvg="5.721"),
    "deit_small": dict(default="22.050", lape="22.059", pvg="22.058", mpvg="22.059"),
    "deit_base": dict(default="86.567", lape="86.586", pvg="86.583", mpvg="86.584"),
    "vit_lite_7_4": dict(default="3.740", lape="3.744", pvg="3.742", mpvg="3.743"),
}
LAPE_MISMATCH = {
    "deit_tiny": "Table 1 prints 5.721 for LaPE, which is LaPE with GAP (5,721,640); LaPE with a class "
    "token, as published, has 5,722,024",
    "vit_lite_7_4": "Table 2 prints 3.744 for LaPE; LaPE has 3,743,588 with a class token and 3,743,076 "
    "with GAP: no consistent configuration gives 3.744",
}


def count(model):
    return sum(p.numel() for p in model.parameters())


def truncated_millions(n):
    return f"{n // 1000 / 1000:.3f}"  # the paper truncates to 3 decimals (every non-LaPE row fits)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("mode", MODES)
def test_parameter_counts_are_exact(preset, mode):
    assert count(create_model(preset, pe=mode)) == EXACT[preset][mode]


@pytest.mark.parametrize(
    "preset, mode",
    [
        pytest.param(p, m, marks=pytest.mark.xfail(strict=True, reason=LAPE_MISMATCH[p]))
        if m == "lape" and p in LAPE_MISMATCH
        else (p, m)
        for p in PRESETS
        for m in MODES
    ],
)
def test_parameter_counts_match_tables_1_and_2_as_printed(preset, mode):
    assert truncated_millions(count(create_model(preset, pe=mode))) == PAPER[preset][mode]


# ----------------------------------------------------------------------------------------------
# timm's DeiT names, so official checkpoints load with strict=True

DEIT_TINY_BLOCK = [  # timm's deit_tiny_patch16_224, block i
    ("norm1.weight", (192,)),
    ("norm1.bias", (192,)),
    ("attn.qkv.weight", (576, 192)),
    ("attn.qkv.bias", (576,)),
    ("attn.proj.weight", (192, 192)),
    ("attn.proj.bias", (192,)),
    ("norm2.weight", (192,)),
    ("norm2.bias", (192,)),
    ("mlp.fc1.weight", (768, 192)),
    ("mlp.fc1.bias", (768,)),
    ("mlp.fc2.weight", (192, 768)),
    ("mlp.fc2.bias", (192,)),
]
DEIT_TINY = {
    "cls_token": (1, 1, 192),
    "pos_embed": (1, 197, 192),
    "patch_embed.proj.weight": (192, 3, 16, 16),
    "patch_embed.proj.bias": (192,),
    **{f"blocks.{i}.{name}": shape for i in range(12) for name, shape in DEIT_TINY_BLOCK},
    "norm.weight": (192,),
    "norm.bias": (192,),
    "head.weight": (1000, 192),
    "head.bias": (1000,),
}


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_deit_names_and_shapes_equal_timms():
    assert shapes(create_model("deit_tiny")) == DEIT_TINY
    gap = {k: v for k, v in DEIT_TINY.items() if k != "cls_token"} | {"pos_embed": (1, 196, 192)}
    assert shapes(create_model("deit_tiny", pool="gap")) == gap  # timm: class_token=False, global_pool="avg"


def test_pe_norm_names_follow_lape():
    names = set(create_model("deit_tiny", pe="mpvg").state_dict())
    assert {f"blocks.{i}.pe_norm.weight" for i in range(1, 12)} <= names
    assert "blocks.0.pe_norm.weight" not in names and "norm_pe.weight" in names


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_timm_deit_checkpoint_gives_the_same_logits(pool):
    """Runs where timm is installed (it is not a dependency)."""
    timm = pytest.importorskip("timm")
    kw = {} if pool == "cls" else dict(class_token=False, global_pool="avg", fc_norm=False)
    theirs = timm.create_model("deit_tiny_patch16_224", **kw).eval()
    randomise(theirs)
    ours = create_model("deit_tiny", pool=pool).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(img), theirs(img), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input gets a clear error


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(img_size=30, patch_size=16), "img_size 30 is not divisible by patch_size 16"),
        (dict(dim=100, heads=3), "dim 100 is not divisible by heads 3"),
        (dict(pe="rope"), "unknown pe mode 'rope'"),
        (dict(pool="max"), "unknown pool 'max'"),
        (dict(pe_layers="some"), "unknown pe_layers 'some'"),
        (dict(pe_input="yes"), "pe_input must be True or False"),
        (dict(pe="mpvg", last_pe=12), r"last_pe must be None or a layer index 0..11"),
        (dict(pe="mpvg", last_pe=-1), r"last_pe must be None or a layer index 0..11"),
        (dict(pe="default", pool="gap", last_pe=3), "layer 3 receives no PE"),
        (dict(pe="mpvg", pool="cls"), "incompatible with the class token"),
        (dict(depth=0), "depth must be a positive integer"),
        (dict(drop_path=1.0), r"drop_path must be in \[0, 1\)"),
        (dict(colour=True), "unknown model option"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("deit_tiny", **kwargs)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model preset 'deit_huge': choose one of deit_tiny"):
        create_model("deit_huge")


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 224, 224), (3, 224, 224), (2, 3, 224, 200)])
def test_wrong_input_shape_is_a_clear_error(shape):
    model = create_model("deit_tiny", depth=1)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 224, 224\), got"):
        model(torch.zeros(shape))


# ----------------------------------------------------------------------------------------------
# train.py: a run end to end, DDP equals one process, resume equals no stop, real on-disk formats

import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import train  # noqa: E402
from tools import analyze, benchmark, device_data, workshop  # noqa: E402

TINY = [  # a model and data small enough for a CPU test, with every augmentation of the recipe on
    "--data", "synthetic", "--synthetic-size", "64", "--model", "vit_lite_7_4", "--img-size", "16",
    "--dim", "32", "--depth", "2", "--heads", "2", "--batch-size", "16", "--workers", "0", "--log-every", "2",
]  # fmt: skip


def run_train(tmp_path, *extra, name="run"):
    return train.main([*TINY, "--output-dir", str(tmp_path / name), *extra])


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_train_synthetic_run_writes_metrics_and_checkpoints(tmp_path):
    best = run_train(tmp_path, "--epochs", "2", "--pe", "mpvg")
    lines = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    keys = {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_sec", "seconds"}
    assert all(keys <= set(m) and all(math.isfinite(m[k]) for k in keys) for m in lines)
    ckpt = torch.load(tmp_path / "run/checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["model_config"]["pe"] == "mpvg" and ckpt["model_config"]["dim"] == 32
    model = create_model("vit_lite_7_4", **{k: v for k, v in ckpt["model_config"].items()})
    model.load_state_dict(ckpt["model"], strict=True)
    assert (tmp_path / "run/best.pt").is_file() and best["epoch"] in (1, 2)
    evaluated = run_train(tmp_path, "--eval-only", "--resume", str(tmp_path / "run/best.pt"))
    assert evaluated["val_top1"] == pytest.approx(best["val_top1"])
    bare = ["--data", "synthetic", "--synthetic-size", "64", "--batch-size", "16", "--workers", "0"]
    resumed = train.main([*bare, "--eval-only", "--resume", str(tmp_path / "run/best.pt")])  # no model flags
    assert resumed["val_top1"] == pytest.approx(best["val_top1"])


def test_train_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """Bit for bit on a CPU: model, optimizer, schedule, RNG and data order all continue exactly."""
    run_train(tmp_path, "--epochs", "3", name="straight")
    save = train.save_checkpoint

    def crash_after_epoch_2(path, state):
        save(path, state)
        if state["epoch"] == 1 and path.name == "checkpoint.pt":
            raise KeyboardInterrupt  # the run dies here

    monkeypatch.setattr(train, "save_checkpoint", crash_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, "--epochs", "3", name="stopped")
    monkeypatch.setattr(train, "save_checkpoint", save)
    # resumed as a user would: only --resume; data, recipe and model come from the checkpoint, and
    # another worker count changes nothing (augmentation is seeded per image, loaders own their RNG)
    train.main(["--resume", "auto", "--output-dir", str(tmp_path / "stopped"), "--workers", "1"])
    a, b = weights(tmp_path / "straight/checkpoint.pt"), weights(tmp_path / "stopped/checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "stopped/metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_torchrun_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    """DDP with gloo: the batch split over 2 ranks gives the weights of one process (per-sample
    augmentation is seeded by image and epoch; Mixup/CutMix and drop path, batch-level, are off)."""
    flags = [*TINY, "--epochs", "2", "--mixup", "0", "--cutmix", "0", "--drop-path", "0", "--attn-drop", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, "train.py", *flags, "--output-dir", str(tmp_path / "ddp")],
        cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    train.main([*flags, "--output-dir", str(tmp_path / "one")])
    a, b = weights(tmp_path / "ddp/checkpoint.pt"), weights(tmp_path / "one/checkpoint.pt")
    assert not torch.equal(
        a["head.weight"], create_model("vit_lite_7_4", dim=32, depth=2, heads=2).head.weight
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def write_cifar100(root: Path, n_train=48, n_test=16):
    """A tiny CIFAR-100 in the real cifar-100-python pickle layout."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {  # Python 2 str keys, which torchvision reads back with encoding="latin1"
            "data": torch.randint(0, 256, (n, 3072), dtype=torch.uint8, generator=g).numpy(),
            "fine_labels": torch.randint(100, (n,), generator=g).tolist(),
            "coarse_labels": torch.randint(20, (n,), generator=g).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": []}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_cifar100_loads_from_the_real_pickle_layout(tmp_path, monkeypatch):
    import torchvision

    write_cifar100(tmp_path / "data")
    # a tiny file cannot have the real archive's md5; everything after that check is torchvision's own
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )
    args = train.parse_args(["--data", "cifar100", "--data-path", str(tmp_path / "data")])
    train_set, val_set, classes = train.build_datasets(args, 32, synthetic_classes=0)
    assert (len(train_set), len(val_set), classes) == (48, 16, 100)
    img, label = train_set[0]
    assert img.size == (32, 32) and 0 <= label < 100
    flags = ["--data-path", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--epochs", "1"]
    small = ["--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", "16", "--workers", "0"]
    train.main(["--data", "cifar100", *flags, *small])
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["model_config"]["num_classes"] == 100


def test_image_folder_loads_jpegs_and_counts_classes(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in ("cat", "dog", "emu"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.jpg")
    flags = ["--data", "imagenet", "--data-path", str(tmp_path), "--output-dir", str(tmp_path / "run")]
    small = ["--model", "deit_tiny", "--img-size", "32", "--patch-size", "8", "--dim", "32", "--depth", "1"]
    train.main([*flags, *small, "--heads", "2", "--batch-size", "8", "--workers", "0", "--epochs", "1"])
    ckpt = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    assert ckpt["model_config"]["num_classes"] == 3 and ckpt["args"]["recipe"] == "deit"


def test_training_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path):
    run_train(tmp_path, "--epochs", "1")
    good = (tmp_path / "run/checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="training loss became nan.*last good checkpoint.*untouched"):
        run_train(
            tmp_path,
            "--epochs",
            "3",
            "--resume",
            "auto",
            "--lr",
            "1e38",
            "--warmup-epochs",
            "0",
            "--cooldown-epochs",
            "0",
        )
    assert (tmp_path / "run/checkpoint.pt").read_bytes() == good


def test_train_bad_input_is_a_clear_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match=r"--data imagenet expects .*nowhere/train/"):
        train.main(["--data", "imagenet", "--data-path", str(tmp_path / "nowhere")])
    for flag, value in (("--model", "deit_huge"), ("--pe", "rope")):
        with pytest.raises(SystemExit):
            train.main([*TINY, flag, value])
        assert f"invalid choice: '{value}'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="train.py: error: .*incompatible with the class token"):
        run_train(tmp_path, "--pe", "mpvg", "--pool", "cls")
    with pytest.raises(SystemExit, match="train.py: error: last_pe must be None or a layer index 0..1"):
        run_train(tmp_path, "--last-pe", "5")
    run_train(tmp_path, "--epochs", "1", "--pe", "mpvg")
    with pytest.raises(SystemExit, match="pe='mpvg' there but 'lape' here.*another --output-dir"):
        run_train(tmp_path, "--epochs", "2", "--pe", "lape", "--resume", "auto")
    with pytest.raises(SystemExit, match="dim=32 there but 48 here"):
        run_train(tmp_path, "--epochs", "2", "--dim", "48", "--resume", "auto")
    ckpt = tmp_path / "run/checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.raises(SystemExit, match="cannot read checkpoint .* truncated or corrupt"):
        run_train(tmp_path, "--epochs", "2", "--resume", str(ckpt))
    with pytest.raises(SystemExit, match="no checkpoint at"):
        run_train(tmp_path, "--eval-only", "--resume", str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit, match="--eval-only needs --resume"):
        run_train(tmp_path, "--eval-only")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--batch-size 15 is not divisible by the 2 processes"):
        run_train(tmp_path, "--batch-size", "15")


def test_cifar100_offline_names_the_way_out(tmp_path, monkeypatch):
    import torchvision

    def offline(self):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    with pytest.raises(SystemExit, match="could not load CIFAR-100 under --data-path .*--data synthetic"):
        train.main(["--data", "cifar100", "--data-path", str(tmp_path)])


def test_lr_schedule_is_timms_per_epoch_cosine():
    args = train.parse_args(["--recipe", "cifar"])
    assert train.lr_at(0, args) == 1e-6 and train.lr_at(10, args) == pytest.approx(
        6e-4 * 0.5 * (1 + math.cos(math.pi / 30)) + 1e-5 * 0.5 * (1 - math.cos(math.pi / 30))
    )
    assert train.lr_at(300, args) == train.lr_at(309, args) == 1e-5  # 10 cooldown epochs at min_lr
    deit = train.parse_args(["--recipe", "deit", "--batch-size", "1024"])
    assert train.peak_lr(deit) == pytest.approx(1e-3)  # 5e-4 x 1024 / 512


@pytest.mark.parametrize("mode", list(PE_MODES))
def test_torch_compile_traces_every_pe_mode_in_one_graph(mode):
    """fullgraph=True: no graph break in any PE mode, and the traced forward/backward equal eager's."""
    torch._dynamo.reset()
    model = randomise(create_model("deit_tiny", pe=mode, img_size=16, patch_size=4, dim=16, heads=2, depth=2))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    img = torch.randn(2, 3, 16, 16)
    eager = model(img)
    eager.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    traced = compiled(img)
    traced.sum().backward()
    torch.testing.assert_close(traced, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_benchmark_prints_every_mode_and_the_data_loader(tmp_path, capsys):
    flags = TINY[:-2]  # without --log-every: there is no training loop here
    rows = benchmark.main([*flags, "--bench-steps", "1", "--bench-rounds", "1", "--bench-warmup", "1"])
    assert {f"mpvg.py {m}" for m in MODES} | {"data loader"} <= set(rows)
    assert all(r["images_per_sec"] > 0 for r in rows.values())
    cfg = dict(
        img_size=16, patch_size=4, dim=32, depth=2, heads=2, num_classes=100, mlp_ratio=2.0, qkv_bias=False
    )
    for m in MODES:  # each row is its mode (the mode's own pooling), not the same model four times
        assert rows[f"mpvg.py {m}"]["params"] == count(create_model("vit_lite_7_4", pe=m, **cfg))
    out = capsys.readouterr().out
    assert "img/s" in out and "ms/step" in out and "data loader alone" in out


def test_flops_count_matches_a_hand_count():
    """DeiT-S forward: 4.6 GFLOPs as usually quoted (fvcore counts a multiply-add as one: 4.6 GMACs)."""
    cfg = create_model("deit_small").cfg
    assert benchmark.flops_per_image(cfg) / 2 == pytest.approx(4.6e9, rel=0.01)


# ----------------------------------------------------------------------------------------------
# The paper's analysis: each statistic on a case whose answer is known, or read by another path

from mpvg import analyse, pearson  # noqa: E402


@given(st.integers(2, 50), st.floats(0.1, 10), st.floats(-5, 5), st.integers(0, 2**16))
def test_pearson_of_a_tensor_with_itself_its_negation_and_an_affine_copy(n, scale, shift, seed):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    assert pearson(x, x) == pytest.approx(1.0, abs=1e-9)
    assert pearson(x, -x) == pytest.approx(-1.0, abs=1e-9)
    assert pearson(x, scale * x + shift) == pytest.approx(1.0, abs=1e-6)


def test_last_ln_variances_of_a_fresh_model_are_zero():
    """A fresh LayerNorm has beta = 0 and gamma = 1: both variances are exactly 0 (Appendix)."""
    model = create_model("deit_tiny", pe="mpvg", img_size=16, patch_size=4, dim=16, heads=2, depth=2)
    stats = analyse(model, torch.randn(3, 3, 16, 16))
    assert stats["last_ln"]["beta_var"] == 0.0 and stats["last_ln"]["gamma_var"] == 0.0


@given(configs(), st.integers(1, 3))
def test_analysis_reads_what_the_forward_computes(kw, batch):
    """Figs. 2, 4, 7 and the Appendix's cosine, against forward hooks (another path than the trace)."""
    model = build(kw)
    cfg = model.cfg
    seen = {}

    def keep(name):
        return lambda module, inputs, output: seen.__setitem__(name, (inputs[0], output))

    hooks = [b.norm1.register_forward_hook(keep(f"norm1.{l}")) for l, b in enumerate(model.blocks)]
    hooks += [
        b.pe_norm.register_forward_hook(keep(f"pe.{l}")) for l, b in enumerate(model.blocks) if b.pe_norm
    ]
    hooks.append(model.norm.register_forward_hook(keep("norm")))
    img = images(model, batch)
    stats = analyse(model, img)
    for h in hooks:
        h.remove()
    for l in range(cfg.depth):
        torch.testing.assert_close(stats["fig2_tokens"][l], seen[f"norm1.{l}"][1].mean(dim=0))
        if f"pe.{l}" in seen:
            torch.testing.assert_close(stats["fig2_pos"][l], seen[f"pe.{l}"][1][0])
            assert stats["fig4_correlation"][l] == pytest.approx(
                pearson(stats["fig2_tokens"][l], stats["fig2_pos"][l])
            )
        else:
            assert stats["fig2_pos"][l] is None and stats["fig4_correlation"][l] is None
    before, _ = seen["norm"]
    pool = (lambda t: t[:, 0]) if cfg.pool == "cls" else (lambda t: t.mean(1))
    with torch.no_grad():
        after = model.forward_features(img)  # y after the Last LN, Eq. (11) included: what the head pools
    cosine = F.cosine_similarity(pool(before).mean(0), pool(after).mean(0), dim=0)
    assert stats["last_ln"]["cosine"] == pytest.approx(float(cosine), abs=1e-9)
    g = cfg.img_size // cfg.patch_size
    n = g * g
    torch.testing.assert_close(stats["fig7_norms_pre"], before[:, -n:].norm(dim=-1).reshape(batch, g, g))
    assert stats["fig7_norms_post"].shape == (batch, g, g)


def test_analyze_command_writes_figures_and_json(tmp_path):
    out = tmp_path / "analysis"
    tiny = ["--model", "vit_lite_7_4", "--img-size", "16", "--dim", "32", "--depth", "3", "--heads", "2"]
    analyze.main([*tiny, "--pe", "lape", "--analyze-images", "8", "--output-dir", str(out)])
    names = {
        "fig2_heatmaps.png",
        "fig4_correlation.png",
        "fig6_last_ln.png",
        "fig7_token_norms.png",
        "analysis.json",
    }
    assert names <= {p.name for p in out.iterdir()}
    report = json.loads((out / "analysis.json").read_text())
    assert report["last_ln"]["beta_var"] == 0.0  # a new model: fresh Last LN
    assert len(report["fig4_correlation"]) == 3 and all(r is not None for r in report["fig4_correlation"])
    for l in range(3):  # every number in the file agrees with the heatmaps it also holds
        r = pearson(torch.tensor(report["fig2_tokens"][l]), torch.tensor(report["fig2_pos"][l]))
        assert r == pytest.approx(report["fig4_correlation"][l], abs=1e-3)


def test_workshop_prints_its_table(capsys):
    args = workshop.parse_args([])
    rows = workshop.workshop(args, torch.device("cpu"), epochs=1, train_size=128, val_size=64)
    assert [(r["pe"], r["pool"]) for r in rows] == workshop.WORKSHOP_MODELS
    assert "top-1" in capsys.readouterr().out


def test_where_is_the_plus_labels_the_cell_of_the_plus_centre():
    data = workshop.WhereIsThePlus(64, seed=3)
    for img, label in (data[i] for i in range(64)):
        bright = (img[0] * 0.5 + 0.75) > 1.0  # the marks add 1 to noise below 0.5
        plus = torch.nn.functional.conv2d(
            bright[None, None].float(), workshop.WhereIsThePlus.PLUS[None, None]
        )[0, 0]
        square = torch.nn.functional.conv2d(bright[None, None].float(), torch.ones(1, 1, 3, 3))[0, 0]
        ys, xs = torch.nonzero((plus == 5) & (square < 9), as_tuple=True)
        assert any((y + 1) // 4 * 4 + (x + 1) // 4 == label for y, x in zip(ys.tolist(), xs.tolist()))


# ----------------------------------------------------------------------------------------------
# The batched device data path (CIFAR-100 on a GPU), checked on a CPU against the per-image path


def cifar_args(*extra):
    return train.parse_args(["--recipe", "cifar", *extra])


def fixed_image(seed=0):
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 255, 32)[None, :].expand(32, 32)
    return (
        (ramp[None] * torch.tensor([1.0, 0.6, 0.2])[:, None, None] + 40 * torch.rand(3, 32, 32, generator=g))
        .clamp(0, 255)
        .to(torch.uint8)
    )


def test_batch_augment_draws_its_parameters_per_sample():
    """Each image of one batch gets its own crop, flip, RandAugment ops and signs, and erasing."""
    augment = device_data.BatchAugment(cifar_args(), 32)
    out = augment(fixed_image().repeat(512, 1, 1, 1), torch.Generator().manual_seed(0))
    p = augment.last
    assert len({tuple(b) for b in p["crop"].tolist()}) > 100
    assert 200 < int(p["flip"].sum()) < 312
    for op, negative in zip(p["ops"], p["negative"]):
        assert set(op.tolist()) == set(range(14)) and 200 < int(negative.sum()) < 312
    assert 80 < int(p["erase"].sum()) < 180  # p = 0.25, minus the rare boxes that fit no try
    assert len({hash(o.numpy().tobytes()) for o in out}) > 500


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_batch_augment_ops_and_magnitudes_are_torchvisions(sign):
    """Our RandAugment table and ops against torchvision's own (its private per-image method)."""
    from torchvision.transforms import v2

    ra = v2.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=11)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for name, magnitude, signed in device_data.rand_augment_space(9, 11, 32, 32):
        magnitudes_fn, their_signed = ra._AUGMENTATION_SPACE[name]
        theirs = magnitudes_fn(11, 32, 32)
        assert signed == their_signed and magnitude == (0.0 if theirs is None else float(theirs[9])), name
        m = sign * magnitude if signed else magnitude
        expected = torch.stack(
            [
                ra._apply_image_or_video_transform(
                    img, name, m, interpolation=ra.interpolation, fill=ra._fill
                )
                for img in x
            ]
        )
        assert torch.equal(device_data.rand_augment_op(x.clone(), name, m), expected), name


def test_batched_resized_crops_equal_torchvisions_per_image():
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    top, left, h, w, _ = device_data.sample_boxes(64, 32, 32, (0.8, 1.0), (3 / 4, 4 / 3), g, "center")
    ours = device_data.resized_crops(x, top, left, h, w, 32)
    for i in range(64):
        theirs = TF.resized_crop(
            x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32], InterpolationMode.BILINEAR
        )
        assert (ours[i].int() - theirs.int()).abs().max() <= 1  # uint8 rounding of the same bilinear weights


def ks_statistic(a, b):
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda s: torch.searchsorted(s.sort().values, grid, right=True) / len(s)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


@pytest.mark.parametrize("recipe_flags", [[], ["--randaug-magnitude", "5", "--reprob", "0.5"]])
def test_batched_and_per_image_paths_give_one_distribution(recipe_flags):
    """On a fixed input, 2000 outputs of each path: every summary statistic passes a two-sample KS test
    (critical value about 0.062 at alpha = 0.001 for 2000 + 2000 samples)."""
    args, n = cifar_args(*recipe_flags), 2000
    img = fixed_image()
    per_image, _ = train.build_transforms(args, 32)
    slow = []
    for i in range(n):
        torch.manual_seed(i)
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


def test_where_is_the_plus_commonest_cell_holds_8_percent():
    """The README's bar for a position-blind model: centres uniform over 1..14 make (4/14)^2 = 8.2%."""
    counts = torch.bincount(workshop.WhereIsThePlus(8000, seed=4).labels, minlength=16).double() / 8000
    assert counts.max() == pytest.approx(16 / 196, abs=0.01) and counts.min() == pytest.approx(
        9 / 196, abs=0.01
    )


def test_train_with_the_batched_device_data_path(tmp_path):
    """--device-data on a CPU: training and validation through DeviceLoader, every val image counted."""
    best = run_train(tmp_path, "--epochs", "1", "--device-data", "on", "--synthetic-size", "80")
    line = json.loads((tmp_path / "run/metrics.jsonl").read_text())
    assert math.isfinite(line["train_loss"]) and math.isfinite(line["val_loss"]) and best["epoch"] == 1
    assert line["val_loss"] > 1.0  # an empty validation would report 0
    assert line["val_top1"] * 16 / 100 == pytest.approx(round(line["val_top1"] * 16 / 100))  # 16 val images


def test_repeated_augmentation_gives_each_copy_its_own_augmentation():
    """DeiT's x3 sampler: over the ranks an epoch has len(dataset) samples, images come in copies with
    distinct copy ids, and each copy of an image is augmented differently."""
    data = train.SyntheticImages(30, 10, 32, seed=0)
    keys = [k for rank in range(3) for k in train.RepeatedAugSampler(data, 3, rank, repeats=3, seed=0)]
    assert len(keys) == 30
    by_image = {}
    for index, _epoch, copy in keys:
        by_image.setdefault(index, set()).add(copy)
    assert all(copies <= {0, 1, 2} for copies in by_image.values())
    assert any(len(copies) == 3 for copies in by_image.values())
    transform, _ = train.build_transforms(cifar_args(), 32)
    augmented = train.Augmented(data, transform, seed=0)
    copies = [augmented[(5, 0, c)][0] for c in range(3)]
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])
    assert torch.equal(augmented[(5, 0, 1)][0], copies[1])  # and each is reproducible


def test_readme_python_snippet_runs():
    """The README's usage example is code a reader will paste: it must run as printed."""
    readme = (Path(__file__).parent / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (8, 1000) and namespace["x_3"].shape == (8, 196, 192)


def readme_commands():
    """Every `python ...py` or `torchrun ... train.py` command in the README, in shell blocks or inline
    code, as (script, argv)."""
    readme = (Path(__file__).parent / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```bash\n")[1:]]
    inline = re.findall(r"`((?:python|torchrun) [^`]*\.py[^`]*)`", readme)
    text = "\n".join(blocks + inline).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line.split("#", 1)[0])
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if scripts and words[0] in ("python", "torchrun") and "..." not in words:
            commands.append((words[scripts[0]], words[scripts[0] + 1 :]))
    return commands


def test_every_readme_command_parses():
    """Each documented command names a script that exists and flags that script accepts."""
    parsers = {
        "train.py": train.build_parser,
        "tools/benchmark.py": benchmark.build_parser,
        "tools/analyze.py": analyze.build_parser,
        "tools/workshop.py": workshop.build_parser,
    }
    commands = readme_commands()
    assert {script for script, _ in commands} == set(parsers)  # every script is documented
    for script, argv in commands:
        if "--help" in argv:
            with pytest.raises(SystemExit) as printed_help:
                parsers[script]().parse_args(argv)
            assert printed_help.value.code == 0
        else:
            parsers[script]().parse_args(argv)  # exits with argparse's message on an unknown flag or value
