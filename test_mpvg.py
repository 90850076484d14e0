"""Property tests of mpvg.py: each test names the equation or table of the paper that it checks."""

import json
import math
import os
import pickle
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import train
from mpvg import PE_MODES, PRESETS, Config, VisionTransformer, analyse, create_model, load_model, pearson
from tools import (
    analyze,
    benchmark,
    builtin_data,
    device_data,
    mixing,
    pretrained,
    randaugment,
    resume,
    run_folder,
    speed,
    workshop,
)
from tools.pretrained import load_pretrained, resize_pos_embed

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
    """Fig. 3 and the README's table of modes: the knob values of each mode."""
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


def test_stochastic_depth_by_value():
    """In training each sample's branch is dropped whole or kept scaled by 1 / (1 - p), so its expectation
    is the branch itself; in evaluation the branch passes unchanged."""
    from mpvg import drop_path

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
    model = create_model(preset, pe="lape")  # a class token, and pe_norm in every layer
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
    with torch.device("meta"):
        model = create_model("deit_base", pe="mpvg", drop_path=0.1)
    assert model.pos_embed.is_meta and [b.drop_path for b in model.blocks][-1] == pytest.approx(0.1)


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


def test_no_weight_decay_names_pos_cls_biases_and_norms():
    model = create_model("deit_tiny", pe="lape", depth=2, img_size=32, patch_size=16)
    skip = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.pe_norm.weight", "norm.bias", "head.bias"} <= skip
    assert not {"head.weight", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight"} & skip
    assert skip == {n for n, p in model.named_parameters() if p.ndim <= 1 or n in ("pos_embed", "cls_token")}


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
    """README: with GAP, mean_n(LN(x)_n + LN(pos_k)_n) = mean_n LN(x)_n + c, so MPVG = PVG with bias b + W c."""
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


@given(structures())
def test_mpvg_and_pvg_agree_on_logits_not_on_the_pe_gradient(kw):
    """MPVG equals PVG with another head bias in its logits, yet the Eq. (11) path sends its own gradient
    into pos_embed: the two train the PE differently."""
    assume(kw["num_classes"] > 1)
    mpvg = build({**kw, "pe": "mpvg"}).train()
    trace = {}
    mpvg.forward_features(images(mpvg), trace=trace)
    c = F.layer_norm(
        mpvg.pos_embed, (kw["dim"],), mpvg.norm_pe.weight, mpvg.norm_pe.bias, kw["norm_eps"]
    ).mean(1)[0]
    pvg = copy_into({**kw, "pe": "pvg"}, mpvg, drop=("norm_pe.weight", "norm_pe.bias")).train()
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
        (dict(norm_eps=-1.0), "norm_eps must be a positive number"),
        (dict(norm_eps=0.0), "norm_eps must be a positive number"),
        (dict(mlp_ratio=0.0), "mlp_ratio must give the MLP at least one hidden unit"),
        (dict(init="xavier"), "unknown init 'xavier'"),
        (dict(dim=True), "dim must be a positive integer, got True"),  # a bool is no size
        (dict(mlp_ratio=float("nan")), "mlp_ratio must give the MLP at least one hidden unit"),
        (dict(mlp_ratio=float("inf")), "mlp_ratio must give the MLP at least one hidden unit"),
        (dict(norm_eps=float("inf")), "norm_eps must be a positive number"),  # else every output is zero
        (dict(drop_path="0.1"), r"drop_path must be in \[0, 1\), got '0.1'"),
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


@pytest.mark.parametrize(
    "img, got",
    [(torch.zeros(2, 3, 224, 224, dtype=torch.uint8), "torch.uint8"), ([[0.0]], "list"), (None, "NoneType")],
)
def test_images_that_are_not_float_tensors_are_a_clear_error(img, got):
    with pytest.raises(TypeError, match=f"expected a float tensor of normalised images, got {got}: convert"):
        create_model("deit_tiny", depth=1)(img)


def test_loading_what_is_not_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="VisionTransformer takes a Config, got dict: or use create_model"):
        VisionTransformer(dict(dim=32))
    model = create_model("deit_tiny", depth=1, img_size=32)
    for wrong in ({}, model.state_dict(), dict(model=1, model_config=None)):
        with pytest.raises(ValueError, match="load_model takes a checkpoint of train.py"):
            load_model(wrong)
    newer = dict(model=model.state_dict(), model_config={**asdict(model.cfg), "rope": True})
    with pytest.raises(ValueError, match=r"model_config has fields this mpvg.py lacks \(rope\)"):
        load_model(newer)


# train.py: a run end to end, DDP equals one process, resume equals no stop, real on-disk formats

TINY = [  # a model and data small enough for a CPU test, with every augmentation of the cifar recipe on
    "--data", "noise", "--synthetic-size", "64", "--model", "vit_lite_7_4", "--img-size", "16",
    "--dim", "32", "--depth", "2", "--heads", "2", "--batch-size", "16", "--workers", "0", "--log-every", "2",
]  # fmt: skip
QUIET = ["--mixup", "0", "--cutmix", "0", "--drop-path", "0", "--attn-drop", "0"]  # no batch-level randomness


