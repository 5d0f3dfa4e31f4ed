"""igpt.py: causality of the whole model (dense and axial), the SOS shift and the loss by hand, uniform = 9 bits, a
short CPU run that beats the uniform and per-position unigram baselines, the BERT objective, sampling (distribution,
temperature, PNG), palette fit / cache / --palette file, the eval_probe hooks (features of every block,
log_likelihood), --help, one-line errors, and the script end to end (python, --sample-only, exact resume, torchrun)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_png, run_distributed, run_script

import common
import igpt

TINY = ["--preset", "tiny"]  # 8x8 synthetic shapes = 64 tokens, 64 wide x 2 blocks, fp32 (amp off)
K = 512


def tiny_args(*extra: str) -> igpt.Args:
    return common.parse_args(igpt.Args, TINY + list(extra), igpt.PRESETS)


def random_model(args: igpt.Args, seed: int = 0) -> igpt.ImageGPT:
    """A tiny model in eval mode with large random weights: the zero-initialized head would make every logit 0, and
    the small initial weights would let a token barely move the attention's output."""
    torch.manual_seed(seed)
    model = igpt.build_model(args).eval()
    for m in model.blocks.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.1)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(K, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- causality, SOS shift, loss by hand, uniform 9 bits
@pytest.mark.parametrize("attention", ["dense", "axial"])
def test_whole_model_is_causal_in_raster_order(attention):
    args = tiny_args("--attention", attention)
    model = random_model(args)
    L = 64
    tokens = random_tokens(2, L)
    with torch.no_grad():
        base = model(tokens)
        for k in (0, 3, 7, 8, 29, 56, 62, 63):  # row starts and ends of the 8x8 grid, the middle, the last token
            changed = tokens.clone()
            changed[:, k] = (changed[:, k] + 1 + torch.arange(2) * 200) % K
            out = model(changed)
            torch.testing.assert_close(out[:, : k + 1], base[:, : k + 1], rtol=0, atol=1e-6)  # positions <= k
            if k < L - 1:  # every later position sees token k (dense: directly; axial: row or column pass)
                assert (out[:, k + 1 :] - base[:, k + 1 :]).abs().amax(-1).min() > 1e-6
                assert (out[:, k + 1] - base[:, k + 1]).abs().max() > 1e-2
        # position 0 depends on SOS only: every token changed, logits at 0 identical; SOS changed, they move
        out = model(random_tokens(2, L, seed=7))
        torch.testing.assert_close(out[:, 0], base[:, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(base[0, 0], base[1, 0], rtol=0, atol=1e-6)
        model.embed.sos.add_(0.1 * torch.randn(64))  # (not a constant: LayerNorm would remove it)
        assert (model(tokens)[:, 0] - base[:, 0]).abs().max() > 1e-2


def test_dense_and_axial_models_share_one_set_of_weights():
    """GCRL uses one MSA three times, so an axial checkpoint loads into the dense model (strict) and back. Where the
    two attention patterns agree the outputs agree: in the first row of the grid the axial passes reduce to causal
    attention along that row (the column pass reaches only the row itself, and its shift-down leaves row 0 zeros),
    which is what dense causal attention computes for the first W positions. Later rows see different contexts."""
    axial = random_model(tiny_args())
    dense = igpt.build_model(tiny_args("--attention", "dense")).eval()
    assert isinstance(axial.blocks[0].attn, common.AxialAttention) and axial.blocks[0].attn.mode == "axial"
    assert not isinstance(dense.blocks[0].attn, common.AxialAttention)  # plain causal attention over H*W
    dense.load_state_dict(axial.state_dict())  # strict: the same names and shapes
    tokens = random_tokens(3, 64)
    with torch.no_grad():
        out_axial, out_dense = axial(tokens), dense(tokens)
    W = 8
    torch.testing.assert_close(out_dense[:, :W], out_axial[:, :W], rtol=1e-5, atol=1e-5)  # the first row
    assert (out_dense[:, W:] - out_axial[:, W:]).abs().amax(-1).min() > 1e-4  # every later position differs
    axial.load_state_dict(dense.state_dict())  # and back


@pytest.mark.parametrize("attention", ["dense", "axial"])
def test_ar_loss_is_the_mean_nll_over_all_tokens_with_the_sos_shift(attention):
    args = tiny_args("--attention", attention)
    model = random_model(args)
    tokens = random_tokens(3, 64)
    emb, H, W = model.embed, 8, 8
    # by hand: input [SOS, t_0 .. t_62] + row/column positions -> causal blocks -> LayerNorm -> head; targets t_0..t_63
    x = torch.cat([emb.sos.expand(3, 1, -1), emb.tok_embed.weight[tokens[:, :-1]]], dim=1)
    x = x + torch.stack([emb.pos_row[i] + emb.pos_col[j] for i in range(H) for j in range(W)])
    for block in model.blocks:
        x = block(x, is_causal=True)
    logits = model.head(model.norm(x))
    torch.testing.assert_close(model(tokens), logits, rtol=1e-5, atol=1e-5)
    logp = torch.log_softmax(logits.double(), dim=-1)
    hand = -sum(logp[b, p, tokens[b, p]] for b in range(3) for p in range(64)) / (3 * 64)
    terms = igpt.igpt_loss(model, tokens, args)
    assert set(terms) == {"ar", "total"} and terms["total"] is terms["ar"]
    assert terms["total"].item() == pytest.approx(hand.item(), rel=1e-5)
    # bits per token = the same mean NLL / ln 2 (eval mode, no dropout), over uint8 images through the palette
    images = torch.randint(256, (3, 3, 8, 8), dtype=torch.uint8)
    nll = igpt.igpt_loss(model, common.quantize(model, images), args)["total"].item()
    assert common.bits_per_token(model, images, args, "cpu", batch_size=2) == pytest.approx(nll / math.log(2), rel=1e-5)


def test_untrained_model_is_uniform_nine_bits_per_token():
    args = tiny_args()
    model = igpt.build_model(args)  # zero-initialized head (iGPT ref code)
    images = common.synthetic_shapes(16, 8, seed=3)[0]
    assert common.bits_per_token(model, images, args, "cpu") == pytest.approx(9.0, abs=1e-5)  # log2(512)


def test_every_trainable_parameter_gets_a_gradient_and_decay_skips_norms_and_embeddings():
    for objective in ("ar", "bert"):  # DDP needs a gradient for every trainable parameter
        args = tiny_args("--objective", objective)
        model = random_model(args).train()
        igpt.igpt_loss(model, random_tokens(2, 64), args)["total"].backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], (objective, missing)
        assert model.embed.sos.requires_grad == (objective == "ar")  # BERT inputs have no SOS
    args = tiny_args()
    model = igpt.build_model(args)
    no_decay, decay = igpt.build_optimizer(model, args, 1e-3, "cpu").param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {n for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith("embed.")}
    assert {names[id(p)] for p in no_decay["params"]} >= {"embed.sos", "embed.pos_row", "embed.tok_embed.weight"}
    assert "head.weight" in decayed and no_decay["weight_decay"] == 0


# ---------------------------------------------------------------- iGPT's own architecture: --arch igpt_s / m / l
def test_igpt_arch_names_select_igpt_and_the_gcrl_names_keep_gcrl():
    s = common.parse_args(igpt.Args, ["--arch", "igpt_s"], igpt.PRESETS)
    assert (s.attention, s.positions, s.block_bias, s.betas, s.weight_decay, s.dropout) == (
        "dense", "1d", False, (0.9, 0.95), 0.0, 0.0)  # fmt: skip
    for arch in ("igpt_m", "igpt_l"):
        a = common.parse_args(igpt.Args, ["--arch", arch], igpt.PRESETS)
        assert (a.attention, a.positions, a.block_bias) == ("dense", "1d", False)
    g = common.parse_args(igpt.Args, ["--arch", "igpt_76m"], igpt.PRESETS)  # GCRL's 76M: its recipe
    assert (g.attention, g.positions, g.block_bias, g.betas, g.weight_decay, g.dropout) == (
        "axial", "rowcol", True, (0.9, 0.999), 1e-4, 0.1)  # fmt: skip


def test_igpt_variant_has_one_position_per_token_no_block_biases_and_stays_causal():
    args = tiny_args("--positions", "1d", "--no-block-bias", "--attention", "dense")
    model = random_model(args)
    names = dict(model.named_parameters())
    assert names["embed.pos"].shape == (64, 64) and "embed.pos_row" not in names and "embed.pos_col" not in names
    assert [n for n in names if n.startswith("blocks.") and n.endswith(".bias") and "norm" not in n] == []
    tokens = random_tokens(2, 64)
    with torch.no_grad():
        base = model(tokens)
        for k in (0, 9, 63):  # a token changes no logit at positions <= k (SOS shift), and the next one
            changed = tokens.clone()
            changed[:, k] = (changed[:, k] + 1) % K
            out = model(changed)
            torch.testing.assert_close(out[:, : k + 1], base[:, : k + 1], rtol=0, atol=1e-6)
            if k < 63:
                assert (out[:, k + 1] - base[:, k + 1]).abs().max() > 1e-2
        model.embed.pos[9].add_(0.5 * torch.randn(64))  # the position of index 9 alone: logits from 9 on move
        out = model(tokens)
        torch.testing.assert_close(out[:, :9], base[:, :9], rtol=0, atol=1e-6)
        assert (out[:, 9] - base[:, 9]).abs().max() > 1e-2
    model.train()
    igpt.igpt_loss(model, tokens, args)["total"].backward()  # DDP: every trainable parameter gets a gradient
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


# ---------------------------------------------------------------- learning: a short CPU run beats both baselines
def unigram_bits(train_tokens: torch.Tensor, test_tokens: torch.Tensor, alpha: float) -> float:
    """Independent-per-position model: p(t at position p) = (count_p(t) + alpha) / (N + alpha K) from the training
    tokens (N, L); mean bits per token on the test tokens."""
    L = train_tokens.shape[1]
    counts = torch.zeros(L, K, dtype=torch.float64)
    counts.scatter_add_(1, train_tokens.T, torch.ones(L, train_tokens.shape[0], dtype=torch.float64))
    logp = ((counts + alpha) / (counts.sum(1, keepdim=True) + alpha * K)).log2()
    return -logp.gather(1, test_tokens.T).mean().item()


def test_short_cpu_run_beats_uniform_and_unigram_baselines(tmp_path):
    """80 steps of the tiny model on Fashion-MNIST at 8x8 (64 tokens; Debian's dataset-fashion-mnist, which .ci/run
    installs). Un-augmented: a 4-pixel reflect-pad crop of an 8-pixel image would blur the per-position statistics
    the unigram baseline lives on. Its black borders make that baseline strong (about 6.2 bits per token)."""
    flags = ["--dataset", "fashion_mnist", "--augment", "none", "--steps", "80", "--log-every", "20"]
    flags += ["--eval-images", "256", "--num-samples", "0", "--output-dir", str(tmp_path), "--run-name", "bpd"]
    final = igpt.main(TINY + flags)
    assert final["step"] == 80
    palette = common.ColorQuantizer.load(str(tmp_path / "bpd" / "palette.npy"))
    train = palette.encode(common.build_dataset("fashion_mnist", image_size=8).images[:10000])
    test = palette.encode(common.build_dataset("fashion_mnist", train=False, image_size=8).images[:256])
    # the unigram baseline gets its best smoothing, chosen on the test images themselves
    unigram = min(unigram_bits(train, test, a) for a in (0.001, 0.01, 0.1, 1.0))
    bits = final["eval/test_bits_per_token"]
    print(f"test bits per token: model {bits:.3f}, unigram {unigram:.3f}, uniform {math.log2(K):.0f}")
    assert unigram < 7  # a real baseline: the positions alone tell much
    assert bits < math.log2(K) - 2 and bits < unigram - 0.4


# ---------------------------------------------------------------- BERT objective
def test_bert_masks_15_percent_and_scores_only_the_masked_tokens():
    keep = common.bert_keep_mask(torch.zeros(400, 64, dtype=torch.long), 0.15, torch.Generator().manual_seed(0))
    assert abs((~keep).float().mean().item() - 0.15) < 0.01  # 25,600 tokens: std of the fraction 0.0022
    args = tiny_args("--objective", "bert")
    model = random_model(args)
    tokens = random_tokens(4, 64)
    torch.manual_seed(5)
    keep = common.bert_keep_mask(tokens, 0.15)
    nll, scored = common.token_nll(model, tokens, args, generator=torch.Generator().manual_seed(9))
    assert torch.equal(scored, ~common.bert_keep_mask(tokens, 0.15, torch.Generator().manual_seed(9)))
    with torch.no_grad():
        logits = model(tokens, keep)
        hidden = tokens.clone()
        hidden[~keep] = (hidden[~keep] + 100) % K
        torch.testing.assert_close(model(hidden, keep), logits, rtol=0, atol=1e-6)  # masked inputs are zeroed
        visible = int(keep[0].nonzero()[-1])  # no causal mask: position 0 sees the last visible token
        moved = tokens.clone()
        moved[0, visible] = (moved[0, visible] + 1) % K
        assert (model(moved, keep)[0, 0] - logits[0, 0]).abs().max() > 1e-3
    # the loss: per image the mean NLL of its masked tokens, then the mean over images (iGPT ref code)
    ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    hand = torch.stack([ce[b][~keep[b]].mean() for b in range(4)]).mean()
    seen = {}

    def keep_logits(module, inputs, out):
        out.retain_grad()
        seen["logits"] = out

    model.head.register_forward_hook(keep_logits)
    torch.manual_seed(5)  # the same global-RNG mask as above
    terms = igpt.igpt_loss(model, tokens, args)
    assert set(terms) == {"bert", "total"}
    assert terms["total"].item() == pytest.approx(hand.item(), rel=1e-5)
    assert terms["total"].item() != pytest.approx(ce.mean().item(), rel=1e-3)
    terms["total"].backward()
    grad = seen["logits"].grad
    assert grad[keep].abs().max() == 0 and grad[~keep].abs().amax(-1).min() > 0  # only masked tokens are scored
    with pytest.raises(ValueError, match="autoregressive"):
        common.sample(model, 1)


# ---------------------------------------------------------------- sampling
def test_samples_follow_the_model_at_the_temperature_and_decode_to_a_png(tmp_path):
    args = tiny_args("--image-size", "2")  # 4 tokens per image: thousands of samples in a few forward passes
    model = random_model(args)
    N, T = 2000, 0.7
    tokens = common.sample(model, N, temperature=T, seed=0)
    assert tokens.shape == (N, 4) and tokens.dtype == torch.long and 0 <= tokens.min() and tokens.max() < K
    torch.manual_seed(0)
    again = [common.sample(model, 50, temperature=T, seed=s) for s in (0, 0, 1)]
    assert torch.equal(again[0], again[1]) and not torch.equal(again[0], again[2])  # its own seeded generator
    assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(0)).item()  # global RNG kept
    with torch.no_grad():
        logits0 = model(torch.zeros(1, 4, dtype=torch.long))[0, 0]
    for temp, expect_match in ((T, True), (1.0, False)):
        p = torch.softmax(logits0 / temp, dim=0)
        top = p.topk(3).indices
        freq = torch.stack([(tokens[:, 0] == t).float().mean() for t in top])
        sigma = (p[top] * (1 - p[top]) / N).sqrt()
        assert ((freq - p[top]).abs() < 4 * sigma).all() == expect_match, (temp, freq, p[top])
    # the second token follows p(t_1 | t_0) of the model: rows whose first token is the most likely one
    first = int(torch.softmax(logits0 / T, 0).argmax())
    rows = tokens[tokens[:, 0] == first]
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([[first, 0, 0, 0]]))[0, 1] / T, dim=0)
    t1 = int(p1.argmax())
    assert abs((rows[:, 1] == t1).float().mean() - p1[t1]) < 4 * math.sqrt(p1[t1] * (1 - p1[t1]) / len(rows))
    # PNG grid of the decoded samples (8 per row, 1 px padding)
    path = tmp_path / "samples.png"
    common.save_samples(model, tokens[:16], str(path))
    grid = read_png(path)
    f = 32  # 2 px images are upscaled 32x (nearest) to the 64 px a person can see, 2 px padding
    assert grid.shape == (3, 2 + 2 * (2 * f + 2), 2 + 8 * (2 * f + 2))
    first = grid[:, 2 : 2 + 2 * f : f, 2 : 2 + 2 * f : f]  # one pixel per upscaled block
    torch.testing.assert_close(first, model.quantizer.decode(tokens[:1], 2, 2)[0], rtol=0, atol=0)


