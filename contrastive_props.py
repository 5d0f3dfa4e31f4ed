"""Intriguing Properties of Contrastive Losses (Chen, Luo, Li 2021, arXiv:2011.02803): the generalized contrastive loss,
datasets with controllable competing features, training, and the paper's studies as sub-commands.

What is implemented (SPEC section 7; REFERENCE_FACTS 3 restates the equations lost from the paper's text):
  * the generalized contrastive loss L = L_align + lambda * L_distribution (eq. 2, Table 1) on the projections of the
    two views, --loss: ntxent (eq. 1 computed as eq. 3: alignment + tau x LogSumExp uniformity, over tau), decoupled
    (eq. 4, the colab's `dist='logsumexp'`: kernel tau and lambda apart), swd_normal / swd_sphere / swd_cube
    (sliced-Wasserstein matching to N(0, I), the hypersphere or U(-1, 1)^d; projections and prior samples seeded by
    (seed, step)); negatives and the distribution term see the GLOBAL batch (common.gather_with_grad);
  * backbones (A.1): ResNet-18 with SimCLR's CIFAR stem at <= 32 px, or the colab's ConvNet (randbits_mnist.ipynb),
    3 + --bits input channels; projection head Linear-BN-ReLU-Linear to 64;
  * datasets generated on the fly, seeded (section "Data"): multidigits, multidigits_size, digit_on, randbit and plain
    (the --base images alone); digits: --digits mnist | fashion_mnist | drawn (procedural), printed, in args.json;
  * views batched on the device: crop-and-resize for MultiDigits (3.1 / 4.3), else SimCLR's view of the RGB channels;
    --objective supervised: a linear classifier on h, same network, views and budget (Tables 3-4's baseline); at the end
    (and untrained: --probe-untrained) a linear probe per target on frozen h, GCRL protocol (probe.json);
  * studies: `contrastive_props.py <study> --scale tiny|paper` (losses, multidigits, suppression-size, digit-on,
    randbit): a run and CSV rows per point (finished points skipped), a PNG with matplotlib.

Launch:
    python contrastive_props.py --preset tiny --dataset randbit --bits 4 --steps 200 --probe-untrained
    python contrastive_props.py --dataset randbit --base cifar10 --bits 8             # ResNet-18, LARS, batch 512
    python contrastive_props.py randbit --scale tiny --out results                   # Figure 7, CPU scale: 28 min here
    python contrastive_props.py losses --scale paper --out results --train-args "--download"   # GPU, Table A.1

Choices where the paper and its code are silent, and deviations (with reasons):
  * NT-Xent is the mean over the 2N anchors (common.nt_xent's convention; the TF reference reports 2x).
  * MultiDigits: 20 px digits on a 112 px canvas (sizes lost; 4.3's fixed size; fits a grid cell), each its whole 28 px
    frame resized, added, clipped at 255 ("channel addition"); supervised on n digits: multi-label BCE (unstated).
  * digit_on probes put digits from the WHOLE digit test split on held-out base images (recognition, not memory of U).
  * --loss-scale (A.1's "x 1000" for normalized h) is 1: not in the authors' code (REFERENCE_FACTS 3); Adam / LARS
    barely feel it. Decoupled lambda 0.003 ~ tau / d = 0.2 / 64 (lost): eq. 3's balance for the colab's alignment.
  * LARS with lr = base_lr * sqrt(batch) (A.1; 0.075 is SimCLR's ImageNet value, the CIFAR value was lost) or Adam lr
    1e-3 (the colab) for the ConvNet, both warmup + cosine (the colab decays linearly). --steps beyond the epochs
    extends the schedule (the studies' tiny budgets). BatchNorm statistics stay per rank on CPU (no CPU SyncBatchNorm).
  * --scale paper: the setups the text states (ResNet-18, 2-layer head, LARS, Table 4's batch 1024, Table A.1's batch
    128 and epochs); where numbers were lost, 100 epochs and tau 0.1 / 0.5 (Table 4, Figure 7) or 0.2. DigitOnImageNet
    runs on STL-10 at 64 px, 16 px digits (in-memory pipeline). Untrained rows: same net and seed.
  * RandBit integers come from a seeded generator (the colab hashes the JPEG bytes: also fixed per image); bit channels
    enter as 0 / 1 next to the standardized RGB channels.

Measured (2-core CPU; README.md "contrastive_props.py"): linear probe of the five losses 0.781-0.803, untrained 0.698;
RandBit (tau 0.1) 0.778 / 0.734 / 0.280 / 0.131 at 0/2/8/16 bits, untrained 0.57-0.69; suppression-size not reproduced.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

METHOD = "contrastive_props"
LOSSES = ["ntxent", "decoupled", "swd_normal", "swd_sphere", "swd_cube"]
DATASETS = ["multidigits", "multidigits_size", "digit_on", "randbit", "plain"]


@dataclass
class Args:
    """Generalized contrastive losses on datasets with competing features (Chen, Luo, Li 2021). Defaults: the paper's
    CIFAR-scale setup (ResNet-18, 2-layer head to 64, LARS with sqrt scaling); --preset tiny: the colab's ConvNet."""

    # --- experiment
    run_name: str = common.arg("", "run folder under --output-dir (default contrastive_props_<dataset>_<arch>_s<seed>)")
    output_dir: str = common.arg("runs", "where run folders are written")
    seed: int = common.arg(0, "random seed (model init, data order, augmentation; each rank adds its rank)")
    data_seed: int = common.arg(0, "seed of the generated datasets (digit placement, assignments, random bits)")
    device: str = common.arg("auto", "auto (CUDA when available) | cuda | cpu")
    resume: str = common.arg("auto", "auto = continue <run>/checkpoint.pt when present; a path; '' = start fresh")
    steps: int = common.arg(0, "stop after N optimizer steps (0 = all epochs; a larger N stretches the LR schedule)")
    preset: str = common.arg(
        "paper", "named defaults (PRESETS): paper (A.1, ResNet-18) | tiny (CPU)", ["paper", "tiny"]
    )
    # --- data
    dataset: str = common.arg("randbit", "multidigits | multidigits_size | digit_on | randbit | plain", DATASETS)
    base: str = common.arg("cifar10", "base images of digit_on / randbit / plain: a common.py dataset (or imagefolder)")
    digits: str = common.arg("mnist", "digit source: mnist (disk or --download) | fashion_mnist | drawn (procedural)",
                             ["mnist", "fashion_mnist", "drawn"])  # fmt: skip
    data_root: str = common.arg("data", "dataset root folder")
    download: bool = common.arg(False, "download missing datasets (torchvision)")
    image_size: int = common.arg(32, "input size for digit_on / randbit / plain (the MultiDigits sets use --canvas)")
    canvas: int = common.arg(112, "MultiDigits canvas side (paper 3.1 / 4.3: 112)")
    digit_size: int = common.arg(20, "digit side: MultiDigits digits, multidigits_size's fixed digit (20), digit_on")
    num_digits: int = common.arg(1, "multidigits: digits per training image (paper Table 3: 1, 2, 4, 8, 12, 16)")
    placement: str = common.arg("random", "multidigits: random | grid (4x4 cells, one digit each)", ["random", "grid"])
    large_size: int = common.arg(40, "multidigits_size: side of the second digit (paper Table 4: 20, 30, ..., 80)")
    unique_digits: int = common.arg(100, "digit_on: U, number of distinct digit images assigned to the base images")
    composite: str = common.arg("add", "digit_on: add (paper: channel addition, clipped) | max (colab)", ["add", "max"])
    bits: int = common.arg(0, "randbit: constant bit channels of a per-image random integer in [0, 2^bits)")
    train_size: int = common.arg(0, "training images to generate (0 = the size of the digit / base training split)")
    test_size: int = common.arg(0, "held-out probe images (0 = the size of the test split)")
    augment: str = common.arg("simclr", "randbit / digit_on / plain view: simclr | crop (colab, area 0.5-1)",
                              ["simclr", "crop"])  # fmt: skip
    crop_min_scale: float = common.arg(0.08, "min crop area of the simclr view and MultiDigits crops (SimCLR: 0.08)")
    jitter_strength: float = common.arg(0.5, "color jitter strength s (SimCLR CIFAR-10: 0.5)")
    # --- model
    arch: str = common.arg("resnet18", "resnet18 (CIFAR stem at <= 32 px) | convnet (colab)", ["resnet18", "convnet"])
    width: int = common.arg(1, "convnet width multiplier (colab width_mult)")
    proj_hidden: int = common.arg(0, "projection head hidden width (0 = backbone width; 256 for the convnet, colab)")
    proj_dim: int = common.arg(64, "projection output d (paper A.1: 64 for CIFAR-10, 128 for ImageNet)")
    # --- optimization
    optimizer: str = common.arg("lars", "lars (paper A.1, sqrt lr scaling) | adam (colab)", ["lars", "adam"])
    epochs: int = common.arg(200, "training epochs (paper Figure 1: 100-800)")
    batch_size: int = common.arg(512, "GLOBAL batch of images (2 views each), split over ranks")
    base_lr: float = common.arg(0.075, "LARS: lr = base_lr * sqrt(batch) (SimCLR ImageNet 0.075); adam: lr = base_lr")
    warmup_epochs: int = common.arg(10, "linear warmup epochs (SimCLR: 10)")
    weight_decay: float = common.arg(1e-6, "weight decay (SimCLR tf2 default 1e-6; LARS skips biases and norms)")
    momentum: float = common.arg(0.9, "LARS momentum")
    amp: bool = common.arg(True, "bf16 autocast where the hardware runs it natively (losses stay fp32)")
    compile: bool = common.arg(False, "torch.compile the model")
    # --- method
    objective: str = common.arg("contrastive", "contrastive | supervised (same net and views, Tables 3-4 baseline)",
                                ["contrastive", "supervised"])  # fmt: skip
    loss: str = common.arg("ntxent", "ntxent | decoupled | swd_normal | swd_sphere | swd_cube (paper Table 1)", LOSSES)
    temperature: float = common.arg(0.5, "NT-Xent tau (SimCLR CIFAR-10: 0.5; paper Fig 7 / colab sweep 0.05-0.2)")
    decoupled_temperature: float = common.arg(0.2, "decoupled NT-Xent: kernel temperature tau of the LogSumExp term")
    decoupled_lambda: float = common.arg(0.003, "decoupled NT-Xent: weight lambda of the distribution term (~ tau / d)")
    swd_lambda: float = common.arg(1.0, "SWD losses: weight lambda of the distribution term (colab default 1)")
    loss_scale: float = common.arg(1.0, "multiply the loss (paper A.1 mentions 1000 for normalized h; unverified)")
    # --- logging / probing
    log_every: int = common.arg(20, "log every N steps")
    ckpt_every: int = common.arg(1000, "checkpoint every N steps (and at the end)")
    keep_every: int = common.arg(0, "also keep a snapshot checkpoint-epNNNN.pt every N epochs (0 = none; MAE: 20)")
    probe_epochs: int = common.arg(100, "linear probe epochs at the end of training (GCRL protocol: 100); 0 = no probe")
    probe_untrained: bool = common.arg(False, "also probe the same architecture untrained (seeded), for the baseline")


