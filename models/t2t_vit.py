"""T2T-ViT-7 (Yuan et al. 2021, yitu-opensource/T2T-ViT) with the paper's PE modes: Tables 1 and 2.

The Tokens-to-Token stem (soft splits and performers) replaces the patch embedding of mpvg.py's ViT; the
7 blocks after it are mpvg.py's, and so are the knobs and the layer-wise PE. The PE is T2T-ViT's fixed
sinusoid table (never trained); each layer's LN'_l and Eq. (11)'s LayerNorm are learned on top of it.
Parameter names are the official code's, so its checkpoints load strictly.
"""

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from mpvg import Config, VisionTransformer

T2T_VIT_7 = dict(dim=256, depth=7, heads=4, mlp_ratio=2.0, qkv_bias=False, norm_eps=1e-5, patch_size=16)


@dataclass
class T2TConfig(Config):
    def __post_init__(self):
        super().__post_init__()
        if self.patch_size != 16:
            raise ValueError(
                f"T2T-ViT's soft splits stride 4, 2 and 2 pixels, 16 in all: give patch_size 16, "
                f"not {self.patch_size}"
            )
        if self.init != "deit":
            raise ValueError(
                f"init {self.init!r} sets a learned PE and a patch convolution, and T2T-ViT has a fixed "
                "sinusoid PE and no patch convolution: leave init 'deit' (T2T-ViT's own)"
            )


def sinusoid(rows: int, dim: int) -> torch.Tensor:
    """The Transformer's sinusoid table (1, rows, dim): sin at even channels, cos at odd ones."""
    position = torch.arange(rows, dtype=torch.float64)[:, None]
    angle = position / 10000 ** (2 * (torch.arange(dim) // 2) / dim)
    return torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos()).float()[None]


class TokenPerformer(nn.Module):
    """One re-structurization of T2T: a single-head performer (linear attention through positive random
    features) from `dim` to `emb` channels, its value as the skip connection, then an MLP."""

    def __init__(self, dim: int, emb: int, kernel_ratio: float = 0.5):
        super().__init__()
        self.emb, m = emb, int(emb * kernel_ratio)
        self.norm1, self.kqv = nn.LayerNorm(dim), nn.Linear(dim, 3 * emb)
        self.proj, self.dp = nn.Linear(emb, emb), nn.Dropout(0.1)  # the official dropouts, always 0.1
        self.norm2 = nn.LayerNorm(emb)
        self.mlp = nn.Sequential(nn.Linear(emb, emb), nn.GELU(), nn.Linear(emb, emb), nn.Dropout(0.1))
        # m random features, fixed at creation and kept in the checkpoint (the paper counts them)
        self.w = nn.Parameter(nn.init.orthogonal_(torch.randn(m, emb)) * math.sqrt(m), requires_grad=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # phi(x) = exp(w x - |x|^2 / 2) / sqrt(m)
        return torch.exp(x.float() @ self.w.T - x.pow(2).sum(-1, keepdim=True) / 2) / math.sqrt(len(self.w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(self.norm1(x)).split(self.emb, dim=-1)
        kp, qp = self.features(k), self.features(q)  # (B, T, m)
        normaliser = qp @ kp.sum(dim=1, keepdim=True).transpose(1, 2)  # (B, T, 1)
        y = (qp @ (kp.transpose(1, 2) @ v.float())) / (normaliser + 1e-8)  # softmax attention, linearised
        y = v + self.dp(self.proj(y))
        return y + self.mlp(self.norm2(y))


class TokensToToken(nn.Module):
    """Soft splits 7/4, 3/2, 3/2 (overlapping unfolds) with a performer between them: 224 px -> 14 x 14."""

    def __init__(self, cfg: Config, token_dim: int = 64):
        super().__init__()
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.attention1 = TokenPerformer(cfg.in_chans * 7 * 7, token_dim)
        self.attention2 = TokenPerformer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, cfg.dim)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.attention1(self.soft_split0(img).transpose(1, 2))
        x = rearrange(x, "b (h w) c -> b c h w", h=math.isqrt(x.shape[1]))
        x = self.attention2(self.soft_split1(x).transpose(1, 2))
        x = rearrange(x, "b (h w) c -> b c h w", h=math.isqrt(x.shape[1]))
        return self.project(self.soft_split2(x).transpose(1, 2))  # (B, N, D)


class T2TViT(VisionTransformer):
    """mpvg.py's ViT with the Tokens-to-Token module as its stem and the sinusoid table as its PE."""

    patch_embed = property(lambda self: self.tokens_to_token)  # the stem that mpvg.py's embed reads

    def __init__(self, cfg: T2TConfig):
        super().__init__(cfg, tokens_to_token=TokensToToken(cfg))
        if self.pos_embed is not None:  # fixed, as in the official code: a parameter that is never trained
            self.pos_embed.requires_grad_(False)

    def init_weights(self):
        """DeiT's (Linear weights and cls_token truncated normal, std 0.02), the PE the sinusoid table."""
        super().init_weights()
        if self.pos_embed is not None:
            with torch.no_grad():
                self.pos_embed.copy_(sinusoid(self.cfg.num_tokens, self.cfg.dim))
