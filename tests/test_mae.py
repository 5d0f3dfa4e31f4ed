"""mae.py: masking counts and semantics, encoder on visible patches only, the decoder's mask token and positions,
patchify layout, the loss against a hand computation (with and without norm_pix_loss), per-patch un-normalized
pictures, timm key names, presets and errors, and the script end to end (python and torchrun), with bitwise-exact
resume and a learning smoke test on held-out images."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, read_png, run_distributed, run_script

import common
import mae

TINY = ["--preset", "tiny", "--no-amp"]  # bf16 matmuls are ~15x slower than fp32 on CPUs without bf16 units


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread in this file, as run_script gives its subprocesses (OMP_NUM_THREADS=1): the tiny models
    gain nothing from two, and on a busy 2-core machine two threads per process made a training step ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_args(*extra: str) -> mae.Args:
    return common.parse_args(mae.Args, TINY + list(extra), mae.PRESETS)


def tiny_model(args: mae.Args, seed: int = 0) -> mae.MAE:
    torch.manual_seed(seed)
    return mae.build_model(args)


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("L, ratio, keep, reference", [(100, 0.9, 10, 9), (50, 0.8, 10, 9), (196, 0.75, 49, 49)])
def test_keep_count_is_exact_where_the_reference_int_loses_a_patch(L, ratio, keep, reference):
    """keep = floor(L * (1 - r)) in exact arithmetic; the ref code's int(L * (1 - r)) drops a patch to float error
    (int(100 * (1 - 0.9)) = int(9.999999999999998) = 9)."""
    assert int(L * (1 - ratio)) == reference  # the official behaviour, kept here as the documented difference
    assert common.keep_count(L, ratio) == keep
    kept, mask, _ = common.random_masking(torch.randn(3, L, 2), ratio)
    assert kept.shape[1] == keep and torch.all(mask.sum(1) == L - keep)


@pytest.mark.parametrize("L, ratio", [(16, 0.75), (196, 0.75), (256, 0.75), (64, 0.5), (49, 0.9), (10, 0.33)])
def test_masking_keeps_exactly_int_L_times_1_minus_r_and_restores(L, ratio):
    N, keep = 64, int(L * (1 - ratio))  # these products carry no float error: the ref code's count
    torch.manual_seed(L)
    noise = torch.rand(N, L)
    x = torch.arange(L, dtype=torch.float32).view(1, L, 1).expand(N, L, 3)  # token i carries the value i
    kept, mask, ids_restore = common.random_masking(x, ratio, noise)
    assert kept.shape == (N, keep, 3)
    assert torch.all(mask.sum(1) == L - keep)  # mask 1 = removed
    # the kept tokens are the `keep` smallest noise draws, in noise order (MAE ref code)
    smallest = noise.argsort(1)[:, :keep]
    assert torch.equal(kept[..., 0].long(), smallest)
    removed = torch.ones(N, L)
    removed.scatter_(1, smallest, 0.0)
    assert torch.equal(mask, removed)
    # ids_restore puts the kept tokens back at their positions; the filler lands exactly on the removed ones
    filler = torch.full((N, L - keep, 3), -1.0)
    restored = torch.gather(torch.cat([kept, filler], 1), 1, ids_restore[..., None].expand(-1, -1, 3))
    assert torch.equal(restored[mask == 0], x[mask == 0])
    assert torch.all(restored[mask == 1] == -1)


def test_encoder_sees_only_the_visible_patches():
    args = tiny_args()  # 16 px, patch 4: L = 16, 4 visible
    model = tiny_model(args).eval()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 16, 16)
    tokens, mask, _ = model.forward_encoder(x, noise)
    assert tokens.shape == (2, 1 + 4, 128) and torch.all(mask.sum(1) == 12)
    patches = common.patchify(x, 4)
    removed_l, visible_l = mask[0].nonzero()[0].item(), (mask[0] == 0).nonzero()[0].item()
    for l, should_change in ((removed_l, False), (visible_l, True)):
        p = patches.clone()
        p[0, l] += 3.0
        out = model.forward_encoder(common.unpatchify(p, 4), noise)[0]
        assert torch.equal(out[1], tokens[1])  # the other image is untouched
        assert (not torch.equal(out[0], tokens[0])) == should_change


def test_decoder_input_is_mask_token_plus_fixed_sincos_positions_at_removed_patches():
    args = tiny_args()
    model = tiny_model(args)
    dec = model.decoder
    assert not dec.pos_embed.requires_grad
    torch.testing.assert_close(dec.pos_embed[0], common.sincos_2d(64, 4, cls_token=True), rtol=0, atol=0)
    seen = {}
    dec.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach()))
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    pred, mask = model(torch.randn(3, 3, 16, 16), noise)
    assert pred.shape == (3, 16, 4 * 4 * 3)
    body = seen["x"][:, 1:] - dec.pos_embed[:, 1:]  # (3, 16, 64): the tokens before positions were added
    removed = body[mask == 1]
    torch.testing.assert_close(removed, dec.mask_token[0].expand_as(removed), rtol=0, atol=1e-6)
    visible = body[mask == 0]
    assert (visible - dec.mask_token[0]).abs().amax(1).min() > 1e-3  # visible slots hold the encoded patches


# ---------------------------------------------------------------- patchify
@pytest.mark.parametrize("size, p", [(16, 4), (32, 2), (32, 4), (224, 16), (224, 14)])
def test_patchify_round_trip(size, p):
    x = torch.randn(2, 3, size, size)
    patches = common.patchify(x, p)
    assert patches.shape == (2, (size // p) ** 2, p * p * 3)
    assert torch.equal(common.unpatchify(patches, p), x)


def test_patchify_layout_is_row_major_patches_with_the_channel_fastest():
    N, S, p = 2, 8, 4
    g = S // p
    x = torch.randn(N, 3, S, S)
    patches = common.patchify(x, p)
    for n in range(N):
        for i in range(g):
            for j in range(g):
                for r in range(p):
                    for q in range(p):
                        for c in range(3):  # MAE 'nchpwq->nhwpqc': k = (r * p + q) * 3 + c
                            assert patches[n, i * g + j, (r * p + q) * 3 + c] == x[n, c, i * p + r, j * p + q]


# ---------------------------------------------------------------- loss
def hand_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> float:
    """MAE forward_loss written out in float64 loops: per removed patch, the target normalized by its mean and
    unbiased variance (sum / (n - 1)) with eps 1e-6 inside the sqrt, the mean squared error over its n values; then
    the mean over all removed patches of the batch."""
    pred, target = pred.double(), target.double()
    errors = []
    for b in range(pred.shape[0]):
        for l in range(pred.shape[1]):
            if mask[b, l] != 1:
                continue
            t = target[b, l]
            if norm_pix:
                n = len(t)
                mean = sum(t.tolist()) / n
                var = sum((v - mean) ** 2 for v in t.tolist()) / (n - 1)
                t = (t - mean) / (var + 1e-6) ** 0.5
            errors.append(((pred[b, l] - t) ** 2).mean().item())
    return sum(errors) / len(errors)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_equals_hand_computation_and_ignores_visible_patches(norm_pix):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 16, 48, generator=g).unbind(0)
    target[0, 3] = 0.7  # a constant patch: var 0, the eps keeps the normalized target finite (0)
    mask = common.random_masking(torch.zeros(3, 16, 1), 0.75, torch.rand(3, 16, generator=g))[1]
    loss = common.reconstruction_loss(pred, target, mask, norm_pix)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(hand_loss(pred, target, mask, norm_pix), rel=1e-6)
    # visible patches do not count: neither their predictions nor their targets
    on_visible, t_visible = pred.clone(), target.clone()
    on_visible[mask == 0] += 5.0
    t_visible[mask == 0] *= 3.0
    assert common.reconstruction_loss(on_visible, target, mask, norm_pix) == loss
    assert common.reconstruction_loss(pred, t_visible, mask, norm_pix) == loss
    on_removed = pred.clone()
    on_removed[mask == 1] += 0.5
    assert common.reconstruction_loss(on_removed, target, mask, norm_pix) != loss
    if norm_pix:  # per-patch normalization: a patch's offset and scale do not matter
        shifted = target.clone()
        shifted[mask == 1] = 4.0 * shifted[mask == 1] + 2.0
        assert common.reconstruction_loss(pred, shifted, mask, True).item() == pytest.approx(loss.item(), rel=1e-4)


def test_mae_loss_targets_the_normalized_input_patches():
    args = tiny_args()
    model = tiny_model(args)
    images = torch.rand(4, 3, 16, 16)
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(2))
    for norm_pix in (True, False):
        a = dataclasses.replace(args, norm_pix_loss=norm_pix)
        terms, out = mae.mae_losses(model, images, a, noise)
        loss = terms["total"]
        target = common.patchify(common.normalize(images), 4)
        assert loss.item() == pytest.approx(hand_loss(out["pred"].detach(), target, out["mask"], norm_pix), rel=1e-5)
        assert torch.all(out["mask"].sum(1) == 12)


class Oracle(mae.MAE):
    """Predicts every patch perfectly (the normalized target) to test the pictures' un-normalization."""

    def forward(self, x, mask_draws=None):
        mask = super().forward(x, mask_draws)[1]
        return common.normalized_target(common.patchify(x, self.patch_size)), mask


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_png_rows_and_per_patch_unnormalization(norm_pix, tmp_path):
    args = dataclasses.replace(tiny_args(), norm_pix_loss=norm_pix)
    model = Oracle(args)
    images = torch.rand(5, 3, 16, 16)
    mae.save_reconstructions(model, images, args, str(tmp_path / "r.png"))
    grid = read_png(tmp_path / "r.png").float() / 255
    # 3 captioned rows x 5 images of 16 px upscaled 4x (nearest) to 64 px, 2 px padding, a caption margin on the left
    f, tile, margin = 4, 66, 8 + 6 * len("reconstruction")
    assert grid.shape == (3, 2 + 3 * tile, margin + 2 + 5 * tile)
    assert (grid[:, :, :margin] < 0.5).any(dim=0).any()  # the captions are drawn (black text on white)
    row = [grid[:, 2 + tile * r : 2 + tile * r + 16 * f : f, margin + 2 : margin + 2 + 16 * f : f] for r in range(3)]
    assert (row[0] - images[0]).abs().max() < 1 / 255 + 1e-6  # original
    masked = common.patchify(row[1][None], 4)[0]
    assert ((masked - 0.5).abs().amax(1) < 1 / 255 + 1e-6).sum() == 12  # 12 of 16 patches grey
    err = (row[2] - images[0]).abs().max()
    if norm_pix:  # the perfect normalized prediction, un-normalized with the patch statistics, is the image again
        assert err < 1 / 255 + 1e-4
    else:  # without norm_pix the same raw prediction is read as pixels: the picture must differ
        assert err > 0.1