# ======================================================================================================================
# Loss (THE PART TO READ): L = L_align + lambda * L_distribution on the global batch
# ======================================================================================================================


def ntxent_terms(h1: torch.Tensor, h2: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """NT-Xent in the form of paper eq. 3. h1, h2 (n, d) local projections. With u = normalize([h1; h2]) and the
    candidates U = every rank's u (gathered with gradient), for the 2n local anchors i:
        align = -mean_i u_i . u_pos(i),   uniformity = mean_i log sum_{k != i} exp(u_i . U_k / tau),
    and NT-Xent = (align + tau * uniformity) / tau (= common.nt_xent, tests/test_contrastive_props.py)."""
    n = h1.shape[0]
    u = F.normalize(torch.cat([h1, h2]), dim=1)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    logits = u @ common.gather_with_grad(u).T / temperature  # (2n, 2n * world)
    self_col = rank * 2 * n + torch.arange(2 * n, device=u.device)
    logits = logits.masked_fill(F.one_hot(self_col, logits.shape[1]).bool(), float("-inf"))
    align = -(u * torch.cat([u[n:], u[:n]])).sum(1).mean()
    uniformity = torch.logsumexp(logits, dim=1).mean()
    return {"align": align, "distribution": uniformity, "total": (align + temperature * uniformity) / temperature}


def decoupled_terms(h1, h2, temperature: float, lam: float) -> dict[str, torch.Tensor]:
    """Decoupled NT-Xent (eq. 4; colab get_logsumexp_loss): u = normalize(h); align = mean((u1 - u2)^2) / 2 over the
    n x d elements; distribution = mean_i logsumexp_j(u_i . U_j / tau) - log d over the local rows i and ALL 2N rows j
    of every rank, the diagonal (self) and the positive included as in the colab."""
    u1, u2 = F.normalize(h1, dim=1), F.normalize(h2, dim=1)
    u = torch.cat([u1, u2])
    align = (u1 - u2).pow(2).mean() / 2
    dist = torch.logsumexp(u @ common.gather_with_grad(u).T / temperature, dim=1).mean() - math.log(u.shape[1])
    return {"align": align, "distribution": dist, "total": align + lam * dist}


def random_orthogonal(d: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A Haar-random orthogonal d x d matrix: QR of a Gaussian one, signs of diag(R) moved into Q (Keras Orthogonal)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, device=device))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def sample_prior(prior: str, shape, generator=None, device=None) -> torch.Tensor:
    """Samples of the SWD prior: normal N(0, I) | sphere (normal, l2-normalized) | cube U(-1, 1)^d."""
    if prior == "cube":
        return torch.rand(shape, generator=generator, device=device) * 2 - 1
    x = torch.randn(shape, generator=generator, device=device)
    return F.normalize(x, dim=1) if prior == "sphere" else x


