"""common.py distributed and training utilities: gather_with_grad, NT-Xent, schedule, optimizer groups, LARS,
checkpoints with exact resume, argument parsing, logging, data order."""

import dataclasses
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from conftest import run_distributed

import common


# ---------------------------------------------------------------- distributed gather and NT-Xent
def _gather_worker(rank, world, data):
    x = torch.tensor(data[rank], requires_grad=True)
    y = common.gather_with_grad(x)
    weights = torch.arange(1.0, y.numel() + 1).view_as(y) * (rank + 1)  # a rank-dependent loss
    (y * weights).sum().backward()
    return [y.tolist(), x.grad.tolist()]


def test_gather_with_grad_two_processes(tmp_path):
    data = [[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]
    out = run_distributed(_gather_worker, 2, tmp_path, data)
    full = torch.tensor(data).view(4, 2)
    weights = torch.arange(1.0, 9.0).view(4, 2)
    for rank, (gathered, grad) in enumerate(out):
        assert torch.equal(torch.tensor(gathered), full)
        # d/dx_r of sum_r' (rank'+1) * <w, gather(x)> = (1 + 2) * w[slice r]
        assert torch.equal(torch.tensor(grad), 3 * weights[2 * rank : 2 * rank + 2])


def nt_xent_loop(z1, z2, t):
    """Independent NT-Xent: explicit loop over the 2N anchors."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -(float(z[i] @ z[pos]) / t - math.log(denom))
    return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_equals_explicit_loop(t):
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert common.nt_xent(z1, z2, t).item() == pytest.approx(nt_xent_loop(z1, z2, t), rel=1e-5)


def _nt_xent_worker(rank, world, z1, z2, t):
    n = len(z1) // world
    a = torch.tensor(z1[rank * n : (rank + 1) * n], requires_grad=True)
    b = torch.tensor(z2[rank * n : (rank + 1) * n], requires_grad=True)
    loss = common.nt_xent(a, b, t)
    loss.backward()
    return [loss.item(), a.grad.tolist(), b.grad.tolist()]


def test_nt_xent_distributed_equals_single_process(tmp_path):
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 6), torch.randn(8, 6)
    out = run_distributed(_nt_xent_worker, 2, tmp_path, z1.tolist(), z2.tolist(), 0.2)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = common.nt_xent(a, b, 0.2)
    loss.backward()
    # the mean over ranks of the local losses is the global loss; each rank's gradient is world x the global
    # gradient of its slice (DDP then averages gradients over ranks, which gives exactly the global gradient)
    assert np.mean([o[0] for o in out]) == pytest.approx(loss.item(), rel=1e-6)
    for rank, (_, ga, gb) in enumerate(out):
        torch.testing.assert_close(torch.tensor(ga) / 2, a.grad[4 * rank : 4 * rank + 4], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(gb) / 2, b.grad[4 * rank : 4 * rank + 4], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- schedule and optimizers
def test_cosine_schedule_values():
    peak, lo = 2.0, 0.1
    assert common.cosine_lr(0, 100, 10, peak, lo) == 0.0
    assert common.cosine_lr(5, 100, 10, peak, lo) == pytest.approx(1.0)  # half-way through warmup
    assert common.cosine_lr(10, 100, 10, peak, lo) == pytest.approx(peak)  # warmup end
    assert common.cosine_lr(55, 100, 10, peak, lo) == pytest.approx((peak + lo) / 2)  # middle of the cosine
    assert common.cosine_lr(100, 100, 10, peak, lo) == pytest.approx(lo)  # end
    assert common.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_param_groups_skip_one_dimensional_and_named():
    m = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    m.register_parameter("frozen", torch.nn.Parameter(torch.zeros(3, 3), requires_grad=False))
    groups = common.param_groups(m, 0.05, no_decay=("0.weight",))
    no_decay, decay = groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]  # only the Linear weight
    assert len(no_decay["params"]) == 4  # embedding (by name), Linear bias, LayerNorm weight and bias


def test_lars_step_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = common.LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust=0.001)
    w.grad, b.grad = torch.tensor([[1.0, 0.0]]), torch.tensor([2.0])
    opt.step()
    d = torch.tensor([[1.0, 0.0]]) + 0.1 * torch.tensor([[3.0, 4.0]])
    d = d * (0.001 * 5.0 / d.norm())
    torch.testing.assert_close(w.data, torch.tensor([[3.0, 4.0]]) - 0.5 * d)
    torch.testing.assert_close(b.data, torch.tensor([1.0 - 0.5 * 2.0]))  # bias: no decay, no adaptation
    b.grad = torch.tensor([2.0])
    w.grad = torch.zeros(1, 2)
    opt.step()
    torch.testing.assert_close(b.data, torch.tensor([0.0 - 0.5 * (0.9 * 2.0 + 2.0)]))  # momentum


def lars_loop_reference(params, grads_per_step, lrs, wd, momentum, trust, classic):
    """An independent per-tensor LARS (the Python loop common.LARS replaced): returns the parameters after the steps.
    classic=False: mu = m mu + d, p -= lr mu (MoCo v3); classic=True: mu = m mu + lr d, p -= mu (SimCLR TF)."""
    params = [p.detach().clone() for p in params]
    mus = [torch.zeros_like(p) for p in params]
    for grads, lr in zip(grads_per_step, lrs):
        for p, g, mu in zip(params, grads, mus):
            d = g
            if p.ndim > 1:
                d = g + wd * p
                p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                d = d * (trust * p_norm / d_norm if p_norm > 0 and d_norm > 0 else 1.0)
            if classic:
                mu.mul_(momentum).add_(lr * d)
                p.sub_(mu)
            else:
                mu.mul_(momentum).add_(d)
                p.sub_(lr * mu)
    return params


@pytest.mark.parametrize("classic", [False, True])
def test_lars_foreach_equals_per_tensor_loop_over_warmup_steps(classic):
    torch.manual_seed(0)
    shapes = [(8, 4), (8,), (3, 3, 2, 2), (5,), (6, 8)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    params[4].data.zero_()  # ||p|| = 0: trust ratio 1
    steps = 5
    grads = [[torch.randn(s) for s in shapes] for _ in range(steps)]
    lrs = [0.3 * (t + 1) / steps for t in range(steps)]  # a linear warmup: the two forms differ
    expect = lars_loop_reference(params, grads, lrs, 0.01, 0.9, 0.001, classic)
    opt = common.LARS(params, lr=0.0, weight_decay=0.01, momentum=0.9, trust=0.001, classic=classic)
    for g, lr in zip(grads, lrs):
        for p, gi in zip(params, g):
            p.grad = gi
        common.set_lr(opt, lr)
        opt.step()
    for p, e in zip(params, expect):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)


def _last_step_size(lrs, classic):
    """Size of the last LARS step on a bias (no adaptation) with gradient 1 at every step, momentum 0.9."""
    b = torch.nn.Parameter(torch.zeros(1))
    opt = common.LARS([b], lr=0.0, momentum=0.9, classic=classic)
    for lr in lrs:
        b.grad = torch.ones(1)
        before = b.detach().clone()
        common.set_lr(opt, lr)
        opt.step()
    return (before - b.detach()).item()


def test_lars_classic_and_moco_forms_differ_only_when_lr_changes():
    """Constant d, m = 0.9, the warmup of common.cosine_lr (lr_s = s * c, lr_0 = 0): at step t the MoCo form moves by
    lr_t * sum_{k<=t} m^k, the classic (TF) form by sum_{k<=t} m^k lr_(t-k). Over a 970-step warmup (SimCLR CIFAR-10:
    10 epochs of 97 steps) the MoCo step is 1.66x the classic one at step 10 and 1.10x at step 100; at a constant lr
    the two are the same."""
    for t, expect in ((10, 1.66), (100, 1.10)):
        lrs = [common.cosine_lr(s, 97000, 970, 1.0) for s in range(t + 1)]
        ratio = _last_step_size(lrs, classic=False) / _last_step_size(lrs, classic=True)
        by_hand = t * sum(0.9**k for k in range(t + 1)) / sum(0.9**k * (t - k) for k in range(t))
        assert ratio == pytest.approx(by_hand, rel=1e-5) and round(ratio, 2) == expect
    assert _last_step_size([0.5] * 20, classic=False) == pytest.approx(_last_step_size([0.5] * 20, classic=True))


def test_lars_resumes_an_optimizer_state_written_before_the_classic_option():
    """A checkpoint's param groups from before `classic` existed load and step as they were written (MoCo form)."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = common.LARS([p], lr=0.5)
    state = opt.state_dict()
    del state["param_groups"][0]["classic"]
    opt.load_state_dict(state)
    for lr in (0.5, 1.0):
        p.grad = torch.ones(2)
        common.set_lr(opt, lr)
        opt.step()
    torch.testing.assert_close(p.detach(), -torch.full((2,), 0.5 + 1.0 * 1.9))  # lr after the momentum


def test_knn_predict_weighted_votes():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scores = common.knn_predict(train, labels, torch.tensor([[1.0, 0.05], [0.1, 1.0]]), 2, k=2, temperature=0.1)
    assert scores.argmax(1).tolist() == [0, 1]
    q = torch.nn.functional.normalize(torch.tensor([[0.1, 1.0]]), dim=1)
    tn = torch.nn.functional.normalize(train, dim=1)
    sims = (q @ tn.T)[0]
    top = sims.topk(2)
    expect = torch.zeros(2)
    for s, i in zip(top.values, top.indices):
        expect[labels[i]] += torch.exp(s / 0.1)
    torch.testing.assert_close(scores[1], expect)


# ---------------------------------------------------------------- checkpoints and resume
@dataclasses.dataclass
class TinyArgs:
    lr: float = 0.1


def _train(model, opt, steps):
    for _ in range(steps):
        x = torch.randn(4, 3)  # draws from the global RNG, so RNG restore matters
        loss = (model(x) ** 2).mean() + random.random() * 0 + float(np.random.rand()) * 0
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_checkpoint_resume_is_bitwise_exact(tmp_path):
    info = common.DistInfo()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _train(model, opt, 3)
    common.save_training_state(str(tmp_path), "tiny", TinyArgs(), model, opt, step=3, epoch=0, info=info)
    _train(model, opt, 2)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    after = (torch.rand(1).item(), random.random(), float(np.random.rand()))

    torch.manual_seed(123)  # a different process state: other init, other RNG
    model2 = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    path = common.resolve_resume("auto", str(tmp_path))
    ckpt = common.load_training_state(path, "tiny", model2, opt2, info)
    assert ckpt["step"] == 3 and ckpt["args"] == {"lr": 0.1}
    _train(model2, opt2, 2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert (torch.rand(1).item(), random.random(), float(np.random.rand())) == after
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp files left


def test_checkpoint_errors(tmp_path):
    info = common.DistInfo()
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    common.save_training_state(str(tmp_path), "mae", TinyArgs(), model, opt, 1, 0, info)
    good = open(tmp_path / "checkpoint.pt", "rb").read()
    with pytest.raises(ValueError, match="is a 'mae' checkpoint, not 'simclr'"):
        common.load_checkpoint(str(tmp_path / "checkpoint.pt"), "simclr")
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    kept = r"diverged at step 2: the weights are not finite.*checkpoint.pt \(step 1\) is kept"
    with pytest.raises(SystemExit, match=kept):
        common.save_training_state(str(tmp_path), "mae", TinyArgs(), model, opt, 2, 0, info)
    assert open(tmp_path / "checkpoint.pt", "rb").read() == good  # the good checkpoint survived
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        common.resolve_resume(str(tmp_path / "nope.pt"), str(tmp_path))
    assert common.resolve_resume("auto", str(tmp_path / "empty")) is None
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this repository"):
        common.load_checkpoint(str(tmp_path / "foreign.pt"))
    wider = torch.nn.Linear(2, 3)  # a run with other architecture settings: one clear message naming the mismatch
    with pytest.raises(ValueError, match=r"does not fit this model \(size mismatch for weight.*--resume ''"):
        common.load_training_state(
            str(tmp_path / "checkpoint.pt"), "mae", wider, torch.optim.SGD(wider.parameters(), lr=0.1), info
        )


# ---------------------------------------------------------------- arguments and logging
@dataclasses.dataclass
class DemoArgs:
    """Demo script."""

    arch: str = common.arg("vit_small", "backbone preset")
    lr: float = common.arg(1e-3, "peak learning rate")
    warmup: int = common.arg(10, "warmup epochs")
    amp: bool = common.arg(True, "bf16 autocast")
    betas: tuple[float, float] = common.arg((0.9, 0.95), "AdamW betas")
    palette: str | None = common.arg(None, "palette file")


PRESETS = {"arch": {"vit_large": {"lr": 5e-4, "warmup": 40}}}


def test_parse_args_types_presets_and_explicit_values():
    a = common.parse_args(DemoArgs, [], PRESETS)
    assert a == DemoArgs()
    a = common.parse_args(
        DemoArgs, ["--arch", "vit_large", "--warmup", "5", "--no-amp", "--betas", "0.8", "0.9"], PRESETS
    )
    assert (a.lr, a.warmup, a.amp, a.betas) == (5e-4, 5, False, (0.8, 0.9))  # explicit beats preset
    assert common.parse_args(DemoArgs, ["--palette", "p.npy"]).palette == "p.npy"


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(DemoArgs, ["--help"], PRESETS)
    out = capsys.readouterr().out
    for text in ["--arch", "backbone preset", "presets: vit_large", "--lr", "--no-amp", "--betas", "--palette"]:
        assert text in out


def test_run_logger_writes_args_and_metrics(tmp_path):
    log = common.RunLogger(str(tmp_path / "run"), DemoArgs(), common.DistInfo(), 0.0, 10, 0)
    log.log(1, {"loss/total": torch.tensor(2.5), "lr": 0.1})
    log.log(2, {"loss/total": 2.0})
    log.close()
    assert json.load(open(tmp_path / "run" / "args.json"))["arch"] == "vit_small"
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows == [{"step": 1, "loss/total": 2.5, "lr": 0.1}, {"step": 2, "loss/total": 2.0}]


def test_training_progress_logs_every_n_steps_and_images_per_s_excludes_paused_time(tmp_path, monkeypatch, capsys):
    """RunLogger.step: a row on every log_every-th step and the last, the terms averaged, images/s over the training
    time since the last row only (evaluations and checkpoints run inside paused() and count neither time nor
    images), the same progress line in every method file."""
    clock = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    log = common.RunLogger(str(tmp_path / "run"), PresetArgs(log_every=2), common.DistInfo(), 1e9, 5, 0)
    rows = []
    for step in range(1, 6):
        clock[0] += 0.5  # every training step takes 0.5 s for 64 images
        rows.append(log.step(step, {"mse": torch.tensor(float(step)), "total": 2.0 * step}, 0.1, step / 5, 64))
        with log.paused():
            clock[0] += 10.0  # a long evaluation / checkpoint after every step
            with log.paused():  # nested (run_monitors pauses inside main's pause): counted once
                clock[0] += 5.0
    log.close()
    assert [bool(r) for r in rows] == [False, True, False, True, True]  # steps 2, 4 and the last (5)
    assert rows[1]["loss/mse"] == 2.0 and rows[1]["loss/total"] == 4.0
    assert [r["perf/images_per_s"] for r in rows if r] == [128.0, 128.0, 128.0]  # 64 images / 0.5 s, no pause
    saved = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in saved] == [2, 4, 5]
    assert "step 4/5 ep 0.80 | mse 4.0000 total 8.0000 | lr 0.1 | 128.0 img/s" in capsys.readouterr().out


def test_epoch_indices_partition_and_determinism():
    parts = [common.epoch_indices(103, 4, 7, r, 2, 10) for r in range(2)]
    assert all(len(p) == 50 for p in parts)  # 5 whole global batches of 20; the last 3 images dropped
    allidx = torch.cat(parts)
    assert len(set(allidx.tolist())) == 100
    assert torch.equal(common.epoch_indices(103, 4, 7, 0, 2, 10), parts[0])
    assert not torch.equal(common.epoch_indices(103, 5, 7, 0, 2, 10), parts[0])
    # global batch b is [rank0 slice, rank1 slice] of one permutation
    single = common.epoch_indices(103, 4, 7, 0, 1, 20)
    assert torch.equal(single[:20], torch.cat([parts[0][:10], parts[1][:10]]))
    with pytest.raises(ValueError, match="smaller than one global batch"):
        common.epoch_indices(10, 0, 0, 0, 1, 16)


def test_flop_count_of_a_linear_layer():
    lin = torch.nn.Linear(16, 8, bias=False)
    assert common.count_flops(lin, torch.randn(4, 16)) == 2 * 4 * 16 * 8
    assert common.mfu(1e9, 100.0, "cpu") is None


def test_autocast_is_bf16_only_where_the_hardware_runs_it_natively():
    """--amp means bf16 where it is fast: on an AVX2-only CPU bf16 matmuls are emulated (tens of times slower than
    fp32), so common.autocast leaves such a CPU in fp32; with enabled=False it never casts."""
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with common.autocast("cpu"):
        y = a @ b
    assert y.dtype == (torch.bfloat16 if common.bf16_is_fast("cpu") else torch.float32)
    with common.autocast("cpu", enabled=False):
        assert (a @ b).dtype == torch.float32
    assert common.bf16_is_fast("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ---------------------------------------------------------------- the monitors' held-out subset
def test_heldout_subset_is_class_balanced_fixed_and_spread_within_each_class():
    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 50, 50, 50, 50, 50, 50, 50, 50, 3]))  # sorted
    data = common.ImageArray(torch.arange(len(labels)).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).clone(),
                             labels, "sorted", 10)  # fmt: skip
    sub = common.heldout_subset(data, 100)
    assert isinstance(sub, common.ImageArray) and len(sub) == 100
    # an equal share of 10 per class; class 9 has only 3 images: all of them, and the 7 left over go one each to
    # the first classes that have images to spare
    assert torch.bincount(sub.labels, minlength=10).tolist() == [11, 11, 11, 11, 11, 11, 11, 10, 10, 3]
    first = sub.labels == 0  # spread over class 0's 50 images (indices 0..49): first and last both taken
    picked = sub.images[first, 0, 0, 0].long()
    assert picked.min() == 0 and picked.max() == 49 and len(torch.unique(picked)) == 11
    again = common.heldout_subset(data, 100)
    assert torch.equal(again.images, sub.images) and torch.equal(again.labels, sub.labels)  # fixed
    assert common.heldout_subset(data, 10_000) is data  # asking for more than there is: the whole set


