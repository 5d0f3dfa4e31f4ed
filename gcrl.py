"""GCRL: hybrid generative-contrastive representation learning (Kim, Kim, Lee 2021, arXiv:2106.06162), written from
the paper alone (the authors' code, github.com/kakaobrain/gcrl, was announced but never published).

What is implemented (SPEC section 5; paper 3.1-3.2, 4.1, Figure 1 (encoder / decoder), Tables 1-3, App. Algorithm 1):
  * iGPT's pixel tokens (common.py section 3): a 512-color k-means palette of training pixels (fit on rank 0,
    cached as <run>/palette.npy) or --palette (e.g. iGPT's kmeans_centers.npy, as GCRL 3.2), raster order;
  * the token transformer of GCRL 3.2: token embedding + learned SOS + row + column positions, pre-LN blocks (eq. 4)
    with axial attention (row, causal column, shifted down, causal row; ONE set of weights per block, App. Algorithm 1)
    or --attention dense, dropout 0.1, 8 heads; the ENCODER is the first --enc-blocks (half), the DECODER the rest;
  * a weak view (iGPT's reflect-pad 4 + crop + flip, GCRL 4.1) and a strong view (Table 2: RandomResizedCrop (0.2, 1),
    ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, flip), batched on the device. Both go through the causal
    encoder as one batch -> GAP(LN(.)) -> projection head (2-layer MLP with LayerNorm, hidden 1024, output 64 CIFAR /
    128 ImageNet32, GCRL 4.1) -> NT-Xent (eq. 3, negatives gathered WITH gradients from every rank); only the weak
    view continues through the decoder -> LN -> palette logits -> autoregressive NLL (eq. 2);
  * L = alpha * L_g + beta * L_c (eq. 1), alpha = beta = 1; the first --gen-only-epochs (default half, GCRL 4.1) train
    L_g alone. Table 3 gives two peak lrs per run (CIFAR (5+5)M: 1.6e-3 / 4.8e-4): each phase has its own 5-epoch warmup
    + cosine (--gen-base-lr, then --base-lr). AdamW, wd 1e-4 (none on LayerNorm, biases, embeddings, SOS, positions),
    gradient clipping 1.0 (GCRL 4.1). Table 4's baselines on the SAME architecture: --beta 0 is iGPT, --alpha 0
    --enc-blocks <depth> is SimCLR (one phase each); --enc-blocks with --alpha / --beta is Table 7's ablation;
  * representation: GAP(LN(encoder output)) = the projection head's input (GCRL 4.1); features(layer=i) per block;
    log_likelihood for the OOD score of Table 6. Monitors: bits per palette token (GCRL's "bpd" in the quantized space,
    not 8-bit bits/dim, SPEC 1.4), kNN, sample grids.

Launch:
    python gcrl.py --preset tiny --epochs 1                          # CPU smoke run (synthetic shapes at 8x8)
    python gcrl.py [--palette kmeans_centers.npy]                    # CIFAR-10, (5+5)M, 200 + 200 epochs (Table 3)
    torchrun --nproc_per_node 8 gcrl.py --preset imagenet32          # ImageNet32 (5+5)M; imagenet32_38_38: (38+38)M
    python gcrl.py --beta 0 --epochs 200                             # iGPT 10M baseline, same file (Table 3)
    python gcrl.py --alpha 0 --enc-blocks 12 --epochs 400            # SimCLR 10M on the token transformer (Table 3)
    python eval_probe.py --ckpt runs/<run>/checkpoint.pt --protocols linear,knn,ood --ood-dataset svhn

Deviations from the paper, and choices where it is silent:
  * L_g is the MEAN NLL per token (nats), not eq. 2's sum over an image's tokens: with the sum and alpha = beta = 1,
    L_c would weigh ~1/2000 of L_g, which Table 7's (alpha, beta) sweep rules out; iGPT's code also averages. As in
    iGPT all L tokens are predicted (token 0 from SOS); eq. 2 starts at k = 2.
  * NT-Xent temperature, not stated: 0.5, the SimCLR CIFAR-10 recipe GCRL says it follows (--tau).
  * the encoder is causal (the first half of an autoregressive stack) for both views, so a view's pooled
    representation never sees its last token (input [SOS, t_0 .. t_{L-2}]), as in iGPT's features.
  * Table 3's merged ImageNet32 cells read as batch 1024 (5+5)M / 768 (38+38)M, 50 + 50 epochs, peak lr 4.0e-4 in
    both phases. The paper fine-tunes its CIFAR (38+38)M model from ImageNet32 for 15 epochs: no preset here (use
    --resume with another run's checkpoint and --epochs). AdamW's moments carry over into the hybrid phase (the
    paper does not say); only the lr schedule restarts.
  * as igpt.py: LayerNorm and exact GELU (common.Block), not iGPT's RMS norm / GELU approximation; GPT-2 init, zero
    output head; dropout 0.1 also in the MLP, none on attention; AdamW betas (0.9, 0.999) (GCRL states none).
  * features(layer=i): iGPT's convention (LayerNorm without parameters, mean over positions) for every block;
    features(layer=None) uses the contrastive branch's trained LayerNorm: exactly the projection head's input.

Measured (2-core CPU, fp32; README.md "gcrl.py" has the commands, stds, ECE, kNN, OOD and throughput): Table 4 at CPU
scale (Fashion-MNIST 8x8, tiny model, 500 steps x 32, seeds 0-2), mean linear probe / test bits per token: GCRL 0.654 /
5.43, iGPT 0.696 (half), 0.725 (last) / 5.04, SimCLR 0.558, untrained 0.476 / 9: of Table 4's order only GCRL > SimCLR.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "gcrl"

# (width, depth, heads) of the token transformer; the encoder is the first --enc-blocks (default depth // 2).
GCRL_ARCHS = {
    "gcrl_tiny": (64, 4, 4),  # CPU tests and smoke runs (not from the paper): 2 + 2 blocks
    "gcrl_5_5": (256, 12, 8),  # GCRL Table 1: (5+5)M, 12 blocks, 6 in the encoder; 3.2: 8 heads (width: SPEC 5)
    "gcrl_38_38": (512, 24, 8),  # GCRL Table 1: (38+38)M, 24 blocks, 12 in the encoder (iGPT-S width 512)
}


@dataclass
class Args:
    """GCRL: L = alpha L_g + beta L_c on one autoregressive token transformer (encoder + decoder); defaults: Table 3,
    CIFAR-10, (5+5)M (batch 512, 200 generative + 200 hybrid epochs, peak lr 1.6e-3 / 4.8e-4)."""

    # --- experiment
    run_name: str = common.arg("", "run folder name under --output-dir (default: gcrl_<dataset>_<arch>_s<seed>)")
    output_dir: str = common.arg("runs", "where run folders are written")
    seed: int = common.arg(0, "random seed (each rank adds its rank); also seeds the palette fit and the samples")
    device: str = common.arg("auto", "auto (CUDA when available) | cuda | cpu")
    resume: str = common.arg("auto", "auto = continue <run>/checkpoint.pt when present; a path; '' = start fresh")
    steps: int = common.arg(0, "stop after this many optimizer steps (0 = all epochs; the schedule spans all epochs)")
    # --- data
    dataset: str = common.arg("cifar10", f"an in-memory dataset of <= 64 px: one of {', '.join(common.DATASET_NAMES)}")
    data_root: str = common.arg("data", "dataset root folder")
    download: bool = common.arg(False, "download the dataset when torchvision can")
    synthetic_size: int = common.arg(0, "images per split of the synthetic dataset (0 = common.py's default)")
    image_size: int = common.arg(32, "image side in pixels = tokens per row (GCRL: 32, i.e. 1024 tokens)")
    augment: str = common.arg("weak", "generative view: weak (pad + crop + flip, GCRL 4.1) | none", ["weak", "none"])
    weak_pad: int = common.arg(4, "reflect padding of the weak view (GCRL 4.1 / iGPT: 4 at 32 px)")
    num_workers: int = common.arg(8, "DataLoader workers per rank for datasets not kept on the device")
    # --- model
    preset: str = common.arg("cifar", "a named group of defaults (see PRESETS)",
                             ["cifar", "imagenet32", "imagenet32_38_38", "tiny"])  # fmt: skip
    arch: str = common.arg("gcrl_5_5", "token transformer (width x depth, heads): " + ", ".join(
        f"{k} {w}x{d}/{h}" for k, (w, d, h) in GCRL_ARCHS.items()), list(GCRL_ARCHS))  # fmt: skip
    enc_blocks: int = common.arg(0, "blocks in the encoder (0 = half, GCRL; = depth: loss on the last block, Table 7)")
    attention: str = common.arg("axial", "axial (GCRL App. Alg. 1) | dense (causal, full sequence)", ["axial", "dense"])
    dropout: float = common.arg(0.1, "dropout before every residual connection (GCRL 4.1: 0.1)")
    num_colors: int = common.arg(512, "palette size K = vocabulary (iGPT: 512); from the file when --palette is given")
    palette: str = common.arg("", "palette .npy (K, 3) in [-1, 1] (iGPT's kmeans_centers.npy); '' = fit k-means")
    palette_pixels: int = common.arg(250_000, "random training pixels the k-means palette is fitted on (minGPT: 250k)")
    kmeans_iters: int = common.arg(20, "k-means iterations of the palette fit")
    proj_hidden: int = common.arg(1024, "projection head hidden width (GCRL 4.1: 1024)")
    proj_dim: int = common.arg(0, "projection head output (0 = auto: 128 for imagenet32/64, else 64; GCRL 4.1)")
    # --- optimization
    epochs: float = common.arg(400, "epochs of both phases (GCRL Table 3, CIFAR (5+5)M: 200 + 200); may be fractional")
    gen_only_epochs: float = common.arg(-1, "epochs of L_g alone first (-1 = half (GCRL 4.1); all when --beta 0; "
                                        "0 when --alpha 0)", interval="[-1, inf)")  # fmt: skip
    batch_size: int = common.arg(512, "GLOBAL batch (2 views each), split over ranks (GCRL Table 3, CIFAR: 512)")
    gen_base_lr: float = common.arg(8e-4, "generative phase: lr per 256 images (Table 3: peak 1.6e-3 at batch 512)")
    base_lr: float = common.arg(2.4e-4, "hybrid or contrastive-only phase: lr per 256 images (Table 3: 4.8e-4 at 512)")
    gen_lr: float | None = common.arg(None, "absolute peak lr of the generative phase; overrides --gen-base-lr scaling")
    lr: float | None = common.arg(None, "absolute peak lr of the hybrid phase; overrides --base-lr scaling")
    min_lr: float = common.arg(0.0, "final learning rate of each cosine phase")
    warmup_epochs: float = common.arg(5, "linear warmup epochs at the start of each phase (GCRL 4.1: 5)")
    weight_decay: float = common.arg(1e-4, "AdamW weight decay, none on norms, biases and embeddings (GCRL 4.1: 1e-4)")
    betas: tuple[float, float] = common.arg((0.9, 0.999), "AdamW betas (GCRL states none: PyTorch defaults)")
    clip_grad: float = common.arg(1.0, "max gradient norm, 0 = off (GCRL 4.1: 1.0)")
    amp: bool = common.arg(True, "bf16 autocast for the transformer (quantization, similarities, losses stay fp32)")
    compile: bool = common.arg(False, "torch.compile the model")
    # --- logging
    log_every: int = common.arg(50, "log every N steps")
    eval_every: int = common.arg(5000, "bits per token, kNN monitor and a sample grid every N steps (and at the end)")
    ckpt_every: int = common.arg(1000, "checkpoint every N steps (and at the end)")
    keep_every: int = common.arg(0, "also keep a snapshot checkpoint-epNNNN.pt every N epochs (0 = none; MAE: 20)")
    eval_images: int = common.arg(0, "test images scored for bits per token and kNN queries (0 = the whole test split)")
    knn_bank: int = common.arg(10000, "un-augmented training images in the kNN monitor's bank; 0 disables the monitor")
    knn_k: int = common.arg(200, "neighbours of the kNN monitor (SPEC 8: 200; at most the bank size)")
    temperature: float = common.arg(1.0, "softmax temperature of the samples (GCRL Figs 6-8: 1.0, 0.99, 0.98)")
    num_samples: int = common.arg(64, "images in each sample grid (0 = no samples)")
    # --- GCRL
    alpha: float = common.arg(1.0, "weight of the generative loss L_g (GCRL 4.1: 1.0; 0 = SimCLR on this architecture)")
    beta: float = common.arg(1.0, "weight of the contrastive loss L_c (GCRL 4.1: 1.0; 0 = iGPT on this architecture)")
    tau: float = common.arg(0.5, "NT-Xent temperature (GCRL states none: SimCLR's CIFAR-10 0.5)")


# ======================================================================================================================
# Model: one autoregressive token transformer = encoder blocks + decoder blocks (GCRL Figure 1, 3.2)
# ======================================================================================================================


class GCRL(nn.Module):
    """quantizer: the palette (buffer `quantizer.centers` (K, 3)); embed: token embedding + SOS + row/column positions
    (common.PixelEmbedding); encoder: the first E pre-LN blocks; decoder: the other depth - E; enc_norm + projector:
    the contrastive branch GAP(LN(h_enc)) -> 2-layer LN MLP; norm + head: the decoder's final LayerNorm and Linear
    D -> K (untied, zero-initialized). Every block is causal in raster order with the SOS shift, so the whole stack is
    an autoregressive model: logits[:, p] depend on tokens < p only (tests/test_gcrl.py)."""

    def __init__(self, args: Args):
        super().__init__()
        dim, depth, heads = GCRL_ARCHS[args.arch]
        H = W = args.image_size
        self.height, self.width, self.depth = H, W, depth
        self.enc_blocks = args.enc_blocks or depth // 2
        self.causal = True  # common.sample / log_likelihood check it (igpt.py also has a BERT objective)
        self.quantizer = common.ColorQuantizer(common.grid_palette(args.num_colors))
        self.embed = common.PixelEmbedding(args.num_colors, dim, H, W)

        def blocks(n):
            return nn.ModuleList(common.Block(dim, heads, 4.0, args.dropout, attention=args.attention, grid=(H, W))
                                 for _ in range(n))  # fmt: skip

        self.encoder, self.decoder = blocks(self.enc_blocks), blocks(depth - self.enc_blocks)
        for block in (*self.encoder, *self.decoder):
            block.attn.attn_drop = 0.0  # GCRL 4.1 states dropout before residual connections only
        self.enc_norm = nn.LayerNorm(dim, eps=1e-6)  # Figure 1: LN -> GAP -> projection head
        out = args.proj_dim or (128 if args.dataset.startswith("imagenet") else 64)  # GCRL 4.1
        self.projector = common.ProjectionHead(dim, args.proj_hidden, out, num_layers=2, kind="ln")
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # Figure 1: decoder -> LN -> logits
        self.head = nn.Linear(dim, args.num_colors, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """As igpt.py: GPT-2 init of the blocks (N(0, 0.02), residual projections / sqrt(2 * depth), zero biases), the
        output head zero (the untrained model is the uniform distribution, log2 K bits per token). The projection head
        keeps PyTorch's default Linear init (it is SimCLR's MLP, not part of the transformer)."""
        for name, m in (*self.encoder.named_modules(), *self.decoder.named_modules()):
            if isinstance(m, nn.Linear):
                residual = name.endswith(("attn.proj", "mlp.fc2"))
                nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * self.depth) if residual else 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> encoder output h (B, L, D): input [SOS, t_0 .. t_{L-2}] + positions -> causal blocks."""
        if tokens.shape[1] != self.height * self.width:
            raise ValueError(f"expected {self.height}x{self.width} = {self.height * self.width} tokens per image, "
                             f"got {tokens.shape[1]}")  # fmt: skip
        h = self.embed(tokens, shift=True)
        for block in self.encoder:
            h = block(h, is_causal=True)
        return h

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """encoder output (B, L, D) -> logits over the palette (B, L, K): decoder blocks -> LN -> head."""
        for block in self.decoder:
            h = block(h, is_causal=True)
        return self.head(self.norm(h))

    def represent(self, h: torch.Tensor) -> torch.Tensor:
        """GAP(LN(h)): encoder output (B, L, D) -> (B, D), the input of the projection head and the downstream
        representation (GCRL 4.1)."""
        return self.enc_norm(h).mean(dim=1)

    def hidden_states(self, tokens: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        """Output of the first num_blocks blocks, counted over encoder then decoder (all when None), before any norm."""
        h = self.embed(tokens, shift=True)
        for block in [*self.encoder, *self.decoder][:num_blocks]:
            h = block(h, is_causal=True)
        return h

    def forward(self, tokens: torch.Tensor, keep=None, strong: torch.Tensor | None = None, generative: bool = True):
        """tokens: the weak view's tokens (B, L). Without `strong`: the generative path, -> logits (B, L, K) (bits
        per token, sampling, log-likelihood; `keep` exists for common.token_nll's signature and must be None).
        With strong-view tokens (B, L): both views through the encoder as ONE batch of 2B rows (weak first), ->
        {"z": projections (2B, P) of [weak; strong] before normalization, "logits": the decoder's logits of the
        weak view only (B, L, K), or None when generative=False (--alpha 0: the decoder is not run)}."""
        if keep is not None:
            raise ValueError("GCRL is autoregressive: there is no BERT mask")
        if strong is None:
            return self.decode(self.encode(tokens))
        h = self.encode(torch.cat([tokens, strong]))
        z = self.projector(self.represent(h))
        logits = self.decode(h[: tokens.shape[0]]) if generative else None  # only the weak view reaches the decoder
        return {"z": z, "logits": logits}


def build_model(args: Args) -> GCRL:
    """The GCRL model of `args` (also used by eval_probe.py with Args(**checkpoint["args"])); its palette is a
    placeholder until the checkpoint's (or the fitted one) is loaded into `quantizer.centers`."""
    return GCRL(args)


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, layer: int | None = None, pool: str | None = None):
    """Frozen representation for probing, in eval mode: images float (B, 3, S, S) in [0, 1] -> tokens ->
    layer=None: GAP(LN(encoder output)) with the contrastive branch's trained LayerNorm, the projection head's input
    (GCRL 4.1, "half" in Table 4); layer=i (0-based over encoder then decoder blocks): iGPT's convention, the output of
    block i -> LayerNorm without parameters -> mean over the L positions (pool "mean", the only one). -> (B, D)."""
    if (pool or "mean") != "mean":
        raise ValueError(f"unknown pool '{pool}': GCRL's representation is the mean over positions (GAP)")
    net = common.unwrap(model)
    if layer is not None and not 0 <= layer < net.depth:
        raise ValueError(f"layer {layer} out of range: the model has {net.depth} blocks (0..{net.depth - 1})")
    with common.eval_mode(net):
        tokens = common.quantize(net, images)
        if layer is None:
            return net.represent(net.encode(tokens)).float()
        h = net.hidden_states(tokens, num_blocks=layer + 1).float()
    return F.layer_norm(h, h.shape[-1:], eps=1e-6).mean(dim=1)


