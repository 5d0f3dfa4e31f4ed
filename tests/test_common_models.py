"""common.py model pieces: positions, ViT names, masking, patchify, attention causality, quantizer, heads."""

import math

import numpy as np
import pytest
import torch

import common


def test_sincos_2d_matches_formula():
    D, g = 16, 5
    pe = common.sincos_2d(D, g, cls_token=True)
    assert pe.shape == (g * g + 1, D) and torch.all(pe[0] == 0)
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    for k in range(g * g):
        i, j = divmod(k, g)  # row-major token k = i*g + j
        expect = np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)])
        np.testing.assert_allclose(pe[1 + k].numpy(), expect, atol=1e-6)
    # first half depends on the column only, second half on the row only
    assert torch.equal(pe[1 + 0 * g + 3, : D // 2], pe[1 + 4 * g + 3, : D // 2])
    assert torch.equal(pe[1 + 2 * g + 0, D // 2 :], pe[1 + 2 * g + 4, D // 2 :])


TIMM_VIT_KEYS_DEPTH1 = [  # timm VisionTransformer(num_classes=0, depth=1) parameter names and shapes (D=128, p=4, 32px)
    ("cls_token", (1, 1, 128)),
    ("pos_embed", (1, 65, 128)),
    ("patch_embed.proj.weight", (128, 3, 4, 4)),
    ("patch_embed.proj.bias", (128,)),
    ("blocks.0.norm1.weight", (128,)),
    ("blocks.0.norm1.bias", (128,)),
    ("blocks.0.attn.qkv.weight", (384, 128)),
    ("blocks.0.attn.qkv.bias", (384,)),
    ("blocks.0.attn.proj.weight", (128, 128)),
    ("blocks.0.attn.proj.bias", (128,)),
    ("blocks.0.norm2.weight", (128,)),
    ("blocks.0.norm2.bias", (128,)),
    ("blocks.0.mlp.fc1.weight", (512, 128)),
    ("blocks.0.mlp.fc1.bias", (512,)),
    ("blocks.0.mlp.fc2.weight", (128, 512)),
    ("blocks.0.mlp.fc2.bias", (128,)),
    ("norm.weight", (128,)),
    ("norm.bias", (128,)),
]


def test_vit_state_dict_has_timm_names():
    m = common.VisionTransformer(32, 4, 3, 128, 1, 4)
    got = [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    assert got == TIMM_VIT_KEYS_DEPTH1
    assert not m.pos_embed.requires_grad


def test_vit_block_tokens_are_the_unmasked_forward_up_to_a_block():
    torch.manual_seed(0)
    m = common.VisionTransformer(16, 4, 3, 32, 3, 4).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(m.norm(m.block_tokens(x, 2)), m(x))  # last block + final norm = forward
    early = m.block_tokens(x, 0)
    for p in m.blocks[1].parameters():  # later blocks do not touch an earlier block's output
        p.data.add_(1.0)
    torch.testing.assert_close(m.block_tokens(x, 0), early)
    assert not torch.allclose(m.block_tokens(x, 1), early)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        m.block_tokens(x, 3)


def test_vit_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        common.VisionTransformer(30, 4, 3, 128, 1, 4)
    with pytest.raises(ValueError, match="unknown ViT arch 'vit_xl'"):
        common.vit_arch("vit_xl")
    assert common.vit_arch("vit_l") == (1024, 24, 16)


@pytest.mark.parametrize("L,ratio", [(64, 0.75), (196, 0.75), (49, 0.5), (10, 0.33), (16, 0.0)])
def test_random_masking_counts_and_restore(L, ratio):
    torch.manual_seed(0)
    N, D = 3, 4
    x = torch.arange(L, dtype=torch.float32).view(1, L, 1).expand(N, L, D).contiguous()
    kept, mask, ids_restore = common.random_masking(x, ratio)
    keep = int(L * (1 - ratio))
    assert kept.shape == (N, keep, D)
    assert torch.all(mask.sum(1) == L - keep)
    # mask semantics: 1 = removed; kept tokens are exactly the positions where mask == 0
    for n in range(N):
        assert sorted(kept[n, :, 0].long().tolist()) == torch.nonzero(mask[n] == 0).flatten().tolist()
    # un-shuffling [kept, fillers] with ids_restore puts every kept token back at its own index
    filler = torch.full((N, L - keep, D), -1.0)
    back = torch.gather(torch.cat([kept, filler], 1), 1, ids_restore[..., None].expand(-1, -1, D))
    assert torch.equal(back[..., 0][mask == 0], x[..., 0][mask == 0])
    assert torch.all(back[..., 0][mask == 1] == -1)


def test_patchify_layout_and_round_trip():
    imgs = torch.randn(2, 3, 8, 12)
    p = 4
    x = common.patchify(imgs, p)
    assert x.shape == (2, 6, 48)
    # patch (1, 2) is index 1*3 + 2; inside it, element (row a, col b, channel c) is at (a*p + b)*3 + c
    a, b, c = 3, 1, 2
    assert x[1, 5, (a * p + b) * 3 + c] == imgs[1, c, 4 + a, 8 + b]
    sq = torch.randn(2, 3, 16, 16)
    assert torch.equal(common.unpatchify(common.patchify(sq, 4), 4), sq)


def _raster_causality(fn, L, D, k, batch=2):
    """Perturb input position k: outputs at positions < k must not move, some position >= k must."""
    torch.manual_seed(1)
    x = torch.randn(batch, L, D)
    y = x.clone()
    y[:, k] += torch.randn(D)
    a, b = fn(x), fn(y)
    diff = (a - b).abs().amax(dim=(0, 2))
    return diff


@pytest.mark.parametrize("mode", ["axial", "dense"])
def test_attention_is_causal_in_raster_order(mode):
    H, W, D = 4, 5, 16
    att = common.AxialAttention(D, 4, H, W, mode=mode).eval()
    with torch.no_grad():
        for k in [0, 3, 7, 12, 19]:
            diff = _raster_causality(att, H * W, D, k)
            assert k == 0 or diff[:k].max() == 0, f"{mode}: output before {k} changed"
            assert diff[k:].max() > 1e-4, f"{mode}: nothing at or after {k} changed"
        # a change in the top row reaches the rows below through the shifted column pass
        diff = _raster_causality(att, H * W, D, 2)
        assert diff[W:].max() > 1e-4


def test_axial_attention_follows_algorithm_1():
    """Recompute GCRL Appendix Algorithm 1 with an explicit attention loop and compare."""
    torch.manual_seed(0)
    H, W, D, heads = 3, 4, 8, 2
    att = common.AxialAttention(D, heads, H, W).eval()
    x = torch.randn(1, H * W, D)

    def msa(seq, causal):  # seq (n, D): explicit softmax attention with the module's weights
        q, k, v = att.qkv(seq).view(len(seq), 3, heads, D // heads).permute(1, 2, 0, 3)
        s = q @ k.transpose(-1, -2) / math.sqrt(D // heads)
        if causal:
            s = s.masked_fill(torch.triu(torch.ones(len(seq), len(seq), dtype=torch.bool), 1), float("-inf"))
        return att.proj((s.softmax(-1) @ v).transpose(0, 1).reshape(len(seq), D))

    h = x.view(H, W, D)
    ha = torch.stack([msa(h[r], False) for r in range(H)])
    ha = torch.stack([msa(ha[:, c], True) for c in range(W)], dim=1)
    ha = torch.cat([torch.zeros(1, W, D), ha[:-1]])
    out = torch.stack([msa(h[r] + ha[r], True) for r in range(H)]).view(1, H * W, D)
    with torch.no_grad():
        torch.testing.assert_close(att(x), out, atol=1e-5, rtol=1e-5)


def test_pixel_embedding_shift_and_positions():
    emb = common.PixelEmbedding(10, 8, 2, 3)
    tokens = torch.randint(10, (2, 6))
    h = emb(tokens)
    pos = emb.positions()
    torch.testing.assert_close(pos[1 * 3 + 2], emb.pos_row[1] + emb.pos_col[2])
    torch.testing.assert_close(h[:, 0], (emb.sos + pos[0]).expand(2, -1))  # position 0 sees only SOS
    torch.testing.assert_close(h[:, 4], emb.tok_embed(tokens[:, 3]) + pos[4])
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[:, 2] = False
    hb = emb(tokens, shift=False, keep=keep)
    torch.testing.assert_close(hb[:, 2], pos[2].expand(2, -1))  # masked embedding zeroed (iGPT BERT)


def test_masked_decoder_places_tokens_and_bias_reaches_every_token():
    torch.manual_seed(0)
    enc = common.VisionTransformer(16, 4, 3, 32, 1, 4)
    dec = common.MaskedDecoder(16, 32, 48, dim=32, depth=1, num_heads=4).eval()
    x, mask, ids = common.random_masking(enc.embed_patches(torch.randn(2, 3, 16, 16)), 0.5)
    tokens = enc.norm(enc.with_cls(x))  # cls + the 8 visible patch tokens
    out = dec(tokens, ids)
    assert out.shape == (2, 16, 48)
    seen = []
    dec.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    bias = torch.randn(2, 32)
    with torch.no_grad():
        dec(tokens, ids)
        dec(tokens, ids, token_bias=bias)
    # at the input of block 0 (before attention would spread any bias everywhere): every token, the 8 mask tokens
    # and the cls slot included, carries exactly the bias
    assert seen[0].shape == (2, 1 + 16, 32)
    torch.testing.assert_close(seen[1] - seen[0], bias[:, None, :].expand(2, 17, 32), rtol=0, atol=1e-6)


def test_quantizer_round_trip_and_format(tmp_path):
    centers = torch.rand(512, 3) * 2 - 1
    q = common.ColorQuantizer(centers)
    img = q.decode(torch.randint(512, (2, 6)), 2, 3)  # images made of palette colors
    assert img.dtype == torch.uint8 and img.shape == (2, 3, 2, 3)
    tokens = q.encode(img)
    assert tokens.shape == (2, 6) and tokens.dtype == torch.int64
    assert torch.equal(q.decode(tokens, 2, 3), img)  # decode(encode(decoded)) is the identity
    # decode is rint(127.5 * (c + 1))
    assert q.decode(torch.tensor([[7]]), 1, 1).flatten().tolist() == [
        round(127.5 * (v + 1)) for v in centers[7].tolist()
    ]
    # raster order: token index i*W + j is pixel (i, j)
    x = torch.zeros(1, 3, 2, 3, dtype=torch.uint8)
    x[0, :, 1, 2] = 255
    t = common.ColorQuantizer(torch.tensor([[-1.0, -1, -1], [1, 1, 1]])).encode(x)
    assert t.tolist() == [[0, 0, 0, 0, 0, 1]]
    path = tmp_path / "kmeans_centers.npy"
    q.save(str(path))
    arr = np.load(path)
    assert arr.shape == (512, 3) and arr.dtype == np.float32
    assert torch.equal(common.ColorQuantizer.load(str(path)).centers, q.centers)
    np.save(tmp_path / "bad.npy", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="not a palette"):
        common.ColorQuantizer.load(str(tmp_path / "bad.npy"))


def test_kmeans_lowers_distortion_versus_random_centers():
    g = torch.Generator().manual_seed(0)
    # pixels from 40 color blobs
    means = torch.randint(0, 256, (40, 3), generator=g).float()
    px = (means[torch.randint(40, (8000,), generator=g)] + 6 * torch.randn(8000, 3, generator=g)).clamp(0, 255)
    px = px.round().to(torch.uint8)
    rand = common.ColorQuantizer(common.ColorQuantizer.to_unit(px[torch.randperm(8000, generator=g)[:32]]))
    fitted = common.ColorQuantizer.fit(px, num_colors=32, iters=15, seed=0)
    fitted_random_init = common.ColorQuantizer.fit(px, num_colors=32, iters=15, seed=0, init="random")
    assert fitted.distortion(px) < 0.5 * rand.distortion(px)
    assert fitted_random_init.distortion(px) < rand.distortion(px)
    # fewer distinct colors than centers must not break the fit
    few = torch.tensor([[0, 0, 0], [255, 255, 255]], dtype=torch.uint8).repeat(50, 1)
    assert common.ColorQuantizer.fit(few, num_colors=8, iters=3).distortion(few) == 0


def test_projection_heads_shapes_and_no_shift():
    bn = common.ProjectionHead(32, 64, 16, num_layers=3, kind="bn")
    ln = common.ProjectionHead(32, 64, 16, num_layers=2, kind="ln")
    x = torch.randn(8, 32)
    assert bn(x).shape == (8, 16) and ln(x).shape == (8, 16)
    assert not bn.net[-1].bias.requires_grad and torch.all(bn.net[-1].bias == 0)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in bn.modules()) == 3
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in ln.modules()) == 1


def test_quantizer_nearest_is_the_exact_nearest_center_and_restores_tf32_flag():
    g = torch.Generator().manual_seed(0)
    q = common.ColorQuantizer(torch.rand(512, 3, generator=g) * 2 - 1)
    pixels = torch.rand(50000, 3, generator=g) * 2 - 1
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as setup_distributed leaves it on GPUs
    try:
        got = q.nearest(pixels, chunk=7000)
        assert torch.backends.cuda.matmul.allow_tf32  # the caller's setting is restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert torch.equal(got, torch.cdist(pixels.double(), q.centers.double()).argmin(1))
