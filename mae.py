"""MAE: masked autoencoders are scalable vision learners (He et al. 2022, arXiv:2111.06377), the reconstruction
baseline of CAN (arXiv:2210.16870).

What is implemented (MAE section 3, reference code facebookresearch/mae models_mae.py; SPEC section 3):
  * one view per image: RandomResizedCrop(scale (0.2, 1), bicubic) + horizontal flip and nothing else (MAE
    main_pretrain.py; MAE Table 1e: color jitter hurts), then ImageNet mean / std standardization;
  * per-image random masking by argsort of uniform noise (common.random_masking): exactly int(L * (1 - r)) patches
    stay visible, r = 0.75 (MAE Fig 5); mask (N, L) with 1 = removed, ids_restore to put tokens back;
  * encoder: a ViT (common.VisionTransformer, timm's parameter names) on the visible patches only, plus the cls token
    (MAE App. A.1), fixed 2D sin-cos positions;
  * decoder (common.MaskedDecoder): Linear to 512, one shared learned mask token per removed patch, unshuffle, fixed
    sin-cos positions, 8 blocks of width 512 / 16 heads / MLP 2048 (MAE Table 1a/1b, CAN App. C), Linear to p*p*3;
  * loss (MAE eq. in 3 "Reconstruction target", ref forward_loss): per-patch mean squared error over the p*p*3 values,
    averaged over the REMOVED patches only; with norm_pix_loss (on, MAE Table 1c) the target patch is
    (t - mean) / sqrt(var + 1e-6) with the unbiased variance of the patch;
  * patchify layout of the reference ('nchpwq->nhwpqc'): patches row-major, (row, col, channel) inside a patch with
    the channel fastest; unpatchify is its inverse (common.patchify / common.unpatchify);
  * every --eval-every steps (and at step 0 and the end): eval/test_loss, the same loss on fixed held-out images with
    fixed masks (no augmentation), and a PNG of originals / masked inputs / reconstructions;
  * the encoder state_dict (`encoder.*` without the prefix) loads into timm's VisionTransformer of the same size
    (num_classes=0, class_token=True), tests/test_mae.py checks every name and shape.

Launch:
    python mae.py --preset tiny --epochs 1                     # CPU smoke run on the synthetic shapes dataset
    python mae.py --preset cifar                               # CIFAR-10, 32 px, patch 4, ViT-Tiny (--patch-size 2)
    torchrun --nproc_per_node 8 mae.py                         # ImageNet-1K in data/imagenet/{train,val}/<class>/,
                                                               # MAE ViT-L/16 recipe: batch 4096, 800 epochs
    torchrun --nproc_per_node 8 mae.py --arch vit_b --epochs 1600          # ViT-B/16, MAE's longest schedule
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 mae.py --arch vit_h   # ViT-H/14 on 16 GPUs

Deviations from the paper / the reference code, and why:
  * defaults follow MAE (App. A.1 Table 8 = CAN Table 8 except the augmentation): CAN Table 8 lists SimCLR's color
    jitter / grayscale / blur for its MAE baseline, while it says it follows He et al., whose code and Table 1e use
    crop + flip only; --view simclr gives CAN Table 8 as printed.
  * norm_pix_loss is ON by default (MAE README recipe, Table 1c); the reference code's argparse default is off.
  * no gradient accumulation (--accum-iter of main_pretrain.py): the global batch is split over the ranks; with MAE's
    25% visible patches ViT-L/16 at 512 images per GPU (batch 4096 on 8 GPUs) needs about 40 GB of bf16
    activations by our estimate (not measured here), ViT-H/14 about 70 GB: use 16 GPUs for ViT-H.
  * the kept tokens enter the encoder in noise order (as the reference code); the loss and the decoder do not depend
    on that order.
  * bf16 autocast instead of fp16 + GradScaler; the loss is computed in fp32.

Measured with this file on the 2-core CPU of the development machine (AVX2 without bf16 units, so --amp runs fp32
there, common.bf16_is_fast), idle:
    python mae.py --preset tiny --dataset fashion_mnist --steps 150
        vit_micro, 16 px, patch 4, batch 16: 420-460 images/s
    python mae.py --preset cifar --dataset synthetic --synthetic-size 2048 --steps 4 --log-every 1
        vit_tiny, 32 px, patch 4, batch 512, 1.84 GFLOPs per image: 33 images/s (the synthetic shapes stand in for
        CIFAR-10, which is not on that machine)
    python mae.py --preset tiny --steps 40 --eval-every 40
        held-out loss (128 images, fixed masks, norm_pix_loss) 2.147 at init -> 0.507 at step 40; predicting zeros
        (each patch's own mean color) scores 0.979
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import common
from common import (
    MaskedDecoder,
    RunLogger,
    Throughput,
    TrainBatches,
    VisionTransformer,
    arg,
    autocast,
    batch_per_rank,
    check_finite,
    cleanup_distributed,
    cosine_lr,
    count_flops,
    default_run_name,
    load_training_state,
    make_adamw,
    normalize,
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

METHOD = "mae"
ARCH_CHOICES = list(common.VIT_ARCHS) + list(common.VIT_ALIASES)


@dataclass
class Args:
    """MAE: masked autoencoders are scalable vision learners (arXiv:2111.06377)."""

    # --- experiment
    run_name: str = arg("", "run folder name under --output-dir (default: mae_<dataset>_<arch>_s<seed>)")
    output_dir: str = arg("runs", "where run folders are written")
    seed: int = arg(0, "random seed (each rank adds its rank)")
    device: str = arg("auto", "auto (CUDA when available) | cuda | cpu")
    resume: str = arg("auto", "auto = continue <run>/checkpoint.pt when present; a path; '' = start fresh")
    steps: int = arg(
        0, "stop after this many optimizer steps in total (0 = all epochs; the LR schedule spans all epochs)"
    )
    # --- data
    dataset: str = arg("imagefolder", "cifar10 | cifar100 | svhn | stl10 | imagenet32 | imagenet64 | imagefolder | ...")
    data_root: str = arg("data/imagenet", "dataset root (imagefolder: <root>/train/<class>/*, <root>/val/<class>/*)")
    download: bool = arg(False, "download the dataset when torchvision can")
    synthetic_size: int = arg(0, "images per split of the synthetic dataset (0 = common.py's default)")
    image_size: int = arg(224, "training resolution (MAE: 224)")
    num_workers: int = arg(10, "DataLoader workers per rank for datasets not kept on the device (MAE: 10)")
    view: str = arg(
        "mae",
        "augmentation: mae = crop + flip (MAE) | simclr = + jitter 1.0, gray, blur (CAN Table 8)",
        ["mae", "simclr"],
    )
    crop_min_scale: float = arg(0.2, "RandomResizedCrop min area (MAE main_pretrain.py: 0.2)")
    # --- model
    preset: str = arg("none", "defaults for a scale: cifar (32 px) | tiny (CPU tests)", ["none", "cifar", "tiny"])
    arch: str = arg("vit_l", "ViT encoder preset (width/depth/heads; MAE main_pretrain.py: ViT-L)", ARCH_CHOICES)
    patch_size: int = arg(16, "patch size (MAE: 16 for ViT-B/L, 14 for ViT-H, set by --arch vit_h)")
    decoder_dim: int = arg(512, "decoder width (MAE Table 1b: 512)")
    decoder_depth: int = arg(8, "decoder blocks (MAE Table 1a: 8)")
    decoder_heads: int = arg(16, "decoder heads (MAE ref code / CAN App. C: 16)")
    # --- optimization
    epochs: int = arg(800, "training epochs (MAE README / Table 1: 800; 1600 for MAE's final results)")
    batch_size: int = arg(4096, "GLOBAL batch of images, split over ranks (MAE Table 8: 4096)")
    base_lr: float = arg(1.5e-4, "lr per 256 images: lr = base_lr * batch / 256 (MAE Table 8: 1.5e-4)")
    lr: float | None = arg(None, "absolute peak learning rate; overrides base_lr scaling")
    min_lr: float = arg(0.0, "final learning rate of the cosine schedule (MAE: 0)")
    warmup_epochs: int = arg(40, "linear warmup epochs (MAE Table 8: 40)")
    weight_decay: float = arg(0.05, "AdamW weight decay (MAE Table 8: 0.05)")
    betas: tuple[float, float] = arg((0.9, 0.95), "AdamW betas (MAE Table 8)")
    clip_grad: float = arg(0.0, "max gradient norm, 0 = off (MAE pretraining: no clipping)")
    amp: bool = arg(True, "bf16 autocast (the loss stays fp32)")
    compile: bool = arg(False, "torch.compile the model")
    # --- logging
    log_every: int = arg(20, "log every N steps")
    eval_every: int = arg(2000, "held-out loss + reconstruction PNG every N steps (and at step 0 and the end)")
    ckpt_every: int = arg(500, "checkpoint every N steps (and at the end)")
    test_images: int = arg(512, "held-out images (fixed masks) of eval/test_loss")
    # --- MAE
    mask_ratio: float = arg(0.75, "fraction of patches removed from each image (MAE Fig 5: 0.75)")
    norm_pix_loss: bool = arg(True, "normalize each target patch by its mean / std (MAE Table 1c, README recipe)")


# Values a preset sets unless given on the command line. "preset" is applied first, so a preset may choose the arch
# whose own entry then applies.
PRESETS = {
    "preset": {
        # CIFAR-size MAE (not in the paper): 32 px, patch 4 -> 64 patches (16 visible; --patch-size 2 gives 256 / 64),
        # ViT-Tiny encoder, a 256-wide 4-block decoder (MAE Table 1a/1b: depth 4 / width 256 lose <= 0.1 fine-tuning
        # points), batch 512, 10 warmup epochs; lr and wd are MAE Table 8's. The same shapes as can.py's cifar preset.
        "cifar": dict(
            dataset="cifar10",
            data_root="data",
            image_size=32,
            patch_size=4,
            arch="vit_tiny",
            decoder_dim=256,
            decoder_depth=4,
            decoder_heads=8,
            epochs=400,
            batch_size=512,
            warmup_epochs=10,
            base_lr=1.5e-4,
            weight_decay=0.05,
            eval_every=1000,
            ckpt_every=1000,
            test_images=1000,
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
            epochs=2,
            batch_size=16,
            warmup_epochs=0,
            base_lr=1e-2,  # lr 6.25e-4 at batch 16: large enough for a few CPU steps to move the weights
            log_every=1,
            eval_every=100,
            ckpt_every=100,
            test_images=128,
            num_workers=0,
        ),
    },
    # MAE uses one recipe for every size (README: blr 1.5e-4, wd 0.05); ViT-H is ViT-H/14 (MAE models_mae.py).
    "arch": {a: dict(patch_size=14) for a in ("vit_h", "vit_huge")},
}


# ======================================================================================================================
# Model: ViT encoder on the visible patches + MAE decoder (THE PART TO READ, with the loss below)
# ======================================================================================================================


class MAE(nn.Module):
    """encoder: common.VisionTransformer with timm's names (`encoder.*` loads into timm's VisionTransformer);
    decoder: common.MaskedDecoder (decoder_dim wide, predicts p*p*3 values per patch).

    forward(x, mask_noise=None): x (N, 3, H, W) normalized images; mask_noise (N, L) uniform draws choosing the kept
    patches (the int(L * (1 - mask_ratio)) smallest are kept; None: drawn inside)
    -> pred (N, L, p*p*3) for EVERY patch (the loss only reads the removed ones), mask (N, L) with 1 = removed."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        arch: str,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
    ):
        super().__init__()
        dim, depth, heads = vit_arch(arch)
        self.mask_ratio, self.patch_size = mask_ratio, patch_size
        self.encoder = VisionTransformer(img_size, patch_size, 3, dim, depth, heads)
        L = self.encoder.num_patches
        self.decoder = MaskedDecoder(L, dim, patch_size**2 * 3, decoder_dim, decoder_depth, decoder_heads)

    def forward(self, x: torch.Tensor, mask_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # encoder: patch embed + positions -> keep the visible patches -> prepend cls -> blocks -> norm
        tokens, mask, ids_restore = self.encoder(x, self.mask_ratio, mask_noise)  # (N, 1 + L_keep, D), cls first
        # decoder: project, append mask tokens, unshuffle to the patch order, + positions, blocks, predict pixels
        return self.decoder(tokens, ids_restore), mask


def build_model(args: Args) -> MAE:
    """The MAE model of `args` (also used by eval_probe.py with Args(**checkpoint["args"]))."""
    return MAE(
        args.image_size,
        args.patch_size,
        args.arch,
        args.mask_ratio,
        args.decoder_dim,
        args.decoder_depth,
        args.decoder_heads,
    )


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, layer: int | None = None, pool: str = "cls") -> torch.Tensor:
    """Frozen representation for probing. images float (B, 3, S, S) in [0, 1] (un-normalized), unmasked -> (B, D)
    float32. layer=None: the encoder output after its final LayerNorm; layer=i: the output of block i (0-based,
    before the final norm). pool="cls" (default): the cls token, MAE's linear-probe representation (MAE App. A.1,
    main_linprobe.py global_pool False); pool="mean": the mean of the patch tokens (CAN's protocol for its MAE)."""
    if pool not in ("mean", "cls"):
        raise ValueError(f"unknown pool '{pool}'; use cls or mean")
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
    return (tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)).float()


