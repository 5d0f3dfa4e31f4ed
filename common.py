"""Shared building blocks for the single-file self-supervised methods of this repository.

This is the only module the method files (simclr.py, mae.py, igpt.py, gcrl.py, can.py,
contrastive_props.py, eval_probe.py) import. Copy it together with one method file and that
method runs anywhere. Sections, top to bottom:

1. Vision Transformer pieces (timm parameter names, fixed 2D sin-cos positions, SDPA attention, one
   gradient-checkpointing switch) and the masked-autoencoder pieces of MAE and CAN (random_masking, the
   reconstruction loss, patchify, the decoder).
2. Axial attention (GCRL Appendix Algorithm 1) and the pixel-token embedding of iGPT / GCRL.
3. Color quantizer (iGPT's 512-color palette) and the pixel-token helpers of igpt.py and gcrl.py: palette fit /
   cache, quantize, token NLL, bits per token, sampling, log-likelihood.
4. Contrastive pieces shared by SimCLR, CAN, GCRL: gather_with_grad beside NT-Xent, projection heads, LARS,
   the kNN monitor and its class-balanced held-out data.
5. Augmentations: per-image torchvision v2 pipelines and a batched on-device version.
6. Datasets.
7. Training batches (on-device or DataLoader), the monitors' held-out subsets, distributed helpers.
8. Training utilities: dataclass -> argparse with presets, LR schedule, param groups, bf16 autocast, atomic
   checkpoints with exact resume, the run logger (progress line, throughput, MFU), FLOPs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import functools
import gzip
import json
import math
import os
import pickle
import random
import shutil
import struct
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
from einops import rearrange
from torch.utils.checkpoint import checkpoint
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
VIT_ALIASES = dict(vit_t="vit_tiny", vit_s="vit_small", vit_b="vit_base", vit_l="vit_large", vit_h="vit_huge")
VIT_CHOICES = list(VIT_ARCHS) + list(VIT_ALIASES)  # the --arch choices of the ViT methods


def vit_arch(name: str) -> tuple[int, int, int]:
    """(embed_dim, depth, num_heads) of a ViT preset; accepts short aliases such as vit_b / vit_l."""
    key = VIT_ALIASES.get(name, name)
    if key not in VIT_ARCHS:
        raise ValueError(f"unknown ViT arch '{name}'; choose one of: {', '.join(VIT_CHOICES)}")
    return VIT_ARCHS[key]


def sincos_2d(dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2D sin-cos positions of a g x g patch grid (MAE ref code) -> (g*g, dim) float32, plus a zero row first
    for the cls token when `cls_token`. Token k = i*g + j (row-major) gets [sin(j w) | cos(j w) | sin(i w) | cos(i w)],
    w_t = 1 / 10000^(t / (dim/4)), t = 0 .. dim/4 - 1, computed in float64 like the reference numpy code."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    steps = torch.arange(grid_size, dtype=torch.float64)
    col = steps.repeat(grid_size)[:, None] * omega  # j of token k
    row = steps.repeat_interleave(grid_size)[:, None] * omega  # i of token k
    emb = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1).float()
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
        self.img_size, self.grid_size = img_size, img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU);
    `qkv` (with bias) and `proj` as timm names them. x: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, x: torch.Tensor, is_causal: bool, batch: int | None = None) -> torch.Tensor:
        """The bare MSA (qkv -> softmax(qk^T/sqrt(d)) v -> proj) over the middle axis of x (B, N, D) -> (B, N, D).
        With `batch` (AxialAttention: x is (batch*A, N, D), A sequences of N tokens per image) the heads are merged
        straight into the transposed layout (batch*N, A, D): the one copy that merging the heads makes anyway also
        turns rows into columns (and back), so the axial passes need no copies of their own."""
        BA, N, D = x.shape
        q, k, v = self.qkv(x).view(BA, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=is_causal)  # (BA, heads, N, hd)
        if batch is None:
            return self.proj(out.transpose(1, 2).reshape(BA, N, D))
        return self.proj(rearrange(out, "(b a) n l e -> (b l) a (n e)", b=batch))

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        return self.proj_drop(self.attend(x, is_causal))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (timm names)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, hidden), nn.GELU()
        self.fc2, self.drop = nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN transformer block (SPEC 1.1): x = x + drop(attn(norm1(x))); x = x + drop(mlp(norm2(x))), LayerNorm eps
    1e-6, GELU. attention: "dense" (plain, optionally causal) or "axial" / "axial_dense" (AxialAttention in mode
    "axial" / "dense" on an (H, W) = `grid` token layout)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio=4.0, drop=0.0, attention="dense", grid=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if attention == "dense":
            self.attn = Attention(dim, num_heads, attn_drop=drop, proj_drop=drop)
        elif attention in ("axial", "axial_dense"):
            if grid is None:
                raise ValueError("axial attention needs grid=(height, width)")
            mode = "axial" if attention == "axial" else "dense"
            self.attn = AxialAttention(dim, num_heads, *grid, mode=mode, attn_drop=drop, proj_drop=drop)
        else:
            raise ValueError(f"unknown attention '{attention}'; use dense, axial or axial_dense")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.grad_checkpointing = False  # see set_grad_checkpointing

    def _forward(self, x: torch.Tensor, is_causal: bool) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), is_causal=is_causal)
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(self._forward, x, is_causal, use_reentrant=False)
        return self._forward(x, is_causal)


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> nn.Module:
    """The one gradient-checkpointing switch: every Block in `model` recomputes its activations in the backward pass
    (torch.utils.checkpoint): same math, ~1/3 more compute, far less memory (ViT-L with 2 x 512 views per GPU)."""
    for m in model.modules():
        if isinstance(m, Block):
            m.grad_checkpointing = enable
    return model


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
    """ViT encoder with timm's parameter names (patch_embed.proj, cls_token, pos_embed, blocks.i.*, norm): its
    state_dict loads into timm's VisionTransformer(num_classes=0) of the same size. Positions: the fixed 2D sin-cos
    table (MAE), a frozen parameter as in MAE / timm. forward(x) -> tokens (B, 1 + L, D) after the final norm, cls
    first. MAE's and CAN's masked encoders use the pieces: embed_patches -> random_masking -> with_cls -> blocks."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = sincos_2d(embed_dim, self.patch_embed.grid_size, cls_token=True)[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed (MAE); a parameter so timm loads it
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_vit_weights(self)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE: init the patch conv like a Linear
        nn.init.normal_(self.cls_token, std=0.02)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> patch tokens (B, L, D) plus their positions (no cls)."""
        return self.patch_embed(x) + self.pos_embed[:, 1:]

    def with_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the cls token (plus its position) to tokens (B, n, D) -> (B, 1 + n, D)."""
        return torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.block_tokens(x, len(self.blocks) - 1))

    def block_tokens(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """All tokens (B, 1 + L, D), cls first, output by block `layer` (0-based) of the unmasked image, before the
        final norm: the per-block representation of the probes (eval_probe.py's best-layer sweep)."""
        if not 0 <= layer < len(self.blocks):
            raise ValueError(f"layer {layer} out of range: the encoder has {len(self.blocks)} blocks")
        x = self.with_cls(self.embed_patches(x))
        for block in self.blocks[: layer + 1]:
            x = block(x)
        return x


def export_encoder(args, method: str, prefix: str) -> dict:
    """--export-encoder PATH (mae, can, simclr): the keys under `prefix` ("encoder." / "backbone.") of --resume's
    checkpoint (auto / '': the run folder's), prefix removed, written as {"model": ...}. A ViT's names are timm's and
    MAE models_vit.py's: MAE's main_finetune.py / main_linprobe.py (--finetune PATH) load it with only head.* (and
    fc_norm.*) missing, timm's VisionTransformer(num_classes=0) with nothing missing; a ResNet has torchvision's."""
    run_dir = os.path.join(args.output_dir, args.run_name or default_run_name(method, args))
    source = args.resume if args.resume not in ("", "auto") else os.path.join(run_dir, "checkpoint.pt")
    state = load_checkpoint(source, method)["model"]
    encoder = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder:
        raise ValueError(f"{source} has no parameters under '{prefix}'")
    save_checkpoint(args.export_encoder, {"model": encoder})
    print0(f"wrote {len(encoder)} encoder tensors of {source} to {args.export_encoder} ({{'model': state_dict}})")
    return {"exported": args.export_encoder, "tensors": len(encoder)}


def keep_count(num_patches: int, mask_ratio: float) -> int:
    """Patches each image keeps: floor(L * (1 - r)) in exact arithmetic (r as the decimal it prints as). MAE's
    int(L * (1 - r)) agrees except where float error lands below an integer (L = 100, r = 0.9: 9 there, 10 here);
    MAE's and CAN's own settings (196 or 64 patches, r = 0.75 / 0.5) are exact either way."""
    from fractions import Fraction  # here, not at the top: the only user

    return math.floor(num_patches * (1 - Fraction(repr(float(mask_ratio)))))


def random_masking(x: torch.Tensor, mask_ratio: float, draws: torch.Tensor | None = None):
    """MAE per-image random masking by argsort of uniform draws (the ref code's `noise`): keep the keep_count(L, r)
    tokens with the smallest draws, in draw order. x (N, L, D), draws (N, L) (None: from the global RNG) -> x_kept
    (N, L_keep, D), mask (N, L) 0 = keep / 1 = removed, ids_restore (N, L): gathering [x_kept, filler] with it puts
    every token back at its position."""
    N, L, D = x.shape
    len_keep = keep_count(L, mask_ratio)
    if draws is None:
        draws = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(draws, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_kept = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, D))
    mask = torch.ones(N, L, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    return x_kept, torch.gather(mask, 1, ids_restore), ids_restore


def fixed_draws(count: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """(count, L) uniform masking draws from a private generator: the same masks at every evaluation (held-out loss,
    pictures), the training RNG untouched."""
    return torch.rand(count, num_patches, generator=torch.Generator().manual_seed(seed))


def normalized_target(target: torch.Tensor) -> torch.Tensor:
    """norm_pix_loss target (MAE Table 1c), fp32: each patch t (N, L, p*p*3) -> (t - mean(t)) / sqrt(var(t) + 1e-6),
    over the p*p*3 values of the patch, the variance UNBIASED (torch.var default, as the ref code)."""
    target = target.float()
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1e-6) ** 0.5


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """The MAE loss (ref forward_loss), also CAN's L_rec, fp32: pred, target (N, L, p*p*3), mask (N, L) 1 = removed;
        loss = sum_{n,l} mask_nl * mean_k (pred_nlk - t_nlk)^2 / sum_{n,l} mask_nl,   t = normalized_target if norm_pix
    (the per-patch mean squared error over the removed patches of the local batch)."""
    target = normalized_target(target) if norm_pix else target.float()
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C); patches row-major, inside a patch (row, col, channel) with the channel
    fastest (MAE 'nchpwq->nhwpqc')."""
    H, W = imgs.shape[-2:]
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not divisible by patch size {p}")
    return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """Inverse of patchify for a square grid: (N, L, p*p*C) -> (N, C, H, W)."""
    g = math.isqrt(x.shape[1])
    if g * g != x.shape[1]:
        raise ValueError(f"unpatchify expects a square grid, got {x.shape[1]} patches")
    return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=g, p=p, q=p, c=channels)


class MaskedDecoder(nn.Module):
    """MAE decoder (ref code, 512 wide / 8 blocks / 16 heads by default): project the visible encoder tokens, append
    one learned mask token per removed patch, unshuffle with ids_restore, add fixed sin-cos positions, run the blocks,
    predict out_dim = p*p*C values per patch. `token_bias` (N, dim) is added to every token after the positions
    (CAN's noise-level embedding). Returns (N, L, out_dim) without the cls slot."""

    def __init__(self, num_patches: int, embed_dim: int, out_dim: int, dim=512, depth=8, num_heads=16):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_2d(dim, math.isqrt(num_patches), cls_token=True)[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        init_vit_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor, token_bias: torch.Tensor | None = None):
        x = self.embed(x)  # (N, 1 + L_keep, dim), cls first
        N, L = ids_restore.shape
        patches = torch.cat([x[:, 1:], self.mask_token.expand(N, L + 1 - x.shape[1], -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        if token_bias is not None:
            x = x + token_bias[:, None, :]
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


# ======================================================================================
# 2. Axial attention and the pixel-token embedding (GCRL Appendix Algorithm 1, iGPT / GCRL 3.2)
# ======================================================================================


class AxialAttention(Attention):
    """Causal axial attention of GCRL (Appendix Algorithm 1): ONE multi-head attention (one qkv/proj) applied three
    times to the token grid h = x.view(B, H, W, D):

        h_a = MSA(rows of h, causal=False)        # each row attends within itself
        h_a = MSA(columns of h_a, causal=True)    # each position attends up its column
        h_a = shift_down(h_a)                     # row r now only carries rows < r (zeros on top)
        out = MSA(rows of (h + h_a), causal=True) # causal along the row, plus everything above

    Output (r, c) depends on inputs at raster positions <= r*W + c only; with the SOS shift of the input sequence
    (PixelEmbedding) the model is autoregressive in raster order. Cost O(HW(H+W)) instead of O((HW)^2).
    mode="dense": plain causal attention over the H*W sequence with the same weights (GCRL Table 11 compares both).
    is_causal=False (BERT objective): the three passes unmasked, no shift. x: (B, H*W, D) -> (B, H*W, D)."""

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
        a = self.attend(x.reshape(B * H, W, D), False, batch=B)  # each row within itself -> columns (B*W, H, D)
        a = self.attend(a, is_causal, batch=B).view(B, H, W, D)  # up each column -> rows again
        h = x.view(B, H, W, D)
        if is_causal:  # shift down by one row: row r gets rows < r only, the top row nothing
            h = torch.cat([h[:, :1], h[:, 1:] + a[:, :-1]], dim=1)
        else:
            h = h + a
        return self.proj_drop(self.attend(h.view(B * H, W, D), is_causal).view(B, L, D))


class PixelEmbedding(nn.Module):
    """Input embedding of the pixel-token transformers (iGPT, GCRL 3.2): token embedding (K -> D), learned SOS vector,
    learned 2D positions (row + column table) added after the tokens. tokens (B, H*W) in raster order -> (B, H*W, D).
    shift=True (autoregressive): the sequence is [SOS, t_0 .. t_{n-2}], so position p only sees tokens < p. keep
    (B, H*W) bool (BERT objective): embeddings of removed tokens are zeroed (iGPT ref code), no shift."""

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
# 3. Color quantizer (iGPT) and the pixel-token helpers shared by igpt.py and gcrl.py
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

    @staticmethod
    def to_unit(images: torch.Tensor) -> torch.Tensor:
        """uint8 in [0, 255] or float in [0, 1] -> float in [-1, 1]."""
        if images.dtype == torch.uint8:
            return images.float() / 127.5 - 1
        return images.float() * 2 - 1

    def nearest(self, pixels: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """pixels (M, 3) in [-1, 1] -> index of the nearest center (M,), chunked to bound memory; argmin of
        |c|^2 - 2 p.c (|p|^2 is constant per pixel). The matmul runs in full fp32 even where setup_distributed allows
        TF32 (Ampere+ GPUs): TF32 sends ~0.5% of pixels to another center than a CPU does, so GPU training and CPU
        evaluation would tokenize differently. Autocast is off here (under bf16 ~8% of pixels change center)."""
        c = self.centers.to(pixels.device).float()
        c2 = (c * c).sum(1)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with fp32_only(pixels):
                out = [torch.argmin(c2[None] - 2 * p @ c.T, dim=1) for p in pixels.float().split(chunk)]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return torch.cat(out) if out else pixels.new_zeros(0, dtype=torch.long)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) uint8 or float [0, 1] -> tokens (B, H*W) int64 in raster order."""
        B, C, H, W = images.shape
        return self.nearest(self.to_unit(images).permute(0, 2, 3, 1).reshape(-1, 3)).view(B, H * W)

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """tokens (B, H*W) -> uint8 images (B, 3, H, W)."""
        rgb = self.centers.to(tokens.device)[tokens]  # (B, H*W, 3)
        rgb = torch.round(127.5 * (rgb + 1)).clamp(0, 255).to(torch.uint8)
        return rgb.view(-1, height, width, 3).permute(0, 3, 1, 2).contiguous()

    @classmethod
    def fit(cls, pixels: torch.Tensor, num_colors=512, iters=20, seed=0, init="kmeans++") -> ColorQuantizer:
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


# A pixel-token model (igpt.py, gcrl.py) has: `quantizer` (ColorQuantizer), `embed` (PixelEmbedding), `causal`
# (bool), `height`, `width`, `hidden_states(tokens)` (the last block's output, no norm), `norm` + `head` (final
# LayerNorm, Linear D -> K) and `forward(tokens, keep=None) -> logits (B, L, K)`, where logits[:, p] predicts token p
# from tokens < p (SOS shift; `keep` only for iGPT's BERT objective). `args` below is the method's Args, duck-typed:
# each docstring names the fields it reads.


def grid_palette(num_colors: int) -> np.ndarray:
    """A placeholder palette for build_model: the first K points of the smallest regular n x n x n RGB grid in
    [-1, 1] (K = 512: the 8 x 8 x 8 grid). Training replaces it by the fitted / loaded palette; checkpoints carry
    the real one (the model's `quantizer.centers` buffer)."""
    n = max(2, math.ceil(round(num_colors ** (1 / 3), 6)))
    levels = np.linspace(-1, 1, n, dtype=np.float32)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid[:num_colors].copy()  # numpy, so that build_model also works under torch.device("meta")


def fit_palette(images: torch.Tensor, args, device) -> torch.Tensor:
    """k-means palette (iGPT) of args.num_colors centers, fitted (ColorQuantizer.fit, args.kmeans_iters iterations)
    on args.palette_pixels pixels of uint8 images (N, 3, H, W) drawn uniformly with replacement (seed args.seed;
    indexed per pixel, so a large dataset is never copied whole) -> (K, 3) float32 CPU."""
    N, C, H, W = images.shape
    idx = torch.randint(N * H * W, (args.palette_pixels,), generator=torch.Generator().manual_seed(args.seed))
    pixels = images.flatten(2)[idx // (H * W), :, idx % (H * W)].to(device)
    return ColorQuantizer.fit(pixels, args.num_colors, iters=args.kmeans_iters, seed=args.seed).centers.cpu()


def shared_palette(args, train_images: torch.Tensor, run_dir: str, info: DistInfo, method: str) -> torch.Tensor:
    """The palette every rank uses, (K, 3) float32 CPU. Rank 0 decides: the resumed checkpoint's palette, else
    --palette PATH, else the cached <run_dir>/palette.npy (a re-run in the same folder), else a fresh k-means fit, and
    saves it to that cache. It then broadcasts it, or its error so that every rank stops with the same message
    instead of hanging: one palette everywhere without deterministic k-means or a shared file system. args: resume,
    palette, num_colors and fit_palette's fields; method: the checkpoint's method name ("igpt", "gcrl")."""
    payload: list = [None]
    if info.is_main:
        try:
            cache = os.path.join(run_dir, "palette.npy")
            resume = resolve_resume(args.resume, run_dir)
            if resume:  # the palette the resumed model was trained with (its state_dict overrides any other)
                centers = load_checkpoint(resume, method)["model"]["quantizer.centers"]
                payload[0], source = centers.float(), f"{resume} (the checkpoint resumed)"
            elif args.palette:
                payload[0], source = ColorQuantizer.load(args.palette).centers, args.palette
            elif os.path.exists(cache):
                payload[0], source = ColorQuantizer.load(cache).centers, f"{cache} (cached)"
                if payload[0].shape[0] != args.num_colors:
                    raise ValueError(
                        f"{cache} holds {payload[0].shape[0]} colors but --num-colors is {args.num_colors}: "
                        f"choose another --run-name or delete the cached palette"
                    )
            else:
                t0 = time.perf_counter()
                payload[0] = fit_palette(train_images, args, info.device)
                source = f"k-means on {args.palette_pixels} training pixels ({time.perf_counter() - t0:.1f} s)"
            os.makedirs(run_dir, exist_ok=True)
            ColorQuantizer(payload[0]).save(cache)
            print0(f"palette: {payload[0].shape[0]} colors from {source}; saved to {cache}")
        except (OSError, ValueError) as e:
            payload[0] = e
    if info.world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], Exception):
        raise payload[0]
    return payload[0].float().cpu()


def quantize(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) uint8 or float [0, 1] -> tokens (B, H*W) int64, raster order, with the model's palette
    (`model.quantizer`; the nearest-center search is fp32, see ColorQuantizer.nearest). Float images are rounded to
    uint8 first, so that augmented views quantize exactly like stored pixels (x / 127.5 - 1)."""
    if images.dtype != torch.uint8:
        images = (images * 255).round().clamp(0, 255).to(torch.uint8)
    return unwrap(model).quantizer.encode(images)


def bert_keep_mask(tokens: torch.Tensor, mask_prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """iGPT ref code: keep = U[0, 1) >= mask_prob per token (True = visible, False = masked and predicted)."""
    return torch.rand(tokens.shape, device=tokens.device, generator=generator) >= mask_prob


def token_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats, fp32: logits (B, L, K), tokens (B, L) -> (B, L). Computed on the
    flat (B*L, K) rows, each row contiguous; F.cross_entropy on the (B, K, L) transposed view reads every class with a
    stride of L and ran 2.2x slower forward + backward on the CPU (python bench/bench.py tokenloss)."""
    B, L, K = logits.shape
    return F.cross_entropy(logits.float().reshape(B * L, K), tokens.reshape(B * L), reduction="none").view(B, L)


def token_nll(model: nn.Module, tokens: torch.Tensor, args, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood (nats) and which tokens count: tokens (B, L) -> (nll (B, L) fp32,
    scored (B, L) bool). ar: nll[:, p] = -log p(t_p | t_<p) (with SOS for p = 0), every token scored. bert: a fresh
    mask (global RNG, or `generator`), nll of the masked tokens given the visible ones, only those scored. The
    network runs under bf16 autocast when args.amp; the log-softmax is fp32. args: amp, objective ("ar" when the
    Args has none), bert_mask_prob."""
    keep = None if getattr(args, "objective", "ar") == "ar" else bert_keep_mask(tokens, args.bert_mask_prob, generator)
    with autocast(tokens.device, args.amp):
        logits = model(tokens, keep)
    scored = torch.ones_like(tokens, dtype=torch.bool) if keep is None else ~keep
    return token_cross_entropy(logits, tokens), scored


@torch.no_grad()
def bits_per_token(model: nn.Module, images: torch.Tensor, args, device, batch_size: int = 256, info=None):
    """Mean NLL in BITS per palette token (nats / ln 2; SPEC 1.4: not 8-bit bits/dim) over uint8 images (N, 3, H, W),
    in eval mode, split over the ranks (each takes every world-th image; sums are all-reduced). For bert: the
    masked-token loss with a fixed-seed mask, not a likelihood. args: as token_nll."""
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    g = torch.Generator(device=device).manual_seed(0)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of nll, number of scored tokens]
    with eval_mode(model) as net:
        for batch in images[rank::world].split(batch_size):
            nll, scored = token_nll(net, quantize(net, batch.to(device)), args, generator=g)
            total += torch.stack([(nll.double() * scored).sum(), scored.sum().double()])
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item() / math.log(2)


@torch.no_grad()
def sample(model: nn.Module, num: int, temperature: float = 1.0, seed: int = 0, amp: bool = False) -> torch.Tensor:
    """Autoregressive sampling in raster order: for p = 0 .. L-1, t_p ~ softmax(logits[:, p] / temperature), where
    logits[:, p] sees only the tokens < p already drawn (causal + SOS shift). Draws from a private generator (seed),
    so sampling never moves the training RNG. -> tokens (num, L) int64 in [0, K)."""
    if not unwrap(model).causal:
        raise ValueError("sampling needs an autoregressive (--objective ar) model")
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    with eval_mode(model) as net:
        device = net.head.weight.device
        g = torch.Generator(device=device).manual_seed(seed)
        tokens = torch.zeros(num, net.height * net.width, dtype=torch.long, device=device)
        for p in range(tokens.shape[1]):
            with autocast(device, amp):
                h = net.hidden_states(tokens)[:, p]  # positions > p see the zero placeholders; position p does not
                logits = net.head(net.norm(h))
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            tokens[:, p] = torch.multinomial(probs, 1, generator=g)[:, 0]
    return tokens


def save_samples(model: nn.Module, tokens: torch.Tensor, path: str) -> None:
    """Decode sampled tokens through the palette and write them as a PNG grid (8 per row)."""
    net = unwrap(model)
    save_image_grid(net.quantizer.decode(tokens, net.height, net.width), path, nrow=8)


def log_likelihood(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eval_probe.py hook (GCRL Table 6): images float (B, 3, S, S) in [0, 1] -> (log p(x) (B,) in nats, summed over
    the tokens; the token embeddings (B, L, D) it is differentiable in, a leaf requiring grad). The embedding lookup's
    output is swapped for that leaf by a forward hook, so the forward pass is exactly the model's own."""
    net = unwrap(model)
    if not net.causal:
        raise ValueError("log_likelihood needs an autoregressive (--objective ar) checkpoint; BERT has no density")
    tokens = quantize(net, images)
    leaf: dict[str, torch.Tensor] = {}

    def swap(module, inputs, output):
        leaf["emb"] = output.detach().requires_grad_()
        return leaf["emb"]

    handle = net.embed.tok_embed.register_forward_hook(swap)
    try:
        with eval_mode(net):  # no dropout: log p(x) is a function of x, and images do not interact
            logits = net(tokens)
    finally:
        handle.remove()
    return -token_cross_entropy(logits, tokens).sum(dim=1), leaf["emb"]


# ======================================================================================
# 4. Contrastive pieces (SimCLR, CAN, GCRL)
# ======================================================================================


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
    """All-gather along dim 0 that keeps gradients: (n, ...) -> (n * world, ...) ordered by rank; backward returns to
    each rank the sum over ranks of the upstream gradient of its own slice. (Plain dist.all_gather returns tensors
    without grad_fn, which silently drops the negatives' gradients.) Identity when not distributed; same n per rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def fp32_only(x: torch.Tensor):
    """A region where autocast is off for x's device (CPU for the meta tensors of FLOP counting)."""
    return torch.autocast(device_type="cuda" if x.is_cuda else "cpu", enabled=False)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent / InfoNCE of SimCLR (= GCRL eq. 3 = CAN 3.2) over 2N views, negatives from every rank. z1, z2: (n, d)
    local projections of the two views (not yet normalized). With z = normalize([z1; z2]) and the candidates Z = all
    ranks' z gathered WITH gradient, each local anchor i has
        loss_i = -log( exp(z_i.z_pos / t) / sum_{k != i} exp(z_i.Z_k / t) ),
    z_pos the other view of the same image; the result is the mean over the 2n local anchors. Averaged over ranks (as
    DDP does with gradients) it equals one process's loss on the concatenated batch. The TF reference reports 2x this
    (mean of each direction, summed). Always fp32, also under autocast, which is switched off here (bf16 logits at
    t = 0.1 lose about two digits)."""
    with fp32_only(z1):
        return _nt_xent(z1, z2, temperature)


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    logits = z @ gather_with_grad(z).T / temperature  # (2n, 2n * world)
    idx = torch.arange(2 * n, device=z.device)
    self_col = rank * 2 * n + idx
    logits = logits.masked_fill(F.one_hot(self_col, logits.shape[1]).bool(), float("-inf"))
    positive = rank * 2 * n + (idx + n) % (2 * n)  # the other view of the same image
    return F.cross_entropy(logits, positive)


class ProjectionHead(nn.Module):
    """Projection MLPs. kind="bn" (SimCLR v2 / CAN App. C): [Linear(no bias) - BN - ReLU] x (layers-1), then
    Linear(no bias) - BN without shift (SimCLR v2: center=False). kind="ln" (GCRL): Linear - LayerNorm - ReLU,
    then Linear. BN momentum 0.1 in PyTorch = TF decay 0.9 (SimCLR / CAN). in: (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 128, num_layers: int = 3, kind: str = "bn"):
        super().__init__()
        if kind not in ("bn", "ln"):
            raise ValueError(f"unknown projection head '{kind}'; use bn (SimCLR v2 / CAN) or ln (GCRL)")
        bn, dim, layers = kind == "bn", in_dim, []
        for _ in range(num_layers - 1):
            norm = nn.BatchNorm1d(hidden_dim) if bn else nn.LayerNorm(hidden_dim)
            layers += [nn.Linear(dim, hidden_dim, bias=not bn), norm, nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm1d(out_dim))
            layers[-1].bias.requires_grad_(False)  # scale but no shift (SimCLR v2 center=False); bias stays 0
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) for SimCLR, MoCo v3 and MAE linear probing. For parameters with ndim > 1,
        d = g + wd * p,   d *= trust * ||p|| / ||d||   (1 if either norm is 0);
    biases and norm parameters (ndim <= 1) get neither weight decay nor adaptation (d = g). Then, per group:
      classic=False (MoCo v3 / MAE util/lars.py, lr AFTER the momentum):  mu = momentum * mu + d;       p -= lr * mu
      classic=True  (SimCLR tf2/lars_optimizer.py classic_momentum, lr INSIDE): mu = momentum * mu + lr * d; p -= mu
    The two agree while lr is constant and differ when it changes: during a linear warmup the MoCo form steps by
    lr_t * sum_s m^(t-s) d_s, the classic form by sum_s m^(t-s) lr_s d_s (1.66x vs classic at step 10 of a warmup with
    m = 0.9 and constant d). Each group is updated with torch._foreach_* ops (a few kernels for the whole model, not a
    Python loop of small ones); the trust ratios stay on the device (no host sync)."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust=0.001, classic=False):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust, classic=classic)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            adapted = [i for i, p in enumerate(params) if p.ndim > 1]
            if adapted:
                weights = [params[i] for i in adapted]
                d = torch._foreach_add([updates[i] for i in adapted], weights, alpha=group["weight_decay"])
                p_norm, d_norm = torch.stack(torch._foreach_norm(weights)), torch.stack(torch._foreach_norm(d))
                q = torch.where((p_norm > 0) & (d_norm > 0), group["trust"] * p_norm / d_norm, torch.ones_like(p_norm))
                torch._foreach_mul_(d, list(q.unbind()))
                for i, di in zip(adapted, d):
                    updates[i] = di
            for p in params:
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
            mu = [self.state[p]["mu"] for p in params]
            torch._foreach_mul_(mu, group["momentum"])
            if group.get("classic", False):  # get: groups loaded from checkpoints written before the option
                torch._foreach_add_(mu, updates, alpha=group["lr"])
                torch._foreach_sub_(params, mu)
            else:
                torch._foreach_add_(mu, updates)
                torch._foreach_add_(params, mu, alpha=-group["lr"])
        return loss


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, num_classes: int, k=200, temperature=0.07, chunk=1024):
    """Weighted kNN on cosine similarity (Wu et al. 2018, as in DINO / SimCLR monitors): each of the k nearest
    training features (N, D) votes for its class with weight exp(sim / t). -> class scores (N_test, C)."""
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for q in F.normalize(test_feats.float(), dim=1).split(chunk):
        sim, idx = (q @ train.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        scores.append(votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp()))
    return torch.cat(scores)


BLUR_FLAG = {"auto": None, "on": True, "off": False}  # --blur of the SimCLR-view methods -> augment_config's blur


def knn_heldout(args, train_set, test_set) -> dict:
    """The kNN monitor's fixed data: args.knn_bank training images and args.knn_queries held-out images, both
    class balanced (heldout_subset); not decoded until the monitor runs."""
    return {"bank": heldout_subset(train_set, args.knn_bank), "queries": heldout_subset(test_set, args.knn_queries)}


@torch.no_grad()
def embed_heldout(embed, held: dict, args, device) -> dict:
    """Features of the monitors' held-out sets: {"bank" / "queries": (feats (n, D) float32, labels (n,))} with
    embed(x) -> (B, D) on un-augmented images x in [0, 1] on `device` (bf16 autocast when args.amp); empty sets
    (--knn-bank 0) are left out."""
    out = {}
    for name in ("bank", "queries"):
        if len(held.get(name, ())) == 0:
            continue
        feats, labels = [], []
        batches = eval_batches(held[name], args.image_size, 256, device, num_workers=min(args.num_workers, 4))
        for x, y in progress(batches, f"embedding the held-out {name}", -(-len(held[name]) // 256)):
            with autocast(x.device, args.amp):
                feats.append(embed(x).float())
            labels.append(y)
        out[name] = torch.cat(feats), torch.cat(labels)
    return out


def knn_top1(embedded: dict, args) -> float:
    """eval/knn_top1 of every method: weighted kNN (k = args.knn_k, temperature args.knn_t or 0.07) of the held-out
    queries against the bank (embed_heldout's output); top-1 accuracy in [0, 1]."""
    (bank, bank_labels), (queries, query_labels) = embedded["bank"], embedded["queries"]
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    t = getattr(args, "knn_t", 0.07)
    scores = knn_predict(bank, bank_labels, queries, num_classes, k=args.knn_k, temperature=t)
    return (scores.argmax(dim=1) == query_labels).float().mean().item()


# ======================================================================================
# 5. Augmentations (SPEC 1.5)
# ======================================================================================
#
# Each view distribution in two implementations that draw from the same distribution: `per_image_transform(kind,
# size)`, a torchvision.transforms.v2 pipeline for one image (DataLoader workers), and `BatchedAugment(kind, size)` for
# a whole (B, C, H, W) batch on its device, independent parameters per image (datasets kept on the GPU as uint8).
# kinds: "simclr" (strong view), "weak" (iGPT/GCRL pad-and-crop), "mae" (crop + flip), "eval" (deterministic).
# Every output is float32 in [0, 1] with 3 channels; normalization (mean/std) is left to the method files.

AUGMENT_KINDS = ("simclr", "weak", "mae", "eval")
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601, 0.299 as 0.2989): both agree
_BLUR_SIGMA = (0.1, 2.0)  # SimCLR tf2/data_util.py random_blur


def augment_config(kind: str, size: int, **kw) -> dict:
    """The defaults of view `kind` at `size` overridden by `kw` (a key `kind` does not have is a TypeError):
    scale, ratio: RandomResizedCrop's ranges of the crop's area fraction and of its aspect w / h (log-uniform);
    interpolation "bilinear" | "bicubic"; flip_p; pad (weak: reflect padding); jitter_strength s: ColorJitter(0.8s,
    0.8s, 0.8s, 0.2s) unless jitter (brightness, contrast, saturation, hue) is given; jitter_p, gray_p, blur_p; blur:
    None = on at >= 96 px only; crop_ratio (eval): resize the shorter side to round(size / crop_ratio), center-crop
    (MAE / CAN / SimCLR: 0.875, bicubic, at 224 px); 1 = the image at the model's size. simclr adds blur_kernel."""
    if kind not in AUGMENT_KINDS:
        raise ValueError(f"unknown augmentation kind {kind!r}; expected one of {AUGMENT_KINDS}")
    # ratio: torchvision's default = SimCLR's aspect_ratio_range, kept by MAE. bilinear: torchvision's and CAN's code's
    # default (SimCLR's TF code resizes bicubically). flip 0.5, jitter_p 0.8, gray_p 0.2, blur_p 0.5: SimCLR
    # tf2/data_util.py, GCRL Table 2, CAN's code. scale: GCRL Table 2 (32 px); SimCLR (0.08, 1) at 224 px, where 8%
    # still holds the object. s = 0.5: SimCLR README CIFAR-10 = GCRL Table 2 = CAN's code (CAN Table 6: 1.0 at 224 px,
    # passed by the method files).
    crop = {"scale": (0.2, 1.0), "ratio": (3 / 4, 4 / 3), "interpolation": "bilinear", "flip_p": 0.5}
    defaults = {
        "simclr": {**crop, "scale": (0.2, 1.0) if size <= 32 else (0.08, 1.0), "jitter_strength": 0.5, "jitter": None,
                   "jitter_p": 0.8, "gray_p": 0.2, "blur": None, "blur_p": 0.5},
        "mae": {**crop, "interpolation": "bicubic"},  # MAE main_pretrain.py: RandomResizedCrop(scale=(0.2, 1), bicubic)
        "weak": {"pad": 4, "flip_p": 0.5},  # GCRL 4.1 "iGPT": crop from a 4 px reflect-padded image, flip 0.5
        "eval": {"interpolation": "bilinear", "crop_ratio": 1.0},
    }[kind]  # fmt: skip
    unknown = sorted(set(kw) - set(defaults))
    if unknown:
        raise TypeError(f"augmentation {kind!r} does not take {unknown}; it takes {sorted(defaults)}")
    cfg = {"kind": kind, "size": int(size), **defaults, **kw}
    if cfg.get("interpolation", "bilinear") not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {cfg['interpolation']!r}")
    if kind == "eval" and not 0 < cfg["crop_ratio"] <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {cfg['crop_ratio']}")
    if kind == "simclr":
        s = float(cfg["jitter_strength"])
        jitter = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s) if cfg["jitter"] is None else cfg["jitter"]  # SimCLR color_jitter
        cfg["jitter"] = tuple(float(v) for v in jitter)
        if len(cfg["jitter"]) != 4 or min(cfg["jitter"]) < 0 or cfg["jitter"][3] > 0.5:
            raise ValueError(f"jitter must be 4 non-negative strengths with hue <= 0.5, got {cfg['jitter']}")
        cfg["blur"] = size >= 96 if cfg["blur"] is None else cfg["blur"]  # SPEC 1.5; SimCLR README: no blur on CIFAR
        cfg["blur_kernel"] = 2 * (size // 20) + 1  # SimCLR: radius (size // 10) // 2, odd: 23 taps at 224, 9 at 96 px
    return cfg


def _to_rgb_tensor(img) -> torch.Tensor:
    """PIL image (any mode), HWC ndarray or (C, H, W) tensor with C in {1, 3} -> (3, H, W) tensor, dtype kept."""
    if hasattr(img, "mode") and hasattr(img, "convert") and img.mode != "RGB":  # a PIL image: L, P, RGBA, ...
        img = img.convert("RGB")
    img = v2.functional.to_image(img).as_subclass(torch.Tensor)
    if img.shape[-3] not in (1, 3):
        raise ValueError(f"expected an image with 1 or 3 channels, got shape {tuple(img.shape)}")
    return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).contiguous() if img.shape[-3] == 1 else img


def eval_resize(size: int, crop_ratio: float) -> int:
    """Shorter side before the center crop of the eval view: 224 / 0.875 = 256 (MAE main_linprobe, SimCLR)."""
    return int(round(size / crop_ratio))


def per_image_transform(kind: str, size: int, **kw) -> v2.Compose:
    """The torchvision.transforms.v2 pipeline of a view (`kw`: see augment_config): uint8 or float (C, H, W) tensor
    (C in {1, 3}; float in [0, 1]), HWC uint8 ndarray or PIL image -> float32 (3, size, size) in [0, 1]. The geometry
    runs before the float conversion, on torchvision's uint8 kernels (antialiased, rounded) for uint8 inputs."""
    cfg = augment_config(kind, size, **kw)
    ops = [_to_rgb_tensor]
    if kind in ("simclr", "mae"):
        ops.append(v2.RandomResizedCrop(size, cfg["scale"], cfg["ratio"], cfg["interpolation"]))
    elif kind == "weak":
        ops.append(v2.RandomCrop(size, padding=cfg["pad"], padding_mode="reflect"))
    else:  # resize the shorter side (a no-op when it already has that length), then center-crop
        ops += [v2.Resize(eval_resize(size, cfg["crop_ratio"]), cfg["interpolation"]), v2.CenterCrop(size)]
    if kind != "eval":
        ops.append(v2.RandomHorizontalFlip(cfg["flip_p"]))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if kind == "simclr":
        # SimCLR tf2/data_util.py order: crop, flip, color distortion (jitter p=0.8 then grayscale p=0.2), blur.
        # GCRL Table 2 lists the flip last; a flip commutes with every color op and with the symmetric blur.
        ops += [v2.RandomApply([v2.ColorJitter(*cfg["jitter"])], p=cfg["jitter_p"]), v2.RandomGrayscale(cfg["gray_p"])]
        if cfg["blur"]:
            ops.append(v2.RandomApply([v2.GaussianBlur(cfg["blur_kernel"], _BLUR_SIGMA)], p=cfg["blur_p"]))
    if cfg.get("interpolation") == "bicubic":  # bicubic overshoots; torchvision clamps uint8 results, not float ones
        ops.append(functools.partial(torch.clamp, min=0.0, max=1.0))
    return v2.Compose([*ops, v2.ToPureTensor()])


def _uniform(shape, low, high, generator=None) -> torch.Tensor:
    """U[low, high) float32 samples on the host, drawn on the generator's device (then copied back) when given."""
    u = torch.rand(shape, generator=generator, device="cpu" if generator is None else generator.device)
    return low + (high - low) * u.cpu()


def sample_resized_crops(batch, height, width, scale, ratio, generator=None) -> torch.Tensor:
    """torchvision's RandomResizedCrop boxes for `batch` images, on the host: (B, 4) int64 [top, left, h, w]. Per
    image, 10 attempts: area ~ U(scale) H W, log(w / h) ~ U(log ratio), w and h rounded; the first that fits wins, at a
    uniform integer position; if none fits, the centered largest box whose aspect is clamped into `ratio`."""
    area = _uniform((batch, 10), scale[0], scale[1], generator) * (height * width)
    aspect = torch.exp(_uniform((batch, 10), math.log(ratio[0]), math.log(ratio[1]), generator))
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))  # half to even, as round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximal index
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    u = _uniform((batch, 2), 0.0, 1.0, generator)
    # floor(u * n) is uniform on {0, ..., n-1}; the minimum guards against u * n rounding up to n in float32
    top = torch.minimum(torch.floor(u[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[:, 1] * (width - w + 1)), width - w)
    fw = int(round(height * max(ratio))) if width / height > max(ratio) else width  # the fallback box
    fh = int(round(width / min(ratio))) if width / height < min(ratio) else height
    fallback, ok = ((height - fh) // 2, (width - fw) // 2, fh, fw), fits.any(dim=1)
    return torch.stack([torch.where(ok, v, float(f)) for v, f in zip((top, left, h, w), fallback)], 1).to(torch.int64)


def resized_crop_batch(images, boxes, size, flip=None, interpolation="bilinear") -> torch.Tensor:
    """Crop each image to its own box, resize it to size x size and mirror it where `flip`, with one grid_sample:
    images float (B, C, H, W), boxes (B, 4) [top, left, h, w], flip (B,) bool or None -> (B, C, size, size). Bilinear:
    torchvision's resized_crop (+ horizontal_flip) without antialiasing. Bicubic: grid_sample's (a = -0.75), whose
    outer taps may read one pixel beyond the box next to its edges (torchvision clamps them to the box)."""
    B, _, H, W = images.shape
    top, left, h, w = boxes.to(device=images.device, dtype=torch.float32, non_blocking=True).unbind(1)
    centers = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size  # output pixels in (0, 1)
    across = centers.expand(B, size)
    if flip is not None:  # a mirrored view reads its box from right to left
        across = torch.where(flip.to(images.device, non_blocking=True)[:, None], 1.0 - centers, centers)
    # source column / row of each output one (half-pixel centers), clamped to the box's first and last pixel centers
    x = left[:, None] + across * w[:, None] - 0.5  # (B, size)
    y = top[:, None] + centers * h[:, None] - 0.5
    x = torch.minimum(torch.maximum(x, left[:, None]), (left + w - 1)[:, None])
    y = torch.minimum(torch.maximum(y, top[:, None]), (top + h - 1)[:, None])
    gx, gy = (2 * x + 1) / W - 1, (2 * y + 1) / H - 1  # grid units: -1, +1 = outer edges of the first, last pixel
    grid = torch.stack([gx[:, None, :].expand(B, size, size), gy[:, :, None].expand(B, size, size)], dim=-1)
    out = F.grid_sample(images, grid.to(images.dtype), mode=interpolation, padding_mode="border", align_corners=False)
    return out.clamp_(0, 1) if interpolation == "bicubic" else out  # bicubic overshoots at edges


# The kernels F.interpolate(..., antialias=True) calls, in their out= form (private torch names: None if they go away).
_RESAMPLE_INTO = {m: getattr(torch._C._nn, f"_upsample_{m}2d_aa", None) for m in ("bicubic", "bilinear")}


def resized_crop_antialiased(images, boxes, size, flip, interpolation="bicubic") -> torch.Tensor:
    """torchvision v2's resized_crop (antialiased) + horizontal_flip + ToDtype on the CPU, bit for bit: images uint8
    or float (B, C, H, W); boxes (B, 4), flip (B,) on the host -> float32 (B, 3, size, size). The same kernel as
    torchvision's (uint8 for uint8) on views of the batch, without its per-image Python (most of its time <= 96 px).
    One exception: bilinear on a CPU without AVX2, where torchvision resamples uint8 in float (+-1 apart)."""
    aa = _RESAMPLE_INTO.get(interpolation)
    out = images.new_empty(len(images), images.shape[1], size, size)
    for image, (top, left, h, w), mirror, o in zip(images.split(1), boxes.tolist(), flip.tolist(), out.split(1)):
        crop = image[:, :, top : top + h, left : left + w]
        if aa is not None:  # straight into the output
            aa(crop, (size, size), False, None, None, out=o)
        else:  # a torch without the private out= kernels: the same kernel through F.interpolate, one copy more
            o.copy_(F.interpolate(crop, size=(size, size), mode=interpolation, align_corners=False, antialias=True))
        if mirror:  # per image: faster than a batched index_select / index_copy_ of uint8 rows
            o.copy_(o.flip(-1))
    out = out.float().mul_(1.0 / 255) if images.dtype == torch.uint8 else out.float().clamp_(0, 1)  # as v2.ToDtype
    return out.expand(-1, 3, -1, -1).contiguous()


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 1, H, W) luma with torchvision's weights."""
    r, g, b = images.unbind(-3)
    return (r * _GRAY_WEIGHTS[0] + g * _GRAY_WEIGHTS[1] + b * _GRAY_WEIGHTS[2]).unsqueeze(-3)


def _value_chroma_sixths(images: torch.Tensor):
    """RGB (B, 3, H, W) -> value, chroma, hue in sixths of a turn in [-1, 5] (B, 1, H, W) each: for the largest channel
    n (ties: red, then green, as colorsys) 2n + (next - after next) / chroma; 0 for grays."""
    r, g, b = images[:, 0:1], images[:, 1:2], images[:, 2:3]
    value = torch.maximum(torch.maximum(r, g), b)  # elementwise ops: faster than reductions over dim 1 on CPU
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    inv = 1.0 / torch.where(chroma > 0, chroma, 1.0)
    sixths = torch.where(value == r, (g - b) * inv, torch.where(value == g, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv))
    return value, chroma, sixths


def _hsv_ramp(value, chroma, sixths) -> torch.Tensor:
    """HSV -> RGB, the six sectors as one ramp: channel n = value - chroma * clamp(min(k, 4 - k), 0, 1), with
    k = (o_n + hue in sixths) mod 6, o = (5, 3, 1) for (r, g, b), chroma = value * saturation."""
    offsets = torch.arange(5.0, 0.0, -2.0, device=sixths.device, dtype=sixths.dtype).view(1, 3, 1, 1)
    k = torch.remainder(sixths + offsets, 6.0)
    return value - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, each channel in [0, 1] (hue in turns; 0 for grays)."""
    value, chroma, sixths = _value_chroma_sixths(images)
    hue = torch.where(sixths < 0, sixths + 6.0, sixths) / 6.0
    return torch.cat([hue, chroma / torch.where(value > 0, value, 1.0), value], dim=1)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV in [0, 1] -> RGB in [0, 1]."""
    return _hsv_ramp(images[:, 2:3], images[:, 2:3] * images[:, 1:2], 6.0 * images[:, 0:1])


def adjust_hue_batch(images: torch.Tensor, hue_shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue per image, images (B, 3, H, W) in [0, 1], hue_shift (B,) turns, in one pass without
    the HSV tensor (value * saturation = chroma); equal to torchvision to float rounding (~1e-6)."""
    value, chroma, sixths = _value_chroma_sixths(images)
    return _hsv_ramp(value, chroma, sixths + (6.0 * hue_shift.to(images.dtype)).view(-1, 1, 1, 1))


def jitter_plan(order: torch.Tensor, apply: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Group a batch by op order on the host: order (B, 4), apply (B,) -> sort (B,), a host permutation that puts the
    jittered images first, grouped by order, and runs [(ops in order, start, count)] in the sorted batch."""
    code = (order.cpu() * torch.tensor([64, 16, 4, 1])).sum(1)  # the permutation as a base-4 number, unique
    key = torch.where(apply.cpu(), code, 4**4)  # the images without jitter last
    sort = torch.argsort(key, stable=True)
    values, counts = torch.unique_consecutive(key[sort], return_counts=True)
    starts = (counts.cumsum(0) - counts).tolist()
    return sort, [(tuple((v >> s) & 3 for s in (6, 4, 2, 0)), start, n)
                  for v, start, n in zip(values.tolist(), starts, counts.tolist()) if v != 4**4]  # fmt: skip


def jitter_runs_(x: torch.Tensor, factors: torch.Tensor, runs, enabled=(True, True, True, True)) -> torch.Tensor:
    """Color jitter IN PLACE on a batch sorted by jitter_plan: each run takes its ops in its order, each op once and
    only on the images that draw it. factors (B, 4) in the sorted order; enabled: ops with a non-zero strength."""
    for ops, start, n in runs:
        view, f = x[start : start + n], factors[start : start + n]
        for op in (op for op in ops if enabled[op]):
            factor = f[:, op].view(-1, 1, 1, 1)
            if op == 0:  # brightness: blend with black
                view.mul_(factor).clamp_(0, 1)
            elif op in (1, 2):  # contrast, saturation: blend with the image's mean luma, with its luma image
                gray = rgb_to_grayscale(view)
                target = gray.mean(dim=(-3, -2, -1), keepdim=True) if op == 1 else gray
                view.mul_(factor).add_(target * (1.0 - factor)).clamp_(0, 1)
            else:
                view.copy_(adjust_hue_batch(view, f[:, 3]))
    return x


def color_jitter_batch(images, factors, order, apply, enabled=(True, True, True, True)) -> torch.Tensor:
    """v2.ColorJitter per image with its own factors and op order; images where `apply` is False are left untouched.
    images float (B, 3, H, W) in [0, 1]; factors (B, 4): brightness, contrast, saturation (1 = no change), hue shift
    (turns); order (B, 4): order[b, k] = the op applied k-th (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    sort, runs = jitter_plan(order, apply)
    sort = sort.to(images.device, non_blocking=True)
    factors = factors.to(images.device, non_blocking=True).index_select(0, sort)
    x = jitter_runs_(images.index_select(0, sort), factors, runs, enabled)
    return torch.empty_like(x).index_copy_(0, sort, x)


def gaussian_blur_batch(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each image with its own sigma: separable Gaussian of `kernel_size` taps, weights exp(-t^2 / (2 sigma^2))
    normalized to sum 1, reflect padding (torchvision's GaussianBlur). images (B, C, H, W), sigma (B,)."""
    B, C, H, W = images.shape
    t = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - (kernel_size - 1) / 2
    kernel = torch.softmax(-(t**2) / (2 * sigma.to(images).view(-1, 1) ** 2), dim=1).repeat_interleave(C, dim=0)
    r = kernel_size // 2
    x = F.pad(images, (r, r, r, r), mode="reflect").reshape(1, B * C, H + 2 * r, W + 2 * r)
    x = F.conv2d(x, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)  # along the width
    x = F.conv2d(x, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)  # along the height
    return x.view(B, C, H, W)


def to_float_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float (B, C, H, W), C in {1, 3} -> float32 (B, 3, H, W) in [0, 1] (uint8 / 255; floats kept)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected a (B, C, H, W) batch with C in {{1, 3}}, got shape {tuple(images.shape)}")
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _on_subset_(x: torch.Tensor, chosen: torch.Tensor, fn, per_image: torch.Tensor | None = None) -> None:
    """x[i] = fn(x[i], per_image[i]) in place where the host bool mask `chosen` is set (no pass over the others)."""
    idx = chosen.nonzero().flatten()
    if len(idx) == len(x):
        x.copy_(fn(x, per_image))
    elif len(idx) > 0:
        idx = idx.to(x.device, non_blocking=True)
        x.index_copy_(0, idx, fn(x.index_select(0, idx), None if per_image is None else per_image[idx]))


class BatchedAugment:
    """A view of `per_image_transform` (same kinds, keyword arguments and distribution of parameters) for a whole
    batch on its device, independent parameters per image. The draws are made on the host, so the grouping of the
    images by jitter order, grayscale and blur is known without reading the GPU: each op runs once, on the images that
    take it, and a step never waits. Resampling: the mae view on the CPU is torchvision's bit for bit; otherwise one
    grid_sample without antialiasing (meant for datasets stored near the view size, <= 64 px) on float pixels, and
    the mae view's bicubic is grid_sample's (a = -0.75; torchvision's and PIL's, which MAE used, have a = -0.5)."""

    per_crop_devices = ("cpu",)  # where the mae view uses resized_crop_antialiased; elsewhere no host sync

    def __init__(self, kind: str, size: int, **kw):
        self.cfg = augment_config(kind, size, **kw)
        self.kind, self.size = kind, int(size)

    def sample_params(self, batch: int, height: int, width: int, device, generator=None) -> dict[str, torch.Tensor]:
        """Every random choice for `batch` images of height x width, on `device`: crop (B, 4) [top, left, h, w]; offset
        (B, 2) [top, left] in the padded image (weak); flip, jitter, gray, blur (B,) bool; factors (B, 4) [brightness,
        contrast, saturation, hue]; order (B, 4) (the op applied at each position); sigma (B,). `apply` uses them."""
        return {k: v.to(device) for k, v in self._draw(batch, height, width, generator).items()}

    def _draw(self, batch: int, height: int, width: int, generator=None) -> dict[str, torch.Tensor]:
        cfg, B, params = self.cfg, batch, {}
        if self.kind in ("simclr", "mae"):
            params["crop"] = sample_resized_crops(B, height, width, cfg["scale"], cfg["ratio"], generator)
        elif self.kind == "weak":
            pad = cfg["pad"]
            span_y, span_x = height + 2 * pad - self.size + 1, width + 2 * pad - self.size + 1
            if span_y < 1 or span_x < 1:
                raise ValueError(f"a {self.size}px weak view does not fit a {height}x{width} image padded by {pad}")
            u, span = _uniform((B, 2), 0.0, 1.0, generator), torch.tensor([span_y, span_x])
            params["offset"] = torch.minimum(torch.floor(u * span), span - 1).to(torch.int64)  # RandomCrop: uniform
        if self.kind != "eval":
            params["flip"] = _uniform((B,), 0.0, 1.0, generator) < cfg["flip_p"]
        if self.kind == "simclr":
            b, c, s, h = cfg["jitter"]
            params["jitter"] = _uniform((B,), 0.0, 1.0, generator) < cfg["jitter_p"]
            # torchvision ColorJitter: brightness/contrast/saturation ~ U[max(0, 1 - x), 1 + x], hue ~ U[-h, h]
            ranges = [(max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)]
            params["factors"] = torch.stack([_uniform((B,), lo, hi, generator) for lo, hi in ranges], dim=1)
            # argsort of i.i.d. uniforms is a uniform random permutation (torchvision: torch.randperm(4))
            params["order"] = torch.argsort(_uniform((B, 4), 0.0, 1.0, generator), dim=1)
            params["gray"] = _uniform((B,), 0.0, 1.0, generator) < cfg["gray_p"]
            if cfg["blur"]:
                params["blur"] = _uniform((B,), 0.0, 1.0, generator) < cfg["blur_p"]
                params["sigma"] = _uniform((B,), *_BLUR_SIGMA, generator)
        return params

    @torch.no_grad()
    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """images uint8 or float (B, C, H, W), C in {1, 3} -> float32 (B, 3, size, size). params on any device; the
        per-image choices are read on the host (a GPU sync only for params that live on the GPU)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected a (B, C, H, W) batch with C in {{1, 3}}, got shape {tuple(images.shape)}")
        cfg, S, dev = self.cfg, self.size, images.device
        B, _, H, W = images.shape
        host = {k: v.cpu() for k, v in params.items()}  # no-op for the host draws of __call__
        params = {k: v.to(dev, non_blocking=True) for k, v in params.items()}  # copies that do not wait for the GPU
        if self.kind == "mae" and dev.type in self.per_crop_devices:
            return resized_crop_antialiased(images, host["crop"], S, host["flip"], cfg["interpolation"])
        if self.kind == "mae":
            return resized_crop_batch(to_float_rgb(images), params["crop"], S, params["flip"], cfg["interpolation"])
        if self.kind == "weak":
            p, x = cfg["pad"], to_float_rgb(images)
            x = F.pad(x, (p, p, p, p), mode="reflect") if p > 0 else x
            steps = torch.arange(S, device=dev)
            rows = params["offset"][:, 0:1] + steps  # (B, S)
            cols = params["offset"][:, 1:2] + torch.where(params["flip"][:, None], S - 1 - steps, steps)
            index = (rows[:, :, None] * x.shape[-1] + cols[:, None, :]).view(B, 1, S * S).expand(B, 3, S * S)
            return x.reshape(B, 3, -1).gather(2, index).view(B, 3, S, S)
        if self.kind == "eval":  # resize the shorter side to S (torchvision Resize(int)), then center-crop S x S
            x = to_float_rgb(images)
            if min(H, W) != S:
                H, W = (S, int(S * W / H)) if H <= W else (int(S * H / W), S)
                x = F.interpolate(x, (H, W), mode=cfg["interpolation"], align_corners=False, antialias=True).clamp(0, 1)
            top, left = int(round((H - S) / 2.0)), int(round((W - S) / 2.0))  # torchvision center_crop anchor
            return x[:, :, top : top + S, left : left + S].contiguous()
        # simclr: the images sorted by color-jitter op order (jitter_plan), so that every op runs on contiguous slices
        sort, runs = jitter_plan(host["order"], host["jitter"] & (cfg["jitter_p"] > 0 and max(cfg["jitter"]) > 0))
        host = {k: v.index_select(0, sort) for k, v in host.items()}
        sort = sort.to(dev, non_blocking=True)
        params = {k: v.index_select(0, sort) for k, v in params.items()}
        # On the CPU in chunks of about 4 MB of float pixels: the temporaries stay in cache and are reused by the
        # allocator (whole-batch ones of 20-80 MB at 96-224 px are fresh pages, faulted in on every call). GPU: one.
        step = B if dev.type != "cpu" else max(1, (4 << 20) // (12 * max(H * W, S * S)))
        out = torch.empty(B, 3, S, S, device=dev)
        for c0 in range(0, B, step):
            c1 = min(B, c0 + step)
            source = to_float_rgb(images.index_select(0, sort[c0:c1]))
            x = resized_crop_batch(source, params["crop"][c0:c1], S, params["flip"][c0:c1], cfg["interpolation"])
            local = [(ops, max(r0, c0) - c0, min(r0 + n, c1) - max(r0, c0)) for ops, r0, n in runs]  # in this chunk
            jitter_runs_(x, params["factors"][c0:c1], [r for r in local if r[2] > 0], [v > 0 for v in cfg["jitter"]])
            if cfg["gray_p"] > 0:
                _on_subset_(x, host["gray"][c0:c1], lambda v, _: rgb_to_grayscale(v).expand_as(v))
            if cfg["blur"] and cfg["blur_p"] > 0:
                blur = functools.partial(gaussian_blur_batch, kernel_size=cfg["blur_kernel"])
                _on_subset_(x, host["blur"][c0:c1], blur, params["sigma"][c0:c1])
            out.index_copy_(0, sort[c0:c1], x)  # back to the input order
        return out

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images: uint8 or float (B, C, H, W) on any device -> float32 (B, 3, size, size) in [0, 1], same device.
        generator: optional torch.Generator that makes the draw reproducible; a CPU one keeps a GPU run sync-free."""
        return self.apply(images, self._draw(len(images), images.shape[-2], images.shape[-1], generator))


# ======================================================================================
# 6. Datasets
# ======================================================================================
#
# torchvision's dataset classes read (and download) CIFAR-10/100, SVHN and STL-10, md5 checks included, and list image
# folders; the two formats they cannot read, MNIST's IDX files and the Downsampled-ImageNet batches, are read here
# (_idx_arrays and _imagenet_arrays say why). Each *_arrays reader returns (images uint8 (N, C, H, W), labels int64
# (N,)) at the dataset's native size; build_dataset wraps them in an ImageArray.

IMAGENET_DATASETS = ("imagenet32", "imagenet64", "imagefolder")  # ImageNet and its downsampled versions
DATASET_NAMES = ("cifar10", "cifar100", "svhn", "stl10", "mnist", "fashion_mnist", "imagenet32", "imagenet64",
                 "imagefolder", "synthetic")  # fmt: skip
# Splits of the in-memory datasets ("train+unlabeled": STL-10's pretraining set, 5k labeled + 100k unlabeled)
DATASET_SPLITS = {"cifar10": ("train", "test"), "cifar100": ("train", "test"), "svhn": ("train", "test", "extra"),
                  "stl10": ("train", "test", "unlabeled", "train+unlabeled"), "mnist": ("train", "test"),
                  "fashion_mnist": ("train", "test"), "imagenet32": ("train", "val"), "imagenet64": ("train", "val"),
                  "synthetic": ("train", "test")}  # fmt: skip
_NUM_CLASSES = {"cifar100": 100, "imagenet32": 1000, "imagenet64": 1000, "synthetic": 4}  # 10 for the others
SYNTHETIC_SHAPES = ("disk", "square", "triangle", "plus")  # the synthetic classes, in label order

# Debian's `dataset-fashion-mnist` (four gzipped IDX files): looked at last, so a copy under root wins; tests move it.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where build_dataset looks; the message names the paths and how to get them."""


class ImageArray(torch.utils.data.Dataset):
    """A whole image dataset in memory. images: uint8 (N, C, H, W) CPU tensor, C = 1 or 3; labels: int64 (N,), -1
    for unlabeled images (STL-10's `unlabeled` split); name: as given to build_dataset; num_classes: number of label
    values. Indexing gives (uint8 (C, H, W), int label), the input the per-image pipelines of common.py expect."""

    def __init__(self, images, labels, name: str, num_classes: int):
        images, labels = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.int64)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"ImageArray wants uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"ImageArray: labels {tuple(labels.shape)} do not match {images.shape[0]} images")
        self.images, self.labels, self.name, self.num_classes = images, labels, name, int(num_classes)

    @property
    def image_size(self) -> int:  # H, the image side (every dataset here is square)
        return self.images.shape[-2]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        return f"ImageArray({self.name}: {len(self)} x {tuple(self.images.shape[1:])}, {self.num_classes} classes)"


class ImageFolderDataset(torchvision.datasets.ImageFolder):
    """`folder/<class>/<image>` decoded on demand (ImageNet is far too big for memory): item = (uint8 (C, H, W) at
    the file's own size, class index). Classes are the sorted sub-folder names; .num_classes and .name as in
    ImageArray. Resizing to the model's input is left to the per-image pipelines."""

    def __init__(self, folder: str, name: str = "imagefolder", channels: int = 3):
        # a partial of a function, not a lambda, so DataLoader workers can pickle the loader
        super().__init__(folder, loader=functools.partial(ImageFolderDataset.load, channels=channels))
        self.name, self.num_classes = name, len(self.classes)

    @staticmethod
    def load(path: str, channels: int = 3) -> torch.Tensor:
        """One image file -> uint8 (C, H, W), C = channels (3: RGB, 1: luma) whatever the file's mode. PIL rather than
        torchvision.io, whose decoders warn per image from 0.29 on; PIL reads every format ImageFolder accepts."""
        from PIL import Image

        with Image.open(path) as img:
            return torchvision.transforms.functional.pil_to_tensor(img.convert("RGB" if channels == 3 else "L"))


def fits_on_device(dataset) -> bool:
    """True for an ImageArray of side <= 64 px: such datasets are kept whole on the device as uint8 and augmented
    there in batches (SPEC 1.5); anything else goes through DataLoader workers."""
    return isinstance(dataset, ImageArray) and dataset.image_size <= 64


def _find(name: str, split: str, folders: list[str], files: list[str], exts=("",), download=False) -> list | None:
    """The paths of `files` in the first folder that holds them all (each as the first file + ext that exists). Else
    None when download is set (torchvision fetches them), or a DatasetNotFoundError naming what each folder lacks."""
    lacking = []
    for folder in folders:
        found = [next((p for e in exts if os.path.isfile(p := os.path.join(folder, f + e))), None) for f in files]
        if None not in found:
            return found
        missing = [f for f, p in zip(files, found) if p is None]
        missing = missing[0] if len(missing) == 1 else "{" + ",".join(missing) + "}"
        lacking.append(os.path.join(folder, missing) + (f"[{''.join(exts)}]" if len(exts) > 1 else ""))
    if download:
        return None
    how = "pass download=True (--download) to fetch it with torchvision, or put the files there"
    if name == "fashion_mnist":
        how += f"; or `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) for {FASHION_MNIST_SYSTEM_DIR}"
    if name in ("imagenet32", "imagenet64"):
        how = (f"it cannot be downloaded automatically: get Imagenet{name[8:]}_train and _val (npz or pickle batches) "
               "from the Downsampled ImageNet page of image-net.org (https://image-net.org/download-images, login "
               f"required) and unpack their files into {name}/ under the data root")  # fmt: skip
    listing = "\n  ".join(lacking)
    raise DatasetNotFoundError(f"dataset {name!r} (split {split!r}) not found; expected:\n  {listing}\n{how}")


def _torchvision_arrays(name: str, root: str, split: str, download: bool):
    """CIFAR-10/100, SVHN and STL-10 through torchvision's classes; MNIST / Fashion-MNIST too when downloading."""
    sets = torchvision.datasets
    if name in ("mnist", "fashion_mnist"):  # a download (_idx_arrays reads local copies): .data (N, 28, 28)
        make = functools.partial(getattr(sets, "MNIST" if name == "mnist" else "FashionMNIST"), root, split == "train")
    elif name == "svhn":  # in root/svhn/ (where --download puts it) or root/ itself
        folders, files = [os.path.join(root, "svhn"), root], [f"{split}_32x32.mat"]
        path = (_find(name, split, folders, files, download=download) or [os.path.join(folders[0], files[0])])[0]
        try:  # torchvision reads SVHN's MATLAB files with scipy, which is not a requirement of the repository
            import scipy.io  # noqa: F401
        except ImportError:  # a ValueError: usage_errors turns it into one line naming the fix
            raise ValueError(f"reading SVHN's {path} (a MATLAB file) needs scipy: pip install scipy") from None
        make = functools.partial(sets.SVHN, os.path.dirname(path), split)
    else:  # every file of the archive, whatever the split: the class checks them all before reading one
        cls = {"cifar10": sets.CIFAR10, "cifar100": sets.CIFAR100, "stl10": sets.STL10}[name]
        files = [f for f, _ in cls.train_list + cls.test_list] + ([cls.meta["filename"]] if name != "stl10" else [])
        _find(name, split, [os.path.join(root, cls.base_folder)], files, download=download)
        make = functools.partial(cls, root, **({"split": split} if name == "stl10" else {"train": split == "train"}))
    try:
        ds = make(download=download)
    except Exception as e:  # no network, a moved URL, an md5 that is not the original's: one line
        what = f"downloading {name} into {root} failed" if download else f"torchvision refused {name} under {root}"
        raise DatasetNotFoundError(f"{what}: {e}") from e
    if name in ("mnist", "fashion_mnist"):
        return ds.data[:, None], ds.targets
    if name in ("svhn", "stl10"):  # .data (N, C, H, W); .labels: SVHN's 10 (the digit 0) is 0, STL-10's unlabeled -1
        return torch.from_numpy(np.ascontiguousarray(ds.data)), torch.as_tensor(ds.labels, dtype=torch.int64)
    # CIFAR's .data is (N, H, W, C), .targets a list; CIFAR-100's are the 100 fine classes, not the 20 coarse
    return torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))), torch.tensor(ds.targets)