def swd_terms(h1, h2, prior: str, lam: float, projection=None, prior_samples=None, generator=None):
    """Sliced-Wasserstein generalized loss (colab get_swd_loss). h = [h1; h2] (l2-normalized for the sphere prior);
    align = mean((h1 - h2)^2) / 2; H = every rank's h gathered with gradient (2N, d); P = 2N prior samples; W a random
    orthogonal d x d matrix (fresh each step, the same on every rank): distribution = mean over the d projections and
    2N ranks of (sort(H W)[k] - sort(P W)[k])^2, sorting each projected coordinate over the batch. projection /
    prior_samples inject W and P (tests); otherwise they come from `generator`."""
    if prior == "sphere":
        h1, h2 = F.normalize(h1, dim=1), F.normalize(h2, dim=1)
    align = (h1 - h2).pow(2).mean() / 2
    hidden = common.gather_with_grad(torch.cat([h1, h2]))  # (2N, d): the distribution term sees the global batch
    d = hidden.shape[1]
    w = projection if projection is not None else random_orthogonal(d, generator, hidden.device)
    p = prior_samples if prior_samples is not None else sample_prior(prior, hidden.shape, generator, hidden.device)
    data_sorted = torch.sort((hidden @ w).T, dim=1).values  # (d, 2N)
    prior_sorted = torch.sort((p.to(hidden) @ w).T, dim=1).values
    dist = (data_sorted - prior_sorted).pow(2).mean()
    return {"align": align, "distribution": dist, "total": align + lam * dist}


def generalized_contrastive_loss(h1, h2, args: Args, generator=None, **inject) -> dict[str, torch.Tensor]:
    """args.loss on the two views' projections h1, h2 (n, d), in fp32 (bf16 outputs promoted; float64 kept) -> {"align",
    "distribution", "total" x args.loss_scale}. inject: the SWD's projection / prior_samples (tests)."""
    h1, h2 = (h if h.dtype == torch.float64 else h.float() for h in (h1, h2))
    with common.fp32_only(h1):
        if args.loss == "ntxent":
            terms = ntxent_terms(h1, h2, args.temperature)
        elif args.loss == "decoupled":
            terms = decoupled_terms(h1, h2, args.decoupled_temperature, args.decoupled_lambda)
        else:
            terms = swd_terms(h1, h2, args.loss[4:], args.swd_lambda, generator=generator, **inject)
    terms["total"] = terms["total"] * args.loss_scale
    return terms


# ======================================================================================================================
# Model: backbone (ResNet-18 CIFAR stem | colab ConvNet) -> h, 2-layer projection head -> z
# ======================================================================================================================


