"""common.py augmentations (SPEC 1.5, 9): the batched on-device augmentation and the per-image torchvision pipeline
draw from the same distribution, measured from their outputs only; the batched building blocks agree with
torchvision's functional ops.

Distribution checks compare 1000-4000 draws of each implementation. A two-sample Kolmogorov-Smirnov distance is
compared with its 0.1% critical value c * sqrt((n + m) / (n m)), c = sqrt(ln(2 / 0.001) / 2) = 1.95 (conservative
for the discrete values measured here), and rates / means with 4.5 standard errors (two-sided p < 1e-5). Seeds are
fixed, so every run is deterministic; the thresholds say how unlikely a failure of a correct implementation is.
"""

import colorsys
import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from common import (
    BatchedAugment,
    adjust_hue_batch,
    augment_config,
    color_jitter_batch,
    gaussian_blur_batch,
    hsv_to_rgb,
    per_image_transform,
    resized_crop_antialiased,
    resized_crop_batch,
    rgb_to_hsv,
)

KS_C = math.sqrt(math.log(2 / 1e-3) / 2)  # 1.95: KS critical constant at alpha = 0.1%
Z = 4.5  # standard errors allowed for a rate or a mean (two-sided p ~ 7e-6)


def ks_distance(a, b) -> float:
    """Two-sample KS statistic sup_v |F_a(v) - F_b(v)| (ties handled by evaluating both ECDFs at every value)."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    v = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, v, "right") / len(a) - np.searchsorted(b, v, "right") / len(b))))


def ks_threshold(n: int, m: int) -> float:
    return KS_C * math.sqrt((n + m) / (n * m))


def assert_same_distribution(a, b, name: str):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = ks_distance(a, b)
    assert d < ks_threshold(len(a), len(b)), f"{name}: KS distance {d:.4f} (means {a.mean():.4f} vs {b.mean():.4f})"
    se = math.sqrt(a.var() / len(a) + b.var() / len(b)) + 1e-12
    assert abs(a.mean() - b.mean()) < Z * se, f"{name}: means {a.mean():.4f} vs {b.mean():.4f} (se {se:.4f})"


def assert_rate(hits, p: float, name: str):
    hits = np.asarray(hits, np.float64)
    se = math.sqrt(p * (1 - p) / len(hits))
    assert abs(hits.mean() - p) < Z * se, f"{name}: rate {hits.mean():.4f}, expected {p} (se {se:.4f})"


def views(kind: str, size: int, image: torch.Tensor, n: int, seed: int = 0, per_crop_devices=("cpu",), **kw):
    """n views of one (C, H, W) image from each implementation: (per_image (n, 3, S, S), batched (n, 3, S, S)).
    per_crop_devices=() runs the batched mae view's GPU path (one grid_sample) on the CPU."""
    transform = per_image_transform(kind, size, **kw)
    torch.manual_seed(seed)
    per_image = torch.stack([transform(image) for _ in range(n)])
    generator = torch.Generator().manual_seed(seed + 1)
    batched = BatchedAugment(kind, size, **kw)
    batched.per_crop_devices = per_crop_devices
    return per_image, batched(image.expand(n, *image.shape), generator=generator)


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """(3, H, W) float: channel 0 = (x + 0.5) / W, channel 1 = (y + 0.5) / H (pixel centers), channel 2 = 0.5."""
    y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return torch.stack([x / width, y / height, torch.full_like(x, 0.5)])


def measure_crops(out: torch.Tensor, height: int, width: int) -> dict[str, np.ndarray]:
    """Recover each view's crop box from a resized crop of `coordinate_image(height, width)`.

    Output column d samples source x = left + (d + 0.5) w / S - 0.5, so channel 0 is linear in d with slope
    w / (S W) (negative when mirrored), and its value at the middle column (S - 1) / 2 is the box center. Columns
    4..S-5 are fitted by least squares: there neither implementation clamps to the box edge, even for bicubic taps on
    the smallest boxes (w >= 12 px at scale 0.2 on 32 px). Bilinear interpolation and torchvision's antialiased
    bicubic (a = -0.5) reproduce a ramp exactly; grid_sample's bicubic (a = -0.75) does not, but the fitted side
    stays within 0.2 px of the true integer, so rounding recovers it.
    """
    S = out.shape[-1]
    d = torch.arange(4, S - 4, dtype=torch.float32)
    d = d - d.mean()  # centered: d = 0 is the middle column
    vx = out[:, 0, :, 4 : S - 4].mean(1)  # (n, S - 8)
    vy = out[:, 1, 4 : S - 4, :].mean(2)
    slope_x, slope_y = (vx * d).sum(1) / (d * d).sum(), (vy * d).sum(1) / (d * d).sum()
    w, h = slope_x.abs() * S * width, slope_y * S * height
    # the measurement itself must be clean: near-integer box sides and half-integer centers
    assert (w - w.round()).abs().max() < 0.25 and (h - h.round()).abs().max() < 0.25
    w, h = w.round(), h.round()
    center_x, center_y = vx.mean(1) * width, vy.mean(1) * height
    return {
        "area": (w * h / (height * width)).numpy(),
        "log_aspect": torch.log(w / h).numpy(),
        "center_x": (torch.round(2 * center_x) / 2).numpy(),
        "center_y": (torch.round(2 * center_y) / 2).numpy(),
        "flip": (slope_x < 0).numpy(),
    }


