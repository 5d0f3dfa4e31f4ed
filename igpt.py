"""iGPT: generative pretraining from pixels (Chen et al., ICML 2020; no arXiv version), as the generative baseline of
GCRL (Kim, Kim, Lee 2021, arXiv:2106.06162), whose recipe and axial attention block this file follows.

What is implemented (SPEC sections 1.2-1.4 and 4):
  * a 512-color palette (iGPT): k-means (k-means++, 20 iterations on 250k random training pixels, as minGPT's demo) on
    rank 0, broadcast, cached in <run>/palette.npy; or --palette PATH, (K, 3) in [-1, 1] such as iGPT's released
    kmeans_centers.npy (GCRL 3.2's). Raster-order tokens: nearest center to x / 127.5 - 1 (common.ColorQuantizer);
  * the token transformer: token embedding + learned SOS + learned 2D (row + column) positions (common.PixelEmbedding,
    GCRL 3.2), pre-LN blocks (GCRL eq. 4, common.Block) with dense causal attention or GCRL's axial attention (Appendix
    Algorithm 1, common.AxialAttention; one set of attention weights used three times), final LayerNorm, untied head;
  * the autoregressive objective over ALL n tokens: input [SOS, t_0 .. t_{n-2}], targets t_0 .. t_{n-1}, mean NLL
    per token; or --objective bert: 15% of the tokens masked (embeddings zeroed, no SOS shift, no causal mask), loss
    on the masked tokens only (both as the iGPT ref code);
  * eval/{train,test}_bits_per_token = mean NLL / ln 2 on un-augmented images: GCRL's "bpd on the color-quantized
    space" (SPEC 1.4, footnote 2), NOT comparable to 8-bit bits/dim; uniform = untrained (zero-init head) = 9 bits;
  * samples at a softmax temperature (GCRL Figs 6-8: 1.0, 0.99, 0.98), decoded through the palette into a PNG grid at
    every evaluation, or from a checkpoint with --sample-only --ckpt PATH;
  * for eval_probe.py: features (pooled, layer-normalized activations of any block), log_likelihood (GCRL Table 6).

Launch:
    python igpt.py --preset tiny --epochs 1                        # CPU smoke run (synthetic shapes at 8x8)
    python igpt.py                                                 # CIFAR-10, iGPT 10M axial (GCRL Table 3)
    python igpt.py --attention dense                               # the dense baseline of GCRL Table 11
    torchrun --nproc_per_node 8 igpt.py --preset imagenet32        # ImageNet32 (GCRL Table 3), data/imagenet32
    torchrun --nproc_per_node 8 igpt.py --preset imagenet32_76m    # iGPT 76M (24 x 512) on ImageNet32
    python igpt.py --sample-only --ckpt runs/<run>/checkpoint.pt --temperature 0.99 --num-samples 64

Two architectures: --arch igpt_10m / igpt_76m (default): GCRL's model and recipe (row + column positions, biases,
axial or dense attention, AdamW betas (0.9, 0.999), wd 1e-4, dropout 0.1). --arch igpt_s / igpt_m / igpt_l: iGPT's
(dense causal attention, one position per token, no biases in attention and MLP, Adam (0.9, 0.95), no wd, no dropout)
with GCRL Table 3's lr, 5 warmup epochs and epochs (a deviation: iGPT swept the lr per model).

Deviations from the paper / reference code (openai/image-gpt), and why:
  * LayerNorm (GCRL eq. 4), not iGPT's RMS-style norm; exact GELU, not x * sigmoid(1.702 x); biased qkv / output
    projections (timm layout) unless --no-block-bias; row + column positions unless --positions 1d (both igpt_s/m/l).
  * dropout 0.1 (GCRL 4.1: "before every residual connection") also after the MLP's GELU (common.Block, as timm's
    Mlp); no attention-probability dropout (GCRL states none).
  * init: GPT-2 / minGPT (N(0, 0.02), residual projections / sqrt(2 * depth), zero biases), not iGPT's; zero head kept.
  * weight decay 1e-4 skips LayerNorms, embeddings (GCRL 4.1), the SOS vector, the positions and every bias; AdamW
    betas: GCRL states none, so PyTorch's defaults (0.9, 0.999), as its PyTorch 1.6 AdamW had.
  * sampling: one full forward per token (no key/value cache: the axial column pass would need one per column); 64
    CIFAR samples of igpt_10m: 1024 passes of ~2.2 TFLOPs, est. 10-30 s on an H100 (not measured), slow on a CPU
    (--num-samples 0: no grids). Other ranks wait at a barrier: igpt_m / l grids may outlast torchrun's 10-minute
    timeout (train with --num-samples 0, then --sample-only).
  * evaluation uses bf16 autocast like training (--no-amp for fp32 numbers); the cross-entropy is always fp32.
  * --objective bert: eval/*_bits_per_token is the masked-token loss in bits (fixed 15% mask), not a likelihood; no
    sampling; the unused SOS vector is frozen (DDP needs a gradient for every trainable parameter).
Measured on the CPU (throughput dense vs axial, bits per token): README, "Results measured with this repository".
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "igpt"

IGPT_ARCHS = {  # (width, depth, heads) of the token transformer
    "igpt_tiny": (64, 2, 4),  # CPU tests and smoke runs (not from a paper)
    "igpt_10m": (256, 12, 8),  # GCRL Table 1 (10M, 12 blocks), 3.2 (width 256, 8 heads)
    "igpt_s": (512, 24, 8),  # iGPT-S, openai/image-gpt run.py defaults: n_embd 512, n_layer 24, n_head 8 (76M)
    "igpt_76m": (512, 24, 8),  # GCRL Table 1's 76M model: iGPT-S's size in GCRL's architecture and recipe
    "igpt_m": (1024, 36, 8),  # iGPT-M, openai/image-gpt README: 1024 / 8 heads / 36 layers
    "igpt_l": (1536, 48, 16),  # iGPT-L, openai/image-gpt README: 1536 / 16 heads / 48 layers
}


@dataclass
class Args:
    """iGPT: autoregressive (or BERT) pretraining on color-quantized pixels. Defaults: GCRL Table 3, CIFAR-10, iGPT
    10M (batch 512, 200 epochs, peak lr 1.6e-3, AdamW wd 1e-4, 5 warmup epochs + cosine, clip 1.0, dropout 0.1)."""

    # --- experiment
    run_name: str = common.arg("", f"run folder under --output-dir (default: {METHOD}_<dataset>_<arch>_s<seed>)")
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
    augment: str = common.arg("weak", "weak = reflect-pad 4 + crop + flip (GCRL 4.1) | none", ["weak", "none"])
    num_workers: int = common.arg(8, "DataLoader workers per rank for datasets not kept on the device")
    # --- model
    preset: str = common.arg("cifar", "a named group of defaults (see PRESETS)",
                             ["cifar", "imagenet32", "imagenet32_76m", "tiny"])  # fmt: skip
    arch: str = common.arg("igpt_10m", "token transformer, width x depth / heads: " + ", ".join(
        f"{k} {w}x{d}/{h}" for k, (w, d, h) in IGPT_ARCHS.items()), list(IGPT_ARCHS))  # fmt: skip
    attention: str = common.arg("axial", "dense (causal over the sequence) | axial (GCRL App. Alg. 1)",
                                ["dense", "axial"])  # fmt: skip
    positions: str = common.arg("rowcol", "learned positions: rowcol = row + column (GCRL 3.2) | 1d = one per token "
                                "(iGPT ref code wpe; set by --arch igpt_s/m/l)", ["rowcol", "1d"])  # fmt: skip
    block_bias: bool = common.arg(True, "biases in the blocks' attention and MLP layers (--no-block-bias: iGPT ref "
                                  "code, set by --arch igpt_s/m/l)")  # fmt: skip
    dropout: float = common.arg(0.1, "dropout before every residual connection (GCRL 4.1: 0.1)")
    num_colors: int = common.arg(512, "palette size K = vocabulary (iGPT: 512); set from the file when --palette "
                                 "is given")  # fmt: skip
    palette: str = common.arg("", "palette .npy (K, 3) in [-1, 1] (iGPT's kmeans_centers.npy); '' = fit k-means at "
                              "start")  # fmt: skip
    palette_pixels: int = common.arg(250_000, "random training pixels the k-means palette is fitted on (minGPT: 250k)")
    kmeans_iters: int = common.arg(20, "k-means iterations of the palette fit")
    objective: str = common.arg("ar", "ar = next-token prediction in raster order | bert = masked tokens",
                                ["ar", "bert"])  # fmt: skip
    bert_mask_prob: float = common.arg(0.15, "fraction of tokens masked under --objective bert (iGPT: 0.15)")
    # --- optimization
    epochs: int = common.arg(200, "training epochs (GCRL Table 3, CIFAR 10M: 200)")
    batch_size: int = common.arg(512, "GLOBAL batch of images, split over ranks (GCRL Table 3, CIFAR 10M: 512)")
    base_lr: float = common.arg(8e-4, "lr per 256 images: lr = base_lr * batch / 256 (GCRL Table 3: 1.6e-3 at 512)")
    lr: float | None = common.arg(None, "absolute peak learning rate; overrides base_lr scaling")
    min_lr: float = common.arg(0.0, "final learning rate of the cosine schedule")
    warmup_epochs: int = common.arg(5, "linear warmup epochs (GCRL 4.1: 5)")
    weight_decay: float = common.arg(1e-4, "AdamW weight decay, none on norms, biases and embeddings (GCRL 4.1: 1e-4)")
    betas: tuple[float, float] = common.arg((0.9, 0.999), "AdamW betas (GCRL states none: PyTorch defaults)")
    clip_grad: float = common.arg(1.0, "max gradient norm, 0 = off (GCRL 4.1: 1.0)")
    amp: bool = common.arg(True, "bf16 autocast for the transformer (quantization and cross-entropy stay fp32)")
    compile: bool = common.arg(False, "torch.compile the model")
    # --- logging
    log_every: int = common.arg(50, "log every N steps")
    eval_every: int = common.arg(5000, "bits per token on train / test images and a sample grid every N steps (and "
                                 "at end)")  # fmt: skip
    ckpt_every: int = common.arg(1000, "checkpoint every N steps (and at the end)")
    keep_every: int = common.arg(0, "also keep a snapshot checkpoint-epNNNN.pt every N epochs (0 = none; MAE: 20)")
    eval_images: int = common.arg(0, "images of each split scored for bits per token (0 = the whole test split)")
    # --- sampling
    temperature: float = common.arg(1.0, "softmax temperature of the samples (GCRL Figs 6-8: 1.0, 0.99, 0.98)")
    num_samples: int = common.arg(64, "images in each sample grid (0 = no samples during training)")
    sample_only: bool = common.arg(False, "do not train: sample --num-samples images from --ckpt and write a PNG "
                                   "beside it")  # fmt: skip
    ckpt: str = common.arg("", "checkpoint to sample from with --sample-only")


# ======================================================================================================================
# Model: pixel-token transformer (GCRL 3.2, eq. 4)
# ======================================================================================================================


class ImageGPT(nn.Module):
    """Token transformer over an H x W grid of palette tokens.

    quantizer: the palette (buffer `quantizer.centers` (K, 3), saved in checkpoints); embed: common.PixelEmbedding
    (token embedding K -> D, learned SOS, learned row + column positions); blocks: pre-LN common.Block with dense
    causal or axial attention; norm: final LayerNorm; head: Linear D -> K (untied, zero-initialized as iGPT's wtet).
    forward(tokens (B, L), keep=None) -> logits (B, L, K) with L = H*W:
      objective "ar":   input [SOS, t_0 .. t_{L-2}] (+ positions), causal: logits[:, p] depend on t_0 .. t_{p-1} only;
      objective "bert": input tokens with the embeddings of keep == False zeroed, no shift, bidirectional."""

    def __init__(self, args: Args):
        super().__init__()
        dim, depth, heads = IGPT_ARCHS[args.arch]
        H = W = args.image_size
        self.height, self.width, self.depth = H, W, depth
        self.causal = args.objective == "ar"
        self.quantizer = common.ColorQuantizer(common.grid_palette(args.num_colors))
        embedding = common.PixelEmbedding if args.positions == "rowcol" else SequenceEmbedding
        self.embed = embedding(args.num_colors, dim, H, W)
        if not self.causal:  # BERT inputs have no SOS: freeze the unused vector (DDP waits for every trainable grad)
            self.embed.sos.requires_grad_(False)
        self.blocks = nn.ModuleList(
            common.Block(dim, heads, 4.0, args.dropout, attention=args.attention, grid=(H, W)) for _ in range(depth)
        )
        for block in self.blocks:
            block.attn.attn_drop = 0.0  # GCRL 4.1 states dropout before residual connections only (see header)
            if not args.block_bias:  # iGPT ref code: q / k / v / c_proj and both MLP layers have no bias
                for m in block.modules():
                    if isinstance(m, nn.Linear):
                        m.register_parameter("bias", None)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, args.num_colors, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 / minGPT: Linear N(0, 0.02), zero biases, the two residual projections of each block scaled by
        1/sqrt(2 * depth) so the residual stream's variance does not grow with depth; head zero (iGPT ref code: the
        untrained model predicts the uniform distribution, exactly log2 K bits per token). PixelEmbedding initializes
        itself (iGPT ref code: tokens and SOS N(0, 0.02), positions N(0, 0.01))."""
        for name, m in self.blocks.named_modules():
            if isinstance(m, nn.Linear):
                residual = name.endswith(("attn.proj", "mlp.fc2"))
                nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * self.depth) if residual else 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)

    def hidden_states(self, tokens: torch.Tensor, keep: torch.Tensor | None = None, num_blocks: int | None = None):
        """tokens (B, L) -> the output (B, L, D) of the first `num_blocks` blocks (all when None), before any norm."""
        if tokens.shape[1] != self.height * self.width:
            raise ValueError(f"expected {self.height}x{self.width} = {self.height * self.width} tokens per image, "
                             f"got {tokens.shape[1]}")  # fmt: skip
        h = self.embed(tokens, shift=self.causal, keep=None if self.causal else keep)
        for block in self.blocks[:num_blocks]:
            h = block(h, is_causal=self.causal)
        return h

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.norm(self.hidden_states(tokens, keep)))


