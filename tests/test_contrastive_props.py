"""contrastive_props.py: the generalized contrastive losses against direct computations (NT-Xent = (alignment + tau x
LogSumExp) / tau, decoupled NT-Xent and the three SWD priors with injected projection and prior samples), the
distribution terms on 2 gloo ranks against one process on the concatenated batch, the invariants of the generated
datasets (grid placement, digit counts, RandBit bits, DigitOnX's U digits, Modified MultiDigits sizes), the script end
to end (python, resume, torchrun), one-line errors, and a smoke test: every loss beats the untrained network."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_distributed, run_script

import common
import contrastive_props as cp

TINY = ["--preset", "tiny"]


def tiny_args(*extra: str) -> cp.Args:
    return common.parse_args(cp.Args, TINY + list(extra), cp.PRESETS)


# ---------------------------------------------------------------- losses against direct computations
def numpy_ntxent(z1, z2, tau):
    """NT-Xent (paper eq. 1) anchor by anchor in float64: -log exp(s_ii+/t) / sum_{k != i} exp(s_ik/t), mean."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n, total = len(z1), 0.0
    for i in range(2 * n):
        s = z @ z[i] / tau
        pos = (i + n) % (2 * n)
        total += -s[pos] + np.log(sum(np.exp(s[k]) for k in range(2 * n) if k != i))
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_ntxent_is_alignment_plus_tau_logsumexp_over_tau(tau):
    torch.manual_seed(0)
    z1, z2 = torch.randn(2, 7, 5).unbind(0)
    terms = cp.ntxent_terms(z1, z2, tau)
    u1, u2 = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    align = -(u1 * u2).sum(1).mean().item()  # -1/(2n) sum_i sim(z_i, z_i+): each pair counted for both anchors
    assert terms["align"].item() == pytest.approx(align, rel=1e-5)
    expected = numpy_ntxent(z1.numpy(), z2.numpy(), tau)
    assert terms["total"].item() == pytest.approx(expected, rel=1e-5)
    assert ((terms["align"] + tau * terms["distribution"]) / tau).item() == pytest.approx(expected, rel=1e-5)
    assert terms["total"].item() == pytest.approx(common.nt_xent(z1, z2, tau).item(), rel=1e-6)


def test_decoupled_against_numpy():
    rng = np.random.default_rng(1)
    h1, h2 = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    tau, lam = 0.3, 0.7
    u1, u2 = h1 / np.linalg.norm(h1, axis=1, keepdims=True), h2 / np.linalg.norm(h2, axis=1, keepdims=True)
    align = np.mean((u1 - u2) ** 2) / 2
    u = np.concatenate([u1, u2])
    scores = u @ u.T / tau  # diagonal and positives kept (the colab)
    dist = np.mean([np.log(np.exp(row).sum()) for row in scores]) - np.log(4)
    terms = cp.decoupled_terms(torch.tensor(h1), torch.tensor(h2), tau, lam)
    assert terms["align"].item() == pytest.approx(align, rel=1e-6)
    assert terms["distribution"].item() == pytest.approx(dist, rel=1e-6)
    assert terms["total"].item() == pytest.approx(align + lam * dist, rel=1e-6)


@pytest.mark.parametrize("prior", ["normal", "sphere", "cube"])
def test_swd_against_direct_computation(prior):
    rng = np.random.default_rng(2)
    n, d = 5, 4
    h1, h2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    w = cp.random_orthogonal(d, torch.Generator().manual_seed(3)).double()
    p = cp.sample_prior(prior, (2 * n, d), torch.Generator().manual_seed(4)).double()
    terms = cp.swd_terms(torch.tensor(h1), torch.tensor(h2), prior, 0.5, projection=w, prior_samples=p)
    if prior == "sphere":  # data normalized only for the hypersphere prior (colab hidden_norm)
        h1, h2 = h1 / np.linalg.norm(h1, axis=1, keepdims=True), h2 / np.linalg.norm(h2, axis=1, keepdims=True)
    data = np.concatenate([h1, h2]) @ w.numpy()
    prior_proj = p.numpy() @ w.numpy()
    dist = np.mean([(np.sort(data[:, j]) - np.sort(prior_proj[:, j])) ** 2 for j in range(d)])
    assert terms["distribution"].item() == pytest.approx(dist, rel=1e-6)
    assert terms["align"].item() == pytest.approx(np.mean((h1 - h2) ** 2) / 2, rel=1e-6)
    assert terms["total"].item() == pytest.approx(np.mean((h1 - h2) ** 2) / 2 + 0.5 * dist, rel=1e-6)