def num_feature_layers(model: nn.Module) -> int:
    return common.unwrap(model).depth


# eval_probe.py's unsupervised OOD hook (GCRL Table 6): log p(x) in nats of the decoder and the token embeddings it
# is differentiable in (common.py section 3, shared with igpt.py).
log_likelihood = common.log_likelihood


# ======================================================================================================================
# Loss (THE PART TO READ): L = alpha * L_g + beta * L_c (GCRL eq. 1), in two phases (GCRL 4.1)
# ======================================================================================================================


def gcrl_loss(model: nn.Module, weak: torch.Tensor, strong: torch.Tensor, args: Args, hybrid: bool) -> dict:
    """weak, strong: tokens (B, L) of the two views. hybrid=False (the generative phase, or --beta 0): only the weak
    view is encoded and decoded, L = alpha * L_g. hybrid=True: L = alpha * L_g + beta * L_c, where
      L_g = mean over the B x L weak tokens of -log p(t_p | t_<p) (nats; eq. 2 up to the per-token mean, see header),
      L_c = NT-Xent over the 2B projections (eq. 3 = common.nt_xent: normalize, tau, negatives from every rank).
    A term whose weight is 0 is not computed (no decoder under --alpha 0). Returns {"generative", "contrastive"
    (those computed), "total"}; the network runs under bf16 autocast, both losses in fp32."""
    use_g, use_c = args.alpha > 0, hybrid and args.beta > 0
    with common.autocast(weak.device, args.amp):
        out = model(weak, strong=strong, generative=use_g) if use_c else {"logits": model(weak), "z": None}
    terms = {}
    if use_g:
        terms["generative"] = common.token_cross_entropy(out["logits"], weak).mean()  # mean over B*L tokens
    if use_c:
        z = out["z"].float()
        terms["contrastive"] = common.nt_xent(z[: weak.shape[0]], z[weak.shape[0] :], args.tau)
    terms["total"] = args.alpha * terms.get("generative", 0.0) + (args.beta * terms["contrastive"] if use_c else 0.0)
    return terms