def run_train(tmp_path, *extra, name="run"):
    return train.main([*TINY, "--output-dir", str(tmp_path / name), *extra])


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def snapshot(folder: Path) -> dict:
    """Every file of a folder and its bytes (the lock file aside), to show that nothing changed."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def test_train_run_writes_metrics_and_checkpoints_and_reloads(tmp_path):
    best = run_train(tmp_path, "--epochs", "2", "--pe", "mpvg")
    lines = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    keys = {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_sec", "seconds"}
    assert all(keys <= set(m) and all(math.isfinite(m[k]) for k in keys) for m in lines)
    ckpt = torch.load(tmp_path / "run/checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["model_config"]["pe"] == "mpvg" and ckpt["model_config"]["dim"] == 32
    assert json.loads((tmp_path / "run/run.json").read_text()) == dict(run_id=ckpt["run_id"], epoch=1)
    model = load_model(tmp_path / "run/best.pt")  # the README's one call back to a model
    assert not model.training and model.cfg.num_classes == 100 and best["epoch"] in (1, 2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), weights(tmp_path / "run/best.pt").values())
    )
    evaluated = run_train(tmp_path, "--eval-only", "--resume", str(tmp_path / "run/best.pt"))
    assert evaluated["val_top1"] == pytest.approx(best["val_top1"])
    bare = ["--data", "noise", "--synthetic-size", "64", "--batch-size", "16", "--workers", "0"]
    resumed = train.main([*bare, "--eval-only", "--resume", str(tmp_path / "run/best.pt")])  # no model flags
    assert resumed["val_top1"] == pytest.approx(best["val_top1"])


@pytest.mark.parametrize("loader", [[], ["--device-data", "on"]])
def test_train_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch, loader):
    """Bit for bit on a CPU: model, optimizer, schedule, RNG and data order all continue exactly, with
    DataLoader workers and with the device loader (whose random streams differ: --device-data is kept)."""
    run_train(tmp_path, "--epochs", "3", *loader, name="straight")
    save = run_folder.save_checkpoint

    def crash_after_epoch_2(path, state):
        save(path, state)
        if state["epoch"] == 1 and path.name == "checkpoint.pt":
            raise KeyboardInterrupt  # the run dies here

    monkeypatch.setattr(run_folder, "save_checkpoint", crash_after_epoch_2)
    with pytest.raises(SystemExit) as stopped:
        run_train(tmp_path, "--epochs", "3", *loader, name="stopped")
    assert stopped.value.code == 130
    monkeypatch.setattr(run_folder, "save_checkpoint", save)
    # resumed as a user would: only --resume; data, recipe and model come from the checkpoint, and
    # another worker count changes nothing (augmentation is seeded per image, loaders own their RNG)
    train.main(["--resume", "auto", "--output-dir", str(tmp_path / "stopped"), "--workers", "1"])
    a, b = weights(tmp_path / "straight/checkpoint.pt"), weights(tmp_path / "stopped/checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "stopped/metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_a_resume_applies_a_new_weight_decay_and_refuses_what_it_cannot_change(tmp_path):
    run_train(tmp_path, "--epochs", "1")  # the cifar recipe: weight decay 0.06, pos_embed decayed
    train.main(
        ["--resume", "auto", "--output-dir", str(tmp_path / "run"), "--epochs", "2", "--weight-decay", "0.5"]
    )
    groups = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]  # not the checkpoint's 0.06, as the args say
    for flag, value, why in (
        ("--recipe", "deit", "keeps its recipe's values"),
        ("--decay-pos-embed", "false", "per weight-decay group"),
    ):
        with pytest.raises(SystemExit, match=f"{flag} differs from the checkpoint's: .*{why}.* --finetune"):
            train.main(
                ["--resume", "auto", "--output-dir", str(tmp_path / "run"), "--epochs", "3", flag, value]
            )
        train.main(["--resume", "auto", "--output-dir", str(tmp_path / "run"), "--eval-only", flag, value])


def torchrun(*args, nproc=2, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*command, "train.py", *args], cwd=Path(__file__).parent, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_torchrun_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    """DDP with gloo: the batch split over 2 ranks gives the weights of one process, for per-sample
    augmentation (seeded by image and epoch); batch-level randomness (Mixup, CutMix, drop path, dropout)
    is drawn per rank, so it is off here (the README says so). And training moved the weights."""
    flags = [*TINY, "--epochs", "2", *QUIET]
    result = torchrun(*flags, "--output-dir", str(tmp_path / "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    train.main([*flags, "--output-dir", str(tmp_path / "one")])
    a, b = weights(tmp_path / "ddp/checkpoint.pt"), weights(tmp_path / "one/checkpoint.pt")
    torch.manual_seed(0)  # the initial weights of both runs: seed 0, rank 0
    start = create_model("vit_lite_7_4", pe="mpvg", img_size=16, dim=32, depth=2, heads=2).state_dict()
    assert all((a[k] - start[k]).abs().max() > 1e-4 for k in ("head.weight", "blocks.1.attn.qkv.weight"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    rng = torch.load(tmp_path / "ddp/checkpoint.pt", weights_only=True)["rng"]
    assert not torch.equal(
        rng[0]["torch"], rng[1]["torch"]
    )  # each rank's own generators, for an exact resume


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
    train_set, val_set, classes = train.build_datasets(args, 32, noise_classes=0)
    assert (len(train_set), len(val_set), classes) == (48, 16, 100)
    img, label = train_set[0]
    assert img.size == (32, 32) and 0 <= label < 100
    flags = ["--data-path", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--epochs", "1"]
    small = ["--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", "16", "--workers", "0"]
    train.main(["--data", "cifar100", *flags, *small])
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["model_config"]["num_classes"] == 100


def write_image_folder(root: Path, n_train=8, n_val=4, size=(40, 48), classes=("cat", "dog", "emu")):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")


FOLDER_MODEL = ["--model", "deit_tiny", "--img-size", "32", "--patch-size", "8", "--dim", "32", "--depth", "1",
                "--heads", "2", "--batch-size", "8", "--workers", "0", "--epochs", "1"]  # fmt: skip


def test_image_folder_loads_jpegs_and_counts_classes(tmp_path):
    write_image_folder(tmp_path / "data")
    train.main(["--data", "imagenet", "--data-path", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"),
                *FOLDER_MODEL])  # fmt: skip
    ckpt = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    assert ckpt["model_config"]["num_classes"] == 3 and ckpt["args"]["recipe"] == "deit"


@pytest.mark.parametrize(
    "workers, damage", [("0", "not an image"), ("2", "not an image"), ("2", "truncated")]
)
def test_an_unreadable_image_is_named_in_one_line(tmp_path, workers, damage):
    write_image_folder(tmp_path / "data")
    bad = tmp_path / "data/val/dog/3.jpg"
    bad.write_bytes(b"not a jpeg" if damage == "not an image" else bad.read_bytes()[:300])
    error = "UnidentifiedImageError" if damage == "not an image" else "OSError"
    with pytest.raises(
        SystemExit, match=rf"^train.py: error: cannot read .*dog/3\.jpg \({error}.*delete or replace it$"
    ):
        train.main(["--data", "imagenet", "--data-path", str(tmp_path / "data"), "--output-dir", str(tmp_path / "r"),
                    *FOLDER_MODEL, "--workers", workers])  # fmt: skip


def test_training_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path):
    run_train(tmp_path, "--epochs", "1")
    good = snapshot(tmp_path / "run")
    with pytest.raises(SystemExit, match="training loss became nan.*last good checkpoint.*untouched"):
        run_train(tmp_path, "--epochs", "3", "--resume", "auto", "--lr", "1e38", "--warmup-epochs", "0",
                  "--cooldown-epochs", "0")  # fmt: skip
    assert snapshot(tmp_path / "run") == good


def test_cifar100_offline_names_the_way_out(tmp_path, monkeypatch):
    import torchvision

    def offline(self):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    with pytest.raises(SystemExit, match="could not load CIFAR-100 under --data-path .*--data synthetic"):
        train.main(["--data", "cifar100", "--data-path", str(tmp_path)])


@pytest.mark.parametrize("recipe", ["deit", "cifar"])
def test_lr_schedule_at_every_epoch_is_timms(recipe):
    """Linear warmup from warmup_lr, cosine from the peak to min_lr, then cooldown at min_lr: every epoch
    of both recipes against the rule written out here."""
    args = train.parse_args(["--recipe", recipe, "--batch-size", "512"])
    r = train.RECIPES[recipe]
    peak = r["lr"] * (512 / r["lr_batch_scale"] if r["lr_batch_scale"] else 1)
    cosine = r["epochs"] - r["cooldown_epochs"]
    for epoch in range(r["epochs"]):
        if epoch < r["warmup_epochs"]:
            expected = r["warmup_lr"] + (peak - r["warmup_lr"]) * epoch / r["warmup_epochs"]
        elif epoch < cosine:
            expected = r["min_lr"] + (peak - r["min_lr"]) * (1 + math.cos(math.pi * epoch / cosine)) / 2
        else:
            expected = r["min_lr"]
        assert train.lr_at(epoch, args) == pytest.approx(expected, rel=1e-12), epoch
    assert train.lr_at(0, args) == 1e-6 and (train.lr_at(r["epochs"] - 1, args) == 1e-5) == (
        recipe == "cifar"
    )


@pytest.mark.parametrize("recipe, decays_pos", [("deit", False), ("cifar", True)])
def test_the_optimizer_decays_what_each_anchor_decays(recipe, decays_pos):
    """The optimizer train.py builds: never biases or LayerNorms; pos_embed and cls_token not under DeiT
    (its no_weight_decay), but under Compact Transformers (no exemption list)."""
    args = train.parse_args(["--recipe", recipe])
    model = create_model("deit_tiny", pe="lape", depth=2, img_size=32, patch_size=16)
    optimizer = train.build_optimizer(model, args, 1e-3, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    still = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(g["weight_decay"] in (0.0, args.weight_decay) for g in optimizer.param_groups)
    assert decayed | still == set(names.values()) and not decayed & still
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2} - {"pos_embed", "cls_token"}
    assert decayed == matrices | ({"pos_embed", "cls_token"} if decays_pos else set())


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
    with pytest.raises(SystemExit, match="no checkpoint at"):
        run_train(tmp_path, "--eval-only", "--resume", str(tmp_path / "missing.pt"))
    with pytest.raises(
        SystemExit, match=r"--eval-only needs a checkpoint: --resume PATH.*\(none was given\)"
    ):
        run_train(tmp_path, "--eval-only")
    with pytest.raises(SystemExit, match="--resume continues a run and --finetune starts a new one"):
        run_train(tmp_path, "--resume", "auto", "--finetune", str(tmp_path / "run/best.pt"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--batch-size 15 is not divisible by 2 process"):
        run_train(tmp_path, "--batch-size", "15")


def test_the_refusals_of_tools_resume_pretrained_and_device_data_are_one_line(tmp_path, capsys, monkeypatch):
    """What train.py hands to tools/ still ends in one line: a resume on another process count, a
    fine-tune onto another architecture, --device-data on an image folder; and it says what it did."""
    run_train(tmp_path, "--epochs", "1", "--resume", "auto")
    assert "--resume auto: no checkpoint in" in capsys.readouterr().out  # a new folder: a new run, said so
    with pytest.raises(
        SystemExit, match="the checkpoint has 100 classes but this data set has 16: .*--finetune"
    ):
        run_train(tmp_path, "--eval-only", "--resume", "auto", "--data", "synthetic")
    state = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    config = {
        k: v for k, v in state["model_config"].items() if k != "num_classes"
    }  # hand-edited: Config's default
    torch.save({**state, "model_config": config}, tmp_path / "no_classes.pt")
    with pytest.raises(
        SystemExit, match="no_classes.pt's weights do not fit its model_config .size mismatch"
    ):
        run_train(tmp_path, "--eval-only", "--resume", str(tmp_path / "no_classes.pt"))
    args = SimpleNamespace(world=2, rank=0, weight_decay=0.05, epochs=5)
    with pytest.raises(SystemExit, match="written by 1 processes; resume it with that many, not 2"):
        resume.restore(state, None, args, torch.device("cpu"))
    loaded, optimizer = [], SimpleNamespace(load_state_dict=lambda s: loaded.append(s), param_groups=[{}])
    torch.manual_seed(123), random.seed(123)
    start = resume.restore(
        state, optimizer, SimpleNamespace(**{**vars(args), "world": 1}), torch.device("cpu")
    )
    assert start == (1, state["best"], state["run_id"]) and loaded == [state["optimizer"]]
    assert optimizer.param_groups[0]["weight_decay"] == 0.05  # the flag's, not the checkpoint's
    assert torch.equal(torch.get_rng_state(), state["rng"][0]["torch"])  # every generator as it was saved
    assert random.getstate() == state["rng"][0]["python"]
    fine = tmp_path / "run/checkpoint.pt"
    run_train(tmp_path, "--epochs", "1", "--finetune", str(fine), name="fine")
    assert f"--finetune {fine}: loaded" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")  # the other ranks load as well, and say nothing
    pretrained.finetune(
        create_model("vit_lite_7_4", img_size=16, dim=32, depth=2, heads=2), weights(fine), fine
    )
    assert capsys.readouterr().out == ""
    monkeypatch.delenv("RANK")
    with pytest.raises(SystemExit, match=r"--finetune .*: the checkpoint is another architecture \("):
        run_train(tmp_path, "--epochs", "1", "--finetune", str(fine), "--dim", "48", name="wide")
    write_image_folder(tmp_path / "data")
    with pytest.raises(
        SystemExit, match="--device-data holds fixed-size sets .* image folders need --device-data off"
    ):
        train.main(["--data", "imagenet", "--data-path", str(tmp_path / "data"), "--device-data", "on",
                    "--output-dir", str(tmp_path / "folder"), "--workers", "0"])  # fmt: skip


def test_an_interrupt_says_what_is_saved_before_the_teardown(tmp_path, monkeypatch, capsys):
    """The line that says how to continue comes first: a teardown that hangs or fails (NCCL after its
    peers died) must not swallow it."""
    said = []

    def interrupted_run(args, device):
        args.progress["epoch"] = 0
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", interrupted_run)
    monkeypatch.setattr(train.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train.dist, "destroy_process_group", lambda: said.append(capsys.readouterr().err))
    with pytest.raises(SystemExit) as stopped:
        run_train(tmp_path)
    assert stopped.value.code == 130
    assert "train.py: interrupted in epoch 1; no checkpoint was saved yet" in said[0]


def bad_flag_values():
    """For each numeric flag, a value just outside its range (and nan for the real-valued ones)."""
    cases = []
    for key, interval in train.RANGES.items():
        low = float(interval[1:-1].split(",")[0])
        flag = "--" + key.replace("_", "-")
        below = low if interval[0] == "(" else low - 1
        integer = key in {"epochs", "cooldown_epochs", "warmup_epochs", "batch_size", "accum_steps",
                          "lr_batch_scale", "randaug_magnitude", "repeated_aug", "synthetic_size", "workers", "seed",
                          "log_every"}  # fmt: skip
        cases.append((flag, str(int(below)) if integer else str(below)))
        if not integer:
            cases.append((flag, "nan"))
    return cases + [
        ("--randaug-magnitude", "11"),
        ("--reprob", "2"),
        ("--smoothing", "1"),
        ("--eval-crop", "1.5"),
        ("--seed", "4294967296"),
    ]


@pytest.mark.parametrize("flag, value", bad_flag_values())
def test_every_numeric_flag_out_of_range_is_one_line(tmp_path, flag, value):
    with pytest.raises(SystemExit, match=rf"^train.py: error: {flag} must be in [\[(].*, got "):
        run_train(tmp_path, flag, value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_training_that_would_do_nothing_is_an_error(tmp_path):
    with pytest.raises(
        SystemExit, match=r"training set gives 64 images per process, fewer than one step of 128"
    ):
        run_train(tmp_path, "--batch-size", "128")
    with pytest.raises(SystemExit, match="--epochs must be in"):
        run_train(tmp_path, "--epochs", "0")
    with pytest.raises(SystemExit, match="--lr must be in"):
        run_train(tmp_path, "--lr", "-0.01")
    run_train(tmp_path, "--epochs", "1")
    with pytest.raises(SystemExit, match="nothing to train: the checkpoint holds epoch 1 and --epochs is 1"):
        run_train(tmp_path, "--resume", "auto", "--epochs", "1")


def test_checkpoint_files_that_are_not_ours_are_named(tmp_path, monkeypatch):
    run_train(tmp_path, "--epochs", "1")
    ckpt = tmp_path / "run/checkpoint.pt"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.raises(SystemExit, match="cannot read checkpoint .*cut.pt: it is truncated or corrupt"):
        run_train(tmp_path, "--resume", str(cut), "--output-dir", str(tmp_path / "other"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="cannot read checkpoint .*empty.pt: it is truncated or corrupt"):
        run_train(tmp_path, "--resume", str(tmp_path / "empty.pt"), "--output-dir", str(tmp_path / "other"))

    def unreadable(
        *args, **kwargs
    ):  # as torch.load of a file without read permission (tests may run as root)
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(run_folder.torch, "load", unreadable)
        with pytest.raises(
            SystemExit, match="cannot read .*checkpoint.pt .Permission denied.: check its permissions"
        ):
            run_train(tmp_path, "--resume", str(ckpt))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pt")
    with pytest.raises(
        SystemExit, match="dict.pt is not a checkpoint written by train.py .it lacks args, best, epoch"
    ):
        run_train(tmp_path, "--resume", str(tmp_path / "dict.pt"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module
    with pytest.raises(
        SystemExit, match="module.pt is not a checkpoint of this project: it holds pickled Python"
    ):
        run_train(tmp_path, "--resume", str(tmp_path / "module.pt"))
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")  # not a pickle at all
    with pytest.raises(SystemExit, match="photo.jpg is not a checkpoint: torch.load cannot read it"):
        run_train(tmp_path, "--finetune", str(tmp_path / "photo.jpg"), "--output-dir", str(tmp_path / "ft"))
    torch.save({"model": {"w": torch.zeros(1)}, "model_config": torch.zeros(1)}, tmp_path / "odd_config.pt")
    with pytest.raises(SystemExit, match="odd_config.pt holds a 'model_config' that is not a dict"):
        run_train(
            tmp_path, "--finetune", str(tmp_path / "odd_config.pt"), "--output-dir", str(tmp_path / "ft")
        )
    with pytest.raises(
        SystemExit, match="run is a folder: pass a checkpoint in it, such as .*run/checkpoint.pt$"
    ):
        run_train(tmp_path, "--finetune", str(tmp_path / "run"), "--output-dir", str(tmp_path / "ft"))
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    with pytest.raises(SystemExit, match="tensor.pt holds a Tensor, not a checkpoint"):
        run_train(tmp_path, "--finetune", str(tmp_path / "tensor.pt"), "--output-dir", str(tmp_path / "ft"))
    (tmp_path / "note.txt").write_text("hi")
    with pytest.raises(SystemExit, match="note.txt is not a checkpoint: torch.load cannot read it"):
        analyze.main([str(tmp_path / "note.txt")])
    with pytest.raises(
        SystemExit, match="--resume and --finetune take a path, and one of them got an empty one"
    ):
        run_train(tmp_path, "--finetune", "", "--output-dir", str(tmp_path / "ft"))  # "$CKPT", CKPT unset
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "model_config": {**state["model_config"], "rope": True}}, tmp_path / "newer.pt")
    for use in (["--resume"], ["--finetune"]):
        with pytest.raises(SystemExit, match=r"model_config has fields this mpvg.py lacks \(rope\): use the"):
            run_train(tmp_path, *use, str(tmp_path / "newer.pt"), "--output-dir", str(tmp_path / "ft"))
    with pytest.raises(SystemExit, match=r"newer.pt: the checkpoint's model_config has fields"):
        analyze.main([str(tmp_path / "newer.pt")])
    torch.save({**state, "model_config": {**state["model_config"], "dim": 48}}, tmp_path / "edited.pt")
    with pytest.raises(
        SystemExit, match="edited.pt's weights do not fit its model_config .size mismatch for"
    ):
        run_train(tmp_path, "--resume", str(tmp_path / "edited.pt"), "--dim", "48")
    with pytest.raises(SystemExit, match="edited.pt: size mismatch for"):
        analyze.main([str(tmp_path / "edited.pt")])


def test_a_seed_or_image_size_the_data_cannot_take_is_one_line(tmp_path):
    with pytest.raises(
        SystemExit, match="--data synthetic places a 3-pixel plus sign in a 4 x 4 grid: it needs"
    ):
        run_train(tmp_path, "--data", "synthetic", "--img-size", "2", "--patch-size", "2")
    run_train(tmp_path, "--epochs", "1", "--seed", "4294967295")  # the largest seed: every derived seed fits
    images, labels = device_data.as_tensors(
        builtin_data.PlusSigns(8, 8, seed=4294967295), torch.device("cpu")
    )
    augment = device_data.BatchAugment(train.resolve_recipe(train.build_parser().parse_args([])), 8)
    list(
        device_data.DeviceLoader(
            images, labels, train.EpochSampler(images, 1, 0, 4294967295), 4, augment, 4294967295
        )
    )


def test_errors_are_printed_by_rank_0_only(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as other_rank:
        train.fail("the same message on every rank")
    assert other_rank.value.code == 1  # exits non-zero without printing
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="^train.py: error: the same message on every rank$"):
        train.fail("the same message on every rank")
    monkeypatch.setenv("RANK", "1")  # an error only this rank sees (an image of its shard) is its to print
    with pytest.raises(SystemExit, match="^train.py: error: cannot read img.jpg$"):
        train.fail("cannot read img.jpg", every_rank=True)


def test_main_leaves_the_callers_sigterm_handler_as_it_was(tmp_path):
    """In a notebook, SIGTERM must end the kernel again once a run is over, not raise KeyboardInterrupt."""

    def callers(signum, frame):  # the caller's own, so that no earlier test's leftover can pass for it
        pass

    before = signal.signal(signal.SIGTERM, callers)
    try:
        run_train(tmp_path, "--epochs", "1")
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_interrupted_run_is_continued_with_as_many_processes(tmp_path, monkeypatch):
    """The resume command in the interrupt's line starts as many processes as the run had: a checkpoint of
    N processes refuses any other count."""
    assert run_folder.launcher(1) == "python"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert run_folder.launcher(2) == "torchrun --standalone --nproc_per_node=2"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert run_folder.launcher(8).startswith("torchrun --nnodes=2 ") and run_folder.launcher(8).endswith(
        "--nproc_per_node=4"
    )
    line = run_folder.RunFolder(tmp_path).interrupted(3, 8)
    assert line.endswith(
        f"Continue with: {run_folder.launcher(8)} train.py --resume auto --output-dir {tmp_path}"
    )


def test_torchrun_a_refusal_by_rank_0_stops_every_rank_quietly(tmp_path):
    """Rank 0 alone writes the run's folder; when it cannot, the other ranks stop with it instead of going
    on to a collective that rank 0 never joins (which ended in a gloo traceback)."""
    run_train(tmp_path, "--epochs", "1")  # the folder holds a run
    result = torchrun(*TINY, "--epochs", "2", "--output-dir", str(tmp_path / "run"), timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("train.py: error: ") == 1 and "holds another run" in result.stderr
    assert "[rank1]" not in result.stderr and "Connection closed" not in result.stderr, result.stderr[-2000:]


# Never losing a run: one live run per folder, a resume writes where its run lives, atomic files


def test_a_second_run_on_a_live_folder_is_refused(tmp_path):
    """The folder's lock is held by a live process (another Python here); a run that starts there stops."""
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(60)"), str(tmp_path / "run/.lock")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            SystemExit, match="run is in use by another live run; wait for it, or choose another"
        ):
            run_train(tmp_path, "--epochs", "1")
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(tmp_path / "run") == {}
    run_train(tmp_path, "--epochs", "1")  # the lock died with its process


