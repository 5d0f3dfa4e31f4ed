"""can.py: masking per view, noise and its targets, the sigma embedding, the loss algebra and its ablations, the
CAN InfoNCE (section 3.2 formula, and on 2 gloo processes), features, FLOP report, and the script end to end
(python and torchrun), with bitwise-exact resume."""

import dataclasses
import json
import math
import os
import re

import pytest
import torch
from conftest import run_distributed, run_script

import can
import common

TINY = ["--preset", "tiny", "--no-amp"]


def tiny_args(*extra: str) -> can.Args:
    return common.parse_args(can.Args, TINY + list(extra), can.PRESETS)


def tiny_model(args: can.Args, seed: int = 0) -> can.CAN:
    torch.manual_seed(seed)
    return can.build_model(args)


def draws(n_views: int, args: can.Args, seed: int = 1):
    """Fixed mask draws, sigmas and noise for 2B = n_views rows of tiny images."""
    g = torch.Generator().manual_seed(seed)
    L = (args.image_size // args.patch_size) ** 2
    mask_draws = torch.rand(n_views, L, generator=g)
    images = torch.rand(n_views, 3, args.image_size, args.image_size, generator=g)
    sigma, noise = can.draw_noise(images, args.sigma_max, generator=g)
    return images, dict(mask_draws=mask_draws, sigma=sigma, noise=noise)


# ---------------------------------------------------------------- masking: exactly 50% per view, independent views
def test_each_view_keeps_exactly_half_and_views_are_masked_independently():
    args = tiny_args()
    model = tiny_model(args)
    B, L = 512, 16
    torch.manual_seed(3)
    with torch.no_grad():
        _, out = can.can_losses(model, torch.rand(2 * B, 3, 16, 16), args)
    mask = out["mask"]
    assert mask.shape == (2 * B, L)
    assert torch.all(mask.sum(1) == L - int(L * (1 - 0.5)))  # 8 removed, 8 kept in every view of every image
    kept1, kept2 = 1 - mask[:B], 1 - mask[B:]
    assert (kept1 != kept2).any(1).float().mean() > 0.95  # the two views of an image get different masks
    # Independent uniform 8-of-16 subsets: the overlap is hypergeometric(16, 8, 8), mean 4, variance 16/15.
    overlap = (kept1 * kept2).sum(1)
    assert abs(overlap.mean().item() - 4.0) < 0.25
    assert abs(overlap.var().item() - 16 / 15) < 0.3
    # and the encoder saw exactly the kept patches: 1 cls + 8 tokens per view
    tokens = model.forward_encoder(torch.zeros(2, 3, 16, 16))[0]
    assert tokens.shape[1] == 1 + 8


# ---------------------------------------------------------------- noise: levels, where it is added, the targets
def test_noise_levels_and_the_denoising_target_is_the_added_noise():
    args = tiny_args()
    model = tiny_model(args)
    seen = {}
    model.encoder.patch_embed.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach().clone()))
    torch.manual_seed(5)
    images = torch.rand(1024, 3, 16, 16)
    terms, out = can.can_losses(model, images, args)
    sigma, noise, x = out["sigma"], out["noise"], out["x"]
    assert sigma.shape == (1024,) and sigma.min() >= 0 and sigma.max() <= args.sigma_max
    assert len(torch.unique(sigma)) == 1024  # one level per image AND view
    assert abs(sigma.mean().item() - args.sigma_max / 2) < 0.002  # U[0, sigma_max]
    # the encoder received the WHOLE normalized image plus sigma * e (masking happens inside the encoder)
    torch.testing.assert_close(seen["x"], common.normalize(images) + noise, rtol=0, atol=0)
    e = noise / sigma.view(-1, 1, 1, 1)
    assert abs(e.mean().item()) < 0.01 and abs(e.std().item() - 1) < 0.01
    assert (e.flatten(1).std(1) - 1).abs().max() < 0.2  # e ~ N(0, I) in every row
    # L_denoise = mean over VISIBLE patches of the per-patch MSE against patchify(added noise), not normalized
    added = common.patchify(seen["x"] - x, args.patch_size)
    visible = out["mask"] == 0
    per_patch = ((out["pred"] - added) ** 2).mean(-1)
    assert terms["denoise"].item() == pytest.approx(per_patch[visible].mean().item(), rel=1e-5)