class SequenceEmbedding(common.PixelEmbedding):
    """iGPT's input embedding (ref code): common.PixelEmbedding's tokens and SOS, but one learned position per raster
    index (wpe, (H*W, D), N(0, 0.01)) instead of GCRL's row + column pair."""

    def __init__(self, vocab_size: int, dim: int, height: int, width: int):
        super().__init__(vocab_size, dim, height, width)
        del self.pos_row, self.pos_col
        self.pos = nn.Parameter(torch.empty(height * width, dim))
        nn.init.normal_(self.pos, std=0.01)

    def positions(self) -> torch.Tensor:
        return self.pos


def build_model(args: Args) -> ImageGPT:
    """The iGPT model of `args` (also used by eval_probe.py with Args(**checkpoint["args"])); its palette is a
    placeholder until the checkpoint's (or the fitted one) is loaded into `quantizer.centers`."""
    return ImageGPT(args)


def default_feature_layer(model: nn.Module) -> int:
    """GCRL's "half" position (4.1, Table 4): the output of the first half of the blocks (block depth/2 - 1, 0-based),
    where iGPT 4.1 finds the representation near its best (the last block costs 2.4 points on CIFAR-10)."""
    return max(0, common.unwrap(model).depth // 2 - 1)


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, layer: int | None = None, pool: str | None = None):
    """Frozen representation for probing (iGPT 3.4): images float (B, 3, S, S) in [0, 1] -> quantized tokens ->
    the output of block `layer` (0-based; None = default_feature_layer, the middle) -> LayerNorm over the width
    without learned parameters -> average over the L positions (pool "mean", the only one) -> (B, D) float32. Runs
    in eval mode on the input the model was trained on: the SOS-shifted sequence for "ar", the tokens for "bert"."""
    if (pool or "mean") != "mean":
        raise ValueError(f"unknown pool '{pool}': a token transformer's representation is the mean over positions")
    n_layers = num_feature_layers(model)
    layer = default_feature_layer(model) if layer is None else layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the model has {n_layers} blocks (0..{n_layers - 1})")
    with common.eval_mode(model) as m:
        h = m.hidden_states(common.quantize(m, images), num_blocks=layer + 1).float()
    return F.layer_norm(h, h.shape[-1:], eps=1e-6).mean(dim=1)