def phase_steps(args: Args, steps_per_epoch: int) -> tuple[int, int, int]:
    """(generative-phase steps, total steps, warmup steps of each phase). --gen-only-epochs -1: half of the epochs
    when both losses are on (GCRL 4.1), the whole run under --beta 0 (iGPT), none under --alpha 0 (SimCLR)."""
    gen = args.gen_only_epochs
    if gen < 0:
        gen = args.epochs if args.beta == 0 else 0 if args.alpha == 0 else args.epochs / 2
    total = round(args.epochs * steps_per_epoch)
    return min(round(gen * steps_per_epoch), total), total, round(args.warmup_epochs * steps_per_epoch)


def learning_rate(step: int, gen_steps: int, total_steps: int, warmup: int, gen_lr: float, lr: float, min_lr: float):
    """-> (lr, hybrid): warmup + cosine over [0, gen_steps) at gen_lr (L_g alone), then a fresh warmup + cosine over
    [gen_steps, total_steps) at lr (full objective): Table 3's two peak learning rates per GCRL run."""
    if step < gen_steps:
        return common.cosine_lr(step, gen_steps, min(warmup, gen_steps), gen_lr, min_lr), False
    rest = total_steps - gen_steps
    return common.cosine_lr(step - gen_steps, rest, min(warmup, rest), lr, min_lr), True