NO_COLOR = {"jitter_p": 0.0, "gray_p": 0.0, "blur": False}


@pytest.mark.parametrize(
    "kind,hw,kw",
    [
        ("simclr", (32, 32), NO_COLOR),  # GCRL Table 2 crop (scale 0.2)
        ("mae", (32, 32), {}),  # bicubic, crop by crop with torchvision's kernel (the CPU path)
        ("mae", (32, 32), {"per_crop_devices": ()}),  # bicubic, one grid_sample (the GPU path)
        # a 16x64 image with scale (0.3, 1): most draws overflow the height, ~60% of crops take the 10-attempt fallback
        ("simclr", (16, 64), {**NO_COLOR, "scale": (0.3, 1.0)}),
    ],
)
def test_crop_and_flip_distribution_matches(kind, hw, kw):
    n = 4000  # enough to tell a uniform aspect ratio from the log-uniform one (KS ~0.07 vs threshold 0.044)
    kw = dict(kw)
    devices = kw.pop("per_crop_devices", ("cpu",))
    per_image, batched = views(kind, 32, coordinate_image(*hw), n, per_crop_devices=devices, **kw)
    m1, m2 = measure_crops(per_image, *hw), measure_crops(batched, *hw)
    for key in ("area", "log_aspect", "center_x", "center_y"):
        assert_same_distribution(m1[key], m2[key], f"{kind} {hw} {key}")
    assert_rate(m1["flip"], 0.5, "per-image flip")
    assert_rate(m2["flip"], 0.5, "batched flip")
    scale = augment_config(kind, 32, **kw)["scale"]
    for m in (m1, m2):  # area within the scale range, up to the rounding of w and h (half a pixel per side)
        assert m["area"].min() > scale[0] - 0.1 and m["area"].max() <= 1.0
        assert np.abs(m["log_aspect"]).max() < math.log(4 / 3) + 0.1


