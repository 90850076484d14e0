"""ViT-Adapter-Ti (Chen et al., ICLR 2023; czczup/ViT-Adapter) on mpvg.py's ViT, in every PE mode: the
backbone of the paper's Tables 3-4 (Mask R-CNN on COCO, UperNet on ADE20K; settings in Tables 8-9).

    adapter = build_adapter("mpvg", window_attn=True)  # detection's config (Table 3)
    adapter = build_adapter("mpvg", add_vit_feature="each")  # segmentation's (Table 4)
    load_backbone(adapter, torch.load("best.pt", weights_only=True))  # a train.py (DeiT) checkpoint
    c1, c2, c3, c4 = adapter(images)  # (B, 3, H, W) -> (B, 192, H/4, W/4) ... (B, 192, H/32, W/32)

A convolutional spatial prior module gives a pyramid c at 1/8, 1/16 and 1/32 of the image. Four interactions
run the ViT's blocks in four groups: before each group an injector lets the ViT's tokens read the pyramid
(deformable attention, scaled by a gamma that starts at 0, so that the ViT first runs as pretrained); after
it an extractor lets the pyramid read the tokens (deformable attention, then a convolutional FFN), with two
more extractors after the last group. The tokens, resized, are then added into the pyramid, and each level
is normalised. The adapter's parameters have the official names (spm, interactions, level_embed, up), the
ViT keeps mpvg.py's (DeiT's).

The paper says only "ViT-Adapter-Ti ... default settings"; two things it leaves open are knobs here:
- The order of resizing and the layer-wise chain at another image size: pe_resize="pos_0" (default, as
  mpvg.py and ViT-Adapter: pos_0 resized, then Eqs. 7/10) or "pos_l" (the chain at 224 px, then each
  pos_l resized).
- Where Eq. (11)'s LN(pos_k) goes, as ViT-Adapter never applies the Last LN: last_pe_at="tokens" (default:
  y = x_{L+1} + LN(pos_k), the tokens that the last extractors and the pyramid read), "last_ln" (Eq. 11
  whole, y = LN(x_{L+1}) + LN(pos_k)) or "none" (MPVG's dense backbone is then PVG's).

ViT-Adapter-T's backbone has 7,966,640 parameters by the official constructors, and build_adapter("default")
exactly these ("pvg" 7,970,672, "mpvg" 7,971,056: the LN'_l and Eq. 11's LayerNorm, less pos_embed's class
slot). The published detector (Mask R-CNN, FPN) is ~28 M, the segmentor (UperNet) ~36 M.
"""

from __future__ import annotations

import math
from dataclasses import fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import mpvg
from training.finetune import load_pretrained

LEVELS = (8, 16, 32)  # the pyramid c that the interactions share: c2, c3, c4 at 1/8, 1/16, 1/32 of the image