def training_step_flops(args: Args) -> float:
    """FLOPs per image of one hybrid forward + backward step, both views (common.count_step_flops: meta device, no
    memory or RNG). Quantization and the generative-only phase are not counted."""
    args = dataclasses.replace(args, amp=False)
    tokens = lambda: torch.zeros(2, args.image_size**2, dtype=torch.long)  # noqa: E731
    return common.count_step_flops(
        lambda: build_model(args), lambda m: gcrl_loss(m, tokens(), tokens(), args, True)["total"]
    )


def build_optimizer(model: GCRL, args: Args, lr: float, device) -> torch.optim.Optimizer:
    """AdamW, weight decay on the >= 2-D weights of blocks, heads and projector; none on LayerNorm parameters, biases
    and the embeddings (GCRL 4.1; "embed." = tokens, SOS, positions)."""
    return common.make_adamw(
        common.param_groups(model, args.weight_decay, no_decay=("embed.",)), lr, args.betas, device
    )


# ======================================================================================================================
# Data: a weak and a strong view of every image (GCRL 4.1, Table 2), augmented and quantized on the device
# ======================================================================================================================


class TwoViews:
    """Per batch: [weak view, strong view] float (B, 3, S, S) in [0, 1] of the same images, drawn by two
    common.TrainBatches with the same seed, hence the same image order (exact resume included). The weak view is
    common's "weak" kind with --weak-pad (the image itself under --augment none), the strong view common's "simclr"
    kind, which at <= 32 px is GCRL Table 2 (crop scale (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2,
    flip 0.5, no blur). A dataset that fits on the device is moved there once, so both share one copy."""

    def __init__(self, dataset, args: Args, per_rank: int, info):
        if common.fits_on_device(dataset):
            dataset.images, dataset.labels = dataset.images.to(info.device), dataset.labels.to(info.device)
        weak_kind = {"weak": "weak", "none": "eval"}[args.augment]  # "eval" at the stored size = the image unchanged
        kw = dict(seed=args.seed, num_workers=args.num_workers)
        weak_kw = {"pad": args.weak_pad} if weak_kind == "weak" else None
        self.weak = common.TrainBatches(dataset, [weak_kind], args.image_size, per_rank, info, aug_kwargs=weak_kw, **kw)
        self.strong = common.TrainBatches(dataset, ["simclr"], args.image_size, per_rank, info, **kw)
        self.steps_per_epoch = self.weak.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0):
        pairs = zip(self.weak.epoch(epoch, start_step), self.strong.epoch(epoch, start_step))
        for ((weak,), _), ((strong,), _) in pairs:  # (views, labels) of each; labels are not used in training
            yield weak, strong


