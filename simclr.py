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

Deviations from the paper / reference code (google-research/simclr tf2), and why:
  * the loss is the mean over the 2N anchors; the TF code reports and differentiates mean_a + mean_b = 2x this value
    (REFERENCE_FACTS 2; tests/test_simclr.py proves the factor). AdamW does not care; under LARS the adapted 2-D
    weights do not either (the trust ratio normalizes the step), but the un-adapted biases / BN parameters move half
    as far per step as in TF and weight decay weighs twice as much against the gradient.
  * inputs are standardized with ImageNet mean / std (the ViT/MAE convention of common.py); the TF code feeds [0, 1]
    pixels. For ResNets the first BatchNorm absorbs the difference.
  * crops: common.py's "simclr" view, bilinear resampling and min area 0.2 at <= 32 px (GCRL Table 2); SimCLR's TF
    code uses bicubic and 0.08 at every size (--crop-min-scale 0.08 restores the latter).
  * the online linear head is in the main optimizer in the no-weight-decay group; under LARS it still gets layer
    adaptation (TF excludes `head_supervised` from it too). It only monitors: its input is detached.
  * SyncBatchNorm needs CUDA: on CPU ranks (gloo, tests) BatchNorm statistics stay per rank.
  * --grad-checkpointing (on for vit_b / vit_l) recomputes transformer blocks in backward: 2 x 512 full 224 px views
    of ViT-B per GPU (batch 4096 on 8 GPUs) need more than 80 GB of activations otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.checkpoint import checkpoint

import common
from common import (
    LARS,
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
    print0,
    resolve_resume,
    save_training_state,
    scaled_lr,
    seed_everything,
    set_lr,
    setup_distributed,
    unwrap,
    usage_errors,
    vit_arch,
)

METHOD = "simclr"
RESNETS = {"resnet18": 512, "resnet50": 2048}  # arch -> width of the pooled representation h
ARCH_CHOICES = list(RESNETS) + list(common.VIT_ARCHS) + list(common.VIT_ALIASES)