def test_heldout_subset_without_labels_spreads_over_the_dataset():
    class Unlabeled(torch.utils.data.Dataset):
        def __len__(self):
            return 101

        def __getitem__(self, i):
            return torch.zeros(3, 8, 8, dtype=torch.uint8), -1

    sub = common.heldout_subset(Unlabeled(), 11)
    assert isinstance(sub, torch.utils.data.Subset) and sub.indices == list(range(0, 101, 10))
    unlabeled = common.ImageArray(torch.zeros(30, 3, 8, 8, dtype=torch.uint8), torch.full((30,), -1), "u", 0)
    assert common.heldout_subset(unlabeled, 4).images.shape[0] == 4  # labels -1: spread, not balanced


# ---------------------------------------------------------------- presets: precedence, printed, saved
@dataclasses.dataclass
class PresetArgs:
    preset: str = common.arg("none", "named group")
    arch: str = common.arg("small", "arch")
    lr: float = common.arg(1.0, "lr")
    optimizer: str = common.arg("lars", "optimizer")
    batch_size: int = common.arg(256, "batch")
    log_every: int = common.arg(1, "log")


PRESET_TABLE = {
    "preset": {"cifar": dict(arch="big", lr=0.5, batch_size=512)},
    "arch": {"big": dict(lr=0.1, optimizer="adamw")},
}


