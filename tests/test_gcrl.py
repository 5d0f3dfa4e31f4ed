"""gcrl.py: causality of the whole encoder-decoder and of the encoder's prefix representation, L_c == common.nt_xent
(and eq. 3 written out) on the pooled projected views, L == alpha L_g + beta L_c, the generative phase (no strong view
encoded, no projector gradient), only the weak view in the decoder, the baselines on the same architecture, the
two-phase schedule, Table 1 parameter counts, the eval_probe hooks, a short Fashion-MNIST run that beats the
unigram and untrained baselines, and the script end to end (run folder, exact resume across the phase switch,
torchrun, 2-rank gradients == 1 process, --help, one-line errors)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_distributed, run_script
from test_igpt import unigram_bits

import common
import gcrl

TINY = ["--preset", "tiny"]  # 8x8 synthetic shapes = 64 tokens, 64 wide x 4 blocks (2 + 2), fp32
K, L = 512, 64


def tiny_args(*extra: str) -> gcrl.Args:
    return common.parse_args(gcrl.Args, TINY + list(extra), gcrl.PRESETS)


def random_model(args: gcrl.Args, seed: int = 0) -> gcrl.GCRL:
    """Eval mode, large random weights (the zero head would make every logit 0, small weights hide dependencies)."""
    torch.manual_seed(seed)
    model = gcrl.build_model(args).eval()
    for m in (*model.encoder.modules(), *model.decoder.modules()):
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.1)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def random_tokens(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(K, (batch, L), generator=torch.Generator().manual_seed(seed))


def hooked_inputs(module: torch.nn.Module, store: list):
    return module.register_forward_hook(lambda m, inputs, out: store.append(inputs[0].detach().clone()))


# ---------------------------------------------------------------- causality
@pytest.mark.parametrize("attention", ["dense", "axial"])
def test_whole_model_is_causal_and_the_encoder_prefix_ignores_later_tokens(attention):
    model = random_model(tiny_args("--attention", attention))
    tokens = random_tokens(2)
    with torch.no_grad():
        base, base_h = model(tokens), model.encode(tokens)
        for k in (0, 5, 7, 8, 30, 56, 63):  # row starts and ends of the 8x8 grid, the middle, the last token
            changed = tokens.clone()
            changed[:, k] = (changed[:, k] + 1 + torch.arange(2) * 200) % K
            out, h = model(changed), model.encode(changed)
            # shift convention: logits[:, p] predict token p from tokens < p, so positions <= k cannot see token k
            torch.testing.assert_close(out[:, : k + 1], base[:, : k + 1], rtol=0, atol=1e-6)
            torch.testing.assert_close(h[:, : k + 1], base_h[:, : k + 1], rtol=0, atol=1e-6)
            prefix = model.represent(h[:, : k + 1])  # GAP(LN(.)) of the prefix of the encoder output
            torch.testing.assert_close(prefix, model.represent(base_h[:, : k + 1]), rtol=0, atol=1e-6)
            if k < L - 1:  # every later position sees token k, through encoder and decoder
                assert (out[:, k + 1 :] - base[:, k + 1 :]).abs().amax(-1).min() > 1e-6
                assert (out[:, k + 1] - base[:, k + 1]).abs().max() > 1e-2
                assert (h[:, k + 1] - base_h[:, k + 1]).abs().max() > 1e-3
        # position 0 depends on SOS only
        torch.testing.assert_close(model(random_tokens(2, seed=7))[:, 0], base[:, 0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the loss (THE PART TO READ of gcrl.py)
def eq3_by_hand(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """GCRL eq. 3 written out: -1/2N sum_i [log e(1i.2i) / (sum_{j!=i} e(1i.1j) + sum_j e(1i.2j)) + (1 <-> 2)]."""
    z1, z2 = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    N, total = z1.shape[0], 0.0
    for a, b in ((z1, z2), (z2, z1)):
        for i in range(N):
            same = sum(torch.exp(a[i] @ a[j] / tau) for j in range(N) if j != i)
            other = sum(torch.exp(a[i] @ b[j] / tau) for j in range(N))
            total = total + torch.log(torch.exp(a[i] @ b[i] / tau) / (same + other))
    return -total / (2 * N)


def test_contrastive_term_is_nt_xent_of_the_pooled_projected_views_and_total_is_alpha_lg_plus_beta_lc():
    args = tiny_args("--alpha", "0.7", "--beta", "1.3", "--tau", "0.2")
    model = random_model(args)
    weak, strong = random_tokens(5, seed=2), random_tokens(5, seed=3)
    terms = gcrl.gcrl_loss(model, weak, strong, args, hybrid=True)
    assert set(terms) == {"generative", "contrastive", "total"}
    # by hand, each view encoded on its own: z = projector(GAP(LN(encoder output)))
    z1 = model.projector(model.enc_norm(model.encode(weak)).mean(1))
    z2 = model.projector(model.enc_norm(model.encode(strong)).mean(1))
    lc = common.nt_xent(z1, z2, 0.2)
    assert terms["contrastive"].item() == pytest.approx(lc.item(), rel=1e-5)
    assert terms["contrastive"].item() == pytest.approx(eq3_by_hand(z1, z2, 0.2).item(), rel=1e-5)
    # L_g: mean NLL over all weak tokens of the decoder's logits (SOS shift: all 64 tokens are targets)
    logp = torch.log_softmax(model.decode(model.encode(weak)).double(), dim=-1)
    lg = -logp.gather(2, weak[..., None]).mean()
    assert terms["generative"].item() == pytest.approx(lg.item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx(0.7 * lg.item() + 1.3 * lc.item(), rel=1e-5)
    # and the generative path alone is the model's plain forward (what bits per token and sampling use)
    torch.testing.assert_close(model(weak), model.decode(model.encode(weak)), rtol=1e-5, atol=1e-5)


def test_generative_phase_encodes_only_the_weak_view_and_the_projector_gets_no_gradient():
    args = tiny_args()
    model = random_model(args).train()
    weak, strong = random_tokens(4, seed=2), random_tokens(4, seed=3)
    embedded, projected = [], []
    hooks = [hooked_inputs(model.embed, embedded), hooked_inputs(model.projector, projected)]
    terms = gcrl.gcrl_loss(model, weak, strong, args, hybrid=False)
    terms["total"].backward()
    assert set(terms) == {"generative", "total"}
    assert terms["total"].item() == pytest.approx(terms["generative"].item())
    assert len(embedded) == 1 and torch.equal(embedded[0], weak)  # one encoder pass, on the weak tokens only
    assert projected == []
    for name, p in model.named_parameters():
        if name.startswith(("projector.", "enc_norm.")):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, name
    # the hybrid phase: one encoder pass on [weak; strong] (2B rows), the projector sees all 2B pooled rows
    embedded.clear()
    model.zero_grad(set_to_none=True)
    gcrl.gcrl_loss(model, weak, strong, args, hybrid=True)["total"].backward()
    assert len(embedded) == 1 and torch.equal(embedded[0], torch.cat([weak, strong]))
    assert projected[0].shape == (8, 64)
    assert all(p.grad is not None for p in model.parameters())  # DDP: every parameter is used in this phase
    for h in hooks:
        h.remove()


def test_only_the_weak_view_reaches_the_decoder():
    args = tiny_args()
    model = random_model(args)
    weak, strong = random_tokens(3, seed=2), random_tokens(3, seed=3)
    decoded = []
    hook = hooked_inputs(model.decoder[0], decoded)
    with torch.no_grad():
        out = model(weak, strong=strong)
        assert len(decoded) == 1 and decoded[0].shape == (3, L, 64)
        torch.testing.assert_close(decoded[0], model.encode(weak), rtol=1e-5, atol=1e-5)
        other = model(weak, strong=random_tokens(3, seed=4))  # another strong view: same logits, other z
        torch.testing.assert_close(other["logits"], out["logits"], rtol=0, atol=1e-6)
        torch.testing.assert_close(other["z"][:3], out["z"][:3], rtol=0, atol=1e-6)
        assert (other["z"][3:] - out["z"][3:]).abs().max() > 1e-3
    hook.remove()


def test_baselines_on_the_same_architecture_and_table_7_split():
    weak, strong = random_tokens(4, seed=2), random_tokens(4, seed=3)
    # --alpha 0 --enc-blocks 4: SimCLR on the token transformer, the decoder is never run
    args = tiny_args("--alpha", "0", "--enc-blocks", "4")
    model = random_model(args)
    assert len(model.encoder) == 4 and len(model.decoder) == 0
    assert gcrl.phase_steps(args, 10)[0] == 0
    calls = []
    hook = model.head.register_forward_hook(lambda *a: calls.append(1))
    terms = gcrl.gcrl_loss(model, weak, strong, args, hybrid=True)
    assert set(terms) == {"contrastive", "total"} and calls == []
    assert terms["total"].item() == pytest.approx(terms["contrastive"].item())
    hook.remove()
    # --beta 0: iGPT, generative all the way (the whole run is the first phase, at the generative lr)
    args = tiny_args("--beta", "0")
    assert gcrl.phase_steps(args, 10)[:2] == (100, 100)
    assert set(gcrl.gcrl_loss(random_model(args), weak, strong, args, hybrid=True)) == {"generative", "total"}
    # Table 7's 4/4 row at tiny scale: both losses on the last block's output (no decoder blocks)
    args = tiny_args("--enc-blocks", "4")
    model = random_model(args)
    out = model(weak, strong=strong)
    torch.testing.assert_close(out["logits"], model.head(model.norm(model.encode(weak))), rtol=1e-5, atol=1e-5)


def test_two_phases_with_their_own_warmup_and_cosine_at_table_3_peaks():
    args = common.parse_args(gcrl.Args, [], gcrl.PRESETS)  # CIFAR (5+5)M
    assert (args.batch_size, args.epochs, args.warmup_epochs, args.weight_decay) == (512, 400, 5, 1e-4)
    assert args.clip_grad == 1.0
    assert (args.alpha, args.beta, args.dropout, args.arch, args.attention) == (1, 1, 0.1, "gcrl_5_5", "axial")
    gen_lr, lr = common.scaled_lr(args.gen_base_lr, 512), common.scaled_lr(args.base_lr, 512)
    assert (gen_lr, lr) == (pytest.approx(1.6e-3), pytest.approx(4.8e-4))  # GCRL Table 3
    spe = 50000 // 512
    gen, total, warm = gcrl.phase_steps(args, spe)
    assert (gen, total, warm) == (200 * spe, 400 * spe, 5 * spe)  # 200 + 200 epochs, 5 warmup epochs each
    sched = [gcrl.learning_rate(s, gen, total, warm, gen_lr, lr, 0.0) for s in range(total)]
    assert [h for _, h in sched] == [False] * gen + [True] * (total - gen)
    lrs = torch.tensor([v for v, _ in sched])
    assert lrs[0] == 0 and lrs[warm] == pytest.approx(gen_lr) and lrs[:gen].max() == pytest.approx(gen_lr)
    assert lrs[gen - 1] < 1e-3 * gen_lr  # the first cosine ends near 0 ...
    assert lrs[gen] == 0 and lrs[gen + warm] == pytest.approx(lr) and lrs[gen:].max() == pytest.approx(lr)  # restart
    assert (lrs[gen + warm :].diff() <= 0).all() and (lrs[warm:gen].diff() <= 0).all()
    i = common.parse_args(gcrl.Args, ["--preset", "imagenet32_38_38"], gcrl.PRESETS)
    assert (i.arch, i.batch_size, i.epochs) == ("gcrl_38_38", 768, 100)
    assert common.scaled_lr(i.gen_base_lr, 768) == pytest.approx(4e-4) == common.scaled_lr(i.base_lr, 768)


def test_preset_parameter_counts_match_table_1():
    """GCRL Table 1: (5+5)M = 12 blocks with 6 in the encoder, (38+38)M = 24 with 12; SimCLR 10M = 12 encoder blocks.
    Tolerance 10%: the table rounds to whole millions and does not say whether embeddings and heads count. Here the
    encoder side is embeddings + encoder blocks + LN + projection head, the decoder side blocks + LN + output head."""

    def counts(*flags):
        with torch.device("meta"):
            model = gcrl.build_model(common.parse_args(gcrl.Args, list(flags), gcrl.PRESETS))
        enc = sum(p.numel() for m in (model.embed, model.encoder, model.enc_norm, model.projector)
                  for p in m.parameters())  # fmt: skip
        dec = sum(p.numel() for m in (model.decoder, model.norm, model.head) for p in m.parameters())
        return len(model.encoder), len(model.decoder), enc / 1e6, dec / 1e6

    e, d, enc, dec = counts("--arch", "gcrl_5_5")
    print(f"(5+5)M: {enc:.3f}M + {dec:.3f}M")
    assert (e, d) == (6, 6) and enc == pytest.approx(5, rel=0.1) and dec == pytest.approx(5, rel=0.1)
    e, d, enc, dec = counts("--arch", "gcrl_38_38")
    print(f"(38+38)M: {enc:.3f}M + {dec:.3f}M")
    assert (e, d) == (12, 12) and enc == pytest.approx(38, rel=0.1) and dec == pytest.approx(38, rel=0.1)
    e, d, enc, _ = counts("--arch", "gcrl_5_5", "--alpha", "0", "--enc-blocks", "12")
    assert (e, d) == (12, 0) and enc == pytest.approx(10, rel=0.1)  # SimCLR 10M


# ---------------------------------------------------------------- eval_probe hooks
def test_features_log_likelihood_and_bits_per_token_hooks():
    args = tiny_args()
    model = random_model(args).train()
    images = torch.rand(3, 3, 8, 8)
    tokens = common.quantize(model, images)
    assert gcrl.num_feature_layers(model) == 4
    with torch.no_grad():
        model.eval()
        standard = model.enc_norm(model.encode(tokens)).mean(1)
        h = model.embed(tokens, shift=True)
        per_block = []
        for block in (*model.encoder, *model.decoder):
            h = block(h, is_causal=True)
            per_block.append(F.layer_norm(h, (64,), eps=1e-6).mean(1))
        model.train()
    torch.testing.assert_close(gcrl.features(model, images), standard, rtol=1e-5, atol=1e-5)
    for i, expected in enumerate(per_block):
        torch.testing.assert_close(gcrl.features(model, images, layer=i), expected, rtol=1e-5, atol=1e-5)
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="out of range"):
        gcrl.features(model, images, layer=4)
    log_px, emb = gcrl.log_likelihood(model, images)
    nll = F.cross_entropy(model.eval()(tokens).transpose(1, 2), tokens, reduction="none")
    torch.testing.assert_close(log_px, -nll.sum(1), rtol=1e-5, atol=1e-4)
    assert emb.shape == (3, L, 64) and emb.is_leaf and emb.requires_grad
    assert common.bits_per_token(model, images, args, "cpu") == pytest.approx(nll.mean().item() / math.log(2), rel=1e-5)
    assert common.bits_per_token(gcrl.build_model(args), images, args, "cpu") == pytest.approx(9.0, abs=1e-5)


# ---------------------------------------------------------------- learning: a short CPU run beats both baselines
def linear_probe_accuracy(train_x, train_y, test_x, test_y, steps: int = 300) -> float:
    """Multinomial logistic regression on standardized frozen features (full batch, Adam): test accuracy."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    W = torch.zeros(train_x.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(train_x @ W + b, train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((test_x @ W + b).argmax(1) == test_y).float().mean().item()