def test_reconstruction_ignores_visible_patches_and_denoising_ignores_masked_ones():
    torch.manual_seed(0)
    pred, target, noise = torch.randn(3, 2, 16, 48).unbind(0)
    mask = torch.tensor([[1.0] * 8 + [0.0] * 8, [0.0] * 8 + [1.0] * 8])
    for norm_pix in (False, True):
        r = common.reconstruction_loss(pred, target, mask, norm_pix)
        on_visible = pred.clone()
        on_visible[mask == 0] += 5.0
        t_visible = target.clone()
        t_visible[mask == 0] *= 3.0
        assert common.reconstruction_loss(on_visible, target, mask, norm_pix) == r
        assert common.reconstruction_loss(pred, t_visible, mask, norm_pix) == r
        on_masked = pred.clone()
        on_masked[0, 0] += 1.0
        assert common.reconstruction_loss(on_masked, target, mask, norm_pix) != r
    # MAE hand computation: unbiased variance, eps inside the sqrt, mean over p*p*3 then over removed patches
    t = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, unbiased=True, keepdim=True) + 1e-6)
    hand = ((pred - t) ** 2).mean(-1)[mask == 1].mean()
    assert common.reconstruction_loss(pred, target, mask, True).item() == pytest.approx(hand.item(), rel=1e-6)
    d = can.denoise_loss(pred, noise, mask)
    on_masked = pred.clone()
    on_masked[mask == 1] += 5.0
    n_masked = noise.clone()
    n_masked[mask == 1] *= 3.0
    assert can.denoise_loss(on_masked, noise, mask) == d
    assert can.denoise_loss(pred, n_masked, mask) == d
    on_visible = pred.clone()
    on_visible[0, 12] += 1.0
    assert can.denoise_loss(on_visible, noise, mask) != d
    assert d.item() == pytest.approx(((pred - noise) ** 2).mean(-1)[mask == 0].mean().item(), rel=1e-6)


def test_rec_target_flag_clean_versus_noisy():
    images, fixed = draws(8, tiny_args())
    results = {}
    for target in ("clean", "noisy"):
        args = tiny_args("--rec-target", target)
        terms, out = can.can_losses(tiny_model(args), images, args, **fixed)
        results[target] = terms
        x = common.normalize(images)
        wanted = x if target == "clean" else x + fixed["noise"]
        expect = common.reconstruction_loss(out["pred"], common.patchify(wanted, 4), out["mask"], args.norm_pix_loss)
        assert terms["reconstruction"] == expect
    assert results["clean"]["reconstruction"] != results["noisy"]["reconstruction"]
    assert results["clean"]["contrastive"] == results["noisy"]["contrastive"]
    assert results["clean"]["denoise"] == results["noisy"]["denoise"]


# ---------------------------------------------------------------- sigma embedding, loss weights, ablations
def test_sigma_embedding_hand_computation():
    sigma = torch.tensor([0.0, 0.03, 0.05])
    emb = can.sigma_embedding(sigma, 128)
    assert emb.shape == (3, 128)
    for row, s in enumerate([0.0, 0.03, 0.05]):
        for k in (0, 1, 17, 63):
            freq = math.exp(-k * math.log(10000) / 63)  # CAN ref code: log(10000) / (half - 1)
            assert emb[row, k].item() == pytest.approx(math.sin(s * freq), abs=1e-7)
            assert emb[row, 64 + k].item() == pytest.approx(math.cos(s * freq), abs=1e-7)


def test_total_loss_is_the_weighted_sum_of_the_returned_terms():
    args = tiny_args()
    images, fixed = draws(8, args)
    terms, _ = can.can_losses(tiny_model(args), images, args, **fixed)
    c, r, d = (terms[k].item() for k in ("contrastive", "reconstruction", "denoise"))
    assert terms["total"].item() == pytest.approx(0.03 * c + 0.97 * (0.7 * r + 0.3 * d), rel=1e-6)
    assert min(c, r, d) > 0