def num_feature_layers(model: nn.Module) -> int:
    return len(unwrap(model).encoder.blocks)


# ======================================================================================================================
# Loss (THE PART TO READ): mean squared error on the removed patches (MAE 3, ref forward_loss)
# ======================================================================================================================


def normalized_target(target: torch.Tensor) -> torch.Tensor:
    """norm_pix_loss target (MAE Table 1c): each patch t (N, L, p*p*3) -> (t - mean(t)) / sqrt(var(t) + 1e-6), mean
    and UNBIASED variance (torch.var default, as the ref code) over the p*p*3 values of the patch. fp32."""
    target = target.float()
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1e-6) ** 0.5


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """MAE loss. pred, target (N, L, p*p*3) (target = patchify(normalized image)), mask (N, L) 1 = removed:
        loss = sum_{n,l} mask_nl * mean_k (pred_nlk - t_nlk)^2 / sum_{n,l} mask_nl
    i.e. the per-patch mean squared error averaged over the removed patches of the whole (local) batch; visible
    patches do not count. t = normalized_target(target) with norm_pix. fp32."""
    target = normalized_target(target) if norm_pix else target.float()
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()


def mae_loss(
    model: nn.Module, images: torch.Tensor, args: Args, mask_noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One MAE objective. images float (N, 3, H, W) in [0, 1]; mask_noise (N, L) may be given (tests, fixed held-out
    masks); otherwise drawn from the global RNG inside the encoder. The model runs under bf16 autocast when args.amp,
    the loss in fp32. Returns (loss fp32 scalar, {"pred", "mask", "x" (the normalized input)})."""
    x = normalize(images.float())  # MAE works in ImageNet-normalized pixel space (main_pretrain.py Normalize)
    amp = autocast(x.device, args.amp)
    with amp:
        pred, mask = model(x, mask_noise)
    loss = reconstruction_loss(pred, patchify(x, args.patch_size), mask, args.norm_pix_loss)
    return loss, {"pred": pred, "mask": mask, "x": x}


def training_step_flops(args: Args) -> float:
    """FLOPs per image of one forward + backward training step, counted by FlopCounterMode on the meta device with a
    2-image batch: no memory, no data, no RNG use, no process group (call it before setup_distributed)."""
    args = dataclasses.replace(args, amp=False)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(args)
        images = torch.rand(2, 3, args.image_size, args.image_size)

        def step():
            mae_loss(model, images, args)[0].backward()

        return count_flops(step) / 2


# ======================================================================================================================
# Evaluation: held-out reconstruction loss and pictures
# ======================================================================================================================


def fixed_mask_noise(count: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """(count, L) uniform draws from a private generator: the same masks at every evaluation, training RNG untouched."""
    return torch.rand(count, num_patches, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def heldout_loss(model: nn.Module, images: torch.Tensor, mask_noise: torch.Tensor, args: Args, batch: int = 256):
    """eval/test_loss: the training loss (same norm_pix_loss, autocast) of un-augmented held-out images (n, 3, S, S)
    in [0, 1] (any device) under fixed masks (n, L), in eval mode; every removed patch weighs the same. -> float."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0.0
    for s in range(0, len(images), batch):
        x, noise = images[s : s + batch].to(dev), mask_noise[s : s + batch].to(dev)
        loss, out = mae_loss(model, x, args, noise)
        removed = out["mask"].float().sum().item()
        total, count = total + loss.item() * removed, count + removed
    model.train(was_training)
    return total / count


@torch.no_grad()
def save_reconstructions(model: nn.Module, images: torch.Tensor, args: Args, path: str, seed: int = 0) -> None:
    """PNG with one column per image (n, 3, S, S) in [0, 1] and 3 rows: original | masked input (removed patches
    grey) | reconstruction (predicted removed patches, the visible input elsewhere). The masks come from a fixed
    generator, so pictures are comparable over training. With norm_pix_loss the predicted patches are un-normalized
    with the true patch's mean / std (MAE visualization practice, facebookresearch/mae#197: this leaks the patch
    statistics into the picture; only the structure inside each patch is predicted)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    images = images.to(dev)
    p, n = args.patch_size, images.shape[0]
    mask_noise = fixed_mask_noise(n, model.encoder.num_patches, seed).to(dev)
    _, out = mae_loss(model, images, args, mask_noise)
    pred, mask, x = out["pred"].float(), out["mask"].float()[..., None], out["x"]
    target = patchify(x, p)
    pixels = pred
    if args.norm_pix_loss:
        pixels = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    grey = patchify(normalize(torch.full_like(images, 0.5)), p)
    rows = [x, unpatchify(target * (1 - mask) + grey * mask, p), unpatchify(pixels * mask + target * (1 - mask), p)]
    common.save_image_grid(torch.cat([common.denormalize(r).clamp(0, 1) for r in rows]), path, nrow=n)
    model.train(was_training)


# ======================================================================================================================
# Data: one MAE view per image
# ======================================================================================================================


def augment_kwargs(args: Args) -> dict:
    """Keyword arguments of common's view: "mae" = RandomResizedCrop(crop_min_scale, 1) bicubic + flip (MAE);
    "simclr" = CAN Table 8 as printed (crop, jitter strength 1.0, grayscale 0.2, blur 0.5 at >= 96 px)."""
    kw = {"scale": (args.crop_min_scale, 1.0)}
    if args.view == "simclr":
        kw["jitter_strength"] = 1.0
    return kw


def load_split(args: Args, train: bool):
    """The train or held-out split; in-memory datasets are stored at the training resolution (e.g. synthetic shapes
    drawn at that size), image folders are decoded at full size and left to the crops."""
    kw = {"synthetic_size": args.synthetic_size} if args.dataset == "synthetic" and args.synthetic_size else {}
    return common.build_dataset(
        args.dataset, root=args.data_root, train=train, download=args.download, image_size=args.image_size, **kw
    )


def check_args(args: Args) -> None:
    """Clear errors for settings that cannot train (ValueError; main turns them into a one-line exit message)."""
    if min(args.batch_size, args.log_every, args.eval_every, args.ckpt_every) < 1:
        raise ValueError("--batch-size, --log-every, --eval-every and --ckpt-every must be >= 1")
    if args.test_images < 1:
        raise ValueError(f"--test-images must be >= 1 (held-out images of eval/test_loss), got {args.test_images}")
    if args.patch_size < 1 or args.image_size % args.patch_size:
        raise ValueError(f"--image-size {args.image_size} is not divisible by --patch-size {args.patch_size}")
    vit_arch(args.arch)
    L = (args.image_size // args.patch_size) ** 2
    kept = int(L * (1 - args.mask_ratio))
    if not 0 < kept < L:
        raise ValueError(
            f"--mask-ratio {args.mask_ratio} keeps {kept} of {L} patches; the loss needs some removed and the "
            f"encoder some visible (MAE: 0.75)"
        )
    if args.decoder_dim % 4 or args.decoder_dim % args.decoder_heads:
        raise ValueError(
            f"--decoder-dim {args.decoder_dim} must be divisible by 4 (2D sin-cos positions) and by "
            f"--decoder-heads {args.decoder_heads}"
        )
    if not 0 < args.crop_min_scale <= 1:
        raise ValueError(f"--crop-min-scale must be in (0, 1], got {args.crop_min_scale}")


# ======================================================================================================================
# Training loop
# ======================================================================================================================


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv, PRESETS)
    with usage_errors("mae.py"):  # bad input: one line, no traceback
        check_args(args)
    # --- boilerplate: FLOPs (on the meta device, before any process group exists), ranks, seeds, run folder
    flops_per_image = training_step_flops(args)
    info = setup_distributed(args.device)
    dev = info.device
    seed_everything(args.seed + info.rank)
    with usage_errors("mae.py"):
        per_rank = batch_per_rank(args.batch_size, info.world_size)
        train_set, test_set = load_split(args, train=True), load_split(args, train=False)
    run_dir = os.path.join(args.output_dir, args.run_name or default_run_name(METHOD, args))
    logger = RunLogger(run_dir, args, info.is_main)
    print0(f"MAE training step: {flops_per_image / 1e9:.3f} GFLOPs per image (forward + backward)")

    # --- data: one MAE view per image; fixed held-out images and masks for eval/test_loss and the pictures
    with usage_errors("mae.py"):  # e.g. a batch larger than the dataset
        batches = TrainBatches(
            train_set, [args.view], args.image_size, per_rank, info, seed=args.seed,
            num_workers=args.num_workers, aug_kwargs=augment_kwargs(args),
        )  # fmt: skip
    test_x = common.heldout_images(test_set, args.test_images, args.image_size, "cpu", min(args.num_workers, 4))[0]
    picture_images = test_x[:8]
    num_patches = (args.image_size // args.patch_size) ** 2
    test_mask_noise = fixed_mask_noise(len(test_x), num_patches)

    # --- model, optimizer (boilerplate). Every parameter gets a gradient: plain DDP, no find_unused_parameters.
    # Weight decay as the reference (timm 0.3.2 add_weight_decay): none on 1-D tensors and biases, the (1, 1, D) cls
    # and mask tokens decayed, the frozen sin-cos positions left out.
    model = build_model(args).to(dev)
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
    with usage_errors("mae.py"):  # a missing --resume PATH, another method's or architecture's checkpoint
        resume_path = resolve_resume(args.resume, run_dir)
        if resume_path:
            step = load_training_state(resume_path, METHOD, model, optimizer, info)["step"]
    if resume_path:
        print0(f"resumed from {resume_path} at step {step}")
    print0(
        f"{args.arch} on {args.dataset}: {info.world_size} x {per_rank} images/step, {steps_per_epoch} steps/epoch, "
        f"peak lr {peak_lr:.3g}, steps {step} -> {stop_step}"
    )

    def evaluate(step: int) -> dict:
        """eval/test_loss and the reconstruction PNG (rank 0; the other ranks wait)."""
        metrics = {}
        if info.is_main:
            metrics["eval/test_loss"] = heldout_loss(model, test_x, test_mask_noise, args)
            logger.log(step, metrics)
            save_reconstructions(
                model, picture_images, args, os.path.join(run_dir, f"reconstruction_step{step:07d}.png")
            )
            print0(f"step {step}: held-out reconstruction loss {metrics['eval/test_loss']:.4f}")
        if info.world_size > 1:
            torch.distributed.barrier()
        return metrics

    final = {}
    if step == 0:  # the loss at initialization, the reference of the learning curve
        final.update({k.replace("eval/", "init/"): v for k, v in evaluate(0).items()})

    # --- the training loop (THE PART TO READ is MAE, reconstruction_loss and mae_loss above)
    model.train()
    epoch = step // steps_per_epoch
    meter = Throughput(stop_step, step)
    images_since_log = 0
    while step < stop_step:
        for (images,), _ in batches.epoch(epoch, start_step=step % steps_per_epoch):
            set_lr(optimizer, lr := cosine_lr(step, total_steps, warmup_steps, peak_lr, args.min_lr))
            loss, _ = mae_loss(model, images, args)
            value = loss.item()  # one host sync per step: no NaN reaches the update or a checkpoint
            check_finite(step, {"total": value})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            step += 1
            images_since_log += args.batch_size
            last = step >= stop_step

            # --- logging, evaluation, checkpoints (boilerplate)
            if step % args.log_every == 0 or last:
                mean = common.all_reduce_mean(torch.tensor([value], device=dev)).item()
                ips, eta = meter.tick(step, images_since_log)
                images_since_log = 0
                row = {"loss/total": mean, "lr": lr, "epoch": step / steps_per_epoch, "perf/images_per_s": ips}
                util = common.mfu(flops_per_image, ips / info.world_size, dev)
                if util is not None:
                    row["perf/mfu"] = util
                logger.log(step, row)
                final.update(row)
                print0(
                    f"step {step}/{stop_step} ep {epoch} loss {mean:.4f} lr {lr:.3g} {ips:.1f} img/s"
                    + (f" mfu {util:.1%}" if util is not None else "")
                    + f" eta {eta}"
                )
            if step % args.eval_every == 0 or last:
                final.update(evaluate(step))
            if step % args.ckpt_every == 0 or last:
                save_training_state(run_dir, METHOD, args, model, optimizer, step, epoch, info)
            if step % args.eval_every == 0 or step % args.ckpt_every == 0:
                meter.t0 = time.perf_counter()  # images/s measures training only, not the evaluations or checkpoints
            if last:
                break
        epoch += 1
    logger.close()
    cleanup_distributed()
    final.update({"step": step, "flops_per_image": flops_per_image})
    return final


if __name__ == "__main__":
    main()
