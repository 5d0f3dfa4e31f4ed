"""eval_probe.py: metrics against hand / brute-force computations, probes on synthetic features with known answers,
a truly frozen backbone, clear errors, the feature cache, the likelihood-gradient OOD score through a stand-in
generative model, and end to end on the smoke checkpoint of every method file present."""

import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script

import common
import eval_probe as ep

# ------------------------------------------------------------------------------------------------------------------
# A tiny stand-in method file (same interface as simclr.py / mae.py / ...): a conv net WITH BatchNorm and dropout,
# and a tiny autoregressive pixel model with the optional log_likelihood hook. Written to a temporary folder that
# is put on sys.path, so eval_probe imports it exactly like a real method file.
# ------------------------------------------------------------------------------------------------------------------

STANDIN = '''
from dataclasses import dataclass
import torch, torch.nn as nn, torch.nn.functional as F

MODELS = []   # every model build_model made (the tests inspect them after a probe)
CALLS = []    # (training, any requires_grad) seen by each features() call

@dataclass
class Args:
    dataset: str = "synthetic"
    data_root: str = "data"
    image_size: int = 16
    width: int = 8
    vocab: int = 4
    seed: int = 0

class Net(nn.Module):
    def __init__(self, width, vocab, size):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout(0.5))
        self.tok_embed = nn.Embedding(vocab, width)   # tiny autoregressive pixel model for log_likelihood
        self.pos = nn.Parameter(0.1 * torch.randn(size * size, width))
        self.out = nn.Linear(width, vocab)

def build_model(args):
    model = Net(args.width, args.vocab, args.image_size)
    MODELS.append(model)
    return model

def features(model, images, layer=None, pool=None):
    pool = pool or "mean"
    CALLS.append((model.training, any(p.requires_grad for p in model.parameters())))
    h0 = model.stem(images)
    h = h0 if layer == 0 else model.block(h0)
    return h.mean((2, 3)) if pool == "mean" else h.amax((2, 3))

def num_feature_layers(model):
    return 2

def log_likelihood(model, images):
    """log p(x) of gray levels quantized to `vocab` tokens, raster order, p(t_i | t_<i) from the running mean of the
    previous token embeddings (SOS = zeros): (B,), differentiable w.r.t. the returned embeddings (B, L, width)."""
    vocab = model.tok_embed.num_embeddings
    tokens = (images.mean(1) * vocab).long().clamp(max=vocab - 1).flatten(1)
    emb = model.tok_embed(tokens).detach().requires_grad_()
    prev = torch.cat([torch.zeros_like(emb[:, :1]), emb[:, :-1]], dim=1)
    ctx = prev.cumsum(1) / torch.arange(1, emb.shape[1] + 1, device=emb.device)[None, :, None]
    logp = F.log_softmax(model.out(ctx + model.pos), dim=-1)
    return logp.gather(2, tokens[..., None]).squeeze(2).sum(1), emb
'''


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as run_script gives the scripts (OMP_NUM_THREADS=1): the probes are thousands of tiny
    ops, which two threads on a shared 2-core machine slow down ~10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """The stand-in module and a checkpoint of it (weights perturbed so BN statistics are not the defaults)."""
    folder = tmp_path / "methods"
    folder.mkdir()
    (folder / "standin_bn.py").write_text(STANDIN)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("standin_bn", None)
    import standin_bn

    args = standin_bn.Args()
    torch.manual_seed(0)
    model = standin_bn.build_model(args)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                t.copy_(torch.rand_like(t) + 0.5)
    run = tmp_path / "runs" / "standin"
    run.mkdir(parents=True)
    path = str(run / "checkpoint.pt")
    common.save_checkpoint(
        path, {"method": "standin_bn", "args": vars(args).copy(), "model": model.state_dict(), "step": 7, "epoch": 0}
    )
    yield standin_bn, path
    sys.modules.pop("standin_bn", None)