def deform_attn(
    value: torch.Tensor, shapes: list, locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The sampling of multi-scale deformable attention (Deformable DETR, Eq. 3) in plain PyTorch.

    value (B, S, M, d): each of M heads' values on every level, the levels' h x w grids flattened row-major
    one after another (S = sum of h * w over `shapes`); locations (B, Q, M, L, P, 2): for each query, head,
    level and point, (x, y) in [0, 1] of the level's extent; weights (B, Q, M, L, P). Returns (B, Q, M * d):
    per head, the weighted sum of the bilinear samples, a sample outside a level reading zeros. The official
    op is CUDA-only; this is its reference path (grid_sample at pixel centres, align_corners=False).
    """
    heads, samples = value.shape[2], []
    for level, ((h, _), v) in enumerate(zip(shapes, value.split([h * w for h, w in shapes], dim=1))):
        v = rearrange(v, "b (h w) m d -> (b m) d h w", h=h)
        grid = rearrange(2 * locations[:, :, :, level] - 1, "b q m p xy -> (b m) q p xy")  # [0, 1] -> [-1, 1]
        samples.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    samples = torch.stack(samples, dim=3)  # (B M, d, Q, L, P)
    out = (samples * rearrange(weights, "b q m l p -> (b m) 1 q l p")).sum(dim=(3, 4))
    return rearrange(out, "(b m) d q -> b q (m d)", m=heads)


def reference_points(shapes: list, like: torch.Tensor) -> torch.Tensor:
    """The centre of every cell of every level, (x, y) in [0, 1], row-major level after level: (1, Q, 2)."""
    points = []
    for h, w in shapes:
        centres = [(torch.arange(n, device=like.device, dtype=like.dtype) + 0.5) / n for n in (h, w)]
        y, x = torch.meshgrid(*centres, indexing="ij")
        points.append(torch.stack([x, y], dim=-1).reshape(-1, 2))
    return torch.cat(points)[None]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query predicts, for each head, P sampling offsets per level
    around its reference point (in cells of that level) and a softmax weight per sample over all levels."""

    def __init__(self, dim: int, levels: int, heads: int, points: int):
        super().__init__()
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)  # ViT-Adapter's deform_ratio 1.0
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self):
        """Deformable DETR's: offsets from the bias alone, head m's points 1..P cells along the direction
        2 pi m / M (scaled so that its larger coordinate is 1); uniform weights; Xavier value and output."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        direction = torch.stack([angle.cos(), angle.sin()], dim=-1)
        direction = direction / direction.abs().amax(dim=-1, keepdim=True)  # (M, 2)
        steps = torch.arange(1, self.points + 1, dtype=torch.float32)  # (P,)
        ring = direction[:, None, None, :] * steps[None, None, :, None]  # (M, 1, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(ring.expand(-1, self.levels, -1, -1).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, feat: torch.Tensor, shapes: list):
        """query (B, Q, D), reference (1, Q, 2) in [0, 1], feat (B, S, D) on `shapes` -> (B, Q, D).
        One reference point per query for all levels, as ViT-Adapter's (its levels span the same image)."""
        m, l, p = self.heads, self.levels, self.points
        value = rearrange(self.value_proj(feat), "b s (m d) -> b s m d", m=m)
        offsets = rearrange(self.sampling_offsets(query), "b q (m l p xy) -> b q m l p xy", m=m, l=l, p=p)
        weights = self.attention_weights(query).unflatten(-1, (m, l * p)).softmax(dim=-1)
        cells = torch.tensor([(w, h) for h, w in shapes], dtype=query.dtype, device=query.device)  # (L, 2)
        locations = reference[:, :, None, None, None, :] + offsets / cells[:, None, :]
        out = deform_attn(value, shapes, locations, weights.unflatten(-1, (l, p)))
        return self.output_proj(out)


class ConvFFN(nn.Module):
    """The extractor's feed-forward: fc1, one depthwise 3 x 3 convolution on each level's grid, GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)  # the official ffn.dwconv.dwconv

    def forward(self, c: torch.Tensor, shapes: list) -> torch.Tensor:
        levels = self.fc1(c).split([h * w for h, w in shapes], dim=1)
        levels = [
            rearrange(self.dwconv(rearrange(t, "b (h w) d -> b d h w", h=h)), "b d h w -> b (h w) d")
            for t, (h, w) in zip(levels, shapes)
        ]
        return self.fc2(F.gelu(torch.cat(levels, dim=1)))


class Injector(nn.Module):
    """The ViT's tokens read the pyramid: x + gamma * DeformAttn(LN(x), LN(c)), gamma zero at first."""

    def __init__(self, dim: int, heads: int, points: int, eps: float):
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = MSDeformAttn(dim, len(LEVELS), heads, points)
        self.gamma = nn.Parameter(torch.zeros(dim))  # ViT-Adapter's init_values 0

    def forward(self, x, c, reference, shapes):
        return x + self.gamma * self.attn(self.query_norm(x), reference, self.feat_norm(c), shapes)