def heldout_data(args: Args, train_set, test_set, device) -> dict:
    """The monitors' fixed data (class balanced, common.heldout_subset): --eval-images of each split for bits per
    token (0 = the whole test split), and the kNN bank (--knn-bank training images) and queries (the test images)."""
    n = args.eval_images or len(test_set)
    test = common.heldout_subset(test_set, n)
    return {"train": common.heldout_subset(train_set, n).images, "test": test.images, "queries": test,
            "bank": common.heldout_subset(train_set, args.knn_bank)}  # fmt: skip


def monitors(model: nn.Module, held: dict, args: Args, step: int, run_dir: str, info) -> dict:
    """eval/{train,test}_bits_per_token of the decoder (sharded over the ranks; not under --alpha 0, which trains no
    decoder), eval/knn_top1 on the representation (weighted kNN, k --knn-k, t 0.07), and on rank 0 a sample grid."""
    metrics = {}
    if args.alpha > 0:
        for split in ("train", "test"):
            metrics[f"eval/{split}_bits_per_token"] = common.bits_per_token(
                model, held[split], args, info.device, info=info
            )
    if info.is_main and args.knn_bank > 0:
        embedded = common.embed_heldout(lambda x: features(model, x), held, args, info.device)
        metrics["eval/knn_top1"] = common.knn_top1(embedded, args)
    if info.is_main and args.alpha > 0 and args.num_samples > 0 and step > 0:
        tokens = common.sample(model, args.num_samples, args.temperature, args.seed, amp=args.amp)
        common.save_samples(model, tokens, os.path.join(run_dir, f"samples_step{step:07d}.png"))
    return metrics


