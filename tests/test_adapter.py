"""dense/adapter.py: ViT-Adapter-Ti on mpvg.py's ViT, the backbone of the paper's Tables 3-4.

Checked: the deformable attention against a bilinear loop written here and by gradcheck; the module's
offsets in cells of each level; window attention against a loop over windows; the four maps' shapes at
non-square sizes in every PE mode, every parameter read; at init (gamma = 0) the ViT inside runs as
mpvg.py's forward_features; MPVG's dense output is PVG's plus a per-token term; the parameter count of
ViT-Adapter-T; train.py's and timm's checkpoints load, and the notes name what was not used."""

import copy
import math

import pytest
import torch
from conftest import run_train
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

import mpvg
from dense.adapter import GridAttention, MSDeformAttn, ViTAdapter, build_adapter, deform_attn, load_backbone

MODES = ["default", "lape", "pvg", "mpvg"]
TINY_VIT = dict(dim=24, heads=2, depth=4, img_size=64)  # a 4 x 4 grid of tokens at img_size
TINY = dict(**TINY_VIT, conv_width=8, window=4)


def tiny(pe="mpvg", window_attn=False, **kw):
    return build_adapter(pe, window_attn, **{**TINY, **kw})


def randomise(module, seed=0, keep=()):
    """Every parameter random (norm weights near 1), but those whose name contains a word of `keep`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not any(k in name for k in keep):
                noise = 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)
                p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return module


def images(b, h, w, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# Multi-scale deformable attention


def bilinear_loop(value, shapes, locations, weights):
    """Deformable DETR's sampling spelled out: each sample at pixel (x w - 1/2, y h - 1/2) of its level, its
    four neighbours weighted bilinearly, a neighbour outside the level reading 0."""
    B, Q, M, L, P, _ = locations.shape
    d, starts = value.shape[-1], [sum(h * w for h, w in shapes[:l]) for l in range(L)]
    out = torch.zeros(B, Q, M, d, dtype=value.dtype)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for l, (h, w) in enumerate(shapes):
                    for p in range(P):
                        x = locations[b, q, m, l, p, 0].item() * w - 0.5
                        y = locations[b, q, m, l, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yi, xi in [(y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)]:
                            if 0 <= yi < h and 0 <= xi < w:
                                share = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                v = value[b, starts[l] + yi * w + xi, m]
                                out[b, q, m] += weights[b, q, m, l, p] * share * v
    return rearrange(out, "b q m d -> b q (m d)")


@st.composite
def sampling(draw, dtype=torch.float64):
    b, q, m, d, p = (draw(st.integers(1, n)) for n in (2, 4, 2, 3, 3))
    shapes = draw(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    value = torch.randn(b, sum(h * w for h, w in shapes), m, d, generator=g, dtype=dtype)
    locations = torch.rand(b, q, m, len(shapes), p, 2, generator=g, dtype=dtype) * 1.4 - 0.2  # some outside
    weights = torch.rand(b, q, m, len(shapes), p, generator=g, dtype=dtype)
    return value, shapes, locations, weights


@given(sampling())
def test_deform_attn_equals_a_bilinear_loop(args):
    """The grid_sample path computes Deformable DETR's sampling: bilinear at pixel centres, zeros outside."""
    torch.testing.assert_close(deform_attn(*args), bilinear_loop(*args), rtol=1e-12, atol=1e-12)