@dataclass
class Args:
    """SimCLR with negatives gathered from every rank (arXiv:2002.05709). Defaults: the CIFAR-10 recipe of the
    SimCLR README (ResNet-18, batch 512, LARS lr 1.0 x batch / 256, tau 0.5); --preset imagenet: CAN Table 6."""

    # --- experiment
    run_name: str = arg("", "run folder name under --output-dir (default: simclr_<dataset>_<arch>_s<seed>)")
    output_dir: str = arg("runs", "where run folders are written")
    seed: int = arg(0, "random seed (each rank adds its rank)")
    device: str = arg("auto", "auto (CUDA when available) | cuda | cpu")
    resume: str = arg("auto", "auto = continue <run>/checkpoint.pt when present; a path; '' = start fresh")
    steps: int = arg(0, "stop after this many optimizer steps (0 = all epochs; the LR schedule spans the epochs)")
    # --- data
    dataset: str = arg("cifar10", "cifar10 | cifar100 | svhn | stl10 | imagenet32/64 | imagefolder | synthetic | ...")
    data_root: str = arg("data", "dataset root folder")
    download: bool = arg(False, "download the dataset when torchvision can")
    synthetic_size: int = arg(0, "images per split of the synthetic dataset (0 = common.py's default)")
    image_size: int = arg(32, "training resolution (SimCLR README CIFAR-10: 32)")
    num_workers: int = arg(8, "DataLoader workers per rank for datasets not kept on the device")
    # --- model
    preset: str = arg("cifar", "bundle of defaults: cifar (SimCLR README) | imagenet (CAN Table 6) | tiny (CPU tests)",
                      ["cifar", "imagenet", "tiny"])  # fmt: skip
    arch: str = arg("resnet18", "backbone: resnet18 | resnet50 (torchvision) | a ViT preset of common.py", ARCH_CHOICES)
    patch_size: int = arg(4, "ViT patch size (4 at 32 px: 64 patches; CAN: 16 at 224)")
    head: str = arg("bn", "projection head: bn (SimCLR v2 / CAN, 3 layers) | ln (GCRL, 2 layers)", ["bn", "ln"])
    proj_hidden: int = arg(0, "head hidden width (0 = auto: bn ResNet = backbone width, bn ViT = 4096, ln = 1024)")
    proj_dim: int = arg(0, "head output width (0 = auto: 128; ln at <= 32 px: 64 (GCRL 4.1))")
    grad_checkpointing: bool = arg(False, "ViT: recompute each block in backward (less memory, ~1/3 more compute)")
    # --- optimization
    optimizer: str = arg("lars", "lars (SimCLR) | adamw (CAN Table 6)", ["lars", "adamw"])
    epochs: int = arg(1000, "training epochs (SimCLR README CIFAR-10: 1000)")
    batch_size: int = arg(512, "GLOBAL batch of images (2 views each), split over ranks (SimCLR README CIFAR-10: 512)")
    base_lr: float = arg(1.0, "lr per 256 images: lr = base_lr * batch / 256 (SimCLR README CIFAR-10: 1.0)")
    lr: float | None = arg(None, "absolute peak learning rate; overrides base_lr scaling")
    min_lr: float = arg(0.0, "final learning rate of the cosine schedule (SimCLR tf2 CosineDecay: 0)")
    warmup_epochs: int = arg(10, "linear warmup epochs (SimCLR tf2 run.py: 10)")
    weight_decay: float = arg(1e-4, "weight decay (SimCLR README: 1e-4; CAN Table 6 AdamW: 0.05 ViT-B / 0.1 ViT-L)")
    momentum: float = arg(0.9, "LARS momentum (SimCLR tf2 run.py: 0.9)")
    lars_trust: float = arg(0.001, "LARS trust coefficient eta (SimCLR tf2 lars_optimizer.py: 0.001)")
    betas: tuple[float, float] = arg((0.9, 0.95), "AdamW betas (CAN Table 6)")
    clip_grad: float = arg(0.0, "max gradient norm, 0 = off (SimCLR and CAN do not clip)")
    amp: bool = arg(True, "bf16 autocast for the networks (similarities, log-softmax and losses stay fp32)")
    compile: bool = arg(False, "torch.compile the model")
    # --- logging
    log_every: int = arg(20, "log every N steps")
    eval_every: int = arg(1000, "kNN / online-linear monitor and the view picture every N steps (and at the end)")
    ckpt_every: int = arg(1000, "checkpoint every N steps (and at the end)")
    knn_bank: int = arg(10000, "training images (un-augmented) in the kNN memory bank; 0 disables the kNN monitor")
    knn_queries: int = arg(10000, "held-out images classified by the monitors")
    knn_k: int = arg(200, "neighbours of the kNN monitor (SPEC 8: 200; at most the bank size)")
    knn_t: float = arg(0.07, "temperature of the kNN vote weights exp(cos / t) (SPEC 8: 0.07)")
    online_linear: bool = arg(True, "train a linear head on detached h jointly (SimCLR lineareval_while_pretraining)")
    num_classes: int = arg(0, "classes of the online linear head (0 = the dataset's; filled in at start and saved)")
    # --- SimCLR
    temperature: float = arg(0.5, "NT-Xent temperature tau (SimCLR README CIFAR-10: 0.5; ImageNet / CAN: 0.1)")
    jitter_strength: float = arg(0.5, "color jitter strength s: (0.8s, 0.8s, 0.8s, 0.2s) (SimCLR README CIFAR-10: 0.5)")
    blur: str = arg("auto", "Gaussian blur: auto = on at >= 96 px | on | off (SimCLR README CIFAR-10: off)",
                    ["auto", "on", "off"])  # fmt: skip
    crop_min_scale: float | None = arg(None, "RandomResizedCrop min area (default: 0.2 at <= 32 px (GCRL), else 0.08)")


