"""Shared building blocks for the single-file self-supervised methods of this repository.

This is the only module the method files (simclr.py, mae.py, igpt.py, gcrl.py, can.py,
contrastive_props.py, eval_probe.py) import. Copy it together with one method file and that
method runs anywhere. Sections, top to bottom:

1. Vision Transformer pieces (timm parameter names, fixed 2D sin-cos positions, SDPA attention)
   and the masked-autoencoder plumbing shared by MAE and CAN (random_masking, patchify, decoder).
2. Axial attention (GCRL Appendix Algorithm 1) and the pixel-token embedding of iGPT / GCRL.
3. Color quantizer (iGPT's 512-color palette).
4. Contrastive pieces shared by SimCLR, CAN, GCRL: NT-Xent, projection heads, LARS, kNN monitor.
5. Augmentations: per-image torchvision v2 pipelines and a batched on-device version.
6. Datasets.
7. Training batches (on-device or DataLoader), distributed helpers.
8. Training utilities: dataclass -> argparse, LR schedule, param groups, bf16 autocast,
   atomic checkpoints with exact resume, run folder logging, throughput / FLOPs / MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
import json
import math
import os
import pickle
import random
import sys
import time
import typing
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

# ======================================================================================
# 1. Vision Transformer
# ======================================================================================

# (embed_dim, depth, num_heads); patch size is a separate argument (SPEC 1.1, ViT / MAE papers).
VIT_ARCHS = {
    "vit_micro": (128, 4, 4),  # CPU-only preset for tests and smoke runs (not from a paper)
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}
VIT_ALIASES = {"vit_t": "vit_tiny", "vit_s": "vit_small", "vit_b": "vit_base", "vit_l": "vit_large", "vit_h": "vit_huge"}


def vit_arch(name: str) -> tuple[int, int, int]:
    """(embed_dim, depth, num_heads) of a ViT preset; accepts short aliases such as vit_b / vit_l."""
    key = VIT_ALIASES.get(name, name)
    if key not in VIT_ARCHS:
        valid = ", ".join(list(VIT_ARCHS) + list(VIT_ALIASES))
        raise ValueError(f"unknown ViT arch '{name}'; choose one of: {valid}")
    return VIT_ARCHS[key]


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1D sin-cos embedding (MAE layout): (M,) positions -> (M, dim) = [sin(pos*w_t) | cos(pos*w_t)],
    w_t = 1 / 10000^(t / (dim/2)), t = 0 .. dim/2-1. Computed in float64 like the reference numpy code."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2D sin-cos positions of a g x g patch grid (MAE ref code): token k = i*g + j (row-major);
    dims [:dim/2] encode the column j, dims [dim/2:] the row i. Returns (g*g [+1], dim) float32, a zero row
    first for the cls token when `cls_token`."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows = torch.arange(grid_size).repeat_interleave(grid_size)  # i of token k
    cols = torch.arange(grid_size).repeat(grid_size)  # j of token k
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, L, D) with L = (H/p)*(W/p), row-major patches; a strided conv named `proj` (timm)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"image size {img_size} is not divisible by patch size {patch_size}; "
                f"pick --image-size as a multiple of --patch-size"
            )
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash / memory-efficient
    kernels on GPU). qkv with bias, output `proj` (timm names). x: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, x: torch.Tensor, is_causal: bool) -> torch.Tensor:
        """The bare MSA (qkv -> softmax(qk^T/sqrt(d)) v -> proj) over the second axis of x (B, N, D)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        return self.proj_drop(self.attend(x, is_causal))


