"""MAE: masked autoencoders are scalable vision learners (He et al. 2022, arXiv:2111.06377), the reconstruction
baseline of CAN (arXiv:2210.16870). Reference code: facebookresearch/mae models_mae.py; SPEC section 3.

What is implemented:
  * one view per image: RandomResizedCrop(scale (0.2, 1), bicubic) + horizontal flip (MAE main_pretrain.py; Table 1e:
    color jitter hurts), then ImageNet mean / std standardization;
  * encoder (forward_encoder; r = 0.75, MAE Fig 5): patch embedding + fixed 2D sin-cos positions -> random_masking
    (per image, argsort of uniform draws: exactly floor(L * (1 - r)) patches stay) -> cls token -> ViT blocks ->
    LayerNorm, on the visible patches only; timm's parameter names (`encoder.*` loads into timm's VisionTransformer);
  * decoder (common.MaskedDecoder): Linear to 512, one learned mask token per removed patch, unshuffle, sin-cos
    positions, 8 blocks of width 512 / 16 heads (MAE Table 1a/1b), Linear to p*p*3 values per patch;
  * loss (ref forward_loss): per-patch mean squared error, averaged over the REMOVED patches only; with norm_pix_loss
    (on, Table 1c) each target patch is standardized by its own mean and unbiased variance;
  * monitors: held-out loss on fixed images with fixed masks (eval/test_loss) and a PNG of originals / masked inputs /
    reconstructions, at step 0, every --eval-every steps and at the end.

Launch:
    python mae.py --preset tiny --epochs 1                 # CPU smoke run on the synthetic shapes
    python mae.py --preset cifar                           # CIFAR-10, 32 px, patch 4, ViT-Tiny
    torchrun --nproc_per_node 8 mae.py                     # ImageNet (data/imagenet/{train,val}), ViT-L/16, 800 ep
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 mae.py --arch vit_h   # ViT-H/14, 16 GPUs

Deviations from the paper / the reference code, and why:
  * defaults follow MAE (App. A.1 Table 8); CAN Table 8 lists SimCLR's jitter / grayscale / blur for its MAE baseline
    although it says it follows He et al.: --view simclr gives CAN Table 8 as printed.
  * norm_pix_loss is ON by default (MAE README recipe, Table 1c); the reference argparse default is off.
  * --accum-iter K (MAE's --accum_iter) splits each rank's share of the GLOBAL --batch-size into K micro-batches, one
    update per K: --batch-size and the lr stay the recipe's (MAE's batch_size x accum_iter x GPUs). Every image keeps
    as many patches, so the mean of the K losses is the whole batch's (tests/test_mae.py: equal gradients).
  * bf16 autocast instead of fp16 + GradScaler; the loss is computed in fp32.
  * the kept count floor(L * (1 - r)) is exact (common.keep_count); the ref code's int(L * (1 - r)) loses a patch to
    float error at e.g. L = 100, r = 0.9 (9 instead of 10). Same count at every setting of the paper.

Measured (2-core AVX2 CPU, fp32): `python mae.py --preset tiny --steps 40 --eval-every 40`: held-out loss 2.147 at
init -> 0.507 at step 40 (predicting zeros scores 0.979); `--preset tiny --dataset fashion_mnist`: 420-460 images/s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

import common

METHOD = "mae"


@dataclass
class Args:
    """MAE: masked autoencoders are scalable vision learners (arXiv:2111.06377)."""

    # --- experiment
    run_name: str = common.arg("", f"run folder under --output-dir (default: {METHOD}_<dataset>_<arch>_s<seed>)")
    output_dir: str = common.arg("runs", "where run folders are written")
    seed: int = common.arg(0, "random seed (each rank adds its rank)")
    device: str = common.arg("auto", "auto (CUDA when available) | cuda | cpu")
    resume: str = common.arg("auto", "auto = continue <run>/checkpoint.pt when present; a path; '' = start fresh")
    export_encoder: str = common.arg("", "write --resume's encoder as {'model': timm names} to PATH and exit (README)")
    steps: int = common.arg(0, "stop after this many optimizer steps (0 = all epochs; the schedule spans all epochs)")
    # --- data
    dataset: str = common.arg("imagefolder", f"one of {', '.join(common.DATASET_NAMES)}")
    data_root: str = common.arg("data/imagenet", "dataset root (imagefolder: <root>/train/<class>/*, <root>/val/...)")
    download: bool = common.arg(False, "download the dataset when torchvision can")
    synthetic_size: int = common.arg(0, "images per split of the synthetic dataset (0 = common.py's default)")
    image_size: int = common.arg(224, "training resolution (paper: 224)")
    num_workers: int = common.arg(10, "DataLoader workers per rank for datasets not kept on the device (MAE: 10)")
    view: str = common.arg("mae", "mae = crop + flip (MAE) | simclr = + jitter 1.0, gray, blur (CAN Table 8)",
                           ["mae", "simclr"])  # fmt: skip
    crop_min_scale: float = common.arg(0.2, "RandomResizedCrop min area (MAE main_pretrain.py: 0.2)")
    # --- model
    preset: str = common.arg("none", "a named group of defaults (see PRESETS)", ["none", "cifar", "tiny"])
    arch: str = common.arg("vit_l", "ViT encoder (MAE main_pretrain.py: ViT-L)", common.VIT_CHOICES)
    patch_size: int = common.arg(16, "patch size (16 at 224 px; ViT-H: 14 (MAE), set by --arch vit_h)")
    decoder_dim: int = common.arg(512, "decoder width (MAE Table 1b: 512)")
    decoder_depth: int = common.arg(8, "decoder blocks (MAE Table 1a: 8)")
    decoder_heads: int = common.arg(16, "decoder heads (MAE ref code / CAN App. C: 16)")
    grad_checkpointing: bool = common.arg(False, "recompute transformer blocks in backward (less memory)")
    # --- optimization
    epochs: int = common.arg(800, "training epochs (MAE README / Table 1: 800; 1600 for MAE's final results)")
    batch_size: int = common.arg(4096, "GLOBAL batch of images per update, split over ranks (MAE Table 8: 4096)")
    accum_iter: int = common.arg(1, "gradient accumulation: each rank's share of --batch-size in K micro-batches")
    base_lr: float = common.arg(1.5e-4, "lr per 256 images: lr = base_lr * batch / 256 (MAE Table 8: 1.5e-4)")
    lr: float | None = common.arg(None, "absolute peak learning rate; overrides base_lr scaling")
    min_lr: float = common.arg(0.0, "final learning rate of the cosine schedule (MAE: 0)")
    warmup_epochs: int = common.arg(40, "linear warmup epochs (MAE Table 8: 40)")
    weight_decay: float = common.arg(0.05, "AdamW weight decay (MAE Table 8: 0.05)")
    betas: tuple[float, float] = common.arg((0.9, 0.95), "AdamW betas (MAE Table 8)")
    clip_grad: float = common.arg(0.0, "max gradient norm, 0 = off (MAE / CAN official pretraining: no clipping)")
    amp: bool = common.arg(True, "bf16 autocast where the hardware runs it natively (the losses stay fp32)")
    compile: bool = common.arg(False, "torch.compile the model")
    # --- logging
    log_every: int = common.arg(20, "log every N steps")
    eval_every: int = common.arg(2000, "monitors every N steps (and at step 0 and the end)")
    ckpt_every: int = common.arg(500, "checkpoint every N steps (and at the end)")
    keep_every: int = common.arg(0, "also keep a snapshot checkpoint-epNNNN.pt every N epochs (0 = none; MAE: 20)")
    test_images: int = common.arg(512, "held-out images (fixed masks) of eval/test_loss")
    # --- MAE
    mask_ratio: float = common.arg(0.75, "fraction of patches removed from each image (MAE Fig 5: 0.75)")
    norm_pix_loss: bool = common.arg(True, "standardize each target patch (MAE Table 1c, README recipe)")


# ======================================================================================================================
# Model: ViT encoder on the visible patches + MAE decoder (THE PART TO READ, with the loss below)
# ======================================================================================================================


class MAE(nn.Module):
    """encoder: common.VisionTransformer with timm's names; decoder: common.MaskedDecoder (p*p*3 values per patch).
    forward(x, mask_draws=None): x (N, 3, H, W) normalized images; mask_draws (N, L) uniform draws choosing the kept
    patches (None: drawn inside) -> pred (N, L, p*p*3) for EVERY patch (the loss reads the removed ones only), mask
    (N, L) with 0 = keep, 1 = removed."""

    def __init__(self, args: Args):
        super().__init__()
        dim, depth, heads = common.vit_arch(args.arch)
        self.mask_ratio, self.patch_size = args.mask_ratio, args.patch_size
        self.encoder = common.VisionTransformer(args.image_size, args.patch_size, 3, dim, depth, heads)
        out_dim = args.patch_size**2 * 3
        L = self.encoder.num_patches
        self.decoder = common.MaskedDecoder(L, dim, out_dim, args.decoder_dim, args.decoder_depth, args.decoder_heads)
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

    def forward(self, x: torch.Tensor, mask_draws: torch.Tensor | None = None):
        tokens, mask, ids_restore = self.forward_encoder(x, mask_draws)
        # decoder: project, append mask tokens, unshuffle to the patch order, + positions, blocks, predict pixels
        return self.decoder(tokens, ids_restore), mask


def build_model(args: Args) -> MAE:
    """The model of `args` (eval_probe.py rebuilds it from Args(**checkpoint["args"]) alone)."""
    return MAE(args)


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, layer: int | None = None, pool: str | None = None):
    """Frozen representation for probing. images float (B, 3, S, S) in [0, 1], unmasked -> (B, D) float32.
    layer=None: the encoder output after its final norm; layer=i: the output of block i (before the final norm).
    pool "cls" (default: MAE's linear probe, main_linprobe.py) or "mean" of the patch tokens (CAN's protocol)."""
    pool = pool or "cls"
    if pool not in ("mean", "cls"):
        raise ValueError(f"unknown pool '{pool}'; use cls or mean")
    enc = common.unwrap(model).encoder
    x = common.normalize(images.float())
    with common.eval_mode(model):
        tokens = enc(x) if layer is None else enc.block_tokens(x, layer)
    return (tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)).float()


def num_feature_layers(model: nn.Module) -> int:
    return len(common.unwrap(model).encoder.blocks)


# ======================================================================================================================
# Loss (THE PART TO READ): mean squared error on the removed patches (MAE 3, ref forward_loss)
# ======================================================================================================================


def mae_losses(model: nn.Module, images: torch.Tensor, args: Args, mask_draws: torch.Tensor | None = None):
    """One MAE objective. images float (N, 3, H, W) in [0, 1]; mask_draws (N, L) may be given (tests, the fixed
    held-out masks), otherwise drawn inside. The model runs under bf16 autocast when args.amp, the loss in fp32.
    Returns (terms {"reconstruction", "total"}, out {"pred", "mask", "x" (the normalized input)})."""
    x = common.normalize(images.float())  # MAE works in ImageNet-normalized pixel space (main_pretrain.py Normalize)
    with common.autocast(x.device, args.amp):
        pred, mask = model(x, mask_draws)
    rec = common.reconstruction_loss(pred, common.patchify(x, args.patch_size), mask, args.norm_pix_loss)
    return {"reconstruction": rec, "total": rec}, {"pred": pred, "mask": mask, "x": x}


def training_step_flops(args: Args) -> float:
    """FLOPs per image of one forward + backward step (common.count_step_flops: meta device, no memory or RNG). Model
    FLOPs: gradient checkpointing's recomputation is not counted."""
    args, S = dataclasses.replace(args, amp=False, grad_checkpointing=False), args.image_size
    return common.count_step_flops(
        lambda: build_model(args), lambda m: mae_losses(m, torch.rand(2, 3, S, S), args)[0]["total"]
    )