def test_projection_and_priors_have_the_right_distribution():
    g = torch.Generator().manual_seed(0)
    w = cp.random_orthogonal(16, g)
    torch.testing.assert_close(w @ w.T, torch.eye(16), atol=1e-5, rtol=0)
    assert not torch.allclose(w, cp.random_orthogonal(16, g))  # fresh each call
    sphere = cp.sample_prior("sphere", (4000, 8), g)
    torch.testing.assert_close(sphere.norm(dim=1), torch.ones(4000), atol=1e-5, rtol=0)
    cube = cp.sample_prior("cube", (4000, 8), g)
    assert cube.min() >= -1 and cube.max() <= 1 and abs(cube.mean()) < 0.02 and abs(cube.var() - 1 / 3) < 0.02
    normal = cp.sample_prior("normal", (4000, 8), g)
    assert abs(normal.mean()) < 0.03 and abs(normal.var() - 1) < 0.05


def test_generalized_loss_dispatch_and_scale():
    z1, z2 = torch.randn(2, 6, 8).unbind(0)
    args = tiny_args("--loss", "decoupled", "--decoupled-lambda", "0.5", "--decoupled-temperature", "0.3",
                     "--loss-scale", "10")  # fmt: skip
    direct = cp.decoupled_terms(z1, z2, 0.3, 0.5)["total"]
    assert cp.generalized_contrastive_loss(z1, z2, args)["total"].item() == pytest.approx(10 * direct.item(), rel=1e-6)
    args = tiny_args("--loss", "swd_cube", "--swd-lambda", "2")
    a = cp.generalized_contrastive_loss(z1, z2, args, torch.Generator().manual_seed(5))
    b = cp.generalized_contrastive_loss(z1, z2, args, torch.Generator().manual_seed(5))
    assert a["total"].item() == b["total"].item()  # W and prior come from the generator: reproducible per step


# ---------------------------------------------------------------- 2 gloo ranks == 1 process on the concatenated batch
def _rank_loss(rank, world, loss, h1, h2, w, p):
    h1, h2 = torch.tensor(h1, dtype=torch.float64), torch.tensor(h2, dtype=torch.float64)
    m = h1.shape[0] // world
    a = h1[rank * m : (rank + 1) * m].clone().requires_grad_()
    b = h2[rank * m : (rank + 1) * m].clone().requires_grad_()
    args = tiny_args("--loss", loss)
    inject = {}
    if loss.startswith("swd"):
        inject = {"projection": torch.tensor(w, dtype=torch.float64)}
        inject["prior_samples"] = torch.tensor(p, dtype=torch.float64)
    terms = cp.generalized_contrastive_loss(a, b, args, **inject)
    terms["total"].backward()
    return {**{k: v.item() for k, v in terms.items()}, "g1": a.grad.tolist(), "g2": b.grad.tolist()}


def _all_losses_worker(rank, world, cases):
    return {loss: _rank_loss(rank, world, loss, *case) for loss, case in cases.items()}


