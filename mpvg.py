"""MPVG: Maximizing the Position Embedding for Vision Transformers with Global Average Pooling.

A reference implementation of Lee, Ham and Kim (AAAI 2025, arXiv 2502.02919), to be read next to
the paper. One ViT/DeiT whose position embedding (PE) is wired by four knobs; the paper's PE modes
(default, LaPE, PVG, MPVG) are presets of those knobs, and its ablations turn them one at a time.

    model = create_model("deit_tiny", pe="mpvg")  # GAP, layer-wise PE, PE at the Last LN
    logits = model(images)  # (B, 3, 224, 224) -> (B, 1000)

Equation numbers are those of the paper's Methodology section. Layers are numbered l = 0..L as
in the paper (depth = L + 1). The paper writes LN'_l both for the MLP's pre-norm (Eq. 3) and for
the PE's own norm (Eq. 6); here they are two modules, `norm2` and `pe_norm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

AUTO = "auto"  # a knob left at AUTO takes the value that the `pe` mode gives it

# Each PE mode is a preset of the four knobs, plus the pooling the paper runs it with.
PE_MODES = {
    # ViT/DeiT: PE added once to the patches, Eq. (1).
    "default": dict(pe_input=True, pe_layers="none", pe_hierarchical=True, last_pe=None, pool="cls"),
    # LaPE (Yu et al. 2023): no PE on the patches, Eq. (5); layer l gets LN'_l(pos_l) with
    # pos_l = LN'_{l-1}(pos_{l-1}), Eqs. (6)-(7).
    "lape": dict(pe_input=False, pe_layers="all", pe_hierarchical=True, last_pe=None, pool="cls"),
    # PVG: PE on the patches, Eq. (8), and layer-wise from layer 1 on, Eqs. (9)-(10). Table 6's best
    # row checks "Layer 0" while the text excludes it: we follow the text and the equations.
    "pvg": dict(pe_input=True, pe_layers="skip0", pe_hierarchical=True, last_pe=None, pool="gap"),
    # MPVG: PVG, and LN(pos_0) added to the Last LN's output, Eq. (11).
    "mpvg": dict(pe_input=True, pe_layers="skip0", pe_hierarchical=True, last_pe=0, pool="gap"),
    # No position embedding at all: a GAP model is then blind to the order of the patches.
    "none": dict(pe_input=False, pe_layers="none", pe_hierarchical=True, last_pe=None, pool="gap"),
}

PRESETS = {
    "deit_tiny": dict(dim=192, heads=3),
    "deit_small": dict(dim=384, heads=6),
    "deit_base": dict(dim=768, heads=12),
    # ViT-Lite-7/4 (Compact Transformers) for CIFAR-100, Table 2
    "vit_lite_7_4": dict(
        img_size=32,
        patch_size=4,
        num_classes=100,
        dim=256,
        depth=7,
        heads=4,
        mlp_ratio=2.0,
        qkv_bias=False,
        norm_eps=1e-5,
        init="cct",
    ),
}


@dataclass
class Config:
    img_size: int = 224  # H = W of the input, in pixels, that pos is learned at (pos_at resizes it)
    patch_size: int = 16  # P: each P x P patch becomes one token, N = HW / P^2
    in_chans: int = 3
    num_classes: int = 1000
    dim: int = 192  # D, the width of every token
    depth: int = 12  # L + 1 layers, l = 0..L
    heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # DeiT: True; ViT-Lite (Compact Transformers): False
    norm_eps: float = 1e-6  # DeiT: 1e-6; ViT-Lite: 1e-5 (PyTorch's default)
    drop_path: float = 0.0  # stochastic depth of the last layer, linear from 0 at layer 0 (DeiT)
    attn_drop: float = 0.0  # dropout on the attention weights (ViT-Lite's recipe: 0.1)
    init: str = "deit"  # "deit" (timm's DeiT) or "cct" (Compact Transformers' ViT-Lite): see init_weights
    pe: str = "default"  # a mode of PE_MODES; it presets the knobs below that are left at AUTO
    pool: str = AUTO  # "cls": read the class token; "gap": average all tokens
    pe_input: bool | str = AUTO  # add pos to the patches before layer 0, Eq. (1)/(8); else Eq. (5)
    pe_layers: str = AUTO  # which layers get LN'_l(pos) in the MSA input, Eq. (6)/(9): none|all|skip0
    pe_hierarchical: bool | str = AUTO  # pos_l = LN'_l(pos_{l-1}), Eq. (7)/(10); else LN'_l(pos_0)
    last_pe: int | None | str = AUTO  # k: add LN(pos_k) to the Last LN output, Eq. (11); None: don't

    def __post_init__(self):
        if self.pe not in PE_MODES:
            raise ValueError(f"unknown pe mode {self.pe!r}: choose one of {', '.join(PE_MODES)}")
        for name, value in PE_MODES[self.pe].items():
            if getattr(self, name) == AUTO:
                setattr(self, name, value)
        for name, allowed in (("pool", "cls gap"), ("pe_layers", "none all skip0"), ("init", "deit cct")):
            if getattr(self, name) not in allowed.split():
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: choose one of {allowed}")
        if self.img_size % self.patch_size or self.dim % self.heads:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}, "
                f"and dim {self.dim} a multiple of heads {self.heads}"
            )
        k = self.last_pe
        if k is not None and k != 0 and k not in self.pe_layer_ids:
            why = f"receives no PE (pe_layers={self.pe_layers!r})" if 0 < k < self.depth else "does not exist"
            raise ValueError(
                f"last_pe={k} names pos_{k}, but layer {k} {why}: use 0 (the raw PE) or a layer in "
                f"{self.pe_layer_ids}"
            )
        if k is not None and self.pool != "gap":
            raise ValueError(
                "the Last-LN PE (Eq. 11, MPVG) needs pool='gap': the paper's Conclusion states MPVG "
                "is incompatible with the class token"
            )

    @property
    def num_patches(self) -> int:  # N
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:  # N, plus one with a class token
        return self.num_patches + (self.pool == "cls")

    @property
    def pe_layer_ids(self) -> list[int]:  # the layers l whose MSA input gets LN'_l(pos)
        first = {"none": self.depth, "all": 0, "skip0": 1}[self.pe_layers]
        return list(range(first, self.depth))

    @property
    def has_pos_embed(self) -> bool:
        return self.pe_input or bool(self.pe_layer_ids) or self.last_pe is not None


def init_linears(model: nn.Module):
    """Every Linear's weight truncated normal (std 0.02) and its bias 0, as timm's ViT and Swin do."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def check_images(img: torch.Tensor, cfg: Config) -> Config:
    """cfg, if img is a batch of images it reads (any size the patch divides), else a ValueError."""
    if img.ndim != 4 or img.shape[1] != cfg.in_chans or any(s % cfg.patch_size for s in img.shape[2:]):
        raise ValueError(
            f"expected images (B, {cfg.in_chans}, H, W), H and W multiples of the patch size "
            f"{cfg.patch_size}, got {tuple(img.shape)}"
        )
    return cfg


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch of whole samples with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class PatchEmbed(nn.Module):
    """The patch embeddings p^1..p^N: one linear map of each P x P patch (a strided convolution)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(img), "b d h w -> b (h w) d")  # (B, N, D), row-major patches


class Attention(nn.Module):
    """Multi-head self-attention, the MSA of Eqs. (2), (6) and (9)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0):
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.heads)
        dropout = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # softmax(q k^T / sqrt(d)) v
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Layer l: a pre-norm transformer block whose MSA input may also get the layer's PE.

    Every preset uses this block, as the paper's Eqs. (2)-(3) write it. Compact Transformers' own
    ViT-Lite block differs: it normalises the residual stream after attention (same parameter count).
    models/ gives it a stage's width `dim` and window `attn` (Swin), a feed-forward by name (CeiT's `leff`).
    """

    def __init__(self, cfg: Config, drop_prob: float, receives_pe: bool, dim: int = 0, attn=None, **mlp):
        super().__init__()
        dim = dim or cfg.dim
        self.drop_prob = drop_prob  # this layer's stochastic depth
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)  # LN_l
        self.attn = attn or Attention(dim, cfg.heads, cfg.qkv_bias, cfg.attn_drop)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)  # the MLP's pre-norm, LN'_l of Eq. (3)
        for name, part in (mlp or dict(mlp=Mlp(dim, int(dim * cfg.mlp_ratio)))).items():
            self.add_module(name, part)
        # LN'_l of Eqs. (6)-(7) and (9)-(10): the PE's own LayerNorm, only where the layer gets PE.
        self.pe_norm = nn.LayerNorm(dim, eps=cfg.norm_eps) if receives_pe else None

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x: x_l (B, N, D); pos: the PE this layer receives, already through pe_norm (1, N, D)."""
        h = self.norm1(x)
        if pos is not None:
            h = h + pos  # Eq. (6): LN_l(x_l) + LN'_l(pos_l); Eq. (9): LN_l(x_l) + LN'_l(pos_{l-1})
        x = x + drop_path(self.attn(h), self.drop_prob, self.training)  # x'_l: Eq. (2), or (6)/(9)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_prob, self.training)  # Eq. (3): x_{l+1}


