"""Performance plumbing (issue #19) that must not change results: the MFU peak table, the pixel-token loss on flat
rows, normalize's cached statistics, and, where a GPU exists, a training step's data path without host syncs."""

import pytest
import torch
import torch.nn.functional as F

import common


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM5
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40", 181e12),  # "L4" must not match inside "L40"
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("Tesla V100-SXM2-16GB", 125e12),
        ("NVIDIA T4", None),  # unknown: no MFU rather than a wrong one
    ],
)
def test_gpu_peak_table_matches_whole_words_and_form_factor(name, peak):
    assert common.gpu_peak_flops(name=name) == peak
    assert common.gpu_peak_flops("cpu") is None


def test_token_cross_entropy_equals_the_transposed_form():
    torch.manual_seed(0)
    logits, tokens = torch.randn(3, 10, 7, requires_grad=True), torch.randint(0, 7, (3, 10))
    flat = common.token_cross_entropy(logits, tokens)
    ref = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    torch.testing.assert_close(flat, ref)
    (g1,) = torch.autograd.grad(flat.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g1, g2)
    assert flat.dtype == torch.float32 and common.token_cross_entropy(logits.bfloat16(), tokens).dtype == torch.float32


def test_normalize_round_trip_and_cached_statistics():
    x = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(common.normalize(x), (x - mean) / std)
    torch.testing.assert_close(common.denormalize(common.normalize(x)), x)
    a = common._channel_stats(common.IMAGENET_MEAN, common.IMAGENET_STD, x.device, x.dtype)
    b = common._channel_stats(common.IMAGENET_MEAN, common.IMAGENET_STD, x.device, x.dtype)
    assert a[0] is b[0]  # built once per device and dtype, not on every call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs exist only with a GPU")
def test_augment_and_normalize_do_not_sync_the_gpu():
    """torch.cuda.set_sync_debug_mode("error") raises on any operation that makes the host wait for the GPU: the
    batched views (draws on the host, grouping by op order known there) and normalize must run without one."""
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    augs = [common.BatchedAugment(k, 32) for k in ("simclr", "mae", "weak")] + [common.BatchedAugment("simclr", 96)]
    big = torch.randint(0, 256, (16, 3, 100, 100), dtype=torch.uint8, device="cuda")
    common.normalize(torch.rand(2, 3, 4, 4, device="cuda"))  # the statistics' one-time copy to the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for aug in augs[:3]:
            common.normalize(aug(images))
        augs[3](big)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_dataloader_batches_follow_the_epoch_order_with_persistent_workers():
    """The DataLoader path of TrainBatches: each epoch's labels come in epoch_indices order (resume-exact, as the
    on-device path) and the worker processes are the same in epoch 0, epoch 1 and a resumed epoch."""
    n, batch = 24, 4
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    data = common.ImageArray(images, torch.arange(n), "toy", n)
    info = common.DistInfo()
    batches = common.TrainBatches(data, ["weak"], 8, batch, info, seed=3, on_device=False, num_workers=1)
    pids = []
    for epoch, start in ((0, 0), (1, 0), (1, 2)):
        labels = torch.cat([y for _, y in batches.epoch(epoch, start_step=start)])
        expect = common.epoch_indices(n, epoch, 3, 0, 1, batch)[start * batch :]
        assert torch.equal(labels, expect)
        pids.append([w.pid for w in batches.loader._iterator._workers])
    assert pids[0] == pids[1] == pids[2] and len(pids[0]) == 1


def test_compile_flag_wraps_the_model_and_unwrap_finds_it():
    """--compile goes through common.distribute (torch.compile is lazy: nothing compiles until the first call, so
    this costs nothing on the CPU; the compiled step itself is run by bench/gpu.py on a GPU)."""
    net = torch.nn.Linear(4, 4)
    model = common.distribute(net, common.DistInfo(), compile=True, static_graph=True)
    assert model is not net and hasattr(model, "_orig_mod") and common.unwrap(model) is net
    assert common.distribute(torch.nn.Linear(4, 4), common.DistInfo()).__class__ is torch.nn.Linear


@pytest.mark.parametrize("is_causal", [True, False])
def test_axial_attention_batch_is_each_image_alone(is_causal):
    """AxialAttention's passes merge the heads straight into the other axis' layout (rows <-> columns of every image
    of the batch): on a non-square grid, a batch gives each image exactly what it gets alone (no mixing across
    images or axes), causal or not (BERT); test_common_models checks one image against GCRL Algorithm 1."""
    torch.manual_seed(0)
    att = common.AxialAttention(16, 4, 3, 5).eval()
    x = torch.randn(4, 15, 16)
    with torch.no_grad():
        batch = att(x, is_causal=is_causal)
        for i in range(4):
            torch.testing.assert_close(batch[i : i + 1], att(x[i : i + 1], is_causal=is_causal), atol=1e-6, rtol=0)
        if not is_causal:  # unmasked: rows, then columns, then rows of h + h_a, no shift
            h = x.view(4, 3, 5, 16)

            def msa(seq):  # (n, L, D) -> (n, L, D), plain attention with the module's weights
                return att.attend(seq, is_causal=False)

            ha = msa(h.reshape(12, 5, 16)).view(4, 3, 5, 16)
            ha = msa(ha.transpose(1, 2).reshape(20, 3, 16)).view(4, 5, 3, 16).transpose(1, 2)
            expect = msa((h + ha).reshape(12, 5, 16)).view(4, 15, 16)
            torch.testing.assert_close(batch, expect, atol=1e-5, rtol=0)


def training_steps(method: str, device: str, run_dir: str):
    """A generator of training steps of `method` (tiny preset) between two logging steps: views from the on-device
    batches, the losses, the finiteness check (RunLogger.check_finite: on a GPU it reads the loss on the host only on
    logging and checkpoint steps), backward and the optimizer, as the method's main() runs them."""
    module = __import__(method)
    argv = ["--preset", "tiny", "--device", device, "--log-every", "1000", "--ckpt-every", "1000"]
    args = common.parse_args(module.Args, argv, module.PRESETS)
    info = common.DistInfo(device=torch.device(device))
    logger = common.RunLogger(run_dir, args, info, 0.0, 10**6, 0, method=method)
    model = common.distribute(module.build_model(args), info)
    optimizer = module.build_optimizer(common.unwrap(model), args, 1e-4, info.device)
    data = common.ImageArray(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.arange(64) % 4, "toy", 4)
    kinds = ["mae"] if method == "mae" else ["simclr", "simclr"]
    batches = common.TrainBatches(data, kinds, args.image_size, 16, info, aug_kwargs=module.augment_kwargs(args))
    for step, (views, labels) in enumerate(batches.epoch(0)):
        if method == "mae":
            terms, _ = module.mae_losses(model, views[0], args)
        else:
            terms, _ = module.simclr_losses(model, views, labels, args)
        logger.check_finite(step, terms)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        yield terms


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs exist only with a GPU")
@pytest.mark.parametrize("method", ["mae", "simclr"])
def test_training_step_does_not_sync_the_gpu(method, tmp_path):
    """Two training steps under set_sync_debug_mode("error") (after one warm-up step: lazy optimizer state)."""
    steps = training_steps(method, "cuda", str(tmp_path))
    next(steps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            next(steps)
    finally:
        torch.cuda.set_sync_debug_mode(0)