def test_presets_explicit_beats_preset_beats_arch_and_every_value_is_printed(capsys, tmp_path):
    a = common.parse_args(PresetArgs, ["--preset", "cifar"], PRESET_TABLE)
    # the preset chose the arch; the arch's lr lost to the preset's, its optimizer applied (and was printed)
    assert (a.arch, a.lr, a.optimizer, a.batch_size) == ("big", 0.5, "adamw", 512)
    out = capsys.readouterr().out
    assert (
        "--preset=cifar sets arch=big, lr=0.5, batch_size=512" in out
        and "--arch=big sets lr=0.1, optimizer=adamw" in out
    )
    b = common.parse_args(PresetArgs, ["--preset", "cifar", "--lr", "2", "--arch", "small"], PRESET_TABLE)
    assert (b.arch, b.lr, b.optimizer, b.batch_size) == ("small", 2.0, "lars", 512)  # explicit flags always win
    assert "explicit flags win over presets: arch=small, lr=2.0" in capsys.readouterr().out
    c = common.parse_args(PresetArgs, ["--arch", "big"], PRESET_TABLE)
    assert (c.lr, c.optimizer) == (0.1, "adamw")
    info = common.DistInfo()
    log = common.RunLogger(str(tmp_path / "run"), a, info, 0.0, 10, 0)
    log.close()
    saved = json.load(open(tmp_path / "run" / "args.json"))
    assert saved["presets_applied"] == {"preset=cifar": {"arch": "big", "lr": 0.5, "batch_size": 512},
                                        "arch=big": {"lr": 0.1, "optimizer": "adamw"}}  # fmt: skip
    assert "presets_applied" not in dataclasses.asdict(a)  # checkpoints hold the fields only