def test_crop_distribution_test_has_power():
    """Negative control: the same comparison tells scale (0.2, 1) from (0.3, 1)."""
    image, n = coordinate_image(32, 32), 4000
    per_image, _ = views("simclr", 32, image, n, **NO_COLOR)
    other = BatchedAugment("simclr", 32, scale=(0.3, 1.0), **NO_COLOR)
    batched = other(image.expand(n, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    a1, a2 = measure_crops(per_image, 32, 32)["area"], measure_crops(batched, 32, 32)["area"]
    assert ks_distance(a1, a2) > 2 * ks_threshold(n, n)


def test_weak_offsets_and_flip_distribution():
    n, S = 2000, 32
    measured = []  # (left, top, flip) per implementation
    for out in views("weak", S, coordinate_image(S, S), n):
        # the central output pixel always comes from inside the image (never from the reflected border)
        x15 = (out[:, 0, S // 2, S // 2 - 1] * S - 0.5).round()
        x16 = (out[:, 0, S // 2, S // 2] * S - 0.5).round()
        y16 = (out[:, 1, S // 2, S // 2] * S - 0.5).round()
        flip = x16 < x15
        # output column 16 is padded column left + 16 (kept) or left + 15 (mirrored); image column = padded - 4
        left = torch.where(flip, x16 - 11, x16 - 12)
        top = y16 - 12
        assert left.min() == 0 and left.max() == 8 and top.min() == 0 and top.max() == 8
        measured.append((left.numpy(), top.numpy(), flip.numpy()))
    (left1, top1, flip1), (left2, top2, flip2) = measured
    for name, a, b in (("left", left1, left2), ("top", top1, top2)):
        assert_same_distribution(a, b, f"weak {name}")
        frequencies = np.bincount(b.astype(int), minlength=9) / n  # uniform on 0..8
        assert np.abs(frequencies - 1 / 9).max() < Z * math.sqrt((1 / 9) * (8 / 9) / n)
    assert_rate(flip1, 0.5, "per-image weak flip")
    assert_rate(flip2, 0.5, "batched weak flip")


def test_weak_apply_equals_reflect_pad_and_crop():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    params = {"offset": torch.tensor([[0, 8], [5, 3]]), "flip": torch.tensor([False, True])}
    out = BatchedAugment("weak", 32).apply(images, params)
    padded = np.pad(images.numpy().astype(np.float32) / 255.0, ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    expect0 = padded[0, :, 0:32, 8:40]
    expect1 = padded[1, :, 5:37, 3:35][:, :, ::-1]
    np.testing.assert_array_equal(out[0].numpy(), expect0)
    np.testing.assert_array_equal(out[1].numpy(), expect1)


def test_grayscale_and_jitter_rates():
    """On a constant colorful image a view is gray iff RandomGrayscale fired: jitter cannot produce a gray pixel
    (saturation factor >= 0.6 > 0; brightness, contrast and hue keep chroma > 0), so the gray rate is gray_p = 0.2.
    A view equals the input iff neither jitter nor grayscale fired: (1 - 0.8) * (1 - 0.2) = 0.16 (a jittered view
    would need all four factors within ~1e-4 of the identity). 4000 views: a 0.05 error in either probability is
    more than 7 standard errors."""
    n = 4000
    color = torch.tensor([0.8, 0.5, 0.2]).view(3, 1, 1).expand(3, 32, 32)
    for out in views("simclr", 32, color, n):
        assert_rate((out.amax(1) - out.amin(1)).amax((1, 2)) < 1e-6, 0.2, "grayscale")
        assert_rate((out - color).abs().amax((1, 2, 3)) < 1e-4, 0.2 * 0.8, "neither jitter nor grayscale")


FULL_CROP = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "flip_p": 0.0}  # crop = the whole image, resize = identity


def _measure_brightness(out):
    return (out[:, 0].mean((1, 2)) / 0.5).numpy()


def _measure_contrast(out):
    return ((out[:, 0, :, -1] - out[:, 0, :, 0]).mean(1) / 0.4).numpy()


def _measure_saturation(out):
    return ((out[:, 0] - out[:, 2]).mean((1, 2)) / 0.2).numpy()


def _measure_hue(out):  # hue shift measured with the standard library, independently of common.rgb_to_hsv
    base = colorsys.rgb_to_hsv(0.6, 0.5, 0.4)[0]
    hues = [colorsys.rgb_to_hsv(*rgb)[0] for rgb in out[:, :, 0, 0].tolist()]
    return (np.array(hues) - base + 0.5) % 1.0 - 0.5


def _half_and_half():
    image = torch.full((3, 32, 32), 0.3)
    image[:, :, 16:] = 0.7
    return image


@pytest.mark.parametrize(
    "op,image,measure,low,high",
    [
        # s = 0.5: brightness, contrast, saturation ~ U[0.6, 1.4], hue shift ~ U[-0.1, 0.1] (SimCLR 0.8s, 0.2s)
        ("brightness", torch.full((3, 32, 32), 0.5), _measure_brightness, 0.6, 1.4),
        ("contrast", _half_and_half(), _measure_contrast, 0.6, 1.4),
        ("saturation", torch.tensor([0.6, 0.5, 0.4]).view(3, 1, 1).expand(3, 32, 32), _measure_saturation, 0.6, 1.4),
        ("hue", torch.tensor([0.6, 0.5, 0.4]).view(3, 1, 1).expand(3, 32, 32), _measure_hue, -0.1, 0.1),
    ],
)
def test_jitter_factor_distribution(op, image, measure, low, high):
    """One jitter op on, always applied, on an image where its factor can be read back without clamping."""
    n = 1000
    strengths = dict(brightness=(0.4, 0, 0, 0), contrast=(0, 0.4, 0, 0), saturation=(0, 0, 0.4, 0), hue=(0, 0, 0, 0.1))
    kw = {**FULL_CROP, "jitter": strengths[op], "jitter_p": 1.0, "gray_p": 0.0}
    per_image, batched = views("simclr", 32, image, n, **kw)
    f1, f2 = measure(per_image), measure(batched)
    assert_same_distribution(f1, f2, op)
    for f in (f1, f2):
        assert low - 1e-4 < f.min() < low + 0.02 and high - 0.02 < f.max() < high + 1e-4, (op, f.min(), f.max())
        uniform = np.linspace(low, high, 10001)  # one-sample KS against U[low, high]
        assert ks_distance(f, uniform) < KS_C * math.sqrt(1 / n + 1 / len(uniform)), op


def test_jitter_order_is_a_uniform_permutation():
    n = 24000
    order = BatchedAugment("simclr", 32).sample_params(n, 32, 32, "cpu", torch.Generator().manual_seed(0))["order"]
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(n, 4))
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.unique(codes, return_counts=True)[1].double()
    assert len(counts) == 24
    chi2 = float(((counts - n / 24) ** 2 / (n / 24)).sum())
    assert chi2 < 55.0  # chi-square, 23 degrees of freedom: P(> 55) ~ 2e-4


def test_color_jitter_matches_torchvision_in_given_order():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 16, 16)
    factors = torch.tensor(
        [[1.3, 0.7, 1.2, 0.05], [0.6, 1.4, 0.8, -0.1], [1.0, 1.1, 0.6, 0.08]] * 2, dtype=torch.float32
    )
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2], [3, 0, 2, 1], [0, 2, 3, 1]])
    apply = torch.tensor([True, True, True, True, True, False])
    out = color_jitter_batch(images, factors, order, apply)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(6):
        expect = images[i]
        for op in order[i].tolist() if apply[i] else []:
            expect = ops[op](expect, factors[i, op].item())
        torch.testing.assert_close(out[i], expect, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("channels", [3, 1])
def test_mae_view_equals_torchvision_resized_crop_and_flip(dtype, channels):
    """On the CPU the batched mae view is, bit for bit, what the per-image pipeline computes for the same box and flip:
    v2's resized_crop (bicubic, antialiased; on uint8 its uint8 kernel) + horizontal_flip + ToDtype (+ clamp). Boxes
    that enlarge, shrink (the 120 px image into 48 px) and keep the whole image (no resampling at all)."""
    torch.manual_seed(0)
    n, S = 12, 48
    images = torch.randint(0, 256, (n, channels, 100, 120), dtype=torch.uint8)
    images = images if dtype == torch.uint8 else images.float() / 255
    aug = BatchedAugment("mae", S)
    params = aug.sample_params(n, 100, 120, "cpu", torch.Generator().manual_seed(2))
    params["crop"][:3] = torch.tensor([[0, 0, 100, 120], [5, 7, 13, 9], [50, 60, 48, 48]])
    params["flip"][:3] = torch.tensor([True, False, True])
    assert 0 < int(params["flip"].sum()) < n
    out = aug.apply(images, params)
    for i in range(n):
        rgb = images[i].expand(3, 100, 120)
        expect = TF.resized_crop(rgb, *params["crop"][i].tolist(), [S, S], interpolation=TF.InterpolationMode.BICUBIC)
        expect = TF.horizontal_flip(expect) if params["flip"][i] else expect
        expect = TF.to_dtype(expect, torch.float32, scale=True).clamp(0, 1)  # the pipeline's ToDtype and clamp
        assert torch.equal(out[i], expect), f"image {i}"
    assert out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(resized_crop_antialiased(images, params["crop"], S, params["flip"]), out, atol=0, rtol=0)


def test_mae_view_without_torchs_private_out_kernels_is_the_same(monkeypatch):
    """The per-crop path writes through torch's private out= resampling kernels; a torch without them falls back to
    F.interpolate (one copy more per crop) with the same result."""
    import common

    images = torch.randint(0, 256, (6, 3, 40, 44), dtype=torch.uint8)
    boxes, flip = (
        torch.tensor([[0, 0, 40, 44], [3, 5, 11, 9], [10, 2, 30, 40]] * 2),
        torch.tensor([1, 0, 1, 0, 0, 1]).bool(),
    )
    fast = resized_crop_antialiased(images, boxes, 32, flip)
    monkeypatch.setattr(common, "_RESAMPLE_INTO", {})
    assert torch.equal(resized_crop_antialiased(images, boxes, 32, flip), fast)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resized_crop_matches_torchvision(interpolation):
    """Against torchvision's resized_crop without antialiasing (= F.interpolate on the cropped tensor). Bicubic taps
    may read one pixel beyond the box in the batched version (torchvision clamps to the box), so for bicubic only
    outputs whose 4 taps stay inside the box are compared (7 px margin for the 7 px high box)."""
    torch.manual_seed(0)
    images = torch.rand(8, 3, 24, 40)
    boxes = torch.tensor([[0, 0, 24, 40], [3, 5, 10, 12], [10, 20, 14, 20], [0, 30, 7, 9]] * 2)
    flip = torch.tensor([False, False, False, False, True, True, True, True])
    out = resized_crop_batch(images, boxes, 32, flip, interpolation)
    inner = slice(None) if interpolation == "bilinear" else slice(7, -7)
    for i in range(8):
        t, left, h, w = boxes[i].tolist()
        expect = TF.resized_crop(images[i], t, left, h, w, [32, 32], interpolation=interpolation, antialias=False)
        expect = TF.horizontal_flip(expect).clamp(0, 1) if flip[i] else expect.clamp(0, 1)
        torch.testing.assert_close(out[i, :, inner, inner], expect[:, inner, inner], atol=1e-5, rtol=0)


def test_gaussian_blur():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 20, 20)
    torch.testing.assert_close(gaussian_blur_batch(images, torch.full((4,), 1e-3), 9), images, atol=1e-6, rtol=0)
    constant = torch.full((4, 3, 20, 20), 0.37)
    torch.testing.assert_close(gaussian_blur_batch(constant, torch.rand(4) * 2 + 0.1, 9), constant, atol=1e-6, rtol=0)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = gaussian_blur_batch(images, sigma, 9)
    for i in range(4):
        torch.testing.assert_close(
            out[i], TF.gaussian_blur(images[i], [9, 9], [sigma[i].item()] * 2), atol=1e-5, rtol=0
        )


def test_blur_rate_and_sigma_distribution():
    """96 px (blur on by default): a centered point light; the blurred view's horizontal second moment is
    sum_t t^2 k(t) for the view's sigma (kernel 9 taps, SimCLR size // 10), 0 when not blurred (p = 0.5)."""
    n, S = 1000, 96
    point = torch.zeros(3, S, S)
    point[:, S // 2, S // 2] = 1.0
    assert augment_config("simclr", S)["blur"] and augment_config("simclr", S)["blur_kernel"] == 9
    per_image, batched = views("simclr", S, point, n, **FULL_CROP, jitter_p=0.0, gray_p=0.0)
    t = (torch.arange(S) - S // 2).float() ** 2
    moments = []
    for out in (per_image, batched):
        row = out[:, 0, S // 2, :]
        moment = (row * t).sum(1) / row.sum(1)
        assert_rate(moment > 1e-6, 0.5, "blur applied")
        moments.append(moment[moment > 1e-6].numpy())
    assert_same_distribution(*moments, "blur second moment")


@pytest.mark.parametrize("kind", ["simclr", "weak", "mae", "eval"])
@pytest.mark.parametrize("size", [32, 96])
def test_shapes_dtypes_ranges(kind, size):
    torch.manual_seed(0)
    hw = (size + 8, size + 16)
    rgb = torch.randint(0, 256, (4, 3, *hw), dtype=torch.uint8)
    gray = torch.randint(0, 256, (4, 1, *hw), dtype=torch.uint8)
    transform, batched = per_image_transform(kind, size), BatchedAugment(kind, size)
    pil_rgb, pil_gray = TF.to_pil_image(rgb[0]), TF.to_pil_image(gray[0])
    singles = [
        transform(x)
        for x in (rgb[0], gray[0], rgb[0].float() / 255, pil_rgb, pil_gray, rgb[0].permute(1, 2, 0).numpy())
    ]
    for out in singles + list(batched(rgb)) + list(batched(gray)) + list(batched(rgb.float() / 255)):
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, size, size)
        assert out.min() >= 0 and out.max() <= 1
    for out in (transform(gray[0]), batched(gray)[0]):  # one channel in -> three equal channels (no color op can
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # separate them)


def test_eval_is_deterministic_and_matches():
    torch.manual_seed(0)
    square = torch.rand(3, 32, 32)
    transform, batched = per_image_transform("eval", 32), BatchedAugment("eval", 32)
    assert torch.equal(transform(square), square) and torch.equal(batched(square[None])[0], square)
    wide = torch.rand(3, 40, 56)
    assert torch.equal(transform(wide), transform(wide))
    torch.testing.assert_close(batched(wide[None])[0], transform(wide), atol=1e-5, rtol=0)
    assert torch.equal(batched(wide[None]), batched(wide[None]))


def test_hsv_round_trip_and_hue():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    x[:4] = x[:4, :1]  # grays
    x[4:8, 1] = x[4:8, 0]  # ties between the largest channels
    x[8:12, 2] = x[8:12, 1]
    x[12, :, 0, :3] = torch.eye(3)  # pure primaries, black and white
    x[12, :, 1, 0], x[12, :, 1, 1] = 0.0, 1.0
    hsv = rgb_to_hsv(x)
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=1e-5, rtol=0)
    for rgb, h in zip(x[:16, :, 0, 0].tolist(), hsv[:16, :, 0, 0].tolist()):
        np.testing.assert_allclose(h, colorsys.rgb_to_hsv(*rgb), atol=1e-6)
    shift = torch.rand(64) - 0.5
    out = adjust_hue_batch(x, shift)
    for i in range(64):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], shift[i].item()), atol=1e-5, rtol=0)


def test_generator_makes_batched_views_reproducible():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    for kind in ("simclr", "weak", "mae"):
        aug = BatchedAugment(kind, 32)
        a = aug(images, generator=torch.Generator().manual_seed(3))
        b = aug(images, generator=torch.Generator().manual_seed(3))
        c = aug(images, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_views_are_independent_per_image():
    """The same image repeated in a batch gets different crops and flips (no parameter shared across the batch)."""
    m = measure_crops(BatchedAugment("simclr", 32, **NO_COLOR)(coordinate_image(32, 32).expand(64, 3, 32, 32)), 32, 32)
    assert len(np.unique(m["area"])) > 10 and 0 < m["flip"].sum() < 64


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        BatchedAugment("strong", 32)
    with pytest.raises(TypeError):
        per_image_transform("mae", 32, jitter_p=0.5)  # mae has no color jitter: a typo or a wrong kind
    assert augment_config("simclr", 32)["scale"] == (0.2, 1.0)  # GCRL Table 2
    assert augment_config("simclr", 224)["scale"] == (0.08, 1.0)  # SimCLR
    assert augment_config("simclr", 224)["blur_kernel"] == 23 and not augment_config("simclr", 32)["blur"]
    assert augment_config("simclr", 32, jitter_strength=1.0)["jitter"] == (0.8, 0.8, 0.8, 0.2)


def test_simclr_apply_equals_per_image_ops_with_the_same_params():
    """The batched view is each image's own ops with its own parameters: BatchedAugment.apply groups the images by
    their jitter order, grayscale and blur draws (and puts them back in order); a per-image reference applies
    torchvision's functional ops in the drawn order to each image alone. 96 px, so the blur is on."""
    torch.manual_seed(0)
    n, S = 48, 96
    images = torch.randint(0, 256, (n, 3, 100, 120), dtype=torch.uint8)
    aug = BatchedAugment("simclr", S, jitter_strength=1.0)
    params = aug.sample_params(n, 100, 120, "cpu", torch.Generator().manual_seed(5))
    # every branch is exercised: jittered and not, gray and not, blurred and not, several op orders
    for key in ("jitter", "gray", "blur"):
        assert 0 < int(params[key].sum()) < n, key
    out = aug.apply(images, params)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    x = images.float() / 255
    for i in range(n):
        p = {k: v[i : i + 1] for k, v in params.items()}
        expect = resized_crop_batch(x[i : i + 1], p["crop"], S, p["flip"])[0]
        if p["jitter"]:
            for op in p["order"][0].tolist():
                expect = ops[op](expect, p["factors"][0, op].item())
        if p["gray"]:
            expect = TF.rgb_to_grayscale(expect, num_output_channels=3)
        if p["blur"]:
            expect = TF.gaussian_blur(expect, [9, 9], [p["sigma"].item()] * 2)
        torch.testing.assert_close(out[i], expect, atol=3e-5, rtol=0, msg=f"image {i}")


def test_color_jitter_leaves_its_input_and_unjittered_images_untouched():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 8, 8)
    before = images.clone()
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.05]]).expand(8, 4)
    order = torch.tensor([[3, 2, 1, 0]]).expand(8, 4)
    apply = torch.tensor([True, False] * 4)
    out = color_jitter_batch(images, factors, order, apply)
    assert torch.equal(images, before)
    assert torch.equal(out[~apply], images[~apply]) and not torch.allclose(out[apply], images[apply])