def check_args(args: Args) -> None:
    """Clear errors for settings that cannot run (ValueError / FileNotFoundError; main() turns them into one line)."""
    depth = GCRL_ARCHS[args.arch][1]
    if not 0 <= args.enc_blocks <= depth:
        raise ValueError(f"--enc-blocks must be in [0, {depth}] for {args.arch} (0 = half), got {args.enc_blocks}")
    if args.alpha < 0 or args.beta < 0 or args.alpha + args.beta == 0:
        raise ValueError(f"--alpha and --beta must be >= 0 and not both 0, got {args.alpha}, {args.beta}")
    if args.alpha == 0 and args.gen_only_epochs > 0:
        raise ValueError("--alpha 0 (SimCLR) has no generative phase: drop --gen-only-epochs or set it to 0")
    if args.epochs <= 0 or args.gen_only_epochs > args.epochs or args.warmup_epochs < 0:
        raise ValueError(f"need --epochs > 0, --gen-only-epochs <= --epochs and --warmup-epochs >= 0, got "
                         f"{args.epochs}, {args.gen_only_epochs}, {args.warmup_epochs}")  # fmt: skip
    if args.tau <= 0 or args.temperature <= 0:
        raise ValueError(f"--tau and --temperature must be > 0, got {args.tau}, {args.temperature}")
    if args.num_colors < 2 or args.image_size < 1 or args.weak_pad < 0:
        raise ValueError("need --num-colors >= 2, --image-size >= 1 and --weak-pad >= 0")
    if args.batch_size < 2 or min(args.log_every, args.eval_every, args.ckpt_every) < 1:
        raise ValueError("--batch-size must be >= 2 (NT-Xent needs a negative); --log-every, --eval-every and "
                         "--ckpt-every >= 1")  # fmt: skip
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.palette_pixels < args.num_colors and not args.palette:
        raise ValueError(f"--palette-pixels {args.palette_pixels} < --num-colors {args.num_colors}: k-means needs "
                         f"at least one pixel per center")  # fmt: skip
    if args.palette and not os.path.exists(args.palette):
        raise FileNotFoundError(f"--palette {args.palette}: no such file (a (K, 3) .npy in [-1, 1], e.g. iGPT's "
                                f"kmeans_centers.npy; leave it empty to fit one)")  # fmt: skip