def gaussians(n_per_class, num_classes, dim, sep, seed):
    """Isotropic Gaussian classes with means sep * e_c (linearly separable for large sep)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    means = torch.zeros(num_classes, dim)
    means[torch.arange(num_classes), torch.arange(num_classes)] = sep
    return means[labels] + torch.randn(labels.numel(), dim, generator=g), labels


# ------------------------------------------------------------------------------------------------------------------
# Metrics by hand
# ------------------------------------------------------------------------------------------------------------------


def test_ece_calibrated_is_zero_and_overconfident_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.full((5,), 0.7)).sample((200_000,))
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)  # labels drawn from the predicted probabilities
    assert ep.expected_calibration_error(probs, labels, 15) < 0.01

    # Over-confident: 100 images at confidence 0.95 of which 50 correct, 100 at 0.55 of which 50 correct,
    # 100 at 0.75 of which 60 correct. Bins (15 equal-width): 0.95 -> (14/15, 1], 0.55 -> (8/15, 9/15],
    # 0.75 -> (11/15, 12/15]. ECE = (100 |0.5-0.95| + 100 |0.5-0.55| + 100 |0.6-0.75|) / 300 = 0.65 / 3.
    def rows(conf, n, n_correct):
        p = torch.tensor([conf, 1 - conf]).repeat(n, 1)
        y = torch.tensor([0] * n_correct + [1] * (n - n_correct))
        return p, y

    parts = [rows(0.95, 100, 50), rows(0.55, 100, 50), rows(0.75, 100, 60)]
    probs = torch.cat([p for p, _ in parts])
    labels = torch.cat([y for _, y in parts])
    assert ep.expected_calibration_error(probs, labels, 15) == pytest.approx((0.45 + 0.05 + 0.15) / 3, abs=1e-12)
    # the same predictions in one bin (1 bin): |acc - conf| of the pooled set
    assert ep.expected_calibration_error(probs, labels, 1) == pytest.approx(abs(160 / 300 - 0.75), abs=1e-12)


def brute_auroc(pos, neg):
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos.tolist() for n in neg.tolist())
    return total / (len(pos) * len(neg))


def brute_auprc(pos, neg):
    scores = torch.cat([pos, neg]).tolist()
    labels = [1] * len(pos) + [0] * len(neg)
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):  # threshold sweep: predict positive for s >= t
        tp = sum(1 for s, y in zip(scores, labels) if s >= t and y == 1)
        fp = sum(1 for s, y in zip(scores, labels) if s >= t and y == 0)
        recall = tp / len(pos)
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return ap


def test_auroc_auprc_known_cases_and_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    far_in, far_out = torch.randn(500, generator=g) + 20, torch.randn(500, generator=g)
    assert ep.auroc(far_in, far_out) == 1.0 and ep.auprc(far_in, far_out) == pytest.approx(1.0)
    same_in, same_out = torch.randn(20_000, generator=g), torch.randn(20_000, generator=g)
    assert ep.auroc(same_in, same_out) == pytest.approx(0.5, abs=0.01)
    assert ep.auprc(same_in, same_out) == pytest.approx(0.5, abs=0.01)
    assert ep.auroc(torch.ones(10), torch.ones(7)) == 0.5  # all tied
    for trial in range(20):  # small random inputs, integer scores so that ties are frequent
        pos = torch.randint(0, 6, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).double()
        neg = torch.randint(0, 6, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).double()
        if trial % 2:
            pos, neg = pos + 0.37 * torch.rand(pos.shape, generator=g, dtype=torch.float64), neg
        assert ep.auroc(pos, neg) == pytest.approx(brute_auroc(pos, neg), abs=1e-12)
        assert ep.auprc(pos, neg) == pytest.approx(brute_auprc(pos, neg), abs=1e-12)


def test_class_gaussian_score_equals_hand_computed_log_density():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    labels = torch.arange(3).repeat(20)
    feats[labels == 1] += 3.0
    queries = torch.randn(5, 3, generator=g, dtype=torch.float64) * 2
    ridge = 0.01
    x = feats.numpy()
    scale = x.var(0).mean()  # ridge is relative to the mean per-dimension variance (numpy var: ddof 0)
    expect = []
    for q in queries.numpy():
        dens = []
        for c in range(3):
            xc = x[labels.numpy() == c]
            mu = xc.mean(0)
            cov = (xc - mu).T @ (xc - mu) / len(xc) + ridge * scale * np.eye(3)
            d = q - mu
            dens.append(-0.5 * (3 * np.log(2 * np.pi) + np.log(np.linalg.det(cov)) + d @ np.linalg.inv(cov) @ d))
        expect.append(max(dens))
    got = ep.class_gaussian_score(feats, labels, 3, queries, ridge)
    np.testing.assert_allclose(got.numpy(), np.array(expect), rtol=1e-10)
    # well-separated in- vs out-of-distribution features: AUROC 1
    s_in = ep.class_gaussian_score(feats, labels, 3, feats, ridge)
    s_out = ep.class_gaussian_score(feats, labels, 3, queries + 40, ridge)
    assert ep.auroc(s_in, s_out) == 1.0


# ------------------------------------------------------------------------------------------------------------------
# Probes on synthetic features with known answers
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["gcrl", "mae"])
def test_linear_probe_protocols_separate_gaussians(protocol):
    # LARS with trust 0.001 moves the head by ~lr * trust / (1 - momentum) of its norm per step, i.e. a fixed amount
    # per IMAGE whatever the batch: MAE's protocol needs many images (ImageNet) or many epochs; give it 100k images.
    # (batch 4096 as MAE's large-batch probe: same progress per epoch, 8x fewer steps than 512).
    n, epochs, batch = (2500, 4, 512) if protocol == "gcrl" else (25000, 8, 4096)
    train = gaussians(n, 4, 8, sep=8.0, seed=0)
    test = gaussians(250, 4, 8, sep=8.0, seed=1)
    args = common.parse_args(
        ep.Args, ["--linear-protocol", protocol, "--epochs", str(epochs), "--batch-size", str(batch)]
    )
    proto = ep.linear_protocol(args, "synthetic")
    if protocol == "gcrl":
        assert (proto.optimizer, proto.lr, proto.weight_decay, proto.schedule) == ("adamw", 0.01, 1e-4, "constant")
        assert ep.linear_protocol(common.parse_args(ep.Args, []), "imagenet32").lr == 0.1  # GCRL 4.2
    else:
        assert (proto.optimizer, proto.lr, proto.weight_decay) == ("lars", 0.1 * 4096 / 256, 0.0)
        assert ep.linear_protocol(common.parse_args(ep.Args, ["--linear-protocol", "mae"]), "x").epochs == 90
        head = ep.build_linear_head(8, 4, "mae")
        assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine and head[0].eps == 1e-6
    m = ep.linear_eval(train, test, 4, proto, seed=0, num_bins=15)
    assert m["acc"] > 0.99
    assert 0 <= m["ece"] <= 1


def test_knn_separates_gaussians_and_reports_ece():
    train, test = gaussians(300, 4, 8, sep=8.0, seed=0), gaussians(50, 4, 8, sep=8.0, seed=1)
    m = ep.knn_eval(train, test, 4, k=200, temperature=0.07, num_bins=15)
    assert m["acc"] > 0.99 and m["ece"] < 0.05


def test_lowshot_sampling_is_class_balanced_and_seeded():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([1000, 1500, 2000, 500])])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    idx = ep.lowshot_indices(labels, 0.02, 4, seed=3)  # 2% of 5000 = 100 labels = 25 per class
    assert torch.bincount(labels[idx], minlength=4).tolist() == [25, 25, 25, 25]
    assert idx.unique().numel() == idx.numel()
    assert torch.equal(idx, ep.lowshot_indices(labels, 0.02, 4, seed=3))
    assert not torch.equal(idx, ep.lowshot_indices(labels, 0.02, 4, seed=4))
    assert ep.mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))


def test_likelihood_gradient_score_closed_form_and_per_image():
    # log p(x) = -a/2 ||emb||^2  =>  d log p / d emb = -a emb  =>  score = -a ||emb||
    a = 3.0

    def log_likelihood(model, images):
        emb = images.flatten(1).view(images.shape[0], -1, 3).clone().requires_grad_()
        return -0.5 * a * emb.pow(2).sum((1, 2)), emb

    hook = types.SimpleNamespace(__name__="quadratic", log_likelihood=log_likelihood)
    images = torch.randn(10, 3, 4, 4)
    batches = [(images[:6], None), (images[6:], None)]
    got = ep.likelihood_gradient_scores(hook, None, batches)
    np.testing.assert_allclose(got.numpy(), (-a * images.flatten(1).norm(dim=1)).double().numpy(), rtol=1e-6)
    assert ep.likelihood_gradient_scores(hook, None, batches, max_images=7).numel() == 7


def test_likelihood_gradient_score_of_standin_autoregressive_model(standin):
    module, path = standin
    _, _, model, _ = ep.load_model(path)
    images = torch.rand(6, 3, 16, 16)
    got = ep.likelihood_gradient_scores(module, model, [(images, None)])
    for i in range(6):  # one image at a time, gradient w.r.t. its own embeddings
        log_px, emb = module.log_likelihood(model, images[i : i + 1])
        (grad,) = torch.autograd.grad(log_px.sum(), emb)
        assert got[i].item() == pytest.approx(-grad.norm().item(), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------------
# Checkpoint handling, freezing, cache
# ------------------------------------------------------------------------------------------------------------------


def test_clear_errors_for_bad_checkpoints(standin, tmp_path):
    module, path = standin
    ckpt = torch.load(path, weights_only=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({**ckpt, "method": "nosuchmethod"}, bad / "m.pt")
    with pytest.raises(ep.ProbeError, match="unknown method 'nosuchmethod'"):
        ep.load_model(str(bad / "m.pt"))
    (bad / "junk.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ep.ProbeError, match="not a readable checkpoint"):
        ep.load_model(str(bad / "junk.pt"))
    torch.save({"weights": 1}, bad / "dict.pt")
    with pytest.raises(ep.ProbeError, match="not a checkpoint"):
        ep.load_model(str(bad / "dict.pt"))
    state = dict(ckpt["model"])
    state.pop("out.bias")
    state["extra.weight"] = torch.zeros(1)
    state["stem.0.weight"] = torch.zeros(2, 3, 3, 3)
    torch.save({**ckpt, "model": state}, bad / "keys.pt")
    with pytest.raises(
        ep.ProbeError, match=r"missing keys: out\.bias.*unexpected keys: extra\.weight.*stem\.0\.weight"
    ):
        ep.load_model(str(bad / "keys.pt"))
    torch.save({**ckpt, "args": {**ckpt["args"], "not_a_field": 1}}, bad / "args.pt")
    with pytest.raises(ep.ProbeError, match="not_a_field"):
        ep.load_model(str(bad / "args.pt"))
    with pytest.raises(SystemExit, match="eval_probe.py: error: unknown protocol"):  # main: one line, exit 2
        ep.main(["--ckpt", path, "--protocols", "linear,bogus"])


def test_backbone_is_frozen_during_probing(standin):
    """Every probe sees a model in eval mode without gradients; afterwards parameters AND BatchNorm running
    statistics equal the checkpoint's. A negative control shows the check would catch a train-mode forward."""
    module, path = standin
    saved = torch.load(path, weights_only=False)["model"]
    module.MODELS.clear()
    module.CALLS.clear()
    ep.main(
        [
            "--ckpt",
            path,
            "--protocols",
            "linear,knn,layers,lowshot",
            "--epochs",
            "1",
            "--synthetic-size",
            "64",
            "--seeds",
            "0,1",
            "--lowshot-fractions",
            "0.25",
            "--no-cache",
            "--device",
            "cpu",
        ]
    )
    model = module.MODELS[-1]
    assert module.CALLS and all(not training and not grad for training, grad in module.CALLS)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for name, t in model.state_dict().items():
        assert torch.equal(t, saved[name]), f"{name} changed during probing"
    model.train()  # negative control: one train-mode forward moves the BN statistics
    with torch.no_grad():
        module.features(model, torch.rand(4, 3, 16, 16))
    assert not torch.equal(model.state_dict()["stem.1.running_mean"], saved["stem.1.running_mean"])


