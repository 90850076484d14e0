"""Swin-Ti (Liu et al. 2021, microsoft/Swin-Transformer) with the paper's PE modes: Table 1.

Swin pools by averaging in every mode and has no class token. Its default is Swin-T with the official
absolute PE on (`ape=True`, one row per 4 x 4 patch, `absolute_pos_embed`) beside its relative position
bias. The knobs and their presets are mpvg.py's; what Swin adds is where the PE goes between stages:
each stage's patch merging carries the PE as it carries the tokens (the same module, no new parameters),
so layer l of every stage receives its LN'_l(pos) at its own resolution and width. Eq. (11)'s pos_k is
carried the same way to the last stage. PVG and MPVG give the PE to every block, layer 0 included, as the
paper states for Swin. The blocks are mpvg.py's, with window attention; `depth` sets the third stage, as
Swin-T, -S, -B and -L differ there alone. Parameter names are timm's (`swin_tiny_patch4_window7_224`) plus
the absolute PE.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mpvg import AUTO, Attention, Block, Config, VisionTransformer, check_images, init_linears

SWIN_TINY = dict(img_size=224, patch_size=4, dim=96, depth=12, heads=3, norm_eps=1e-5, pool="gap")


@dataclass
class SwinConfig(Config):
    window: int = 7  # M: attention within M x M windows, shifted by M // 2 in every second block
    # dim and heads are the first stage's; each later stage halves the grid and doubles both

    def __post_init__(self):
        if self.pe in ("pvg", "mpvg") and self.pe_layers == AUTO:
            self.pe_layers = "all"  # the paper: for Swin, PVG and MPVG "exceptionally include layer 0"
        super().__post_init__()
        grid = self.img_size // self.patch_size
        sides = [grid >> s for s in range(len(self.depths))]
        if self.depth < 7:
            raise ValueError(
                f"Swin's depth counts the blocks of its four stages, 2, 2, depth - 6 and 2 (Swin-T 12, "
                f"Swin-S and -B 24): give depth 7 or more, not {self.depth}"
            )
        if self.pool != "gap":
            raise ValueError(
                f"Swin has no class token and averages in every PE mode: pool 'gap', not {self.pool!r}"
            )
        if self.init != "deit":
            raise ValueError(
                f"init {self.init!r} is ViT-Lite's; Swin initialises as its official code (the absolute PE "
                "and the bias tables truncated normal, std 0.02): leave init 'deit'"
            )
        if (
            any(side % self.window and side > self.window for side in sides)
            or sides[-1] << len(sides) - 1 != grid
        ):
            raise ValueError(
                f"the stages' grids {sides} must halve exactly, each a multiple of window {self.window} or "
                "smaller than it: choose img_size, patch_size and window to fit"
            )

    @property
    def depths(self) -> tuple[int, ...]:  # blocks per stage: Swin-T, -S, -B and -L differ in the third alone
        return (2, 2, self.depth - 6, 2)


def relative_index(window: int) -> torch.Tensor:
    """(M^2, M^2): for each query and key of a window, the row of their offset in the bias table."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, M^2)
    dy, dx = coords[:, :, None] - coords[:, None, :] + window - 1  # each offset in 0 .. 2M - 2
    return dy * (2 * window - 1) + dx


def shift_mask(side: int, window: int, shift: int) -> torch.Tensor:
    """(windows, M^2, M^2): 0 where two tokens of a shifted window were neighbours, -inf where the cyclic
    shift brought them together from opposite edges."""
    region = torch.zeros(side, side)
    for i, rows in enumerate((slice(0, -window), slice(-window, -shift), slice(-shift, None))):
        for j, cols in enumerate((slice(0, -window), slice(-window, -shift), slice(-shift, None))):
            region[rows, cols] = 3 * i + j
    region = rearrange(region, "(y m) (x n) -> (y x) (m n)", m=window, n=window)
    return torch.zeros(()).masked_fill(region[:, :, None] != region[:, None, :], float("-inf"))


class WindowAttention(Attention):
    """(S)W-MSA: mpvg.py's multi-head attention within each M x M window of stage s's grid, with a learned
    bias per relative offset and head; in a shifted block the grid is rolled by M // 2 around it."""

    def __init__(self, cfg: SwinConfig, s: int, shifted: bool):
        super().__init__(cfg.dim << s, cfg.heads << s, cfg.qkv_bias, cfg.attn_drop)
        side = (cfg.img_size // cfg.patch_size) >> s
        self.window = min(cfg.window, side)  # a grid no larger than a window is one window, unshifted
        self.shift = self.window // 2 if shifted and side > cfg.window else 0
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * self.window - 1) ** 2, self.heads))
        self.register_buffer("relative_position_index", relative_index(self.window), persistent=False)
        mask = shift_mask(side, self.window, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        m, rows = self.window, x.shape[1] // self.window
        h = torch.roll(x, (-self.shift, -self.shift), dims=(1, 2))
        h = rearrange(h, "b (y m) (x n) c -> b (y x) (m n) c", m=m, n=m)  # the windows: (B, windows, M^2, C)
        q, k, v = rearrange(self.qkv(h), "b w n (qkv h d) -> qkv b w h n d", qkv=3, h=self.heads)
        bias = rearrange(self.relative_position_bias_table[self.relative_position_index], "n m h -> h n m")
        if self.attn_mask is not None:
            bias = bias + self.attn_mask[:, None]  # (windows, heads, M^2, M^2)
        dropout = self.attn_drop if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout)
        h = self.proj(rearrange(h, "b w h n d -> b w n (h d)"))
        h = rearrange(h, "b (y x) (m n) c -> b (y m) (x n) c", y=rows, m=m)
        return torch.roll(h, (self.shift, self.shift), dims=(1, 2))