class AxialAttention(Attention):
    """Causal axial attention of GCRL (Appendix Algorithm 1): ONE multi-head attention (one qkv/proj)
    applied three times to the token grid h = x.view(B, H, W, D):

        h_a = MSA(rows of h, causal=False)        # each row attends within itself
        h_a = MSA(columns of h_a, causal=True)    # each position attends up its column
        h_a = shift_down(h_a)                     # row r now only carries rows < r (zeros on top)
        out = MSA(rows of (h + h_a), causal=True) # causal along the row, plus everything above

    Output (r, c) depends on inputs at raster positions <= r*W + c only; with the SOS shift of the input
    sequence (PixelEmbedding) the model is autoregressive in raster order. Cost O(HW(H+W)) instead of
    O((HW)^2). `mode="dense"` uses plain causal attention over the H*W sequence with the same weights
    (GCRL Table 11 compares both). With is_causal=False (BERT objective) the three passes are unmasked
    and there is no shift. x: (B, H*W, D) -> (B, H*W, D)."""

    def __init__(self, dim: int, num_heads: int, height: int, width: int, mode: str = "axial", **kw):
        super().__init__(dim, num_heads, **kw)
        if mode not in ("axial", "dense"):
            raise ValueError(f"unknown attention mode '{mode}'; use 'axial' or 'dense'")
        self.height, self.width, self.mode = height, width, mode

    def forward(self, x: torch.Tensor, is_causal: bool = True) -> torch.Tensor:
        if self.mode == "dense":
            return self.proj_drop(self.attend(x, is_causal))
        B, L, D = x.shape
        H, W = self.height, self.width
        if L != H * W:
            raise ValueError(f"axial attention built for a {H}x{W} grid got a sequence of {L} tokens")
        h = x.view(B, H, W, D)
        a = self.attend(h.reshape(B * H, W, D), is_causal=False).view(B, H, W, D)
        a = self.attend(a.transpose(1, 2).reshape(B * W, H, D), is_causal=is_causal).view(B, W, H, D).transpose(1, 2)
        if is_causal:
            a = F.pad(a, (0, 0, 0, 0, 1, 0))[:, :H]  # shift down by one row
        out = self.attend((h + a).reshape(B * H, W, D), is_causal=is_causal)
        return self.proj_drop(out.reshape(B, L, D))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (timm names)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2, self.drop = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN transformer block (SPEC 1.1): x = x + drop(attn(norm1(x))); x = x + drop(mlp(norm2(x))).
    LayerNorm eps 1e-6, MLP ratio 4, GELU. `attention="axial"|"axial_dense"` uses AxialAttention on an
    (H, W) = `grid` token layout; "dense" is plain attention (optionally causal)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attention: str = "dense",
        grid: tuple[int, int] | None = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if attention == "dense":
            self.attn = Attention(dim, num_heads, attn_drop=drop, proj_drop=drop)
        elif attention in ("axial", "axial_dense"):
            if grid is None:
                raise ValueError("axial attention needs grid=(height, width)")
            mode = "axial" if attention == "axial" else "dense"
            self.attn = AxialAttention(dim, num_heads, grid[0], grid[1], mode=mode, attn_drop=drop, proj_drop=drop)
        else:
            raise ValueError(f"unknown attention '{attention}'; use dense, axial or axial_dense")
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), is_causal=is_causal)
        return x + self.mlp(self.norm2(x))