def test_cache_untrained_and_results_files(standin, tmp_path):
    module, path = standin
    argv = ["--ckpt", path, "--protocols", "knn", "--synthetic-size", "64", "--device", "cpu"]
    rows1 = ep.main(argv)
    cache_dir = os.path.join(os.path.dirname(path), "feature_cache")
    files = sorted(os.listdir(cache_dir))
    assert len(files) == 2 and all("synthetic" in f for f in files)  # train + test of the standard layer
    module.CALLS.clear()
    rows2 = ep.main(argv)  # a cache hit: no forward pass at all, same numbers
    assert module.CALLS == [] and rows2[0]["metrics"] == rows1[0]["metrics"]
    os.utime(path, ns=(1, 1))  # a different checkpoint mtime invalidates the cache
    ep.main(argv)
    assert len(module.CALLS) > 0 and len(os.listdir(cache_dir)) == 4
    rows_u = ep.main(argv + ["--untrained", "--protocols", "linear", "--epochs", "1"])
    assert rows_u[0]["weights"] == "untrained" and rows_u[0]["protocol"] == "linear"
    lines = open(os.path.join(os.path.dirname(path), "eval_results.jsonl")).read().splitlines()
    assert len(lines) == 4
    last = json.loads(lines[-1])
    assert {"date", "checkpoint", "method", "dataset", "protocol", "metrics"} <= set(last)
    assert last["method"] == "standin_bn" and set(last["metrics"]) == {"acc", "ece"}
    csv_lines = open(os.path.join(os.path.dirname(path), "eval_results.csv")).read().splitlines()
    assert csv_lines[0].startswith("date,checkpoint,method") and len(csv_lines) == 1 + 4 * 2