def num_feature_layers(model: nn.Module) -> int:
    return common.unwrap(model).depth


# eval_probe.py's unsupervised OOD hook (GCRL Table 6): log p(x) in nats and the token embeddings it is differentiable
# in; shared with gcrl.py (common.py section 3).
log_likelihood = common.log_likelihood


# ======================================================================================================================
# Loss (THE PART TO READ): negative log-likelihood per palette token
# ======================================================================================================================


def igpt_loss(model: nn.Module, tokens: torch.Tensor, args: Args) -> dict[str, torch.Tensor]:
    """The training objective in nats per token: ar = mean over all B x L tokens of -log p(t_p | t_<p) (iGPT ref code
    gen_loss); bert = per image the mean NLL over its masked tokens, then the mean over images (iGPT ref code).
    Returns {"ar" or "bert": loss, "total": loss}."""
    nll, scored = common.token_nll(model, tokens, args)
    if args.objective == "ar":
        loss = nll.mean()
    else:
        w = scored.float()
        loss = ((nll * w).sum(1) / w.sum(1).clamp(min=1)).mean()
    return {args.objective: loss, "total": loss}


def training_step_flops(args: Args) -> float:
    """FLOPs per image of one forward + backward step (FlopCounterMode on the meta device with a 2-image batch: no
    memory, no data, no RNG use, no process group). Quantization (a K x 3 distance per pixel) is not counted."""
    args = dataclasses.replace(args, amp=False, objective="ar")
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(args)
        tokens = torch.zeros(2, args.image_size**2, dtype=torch.long)

        def step():
            igpt_loss(model, tokens, args)["total"].backward()

        return common.count_flops(step) / 2