def test_short_fashion_mnist_run_beats_the_unigram_and_the_untrained_network(tmp_path):
    """188 steps (94 generative + 94 hybrid) of the tiny model on Fashion-MNIST at 8x8 (Debian's
    dataset-fashion-mnist). The weak view is the image itself (--augment none, as igpt's test: a crop of an 8 px
    image blurs the per-position statistics the unigram baseline lives on)."""
    flags = ["--dataset", "fashion_mnist", "--augment", "none", "--epochs", "0.1", "--log-every", "47"]
    flags += ["--eval-images", "1000", "--knn-bank", "0", "--num-samples", "0", "--output-dir", str(tmp_path)]
    final = gcrl.main(TINY + flags + ["--run-name", "fm", "--device", "cpu"])
    assert final["step"] == 188 and final["gen_steps"] == 94 and "loss/contrastive" in final
    run = tmp_path / "fm"
    palette = common.ColorQuantizer.load(str(run / "palette.npy"))
    train, test = (common.build_dataset("fashion_mnist", train=t, image_size=8) for t in (True, False))
    unigram = min(unigram_bits(palette.encode(train.images[:10000]), palette.encode(test.images[:1000]), a)
                  for a in (0.001, 0.01, 0.1, 1.0))  # fmt: skip
    bits = final["eval/test_bits_per_token"]
    ckpt = common.load_checkpoint(str(run / "checkpoint.pt"), "gcrl")
    trained = gcrl.build_model(gcrl.Args(**ckpt["args"]))
    trained.load_state_dict(ckpt["model"])
    torch.manual_seed(0)
    untrained = gcrl.build_model(gcrl.Args(**ckpt["args"]))
    untrained.quantizer.centers.copy_(trained.quantizer.centers)  # the same tokens, fresh weights
    acc = {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        f_tr = torch.cat([gcrl.features(model, x.float() / 255) for x in train.images[:5000].split(1000)])
        f_te = gcrl.features(model, test.images[:2000].float() / 255)
        acc[name] = linear_probe_accuracy(f_tr, train.labels[:5000], f_te, test.labels[:2000])
    print(f"bits per token: model {bits:.3f}, unigram {unigram:.3f}; linear probe: {acc}")
    assert unigram < 7 and bits < unigram - 0.3
    assert acc["trained"] > acc["untrained"] + 0.04


# ---------------------------------------------------------------- command line, end to end, resume, torchrun
def test_bad_input_gives_one_line_errors(tmp_path):
    run = TINY + ["--output-dir", str(tmp_path), "--device", "cpu", "--synthetic-size", "64"]
    cases = [
        (["--enc-blocks", "5"], "--enc-blocks must be in [0, 4]"),
        (["--alpha", "0", "--beta", "0"], "not both 0"),
        (["--alpha", "0", "--gen-only-epochs", "1"], "no generative phase"),
        (["--gen-only-epochs", "20"], "--gen-only-epochs <= --epochs"),
        (["--tau", "0"], "argument --tau: 0 is outside (0, inf)"),
        (["--batch-size", "1"], "NT-Xent needs a negative"),
        (["--palette", str(tmp_path / "missing.npy")], "no such file"),
        (["--dataset", "cifar10", "--data-root", str(tmp_path)], "not found"),
        (["--resume", str(tmp_path / "none.pt")], "no such checkpoint"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            gcrl.main(run + argv)
        text = str(e.value)
        assert text.startswith("gcrl.py: error:") and message in text and "\n" not in text, (argv, text)


def test_end_to_end_run_folder_phases_and_checkpoint(tmp_path):
    flags = ["--synthetic-size", "128", "--batch-size", "16", "--epochs", "0.75", "--log-every", "1"]
    flags += ["--num-samples", "4", "--eval-images", "16", "--knn-bank", "64", "--device", "cpu"]
    proc = run_script(["gcrl.py", *TINY, *flags, "--run-name", "e2e"], cwd=tmp_path)
    assert "L_g alone for steps [0, 3)" in proc.stdout and "bits_per_token" in proc.stdout
    run = tmp_path / "runs" / "e2e"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r for r in rows if "loss/total" in r]
    assert [(r["step"], r["phase"], "loss/contrastive" in r) for r in losses] == [
        (1, 1, False), (2, 1, False), (3, 1, False), (4, 2, True), (5, 2, True), (6, 2, True)
    ]  # fmt: skip
    assert losses[0]["loss/generative"] == pytest.approx(math.log(K), abs=1e-5)  # the untrained (zero) head
    final = [r for r in rows if "eval/test_bits_per_token" in r][-1]
    assert 0 <= final["eval/knn_top1"] <= 1 and "eval/train_bits_per_token" in final
    assert (run / "samples_step0000006.png").exists() and (run / "palette.npy").exists()
    ckpt = common.load_checkpoint(str(run / "checkpoint.pt"), "gcrl")
    assert ckpt["step"] == 6 and ckpt["args"]["num_colors"] == K
    model = gcrl.build_model(gcrl.Args(**ckpt["args"]))  # eval_probe.py's path: rebuilt from the args alone
    model.load_state_dict(ckpt["model"])


def test_resume_across_the_phase_switch_is_bitwise_exact(tmp_path, capsys):
    base = TINY + ["--synthetic-size", "128", "--batch-size", "16", "--epochs", "0.75", "--output-dir", str(tmp_path)]
    base += ["--log-every", "1", "--eval-images", "16", "--knn-bank", "0", "--num-samples", "0", "--device", "cpu"]
    gcrl.main(base + ["--run-name", "straight"])
    gcrl.main(base + ["--run-name", "resumed", "--steps", "2"])  # stops inside the generative phase
    capsys.readouterr()
    final = gcrl.main(base + ["--run-name", "resumed"])
    assert "resumed from" in capsys.readouterr().out and final["step"] == 6
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    rows = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss/total" in r] == [1, 2, 3, 4, 5, 6]


def _two_rank_gradients(rank, world, args_list, weak, strong):
    """Each rank: the same model, its half of the batch, gcrl_loss backward, gradients averaged over ranks (DDP)."""
    torch.manual_seed(0)
    args = common.parse_args(gcrl.Args, args_list, gcrl.PRESETS)
    model = random_model(args).train()
    n = weak.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    gcrl.gcrl_loss(model, weak[sl], strong[sl], args, hybrid=True)["total"].backward()
    grads = []
    for p in model.parameters():
        torch.distributed.all_reduce(p.grad)
        grads.append((p.grad / world).flatten().tolist())
    return grads


def test_two_rank_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    args_list = TINY + ["--tau", "0.3"]
    weak, strong = random_tokens(8, seed=2), random_tokens(8, seed=3)
    per_rank = run_distributed(_two_rank_gradients, 2, tmp_path, args_list, weak, strong)
    torch.manual_seed(0)
    args = tiny_args("--tau", "0.3")
    model = random_model(args).train()
    gcrl.gcrl_loss(model, weak, strong, args, hybrid=True)["total"].backward()
    for (name, p), g0, g1 in zip(model.named_parameters(), *per_rank):
        assert g0 == g1, name
        torch.testing.assert_close(torch.tensor(g0).view_as(p), p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_torchrun_two_processes(tmp_path):
    flags = ["--synthetic-size", "64", "--batch-size", "8", "--epochs", "0.5", "--eval-images", "16"]
    flags += ["--knn-bank", "32", "--num-samples", "2", "--log-every", "1", "--device", "cpu"]
    proc = run_script(["gcrl.py", *TINY, *flags, "--run-name", "ddp"], cwd=tmp_path, torchrun=2)
    assert "2 x 4 images/step" in proc.stdout and "phase 2 | generative" in proc.stdout
    ckpt = common.load_checkpoint(str(tmp_path / "runs" / "ddp" / "checkpoint.pt"), "gcrl")
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