def test_a_new_run_never_writes_over_another_run(tmp_path):
    run_train(tmp_path, "--epochs", "1")
    before = snapshot(tmp_path / "run")
    with pytest.raises(
        SystemExit, match=r"run holds another run \(epoch 1\): continue it with --resume auto"
    ):
        run_train(tmp_path, "--epochs", "2", "--seed", "7")
    assert snapshot(tmp_path / "run") == before


def test_a_resume_by_path_writes_into_its_own_run(tmp_path):
    """Run A in one folder, run B in another; resuming B by path (no --output-dir) leaves A as it was."""
    run_train(tmp_path, "--epochs", "2", name="a")
    run_train(tmp_path, "--epochs", "1", "--seed", "7", name="b")
    a = snapshot(tmp_path / "a")
    train.main(["--resume", str(tmp_path / "b/checkpoint.pt"), "--epochs", "2"])
    assert snapshot(tmp_path / "a") == a
    assert [json.loads(x)["epoch"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(SystemExit, match="a holds another run .*, not the checkpoint's"):
        train.main(
            [
                "--resume",
                str(tmp_path / "b/checkpoint.pt"),
                "--epochs",
                "3",
                "--output-dir",
                str(tmp_path / "a"),
            ]
        )
    assert snapshot(tmp_path / "a") == a
    train.main(
        ["--resume", str(tmp_path / "b/checkpoint.pt"), "--epochs", "3", "--output-dir", str(tmp_path / "c")]
    )
    assert (
        json.loads((tmp_path / "c/metrics.jsonl").read_text())["epoch"] == 3
    )  # a fork, in a folder of its own


def test_resuming_an_older_checkpoint_into_its_folder_is_refused(tmp_path):
    run_train(tmp_path, "--epochs", "1")
    old = tmp_path / "epoch1.pt"
    old.write_bytes((tmp_path / "run/checkpoint.pt").read_bytes())
    run_train(tmp_path, "--epochs", "3", "--resume", "auto")
    history = snapshot(tmp_path / "run")
    with pytest.raises(
        SystemExit, match="holds epoch 3, newer than the checkpoint's 1: resuming would overwrite"
    ):
        run_train(tmp_path, "--epochs", "3", "--resume", str(old))
    assert snapshot(tmp_path / "run") == history


def test_a_crash_between_the_saves_leaves_every_named_file(tmp_path, monkeypatch):
    """When top-1 improves, an epoch writes two files. A crash between them must not leave a checkpoint
    that names as best an epoch whose best.pt is not on disk; and the run resumes."""
    save, evaluate, saves = run_folder.save_checkpoint, train.evaluate, []
    scores = iter(range(10, 100))
    monkeypatch.setattr(
        train, "evaluate", lambda *a, **kw: {**evaluate(*a, **kw), "val_top1": float(next(scores))}
    )

    def die_on_the_second_write_of_epoch_2(path, state):
        saves.append(state["epoch"])
        if saves.count(1) == 2:
            raise KeyboardInterrupt  # killed between the two writes of epoch 2
        save(path, state)

    monkeypatch.setattr(run_folder, "save_checkpoint", die_on_the_second_write_of_epoch_2)
    with pytest.raises(SystemExit):
        run_train(tmp_path, "--epochs", "3")
    named = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["best"]["epoch"]
    assert torch.load(tmp_path / "run/best.pt", weights_only=True)["epoch"] + 1 >= named
    monkeypatch.setattr(run_folder, "save_checkpoint", save)
    run_train(tmp_path, "--epochs", "3", "--resume", "auto")
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["epoch"] == 2


def test_a_full_disk_leaves_every_file_whole(tmp_path, monkeypatch):
    """ENOSPC half-way through a write: the run stops with one line, the previous files are byte for byte
    what they were, and no temporary file is left."""
    import errno

    run_train(tmp_path, "--epochs", "1")
    before = snapshot(tmp_path / "run")
    real_save = torch.save

    def disk_full(obj, f, *a, **kw):
        Path(f).write_bytes(b"\x00" * 100)  # a part was written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(
        SystemExit, match=r"could not write .*(best|checkpoint).pt \(OSError: .*No space left"
    ):
        run_train(tmp_path, "--epochs", "2", "--resume", "auto")
    monkeypatch.setattr(torch, "save", real_save)
    after = snapshot(tmp_path / "run")
    assert {k: v for k, v in after.items() if k != "metrics.jsonl"} == {
        k: v for k, v in before.items() if k != "metrics.jsonl"
    }
    assert not list((tmp_path / "run").glob("*.tmp"))
    run_train(tmp_path, "--epochs", "2", "--resume", "auto")  # and the run goes on from its checkpoint
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]


