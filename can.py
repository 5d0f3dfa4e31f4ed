"""CAN: contrastive masked autoencoder with noise prediction (Mishra et al. 2022, arXiv:2210.16870), MAE (mae.py) plus
a contrastive and a denoising term. Official code: shlokk/mae-contrastive; SPEC section 6.

What is implemented (CAN sections 3.1-3.6, Appendix C):
  * two SimCLR views per image (CAN Table 6: RandomResizedCrop, color jitter strength 1.0, grayscale 0.2, blur 0.5),
    both through the encoder as ONE batch of 2B rows (view 1 rows first, then view 2), each row its own mask;
  * noise x <- x + sigma * e, e ~ N(0, I), sigma ~ U[0, sigma_max] per image AND view, on the whole normalized image
    before masking (CAN 3.4);
  * encoder (forward_encoder; r = 0.5, CAN 3.1): patch embedding + fixed 2D sin-cos positions -> random_masking
    (per image, argsort of uniform draws: exactly floor(L * (1 - r)) patches stay) -> cls token -> ViT blocks ->
    LayerNorm, on the visible patches only; timm's parameter names (`encoder.*` loads into timm's VisionTransformer);
  * contrastive branch: mean of the visible PATCH tokens (CAN 3.2 pools "the embeddings of unmasked tokens") ->
    projection head (App. C) -> InfoNCE (CAN 3.2), tau 0.1, the 2n - 2 negatives of every rank (common.nt_xent);
  * decoder (common.MaskedDecoder): Linear to 512, one learned mask token per removed patch, unshuffle, sin-cos
    positions, 8 blocks of width 512 / 16 heads (MAE Table 1a/1b), Linear to p*p*3 values per patch;
    + the noise-level embedding p = MLP(sinusoid(sigma)) on EVERY decoder token, [M] too (CAN 3.4, Fig 3; App. C);
  * L_rec on the removed patches against the clean image, L_denoise on the visible ones against the added noise
    sigma * e (CAN 3.3, 3.4), from the same decoder output; L = l_c * L_InfoNCE + (1 - l_c) * (lam * L_rec + (1 -
    lam) * L_denoise) (CAN 3.5), l_c = 0.03 (CAN 5, Fig 7), lam = 0.7 (official code; no value in CAN 3.5, Fig 7);
  * ablations without code edits: --no-contrastive (CAN Table 5 "AN"), --no-reconstruction ("CN"), --no-denoise
    ("CA": no noise at all), --no-noise-embedding (Table 1 "+noise, +loss"; "+noise" adds --rec-weight 1);
  * monitors: reconstruction / denoising pictures and a kNN monitor on the held-out split; --flops-report: CAN vs
    SimCLR training FLOPs per image, meta device (README, "Training FLOPs per image, CAN vs SimCLR": ViT-L 1.71x).

Launch:
    python can.py --preset tiny --epochs 1                 # CPU smoke run on the synthetic shapes
    python can.py --preset cifar                           # CIFAR-10, 32 px, patch 4, ViT-Tiny
    torchrun --nproc_per_node 8 can.py --arch vit_l        # ImageNet (data/imagenet/{train,val}), ViT-L/16, 800 ep
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-endpoint HOST:29500 can.py --arch vit_l   # the same on 32 GPUs
    python can.py --arch vit_l --flops-report              # CAN vs SimCLR training FLOPs (CPU, ~5 s)

Deviations from the paper / the reference code (the official code), and why:
  * losses are means (MAE ref code) over the removed (L_rec) / visible (L_denoise) patches; CAN 3.3 / 3.4's sums / 2n
    are p*p*3 (T - T') and p*p*3 T' times ours: one constant for both only at mask ratio 0.5.
  * norm_pix_loss is OFF, as the official code (CAN's text is silent): l_c = 0.03 balances CAN Table 4's magnitudes;
    per-patch targets change L_rec's scale (measured: README, "CAN's norm_pix_loss is off by default").
  * L_rec's target is the clean image (our reading of CAN 3.3); the official code adds the noise in place and so
    reconstructs the noisy image (3.4's "x <- x + sigma * e" read literally): --rec-target noisy.
  * the noise embedding (decoder width) is added after the decoder's input projection and positions (CAN 3.4); the
    official code adds a D-wide one to the encoder output, which leaves the [M] tokens without it.
  * InfoNCE negatives from every rank (CAN 3.2); the official SupConLoss sees its own GPU's 2 x 64 views only.
  * projection head: App. C's FC 4096 - BN - ReLU x 2 - FC 128, + BN without shift (SimCLR v2, which App. C follows),
    SyncBN under DDP, PyTorch's Linear init; official: Linear(D, D) - ReLU - Linear(D, 128), no BN, mean of ALL tokens
    (cls included), xavier-uniform init (MAE's _init_weights).
  * augmentation as CAN Table 6: crop min area 0.08 at 224 px, jitter strength 1.0 = ColorJitter(0.8, 0.8, 0.8, 0.2);
    the official code's: --crop-min-scale 0.2 --jitter-strength 0.5.
  * sigma_max 0.05 is the paper's (Fig 7); the official code's --std 0.05 never reaches its model (default 0.1).
  * no --accum-iter: InfoNCE negatives and BatchNorm statistics come from the step's batch; use more ranks instead.
  * --grad-checkpointing is on for vit_b / vit_l / vit_h: 2 x 512 masked ViT-L views per GPU need ~110 GB without.
  * --arch vit_h (no ViT-H in CAN): ViT-L's lr / wd, MAE's patch 14.
  * bf16 autocast instead of fp16 + GradScaler; the loss is computed in fp32.
  * the kept count floor(L * (1 - r)) is exact (common.keep_count); the ref code's int(L * (1 - r)) loses a patch to
    float error at e.g. L = 100, r = 0.9 (9 instead of 10). Same count at every setting of the paper.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

import common

METHOD = "can"


@dataclass
class Args:
    """CAN: contrastive masked autoencoder with noise prediction (arXiv:2210.16870)."""

    # --- experiment
    run_name: str = common.arg("", f"run folder under --output-dir (default: {METHOD}_<dataset>_<arch>_s<seed>)")
    output_dir: str = common.arg("runs", "where run folders are written")
    seed: int = common.arg(0, "random seed (each rank adds its rank)")
    device: str = common.arg("auto", "auto (CUDA when available) | cuda | cpu")
    resume: str = common.arg("auto", "auto = continue <run>/checkpoint.pt when present; a path; '' = start fresh")
    export_encoder: str = common.arg("", "write --resume's encoder as {'model': timm names} to PATH and exit (README)")
    steps: int = common.arg(0, "stop after this many optimizer steps (0 = all epochs; the schedule spans all epochs)")
    flops_report: bool = common.arg(False, "print CAN vs SimCLR FLOPs per image of a training step, then exit")
    # --- data
    dataset: str = common.arg("imagefolder", f"one of {', '.join(common.DATASET_NAMES)}")
    data_root: str = common.arg("data/imagenet", "dataset root (imagefolder: <root>/train/<class>/*, <root>/val/...)")
    download: bool = common.arg(False, "download the dataset when torchvision can")
    synthetic_size: int = common.arg(0, "images per split of the synthetic dataset (0 = common.py's default)")
    image_size: int = common.arg(224, "training resolution (paper: 224)")
    num_workers: int = common.arg(10, "DataLoader workers per rank for datasets not kept on the device (MAE: 10)")
    jitter_strength: float = common.arg(1.0, "color jitter strength s: (0.8s, 0.8s, 0.8s, 0.2s) (CAN Table 6: 1.0)")
    gray_p: float = common.arg(0.2, "grayscale probability (CAN Table 6: 0.2)")
    blur: str = common.arg("auto", "Gaussian blur: auto = on at >= 96 px (SimCLR) | on | off", ["auto", "on", "off"])
    blur_p: float = common.arg(0.5, "blur probability (CAN Table 6: 0.5)")
    crop_min_scale: float | None = common.arg(None, "RandomResizedCrop min area (default 0.08 at 224 px, 0.2 at 32)")
    # --- model
    preset: str = common.arg("none", "a named group of defaults (see PRESETS)", ["none", "cifar", "tiny"])
    arch: str = common.arg("vit_b", "ViT encoder; vit_b / vit_l also set CAN Table 6's lr and wd", common.VIT_CHOICES)
    patch_size: int = common.arg(16, "patch size (16 at 224 px; ViT-H: 14 (MAE), set by --arch vit_h)")
    decoder_dim: int = common.arg(512, "decoder width (MAE Table 1b: 512)")
    decoder_depth: int = common.arg(8, "decoder blocks (MAE Table 1a: 8)")
    decoder_heads: int = common.arg(16, "decoder heads (MAE ref code / CAN App. C: 16)")
    grad_checkpointing: bool = common.arg(False, "recompute transformer blocks in backward (less memory)")
    proj_hidden: int = common.arg(4096, "projection head hidden width (CAN App. C: 4096)")
    proj_dim: int = common.arg(128, "projection output dimension (CAN App. C: 128)")
    # --- optimization
    epochs: int = common.arg(800, "training epochs (CAN Table 3: 800 for ViT-B and ViT-L on ImageNet-1K)")
    batch_size: int = common.arg(4096, "GLOBAL batch of images (2 views each), split over ranks (CAN Table 6)")
    base_lr: float = common.arg(2.5e-4, "lr per 256 images: lr = base_lr * batch / 256 (CAN Table 6: ViT-B 2.5e-4)")
    lr: float | None = common.arg(None, "absolute peak learning rate; overrides base_lr scaling")
    min_lr: float = common.arg(0.0, "final learning rate of the cosine schedule (MAE: 0)")
    warmup_epochs: int = common.arg(40, "linear warmup epochs (CAN Table 6: 40)")
    weight_decay: float = common.arg(0.05, "AdamW weight decay (CAN Table 6: ViT-B 0.05, ViT-L 0.1)")
    betas: tuple[float, float] = common.arg((0.9, 0.95), "AdamW betas (CAN Table 6)")
    clip_grad: float = common.arg(0.0, "max gradient norm, 0 = off (MAE / CAN official pretraining: no clipping)")
    amp: bool = common.arg(True, "bf16 autocast where the hardware runs it natively (the losses stay fp32)")
    compile: bool = common.arg(False, "torch.compile the model")
    # --- logging
    log_every: int = common.arg(20, "log every N steps")
    eval_every: int = common.arg(2000, "monitors every N steps (and at step 0 and the end)")
    ckpt_every: int = common.arg(500, "checkpoint every N steps (and at the end)")
    keep_every: int = common.arg(0, "also keep a snapshot checkpoint-epNNNN.pt every N epochs (0 = none; MAE: 20)")
    knn_bank: int = common.arg(10000, "training images in the kNN monitor's bank; 0 disables the kNN monitor")
    knn_queries: int = common.arg(10000, "held-out images classified by the kNN monitor")
    knn_k: int = common.arg(200, "neighbours of the kNN monitor (SPEC 8: 200, tau 0.07)")
    # --- CAN
    mask_ratio: float = common.arg(0.5, "fraction of patches removed from EACH view (CAN 3.1: 0.5)")
    norm_pix_loss: bool = common.arg(False, "standardize L_rec targets per patch (MAE); off as official CAN (header)")
    sigma_max: float = common.arg(0.05, "noise level sigma ~ U[0, sigma_max] per image and view (CAN Fig 7: 0.05)")
    noise_embed_dim: int = common.arg(128, "sinusoidal sigma embedding size (CAN official code: 128)")
    temperature: float = common.arg(0.1, "InfoNCE temperature (CAN 3.2: 0.1)")
    contrastive_weight: float = common.arg(0.03, "l_c, weight of InfoNCE (CAN 5 / Fig 7: 0.03)")
    rec_weight: float = common.arg(0.7, "lam: L_rec weight in the reconstruction part (official code: 0.7)")
    contrastive: bool = common.arg(True, "InfoNCE term (--no-contrastive = CAN Table 5 'AN')")
    reconstruction: bool = common.arg(True, "masked-patch reconstruction term (--no-reconstruction = Table 5 'CN')")
    denoise: bool = common.arg(True, "input noise + denoising term (--no-denoise = Table 5 'CA': no noise at all)")
    noise_embedding: bool = common.arg(True, "sigma embedding in the decoder (--no-noise-embedding: Table 1)")
    rec_target: str = common.arg("clean", "L_rec target: clean (paper 3.3) | noisy (official code)", ["clean", "noisy"])


# ======================================================================================================================
# Model: ViT encoder on the visible patches + projection head + MAE decoder with the noise-level embedding
# ======================================================================================================================


class CAN(nn.Module):
    """encoder: common.VisionTransformer with timm's names; decoder: common.MaskedDecoder (p*p*3 values per patch);
    noise_embed (CAN 3.4 MLP); projector (CAN App. C); a part whose loss terms are all off is not built (DDP).
    forward(x, sigma, mask_draws=None): x (N, 3, H, W) normalized noisy images (N = 2B: view 1 rows, then view 2),
    sigma (N,) their noise levels, mask_draws (N, L) uniform draws choosing the kept patches (None: drawn inside)
    -> dict: mask (N, L) 1 = removed; proj (N, proj_dim) if the projector exists; pred (N, L, p*p*3) if the decoder."""

    def __init__(self, args: Args):
        super().__init__()
        dim, depth, heads = common.vit_arch(args.arch)
        self.mask_ratio, self.patch_size = args.mask_ratio, args.patch_size
        self.noise_embed_dim = args.noise_embed_dim
        self.encoder = common.VisionTransformer(args.image_size, args.patch_size, 3, dim, depth, heads)
        out_dim = args.patch_size**2 * 3
        L = self.encoder.num_patches
        self.decoder, D = None, args.decoder_dim
        if args.reconstruction or args.denoise:  # MLP ratio 4 -> 2048 hidden at width 512 (CAN App. C)
            self.decoder = common.MaskedDecoder(L, dim, out_dim, D, args.decoder_depth, args.decoder_heads)
        self.noise_embed = None
        if self.decoder is not None and args.denoise and args.noise_embedding:
            # "a lightweight 2 layer MLP with ReLU activations of constant width" (CAN 3.4), here the decoder width.
            self.noise_embed = nn.Sequential(nn.Linear(args.noise_embed_dim, D), nn.ReLU(inplace=True), nn.Linear(D, D))
            common.init_vit_weights(self.noise_embed)
        self.projector = None
        if args.contrastive:
            self.projector = common.ProjectionHead(dim, args.proj_hidden, args.proj_dim, num_layers=3, kind="bn")
        common.set_grad_checkpointing(self, args.grad_checkpointing)

    def forward_encoder(self, x: torch.Tensor, mask_draws: torch.Tensor | None = None):
        """-> tokens (N, 1 + L_keep, D) after the final norm (cls first), mask (N, L), ids_restore (N, L)."""
        enc = self.encoder
        x = enc.embed_patches(x)  # (N, L, D): patch embedding + positions
        x, mask, ids_restore = common.random_masking(x, self.mask_ratio, mask_draws)  # keep floor(L * (1 - r))
        x = enc.with_cls(x)  # the cls token (+ its position) in front of the visible patches
        for block in enc.blocks:
            x = block(x)
        return enc.norm(x), mask, ids_restore

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, mask_draws: torch.Tensor | None = None) -> dict:
        tokens, mask, ids_restore = self.forward_encoder(x, mask_draws)
        out = {"mask": mask}
        if self.projector is not None:
            out["proj"] = self.projector(tokens[:, 1:].mean(dim=1))  # mean of the visible patch tokens (CAN 3.2)
        if self.decoder is not None:
            bias = None
            if self.noise_embed is not None:  # p = MLP(sinusoid(sigma)), added to every decoder token (CAN 3.4)
                bias = self.noise_embed(sigma_embedding(sigma, self.noise_embed_dim))
            out["pred"] = self.decoder(tokens, ids_restore, token_bias=bias)
        return out


def sigma_embedding(sigma: torch.Tensor, dim: int = 128) -> torch.Tensor:
    """Sinusoidal embedding of the noise level, sigma used as is (CAN 3.4; official code's get_1d_sincos_pos_embed,
    dim 128): [sin(sigma * freq), cos(sigma * freq)], freq_k = exp(-k ln(10000) / (half - 1)), k < half = dim / 2.
    sigma (N,) -> (N, dim) float32."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=sigma.device)
    freq = torch.exp(-k * math.log(10000.0) / (half - 1))
    angle = sigma.float()[:, None] * freq[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def build_model(args: Args) -> CAN:
    """The model of `args` (eval_probe.py rebuilds it from Args(**checkpoint["args"]) alone)."""
    return CAN(args)


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, layer: int | None = None, pool: str | None = None):
    """Frozen representation for probing. images float (B, 3, S, S) in [0, 1], unmasked -> (B, D) float32.
    layer=None: the encoder output after its final norm; layer=i: the output of block i (before the final norm).
    pool "mean" (default: CAN App. C, "global average pool ... instead of the cls token") or "cls". No noise."""
    pool = pool or "mean"
    if pool not in ("mean", "cls"):
        raise ValueError(f"unknown pool '{pool}'; use mean or cls")
    enc = common.unwrap(model).encoder
    x = common.normalize(images.float())
    with common.eval_mode(model):
        tokens = enc(x) if layer is None else enc.block_tokens(x, layer)
    return (tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)).float()