def test_each_ablation_removes_exactly_its_term():
    args = tiny_args()
    full = tiny_model(args)
    images, fixed = draws(8, args)
    ref, _ = can.can_losses(full, images, args, **fixed)

    def run(*flags, **given):
        a = tiny_args(*flags)
        model = can.build_model(a)
        model.load_state_dict(full.state_dict(), strict=False)  # the same weights for the parts that exist
        seen = {}
        model.encoder.patch_embed.register_forward_pre_hook(lambda m, x: seen.update(x=x[0]))
        terms, _ = can.can_losses(model, images, a, **given)
        return a, model, terms, seen["x"]

    a, model, t, _ = run("--no-contrastive", **fixed)  # AN
    assert model.projector is None and set(t) == {"reconstruction", "denoise", "total"}
    assert (t["reconstruction"], t["denoise"]) == (ref["reconstruction"], ref["denoise"])
    assert t["total"].item() == pytest.approx(0.97 * (0.7 * t["reconstruction"] + 0.3 * t["denoise"]).item(), rel=1e-6)

    a, model, t, _ = run("--no-reconstruction", **fixed)  # CN
    assert set(t) == {"contrastive", "denoise", "total"}
    assert (t["contrastive"], t["denoise"]) == (ref["contrastive"], ref["denoise"])
    assert t["total"].item() == pytest.approx((0.03 * t["contrastive"] + 0.97 * 0.3 * t["denoise"]).item(), rel=1e-6)

    # CA: no noise at all (the encoder sees the clean image), no noise embedding, no denoising term
    a, model, t, enc_input = run("--no-denoise", mask_draws=fixed["mask_draws"])
    assert model.noise_embed is None and set(t) == {"contrastive", "reconstruction", "total"}
    assert torch.equal(enc_input, common.normalize(images))
    zero = dict(mask_draws=fixed["mask_draws"], sigma=torch.zeros(8), noise=torch.zeros_like(images))
    clean_full, _ = can.can_losses(full, images, args, **zero)
    _, _, clean_no_embed, _ = run("--no-noise-embedding", **zero)
    assert t["contrastive"] == clean_full["contrastive"]
    assert t["reconstruction"] == clean_no_embed["reconstruction"]
    assert t["total"].item() == pytest.approx((0.03 * t["contrastive"] + 0.97 * 0.7 * t["reconstruction"]).item())

    # CAN Table 1: no sigma embedding -> the decoder output changes, the encoder branch does not
    a, model, t, _ = run("--no-noise-embedding", **fixed)
    assert model.noise_embed is None and set(t) == set(ref)
    assert t["contrastive"] == ref["contrastive"] and t["denoise"] != ref["denoise"]
    with pytest.raises(ValueError, match="removes every loss term"):
        can.check_args(tiny_args("--no-contrastive", "--no-reconstruction", "--no-denoise"))


def test_noise_embedding_is_added_to_every_token_at_the_decoder_input():
    """CAN 3.4: the noise-level embedding is added to every decoder token, [M] tokens included. Checked at the input
    of decoder block 0 (after attention any bias spreads to every output, so the decoder's predictions could not
    tell the placements apart): changing sigma moves every token there by exactly the change of the embedding.
    The official code adds it to the encoder outputs before the decoder projection, which leaves the [M] tokens
    unchanged at this point; this test fails on that placement."""
    args = tiny_args()
    model = tiny_model(args)
    images, fixed = draws(4, args)
    seen = []
    model.decoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    sigma_b = fixed["sigma"] + 1.0
    with torch.no_grad():
        _, out = can.can_losses(model, images, args, **fixed)
        can.can_losses(model, images, args, **{**fixed, "sigma": sigma_b})
        embed = [model.noise_embed(can.sigma_embedding(s, args.noise_embed_dim)) for s in (fixed["sigma"], sigma_b)]
    delta = seen[1] - seen[0]  # (2B, 1 + L, D): cls, then every patch in image order (visible and [M])
    assert delta.shape[1] == 1 + out["mask"].shape[1]
    torch.testing.assert_close(delta, (embed[1] - embed[0])[:, None, :].expand_as(delta), rtol=1e-5, atol=1e-5)
    assert delta.abs().amax(-1).min() > 1e-3  # every token moved, the masked ones included