def test_a_metrics_line_cut_short_does_not_block_a_resume(tmp_path):
    run_train(tmp_path, "--epochs", "1")
    with open(tmp_path / "run/metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # a full disk cut the next line short
    run_train(tmp_path, "--epochs", "2", "--resume", "auto")
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]


def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="--output-dir .*file is a file; choose a folder"):
        run_train(tmp_path, "--epochs", "1", name="file")
    with pytest.raises(SystemExit, match="cannot write to --output-dir .*file/run"):
        run_train(tmp_path, "--epochs", "1", name="file/run")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("to", ["process", "group"])
def test_a_signal_ends_the_run_with_a_way_back(tmp_path, sig, to):
    """Ctrl-C (SIGINT) or a cluster's SIGTERM: exit code 130, one line naming the epoch the checkpoint holds
    and the command that continues; the checkpoint loads and the run continues from it. Sent to the whole
    process group (a terminal's Ctrl-C, a scheduler's preemption), it stops the loader workers too, and
    that is still the same one line, not a loader failure."""
    workers = ["--workers", "2"] if to == "group" else []
    command = [sys.executable, "train.py", *TINY, *workers, "--synthetic-size", "256", "--epochs", "50",
               "--output-dir", str(tmp_path / "run")]  # fmt: skip
    process = subprocess.Popen(command, cwd=Path(__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    # (a suite started in the background inherits SIGINT ignored; the run under test must not)
    deadline = time.time() + 120
    while not (tmp_path / "run/run.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch, its workers running
    os.killpg(process.pid, sig) if to == "group" else process.send_signal(
        sig
    )  # a scheduler signals the group
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    # nothing reported over the interrupt (a worker that dies mid-transfer may print a BrokenPipeError: rare)
    assert "Traceback" not in err or "BrokenPipeError" in err, err[-2000:]
    saved = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["epoch"]
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"train.py: interrupted in epoch \d+; .*run/checkpoint.pt holds epoch {saved + 1}\. "
                        rf"Continue with: python train.py --resume auto --output-dir .*run", line), line  # fmt: skip
    run_train(tmp_path, "--resume", "auto", "--epochs", str(saved + 2))
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["epoch"] == saved + 1


# The compiled path, and plain tensors from every loader


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


@pytest.mark.parametrize("device_data", ["on", "off"])
def test_every_loader_yields_plain_tensors(device_data):
    """torchvision's tv_tensors.Image must never reach the model: under dynamo (torch 2.11) it recursed
    in __torch_function__. Training and validation batches, DataLoader (with workers) and device paths."""
    args = train.parse_args([*TINY, "--device-data", device_data, "--workers", "2"])
    args.rank, args.world = 0, 1
    train_set, val_set, _ = train.build_datasets(args, 16, noise_classes=10)
    loaders = train.make_loaders(args, train_set, val_set, 16, 16, torch.device("cpu"))[:2]
    for loader in loaders:
        img, target = next(iter(loader))
        assert type(img) is torch.Tensor and type(target) is torch.Tensor and img.dtype == torch.float32


def test_compiled_training_evaluates_and_resumes(tmp_path, monkeypatch):
    """--compile end to end on the device data path, with a short last validation batch (padded to one
    shape). The suite compiles with the aot_eager backend: dynamo traces the real loop, loaders and
    model (where the torch 2.11 failure was) in seconds; inductor takes minutes on this CPU."""
    compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, **kw: compile(model, backend="aot_eager", dynamic=False)
    )
    torch._dynamo.reset()
    flags = ["--device-data", "on", "--synthetic-size", "80", "--compile", "--pe", "mpvg"]
    run_train(tmp_path, *flags, "--epochs", "1")
    run_train(tmp_path, *flags, "--epochs", "2", "--resume", "auto")
    eager = run_train(tmp_path, "--eval-only", "--resume", str(tmp_path / "run/checkpoint.pt"), "--device-data", "on",
                      "--synthetic-size", "80")  # fmt: skip
    last = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == 2 and last["val_top1"] == pytest.approx(eager["val_top1"])
    assert last["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)  # 16 images, the padding ignored


def test_evaluate_pads_a_short_batch_without_counting_the_padding():
    model = create_model(
        "deit_tiny", img_size=16, patch_size=8, dim=16, heads=2, depth=1, num_classes=3
    ).eval()
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 3, 16, 16, generator=g), torch.randint(3, (4,), generator=g)) for _ in range(2)
    ]
    batches[1] = (batches[1][0][:3], batches[1][1][:3])
    plain = train.evaluate(model, batches, torch.device("cpu"), amp=False)
    padded = train.evaluate(model, batches, torch.device("cpu"), amp=False, batch=4)
    assert plain == pytest.approx(padded)