def build_optimizer(model: nn.Module, args: Args, lr: float, device) -> torch.optim.Optimizer:
    """AdamW; weight decay as the reference (timm add_weight_decay): none on 1-D tensors and biases, the cls and mask
    tokens decayed, the frozen sin-cos positions left out (common.param_groups)."""
    return common.make_adamw(common.param_groups(model, args.weight_decay), lr, args.betas, device)


# ======================================================================================================================
# Monitors: held-out reconstruction loss under fixed masks, and pictures
# ======================================================================================================================


@torch.no_grad()
def heldout_loss(model: nn.Module, images: torch.Tensor, mask_draws: torch.Tensor, args: Args, batch: int = 256):
    """eval/test_loss: the training loss of un-augmented held-out images (n, 3, S, S) in [0, 1] under fixed masks
    (n, L), in eval mode; every removed patch weighs the same. -> float."""
    model = common.unwrap(model)
    dev = next(model.parameters()).device
    total, count = 0.0, 0.0
    with common.eval_mode(model):
        for s in range(0, len(images), batch):
            terms, out = mae_losses(model, images[s : s + batch].to(dev), args, mask_draws[s : s + batch].to(dev))
            removed = out["mask"].float().sum().item()
            total, count = total + terms["total"].item() * removed, count + removed
    return total / count