def test_gradient_checkpointing_changes_nothing_but_memory():
    args = tiny_args()
    images, fixed = draws(8, args)
    grads, keys = [], []
    for flag in (False, True):
        model = tiny_model(dataclasses.replace(args, grad_checkpointing=flag))
        assert model.decoder.blocks[0].grad_checkpointing == flag and model.encoder.blocks[0].grad_checkpointing == flag
        keys.append(list(model.state_dict()))
        terms, _ = can.can_losses(model, images, args, **fixed)
        terms["total"].backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert keys[0] == keys[1] and grads[0].keys() == grads[1].keys()  # checkpoints load either way
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- InfoNCE: CAN 3.2 formula, 2 processes
def can_infonce_formula(u1: torch.Tensor, u2: torch.Tensor, tau: float) -> float:
    """CAN 3.2 written out: for anchor u_i^v, the positive pair term exp(u_i^1 . u_i^2 / tau) and the 2n - 2
    negatives N_i = {u_j^1, u_j^2}_{j != i}; loss = 1/(2n) sum_v sum_i -log(pos / (pos + sum_neg))."""
    u1, u2 = torch.nn.functional.normalize(u1, dim=1).double(), torch.nn.functional.normalize(u2, dim=1).double()
    n, total = len(u1), 0.0
    for u in (u1, u2):
        for i in range(n):
            pos = math.exp(float(u1[i] @ u2[i]) / tau)
            neg = sum(math.exp(float(u[i] @ w[j]) / tau) for j in range(n) if j != i for w in (u1, u2))
            total += -math.log(pos / (pos + neg))
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_contrastive_loss_equals_the_can_section_3_2_formula(tau):
    torch.manual_seed(0)
    proj = torch.randn(10, 8)  # n = 5 images: view-1 rows then view-2 rows
    got = can.contrastive_loss(proj, tau).item()
    assert got == pytest.approx(can_infonce_formula(proj[:5], proj[5:], tau), rel=1e-5)


def _contrastive_worker(rank, world, v1, v2, tau):
    n = len(v1) // world
    local = torch.tensor(v1[rank * n : (rank + 1) * n] + v2[rank * n : (rank + 1) * n], requires_grad=True)
    loss = 0.03 * can.contrastive_loss(local, tau)  # the CAN contrastive term as it enters the total
    loss.backward()
    return [loss.item(), local.grad.tolist()]


def test_contrastive_term_on_two_processes_equals_one_process(tmp_path):
    torch.manual_seed(0)
    v1, v2 = torch.randn(6, 8), torch.randn(6, 8)  # 6 images, 3 per rank
    out = run_distributed(_contrastive_worker, 2, tmp_path, v1.tolist(), v2.tolist(), 0.1)
    single = torch.cat([v1, v2]).requires_grad_()
    loss = 0.03 * can.contrastive_loss(single, 0.1)
    loss.backward()
    # DDP averages over ranks: mean of the rank losses and (gradient / world) equal the single-process values
    assert sum(o[0] for o in out) / 2 == pytest.approx(loss.item(), rel=1e-5)
    for rank, (_, grad) in enumerate(out):
        grad = torch.tensor(grad) / 2
        rows = list(range(3 * rank, 3 * rank + 3)) + list(range(6 + 3 * rank, 6 + 3 * rank + 3))
        torch.testing.assert_close(grad, single.grad[rows], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- features for probing
def test_features_are_mean_pooled_clean_unmasked_patch_tokens():
    args = tiny_args()
    model = tiny_model(args).train()
    images = torch.rand(3, 3, 16, 16)
    feats = can.features(model, images)
    tokens = model.encoder(common.normalize(images))
    torch.testing.assert_close(feats, tokens[:, 1:].mean(1))
    assert model.training  # mode restored
    assert can.num_feature_layers(model) == 4
    last = can.features(model, images, layer=3)
    assert last.shape == (3, 128) and not torch.allclose(last, feats)  # block output before the final norm
    torch.testing.assert_close(can.features(model, images, pool="cls"), tokens[:, 0])
    with pytest.raises(ValueError, match="out of range"):
        can.features(model, images, layer=4)


# ---------------------------------------------------------------- command line
def test_presets_and_bad_inputs(capsys):
    a = common.parse_args(can.Args, ["--arch", "vit_l"], can.PRESETS)
    assert (a.base_lr, a.weight_decay, a.grad_checkpointing, a.batch_size) == (1.25e-4, 0.1, True, 4096)
    assert a.norm_pix_loss is False  # official code; the L_rec scale of CAN Table 4 (header: measured both ways)
    h = common.parse_args(can.Args, ["--arch", "vit_h"], can.PRESETS)  # no CAN recipe: ViT-L's, MAE's patch 14
    assert (h.base_lr, h.weight_decay, h.grad_checkpointing, h.patch_size) == (1.25e-4, 0.1, True, 14)
    c = common.parse_args(can.Args, ["--preset", "cifar"], can.PRESETS)
    assert (c.image_size, c.patch_size, c.arch, c.dataset) == (32, 4, "vit_tiny", "cifar10")
    with pytest.raises(SystemExit):
        can.main(["--arch", "vit_enormous"])
    assert "invalid choice: 'vit_enormous'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not divisible by --patch-size"):
        can.check_args(tiny_args("--image-size", "18"))
    with pytest.raises(SystemExit) as bad:  # from the command line: one line naming the flag, no stack trace
        can.main([*TINY, "--image-size", "18", "--output-dir", "unused"])
    assert str(bad.value).startswith("can.py: error: --image-size 18 is not divisible by --patch-size")
    with pytest.raises(ValueError, match="mask-ratio"):
        can.check_args(tiny_args("--mask-ratio", "0"))