class VisionTransformer(nn.Module):
    """ViT/DeiT. Other architectures compose it (models/): `block` builds layer l, and `parts` replace the
    stem `patch_embed`, each under its checkpoints' name (the stem still reached as `patch_embed`)."""

    def __init__(self, cfg: Config, block: type[nn.Module] = Block, **parts: nn.Module | nn.Parameter):
        super().__init__()
        self.cfg = cfg
        for name, part in (parts or dict(patch_embed=PatchEmbed(cfg))).items():
            setattr(self, name, part)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        # pos = pos_0: one learnable row per token, the class slot included (as in DeiT and LaPE).
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim)) if cfg.has_pos_embed else None
        rates = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList(block(cfg, rates[l], l in cfg.pe_layer_ids) for l in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)  # the Last LN, Eq. (4)
        # Eq. (11) writes LN(pos_0) beside LN(x_{L+1}); it gets a LayerNorm of its own, not the Last LN's:
        # Tables 1-2 count 2D more parameters for MPVG than for PVG.
        self.last_pe_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.last_pe is not None else None
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.init_weights()

    def init_weights(self):
        """Linear weights truncated normal (std 0.02), their biases 0, LayerNorms 1 and 0, as both anchors.
        init="deit" (DeiT, via timm): pos_embed and cls_token truncated normal (std 0.02), the patch
        convolution PyTorch's default. init="cct" (Compact Transformers' ViT-Lite): pos_embed truncated
        normal with std 0.2, cls_token 0, the patch convolution's weight Kaiming normal."""
        cct = self.cfg.init == "cct"
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.2 if cct else 0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token) if cct else nn.init.trunc_normal_(self.cls_token, std=0.02)
        if cct:
            nn.init.kaiming_normal_(self.patch_embed.proj.weight)
        init_linears(self)

    def no_weight_decay(self) -> set[str]:
        """Parameters a trainer must not decay (DeiT): pos_embed, cls_token, biases and LayerNorms."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n in ("pos_embed", "cls_token")}

    def pos_at(self, grid: tuple[int, int], pos: torch.Tensor | None = None) -> torch.Tensor | None:
        """pos_0 = pos (or another PE table, (1, N, D)) at an input's grid = (h, w) patches: the learned table
        at the model's own grid; at another, its patch rows (a class slot set aside) resized bicubically with
        align_corners=False, as ViT-Adapter does (and timm's dynamic_img_size, which antialiases a shrink)."""
        pos, side = self.pos_embed if pos is None else pos, self.cfg.img_size // self.cfg.patch_size
        if pos is None or tuple(grid) == (side, side):
            return pos  # no interpolation: bit-identical to the model as trained
        slot = pos.shape[1] - side * side  # 1 with a class token
        patches = rearrange(pos[:, slot:], "1 (h w) d -> 1 d h w", h=side)
        patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :slot], rearrange(patches, "1 d h w -> 1 (h w) d")], dim=1)

    def layer_pos(self, pos_0: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The PE each layer l receives, (1, N, D), or None: Eqs. (6)-(7), (9)-(10) and Table 6.

        Eq. (7) (LaPE): pos_l = LN'_{l-1}(pos_{l-1}) and layer l receives LN'_l(pos_l). Eq. (10) (PVG):
        pos_l = LN'_l(pos_{l-1}) and layer l receives pos_l. Both say: each receiving layer applies its
        own LN'_l to what the previous receiving layer received, starting from pos_0 (pos_at the input).

        pos is input-independent, so this runs once per forward on one (1, N, D) tensor, not per sample.
        """
        received, pos = [], pos_0
        for block in self.blocks:
            if block.pe_norm is None:
                received.append(None)
                continue
            pos = block.pe_norm(pos if self.cfg.pe_hierarchical else pos_0)  # Eq. (7)/(10); Table 6
            received.append(pos)
        return received

    def embed(self, img: torch.Tensor, pos_0: torch.Tensor | None) -> torch.Tensor:
        """Images (B, C, H, W) -> x_0, the tokens entering layer 0 (B, N, D), a class token first."""
        x = self.patch_embed(img)  # [p^1; ...; p^N], (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [x_cls; p^1; ...; p^N]
        return x + pos_0 if self.cfg.pe_input else x  # Eq. (1)/(8): x_0; without it, Eq. (5)

    def forward_features(self, img: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> y, the Last LN's output tokens (B, N, D).

        trace: a dict that, when given, is filled with what the paper's analysis reads: `tokens`,
        x_l entering each layer (B, N, D); `pos`, the PE each layer received (1, N, D) or None;
        `pre_norm`, x_{L+1} before the Last LN; `post_norm`, y after it (Eq. 11 included).
        """
        cfg = check_images(img, self.cfg)
        # Resize pos_0, then Eq. (7)/(10): ViT-Adapter's order, which the paper leaves open (vs each pos_l)
        pos_0 = self.pos_at((img.shape[2] // cfg.patch_size, img.shape[3] // cfg.patch_size))
        x, pos, tokens = self.embed(img, pos_0), self.layer_pos(pos_0), []
        for block, pos_l in zip(self.blocks, pos):
            tokens.append(x)
            x = block(x, pos_l)  # Eqs. (2)-(3), with (6) or (9) where pos_l is given
        return self.last_ln(x, tokens, pos, trace, pos_0=pos_0)

    def last_ln(self, x, tokens: list, pos: list, trace: dict | None, pos_0=None, **traced) -> torch.Tensor:
        """x_{L+1} -> y through the Last LN, and the trace filled (Swin's forward ends here too); pos_0 at
        the input's grid, where Eq. (11) reads it (None: pos_k's own, at the model's own grid)."""
        y = self.norm(x)  # Eq. (4): y = LN(x_{L+1})
        if self.last_pe_norm is not None:
            pos_k = self.pos_k(pos) if pos_0 is None or self.cfg.last_pe else pos_0  # Table 5, at the grid
            y = y + self.last_pe_norm(pos_k)  # Eq. (11): y = LN(x_{L+1}) + LN(pos_k)
        if trace is not None:
            trace.update(tokens=tokens, pos=pos, pre_norm=x, post_norm=y, **traced)
        return y

    def pos_k(self, pos: list) -> torch.Tensor:  # Table 5: pos_k, the PE layer k received; pos_0 = pos
        return self.pos_embed if self.cfg.last_pe == 0 else pos[self.cfg.last_pe]

    def pool(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, 0] if self.cfg.pool == "cls" else y.mean(dim=1)  # class token, or GAP: (B, D)

    def forward_head(self, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(y))  # (B, num_classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(img))


def create_model(model: str = "deit_tiny", **overrides) -> VisionTransformer:
    """A model from a preset of PRESETS, with any Config field overridden, e.g. pe="mpvg"."""
    if model not in PRESETS:
        raise ValueError(
            f"unknown model preset {model!r}: choose one of {', '.join(PRESETS)} (the paper's other models "
            "are in models/: models.create_model, and models.load_model for their checkpoints)"
        )
    return VisionTransformer(Config(**{**PRESETS[model], **overrides}))


def load_model(checkpoint, map_location="cpu") -> VisionTransformer:
    """The model of a train.py checkpoint (its path, or the loaded dict), with its weights, in eval mode."""
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location, weights_only=True)
    model = create_model(**checkpoint["model_config"])  # {"model": its preset, **its Config}
    model.load_state_dict(checkpoint["model"])
    return model.eval()
