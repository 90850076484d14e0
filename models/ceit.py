"""CeiT-Ti (Yuan et al. 2021, coeusguo/ceit) with the paper's PE modes: Table 1 and Fig. 4.

Three parts of CeiT replace their ViT counterparts: the Image-to-Tokens stem (a convolution, BatchNorm and
max pool, then 4 x 4 patches), the Locally-enhanced Feed-Forward (LeFF) of each block, and the Layer-wise
Class-token Attention (LCA) that reads every layer's class token. The knobs, the attention and the
layer-wise PE are mpvg.py's. Under GAP each layer's token mean takes the place of its class token in LCA,
and Eq. (11) adds LN(pos_k) to LCA's single output token row by row, as to y in ViT, so that GAP gives the
token plus the mean of LN(pos_k). init="cct" reads I2T's last convolution as the patch convolution.
Parameter names are the official code's, so its checkpoints load strictly.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mpvg import Attention, Block, Config, Mlp, VisionTransformer

CEIT_TINY = dict(dim=192, heads=3)  # with DeiT-Ti's defaults: 12 layers, qkv bias, eps 1e-6, patch 16 in all


@dataclass
class CeiTConfig(Config):
    def __post_init__(self):
        super().__post_init__()
        if self.patch_size % 4:
            raise ValueError(
                f"CeiT's stem halves the image twice before its patch convolution: give a patch_size that "
                f"is a multiple of 4 (CeiT-Ti: 16), not {self.patch_size}"
            )


class Stem(nn.Module):
    """Image-to-Tokens' low-level features: a 7 x 7 convolution of stride 2, BatchNorm, a max pool of 2."""

    def __init__(self, cfg: Config, channels: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(cfg.in_chans, channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.bn(self.conv(img)))


class ImageToTokens(nn.Module):
    """I2T: the stem's feature map (a quarter of the image's side), cut into patches of patch_size / 4."""

    def __init__(self, cfg: Config, channels: int = 64):
        super().__init__()
        self.backbone = Stem(cfg, channels)
        self.proj = nn.Conv2d(channels, cfg.dim, kernel_size=cfg.patch_size // 4, stride=cfg.patch_size // 4)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(self.backbone(img)), "b d h w -> b (h w) d")


class LeFF(nn.Module):
    """Locally-enhanced Feed-Forward: the patch tokens as a grid through 1 x 1, depthwise 3 x 3 and 1 x 1
    convolutions, each with BatchNorm (GELU after the first two); a class token passes unchanged."""

    def __init__(self, cfg: Config):
        super().__init__()
        hidden, self.has_cls = int(cfg.dim * cfg.mlp_ratio), cfg.pool == "cls"
        self.conv1, self.bn1 = nn.Conv2d(cfg.dim, hidden, 1), nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3, self.bn3 = nn.Conv2d(hidden, cfg.dim, 1), nn.BatchNorm2d(cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, x = x[:, : self.has_cls], x[:, self.has_cls :]
        x = rearrange(x, "b (h w) d -> b d h w", h=math.isqrt(x.shape[1]))
        x = F.gelu(self.bn1(self.conv1(x)))
        x = F.gelu(self.bn2(self.conv2(x)))
        return torch.cat([cls, rearrange(self.bn3(self.conv3(x)), "b d h w -> b (h w) d")], dim=1)


class LeFFBlock(Block):
    """mpvg.py's block with LeFF as its feed-forward, `leff` in the official checkpoints."""

    mlp = property(lambda self: self.leff)  # the feed-forward that Block's forward calls

    def __init__(self, cfg: Config, drop_prob: float, receives_pe: bool):
        super().__init__(cfg, drop_prob, receives_pe, leff=LeFF(cfg))


class LastTokenAttention(Attention):
    """LCA's attention: keys and values from every layer's token, the query from the last layer's alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, dim = self.qkv.weight, self.qkv.bias, x.shape[-1]
        q = F.linear(x[:, -1:], weight[:dim], None if bias is None else bias[:dim])
        kv = F.linear(x, weight[dim:], None if bias is None else bias[dim:])
        q = rearrange(q, "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(kv, "b n (kv h d) -> kv b h n d", kv=2, h=self.heads)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class LCA(nn.Module):
    """Layer-wise Class-token Attention: one pre-norm block over the L + 1 layers' tokens, (B, 1, D) out."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = LastTokenAttention(cfg.dim, cfg.heads, cfg.qkv_bias, cfg.attn_drop)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.feedforward = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio))

    def forward(self, layers: torch.Tensor) -> torch.Tensor:
        x = layers[:, -1:] + self.attn(self.norm1(layers))
        return x + self.feedforward(self.norm2(x))


class CeiT(VisionTransformer):
    """mpvg.py's ViT with the I2T stem, LeFF blocks, and LCA between the last block and the Last LN."""

    patch_embed = property(lambda self: self.i2t)  # the stem that mpvg.py's embed and init_weights read

    def __init__(self, cfg: CeiTConfig):
        lca = LCA(cfg)  # without drop path, as the official code
        layer_pe = nn.Parameter(torch.zeros(1, cfg.depth, cfg.dim))  # LCA's own PE, one row per layer
        super().__init__(cfg, LeFFBlock, i2t=ImageToTokens(cfg), lca=lca, pos_layer_embed=layer_pe)

    def last_ln(self, x, tokens: list, pos: list, trace: dict | None, **traced) -> torch.Tensor:
        """LCA, then mpvg.py's Last LN on LCA's one token (B, 1, D; N rows once Eq. (11) adds LN(pos_k));
        `layers` in the trace: the token each layer hands to LCA, its class token or its token mean."""
        layers = torch.stack([self.pool(x_l) for x_l in (*tokens[1:], x)], dim=1)  # x_1 .. x_{L+1}, pooled
        lca = self.lca(layers + self.pos_layer_embed)
        return super().last_ln(lca, tokens, pos, trace, layers=layers, **traced)  # traced: pos_0 at the grid