def test_preset_help_shows_the_values_the_run_would_use(capsys):
    """--preset cifar --help lists the defaults that run would get: the preset's lr (0.5) wins over its arch's (0.1),
    exactly as in the run, and the arch entry's optimizer shows too."""
    with pytest.raises(SystemExit):
        common.parse_args(PresetArgs, ["--preset", "cifar", "--help"], PRESET_TABLE)
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR lr [preset cifar: 0.5; arch big: 0.1] (default: 0.5)" in text
    assert "(default: adamw)" in text and "(default: 512)" in text


def test_batch_per_rank_splits_the_global_batch_or_says_how_to_fix_it():
    assert common.batch_per_rank(512, 8) == 64
    with pytest.raises(ValueError, match=r"--batch-size 10 \(global\) is not divisible by the 4 processes"):
        common.batch_per_rank(10, 4)


# ---------------------------------------------------------------- fp32 islands under bf16 autocast
def test_nt_xent_and_the_quantizer_switch_autocast_off_themselves():
    """Called inside a bf16 autocast region (as a training step is), NT-Xent and the palette's nearest-center search
    give exactly their fp32 results: they turn autocast off themselves instead of relying on the caller."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    q = common.ColorQuantizer(torch.rand(512, 3, generator=g) * 2 - 1)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g)
    loss, tokens = common.nt_xent(z1, z2, 0.1), q.encode(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert common.nt_xent(z1, z2, 0.1).item() == loss.item()
        assert torch.equal(q.encode(images), tokens)
        # negative controls: the same computations without the guard do move under bf16 autocast
        assert abs(common._nt_xent(z1, z2, 0.1).item() - loss.item()) > 1e-5
        c, pixels = q.centers.float(), q.to_unit(images).permute(0, 2, 3, 1).reshape(-1, 3)
        unguarded = torch.argmin((c * c).sum(1)[None] - 2 * pixels @ c.T, dim=1).view_as(tokens)
        assert (unguarded != tokens).float().mean() > 0.01  # bf16 sends some pixels to another palette color
    assert torch.equal(torch.argmin((c * c).sum(1)[None] - 2 * pixels @ c.T, dim=1).view_as(tokens), tokens)


def test_load_split_refuses_an_image_folder_where_a_method_needs_images_in_memory(tmp_path):
    from PIL import Image

    os.makedirs(tmp_path / "train" / "a")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "x.png")
    args = dataclasses.make_dataclass("A", ["dataset", "data_root", "download", "image_size", "synthetic_size"])(
        "imagefolder", str(tmp_path), False, 8, 0
    )
    assert len(common.load_split(args, True)) == 1  # fine for the DataLoader path
    with pytest.raises(ValueError, match="needs an in-memory dataset"):
        common.load_split(args, True, in_memory=True)