@torch.no_grad()
def save_reconstructions(model: nn.Module, images: torch.Tensor, args: Args, path: str, seed: int = 0) -> None:
    """PNG, one column per image (n, 3, S, S) in [0, 1]: original | masked input (removed patches grey) |
    reconstruction (predicted removed patches, the visible input elsewhere), under fixed masks. With norm_pix_loss
    the predictions are un-normalized with the true patch's mean / std (MAE visualization practice,
    facebookresearch/mae#197: only the structure inside each patch is predicted)."""
    model = common.unwrap(model)
    images = images.to(next(model.parameters()).device)
    p, n = args.patch_size, images.shape[0]
    with common.eval_mode(model):
        _, out = mae_losses(model, images, args, common.fixed_draws(n, model.encoder.num_patches, seed).to(images))
    pred, mask, x = out["pred"].float(), out["mask"].float()[..., None], out["x"]
    target = common.patchify(x, p)
    if args.norm_pix_loss:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    grey = common.patchify(common.normalize(torch.full_like(images, 0.5)), p)
    masked, reconstructed = target * (1 - mask) + grey * mask, pred * mask + target * (1 - mask)
    rows = [x, common.unpatchify(masked, p), common.unpatchify(reconstructed, p)]
    rows = [common.denormalize(r).clamp(0, 1) for r in rows]
    labels = ["original", "masked", "reconstruction"]
    common.save_image_grid(torch.cat(rows), path, nrow=n, labels=labels)