def _idx_arrays(name: str, root: str, split: str, download: bool):
    """MNIST / Fashion-MNIST, read here rather than by torchvision's MNIST classes: those (0.29) open only unzipped
    files in root/MNIST/raw (FashionMNIST/raw), so they cannot read Debian's gzipped Fashion-MNIST nor a copy kept
    elsewhere; one reader serves every location."""
    prefix = "train" if split == "train" else "t10k"
    files = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    folders = ("MNIST/raw", "mnist", "") if name == "mnist" else ("FashionMNIST/raw", "fashion_mnist", "fashion-mnist")
    folders = [os.path.join(root, d) for d in folders] + ([] if name == "mnist" else [FASHION_MNIST_SYSTEM_DIR])
    # torchvision keeps the .gz next to the extracted file; the plain one skips a decompression
    found = _find(name, split, folders, files, ("", ".gz"), download)
    if found is None:  # not here, download set: torchvision fetches them into root/MNIST/raw (FashionMNIST/raw)
        return _torchvision_arrays(name, root, split, download=True)
    if os.path.dirname(found[0]) == FASHION_MNIST_SYSTEM_DIR:  # say which root was used: --data-root had no copy
        print0(f"{name}: no copy under --data-root {root}; reading Debian's {FASHION_MNIST_SYSTEM_DIR}")
    arrays = []
    for path in found:  # IDX: 0, 0, dtype code 0x08 (uint8), number of dims; a big-endian uint32 per dim; the values
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # the gzip magic number: decompress whatever the file is called
            raw = gzip.decompress(raw)
        if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
            raise ValueError(f"{path} is not an IDX file of uint8 values (bad magic number {raw[:4].hex()})")
        offset = 4 + 4 * raw[3]
        dims = struct.unpack(f">{raw[3]}I", raw[4:offset])
        if len(raw) - offset != math.prod(dims):
            raise ValueError(f"{path}: {len(raw) - offset} bytes of data for dims {dims} (truncated file?)")
        arrays.append(np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims).copy())  # copy: writable
    images, labels = arrays
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{found}: images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64))