def num_feature_layers(model: nn.Module) -> int:
    return len(common.unwrap(model).encoder.blocks)


# ======================================================================================================================
# Losses (THE PART TO READ): InfoNCE (3.2), masked reconstruction (3.3), denoising (3.4), their combination (3.5)
# ======================================================================================================================


def contrastive_loss(proj: torch.Tensor, temperature: float) -> torch.Tensor:
    """CAN 3.2 InfoNCE. proj (2n, r): view-1 rows then view-2 rows (this rank). u = normalize(proj); anchor u_i^v
    has the positive u_i^{3-v} and the 2n - 2 negatives {u_j^1, u_j^2}_{j != i} (of every rank, gathered with
    gradients); loss = mean over the 2n local anchors of -log softmax: SimCLR's NT-Xent (common.nt_xent), fp32."""
    n = proj.shape[0] // 2
    return common.nt_xent(proj[:n], proj[n:], temperature)


def denoise_loss(pred: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CAN 3.4: the decoder output on VISIBLE patches predicts the added noise sigma * e (patchified, not normalized).
    pred, noise (N, L, p*p*3), mask (N, L) 1 = removed -> per-patch mean squared error over visible patches, fp32."""
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


def can_losses(model: nn.Module, views: list[torch.Tensor], args: Args, mask_draws=None, sigma=None, noise=None):
    """One CAN training objective. views: the two float (B, 3, H, W) views in [0, 1] of the same B images (or one
    (2B, 3, H, W) tensor, view-1 rows first). mask_draws (2B, L), sigma (2B,), noise (2B, 3, H, W) may be given
    (tests); otherwise drawn from the global RNG, mask draws first. bf16 autocast when args.amp; the losses in fp32.
    Returns (terms: {"contrastive", "reconstruction", "denoise" (the active ones), "total"} fp32 scalars,
             out: the model outputs plus x (clean normalized input), x_noisy, sigma, noise)."""
    images = torch.cat(list(views)) if isinstance(views, (list, tuple)) else views
    x = common.normalize(images.float())  # MAE works in ImageNet-normalized pixel space (main_pretrain.py Normalize)
    N, L = x.shape[0], common.unwrap(model).encoder.num_patches
    if mask_draws is None:
        mask_draws = torch.rand(N, L, device=x.device)  # each row (image and view) masked independently
    if args.denoise:
        if sigma is None or noise is None:
            sigma, noise = draw_noise(x, args.sigma_max)
        x_noisy = x + noise  # CAN 3.4: noise on the whole image, then masking (inside the encoder)
    else:  # 'CA' ablation: no noise at all
        sigma, noise, x_noisy = torch.zeros(N, device=x.device), None, x
    with common.autocast(x.device, args.amp):
        out = model(x_noisy, sigma, mask_draws)
    out.update(x=x, x_noisy=x_noisy, sigma=sigma, noise=noise)
    p = args.patch_size
    terms = {}
    if args.contrastive:
        terms["contrastive"] = contrastive_loss(out["proj"].float(), args.temperature)
    if args.reconstruction:
        target = common.patchify(x if args.rec_target == "clean" else x_noisy, p)
        terms["reconstruction"] = common.reconstruction_loss(out["pred"], target, out["mask"], args.norm_pix_loss)
    if args.denoise:
        terms["denoise"] = denoise_loss(out["pred"], common.patchify(noise, p), out["mask"])
    weights = loss_weights(args)
    terms["total"] = sum(weights[k] * terms[k] for k in weights)
    return terms, out


def simclr_loss(model: CAN, images: torch.Tensor, args: Args) -> torch.Tensor:
    """The SimCLR baseline of the FLOP comparison (CAN 3.6, Fig 1): two full, noise-free views through the same
    encoder, mean of the patch tokens, the same projection head, InfoNCE; no decoder."""
    x = common.normalize(images.float())
    with common.autocast(x.device, args.amp):
        proj = model.projector(model.encoder(x)[:, 1:].mean(dim=1))
    return contrastive_loss(proj.float(), args.temperature)


def training_step_flops(args: Args, method: str = "can") -> float:
    """FLOPs per image of one forward + backward step (common.count_step_flops: meta device, no memory or RNG). Model
    FLOPs: gradient checkpointing's recomputation is not counted. 4 rows = 2 images x 2 views; "simclr": simclr_loss."""
    args, S = dataclasses.replace(args, amp=False, grad_checkpointing=False), args.image_size
    args.contrastive = args.contrastive or method == "simclr"
    loss = simclr_loss if method == "simclr" else lambda m, images, args: can_losses(m, images, args)[0]["total"]
    return common.count_step_flops(lambda: build_model(args), lambda m: loss(m, torch.rand(4, 3, S, S), args))


def flops_report(args: Args) -> dict[str, float]:
    """Print CAN vs SimCLR training FLOPs per image for args.arch at args.image_size and return them."""
    can, simclr = training_step_flops(args, "can"), training_step_flops(args, "simclr")
    dim, depth, heads = common.vit_arch(args.arch)
    L = (args.image_size // args.patch_size) ** 2
    kept = common.keep_count(L, args.mask_ratio)
    print(f"FLOPs per image of one training step (forward + backward, 2 views), {args.arch} ({dim}/{depth}/{heads}) "
          f"at {args.image_size} px, patch {args.patch_size}:")  # fmt: skip
    print(f"  CAN    : {can / 1e9:9.1f} GFLOPs  (2 views x {kept}/{L} patches + decoder "
          f"{args.decoder_dim}x{args.decoder_depth} + projection head)")  # fmt: skip
    print(f"  SimCLR : {simclr / 1e9:9.1f} GFLOPs  (2 views x {L}/{L} patches + the same projection head, no decoder)")
    print(f"  SimCLR / CAN = {simclr / can:.3f}   (CAN paper, abstract: SimCLR uses ~70% more FLOPs for ViT-L)")
    return {"flops/can": can, "flops/simclr": simclr, "flops/ratio": simclr / can}


def build_optimizer(model: nn.Module, args: Args, lr: float, device) -> torch.optim.Optimizer:
    """AdamW; weight decay as the reference (timm add_weight_decay): none on 1-D tensors and biases, the cls and mask
    tokens decayed, the frozen sin-cos positions left out (common.param_groups)."""
    return common.make_adamw(common.param_groups(model, args.weight_decay), lr, args.betas, device)


# ======================================================================================================================
# Monitors: reconstruction / denoising pictures and the kNN monitor
# ======================================================================================================================


@torch.no_grad()
def save_reconstructions(model: nn.Module, images: torch.Tensor, args: Args, path: str, seed: int = 0) -> None:
    """PNG, one column per image (n, 3, S, S) in [0, 1], 5 rows: original | noisy input, removed patches grey |
    reconstruction (predicted removed patches, the noisy input elsewhere) | predicted noise on the visible patches |
    true noise (noise rows: 0.5 + noise / (6 sigma_max)). A fixed generator draws the masks and the noise (sigma =
    sigma_max): pictures are comparable over training, the training RNG untouched. With norm_pix_loss the predicted
    patches are un-normalized with the clean target patch's mean / std (MAE visualization practice)."""
    model = common.unwrap(model)
    if model.decoder is None:
        return
    images = images.to(next(model.parameters()).device)
    p, n = args.patch_size, images.shape[0]
    g = torch.Generator(device=images.device).manual_seed(seed)
    x = common.normalize(images.float())
    mask_draws = torch.rand(n, model.encoder.num_patches, device=x.device, generator=g)
    sigma = torch.full((n,), args.sigma_max if args.denoise else 0.0, device=x.device)
    noise = sigma.view(n, 1, 1, 1) * torch.randn(x.shape, device=x.device, generator=g)
    x_noisy = x + noise
    with common.eval_mode(model):
        out = model(x_noisy, sigma, mask_draws)
    pred, mask = out["pred"].float(), out["mask"].float()[..., None]
    noise_pred = pred  # on the visible patches (CAN 3.4)
    target = common.patchify(x if args.rec_target == "clean" else x_noisy, p)
    if args.norm_pix_loss:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    grey = common.patchify(common.normalize(torch.full_like(images, 0.5)), p)
    noisy = common.patchify(x_noisy, p)  # the visible input
    masked, reconstructed = noisy * (1 - mask) + grey * mask, pred * mask + noisy * (1 - mask)
    rows = [x, common.unpatchify(masked, p), common.unpatchify(reconstructed, p)]
    rows = [common.denormalize(r).clamp(0, 1) for r in rows]
    scale = 1.0 / (6 * args.sigma_max) if args.sigma_max > 0 else 1.0
    rows.append((0.5 + common.unpatchify(noise_pred * (1 - mask), p) * scale).clamp(0, 1))
    rows.append((0.5 + common.unpatchify(common.patchify(noise, p) * (1 - mask), p) * scale).clamp(0, 1))
    labels = ["original", "masked + noise", "reconstruction", "predicted noise", "true noise"]
    common.save_image_grid(torch.cat(rows), path, nrow=n, labels=labels)


def monitors(model: nn.Module, held: dict, args: Args, step: int, run_dir: str) -> dict:
    """The reconstruction PNG and eval/knn_top1: weighted kNN (SPEC 8) on `features` of the held-out data."""
    path = os.path.join(run_dir, f"reconstruction_step{step:07d}.png")
    save_reconstructions(model, held["pictures"], args, path)
    if args.knn_bank <= 0:
        return {}
    embedded = common.embed_heldout(lambda x: features(model, x), held, args, held["pictures"].device)
    return {"eval/knn_top1": common.knn_top1(embedded, args)}


# ======================================================================================================================
# Data: two SimCLR views per image (CAN 3.1, Table 6)
# ======================================================================================================================


def augment_kwargs(args: Args) -> dict:
    """common's "simclr" view for CAN Table 6 (jitter strength 1.0, grayscale 0.2, blur 0.5)."""
    kw = dict(jitter_strength=args.jitter_strength, gray_p=args.gray_p, blur=common.BLUR_FLAG[args.blur],
              blur_p=args.blur_p)  # fmt: skip
    if args.crop_min_scale is not None:
        kw["scale"] = (args.crop_min_scale, 1.0)
    return kw


def heldout_data(args: Args, train_set, test_set, device) -> dict:
    """The monitors' fixed held-out data: the kNN bank and queries (class balanced) and 8 pictures."""
    held = common.knn_heldout(args, train_set, test_set)
    held["pictures"] = common.heldout_images(test_set, 8, args.image_size, device)[0]
    return held


def check_args(args: Args) -> None:
    """Settings that cannot train: a ValueError that main turns into a one-line exit message."""
    common.check_common_args(args)
    if not (args.contrastive or args.reconstruction or args.denoise):
        raise ValueError("--no-contrastive --no-reconstruction --no-denoise removes every loss term; keep at least one")
    common.check_masked_vit_args(args, needs_removed=args.reconstruction, paper="CAN: 0.5")


# ======================================================================================================================
# Presets and the training loop
# ======================================================================================================================

# Values a named group sets unless given on the command line (printed at startup, saved in args.json). --preset
# wins over --arch's entry.
PRESETS = {
    "preset": {
        # CIFAR-size model (not in the paper): 32 px, patch 4 -> 64 patches, ViT-Tiny, a 256-wide 4-block decoder
        # (MAE Table 1a/1b), batch 512 and 10 warmup epochs as SimCLR's CIFAR-10 recipe; CAN Table 6's ViT-B lr / wd.
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
        ),
        # CPU tests and smoke runs: nothing here is a recommendation (lr 6.25e-4 at batch 16 moves a few steps).
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
            base_lr=1e-2,
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
        # not in CAN (no ViT-H there): ViT-L's lr / wd, MAE's ViT-H/14 patch, gradient checkpointing as ViT-L
        **{
            a: dict(base_lr=1.25e-4, weight_decay=0.1, patch_size=14, grad_checkpointing=True)
            for a in ("vit_h", "vit_huge")
        },
    },
}


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv, PRESETS)
    with common.usage_errors(METHOD):  # bad input: one line, no traceback
        check_args(args)
    if args.export_encoder:  # interop, no training: the checkpoint's encoder for MAE's fine-tuning scripts and timm
        with common.usage_errors(METHOD):
            return common.export_encoder(args, METHOD, prefix="encoder.")
    if args.flops_report:
        return flops_report(args)
    # --- boilerplate: FLOPs (meta device, before any process group), ranks, seeds, data, model, optimizer, resume
    flops_per_image = training_step_flops(args)
    info = common.setup_distributed(args.device)
    common.seed_everything(args.seed + info.rank)
    run_dir = os.path.join(args.output_dir, args.run_name or common.default_run_name(METHOD, args))
    with common.usage_errors(METHOD):
        per_rank = common.batch_per_rank(args.batch_size, info.world_size)
        train_set, test_set = common.load_split(args, train=True), common.load_split(args, train=False)
        batches = common.TrainBatches(train_set, ["simclr", "simclr"], args.image_size, per_rank, info, seed=args.seed,
                                      num_workers=args.num_workers, aug_kwargs=augment_kwargs(args))  # fmt: skip
    held = heldout_data(args, train_set, test_set, info.device)
    model = common.distribute(build_model(args), info, args.compile, static_graph=True)
    peak_lr = args.lr if args.lr is not None else common.scaled_lr(args.base_lr, args.batch_size)
    optimizer = build_optimizer(common.unwrap(model), args, peak_lr, info.device)
    steps_per_epoch = batches.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    with common.usage_errors(METHOD):  # a missing --resume PATH, another method's or architecture's checkpoint
        stop_step = common.stop_at(args, total_steps)
        step = common.resume(args.resume, run_dir, METHOD, model, optimizer, info, stop_step)
    logger = common.RunLogger(
        run_dir, args, info, flops_per_image, stop_step, step, method=METHOD, steps_per_epoch=steps_per_epoch
    )
    common.print0(f"{METHOD} {args.arch} on {args.dataset}: {info.world_size} x {per_rank} images/step, "
                  f"{steps_per_epoch} steps/epoch, peak lr {peak_lr:.3g}, steps {step} -> {stop_step}, "
                  f"{flops_per_image / 1e9:.3f} GFLOPs per image (forward + backward)")  # fmt: skip

    def evaluate(step: int) -> dict:
        return common.run_monitors(step, lambda: monitors(model, held, args, step, run_dir), logger, info)

    final = {k.replace("eval/", "init/"): v for k, v in evaluate(0).items()} if step == 0 else {}

    # --- the training loop (THE PART TO READ is the model and the loss above)
    model.train()
    epoch = step // steps_per_epoch
    while step < stop_step:
        for views, _ in batches.epoch(epoch, start_step=step % steps_per_epoch):
            common.set_lr(optimizer, lr := common.cosine_lr(step, total_steps, warmup_steps, peak_lr, args.min_lr))
            terms, _ = can_losses(model, views, args)
            logger.check_finite(step, terms)  # a non-finite loss stops the run before it reaches a checkpoint
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            if args.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            step += 1
            last = step >= stop_step
            # --- logging, monitors, checkpoints (boilerplate)
            final.update(logger.step(step, terms, lr, step / steps_per_epoch, args.batch_size))
            with logger.paused():  # images/s counts training time only
                if step % args.eval_every == 0 or last:
                    final.update(evaluate(step))
                logger.checkpoint(step, last, model, optimizer, epoch)
            if last:
                break
        epoch += 1
    logger.close()
    common.cleanup_distributed()
    return {**final, "step": step, "flops_per_image": flops_per_image}


if __name__ == "__main__":
    main()