def test_deform_attn_gradients_pass_gradcheck():
    """Its gradients in value, locations and weights are the derivatives (float64, finite differences)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(2, 16, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    locations = (0.1 + 0.8 * torch.rand(2, 5, 2, 2, 2, 2, generator=g, dtype=torch.float64)).requires_grad_()
    weights = torch.rand(2, 5, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, x, w: deform_attn(v, shapes, x, w), (value, locations, weights))


def test_deform_attn_module_offsets_are_in_cells_of_each_level():
    """MSDeformAttn: an offset of (1, 0) reads the cell to the right and (0, 1) the cell below, whatever the
    level's h and w (the offsets are divided by the level's w and h, not the other way round)."""
    dim = 4
    attn = MSDeformAttn(dim, levels=1, heads=1, points=1).double()
    with torch.no_grad():
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(dim))
            proj.bias.zero_()
    cells = [(0, 0), (0, 1)]
    for (h, w), (dx, dy) in [((2, 3), (1, 0)), ((2, 3), (0, 1)), ((3, 5), (1, 0)), ((3, 5), (0, 1))]:
        with torch.no_grad():
            attn.sampling_offsets.bias.copy_(torch.tensor([dx, dy]))
        feat = torch.randn(1, h * w, dim, dtype=torch.float64)
        reference = torch.tensor([[[(0.5 + j) / w, (0.5 + i) / h] for i, j in cells]], dtype=torch.float64)
        out = attn(torch.randn(1, 2, dim, dtype=torch.float64), reference, feat, [(h, w)])
        expected = torch.stack([feat[0, (i + dy) * w + j + dx] for i, j in cells])
        torch.testing.assert_close(out[0], expected, rtol=1e-12, atol=1e-12)


def window_loop(attn: GridAttention, x: torch.Tensor) -> torch.Tensor:
    """ViT-Adapter's window attention spelled out: q, k, v of each window's real tokens, the window filled
    with zero q, k, v up to window x window, a plain softmax over all of them."""
    b, h, w, dim = x.shape
    s, heads, d = attn.window, attn.heads, dim // attn.heads
    qkv, out = attn.qkv(x), torch.zeros(b, h, w, dim, dtype=x.dtype)
    for i in range(0, h, s):
        for j in range(0, w, s):
            full = torch.zeros(b, s, s, 3 * dim, dtype=x.dtype)
            real = qkv[:, i : i + s, j : j + s]
            full[:, : real.shape[1], : real.shape[2]] = real
            q, k, v = rearrange(full, "b y x (t m d) -> t b m (y x) d", t=3, m=heads)
            o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
            o = rearrange(o, "b m (y x) d -> b y x (m d)", y=s)
            out[:, i : i + s, j : j + s] = o[:, : real.shape[1], : real.shape[2]]
    return attn.gamma * attn.proj(out)


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (3, 2)])
def test_window_attention_is_a_loop_over_zero_padded_windows(grid):
    """The detection config's window attention (4 x 4 windows here), padded as ViT-Adapter pads."""
    vit = mpvg.create_model("deit_tiny", dim=8, heads=2, depth=1)
    attn = randomise(GridAttention(vit.blocks[0].attn, window=4, layer_scale=True)).double()
    x = torch.randn(2, *grid, 8, dtype=torch.float64)
    torch.testing.assert_close(attn(x), window_loop(attn, x), rtol=1e-10, atol=1e-12)