class ConvNet(nn.Module):
    """The colab's ConvN (randbits_mnist.ipynb): 3 x [Conv 3x3 stride 2 'valid', no bias - BN - ReLU] with
    32/64/64 x width filters, flatten, Linear(no bias) - BN - ReLU to 128 x width = h. (N, C, S, S) -> (N, 128w)."""

    def __init__(self, in_channels: int, image_size: int, width: int = 1):
        super().__init__()
        chans, s, self.width = [in_channels, 32 * width, 64 * width, 64 * width], image_size, 128 * width
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, 2, bias=False), nn.BatchNorm2d(b), nn.ReLU())
                                    for a, b in zip(chans[:-1], chans[1:]))  # fmt: skip
        for _ in self.blocks:
            s = (s - 3) // 2 + 1  # 'valid' 3x3 convolution, stride 2
        self.fc = nn.Sequential(nn.Linear(chans[-1] * s * s, self.width, bias=False), nn.BatchNorm1d(self.width),
                                nn.ReLU())  # fmt: skip

    def forward(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """layer=i: the global-average-pooled output of block i instead of h."""
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == layer:
                return x.mean(dim=(2, 3))
        return self.fc(x.flatten(1))


class ContrastiveModel(nn.Module):
    """backbone f -> h: the ConvNet, or torchvision's ResNet-18 without fc (N, 512) with SimCLR's CIFAR stem (3x3 conv
    stride 1, no max-pool) at <= 32 px (paper A.1 follows SimCLR); head g -> z (A.1: 2 layers, Linear - BN - ReLU -
    Linear); for --objective supervised a linear classifier on h (10 classes: every dataset the studies use has 10).
    forward: x (N, 3 + bits, S, S), standardized RGB and 0/1 bit channels -> {h (N, width), z (N, proj_dim), logits}."""

    def __init__(self, args: Args):
        super().__init__()
        self.in_channels, size, self.is_resnet = 3 + args.bits, input_size(args), args.arch == "resnet18"
        if self.is_resnet:
            self.backbone = net = torchvision.models.resnet18(weights=None, zero_init_residual=True)
            if size <= 32:
                net.conv1, net.maxpool = nn.Conv2d(self.in_channels, 64, 3, 1, 1, bias=False), nn.Identity()
            else:
                net.conv1 = nn.Conv2d(self.in_channels, 64, 7, 2, 3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.fc, width = nn.Identity(), 512
        else:
            self.backbone = ConvNet(self.in_channels, size, args.width)
            width = self.backbone.width
        hidden = args.proj_hidden or (width if self.is_resnet else 256)
        self.head = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                                  nn.Linear(hidden, args.proj_dim))  # fmt: skip
        self.classifier = nn.Linear(width, 10) if args.objective == "supervised" else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        out = {"h": h, "z": self.head(h)}
        if self.classifier is not None:
            out["logits"] = self.classifier(h)
        return out


def input_size(args: Args) -> int:
    return args.canvas if args.dataset.startswith("multidigits") else args.image_size


def build_model(args: Args) -> ContrastiveModel:
    """The model of `args` (also what eval_probe.py rebuilds with Args(**checkpoint["args"]))."""
    return ContrastiveModel(args)


def with_bits(images: torch.Tensor, bits: torch.Tensor | None) -> torch.Tensor:
    """images float (B, 3, S, S) in [0, 1], bits (B, n_bits) 0/1 or None -> (B, 3 + n_bits, S, S): one constant
    channel per bit appended (never augmented). A RandBit model's input image IS this tensor."""
    if bits is None or bits.shape[1] == 0:
        return images.float()
    return torch.cat([images.float(), bits.float()[:, :, None, None].expand(-1, -1, *images.shape[-2:])], dim=1)


def model_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 3 + n_bits, S, S) -> network input: the RGB channels standardized, the bit channels as they are (0 / 1)."""
    x = images.float()
    return torch.cat([common.normalize(x[:, :3]), x[:, 3:]], dim=1)


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, layer: int | None = None, pool: str | None = None):
    """Frozen representation h (eval mode: BatchNorm running statistics): images float (B, C, S, S) in [0, 1], C = 3
    (+ n_bits for a RandBit model: with_bits) -> (B, D) float32. layer=i: the global-average-pooled output of block i
    (ConvNet blocks 0..2, ResNet stages 0..3); pool "mean" only."""
    model = common.unwrap(model)
    n_layers = num_feature_layers(model)
    if (pool or "mean") != "mean":
        raise ValueError(f"unknown pool '{pool}': the representation is global-average-pooled")
    if images.shape[1] != model.in_channels:
        raise ValueError(f"this model takes 3 + {model.in_channels - 3} bit channels, got {images.shape[1]}: append "
                         f"the bits to the images (contrastive_props.with_bits)")  # fmt: skip
    if layer is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the backbone has {n_layers} feature layers (0..{n_layers - 1})")
    x, net = model_input(images), model.backbone
    with common.eval_mode(model):
        if model.is_resnet and layer is not None:
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            for stage in (net.layer1, net.layer2, net.layer3, net.layer4)[: layer + 1]:
                x = stage(x)
            out = x.mean(dim=(2, 3))
        else:
            out = net(x) if model.is_resnet else net(x, layer)
    return out.float()


def num_feature_layers(model: nn.Module) -> int:
    return 4 if common.unwrap(model).is_resnet else 3


# ======================================================================================================================
# Data: digit sources and the four datasets with competing features (paper 3.1, 4.1), generated once, seeded
# ======================================================================================================================

# A 5 x 7 bitmap font for the procedural digits ('#' = ink, rows separated by spaces), one glyph per class 0-9.
_FONT = [
    ".###. #...# #..## #.#.# ##..# #...# .###.", "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    ".###. #...# ....# ...#. ..#.. .#... #####", "##### ...#. ..#.. ...#. ....# #...# .###.",
    "...#. ..##. .#.#. #..#. ##### ...#. ...#.", "##### #.... ####. ....# ....# #...# .###.",
    "..##. .#... #.... ####. #...# #...# .###.", "##### ....# ...#. ..#.. .#... .#... .#...",
    ".###. #...# #...# .###. #...# #...# .###.", ".###. #...# #...# .#### ....# ...#. .##..",
]  # fmt: skip
# What the digits of a run are: printed and saved in args.json (nothing switches silently).
DIGIT_SOURCES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST (standing in for MNIST digits)",
                 "drawn": "procedurally drawn digits (5x7 font, random affine; standing in for MNIST)"}  # fmt: skip


@functools.lru_cache(maxsize=4)  # the studies train many models on the same digits in one process
def drawn_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n procedural digits 0-9 in MNIST's format -> (uint8 (n, 1, 28, 28), labels int64 (n,)): the class's glyph of
    _FONT, about 20 px tall, with per-image random scale (0.8-1.1), rotation (+-15 deg), shear (+-0.3), offset (+-2
    px), stroke width (thin / thick) and ink intensity (0.6-1), on a black background. Deterministic for (n, seed)."""
    gen = torch.Generator().manual_seed(seed)
    glyphs = torch.tensor([[float(c == "#") for c in g.replace(" ", "")] for g in _FONT]).view(10, 1, 7, 5)
    glyphs = F.interpolate(glyphs, scale_factor=4, mode="nearest")  # (10, 1, 28, 20): sharp strokes to resample
    labels = torch.randint(0, 10, (n,), generator=gen)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    scale, angle, shear = u(0.8, 1.1), u(-math.pi / 12, math.pi / 12), u(-0.3, 0.3)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output coordinates (28 px frame, [-1, 1]) to glyph coordinates: the glyph's 7 rows cover 20 px and
    # its 5 columns 20 * 5/7 px, times scale; then shear and rotation.
    ky, kx = 28 / 20 / scale, 28 / (20 * 5 / 7) / scale
    a = torch.stack([torch.stack([kx * cos, kx * (sin + shear * cos)], 1), torch.stack([-ky * sin, ky * cos], 1)], 1)
    offset = (torch.rand(n, 2, generator=gen) * 4 - 2) * 2 / 28  # +-2 px
    theta = torch.cat([a, (a @ offset[:, :, None])], dim=2)
    images = torch.empty(n, 1, 28, 28)
    for s in range(0, n, 4096):
        part = slice(s, s + 4096)
        grid = F.affine_grid(theta[part], [theta[part].shape[0], 1, 28, 28], align_corners=False)
        images[part] = F.grid_sample(glyphs[labels[part]], grid, mode="bilinear", align_corners=False)
    thick = torch.rand(n, generator=gen) < 0.4
    images[thick] = F.max_pool2d(images[thick], 3, 1, 1) if thick.any() else images[thick]
    images = images * u(0.6, 1.0)[:, None, None, None]
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def digit_split(args: Args, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits of --digits: (uint8 (N, 1, 28, 28), labels (N,)). mnist is read from --data-root (or downloaded
    with --download); a missing MNIST is an error that names the alternatives, never a silent switch."""
    if args.digits == "drawn":
        return drawn_digits(60000 if train else 10000, seed=args.data_seed * 2 + (0 if train else 1))
    try:
        ds = common.build_dataset(args.digits, root=args.data_root, train=train, download=args.download, channels=1)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (or choose another digit source: --digits fashion_mnist | drawn)") from None
    return ds.images, ds.labels


def base_split(args: Args, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The --base images as uint8 (N, 3, S, S) at --image-size, labels (N,)."""
    ds = common.build_dataset(args.base, root=args.data_root, train=train, download=args.download,
                              image_size=args.image_size)  # fmt: skip
    if isinstance(ds, common.ImageArray):
        return ds.images, ds.labels
    # an image folder: every image decoded once and resized (shorter side) + center-cropped to --image-size
    views = [(common.BatchedAugment("eval", args.image_size)(img[None])[0], label) for img, label in ds]
    if not views:
        raise ValueError(f"--base {args.base}: no images under {args.data_root}")
    images = torch.stack([(v * 255).round().to(torch.uint8) for v, _ in views])
    return images, torch.tensor([label for _, label in views])


@dataclass
class ImageSet:
    """A generated labeled set: images uint8 (N, C, S, S), C in {1, 3}; targets {name: (N,) int64 class}; bits
    (N, n_bits) 0/1 (randbit, plain) or None; multi_hot (N, 10): the digits present (MultiDigits); positions (tests)."""

    images: torch.Tensor
    targets: dict
    bits: torch.Tensor | None = None
    multi_hot: torch.Tensor | None = None
    positions: dict | None = None


def resize_digits(digits: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) -> float (N, size, size) in [0, 255]: the whole frame resized (antialiased bilinear)."""
    return F.interpolate(digits.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)[:, 0]


def compose(digits, labels, pick, boxes, canvas: int, targets: dict, positions=None) -> ImageSet:
    """digits[pick[:, k]] (pick (N, K)) resized to s_k and added on a black canvas at the top-left corners (top_k,
    left_k), each (N,), of boxes [(s_k, top_k, left_k)], clipped at 255 (the paper's channel addition)."""
    N = pick.shape[0]
    out = torch.zeros(N, canvas * canvas)
    for k, (size, top, left) in enumerate(boxes):
        r = torch.arange(size)
        idx = ((top[:, None, None] + r[None, :, None]) * canvas + left[:, None, None] + r[None, None, :]).view(N, -1)
        out.scatter_add_(1, idx, resize_digits(digits[pick[:, k]], size).reshape(N, -1))
    images = out.view(N, 1, canvas, canvas).clamp(0, 255).round().to(torch.uint8)
    return ImageSet(images, targets, multi_hot=torch.zeros(N, 10).scatter_(1, labels[pick], 1.0), positions=positions)


GRID = 4  # in-grid placement: a 4 x 4 grid of cells (SPEC 7.2), so at most 16 digits


def place(n_images: int, n: int, size: int, canvas: int, placement: str, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners (top, left), each (N, n) int64, of n digits of side `size` on a canvas. random: uniform
    anywhere inside the canvas; grid: n distinct cells of a 4 x 4 grid per image, uniform position inside the cell."""
    if placement == "random":
        return tuple(torch.randint(0, canvas - size + 1, (2, n_images, n), generator=gen))
    cell = canvas // GRID
    cells = torch.argsort(torch.rand(n_images, GRID * GRID, generator=gen), dim=1)[:, :n]
    jitter = torch.randint(0, cell - size + 1, (2, n_images, n), generator=gen)
    return (cells // GRID) * cell + jitter[0], (cells % GRID) * cell + jitter[1]


def multidigits(digits, labels, n_images: int, n: int, size: int, canvas: int, placement: str, gen) -> ImageSet:
    """MultiDigits (paper 3.1): n digits of side `size` (random or grid placement); targets["digit"] = the first digit's
    class, multi_hot = the set of classes present."""
    pick = torch.randint(0, len(digits), (n_images, n), generator=gen)
    top, left = place(n_images, n, size, canvas, placement, gen)
    boxes = [(size, top[:, k], left[:, k]) for k in range(n)]
    return compose(digits, labels, pick, boxes, canvas, {"digit": labels[pick[:, 0]]})


def two_sizes(digits, labels, n_images: int, small: int, large: int, canvas: int, gen) -> ImageSet:
    """Modified MultiDigits (paper 4.3): one digit of side `small` and one of side `large`, each at a random place
    (they may overlap, as the reference re-implementation). targets small / large."""
    pick = torch.randint(0, len(digits), (n_images, 2), generator=gen)
    sizes = {"small": small, "large": large}
    pos = {k: [c[:, 0] for c in place(n_images, 1, s, canvas, "random", gen)] for k, s in sizes.items()}
    boxes = [(s, *pos[k]) for k, s in sizes.items()]
    targets = {"small": labels[pick[:, 0]], "large": labels[pick[:, 1]]}
    return compose(digits, labels, pick, boxes, canvas, targets, positions=pos)


DIGIT_ON_OFFSETS = (0.15, 0.45, 0.75)  # colab digits_on_tf_flowers.ipynb: pads int(224 * r) on both axes


def digit_on(base, base_labels, digits, digit_labels, assign: torch.Tensor, size: int, composite: str) -> ImageSet:
    """DigitOnX (paper 4.1): image i of base (uint8 (N, 3, S, S)) with digit assign[i] tiled at the 9 places
    (int(S * r), int(S * r')) by addition (clipped) or element-wise max over the 3 channels. targets base, digit."""
    N, S = base.shape[0], base.shape[-1]
    corners = [int(S * r) for r in DIGIT_ON_OFFSETS]
    if corners[-1] + size > S:
        raise ValueError(f"a {size} px digit at offset {corners[-1]} leaves the {S} px image; lower --digit-size to "
                         f"<= {S - corners[-1]}")  # fmt: skip
    layer, patches = torch.zeros(N, S, S), resize_digits(digits[assign], size)
    for y in corners:
        for x in corners:
            tile = layer[:, y : y + size, x : x + size]
            tile.copy_(torch.maximum(tile, patches))
    out = base.float() + layer[:, None] if composite == "add" else torch.maximum(base.float(), layer[:, None])
    images = out.clamp(0, 255).round().to(torch.uint8)
    return ImageSet(images, {"base": base_labels, "digit": digit_labels[assign], "digit_id": assign})


def build_sets(args: Args) -> tuple[ImageSet, dict[str, tuple[ImageSet, ImageSet]]]:
    """The training set of args.dataset and the probe sets {target: (probe train, probe test)}, generated from seeds
    derived from --data-seed (train, probe train and probe test differ)."""
    g = [torch.Generator().manual_seed(args.data_seed * 10 + k) for k in range(3)]  # train, probe train, probe test

    def only(part: ImageSet, target: str, key: str = "") -> ImageSet:  # a probe set with the one target it tests
        return ImageSet(part.images, {target: part.targets[key or target]})

    if args.dataset.startswith("multidigits"):
        (dtr, ltr), (dte, lte) = digit_split(args, True), digit_split(args, False)
        ntr, nte = args.train_size or len(dtr), args.test_size or len(dte)
        if args.dataset == "multidigits":
            train = multidigits(dtr, ltr, ntr, args.num_digits, args.digit_size, args.canvas, args.placement, g[0])
            sizes = {"digit": args.digit_size}
        else:
            train = two_sizes(dtr, ltr, ntr, args.digit_size, args.large_size, args.canvas, g[0])
            sizes = {"small": args.digit_size, "large": args.large_size}
        probes = {  # paper 3.1 / 4.3: linear classifiers on images with a single digit of each size on the canvas
            name: tuple(only(multidigits(d, lab, n, 1, s, args.canvas, "random", gen), name, "digit")
                        for d, lab, n, gen in ((dtr, ltr, ntr, g[1]), (dte, lte, nte, g[2])))
            for name, s in sizes.items()
        }  # fmt: skip
        return train, probes
    (btr, ytr), (bte, yte) = base_split(args, True), base_split(args, False)
    ntr, nte = min(args.train_size or len(btr), len(btr)), min(args.test_size or len(bte), len(bte))
    btr, ytr, bte, yte = btr[:ntr], ytr[:ntr], bte[:nte], yte[:nte]
    if args.dataset == "digit_on":
        (dtr, ltr), (dte, lte) = digit_split(args, True), digit_split(args, False)
        if not 1 <= args.unique_digits <= len(dtr):
            raise ValueError(f"--unique-digits must be in 1..{len(dtr)} (the digit training split), got "
                             f"{args.unique_digits}")  # fmt: skip
        # each base image gets one of the first U training digits (colab: the first 16), every one of them used;
        # the probes put digits drawn from the whole split on their base images
        assign = (torch.arange(ntr) % args.unique_digits)[torch.randperm(ntr, generator=g[0])]
        train = digit_on(btr, ytr, dtr, ltr, assign, args.digit_size, args.composite)
        tr, te = (digit_on(b, y, d, lab, torch.randint(0, len(d), (len(b),), generator=gen), args.digit_size,
                           args.composite) for b, y, d, lab, gen in ((btr, ytr, dtr, ltr, g[1]),
                                                                     (bte, yte, dte, lte, g[2])))  # fmt: skip
        return train, {t: (only(tr, t), only(te, t)) for t in ("digit", "base")}
    # RandBit (paper 4.1): a random integer in [0, 2^bits) per image as its binary digits (N, bits) 0/1, bit i =
    # (integer >> i) & 1 (colab randbits_mnist.ipynb); plain: 0 bits. The probe trains on the training images with
    # their own bits (the colab's online classifier sees the same images), and tests on held-out images, fresh bits.
    bits = args.bits if args.dataset == "randbit" else 0
    train, test = (ImageSet(b, {"rgb": y}, bits=(torch.randint(0, 2**bits, (len(b),), generator=gen)[:, None]
                   >> torch.arange(bits)) & 1) for b, y, gen in ((btr, ytr, g[0]), (bte, yte, g[2])))  # fmt: skip
    return train, {"rgb": (train, test)}


def make_augment(args: Args) -> common.BatchedAugment:
    """The view of the RGB channels, (B, 3, S, S) in [0, 1]: crop-and-resize only for the MultiDigits sets (paper 3.1 /
    4.3) and for --augment crop (the colab's crop, area (0.5, 1)); else SimCLR's view."""
    multi = args.dataset.startswith("multidigits")
    if multi or args.augment == "crop":
        kw = dict(scale=(args.crop_min_scale if multi else 0.5, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur=False)
    else:
        kw = dict(scale=(args.crop_min_scale, 1.0), jitter_strength=args.jitter_strength)
    return common.BatchedAugment("simclr", input_size(args), **kw)


# ======================================================================================================================
# Training objective and linear probe
# ======================================================================================================================


def train_batches(data: ImageSet, augment, epoch: int, start_step: int, seed: int, info, per_rank: int):
    """This rank's batches of one epoch from step start_step on: (indices (B,), network input (2B, 3 + n_bits, S, S),
    view-1 rows then view-2 rows). The order is common.epoch_indices (seeded by (seed, epoch)), so a resumed run sees
    the batches it would have seen. Only the RGB channels are augmented (independently per view); the bit channels
    are appended unchanged, so both views of an image carry the same bits (paper 4.1)."""
    idx = common.epoch_indices(len(data.images), epoch, seed, info.rank, info.world_size, per_rank)
    for b in idx[start_step * per_rank :].to(data.images.device).split(per_rank):
        bits = None if data.bits is None else data.bits[b]
        yield b, torch.cat([model_input(with_bits(augment(data.images[b]), bits)) for _view in range(2)])


def training_losses(model, x: torch.Tensor, targets, args: Args, generator=None) -> dict:
    """One step's terms on x (2B, 3 + n_bits, S, S), the two views of B images: the generalized loss on z, or for
    --objective supervised {"supervised", "total"}: cross-entropy on targets (B,), binary on multi-hot (B, 10)."""
    with common.autocast(x.device, args.amp):
        out = model(x)
    if args.objective == "supervised":
        logits, both = out["logits"].float(), torch.cat([targets, targets])
        loss = F.binary_cross_entropy_with_logits(logits, both) if both.ndim == 2 else F.cross_entropy(logits, both)
        return {"supervised": loss, "total": loss}
    z1, z2 = out["z"].chunk(2)
    return generalized_contrastive_loss(z1, z2, args, generator)


def eval_batches(args: Args, split: str, batch_size: int, device, target: str = "", probes: dict | None = None):
    """eval_probe.py's hook for datasets only this file builds (also the end-of-training probe's, on `probes`):
    un-augmented batches of the "train" or "test" probe set of `target` (default: the first: digit, small or rgb) ->
    (images float (B, 3 [+ n_bits], S, S) in [0, 1], the model's input format (with_bits), labels (B,))."""
    probes = probes or build_sets(args)[1]
    target = target or next(iter(probes))
    part = probes[target][0 if split == "train" else 1]
    for s in range(0, len(part.images), batch_size):
        bits = None if part.bits is None else part.bits[s : s + batch_size].to(device)
        x = with_bits(common.to_float_rgb(part.images[s : s + batch_size].to(device)), bits)
        yield x, part.targets[target][s : s + batch_size].to(device)


def linear_probe(train_x, train_y, test_x, test_y, epochs: int, seed: int = 0, num_classes: int = 10) -> float:
    """Test accuracy of a linear classifier on frozen features, GCRL protocol (eval_probe.py --linear-protocol gcrl):
    AdamW lr 0.01, wd 1e-4, batch 512, `epochs` epochs, constant lr, no augmentation. Seeded; global RNG untouched."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    opt = torch.optim.AdamW(head.parameters(), lr=0.01, weight_decay=1e-4)
    n, B = train_x.shape[0], min(512, train_x.shape[0])
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=g)[: n // B * B].view(-1, B).to(train_x.device):
                loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return (head(test_x).argmax(1) == test_y).float().mean().item()


def monitors(model: nn.Module, probes: dict, args: Args, step: int, run_dir: str) -> dict:
    """At the end of training: the linear-probe accuracy of h for every target of the probe sets ("probe/<target>")
    and, with --probe-untrained, of the same architecture untrained (seeded; "probe_untrained/<target>"); probe.json."""
    device = next(common.unwrap(model).parameters()).device
    nets = {"probe/": model}
    if args.probe_untrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            nets["probe_untrained/"] = build_model(args).to(device)
    result = {}
    for prefix, net in nets.items():
        for name in probes:  # (features, labels) of the probe's train and test sets
            (ftr, ytr), (fte, yte) = [[torch.cat(t) for t in zip(*((features(net, x), y) for x, y in
                                      eval_batches(args, split, 500, device, name, probes)))]
                                      for split in ("train", "test")]  # fmt: skip
            classes = int(max(ytr.max(), yte.max())) + 1
            result[prefix + name] = linear_probe(ftr, ytr, fte, yte, args.probe_epochs, args.seed, classes)
    with open(os.path.join(run_dir, "probe.json"), "w") as f:
        json.dump({"step": step, **result}, f, indent=2)
    return result


def build_optimizer(model: nn.Module, args: Args) -> tuple[torch.optim.Optimizer, float]:
    """LARS with square-root lr scaling (paper A.1; biases and norms get neither decay nor adaptation) or Adam (the
    colab). Returns (optimizer, peak lr)."""
    groups = common.param_groups(model, args.weight_decay)
    if args.optimizer == "lars":
        lr = args.base_lr * math.sqrt(args.batch_size)
        return common.LARS(groups, lr=lr, momentum=args.momentum), lr
    return torch.optim.Adam(groups, lr=args.base_lr), args.base_lr


def check_args(args: Args) -> None:
    """Clear one-line errors for settings that cannot work (the range of each flag: common.parse_args)."""
    if not 0 <= args.bits <= 62:
        raise ValueError(f"--bits must be in 0..62 (one int64 per image), got {args.bits}")
    if args.bits and args.dataset != "randbit":
        raise ValueError("--bits only applies to --dataset randbit")
    if args.dataset == "multidigits" and not 1 <= args.num_digits <= GRID * GRID:
        raise ValueError(f"--num-digits must be in 1..{GRID * GRID}, got {args.num_digits}")
    if args.dataset == "multidigits" and args.placement == "grid" and args.digit_size > args.canvas // GRID:
        raise ValueError(f"--digit-size {args.digit_size} does not fit a grid cell of {args.canvas // GRID} px "
                         f"(--canvas {args.canvas} / {GRID}); lower it or use --placement random")  # fmt: skip
    if args.dataset.startswith("multidigits") and max(args.digit_size, args.large_size) > args.canvas:
        raise ValueError(f"digits larger than the --canvas {args.canvas}")
    if args.arch == "convnet" and input_size(args) < 15:
        raise ValueError("the convnet needs inputs of >= 15 px")


# ======================================================================================================================
# Presets and the training loop
# ======================================================================================================================

# Values a named group sets unless given on the command line (printed at startup, saved in args.json).
PRESETS = {
    # digit_on: 9 digits must fit; 8 px digits at 32 px (the colab: 28 px digits at 224). The dataset's entry comes
    # first: it wins over the preset's sizes.
    "dataset": {"digit_on": dict(digit_size=8, image_size=32)},
    "preset": {
        "paper": {},  # the dataclass defaults are paper A.1's CIFAR-scale setup
        # CPU runs (nothing here is a recommendation): the colab's ConvNet, Adam 1e-3 (randbits_mnist.ipynb), small
        # generated sets, procedural digits (the machine has no MNIST), half-size MultiDigits canvases.
        "tiny": dict(arch="convnet", optimizer="adam", base_lr=1e-3, warmup_epochs=0, weight_decay=0.0, batch_size=256,
                     epochs=5, base="fashion_mnist", digits="drawn", image_size=28, canvas=56, digit_size=10,
                     large_size=20, train_size=5000, test_size=2000, temperature=0.2, log_every=10, probe_epochs=50),
    },
}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in STUDIES:  # `contrastive_props.py <study> ...`: the paper's studies (below)
        return run_study(argv[0], argv[1:])
    args = common.parse_args(Args, argv, PRESETS)
    with common.usage_errors(METHOD):  # bad input: one line, no traceback
        check_args(args)
    # --- boilerplate: ranks, seeds, data (generated on the fly, seeded), model, optimizer, resume
    info = common.setup_distributed(args.device)
    common.seed_everything(args.seed + info.rank)
    run_dir = os.path.join(args.output_dir, args.run_name or common.default_run_name(METHOD, args))
    with common.usage_errors(METHOD):
        per_rank = common.batch_per_rank(args.batch_size, info.world_size)
        t0 = time.perf_counter()
        train_set, probes = build_sets(args)
        common.epoch_indices(len(train_set.images), 0, args.seed, info.rank, info.world_size, per_rank)  # batch <= data
    source = DIGIT_SOURCES[args.digits] if args.dataset in ("multidigits", "multidigits_size", "digit_on") else None
    common.print0(f"{args.dataset}: {len(train_set.images)} training images {tuple(train_set.images.shape[1:])}"
                  + (f", digits from {source}" if source else f", base {args.base}")
                  + f", probes {list(probes)} (generated in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    dev = info.device
    data = ImageSet(train_set.images.to(dev), {}, bits=None if train_set.bits is None else train_set.bits.to(dev))
    targets = train_set.multi_hot if train_set.multi_hot is not None else next(iter(train_set.targets.values()))
    targets, augment = targets.to(dev), make_augment(args)
    model = common.distribute(build_model(args), info, args.compile)
    common.seed_everything(args.seed + info.rank)  # the views' stream starts at the seed, whatever the init drew
    optimizer, peak_lr = build_optimizer(common.unwrap(model), args)
    steps_per_epoch = len(train_set.images) // args.batch_size
    total_steps, warmup_steps = max(args.epochs * steps_per_epoch, args.steps), args.warmup_epochs * steps_per_epoch
    with common.usage_errors(METHOD):  # a missing --resume PATH, another method's or architecture's checkpoint
        stop_step = common.stop_at(args, total_steps)
        step = common.resume(args.resume, run_dir, METHOD, model, optimizer, info, stop_step)
    notes = {"digit_source": source}
    logger = common.RunLogger(
        run_dir, args, info, 0.0, stop_step, step, method=METHOD, steps_per_epoch=steps_per_epoch, notes=notes
    )
    what = args.loss if args.objective == "contrastive" else "supervised"
    common.print0(f"{METHOD} {args.arch} on {args.dataset}, {what}: {info.world_size} x {per_rank} images/step, "
                  f"{steps_per_epoch} steps/epoch, {args.optimizer} peak lr {peak_lr:.3g}, steps {step} -> "
                  f"{stop_step}")  # fmt: skip

    # --- the training loop (THE PART TO READ is generalized_contrastive_loss above)
    model.train()
    epoch, final = step // steps_per_epoch, {}
    while step < stop_step:
        for b, x in train_batches(data, augment, epoch, step % steps_per_epoch, args.seed, info, per_rank):
            common.set_lr(optimizer, lr := common.cosine_lr(step, total_steps, warmup_steps, peak_lr))
            # W and the prior samples of the SWD losses: the same on every rank and after a resume
            gen = torch.Generator(dev).manual_seed(args.seed * 1_000_003 + step)
            terms = training_losses(model, x, targets[b], args, gen)
            logger.check_finite(step, terms)  # a non-finite loss stops the run before it reaches a checkpoint
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            step += 1
            last = step >= stop_step
            # --- logging, checkpoints (boilerplate)
            final.update(logger.step(step, terms, lr, step / steps_per_epoch, args.batch_size))
            with logger.paused():  # images/s counts training time only
                logger.checkpoint(step, last, model, optimizer, epoch)
            if last:
                break
        epoch += 1
    # --- the study's measurement: linear probes of the frozen representation (and of the untrained network)
    if args.probe_epochs > 0:
        final.update(common.run_monitors(step, lambda: monitors(model, probes, args, step, run_dir), logger, info))
    logger.close()
    common.cleanup_distributed()
    return {**final, "step": step}


# ======================================================================================================================
# Studies (paper sections 3-4, Appendix B): one sub-command each, a fresh model per point, CSV + PNG
# ======================================================================================================================


@dataclass
class StudyArgs:
    """A study of the paper at a chosen scale: trains one model per point (or skips a point already in the CSV;
    an interrupted point resumes from its run folder), probes it and its untrained twin, appends the rows to
    <out>/<study>.csv and draws <out>/<study>.png (matplotlib, when installed)."""

    scale: str = common.arg(
        "tiny", "tiny (2-core CPU, minutes: ConvNet, small sets) | paper (GPU, ResNet-18)", ["tiny", "paper"]
    )
    out: str = common.arg("results", "folder of <study>.csv, <study>.png and the runs/ of every point")
    values: str = common.arg("", "comma-separated values of the swept variable ('' = the scale's default sweep)")
    temperatures: str = common.arg("", "comma-separated NT-Xent temperatures ('' = the scale's default)")
    losses: str = common.arg("", "comma-separated losses (losses / randbit studies; '' = the scale's default)")
    steps: int = common.arg(0, "training steps per point (0 = the scale's default; paper scale: whole epochs)")
    seed: int = common.arg(0, "training seed of every point")
    train_args: str = common.arg("", 'extra training flags of every point, e.g. "--digits fashion_mnist --device cuda"')


CSV_COLUMNS = ["study", "scale", "method", "temperature", "variable", "value", "target", "accuracy", "untrained",
               "steps", "wall_s", "run"]  # fmt: skip

# Per study: the swept Args field, the x axis, the paper's figure, the methods (default NT-Xent temperatures; a
# supervised baseline), and per scale the default sweep and the training flags of every point. tiny: minutes on 2 CPU
# cores, `steps` per point, nothing tuned; paper: the paper's setup (sections 3-4: ResNet-18, 2-layer head, LARS) for
# GPUs, whole epochs, where the text still has its numbers. The losses study sweeps steps (tiny) or epochs (paper).
STUDY_SPECS = {
    "losses": dict(variable="steps", x="training steps", figure="Figure 1 / Table A.1",
        tiny=([40, 160], "--dataset plain --train-size 10000 --test-size 2000"),
        paper=([100, 200, 400, 800], "--dataset plain --base cifar10 --batch-size 128")),
    "multidigits": dict(variable="num_digits", x="digits per training image", figure="Table 3", steps=60,
        supervised=True, tiny=([1, 4, 16], "--dataset multidigits --train-size 4000 --test-size 1000"),
        paper=([1, 2, 4, 8, 12, 16], "--dataset multidigits --epochs 100")),
    "suppression-size": dict(variable="large_size", x="side of the second digit (px)", figure="Table 4", steps=60,
        supervised=True, temperatures=[0.1, 0.5],
        tiny=([10, 20, 40], "--dataset multidigits_size --batch-size 128 --train-size 4000 --test-size 1000"),
        paper=([20, 30, 40, 50, 60, 70, 80], "--dataset multidigits_size --batch-size 1024 --epochs 100")),
    "digit-on": dict(variable="unique_digits", x="unique digits U", log_x=True, figure="Figure 6", steps=80,
        tiny=([1, 100, 5000], "--dataset digit_on --train-size 5000 --test-size 2000"),
        paper=([1, 10, 100, 1000, 10000, 60000],
               "--dataset digit_on --base stl10 --image-size 64 --digit-size 16 --epochs 100")),
    "randbit": dict(variable="bits", x="random bits", figure="Figure 7", steps=80, temperatures=[0.1, 0.5],
        tiny=([0, 2, 8, 16], "--dataset randbit --train-size 5000 --test-size 2000"),
        paper=([0, 1, 2, 4, 8, 16, 24], "--dataset randbit --base cifar10 --epochs 100")),
}  # fmt: skip
STUDIES = tuple(STUDY_SPECS)


def study_points(study: str, sa: StudyArgs) -> list[tuple[dict, list[str]]]:
    """(CSV key, training argv) of every point of a study, in the order they run."""
    spec, scale = STUDY_SPECS[study], sa.scale
    values, flags = spec[scale]
    values = [int(v) for v in sa.values.split(",") if v.strip()] or values
    temps = [float(t) for t in sa.temperatures.split(",") if t.strip()] or spec.get("temperatures", [0.2])
    # the losses study compares the five losses at their defaults; randbit: Appendix B.1, other losses suppress too
    losses = [v for v in sa.losses.split(",") if v.strip()] if study in ("losses", "randbit") else []
    losses = losses or (LOSSES if study == "losses" else ["ntxent"])
    methods = [(loss, t) for loss in losses for t in (temps if loss == "ntxent" and study != "losses" else [None])]
    methods += [("supervised", None)] if spec.get("supervised") else []
    # the losses study sweeps the steps (tiny) or epochs (paper) of training
    flag = ("--steps" if scale == "tiny" else "--epochs") if study == "losses" else f"--{spec['variable']}"
    steps = 0 if study == "losses" else sa.steps or (spec["steps"] if scale == "tiny" else 0)
    base = ["--preset", scale, *flags.split(), "--seed", str(sa.seed), "--probe-untrained", "--output-dir",
            os.path.join(sa.out, "runs")]  # fmt: skip
    points = []
    for method, t in methods:
        name = "simclr" if method == "ntxent" and study != "losses" else method
        for placement in ["random", "grid"] if study == "multidigits" else [None]:
            label, tag = (f"{name} ({placement})", f"{name}_{placement}") if placement else (name, name)
            tag += f"_t{t:g}" if t is not None else ""
            for v in values:
                run = f"{study}_{scale}_{tag}_{spec['variable']}{v}_s{sa.seed}"
                argv = base + (["--objective", "supervised"] if method == "supervised" else ["--loss", method])
                argv += (["--temperature", str(t)] if t is not None else []) + [flag.replace("_", "-"), str(v)]
                argv += (["--steps", str(steps)] if steps else []) + (["--placement", placement] if placement else [])
                key = {"study": study, "scale": scale, "method": label, "temperature": "" if t is None else t,
                       "variable": spec["variable"], "value": v, "run": run}  # fmt: skip
                points.append((key, argv + ["--run-name", run] + sa.train_args.split()))
    return points


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_study(study: str, argv: list[str]) -> list[dict]:
    """Run (or continue) a study: points already in <out>/<study>.csv are skipped; returns all rows of the CSV."""
    sa = common.parse_args(StudyArgs, argv)
    os.makedirs(sa.out, exist_ok=True)
    path, is_main = os.path.join(sa.out, study.replace("-", "_")), os.environ.get("RANK", "0") == "0"
    done = {r["run"] for r in read_rows(path + ".csv")}
    points = study_points(study, sa)
    print(f"{study} ({STUDY_SPECS[study]['figure']}), scale {sa.scale}: {len(points)} points, "
          f"{sum(k['run'] in done for k, _ in points)} already in {path}.csv")  # fmt: skip
    for i, (key, train_argv) in enumerate(points):
        if key["run"] in done:
            continue
        print(f"[{i + 1}/{len(points)}] {key['method']} t={key['temperature']} {key['variable']}={key['value']}")
        t0 = time.perf_counter()
        result = main(train_argv)
        rows = [{**key, "target": k.split("/")[1], "accuracy": round(v, 4), "steps": result["step"],
                 "untrained": round(result.get(f"probe_untrained/{k.split('/')[1]}", float("nan")), 4),
                 "wall_s": round(time.perf_counter() - t0, 1)}
                for k, v in result.items() if k.startswith("probe/")]  # fmt: skip
        if is_main:  # under torchrun every rank trains; rank 0 writes one run's rows at once (a killed sweep leaves
            with open(path + ".csv", "a", newline="") as f:  # whole points)
                writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
                if f.tell() == 0:
                    writer.writeheader()
                writer.writerows(rows)
    rows = read_rows(path + ".csv")
    if is_main:
        for r in [dict(zip(CSV_COLUMNS, CSV_COLUMNS)), *rows]:  # the table: method .. wall_s
            print(" ".join(f"{r[c]:>{len(c)}}" for c in CSV_COLUMNS[2:11]))
        plot_study(study, rows, path + ".png")
    return rows


def plot_study(study: str, rows: list[dict], path: str) -> bool:
    """Accuracy vs the swept variable, one panel per probe target, one line per method / temperature, the untrained
    network dashed (as Figure 7's random-network line). Returns False (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {path} not drawn (pip install matplotlib, then rerun the same command: "
              f"finished points are read from the CSV)")  # fmt: skip
        return False
    spec = STUDY_SPECS[study]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        sel = [r for r in rows if r["target"] == target]
        for label in dict.fromkeys((r["method"], r["temperature"]) for r in sel):
            pts = sorted((float(r["value"]), float(r["accuracy"])) for r in sel
                         if (r["method"], r["temperature"]) == label)  # fmt: skip
            ax.plot(*zip(*pts), marker="o", label=label[0] + (f", t={label[1]}" if label[1] else ""))
        xs = sorted({float(r["value"]) for r in sel})
        untrained = [[float(r["untrained"]) for r in sel if float(r["value"]) == x] for x in xs]
        ax.plot(xs, [sum(u) / len(u) for u in untrained], "k--", label="untrained network")
        ax.set_xscale("log" if spec.get("log_x") else "linear")
        ax.set(xlabel=spec["x"], ylabel=f"linear probe accuracy ({target})", title=f"{study}: {target}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{study} (paper {spec['figure']}), scale {rows[0]['scale'] if rows else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return True


if __name__ == "__main__":
    main()
