"""The spec of mpvg.py: property tests of the paper's equations and tables. It runs with only mpvg.py
beside it (torch, einops, pytest and hypothesis; timm, where installed, as a reference).

Where the paper is checked ("literal": test_forward_equals_literal_reading_of_eqs_1_to_11, which draws
every combination of the knobs):
  Eqs. (1), (5), (8)  PE on the patches, or none    literal; test_gap_is_blind_to_patch_order_exactly_...
  Eqs. (2)-(4)        pre-norm blocks, the Last LN  literal; test_sdpa_equals_plain_softmax_attention
  Eqs. (6)-(7)        LaPE's layer-wise PE          literal, in Eq. (7)'s own indexing
  Eqs. (9)-(10)       PVG's layer-wise PE           literal; test_pvg_with_zero_pe_norms_is_the_gap_default
  Eq. (11)            MPVG's PE at the Last LN      literal; test_mpvg_with_zero_last_pe_norm_is_pvg,
                                                    test_mpvg_is_pvg_with_another_head_bias
  Tables 1, 2         parameter counts              test_parameter_counts_are_exact, ..._as_printed
  Table 5             pos_k at the Last LN          literal (last_pe drawn); test_mpvg_is_pvg_with_...
  Table 6             layer 0, hierarchy, x + PE    literal (knobs drawn); test_pe_modes_are_the_papers_table,
                                                    test_table_6_hierarchy_in_every_layer_wise_mode
"""

import math
from dataclasses import asdict, fields

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mpvg import PE_MODES, PRESETS, Config, VisionTransformer, create_model, drop_path, load_model

settings.register_profile(
    "mpvg", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("mpvg")

MODES = ["default", "lape", "pvg", "mpvg"]


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
        y = y + LN(pos if k == 0 else received[k], "last_pe_norm")  # Eq. (11)
    pooled = y[:, 0] if cfg.pool == "cls" else y.mean(dim=1)
    return linear(pooled, "head")


@given(configs())
def test_forward_equals_literal_reading_of_eqs_1_to_11(kw):
    """Eqs. (1)-(11), Table 5 and Table 6: the model is the paper's equations, for every knob combination."""
    model = build(kw)
    img = images(model)
    torch.testing.assert_close(model(img), reference_logits(model, img), rtol=1e-9, atol=1e-9)


def test_pe_modes_are_the_papers_table():
    """Fig. 3 and the README's table of modes: the knob values of each mode."""
    assert {m: PE_MODES[m] for m in MODES} == {
        "default": dict(pe_input=True, pe_layers="none", pe_hierarchical=True, last_pe=None, pool="cls"),
        "lape": dict(pe_input=False, pe_layers="all", pe_hierarchical=True, last_pe=None, pool="cls"),
        "pvg": dict(pe_input=True, pe_layers="skip0", pe_hierarchical=True, last_pe=None, pool="gap"),
        "mpvg": dict(pe_input=True, pe_layers="skip0", pe_hierarchical=True, last_pe=0, pool="gap"),
    }


def literal_ln(t, norm, eps):
    """LayerNorm over the last axis, written out: (t - mean) / sqrt(var + eps) * weight + bias."""
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + eps) * norm.weight + norm.bias