# ======================================================================================================================
# Presets and the training loop
# ======================================================================================================================

# Values a preset sets unless given on the command line; the dataclass defaults ARE the CIFAR (5+5)M recipe.
PRESETS = {
    "preset": {
        "cifar": {},
        "imagenet32": dict(
            dataset="imagenet32",
            batch_size=1024,  # GCRL Table 3, ImageNet32, (5+5)M
            epochs=100,  # GCRL Table 3: 50 + 50 (merged cells, see the header)
            gen_base_lr=4e-4 * 256 / 1024,  # GCRL Table 3: peak lr 4.0e-4 / 4.0e-4 at batch 1024
            base_lr=4e-4 * 256 / 1024,
            eval_images=10000,  # a fixed 10k of the 50k validation images per evaluation
        ),
        "imagenet32_38_38": dict(
            dataset="imagenet32",
            arch="gcrl_38_38",
            batch_size=768,  # GCRL Table 3, ImageNet32, (38+38)M
            epochs=100,  # GCRL Table 3: 50 + 50
            gen_base_lr=4e-4 * 256 / 768,  # GCRL Table 3: peak lr 4.0e-4 / 4.0e-4
            base_lr=4e-4 * 256 / 768,
            eval_images=10000,
        ),
        # CPU tests and smoke runs: 8x8 synthetic shapes = 64 tokens, 64 wide x 4 blocks (2 + 2); tuned so that
        # tests/test_gcrl.py's short runs learn something measurable; nothing here is a recommendation for real data.
        "tiny": dict(
            dataset="synthetic",
            synthetic_size=2000,
            image_size=8,
            weak_pad=1,  # 4 px of 32 = 1 px of 8
            arch="gcrl_tiny",
            dropout=0.0,
            palette_pixels=4096,  # k-means++ seeding is sequential over the K centers: keep the CPU fit under 1 s
            kmeans_iters=5,
            batch_size=32,
            epochs=10,
            gen_base_lr=2.4e-2,  # peak lr 3e-3 at batch 32 (igpt.py's tiny preset)
            base_lr=8e-3,  # peak lr 1e-3 at batch 32
            amp=False,  # bf16 matmuls are emulated (slow) on CPUs without AVX512-BF16 / AMX
            warmup_epochs=0,
            weight_decay=0.0,
            log_every=10,
            eval_every=1000,
            ckpt_every=1000,
            eval_images=256,
            knn_bank=1000,
            num_samples=8,
            num_workers=0,
        ),
    },
}


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv, PRESETS)
    with common.usage_errors(METHOD):  # bad input: one line, no traceback
        check_args(args)
    # --- boilerplate: ranks, seeds, data and palette (rank 0 fits or loads it, then broadcasts), model, optimizer
    info = common.setup_distributed(args.device)
    common.seed_everything(args.seed + info.rank)
    run_dir = os.path.join(args.output_dir, args.run_name or common.default_run_name(METHOD, args))
    with common.usage_errors(METHOD):
        per_rank = common.batch_per_rank(args.batch_size, info.world_size)
        train_set, test_set = (
            common.load_split(args, True, in_memory=True),
            common.load_split(args, False, in_memory=True),
        )
        batches = TwoViews(train_set, args, per_rank, info)
        common.prepare_run_dir(run_dir, info)  # the palette cache is written there
        palette = common.shared_palette(args, train_set.images, run_dir, info, METHOD)
    args.num_colors = palette.shape[0]  # saved in args.json / the checkpoint: build_model needs it
    flops_per_image = training_step_flops(args)  # (the meta-device count needs no process group)
    held = heldout_data(args, train_set, test_set, info.device)
    model = build_model(args)
    model.quantizer.centers.copy_(palette)  # the only buffer (6 KB), identical on every rank
    # the projector gets no gradient in the generative phase, the decoder none under --alpha 0: DDP must know
    model = common.distribute(model, info, args.compile, find_unused_parameters=True)
    gen_lr = args.gen_lr if args.gen_lr is not None else common.scaled_lr(args.gen_base_lr, args.batch_size)
    peak_lr = args.lr if args.lr is not None else common.scaled_lr(args.base_lr, args.batch_size)
    optimizer = build_optimizer(common.unwrap(model), args, peak_lr, info.device)
    steps_per_epoch = batches.steps_per_epoch
    gen_steps, total_steps, warmup_steps = phase_steps(args, steps_per_epoch)
    with common.usage_errors(METHOD):  # a missing --resume PATH, another method's or architecture's checkpoint
        stop_step = common.stop_at(args, total_steps)
        step = common.resume(args.resume, run_dir, METHOD, model, optimizer, info, stop_step)
    logger = common.RunLogger(
        run_dir, args, info, flops_per_image, stop_step, step, method=METHOD, steps_per_epoch=steps_per_epoch
    )
    net = common.unwrap(model)
    n_enc = sum(p.numel() for m in (net.embed, net.encoder, net.enc_norm, net.projector) for p in m.parameters())
    n_dec = sum(p.numel() for m in (net.decoder, net.norm, net.head) for p in m.parameters())
    common.print0(f"{METHOD} {args.arch} ({n_enc / 1e6:.2f}M + {n_dec / 1e6:.2f}M parameters, {net.enc_blocks} + "
                  f"{net.depth - net.enc_blocks} blocks, {args.attention} attention) on {args.dataset}: "
                  f"{args.image_size}x{args.image_size} tokens, K = {args.num_colors}, {info.world_size} x {per_rank} "
                  f"images/step, {steps_per_epoch} steps/epoch; alpha {args.alpha} beta {args.beta}: L_g alone for "
                  f"steps [0, {gen_steps}) at peak lr {gen_lr:.3g}, full objective for [{gen_steps}, {total_steps}) at "
                  f"{peak_lr:.3g}; steps {step} -> {stop_step}, {flops_per_image / 1e9:.3f} GFLOPs per image "
                  f"(forward + backward, {'both views, hybrid phase' if args.beta > 0 else 'one view'})")  # fmt: skip

    def evaluate(step: int) -> dict:  # bits per token is sharded over the ranks: every rank evaluates
        monitor = lambda: monitors(model, held, args, step, run_dir, info)  # noqa: E731
        return common.run_monitors(step, monitor, logger, info, all_ranks=True)

    final = {k.replace("eval/", "init/"): v for k, v in evaluate(0).items()} if step == 0 else {}

    # --- the training loop (THE PART TO READ is gcrl_loss above)
    model.train()
    epoch = step // steps_per_epoch
    while step < stop_step:
        for weak, strong in batches.epoch(epoch, start_step=step % steps_per_epoch):
            lr, hybrid = learning_rate(step, gen_steps, total_steps, warmup_steps, gen_lr, peak_lr, args.min_lr)
            common.set_lr(optimizer, lr)
            weak_tokens = common.quantize(model, weak)  # (B, H*W) raster order
            strong_tokens = common.quantize(model, strong) if hybrid and args.beta > 0 else None
            terms = gcrl_loss(model, weak_tokens, strong_tokens, args, hybrid)
            logger.check_finite(step, terms)  # a non-finite loss stops the run before it reaches a checkpoint
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            if args.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            step += 1
            last = step >= stop_step
            # --- logging, monitors, checkpoints (boilerplate)
            final.update(logger.step(step, terms, lr, step / steps_per_epoch, args.batch_size, phase=1 + hybrid))
            with logger.paused():  # images/s counts training time only
                if step % args.eval_every == 0 or last:
                    final.update(evaluate(step))
                logger.checkpoint(step, last, model, optimizer, epoch)
            if last:
                break
        epoch += 1
    logger.close()
    common.cleanup_distributed()
    return {**final, "step": step, "gen_steps": gen_steps, "flops_per_image": flops_per_image, "run_dir": run_dir}


if __name__ == "__main__":
    main()