# Values a preset sets unless given on the command line. "preset" is applied first, so a preset may choose the arch
# whose own entry then applies.
PRESETS = {
    "preset": {
        # The dataclass defaults above ARE the CIFAR-10 recipe (SimCLR README / REFERENCE_FACTS 2): nothing to change.
        "cifar": {},
        # ViT-B/16 SimCLR of CAN ("We use the same hyper-parameters for SimCLR training", CAN App. C, Table 6).
        "imagenet": dict(
            dataset="imagefolder",
            image_size=224,  # CAN Table 6 / SimCLR
            arch="vit_b",
            patch_size=16,  # CAN: ViT-B/16
            head="bn",  # CAN App. C: FC 4096 - BN - ReLU twice, FC 128 (hidden width from the ViT rule of proj_hidden)
            optimizer="adamw",  # CAN Table 6
            betas=(0.9, 0.95),  # CAN Table 6
            base_lr=2.5e-4,  # CAN Table 6, ViT-B (ViT-L: 1.25e-4, see "arch" below)
            weight_decay=0.05,  # CAN Table 6, ViT-B (ViT-L: 0.1)
            batch_size=4096,  # CAN Table 6
            warmup_epochs=40,  # CAN Table 6
            epochs=800,  # CAN Table 1: SimCLR ViT-B, 800 epochs on IN-1K
            temperature=0.1,  # CAN 3.2 and SimCLR tf2 run.py (ImageNet)
            jitter_strength=1.0,  # CAN Table 6 / SimCLR tf2 color_jitter_strength
            blur="on",  # CAN Table 6 / SimCLR tf2 use_blur (p = 0.5)
            num_workers=10,  # MAE / CAN official main_pretrain.py
            eval_every=2000,
            ckpt_every=500,
        ),
        # CPU tests and smoke runs (nothing here is a recommendation): with --dataset fashion_mnist, 150 steps (~30 s
        # on 2 CPU cores) lift the kNN monitor from 0.53 (untrained) to 0.64 (tests/test_simclr.py).
        "tiny": dict(
            dataset="synthetic",
            synthetic_size=2000,
            image_size=32,
            arch="vit_micro",
            patch_size=8,  # 16 patches: cheap on CPU
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
            log_every=10,
            eval_every=1000,
            ckpt_every=1000,
            knn_bank=2000,
            knn_queries=1000,
            num_workers=0,
        ),
    },
    # CAN Table 6 for the two ViTs it trains (same hyper-parameters for SimCLR): its AdamW recipe, with base lr and
    # weight decay per size; gradient checkpointing so that 2 x 512 full views per GPU fit in 80 GB (see header).
    "arch": {
        **{
            a: dict(optimizer="adamw", betas=(0.9, 0.95), base_lr=2.5e-4, weight_decay=0.05, grad_checkpointing=True)
            for a in ("vit_b", "vit_base")
        },
        **{
            a: dict(optimizer="adamw", betas=(0.9, 0.95), base_lr=1.25e-4, weight_decay=0.1, grad_checkpointing=True)
            for a in ("vit_l", "vit_large")
        },
    },
}


# ======================================================================================================================
# Model: backbone f (ResNet or ViT) -> h, projection head g -> z, online linear head on stop-gradient(h)
# ======================================================================================================================


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


def _checkpointed(forward):
    """Wrap a block's forward so that its activations are recomputed in backward (torch.utils.checkpoint)."""

    def run(x, *args, **kwargs):
        if torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(forward, x, *args, use_reentrant=False, **kwargs)
        return forward(x, *args, **kwargs)

    return run


def head_dims(args: Args, width: int) -> tuple[int, int]:
    """(hidden, out) of the projection head, resolving the 0 = auto values (see the Args help)."""
    if args.head == "bn":
        # SimCLR v2 (tf2/model.py, 3 layers): hidden = the backbone width; CAN App. C for ViTs: 4096. Output 128.
        hidden = width if args.arch in RESNETS else 4096
        out = 128
    else:
        hidden = 1024  # GCRL 4.1: LayerNorm head, hidden 1024, output 64 (CIFAR) / 128 (ImageNet)
        out = 64 if args.image_size <= 32 else 128
    return args.proj_hidden or hidden, args.proj_dim or out