# ---------------------------------------------------------------- eval_probe hooks
def test_features_of_every_block_are_pooled_layer_normed_block_outputs():
    args = tiny_args()
    model = random_model(args).train()
    images = torch.rand(3, 3, 8, 8)
    tokens = common.quantize(model, images)
    assert igpt.num_feature_layers(model) == 2
    feats = []
    with torch.no_grad():
        h = model.embed(tokens, shift=True)
        for layer in range(igpt.num_feature_layers(model)):
            h = model.blocks[layer](h, is_causal=True)
            f = igpt.features(model, images, layer=layer)
            assert f.shape == (3, 64) and f.dtype == torch.float32
            torch.testing.assert_close(f, F.layer_norm(h, (64,), eps=1e-6).mean(1), rtol=1e-5, atol=1e-5)
            feats.append(f)
    assert model.training  # mode restored
    assert not torch.allclose(feats[0], feats[1])
    torch.testing.assert_close(igpt.features(model, images), feats[0])  # default: the middle ("half") block
    with pytest.raises(ValueError, match="out of range"):
        igpt.features(model, images, layer=2)


def test_log_likelihood_is_minus_the_summed_nll_and_differentiable_in_the_token_embeddings():
    args = tiny_args()
    model = random_model(args)
    for p in model.parameters():
        p.requires_grad_(False)  # frozen, as eval_probe uses it
    images = torch.rand(3, 3, 8, 8)
    log_px, emb = igpt.log_likelihood(model, images)
    tokens = common.quantize(model, images)
    nll, _ = common.token_nll(model, tokens, args)
    assert log_px.shape == (3,)
    torch.testing.assert_close(log_px, -nll.sum(1), rtol=1e-5, atol=1e-4)  # nats per image, summed over 64 tokens
    assert emb.shape == (3, 64, 64) and emb.is_leaf and emb.requires_grad
    torch.testing.assert_close(emb, model.embed.tok_embed(tokens))
    (grad,) = torch.autograd.grad(log_px[1], emb)
    assert grad.shape == emb.shape
    assert grad[[0, 2]].abs().max() == 0  # images do not interact
    assert grad[1, :-1].abs().amax(-1).min() > 0 and grad[1, -1].abs().max() == 0  # the last token is never an input
    uniform = igpt.log_likelihood(igpt.build_model(args), images)[0]
    torch.testing.assert_close(uniform, torch.full((3,), -64 * math.log(K)))