class Extractor(nn.Module):
    """The pyramid reads the ViT's tokens: c + DeformAttn(LN(c), LN(x)), then c + ConvFFN(LN(c))."""

    def __init__(self, dim: int, heads: int, points: int, eps: float, cffn_ratio: float, drop_prob: float):
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = MSDeformAttn(dim, 1, heads, points)
        self.ffn_norm, self.ffn = nn.LayerNorm(dim, eps=eps), ConvFFN(dim, int(dim * cffn_ratio))
        self.drop_prob = drop_prob  # ViT-Adapter: the backbone's drop_path_rate, in every extractor

    def forward(self, c, x, reference, shapes, grid):
        c = c + self.attn(self.query_norm(c), reference, self.feat_norm(x), [grid])
        return c + mpvg.drop_path(self.ffn(self.ffn_norm(c), shapes), self.drop_prob, self.training)


class Interaction(nn.Module):
    """An injector before a group of the ViT's blocks, an extractor after it (two more after the last)."""

    def __init__(
        self, dim: int, heads: int, points: int, eps: float, cffn_ratio: float, drop: float, last: bool
    ):
        super().__init__()
        self.injector = Injector(dim, heads, points, eps)
        self.extractor = Extractor(dim, heads, points, eps, cffn_ratio, drop)
        self.extra_extractors = nn.ModuleList(
            Extractor(dim, heads, points, eps, cffn_ratio, drop) for _ in range(2 * last)
        )


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:  # MMCV's ConvModule
    conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SpatialPriorModule(nn.Module):
    """A ResNet-like stem to 1/4, three stride-2 convolutions to 1/8, 1/16, 1/32, each level projected to D.
    BatchNorm where ViT-Adapter has SyncBatchNorm: under DDP, nn.SyncBatchNorm.convert_sync_batchnorm."""

    def __init__(self, in_chans: int, dim: int, width: int = 64):
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            *conv_bn_relu(in_chans, w, stride=2),
            *conv_bn_relu(w, w),
            *conv_bn_relu(w, w),
            nn.MaxPool2d(3, 2, 1),
        )
        self.conv2 = conv_bn_relu(w, 2 * w, stride=2)
        self.conv3 = conv_bn_relu(2 * w, 4 * w, stride=2)
        self.conv4 = conv_bn_relu(4 * w, 4 * w, stride=2)
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Conv2d(c, dim, 1) for c in (w, 2 * w, 4 * w, 4 * w))

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) -> c1 .. c4: (B, D, H/4, W/4), (B, D, H/8, W/8) ... (B, D, H/32, W/32)."""
        c1 = self.stem(img)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]


class GridAttention(mpvg.Attention):
    """The ViT's MSA as ViT-Adapter runs it, on tokens (B, h, w, D): within window x window windows (the
    detection config), else over the whole grid as one window (mpvg's Attention), times LayerScale's gamma
    (ViT-Adapter's ViT has layer_scale=True, ones at init, and its DeiT configs keep it)."""

    def __init__(self, attn: mpvg.Attention, window: int | None, layer_scale: bool):
        super().__init__(attn.proj.in_features, attn.heads, attn.qkv.bias is not None, attn.attn_drop)
        self.qkv, self.proj, self.window = attn.qkv, attn.proj, window  # the ViT's own, under their names
        self.gamma = nn.Parameter(torch.ones_like(attn.proj.bias)) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        wh, ww = (h, w) if self.window is None else (self.window, self.window)
        # ViT-Adapter pads q, k and v (after the projection) with zeros to whole windows, unmasked: a padded
        # key scores 0 and adds a zero value, so that a window at the border dilutes its real tokens' weights.
        qkv = F.pad(self.qkv(x), (0, 0, 0, -w % ww, 0, -h % wh))
        q, k, v = rearrange(
            qkv, "b (i y) (j x) (s m d) -> s (b i j) m (y x) d", y=wh, x=ww, s=3, m=self.heads
        )
        x_attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x_attn = rearrange(
            x_attn, "(b i j) m (y x) d -> b (i y) (j x) (m d)", b=b, i=qkv.shape[1] // wh, y=wh
        )
        out = self.proj(x_attn[:, :h, :w])
        return out if self.gamma is None else self.gamma * out


class ScaledMlp(mpvg.Mlp):
    """The ViT's MLP times LayerScale's gamma (ones at init)."""

    def __init__(self, mlp: mpvg.Mlp):
        super().__init__(mlp.fc1.in_features, mlp.fc1.out_features)
        self.fc1, self.fc2 = mlp.fc1, mlp.fc2
        self.gamma = nn.Parameter(torch.ones_like(mlp.fc2.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * super().forward(x)


class ViTAdapter(nn.Module):
    """mpvg.py's ViT (any PE mode) inside ViT-Adapter: images (B, C, H, W), H and W multiples of 32, to four
    maps of width D at 1/4, 1/8, 1/16 and 1/32 of the image, for an FPN (detection) or UperNet (segmentation).

    The ViT is taken over: its class token (a pool="cls" model's; the class slot of pos_embed stays, unread),
    head and, unless last_pe_at="last_ln", Last LN go, as in ViT-Adapter, so that every parameter is read.
    window_attn: the detection config's window attention in the blocks whose index % 3 != 2.
    Knobs: window (14), layer_scale (True), add_vit_feature ("last": the detection code's, the last tokens
    added to all four levels; "each": the segmentation code's, the tokens after interaction i to level i;
    "none"), last_pe_at and pe_resize (the paper's silent choices; see the module's docstring), heads (6) and
    points (4) of the deformable attention, conv_width (64) of the spatial prior, cffn_ratio (0.25).
    """

    def __init__(
        self,
        vit: mpvg.VisionTransformer,
        window_attn: bool = False,
        *,
        window: int = 14,
        layer_scale: bool = True,
        add_vit_feature: str = "last",
        last_pe_at: str = "tokens",
        pe_resize: str = "pos_0",
        heads: int = 6,
        points: int = 4,
        conv_width: int = 64,
        cffn_ratio: float = 0.25,
    ):
        super().__init__()
        cfg = vit.cfg
        for name, value, allowed in (
            ("add_vit_feature", add_vit_feature, "last each none"),
            ("last_pe_at", last_pe_at, "tokens last_ln none"),
            ("pe_resize", pe_resize, "pos_0 pos_l"),
        ):
            if value not in allowed.split():
                raise ValueError(f"unknown {name} {value!r}: choose one of {allowed}")
        if cfg.patch_size != LEVELS[1] or cfg.depth < 4 or cfg.dim % heads:
            raise ValueError(
                f"ViT-Adapter reads the ViT at 1/16 of the image in four groups of blocks, with {heads} "
                f"heads of deformable attention: give patch_size 16, depth 4 or more and a dim that {heads} "
                f"divides (got {cfg.patch_size}, {cfg.depth}, {cfg.dim})"
            )
        self.vit, self.out_channels, dim = vit, cfg.dim, cfg.dim
        self.add_vit_feature, self.last_pe_at, self.pe_resize = add_vit_feature, last_pe_at, pe_resize
        vit.head, vit.cls_token = nn.Identity(), None  # never read by a dense model
        if last_pe_at != "last_ln":
            vit.norm = nn.Identity()  # ViT-Adapter never applies the Last LN
        if last_pe_at == "none":
            vit.last_pe_norm = None
        for l, block in enumerate(vit.blocks):
            block.attn = GridAttention(
                block.attn, window if window_attn and l % 3 != 2 else None, layer_scale
            )
            block.mlp = ScaledMlp(block.mlp) if layer_scale else block.mlp
        # [[0, 2], [3, 5], [6, 8], [9, 11]] at depth 12: four groups of blocks, [first, end) each
        self.groups = [(cfg.depth * i // 4, cfg.depth * (i + 1) // 4) for i in range(4)]
        self.level_embed = nn.Parameter(torch.zeros(len(LEVELS), dim))
        self.spm = SpatialPriorModule(cfg.in_chans, dim, conv_width)
        self.interactions = nn.ModuleList(
            Interaction(dim, heads, points, cfg.norm_eps, cffn_ratio, cfg.drop_path, last=i == 3)
            for i in range(4)
        )
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)  # c2 (1/8) up to 1/4, added to the stem's c1
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(4))  # SyncBatchNorm in ViT-Adapter
        self.init_weights()

    def init_weights(self):
        """ViT-Adapter's for its own parts (the ViT keeps its weights): Linear weights truncated normal (std
        0.02) and biases 0, convolutions normal with std sqrt(2 / fan_out), norms 1 and 0; then Deformable
        DETR's for each deformable attention, and level_embed standard normal."""
        mpvg.init_linears(self.interactions)
        for m in [*self.spm.modules(), *self.interactions.modules(), self.up]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.interactions.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def position(self, grid: tuple[int, int]) -> tuple[torch.Tensor | None, list, torch.Tensor | None]:
        """pos_0 at the input's grid, the PE each layer receives, and Eq. (11)'s LN(pos_k), each (1, h, w, D)
        or None, the class slot set aside (LN'_l and LN act on each row alone: the same before or after)."""
        vit, slot, last = self.vit, int(self.vit.cfg.pool == "cls"), None
        pos_0 = vit.pos_at(grid)
        if (
            self.pe_resize == "pos_0"
        ):  # pos_0 resized, then Eqs. (7)/(10) and (11): mpvg.py's order, ViT-Adapter's
            pos = vit.layer_pos(pos_0)
            if vit.last_pe_norm is not None:
                last = vit.last_pe_norm(pos_0 if vit.cfg.last_pe == 0 else pos[vit.cfg.last_pe])
        else:  # Eqs. (7)/(10) and (11) at the pretraining grid, then each resized
            native = vit.layer_pos(vit.pos_embed)
            pos = [p if p is None else vit.pos_at(grid, p) for p in native]
            if vit.last_pe_norm is not None:
                last = vit.pos_at(grid, vit.last_pe_norm(vit.pos_k(native)))

        def on_grid(p):
            return None if p is None else rearrange(p[:, slot:], "1 (h w) d -> 1 h w d", h=grid[0])

        return on_grid(pos_0), [on_grid(p) for p in pos], on_grid(last)

    def last_pe(self, x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
        """The tokens after the last block, x_{L+1} (B, h, w, D), as the last extractors and the pyramid read
        them: Eq. (11)'s LN(pos_k) at the input's grid added (last_pe_at="tokens"; ViT-Adapter has no Last
        LN), or Eq. (11) whole (last_pe_at="last_ln"), or x_{L+1} as it is (PVG's, and "none")."""
        x = self.vit.norm(x)  # Eq. (4), the Last LN, for last_pe_at="last_ln"; else the identity
        return x if last is None else x + last  # Eq. (11)

    def forward(self, img: torch.Tensor, trace: dict | None = None) -> list[torch.Tensor]:
        """Images (B, C, H, W) -> [(B, D, H/4, W/4), (B, D, H/8, W/8), (B, D, H/16, W/16), (B, D, H/32, W/32)]

        trace: a dict that, when given, gets `pre_norm`, x_{L+1} (B, h, w, D), and `post_norm`, the tokens
        the pyramid reads after the last block (Eq. 11 as last_pe_at places it)."""
        if img.ndim != 4 or img.shape[1] != self.vit.cfg.in_chans or img.shape[2] % 32 or img.shape[3] % 32:
            raise ValueError(
                f"expected images (B, {self.vit.cfg.in_chans}, H, W), H and W multiples of 32 (the pyramid's "
                f"coarsest level), got {tuple(img.shape)}"
            )
        vit, (H, W) = self.vit, img.shape[2:]
        shapes = [(H // s, W // s) for s in LEVELS]
        grid = shapes[1]  # the ViT's tokens: 1/16 of the image
        c1, *levels = self.spm(img)
        c = torch.cat(
            [rearrange(c_l, "b d h w -> b (h w) d") + e for c_l, e in zip(levels, self.level_embed)], dim=1
        )  # the pyramid c2, c3, c4 as one sequence (B, S, D)
        pos_0, pos, last = self.position(grid)
        x = rearrange(vit.patch_embed(img), "b (h w) d -> b h w d", h=grid[0])  # the patches, no class token
        x = x + pos_0 if vit.cfg.pe_input else x  # Eq. (1)/(8); without it, Eq. (5)
        at_tokens, at_pyramid, read = reference_points([grid], x), reference_points(shapes, x), []
        for interaction, (first, end) in zip(self.interactions, self.groups):
            x = rearrange(x, "b h w d -> b (h w) d")
            x = rearrange(interaction.injector(x, c, at_tokens, shapes), "b (h w) d -> b h w d", h=grid[0])
            for l in range(first, end):
                x = vit.blocks[l](x, pos[l])  # Eqs. (2)-(3), with (6) or (9) where pos[l] is given
            if end == vit.cfg.depth:
                if trace is not None:
                    trace["pre_norm"] = x
                x = self.last_pe(x, last)
            read.append(x)
            tokens = rearrange(x, "b h w d -> b (h w) d")
            for extractor in [interaction.extractor, *interaction.extra_extractors]:
                c = extractor(c, tokens, at_pyramid, shapes, grid)
        if trace is not None:
            trace["post_norm"] = x
        c2, c3, c4 = (
            rearrange(t, "b (h w) d -> b d h w", h=h)
            for t, (h, w) in zip(c.split([h * w for h, w in shapes], 1), shapes)
        )
        pyramid = [self.up(c2) + c1, c2, c3, c4]
        if self.add_vit_feature != "none":  # the ViT's tokens, resized bilinearly, added into each level
            read = read if self.add_vit_feature == "each" else read[-1:] * 4
            for i, t in enumerate(read):
                t = F.interpolate(
                    rearrange(t, "b h w d -> b d h w"), size=pyramid[i].shape[2:], mode="bilinear"
                )
                pyramid[i] = pyramid[i] + t  # align_corners=False, as ViT-Adapter; at 1/16, t itself
        return [norm(p) for norm, p in zip(self.norms, pyramid)]


CONFIG_FIELDS = {f.name for f in fields(mpvg.Config)}


def build_adapter(pe: str = "mpvg", window_attn: bool = False, **overrides) -> ViTAdapter:
    """ViT-Adapter-Ti: mpvg.py's deit_tiny at 224 px with drop path 0.1, in PE mode `pe`. overrides: fields of
    mpvg.Config (dim, depth, heads, img_size, ...: the interactions take four equal groups of the depth) or
    ViTAdapter's knobs (window, last_pe_at, conv_width, ...)."""
    config = {k: v for k, v in overrides.items() if k in CONFIG_FIELDS}
    knobs = {k: v for k, v in overrides.items() if k not in CONFIG_FIELDS}
    vit = mpvg.create_model("deit_tiny", **{"pe": pe, "drop_path": 0.1, **config})
    return ViTAdapter(vit, window_attn, **knobs)


def load_backbone(adapter: ViTAdapter, checkpoint: dict) -> list[str]:
    """A classification checkpoint (train.py's or DeiT's, under "model"; timm's state dict alone), in any PE
    mode, into the adapter's ViT, through training.finetune.load_pretrained: pos_embed resized to the
    ViT's img_size grid, its class slot kept, dropped or added as the mode needs. Returns its notes: what is
    new here (LayerScale, any LN'_l the checkpoint lacks) and what was not used (the head, the class token,
    the Last LN unless last_pe_at="last_ln", another mode's PE norms), and the class slot left unread."""
    notes = load_pretrained(adapter.vit, checkpoint)
    if adapter.vit.cfg.pool == "cls":
        notes.append("unread: pos_embed's class slot (ViT-Adapter sets the class token aside)")
    return notes
