"""CeiT-Ti (Yuan et al. 2021, coeusguo/ceit) with the paper's PE modes: Table 1 and Fig. 4.

Three parts of CeiT replace their ViT counterparts: the Image-to-Tokens stem (a convolution, BatchNorm and
max pool, then 4 x 4 patches), the Locally-enhanced Feed-Forward (LeFF) of each block, and the Layer-wise
Class-token Attention (LCA) that reads every layer's class token. The knobs, the attention and the
layer-wise PE are mpvg.py's. Under GAP each layer's token mean takes the place of its class token in LCA,
and Eq. (11)'s LN(pos_k) reaches LCA's single output token as its mean over the tokens, which is what GAP
over y + LN(pos_k) gives in ViT. Parameter names are the official code's, so its checkpoints load strictly.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mpvg import Attention, Block, Config, Mlp, VisionTransformer, drop_path

CEIT_TINY = dict(dim=192, heads=3)  # with DeiT-Ti's defaults: 12 layers, qkv bias, eps 1e-6, patch 16 in all


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
    """mpvg.py's block with LeFF as its feed-forward; the layer's PE enters the MSA input as there."""

    def __init__(self, cfg: Config, drop_prob: float, receives_pe: bool):
        super().__init__(cfg, drop_prob, receives_pe)
        del self.mlp
        self.leff = LeFF(cfg)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x) if pos is None else self.norm1(x) + pos  # Eq. (6)/(9) where pos is given
        x = x + drop_path(self.attn(h), self.drop_prob, self.training)
        return x + drop_path(self.leff(self.norm2(x)), self.drop_prob, self.training)


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
        self.norm1, self.attn = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps), LastTokenAttention(cfg)
        self.norm2, self.feedforward = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps), Mlp(cfg)

    def forward(self, layers: torch.Tensor) -> torch.Tensor:
        x = layers[:, -1:] + self.attn(self.norm1(layers))
        return x + self.feedforward(self.norm2(x))


class CeiT(VisionTransformer):
    block = LeFFBlock

    def __init__(self, cfg: Config):
        if cfg.patch_size % 4:
            raise ValueError(
                f"CeiT's stem halves the image twice: patch_size a multiple of 4, not {cfg.patch_size}"
            )
        super().__init__(cfg)
        del self.patch_embed
        self.i2t = ImageToTokens(cfg)
        self.lca = LCA(cfg)  # without drop path, as the official code
        self.pos_layer_embed = nn.Parameter(torch.zeros(1, cfg.depth, cfg.dim))  # LCA's own PE, one per layer
        self.init_weights()

    def patches(self, img: torch.Tensor) -> torch.Tensor:
        return self.i2t(img)

    def forward_features(self, img: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> y, the Last LN's output (B, 1, D); trace as mpvg.py's, with `layers`,
        the token each layer hands to LCA (B, L + 1, D)."""
        cfg, x, pos, tokens, layers = self.cfg, self.embed(img), self.layer_pos(), [], []
        for block, pos_l in zip(self.blocks, pos):
            tokens.append(x)
            x = block(x, pos_l)
            # the layer's class token for LCA, or under GAP its token mean
            layers.append(x[:, 0] if cfg.pool == "cls" else x.mean(dim=1))
        lca = self.lca(torch.stack(layers, dim=1) + self.pos_layer_embed)
        y = self.norm(lca)  # the Last LN
        if self.last_pe_norm is not None:
            pos_k = self.pos_embed if cfg.last_pe == 0 else pos[cfg.last_pe]  # Table 5: pos_k
            y = y + self.last_pe_norm(pos_k).mean(dim=1, keepdim=True)  # Eq. (11), through GAP
        if trace is not None:
            trace.update(tokens=tokens, pos=pos, layers=torch.stack(layers, dim=1), pre_norm=lca, post_norm=y)
        return y