def _imagenet_arrays(name: str, root: str, split: str):
    """Downsampled ImageNet (Chrabaszcz et al. 2017; torchvision has no class for it): batches {"data": rows (N, 3*S*S)
    = [S*S red | S*S green | S*S blue] each row-major, "labels": 1..1000} as .npz or pickles."""
    size = int(name[len("imagenet") :])
    stems = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    paths = _find(name, split, [os.path.join(root, name)], stems, (".npz", ""))
    parts, labels = [], []
    for path in paths:
        with open(path, "rb") as f:  # latin1: numpy arrays inside Python 2 pickles load too
            batch = np.load(f) if path.endswith(".npz") else pickle.load(f, encoding="latin1")
            batch = {k.decode() if isinstance(k, bytes) else k: batch[k] for k in batch}  # b"data" in some copies
            if not {"data", "labels"} <= batch.keys():
                raise ValueError(f"{path}: expected 'data' and 'labels' entries, found {sorted(batch)}")
            data, y = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch["labels"], dtype=np.int64).ravel()
        if data.shape != (len(y), 3 * size * size) or y.min() < 1 or y.max() > 1000:
            raise ValueError(f"{path}: expected rows of 3*{size}*{size} bytes and a label in 1..1000 for each")
        parts.append(data.reshape(-1, 3, size, size))
        labels.append(y - 1)  # files count classes 1..1000
    # One tensor filled part by part, each part dropped once copied, keeps the peak near one copy of the data
    # (ImageNet64's train set is 15.7 GB): torch.empty commits memory pages only as they are written.
    labels, start = np.concatenate(labels), 0
    images = torch.empty((len(labels), 3, size, size), dtype=torch.uint8)
    while parts:
        part = parts.pop(0)
        images.numpy()[start : start + len(part)] = part
        start += len(part)
    return images, torch.from_numpy(labels)