# Fine-tuning, gradient accumulation, the built-in task


@pytest.mark.parametrize("mode", MODES)
def test_finetune_gives_a_new_head_and_a_resized_pe_in_every_mode(tmp_path, mode):
    """A 100-class, 16 px checkpoint fine-tuned to 16 classes at 24 px: every weight but the head and
    pos_embed carries over; pos_embed's patch rows are resized, its class slot kept."""
    run_train(tmp_path, "--epochs", "1", "--pe", mode, name="pre")
    pre = weights(tmp_path / "pre/checkpoint.pt")
    model = create_model("vit_lite_7_4", pe=mode, img_size=24, dim=32, depth=2, heads=2, num_classes=16)
    notes = load_pretrained(model, pre)
    assert notes[0] == "a new head for 16 classes"
    after = model.state_dict()
    for k in pre:
        if not k.startswith("head.") and k != "pos_embed":
            assert torch.equal(after[k], pre[k]), k
    cls = int(mode in ("default", "lape"))
    expected = resize_pos_embed(pre["pos_embed"][:, cls:], 6)
    torch.testing.assert_close(after["pos_embed"][:, cls:], expected)
    assert torch.equal(after["pos_embed"][:, :cls], pre["pos_embed"][:, :cls])
    train.main(["--data", "synthetic", "--synthetic-size", "64", "--img-size", "24", "--batch-size", "16",
                "--workers", "0", "--epochs", "1", "--finetune", str(tmp_path / "pre/checkpoint.pt"),
                "--output-dir", str(tmp_path / "fine")])  # fmt: skip
    cfg = torch.load(tmp_path / "fine/checkpoint.pt", weights_only=True)["model_config"]
    assert (cfg["pe"], cfg["img_size"], cfg["num_classes"], cfg["dim"]) == (
        mode,
        24,
        16,
        32,
    )  # the rest: the checkpoint's


@pytest.mark.parametrize("layout", ["timm", "deit"])
def test_finetune_from_a_timm_deit_checkpoint(tmp_path, layout):
    """timm's DeiT weights (timm saves the state dict alone, DeiT's releases under "model") into an MPVG
    model at another resolution and class count; pe_norm and norm_pe, which DeiT lacks, start new."""
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2)
    state = theirs.state_dict()
    torch.save(state if layout == "timm" else {"model": state}, tmp_path / "deit.pth")
    write_image_folder(tmp_path / "data")
    train.main(["--data", "imagenet", "--data-path", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"),
                "--model", "deit_tiny", "--img-size", "48", "--patch-size", "8", "--depth", "2", "--pe", "mpvg",
                "--batch-size", "8", "--workers", "0", "--epochs", "1", "--lr", "1e-12", "--warmup-epochs", "0",
                "--finetune", str(tmp_path / "deit.pth")])  # fmt: skip
    after = weights(tmp_path / "run/checkpoint.pt")
    torch.testing.assert_close(after["blocks.1.mlp.fc1.weight"], state["blocks.1.mlp.fc1.weight"])  # lr ~ 0
    torch.testing.assert_close(
        after["pos_embed"], resize_pos_embed(state["pos_embed"][:, 1:], 6), atol=1e-6, rtol=0
    )
    assert after["head.weight"].shape == (3, 192) and "blocks.1.pe_norm.weight" in after


def test_accumulated_micro_batches_make_exactly_the_large_step():
    """Two micro-batches of 4 give the update of one batch of 8 (float64, no BatchNorm): same loss, same
    gradients, same AdamW step."""
    torch.manual_seed(0)
    a = randomise(create_model("deit_tiny", pe="mpvg", img_size=16, patch_size=8, dim=16, heads=2, depth=2,
                               num_classes=5)).double().train()  # fmt: skip
    b = randomise(create_model("deit_tiny", pe="mpvg", img_size=16, patch_size=8, dim=16, heads=2, depth=2,
                               num_classes=5)).double().train()  # fmt: skip
    img = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    target = torch.randint(5, (8,))
    opt_a, opt_b = (torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05) for m in (a, b))
    loss_a = train.train_step(a, opt_a, [(img, target)], smoothing=0.1, amp=False)
    loss_b = train.train_step(
        b, opt_b, [(img[:4], target[:4]), (img[4:], target[4:])], smoothing=0.1, amp=False
    )
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-12)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)


def test_a_run_with_accumulation_equals_the_run_without(tmp_path):
    flags = ["--epochs", "2", *QUIET]
    run_train(tmp_path, *flags, name="whole")
    run_train(tmp_path, *flags, "--accum-steps", "2", name="accumulated")
    a, b = weights(tmp_path / "whole/checkpoint.pt"), weights(tmp_path / "accumulated/checkpoint.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_plus_signs_label_the_cell_of_the_plus_centre_and_know_their_chance():
    data = builtin_data.PlusSigns(400, img_size=32, seed=3)
    for i in range(0, 400, 7):
        img, label = data[i]
        bright = (img[0] == 255).float()
        plus = F.conv2d(bright[None, None], workshop.WhereIsThePlus.PLUS[None, None])[0, 0]
        square = F.conv2d(bright[None, None], torch.ones(1, 1, 3, 3))[0, 0]
        ys, xs = torch.nonzero((plus == 5) & (square < 9), as_tuple=True)
        assert any(
            (y + 1) * 4 // 32 * 4 + (x + 1) * 4 // 32 == label for y, x in zip(ys.tolist(), xs.tolist())
        )
    big = builtin_data.PlusSigns(20000, img_size=32, seed=4)
    assert train.chance(big, big) == pytest.approx(
        100 * 8 * 8 / 900, abs=0.5
    )  # centres 1..30: cells of 7, 8, 8, 7


def test_chance_answers_the_training_sets_commonest_class_on_the_validation_set():
    train_set, val_set = SimpleNamespace(targets=[0, 0, 1]), SimpleNamespace(targets=[1, 1, 1, 0])
    assert train.chance(train_set, val_set) == 25.0  # not 75: the validation set's own commonest is an oracle


def test_the_first_command_learns_the_built_in_task(tmp_path, capsys):
    """The README's first run, smaller (16 px, 5 epochs): well above the chance it prints, in seconds."""
    best = train.main(["--data", "synthetic", "--img-size", "16", "--synthetic-size", "2048", "--dim", "48",
                       "--depth", "4", "--heads", "3", "--epochs", "5", "--lr", "2e-3", "--workers", "0",
                       "--output-dir", str(tmp_path / "run")])  # fmt: skip
    out = capsys.readouterr().out
    chance = float(re.search(r"chance: ([\d.]+)%", out).group(1))
    assert chance < 10 and best["val_top1"] > 2.5 * chance, out


# The recipes' augmentations: timm's RandAugment from torchvision's functionals, per image and batched


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
        ("PosterizeIncreasing", 1, TF.posterize(x, 1)), ("PosterizeIncreasing", 0, TF.posterize(x, 0)),
        ("SolarizeIncreasing", 26, TF.solarize(x, 26)), ("Invert", 0, TF.invert(x)),
        ("SolarizeAdd", 99, torch.where(x < 128, (x.int() + 99).clamp(max=255), x.int()).to(torch.uint8)),
        ("AutoContrast", 0, TF.autocontrast(x)), ("Equalize", 0, TF.equalize(x)),
        ("ColorIncreasing", 0.19, TF.adjust_saturation(x, 0.19)),
        ("ContrastIncreasing", 1.81, TF.adjust_contrast(x, 1.81)),
        ("BrightnessIncreasing", 0.1, TF.adjust_brightness(x, 0.1)),
        ("SharpnessIncreasing", 1.81, TF.adjust_sharpness(x, 1.81)),
    ]  # fmt: skip

    def pil(img, name, arg):
        im, kw = Image.fromarray(img.permute(1, 2, 0).numpy()), dict(resample=Image.BILINEAR, fillcolor=fill)
        if name == "Rotate":
            return im.rotate(arg, **kw)
        matrix = {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
                  "TranslateXRel": (1, 0, arg * 32, 0, 1, 0), "TranslateYRel": (1, 0, 0, 0, 1, arg * 32)}[name]  # fmt: skip
        return im.transform(im.size, Image.AFFINE, matrix, **kw)

    geometric = [(name, arg, torch.stack([torch.from_numpy(np.array(pil(i, name, arg))).permute(2, 0, 1) for i in x]))
                 for name, arg in (("Rotate", 27.0), ("Rotate", -13.0), ("ShearX", 0.27), ("ShearY", -0.2),
                                   ("TranslateXRel", 0.3), ("TranslateYRel", -0.405))]  # fmt: skip
    for name, arg, expected in pixel_ops + geometric:
        args = torch.full((len(x),), float(arg), dtype=torch.float64)
        out = randaugment.apply_op(name, x, args, torch.zeros(len(x), dtype=torch.bool), fill)
        assert (out.int() - expected.int()).abs().max() <= 1, name
        assert (out != expected).float().mean() < 0.1, name
    one_channel = randaugment.apply_op("Rotate", x[:, :1], torch.full((3,), 20.0, dtype=torch.float64),
                                       torch.zeros(3, dtype=torch.bool), fill)  # fmt: skip
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
    by_op = lambda runs: {name: torch.tensor([a for r in runs for n, a in r if n == name], dtype=torch.float64)  # noqa: E731
                          for name in randaugment.OPS}  # fmt: skip
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
            theirs = torch.stack([
                TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32], mode) for i in range(24)
            ])  # fmt: skip
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