@pytest.mark.parametrize("hierarchical", [True, False])
@pytest.mark.parametrize("mode", ["lape", "pvg", "mpvg"])
def test_table_6_hierarchy_in_every_layer_wise_mode(mode, hierarchical):
    """Table 6's "Hierarchical", in every mode with layer-wise PE and both ways, each case run (not left to
    hypothesis's draw): not hierarchical, each receiving layer l gets LN'_l(pos_0); hierarchical, LaPE's
    layer l gets LN'_l(pos_l) with pos_l = LN'_{l-1}(pos_{l-1}) (Eqs. 6-7) and PVG's and MPVG's layer l >= 1
    gets pos_l = LN'_l(pos_{l-1}) (Eqs. 9-10): LN'_l of what the previous receiving layer got."""
    depth = 4
    model = build(
        dict(img_size=8, patch_size=4, dim=8, heads=2, depth=depth, pe=mode, pe_hierarchical=hierarchical)
    )
    pos, layers = model.pos_embed, receiving_layers(PE_MODES[mode]["pe_layers"], depth)

    def ln(t, l):  # LN'_l, the PE's own LayerNorm of layer l
        return literal_ln(t, model.blocks[l].pe_norm, model.cfg.norm_eps)

    pos_l = [pos]  # pos_0 = pos, then Eq. (7) (LaPE) or Eq. (10) (PVG, MPVG) in its own indexing
    for l in range(1, depth):
        pos_l.append(ln(pos_l[l - 1], l - 1 if mode == "lape" else l))
    readings = {
        False: {l: ln(pos, l) for l in layers},  # Table 6, not hierarchical: LN'_l(pos_0)
        True: {l: ln(pos_l[l], l) if mode == "lape" else pos_l[l] for l in layers},  # Eq. (6) / Eq. (9)
    }
    last = layers[-1]
    assert not torch.allclose(readings[True][last], readings[False][last])  # the two readings differ
    img, trace = images(model), {}
    logits = model.forward_head(model.forward_features(img, trace))
    assert [l for l, p in enumerate(trace["pos"]) if p is not None] == layers
    for l in layers:
        torch.testing.assert_close(trace["pos"][l], readings[hierarchical][l], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, reference_logits(model, img), rtol=1e-9, atol=1e-9)


@given(st.integers(1, 3), st.integers(1, 8), st.integers(1, 3), st.sampled_from([2, 4, 8]), st.booleans())
def test_sdpa_equals_plain_softmax_attention(batch, tokens, heads, head_dim, qkv_bias):
    """The MSA of Eq. (2): F.scaled_dot_product_attention computes softmax(q k^T / sqrt(d)) v."""
    cfg = dict(dim=heads * head_dim, heads=heads, depth=1, img_size=4, patch_size=4, qkv_bias=qkv_bias)
    attn = randomise(create_model("deit_tiny", **cfg)).double().blocks[0].attn
    x = torch.randn(batch, tokens, heads * head_dim, dtype=torch.float64)
    q, k, v = rearrange(attn.qkv(x), "b n (s h d) -> s b h n d", s=3, h=heads)
    plain = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) @ v
    torch.testing.assert_close(attn(x), attn.proj(rearrange(plain, "b h n d -> b n (h d)")))


# Shapes, batch independence, determinism, gradients


@given(configs(), st.integers(1, 3))
def test_output_shapes_and_trace(kw, batch):
    """Eqs. (1)-(4): (B, C, H, W) -> tokens (B, N(+1), D) -> logits (B, classes); the trace is the
    forward's own."""
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
    """Table 7 (DeiT's drop path 0.1): the rate rises linearly from 0 at layer 0 to the last layer's."""
    model = create_model("deit_tiny", depth=5, drop_path=0.2, img_size=32, patch_size=16)
    assert [b.drop_prob for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_stochastic_depth_by_value():
    """Table 7's stochastic depth: in training each sample's branch is dropped whole or kept scaled by
    1 / (1 - p), so its expectation is the branch itself; in evaluation the branch passes unchanged."""
    torch.manual_seed(0)
    x = torch.randn(20000, 3, 4)
    out = drop_path(x, 0.25, training=True)
    kept = (out != 0).flatten(1).all(dim=1)
    assert ((out == 0).flatten(1).all(dim=1) | kept).all()  # whole samples, never parts of one
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    block = create_model("deit_tiny", depth=2, drop_path=0.5, img_size=16, patch_size=8).blocks[1].eval()
    tokens = torch.randn(2, 4, 192)
    assert torch.equal(block(tokens), block(tokens))  # nothing random in evaluation


def test_attention_dropout_acts_in_training_only():
    """Table 2's ViT-Lite recipe (attention dropout 0.1): a new mask each training call, none in eval."""
    kw = dict(depth=1, attn_drop=0.5, img_size=16, patch_size=4, dim=16, heads=2)
    model = create_model("deit_tiny", **kw)
    img = torch.randn(2, 3, 16, 16)
    model.eval()
    plain = create_model("deit_tiny", **{**kw, "attn_drop": 0.0})
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(img), plain.eval()(img))  # evaluation: as if there were none
    model.train()
    a, b = model(img), model(img)
    assert not torch.allclose(a, b)  # training: a new mask each call