def _convert(images: torch.Tensor, channels: int, image_size: int | None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> `channels` channels at image_size (see build_dataset), on float32 chunks of <= 2^24 values
    (64 MiB): turning the 100k STL-10 unlabeled images into 64 px, say, never holds a float copy of the whole set."""
    if image_size and images.shape[-2:] == (28, 28) and image_size == 32:
        images = F.pad(images, (2, 2, 2, 2))  # MNIST-like 28 px digits get a 2-pixel black border (LeNet-5's input)
    luma = channels == 1 and images.shape[1] == 3  # ITU-R BT.601; before resizing: a third of the work
    resize = bool(image_size) and images.shape[-2:] != (image_size, image_size)
    if luma or resize:
        out_size = (image_size, image_size) if resize else images.shape[-2:]
        out = torch.empty((len(images), 1 if luma else images.shape[1], *out_size), dtype=torch.uint8)
        weights = torch.tensor((0.299, 0.587, 0.114)).view(1, 3, 1, 1)
        step = max(1, (1 << 24) // max(math.prod(images.shape[1:]), math.prod(out.shape[1:])))
        for s in range(0, len(images), step):
            x = images[s : s + step].float()
            if luma:
                x = (x * weights).sum(1, keepdim=True).round_().clamp_(0, 255)  # rounded as a uint8 image would be
            if resize:  # antialiased bilinear: a box-like filter when shrinking, so 96 -> 32 does not alias
                x = F.interpolate(x, size=out_size, mode="bilinear", antialias=True, align_corners=False)
            out[s : s + step] = x.round_().clamp_(0, 255).to(torch.uint8)
        images = out
    if channels == 3 and images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)  # gray -> RGB by repetition, after resizing: a third of the work
    return images


# The inside-tests of SYNTHETIC_SHAPES at pixel offsets dx (B, 1, S), dy (B, S, 1) from the center, in units of the
# half-width r (y points down) -> bool (B, S, S). Disk: radius r; square: side 1.6 r (an area close to the disk's);
# triangle: apex on top, height 1.6 r, base 2 r; plus: two crossed 2 r x 0.6 r bars.
_SHAPE_TESTS = (
    lambda dx, dy: dx * dx + dy * dy <= 1,
    lambda dx, dy: torch.maximum(dx.abs(), dy.abs()) <= 0.8,
    lambda dx, dy: (dy.abs() <= 0.8) & (dx.abs() <= (dy + 0.8) / 1.6),
    lambda dx, dy: ((dx.abs() <= 0.3) & (dy.abs() <= 1)) | ((dy.abs() <= 0.3) & (dx.abs() <= 1)),
)


def synthetic_shapes(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of one colored shape each -> (images uint8 (n, 3, size, size), labels int64 (n,)). The label is the
    shape, SYNTHETIC_SHAPES[label]; classes balanced (counts differ by at most one) and shuffled. Nuisances drawn per
    image: background color, foreground color (each RGB channel 0.25..0.75 away from the background's, modulo 1, so
    the shape is always visible), half-width r in [0.18, 0.32] * size, a position keeping the shape inside, Gaussian
    pixel noise (std 8/255, the same on the three channels). Deterministic for a given (n, size, seed); vectorized
    (5000 images of 32 px in about 0.1 s on one CPU core)."""
    if size < 8:
        raise ValueError(f"synthetic images need size >= 8 to tell the shapes apart, got {size}")
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % len(SYNTHETIC_SHAPES))[torch.randperm(n, generator=gen)]
    radius = size * (0.18 + 0.14 * torch.rand(n, generator=gen))
    center = radius[:, None] + (size - 2 * radius[:, None]) * torch.rand(n, 2, generator=gen)  # (n, 2) = (x, y)
    background = torch.rand(n, 3, generator=gen)
    foreground = (background + 0.25 + 0.5 * torch.rand(n, 3, generator=gen)) % 1.0
    background, foreground = [(c * 255).round().to(torch.uint8)[:, :, None, None] for c in (background, foreground)]

    # Each shape's test only runs on the images of that shape and the picture is composed in uint8, which keeps the
    # generator fast enough to call in every test; chunks of about a million pixels bound its memory at any n.
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    pixel = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centers
    step = max(1, (1 << 20) // (size * size))
    for s in range(0, n, step):
        chunk = slice(s, min(n, s + step))
        mask = torch.empty(chunk.stop - s, size, size, dtype=torch.bool)
        for shape in range(len(SYNTHETIC_SHAPES)):
            idx = (labels[chunk] == shape).nonzero().squeeze(1)
            r = radius[chunk][idx, None, None]
            dx = (pixel[None, None, :] - center[chunk][idx, 0, None, None]) / r  # (B, 1, S)
            dy = (pixel[None, :, None] - center[chunk][idx, 1, None, None]) / r  # (B, S, 1)
            mask[idx] = _SHAPE_TESTS[shape](dx, dy)
        picture = torch.where(mask[:, None], foreground[chunk], background[chunk]).to(torch.int16)  # (B, 3, S, S)
        noise = torch.randn(len(mask), 1, size, size, generator=gen).mul_(8).round_().to(torch.int16)
        images[chunk] = picture.add_(noise).clamp_(0, 255).to(torch.uint8)
    return images, labels


def build_dataset(name: str, root: str = "data", train: bool = True, split: str | None = None, download: bool = False,
                  image_size: int | None = None, channels: int = 3,
                  synthetic_size: int | None = None) -> ImageArray | torch.utils.data.Dataset:  # fmt: skip
    """One split of a dataset: an ImageArray (uint8 (N, C, H, W) + int64 labels, in memory), or for "imagefolder" an
    ImageFolderDataset decoded per item. Files read under root (download=True fetches the first six with torchvision):
      cifar10        cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}   32 px, 10 classes
      cifar100       cifar-100-python/{train, test, meta} (the 100 fine labels)         32 px, 100 classes
      svhn           svhn/{split}_32x32.mat or {split}_32x32.mat (needs scipy)          32 px, 10 classes
      stl10          stl10_binary/{train,test}_{X,y}.bin, unlabeled_X.bin              96 px, 10 classes
      mnist          {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] in MNIST/raw, mnist or root itself (28 px gray)
      fashion_mnist  the same in FashionMNIST/raw, fashion_mnist, fashion-mnist, then FASHION_MNIST_SYSTEM_DIR
      imagenet32/64  imagenet32 (or 64)/{train_data_batch_1..10, val_data}[.npz]       1000 classes
      imagefolder    {split}/<class>/<image>                                           any size
      synthetic      nothing: drawn by synthetic_shapes (seed 0 train, 1 test)          4 classes
    CIFAR and STL-10 need every file of their archive whatever the split; torchvision checks their md5 sums (and
    SVHN's). Missing files raise DatasetNotFoundError (a FileNotFoundError) naming the paths and how to get them.
    split: default "train" if train else "test" ("val" for imagenet32/64 and imagefolder), see DATASET_SPLITS
    (stl10's "unlabeled" has labels -1). channels: 3 repeats a gray channel; 1 keeps it and turns RGB into BT.601
    luma. image_size (None or 0 = native; imagefolder ignores it): 28 -> 32 pads 2 black pixels on every side (the
    usual input of MNIST-like digits to 32 px models); any other change is an antialiased bilinear resize, rounded to
    uint8. synthetic: image_size is the size drawn at (default 32), synthetic_size the count (default 5000 / 1000)."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if split is None:
        split = "train" if train else ("val" if name in IMAGENET_DATASETS else "test")
    if name == "imagefolder":
        folder = os.path.join(root, split)
        try:
            return ImageFolderDataset(folder, channels=channels)
        except FileNotFoundError as e:  # no such folder, or no class folder with images inside
            raise DatasetNotFoundError(f"dataset 'imagefolder' (split {split!r}) not found: expected {folder}/<class "
                                       f"name>/<image files> (the ImageNet train/val layout; {e})") from e  # fmt: skip
    if split not in DATASET_SPLITS[name]:
        raise ValueError(f"{name} has the splits {', '.join(DATASET_SPLITS[name])}; got {split!r}")

    if name == "synthetic":
        count = synthetic_size or (5000 if split == "train" else 1000)
        images, labels = synthetic_shapes(count, image_size or 32, seed=0 if split == "train" else 1)
    elif name in ("mnist", "fashion_mnist"):
        images, labels = _idx_arrays(name, root, split, download)
    elif name in IMAGENET_DATASETS:
        images, labels = _imagenet_arrays(name, root, split)
    else:
        images, labels = _torchvision_arrays(name, root, split, download)
    return ImageArray(_convert(images, channels, image_size), labels, name, _NUM_CLASSES.get(name, 10))


# ======================================================================================
# 7. Training batches and distributed helpers
# ======================================================================================

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_split(args, train: bool, in_memory: bool = False):
    """A method's train or held-out split from its Args (dataset, data_root, download, image_size,
    synthetic_size): in-memory datasets are stored at the training resolution (28 px Fashion-MNIST padded to 32,
    synthetic shapes drawn at that size); image folders are decoded at full size and left to the crops.
    in_memory: the method needs an ImageArray (the pixel-token models): anything else is a clear error."""
    kw = {"synthetic_size": args.synthetic_size} if args.dataset == "synthetic" and args.synthetic_size else {}
    ds = build_dataset(
        args.dataset, root=args.data_root, train=train, download=args.download, image_size=args.image_size, **kw
    )
    if in_memory and not isinstance(ds, ImageArray):
        raise ValueError(f"this method needs an in-memory dataset of small images (<= 64 px), not {args.dataset!r}")
    return ds


@functools.lru_cache(maxsize=32)
def _channel_stats(mean: tuple, std: tuple, device: torch.device, dtype: torch.dtype):
    """(1, C, 1, 1) mean and std tensors, built once per device and dtype: torch.tensor(..., device=cuda) on every
    call would be a host-to-device copy that waits for the GPU in each training step."""
    m = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1).to(device)
    s = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1).to(device)
    return m, s


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> standardized with per-channel mean/std (ImageNet's, as MAE/CAN)."""
    m, s = _channel_stats(tuple(mean), tuple(std), x.device, x.dtype)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    m, s = _channel_stats(tuple(mean), tuple(std), x.device, x.dtype)
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