class SimCLR(nn.Module):
    """backbone (torchvision ResNet without fc, or common.VisionTransformer with timm names), projector (g), and an
    optional online linear head. forward(x) with x (N, 3, S, S) NORMALIZED images (N = 2B: view 1 rows, then view 2)
    -> dict h (N, width) representation, z (N, proj_dim) projection (not yet L2-normalized), logits (N, C) of the
    online head on h.detach() when it exists."""

    def __init__(self, args: Args):
        super().__init__()
        self.is_vit = args.arch not in RESNETS
        if self.is_vit:
            dim, depth, heads = vit_arch(args.arch)
            self.backbone = VisionTransformer(args.image_size, args.patch_size, 3, dim, depth, heads)
            self.width = dim
            if args.grad_checkpointing:  # instance-level forward wrappers keep the state_dict names unchanged
                for block in self.backbone.blocks:
                    block.forward = _checkpointed(block.forward)
        else:
            self.backbone = resnet_backbone(args.arch, args.image_size)
            self.width = RESNETS[args.arch]
        hidden, out = head_dims(args, self.width)
        layers = 3 if args.head == "bn" else 2
        self.projector = ProjectionHead(self.width, hidden, out, num_layers=layers, kind=args.head)
        self.online_head = nn.Linear(self.width, args.num_classes) if args.online_linear and args.num_classes else None

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """h = f(x): (N, 3, S, S) normalized -> (N, width)."""
        if self.is_vit:
            tokens = self.backbone(x, mask_ratio=0.0)[0]  # (N, 1 + L, D) after the final norm, cls first
            return tokens[:, 1:].mean(dim=1)  # mean of the patch tokens (CAN 3.2 / App. C), no cls
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.representation(x)
        out = {"h": h, "z": self.projector(h)}
        if self.online_head is not None:
            out["logits"] = self.online_head(h.detach())  # stop-gradient: the monitor never shapes the backbone
        return out


def build_model(args: Args) -> SimCLR:
    """The SimCLR model of `args` (also used by eval_probe.py with Args(**checkpoint["args"]))."""
    return SimCLR(args)


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """Frozen representation for probing: images float (B, 3, S, S) in [0, 1] (un-normalized) -> (B, D) float32,
    computed in eval mode (BatchNorm running statistics). layer=None: h, the backbone output before the projection
    head (SimCLR / GCRL 4.1: "the output before the projection head"): pooled 512 / 2048 ResNet features, or the mean
    of the ViT's patch tokens after the final norm. layer=i: ViT: mean of the patch tokens output by block i (0-based,
    before the final norm); ResNet: global-average-pooled output of stage i (layer1..layer4 = 0..3)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    x = normalize(images.float())
    n_layers = num_feature_layers(model)
    if layer is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the backbone has {n_layers} feature layers (0..{n_layers - 1})")
    net = model.backbone
    if layer is None:
        out = model.representation(x)
    elif model.is_vit:
        out = net.block_tokens(x, layer)[:, 1:].mean(dim=1)
    else:
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4)[: layer + 1]:
            h = stage(h)
        out = h.mean(dim=(2, 3))
    model.train(was_training)
    return out.float()


def num_feature_layers(model: nn.Module) -> int:
    model = unwrap(model)
    return len(model.backbone.blocks) if model.is_vit else 4


# ======================================================================================================================
# Loss (THE PART TO READ): NT-Xent over the two views of every image of every rank
# ======================================================================================================================


def contrastive_loss(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR eq. 1; GCRL eq. 3). z (2n, d): this rank's projections, view-1 rows then view-2 rows. With
    u = normalize(z) and the candidates U = the u of every rank (gathered WITH gradient), anchor i's loss is
        l_i = -log( exp(u_i . u_pos(i) / tau) / sum_{k != i} exp(u_i . U_k / tau) ),
    pos(i) = the other view of the same image; the loss is the mean over the 2n local anchors (DDP's gradient
    averaging then gives the mean over all 2N anchors). The TF reference reports 2x this (mean of each view's
    anchors, summed). Always fp32, also when called under autocast: bf16 logits at tau = 0.1 lose ~2 digits."""
    n = z.shape[0] // 2
    with torch.autocast(device_type="cuda" if z.is_cuda else "cpu", enabled=False):  # (meta tensors: FLOP count)
        return nt_xent(z[:n].float(), z[n:].float(), temperature)