@pytest.mark.parametrize("preset", PRESETS)
def test_initialisation_follows_each_anchor(preset):
    """DeiT (timm): pos_embed and cls_token truncated normal 0.02, the patch convolution PyTorch's default;
    ViT-Lite (Compact Transformers): pos_embed std 0.2, cls_token 0, the convolution Kaiming normal."""
    torch.manual_seed(0)
    model = create_model(preset, pe="lape", depth=2)  # a class token, and pe_norm in every layer
    conv = model.patch_embed.proj.weight
    fan_in = conv[0].numel()
    if preset == "vit_lite_7_4":
        assert model.pos_embed.std().item() == pytest.approx(0.2, rel=0.05)
        assert torch.equal(model.cls_token, torch.zeros_like(model.cls_token))
        assert conv.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)  # Kaiming normal, fan in
    else:
        assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
        assert model.cls_token.abs().max() > 0
        assert conv.abs().max().item() <= 1 / math.sqrt(
            fan_in
        )  # PyTorch's default: uniform within 1/sqrt(fan_in)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(
        m.weight.std().item() == pytest.approx(0.02, rel=0.1) for m in linears if m.weight.numel() > 1000
    )
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears if m.bias is not None)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in norms)


def test_large_models_build_on_the_meta_device():
    """Table 1's DeiT-B builds without memory on the meta device, its stochastic depth schedule intact."""
    with torch.device("meta"):
        model = create_model("deit_base", pe="mpvg", drop_path=0.1)
    assert model.pos_embed.is_meta and [b.drop_prob for b in model.blocks][-1] == pytest.approx(0.1)