def check_device(device: str) -> None:
    """A ValueError naming --device when it is not auto / cpu / cuda / cuda:N, or asks for CUDA where there is none."""
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"--device {device}: unknown; use auto (CUDA when available), cuda, cuda:N or cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible here; use --device cpu (or auto)")


def setup_distributed(device: str = "auto") -> DistInfo:
    """Works under `python x.py` (world size 1) and `torchrun` (env:// RANK / WORLD_SIZE / LOCAL_RANK), one or
    many nodes. NCCL on CUDA, gloo on CPU. device: auto (CUDA when available) | cuda | cpu."""
    check_device(device)
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
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


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a (metric) tensor, no gradient."""
    if dist.is_available() and dist.is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def distribute(
    model: nn.Module,
    info: DistInfo,
    compile: bool = False,
    find_unused_parameters: bool = False,
    static_graph: bool = False,
):
    """The model on its device, wrapped for training: SyncBatchNorm (SimCLR's global BN) and DDP on several
    processes, torch.compile with `compile`. Parts whose loss is off are never built, so DDP needs no
    find_unused_parameters unless the graph changes during training (GCRL's phases). static_graph: the same graph and
    shapes at every step (MAE, CAN, SimCLR, iGPT). Checkpoints save unwrap(model)."""
    dev = info.device
    model = model.to(dev)
    if info.world_size > 1:
        if dev.type == "cuda":  # PyTorch has no CPU SyncBatchNorm (DDP refuses it): on CPU ranks BN stays per rank
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
            # gradients are views into the all-reduce buckets: no copy in and out after each backward, one buffer less
            gradient_as_bucket_view=True,
            # a graph that never changes lets DDP fix its buckets after step 1 and skip the unused-parameter search
            static_graph=static_graph and not find_unused_parameters,
            # no broadcast of rank 0's buffers before every forward on CUDA: SyncBN's statistics come from the global
            # batch and other buffers are constants; on CPU BatchNorm stays per rank, so they are still broadcast
            broadcast_buffers=dev.type != "cuda",
        )
    if compile:
        # CUDA graphs (one replay per step instead of thousands of launches) need the static shapes static_graph
        # promises; under DDP inductor's default mode (its all-reduce hooks sit between the compiled pieces)
        cuda_graphs = dev.type == "cuda" and static_graph and info.world_size == 1
        model = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)
    return model


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


class _EpochOrder(torch.utils.data.Sampler):
    """The sample order of the current epoch, set before each epoch (TrainBatches): the DataLoader and its worker
    processes are made once and persist across epochs; only this list changes."""

    def __init__(self):
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TrainBatches:
    """This rank's augmented batches: `for views, labels in batches.epoch(e, start_step)`; views: one float (B, 3, S,
    S) tensor in [0, 1] per entry of `kinds` (e.g. ["simclr", "simclr"]), on the device. A small ImageArray lives on
    the device as uint8 and is augmented there (BatchedAugment); larger datasets go through DataLoader workers and
    the per-image pipelines. Both follow epoch_indices: the order does not depend on the path and resumes exactly."""

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
            self.order = _EpochOrder()
            # Workers persist across epochs (no re-spawn and re-import of every worker at each epoch boundary).
            self.loader = torch.utils.data.DataLoader(
                _ViewsDataset(dataset, [per_image_transform(k, image_size, **aug_kwargs) for k in kinds]),
                batch_size=batch_per_rank,
                sampler=self.order,
                num_workers=num_workers,
                pin_memory=info.device.type == "cuda",
                drop_last=True,
                persistent_workers=num_workers > 0,
                # the workers' seeds come from this generator, not from the training RNG (masks, noise, dropout),
                # whose stream then does not depend on how many loaders were started
                generator=torch.Generator().manual_seed(seed * 1_000_003 + info.rank),
            )
        self.steps_per_epoch = len(dataset) // (batch_per_rank * info.world_size)
        epoch_indices(len(dataset), 0, seed, info.rank, info.world_size, batch_per_rank)  # validates the size

    def epoch(self, epoch: int, start_step: int = 0):
        idx = epoch_indices(len(self.dataset), epoch, self.seed, self.info.rank, self.info.world_size, self.batch)
        idx = idx[start_step * self.batch :]
        if self.on_device:
            idx = idx.to(self.info.device, non_blocking=True)  # once per epoch, without waiting for the GPU
            for b in idx.split(self.batch):
                x = self.images[b]
                yield [aug(x) for aug in self.augs], self.labels[b]
        else:
            self.order.indices = idx.tolist()
            for views, labels in self.loader:
                dev = self.info.device
                yield [v.to(dev, non_blocking=True) for v in views], labels.to(dev, non_blocking=True)


def eval_batches(dataset, image_size: int, batch_size: int, device, num_workers: int = 4, **eval_kw):
    """Un-augmented batches in dataset order: (x float (B, 3, S, S) in [0, 1] on device, labels (B,)).
    eval_kw: the "eval" view's interpolation and crop_ratio (augment_config); by default the image at size S."""
    if isinstance(dataset, ImageArray):
        cfg = augment_config("eval", image_size, **eval_kw)
        side = eval_resize(image_size, cfg["crop_ratio"])
        for s in range(0, len(dataset), batch_size):
            x = dataset.images[s : s + batch_size].to(device)
            x = x.float() / 255
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if x.shape[-1] != side or x.shape[-2] != side:  # stored images are square: resize = shorter side
                x = F.interpolate(x, size=(side, side), mode=cfg["interpolation"], antialias=True, align_corners=False)
            if side != image_size:
                top = int(round((side - image_size) / 2.0))  # torchvision CenterCrop's offset
                x = x[..., top : top + image_size, top : top + image_size]
            yield x.clamp(0, 1), dataset.labels[s : s + batch_size].to(device)
    else:
        views = _ViewsDataset(dataset, [per_image_transform("eval", image_size, **eval_kw)])
        loader = torch.utils.data.DataLoader(views, batch_size=batch_size, num_workers=num_workers)
        for (x,), labels in loader:
            yield x.to(device), labels.to(device)


def dataset_labels(dataset) -> torch.Tensor | None:
    """The labels of every example without decoding an image (ImageArray.labels, ImageFolder.targets), or None."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    return None if labels is None else torch.as_tensor(labels, dtype=torch.int64)


def heldout_subset(dataset, count: int):
    """The fixed images of every training-time monitor (kNN bank and queries, held-out loss, bits per token,
    pictures): at most `count` examples, the same on every call and rank. Class balanced when the labels are known
    without decoding (equal shares, the remainder to the first classes, each spread evenly over its class), else
    spread evenly: the first `count` of a sorted folder (ImageNet) would be a handful of classes. An ImageArray stays
    an ImageArray; other datasets become a Subset."""
    n = len(dataset)
    if count >= n:
        return dataset
    labels = dataset_labels(dataset)
    if labels is None or labels.numel() != n or bool((labels < 0).any()):
        idx = torch.linspace(0, n - 1, count).round().long()
    else:
        classes, counts = torch.unique(labels, return_counts=True)
        take = torch.zeros_like(counts)
        while int(take.sum()) < count:  # water filling: classes with images left share what is left equally
            open_classes = (take < counts).nonzero().flatten()
            left = count - int(take.sum())
            share = max(left // len(open_classes), 1)
            for c in open_classes[:left] if share == 1 else open_classes:
                take[c] += min(share, int(counts[c] - take[c]))
        picked = []
        for c, k in zip(classes.tolist(), take.tolist()):
            members = (labels == c).nonzero().flatten()
            picked.append(members[torch.linspace(0, len(members) - 1, k).round().long()] if k else members[:0])
        idx = torch.cat(picked).sort().values
    if isinstance(dataset, ImageArray):
        return ImageArray(dataset.images[idx], dataset.labels[idx], dataset.name, dataset.num_classes)
    return torch.utils.data.Subset(dataset, idx.tolist())


def heldout_images(dataset, count: int, image_size: int, device, num_workers: int = 4):
    """Un-augmented (x float (n, 3, S, S) in [0, 1], labels (n,)) of heldout_subset(dataset, count) on `device`."""
    batches = list(eval_batches(heldout_subset(dataset, count), image_size, 256, device, num_workers=num_workers))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# ======================================================================================
# 8. Training utilities
# ======================================================================================


def arg(default, help: str, choices: list | None = None, interval: str | None = None):
    """A dataclass field with its --help text; mutable defaults are copied per instance. `interval` ("[0, 1)",
    "(0, inf)", ...) is the range the flag accepts, checked at parse time; without it FLAG_INTERVALS applies, and any
    other float flag must be finite and >= 0."""
    meta = {"help": help, "choices": choices, "interval": interval}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# The range of the flags several scripts share (a field's own `interval` wins). CAN's contrastive_weight and
# rec_weight are l_c and lam (1 - each weighs the other term); synthetic_size 0 is common.py's default size.
_FLAGS_BY_INTERVAL = {
    "(0, inf)": "lr base_lr gen_lr gen_base_lr temperature tau knn_t decoupled_temperature lars_trust epochs",
    "[0, 1)": "mask_ratio momentum dropout betas",
    "(0, 1]": "crop_min_scale",
    "[0, 1]": "gray_p blur_p bert_mask_prob contrastive_weight rec_weight",
    "[1, inf)": "batch_size extract_batch_size image_size patch_size knn_k k log_every eval_every ckpt_every "
    "num_colors",
    "[0, inf)": "num_workers warmup_epochs keep_every num_samples test_images synthetic_size knn_bank knn_queries "
    "eval_images palette_pixels kmeans_iters",
}
FLAG_INTERVALS = {flag: interval for interval, flags in _FLAGS_BY_INTERVAL.items() for flag in flags.split()}


def _interval_type(base, interval: str | None):
    """argparse type: parse with `base`, then check finiteness and the interval (an error names the flag)."""
    lo, hi = (float(s) for s in interval[1:-1].split(",")) if interval else (None, None)

    def parse(text: str):
        value = base(text)
        if base is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if interval is None:
            if base is float and value < 0:
                raise argparse.ArgumentTypeError(f"{text} is negative")
        elif not (lo < value < hi or (value == lo and interval[0] == "[") or (value == hi and interval[-1] == "]")):
            raise argparse.ArgumentTypeError(f"{text} is outside {interval}")
        return value

    parse.__name__ = base.__name__  # argparse names the type in "invalid <type> value"
    return parse


class _ArgumentParser(argparse.ArgumentParser):
    """Bad input is one line naming the flag (argparse prints the whole usage block first), exit status 2."""

    def error(self, message):
        raise ExitError(f"{self.prog}: error: {message} (see --help)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        if action.default in ("", None) and "default" not in (action.help or ""):
            return action.help + (" (default: '')" if action.default == "" else " (default: none)")
        return super()._get_help_string(action)


def parse_args(cls, argv: list[str] | None = None, presets: dict[str, dict[str, dict]] | None = None):
    """Dataclass -> argparse (--field-name, its help, default and what each preset sets) -> an instance. `presets`:
    {field ("preset", "arch"): {value: {field: value}}}. Precedence: explicit flag > first level > later levels >
    default (methods list "preset" before "arch"; a preset may pick the arch). What each level set is printed (rank
    0) and kept in args.presets_applied (args.json). Values are range-checked; bad input exits 2 with one line."""
    presets = presets or {}
    levels = [(key, value, table) for key in presets for value, table in presets[key].items()]
    hints = typing.get_type_hints(cls)
    parser = _ArgumentParser(
        prog=os.path.basename(sys.argv[0]) if cls.__module__ == "__main__" else f"{cls.__module__.split('.')[-1]}.py",
        description=(cls.__doc__ or "").strip(),
        formatter_class=_HelpFormatter,
        epilog="\n".join(
            f"--{key.replace('_', '-')} {value}: " + (", ".join(f"{n}={v}" for n, v in table.items()) or "-")
            for key, value, table in levels
        )
        or None,
    )
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        optional = type(None) in typing.get_args(tp)
        if optional:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin, targs = typing.get_origin(tp), typing.get_args(tp)
        helptext = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if f.name in presets:
            helptext += f" (presets: {', '.join(presets[f.name])})"
        set_by = [f"{key} {value}: {table[f.name]}" for key, value, table in levels if f.name in table]
        if set_by:  # e.g. [preset tiny: 16; arch vit_l: 64]
            helptext += f" [{'; '.join(set_by)}]".replace("%", "%%")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(default=default, help=helptext, dest=f.name)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            base = (targs[0] if targs else str) if origin in (list, tuple) else tp
            if base in (int, float):
                base = _interval_type(base, f.metadata.get("interval") or FLAG_INTERVALS.get(f.name))
            kw.update(type=base, choices=f.metadata.get("choices"), nargs="+" if origin in (list, tuple) else None)
            if optional:
                kw["type"] = lambda s, base=base: None if s.lower() == "none" else base(s)
                kw["type"].__name__ = getattr(base, "__name__", "value")
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)

    def apply_presets(values: dict, explicit) -> tuple[dict, dict]:
        """Set `values` from the presets (not the `explicit` fields): each level's choice first (a preset may choose
        the arch), then the tables, later levels first so the first level's values win. -> (applied, explicit kept)"""
        for key in presets:
            for name, value in presets[key].get(values[key], {}).items():
                if name in presets and name not in explicit:
                    values[name] = value
        applied, kept = {}, {}
        for key in reversed(list(presets)):
            table = presets[key].get(values[key], {})
            applied[f"{key}={values[key]}"] = {n: v for n, v in table.items() if n not in explicit}
            kept.update({n: values[n] for n in table if n in explicit})
            values.update(applied[f"{key}={values[key]}"])
        return applied, kept

    cli = sys.argv[1:] if argv is None else list(argv)
    if presets and ("-h" in cli or "--help" in cli):  # --preset tiny --help: show the values the presets give
        chooser = argparse.ArgumentParser(add_help=False)
        for key in presets:
            chooser.add_argument("--" + key.replace("_", "-"), dest=key, default=argparse.SUPPRESS)
        chosen = vars(chooser.parse_known_args(cli)[0])
        values = {key: parser.get_default(key) for key in presets} | chosen
        apply_presets(values, chosen)
        parser.set_defaults(**{n: v for n, v in values.items() if n not in chosen})
    values = vars(parser.parse_args(argv))
    for action in parser._actions:  # which fields were given explicitly: parse again with every default suppressed
        action.default = argparse.SUPPRESS
    applied, kept = apply_presets(values, vars(parser.parse_args(argv)))
    for f in dataclasses.fields(cls):
        if f.name in values and isinstance(values[f.name], list) and typing.get_origin(hints[f.name]) is tuple:
            values[f.name] = tuple(values[f.name])
    args = cls(**values)
    if isinstance(getattr(args, "device", None), str):
        try:
            check_device(args.device)
        except ValueError as e:
            parser.error(str(e))
    args.presets_applied = {k: v for k, v in reversed(applied.items()) if v}
    if os.environ.get("RANK", "0") == "0":
        for level, table in args.presets_applied.items():
            key, value = level.split("=", 1)
            shown = ", ".join(f"{n}={v}" for n, v in table.items())
            print(f"--{key.replace('_', '-')}={value} sets {shown}", flush=True)
        if kept:
            print("explicit flags win over presets: " + ", ".join(f"{n}={v}" for n, v in kept.items()), flush=True)
    return args


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
        group["lr"] = lr