def monitors(model: nn.Module, held: dict, args: Args, step: int, run_dir: str) -> dict:
    """eval/test_loss on the fixed held-out images and masks, and the reconstruction PNG."""
    path = os.path.join(run_dir, f"reconstruction_step{step:07d}.png")
    save_reconstructions(model, held["images"][:8], args, path)
    return {"eval/test_loss": heldout_loss(model, held["images"], held["mask_draws"], args)}


# ======================================================================================================================
# Data: one MAE view per image
# ======================================================================================================================


def augment_kwargs(args: Args) -> dict:
    """common's view: "mae" = RandomResizedCrop(crop_min_scale, 1) bicubic + flip (MAE); "simclr" = CAN Table 8 as
    printed (crop, jitter strength 1.0, grayscale 0.2, blur 0.5 at >= 96 px)."""
    kw = {"scale": (args.crop_min_scale, 1.0)}
    if args.view == "simclr":
        kw["jitter_strength"] = 1.0
    return kw


def heldout_data(args: Args, train_set, test_set, device) -> dict:
    """The monitors' fixed held-out images (class balanced) and masks."""
    images = common.heldout_images(test_set, args.test_images, args.image_size, "cpu", min(args.num_workers, 4))[0]
    return {"images": images, "mask_draws": common.fixed_draws(len(images), (args.image_size // args.patch_size) ** 2)}


def check_args(args: Args) -> None:
    """Settings that cannot train: a ValueError that main turns into a one-line exit message."""
    common.check_common_args(args)
    if args.test_images < 1:
        raise ValueError(f"--test-images must be >= 1 (held-out images of eval/test_loss), got {args.test_images}")
    common.check_masked_vit_args(args, needs_removed=True, paper="MAE: 0.75")
    if not 0 < args.crop_min_scale <= 1:
        raise ValueError(f"--crop-min-scale must be in (0, 1], got {args.crop_min_scale}")
    if args.accum_iter < 1:
        raise ValueError(f"--accum-iter must be >= 1, got {args.accum_iter}")


def accumulated_backward(model: nn.Module, group: list, args: Args, check) -> dict:
    """Forward and backward of each micro-batch of `group` (K = len(group)) with its loss / K, after check(terms);
    returns the last micro-batch's terms (the logged ones). Under DDP the first K - 1 run inside no_sync, forward
    included (DDP decides at the forward whether the backward all-reduces): one all-reduce per update."""
    for i, (views, _) in enumerate(group):
        last = i == len(group) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if last else model.no_sync():
            terms, _ = mae_losses(model, views[0], args)
            check(terms)
            (terms["total"] / len(group)).backward()
    return terms


# ======================================================================================================================
# Presets and the training loop
# ======================================================================================================================

# Values a named group sets unless given on the command line (printed at startup, saved in args.json). --preset
# wins over --arch's entry.
PRESETS = {
    "preset": {
        # CIFAR-size model (not in the paper): 32 px, patch 4 -> 64 patches, ViT-Tiny, a 256-wide 4-block decoder
        # (MAE Table 1a/1b: depth 4 / width 256 lose <= 0.1 points), batch 512, 10 warmup epochs; the shapes of
        # can.py's cifar preset.
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
            eval_every=1000,
            ckpt_every=1000,
            test_images=1000,
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
            epochs=2,
            batch_size=16,
            warmup_epochs=0,
            base_lr=1e-2,
            log_every=1,
            eval_every=100,
            ckpt_every=100,
            test_images=128,
            num_workers=0,
        ),
    },
    # MAE uses one recipe for every size (README: blr 1.5e-4, wd 0.05); ViT-H/14 as MAE models_mae.py.
    "arch": {a: dict(patch_size=14) for a in ("vit_h", "vit_huge")},
}


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv, PRESETS)
    with common.usage_errors(METHOD):  # bad input: one line, no traceback
        check_args(args)
    if args.export_encoder:  # interop, no training: the checkpoint's encoder for MAE's fine-tuning scripts and timm
        with common.usage_errors(METHOD):
            return common.export_encoder(args, METHOD, prefix="encoder.")
    # --- boilerplate: FLOPs (meta device, before any process group), ranks, seeds, data, model, optimizer, resume
    flops_per_image = training_step_flops(args)
    info = common.setup_distributed(args.device)
    common.seed_everything(args.seed + info.rank)
    run_dir = os.path.join(args.output_dir, args.run_name or common.default_run_name(METHOD, args))
    with common.usage_errors(METHOD):
        per_rank = common.batch_per_rank(args.batch_size, info.world_size)
        if per_rank % args.accum_iter:
            raise ValueError(f"--batch-size {args.batch_size} gives {per_rank} images per rank: not divisible by "
                             f"--accum-iter {args.accum_iter}")  # fmt: skip
        micro = per_rank // args.accum_iter  # images per micro-batch
        train_set, test_set = common.load_split(args, train=True), common.load_split(args, train=False)
        batches = common.TrainBatches(train_set, [args.view], args.image_size, micro, info, seed=args.seed,
                                      num_workers=args.num_workers, aug_kwargs=augment_kwargs(args))  # fmt: skip
        if batches.steps_per_epoch < args.accum_iter:
            raise ValueError(f"--accum-iter {args.accum_iter} needs more micro-batches than an epoch has")
    held = heldout_data(args, train_set, test_set, info.device)
    # a static graph cannot skip the all-reduce of a no_sync micro-batch (torch asserts): only without accumulation
    model = common.distribute(build_model(args), info, args.compile, static_graph=args.accum_iter == 1)
    peak_lr = args.lr if args.lr is not None else common.scaled_lr(args.base_lr, args.batch_size)
    optimizer = build_optimizer(common.unwrap(model), args, peak_lr, info.device)
    steps_per_epoch, accum = batches.steps_per_epoch // args.accum_iter, args.accum_iter
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    with common.usage_errors(METHOD):  # a missing --resume PATH, another method's or architecture's checkpoint
        stop_step = common.stop_at(args, total_steps)
        step = common.resume(args.resume, run_dir, METHOD, model, optimizer, info, stop_step)
    logger = common.RunLogger(
        run_dir, args, info, flops_per_image, stop_step, step, method=METHOD, steps_per_epoch=steps_per_epoch
    )
    micro_note = f" ({accum} micro-batches of {micro})" if accum > 1 else ""
    common.print0(f"{METHOD} {args.arch} on {args.dataset}: {info.world_size} x {per_rank} images/step{micro_note}, "
                  f"{steps_per_epoch} steps/epoch, peak lr {peak_lr:.3g}, steps {step} -> {stop_step}, "
                  f"{flops_per_image / 1e9:.3f} GFLOPs per image (forward + backward)")  # fmt: skip

    def evaluate(step: int) -> dict:
        return common.run_monitors(step, lambda: monitors(model, held, args, step, run_dir), logger, info)

    final = {k.replace("eval/", "init/"): v for k, v in evaluate(0).items()} if step == 0 else {}

    # --- the training loop (THE PART TO READ is the model and the loss above)
    model.train()
    epoch = step // steps_per_epoch
    while step < stop_step:
        micro_batches = iter(batches.epoch(epoch, start_step=(step % steps_per_epoch) * accum))
        for group in zip(*[micro_batches] * accum):  # groups of accum; an incomplete last group is dropped (drop_last)
            common.set_lr(optimizer, lr := common.cosine_lr(step, total_steps, warmup_steps, peak_lr, args.min_lr))
            optimizer.zero_grad(set_to_none=True)
            # --accum-iter K: K micro-batches, loss / K each, one update; a non-finite loss stops the run before it
            # reaches a checkpoint (RunLogger.check_finite)
            terms = accumulated_backward(model, group, args, lambda terms, step=step: logger.check_finite(step, terms))
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