def test_no_weight_decay_names_pos_cls_biases_and_norms():
    """Table 7 (DeiT): no weight decay on pos_embed, cls_token, biases and LayerNorms, LN'_l included."""
    model = create_model("deit_tiny", pe="lape", depth=1, img_size=32, patch_size=16)
    norms = [f"blocks.0.{n}.{w}" for n in ("norm1", "norm2", "pe_norm") for w in ("weight", "bias")]
    biases = [f"blocks.0.{m}.bias" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    named = ["pos_embed", "cls_token", "patch_embed.proj.bias", "norm.weight", "norm.bias", "head.bias"]
    assert model.no_weight_decay() == set(norms + biases + named)


def test_config_round_trips_through_asdict():
    """A resolved config (as a checkpoint stores it) rebuilds the same model."""
    cfg = create_model("vit_lite_7_4", pe="mpvg", last_pe=3).cfg
    assert Config(**asdict(cfg)) == cfg and cfg.last_pe == 3 and cfg.pool == "gap" and cfg.init == "cct"


# Reductions that must hold exactly


def copy_into(target_kw, source, drop=()):
    """A model of another configuration carrying the source's parameters (strict load, minus `drop`)."""
    target = create_model("deit_tiny", **target_kw).double().eval()
    state = {k: v for k, v in source.state_dict().items() if not any(k.endswith(d) for d in drop)}
    target.load_state_dict(state, strict=True)
    return target


@given(structures())
def test_pvg_with_zero_pe_norms_is_the_gap_default(kw):
    """Eqs. (8)-(10): with LN'_l's affine at zero, PVG's layer-wise PE vanishes and Eqs. (1)-(4) with GAP
    remain."""
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
def test_mpvg_with_zero_last_pe_norm_is_pvg(kw, data):
    """Eq. (11) vs Eq. (4): MPVG with its Last-LN PE norm at zero is PVG."""
    mpvg = build({**kw, "pe": "mpvg", "last_pe": data.draw(st.sampled_from([0, *range(1, kw["depth"])]))})
    with torch.no_grad():
        mpvg.last_pe_norm.weight.zero_()
        mpvg.last_pe_norm.bias.zero_()
    pvg = copy_into({**kw, "pe": "pvg"}, mpvg, drop=("last_pe_norm.weight", "last_pe_norm.bias"))
    img = images(mpvg)
    torch.testing.assert_close(mpvg(img), pvg(img), rtol=0, atol=0)


@given(structures(), st.data())
def test_mpvg_is_pvg_with_another_head_bias(kw, data):
    """Eq. (11), Table 5: with GAP, mean_n(LN(x)_n + LN(pos_k)_n) = mean_n LN(x)_n + c for a c that no
    input changes, so MPVG is PVG with head bias b + W c (a fact the paper does not state)."""
    k = data.draw(st.sampled_from([0, *range(1, kw["depth"])]))
    mpvg = build({**kw, "pe": "mpvg", "last_pe": k})
    trace = {}
    mpvg.forward_features(images(mpvg), trace=trace)
    pos_k = mpvg.pos_embed if k == 0 else trace["pos"][k]
    last_pe_norm = mpvg.last_pe_norm
    c = F.layer_norm(pos_k, (kw["dim"],), last_pe_norm.weight, last_pe_norm.bias, kw["norm_eps"]).mean(dim=1)[
        0
    ]
    pvg = copy_into({**kw, "pe": "pvg"}, mpvg, drop=("last_pe_norm.weight", "last_pe_norm.bias"))
    with torch.no_grad():
        pvg.head.bias.add_(pvg.head.weight @ c)
    img = images(mpvg, 3)
    torch.testing.assert_close(mpvg(img), pvg(img), rtol=1e-12, atol=1e-12)


@given(structures())
def test_mpvg_and_pvg_agree_on_logits_not_on_the_pe_gradient(kw):
    """MPVG equals PVG with another head bias in its logits, yet the Eq. (11) path sends its own gradient
    into pos_embed: the two train the PE differently."""
    assume(kw["num_classes"] > 1)
    mpvg = build({**kw, "pe": "mpvg"}).train()
    trace = {}
    mpvg.forward_features(images(mpvg), trace=trace)
    c = F.layer_norm(
        mpvg.pos_embed, (kw["dim"],), mpvg.last_pe_norm.weight, mpvg.last_pe_norm.bias, kw["norm_eps"]
    ).mean(1)[0]
    pvg = copy_into({**kw, "pe": "pvg"}, mpvg, drop=("last_pe_norm.weight", "last_pe_norm.bias")).train()
    with torch.no_grad():
        pvg.head.bias.add_(pvg.head.weight @ c)
    img, target = images(mpvg, 3), torch.arange(3) % kw["num_classes"]
    a, b = mpvg(img), pvg(img)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    F.cross_entropy(a, target).backward()
    F.cross_entropy(b, target).backward()
    assert (mpvg.pos_embed.grad - pvg.pos_embed.grad).norm() > 1e-6 * (1 + pvg.pos_embed.grad.norm())


def permute_patches(img, perm, p):
    g = img.shape[-1] // p
    patches = rearrange(img, "b c (h p1) (w p2) -> b (h w) c p1 p2", p1=p, p2=p)
    return rearrange(patches[:, perm], "b (h w) c p1 p2 -> b c (h p1) (w p2)", h=g, w=g)


@given(configs(), st.data())
def test_gap_is_blind_to_patch_order_exactly_when_no_pe_reaches_the_tokens(kw, data):
    """Self-attention is permutation-equivariant and GAP invariant; PE (Eq. 1/8 or 6/9) breaks that.

    PE at the Last LN alone (Eq. 11) adds the same vector to every image's pooled tokens, so it
    leaves a GAP model blind to patch order: the README's MPVG = PVG + head bias, seen from another side.
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


# Parameter counts, Tables 1 and 2

EXACT = {  # timm 1.0 for default, by hand for the rest (the README's table)
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


def count(preset, mode):
    """The parameters of a preset in a PE mode, built on the meta device: shapes, no memory, no init."""
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(preset, pe=mode).parameters())


def truncated_millions(n):
    return f"{n // 1000 / 1000:.3f}"  # the paper truncates to 3 decimals (every non-LaPE row fits)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("mode", MODES)
def test_parameter_counts_are_exact(preset, mode):
    """Tables 1 and 2: every preset's count in every mode (timm 1.0 for default, by hand for the rest)."""
    assert count(preset, mode) == EXACT[preset][mode]


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
    """Tables 1 and 2 as printed, in millions truncated to 3 decimals; the two LaPE entries that no
    consistent configuration gives are strict expected failures, with the reason."""
    assert truncated_millions(count(preset, mode)) == PAPER[preset][mode]


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
    """Table 1's default DeiT is timm's: the same names and shapes, so DeiT's checkpoints load strictly."""
    assert shapes(create_model("deit_tiny")) == DEIT_TINY
    gap = {k: v for k, v in DEIT_TINY.items() if k != "cls_token"} | {"pos_embed": (1, 196, 192)}
    assert shapes(create_model("deit_tiny", pool="gap")) == gap  # timm: class_token=False, global_pool="avg"


def test_pe_norm_names_follow_lape():
    """LN'_l of Eqs. (6) and (9) is blocks.{l}.pe_norm as in LaPE's code, none in MPVG's layer 0 (Table 6);
    Eq. (11)'s LayerNorm is last_pe_norm."""
    names = set(create_model("deit_tiny", pe="mpvg").state_dict())
    assert {f"blocks.{i}.pe_norm.weight" for i in range(1, 12)} <= names
    assert "blocks.0.pe_norm.weight" not in names and "last_pe_norm.weight" in names


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_timm_deit_checkpoint_gives_the_same_logits(pool):
    """Table 1's default DeiT computes timm's logits from timm's weights, with either pooling (where timm is
    installed: it is not a dependency)."""
    timm = pytest.importorskip("timm")
    kw = {} if pool == "cls" else dict(class_token=False, global_pool="avg", fc_norm=False)
    theirs = timm.create_model("deit_tiny_patch16_224", **kw).eval()
    randomise(theirs)
    ours = create_model("deit_tiny", pool=pool).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(img), theirs(img), rtol=1e-5, atol=1e-5)