def device_batches(epoch: int, chunk: int = 8192):
    data = builtin_data.NoiseImages(96, 10, 32, seed=0)
    images, labels = device_data.as_tensors(data, torch.device("cpu"))
    sampler = train.EpochSampler(data, num_replicas=1, rank=0, seed=0)
    sampler.set_epoch(epoch)
    augment = device_data.BatchAugment(cifar_args(), 32)
    return list(device_data.DeviceLoader(images, labels, sampler, 16, augment, seed=0, chunk=chunk))


def test_the_device_loader_draws_anew_for_each_batch_and_epoch_and_repeats_an_epoch():
    first, again, second = device_batches(0), device_batches(0), device_batches(1)
    assert len(first) == 6 and all(type(x) is torch.Tensor and x.shape == (16, 3, 32, 32) for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(
        builtin_data.NoiseImages(96, 10, 32, 0).targets
    )
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, second))  # another epoch, another draw
    data = builtin_data.NoiseImages(32, 10, 32, seed=0)
    same_order = [[(i, epoch, 0) for i in range(32)] for epoch in (0, 1)]  # the same images in the same order
    images, labels = device_data.as_tensors(data, torch.device("cpu"))
    augment = device_data.BatchAugment(cifar_args(), 32)
    a, b = (torch.cat([x for x, _ in device_data.DeviceLoader(images, labels, keys, 16, augment, seed=0)])
            for keys in same_order)  # fmt: skip
    assert not any(torch.equal(u, v) for u, v in zip(a, b))  # each image drawn anew in the next epoch
    outputs = torch.cat([x for x, _ in first])
    assert len({hash(o.numpy().tobytes()) for o in outputs}) == 96  # every image, batch after batch, its own
    small = device_batches(0, chunk=32)  # chunks of two batches: the same batches in the same order
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, small))


def test_train_with_the_batched_device_data_path(tmp_path):
    """--device-data on a CPU: training and validation through DeviceLoader, every val image counted."""
    best = run_train(tmp_path, "--epochs", "1", "--device-data", "on", "--synthetic-size", "80")
    line = json.loads((tmp_path / "run/metrics.jsonl").read_text())
    assert math.isfinite(line["train_loss"]) and math.isfinite(line["val_loss"]) and best["epoch"] == 1
    assert line["val_loss"] > 1.0  # an empty validation would report 0
    assert line["val_top1"] * 16 / 100 == pytest.approx(round(line["val_top1"] * 16 / 100))  # 16 val images


def test_repeated_augmentation_puts_the_copies_of_an_image_in_one_step():
    """DeiT's RASampler: at 4 ranks with 16 images per rank, nearly every image's 3 copies fall in the same
    global step (DeiT: 97%); on one process, in the same batch. An epoch has len(dataset) samples."""
    data = builtin_data.NoiseImages(960, 10, 8, seed=0)

    def share_in_one_step(world, per_rank):
        steps = {}
        for rank in range(world):
            for position, (index, _epoch, _copy) in enumerate(
                train.EpochSampler(data, world, rank, seed=0, repeats=3)
            ):
                steps.setdefault(index, set()).add(position // per_rank)
        whole = [s for i, s in steps.items() if len(s) == 1]
        return len(whole) / len(steps), sum(1 for _ in steps)

    four, _ = share_in_one_step(4, 16)
    one, images = share_in_one_step(1, 64)
    assert four > 0.95 and one > 0.95 and images == 320  # 960 samples: 320 images, 3 copies each


def test_repeated_augmentation_gives_each_copy_its_own_augmentation():
    data = builtin_data.NoiseImages(30, 10, 32, seed=0)
    keys = [k for rank in range(3) for k in train.EpochSampler(data, 3, rank, seed=0, repeats=3)]
    assert len(keys) == 30
    by_image = {}
    for index, _epoch, copy in keys:
        by_image.setdefault(index, set()).add(copy)
    assert all(copies == {0, 1, 2} for copies in by_image.values())
    transform, _ = train.build_transforms(cifar_args(), 32)
    augmented = train.Augmented(data, transform, seed=0)
    copies = [augmented[(5, 0, c)][0] for c in range(3)]
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])
    assert torch.equal(augmented[(5, 0, 1)][0], copies[1])  # and each is reproducible
    args = train.parse_args(["--data", "noise", "--recipe", "deit"])
    args.rank, args.world = 0, 1
    _, _, sampler = train.make_loaders(args, data, data, 32, 6, torch.device("cpu"))
    assert sampler.repeats == 3  # on one process too, as DeiT's main.py


# tools/: the benchmark, the paper's analysis, the workshop


def test_benchmark_compares_each_mode_with_default_pooled_alike(capsys, monkeypatch):
    """Each row's step is made to take a known time on a clock the test advances (hours, so the real
    time on top is noise well under 1%, however busy the CPU): the benchmark's seconds, rates and
    comparisons can then be checked exactly."""
    costs = {("default", "cls"): 1e4, ("default", "gap"): 2e4, ("lape", "cls"): 3e4, ("pvg", "gap"): 4e4,
             ("mpvg", "gap"): 5e4, None: 5e3}  # fmt: skip
    clock = [0.0]

    def timed_step(model, *args, **kwargs):
        train.train_step(model, *args, **kwargs)
        cfg = getattr(model, "cfg", None)  # timm's twins have none
        clock[0] += costs[(cfg.pe, cfg.pool) if cfg else None]

    monkeypatch.setattr(benchmark, "train_step", timed_step)
    monkeypatch.setattr(
        benchmark, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + clock[0])
    )
    flags = TINY[:-2]  # without --log-every: there is no training loop here
    rows = benchmark.main([*flags, "--bench-steps", "2", "--bench-rounds", "1", "--bench-warmup", "2"])
    names = ["default (cls)", "default (gap)", "lape (cls)", "pvg (gap)", "mpvg (gap)"]
    assert {f"mpvg.py {n}" for n in names} | {"data loader"} <= set(rows)
    cfg = dict(
        img_size=16, patch_size=4, dim=32, depth=2, heads=2, num_classes=100, mlp_ratio=2.0, qkv_bias=False
    )
    for name in names:  # each row is that mode with that pooling, not one model five times
        mode, pool = name[:-6], name[-4:-1]
        row = rows[f"mpvg.py {name}"]
        assert row["params"] == count(create_model("vit_lite_7_4", pe=mode, pool=pool, **cfg))
        seconds = costs[(mode, pool)]
        assert row["first_step_s"] == pytest.approx(seconds, rel=0.01)  # the first step alone, in s
        assert row["ms_per_step"] == pytest.approx(1e3 * seconds, rel=0.01)  # per step, not per round
        assert row["images_per_sec"] == pytest.approx(16 / seconds, rel=0.01)
    out = capsys.readouterr().out
    assert "1st step s" in out and "vs default" in out and "data loader alone" in out
    table = {line.split("  ")[0]: line.split() for line in out.splitlines() if line.startswith("mpvg.py")}
    assert table["mpvg.py pvg (gap)"][-1] == "0.500"  # vs default (gap): pooled alike
    assert table["mpvg.py lape (cls)"][-1] == "0.333"  # vs default (cls)
    if "timm ViT (gap)" in rows:
        assert table["mpvg.py mpvg (gap)"][-2] == "0.100"  # vs timm pooled alike


@pytest.mark.parametrize(
    "flags, rows",
    [
        (["--pool", "cls"], ["default (cls)", "lape (cls)", "pvg (cls)"]),  # MPVG has no cls form
        (["--pool", "gap"], ["default (gap)", "lape (gap)", "pvg (gap)", "mpvg (gap)"]),
        (["--pe", "lape"], ["lape (cls)"]),
        (["--pe", "pvg", "--pool", "cls"], ["pvg (cls)"]),
        (["--last-pe", "1"], ["pvg (gap)", "mpvg (gap)"]),  # a knob narrows to the modes that take it
    ],
)
def test_benchmark_pe_and_pool_narrow_the_rows(flags, rows):
    args = benchmark.parse_args([*TINY[:-2], *flags])
    assert list(benchmark.configurations(args, benchmark.base_config(args))) == rows


def test_flops_count_matches_a_hand_count():
    """DeiT-S forward: 4.6 GFLOPs as usually quoted (fvcore counts a multiply-add as one: 4.6 GMACs)."""
    cfg = create_model("deit_small").cfg
    assert benchmark.flops_per_image(cfg) / 2 == pytest.approx(4.6e9, rel=0.01)


@given(st.integers(2, 50), st.floats(0.1, 10), st.floats(-5, 5), st.integers(0, 2**16))
def test_pearson_of_a_tensor_with_itself_its_negation_and_an_affine_copy(n, scale, shift, seed):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    assert pearson(x, x) == pytest.approx(1.0, abs=1e-9)
    assert pearson(x, -x) == pytest.approx(-1.0, abs=1e-9)
    assert pearson(x, scale * x + shift) == pytest.approx(1.0, abs=1e-6)