def test_flops_report_vit_l_on_cpu(tmp_path):
    out = run_script(["can.py", "--arch", "vit_l", "--flops-report"], cwd=tmp_path, timeout=120).stdout
    can_g = float(re.search(r"CAN\s*:\s*([\d.]+) GFLOPs", out).group(1))
    simclr_g = float(re.search(r"SimCLR\s*:\s*([\d.]+) GFLOPs", out).group(1))
    ratio = float(re.search(r"SimCLR / CAN = ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(simclr_g / can_g, rel=1e-3)
    assert 1.5 < ratio < 1.9  # CAN abstract: SimCLR costs ~70% more FLOPs for ViT-L
    assert not os.path.exists(tmp_path / "runs")  # nothing trained, nothing written


# ---------------------------------------------------------------- end to end
def test_end_to_end_tiny_run_writes_the_run_folder(tmp_path):
    proc = run_script(["can.py", "--preset", "tiny", "--steps", "3", "--run-name", "e2e"], cwd=tmp_path)
    assert "GFLOPs per image" in proc.stdout
    run = tmp_path / "runs" / "e2e"
    assert json.load(open(run / "args.json"))["mask_ratio"] == 0.5
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]
    for key in ("loss/contrastive", "loss/reconstruction", "loss/denoise", "lr", "epoch", "perf/images_per_s"):
        assert key in losses[-1]
    assert any("eval/knn_top1" in r for r in rows)
    assert (run / "reconstruction_step0000003.png").exists()
    ckpt = common.load_checkpoint(str(run / "checkpoint.pt"), "can")
    assert ckpt["step"] == 3
    model = can.build_model(can.Args(**ckpt["args"]))  # eval_probe.py's path
    model.load_state_dict(ckpt["model"])


def test_resume_is_bitwise_exact(tmp_path):
    # amp on (bf16 where the CPU runs it natively)
    common_args = TINY[:2] + ["--output-dir", str(tmp_path), "--log-every", "2"]
    can.main(common_args + ["--run-name", "straight", "--steps", "4"])
    can.main(common_args + ["--run-name", "resumed", "--steps", "2"])
    final = can.main(common_args + ["--run-name", "resumed", "--steps", "4"])
    assert final["step"] == 4
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_torchrun_two_processes(tmp_path):
    proc = run_script(
        ["can.py", "--preset", "tiny", "--steps", "2", "--batch-size", "8", "--run-name", "ddp"],
        cwd=tmp_path,
        torchrun=2,
    )
    assert "2 x 4 images/step" in proc.stdout
    ckpt = common.load_checkpoint(str(tmp_path / "runs" / "ddp" / "checkpoint.pt"), "can")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_export_encoder_writes_the_encoder_with_timm_names(tmp_path):
    """can.py --export-encoder: the "encoder." tensors, prefix stripped, as {"model": ...}; they load strictly into a
    plain common.VisionTransformer (timm's names; tests/test_mae.py loads MAE's into a ViT written from the names)."""
    args = tiny_args()
    model = tiny_model(args, seed=2)
    ckpt = tmp_path / "checkpoint.pt"
    common.save_checkpoint(str(ckpt), {"method": "can", "args": dataclasses.asdict(args), "model": model.state_dict()})
    can.main(TINY + ["--resume", str(ckpt), "--export-encoder", str(tmp_path / "encoder.pth")])
    exported = torch.load(tmp_path / "encoder.pth", weights_only=True)["model"]
    expect = model.encoder.state_dict()
    assert exported.keys() == expect.keys() and all(torch.equal(exported[k], expect[k]) for k in expect)
    dim, depth, heads = common.vit_arch(args.arch)
    common.VisionTransformer(args.image_size, args.patch_size, 3, dim, depth, heads).load_state_dict(exported)