# Shapes, modes, gradients


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window_attn", [False, True])
def test_four_maps_at_non_square_sizes_and_every_parameter_read(mode, window_attn):
    """The interface of dense/: (B, 3, H, W), any H and W that 32 divides -> four maps of width D at 1/4,
    1/8, 1/16, 1/32; every parameter gets a gradient (so DDP needs no find_unused_parameters)."""
    adapter = randomise(tiny(mode, window_attn))
    for h, w in [(64, 96), (96, 32)]:
        maps = adapter(images(2, h, w).float())
        assert [tuple(m.shape) for m in maps] == [(2, 24, h // s, w // s) for s in (4, 8, 16, 32)]
    adapter.zero_grad()
    sum(m.square().mean() for m in maps).backward()
    assert [n for n, p in adapter.named_parameters() if p.grad is None] == []
    assert adapter.out_channels == 24


def test_segmentations_readout_adds_each_interactions_tokens_to_its_level():
    """add_vit_feature: "last" (detection's code) adds the tokens after the last block to all four levels,
    "each" (segmentation's) the tokens after interaction i to level i: with the same weights the two agree
    on the 1/32 level, which both give the last tokens, and differ on the other three."""
    last = randomise(tiny("mpvg")).double().eval()
    each = tiny("mpvg", add_vit_feature="each").double().eval()
    each.load_state_dict(last.state_dict())
    img = images(1, 64, 96)
    with torch.no_grad():
        a, b = last(img), each(img)
    assert [torch.equal(x, y) for x, y in zip(a, b)] == [False, False, False, True]


@pytest.mark.parametrize("shape", [(1, 3, 64, 80), (1, 3, 48, 64), (1, 1, 64, 64), (3, 64, 64)])
def test_a_size_that_32_does_not_divide_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\), H and W multiples of 32"):
        tiny()(torch.zeros(shape))


# At the classification grid, the ViT inside runs as mpvg.py's


@pytest.mark.parametrize("mode", ["default", "lape", "pvg", "mpvg", "none"])
@pytest.mark.parametrize("window_attn", [False, True])
def test_at_init_the_vit_inside_is_forward_features(mode, window_attn):
    """With the injectors' gamma at 0 (ViT-Adapter's init) and a GAP model at its img_size, the tokens after
    the last block, x_{L+1}, are forward_features' pre_norm (to float64 rounding; windows of 4 cover the 4 x 4
    grid); last_pe_at="last_ln" gives its output y, Eq. (11) included, and "tokens" x_{L+1} + LN(pos_0).
    (A class token, set aside by the adapter, is the one difference: the class-token modes run with GAP.)"""
    vit = randomise(mpvg.create_model("deit_tiny", **{**TINY_VIT, "pe": mode, "pool": "gap"})).double().eval()
    img, trace = images(2, 64, 64), {}
    y = copy.deepcopy(vit).forward_features(img, trace)
    grid = lambda t: rearrange(t, "b (h w) d -> b h w d", h=4)  # noqa: E731
    for last_pe_at in ["tokens", "last_ln"]:
        adapter = ViTAdapter(copy.deepcopy(vit), window_attn, window=4, conv_width=8, last_pe_at=last_pe_at)
        adapter = randomise(adapter.double().eval(), keep=["vit.", "injector.gamma"])  # the adapter's own
        dense = {}
        adapter(img, dense)
        torch.testing.assert_close(dense["pre_norm"], grid(trace["pre_norm"]), rtol=1e-12, atol=1e-12)
        expected = y if last_pe_at == "last_ln" else trace["pre_norm"] + y - vit.norm(trace["pre_norm"])
        torch.testing.assert_close(dense["post_norm"], grid(expected), rtol=1e-12, atol=1e-12)


def test_mpvg_dense_output_is_pvgs_plus_a_per_token_term():
    """PVG is MPVG without Eq. (11)'s LN(pos_0). With the same weights their dense outputs differ, and by
    a term that varies from token to token on every level (not a constant shift); last_pe_at="none" makes
    MPVG's output PVG's exactly."""
    mpvg_adapter = randomise(tiny("mpvg")).double().eval()
    pvg_adapter = tiny("pvg").double().eval()
    state = {k: v for k, v in mpvg_adapter.state_dict().items() if not k.startswith("vit.last_pe_norm.")}
    pvg_adapter.load_state_dict(state, strict=True)
    none_adapter = tiny("mpvg", last_pe_at="none").double().eval()
    none_adapter.load_state_dict(state, strict=True)
    img = images(2, 64, 96)
    with torch.no_grad():
        ours, theirs, without = mpvg_adapter(img), pvg_adapter(img), none_adapter(img)
    for a, b, c in zip(ours, theirs, without):
        diff = a - b
        spread = (diff - diff.mean(dim=(2, 3), keepdim=True)).abs().amax(dim=(2, 3))  # (B, D): over positions
        assert float(spread.min()) > 1e-3  # every sample's every channel varies over the positions
        torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_the_two_resize_orders_agree_at_img_size_and_differ_elsewhere():
    """pe_resize: pos_0 resized then the chain (default), or the chain then each pos_l resized; at img_size
    nothing is resized and the two are one model; at another size each layer's PE differs."""
    a = randomise(tiny("pvg")).double().eval()
    b = tiny("pvg", pe_resize="pos_l").double().eval()
    b.load_state_dict(a.state_dict())
    for size, same in [((64, 64), True), ((64, 96), False)]:
        with torch.no_grad():
            pa, pb = (
                a.position((size[0] // 16, size[1] // 16))[1],
                b.position((size[0] // 16, size[1] // 16))[1],
            )
            oa, ob = a(images(1, *size)), b(images(1, *size))
        assert pa[0] is None and pb[0] is None
        assert all(torch.equal(x, y) == same for x, y in zip(pa[1:], pb[1:]))
        assert all(torch.equal(x, y) == same for x, y in zip(oa, ob))


@pytest.mark.parametrize("pe_resize", ["pos_0", "pos_l"])
def test_eq_11_follows_the_resize_order(pe_resize):
    """MPVG's LN(pos_0) at a 4 x 6 grid: LN of pos_0 resized (the default), or with pe_resize="pos_l" LN at
    the pretraining grid, then resized, as each layer's PE is; LN of each row does not commute with it."""
    adapter = randomise(tiny("mpvg", pe_resize=pe_resize)).double().eval()
    vit, grid = adapter.vit, (4, 6)
    with torch.no_grad():
        last = adapter.position(grid)[2]
        if pe_resize == "pos_0":
            expected = vit.last_pe_norm(vit.pos_at(grid))
        else:
            expected = vit.pos_at(grid, vit.last_pe_norm(vit.pos_embed))
        other = (
            vit.pos_at(grid, vit.last_pe_norm(vit.pos_embed))
            if pe_resize == "pos_0"
            else vit.last_pe_norm(vit.pos_at(grid))
        )
    assert torch.equal(last, expected.reshape(1, 4, 6, -1)) and not torch.allclose(
        last, other.reshape(1, 4, 6, -1)
    )


# ViT-Adapter-T as published, and the checkpoints it starts from


def test_parameter_count_is_vit_adapter_tiny():
    """Counted from ViT-Adapter's constructors (D 192, spatial prior width 64, 6 deformable heads, 4 points,
    cffn_ratio 0.25): its DeiT-Ti without head, class token and Last LN, with LayerScale's two gammas a
    block, plus the adapter. In the default mode ours has exactly as many; MPVG adds the 11 LN'_l and
    Eq. (11)'s LayerNorm and drops the class slot of pos_embed."""
    D, w = 192, 64
    linear = lambda i, o: i * o + o  # noqa: E731
    block = 4 * D + linear(D, 3 * D) + linear(D, D) + linear(D, 4 * D) + linear(4 * D, D) + 2 * D
    vit = linear(3 * 16 * 16, D) + 197 * D + 12 * block
    deform = lambda levels: linear(D, 6 * levels * 4 * 2) + linear(D, 6 * levels * 4) + 2 * linear(D, D)  # noqa: E731
    injector = 2 * 2 * D + D + deform(3)
    extractor = 2 * 2 * D + deform(1) + 2 * D + linear(D, D // 4) + (9 + 1) * D // 4 + linear(D // 4, D)
    spm = 9 * (3 * w + w * w + w * w + w * 2 * w + 2 * w * 4 * w + 4 * w * 4 * w)  # convolutions, no bias
    spm += 2 * (3 * w + 2 * w + 4 * w + 4 * w) + linear(w, D) + linear(2 * w, D) + 2 * linear(4 * w, D)
    adapter = 3 * D + spm + 4 * (injector + extractor) + 2 * extractor + (4 * D * D + D) + 4 * 2 * D
    assert (vit, adapter) == (5_528_448, 2_438_192)
    counts = {pe: sum(p.numel() for p in build_adapter(pe).parameters()) for pe in ["default", "mpvg"]}
    assert counts == {"default": vit + adapter, "mpvg": vit + adapter - D + 12 * 2 * D}


@pytest.mark.parametrize("mode", ["default", "mpvg"])
def test_a_train_py_checkpoint_loads_and_the_notes_name_what_was_not_used(tmp_path, mode):
    """train.py's checkpoint (its "model"), in a class-token and a GAP mode, into the adapter of that mode:
    every ViT weight but the head, the class token and the Last LN arrives; LayerScale is new."""
    size = ["--img-size", "64", "--dim", "24", "--depth", "4", "--epochs", "1"]
    run_train(tmp_path, "--model", "deit_tiny", "--pe", mode, *size)
    checkpoint = torch.load(tmp_path / "run/checkpoint.pt", map_location="cpu", weights_only=True)
    adapter = tiny(mode)
    notes = load_backbone(adapter, checkpoint)
    own = adapter.vit.state_dict()
    loaded = [k for k in checkpoint["model"] if k in own]
    assert loaded and all(torch.equal(own[k], checkpoint["model"][k]) for k in loaded)
    unused = {"head.weight", "head.bias", "norm.weight", "norm.bias"} | (
        {"cls_token"} if mode == "default" else set()
    )
    assert set(checkpoint["model"]) - set(loaded) == unused
    assert notes[0].startswith("new: blocks.0.attn.gamma, blocks.0.mlp.gamma")  # LayerScale's, at 1
    assert notes[1] == f"not used: {', '.join(k for k in checkpoint['model'] if k in unused)}"
    assert ("class slot" in notes[-1]) == (mode == "default")


@pytest.mark.parametrize("mode", MODES)
def test_timms_deit_tiny_loads_into_every_mode(mode):
    """timm's deit_tiny_patch16_224 state dict (DeiT's weights by name) into ViT-Adapter-Ti in every mode:
    the patch embedding and blocks arrive; a GAP mode drops pos_embed's class slot; the new LN'_l of the
    layer-wise modes are named, and so are the head, class token and Last LN that are not used."""
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
    adapter = build_adapter(mode)
    notes = load_backbone(adapter, theirs)
    own = adapter.vit.state_dict()
    assert torch.equal(own["blocks.11.mlp.fc2.weight"], theirs["blocks.11.mlp.fc2.weight"])
    cls = mode in ("default", "lape")
    assert torch.equal(own["pos_embed"], theirs["pos_embed"][:, 1 - cls :])
    new = {k for k in own if k not in theirs}
    assert {k for k in new if "pe_norm" in k} == {k for k in own if "pe_norm" in k}  # LN'_l and Eq. (11)'s
    assert notes[0].startswith("new: ") and all(".gamma" in k or "pe_norm" in k for k in new)
    assert notes[1] == "not used: cls_token, norm.weight, norm.bias, head.weight, head.bias"