@given(st.integers(3, 60), st.integers(0, 2**16), st.floats(-0.9, 0.9))
def test_pearson_equals_its_textbook_formula_on_correlated_data(n, seed, rho):
    """r = cov(a, b) / (sd(a) sd(b)), written with plain sums, on data of a chosen correlation."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2, generator=g, dtype=torch.float64)
    b = rho * a + math.sqrt(1 - rho**2) * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x, y = a.flatten().tolist(), b.flatten().tolist()
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((u - mx) * (v - my) for u, v in zip(x, y))
    r = cov / math.sqrt(sum((u - mx) ** 2 for u in x) * sum((v - my) ** 2 for v in y))
    assert pearson(a, b) == pytest.approx(r, abs=1e-9)


@given(configs(), st.integers(1, 3))
def test_analysis_reads_what_the_forward_computes(kw, batch):
    """Figs. 2, 4, 7 and the Appendix's statistics, each against an independent computation: forward hooks
    (another path than the trace) for the tokens and PE, and F.layer_norm from the parameters for the
    Last LN's output and Eq. (11), on a model whose every parameter is random."""
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
    ln = lambda t, m: F.layer_norm(t, (cfg.dim,), m.weight, m.bias, cfg.norm_eps)  # noqa: E731
    after = ln(before, model.norm)
    if cfg.last_pe is not None:  # Eq. (11), the PE pos_k through its own LayerNorm
        pos_k = model.pos_embed if cfg.last_pe == 0 else seen[f"pe.{cfg.last_pe}"][1]
        after = after + ln(pos_k, model.norm_pe)
    pool = (lambda t: t[:, 0]) if cfg.pool == "cls" else (lambda t: t.mean(1))
    cosine = F.cosine_similarity(pool(before).mean(0), pool(after).mean(0), dim=0).detach()
    assert stats["last_ln"]["cosine"] == pytest.approx(cosine.item(), abs=1e-9)
    assert stats["last_ln"]["beta_var"] == pytest.approx(
        ((model.norm.bias - model.norm.bias.mean()) ** 2).mean().item()
    )
    assert stats["last_ln"]["gamma_var"] == pytest.approx(
        ((model.norm.weight - model.norm.weight.mean()) ** 2).mean().item()
    )
    assert stats["last_ln"]["beta_var"] > 0  # random parameters: the fresh LayerNorm's 0 cannot pass
    g = cfg.img_size // cfg.patch_size
    n = g * g
    torch.testing.assert_close(stats["fig7_norms_pre"], before[:, -n:].norm(dim=-1).reshape(batch, g, g))
    torch.testing.assert_close(stats["fig7_norms_post"], after[:, -n:].norm(dim=-1).reshape(batch, g, g))


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
    analyze.main([*tiny, "--pe", "lape", "--analyze-images", "8", "--output-dir", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again/analysis.json").read_text())
    assert again["fig4_correlation"] == report["fig4_correlation"]  # a new model is seeded: the same figures


def test_analyze_names_a_checkpoint_by_its_run(tmp_path, capsys):
    """Figures name the run and epoch they show, not a path of the machine that made them."""
    run_train(tmp_path, "--epochs", "1", "--pe", "mpvg", name="mpvg_run")
    capsys.readouterr()
    analyze.main([str(tmp_path / "mpvg_run/best.pt"), "--data", "noise", "--analyze-images", "4",
                  "--output-dir", str(tmp_path / "figures")])  # fmt: skip
    report = json.loads((tmp_path / "figures/analysis.json").read_text())
    assert report["source"] == "mpvg_run/best.pt (epoch 1)"
    assert capsys.readouterr().out.startswith("analysis of mpvg_run/best.pt (epoch 1) over 4 noise images")


def test_analyze_takes_a_checkpoints_data_recipe_and_seed_unless_given(tmp_path):
    """As --eval-only does: else a run's own training images could be analysed as validation images."""
    run_train(tmp_path, "--epochs", "1", "--seed", "3", "--synthetic-size", "48", "--recipe", "deit")
    ckpt = str(tmp_path / "run/best.pt")
    args = analyze.parse_args([ckpt])
    assert (args.data, args.synthetic_size, args.seed, args.recipe) == ("noise", 48, 3, "deit")
    assert (args.mean, args.eval_crop) == (train.IMAGENET_MEAN, 0.875)  # the recipe's evaluation transform
    assert analyze.parse_args([ckpt, "--seed", "5", "--data", "synthetic"]).seed == 5  # given: as given


def test_workshop_learns_where_the_plus_is_only_with_pe(capsys):
    """A short workshop of two of its models: without PE a GAP model stays near the commonest-cell rate it
    cannot beat; with PVG's PE it learns well above it. Each row is its own model."""
    models = [("none", "gap"), ("pvg", "gap")]
    rows = workshop.workshop(workshop.parse_args([]), torch.device("cpu"), epochs=4, train_size=2048, val_size=512,
                             models=models)  # fmt: skip
    table = {(r["pe"], r["pool"]): r for r in rows}
    assert list(table) == models
    assert table[("none", "gap")]["top1"] < 14 and table[("pvg", "gap")]["top1"] > 25, rows
    for (pe, pool), r in table.items():
        cfg = dict(
            img_size=16, patch_size=4, num_classes=16, dim=48, depth=4, heads=3, mlp_ratio=2.0, pool=pool
        )
        assert r["params"] == count(create_model("deit_tiny", pe=pe, **cfg))
    assert "top-1" in capsys.readouterr().out


def test_where_is_the_plus_labels_the_cell_of_the_plus_centre():
    data = workshop.WhereIsThePlus(64, seed=3)
    for img, label in (data[i] for i in range(64)):
        bright = (img[0] * 0.5 + 0.75) > 1.0  # the marks add 1 to noise below 0.5
        plus = F.conv2d(bright[None, None].float(), workshop.WhereIsThePlus.PLUS[None, None])[0, 0]
        square = F.conv2d(bright[None, None].float(), torch.ones(1, 1, 3, 3))[0, 0]
        ys, xs = torch.nonzero((plus == 5) & (square < 9), as_tuple=True)
        assert any((y + 1) // 4 * 4 + (x + 1) // 4 == label for y, x in zip(ys.tolist(), xs.tolist()))


def test_where_is_the_plus_commonest_cell_holds_8_percent():
    """The README's bar for a position-blind model: centres uniform over 1..14 make (4/14)^2 = 8.2%."""
    counts = torch.bincount(workshop.WhereIsThePlus(8000, seed=4).labels, minlength=16).double() / 8000
    assert counts.max() == pytest.approx(16 / 196, abs=0.01) and counts.min() == pytest.approx(
        9 / 196, abs=0.01
    )


# The README: its code runs and its commands parse


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    """The README's Python is code a reader will paste: every block must run as printed (the one that
    reloads a checkpoint, from a checkpoint made here at the path it names)."""
    readme = (Path(__file__).parent / "README.md").read_text()
    snippets = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    assert len(snippets) >= 2
    run_train(tmp_path, "--epochs", "1", "--pe", "mpvg", name="runs/vit_lite_mpvg")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for snippet in snippets:
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
    assert set(parsers) <= {script for script, _ in commands}  # every script is documented
    for script, argv in commands:
        assert script in parsers or (Path(__file__).parent / script).is_file(), script
        if script not in parsers:
            continue
        if "--help" in argv:
            with pytest.raises(SystemExit) as printed_help:
                parsers[script]().parse_args(argv)
            assert printed_help.value.code == 0
        else:
            parsers[script]().parse_args(argv)  # exits with argparse's message on an unknown flag or value


@pytest.mark.parametrize("n, world", [(64, 1), (67, 3), (10, 4)])
def test_one_copy_per_image_is_torchs_distributed_sampler(n, world):
    """repeats = 1: the order torch's DistributedSampler (shuffle, drop_last) gives, on every rank and epoch."""
    data = builtin_data.NoiseImages(n, 2, 4, seed=0)
    for rank in range(world):
        ours, theirs = (
            train.EpochSampler(data, world, rank, seed=5),
            torch.utils.data.DistributedSampler(
                data, num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=True
            ),
        )
        for epoch in (0, 3):
            ours.set_epoch(epoch), theirs.set_epoch(epoch)
            assert [k[0] for k in ours] == list(theirs) and {k[1:] for k in ours} == {(epoch, 0)}


def test_mixing_pairs_each_image_with_its_mirror_as_timm():
    """Batch-mode Mixup/CutMix: image i is mixed with image B-1-i (so repeated copies, side by side, are not
    mixed with each other), Mixup is lam x + (1 - lam) x.flip(0), CutMix pastes one box and its lam is the
    part of the image left, and the targets carry the same lam."""
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 0, 0, 1, 1, 1])  # two images, three copies each, as the sampler deals them
    torch.manual_seed(0)
    mixed, target = mixing.Mixing(0.8, 0.0, 4)(x, y)
    lam = float(target[0, 0])
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    assert (target[:3, 1] > 0).all() and torch.allclose(
        target.sum(1), torch.ones(6)
    )  # copies mixed with the other image
    torch.manual_seed(1)
    mixed, target = mixing.Mixing(0.0, 1.0, 4)(x, y)
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
        lams.append(float(mixing.Mixing(0.8, 0.0, 4)(x, y)[1][0, 0]))
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


def test_flags_are_never_abbreviated(capsys):
    """Scripts name flags in full: a prefix that picks one flag today picks none, or another, once flags
    are added."""
    with pytest.raises(SystemExit):
        train.parse_args(["--epoch", "5"])
    assert "unrecognized arguments: --epoch" in capsys.readouterr().err


def test_help_names_every_flag_that_a_resume_does_not_take_from_the_checkpoint():
    parser = train.build_parser()
    named = set(re.findall(r"--[\w-]+", parser.description.split("except", 1)[1]))
    taken = train.INHERITED | {"model", *train.MODEL_FLAGS}  # the model flags: through model_config
    aside = {"help", "resume", "finetune", "eval_only", "output_dir"}  # the resume itself, and its folder
    for action in parser._actions:
        if action.dest not in aside:
            assert (action.dest in taken) != (action.option_strings[0] in named), action.dest


def test_a_fork_is_a_run_of_its_own(tmp_path):
    """Resuming into an empty folder forks the run: a new id, so the fork can never be resumed over the
    original later, however many epochs ahead it is; and a best of its own, whose best.pt is in its folder."""
    run_train(tmp_path, "--epochs", "1", name="orig")
    train.main(
        [
            "--resume",
            str(tmp_path / "orig/checkpoint.pt"),
            "--epochs",
            "3",
            "--output-dir",
            str(tmp_path / "fork"),
        ]
    )
    ids = [json.loads((tmp_path / f"{name}/run.json").read_text())["run_id"] for name in ("orig", "fork")]
    assert ids[0] != ids[1]
    best = torch.load(tmp_path / "fork/checkpoint.pt", weights_only=True)["best"]  # among the fork's epochs
    assert torch.load(tmp_path / "fork/best.pt", weights_only=True)["epoch"] + 1 == best["epoch"] >= 2
    orig = snapshot(tmp_path / "orig")
    with pytest.raises(SystemExit, match="orig holds another run .*, not the checkpoint's"):
        train.main(
            [
                "--resume",
                str(tmp_path / "fork/checkpoint.pt"),
                "--epochs",
                "4",
                "--output-dir",
                str(tmp_path / "orig"),
            ]
        )
    assert snapshot(tmp_path / "orig") == orig


def test_speed_md_gathers_the_stages_of_several_calls_each_with_its_own_machine(tmp_path, monkeypatch):
    """speed.py is run a few stages at a time (a lease each): speed.md holds every stage's figures so far,
    each row saying when, on what and with which torch it ran; a stage run again replaces its figures."""

    def stage(name, rate=None):  # a stand-in for a benchmark run: writes its JSON, or fails
        rows = {"mpvg.py mpvg (gap)": dict(images_per_sec=rate, ms_per_step=2.0, first_step_s=0.5)}
        code = f"open({str(tmp_path / name)!r} + '.json', 'w').write({json.dumps(dict(rows=rows))!r})"
        # while it runs, stages.json no longer claims its older run: a lease ending now leaves no false row
        unclaimed = f"import json; assert {name!r} not in json.load(open({str(tmp_path / 'stages.json')!r}))"
        return [(name, [sys.executable, "-c", f"{unclaimed}; {code}" if rate else "raise SystemExit(3)"], 60)]

    plan = {"a": stage("a", 111.0), "b": stage("b", 222.0), "c": stage("c")}
    monkeypatch.setattr(speed, "stages", lambda quick, out, cores: plan)
    monkeypatch.setattr(
        speed, "machine", lambda: dict(date="2026-01-01 10:00", device="GPU one", torch="2.11")
    )
    speed.main(["--out", str(tmp_path), "--stages", "a,b"])
    monkeypatch.setattr(
        speed, "machine", lambda: dict(date="2026-01-02 11:00", device="GPU two", torch="2.14")
    )
    plan["b"] = stage("b", 333.0)
    speed.main(["--out", str(tmp_path), "--stages", "b,c"])
    md = (tmp_path / "speed.md").read_text()
    assert re.search(r"^\| a \| 2026-01-01 10:00 \| GPU one \| 2.11 \| \d+ \| ok \|$", md, re.M)
    assert re.search(r"^\| b \| 2026-01-02 11:00 \| GPU two \| 2.14 \| \d+ \| ok \|$", md, re.M)
    assert re.search(r"^\| c \| 2026-01-02 11:00 \| GPU two \| 2.14 \| \d+ \| failed \(exit 3", md, re.M)
    figures = re.findall(r"^## (\w+)\n\n.*\n.*\n\| mpvg.py mpvg \(gap\) \| ([\d.]+) \|", md, re.M)
    assert figures == [("a", "111.0"), ("b", "333.0")]  # b's first figures replaced; c wrote none
    plan["a"] = stage("a")  # a rerun that fails: its good figures are kept aside, not gathered
    speed.main(["--out", str(tmp_path), "--stages", "a"])
    assert (
        json.loads((tmp_path / "previous/a.json").read_text())["rows"]["mpvg.py mpvg (gap)"]["images_per_sec"]
        == 111
    )
    assert "## a" not in (tmp_path / "speed.md").read_text()
    for stages, message in (("a,,b", "unknown stage.s. '' in --stages 'a,,b'"), ("", "unknown stage.s. ''")):
        with pytest.raises(SystemExit, match=f"^speed.py: error: {message}"):
            speed.main(["--out", str(tmp_path), "--stages", stages])
    (tmp_path / "stages.json").write_text('{"a": ')  # cut short
    with pytest.raises(SystemExit, match="stages.json is unreadable: move it away"):
        speed.main(["--out", str(tmp_path), "--stages", "a"])
    with pytest.raises(SystemExit, match="cannot use --out .*speed.md .NotADirectoryError"):
        speed.main(["--out", str(tmp_path / "speed.md"), "--stages", "a"])


def test_the_tools_refuse_bad_input_in_one_line(tmp_path, monkeypatch):
    script = [sys.executable, "tools/benchmark.py", "--bench-rounds", "0"]
    result = subprocess.run(script, cwd=Path(__file__).parent, capture_output=True, text=True)
    assert result.stderr == "benchmark.py: error: --bench-rounds must be in [1, inf), got 0\n"  # its own name
    with pytest.raises(SystemExit, match="--profile names no row: choose one of 'mpvg.py default \\(cls\\)'"):
        benchmark.parse_args([*TINY[:-2], "--profile", "mpvg.py nothing"])
    with pytest.raises(SystemExit, match=r"--analyze-images must be in \[1, inf\), got 0$"):
        analyze.parse_args(["--analyze-images", "0"])
    with pytest.raises(
        SystemExit, match="--pe, --dim build a new model, but .*odd.pt is analysed as it was trained"
    ):
        analyze.parse_args([str(tmp_path / "odd.pt"), "--pe", "lape", "--dim", "16"])  # not silently ignored
    with pytest.raises(SystemExit, match=r"--bench-rounds must be in \[1, inf\), got -2$"):
        benchmark.parse_args([*TINY[:-2], "--bench-rounds", "-2"])
    with pytest.raises(SystemExit, match=r"--seed must be in \[0, 4294967296\), got 18446744073709551616$"):
        workshop.parse_args(["--seed", str(2**64)])
    with pytest.raises(SystemExit, match=r"--peak-tflops must be in \(0, inf\), got 0.0$"):
        benchmark.parse_args(["--peak-tflops", "0"])
    with pytest.raises(
        SystemExit, match=r"--json .*nowhere/b.json cannot be written"
    ):  # checked before the work
        benchmark.parse_args(["--json", str(tmp_path / "nowhere/b.json")])
    with pytest.raises(SystemExit, match="--batch-size 64 is too large for 16 training images"):
        benchmark.main([*TINY[:-2], "--synthetic-size", "16", "--batch-size", "64", "--loader-only"])
    monkeypatch.setattr(benchmark, "train_step", lambda *a, **k: pytest.fail("a model ran before the data"))
    with pytest.raises(SystemExit, match="--data imagenet expects .*nothing/train/"):
        benchmark.main([*TINY[:-2], "--data", "imagenet", "--data-path", str(tmp_path / "nothing")])
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(SystemExit, match="cannot write --output-dir .*afile .FileExistsError"):
        analyze.main(["--data", "noise", "--synthetic-size", "16", "--output-dir", str(tmp_path / "afile")])
    assert (tmp_path / "afile").read_text() == "keep me"
    write_image_folder(tmp_path / "data", n_train=1, n_val=2, classes=("cat",))
    (tmp_path / "data/val/cat/1.jpg").write_text("not a jpeg")
    with pytest.raises(
        SystemExit, match=r"cannot read .*val/cat/1.jpg \(UnidentifiedImageError.*delete or replace"
    ):
        analyze.main(
            ["--data", "imagenet", "--data-path", str(tmp_path / "data"), "--output-dir", str(tmp_path)]
        )
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "odd.pt")
    with pytest.raises(SystemExit, match="odd.pt holds no weights that this project can read"):
        run_train(tmp_path, "--finetune", str(tmp_path / "odd.pt"))