def simclr_losses(
    model: nn.Module, views: list[torch.Tensor], labels: torch.Tensor | None, args: Args
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One SimCLR training objective. views: two float (B, 3, S, S) tensors in [0, 1] (the two augmentations of the
    same B images, same order); labels (B,) for the online linear head (None: no online loss). The networks run under
    bf16 autocast when args.amp; the losses in fp32.
    Returns (terms: {"contrastive", "online_linear" (when the head exists and labels are given), "total"},
             out: the model outputs h (2B, width), z (2B, proj_dim), logits)."""
    x = normalize(torch.cat(views).float())  # (2B, 3, S, S): one backbone batch, so BN sees both views together
    amp = autocast(x.device, args.amp)
    with amp:
        out = model(x)
    terms = {"contrastive": contrastive_loss(out["z"], args.temperature)}
    if "logits" in out and labels is not None:
        # SimCLR tf2 run.py: labels duplicated for the two views, supervised loss added to the total. h was detached
        # inside the model, so this term trains the linear head only.
        terms["online_linear"] = F.cross_entropy(out["logits"].float(), torch.cat([labels, labels]))
    terms["total"] = sum(terms.values())
    return terms, out


def training_step_flops(args: Args) -> float:
    """FLOPs per image (both of its views) of one forward + backward SimCLR step, counted by FlopCounterMode on the
    meta device with a 2-image batch: no memory, no data, no RNG use, no process group (call it before
    setup_distributed). The online linear head (< 0.1%) and gradient checkpointing's recomputation are not counted."""
    args = dataclasses.replace(args, amp=False, grad_checkpointing=False, online_linear=False)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(args)
        views = [torch.rand(2, 3, args.image_size, args.image_size) for _ in range(2)]

        def step():
            simclr_losses(model, views, None, args)[0]["total"].backward()

        return count_flops(step) / 2


def build_optimizer(model: nn.Module, args: Args, lr: float, device) -> torch.optim.Optimizer:
    """LARS (SimCLR) or AdamW (CAN Table 6) over two groups (common.param_groups): weight decay on the >= 2-D weights,
    none on biases, norm parameters and the online head. common.LARS also skips layer adaptation for every tensor
    with ndim <= 1 (biases, BN / LN weights), as SimCLR's tf2/lars_optimizer.py excludes 'batch_normalization|bias'."""
    groups = param_groups(model, args.weight_decay, no_decay=("online_head.",))
    if args.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=args.momentum, trust=args.lars_trust)
    return make_adamw(groups, lr, args.betas, device)


# ======================================================================================================================
# Monitors (stop-gradient, held-out split): weighted kNN and the online linear head
# ======================================================================================================================


@torch.no_grad()
def evaluate(model: nn.Module, bank_set, query_set, args: Args, device) -> dict[str, float]:
    """eval/knn_top1: weighted kNN (SPEC 8: k=200, t=0.07, cosine; k <= bank size) on h, memory bank =
    args.knn_bank training images, queries = args.knn_queries held-out images (both common.heldout_subset: class
    balanced); eval/online_linear_top1: the online head on h of the same queries. Accuracies in [0, 1]."""
    amp = autocast(device, args.amp)

    def embed(dataset, count):
        feats, labels = [], []
        subset = common.heldout_subset(dataset, count)
        for x, y in common.eval_batches(subset, args.image_size, 256, device, num_workers=min(args.num_workers, 4)):
            with amp:
                feats.append(features(model, x))
            labels.append(y)
        return torch.cat(feats), torch.cat(labels)

    metrics = {}
    queries, query_labels = embed(query_set, args.knn_queries)
    if args.knn_bank > 0:
        bank, bank_labels = embed(bank_set, args.knn_bank)
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
        scores = common.knn_predict(bank, bank_labels, queries, num_classes, k=args.knn_k, temperature=args.knn_t)
        metrics["eval/knn_top1"] = (scores.argmax(dim=1) == query_labels).float().mean().item()
    head = unwrap(model).online_head
    if head is not None:
        logits = head(queries.to(head.weight.dtype))
        metrics["eval/online_linear_top1"] = (logits.argmax(dim=1) == query_labels).float().mean().item()
    return metrics


# ======================================================================================================================
# Data: two SimCLR views per image
# ======================================================================================================================


def augment_kwargs(args: Args) -> dict:
    """Keyword arguments of common's "simclr" view: jitter strength, blur switch, optional crop min area."""
    kw = dict(jitter_strength=args.jitter_strength, blur={"auto": None, "on": True, "off": False}[args.blur])
    if args.crop_min_scale is not None:
        kw["scale"] = (args.crop_min_scale, 1.0)
    return kw


def load_split(args: Args, train: bool):
    """The train or held-out split at the training resolution (in-memory datasets are resized / padded once, e.g.
    28 px Fashion-MNIST -> 32; synthetic shapes are drawn at that size; image folders are left to the crops)."""
    kw = {"synthetic_size": args.synthetic_size} if args.dataset == "synthetic" and args.synthetic_size else {}
    return common.build_dataset(
        args.dataset, root=args.data_root, train=train, download=args.download, image_size=args.image_size, **kw
    )


