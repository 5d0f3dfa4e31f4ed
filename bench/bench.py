"""Side-by-side CPU/GPU benchmarks of this repository against the tools a user would pick instead (issue #19).

Every comparison runs both contenders in ONE process on the same inputs, interleaved (A B, B A, A B, ...; after
warm-up) so that a noisy, shared machine slows both alike, and reports the median time of each and the median,
min and max of the per-repetition speed-up ratio `ref / ours` (> 1: this repository is faster).

    python bench/bench.py aug --sizes 32 64 96 224            # BatchedAugment vs the per-image torchvision v2 pipeline
    python bench/bench.py aug --kind mae --sizes 32 64 96     # the same for the MAE view (crop, bicubic, flip)
    python bench/bench.py attention --widths 64 128 256       # igpt dense vs axial blocks, 32x32 tokens, fwd + bwd
    python bench/bench.py mae --official-mae /tmp/mae/models_mae.py   # mae.py step vs the official models_mae.py
    python bench/bench.py tokenloss                           # cross-entropy on flat rows vs a transposed view
    python bench/bench.py flops                               # FlopCounter vs 6*N*T + 12*L*T^2*d for the ViT methods

`mae` needs timm (only for the benchmark, never for the repository): `pip install --target /work/benchdeps timm` and
PYTHONPATH=/work/benchdeps, and the official models_mae.py with its util/pos_embed.py beside it (git clone
facebookresearch/mae). The official file is imported unchanged; two shims for today's libraries are applied at
import time here: timm's Block no longer takes `qk_scale` (dropped, it was None), numpy no longer has `np.float`.
GPU images/s and MFU of every method: bench/gpu.py.
"""

# ruff: noqa: B023  (the closures timed in each loop iteration are called within that iteration)
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(contenders: dict, reps: int, warmup: int = 1, device="cpu") -> dict[str, list[float]]:
    """Seconds per call of each contender, `reps` times, alternating the order every repetition."""
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    times = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            sync(device)
            t = time.perf_counter()
            contenders[n]()
            sync(device)
            times[n].append(time.perf_counter() - t)
    return times


def report(label: str, times: dict[str, list[float]], ours: str, ref: str, unit: str = "ms") -> dict:
    ratios = sorted(a / b for a, b in zip(times[ref], times[ours]))
    scale = 1e3 if unit == "ms" else 1.0
    row = {
        "case": label,
        f"{ref} {unit}": statistics.median(times[ref]) * scale,
        f"{ours} {unit}": statistics.median(times[ours]) * scale,
        "speed-up median": statistics.median(ratios),
        "min": ratios[0],
        "max": ratios[-1],
    }
    print(
        f"{label:<34} {ref} {row[f'{ref} {unit}']:9.2f} {unit} | {ours} {row[f'{ours} {unit}']:9.2f} {unit} | "
        f"{ref}/{ours} median {row['speed-up median']:.2f}x (min {row['min']:.2f}, max {row['max']:.2f}, "
        f"n={len(ratios)})",
        flush=True,
    )
    return row


# ----------------------------------------------------------------------------------------------------- augmentation


def bench_aug(a) -> None:
    """The view `--kind` (SimCLR's strong view by default) of a (B, 3, S, S) uint8 batch stored at the view size
    (CIFAR 32, ImageNet64, STL-10 96, ImageNet 224): one BatchedAugment call vs the per-image v2 pipeline over the
    B images (what a DataLoader worker runs, here in the main process with the same thread count)."""
    for S in a.sizes:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (a.batch, 3, S, S), dtype=torch.uint8, generator=g)
        per_image = common.per_image_transform(a.kind, S)
        batched = common.BatchedAugment(a.kind, S)
        contenders = {
            "per-image": lambda: torch.stack([per_image(img) for img in images]),
            "batched": lambda: batched(images),
        }
        report(f"{a.kind} {S}px batch {a.batch}", interleaved(contenders, a.reps, 1), "batched", "per-image")


# ----------------------------------------------------------------------------------------------------- attention