def test_ood_protocol_runs_both_scores_on_standin(standin):
    module, path = standin
    rows = ep.main(
        [
            "--ckpt",
            path,
            "--protocols",
            "ood",
            "--ood-dataset",
            "synthetic",
            "--synthetic-size",
            "64",
            "--ood-max-images",
            "16",
            "--device",
            "cpu",
            "--no-cache",
        ]
    )
    m = rows[0]["metrics"]
    # the same test split as "OOD": every score ties with itself -> exactly chance
    assert m["sup/auroc"] == 0.5 and m["unsup/auroc"] == 0.5
    assert set(m) == {"sup/auroc", "sup/auprc", "unsup/auroc", "unsup/auprc"}


def test_help_documents_every_field(tmp_path):
    out = run_script(["eval_probe.py", "--help"], cwd=str(tmp_path)).stdout
    for f in ep.Args.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in out


def test_cli_error_is_one_line(tmp_path, monkeypatch, capsys):
    """Run as a script (__main__), a bad checkpoint exits with one error line, no traceback."""
    import runpy

    (tmp_path / "x.pt").write_bytes(b"nope")
    monkeypatch.setattr(sys, "argv", ["eval_probe.py", "--ckpt", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, "eval_probe.py"), run_name="__main__")
    message = str(exit_info.value)
    assert (
        message.startswith("eval_probe.py: error:") and "not a readable checkpoint" in message and "\n" not in message
    )