def init_vit_weights(module: nn.Module) -> None:
    """MAE init (ref code): xavier_uniform Linear weights, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """ViT encoder with timm's parameter names (patch_embed.proj, cls_token, pos_embed, blocks.i.*, norm) so
    its state_dict loads into timm.models.vision_transformer.VisionTransformer(num_classes=0) of the same
    size. Positions are the fixed 2D sin-cos table (MAE), stored as a frozen parameter like MAE/timm.

    forward(x, mask_ratio=0) -> (tokens, mask, ids_restore): tokens (B, 1 + L_keep, D) after the final norm
    (cls first), mask (B, L) with 1 = removed, ids_restore (B, L). With mask_ratio 0 nothing is removed and
    tokens keep the spatial order."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
    ):
        super().__init__()
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = sincos_2d(embed_dim, self.patch_embed.grid_size, cls_token=True)[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed (MAE); a parameter so timm loads it
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, drop) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_vit_weights(self)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE: init the patch conv like a Linear
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None):
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        B, L, _ = x.shape
        if mask_ratio > 0:
            x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        else:
            mask = x.new_zeros(B, L)
            ids_restore = torch.arange(L, device=x.device).expand(B, L)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """MAE per-image random masking by argsort of uniform noise (ref code): keep exactly
    int(L * (1 - mask_ratio)) tokens per image, those with the smallest noise, in noise order.
    x: (N, L, D) -> x_kept (N, L_keep, D), mask (N, L) with 0 = keep, 1 = removed, ids_restore (N, L)
    such that gathering [x_kept, filler] with ids_restore puts every token back at its position."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))
    mask = torch.ones(N, L, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C); patches row-major, inside a patch (row, col, channel) with the channel
    fastest (MAE 'nchpwq->nhwpqc')."""
    N, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not divisible by patch size {p}")
    x = imgs.reshape(N, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(N, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """Inverse of patchify for a square grid: (N, L, p*p*C) -> (N, C, H, W)."""
    N, L, _ = x.shape
    g = int(round(math.sqrt(L)))
    if g * g != L:
        raise ValueError(f"unpatchify expects a square grid, got {L} patches")
    x = x.reshape(N, g, g, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(N, channels, g * p, g * p)


class MaskedDecoder(nn.Module):
    """MAE decoder (ref code, 512 wide / 8 blocks / 16 heads by default): project the visible encoder tokens,
    append one learned mask token per removed patch, unshuffle with ids_restore, add fixed sin-cos positions,
    run the blocks, predict p*p*C values per patch. `token_bias` (N, decoder_dim) is added to every token
    after the positions (CAN's noise-level embedding). Returns (N, L, out_dim) without the cls slot."""

    def __init__(
        self, num_patches: int, embed_dim: int, out_dim: int, dim: int = 512, depth: int = 8, num_heads: int = 16
    ):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = int(round(math.sqrt(num_patches)))
        self.pos_embed = nn.Parameter(sincos_2d(dim, grid, cls_token=True)[None], requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        init_vit_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor, token_bias: torch.Tensor | None = None):
        x = self.embed(x)  # (N, 1 + L_keep, dim), cls first
        N, L = ids_restore.shape
        fill = self.mask_token.expand(N, L + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], fill], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        if token_bias is not None:
            x = x + token_bias[:, None, :]
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


class PixelEmbedding(nn.Module):
    """Input embedding of the pixel-token transformers (iGPT, GCRL 3.2): token embedding (K -> D), learned SOS
    vector, learned 2D positions (row + column table) added after the tokens.

    forward(tokens (B, H*W) raster order) -> (B, H*W, D). shift=True (autoregressive): the sequence is
    [SOS, t_0 .. t_{n-2}] so position p only sees tokens < p. keep (B, H*W) bool (BERT objective): embeddings of
    removed tokens are zeroed (iGPT ref code) and there is no shift."""

    def __init__(self, vocab_size: int, dim: int, height: int, width: int):
        super().__init__()
        self.height, self.width = height, width
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.sos = nn.Parameter(torch.zeros(dim))
        self.pos_row = nn.Parameter(torch.zeros(height, dim))
        self.pos_col = nn.Parameter(torch.zeros(width, dim))
        nn.init.normal_(self.tok_embed.weight, std=0.02)  # iGPT ref code: wte, sos N(0, 0.02); wpe N(0, 0.01)
        nn.init.normal_(self.sos, std=0.02)
        nn.init.normal_(self.pos_row, std=0.01)
        nn.init.normal_(self.pos_col, std=0.01)

    def positions(self) -> torch.Tensor:
        """(H*W, D): row embedding of i plus column embedding of j at raster position i*W + j."""
        return (self.pos_row[:, None, :] + self.pos_col[None, :, :]).reshape(self.height * self.width, -1)

    def forward(self, tokens: torch.Tensor, shift: bool = True, keep: torch.Tensor | None = None) -> torch.Tensor:
        h = self.tok_embed(tokens)
        if keep is not None:
            h = h * keep[..., None].to(h.dtype)
        if shift:
            h = torch.cat([self.sos.expand(h.shape[0], 1, -1), h[:, :-1]], dim=1)
        return h + self.positions()


# ======================================================================================
# 3. Color quantizer (iGPT)
# ======================================================================================


class ColorQuantizer(nn.Module):
    """iGPT color palette: K RGB centers in [-1, 1] (pixels mapped by x/127.5 - 1). encode = nearest center
    by squared Euclidean distance; decode = rint(127.5 * (center + 1)) as uint8. The palette is saved as a
    (K, 3) .npy in [-1, 1], the format of iGPT's released kmeans_centers.npy."""

    def __init__(self, centers: torch.Tensor | np.ndarray):
        super().__init__()
        centers = torch.as_tensor(np.asarray(centers), dtype=torch.float32)
        if centers.ndim != 2 or centers.shape[1] != 3:
            raise ValueError(f"a palette must have shape (K, 3), got {tuple(centers.shape)}")
        self.register_buffer("centers", centers)

    @property
    def num_colors(self) -> int:
        return self.centers.shape[0]

    @staticmethod
    def to_unit(images: torch.Tensor) -> torch.Tensor:
        """uint8 in [0, 255] or float in [0, 1] -> float in [-1, 1]."""
        if images.dtype == torch.uint8:
            return images.float() / 127.5 - 1
        return images.float() * 2 - 1

    def nearest(self, pixels: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """pixels (M, 3) in [-1, 1] -> index of the nearest center (M,), chunked to bound memory."""
        c = self.centers.to(pixels.device)
        c2 = (c * c).sum(1)
        out = [torch.argmin(c2[None] - 2 * p @ c.T, dim=1) for p in pixels.split(chunk)]  # |p|^2 is constant
        return torch.cat(out) if out else pixels.new_zeros(0, dtype=torch.long)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) uint8 or float [0, 1] -> tokens (B, H*W) int64 in raster order."""
        B, C, H, W = images.shape
        pixels = self.to_unit(images).permute(0, 2, 3, 1).reshape(-1, 3)
        return self.nearest(pixels).view(B, H * W)

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """tokens (B, H*W) -> uint8 images (B, 3, H, W)."""
        rgb = self.centers.to(tokens.device)[tokens]  # (B, H*W, 3)
        rgb = torch.round(127.5 * (rgb + 1)).clamp(0, 255).to(torch.uint8)
        return rgb.view(-1, height, width, 3).permute(0, 3, 1, 2).contiguous()

    @classmethod
    def fit(
        cls, pixels: torch.Tensor, num_colors: int = 512, iters: int = 20, seed: int = 0, init: str = "kmeans++"
    ) -> ColorQuantizer:
        """k-means on pixels (M, 3) (uint8 or float [0, 1]; on the GPU if they are there). Init: k-means++ or
        random data points; empty clusters are re-seeded with random data points each iteration."""
        x = cls.to_unit(pixels.reshape(-1, 3))
        g = torch.Generator(device="cpu").manual_seed(seed)
        M = x.shape[0]
        if init == "random":
            centers = x[torch.randint(M, (num_colors,), generator=g).to(x.device)].clone()
        elif init == "kmeans++":
            centers = x.new_empty(num_colors, 3)
            centers[0] = x[torch.randint(M, (1,), generator=g).item()]
            d2 = ((x - centers[0]) ** 2).sum(1)
            for k in range(1, num_colors):
                total = d2.sum()
                if total <= 0:  # fewer distinct colors than centers: duplicate a random point
                    idx = torch.randint(M, (1,), generator=g).item()
                else:
                    u = torch.rand(1, generator=g).item() * total.item()
                    idx = min(int(torch.searchsorted(torch.cumsum(d2, 0), torch.tensor([u], device=x.device))), M - 1)
                centers[k] = x[idx]
                d2 = torch.minimum(d2, ((x - centers[k]) ** 2).sum(1))
        else:
            raise ValueError(f"unknown k-means init '{init}'; use kmeans++ or random")
        quant = cls(centers)
        for _ in range(iters):
            assign = quant.nearest(x)
            sums = torch.zeros_like(centers).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=num_colors).to(x.dtype)
            empty = counts == 0
            centers = sums / counts.clamp(min=1)[:, None]
            if empty.any():
                centers[empty] = x[torch.randint(M, (int(empty.sum()),), generator=g).to(x.device)]
            quant.centers.copy_(centers)
        return quant

    def distortion(self, pixels: torch.Tensor) -> float:
        """Mean squared distance (in [-1, 1] units) between pixels (M, 3) and their nearest center."""
        x = self.to_unit(pixels.reshape(-1, 3))
        return ((x - self.centers.to(x.device)[self.nearest(x)]) ** 2).sum(1).mean().item()

    def save(self, path: str) -> None:
        np.save(path, self.centers.detach().cpu().numpy().astype(np.float32))

    @classmethod
    def load(cls, path: str) -> ColorQuantizer:
        if not os.path.exists(path):
            raise FileNotFoundError(f"palette file {path} not found (expected a (K, 3) .npy like kmeans_centers.npy)")
        centers = np.load(path)
        if centers.ndim != 2 or centers.shape[1] != 3 or np.abs(centers).max() > 1.0001:
            raise ValueError(f"{path} is not a palette: need shape (K, 3) with values in [-1, 1], got {centers.shape}")
        return cls(centers)


# ======================================================================================
# 4. Contrastive pieces (SimCLR, CAN, GCRL)
# ======================================================================================


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent / InfoNCE of SimCLR (= GCRL eq. 3 = CAN 3.2) over 2N views, negatives from every rank.

    z1, z2: (n, d) local projections of the two views (not yet normalized). With z = normalize([z1; z2]) and
    the candidates Z = all ranks' z gathered WITH gradient, each local anchor i has
        loss_i = -log( exp(z_i.z_pos / t) / sum_{k != i} exp(z_i.Z_k / t) ),
    the positive being the other view of the same image; the result is the mean over the 2n local anchors.
    Averaged over ranks (as DDP does with gradients) it equals the loss of one process on the concatenated
    batch. The TF reference reports 2x this value (mean of each direction, summed). Computed in fp32."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    candidates = gather_with_grad(z)
    logits = z @ candidates.T / temperature  # (2n, 2n * world)
    idx = torch.arange(2 * n, device=z.device)
    self_col = rank * 2 * n + idx
    logits = logits.masked_fill(F.one_hot(self_col, logits.shape[1]).bool(), float("-inf"))
    positive = rank * 2 * n + (idx + n) % (2 * n)
    return F.cross_entropy(logits, positive)


class ProjectionHead(nn.Module):
    """Projection MLPs. kind="bn" (SimCLR v2 / CAN App. C): [Linear(no bias) - BN - ReLU] x (layers-1), then
    Linear(no bias) - BN without shift (SimCLR v2: center=False). kind="ln" (GCRL): Linear - LayerNorm - ReLU,
    then Linear. BN momentum 0.1 in PyTorch = TF decay 0.9 (SimCLR / CAN). in: (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 128, num_layers: int = 3, kind: str = "bn"):
        super().__init__()
        if kind not in ("bn", "ln"):
            raise ValueError(f"unknown projection head '{kind}'; use bn (SimCLR v2 / CAN) or ln (GCRL)")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            if kind == "bn":
                layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            else:
                layers += [nn.Linear(dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=kind != "bn"))
        if kind == "bn":
            last_bn = nn.BatchNorm1d(out_dim)
            last_bn.bias.requires_grad_(False)  # scale but no shift (SimCLR v2 center=False); bias stays 0
            layers.append(last_bn)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LARS(torch.optim.Optimizer):
    """LARS (You et al.) as in SimCLR / MoCo v3 / MAE linear probing: for parameters with ndim > 1,
    d = g + wd * p, d *= trust * ||p|| / ||d|| (1 if a norm is 0); biases and norm parameters (ndim <= 1)
    get neither weight decay nor adaptation. Then mu = momentum * mu + d; p -= lr * mu."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, trust: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    q = torch.where((p_norm > 0) & (d_norm > 0), group["trust"] * p_norm / d_norm, torch.ones_like(p_norm))
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN on cosine similarity (Wu et al. 2018, as in DINO / SimCLR monitors): each of the k nearest
    training features votes for its class with weight exp(sim / t). Returns class scores (N_test, C)."""
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for q in F.normalize(test_feats.float(), dim=1).split(chunk):
        sim, idx = (q @ train.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        scores.append(votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp()))
    return torch.cat(scores)

# ======================================================================================
# 7. Training batches and distributed helpers
# ======================================================================================

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> standardized with per-channel mean/std (ImageNet's, as MAE/CAN)."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return x * s + m


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Works under `python x.py` (world size 1) and `torchrun` (env:// RANK / WORLD_SIZE / LOCAL_RANK), one or
    many nodes. NCCL on CUDA, gloo on CPU. device: auto (CUDA when available) | cuda | cpu."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        kw = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", **kw)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    return DistInfo(rank, local_rank, world, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on my slice: sum their gradients
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 that keeps gradients: (n, ...) -> (n * world, ...) ordered by rank; backward
    returns to each rank the sum over ranks of the upstream gradient of its own slice. (Plain dist.all_gather
    returns tensors without grad_fn, which silently drops the negatives' gradients.) Identity when not
    distributed. Every rank must pass the same n."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a (metric) tensor, no gradient."""
    if dist.is_available() and dist.is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def convert_sync_batchnorm(model: nn.Module, info: DistInfo) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when running on several processes (statistics over the global batch, as
    SimCLR's global BN); unchanged on one process."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if info.world_size > 1 else model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and/or torch.compile wrappers (checkpoints never carry module./_orig_mod.)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def epoch_indices(n: int, epoch: int, seed: int, rank: int, world: int, batch_per_rank: int) -> torch.Tensor:
    """This rank's sample indices for one epoch: a global permutation seeded by (seed, epoch), cut to whole
    global batches (drop_last), global batch b = perm[b*G:(b+1)*G] with rank r taking the r-th slice of it.
    Deterministic, so a resumed run sees exactly the batches it would have seen."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    G = batch_per_rank * world
    steps = n // G
    if steps == 0:
        raise ValueError(f"dataset of {n} images is smaller than one global batch of {G}; lower --batch-size")
    perm = perm[: steps * G].view(steps, world, batch_per_rank)
    return perm[:, rank].reshape(-1)


class _ViewsDataset(torch.utils.data.Dataset):
    def __init__(self, base, transforms):
        self.base, self.transforms = base, transforms

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return tuple(t(img) for t in self.transforms), label


class TrainBatches:
    """Augmented training batches for this rank: `for views, labels in batches.epoch(e, start_step)`.

    views is a list (one per entry of `kinds`, e.g. ["simclr", "simclr"]) of float (B, 3, S, S) tensors in [0, 1]
    on the device; labels (B,) int64. Small datasets (an ImageArray of <= 64 px) live on the device as uint8 and
    are augmented there in one batched call per view (BatchedAugment, independent parameters per image, no
    DataLoader); larger ones go through DataLoader workers running the per-image pipelines. Both use
    epoch_indices, so the data order does not depend on the path and resumes exactly."""

    def __init__(
        self,
        dataset,
        kinds: list[str],
        image_size: int,
        batch_per_rank: int,
        info: DistInfo,
        seed: int = 0,
        on_device: bool | None = None,
        num_workers: int = 8,
        aug_kwargs: dict | None = None,
    ):
        self.dataset, self.kinds, self.batch, self.info, self.seed = dataset, kinds, batch_per_rank, info, seed
        self.on_device = fits_on_device(dataset) if on_device is None else on_device
        aug_kwargs = aug_kwargs or {}
        if self.on_device:
            self.images = dataset.images.to(info.device)
            self.labels = dataset.labels.to(info.device)
            self.augs = [BatchedAugment(k, image_size, **aug_kwargs) for k in kinds]
        else:
            self.views = _ViewsDataset(dataset, [per_image_transform(k, image_size, **aug_kwargs) for k in kinds])
            self.num_workers = num_workers
        self.steps_per_epoch = len(dataset) // (batch_per_rank * info.world_size)
        epoch_indices(len(dataset), 0, seed, info.rank, info.world_size, batch_per_rank)  # validates the size

    def epoch(self, epoch: int, start_step: int = 0):
        idx = epoch_indices(len(self.dataset), epoch, self.seed, self.info.rank, self.info.world_size, self.batch)
        idx = idx[start_step * self.batch :]
        if self.on_device:
            idx = idx.to(self.info.device)
            for b in idx.split(self.batch):
                x = self.images[b]
                yield [aug(x) for aug in self.augs], self.labels[b]
        else:
            loader = torch.utils.data.DataLoader(
                self.views,
                batch_size=self.batch,
                sampler=idx.tolist(),
                num_workers=self.num_workers,
                pin_memory=self.info.device.type == "cuda",
                drop_last=True,
                persistent_workers=False,
            )
            for views, labels in loader:
                dev = self.info.device
                yield [v.to(dev, non_blocking=True) for v in views], labels.to(dev, non_blocking=True)


def eval_batches(dataset, image_size: int, batch_size: int, device, num_workers: int = 4):
    """Un-augmented batches in dataset order: (x float (B, 3, S, S) in [0, 1] on device, labels (B,))."""
    if isinstance(dataset, ImageArray):
        for s in range(0, len(dataset), batch_size):
            x = dataset.images[s : s + batch_size].to(device)
            x = x.float() / 255
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if x.shape[-1] != image_size or x.shape[-2] != image_size:
                x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
            yield x.clamp(0, 1), dataset.labels[s : s + batch_size].to(device)
    else:
        views = _ViewsDataset(dataset, [per_image_transform("eval", image_size)])
        loader = torch.utils.data.DataLoader(views, batch_size=batch_size, num_workers=num_workers)
        for (x,), labels in loader:
            yield x.to(device), labels.to(device)


# ======================================================================================
# 8. Training utilities
# ======================================================================================


def arg(default, help: str, choices: list | None = None):
    """A dataclass field with its help text (shown by --help); mutable defaults are copied per instance."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got '{s}'")


def parse_args(cls, argv: list[str] | None = None, presets: dict[str, dict[str, dict]] | None = None):
    """Build an argparse parser from a dataclass (each field -> --field-name with its help text and default),
    parse argv, and return an instance. `presets` maps a field name (e.g. "arch" or "preset") to
    {value: {field: default, ...}}: when the chosen value has an entry, those fields take the preset's value
    unless they were given explicitly on the command line (explicit > preset > dataclass default)."""
    presets = presets or {}
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        description=(cls.__doc__ or "").strip(), formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        origin, targs = typing.get_origin(tp), typing.get_args(tp)
        optional = type(None) in targs
        if optional:
            tp = next(a for a in targs if a is not type(None))
            origin, targs = typing.get_origin(tp), typing.get_args(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f.metadata.get("help", "")
        if f.name in presets:
            helptext += f" (presets: {', '.join(presets[f.name])})"
        kw = dict(default=default, help=helptext, dest=f.name)
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        name = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
            continue
        if origin in (list, tuple):
            elem = targs[0] if targs else str
            kw["nargs"] = "+"
            kw["type"] = elem
        else:
            kw["type"] = tp
        if optional:
            base = kw["type"]
            kw["type"] = lambda s, base=base: None if s.lower() == "none" else base(s)
        parser.add_argument(name, **kw)
    ns = parser.parse_args(argv)
    # which fields were given explicitly: parse again with every default suppressed
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    explicit = vars(parser.parse_args(argv))
    values = vars(ns)
    for key, table in presets.items():
        chosen = values[key]
        for name, value in table.get(chosen, {}).items():
            if name not in explicit:
                values[name] = value
    for f in dataclasses.fields(cls):
        if f.name in values and isinstance(values[f.name], list) and typing.get_origin(hints[f.name]) is tuple:
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """lr = base_lr * global_batch / 256 (Goyal et al.; MAE / CAN convention)."""
    return base_lr * global_batch / 256


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Per-iteration schedule: linear warmup from 0 to peak_lr over warmup_steps, then half-cosine to min_lr at
    total_steps (MAE util/lr_sched.py, per iteration instead of per fractional epoch)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups(model: nn.Module, weight_decay: float, no_decay: tuple[str, ...] = ()) -> list[dict]:
    """AdamW groups: no weight decay on 1-D parameters (norms, biases) nor on parameters whose name contains one
    of `no_decay` (e.g. token / position embeddings for GCRL); frozen parameters are left out (MAE / timm)."""
    decay, skip = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in no_decay):
            skip.append(p)
        else:
            decay.append(p)
    return [{"params": skip, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_adamw(params, lr: float, betas=(0.9, 0.95), device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW, fused on CUDA (one kernel for all parameters)."""
    fused = device is not None and torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), fused=fused)


def autocast(device, enabled: bool = True):
    """bf16 autocast on the given device (CUDA or CPU); no GradScaler is needed for bf16."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def check_finite(step: int, terms: dict[str, torch.Tensor | float]) -> None:
    """Stop training on a non-finite loss, naming the step and every term; called before any checkpoint."""
    vals = {k: float(v) for k, v in terms.items()}
    if not all(math.isfinite(v) for v in vals.values()):
        shown = ", ".join(f"{k}={v:.4g}" for k, v in vals.items())
        raise FloatingPointError(
            f"non-finite loss at step {step}: {shown}. No checkpoint was written over the last good one; "
            f"lower the learning rate or disable bf16 (--no-amp) and resume with --resume auto."
        )


def get_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic write: temp file in the same folder, fsync, rename over the old file. Refuses a model with NaN/Inf
    so a diverged run never replaces the last good checkpoint."""
    for name, t in state.get("model", {}).items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            raise FloatingPointError(f"refusing to save {path}: parameter {name} is not finite")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str, method: str | None = None, map_location="cpu") -> dict:
    """Load a checkpoint dict; clear errors for a missing file, a file that is not one of ours, or a checkpoint
    written by another method's script."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or "method" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this repository (no 'method'/'model' entries)")
    if method is not None and ckpt["method"] != method:
        raise ValueError(
            f"{path} is a '{ckpt['method']}' checkpoint, not '{method}': resume it with {ckpt['method']}.py, "
            f"or point --resume at a {method}.py run"
        )
    return ckpt


def resolve_resume(resume: str, run_dir: str) -> str | None:
    """--resume auto -> run_dir/checkpoint.pt when it exists (else start fresh); '' -> None; a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(run_dir, "checkpoint.pt")
        return path if os.path.exists(path) else None
    if not os.path.exists(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint (use --resume auto to pick up the run folder)")
    return resume


def _gather_objects(obj, info: DistInfo) -> list:
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def save_training_state(
    run_dir: str, method: str, args, model: nn.Module, optimizer, step: int, epoch: int, info: DistInfo, **extra
) -> None:
    """Collective (every rank calls it): gathers each rank's RNG states, rank 0 writes run_dir/checkpoint.pt =
    {method, args, model (unwrapped), optimizer, rng (list by rank), step, epoch, **extra}."""
    rngs = _gather_objects(get_rng_state(), info)
    if info.is_main:
        state = {
            "method": method,
            "args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args),
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rngs,
            "step": step,
            "epoch": epoch,
            **extra,
        }
        save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), state)
    if info.world_size > 1:
        dist.barrier()


def load_training_state(path: str, method: str, model: nn.Module, optimizer, info: DistInfo) -> dict:
    """Restore model, optimizer and this rank's RNG states from `path`; returns the checkpoint (step, epoch...)."""
    ckpt = load_checkpoint(path, method)
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    rngs = ckpt.get("rng", [])
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank])
    else:  # a different world size cannot replay the same streams; derive fresh ones deterministically
        print0(f"resuming on {info.world_size} ranks from a {len(rngs)}-rank checkpoint: RNG streams re-seeded")
        seed_everything(ckpt["step"] * 1000 + info.rank)
    return ckpt


def default_run_name(method: str, args) -> str:
    parts = [method, getattr(args, "dataset", ""), getattr(args, "arch", ""), f"s{getattr(args, 'seed', 0)}"]
    return "_".join(p for p in parts if p)


class RunLogger:
    """Rank-0 run folder: args.json, metrics.jsonl (one JSON object per log call) and TensorBoard events when
    the optional tensorboard package is installed. No-op on other ranks."""

    def __init__(self, run_dir: str, args, enabled: bool = True):
        self.run_dir, self.enabled, self.tb = run_dir, enabled, None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args), f, indent=2)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(run_dir)
        except ImportError:  # tensorboard is optional
            self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if torch.is_tensor(v) else v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class Throughput:
    """images/s between calls and the ETA of the run; `tick(images_done_globally)` returns (img/s, eta string)."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total, self.last_step, self.t0 = total_steps, start_step, time.perf_counter()
        self.images = 0

    def tick(self, step: int, images: int) -> tuple[float, str]:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        ips = images / dt
        steps = max(step - self.last_step, 1)
        eta = (self.total - step) * dt / steps
        self.t0, self.last_step = now, step
        return ips, str(datetime.timedelta(seconds=int(eta)))


# Peak dense bf16 tensor-core FLOP/s per GPU (vendor datasheets) for MFU; matched by substring of the name.
GPU_PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores (no bf16 on V100)
}


def gpu_peak_flops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_BF16_FLOPS.items() if k in name), None)


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call of fn (forward and, if fn calls backward, backward) by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def mfu(flops_per_image: float, images_per_s_per_gpu: float, device) -> float | None:
    """Model FLOPs utilization = achieved FLOP/s / peak FLOP/s of this GPU (None when the peak is unknown)."""
    peak = gpu_peak_flops(device)
    return None if peak is None else flops_per_image * images_per_s_per_gpu / peak


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 8) -> None:
    """images (B, 3, H, W) uint8 or float in [0, 1] -> PNG grid (rows of nrow)."""
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    grid = torchvision.utils.make_grid(images.cpu(), nrow=nrow, padding=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torchvision.io.write_png(grid, path)