# Every knob is seen to matter


ALTERNATIVES = {  # a Config field -> another valid value, on the small base model below
    "img_size": 16,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 5,
    "dim": 24,
    "depth": 4,
    "heads": 4,
    "mlp_ratio": 2.0,
    "qkv_bias": False,
    "norm_eps": 1e-2,
    "drop_path": 0.5,
    "attn_drop": 0.5,
    "init": "cct",
    "pe": "lape",
    "pool": "cls",
    "pe_input": False,
    "pe_layers": "all",
    "pe_hierarchical": False,
    "last_pe": 1,
}
BASE = dict(img_size=8, patch_size=2, in_chans=3, num_classes=3, dim=16, depth=3, heads=2, pe="pvg")


def fingerprint(cfg: Config) -> list:
    """What a model of cfg is: its parameter shapes, and (with fixed weights of those shapes, as far as
    they fit) its output in evaluation and, from a fixed seed, in training."""
    torch.manual_seed(0)
    model = VisionTransformer(cfg)
    initial = [p.detach().clone() for p in model.parameters()]
    randomise(model)
    img = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    with torch.no_grad():
        out = [model.eval()(img), model.train()(img)]
    return [{k: v.shape for k, v in model.state_dict().items()}, initial, out]


@pytest.mark.parametrize("field", [f.name for f in fields(Config)])
def test_every_config_field_changes_the_model(field):
    """No knob is ignored: each field of Config, changed alone, changes the parameters, their
    initialisation or the output (dropout and stochastic depth: in training)."""
    base = Config(**BASE)
    changed = Config(**{**BASE, field: ALTERNATIVES[field]})
    a, b = fingerprint(base), fingerprint(changed)
    same_shapes = a[0] == b[0]
    assert not same_shapes or any(not torch.equal(x, y) for x, y in zip(a[1] + a[2], b[1] + b[2])), (
        f"{field}={ALTERNATIVES[field]!r} changes nothing"
    )


