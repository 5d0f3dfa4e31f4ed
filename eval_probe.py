"""Evaluate any checkpoint of this repository: linear, kNN, best-layer, OOD and low-shot probes with calibration.
SPEC section 8; protocols of GCRL (arXiv:2106.06162) 4.2-4.4 / Tables 5, 6, 8, MAE main_linprobe.py, iGPT 4.1.
README "Evaluation protocols": which papers' numbers use which protocol, and the choices where the papers are silent.

`python eval_probe.py --ckpt runs/<run>/checkpoint.pt --protocols linear,knn` rebuilds the model from the checkpoint
alone (ckpt["method"] names the method file, ckpt["args"] its Args), freezes it (requires_grad False, eval mode:
BatchNorm statistics and dropout fixed), caches features next to the checkpoint, and runs:
  linear      a head on features of un-augmented images. --linear-protocol gcrl (GCRL 4.2): Linear, AdamW lr 0.01
              (CIFAR-size) / 0.1 (ImageNet), wd 1e-4, batch 512, 100 epochs, constant lr. mae (MAE main_linprobe.py):
              BatchNorm1d(affine=False) + Linear (trunc-normal 0.01), LARS lr 0.1 x batch / 256, wd 0, 90 epochs of
              which 10 warmup, then cosine.
  linear_aug  the mae head on frozen features of fresh RandomResizedCrop(S, 0.08-1, bicubic) + flip views every
              epoch, tested on the eval view (MAE main_linprobe.py as it runs: MAE's and CAN's numbers).
  knn         weighted kNN on cosine similarity, k 200, temperature 0.07 (Wu et al. 2018), no training.
  layers      iGPT 4.1: every block's probe, fit on the training split minus a class-balanced 10% and scored there;
              the best block is refit on all of it and only its test accuracy reported (the test split never chooses).
  ood         max_c log N(z | mu_c, Sigma_c) of class-conditional Gaussians (GCRL 4.3, Table 5) and, with a
              log_likelihood hook, -||d log p(x) / d token embeddings||_2 (Table 6): AUROC / AUPRC vs --ood-dataset.
  lowshot     the linear probe on 1 / 5 / 10% of the labels (class balanced), mean +- std over --seeds (GCRL Table 8).
Every classifier reports its ECE (15 equal-width bins, Guo et al. 2017; kNN: the normalized votes). Eval view
(--eval-crop auto): the image at the model's size S up to 64 px; from 224 px on Resize(S / 0.875, bicubic) +
CenterCrop(S). Results: <ckpt dir>/eval_results.jsonl and .csv and a printed table. --untrained probes the same
architecture freshly initialized.

Method-file interface (README "Method files"): build_model(args); features(model, images, layer=None, pool=None)
-> (B, D) for float images in [0, 1]; num_feature_layers(model); optional log_likelihood(model, images) -> (log_px
(B,) in nats, token embeddings (B, L, D), a leaf that requires grad: the model is frozen); optional eval_batches(args,
split, batch_size, device) -> (images, labels) batches of a dataset only the method file builds (contrastive_props.py's
RandBit / MultiDigits / DigitOn), used when the checkpoint's dataset is not one of common.py's.

Launch:
  python eval_probe.py --ckpt runs/<run>/checkpoint.pt --protocols linear,knn [--untrained] [--epochs 3]
  python eval_probe.py --ckpt runs/<run>/checkpoint.pt --protocols linear_aug --eval-crop resize_crop
  python eval_probe.py --ckpt runs/<igpt run>/checkpoint.pt --protocols layers,ood --ood-dataset svhn
  python eval_probe.py --ckpt runs/<run>/checkpoint.pt --protocols lowshot --seeds 0,1,2,3,4
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import arg

METHOD = "eval_probe"
PROTOCOLS = ("linear", "linear_aug", "knn", "layers", "ood", "lowshot")
HERE = os.path.dirname(os.path.abspath(__file__))


class ProbeError(ValueError):
    """A clear, user-facing error (bad checkpoint, unknown method, bad arguments); printed without a traceback."""


@dataclass
class Args:
    """Evaluate a checkpoint of any method of this repository (linear / kNN / best-layer / OOD / low-shot probes with
    ECE); results are appended to eval_results.jsonl / .csv next to the checkpoint."""

    # experiment
    ckpt: str = arg("", "checkpoint.pt written by a method script (required)")
    protocols: str = arg("linear,knn", "comma-separated: linear, linear_aug, knn, layers, ood, lowshot (or all)")
    untrained: bool = arg(False, "evaluate the same architecture freshly initialized from the checkpoint's args")
    seed: int = arg(0, "seed of the probe heads, their data order and of the --untrained initialization")
    device: str = arg("auto", "auto (CUDA when available) | cuda | cpu")
    output_dir: str = arg("", "folder of eval_results.jsonl / .csv ('' = the checkpoint's folder)")
    # data
    dataset: str = arg("", "labeled dataset for the probes ('' = the checkpoint's dataset)")
    data_root: str = arg("", "dataset folder ('' = the checkpoint's data_root, else 'data')")
    download: bool = arg(False, "download missing datasets (torchvision downloaders)")
    image_size: int = arg(0, "input size of the model (0 = the checkpoint's image_size)", interval="[0, inf)")
    eval_crop: str = arg("auto", "eval view: full (resize to S) | resize_crop (S/0.875 bicubic, center S) | auto "
                         "(resize_crop from 224 px on)", ["auto", "full", "resize_crop"])  # fmt: skip
    synthetic_size: int = arg(0, "synthetic images per split (0 = the checkpoint's, else default)", interval="[0, inf)")
    extract_batch_size: int = arg(256, "batch of the frozen forward passes that extract features")
    num_workers: int = arg(4, "DataLoader workers for datasets that are not kept in memory")
    amp: bool = arg(True, "bf16 autocast for feature extraction on CUDA (CPU extraction stays fp32)")
    cache: bool = arg(True, "cache features in <ckpt dir>/feature_cache (keyed by checkpoint mtime/size, data, layer)")
    # features
    layer: int = arg(-1, "block whose output is the feature (0-based); -1 = the method's standard representation")
    pool: str = arg("auto", "token pooling of features() (auto = the method's default)", ["auto", "mean", "cls"])
    # linear probe (also used by layers and lowshot)
    linear_protocol: str = arg("gcrl", "gcrl: AdamW 100 epochs (GCRL 4.2); mae: BN + LARS 90 epochs (MAE linprobe)",
                               ["gcrl", "mae"])  # fmt: skip
    epochs: int = arg(0, "probe epochs (0 = protocol default: gcrl 100, mae 90)", interval="[0, inf)")
    lr: float = arg(0.0, "probe lr (0 = default: gcrl 0.01, ImageNet 0.1; mae 0.1 x batch/256)", interval="[0, inf)")
    batch_size: int = arg(512, "probe batch (GCRL 4.2: 512; MAE linprobe: 512 per GPU)")
    weight_decay: float = arg(-1.0, "probe weight decay (-1 = default: gcrl 1e-4, mae 0)", interval="[-1, inf)")
    warmup_epochs: float = arg(-1.0, "mae warmup epochs (-1 = 10/90 of --epochs: MAE's 10 of 90)", interval="[-1, inf)")
    # knn
    knn_k: int = arg(200, "neighbours of the weighted kNN (Wu et al. 2018; DINO / SimCLR monitors)")
    knn_temperature: float = arg(0.07, "temperature of the kNN vote weights exp(cos / t)", interval="(0, inf)")
    # layers
    layers_probe: str = arg("linear", "per-block classifier: linear (iGPT) or knn (cheap)", ["linear", "knn"])
    layers_val_fraction: float = arg(0.1, "held-out part of the training split (class balanced) choosing the block",
                                     interval="(0, 1)")  # fmt: skip
    # ood
    ood_dataset: str = arg("svhn", "out-of-distribution test set (GCRL 4.3: SVHN and STL-10)")
    ood_ridge: float = arg(1e-3, "ridge added to each class covariance, relative to the mean feature variance")
    ood_grad: bool = arg(True, "also the unsupervised -||d log p / d embeddings|| score (methods with a likelihood)")
    ood_grad_batch_size: int = arg(32, "batch of the likelihood-gradient score (backward pass)", interval="[1, inf)")
    ood_max_images: int = arg(0, "likelihood-gradient score on the first N images of each test set (0 = all)")
    # lowshot
    lowshot_fractions: str = arg("0.01,0.05,0.1", "label fractions, comma-separated (GCRL Table 8: 1, 5, 10 percent)")
    seeds: str = arg("0,1,2,3,4", "low-shot seeds, comma-separated (GCRL Table 8: five seeds 0-4)")
    # calibration
    ece_bins: int = arg(15, "equal-width confidence bins of the ECE (Guo et al. 2017)", interval="[1, inf)")


# ==== Metrics: accuracy, calibration, ranking (by hand, no sklearn) ===================================================
def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    """ECE (Guo et al. 2017) of probs (N, C) (rows sum to 1), labels (N,): confidence = max_c p_c, bins B_m = ((m-1)/M,
    m/M]; ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)| = sum_m |sum_{B_m} correct - sum_{B_m} conf| / N."""
    probs = probs.double()
    conf, pred = probs.max(1)
    correct = (pred == labels.to(probs.device)).double()
    bins = (torch.ceil(conf * num_bins).long() - 1).clamp(0, num_bins - 1)
    acc_sum = torch.zeros(num_bins, dtype=torch.float64, device=probs.device).index_add_(0, bins, correct)
    conf_sum = torch.zeros(num_bins, dtype=torch.float64, device=probs.device).index_add_(0, bins, conf)
    return ((acc_sum - conf_sum).abs().sum() / max(1, probs.shape[0])).item()


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, num_bins: int) -> dict:
    """probs (N, C), labels (N,) -> top-1 accuracy and ECE."""
    acc = (probs.argmax(1) == labels.to(probs.device)).double().mean().item()
    return {"acc": acc, "ece": expected_calibration_error(probs, labels, num_bins)}


def auroc(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> float:
    """Area under the ROC curve = P(s_pos > s_neg) + P(s_pos = s_neg) / 2 over all (pos, neg) pairs, computed with
    the Mann-Whitney rank sum: (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), average ranks for ties."""
    n_pos, n_neg = pos_scores.numel(), neg_scores.numel()
    if n_pos == 0 or n_neg == 0:
        raise ProbeError("AUROC needs at least one positive and one negative score")
    s = torch.cat([pos_scores.flatten(), neg_scores.flatten()]).double()
    order = torch.argsort(s)
    _, inverse, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of the last of each group of equal scores
    ranks = torch.empty_like(s)
    ranks[order] = (ends - (counts.double() - 1) / 2)[inverse]  # ties share the mean of ranks end-count+1 .. end
    return ((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def auprc(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> float:
    """Area under the precision-recall curve as average precision: sweep the threshold t over the distinct scores
    from high to low, predict positive for s >= t; AP = sum_k (recall_k - recall_{k-1}) * precision_k, recall_0 = 0.
    Tied scores enter together (one threshold)."""
    n_pos, n_neg = pos_scores.numel(), neg_scores.numel()
    if n_pos == 0 or n_neg == 0:
        raise ProbeError("AUPRC needs at least one positive and one negative score")
    s = torch.cat([pos_scores.flatten(), neg_scores.flatten()]).double()
    order = torch.argsort(s, descending=True)
    s, y = s[order], torch.cat([torch.ones(n_pos), torch.zeros(n_neg)]).double().to(s.device)[order]
    tp, fp = y.cumsum(0), (1 - y).cumsum(0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last element of each group of equal scores closes one threshold
    precision, recall = tp[last] / (tp[last] + fp[last]), tp[last] / n_pos
    recall_prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return ((recall - recall_prev) * precision).sum().item()


# ==== Class-conditional Gaussian OOD score (GCRL 4.3) and the likelihood-gradient score (GCRL Table 6) ================
def class_gaussian_score(train_feats, train_labels, num_classes: int, feats, ridge: float) -> torch.Tensor:
    """Supervised OOD score of GCRL 4.3: s(x) = max_c log N(z(x) | mu_c, Sigma_c) (the log of GCRL's max_c N(.), same
    order; higher = more in-distribution) of feats (N, D) -> (N,) float64. From the training features (float64):
    Sigma_c = (1/n_c) sum (z - mu_c)(z - mu_c)^T + ridge * mean_d(Var z_d) * I = L_c L_c^T (Cholesky), and
    log N(z | mu_c, Sigma_c) = -(D log 2pi + log det Sigma_c + ||L_c^-1 (z - mu_c)||^2) / 2."""
    x, D = train_feats.double(), train_feats.shape[1]
    labels, queries = train_labels.to(x.device), feats.double().to(x.device)
    ridge_eye = ridge * x.var(0, unbiased=False).mean().clamp(min=1e-12) * torch.eye(D, dtype=x.dtype, device=x.device)
    log_densities = []
    for c in range(num_classes):
        xc = x[labels == c]
        if xc.shape[0] == 0:
            raise ProbeError(f"class {c} has no training features; the class-conditional Gaussian needs every class")
        mu = xc.mean(0)
        centered = xc - mu
        L = torch.linalg.cholesky(centered.T @ centered / xc.shape[0] + ridge_eye)
        sol = torch.linalg.solve_triangular(L, (queries - mu).T, upper=False)  # (D, N)
        log_densities.append(-0.5 * (D * math.log(2 * math.pi) + 2 * L.diagonal().log().sum() + sol.pow(2).sum(0)))
    return torch.stack(log_densities, dim=1).max(1).values


def likelihood_gradient_scores(module, model, batches, max_images: int = 0) -> torch.Tensor:
    """Unsupervised OOD score of GCRL Table 6: s(x) = -||d log p(x) / d token embeddings||_2 per image, through the
    method's `log_likelihood(model, images) -> (log_px (B,), token_embeddings (B, L, D))` hook (module docstring).
    batches yields (images, labels); at most max_images images (0 = all). -> (N,) float64 on the CPU."""
    scores, seen = [], 0
    for x, _ in batches:
        x = x[: max_images - seen] if max_images else x
        if x.shape[0] == 0:
            break
        with torch.enable_grad():
            log_px, emb = module.log_likelihood(model, x)
            if not (torch.is_tensor(emb) and emb.requires_grad):
                raise ProbeError(f"{module.__name__}.log_likelihood must return token embeddings that require grad "
                                 "(make the embedding output a leaf with .detach().requires_grad_(); the model itself "
                                 "is frozen)")  # fmt: skip
            if log_px.shape != (x.shape[0],):
                name = module.__name__
                raise ProbeError(f"{name}.log_likelihood must return log p(x) of shape (B,), got {tuple(log_px.shape)}")
            (grad,) = torch.autograd.grad(log_px.double().sum(), emb)
        scores.append(-grad.double().flatten(1).norm(dim=1).cpu())
        seen += x.shape[0]
    return torch.cat(scores)


# ==== Probes on cached features: linear (GCRL / MAE protocols), kNN, low-shot sampling ================================
@dataclass
class LinearProtocol:
    name: str
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    warmup_epochs: float
    schedule: str

    def describe(self) -> str:
        common_part = f"wd {self.weight_decay:g}, batch {self.batch_size}, {self.epochs} epochs"
        if self.name == "gcrl":
            return f"GCRL protocol (GCRL 4.2): Linear head, AdamW lr {self.lr:g} constant, {common_part}"
        return (f"MAE protocol (MAE main_linprobe.py): BatchNorm1d(affine=False) + Linear, LARS lr {self.lr:g}, "
                f"warmup {self.warmup_epochs:g} + cosine, {common_part}")  # fmt: skip

    def setting(self) -> dict:
        return {"linear_protocol": self.name, "lr": self.lr, "wd": self.weight_decay, "batch": self.batch_size,
                "epochs": self.epochs}  # fmt: skip


def linear_protocol(args: Args, dataset: str) -> LinearProtocol:
    """The linear-probe recipe chosen by --linear-protocol, with --epochs / --lr / --weight-decay overrides."""
    if args.linear_protocol == "gcrl":
        lr = args.lr or (0.1 if dataset in common.IMAGENET_DATASETS else 0.01)  # GCRL 4.2: 0.01 CIFAR, 0.1 ImageNet
        wd = 1e-4 if args.weight_decay < 0 else args.weight_decay  # GCRL 4.2
        return LinearProtocol("gcrl", "adamw", lr, wd, args.batch_size, args.epochs or 100, 0.0, "constant")
    if args.linear_protocol == "mae":
        lr = args.lr or common.scaled_lr(0.1, args.batch_size)  # MAE main_linprobe.py: blr 0.1, lr = blr * bs / 256
        wd = 0.0 if args.weight_decay < 0 else args.weight_decay  # MAE main_linprobe.py: weight_decay 0
        epochs = args.epochs or 90  # MAE main_linprobe.py: 90 epochs
        warmup = args.warmup_epochs if args.warmup_epochs >= 0 else 10 * epochs / 90  # MAE: 10 warmup of 90
        return LinearProtocol("mae", "lars", lr, wd, args.batch_size, epochs, warmup, "cosine")
    raise ProbeError(f"unknown --linear-protocol '{args.linear_protocol}'; use gcrl or mae")


def build_linear_head(dim: int, num_classes: int, protocol: str) -> nn.Module:
    """gcrl: nn.Linear (PyTorch default init). mae: BatchNorm1d(dim, affine=False, eps 1e-6) then Linear with
    trunc_normal(std 0.01) weights and zero bias (MAE main_linprobe.py)."""
    linear = nn.Linear(dim, num_classes)
    if protocol == "gcrl":
        return linear
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def train_linear_head(epoch_batches, dim: int, num_classes: int, proto: LinearProtocol, steps_per_epoch: int,
                      seed: int, device) -> nn.Module:  # fmt: skip
    """A fresh head (seeded init; the global RNG is left untouched) trained for proto.epochs on epoch_batches(epoch)
    -> (features (B, dim), labels (B,)) on `device`, per-step lr for the cosine schedule; returned in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = build_linear_head(dim, num_classes, proto.name).to(device)
    optimizer_class = torch.optim.AdamW if proto.optimizer == "adamw" else common.LARS
    optimizer = optimizer_class(head.parameters(), lr=proto.lr, weight_decay=proto.weight_decay)
    total, warmup = steps_per_epoch * proto.epochs, round(proto.warmup_epochs * steps_per_epoch)
    head.train()
    step = 0
    for epoch in common.progress(range(proto.epochs), f"training the {proto.name} probe", unit="epochs"):
        for x, y in epoch_batches(epoch):
            if proto.schedule == "cosine":
                common.set_lr(optimizer, common.cosine_lr(step, total, warmup, proto.lr))
            loss = F.cross_entropy(head(x.float()), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return head.eval()


@torch.no_grad()
def predict_proba(head: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """(N, D) -> softmax class probabilities (N, C) float32."""
    return torch.cat([F.softmax(head(x.float()).float(), dim=1) for x in feats.split(65536)])


def linear_eval(train, test, num_classes, proto, seed, num_bins) -> dict:
    """Fit the linear probe on train = (feats (N, D), labels (N,)), fixed features without augmentation, batches in a
    seeded order (the global RNG is left untouched); report test accuracy and ECE."""
    feats, labels = train[0].float(), train[1].to(train[0].device)
    n = feats.shape[0]
    B = min(proto.batch_size, n)
    steps_per_epoch = n // B  # drop_last as MAE; a set smaller than one batch is one batch
    g = torch.Generator().manual_seed(seed)

    def epoch_batches(epoch):
        perm = torch.randperm(n, generator=g)[: steps_per_epoch * B].to(feats.device)
        for idx in perm.view(steps_per_epoch, B):
            yield feats[idx], labels[idx]

    head = train_linear_head(epoch_batches, feats.shape[1], num_classes, proto, steps_per_epoch, seed, feats.device)
    return classification_metrics(predict_proba(head, test[0]), test[1], num_bins)


def knn_eval(train, test, num_classes, k, temperature, num_bins) -> dict:
    """Weighted kNN (common.knn_predict); probabilities = votes normalized to sum to 1 per test image."""
    chunk = max(16, min(1024, 2**27 // max(1, train[0].shape[0])))  # bound the (chunk, N_train) similarity block
    votes = common.knn_predict(train[0], train[1], test[0], num_classes, k, temperature, chunk).double()
    probs = votes / votes.sum(1, keepdim=True).clamp(min=1e-300)
    return classification_metrics(probs, test[1], num_bins)


def lowshot_indices(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Sorted indices of a class-balanced subset: round(fraction * N / C) images of every class (all when it has fewer),
    drawn without replacement, seeded. 1% of CIFAR-10 = 50 per class = 500 labels (GCRL Table 8)."""
    labels = labels.cpu()
    per_class = max(1, round(fraction * labels.numel() / num_classes))
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        picked.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
    return torch.cat(picked).sort().values


def holdout_split(labels: torch.Tensor, fraction: float, num_classes: int, seed: int):
    """Sorted (fit, held-out) indices: a class-balanced `fraction` held out (lowshot_indices), the rest to fit on."""
    held = lowshot_indices(labels, fraction, num_classes, seed)
    return torch.ones(labels.numel(), dtype=torch.bool).index_fill_(0, held, False).nonzero().squeeze(1), held


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


# ==== Model: rebuild from a checkpoint, freeze ========================================================================
def available_methods() -> list[str]:
    """Method files next to this script (those defining build_model)."""
    files = sorted(f for f in os.listdir(HERE) if f.endswith(".py") and f not in ("common.py", "eval_probe.py"))
    return [f[:-3] for f in files if "def build_model(" in pathlib.Path(HERE, f).read_text(errors="replace")]


def import_method(name) -> object:
    """Import the method file `<name>.py` (next to this script, or anywhere on sys.path) and check that it exposes
    the interface eval_probe consumes."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ProbeError(f"checkpoint names method {name!r}, which is not a method file name")
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    if importlib.util.find_spec(name) is None:
        known = ", ".join(available_methods()) or "none found"
        raise ProbeError(f"unknown method '{name}': no {name}.py next to eval_probe.py (method files: {known})")
    module = importlib.import_module(name)
    needed = ("Args", "build_model", "features", "num_feature_layers")
    missing = [f for f in needed if not hasattr(module, f)]
    if missing:
        raise ProbeError(f"{name} does not expose {', '.join(missing)}: not a method file with the eval interface "
                         f"(the method-file interface of the README: {', '.join(needed)})")  # fmt: skip
    return module


def check_state_dict(model: nn.Module, state: dict, where: str) -> None:
    """Raise a ProbeError naming the missing, unexpected and mis-shaped keys when `state` does not fit `model`."""
    own = model.state_dict()
    problems = {
        "missing keys": [k for k in own if k not in state],
        "unexpected keys": [k for k in state if k not in own],
        "shape mismatches": [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
                             if k in state and torch.is_tensor(state[k]) and state[k].shape != own[k].shape],
    }  # fmt: skip
    parts = [f"{what}: {', '.join(keys[:10])}" + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
             for what, keys in problems.items() if keys]  # fmt: skip
    if parts:
        prefixed = any(k.startswith(("module.", "_orig_mod.")) for k in problems["unexpected keys"])
        hint = " (keys carry a DDP/compile prefix: save the unwrapped model, common.unwrap)" if prefixed else ""
        raise ProbeError(f"{where}: the checkpoint's state_dict does not match the rebuilt model; "
                         f"{'; '.join(parts)}{hint}")  # fmt: skip


def load_model(ckpt_path: str, untrained: bool = False, seed: int = 0, device="cpu"):
    """Rebuild the checkpoint's model: (module, method Args, model, checkpoint dict). The model is frozen on `device`:
    no parameter receives a gradient and eval mode keeps BatchNorm statistics and dropout fixed, so probing never
    changes the backbone. untrained=True: fresh parameters and BatchNorm statistics from build_model (seeded); other
    buffers (e.g. a color palette fitted to the data) still come from the checkpoint."""
    if not ckpt_path:
        raise ProbeError("--ckpt is required (a checkpoint.pt written by a method script)")
    if not os.path.isfile(ckpt_path):
        raise ProbeError(f"checkpoint {ckpt_path} does not exist")
    try:
        ckpt = common.load_checkpoint(ckpt_path)
    except ValueError as e:
        raise ProbeError(str(e)) from e
    except Exception as e:  # torch.load on a file that is not a torch archive (pickle / zip errors)
        raise ProbeError(f"{ckpt_path} is not a checkpoint of this repository (torch.load failed: {e})") from e
    if not isinstance(ckpt.get("args"), dict) or not isinstance(ckpt["model"], dict):
        raise ProbeError(f"{ckpt_path} is not a checkpoint of this repository ('args' / 'model' are not dicts)")
    module = import_method(ckpt["method"])
    unknown = sorted(set(ckpt["args"]) - {f.name for f in dataclasses.fields(module.Args)})
    if unknown:
        raise ProbeError(f"the checkpoint's args have fields that {module.__name__}.Args does not know: {unknown} "
                         f"(written by another version of {module.__name__}.py?)")  # fmt: skip
    args = module.Args(**ckpt["args"])
    with torch.random.fork_rng(devices=[]):
        common.seed_everything(seed)
        model = module.build_model(args)
    check_state_dict(model, ckpt["model"], f"{ckpt_path} ({ckpt['method']}.build_model)")
    if untrained:
        bn_stats = ("running_mean", "running_var", "num_batches_tracked")
        params = {name for name, _ in model.named_parameters()}
        keep = {k: v for k, v in ckpt["model"].items() if k not in params and not k.endswith(bn_stats)}
        model.load_state_dict(keep, strict=False)
    else:
        model.load_state_dict(ckpt["model"])
    return module, args, model.to(device).requires_grad_(False).eval(), ckpt


# ==== Features: extraction (frozen, no grad) and the on-disk cache ====================================================
@torch.no_grad()
def extract_features(module, model, batches, layer: int | None = None, pool: str = "", amp: bool = False,
                     label: str = "extracting features", total: int | None = None):  # fmt: skip
    """Features of a frozen model for batches of (images float (B, 3, S, S) in [0, 1] on its device, labels (B,));
    pool "" = the method's default. Returns (feats (N, D) float32 CPU, labels (N,) int64 CPU)."""
    if model.training or any(p.requires_grad for p in model.parameters()):
        raise RuntimeError("extract_features needs a frozen model (eval mode, requires_grad False): see load_model()")
    feats, labels = [], []
    for x, y in common.progress(batches, label, total):
        with common.autocast(x.device, enabled=amp and x.device.type == "cuda"):
            f = module.features(model, x, layer=layer, pool=pool or None)
        if f.ndim != 2 or f.shape[0] != x.shape[0]:
            shape, n = tuple(f.shape), x.shape[0]
            raise ProbeError(f"{module.__name__}.features returned shape {shape} for {n} images; expected (B, D)")
        feats.append(f.float().cpu())
        labels.append(y.cpu().long())
    if not feats:
        raise ProbeError("no images to extract features from (empty dataset)")
    return torch.cat(feats), torch.cat(labels)


def cached_features(cache_dir: str | None, ident: dict, compute):
    """(feats, labels, num_classes) from the cache file of `ident` in cache_dir when its stored identity matches,
    else compute() and store it (atomic write). cache_dir None = no cache."""
    key = json.dumps(ident, sort_keys=True)
    if cache_dir is None:
        return compute()
    layer = "std" if ident["layer"] is None else f"block{ident['layer']}"
    weights, digest = "untrained" if ident["untrained"] else "trained", hashlib.sha1(key.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{ident['dataset']}_{ident['split']}_{layer}_{ident['pool'] or 'default'}_"
                        f"{weights}_{digest}.pt")  # fmt: skip
    if os.path.exists(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("ident") == key:
                return blob["feats"], blob["labels"], int(blob["num_classes"])
        except Exception as e:  # a truncated / foreign file is recomputed, not trusted
            print(f"ignoring unreadable feature cache {path}: {e}")
    feats, labels, num_classes = compute()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"ident": key, "feats": feats, "labels": labels, "num_classes": num_classes}, tmp)
    os.replace(tmp, path)
    return feats, labels, num_classes


class FeatureStore:
    """Features of (dataset, split, layer, pool) for one frozen model, computed once and cached on disk next to the
    checkpoint, keyed by its absolute path, mtime and size (a new checkpoint invalidates the cache), the weights
    (trained / untrained + seed), the data settings, split, layer and pool; datasets are only read on a cache miss."""

    def __init__(self, module, model, ckpt_path: str, args: Args, data_defaults: dict, device, margs=None):
        self.module, self.model, self.args, self.device, self.margs = module, model, args, device, margs
        self.data = data_defaults  # dataset, data_root, image_size, synthetic_size, eval_view
        st = os.stat(ckpt_path)
        self.ckpt_ident = {"ckpt": os.path.abspath(ckpt_path), "mtime_ns": st.st_mtime_ns, "size": st.st_size}
        self.cache_dir = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "feature_cache")
        self.datasets, self.memory = {}, {}  # (name, split) -> dataset; identity -> features held in memory

    def dataset(self, name: str, split: str):
        if (name, split) not in self.datasets:
            size = self.data["synthetic_size"] if name == "synthetic" else 0
            self.datasets[name, split] = common.build_dataset(name, root=self.data["data_root"], train=split == "train",
                download=self.args.download, image_size=self.data["image_size"],
                **({"synthetic_size": size} if size else {}))  # fmt: skip
        return self.datasets[name, split]

    def batches(self, name: str, split: str, batch_size: int):
        hook = getattr(self.module, "eval_batches", None)  # a dataset only the method file builds (RandBit, ...)
        if hook is not None and name == self.data["dataset"] and name not in common.DATASET_NAMES:
            return hook(self.margs, split, batch_size, self.device)
        return common.eval_batches(self.dataset(name, split), self.data["image_size"], batch_size, self.device,
                                   num_workers=self.args.num_workers, **self.data["eval_view"])  # fmt: skip

    def get(self, name: str, split: str, layer: int | None, pool: str, keep: bool = True):
        """(feats (N, D) float32, labels (N,), num_classes) on the probe device. keep=False: not held in memory
        after the call (the per-block sweep would otherwise hold every block's features at once)."""
        ident = {**self.ckpt_ident, "untrained": self.args.untrained, "seed": self.args.seed if self.args.untrained
                 else None, "dataset": name, "data_root": os.path.abspath(self.data["data_root"]), "synthetic_size":
                 self.data["synthetic_size"] if name == "synthetic" else 0, "image_size": self.data["image_size"],
                 "eval_view": self.data["eval_view"], "split": split, "layer": layer, "pool": pool}  # fmt: skip
        mkey = json.dumps(ident, sort_keys=True)
        if mkey in self.memory:
            return self.memory[mkey]

        def compute():
            bs, known = self.args.extract_batch_size, name in common.DATASET_NAMES
            batches = self.batches(name, split, bs)
            total = -(-len(self.dataset(name, split)) // bs) if known else None  # batches, for the progress line
            where = f"{name} {split}" + ("" if layer is None else f", block {layer}")
            feats, labels = extract_features(self.module, self.model, batches, layer, pool, self.args.amp,
                                             f"extracting features ({where})", total)  # fmt: skip
            num_classes = getattr(self.datasets.get((name, split)), "num_classes", None) or int(labels.max()) + 1
            return feats, labels, int(num_classes)

        feats, labels, num_classes = cached_features(self.cache_dir if self.args.cache else None, ident, compute)
        out = (feats.to(self.device), labels.to(self.device), num_classes)
        if keep:
            self.memory[mkey] = out
        return out

    def train_test(self, name: str, layer: int | None, pool: str, keep: bool = True):
        """((train feats, labels), (test feats, labels), num_classes) of dataset `name`."""
        tr_x, tr_y, num_classes = self.get(name, "train", layer, pool, keep)
        te_x, te_y, _ = self.get(name, "test", layer, pool, keep)
        return (tr_x, tr_y), (te_x, te_y), num_classes


# ==== Protocols (each returns one result row: setting + metrics) ======================================================
def run_linear(store: FeatureStore, args: Args, name: str, layer, pool) -> dict:
    train, test, C = store.train_test(name, layer, pool)
    proto = linear_protocol(args, name)
    print(f"linear probe: {proto.describe()}")
    metrics = linear_eval(train, test, C, proto, args.seed, args.ece_bins)
    return {"protocol": "linear", "setting": proto.setting(), "metrics": metrics}


def run_knn(store: FeatureStore, args: Args, name: str, layer, pool) -> dict:
    train, test, C = store.train_test(name, layer, pool)
    print(f"kNN: k {args.knn_k}, temperature {args.knn_temperature:g}, cosine, vote-weighted (Wu et al. 2018)")
    metrics = knn_eval(train, test, C, args.knn_k, args.knn_temperature, args.ece_bins)
    return {"protocol": "knn", "setting": {"k": args.knn_k, "temperature": args.knn_temperature}, "metrics": metrics}


def run_linear_aug(store: FeatureStore, args: Args, name: str, layer, pool) -> dict:
    """MAE main_linprobe.py: every epoch, RandomResizedCrop(S, scale (0.08, 1), bicubic) + flip views of the training
    split go through the frozen backbone into the MAE head; the test split is the eval view (cached features)."""
    proto = linear_protocol(dataclasses.replace(args, linear_protocol="mae"), name)
    size = store.data["image_size"]
    train_set = store.dataset(name, "train")
    C = getattr(train_set, "num_classes", None) or int(common.dataset_labels(train_set).max()) + 1
    B = min(proto.batch_size, len(train_set))
    view = dict(scale=(0.08, 1.0), interpolation="bicubic")  # MAE main_linprobe: RandomResizedCrop(224, interp. 3)
    batches = common.TrainBatches(train_set, ["mae"], size, B, common.DistInfo(device=torch.device(store.device)),
                                  seed=args.seed, num_workers=args.num_workers, aug_kwargs=view)  # fmt: skip
    print(f"linear_aug: {proto.describe()}; RandomResizedCrop({size}, scale 0.08-1, bicubic) + flip, "
          f"{batches.steps_per_epoch} steps per epoch")  # fmt: skip

    def epoch_batches(epoch):
        for (x,), y in batches.epoch(epoch):
            with torch.no_grad(), common.autocast(x.device, enabled=args.amp and x.device.type == "cuda"):
                f = store.module.features(store.model, x, layer=layer, pool=pool or None)
            yield f.float(), y

    te_x, te_y, _ = store.get(name, "test", layer, pool)
    with torch.random.fork_rng(devices=[]):  # the augmentation draws are seeded too
        torch.manual_seed(args.seed)
        head = train_linear_head(epoch_batches, te_x.shape[1], C, proto, batches.steps_per_epoch, args.seed,
                                 store.device)  # fmt: skip
    metrics = classification_metrics(predict_proba(head, te_x), te_y, args.ece_bins)
    return {"protocol": "linear_aug", "setting": {**proto.setting(), "augment": "rrc0.08+flip"}, "metrics": metrics}


def run_layers(store: FeatureStore, args: Args, name: str, layer, pool) -> dict:
    """iGPT 4.1: probe every block on a held-out part of the training split, pick the best, report its test score."""
    depth = int(store.module.num_feature_layers(store.model))
    proto = linear_protocol(args, name)
    how = proto.describe() if args.layers_probe == "linear" else f"kNN k {args.knn_k}"
    frac = args.layers_val_fraction
    print(f"layers: probing the output of each of {depth} blocks with {how}; block chosen on {frac:.0%} of train")

    def score(train, test, C):
        if args.layers_probe == "linear":
            return linear_eval(train, test, C, proto, args.seed, args.ece_bins)
        return knn_eval(train, test, C, args.knn_k, args.knn_temperature, args.ece_bins)

    metrics, best = {}, None
    for layer in range(depth):
        tr_x, tr_y, C = store.get(name, "train", layer, pool, keep=False)
        fit, held = (i.to(tr_x.device) for i in holdout_split(tr_y, frac, C, args.seed))
        m = score((tr_x[fit], tr_y[fit]), (tr_x[held], tr_y[held]), C)
        metrics[f"block{layer}/val_acc"] = m["acc"]
        print(f"  block {layer}: held-out acc {m['acc']:.4f}")
        if best is None or m["acc"] > metrics[f"block{best}/val_acc"]:
            best = layer
    m = score(*store.train_test(name, best, pool, keep=False))
    print(f"  chosen block {best}: test acc {m['acc']:.4f}  ece {m['ece']:.4f}")
    metrics.update({"best_block": best, "best/acc": m["acc"], "best/ece": m["ece"]})
    setting = {"probe": args.layers_probe, "blocks": depth, "val_fraction": frac}
    if args.layers_probe == "linear":
        setting.update(proto.setting())
    return {"protocol": "layers", "setting": setting, "metrics": metrics}


def run_ood(store: FeatureStore, args: Args, name: str, layer, pool) -> dict:
    (tr_x, tr_y), (in_x, _), C = store.train_test(name, layer, pool)
    out_x, _, _ = store.get(args.ood_dataset, "test", layer, pool)
    print(f"ood: {name} test (in, positive) vs {args.ood_dataset} test (out); class-conditional Gaussian score "
          f"max_c log N(z | mu_c, Sigma_c), ridge {args.ood_ridge:g} (GCRL 4.3)")  # fmt: skip
    scores = class_gaussian_score(tr_x, tr_y, C, torch.cat([in_x, out_x]), args.ood_ridge)  # one fit, both sets
    s_in, s_out = scores[: in_x.shape[0]], scores[in_x.shape[0] :]
    metrics = {"sup/auroc": auroc(s_in, s_out), "sup/auprc": auprc(s_in, s_out)}
    if args.ood_grad and hasattr(store.module, "log_likelihood"):
        print("ood: unsupervised score -||d log p(x) / d token embeddings||_2 (GCRL Table 6)")
        bs, cap = args.ood_grad_batch_size, args.ood_max_images
        g_in = likelihood_gradient_scores(store.module, store.model, store.batches(name, "test", bs), cap)
        g_out = likelihood_gradient_scores(store.module, store.model, store.batches(args.ood_dataset, "test", bs), cap)
        metrics.update({"unsup/auroc": auroc(g_in, g_out), "unsup/auprc": auprc(g_in, g_out)})
    elif args.ood_grad:
        print(f"ood: {store.module.__name__} has no log_likelihood hook (no density): supervised score only")
    setting = {"ood_dataset": args.ood_dataset, "ridge": args.ood_ridge, "n_in": in_x.shape[0], "n_out": out_x.shape[0]}
    return {"protocol": "ood", "setting": setting, "metrics": metrics}


def run_lowshot(store: FeatureStore, args: Args, name: str, layer, pool) -> dict:
    (tr_x, tr_y), test, C = store.train_test(name, layer, pool)
    proto = linear_protocol(args, name)
    fractions, seeds = parse_list(args.lowshot_fractions), parse_list(args.seeds, int)
    print(f"lowshot: fractions {fractions}, seeds {seeds}, class balanced; linear probe: {proto.describe()}")
    metrics = {}
    for frac in fractions:
        runs = []
        for seed in seeds:
            idx = lowshot_indices(tr_y, frac, C, seed).to(tr_x.device)
            runs.append(linear_eval((tr_x[idx], tr_y[idx]), test, C, proto, seed, args.ece_bins))
        key = f"{frac:g}"
        for m in ("acc", "ece"):
            metrics[f"{key}/{m}_mean"], metrics[f"{key}/{m}_std"] = mean_std([r[m] for r in runs])
        metrics[f"{key}/labels"] = int(idx.numel())
        acc, ece = (f"{metrics[f'{key}/{m}_mean']:.4f} +- {metrics[f'{key}/{m}_std']:.4f}" for m in ("acc", "ece"))
        print(f"  {frac:.0%} ({idx.numel()} labels): acc {acc}  ece {ece}")
    return {"protocol": "lowshot", "setting": {**proto.setting(), "seeds": seeds}, "metrics": metrics}


# ==== Results: eval_results.jsonl / .csv next to the checkpoint, printed table ========================================
def parse_list(s: str, kind=float) -> list:
    """'0.01,0.05' -> [0.01, 0.05] (kind float or int), or a ProbeError naming the text."""
    try:
        return [kind(v) for v in re.split(r"[,\s]+", str(s).strip()) if v]
    except ValueError as e:
        raise ProbeError(f"expected comma-separated {kind.__name__} values, got '{s}'") from e


def parse_protocols(s: str) -> list[str]:
    names = [p for p in re.split(r"[,\s]+", s.strip()) if p]
    if names == ["all"]:
        return list(PROTOCOLS)
    unknown = [p for p in names if p not in PROTOCOLS]
    if unknown or not names:
        raise ProbeError(f"unknown protocol(s) {unknown or s!r}; choose from {', '.join(PROTOCOLS)} or all")
    return names


CSV_FIELDS = ["date", "checkpoint", "method", "weights", "step", "dataset", "protocol", "setting", "metric", "value"]


def append_results(out_dir: str, rows: list[dict]) -> None:
    """Append one JSON object per protocol run to eval_results.jsonl and one CSV row per metric to eval_results.csv
    (long format, so runs with different metrics share one header)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval_results.jsonl"), "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    path = os.path.join(out_dir, "eval_results.csv")
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            setting = ";".join(f"{k}={v}" for k, v in row["setting"].items())
            for metric, value in row["metrics"].items():
                writer.writerow({**{k: row[k] for k in CSV_FIELDS[:7]}, "setting": setting, "metric": metric,
                                 "value": value})  # fmt: skip


def format_table(rows: list[dict]) -> str:
    """One line per metric: protocol, metric, value, and the protocol's setting on its first line."""
    lines = [f"{'protocol':<9} {'metric':<16} {'value':>8}   setting"]
    for row in rows:
        setting = " ".join(f"{k}={v}" for k, v in row["setting"].items())
        for i, (metric, value) in enumerate(row["metrics"].items()):
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            line = f"{row['protocol'] if i == 0 else '':<9} {metric:<16} {shown:>8}   {setting if i == 0 else ''}"
            lines.append(line.rstrip())
    return "\n".join(lines)


# ==== main ============================================================================================================
def eval_view(eval_crop: str, image_size: int) -> dict:
    """The eval view's keyword arguments (common.augment_config "eval"): {} = the image resized to S (GCRL / iGPT at
    32-64 px); resize_crop = shorter side to S / 0.875 bicubic, then the center S x S (MAE main_linprobe, CAN and
    SimCLR at 224 px). auto: resize_crop from 224 px on."""
    if eval_crop == "resize_crop" or (eval_crop == "auto" and image_size >= 224):
        return dict(crop_ratio=0.875, interpolation="bicubic")
    return {}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the chosen protocols on one checkpoint; returns the result rows (also appended to eval_results.*)."""
    args = common.parse_args(Args, argv)
    with common.usage_errors(METHOD):  # bad input: one line naming the flag, exit status 2
        protocols = parse_protocols(args.protocols)
        device = common.setup_distributed(args.device).device
        module, margs, model, ckpt = load_model(args.ckpt, args.untrained, args.seed, device)
        ckpt_dir = os.path.dirname(os.path.abspath(args.ckpt))
        ck = ckpt["args"]
        data = {"dataset": args.dataset or ck.get("dataset") or "", "data_root": args.data_root or ck.get("data_root")
                or "data", "image_size": args.image_size or ck.get("image_size") or 0,
                "synthetic_size": args.synthetic_size or ck.get("synthetic_size") or 0}  # fmt: skip
        data["eval_view"] = eval_view(args.eval_crop, data["image_size"])
        if not data["dataset"]:
            raise ProbeError("the checkpoint's args name no dataset: pass --dataset")
        if not data["image_size"]:
            raise ProbeError("the checkpoint's args name no image_size: pass --image-size")
        own = ck.get("dataset") if hasattr(module, "eval_batches") else None  # a dataset only the method builds
        known = ", ".join(common.DATASET_NAMES + ((own,) if own and own not in common.DATASET_NAMES else ()))
        for flag, name in (("--dataset", data["dataset"]), ("--ood-dataset", args.ood_dataset)):
            if (flag == "--dataset" or "ood" in protocols) and name not in common.DATASET_NAMES and name != own:
                raise ProbeError(f"{flag} {name}: unknown dataset; one of {known}")
        if args.image_size and ck.get("image_size") and args.image_size != ck["image_size"]:
            raise ProbeError(f"--image-size {args.image_size} does not match the checkpoint's {ck['image_size']} px "
                             "(the model's input size is fixed at training time): leave --image-size at 0")  # fmt: skip
        layer, pool = None if args.layer < 0 else args.layer, "" if args.pool == "auto" else args.pool
        depth = module.num_feature_layers(model)
        if layer is not None and layer >= depth:
            raise ProbeError(f"--layer {layer}: {ckpt['method']} has {depth} blocks (0-based)")
        out_dir = args.output_dir or ckpt_dir
        folders = {out_dir: "eval_results.jsonl (--output-dir picks another folder)"}
        if args.cache:
            folders[os.path.join(ckpt_dir, "feature_cache")] = "the feature cache: pass --no-cache to skip it"
        for folder, what in folders.items():
            if reason := common.unwritable(folder):
                raise ProbeError(f"cannot write {what} in {folder} ({reason})")

    weights = "untrained" if args.untrained else "trained"
    print(f"{ckpt['method']} checkpoint {args.ckpt} (step {ckpt.get('step')}, {weights} weights) on {device}; "
          f"probing {data['dataset']} at {data['image_size']} px, features: "
          f"{'standard' if layer is None else f'block {layer}'}, pool {args.pool}, eval view "
          f"{'resize S/0.875 bicubic + center crop' if data['eval_view'] else 'the image at S'}")  # fmt: skip
    store = FeatureStore(module, model, args.ckpt, args, data, device, margs)
    name, rows = data["dataset"], []
    for protocol in protocols:
        run = {"linear": run_linear, "linear_aug": run_linear_aug, "knn": run_knn, "layers": run_layers,
               "ood": run_ood, "lowshot": run_lowshot}[protocol]  # fmt: skip
        row = run(store, args, name, layer, pool)
        if protocol != "layers":
            row["setting"] = {"layer": "std" if layer is None else layer, "pool": args.pool, **row["setting"]}
        row["setting"]["eval_view"] = "resize_crop" if data["eval_view"] else "full"
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        rows.append({"date": date, "checkpoint": os.path.abspath(args.ckpt), "method": ckpt["method"],
                     "weights": weights, "step": ckpt.get("step"), "dataset": name, **row})  # fmt: skip
    append_results(out_dir, rows)
    print(f"\n{ckpt['method']} ({weights}, step {ckpt.get('step')}) on {name}; results appended to "
          f"{os.path.join(out_dir, 'eval_results.jsonl')} / .csv")  # fmt: skip
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    with common.usage_errors(METHOD):  # a ProbeError raised while the protocols run (an empty class, ...): one line
        main()