class PatchMerging(nn.Module):
    """Each 2 x 2 neighbourhood into one token of twice the width: concatenate, LayerNorm, project."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H / 2, W / 2, 2C)
        return self.reduction(self.norm(rearrange(x, "b (h i) (w j) c -> b h w (j i c)", i=2, j=2)))


class Stage(nn.Module):
    """Stage s: a patch merging from the second stage on, then mpvg.py's blocks at the stage's width, with
    window attention, unshifted and shifted in turn."""

    def __init__(self, cfg: SwinConfig, s: int, rates: list[float]):
        super().__init__()
        self.downsample = PatchMerging(cfg.dim << s - 1, cfg.norm_eps) if s else nn.Identity()
        first = sum(cfg.depths[:s])  # the index l of the stage's first block
        self.blocks = nn.Sequential(
            *(
                Block(
                    cfg,
                    rates[l],
                    l in cfg.pe_layer_ids,
                    dim=cfg.dim << s,
                    attn=WindowAttention(cfg, s, i % 2 == 1),
                )
                for i, l in enumerate(range(first, first + cfg.depths[s]))
            )
        )


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, H / P, W / P, D)
        return self.norm(rearrange(self.proj(img), "b d h w -> b h w d"))


class Head(nn.Module):
    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc(y.mean(dim=(1, 2)))  # GAP over the last stage's grid


class SwinTransformer(nn.Module):
    last_ln = VisionTransformer.last_ln  # mpvg.py's Last LN and Eq. (11), with Swin's pos_k below

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg, grid = cfg, cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg)
        self.absolute_pos_embed = (
            nn.Parameter(torch.zeros(1, grid * grid, cfg.dim)) if cfg.has_pos_embed else None
        )
        rates = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()  # stochastic depth, by l
        self.layers = nn.Sequential(*(Stage(cfg, s, rates) for s in range(len(cfg.depths))))
        width = cfg.dim << len(cfg.depths) - 1  # the last stage's
        self.norm = nn.LayerNorm(width, eps=cfg.norm_eps)  # the Last LN
        self.last_pe_norm = nn.LayerNorm(width, eps=cfg.norm_eps) if cfg.last_pe is not None else None
        self.head = Head(width, cfg.num_classes)
        self.init_weights()

    def init_weights(self):
        """As the official code: Linear weights and both position tables truncated normal (std 0.02),
        biases 0, LayerNorms 1 and 0, the patch convolution PyTorch's default."""
        for name, p in self.named_parameters():
            if name == "absolute_pos_embed" or name.endswith("relative_position_bias_table"):
                nn.init.trunc_normal_(p, std=0.02)
        init_linears(self)

    def no_weight_decay(self) -> set[str]:
        """The official recipe's: 1-D parameters and both position tables."""
        return {
            n
            for n, p in self.named_parameters()
            if p.ndim <= 1 or n == "absolute_pos_embed" or n.endswith("relative_position_bias_table")
        }

    def merges_and_blocks(self) -> list[tuple[nn.Module, Block]]:
        """For each layer l = 0..L, the patch merging before it (its stage's, at a stage's first block; the
        identity elsewhere, and in the first stage) and its block."""
        return [
            (stage.downsample if i == 0 else nn.Identity(), block)
            for stage in self.layers
            for i, block in enumerate(stage.blocks)
        ]

    def pos_0(self) -> torch.Tensor:  # the absolute PE on the first grid, (1, H, W, C)
        return rearrange(
            self.absolute_pos_embed, "1 (h w) c -> 1 h w c", h=self.cfg.img_size // self.cfg.patch_size
        )

    def layer_pos(self) -> list[torch.Tensor | None]:
        """The PE each layer receives, (1, H, W, C) at its stage, or None: mpvg.py's layer_pos, with each
        stage's patch merging carrying on to its grid what the next LN' reads: the last PE received (Eq.
        (7)/(10)), or for pe_hierarchical=False pos_0 (Table 6)."""
        if not self.cfg.pe_layer_ids:
            return [None] * self.cfg.depth
        carried, received = self.pos_0(), []
        for merge, block in self.merges_and_blocks():
            carried = merge(carried)  # merged as the tokens are
            if block.pe_norm is None:
                received.append(None)
                continue
            received.append(pos := block.pe_norm(carried))
            carried = pos if self.cfg.pe_hierarchical else carried
        return received

    def pos_k(self, pos: list) -> torch.Tensor:
        """Table 5's pos_k carried through the later stages' patch merging to the last grid, for Eq. (11)."""
        k = self.cfg.last_pe
        pos_k = self.pos_0() if k == 0 else pos[k]
        for merge, _ in self.merges_and_blocks()[k + 1 :]:
            pos_k = merge(pos_k)
        return pos_k

    def forward_features(self, img: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> y, the Last LN's output on the last grid (B, H', W', C'); trace as ViT's."""
        cfg = check_images(img, self.cfg)
        if img.shape[2:] != (cfg.img_size,) * 2:  # its stages' grids and windows are built for one size
            raise ValueError(
                f"Swin reads images of its img_size, {cfg.img_size} px, alone: got {tuple(img.shape)}"
            )
        x, pos, tokens = self.patch_embed(img), self.layer_pos(), []
        if cfg.pe_input:
            x = x + self.pos_0()  # Eq. (1)/(8)
        for (merge, block), pos_l in zip(self.merges_and_blocks(), pos):
            x = merge(x)  # a stage's patch merging, at its first block
            tokens.append(x)
            x = block(x, pos_l)
        return self.last_ln(x, tokens, pos, trace)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(img))