@given(st.integers(2, 6), st.floats(0.0, 0.3), st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_the_loss_smooths_mixed_targets_as_timm(classes, smoothing, lam, seed):
    """Label smoothing of Mixup/CutMix targets, as timm's mixup_target: each one-hot target smoothed to
    (1 - s) + s / C and s / C, then mixed with lam; and a one-hot soft target gives the hard-label loss."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, classes, generator=g, dtype=torch.float64)
    y = torch.randint(classes, (4,), generator=g)
    smooth = lambda t: F.one_hot(t, classes).double() * (1 - smoothing) + smoothing / classes  # noqa: E731
    expected = -(lam * smooth(y) + (1 - lam) * smooth(y.flip(0))) * F.log_softmax(logits, dim=-1)
    mixed = F.one_hot(y, classes).double() * lam + F.one_hot(y.flip(0), classes).double() * (1 - lam)
    loss = train.soft_cross_entropy(logits, mixed, smoothing)
    assert float(loss) == pytest.approx(float(expected.sum(-1).mean()), rel=1e-6)  # the loss is float32
    hard = train.soft_cross_entropy(logits, y, smoothing)
    assert float(
        train.soft_cross_entropy(logits, F.one_hot(y, classes).double(), smoothing)
    ) == pytest.approx(float(hard))