def bench_attention(a) -> None:
    """igpt.py's block stack at 32x32 tokens (1024): dense causal vs axial causal, forward + backward of the summed
    output, same width / depth / heads (GCRL Table 11's comparison)."""
    H = W = a.grid
    for d in a.widths:
        heads = max(1, d // 32)  # head width 32: igpt_10m is 256 wide with 8 heads (GCRL 3.2)
        blocks = {
            mode: torch.nn.Sequential(*[common.Block(d, heads, attention=mode, grid=(H, W)) for _ in range(a.depth)])
            for mode in ("axial_dense", "axial")
        }
        x = torch.randn(a.batch, H * W, d, requires_grad=True)

        def step(m):
            out = x
            for blk in m:
                out = blk(out, is_causal=True)
            out.sum().backward()

        contenders = {"dense": lambda: step(blocks["axial_dense"]), "axial": lambda: step(blocks["axial"])}
        report(f"width {d} heads {heads} depth {a.depth}", interleaved(contenders, a.reps, 1), "axial", "dense")
        if a.profile:
            for name, fn in contenders.items():
                print(f"  {name}: {profile_shares(fn)}", flush=True)


def profile_shares(fn, reps: int = 2) -> str:
    """Where the time of fn goes (torch.profiler, self CPU time): matrix products, attention kernels, copies."""
    from torch.profiler import profile

    fn()
    with profile() as prof:
        for _ in range(reps):
            fn()
    groups = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"), "attention": ("scaled_dot_product",),
              "copies": ("aten::copy_", "aten::cat", "aten::constant_pad_nd")}  # fmt: skip
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {g: sum(e.self_cpu_time_total for e in events if any(k in e.key for k in ks)) for g, ks in groups.items()}
    return ", ".join(f"{g} {v / total:.0%}" for g, v in shares.items()) + f" of {total / reps / 1e3:.0f} ms"


# ----------------------------------------------------------------------------------------------------- MAE


def load_official_mae(path: str):
    """Import facebookresearch/mae's models_mae.py unchanged, with the shims for today's timm and numpy."""
    import numpy as np

    if not hasattr(np, "float"):
        np.float = float  # util/pos_embed.py uses np.float (removed in numpy 1.24): the builtin it aliased
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)  # `from util.pos_embed import ...`
    spec = importlib.util.spec_from_file_location("official_models_mae", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    timm_block = module.Block

    def block(*args, qk_scale=None, **kw):  # timm >= 0.9 dropped qk_scale (the official code passes None)
        return timm_block(*args, **kw)

    module.Block = block
    return module


MAE_CONFIGS = {  # name: (image, patch, arch, decoder dim, depth, heads, batch): mae.py's cifar preset and ViT-B/16
    "tiny32": (32, 4, "vit_tiny", 256, 4, 8, 64),
    "b224": (224, 16, "vit_base", 512, 8, 16, 8),
}


def bench_mae(a) -> None:
    import mae

    official = load_official_mae(a.official_mae)
    for name in a.configs:
        S, p, arch, ddim, ddepth, dheads, batch = MAE_CONFIGS[name]
        batch = a.batch or batch
        dim, depth, heads = common.vit_arch(arch)
        args = mae.Args(image_size=S, patch_size=p, arch=arch, decoder_dim=ddim, decoder_depth=ddepth,
                        decoder_heads=dheads, amp=False)  # fmt: skip
        torch.manual_seed(0)
        ours = mae.build_model(args)
        ref = official.MaskedAutoencoderViT(
            img_size=S, patch_size=p, embed_dim=dim, depth=depth, num_heads=heads, decoder_embed_dim=ddim,
            decoder_depth=ddepth, decoder_num_heads=dheads, mlp_ratio=4.0,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), norm_pix_loss=True,  # as mae_vit_*
        )  # fmt: skip
        n_ours = sum(t.numel() for t in ours.parameters())
        n_ref = sum(t.numel() for t in ref.parameters())
        images = torch.rand(batch, 3, S, S)
        normalized = common.normalize(images)  # the official model gets what its DataLoader's Normalize produced
        opt_ours = common.make_adamw(common.param_groups(ours, 0.05), 1e-4)
        opt_ref = common.make_adamw(common.param_groups(ref, 0.05), 1e-4)

        def step_ours():
            terms, _ = mae.mae_losses(ours, images, args)
            opt_ours.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt_ours.step()

        def step_ref():
            loss, _, _ = ref(normalized, mask_ratio=0.75)
            opt_ref.zero_grad(set_to_none=True)
            loss.backward()
            opt_ref.step()

        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):  # FlopCounterMode sees attention's matmuls only in the math kernel on a CPU
            f_ours = common.count_flops(lambda: mae.mae_losses(ours, images[:2], args)[0]["total"].backward()) / 2
            f_ref = common.count_flops(lambda: ref(normalized[:2], mask_ratio=0.75)[0].backward()) / 2
        print(f"{name}: params ours {n_ours} official {n_ref}; GFLOPs/image ours {f_ours / 1e9:.4f} official "
              f"{f_ref / 1e9:.4f}; threads {torch.get_num_threads()}", flush=True)  # fmt: skip
        times = interleaved({"official": step_ref, "mae.py": step_ours}, a.reps, 2)
        report(f"MAE {name} step, batch {batch}", times, "mae.py", "official")