# Bad input gets a clear error


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(img_size=30, patch_size=16), "img_size 30 must be a multiple of patch_size 16"),
        (dict(dim=100, heads=3), "dim 100 a multiple of heads 3"),
        (dict(pe="rope"), "unknown pe mode 'rope'"),
        (dict(pool="max"), "unknown pool 'max'"),
        (dict(pe_layers="some"), "unknown pe_layers 'some'"),
        (dict(init="xavier"), "unknown init 'xavier'"),
        (dict(pe="mpvg", last_pe=12), "layer 12 does not exist"),
        (dict(pe="default", pool="gap", last_pe=3), "layer 3 receives no PE"),
        (dict(pe="mpvg", pool="cls"), "incompatible with the class token"),
    ],
)
def test_a_configuration_the_paper_rules_out_is_a_clear_error(kwargs, message):
    """The checks that teach: Eq. (11) needs GAP (Conclusion), pos_k must be a PE some layer receives
    (Table 5), and the patches and heads must divide the image and the width."""
    with pytest.raises(ValueError, match=message):
        create_model("deit_tiny", **kwargs)


def test_an_unknown_preset_and_a_wrong_image_size_are_clear_errors():
    """The presets of Tables 1-2 by name; images of any size that the patch divides (N = HW / P^2, Eq. 1),
    anything else one ValueError line."""
    with pytest.raises(ValueError, match="unknown model preset 'deit_huge': choose one of deit_tiny"):
        create_model("deit_huge")
    model = create_model("deit_tiny", depth=1)
    for shape in [(2, 1, 224, 224), (2, 3, 224, 200), (2, 3, 40, 32), (3, 224, 224)]:
        with pytest.raises(
            ValueError, match=r"expected images \(B, 3, H, W\), H and W multiples of the patch"
        ) as e:
            model(torch.zeros(shape))
        assert "\n" not in str(e.value) and str(tuple(shape)) in str(e.value)


def test_load_model_rebuilds_a_checkpoint_of_train_py():
    """A checkpoint holds the model's weights and its preset's name with its resolved Config (train.py's
    model_config): load_model gives the same model."""
    model = randomise(create_model("vit_lite_7_4", pe="mpvg", last_pe=3, img_size=16, depth=4)).eval()
    model_config = {"model": "vit_lite_7_4", **asdict(model.cfg)}
    loaded = load_model(dict(model=model.state_dict(), model_config=model_config))
    img = torch.randn(2, 3, 16, 16)
    assert not loaded.training and loaded.cfg == model.cfg
    torch.testing.assert_close(loaded(img), model(img), rtol=0, atol=0)


# Any image size that the patch divides: the dense half (Tables 3-4, ViT-Adapter)


def resized(pos, side, grid):
    """pos's patch rows, a side x side grid, resized to grid bicubically (align_corners=False), written
    out here; the class slot, if any, kept in front."""
    slot = pos.shape[1] - side * side
    patches = pos[:, slot:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :slot], patches.flatten(2).transpose(1, 2)], dim=1)


def chain(model, pos_0):
    """{l: the PE layer l receives} from pos_0, by Eq. (7) (LaPE: layer l gets LN'_l(pos_l), pos_{l+1} =
    LN'_l(pos_l)), Eq. (10) (PVG: layer l >= 1 gets pos_l = LN'_l(pos_{l-1})) or Table 6's LN'_l(pos_0)."""
    cfg, received, pos_l = model.cfg, {}, pos_0

    def ln(t, l):
        norm = model.blocks[l].pe_norm
        return F.layer_norm(t, t.shape[-1:], norm.weight, norm.bias, cfg.norm_eps)

    for l in receiving_layers(cfg.pe_layers, cfg.depth):
        received[l] = pos_l = ln(pos_l if cfg.pe_hierarchical else pos_0, l)
    return received


