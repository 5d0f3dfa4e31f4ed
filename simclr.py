"""SimCLR: a simple framework for contrastive learning of visual representations (Chen et al. 2020, arXiv:2002.05709),
the contrastive baseline of CAN (arXiv:2210.16870) and GCRL (arXiv:2106.06162).

What is implemented (SPEC section 2):
  * two strong SimCLR views per image (random resized crop, flip, color jitter p=0.8, grayscale p=0.2, blur p=0.5 at
    >= 96 px), both through the backbone as ONE batch of 2B rows (view 1 rows first, then view 2);
  * backbones: torchvision ResNet-18 / ResNet-50 without fc (representation h = global-average-pooled 512 / 2048
    features), with SimCLR's CIFAR stem (3x3 conv stride 1, no max-pool) when the image size is <= 32; or a ViT of
    common.py (representation h = mean of the patch tokens after the final LayerNorm, as CAN's SimCLR baseline);
  * projection heads: --head bn = SimCLR v2 / CAN 3-layer MLP ([Linear - BN - ReLU] x 2, Linear, BN without shift),
    hidden = the backbone width for ResNets (SimCLR v2) and 4096 for ViTs (CAN App. C), output 128;
    --head ln = GCRL's 2-layer MLP (Linear - LayerNorm - ReLU, Linear), hidden 1024, output 64 (CIFAR) / 128;
    BatchNorm -> SyncBatchNorm under DDP on GPUs (SimCLR global_bn);
  * NT-Xent (SimCLR eq. 1 = GCRL eq. 3 = CAN 3.2) on z = normalize(g(h)): every local anchor against the 2N_global - 1
    other views of EVERY rank, gathered with gradients (common.nt_xent), similarities and log-softmax in fp32;
  * LARS (SimCLR; biases and norm parameters get neither weight decay nor layer adaptation) or AdamW (CAN Table 6),
    linear warmup + per-iteration cosine schedule;
  * monitors on the held-out split, with stop-gradient: weighted kNN (k=200, t=0.07) on h every --eval-every steps
    and at the end (eval/knn_top1), and SimCLR's online linear head trained jointly on detached h of both views
    (loss/online_linear during training, eval/online_linear_top1 on the held-out split).

Launch:
    python simclr.py --preset tiny --epochs 1                        # CPU smoke run (synthetic shapes, vit_micro)
    python simclr.py --preset tiny --dataset fashion_mnist --steps 150   # ~30 s on CPU: kNN 0.53 -> 0.64
    python simclr.py                                                 # CIFAR-10, ResNet-18, LARS (SimCLR README)
    python simclr.py --head ln --optimizer adamw --base-lr 4.8e-4 --weight-decay 0.05   # GCRL-style head / optimizer
    torchrun --nproc_per_node 8 simclr.py --preset imagenet          # ImageNet ViT-B/16 (CAN Table 6), data/imagenet
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 simclr.py --preset imagenet --arch vit_l

The LARS recipe (the default, SimCLR README CIFAR-10) makes TF's update: the contrastive loss is TF's mean_a + mean_b
(--tf-loss-scale, on by default: 2x the mean over the 2N anchors of GCRL eq. 3 / CAN, which the other presets use) and
common.LARS(classic=True) applies the lr inside the momentum (tf2/lars_optimizer.py classic_momentum=True). With the
mean over 2N instead, weight decay would weigh twice as much against the gradient in d = g + wd * p and the
un-adapted biases / BN parameters would move half as far; with the MoCo-v3 form (lr after the momentum) the steps
during the 10-epoch warmup would be up to 1.66x larger (step 10) and still 1.10x at step 100.
tests/test_simclr.py checks three LARS steps during warmup against a hand-written TF update with TF's loss.

Deviations from the paper / reference code (google-research/simclr tf2), and why:
  * inputs are standardized with ImageNet mean / std (the ViT/MAE convention of common.py); the TF code feeds [0, 1]
    pixels. For ResNets the first BatchNorm absorbs the difference.
  * crops: common.py's "simclr" view, bilinear resampling and min area 0.2 at <= 32 px (GCRL Table 2); SimCLR's TF
    code uses bicubic and 0.08 at every size (--crop-min-scale 0.08 restores the latter).
  * the online linear head is in the main optimizer in the no-weight-decay group; under LARS it still gets layer
    adaptation, where TF excludes `head_supervised` from both and adds wd * ||kernel||^2 / 2 to the loss instead. It
    only monitors: its input is detached, so no other parameter's update depends on it.
  * no gradient accumulation (MAE's --accum-iter): NT-Xent's negatives are the other views of the SAME step, and
    BatchNorm normalizes over the step's batch, so K accumulated micro-batches of B / K images are not a batch of B
    (fewer negatives per anchor, noisier BN statistics); use more ranks instead.
  * SyncBatchNorm needs CUDA: on CPU ranks (gloo, tests) BatchNorm statistics stay per rank.
  * --grad-checkpointing (on for vit_b / vit_l) recomputes transformer blocks in backward: 2 x 512 full 224 px views
    of ViT-B per GPU (batch 4096 on 8 GPUs) need more than 80 GB of activations otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

METHOD = "simclr"
RESNETS = {"resnet18": 512, "resnet50": 2048}  # arch -> width of the pooled representation h


@dataclass
class Args:
    """SimCLR with negatives gathered from every rank (arXiv:2002.05709). Defaults: the CIFAR-10 recipe of the
    SimCLR README (ResNet-18, batch 512, LARS lr 1.0 x batch / 256, tau 0.5); --preset imagenet: CAN Table 6."""

    # --- experiment
    run_name: str = common.arg("", "run folder under --output-dir (default: simclr_<dataset>_<arch>_s<seed>)")
    output_dir: str = common.arg("runs", "where run folders are written")
    seed: int = common.arg(0, "random seed (each rank adds its rank)")
    device: str = common.arg("auto", "auto (CUDA when available) | cuda | cpu")
    resume: str = common.arg("auto", "auto = continue <run>/checkpoint.pt when present; a path; '' = start fresh")
    export_encoder: str = common.arg("", "write --resume's encoder as {'model': timm names} to PATH and exit (README)")
    steps: int = common.arg(0, "stop after this many optimizer steps (0 = all epochs; the schedule spans all epochs)")
    # --- data
    dataset: str = common.arg("cifar10", f"one of {', '.join(common.DATASET_NAMES)}")
    data_root: str = common.arg("data", "dataset root folder")
    download: bool = common.arg(False, "download the dataset when torchvision can")
    synthetic_size: int = common.arg(0, "images per split of the synthetic dataset (0 = common.py's default)")
    image_size: int = common.arg(32, "training resolution (SimCLR README CIFAR-10: 32)")
    num_workers: int = common.arg(8, "DataLoader workers per rank for datasets not kept on the device")
    jitter_strength: float = common.arg(0.5, "color jitter strength s: (0.8s, 0.8s, 0.8s, 0.2s) (README CIFAR: 0.5)")
    blur: str = common.arg("auto", "Gaussian blur: auto = on at >= 96 px | on | off (README CIFAR-10: off)",
                           ["auto", "on", "off"])  # fmt: skip
    crop_min_scale: float | None = common.arg(None, "RandomResizedCrop min area (default 0.2 at <= 32 px, else 0.08)")
    # --- model
    preset: str = common.arg("cifar", "a named group of defaults (see PRESETS)", ["cifar", "imagenet", "tiny"])
    arch: str = common.arg("resnet18", "resnet18 | resnet50 (torchvision) | a ViT; vit_b / vit_l also set CAN Table "
                           "6's AdamW recipe (optimizer, lr, wd)", list(RESNETS) + common.VIT_CHOICES)  # fmt: skip
    patch_size: int = common.arg(4, "ViT patch size (4 at 32 px: 64 patches; CAN: 16 at 224)")
    grad_checkpointing: bool = common.arg(False, "ViT: recompute each block in backward (less memory)")
    head: str = common.arg("bn", "projection head: bn (SimCLR v2 / CAN, 3 layers) | ln (GCRL, 2 layers)", ["bn", "ln"])
    proj_hidden: int = common.arg(0, "head hidden width (0 = auto: bn ResNet = backbone width, bn ViT 4096, ln 1024)")
    proj_dim: int = common.arg(0, "head output width (0 = auto: 128; ln: 64, 128 on ImageNet (GCRL 4.1))")
    # --- optimization
    optimizer: str = common.arg("lars", "lars (SimCLR) | adamw (CAN Table 6)", ["lars", "adamw"])
    epochs: int = common.arg(1000, "training epochs (SimCLR README CIFAR-10: 1000)")
    batch_size: int = common.arg(512, "GLOBAL batch of images (2 views each), split over ranks (README CIFAR: 512)")
    base_lr: float = common.arg(1.0, "lr per 256 images: lr = base_lr * batch / 256 (SimCLR README CIFAR-10: 1.0)")
    lr: float | None = common.arg(None, "absolute peak learning rate; overrides base_lr scaling")
    min_lr: float = common.arg(0.0, "final learning rate of the cosine schedule (SimCLR tf2 CosineDecay: 0)")
    warmup_epochs: int = common.arg(10, "linear warmup epochs (SimCLR tf2 run.py: 10)")
    weight_decay: float = common.arg(1e-4, "weight decay (SimCLR README: 1e-4; CAN Table 6 AdamW: 0.05 / 0.1)")
    momentum: float = common.arg(0.9, "LARS momentum (SimCLR tf2 run.py: 0.9)")
    lars_trust: float = common.arg(0.001, "LARS trust coefficient eta (SimCLR tf2 lars_optimizer.py: 0.001)")
    betas: tuple[float, float] = common.arg((0.9, 0.95), "AdamW betas (CAN Table 6)")
    clip_grad: float = common.arg(0.0, "max gradient norm, 0 = off (SimCLR and CAN do not clip)")
    amp: bool = common.arg(True, "bf16 autocast where the hardware runs it natively (similarities and losses fp32)")
    compile: bool = common.arg(False, "torch.compile the model")
    # --- logging
    log_every: int = common.arg(20, "log every N steps")
    eval_every: int = common.arg(1000, "monitors every N steps (and at step 0 and the end)")
    ckpt_every: int = common.arg(1000, "checkpoint every N steps (and at the end)")
    keep_every: int = common.arg(0, "also keep a snapshot checkpoint-epNNNN.pt every N epochs (0 = none; MAE: 20)")
    knn_bank: int = common.arg(10000, "training images in the kNN monitor's bank; 0 disables the kNN monitor")
    knn_queries: int = common.arg(10000, "held-out images classified by the monitors")
    knn_k: int = common.arg(200, "neighbours of the kNN monitor (SPEC 8: 200; at most the bank size)")
    knn_t: float = common.arg(0.07, "temperature of the kNN vote weights exp(cos / t) (SPEC 8: 0.07)")
    online_linear: bool = common.arg(True, "train a linear head on detached h jointly (SimCLR lineareval_while_...)")
    num_classes: int = common.arg(0, "classes of the online linear head (0 = the dataset's; filled in and saved)")
    # --- SimCLR
    temperature: float = common.arg(0.5, "NT-Xent temperature tau (SimCLR README CIFAR-10: 0.5; ImageNet / CAN: 0.1)")
    tf_loss_scale: bool = common.arg(True, "contrastive loss in TF SimCLR's scale: mean over the view-1 anchors + mean "
                                     "over the view-2 anchors = 2x the mean over 2N (matters under LARS); "
                                     "--no-tf-loss-scale: the mean over 2N (CAN, GCRL eq. 3)")  # fmt: skip


# ======================================================================================================================
# Model: backbone f (ResNet or ViT) -> h, projection head g -> z, online linear head on stop-gradient(h)
# ======================================================================================================================


class SimCLR(nn.Module):
    """backbone (torchvision ResNet without fc, or common.VisionTransformer with timm names), projector (g), and an
    optional online linear head. forward(x) with x (N, 3, S, S) NORMALIZED images (N = 2B: view 1 rows, then view 2)
    -> dict h (N, width) representation, z (N, proj_dim) projection (not yet L2-normalized), logits (N, C) of the
    online head on h.detach() when it exists."""

    def __init__(self, args: Args):
        super().__init__()
        self.is_vit = args.arch not in RESNETS
        if self.is_vit:
            dim, depth, heads = common.vit_arch(args.arch)
            self.backbone = common.VisionTransformer(args.image_size, args.patch_size, 3, dim, depth, heads)
            self.width = dim
        else:
            self.backbone = resnet_backbone(args.arch, args.image_size)
            self.width = RESNETS[args.arch]
        hidden, out = head_dims(args, self.width)
        layers = 3 if args.head == "bn" else 2
        self.projector = common.ProjectionHead(self.width, hidden, out, num_layers=layers, kind=args.head)
        self.online_head = nn.Linear(self.width, args.num_classes) if args.online_linear and args.num_classes else None
        common.set_grad_checkpointing(self, args.grad_checkpointing)  # the ViT's blocks (a ResNet has none)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """h = f(x): (N, 3, S, S) normalized -> (N, width)."""
        if self.is_vit:
            return self.backbone(x)[:, 1:].mean(dim=1)  # mean of the patch tokens after the final norm (CAN App. C)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.representation(x)
        out = {"h": h, "z": self.projector(h)}
        if self.online_head is not None:
            out["logits"] = self.online_head(h.detach())  # stop-gradient: the monitor never shapes the backbone
        return out


def resnet_backbone(arch: str, image_size: int) -> nn.Module:
    """torchvision ResNet-18/50 without fc: (N, 3, S, S) -> (N, 512 / 2048) global-average-pooled features.
    S <= 32: SimCLR's CIFAR stem (tf2/resnet.py cifar_stem, chosen by image_size <= 32 in tf2/model.py): a 3x3 conv
    with stride 1 instead of 7x7 stride 2, and no max-pool. zero_init_residual: the last BN of every residual block
    starts with gamma = 0 (SimCLR tf2/resnet.py init_zero=True; Goyal et al. 2017)."""
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=True)
    if image_size <= 32:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def head_dims(args: Args, width: int) -> tuple[int, int]:
    """(hidden, out) of the projection head, resolving the 0 = auto values (see the Args help)."""
    if args.head == "bn":
        # SimCLR v2 (tf2/model.py, 3 layers): hidden = the backbone width; CAN App. C for ViTs: 4096. Output 128.
        hidden = width if args.arch in RESNETS else 4096
        out = 128
    else:
        hidden = 1024  # GCRL 4.1: LayerNorm head, hidden 1024, output 64 (CIFAR) / 128 (ImageNet32): by dataset
        out = 128 if args.dataset in common.IMAGENET_DATASETS else 64
    return args.proj_hidden or hidden, args.proj_dim or out


def build_model(args: Args) -> SimCLR:
    """The model of `args` (eval_probe.py rebuilds it from Args(**checkpoint["args"]) alone)."""
    return SimCLR(args)


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, layer: int | None = None, pool: str | None = None):
    """Frozen representation for probing: images float (B, 3, S, S) in [0, 1] -> (B, D) float32, in eval mode
    (BatchNorm running statistics). layer=None: h, the backbone output before the projection head (SimCLR / GCRL
    4.1): pooled ResNet features, or the mean of the ViT's patch tokens after the final norm. layer=i: ViT: the
    tokens output by block i (before the final norm); ResNet: the output of stage i (layer1..layer4 = 0..3).
    pool: "mean" (default) of the patch tokens / spatial positions; "cls" (ViT only) the cls token."""
    pool = pool or "mean"
    net, n_layers = common.unwrap(model).backbone, num_feature_layers(model)
    if pool not in ("mean", "cls") or (pool == "cls" and not common.unwrap(model).is_vit):
        raise ValueError(f"unknown pool '{pool}' for {type(net).__name__}; use mean (or cls for a ViT)")
    if layer is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the backbone has {n_layers} feature layers (0..{n_layers - 1})")
    x = common.normalize(images.float())
    with common.eval_mode(model) as m:
        if m.is_vit:
            tokens = net(x) if layer is None else net.block_tokens(x, layer)
            out = tokens[:, 1:].mean(dim=1) if pool == "mean" else tokens[:, 0]
        elif layer is None:
            out = m.representation(x)
        else:
            h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            for stage in (net.layer1, net.layer2, net.layer3, net.layer4)[: layer + 1]:
                h = stage(h)
            out = h.mean(dim=(2, 3))
    return out.float()


def num_feature_layers(model: nn.Module) -> int:
    model = common.unwrap(model)
    return len(model.backbone.blocks) if model.is_vit else 4


# ======================================================================================================================
# Loss (THE PART TO READ): NT-Xent over the two views of every image of every rank
# ======================================================================================================================


def contrastive_loss(z: torch.Tensor, temperature: float, tf_scale: bool = False) -> torch.Tensor:
    """NT-Xent (SimCLR eq. 1; GCRL eq. 3). z (2n, d): this rank's projections, view-1 rows then view-2 rows. With
    u = normalize(z) and the candidates U = the u of every rank (gathered WITH gradient), anchor i's loss is
        l_i = -log( exp(u_i . u_pos(i) / tau) / sum_{k != i} exp(u_i . U_k / tau) ),
    pos(i) = the other view of the same image; the loss is the mean over the 2n local anchors (DDP's gradient
    averaging then gives the mean over all 2N anchors). tf_scale: 2x that, the loss TF SimCLR differentiates
    (tf2/objective.py: mean over the view-1 anchors + mean over the view-2 anchors). Always fp32, also when called
    under autocast: bf16 logits at tau = 0.1 lose ~2 digits."""
    n = z.shape[0] // 2
    return (2.0 if tf_scale else 1.0) * common.nt_xent(z[:n], z[n:], temperature)


def simclr_losses(model: nn.Module, views: list[torch.Tensor], labels: torch.Tensor | None, args: Args):
    """One SimCLR training objective. views: two float (B, 3, S, S) tensors in [0, 1] (the two augmentations of the
    same B images, same order); labels (B,) for the online linear head (None: no online loss). The networks run under
    bf16 autocast when args.amp; the losses in fp32.
    Returns (terms: {"contrastive", "online_linear" (when the head exists and labels are given), "total"},
             out: the model outputs h (2B, width), z (2B, proj_dim), logits)."""
    x = common.normalize(torch.cat(views).float())  # (2B, 3, S, S): one backbone batch, BN sees both views together
    with common.autocast(x.device, args.amp):
        out = model(x)
    terms = {"contrastive": contrastive_loss(out["z"], args.temperature, args.tf_loss_scale)}
    if "logits" in out and labels is not None:
        # SimCLR tf2 run.py: labels duplicated for the two views, supervised loss added to the total. h was detached
        # inside the model, so this term trains the linear head only.
        terms["online_linear"] = F.cross_entropy(out["logits"].float(), torch.cat([labels, labels]))
    terms["total"] = sum(terms.values())
    return terms, out


def training_step_flops(args: Args) -> float:
    """FLOPs per image (both views) of one forward + backward step (common.count_step_flops: meta device, no memory
    or RNG). The online linear head (< 0.1%) and gradient checkpointing's recomputation are not counted."""
    args = dataclasses.replace(args, amp=False, grad_checkpointing=False, online_linear=False)
    S = args.image_size
    views_of = lambda: [torch.rand(2, 3, S, S) for _ in range(2)]  # noqa: E731
    return common.count_step_flops(
        lambda: build_model(args), lambda m: simclr_losses(m, views_of(), None, args)[0]["total"]
    )