# ---------------------------------------------------------------- command line
def test_presets_and_bad_input_give_one_line_errors(tmp_path, capsys):
    d = common.parse_args(igpt.Args, [], igpt.PRESETS)  # GCRL Table 3, CIFAR, iGPT 10M
    assert (d.batch_size, d.epochs, d.warmup_epochs, d.weight_decay, d.clip_grad) == (512, 200, 5, 1e-4, 1.0)
    assert d.dropout == 0.1 and d.temperature == 1.0 and d.bert_mask_prob == 0.15
    assert common.scaled_lr(d.base_lr, d.batch_size) == pytest.approx(1.6e-3)
    assert (d.arch, d.attention, d.num_colors, d.image_size, d.augment) == ("igpt_10m", "axial", 512, 32, "weak")
    assert igpt.IGPT_ARCHS["igpt_10m"] == (256, 12, 8) and igpt.IGPT_ARCHS["igpt_76m"] == (512, 24, 8)
    i = common.parse_args(igpt.Args, ["--preset", "imagenet32_76m"], igpt.PRESETS)
    assert (i.arch, i.batch_size) == ("igpt_76m", 384) and common.scaled_lr(i.base_lr, 384) == pytest.approx(4e-4)
    bad_palette = tmp_path / "bad.npy"
    np.save(bad_palette, np.zeros((16, 4), np.float32))
    run = ["--output-dir", str(tmp_path), "--device", "cpu", "--synthetic-size", "64"]
    cases = [
        (["--palette", str(tmp_path / "missing.npy")], "no such file"),
        (["--palette", str(bad_palette)], "not a palette"),
        (["--temperature", "0"], "argument --temperature: 0 is outside (0, inf)"),
        (["--sample-only"], "--sample-only needs --ckpt"),
        (["--sample-only", "--ckpt", str(tmp_path / "none.pt")], "does not exist"),
        (["--synthetic-size", "16"], "smaller than one global batch"),
        (["--image-size", "4"], "size >= 8"),
        (["--dataset", "cifar10", "--data-root", str(tmp_path)], "not found"),
        (["--resume", str(tmp_path / "none.pt")], "no such checkpoint"),
        (["--eval-every", "0"], "argument --eval-every: 0 is outside [1, inf)"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            igpt.main(TINY + run + argv)
        text = str(e.value)
        assert text.startswith("igpt.py: error:") and message in text and "\n" not in text, (argv, text)
    with pytest.raises(SystemExit):
        igpt.main(["--attention", "sparse"])
    assert "invalid choice: 'sparse'" in capsys.readouterr().err


# ---------------------------------------------------------------- palette: a given .npy file
def test_palette_file_sets_the_vocabulary_and_is_used_for_tokens(tmp_path):
    path = tmp_path / "kmeans_centers.npy"
    np.save(path, common.grid_palette(27))  # a 3 x 3 x 3 RGB grid in [-1, 1], iGPT's file format
    flags = ["--palette", str(path), "--steps", "1", "--batch-size", "16", "--synthetic-size", "64", "--eval-images"]
    final = igpt.main(TINY + flags + ["16", "--num-samples", "2", "--output-dir", str(tmp_path), "--run-name", "pal"])
    assert final["loss/total"] == pytest.approx(math.log(27), abs=1e-6)  # the zero head: uniform over 27 colors
    ckpt = common.load_checkpoint(str(tmp_path / "pal" / "checkpoint.pt"), "igpt")
    assert ckpt["args"]["num_colors"] == 27 and ckpt["model"]["head.weight"].shape == (27, 64)
    assert np.array_equal(ckpt["model"]["quantizer.centers"].numpy(), np.load(path))
    assert np.array_equal(np.load(tmp_path / "pal" / "palette.npy"), np.load(path))  # cached beside the run
    model = igpt.build_model(igpt.Args(**ckpt["args"]))
    model.load_state_dict(ckpt["model"])
    pixel = torch.tensor([10, 130, 250], dtype=torch.uint8).view(1, 3, 1, 1)  # nearest levels 0, 127.5, 255
    assert common.quantize(model, pixel).item() == 0 * 9 + 1 * 3 + 2  # raster index of (R, G, B) levels (0, 1, 2)


# ---------------------------------------------------------------- end to end
def test_end_to_end_run_folder_checkpoint_and_sample_only(tmp_path):
    flags = ["--steps", "3", "--log-every", "1", "--synthetic-size", "256", "--num-samples", "4", "--device", "cpu"]
    proc = run_script(["igpt.py", *TINY, *flags, "--run-name", "e2e"], cwd=tmp_path)
    assert "k-means on 4096 training pixels" in proc.stdout and "eval/test_bits_per_token" in proc.stdout
    run = tmp_path / "runs" / "e2e"
    args = json.load(open(run / "args.json"))
    assert (args["num_colors"], args["attention"], args["objective"]) == (512, "axial", "ar")
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]
    for key in ("loss/ar", "lr", "epoch", "perf/images_per_s"):
        assert key in losses[-1]
    assert losses[0]["loss/total"] == pytest.approx(math.log(K), abs=1e-5)  # step 1 scores the untrained model
    evals = [r for r in rows if "eval/test_bits_per_token" in r]
    assert [r["step"] for r in evals] == [0, 3] and all("eval/train_bits_per_token" in r for r in evals)
    assert evals[0]["eval/test_bits_per_token"] == pytest.approx(9.0, abs=1e-5)  # at init: uniform, log2(512)
    assert 5 < evals[1]["eval/test_bits_per_token"] < 9.0
    for png in ("quantized.png", "samples_step0000003.png"):
        assert (run / png).exists()
    palette = np.load(run / "palette.npy")
    assert palette.shape == (K, 3) and np.abs(palette).max() <= 1
    ckpt = common.load_checkpoint(str(run / "checkpoint.pt"), "igpt")
    assert ckpt["step"] == 3
    model = igpt.build_model(igpt.Args(**ckpt["args"]))  # eval_probe.py's path: rebuilt from the args alone
    model.load_state_dict(ckpt["model"])
    assert np.array_equal(model.quantizer.centers.numpy(), palette)
    # the fit is reproducible: k-means on the same seeded 4096 training pixels
    a = igpt.Args(**ckpt["args"])
    train = common.build_dataset("synthetic", image_size=8, synthetic_size=256).images
    torch.testing.assert_close(common.fit_palette(train, a, "cpu").numpy(), palette)
    # --sample-only from the checkpoint
    out = igpt.main(["--sample-only", "--ckpt", str(run / "checkpoint.pt"), "--num-samples", "4", "--temperature",
                     "0.98", "--device", "cpu"])  # fmt: skip
    assert out["samples_path"].endswith("samples_t0.98_s0.png") and (run / "samples_t0.98_s0.png").exists()
    assert out["tokens"].shape == (4, 64) and 0 <= out["tokens"].min() and out["tokens"].max() < K


def test_resume_auto_continues_from_the_checkpoint_step_bitwise(tmp_path, capsys):
    base = TINY + ["--synthetic-size", "128", "--batch-size", "16", "--output-dir", str(tmp_path), "--log-every", "1"]
    base += ["--eval-images", "16", "--num-samples", "1", "--device", "cpu"]
    igpt.main(base + ["--run-name", "straight", "--steps", "3"])
    igpt.main(base + ["--run-name", "resumed", "--steps", "1"])
    capsys.readouterr()
    final = igpt.main(base + ["--run-name", "resumed", "--steps", "3"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 1" in out and "(the checkpoint resumed)" in out  # its palette
    assert final["step"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss/total" in r] == [1, 2, 3]
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    # resuming another run's checkpoint with another seed: the palette (and its cache) is the checkpoint's, not a
    # fresh k-means fit, so the tokens the model sees and the cached palette.npy agree with the trained weights
    igpt.main(
        base
        + [
            "--run-name",
            "moved",
            "--steps",
            "4",
            "--seed",
            "7",
            "--resume",
            str(tmp_path / "straight" / "checkpoint.pt"),
        ]
    )
    moved = common.ColorQuantizer.load(str(tmp_path / "moved" / "palette.npy")).centers
    assert torch.equal(moved, a["model"]["quantizer.centers"])
    cache = tmp_path / "straight" / "palette.npy"
    common.ColorQuantizer(moved[:16]).save(str(cache))  # a cached palette of the wrong size is refused
    with pytest.raises(SystemExit, match="holds 16 colors but --num-colors is 512"):
        igpt.main(base + ["--run-name", "straight", "--steps", "4", "--resume", ""])


def _igpt_ddp_worker(rank, world, tokens, attention):
    """One DDP backward of the AR loss on this rank's half of fixed tokens (dropout off: no random draws)."""
    model = random_model(tiny_args("--attention", attention, "--dropout", "0")).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    n = len(tokens) // world
    loss = igpt.igpt_loss(ddp, torch.tensor(tokens)[rank * n : (rank + 1) * n], tiny_args())["total"]
    loss.backward()
    return [loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).tolist()]


@pytest.mark.parametrize("attention", ["dense", "axial"])
def test_ddp_gradients_on_two_processes_equal_one_process(tmp_path, attention):
    """Under DDP (2 gloo processes, half the images each) the AR loss's gradients equal one process on all images:
    the loss is a mean over B x L tokens with L fixed, and DDP averages over ranks."""
    tokens = random_tokens(6, 64, seed=4)
    out = run_distributed(_igpt_ddp_worker, 2, tmp_path, tokens.tolist(), attention)
    model = random_model(tiny_args("--attention", attention, "--dropout", "0")).train()
    loss = igpt.igpt_loss(model, tokens, tiny_args())["total"]
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(loss.item(), rel=1e-5)
    for rank in range(2):
        torch.testing.assert_close(torch.tensor(out[rank][1]), grad, rtol=1e-4, atol=1e-6)
    assert grad.abs().max() > 0


def test_torchrun_two_processes(tmp_path):
    flags = ["--steps", "2", "--batch-size", "8", "--synthetic-size", "64", "--eval-images", "16", "--num-samples", "2"]
    proc = run_script(["igpt.py", *TINY, *flags, "--run-name", "ddp", "--device", "cpu"], cwd=tmp_path, torchrun=2)
    assert "2 x 4 images/step" in proc.stdout and "eval/test_bits_per_token" in proc.stdout
    ckpt = common.load_checkpoint(str(tmp_path / "runs" / "ddp" / "checkpoint.pt"), "igpt")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
    palette = np.load(tmp_path / "runs" / "ddp" / "palette.npy")  # fitted on rank 0, broadcast to rank 1
    assert np.array_equal(ckpt["model"]["quantizer.centers"].numpy(), palette)