def build_optimizer(model: ImageGPT, args: Args, lr: float, device) -> torch.optim.Optimizer:
    """AdamW with weight decay on the >= 2-D weights of the blocks and the head; none on LayerNorm parameters, biases
    (1-D, common.param_groups) and the embeddings (GCRL 4.1; "embed." = tokens, SOS, positions)."""
    return common.make_adamw(
        common.param_groups(model, args.weight_decay, no_decay=("embed.",)), lr, args.betas, device
    )


# ======================================================================================================================
# Data: weakly augmented images (GCRL 4.1 "iGPT"), quantized on the device
# ======================================================================================================================


def check_args(args: Args) -> None:
    """Clear errors for settings that cannot run (ValueError / FileNotFoundError; main() turns them into one line)."""
    if args.arch not in IGPT_ARCHS:
        raise ValueError(f"unknown arch {args.arch!r}; choose one of: {', '.join(IGPT_ARCHS)}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.bert_mask_prob < 1:
        raise ValueError(f"--bert-mask-prob must be in (0, 1), got {args.bert_mask_prob}")
    if args.num_colors < 2 or args.image_size < 1:
        raise ValueError(f"need --num-colors >= 2 and --image-size >= 1, got {args.num_colors}, {args.image_size}")
    if min(args.batch_size, args.log_every, args.eval_every, args.ckpt_every) < 1:
        raise ValueError("--batch-size, --log-every, --eval-every and --ckpt-every must be >= 1")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.palette_pixels < args.num_colors and not args.palette:
        raise ValueError(
            f"--palette-pixels {args.palette_pixels} < --num-colors {args.num_colors}: k-means needs at least one "
            f"pixel per center"
        )
    if args.num_samples < (1 if args.sample_only else 0):
        raise ValueError(f"--num-samples must be >= 1 with --sample-only (>= 0 otherwise), got {args.num_samples}")
    if args.sample_only and not args.ckpt:
        raise ValueError("--sample-only needs --ckpt PATH (a checkpoint written by igpt.py)")
    if args.palette and not args.sample_only and not os.path.exists(args.palette):
        raise FileNotFoundError(f"--palette {args.palette}: no such file (a (K, 3) .npy in [-1, 1], e.g. iGPT's "
                                f"kmeans_centers.npy; leave it empty to fit one)")  # fmt: skip


VIEW = {"weak": "weak", "none": "eval"}  # --augment -> common's view ("eval" at the stored size: unchanged)


def heldout_data(args: Args, train_set, test_set, device) -> dict:
    """The monitors' fixed images: args.eval_images of each split (class balanced; 0 = the whole test split), and
    a PNG of what the palette does to 8 test images (originals, then quantized)."""
    n = args.eval_images or len(test_set)
    return {"train": common.heldout_subset(train_set, n).images, "test": common.heldout_subset(test_set, n).images}


def monitors(model: nn.Module, held: dict, args: Args, step: int, run_dir: str, info) -> dict:
    """eval/{train,test}_bits_per_token (sharded over the ranks) and, on rank 0, samples_step*.png (ar) and at step 0
    quantized.png (originals over their palette quantization)."""
    dev = info.device
    metrics = {f"eval/{split}_bits_per_token": common.bits_per_token(model, held[split], args, dev, info=info)
               for split in ("train", "test")}  # fmt: skip
    if info.is_main and step == 0:
        shown = held["test"][:8].to(dev)
        quantized = common.unwrap(model).quantizer.decode(
            common.quantize(model, shown), args.image_size, args.image_size
        )
        path, labels = os.path.join(run_dir, "quantized.png"), ["original", f"{args.num_colors} colors"]
        common.save_image_grid(torch.cat([shown, quantized]), path, nrow=8, labels=labels)
    if info.is_main and args.objective == "ar" and args.num_samples > 0 and step > 0:
        tokens = common.sample(model, args.num_samples, args.temperature, args.seed, amp=args.amp)
        common.save_samples(model, tokens, os.path.join(run_dir, f"samples_step{step:07d}.png"))
    return metrics


def sample_from_checkpoint(args: Args) -> dict:
    """--sample-only: rebuild the model from --ckpt alone, draw --num-samples images at --temperature (seed --seed)
    and write <ckpt dir>/samples_t<temperature>_s<seed>.png. Returns {"samples_path", "tokens" (N, L) CPU}."""
    with common.usage_errors(METHOD):
        ckpt = common.load_checkpoint(args.ckpt, METHOD)
        model = build_model(Args(**ckpt["args"]))
        if not model.causal:
            raise ValueError(f"{args.ckpt} is a BERT (--objective bert) model: only autoregressive models sample")
    model.load_state_dict(ckpt["model"])
    info = common.setup_distributed(args.device)
    model.to(info.device)
    t0 = time.perf_counter()
    tokens = common.sample(model, args.num_samples, args.temperature, args.seed, amp=args.amp)
    path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"samples_t{args.temperature:g}_s{args.seed}.png")
    if info.is_main:
        common.save_samples(model, tokens, path)
    common.print0(f"{args.num_samples} samples at temperature {args.temperature} from step {ckpt['step']} in "
           f"{time.perf_counter() - t0:.1f} s -> {path}")  # fmt: skip
    return {"samples_path": path, "tokens": tokens.cpu()}