def build_optimizer(model: nn.Module, args: Args, lr: float, device) -> torch.optim.Optimizer:
    """LARS (SimCLR) or AdamW (CAN Table 6) over two groups (common.param_groups): weight decay on the >= 2-D weights,
    none on biases, norm parameters and the online head. common.LARS also skips layer adaptation for every tensor
    with ndim <= 1 (biases, BN / LN weights), as SimCLR's tf2/lars_optimizer.py excludes 'batch_normalization|bias',
    and applies the lr inside the momentum (classic=True: TF's classic_momentum, its default)."""
    groups = common.param_groups(model, args.weight_decay, no_decay=("online_head.",))
    if args.optimizer == "lars":
        return common.LARS(groups, lr=lr, momentum=args.momentum, trust=args.lars_trust, classic=True)
    return common.make_adamw(groups, lr, args.betas, device)


# ======================================================================================================================
# Monitors (stop-gradient, held-out split): weighted kNN, the online linear head, a picture of the views
# ======================================================================================================================


@torch.no_grad()
def monitors(model: nn.Module, held: dict, args: Args, step: int, run_dir: str) -> dict:
    """eval/knn_top1: weighted kNN (SPEC 8: k 200, t 0.07, cosine) on h of the class-balanced held-out bank
    (training images) and queries (held-out split); eval/online_linear_top1: the online head on h of the same
    queries; views_step*.png: 8 held-out images (top row) and two SimCLR views of each (fixed draws)."""
    device = held["pictures"].device
    aug = common.BatchedAugment("simclr", args.image_size, **augment_kwargs(args))
    g = torch.Generator(device=device).manual_seed(0)
    rows = [held["pictures"], aug(held["pictures"], g), aug(held["pictures"], g)]
    path = os.path.join(run_dir, f"views_step{step:07d}.png")
    common.save_image_grid(torch.cat(rows), path, nrow=8, labels=["held-out image", "view 1", "view 2"])
    embedded = common.embed_heldout(lambda x: features(model, x), held, args, device)
    metrics = {"eval/knn_top1": common.knn_top1(embedded, args)} if "bank" in embedded else {}
    head = common.unwrap(model).online_head
    if head is not None:
        queries, labels = embedded["queries"]
        metrics["eval/online_linear_top1"] = (head(queries).argmax(dim=1) == labels).float().mean().item()
    return metrics


