"""CAN: contrastive masked autoencoder with noise prediction (Mishra et al. 2022, arXiv:2210.16870).

What is implemented (CAN sections 3.1-3.6, Appendix C; SPEC section 6):
  * two SimCLR views per image (CAN Table 6: RandomResizedCrop, color jitter strength 1.0, grayscale 0.2,
    blur 0.5), both through the ViT encoder as ONE batch of 2B rows (view 1 rows first, then view 2);
  * Gaussian noise x <- x + sigma * e, e ~ N(0, I), sigma ~ U[0, sigma_max] drawn per image AND view, added to
    the whole normalized image before masking (CAN 3.4);
  * each view independently keeps exactly T' = int(T * (1 - mask_ratio)) patches, mask_ratio 0.5 (CAN 3.1);
  * contrastive branch: mean of the visible encoder PATCH tokens (the cls token is left out, as CAN 3.2 pools
    "the embeddings of unmasked tokens"; the official code also averages the cls slot) -> projection head
    (App. C: FC 4096 - BN - ReLU twice, then FC 128; SyncBN under DDP) -> InfoNCE (CAN 3.2) with tau 0.1 and the
    2n - 2 in-batch negatives of every rank, gathered with gradients (common.nt_xent);
  * MAE decoder (512 wide, 8 blocks, 16 heads, MLP 2048; App. C) over visible tokens + [M] tokens + positions
    + the noise-level embedding p = MLP(sinusoid(sigma)) added to EVERY decoder token, [M] tokens included (CAN
    3.4, Fig 3);
  * L_rec on masked patches against the clean image (CAN 3.3), L_denoise on visible patches against the added
    noise sigma * e (CAN 3.4), both on the same decoder output, and
        L = l_c * L_InfoNCE + (1 - l_c) * (lam * L_rec + (1 - lam) * L_denoise),  l_c = 0.03, lam = 0.7 (CAN 3.5);
  * ablations without code edits: --no-contrastive (CAN Table 5 "AN"), --no-reconstruction ("CN"),
    --no-denoise ("CA": no noise is added at all and the noise embedding does not exist),
    --no-noise-embedding (CAN Table 1: "+noise, +loss" column; "+noise" = --no-noise-embedding --rec-weight 1);
  * --flops-report: FLOPs per image of a training step of CAN vs SimCLR (two full views through the same encoder
    and projection head, no decoder), counted on the meta device (no memory, no data), then exit;
  * reconstruction / denoising pictures and an online kNN monitor on the held-out split.

Launch:
    python can.py --preset tiny --epochs 1                     # CPU smoke run on the synthetic shapes dataset
    python can.py --preset cifar                               # CIFAR-10, 32 px, patch 4, ViT-Tiny
    torchrun --nproc_per_node 8 can.py --arch vit_l            # ImageNet-1K in data/imagenet/{train,val}/<class>/,
                                                               # CAN Table 6 ViT-L recipe (batch 4096, 800 epochs)
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-endpoint HOST:29500 can.py --arch vit_l      # the same on 32 GPUs
    python can.py --arch vit_l --flops-report                  # CAN vs SimCLR training FLOPs (CPU, seconds)

Deviations from the paper / the official code (shlokk/mae-contrastive), and why:
  * losses are means (MAE ref code): L_rec averages the per-patch mean squared error over removed patches,
    L_denoise over visible patches; CAN 3.3/3.4 write sums of squared errors divided by 2n, i.e. the same loss up
    to the constant factor p*p*3 * T'.
  * norm_pix_loss is ON by default (MAE README recipe, MAE Table 1c: per-patch normalized targets improve
    representations); CAN does not state it. The noise target is never normalized (official code).
  * the reconstruction target is the clean image (paper); the official code adds the noise in place and thus
    reconstructs the noisy image: --rec-target noisy.
  * the noise-level MLP maps to the decoder width and is added after the decoder's input projection and positions
    to every token ([M] and cls included), as CAN 3.4 describes; the official code adds a D-wide embedding to the
    encoder outputs before the decoder projection, which leaves the [M] tokens without it.
  * the projection head ends with BatchNorm without shift after the FC 128 (SimCLR v2, common.ProjectionHead
    kind="bn"); CAN App. C lists the FC 128 only, and says its preprocessing / heads follow SimCLR.
  * --grad-checkpointing (on in the vit_b / vit_l presets) recomputes every transformer block in the backward
    pass: same math, about a third more compute, but 2 x 512 masked views of ViT-L per GPU (batch 4096 on 8
    GPUs) need ~110 GB of activations without it, more than an 80 GB GPU holds.
  * the paper trains on TPUs in JAX; this is PyTorch with bf16 autocast (losses in fp32).

Measured with this file (FlopCounterMode on the meta device; forward + backward of one training step per image,
both views; `python can.py --arch vit_l --flops-report`, CPU, ~5 s):
    vit_l/16 at 224:  CAN 430.9 GFLOPs, SimCLR 738.3 GFLOPs, SimCLR / CAN = 1.71  (CAN abstract: "70% higher")
    vit_b/16 at 224:  CAN 168.9 GFLOPs, SimCLR 210.5 GFLOPs, SimCLR / CAN = 1.25  (the 8 x 512 decoder over 2 x 196
                      tokens weighs more against the smaller encoder)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import common
from common import (
    MaskedDecoder,
    ProjectionHead,
    RunLogger,
    Throughput,
    TrainBatches,
    VisionTransformer,
    arg,
    autocast,
    batch_per_rank,
    check_finite,
    cleanup_distributed,
    convert_sync_batchnorm,
    cosine_lr,
    count_flops,
    default_run_name,
    load_training_state,
    make_adamw,
    normalize,
    nt_xent,
    param_groups,
    parse_args,
    patchify,
    print0,
    resolve_resume,
    save_training_state,
    scaled_lr,
    seed_everything,
    set_lr,
    setup_distributed,
    unpatchify,
    unwrap,
    usage_errors,
    vit_arch,
)

METHOD = "can"
ARCH_CHOICES = list(common.VIT_ARCHS) + list(common.VIT_ALIASES)


@dataclass
class Args:
    """CAN: contrastive masked autoencoder with noise prediction (arXiv:2210.16870)."""

    # --- experiment
    run_name: str = arg("", "run folder name under --output-dir (default: can_<dataset>_<arch>_s<seed>)")
    output_dir: str = arg("runs", "where run folders are written")
    seed: int = arg(0, "random seed (each rank adds its rank)")
    device: str = arg("auto", "auto (CUDA when available) | cuda | cpu")
    resume: str = arg("auto", "auto = continue <run>/checkpoint.pt when present; a path; '' = start fresh")
    steps: int = arg(
        0, "stop after this many optimizer steps in total (0 = all epochs; the LR schedule spans all epochs)"
    )
    flops_report: bool = arg(False, "print CAN vs SimCLR FLOPs per image of a training step for --arch, then exit")
    # --- data
    dataset: str = arg("imagefolder", "cifar10 | cifar100 | svhn | stl10 | imagenet32 | imagenet64 | imagefolder | ...")
    data_root: str = arg("data/imagenet", "dataset root (imagefolder: <root>/train/<class>/*, <root>/val/<class>/*)")
    download: bool = arg(False, "download the dataset when torchvision can")
    synthetic_size: int = arg(0, "images per split of the synthetic dataset (0 = common.py's default)")
    image_size: int = arg(224, "training resolution (CAN: 224)")
    num_workers: int = arg(10, "DataLoader workers per rank for datasets not kept on the device (MAE: 10)")
    # --- model
    preset: str = arg("none", "defaults for a scale: cifar (32 px) | tiny (CPU tests)", ["none", "cifar", "tiny"])
    arch: str = arg("vit_b", "ViT encoder preset (width/depth/heads)", ARCH_CHOICES)
    patch_size: int = arg(16, "patch size (CAN: 16 at 224)")
    decoder_dim: int = arg(512, "decoder width (CAN App. C / MAE: 512)")
    decoder_depth: int = arg(8, "decoder blocks (CAN App. C / MAE: 8)")
    decoder_heads: int = arg(16, "decoder heads (CAN App. C / MAE: 16)")
    proj_hidden: int = arg(4096, "projection head hidden width (CAN App. C: 4096)")
    proj_dim: int = arg(128, "projection output dimension (CAN App. C: 128)")
    grad_checkpointing: bool = arg(False, "recompute transformer blocks in backward (less memory, ~1/3 more compute)")
    # --- optimization
    epochs: int = arg(800, "training epochs (CAN Table 3: 800 for ViT-B and ViT-L on ImageNet-1K)")
    batch_size: int = arg(4096, "GLOBAL batch of images (2 views each), split over ranks (CAN Table 6: 4096)")
    base_lr: float = arg(2.5e-4, "lr per 256 images: lr = base_lr * batch / 256 (CAN Table 6: ViT-B 2.5e-4)")
    lr: float | None = arg(None, "absolute peak learning rate; overrides base_lr scaling")
    min_lr: float = arg(0.0, "final learning rate of the cosine schedule (MAE: 0)")
    warmup_epochs: int = arg(40, "linear warmup epochs (CAN Table 6: 40)")
    weight_decay: float = arg(0.05, "AdamW weight decay (CAN Table 6: ViT-B 0.05, ViT-L 0.1)")
    betas: tuple[float, float] = arg((0.9, 0.95), "AdamW betas (CAN Table 6)")
    clip_grad: float = arg(0.0, "max gradient norm, 0 = off (MAE / CAN official pretraining: no clipping)")
    amp: bool = arg(True, "bf16 autocast (losses stay fp32)")
    compile: bool = arg(False, "torch.compile the model")
    # --- logging
    log_every: int = arg(20, "log every N steps")
    eval_every: int = arg(2000, "pictures + kNN monitor every N steps (and at the end)")
    ckpt_every: int = arg(500, "checkpoint every N steps (and at the end)")
    knn_bank: int = arg(10000, "training images (un-augmented) in the kNN memory bank; 0 disables the kNN monitor")
    knn_queries: int = arg(10000, "held-out images classified by the kNN monitor")
    knn_k: int = arg(200, "neighbours of the kNN monitor (SPEC 8: 200, tau 0.07)")
    # --- CAN
    mask_ratio: float = arg(0.5, "fraction of patches removed from EACH view (CAN 3.1: 0.5)")
    sigma_max: float = arg(0.05, "noise level sigma ~ U[0, sigma_max] per image and view (CAN Fig 7: 0.05)")
    noise_embed_dim: int = arg(128, "sinusoidal sigma embedding size (CAN official code: 128)")
    temperature: float = arg(0.1, "InfoNCE temperature (CAN 3.2: 0.1)")
    contrastive_weight: float = arg(0.03, "l_c, weight of InfoNCE (CAN 5 / Fig 7: 0.03)")
    rec_weight: float = arg(0.7, "lam: L_rec weight inside the reconstruction part (official code: 0.7; denoise 0.3)")
    contrastive: bool = arg(True, "InfoNCE term (--no-contrastive = CAN Table 5 'AN')")
    reconstruction: bool = arg(True, "masked-patch reconstruction term (--no-reconstruction = CAN Table 5 'CN')")
    denoise: bool = arg(True, "input noise + denoising term (--no-denoise = CAN Table 5 'CA': no noise at all)")
    noise_embedding: bool = arg(True, "sigma embedding in the decoder (--no-noise-embedding: CAN Table 1 ablation)")
    rec_target: str = arg("clean", "L_rec target: clean (paper 3.3) | noisy (official code)", ["clean", "noisy"])
    norm_pix_loss: bool = arg(True, "normalize L_rec targets per patch (MAE README recipe; CAN is silent)")
    jitter_strength: float = arg(1.0, "color jitter strength s: (0.8s, 0.8s, 0.8s, 0.2s) (CAN Table 6: 1.0)")
    gray_p: float = arg(0.2, "grayscale probability (CAN Table 6: 0.2)")
    blur: str = arg("auto", "Gaussian blur: auto = on at >= 96 px (SimCLR) | on | off", ["auto", "on", "off"])
    blur_p: float = arg(0.5, "blur probability (CAN Table 6: 0.5)")
    crop_min_scale: float | None = arg(
        None, "RandomResizedCrop min area (default 0.08 at 224 px (SimCLR), 0.2 at 32 px)"
    )


# Values a preset sets unless given on the command line. "preset" is applied first, so a preset may choose the arch
# whose own entry then applies.
PRESETS = {
    "preset": {
        # CIFAR-size CAN (not in the paper): 32 px, patch 4 -> 64 patches (MAE-on-CIFAR practice), ViT-Tiny encoder,
        # a 256-wide 4-block decoder (MAE Table 1a/1b: depth 4 / width 256 lose <= 0.1 fine-tuning points), batch
        # 512 and 10 warmup epochs as SimCLR's CIFAR-10 recipe; lr and wd are CAN Table 6's ViT-B values.
        "cifar": dict(
            dataset="cifar10",
            data_root="data",
            image_size=32,
            patch_size=4,
            arch="vit_tiny",
            decoder_dim=256,
            decoder_depth=4,
            decoder_heads=8,
            proj_hidden=2048,
            epochs=400,
            batch_size=512,
            warmup_epochs=10,
            base_lr=2.5e-4,
            weight_decay=0.05,
            eval_every=1000,
            ckpt_every=1000,
            knn_bank=10000,
        ),
        # CPU tests and smoke runs: nothing here is a recommendation.
        "tiny": dict(
            dataset="synthetic",
            data_root="data",
            synthetic_size=1000,
            image_size=16,
            patch_size=4,
            arch="vit_micro",
            decoder_dim=64,
            decoder_depth=2,
            decoder_heads=4,
            proj_hidden=128,
            proj_dim=32,
            epochs=2,
            batch_size=16,
            warmup_epochs=0,
            base_lr=1e-2,  # lr 6.25e-4 at batch 16: large enough for a few CPU steps to move the weights
            log_every=1,
            eval_every=100,
            ckpt_every=100,
            knn_bank=300,
            knn_queries=100,
            knn_k=20,
            num_workers=0,
        ),
    },
    # CAN Table 6: base lr 2.5e-4 / 1.25e-4 and weight decay 0.05 / 0.1 for ViT-B / ViT-L; gradient checkpointing so
    # that 512 images per GPU (batch 4096 on 8 GPUs) fit in 80 GB (see the header).
    "arch": {
        **{a: dict(base_lr=2.5e-4, weight_decay=0.05, grad_checkpointing=True) for a in ("vit_b", "vit_base")},
        **{a: dict(base_lr=1.25e-4, weight_decay=0.1, grad_checkpointing=True) for a in ("vit_l", "vit_large")},
    },
}


# ======================================================================================================================
# Model: ViT encoder on visible patches + projection head + MAE decoder with the noise-level embedding
# ======================================================================================================================


def sigma_embedding(sigma: torch.Tensor, dim: int = 128) -> torch.Tensor:
    """Sinusoidal embedding of the noise level (CAN 3.4; official code get_1d_sincos_pos_embed with dim 128):
    half = dim / 2, freq_k = exp(-k * ln(10000) / (half - 1)) for k = 0..half-1,
    emb = [sin(sigma * freq), cos(sigma * freq)]. sigma (N,) -> (N, dim) float32. sigma is used as is (no
    rescaling), as in the official code."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=sigma.device)
    freq = torch.exp(-k * math.log(10000.0) / (half - 1))
    angle = sigma.float()[:, None] * freq[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


class CheckpointedBlock(common.Block):
    """A common.Block whose activations are recomputed in the backward pass (torch.utils.checkpoint): the same
    parameters, names and math, less memory. build_model switches blocks to it with --grad-checkpointing."""

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(super().forward, x, is_causal, use_reentrant=False)
        return super().forward(x, is_causal)


class CAN(nn.Module):
    """encoder (timm names, so `encoder.*` loads into timm's ViT), decoder (MAE), noise_embed (CAN 3.4 MLP),
    projector (CAN App. C). Parts whose loss term is switched off are not built (no unused parameters under DDP).

    forward(x, sigma, mask_noise) with x (N, 3, H, W) normalized noisy images (N = 2B: view 1 rows, then view 2),
    sigma (N,) their noise levels, mask_noise (N, L) uniform draws choosing the kept patches (None: drawn inside)
    -> dict: mask (N, L) 1 = removed; proj (N, proj_dim) when the projector exists; pred (N, L, p*p*3) when the
    decoder exists."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        arch: str,
        mask_ratio: float,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        proj_hidden: int = 4096,
        proj_dim: int = 128,
        noise_embed_dim: int = 128,
        with_projector: bool = True,
        with_decoder: bool = True,
        with_noise_embed: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        dim, depth, heads = vit_arch(arch)
        self.mask_ratio, self.patch_size, self.noise_embed_dim = mask_ratio, patch_size, noise_embed_dim
        self.encoder = VisionTransformer(img_size, patch_size, 3, dim, depth, heads)
        L = self.encoder.num_patches
        self.decoder = None
        if with_decoder:  # MLP ratio 4 -> 2048 hidden at width 512 (CAN App. C)
            self.decoder = MaskedDecoder(L, dim, patch_size**2 * 3, decoder_dim, decoder_depth, decoder_heads)
        self.noise_embed = None
        if with_decoder and with_noise_embed:
            # "a lightweight 2 layer MLP with ReLU activations of constant width" (CAN 3.4), here the decoder width.
            self.noise_embed = nn.Sequential(
                nn.Linear(noise_embed_dim, decoder_dim), nn.ReLU(inplace=True), nn.Linear(decoder_dim, decoder_dim)
            )
            common.init_vit_weights(self.noise_embed)
        self.projector = ProjectionHead(dim, proj_hidden, proj_dim, num_layers=3, kind="bn") if with_projector else None
        if grad_checkpointing:  # same module objects and state_dict names, only the forward differs
            blocks = list(self.encoder.blocks) + (list(self.decoder.blocks) if self.decoder is not None else [])
            for block in blocks:
                block.__class__ = CheckpointedBlock

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, mask_noise: torch.Tensor | None = None) -> dict:
        tokens, mask, ids_restore = self.encoder(x, self.mask_ratio, mask_noise)  # (N, 1 + T', D), cls first
        out = {"mask": mask}
        if self.projector is not None:
            out["proj"] = self.projector(tokens[:, 1:].mean(dim=1))  # mean of the visible patch tokens (CAN 3.2)
        if self.decoder is not None:
            bias = None
            if self.noise_embed is not None:  # p = MLP(sinusoid(sigma)), added to every decoder token (CAN 3.4)
                bias = self.noise_embed(sigma_embedding(sigma, self.noise_embed_dim))
            out["pred"] = self.decoder(tokens, ids_restore, token_bias=bias)
        return out


def build_model(args: Args) -> CAN:
    """The CAN model of `args` (also used by eval_probe.py with Args(**checkpoint["args"]))."""
    return CAN(
        args.image_size,
        args.patch_size,
        args.arch,
        args.mask_ratio,
        args.decoder_dim,
        args.decoder_depth,
        args.decoder_heads,
        args.proj_hidden,
        args.proj_dim,
        args.noise_embed_dim,
        with_projector=args.contrastive,
        with_decoder=args.reconstruction or args.denoise,
        with_noise_embed=args.denoise and args.noise_embedding,
        grad_checkpointing=args.grad_checkpointing,
    )


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, layer: int | None = None, pool: str = "mean") -> torch.Tensor:
    """Frozen representation for probing. images float (B, 3, S, S) in [0, 1] (un-normalized), noise-free and
    unmasked -> (B, D) float32. layer=None: the encoder output after its final LayerNorm; layer=i: the output of
    block i (0-based, before the final norm). pool="mean" (default): mean of the patch tokens, CAN's linear-probe
    representation (CAN App. C: "global average pool of the final representation instead of the cls token");
    pool="cls": the cls token."""
    if pool not in ("mean", "cls"):
        raise ValueError(f"unknown pool '{pool}'; use mean or cls")
    model = unwrap(model)
    enc = model.encoder
    was_training = model.training
    model.eval()
    x = normalize(images.float())
    if layer is None:
        tokens = enc(x)[0]
    else:
        tokens = enc.block_tokens(x, layer)
    model.train(was_training)
    return (tokens[:, 1:].mean(dim=1) if pool == "mean" else tokens[:, 0]).float()


def num_feature_layers(model: nn.Module) -> int:
    return len(unwrap(model).encoder.blocks)


# ======================================================================================================================
# Losses (THE PART TO READ): InfoNCE (3.2), masked reconstruction (3.3), denoising (3.4), their combination (3.5)
# ======================================================================================================================


def contrastive_loss(proj: torch.Tensor, temperature: float) -> torch.Tensor:
    """CAN 3.2 InfoNCE. proj (2n, r): view-1 rows then view-2 rows (this rank). u = normalize(proj); anchor u_i^v
    has the positive u_i^{3-v} and the 2n - 2 negatives {u_j^1, u_j^2}_{j != i} (of every rank, gathered with
    gradients); loss = mean over the 2n local anchors of -log softmax. Same as SimCLR's NT-Xent (common.nt_xent),
    in fp32."""
    n = proj.shape[0] // 2
    return nt_xent(proj[:n], proj[n:], temperature)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """CAN 3.3 / MAE forward_loss. pred, target (N, L, p*p*3), mask (N, L) 1 = removed. With norm_pix the target
    patch is (t - mean) / sqrt(var + 1e-6), unbiased var (MAE ref code). Per-patch mean of squared errors,
    averaged over the removed patches only. fp32."""
    target = target.float()
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def denoise_loss(pred: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CAN 3.4: the decoder output on VISIBLE patches predicts the added noise sigma * e. pred, noise
    (N, L, p*p*3) (noise patchified, never normalized), mask (N, L) 1 = removed. Per-patch mean squared error
    averaged over the visible patches. fp32."""
    visible = 1.0 - mask.float()
    per_patch = ((pred.float() - noise.float()) ** 2).mean(dim=-1)
    return (per_patch * visible).sum() / visible.sum()


def loss_weights(args: Args) -> dict[str, float]:
    """CAN 3.5: l_c * L_InfoNCE + (1 - l_c) * (lam * L_rec + (1 - lam) * L_denoise). An ablated term gets weight 0
    and the others keep theirs (CAN Table 5: 'setting the loss weight to zero')."""
    lc, lam = args.contrastive_weight, args.rec_weight
    weights = {"contrastive": lc, "reconstruction": (1 - lc) * lam, "denoise": (1 - lc) * (1 - lam)}
    return {k: w for k, w in weights.items() if getattr(args, k)}


def draw_noise(images: torch.Tensor, sigma_max: float, generator: torch.Generator | None = None):
    """sigma (N,) ~ U[0, sigma_max] per row (= per image and view) and noise = sigma * e, e ~ N(0, I), shaped like
    images (N, 3, H, W) (CAN 3.4)."""
    N = images.shape[0]
    sigma = sigma_max * torch.rand(N, device=images.device, generator=generator)
    eps = torch.randn(images.shape, device=images.device, generator=generator)
    return sigma, sigma.view(N, 1, 1, 1) * eps


def can_losses(
    model: nn.Module,
    images: torch.Tensor,
    args: Args,
    mask_noise: torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One CAN training objective. images float (2B, 3, H, W) in [0, 1]: the B first views, then the B second
    views. mask_noise (2B, L), sigma (2B,), noise (2B, 3, H, W) may be given (tests); otherwise drawn from the
    global RNG, mask draws first. The model runs under bf16 autocast when args.amp; the losses in fp32.
    Returns (terms: {"contrastive", "reconstruction", "denoise" (the active ones), "total"} fp32 scalars,
             out: the model outputs plus x (clean normalized input), x_noisy, sigma, noise)."""
    x = normalize(images.float())  # CAN and MAE work in ImageNet-normalized pixel space
    N, L = x.shape[0], unwrap(model).encoder.num_patches
    if mask_noise is None:
        mask_noise = torch.rand(N, L, device=x.device)  # each row (image and view) masked independently
    if args.denoise:
        if sigma is None or noise is None:
            sigma, noise = draw_noise(x, args.sigma_max)
        x_noisy = x + noise  # CAN 3.4: noise on the whole image, then masking (inside the encoder)
    else:  # 'CA' ablation: no noise at all
        sigma, noise, x_noisy = torch.zeros(N, device=x.device), None, x
    amp = autocast(x.device, args.amp)
    with amp:
        out = model(x_noisy, sigma, mask_noise)
    out.update(x=x, x_noisy=x_noisy, sigma=sigma, noise=noise)
    p = args.patch_size
    terms = {}
    if args.contrastive:
        terms["contrastive"] = contrastive_loss(out["proj"].float(), args.temperature)
    if args.reconstruction:
        target = x if args.rec_target == "clean" else x_noisy
        terms["reconstruction"] = reconstruction_loss(out["pred"], patchify(target, p), out["mask"], args.norm_pix_loss)
    if args.denoise:
        terms["denoise"] = denoise_loss(out["pred"], patchify(noise, p), out["mask"])
    weights = loss_weights(args)
    terms["total"] = sum(weights[k] * terms[k] for k in weights)
    return terms, out


def simclr_loss(model: CAN, images: torch.Tensor, args: Args) -> torch.Tensor:
    """The SimCLR baseline of the FLOP comparison (CAN 3.6, Fig 1): two full, noise-free views through the same
    encoder, mean of the patch tokens, the same projection head, InfoNCE; no decoder."""
    x = normalize(images.float())
    amp = autocast(x.device, args.amp)
    with amp:
        tokens = model.encoder(x, mask_ratio=0.0)[0]
        proj = model.projector(tokens[:, 1:].mean(dim=1))
    return contrastive_loss(proj.float(), args.temperature)


def training_step_flops(args: Args, method: str = "can") -> float:
    """FLOPs per image (both of its views) of one forward + backward training step, counted by FlopCounterMode on
    the meta device with a 2-image batch: no memory, no data, no RNG use, no process group (call it before
    setup_distributed). Model FLOPs: gradient checkpointing's recomputation is not counted."""
    args = dataclasses.replace(
        args, amp=False, grad_checkpointing=False, contrastive=args.contrastive or method == "simclr"
    )
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(args)
        images = torch.rand(4, 3, args.image_size, args.image_size)  # 2 images x 2 views

        def step():
            loss = (
                simclr_loss(model, images, args) if method == "simclr" else can_losses(model, images, args)[0]["total"]
            )
            loss.backward()

        return count_flops(step) / 2


def flops_report(args: Args) -> dict[str, float]:
    """Print CAN vs SimCLR training FLOPs per image for args.arch at args.image_size and return them."""
    can, simclr = training_step_flops(args, "can"), training_step_flops(args, "simclr")
    dim, depth, heads = vit_arch(args.arch)
    L = (args.image_size // args.patch_size) ** 2
    kept = int(L * (1 - args.mask_ratio))
    print(
        f"FLOPs per image of one training step (forward + backward, 2 views), {args.arch} ({dim}/{depth}/{heads}) "
        f"at {args.image_size} px, patch {args.patch_size}:"
    )
    print(
        f"  CAN    : {can / 1e9:9.1f} GFLOPs  (2 views x {kept}/{L} patches + decoder "
        f"{args.decoder_dim}x{args.decoder_depth} + projection head)"
    )
    print(f"  SimCLR : {simclr / 1e9:9.1f} GFLOPs  (2 views x {L}/{L} patches + the same projection head, no decoder)")
    print(f"  SimCLR / CAN = {simclr / can:.3f}   (CAN paper, abstract: SimCLR uses ~70% more FLOPs for ViT-L)")
    return {"flops/can": can, "flops/simclr": simclr, "flops/ratio": simclr / can}


# ======================================================================================================================
# Evaluation: reconstruction / denoising pictures and the kNN monitor
# ======================================================================================================================


@torch.no_grad()
def save_reconstructions(model: nn.Module, images: torch.Tensor, args: Args, path: str, seed: int = 0) -> None:
    """PNG with one column per image (n, 3, S, S) in [0, 1] and 5 rows: original | noisy input with the removed
    patches grey | reconstruction (predicted removed patches, the noisy input elsewhere) | predicted noise on the
    visible patches | true noise (noise rows: 0.5 + noise / (6 sigma_max)). A fixed generator draws the masks and
    the noise (sigma = sigma_max) so pictures are comparable over training and the training RNG is untouched.
    With norm_pix_loss the predicted patches are un-normalized with the clean target patch's mean / std (MAE
    visualization practice; this leaks the patch statistics into the picture)."""
    model = unwrap(model)
    if model.decoder is None:
        return
    was_training = model.training
    model.eval()
    g = torch.Generator(device=images.device).manual_seed(seed)
    x = normalize(images.float())
    n, L, p = x.shape[0], model.encoder.num_patches, args.patch_size
    mask_noise = torch.rand(n, L, device=x.device, generator=g)
    sigma = torch.full((n,), args.sigma_max if args.denoise else 0.0, device=x.device)
    noise = sigma.view(n, 1, 1, 1) * torch.randn(x.shape, device=x.device, generator=g)
    x_noisy = x + noise
    out = model(x_noisy, sigma, mask_noise)
    pred, mask = out["pred"].float(), out["mask"][..., None]
    target = patchify(x if args.rec_target == "clean" else x_noisy, p)
    pixels = pred
    if args.norm_pix_loss:
        pixels = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    noisy_patches = patchify(x_noisy, p)
    grey = patchify(normalize(torch.full_like(images, 0.5)), p)
    rows = [
        x,
        unpatchify(noisy_patches * (1 - mask) + grey * mask, p),
        unpatchify(pixels * mask + noisy_patches * (1 - mask), p),
    ]
    scale = 1.0 / (6 * args.sigma_max) if args.sigma_max > 0 else 1.0
    rows = [common.denormalize(r).clamp(0, 1) for r in rows]
    rows.append((0.5 + unpatchify(pred * (1 - mask), p) * scale).clamp(0, 1))
    rows.append((0.5 + unpatchify(patchify(noise, p) * (1 - mask), p) * scale).clamp(0, 1))
    common.save_image_grid(torch.cat(rows), path, nrow=n)
    model.train(was_training)


@torch.no_grad()
def knn_top1(model, bank_set, query_set, args: Args, device) -> float:
    """kNN monitor (SPEC 8: k=200, tau 0.07, cosine) on `features`: memory bank = args.knn_bank un-augmented
    training images, queries = args.knn_queries held-out images (both common.heldout_subset: class balanced). Top-1
    in [0, 1]."""
    amp = autocast(device, args.amp)

    def embed(dataset, count):
        feats, labels = [], []
        for x, y in common.eval_batches(common.heldout_subset(dataset, count), args.image_size, 256, device):
            with amp:
                feats.append(features(model, x))
            labels.append(y)
        return torch.cat(feats), torch.cat(labels)

    bank, bank_labels = embed(bank_set, args.knn_bank)
    queries, query_labels = embed(query_set, args.knn_queries)
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    scores = common.knn_predict(bank, bank_labels, queries, num_classes, k=args.knn_k)
    return (scores.argmax(dim=1) == query_labels).float().mean().item()


# ======================================================================================================================
# Data: two SimCLR views per image (CAN 3.1, Table 6)
# ======================================================================================================================


def augment_kwargs(args: Args) -> dict:
    """Keyword arguments of common's "simclr" view for CAN Table 6 (jitter strength 1.0, grayscale 0.2, blur 0.5)."""
    kw = dict(
        jitter_strength=args.jitter_strength,
        gray_p=args.gray_p,
        blur={"auto": None, "on": True, "off": False}[args.blur],
        blur_p=args.blur_p,
    )
    if args.crop_min_scale is not None:
        kw["scale"] = (args.crop_min_scale, 1.0)
    return kw


def load_split(args: Args, train: bool):
    """The train or held-out split; in-memory datasets are stored at the training resolution (e.g. synthetic shapes
    drawn at that size), image folders are decoded at full size and left to the crops."""
    kw = {"synthetic_size": args.synthetic_size} if args.dataset == "synthetic" and args.synthetic_size else {}
    return common.build_dataset(
        args.dataset, root=args.data_root, train=train, download=args.download, image_size=args.image_size, **kw
    )


def check_args(args: Args) -> None:
    """Clear errors for settings that cannot train."""
    if min(args.batch_size, args.log_every, args.eval_every, args.ckpt_every) < 1:
        raise ValueError("--batch-size, --log-every, --eval-every and --ckpt-every must be >= 1")
    if not (args.contrastive or args.reconstruction or args.denoise):
        raise ValueError("--no-contrastive --no-reconstruction --no-denoise removes every loss term; keep at least one")
    if args.image_size % args.patch_size:
        raise ValueError(f"--image-size {args.image_size} is not divisible by --patch-size {args.patch_size}")
    L = (args.image_size // args.patch_size) ** 2
    kept = int(L * (1 - args.mask_ratio))
    if not 0 < kept <= L or (args.reconstruction and kept == L):
        raise ValueError(
            f"--mask-ratio {args.mask_ratio} keeps {kept} of {L} patches; L_rec needs some removed and "
            f"the encoder some visible (CAN: 0.5)"
        )


# ======================================================================================================================
# Training loop
# ======================================================================================================================


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv, PRESETS)
    with usage_errors("can.py"):  # bad input: one line, no traceback
        check_args(args)
    if args.flops_report:
        return flops_report(args)
    # --- boilerplate: FLOPs (on the meta device, before any process group exists), ranks, seeds, run folder
    flops_per_image = training_step_flops(args)
    info = setup_distributed(args.device)
    dev = info.device
    seed_everything(args.seed + info.rank)
    with usage_errors("can.py"):
        per_rank = batch_per_rank(args.batch_size, info.world_size)
        train_set, test_set = load_split(args, train=True), load_split(args, train=False)
    run_dir = os.path.join(args.output_dir, args.run_name or default_run_name(METHOD, args))
    logger = RunLogger(run_dir, args, info.is_main)
    print0(f"CAN training step: {flops_per_image / 1e9:.2f} GFLOPs per image (forward + backward, both views)")

    # --- data: two SimCLR views per image (splits loaded above); held-out split for the kNN monitor and the pictures
    with usage_errors("can.py"):  # e.g. a batch larger than the dataset
        batches = TrainBatches(
            train_set, ["simclr", "simclr"], args.image_size, per_rank, info, seed=args.seed,
            num_workers=args.num_workers, aug_kwargs=augment_kwargs(args),
        )  # fmt: skip
    picture_images = common.heldout_images(test_set, 8, args.image_size, dev)[0]  # fixed held-out images for the PNGs

    # --- model, optimizer (boilerplate)
    model = build_model(args).to(dev)
    if dev.type == "cuda":  # global BN statistics (SimCLR); DDP refuses SyncBatchNorm on CPU, where BN stays per rank
        model = convert_sync_batchnorm(model, info)
    if info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    peak_lr = args.lr if args.lr is not None else scaled_lr(args.base_lr, args.batch_size)
    optimizer = make_adamw(param_groups(unwrap(model), args.weight_decay), peak_lr, args.betas, dev)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch
    stop_step = min(args.steps, total_steps) if args.steps > 0 else total_steps
    step = 0
    with usage_errors("can.py"):  # a missing --resume PATH, another method's or architecture's checkpoint
        resume_path = resolve_resume(args.resume, run_dir)
        if resume_path:
            step = load_training_state(resume_path, METHOD, model, optimizer, info)["step"]
    if resume_path:
        print0(f"resumed from {resume_path} at step {step}")
    print0(
        f"{args.arch} on {args.dataset}: {info.world_size} x {per_rank} images/step, {steps_per_epoch} steps/epoch, "
        f"peak lr {peak_lr:.3g}, steps {step} -> {stop_step}"
    )

    # --- the training loop (THE PART TO READ is can_losses above)
    model.train()
    epoch = step // steps_per_epoch
    meter = Throughput(stop_step, step)
    images_since_log, final = 0, {}
    while step < stop_step:
        for views, _ in batches.epoch(epoch, start_step=step % steps_per_epoch):
            set_lr(optimizer, lr := cosine_lr(step, total_steps, warmup_steps, peak_lr, args.min_lr))
            images = torch.cat(views)  # (2B, 3, S, S): view 1 rows, then view 2 rows -> one encoder batch
            terms, _ = can_losses(model, images, args)
            # one host sync per step: every term is checked before the update (no NaN reaches a checkpoint)
            values = dict(zip(terms, torch.stack([t.detach() for t in terms.values()]).tolist()))
            check_finite(step, values)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            if args.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            step += 1
            images_since_log += args.batch_size
            last = step >= stop_step

            # --- logging, evaluation, checkpoints (boilerplate)
            if step % args.log_every == 0 or last:
                mean = common.all_reduce_mean(torch.tensor(list(values.values()), device=dev)).tolist()
                ips, eta = meter.tick(step, images_since_log)
                images_since_log = 0
                row = {f"loss/{k}": v for k, v in zip(values, mean)}
                row.update({"lr": lr, "epoch": step / steps_per_epoch, "perf/images_per_s": ips})
                util = common.mfu(flops_per_image, ips / info.world_size, dev)
                if util is not None:
                    row["perf/mfu"] = util
                logger.log(step, row)
                final.update(row)
                parts = " ".join(f"{k[5:]} {v:.4f}" for k, v in row.items() if k.startswith("loss/"))
                print0(
                    f"step {step}/{stop_step} ep {epoch} {parts} lr {lr:.3g} {ips:.1f} img/s"
                    + (f" mfu {util:.1%}" if util is not None else "")
                    + f" eta {eta}"
                )
            if step % args.eval_every == 0 or last:
                if info.is_main:
                    path = os.path.join(run_dir, f"reconstruction_step{step:07d}.png")
                    save_reconstructions(model, picture_images, args, path)
                    metrics = {}
                    if args.knn_bank > 0:
                        metrics["eval/knn_top1"] = knn_top1(model, train_set, test_set, args, dev)
                        print0(f"step {step}: kNN top-1 {metrics['eval/knn_top1']:.4f}")
                    if metrics:
                        logger.log(step, metrics)
                    final.update(metrics)
                if info.world_size > 1:
                    torch.distributed.barrier()
            if step % args.ckpt_every == 0 or last:
                save_training_state(run_dir, METHOD, args, model, optimizer, step, epoch, info)
            if step % args.eval_every == 0 or step % args.ckpt_every == 0:
                meter.t0 = time.perf_counter()  # images/s measures training only, not the monitors or checkpoints
            if last:
                break
        epoch += 1
    logger.close()
    cleanup_distributed()
    final.update({"step": step, "flops_per_image": flops_per_image})
    return final


if __name__ == "__main__":
    main()