def test_loss_on_two_ranks_equals_one_process_on_the_concatenated_batch(tmp_path):
    """For every loss, 2 ranks holding half of the images each (negatives / the distribution term over the batch
    gathered with gradients) give: the mean over ranks of every term = the single-process term, and each rank's
    gradient on its own rows / world = the single-process gradient (DDP averages gradients over ranks). The SWD
    distribution term sorts over the whole global batch, so it only matches if the gather is complete."""
    torch.manual_seed(0)
    n, d = 8, 6
    h1, h2 = torch.randn(2, n, d, dtype=torch.float64).unbind(0)
    w = cp.random_orthogonal(d, torch.Generator().manual_seed(1)).double()
    priors = {loss: cp.sample_prior(loss[4:] if loss.startswith("swd") else "normal", (2 * n, d)).double()
              for loss in cp.LOSSES}  # fmt: skip
    cases = {loss: (h1.tolist(), h2.tolist(), w.tolist(), priors[loss].tolist()) for loss in cp.LOSSES}
    out = run_distributed(_all_losses_worker, 2, tmp_path, cases)
    for loss in cp.LOSSES:
        single = _rank_loss(0, 1, loss, *cases[loss])
        r0, r1 = out[0][loss], out[1][loss]
        for k in ("align", "distribution", "total"):
            assert (r0[k] + r1[k]) / 2 == pytest.approx(single[k], rel=1e-9), (loss, k)
        for g in ("g1", "g2"):
            ranks = torch.tensor(r0[g] + r1[g], dtype=torch.float64) / 2
            expected = torch.tensor(single[g], dtype=torch.float64)
            torch.testing.assert_close(ranks, expected, rtol=1e-9, atol=1e-12, msg=f"{loss} {g}")
        # the other rank's rows matter: a rank alone gives a different distribution term
        half = (h1[: n // 2].tolist(), h2[: n // 2].tolist(), w.tolist(), priors[loss][:n].tolist())
        assert _rank_loss(0, 1, loss, *half)["distribution"] != pytest.approx(r0["distribution"], rel=1e-6), loss


# ---------------------------------------------------------------- datasets
def framed_squares(count: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """'Blank' digits: white 28 px squares with a 1 px black frame (so neighbours never touch), labels 0..9."""
    d = torch.zeros(count, 1, 28, 28, dtype=torch.uint8)
    d[:, :, 1:-1, 1:-1] = 255
    return d, torch.arange(count) % 10


def count_regions(mask: np.ndarray) -> int:
    """Number of 4-connected components of a boolean image (flood fill)."""
    seen, regions = np.zeros_like(mask), 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        regions += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return regions


def test_grid_placement_uses_distinct_cells_and_never_overlaps():
    g = torch.Generator().manual_seed(0)
    for n in (1, 8, 16):
        top, left = cp.place(300, n, 20, 112, "grid", g)
        assert top.shape == (300, n)
        cell = 112 // cp.GRID
        cells = (top // cell) * cp.GRID + left // cell
        assert all(len(set(row.tolist())) == n for row in cells)  # distinct cells
        assert ((top % cell) + 20 <= cell).all() and ((left % cell) + 20 <= cell).all()  # inside its cell
        for i in range(0, 300, 7):  # boxes pairwise disjoint
            for a in range(n):
                for b in range(a + 1, n):
                    apart_y = abs(int(top[i, a]) - int(top[i, b])) >= 20
                    apart_x = abs(int(left[i, a]) - int(left[i, b])) >= 20
                    assert apart_y or apart_x


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 16])
def test_multidigits_has_n_digits(n):
    digits, labels = framed_squares()
    g = torch.Generator().manual_seed(n)
    data = cp.multidigits(digits, labels, 20, n, 28, 112, "grid", g)
    assert data.images.shape == (20, 1, 112, 112) and data.images.dtype == torch.uint8
    for img in data.images[:, 0].numpy():
        assert count_regions(img > 0) == n
    assert (data.multi_hot.sum(1) >= 1).all() and (data.multi_hot.sum(1) <= n).all()
    random = cp.multidigits(digits, labels, 20, n, 28, 112, "random", g)  # may overlap: at most n regions
    assert all(1 <= count_regions(img > 0) <= n for img in random.images[:, 0].numpy())


def test_multidigits_size_places_the_sizes_of_the_flags():
    digits = torch.full((10, 1, 28, 28), 255, dtype=torch.uint8)  # solid squares: area = side^2
    data = cp.two_sizes(digits, torch.arange(10), 200, 20, 50, 112, torch.Generator().manual_seed(0))
    (ts, ls), (tl, ll) = data.positions["small"], data.positions["large"]
    checked = 0
    for i in range(200):
        overlap = (ts[i] < tl[i] + 50) and (tl[i] < ts[i] + 20) and (ls[i] < ll[i] + 50) and (ll[i] < ls[i] + 20)
        if not overlap:
            checked += 1
            assert int((data.images[i] > 0).sum()) == 20 * 20 + 50 * 50
            assert (data.images[i, 0, tl[i] : tl[i] + 50, ll[i] : ll[i] + 50] == 255).all()
    assert checked > 50
    args = tiny_args("--dataset", "multidigits_size", "--large-size", "30", "--train-size", "50", "--test-size", "20")
    train, probes = cp.build_sets(args)
    assert set(train.targets) == {"small", "large"} and set(probes) == {"small", "large"}
    # each probe shows a single digit of its own size: the nonzero bounding box fits in size x size
    for name, side in (("small", 10), ("large", 30)):
        for img in probes[name][1].images[:10, 0]:
            ys, xs = torch.nonzero(img, as_tuple=True)
            assert ys.max() - ys.min() < side and xs.max() - xs.min() < side


def test_randbit_bits_are_shared_by_both_views_fixed_across_epochs_and_decode_to_the_integer():
    args = tiny_args("--dataset", "randbit", "--bits", "5", "--train-size", "64", "--test-size", "16")
    train, probes = cp.build_sets(args)
    ints = torch.randint(0, 2**5, (64,), generator=torch.Generator().manual_seed(args.data_seed * 10))
    decoded = (train.bits * (2 ** torch.arange(5))).sum(1)
    assert torch.equal(decoded, ints)  # the binary digits of the image's own random integer
    assert torch.equal(cp.build_sets(args)[0].bits, train.bits)  # seeded: the same on every build
    info = common.DistInfo(0, 0, 1, torch.device("cpu"))
    augment = cp.make_augment(args)
    seen = {}
    for epoch in (0, 1):
        for idx, x in cp.train_batches(train, augment, epoch, 0, 0, info, 16):
            assert x.shape == (32, 8, 28, 28)
            v1, v2 = x[:16], x[16:]
            assert torch.equal(v1[:, 3:], v2[:, 3:])  # identical bit channels in both views
            assert not torch.equal(v1[:, :3], v2[:, :3])  # the RGB channels are augmented independently
            expected = train.bits[idx].float()[:, :, None, None].expand(-1, -1, 28, 28)
            assert torch.equal(v1[:, 3:], expected)  # constant over the image, never augmented
            for i, b in zip(idx.tolist(), v1[:, 3:, 0, 0].tolist()):
                assert seen.setdefault(i, b) == b  # the same bits in every epoch
    assert len(seen) == 64
    assert probes["rgb"][1].bits.shape == (16, 5)


def test_digit_on_uses_exactly_u_distinct_digits():
    digits, labels = cp.drawn_digits(500, 0)
    base = torch.zeros(300, 3, 32, 32, dtype=torch.uint8)  # black base: the image is the tiled digit layer
    assign = (torch.arange(300) % 7)[torch.randperm(300)]
    data = cp.digit_on(base, torch.zeros(300, dtype=torch.int64), digits, labels, assign, 8, "add")
    assert len(torch.unique(data.images.flatten(1), dim=0)) == 7  # U distinct composites
    tiles = {int(32 * r) for r in cp.DIGIT_ON_OFFSETS}
    assert tiles == {4, 14, 24}
    for img in data.images[:5, 0]:  # the same digit at the 9 places
        ref = img[4:12, 4:12]
        assert all(torch.equal(img[y : y + 8, x : x + 8], ref) for y in tiles for x in tiles)
    args = tiny_args("--dataset", "digit_on", "--unique-digits", "13", "--train-size", "200", "--test-size", "50")
    train, probes = cp.build_sets(args)
    assert len(torch.unique(train.targets["digit_id"])) == 13 and set(probes) == {"digit", "base"}
    # composites: add clips at 255, max keeps the brighter of base and digit
    bright = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    add = cp.digit_on(bright, torch.zeros(2, dtype=torch.int64), digits, labels, torch.tensor([0, 1]), 8, "add")
    mx = cp.digit_on(bright, torch.zeros(2, dtype=torch.int64), digits, labels, torch.tensor([0, 1]), 8, "max")
    assert add.images.max() == 255 and mx.images.min() == 200 and (add.images >= mx.images).all()


def test_digit_on_an_image_folder(tmp_path):
    from PIL import Image

    for cls, color in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(3):
            for split in ("train", "val"):
                Image.new("RGB", (48, 40), color).save(tmp_path / split / cls / f"{i}.png")
    args = tiny_args("--dataset", "digit_on", "--base", "imagefolder", "--data-root", str(tmp_path),
                     "--unique-digits", "2")  # fmt: skip
    train, probes = cp.build_sets(args)
    assert train.images.shape == (6, 3, 32, 32) and sorted(train.targets["base"].tolist()) == [0, 0, 0, 1, 1, 1]
    assert len(torch.unique(train.targets["digit_id"])) == 2 and probes["base"][1].images.shape == (6, 3, 32, 32)


def test_drawn_digits_are_seeded_and_balanced():
    a, la = cp.drawn_digits(1000, 3)
    b, lb = cp.drawn_digits.__wrapped__(1000, 3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == (1000, 1, 28, 28) and 60 <= torch.bincount(la, minlength=10).min()
    assert (a[:, :, :2].amax() == 0) or (a.float().mean() < 60)  # black background, ink in the middle


# ---------------------------------------------------------------- model, features, errors
def test_model_channels_features_and_layers():
    args = tiny_args("--dataset", "randbit", "--bits", "3")
    model = cp.build_model(args)
    x = torch.rand(4, 3, 28, 28)
    bits = torch.randint(0, 2, (4, 3))
    assert cp.features(model, cp.with_bits(x, bits)).shape == (4, 128)
    assert cp.features(model, cp.with_bits(x, bits), layer=0).shape == (4, 32)
    assert cp.num_feature_layers(model) == 3 and model.training
    with pytest.raises(ValueError, match="bit channels"):
        cp.features(model, x)
    r = cp.build_model(tiny_args("--arch", "resnet18", "--dataset", "plain", "--image-size", "32"))
    assert r.backbone.conv1.kernel_size == (3, 3) and cp.features(r, torch.rand(2, 3, 32, 32)).shape == (2, 512)
    assert r.head[-1].out_features == 64 and r.head[0].out_features == 512


def test_bad_inputs_give_one_line_errors(tmp_path):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            cp.main([*TINY, "--output-dir", str(tmp_path), *argv])
        return str(e.value)

    assert "--digits fashion_mnist | drawn" in error("--dataset", "multidigits", "--digits", "mnist",
                                                    "--data-root", str(tmp_path))  # fmt: skip
    assert "does not fit a grid cell" in error("--dataset", "multidigits", "--placement", "grid", "--digit-size", "20")
    assert "--bits must be in 0..62" in error("--bits", "70")
    assert "smaller than one global batch" in error("--train-size", "100", "--batch-size", "256")
    assert error("--bits", "70").startswith("contrastive_props.py: error:")


# ---------------------------------------------------------------- end to end: python, resume, torchrun
def test_end_to_end_run_writes_the_run_folder_and_eval_probe_reads_it(tmp_path):
    proc = run_script(["contrastive_props.py", *TINY, "--dataset", "plain", "--train-size", "512", "--test-size",
                       "256", "--batch-size", "128", "--steps", "3", "--log-every", "1", "--probe-epochs", "2",
                       "--run-name", "e2e"], cwd=tmp_path)  # fmt: skip
    assert "step 3: probe/rgb" in proc.stdout
    run = tmp_path / "runs" / "e2e"
    saved = json.load(open(run / "args.json"))
    assert saved["loss"] == "ntxent" and saved["digits"] == "drawn"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss/total" in r] == [1, 2, 3]
    assert {"loss/align", "loss/distribution", "perf/images_per_s"} <= set(rows[0])
    assert 0 <= json.load(open(run / "probe.json"))["probe/rgb"] <= 1
    import eval_probe  # the checkpoint is evaluated like any other method's

    out = eval_probe.main(["--ckpt", str(run / "checkpoint.pt"), "--protocols", "knn", "--dataset", "synthetic"])
    assert out and 0 <= out[0]["metrics"]["acc"] <= 1


def test_eval_probe_reads_a_randbit_checkpoint_through_the_eval_batches_hook(tmp_path):
    """A RandBit checkpoint names a dataset only this file builds: eval_probe takes its probe data (RGB plus the bit
    planes) from contrastive_props.eval_batches, with no --dataset."""
    import eval_probe

    cp.main([*TINY, "--dataset", "randbit", "--bits", "3", "--train-size", "256", "--test-size", "128",
              "--batch-size", "64", "--steps", "2", "--probe-epochs", "0", "--output-dir", str(tmp_path),
              "--run-name", "rb"])  # fmt: skip
    out = eval_probe.main(["--ckpt", str(tmp_path / "rb" / "checkpoint.pt"), "--protocols", "knn", "--no-cache"])
    assert out[0]["dataset"] == "randbit" and 0 <= out[0]["metrics"]["acc"] <= 1


def test_resume_is_bitwise_exact(tmp_path):
    base = [*TINY, "--dataset", "randbit", "--bits", "2", "--loss", "swd_sphere", "--train-size", "512",
            "--batch-size", "64", "--output-dir", str(tmp_path), "--probe-epochs", "0", "--log-every", "2"]  # fmt: skip
    cp.main(base + ["--run-name", "straight", "--steps", "10"])
    cp.main(base + ["--run-name", "resumed", "--steps", "5"])
    final = cp.main(base + ["--run-name", "resumed", "--steps", "10"])  # crosses an epoch boundary (8 steps/epoch)
    assert final["step"] == 10
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_torchrun_two_processes(tmp_path):
    proc = run_script(["contrastive_props.py", *TINY, "--dataset", "randbit", "--bits", "3", "--loss", "swd_normal",
                       "--train-size", "256", "--batch-size", "32", "--steps", "2", "--probe-epochs", "1",
                       "--run-name", "ddp"], cwd=tmp_path, torchrun=2)  # fmt: skip
    assert "2 x 16 images/step" in proc.stdout
    ckpt = common.load_checkpoint(str(tmp_path / "runs" / "ddp" / "checkpoint.pt"), "contrastive_props")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2 and not any(k.startswith("module.") for k in ckpt["model"])


# ---------------------------------------------------------------- smoke: every loss beats the untrained network
SMOKE = ["--dataset", "plain", "--train-size", "2000", "--test-size", "1000", "--steps", "15", "--batch-size", "128",
         "--probe-epochs", "30"]  # fmt: skip


def test_every_loss_beats_the_untrained_network(tmp_path):
    """15 steps of batch 128 (the tiny ConvNet on Fashion-MNIST, Debian package) with each of the five losses: the
    linear probe of h on 1000 held-out images beats the same architecture untrained (same probe, same data)."""
    results, base = {}, None
    for loss in cp.LOSSES:  # the untrained baseline is the same for every loss (same seed, architecture, probe)
        untrained = ["--probe-untrained"] if base is None else []
        out = cp.main([*TINY, *SMOKE, "--loss", loss, "--output-dir", str(tmp_path), "--run-name", loss, *untrained])
        base = out.get("probe_untrained/rgb", base)
        results[loss] = (out["probe/rgb"], base)
    print(results)
    for loss, (trained, base) in results.items():
        assert trained > base + 0.01, (loss, trained, base)
    assert math.isfinite(sum(t for t, _ in results.values()))


# ---------------------------------------------------------------- studies (issue 16)
STUDY_TINY = ["--scale", "tiny", "--steps", "2", "--temperatures", "0.2",
              "--train-args", "--train-size 128 --test-size 64 --batch-size 64 --probe-epochs 1"]  # fmt: skip
FIRST_VALUE = {"losses": "2", "multidigits": "1", "suppression-size": "10", "digit-on": "1", "randbit": "0"}
SECOND_VALUE = {"losses": "3", "multidigits": "2", "suppression-size": "20", "digit-on": "5", "randbit": "2"}


@pytest.mark.parametrize("study", cp.STUDIES)
def test_study_writes_csv_and_plot_and_a_rerun_continues(study, tmp_path, monkeypatch, capsys):
    """The smallest sweep of every sub-command: a CSV with the documented columns (one row per point and probe target),
    a PNG when matplotlib is installed (else the note saying how to get it); a rerun with one more value trains only
    the new points, and a rerun of the same command trains nothing."""
    import importlib.util

    calls = []  # the training runs: run_study calls main(<training flags>) once per point
    real_main = cp.main
    monkeypatch.setattr(cp, "main", lambda argv: calls.append(argv) or real_main(argv))
    extra = ["--losses", "ntxent,swd_cube"] if study == "losses" else []
    argv = [*STUDY_TINY, *extra, "--out", str(tmp_path)]
    rows = real_main([study, *argv, "--values", FIRST_VALUE[study]])
    first = len(calls)
    methods = {"losses": 2, "multidigits": 4, "suppression-size": 2, "digit-on": 1, "randbit": 1}[study]
    assert first == methods  # one training run per point
    csv_path = tmp_path / f"{study.replace('-', '_')}.csv"
    header = open(csv_path).readline().strip().split(",")
    assert header == cp.CSV_COLUMNS
    targets = {"losses": {"rgb"}, "multidigits": {"digit"}, "suppression-size": {"small", "large"},
               "digit-on": {"digit", "base"}, "randbit": {"rgb"}}[study]  # fmt: skip
    assert {r["target"] for r in rows} == targets and len(rows) == first * len(targets)
    for r in rows:
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["untrained"]) <= 1 and r["steps"] == "2"
    real_main([study, *argv, "--values", f"{FIRST_VALUE[study]},{SECOND_VALUE[study]}"])
    assert len(calls) == 2 * first  # only the new value's points were trained
    assert all(SECOND_VALUE[study] in " ".join(a) for a in calls[first:])
    rows = real_main([study, *argv, "--values", f"{FIRST_VALUE[study]},{SECOND_VALUE[study]}"])
    assert len(calls) == 2 * first and len(rows) == 2 * first * len(targets)  # nothing retrained, nothing duplicated
    png = tmp_path / f"{study.replace('-', '_')}.png"
    if importlib.util.find_spec("matplotlib"):
        assert png.exists() and png.stat().st_size > 1000
    else:
        assert not png.exists() and "matplotlib is not installed" in capsys.readouterr().out


def test_study_points_follow_the_paper_setups():
    sa = common.parse_args(cp.StudyArgs, ["--scale", "paper"])
    points = cp.study_points("suppression-size", sa)
    methods = {k["method"] for k, _ in points}
    assert methods == {"simclr", "supervised"}  # SimCLR at two temperatures and the supervised baseline (Table 4)
    assert sorted({k["value"] for k, _ in points}) == [20, 30, 40, 50, 60, 70, 80]
    assert len(points) == 3 * 7 and all("--batch-size" in a and "1024" in a for _, a in points)
    args = common.parse_args(cp.Args, points[0][1], cp.PRESETS)
    assert (args.arch, args.canvas, args.digit_size, args.optimizer) == ("resnet18", 112, 20, "lars")
    grid = [a for k, a in cp.study_points("multidigits", sa) if "grid" in k["method"]]
    assert len(grid) == 2 * 6  # simclr + supervised, n in {1, 2, 4, 8, 12, 16}


def test_help_documents_every_field(capsys):
    for argv, cls in (([], cp.Args), (["randbit"], cp.StudyArgs)):
        with pytest.raises(SystemExit):
            cp.main([*argv, "--help"])
        out = capsys.readouterr().out
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in out, f.name


def test_eval_batches_hook_gives_the_probe_data_with_bits():
    args = tiny_args("--dataset", "randbit", "--bits", "4", "--train-size", "40", "--test-size", "24")
    batches = list(cp.eval_batches(args, "test", 10, "cpu"))
    assert [len(y) for _, y in batches] == [10, 10, 4]
    x, y = batches[0]
    assert x.shape == (10, 3 + 4, 28, 28) and set(x[:, 3:].unique().tolist()) <= {0.0, 1.0}  # RGB + 4 bit planes
    assert (x[:, 3:] == x[:, 3:, :1, :1]).all()  # each bit plane is constant over the image
    model = cp.build_model(args)
    assert cp.features(model, x).shape == (10, 128)