# ======================================================================================================================
# Data: two SimCLR views per image
# ======================================================================================================================


def augment_kwargs(args: Args) -> dict:
    """common's "simclr" view: jitter strength, blur switch, optional crop min area."""
    kw = dict(jitter_strength=args.jitter_strength, blur=common.BLUR_FLAG[args.blur])
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
    if args.arch not in RESNETS and args.image_size % args.patch_size:
        raise ValueError(f"--image-size {args.image_size} is not divisible by --patch-size {args.patch_size}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")


# ======================================================================================================================
# Presets and the training loop
# ======================================================================================================================

# Values a named group sets unless given on the command line (printed at startup, saved in args.json). --preset
# wins over --arch's entry.
PRESETS = {
    "preset": {
        # The dataclass defaults above ARE the CIFAR-10 recipe (SimCLR README / REFERENCE_FACTS 2): nothing to change.
        "cifar": {},
        # ViT-B/16 SimCLR of CAN ("We use the same hyper-parameters for SimCLR training", CAN App. C, Table 6); the
        # AdamW recipe (optimizer, betas, lr, wd) comes from the arch entry, so --arch vit_l gets ViT-L's values.
        "imagenet": dict(
            dataset="imagefolder",
            data_root="data/imagenet",
            image_size=224,
            arch="vit_b",
            patch_size=16,
            head="bn",
            batch_size=4096,
            warmup_epochs=40,
            epochs=800,
            temperature=0.1,
            tf_loss_scale=False,  # CAN's SupCon loss: the mean over the 2N anchors (AdamW hardly cares)
            jitter_strength=1.0,
            blur="on",
            num_workers=10,
            eval_every=2000,
            ckpt_every=500,
        ),
        # CPU tests and smoke runs (nothing here is a recommendation): with --dataset fashion_mnist, 150 steps lift
        # the kNN monitor well above the untrained network (tests/test_simclr.py).
        "tiny": dict(
            dataset="synthetic",
            synthetic_size=2000,
            image_size=32,
            arch="vit_micro",
            patch_size=8,
            head="ln",
            proj_hidden=256,
            proj_dim=64,
            optimizer="adamw",
            betas=(0.9, 0.95),
            base_lr=2e-3,
            weight_decay=0.05,
            batch_size=64,
            epochs=4,
            warmup_epochs=0,
            temperature=0.2,
            tf_loss_scale=False,
            log_every=10,
            eval_every=1000,
            ckpt_every=1000,
            knn_bank=2000,
            knn_queries=1000,
            num_workers=0,
        ),
    },
    # CAN Table 6 for the two ViTs it trains (same hyper-parameters for SimCLR): AdamW, base lr and weight decay per
    # size; gradient checkpointing so that 2 x 512 full views per GPU fit in 80 GB (see header).
    "arch": {
        **{
            a: dict(optimizer="adamw", betas=(0.9, 0.95), base_lr=2.5e-4, weight_decay=0.05, grad_checkpointing=True)
            for a in ("vit_b", "vit_base")
        },  # fmt: skip
        **{
            a: dict(optimizer="adamw", betas=(0.9, 0.95), base_lr=1.25e-4, weight_decay=0.1, grad_checkpointing=True)
            for a in ("vit_l", "vit_large")
        },  # fmt: skip
    },
}


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv, PRESETS)
    with common.usage_errors(METHOD):  # bad input: one line, no traceback
        check_args(args)
    if args.export_encoder:  # interop, no training: the checkpoint's encoder for MAE's fine-tuning scripts and timm
        with common.usage_errors(METHOD):
            return common.export_encoder(args, METHOD, prefix="backbone.")
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
    if args.online_linear and args.num_classes == 0:
        args.num_classes = int(train_set.num_classes)  # saved in args.json / the checkpoint: build_model needs it
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

    # --- the training loop (THE PART TO READ is SimCLR and simclr_losses above)
    model.train()
    epoch = step // steps_per_epoch
    while step < stop_step:
        for views, labels in batches.epoch(epoch, start_step=step % steps_per_epoch):
            common.set_lr(optimizer, lr := common.cosine_lr(step, total_steps, warmup_steps, peak_lr, args.min_lr))
            terms, _ = simclr_losses(model, views, labels, args)
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