# ----------------------------------------------------------------------------------------------------- token loss


def bench_tokenloss(a) -> None:
    """The pixel-token loss: cross-entropy of (B, L, K) logits on flat rows (B*L, K) vs the (B, K, L) transposed view
    that F.cross_entropy reads with a stride of K, forward + backward."""
    B, L, K = a.batch, 1024, 512
    logits = torch.randn(B, L, K, requires_grad=True)
    tokens = torch.randint(0, K, (B, L))

    def flat():
        F.cross_entropy(logits.reshape(-1, K), tokens.reshape(-1), reduction="none").view(B, L).mean().backward()

    def transposed():
        F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").mean().backward()

    import torch.nn.functional as F

    report(f"token NLL B={B} L={L} K={K}", interleaved({"transposed": transposed, "flat": flat}, a.reps), "flat",
           "transposed")  # fmt: skip


# ----------------------------------------------------------------------------------------------------- FLOPs


def bench_flops(a) -> None:
    """FLOPs per image counted by common.count_flops vs the analytic 6*N*T + 12*L*T^2*d (N = parameters inside the
    transformer blocks, T tokens through them, L blocks, d width; causal attention counted as full T^2, as
    FlopCounterMode and the PaLM MFU convention do) for a plain ViT encoder forward + backward."""
    for arch, S, p in (("vit_tiny", 32, 4), ("vit_base", 224, 16)):
        d, L, heads = common.vit_arch(arch)
        T = (S // p) ** 2 + 1
        with torch.device("meta"):
            vit = common.VisionTransformer(S, p, 3, d, L, heads)
            counted = common.count_flops(lambda: vit(torch.rand(2, 3, S, S)).float().sum().backward()) / 2
        N = sum(t.numel() for t in vit.blocks.parameters() if t.ndim > 1)
        analytic = 6 * N * T + 12 * L * T * T * d + 6 * (3 * p * p * d) * (T - 1)  # + the patch embedding
        print(f"{arch}/{p} at {S}px: counted {counted / 1e9:.4f} GFLOPs, analytic {analytic / 1e9:.4f} "
              f"({counted / analytic - 1:+.2%})", flush=True)  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["aug", "attention", "mae", "tokenloss", "flops"])
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions per contender")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: what each DataLoader worker gets)")
    parser.add_argument("--batch", type=int, default=0, help="batch (0: each benchmark's default)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 224], help="aug: view sizes")
    parser.add_argument("--kind", default="simclr", choices=["simclr", "mae", "weak"], help="aug: view kind")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256], help="attention: model widths")
    parser.add_argument("--depth", type=int, default=2, help="attention: blocks")
    parser.add_argument("--grid", type=int, default=32, help="attention: tokens per side")
    parser.add_argument("--profile", action="store_true", help="attention: also print where each step's time goes")
    parser.add_argument("--official-mae", default="", help="mae: path of facebookresearch/mae's models_mae.py")
    parser.add_argument("--configs", nargs="+", default=list(MAE_CONFIGS), choices=list(MAE_CONFIGS))
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs", flush=True)
    if a.what == "aug":
        a.batch = a.batch or 256
        bench_aug(a)
    elif a.what == "attention":
        a.batch = a.batch or 4
        bench_attention(a)
    elif a.what == "mae":
        if not a.official_mae:
            raise SystemExit("mae needs --official-mae PATH/models_mae.py (facebookresearch/mae) and timm importable")
        bench_mae(a)
    elif a.what == "tokenloss":
        a.batch = a.batch or 16
        bench_tokenloss(a)
    else:
        bench_flops(a)


if __name__ == "__main__":
    main()