def param_groups(model: nn.Module, weight_decay: float, no_decay: tuple[str, ...] = ()) -> list[dict]:
    """AdamW groups: no weight decay on 1-D parameters (norms, biases) nor on parameters whose name contains one
    of `no_decay` (e.g. token / position embeddings for GCRL); frozen parameters are left out (MAE / timm)."""
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in no_decay)
            (skip if exempt else decay).append(p)
    return [{"params": skip, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_adamw(params, lr: float, betas=(0.9, 0.95), device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW, fused on CUDA (one kernel for all parameters)."""
    fused = device is not None and torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), fused=fused)


def bf16_is_fast(device) -> bool:
    """Whether bf16 matmuls run natively on `device`: CUDA GPUs with bf16 (Ampere and later), CPUs with AVX512 /
    AMX (oneDNN bf16). On an AVX2-only CPU bf16 is emulated: a 256x256 bf16 matmul measured 66x slower than fp32 on
    the 2-core development machine of this repository. Other devices (meta: FLOP counting): False."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        try:  # torch >= 2.3: without counting the slow emulation of pre-Ampere GPUs
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        with contextlib.suppress(AttributeError, RuntimeError):  # a torch that cannot tell: False
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast(device, enabled: bool = True):
    """bf16 autocast (no GradScaler needed) where the hardware runs bf16 natively (bf16_is_fast), else a no-op: the
    step runs in fp32. Code that must exercise the bf16 path on any CPU (tests) calls torch.autocast directly."""
    dev = torch.device(device)
    if not (enabled and bf16_is_fast(dev)):
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


def batch_per_rank(batch_size: int, world_size: int) -> int:
    """--batch-size is the GLOBAL batch (the papers' convention): split evenly over the ranks, or a clear error."""
    if batch_size % world_size:
        raise ValueError(
            f"--batch-size {batch_size} (global) is not divisible by the {world_size} processes; "
            f"pick a multiple of {world_size}"
        )
    return batch_size // world_size


class ExitError(SystemExit):
    """A one-line error that ends the script: printed to stderr (rank 0) when raised, exit status `code` (2 for bad
    input, argparse's convention; 1 for a run that had to stop). str() is the line, so tests can match it."""

    def __init__(self, line: str, code: int = 2):
        super().__init__(line)
        self.code = code  # what the interpreter exits with (it prints nothing for an int)
        if os.environ.get("RANK", "0") == "0":
            print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def usage_errors(script: str):
    """Bad input (arguments, missing or malformed files, a dataset that is not there, a checkpoint that does not fit,
    a folder that cannot be written) ends `script` with one line `<script>: error: ...` and exit status 2 instead of
    a traceback. Wrap only the setup: a ValueError inside the training loop is a bug and keeps its traceback."""
    script = script if script.endswith(".py") else f"{script}.py"  # a method name: its file
    try:
        yield
    except (ValueError, OSError) as e:
        if isinstance(e, (ValueError, FileNotFoundError)) or not e.strerror:
            text = str(e)
        else:  # "[Errno 13] Permission denied: 'x'" -> "Permission denied: x"
            text = f"{e.strerror}: {e.filename}" if e.filename else str(e.strerror)
        message = "; ".join(line.strip() for line in text.splitlines() if line.strip())  # e.g. the paths tried
        raise ExitError(f"{script}: error: {message}") from None


def check_common_args(args) -> None:
    """The checks every training script shares (a ValueError names the flag); parse_args checks the range of each
    flag, but not the values presets set."""
    if min(args.batch_size, args.log_every, args.eval_every, args.ckpt_every) < 1:
        raise ValueError("--batch-size, --log-every, --eval-every and --ckpt-every must be >= 1")


def stop_at(args, total_steps: int) -> int:
    """The step the run stops at: --steps when it is > 0 and before the end of the schedule, else the end."""
    stop = min(args.steps, total_steps) if args.steps > 0 else total_steps
    if stop < 1:
        raise ValueError(f"--epochs {args.epochs} with --steps {args.steps} is {stop} steps: nothing to train")
    return stop


def check_masked_vit_args(args, needs_removed: bool, paper: str) -> None:
    """MAE / CAN: the image splits into patches, the arch exists, the mask ratio leaves some patches visible (and
    some removed when the reconstruction loss is on), the decoder width fits its heads and 2D sin-cos positions."""
    if args.patch_size < 1 or args.image_size % args.patch_size:
        raise ValueError(f"--image-size {args.image_size} is not divisible by --patch-size {args.patch_size}")
    vit_arch(args.arch)
    L = (args.image_size // args.patch_size) ** 2
    kept = keep_count(L, args.mask_ratio)
    if not 0 < kept <= L or (needs_removed and kept == L):
        raise ValueError(
            f"--mask-ratio {args.mask_ratio} keeps {kept} of {L} patches; the reconstruction loss needs some removed "
            f"and the encoder some visible ({paper})"
        )
    if args.decoder_dim % 4 or args.decoder_dim % args.decoder_heads:
        raise ValueError(
            f"--decoder-dim {args.decoder_dim} must be divisible by 4 (2D sin-cos positions) and by "
            f"--decoder-heads {args.decoder_heads}"
        )


def _stack_terms(terms: dict, device=None) -> torch.Tensor:
    device = device or next((v.device for v in terms.values() if torch.is_tensor(v)), "cpu")
    values = [torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(()) for v in terms.values()]
    return torch.stack(values)


# A run folder holds the newest checkpoint and the one before it, so a checkpoint that later proves bad (its weights
# give a non-finite loss) can be set aside without losing the run; --keep-every adds snapshots that are never removed.
CHECKPOINT, PREVIOUS, DIVERGED = "checkpoint.pt", "checkpoint.prev.pt", "checkpoint.diverged.pt"
# A checkpoint whose weight norm grew more than this factor since the run's previous checkpoint is refused as diverged
# (healthy runs change the global norm by a few percent between checkpoints; weight decay bounds it).
DIVERGENCE_GROWTH = 10.0
_SAVED: dict[str, dict] = {}  # abspath(run_dir) -> {"step", "norm", "prev_step"} of its newest good checkpoint


def weights_report(model: nn.Module) -> tuple[float, float, str]:
    """(global L2 norm, largest |w|, the parameter holding it) over the floating-point parameters; one host sync."""
    named = [(n, p.detach()) for n, p in unwrap(model).named_parameters() if p.is_floating_point() and p.numel()]
    norms = torch.stack(torch._foreach_norm([p for _, p in named])).float()
    largest = torch.stack(torch._foreach_norm([p for _, p in named], math.inf)).float()
    norm, top, where = torch.stack([norms.norm(), largest.max(), largest.argmax().float()]).tolist()
    return norm, top, named[int(where) if math.isfinite(where) else 0][0]


def save_checkpoint(path: str, state: dict, previous: str | None = None, script: str = "") -> None:
    """Atomic write: temp file in the same folder, fsync, rename over the old file (moved to `previous` first when
    given). A failed write removes its temp file; a full disk is a one-line error that leaves the old file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:  # KeyboardInterrupt included: never leave a partial temp file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e)
        if full or (isinstance(e, RuntimeError) and "write" in str(e) and shutil.disk_usage(folder).free < 2**30):
            free = shutil.disk_usage(folder).free / 2**20
            raise ExitError(
                f"{script + ': ' if script else ''}error: the disk is full: writing {path} failed with {free:.0f} MiB "
                f"free; the previous checkpoint is intact. Free some space (or move the run with --output-dir) and "
                f"resume with --resume auto",
                code=1,
            ) from None
        raise
    if previous and os.path.exists(path):
        os.replace(path, previous)
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)  # fsync the folder: the renames survive a power loss
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str, method: str | None = None) -> dict:
    """Load a checkpoint dict (on the CPU); clear errors for a missing, empty or truncated file, a file that is not
    one of ours, or a checkpoint written by another method's script."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, pickle.UnpicklingError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ValueError(
            f"{path} is not a readable checkpoint ({os.path.getsize(path)} bytes: {reason}): it is empty, truncated "
            f"(an interrupted copy?) or not a torch file; use another checkpoint (a run folder also keeps {PREVIOUS}), "
            f"or train from scratch with --resume ''"
        ) from None
    if not isinstance(ckpt, dict) or "method" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this repository (no 'method'/'model' entries)")
    if method is not None and ckpt["method"] != method:
        raise ValueError(
            f"{path} is a '{ckpt['method']}' checkpoint, not '{method}': resume it with {ckpt['method']}.py, "
            f"or point --resume at a {method}.py run"
        )
    return ckpt


def resolve_resume(resume: str, run_dir: str) -> str | None:
    """--resume auto -> run_dir's checkpoint.pt (or checkpoint.prev.pt when a kill came between the two renames of a
    save) when there is one, else a fresh start; '' -> None; a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        return next((p for p in (os.path.join(run_dir, n) for n in (CHECKPOINT, PREVIOUS)) if os.path.exists(p)), None)
    if not os.path.exists(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint (use --resume auto to pick up the run folder)")
    return resume


def unwritable(folder: str) -> str | None:
    """Create `folder` and write a probe file there: None when that works, else the reason (e.g. "Not a directory")."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def prepare_run_dir(run_dir: str, info: DistInfo) -> None:
    """Rank 0: create the run folder, prove it writable (a ValueError naming --output-dir otherwise) and delete the
    temp files that killed checkpoint writes left there (those of a live process stay)."""
    if not info.is_main:
        return
    if reason := unwritable(run_dir):
        raise ValueError(
            f"--output-dir: cannot write the run folder {run_dir} ({reason}): pick a writable --output-dir"
        )
    freed = 0
    for name in os.listdir(run_dir):
        pid = name.rpartition(".tmp")[2]
        if not (name.startswith(".") and ".pt.tmp" in name and pid.isdigit()):
            continue
        try:
            if int(pid) != os.getpid():
                os.kill(int(pid), 0)  # signal 0 only checks that the process exists
                continue  # a live process (another run writing this folder): leave it
        except ProcessLookupError:
            pass
        except PermissionError:  # it exists, under another user
            continue
        with contextlib.suppress(OSError):
            freed += os.path.getsize(os.path.join(run_dir, name))
            os.remove(os.path.join(run_dir, name))
    if freed:
        print0(f"removed {freed / 2**20:.1f} MiB of temp files left by interrupted checkpoint writes in {run_dir}")


def resume(
    resume_flag: str, run_dir: str, method: str, model: nn.Module, optimizer, info: DistInfo, stop_step: int | None
) -> int:
    """--resume: prepare the run folder, restore model, optimizer and RNG states from the checkpoint the flag names
    (auto: run_dir's, when there is one) and return its step; 0 for a fresh start. A run already at stop_step is
    complete: say so, and how to train again, and exit 0."""
    prepare_run_dir(run_dir, info)
    path = resolve_resume(resume_flag, run_dir)
    _SAVED.pop(os.path.abspath(run_dir), None)
    if not path:
        return 0
    ckpt = load_training_state(path, method, model, optimizer, info)
    step = ckpt["step"]
    if stop_step is not None and step >= stop_step:
        print0(
            f"{run_dir} is complete: its checkpoint is at step {step} and this command stops at step {stop_step}, so "
            f"there is nothing to train. Start a new run with --run-name NAME (or --resume '' to train this folder "
            f"again from scratch); train this one further with a larger --steps or --epochs."
        )
        raise SystemExit(0)
    norm = ckpt.get("param_norm") or weights_report(model)[0]
    _SAVED[os.path.abspath(run_dir)] = {"step": step, "norm": norm, "prev_step": None}
    print0(f"resumed from {path} at step {step}")
    return step


def run_monitors(step: int, monitors, logger, info: DistInfo, all_ranks: bool = False) -> dict:
    """The evaluation pattern of every method file: rank 0 runs monitors() -> {"eval/<name>": value}, logs the row
    and prints it; the other ranks wait at a barrier (the monitors use the unwrapped model, no collectives).
    all_ranks: every rank runs monitors() (they shard the work and reduce it; rank 0 logs)."""
    with logger.paused():  # monitors never count as training time (the step-0 evaluation included)
        metrics = monitors() if info.is_main or all_ranks else {}
        if info.world_size > 1:
            dist.barrier()
    metrics = metrics if info.is_main else {}
    if metrics:
        logger.log(step, metrics)
        print0(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def checkpoint_due(step: int, last: bool, args, steps_per_epoch: int) -> bool:
    """Every --ckpt-every steps, at the last step, and at each --keep-every epochs snapshot."""
    return last or step % args.ckpt_every == 0 or _snapshot_epoch(step, args, steps_per_epoch) is not None


def _snapshot_epoch(step: int, args, steps_per_epoch: int) -> int | None:
    keep = getattr(args, "keep_every", 0)
    if keep > 0 and steps_per_epoch > 0 and step % steps_per_epoch == 0 and (step // steps_per_epoch) % keep == 0:
        return step // steps_per_epoch
    return None


def save_training_state(
    run_dir: str, method: str, args, model: nn.Module, optimizer, step: int, epoch: int, info: DistInfo,
    steps_per_epoch: int = 0,
) -> None:  # fmt: skip
    """Collective: rank 0 writes checkpoint.pt = {method, args, model, optimizer, rng (every rank's), step, epoch,
    param_norm} (the old one -> checkpoint.prev.pt; a checkpoint-epNNNN.pt link every --keep-every epochs).
    Weights that are not finite or whose norm grew > DIVERGENCE_GROWTH x since the last checkpoint are never written:
    the run stops with one line naming the checkpoint kept (every rank decides alike: DDP weights are equal)."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    rngs = [rng] * info.world_size
    if info.world_size > 1:
        dist.all_gather_object(rngs, rng)
    norm, largest, where = weights_report(model)
    key = os.path.abspath(run_dir)
    last = _SAVED.get(key)
    if not math.isfinite(norm) or (last and norm > DIVERGENCE_GROWTH * last["norm"]):
        what = (
            f"weights are not finite (in {where})"
            if not math.isfinite(norm)
            else f"weight norm grew {norm / last['norm']:.3g}x since step {last['step']} ({last['norm']:.4g} -> "
            f"{norm:.4g}; largest |w| {largest:.3g} in {where})"
        )
        kept = f"{CHECKPOINT} (step {last['step']}) is kept as it was" if last else "no checkpoint was written"
        lr = optimizer.param_groups[-1]["lr"]
        raise ExitError(
            f"{method}.py: error: the run diverged at step {step}: the {what}. {kept}. Resume it with --resume auto "
            f"and a lower learning rate (this step used lr {lr:.3g}).",
            code=1,
        )
    if info.is_main:
        state = {
            "method": method,
            "args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args),
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rngs,
            "step": step,
            "epoch": epoch,
            "param_norm": norm,
        }
        path = os.path.join(run_dir, CHECKPOINT)
        save_checkpoint(path, state, previous=os.path.join(run_dir, PREVIOUS), script=f"{method}.py")
        snapshot = _snapshot_epoch(step, args, steps_per_epoch)
        if snapshot is not None:  # a hard link: no second copy on disk while checkpoint.pt is this file
            keep = os.path.join(run_dir, f"checkpoint-ep{snapshot:04d}.pt")
            with contextlib.suppress(FileNotFoundError):
                os.remove(keep)
            try:
                os.link(path, keep)
            except OSError:
                shutil.copyfile(path, keep)
    _SAVED[key] = {"step": step, "norm": norm, "prev_step": last["step"] if last else None}
    if info.world_size > 1:
        dist.barrier()


def load_training_state(path: str, method: str, model: nn.Module, optimizer, info: DistInfo) -> dict:
    """Restore model, optimizer and this rank's RNG states from `path`; returns the checkpoint (step, epoch...)."""
    ckpt = load_checkpoint(path, method)
    try:
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0])[:200]  # the first mismatch
        old = ckpt.get("args", {})
        names = ("arch", "image_size", "patch_size", "decoder_dim", "decoder_depth", "num_colors", "attention", "loss")
        shape = ", ".join(f"--{k.replace('_', '-')} {old[k]}" for k in names if k in old)
        raise ValueError(
            f"{path} does not fit this model ({detail}): it was written with other architecture settings ({shape}); "
            f"resume with those, or start a fresh run with --resume '' or another --run-name"
        ) from None
    rngs = ckpt.get("rng", [])
    if len(rngs) == info.world_size:
        rng = rngs[info.rank]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:  # a different world size cannot replay the same streams; derive fresh ones deterministically
        print0(f"resuming on {info.world_size} ranks from a {len(rngs)}-rank checkpoint: RNG streams re-seeded")
        seed_everything(ckpt["step"] * 1000 + info.rank)
    return ckpt


def progress(items, label: str, total: int | None = None, unit: str = "batches"):
    """Yield from `items`, printing `label: n/N unit (p%), elapsed, ETA` (rank 0) every 10 seconds and a last line
    at the end; phases shorter than that stay quiet (long phases: feature extraction, probe training, kNN monitor)."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    t0 = last = time.perf_counter()
    n = 0
    for item in items:
        yield item
        n += 1
        now = time.perf_counter()
        if now - last >= 10.0 or (n == total and last != t0):
            last = now
            elapsed = now - t0
            done = f"{n}/{total} {unit} ({n / total:.0%})" if total else f"{n} {unit}"
            eta = f", ETA {datetime.timedelta(seconds=int(elapsed * (total - n) / n))}" if total and n < total else ""
            print0(f"  {label}: {done}, {datetime.timedelta(seconds=int(elapsed))} elapsed{eta}")


def default_run_name(method: str, args) -> str:
    parts = [method, getattr(args, "dataset", ""), getattr(args, "arch", ""), f"s{getattr(args, 'seed', 0)}"]
    return "_".join(p for p in parts if p)


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl row; inf for a line a kill cut short (dropped on resume)."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


class RunLogger:
    """The run folder (rank 0): args.json (presets applied, the precision that runs, the method's `notes`),
    metrics.jsonl (cut back to the checkpoint's step on resume) and TensorBoard events if tensorboard is installed;
    the finiteness check, checkpoints, and the progress line. step(step, terms, lr, epoch, images) after every
    update; on logging steps (collective) it averages the terms over ranks, computes images/s and MFU, writes the
    row and prints `step s/S ep e | terms | lr | img/s | mfu | eta`. Time inside `paused()` (evaluations,
    checkpoints) counts neither in images/s nor against the ETA."""

    def __init__(self, run_dir: str, args, info: DistInfo, flops_per_image: float, stop_step: int, start_step: int,
                 notes: dict | None = None, method: str = "", steps_per_epoch: int = 0):  # fmt: skip
        self.run_dir, self.args, self.info, self.tb = run_dir, args, info, None
        self.flops_per_image, self.stop_step, self.steps_per_epoch = flops_per_image, stop_step, steps_per_epoch
        self.method, self.script, self.lr, self.first_bad = method, f"{method or 'train'}.py", None, None
        self.sync_every_step = info.device.type == "cpu"  # a host read costs nothing there
        # images/s since the last logging step: images, start, paused seconds, open (nested) pauses
        self.last_step, self.images, self.t0, self.paused_s, self.pauses = start_step, 0, time.perf_counter(), 0.0, 0
        if not info.is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        saved = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
        if "amp" in saved:  # what runs, not what was asked: bf16 only where the hardware has it (bf16_is_fast)
            saved.update(amp=bool(saved["amp"] and bf16_is_fast(info.device)), amp_requested=saved["amp"])
        saved.update(presets_applied=getattr(args, "presets_applied", {}), **(notes or {}))
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(saved, f, indent=2)
        metrics = os.path.join(run_dir, "metrics.jsonl")
        kept = []
        if start_step > 0 and os.path.exists(metrics):  # rows after the checkpoint were logged by the killed run
            with open(metrics) as f:
                kept = [line for line in f if _row_step(line) <= start_step]  # a torn last line goes too
        self.file = open(metrics, "w")
        self.file.writelines(kept)
        self.file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.tb = SummaryWriter(run_dir, purge_step=start_step + 1 if start_step else None)

    @contextlib.contextmanager
    def paused(self):
        start, self.pauses = time.perf_counter(), self.pauses + 1
        try:
            yield
        finally:
            self.pauses -= 1
            if self.pauses == 0:  # nested pauses count once
                self.paused_s += time.perf_counter() - start

    def check_finite(self, step: int, terms: dict) -> None:
        """Call before the update. GPU steps only record the first bad step on the device; logging, checkpoint and
        final steps (every CPU step) read it (one all-reduce) and stop the run on a non-finite loss. A newest checkpoint
        whose own weights gave it is moved to checkpoint.diverged.pt and checkpoint.prev.pt takes its place."""
        values = _stack_terms(terms)
        bad = ~torch.isfinite(values).all()
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=values.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        after = step + 1  # the step this update makes: read on its logging, checkpoint or last step
        if not (self.sync_every_step or after % self.args.log_every == 0):
            if not checkpoint_due(after, after >= self.stop_step, self.args, self.steps_per_epoch):
                return
        first = self.first_bad.clone()
        if self.info.world_size > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        first = int(first)
        if first < 0:
            return
        shown = ", ".join(f"{k}={v:.4g}" for k, v in zip(terms, values.tolist()))
        when = f"at step {step}: {shown}" if first == step else f"first at step {first} (at step {step}: {shown})"
        saved = _SAVED.get(os.path.abspath(self.run_dir))
        if saved is None:
            story = "No checkpoint of this run was written; start again with a lower --lr"
        elif saved["step"] == first:  # the newest checkpoint's own weights give this loss: it is not a good state
            prev, bad_path = os.path.join(self.run_dir, PREVIOUS), os.path.join(self.run_dir, DIVERGED)
            if self.info.is_main:
                os.replace(os.path.join(self.run_dir, CHECKPOINT), bad_path)
                for name in os.listdir(self.run_dir):  # a --keep-every snapshot of that state (a hard link) goes too
                    path = os.path.join(self.run_dir, name)
                    if name.startswith("checkpoint-ep") and os.path.samefile(path, bad_path):
                        os.remove(path)
                if os.path.exists(prev):
                    os.replace(prev, os.path.join(self.run_dir, CHECKPOINT))
            if os.path.exists(os.path.join(self.run_dir, CHECKPOINT)):
                before = f"step {saved['prev_step']}" if saved["prev_step"] is not None else PREVIOUS
                story = (f"The checkpoint of step {first} gives this loss itself: it was moved to {DIVERGED}, and "
                         f"{CHECKPOINT} is again the one before it ({before}); resume it")  # fmt: skip
            else:
                story = f"The only checkpoint (step {first}) gives this loss itself: moved to {DIVERGED}; start again"
        else:
            story = f"{CHECKPOINT} (step {saved['step']}) was written before the first bad step and is kept; resume it"
        lr = f" than {self.lr:.3g}" if self.lr else ""
        raise ExitError(
            f"{self.script}: error: non-finite loss {when}. {story} "
            f"with --resume auto and a lower --lr{lr}, or in fp32 (--no-amp).",
            code=1,
        )

    def checkpoint(self, step: int, last: bool, model: nn.Module, optimizer, epoch: int) -> None:
        """Collective: save_training_state when checkpoint_due."""
        if checkpoint_due(step, last, self.args, self.steps_per_epoch):
            save_training_state(self.run_dir, self.method, self.args, model, optimizer, step, epoch, self.info,
                                self.steps_per_epoch)  # fmt: skip

    def step(self, step: int, terms: dict, lr: float, epoch: float, images: int, **extra) -> dict:
        self.images += images
        self.lr = lr
        if step % self.args.log_every and step < self.stop_step:
            return {}
        means = all_reduce_mean(_stack_terms(terms, self.info.device)).tolist()
        now = time.perf_counter()
        seconds = max(now - self.t0 - self.paused_s, 1e-9)  # training time since the last logging step
        ips = self.images / seconds
        eta = datetime.timedelta(seconds=int((self.stop_step - step) * seconds / max(step - self.last_step, 1)))
        self.last_step, self.images, self.t0, self.paused_s = step, 0, now, 0.0
        row = {f"loss/{n}": v for n, v in zip(terms, means)}
        row.update({"lr": lr, "epoch": epoch, **extra, "perf/images_per_s": ips})
        util = mfu(self.flops_per_image, ips / self.info.world_size, self.info.device)
        if util is not None:
            row["perf/mfu"] = util
        self.log(step, row)
        loss = "".join(f"{k} {v} | " for k, v in extra.items()) + " ".join(f"{n} {v:.4f}" for n, v in zip(terms, means))
        print0(f"step {step}/{self.stop_step} ep {epoch:.2f} | {loss} | lr {lr:.3g} | {ips:.1f} img/s"
               + (f" | mfu {util:.1%}" if util is not None else "") + f" | eta {eta}")  # fmt: skip
        return row

    def log(self, step: int, metrics: dict) -> None:
        if not self.info.is_main:
            return
        row = {"step": step, **{k: (float(v) if torch.is_tensor(v) else v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.info.is_main:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


# Peak dense bf16 FLOP/s per GPU (vendor datasheets), matched on whole words of the device name ("L4" is not "L40S")
# with the form factor first (H100 PCIe 756 TFLOP/s, SXM 989). Unknown GPUs: no MFU.
GPU_PEAK_BF16_FLOPS = [  # (model word, form-factor word or "" for any, peak)
    ("H100", "PCIE", 756e12),
    ("H100", "NVL", 835e12),
    ("H100", "", 989e12),  # SXM5
    ("H200", "NVL", 835e12),
    ("H200", "", 989e12),  # SXM
    ("GH200", "", 989e12),
    ("B200", "", 2250e12),
    ("A100", "", 312e12),  # SXM4 and PCIe alike
    ("L40S", "", 362e12),
    ("L40", "", 181e12),
    ("L4", "", 121e12),
    ("A10G", "", 70e12),
    ("A10", "", 125e12),
    ("4090", "", 165e12),
    ("3090", "", 71e12),
    ("V100", "", 125e12),  # fp16 tensor cores (no bf16 on V100)
]


def gpu_peak_flops(device=None, name: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device (or of a device `name` as torch.cuda.get_device_name spells it);
    None on the CPU or for a GPU not in GPU_PEAK_BF16_FLOPS."""
    if name is None:
        if device is None or torch.device(device).type != "cuda":
            return None
        name = torch.cuda.get_device_name(device)
    words = set("".join(c if c.isalnum() else " " for c in name.upper()).split())
    matches = (peak for model, form, peak in GPU_PEAK_BF16_FLOPS if model in words and (not form or form in words))
    return next(matches, None)


def mfu(flops_per_image: float, images_per_s_per_gpu: float, device) -> float | None:
    """Achieved / peak FLOP/s of this GPU (None when the peak is unknown). count_step_flops counts causal attention
    as full T^2 (PaLM's convention; the kernel skips about half), so igpt / gcrl's MFU counts it so too."""
    peak = gpu_peak_flops(device)
    return None if peak is None else flops_per_image * images_per_s_per_gpu / peak


def count_step_flops(build, loss_of, batch: int = 2) -> float:
    """FLOPs per example of one forward + backward training step, counted by FlopCounterMode on the meta device:
    build() -> model, loss_of(model) -> the scalar loss of `batch` examples it makes itself (on the meta device). No
    memory, no data, no RNG use, no process group (call it before setup_distributed)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build()
        return count_flops(lambda: loss_of(model).backward()) / batch


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call of fn (forward and, if fn calls backward, backward) by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the unwrapped model in eval mode (BatchNorm running statistics, no dropout), then restore its mode."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 8, labels: list[str] | None = None) -> None:
    """images (B, 3, H, W) uint8 or float in [0, 1] -> PNG grid (rows of nrow). Images under 64 px are upscaled by
    an integer factor (nearest: pixels stay pixels) so a person can see them; `labels` captions each row on the
    left (e.g. original / masked / reconstruction)."""
    from PIL import Image, ImageDraw  # PIL ships with torchvision

    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    factor = max(1, -(-64 // images.shape[-1]))
    images = images.cpu().repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=255)
    picture = Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())
    if labels:
        margin, row_h = 8 + 6 * max(len(t) for t in labels), images.shape[-2] + 2
        captioned = Image.new("RGB", (picture.width + margin, picture.height), "white")
        captioned.paste(picture, (margin, 0))
        draw = ImageDraw.Draw(captioned)
        for i, text in enumerate(labels):
            draw.text((4, 2 + i * row_h + row_h // 2 - 6), text, fill="black")
        picture = captioned
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path)  # PIL rather than torchvision.io.write_png, deprecated from torchvision 0.29