# ---------------------------------------------------------------- timm interoperability
def timm_vit_state_dict_shapes(dim: int, depth: int, patch: int, img: int = 224) -> dict[str, tuple]:
    """timm.models.vision_transformer.VisionTransformer(img_size, patch, embed_dim=dim, depth, mlp_ratio=4,
    qkv_bias=True, class_token=True, num_classes=0) state_dict, written from timm's naming: patch_embed.proj (conv),
    cls_token, pos_embed (cls slot + L), blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm."""
    L = (img // patch) ** 2
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, L + 1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        shapes.update({
            f"blocks.{i}.norm1.weight": (dim,),
            f"blocks.{i}.norm1.bias": (dim,),
            f"blocks.{i}.attn.qkv.weight": (3 * dim, dim),
            f"blocks.{i}.attn.qkv.bias": (3 * dim,),
            f"blocks.{i}.attn.proj.weight": (dim, dim),
            f"blocks.{i}.attn.proj.bias": (dim,),
            f"blocks.{i}.norm2.weight": (dim,),
            f"blocks.{i}.norm2.bias": (dim,),
            f"blocks.{i}.mlp.fc1.weight": (4 * dim, dim),
            f"blocks.{i}.mlp.fc1.bias": (4 * dim,),
            f"blocks.{i}.mlp.fc2.weight": (dim, 4 * dim),
            f"blocks.{i}.mlp.fc2.bias": (dim,),
        })  # fmt: skip
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


@pytest.mark.parametrize(
    "arch, dim, depth, patch", [("vit_b", 768, 12, 16), ("vit_l", 1024, 24, 16), ("vit_h", 1280, 32, 14)]
)
def test_encoder_state_dict_matches_timm_vit_names_and_shapes(arch, dim, depth, patch):
    args = common.parse_args(mae.Args, ["--arch", arch], mae.PRESETS)
    assert args.patch_size == patch  # vit_h -> ViT-H/14 (MAE)
    with torch.device("meta"):  # names and shapes only: no memory, no init time
        model = mae.build_model(args)
    state = model.state_dict()
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder"}
    encoder = {k[len("encoder.") :]: tuple(v.shape) for k, v in state.items() if k.startswith("encoder.")}
    assert encoder == timm_vit_state_dict_shapes(dim, depth, patch)
    if arch == "vit_b":  # spelled out once
        assert encoder["cls_token"] == (1, 1, 768) and encoder["pos_embed"] == (1, 197, 768)
        assert encoder["patch_embed.proj.weight"] == (768, 3, 16, 16)
        assert encoder["blocks.0.attn.qkv.weight"] == (2304, 768) and encoder["blocks.11.mlp.fc1.weight"] == (3072, 768)


# ---------------------------------------------------------------- encoder export for MAE's fine-tuning scripts and timm
class TimmNamedViT(torch.nn.Module):
    """A ViT written from timm's / MAE models_vit.py's parameter NAMES and their documented meaning only (no timm,
    no common.py): patch_embed.proj (conv p x p, stride p), cls_token, pos_embed (1, 1 + L, D), blocks.N.{norm1,
    attn.qkv (q | k | v rows, heads contiguous), attn.proj, norm2, mlp.fc1, mlp.fc2}, norm; LayerNorm eps 1e-6, GELU;
    fc_norm and head are identities (timm num_classes=0, global_pool="token"), so they own no parameters."""

    def __init__(self, img, patch, dim, depth, heads):
        super().__init__()
        nn = torch.nn
        self.heads = heads
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img // patch) ** 2, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            b.attn, b.mlp = nn.Module(), nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.blocks.append(b)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc_norm, self.head = nn.Identity(), nn.Identity()

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        B, N, D = x.shape
        for b in self.blocks:
            q, k, v = b.attn.qkv(b.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-1, -2) / (D // self.heads) ** 0.5, -1) @ v
            x = x + b.attn.proj(a.transpose(1, 2).reshape(B, N, D))
            x = x + b.mlp.fc2(torch.nn.functional.gelu(b.mlp.fc1(b.norm2(x))))
        return self.norm(x)


def test_exported_encoder_loads_by_name_into_a_fresh_vit_and_computes_the_same_features(tmp_path):
    """mae.py --export-encoder: {"model": state_dict} with the "encoder." prefix stripped; a fresh ViT built from the
    names alone loads it with no missing and no unexpected keys and gives the encoder's output; the decoder and the
    mask token stay out (MAE main_finetune.py: only head.* (+ fc_norm.*) missing)."""
    args = tiny_args()
    model = tiny_model(args, seed=3)
    ckpt = tmp_path / "checkpoint.pt"
    common.save_checkpoint(str(ckpt), {"method": "mae", "args": dataclasses.asdict(args), "model": model.state_dict()})
    out = tmp_path / "encoder.pth"
    result = mae.main(TINY + ["--resume", str(ckpt), "--export-encoder", str(out)])
    exported = torch.load(out, weights_only=True)
    assert set(exported) == {"model"} and result["tensors"] == len(exported["model"])
    assert not any(k.startswith(("decoder", "encoder", "mask_token")) for k in exported["model"])
    dim, depth, heads = common.vit_arch(args.arch)
    fresh = TimmNamedViT(args.image_size, args.patch_size, dim, depth, heads)
    missing, unexpected = fresh.load_state_dict(exported["model"], strict=False)
    assert missing == [] and unexpected == []
    x = common.normalize(torch.rand(2, 3, args.image_size, args.image_size))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model.encoder(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- eval interface, command line, errors
def test_features_cls_default_mean_and_layers():
    args = tiny_args()
    model = tiny_model(args).train()
    images = torch.rand(3, 3, 16, 16)
    tokens = model.encoder(common.normalize(images))  # unmasked
    torch.testing.assert_close(mae.features(model, images), tokens[:, 0])  # MAE linear probe: cls token
    torch.testing.assert_close(mae.features(model, images, pool="mean"), tokens[:, 1:].mean(1))
    assert model.training  # mode restored
    assert mae.num_feature_layers(model) == 4
    last_block = mae.features(model, images, layer=3)  # the cls token before the final norm
    assert last_block.shape == (3, 128)
    torch.testing.assert_close(model.encoder.norm(last_block), tokens[:, 0])
    with pytest.raises(ValueError, match="out of range"):
        mae.features(model, images, layer=4)


def test_defaults_follow_mae_and_presets():
    a = common.parse_args(mae.Args, [], mae.PRESETS)
    assert (a.arch, a.patch_size, a.image_size, a.mask_ratio, a.norm_pix_loss) == ("vit_l", 16, 224, 0.75, True)
    assert (a.decoder_dim, a.decoder_depth, a.decoder_heads) == (512, 8, 16)
    assert (a.base_lr, a.weight_decay, a.betas, a.batch_size, a.warmup_epochs, a.epochs) == (
        1.5e-4, 0.05, (0.9, 0.95), 4096, 40, 800
    )  # fmt: skip
    assert common.scaled_lr(a.base_lr, a.batch_size) == pytest.approx(2.4e-3)
    view = common.augment_config(a.view, a.image_size, **mae.augment_kwargs(a))
    assert view == {"kind": "mae", "size": 224, "scale": (0.2, 1.0), "ratio": (3 / 4, 4 / 3),
                    "interpolation": "bicubic", "flip_p": 0.5}  # fmt: skip
    can_table8 = common.augment_config("simclr", 224, **mae.augment_kwargs(dataclasses.replace(a, view="simclr")))
    assert can_table8["jitter"] == (0.8, 0.8, 0.8, 0.2) and can_table8["blur"] and can_table8["scale"] == (0.2, 1.0)
    assert common.parse_args(mae.Args, ["--arch", "vit_b"], mae.PRESETS).patch_size == 16
    c = common.parse_args(mae.Args, ["--preset", "cifar"], mae.PRESETS)
    assert (c.dataset, c.image_size, c.patch_size, c.arch, c.batch_size) == ("cifar10", 32, 4, "vit_tiny", 512)
    c2 = common.parse_args(mae.Args, ["--preset", "cifar", "--patch-size", "2"], mae.PRESETS)
    mae.check_args(c2)
    with torch.device("meta"):
        assert mae.build_model(c2).forward_encoder(torch.zeros(1, 3, 32, 32))[0].shape == (1, 1 + 64, 192)


def test_bad_inputs_stop_with_one_line_messages(capsys):
    with pytest.raises(SystemExit, match=r"mae.py: error: --image-size 18 is not divisible by --patch-size 4"):
        mae.main(TINY + ["--image-size", "18"])
    with pytest.raises(SystemExit, match=r"mae.py: error: argument --mask-ratio: 1.0 is outside \[0, 1\)"):
        mae.main(TINY + ["--mask-ratio", "1.0"])
    with pytest.raises(SystemExit, match="mask-ratio 0.99 keeps 0 of 16"):
        mae.main(TINY + ["--mask-ratio", "0.99"])
    with pytest.raises(SystemExit, match="decoder-dim 66 must be divisible by 4"):
        mae.main(TINY + ["--decoder-dim", "66"])
    with pytest.raises(SystemExit):
        mae.main(["--arch", "vit_enormous"])
    assert "invalid choice: 'vit_enormous'" in capsys.readouterr().err
    # as a user sees it: exit status 2 (argparse's), the message on stderr, no stack trace
    proc = subprocess.run(
        [sys.executable, f"{ROOT}/mae.py", "--preset", "tiny", "--patch-size", "5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "mae.py: error: --image-size 16 is not divisible by --patch-size 5"


# ---------------------------------------------------------------- end to end
def test_end_to_end_tiny_run_writes_the_run_folder(tmp_path):
    proc = run_script(["mae.py", *TINY, "--steps", "3", "--eval-every", "2", "--run-name", "e2e"], cwd=tmp_path)
    assert "GFLOPs per image" in proc.stdout
    run = tmp_path / "runs" / "e2e"
    assert json.load(open(run / "args.json"))["mask_ratio"] == 0.75
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]
    assert all(k in losses[-1] for k in ("lr", "epoch", "perf/images_per_s"))
    assert [r["step"] for r in rows if "eval/test_loss" in r] == [0, 2, 3]  # at init, every 2 steps, at the end
    for step in (0, 2, 3):
        assert (run / f"reconstruction_step{step:07d}.png").exists()
    ckpt = common.load_checkpoint(str(run / "checkpoint.pt"), "mae")
    assert ckpt["step"] == 3
    model = mae.build_model(mae.Args(**ckpt["args"]))  # eval_probe.py's path
    model.load_state_dict(ckpt["model"])


def test_resume_auto_continues_bitwise_exactly(tmp_path, capsys):
    common_args = TINY + ["--output-dir", str(tmp_path), "--log-every", "2", "--eval-every", "3"]
    mae.main(common_args + ["--run-name", "straight", "--steps", "4"])
    mae.main(common_args + ["--run-name", "resumed", "--steps", "2"])
    final = mae.main(common_args + ["--run-name", "resumed", "--steps", "4"])  # --resume auto is the default
    assert "at step 2" in capsys.readouterr().out and final["step"] == 4
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    rows = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss/total" in r] == [2, 4]  # the first run ends at 2, the second logs 4
    assert [r["step"] for r in rows if "eval/test_loss" in r] == [0, 2, 3, 4]  # no second "init" evaluation


# ---------------------------------------------------------------- --accum-iter
def test_accumulated_micro_batch_gradients_equal_the_full_batch_gradient():
    """K micro-batches with loss / K each give the gradient of the whole batch: every image has the same number of
    removed patches, so the mean over the batch's removed patches is the mean of the micro-batch means."""
    args = tiny_args()
    model = tiny_model(args)
    images, draws = torch.rand(16, 3, 16, 16), torch.rand(16, 16)
    mae.mae_losses(model, images, args, draws)[0]["total"].backward()
    full = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for part in (slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)):
        (mae.mae_losses(model, images[part], args, draws[part])[0]["total"] / 4).backward()
    for k, g in full.items():
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, g, rtol=1e-4, atol=1e-7, msg=k)


def test_accum_iter_run_counts_updates_and_resumes_bitwise_exactly(tmp_path, capsys):
    """--accum-iter 2 at --batch-size 16: 2 micro-batches of 8 per update, as many updates per epoch as without
    accumulation (1000 synthetic images: 125 micro-batches -> 62 updates), and a resumed run equals a straight one."""
    base = TINY + ["--output-dir", str(tmp_path), "--accum-iter", "2", "--eval-every", "100", "--log-every", "1"]
    mae.main(base + ["--run-name", "straight", "--steps", "4"])
    assert "1 x 16 images/step (2 micro-batches of 8), 62 steps/epoch" in capsys.readouterr().out
    mae.main(base + ["--run-name", "resumed", "--steps", "2"])
    assert mae.main(base + ["--run-name", "resumed", "--steps", "4"])["step"] == 4
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    with pytest.raises(SystemExit, match="--accum-iter must be >= 1"):
        mae.main(TINY + ["--accum-iter", "0"])
    with pytest.raises(SystemExit, match="16 images per rank: not divisible by --accum-iter 3"):
        mae.main(TINY + ["--accum-iter", "3", "--output-dir", str(tmp_path)])


def _mae_ddp_worker(rank, world, images, mask_draws):
    """One DDP backward of the MAE loss on this rank's half of a fixed batch with fixed masks."""
    args = tiny_args()
    torch.manual_seed(0)
    model = mae.build_model(args)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    n = len(images) // world
    part = slice(rank * n, (rank + 1) * n)
    loss = mae.mae_losses(ddp, torch.tensor(images)[part], args, torch.tensor(mask_draws)[part])[0]["total"]
    loss.backward()
    return [loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).tolist()]


def test_ddp_gradients_on_two_processes_equal_one_process(tmp_path):
    """The training step's gradients under DDP (2 gloo processes, half the batch each) equal one process on the
    whole batch: the loss is a mean over removed patches, every image removes the same number, and DDP averages."""
    args = tiny_args()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, args.image_size, args.image_size, generator=g)
    mask_draws = torch.rand(8, (args.image_size // args.patch_size) ** 2, generator=g)
    out = run_distributed(_mae_ddp_worker, 2, tmp_path, images.tolist(), mask_draws.tolist())
    torch.manual_seed(0)
    model = mae.build_model(args)
    loss = mae.mae_losses(model, images, args, mask_draws)[0]["total"]
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(loss.item(), rel=1e-5)
    for rank in range(2):  # every rank holds the averaged gradient: the single-process one
        torch.testing.assert_close(torch.tensor(out[rank][1]), grad, rtol=1e-4, atol=1e-6)
    assert grad.abs().max() > 0


def _accumulation_allreduce_worker(rank, world, accum):
    """Count the gradient all-reduces of one --accum-iter update of a DDP model (2 gloo processes)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    args = tiny_args()
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(mae.build_model(args), static_graph=accum == 1)
    calls = []

    def counting(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting)
    g = torch.Generator().manual_seed(rank)
    group = [([torch.rand(2, 3, 16, 16, generator=g)], None) for _ in range(accum)]
    mae.accumulated_backward(ddp, group, args, lambda terms: None)
    grad = torch.cat([p.grad.flatten() for p in ddp.parameters() if p.grad is not None])
    return [len(calls), grad.tolist()]


def test_accumulation_all_reduces_once_per_update(tmp_path):
    """--accum-iter 3 under DDP: as many gradient all-reduces (buckets) as one micro-batch without accumulation, and
    the ranks end with the same (averaged) gradient. Counted with a DDP communication hook."""
    one = run_distributed(_accumulation_allreduce_worker, 2, tmp_path, 1)
    (tmp_path / "k3").mkdir()
    three = run_distributed(_accumulation_allreduce_worker, 2, tmp_path / "k3", 3)
    assert one[0][0] >= 1 and three[0][0] == three[1][0] == one[0][0]
    torch.testing.assert_close(torch.tensor(three[0][1]), torch.tensor(three[1][1]))


def test_torchrun_two_processes(tmp_path):
    proc = run_script(
        ["mae.py", *TINY, "--steps", "2", "--batch-size", "8", "--run-name", "ddp"], cwd=tmp_path, torchrun=2
    )
    assert "2 x 4 images/step" in proc.stdout
    run = tmp_path / "runs" / "ddp"
    ckpt = common.load_checkpoint(str(run / "checkpoint.pt"), "mae")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]  # rank 0 alone writes
    assert [r["step"] for r in rows if "loss/total" in r] == [1, 2]
    assert (run / "reconstruction_step0000002.png").exists()


def test_torchrun_two_processes_with_accumulation(tmp_path):
    """--accum-iter under torchrun (2 processes): the run completes and reports its micro-batches (the all-reduce count
    per update is test_accumulation_all_reduces_once_per_update's)."""
    argv = ["mae.py", *TINY, "--steps", "2", "--batch-size", "8", "--accum-iter", "2", "--run-name", "ddp"]
    proc = run_script(argv, cwd=tmp_path, torchrun=2)
    assert "2 x 4 images/step (2 micro-batches of 2)" in proc.stdout
    assert common.load_checkpoint(str(tmp_path / "runs" / "ddp" / "checkpoint.pt"), "mae")["step"] == 2


def test_learning_smoke_heldout_loss_falls_below_init_and_the_trivial_prediction(tmp_path):
    """40 steps of batch 16 on the synthetic shapes (~2 s on an idle core). Measured (seed 0, 128 held-out images,
    fixed masks): held-out loss 2.147 at init (random predictions of unit scale on unit-variance targets), 0.507 after
    40 steps (0.236 x init); predicting zeros (= each patch's own mean color, the trivial solution under
    norm_pix_loss) scores 0.979."""
    final = mae.main(TINY + ["--output-dir", str(tmp_path), "--steps", "40", "--eval-every", "40", "--log-every", "40"])
    init, trained = final["init/test_loss"], final["eval/test_loss"]
    args = tiny_args()
    x = common.heldout_images(common.load_split(args, train=False), args.test_images, 16, "cpu")[0]
    mask = common.random_masking(torch.zeros(len(x), 16, 1), 0.75, common.fixed_draws(len(x), 16))[1]
    target = common.patchify(common.normalize(x), 4)
    zeros = common.reconstruction_loss(torch.zeros_like(target), target, mask, True).item()
    assert init > 1.5 and zeros == pytest.approx(0.979, abs=0.01)
    assert trained < 0.4 * init  # margin: measured 0.236 x init
    assert trained < zeros - 0.3  # learned the structure inside the patches, not just the scale (measured 0.47 below)