@pytest.mark.parametrize("mode", PE_MODES)
def test_at_img_size_nothing_is_resized_and_the_output_is_todays_bit_for_bit(mode, monkeypatch):
    """At its own img_size the model reads pos_embed itself, the learned table (F.interpolate is never
    called): x_0 = patches + pos_embed, each layer's PE the chain of pos_embed, Eq. (11)'s LN(pos_k) from
    it, so that the output is, bit for bit, that of the forward that knew one size only."""
    model = randomise(create_model("deit_tiny", pe=mode, img_size=32, dim=8, heads=2, depth=3)).eval()
    img = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: pytest.fail("F.interpolate at img_size"))
    assert model.pos_at((2, 2)) is model.pos_embed
    x, pos = model.embed(img, model.pos_embed), model.layer_pos(model.pos_embed)
    for block, pos_l in zip(model.blocks, pos):
        x = block(x, pos_l)
    y = model.last_ln(x, [], pos, None)  # pos_0 not given: Eq. (11) reads pos_k(pos), pos_embed for k = 0
    torch.testing.assert_close(model.forward_features(img), y, rtol=0, atol=0)


@given(configs(), st.data())
def test_at_another_size_each_layer_gets_the_chain_of_the_resized_pos_0(kw, data):
    """Any H x W that the patch divides, square or not: pos_0 is resized (its class slot set aside), x_0 gets
    it (Eq. 1/8), every layer's PE follows from it by Eq. (7)/(10) (Table 6's LN'_l(pos_0) when not
    hierarchical), and Eq. (11) adds LN(pos_k) of that chain: a literal reading at the input's grid."""
    model = build(kw)
    cfg = model.cfg
    grid = data.draw(st.tuples(st.integers(1, 4), st.integers(1, 4)), label="grid")
    img = torch.randn(
        2, cfg.in_chans, grid[0] * cfg.patch_size, grid[1] * cfg.patch_size, dtype=torch.float64
    )
    trace = {}
    y = model.forward_features(img, trace)
    assume(model.pos_embed is not None)
    pos_0 = resized(model.pos_embed, cfg.img_size // cfg.patch_size, grid)
    received = chain(model, pos_0)
    assert [l for l, p in enumerate(trace["pos"]) if p is not None] == list(received)
    for l, p in received.items():
        torch.testing.assert_close(trace["pos"][l], p, rtol=1e-12, atol=1e-12)
    patches = rearrange(model.patch_embed.proj(img), "b d h w -> b (h w) d")
    if cfg.pe_input:
        torch.testing.assert_close(
            trace["tokens"][0][:, cfg.pool == "cls" :], patches + pos_0[:, cfg.pool == "cls" :]
        )
    if cfg.last_pe is not None:
        pos_k = pos_0 if cfg.last_pe == 0 else received[cfg.last_pe]
        eq11 = F.layer_norm(
            pos_k, (cfg.dim,), model.last_pe_norm.weight, model.last_pe_norm.bias, cfg.norm_eps
        )
        torch.testing.assert_close(
            y - model.norm(trace["pre_norm"]), eq11.expand_as(y), rtol=1e-12, atol=1e-12
        )


@given(configs(), st.integers(1, 4))
def test_at_another_square_size_the_logits_are_the_literal_reading_with_the_resized_pe(kw, side):
    """Eqs. (1)-(11) read literally (reference_logits) by a model built for the new size whose pos_embed is
    the resized table: the model run at that size gives the same logits."""
    model = build(kw)
    new = build({**kw, "img_size": side * model.cfg.patch_size})
    state = model.state_dict()
    if model.pos_embed is not None:
        state["pos_embed"] = resized(
            model.pos_embed, model.cfg.img_size // model.cfg.patch_size, (side, side)
        )
    new.load_state_dict(state)
    img = images(new)
    torch.testing.assert_close(model(img), reference_logits(new, img), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", PE_MODES)
def test_every_mode_runs_at_non_square_sizes(mode):
    """Detection's inputs are not square: (B, 3, H, W) -> tokens (B, HW / P^2 (+1), D), logits (B, K)."""
    model = create_model("deit_tiny", pe=mode, img_size=32, dim=8, heads=2, depth=3, num_classes=5)
    for h, w in [(16, 48), (64, 32), (48, 80)]:
        trace = {}
        y = model.forward_features(torch.randn(2, 3, h, w), trace)
        n = h * w // 256 + (model.cfg.pool == "cls")
        assert y.shape == (2, n, 8) and model.forward_head(y).shape == (2, 5)
        assert all(p is None or p.shape == (1, n, 8) for p in trace["pos"])