# ------------------------------------------------------------------------------------------------------------------
# End to end on each method's smoke checkpoint
# ------------------------------------------------------------------------------------------------------------------

SMOKE = {
    "simclr": ["--preset", "tiny"],
    "mae": ["--preset", "tiny"],
    "igpt": ["--preset", "tiny"],
    "can": ["--preset", "tiny"],
    "gcrl": ["--preset", "tiny"],
    # a RandBit set only contrastive_props.py builds: eval_probe reads it through the file's eval_batches hook
    "contrastive_props": [
        "--preset",
        "tiny",
        "--dataset",
        "randbit",
        "--bits",
        "2",
        "--train-size",
        "256",
        "--test-size",
        "256",
        "--batch-size",
        "64",
        "--probe-epochs",
        "0",
    ],
}


def test_every_method_file_has_an_end_to_end_probe_test():
    assert ep.available_methods() == sorted(SMOKE)


@pytest.mark.parametrize("method", sorted(SMOKE))
def test_end_to_end_on_smoke_checkpoint(method, tmp_path, capsys):
    """The method's own smoke run (2 steps) writes a checkpoint; eval_probe rebuilds the model from it alone and runs
    linear (2 epochs) + kNN. eval_probe runs in-process here (its command line is covered by the --help and error
    tests) and on 256 synthetic images per split, to keep the file under its time budget."""
    module = ep.import_method(method)
    train_args = [*SMOKE[method], "--steps", "2", "--run-name", "smoke", "--device", "cpu"]
    if "synthetic_size" in module.Args.__dataclass_fields__:
        train_args += ["--synthetic-size", "256"]
    run_script([f"{method}.py", *train_args], cwd=str(tmp_path))
    ckpt = tmp_path / "runs" / "smoke" / "checkpoint.pt"
    rows = ep.main(
        ["--ckpt", str(ckpt), "--protocols", "linear,knn", "--epochs", "2", "--synthetic-size", "256",
         "--device", "cpu"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "GCRL protocol" in out and "kNN" in out
    saved = [json.loads(line) for line in open(ckpt.parent / "eval_results.jsonl")]
    assert [r["protocol"] for r in saved] == ["linear", "knn"] and all(r["method"] == method for r in saved)
    assert saved == rows
    assert all(0 <= r["metrics"]["acc"] <= 1 and 0 <= r["metrics"]["ece"] <= 1 for r in rows)
    assert open(ckpt.parent / "eval_results.csv").read().count("\n") == 1 + 4  # header + 2 metrics x 2 protocols


# ------------------------------------------------------------------------------------------------------------------
# Best layer chosen on held-out training data; eval view; the augmented (MAE main_linprobe) probe
# ------------------------------------------------------------------------------------------------------------------


def test_layers_chooses_the_block_on_held_out_training_data_and_reports_only_its_test_score(standin, monkeypatch):
    module, path = standin
    asked = []
    real_get = ep.FeatureStore.get
    monkeypatch.setattr(ep.FeatureStore, "get", lambda self, n, split, layer, *a, **k: (
        asked.append((split, layer)), real_get(self, n, split, layer, *a, **k))[1])  # fmt: skip
    argv = ["--ckpt", path, "--protocols", "layers", "--epochs", "3", "--synthetic-size", "128", "--device", "cpu"]
    row = ep.main([*argv, "--no-cache"])[0]
    m = row["metrics"]
    best = max(range(2), key=lambda b: m[f"block{b}/val_acc"])  # first of the best on ties, as the sweep
    assert m["best_block"] == best and row["setting"]["val_fraction"] == 0.1
    assert not any(k.startswith("block") and not k.endswith("/val_acc") for k in m)  # no per-block test score
    assert [layer for split, layer in asked if split == "test"] == [best]  # the test split never chooses
    # the held-out score is the linear probe fit on the other 90% of train (class balanced), scored on the 10%
    tr_x, tr_y, C = real_get(ep.FeatureStore(module, module.MODELS[-1], path, ep.common.parse_args(ep.Args, argv),
                             {"dataset": "synthetic", "data_root": "data", "image_size": 16, "synthetic_size": 128,
                              "eval_view": {}}, "cpu"), "synthetic", "train", 0, "")  # fmt: skip
    fit, held = ep.holdout_split(tr_y, 0.1, C, 0)
    assert len(held) == 4 * round(0.1 * 128 / 4) and len(set(fit.tolist()) & set(held.tolist())) == 0
    proto = ep.linear_protocol(ep.common.parse_args(ep.Args, argv), "synthetic")
    val = ep.linear_eval((tr_x[fit], tr_y[fit]), (tr_x[held], tr_y[held]), C, proto, 0, 15)["acc"]
    assert val == m["block0/val_acc"]


def test_eval_view_resize_crop_is_torchvision_resize_256_bicubic_center_crop_224():
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 300, 260), dtype=torch.uint8, generator=g)
    kw = ep.eval_view("auto", 224)
    assert kw == {"crop_ratio": 0.875, "interpolation": "bicubic"} and ep.eval_view("auto", 64) == {}
    ours = common.per_image_transform("eval", 224, **kw)(img)
    ref = v2.Compose(
        [
            v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )(img)  # fmt: skip (MAE main_linprobe.py's eval view)
    assert torch.equal(ours, ref.as_subclass(torch.Tensor))
    # the in-memory path (ImageArray, float resampling) draws the same view: equal up to uint8 rounding
    square = torch.randint(0, 256, (2, 3, 37, 37), dtype=torch.uint8, generator=g)
    array = common.ImageArray(square, torch.zeros(2), "x", 1)
    ((x, _),) = list(common.eval_batches(array, 32, 8, "cpu", crop_ratio=0.875, interpolation="bicubic"))
    per_image = torch.stack([common.per_image_transform("eval", 32, crop_ratio=0.875, interpolation="bicubic")(i)
                             for i in square])  # fmt: skip
    assert x.shape == (2, 3, 32, 32) and (x - per_image).abs().max() <= 2 / 255


def test_linear_aug_trains_the_mae_head_on_fresh_augmented_views_every_epoch(standin, monkeypatch):
    module, path = standin
    seen = []
    real_features = module.features

    def recording(model, images, layer=None, pool=None):
        seen.append(images.sum((1, 2, 3)))
        return real_features(model, images, layer, pool)

    monkeypatch.setattr(module, "features", recording)
    argv = ["--ckpt", path, "--protocols", "linear_aug", "--epochs", "2", "--batch-size", "32",
            "--synthetic-size", "64", "--device", "cpu", "--no-cache"]  # fmt: skip
    module.CALLS.clear()
    row = ep.main(argv)[0]
    assert row["protocol"] == "linear_aug" and row["setting"]["linear_protocol"] == "mae"
    assert row["setting"]["augment"] == "rrc0.08+flip" and set(row["metrics"]) == {"acc", "ece"}
    assert all(not training and not grad for training, grad in module.CALLS)  # frozen backbone throughout
    # 1 test extraction (64 images in 1 batch of 256) + 2 epochs x 2 steps of 32 augmented training images
    sizes = [len(s) for s in seen]
    assert sizes == [64, 32, 32, 32, 32]
    epoch0, epoch1 = torch.cat(seen[1:3]), torch.cat(seen[3:5])
    assert not torch.allclose(epoch0.sort().values, epoch1.sort().values)  # new crops every epoch
    seen.clear()
    again = ep.main(argv)[0]
    assert again["metrics"] == row["metrics"]  # seeded: the augmentation draws and the head