# ======================================================================================================================
# Presets and the training loop
# ======================================================================================================================

# Values a preset sets unless given on the command line. The dataclass defaults above ARE GCRL's CIFAR recipe for the
# 10M model (Table 3); GCRL's 76M CIFAR runs fine-tune the ImageNet32 model for 15 epochs, so no CIFAR 76M preset.
PRESETS = {
    "preset": {
        "cifar": {},
        "imagenet32": dict(
            dataset="imagenet32",
            batch_size=1024,  # GCRL Table 3, ImageNet32, iGPT 10M
            epochs=100,  # GCRL Table 3
            base_lr=4e-4 * 256 / 1024,  # GCRL Table 3: peak lr 4.0e-4 at batch 1024
            eval_images=10000,  # a fixed 10k of the 50k validation images per evaluation
        ),
        "imagenet32_76m": dict(
            dataset="imagenet32",
            arch="igpt_76m",  # GCRL Table 1 / iGPT-S: 24 x 512, 8 heads
            batch_size=384,  # GCRL Table 3, ImageNet32, iGPT 76M
            epochs=100,  # GCRL Table 3
            base_lr=4e-4 * 256 / 384,  # GCRL Table 3: peak lr 4.0e-4 at batch 384
            eval_images=10000,
        ),
        # CPU tests and smoke runs: 8x8 synthetic shapes = 64 tokens per image, a 64-wide 2-block model; tuned so that
        # tests/test_igpt.py's short runs learn something measurable; nothing here is a recommendation for real data.
        "tiny": dict(
            dataset="synthetic",
            synthetic_size=2000,
            image_size=8,
            arch="igpt_tiny",
            dropout=0.0,
            palette_pixels=4096,  # k-means++ seeding is sequential over the K centers: keep the CPU fit well under 1 s
            kmeans_iters=5,
            batch_size=32,
            epochs=10,
            base_lr=2.4e-2,  # peak lr 3e-3 at batch 32
            amp=False,  # bf16 matmuls are about 2x slower than fp32 on CPUs without AMX
            warmup_epochs=0,
            weight_decay=0.0,
            log_every=10,
            eval_every=1000,
            ckpt_every=1000,
            eval_images=256,
            num_samples=8,
            num_workers=0,
        ),
    },
    # iGPT-S / M / L are iGPT's models (openai/image-gpt): dense causal attention, one learned position per token,
    # bias-free attention and MLP, and its optimizer: Adam betas (0.9, 0.95), no weight decay, no dropout. igpt_10m and
    # igpt_76m are GCRL's (axial or dense, row + column positions, biases, its AdamW recipe). The lr, warmup and
    # epochs stay GCRL Table 3's: iGPT swept the lr per model and states no single value.
    "arch": {
        a: dict(attention="dense", positions="1d", block_bias=False, betas=(0.9, 0.95), weight_decay=0.0, dropout=0.0)
        for a in ("igpt_s", "igpt_m", "igpt_l")
    },
}


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv, PRESETS)
    with common.usage_errors(METHOD):  # bad input: one line, no traceback
        check_args(args)
    if args.sample_only:
        return sample_from_checkpoint(args)
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
        batches = common.TrainBatches(train_set, [VIEW[args.augment]], args.image_size, per_rank, info, seed=args.seed,
                                      num_workers=args.num_workers)  # fmt: skip
        common.prepare_run_dir(run_dir, info)  # the palette cache is written there
        palette = common.shared_palette(args, train_set.images, run_dir, info, METHOD)
    args.num_colors = palette.shape[0]  # saved in args.json / the checkpoint: build_model needs it
    flops_per_image = training_step_flops(args)  # (the meta-device count needs no process group)
    held = heldout_data(args, train_set, test_set, info.device)
    model = build_model(args)
    model.quantizer.centers.copy_(palette)  # the only buffer (6 KB), identical on every rank
    model = common.distribute(model, info, args.compile, static_graph=True)
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
    n_params = sum(p.numel() for p in common.unwrap(model).parameters())
    common.print0(f"{METHOD} {args.arch} ({n_params / 1e6:.2f}M parameters, {args.attention} attention, "
                  f"{args.objective}) on {args.dataset}: {args.image_size}x{args.image_size} tokens, K = "
                  f"{args.num_colors}, {info.world_size} x {per_rank} images/step, {steps_per_epoch} steps/epoch, "
                  f"peak lr {peak_lr:.3g}, steps {step} -> {stop_step}, "
                  f"{flops_per_image / 1e9:.3f} GFLOPs per image (forward + backward)")  # fmt: skip

    def evaluate(step: int) -> dict:  # bits per token is sharded over the ranks: every rank evaluates
        monitor = lambda: monitors(model, held, args, step, run_dir, info)  # noqa: E731
        return common.run_monitors(step, monitor, logger, info, all_ranks=True)

    final = {k.replace("eval/", "init/"): v for k, v in evaluate(0).items()} if step == 0 else {}

    # --- the training loop (THE PART TO READ is igpt_loss above)
    model.train()
    epoch = step // steps_per_epoch
    while step < stop_step:
        for views, _ in batches.epoch(epoch, start_step=step % steps_per_epoch):
            common.set_lr(optimizer, lr := common.cosine_lr(step, total_steps, warmup_steps, peak_lr, args.min_lr))
            terms = igpt_loss(model, common.quantize(model, views[0]), args)  # tokens (B, H*W) in raster order
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
    return {**final, "step": step, "flops_per_image": flops_per_image, "run_dir": run_dir}


if __name__ == "__main__":
    main()