def check_args(args: Args) -> None:
    """Clear errors for settings that cannot train."""
    if min(args.batch_size, args.log_every, args.eval_every, args.ckpt_every) < 1:
        raise ValueError("--batch-size, --log-every, --eval-every and --ckpt-every must be >= 1")
    if args.arch not in RESNETS and args.image_size % args.patch_size:
        raise ValueError(f"--image-size {args.image_size} is not divisible by --patch-size {args.patch_size}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")


# ======================================================================================================================
# Training loop
# ======================================================================================================================


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv, PRESETS)
    with usage_errors("simclr.py"):  # bad input: one line, no traceback
        check_args(args)
    # --- boilerplate: FLOPs (on the meta device, before any process group exists), ranks, seeds, run folder
    flops_per_image = training_step_flops(args)
    info = setup_distributed(args.device)
    dev = info.device
    seed_everything(args.seed + info.rank)
    with usage_errors("simclr.py"):
        per_rank = batch_per_rank(args.batch_size, info.world_size)
        train_set, test_set = load_split(args, train=True), load_split(args, train=False)
    run_dir = os.path.join(args.output_dir, args.run_name or default_run_name(METHOD, args))

    # --- data: two SimCLR views per image; the held-out split for the monitors
    if args.online_linear and args.num_classes == 0:
        args.num_classes = int(train_set.num_classes)  # saved in args.json / the checkpoint: build_model needs it
    with usage_errors("simclr.py"):  # e.g. a batch larger than the dataset
        batches = TrainBatches(
            train_set, ["simclr", "simclr"], args.image_size, per_rank, info, seed=args.seed,
            num_workers=args.num_workers, aug_kwargs=augment_kwargs(args),
        )  # fmt: skip
    logger = RunLogger(run_dir, args, info.is_main)
    print0(f"SimCLR training step: {flops_per_image / 1e9:.3f} GFLOPs per image (forward + backward, both views)")

    # --- model, optimizer (boilerplate). SyncBatchNorm only on GPUs: PyTorch has no CPU SyncBatchNorm.
    model = build_model(args).to(dev)
    if dev.type == "cuda":
        model = convert_sync_batchnorm(model, info)
    if info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    peak_lr = args.lr if args.lr is not None else scaled_lr(args.base_lr, args.batch_size)
    optimizer = build_optimizer(unwrap(model), args, peak_lr, dev)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch
    stop_step = min(args.steps, total_steps) if args.steps > 0 else total_steps
    step = 0
    with usage_errors("simclr.py"):  # a missing --resume PATH, another method's or architecture's checkpoint
        resume_path = resolve_resume(args.resume, run_dir)
        if resume_path:
            step = load_training_state(resume_path, METHOD, model, optimizer, info)["step"]
    if resume_path:
        print0(f"resumed from {resume_path} at step {step}")
    print0(f"{args.arch} + {args.head} head on {args.dataset}: {info.world_size} x {per_rank} images/step, "
           f"{steps_per_epoch} steps/epoch, {args.optimizer} peak lr {peak_lr:.3g}, tau {args.temperature}, "
           f"steps {step} -> {stop_step}")  # fmt: skip

    # --- the training loop (THE PART TO READ is simclr_losses above)
    model.train()
    epoch = step // steps_per_epoch
    meter = Throughput(stop_step, step)
    images_since_log, final = 0, {}
    while step < stop_step:
        for views, labels in batches.epoch(epoch, start_step=step % steps_per_epoch):
            set_lr(optimizer, lr := cosine_lr(step, total_steps, warmup_steps, peak_lr, args.min_lr))
            terms, _ = simclr_losses(model, views, labels, args)
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
                print0(f"step {step}/{stop_step} ep {epoch} {parts} lr {lr:.3g} {ips:.1f} img/s"
                       + (f" mfu {util:.1%}" if util is not None else "") + f" eta {eta}")  # fmt: skip
            if step % args.eval_every == 0 or last:
                if info.is_main:
                    pairs = torch.stack([v[:8].float() for v in views], dim=0).flatten(0, 1)  # row 1: view 1, row 2: 2
                    common.save_image_grid(pairs, os.path.join(run_dir, f"views_step{step:07d}.png"), nrow=8)
                    metrics = evaluate(model, train_set, test_set, args, dev)
                    if metrics:
                        print0(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
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
