"""The frozen teacher against open_clip itself, on tiny random models (CPU, offline)."""
import math
import time

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import resize_pos_embed

from util import clip_loading as C
import model as M
from data import UserError


@pytest.fixture(scope="module")
def vit(tiny_configs):
    torch.manual_seed(0)
    return C.load_clip(pretrained="none", config=tiny_configs["vit"])[0]


@pytest.fixture(scope="module")
def rn(tiny_configs):
    torch.manual_seed(0)
    return C.load_clip(pretrained="none", config=tiny_configs["rn"])[0]


def identity_last_attention(visual):
    """Make open_clip's own last block attend each token to itself only (attention = identity)."""
    last = visual.transformer.resblocks[-1]

    def attention(q_x, k_x=None, v_x=None, attn_mask=None):
        n = q_x.shape[1]
        eye = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
        return last.attn(q_x, q_x, q_x, need_weights=False, attn_mask=eye)[0]
    last.attention = attention


def openclip_tokens(visual, x):
    """Patch tokens of open_clip's forward, projected to the joint space: (B, D, h, w)."""
    visual.output_tokens = True
    try:
        _, tokens = visual(x)  # tokens: (B, h*w, width) after ln_post
    finally:
        visual.output_tokens = False
    B, n, _ = tokens.shape
    h, w = visual.grid_size
    return (tokens @ visual.proj).transpose(1, 2).reshape(B, -1, h, w)


def test_vit_dense_equals_openclip_with_identity_attention(vit, tiny_configs):
    x = torch.randn(2, 3, 32, 32)
    ours, _ = M.vit_dense(vit.visual, x)
    ref_model = C.load_clip(pretrained="none", config=tiny_configs["vit"])[0]
    ref_model.load_state_dict(vit.state_dict())
    identity_last_attention(ref_model.visual)
    with torch.no_grad():
        ref = openclip_tokens(ref_model.visual, x)
    assert ours.shape == (2, 32, 4, 4)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_vit_dense_non_square_equals_openclip_resized(vit):
    """At 48 x 64 px our interpolated positional embedding must equal open_clip's own resizing."""
    x = torch.randn(1, 3, 48, 64)
    ours, _ = M.vit_dense(vit.visual, x)
    big = open_clip.create_model("tiny-vit", force_image_size=(48, 64), pretrained_text=False)
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    resize_pos_embed(sd, big)
    big.load_state_dict(sd)
    big.eval()
    identity_last_attention(big.visual)
    with torch.no_grad():
        ref = openclip_tokens(big.visual, x)
    assert ours.shape == (1, 32, 6, 8)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_resnet_dense_mean_equals_uniform_attention_pool(rn, tiny_configs):
    """With q, k zeroed the attention pool averages its values uniformly; with no positional
    embedding that is c_proj(v_proj(mean x)), which is the mean of the MaskCLIP map."""
    ref = C.load_clip(pretrained="none", config=tiny_configs["rn"])[0]
    ref.load_state_dict(rn.state_dict())
    pool = ref.visual.attnpool
    for p in (pool.q_proj.weight, pool.q_proj.bias, pool.k_proj.weight, pool.k_proj.bias,
              pool.positional_embedding):
        p.data.zero_()
    x = torch.randn(2, 3, 64, 64)
    feats, keys = M.resnet_dense(rn.visual, x, with_keys=True)
    with torch.no_grad():
        pooled = ref.visual(x)  # (B, D)
    assert feats.shape == (2, 32, 2, 2) and keys.shape[2:] == (2, 2)
    torch.testing.assert_close(feats.mean(dim=(2, 3)), pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["vit", "rn"])
def test_teacher_dense_is_unit_norm_any_size(which, tiny_configs):
    clip, info = C.load_clip(pretrained="none", config=tiny_configs[which])
    teacher = M.ClipTeacher(clip, info)
    s = teacher.stride
    feats, keys = teacher.dense(torch.rand(1, 3, 3 * s, 5 * s), with_keys=True)
    assert feats.shape == (1, 32, 3, 5) and keys.shape[2:] == (3, 5)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(1, 3, 5))
    assert not any(p.requires_grad for p in clip.parameters()) and not clip.training


def test_teacher_follows_its_clip_device(tiny_configs):
    """MaskCLIP wrapped around a CLIP that was already moved keeps its normalisation on the same
    device (the meta device stands in for CUDA here: no memory, no GPU needed)."""
    clip, info = C.load_clip(pretrained="none", config=tiny_configs["vit"])
    teacher = M.ClipTeacher(clip.to("meta"), info)
    assert teacher.mean.device.type == "meta" and teacher.device.type == "meta"


def test_encode_text_fast_equals_encode_text(vit):
    tok = open_clip.get_tokenizer("tiny-vit")
    prompts = ["a", "a photo of a dog.", "there is the potted plant in the scene.", "x " * 90]
    t = tok(prompts)
    with torch.no_grad():
        ref = vit.encode_text(t)
    torch.testing.assert_close(M.encode_text_fast(vit, t, batch_size=2), ref, atol=1e-5, rtol=1e-5)


def test_templates_file():
    t = M.read_templates()
    assert len(t) == 85 and len(set(t)) == 85 and all(s.count("{}") == 1 for s in t)
    assert "a photo of a {}." in t and "this is one {} in the scene." in t


def test_text_prototypes_reference_synonyms_and_cache(vit, tmp_path, monkeypatch):
    teacher = M.ClipTeacher(vit, {"name": "tiny-vit", "pretrained": "none", "weights": None,
                               "quick_gelu": False})
    templates = ["a photo of a {}.", "this is the {} in the scene.", "{}"]
    protos, owner = teacher.text_prototypes(["sky", "tv monitor;television"], templates,
                                            cache_dir=tmp_path)
    assert protos.shape == (3, 32) and owner.tolist() == [0, 1, 1]
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(3))
    with torch.no_grad():  # the obvious way: one template at a time with open_clip's encode_text
        e = F.normalize(
            vit.encode_text(teacher.tokenizer([t.format("television") for t in templates])), dim=-1
        )
    torch.testing.assert_close(protos[2], F.normalize(e.mean(0), dim=0), atol=1e-5, rtol=1e-5)
    # a fresh teacher reads the disk cache and never runs the text tower
    monkeypatch.setattr(M, "encode_text_fast", lambda *a, **k: pytest.fail("cache missed"))
    fresh = M.ClipTeacher(vit, dict(teacher.info))
    p2, o2 = fresh.text_prototypes(["sky", "tv monitor;television"], templates, cache_dir=tmp_path)
    assert torch.equal(p2, protos) and torch.equal(o2, owner)
    assert len(list(tmp_path.glob("text_*.pt"))) == 1


def test_unreadable_text_cache_is_computed_again(vit, tmp_path, capsys):
    teacher = M.ClipTeacher(vit, {"name": "tiny-vit", "pretrained": "none", "weights": None,
                               "quick_gelu": False})
    protos, _ = teacher.text_prototypes(["sky", "grass"], ["a {}."], cache_dir=tmp_path)
    file = next(tmp_path.glob("text_*.pt"))
    file.write_bytes(file.read_bytes()[:40])  # a write cut short
    again, _ = M.ClipTeacher(vit, dict(teacher.info)).text_prototypes(
        ["sky", "grass"], ["a {}."], cache_dir=tmp_path
    )
    assert "unreadable" in capsys.readouterr().out and torch.equal(again, protos)
    assert torch.equal(torch.load(file, weights_only=True)[0], protos)  # and written again whole


def test_clip_flags_default_to_the_toy_clip_on_the_toy_dataset():
    import argparse
    p = argparse.ArgumentParser()
    C.add_clip_args(p)
    p.add_argument("--dataset", default="voc")
    p.add_argument("--data-root", default=None)
    a = C.resolve_clip_args(p.parse_args(["--dataset", "toy", "--data-root", "/w"]))
    assert (a.clip, a.clip_config, a.clip_pretrained) == (
        "toyclip",
        "/w/toyclip.json",
        "/w/toyclip.pt",
    )
    # a choice made: kept
    b = C.resolve_clip_args(p.parse_args(["--dataset", "toy", "--clip", "RN50"]))
    assert (b.clip, b.clip_pretrained, b.clip_config) == ("RN50", "openai", None)
    c = C.resolve_clip_args(p.parse_args([]))
    assert (c.clip, c.clip_pretrained, c.clip_config) == ("ViT-B-16", "openai", None)


def test_class_scores_takes_best_synonym():
    feats = F.normalize(torch.tensor([1.0, 0.0]), dim=0).view(1, 2, 1, 1)
    protos = torch.tensor([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    s = M.class_scores(feats, protos, torch.tensor([0, 1, 1]), 2)
    assert s.flatten().tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("names", [[], ["sky", "Sky"], ["sky", ";"]])
def test_bad_class_lists(names):
    with pytest.raises(UserError):
        M.parse_class_names(names)


def test_prompt_denoising_drops_unconfident_class():
    scores = torch.zeros(1, 3, 2, 2)
    scores[0, 0] = 0.3  # class 0 wins everywhere, class 2 is close behind, class 1 never confident
    scores[0, 2, 0, 0] = 0.31
    out = M.prompt_denoising(scores, thresh=0.5)
    assert (
        torch.isinf(out[0, 1]).all()
        and torch.isfinite(out[0, 0]).all()
        and torch.isfinite(out[0, 2]).all()
    )


def test_key_smoothing_matches_loop():
    torch.manual_seed(0)
    scores, keys = torch.randn(1, 3, 2, 3) * 0.05, torch.randn(1, 4, 2, 3)
    out = M.key_smoothing(scores, keys, thresh=1.0)
    prob = F.softmax(100 * scores, dim=1).view(3, 6)
    k = F.normalize(keys.view(4, 6), dim=0)
    for i in range(6):
        ref = sum(float(k[:, i] @ k[:, j]) * prob[:, j] for j in range(6))
        torch.testing.assert_close(out.view(3, 6)[:, i], ref, atol=1e-5, rtol=1e-5)


def reference_pamr(image, scores, iters, dilations):
    """PAMR pixel by pixel: explicit neighbour lists with clamped (replicated) borders."""
    _, C, H, W = image.shape
    at = lambda t, c, y, x: float(t[0, c, min(max(y, 0), H - 1), min(max(x, 0), W - 1)])
    offsets = [(dy, dx) for d in dilations for dy in (-d, 0, d) for dx in (-d, 0, d) if dy or dx]
    weights = {}
    for y in range(H):
        for x in range(W):
            logits = []
            for dy, dx in offsets:
                a = 0.0
                for c in range(C):
                    window = [at(image, c, y + dy2, x + dx2) for d in dilations
                              for dy2 in (-d, 0, d) for dx2 in (-d, 0, d)]
                    sigma = torch.tensor(window).std().item()  # unbiased, as torch.std
                    diff = abs(at(image, c, y, x) - at(image, c, y + dy, x + dx))
                    a += -diff / (1e-8 + 0.1 * sigma)
                logits.append(a / C)
            weights[y, x] = torch.tensor(logits).softmax(0).tolist()
    s = scores.clone()
    for _ in range(iters):
        new = torch.zeros_like(s)
        for k in range(s.shape[1]):
            for y in range(H):
                for x in range(W):
                    new[0, k, y, x] = sum(w * at(s, k, y + dy, x + dx)
                                          for w, (dy, dx) in zip(weights[y, x], offsets))
        s = new
    return s


@pytest.mark.parametrize("dilations", [(1,), (1, 3)])
def test_pamr_matches_a_pixel_loop(dilations):
    torch.manual_seed(0)
    image, scores = torch.rand(1, 3, 5, 7), torch.randn(1, 3, 5, 7)
    out = M.pamr(image, scores, iters=2, dilations=dilations, chunk=2)  # chunks of classes too
    torch.testing.assert_close(out, reference_pamr(image, scores, 2, dilations), atol=1e-5,
                               rtol=1e-5)
    # an affine change of each colour channel cancels; a removed (-inf) class stays lowest
    torch.testing.assert_close(M.pamr(3 * image + 0.5, scores, 2, dilations), out, atol=1e-4,
                               rtol=1e-4)
    gone = scores.clone()
    gone[:, 1] = float("-inf")
    refined = M.pamr(image, gone, iters=2, dilations=dilations)
    assert torch.isfinite(refined).all() and (refined.argmax(1) != 1).all()


def test_pamr_keeps_scores_inside_an_edge():
    """Two flat colour halves, noisy scores: the refinement averages within each half and not
    across the edge, so every pixel ends on its half's class; on an image without the edge the
    same averaging runs across it and gets pixels wrong."""
    torch.manual_seed(0)
    image = torch.zeros(1, 3, 8, 8)
    image[:, :, :, 4:] = 1.0
    truth = torch.zeros(8, 8, dtype=torch.long)
    truth[:, 4:] = 1
    scores = F.one_hot(truth, 2).permute(2, 0, 1)[None].float() + 0.8 * torch.randn(1, 2, 8, 8)
    wrong = lambda s: int((s[0].argmax(0) != truth).sum())
    assert wrong(scores) > 5
    assert wrong(M.pamr(image, scores, iters=20, dilations=(1, 2))) == 0
    assert wrong(M.pamr(torch.zeros_like(image), scores, iters=20, dilations=(1, 2))) > 0


# ---------------------------------------------------------------- loading, QuickGELU, offline
def is_quick(model):
    return type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def fake_hub_cache(root, repo, fname, state_dict):
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/<file>}."""
    d = root / ("models--" + repo.replace("/", "--"))
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text("0" * 40)
    (d / "snapshots" / ("0" * 40)).mkdir(parents=True)
    torch.save(state_dict, d / "snapshots" / ("0" * 40) / fname)


def test_openai_tag_gets_quickgelu_from_cache(vit, tmp_path, monkeypatch):
    """A tag whose weights were trained with QuickGELU builds QuickGELU even though the
    architecture's config says GELU; found in the hub cache with no network."""
    from open_clip import pretrained as P
    monkeypatch.setitem(
        P._PRETRAINED, "tiny-vit", {"openai": P._pcfg(hf_hub="test/tiny-vit/", quick_gelu=True)}
    )
    fake_hub_cache(tmp_path, "test/tiny-vit", "open_clip_pytorch_model.bin", vit.state_dict())
    model, info = C.load_clip("tiny-vit", "openai", cache_dir=str(tmp_path))
    assert info["quick_gelu"] and is_quick(model)
    torch.testing.assert_close(model.visual.proj, vit.visual.proj)
    off, _ = C.load_clip("tiny-vit", "openai", quick_gelu="off", cache_dir=str(tmp_path))
    assert not is_quick(off)


def test_offline_uncached_tag_fails_fast_with_advice(tmp_path):
    t = time.perf_counter()
    with pytest.raises(UserError) as e:
        C.load_clip("ViT-B-16", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - t < 10
    msg = str(e.value)
    assert (
        "\n" not in msg and "--clip-pretrained" in msg and str(tmp_path) in msg and "openai" in msg
    )


def test_local_fp16_and_torchscript_weights(vit, tiny_configs, tmp_path):
    half = tmp_path / "half.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in vit.state_dict().items()},
               half)
    m, info = C.load_clip(pretrained=str(half), config=tiny_configs["vit"])
    assert not info["quick_gelu"] and m.visual.proj.dtype == torch.float32
    torch.testing.assert_close(m.visual.proj, vit.visual.proj.half().float())
    # OpenAI ships TorchScript archives: QuickGELU is chosen for them
    jit = tmp_path / "openai.pt"
    traced = torch.jit.trace(vit, (torch.rand(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)),
                             strict=False)
    traced.save(str(jit))
    m, info = C.load_clip(pretrained=str(jit), config=tiny_configs["vit"])
    assert info["quick_gelu"] and is_quick(m)
    torch.testing.assert_close(m.visual.proj, vit.visual.proj)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(name="no-such-model", pretrained="none"), "unknown CLIP model"),
    (dict(name="tiny-vit", pretrained="/no/such/file.pt"), "no such file"),
    (dict(name="tiny-vit", pretrained="no-such-tag"), "tag"),
])
def test_loading_errors(tiny_configs, kwargs, needle):
    C.register_clip_config(tiny_configs["vit"])
    with pytest.raises(UserError, match=needle):
        C.load_clip(**kwargs)


def test_wrong_weights_file(rn, tiny_configs, tmp_path):
    f = tmp_path / "rn.pt"
    torch.save(rn.state_dict(), f)
    with pytest.raises(UserError, match="does not fit"):
        C.load_clip(pretrained=str(f), config=tiny_configs["vit"])
    f.write_text("not weights")
    with pytest.raises(UserError, match="cannot read"):
        C.load_clip(pretrained=str(f), config=tiny_configs["vit"])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_three_stage_trunk_is_the_whole_trunk_cut_after_layer3(name, tmp_path):
    """stages=3 loads the same weights file and returns what the whole trunk's layer3 returns."""
    torch.manual_seed(0)
    full, c4 = M.dilated_resnet(name, "none")
    torch.save(full.state_dict(), tmp_path / "w.pt")
    cut, c3 = M.dilated_resnet(name, str(tmp_path / "w.pt"), stages=3)
    full.eval(), cut.eval()
    seen = {}
    full.layer3.register_forward_hook(lambda m, i, o: seen.setdefault("layer3", o))
    x = torch.rand(2, 3, 64, 64)
    run = lambda t: t.layer4(t.layer3(t.layer2(t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(x))))))))
    with torch.no_grad():
        run(full)
        out = run(cut)
    assert out.shape[1] == c3 == c4 // 2 and out.shape[-1] == 8  # stride 8, half the channels
    assert torch.equal(out, seen["layer3"])


def test_pixel_embedder_cells_centred_on_their_blocks():
    """Every script paints f's cell i over pixels [8i, 8i+8). The centre of mass of a cell's input
    gradient (where the cell looks) must move from the trunk's own centre, pixel 8i, which
    checkpoints with shift=0 keep, by 4 pixels down and right, to the middle of its block."""
    torch.manual_seed(0)
    f = M.PixelEmbedder(8, "resnet18", "none", hidden=8, rates=(1, 1, 1, 1)).eval()
    old = M.PixelEmbedder(8, "resnet18", "none", hidden=8, rates=(1, 1, 1, 1), shift=0).eval()
    old.load_state_dict(f.state_dict())
    x = torch.rand(1, 3, 128, 128)
    at = torch.arange(128.0) + 0.5  # pixel centres
    centres = []
    for net in (f, old):
        xi = x.clone().requires_grad_(True)
        z = net(xi)
        g = sum(torch.autograd.grad((z[0, :, 8, 8] * torch.randn(8)).sum(), xi,
                                    retain_graph=True)[0][0].abs().sum(0)
                for _ in range(8))  # (128, 128)
        w = g / g.sum()
        centres.append(torch.stack([(w.sum(1) * at).sum(), (w.sum(0) * at).sum()]))  # (y, x)
    new, before = centres
    assert ((new - before - 4).abs() < 1).all(), (new, before)  # 4 pixels down and right
    # cell 8: 64-71
    assert ((new - 68).abs() < 2.5).all() and ((before - 68).abs() > 3.5).all(), (new, before)


def tokens_before_last_block(visual, x):
    """conv1, class token, positional embedding, ln_pre and every block but the last."""
    t = visual.conv1(x)  # (B, width, h, w)
    B, _, h, w = t.shape
    t = t.flatten(2).transpose(1, 2)  # (B, h*w, width)
    t = torch.cat([visual.class_embedding.expand(B, 1, -1), t], 1) + M.vit_pos_embed(visual, h, w)
    t = visual.ln_pre(t)
    assert getattr(visual.transformer, "batch_first", True)
    for blk in visual.transformer.resblocks[:-1]:
        t = blk(t)
    return t, h, w


def teacher_by_loops(visual, x, teacher, sigma=5.0):
    """The last block of SCLIP, ClearCLIP and NACLIP from their formulas, one head, one query token
    and one key token at a time: A_ij from softmax over j, output_i = sum_j A_ij v_j."""
    t, h, w = tokens_before_last_block(visual, x)
    last = visual.transformer.resblocks[-1]
    y = last.ln_1(t)
    (wq, wk, wv), (bq, bk, bv) = last.attn.in_proj_weight.chunk(3), last.attn.in_proj_bias.chunk(3)
    q, k, v = y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv  # (B, N, width)
    B, N, C = y.shape
    H = last.attn.num_heads
    c, s = C // H, (C // H) ** -0.5

    def omega(i, j):  # token 0 is the class token; token 1 + p is patch p = (p // w, p % w)
        if i == 0 or j == 0:
            return 0.0
        (yi, xi), (yj, xj) = divmod(i - 1, w), divmod(j - 1, w)
        return math.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * sigma ** 2))

    def softmax(logits):
        e = [math.exp(v - max(logits)) for v in logits]
        return [v / sum(e) for v in e]
    out = torch.zeros_like(y)
    for b in range(B):
        for head in range(H):
            hs = slice(head * c, (head + 1) * c)
            for i in range(N):
                row = [0.0] * N
                if teacher in ("sclip", "clearclip"):
                    qq = softmax([s * float(q[b, i, hs] @ q[b, j, hs]) for j in range(N)])
                    row = [r + a for r, a in zip(row, qq)]
                if teacher == "sclip":
                    kk = softmax([s * float(k[b, i, hs] @ k[b, j, hs]) for j in range(N)])
                    row = [r + a for r, a in zip(row, kk)]
                if teacher == "naclip":
                    row = softmax([s * float(k[b, i, hs] @ k[b, j, hs]) + omega(i, j)
                                   for j in range(N)])
                out[b, i, hs] = sum(row[j] * v[b, j, hs] for j in range(N))
    o = last.attn.out_proj(out)
    if teacher == "sclip":  # residual and MLP kept
        o = t + o
        o = o + last.mlp(last.ln_2(o))
    o = visual.ln_post(o) @ visual.proj  # (B, N, D)
    return o[:, 1:].transpose(1, 2).reshape(B, -1, h, w)


@pytest.mark.parametrize("teacher", ["sclip", "clearclip", "naclip"])
@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_newer_teachers_match_their_formulas(vit, teacher, size):
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = M.vit_dense(vit.visual, x, teacher=teacher)
        ref = teacher_by_loops(vit.visual, x, teacher)
        maskclip, _ = M.vit_dense(vit.visual, x)
    assert ours.shape == (1, 32, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, maskclip, atol=1e-3)  # it is another teacher


def test_maskclip_is_still_the_value_path_bit_for_bit(vit):
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t, h, w = tokens_before_last_block(vit.visual, x)
        last = vit.visual.transformer.resblocks[-1]
        _, _, w_v = last.attn.in_proj_weight.chunk(3)
        _, _, b_v = last.attn.in_proj_bias.chunk(3)
        t = t + last.ls_1(last.attn.out_proj(F.linear(last.ln_1(t), w_v, b_v)))
        t = t + last.ls_2(last.mlp(last.ln_2(t)))
        t = vit.visual.ln_post(t) @ vit.visual.proj
        ref = t[:, 1:].transpose(1, 2).reshape(2, -1, h, w)
        teacher = M.ClipTeacher(vit, {"name": "tiny-vit", "pretrained": "none", "weights": None,
                                   "quick_gelu": False})
        ours, _ = M.vit_dense(vit.visual, x, teacher="maskclip")
    assert torch.equal(ours, ref) and teacher.info["teacher"] == "maskclip"


def test_naclip_neighbourhood_and_resnet_refusal(rn):
    omega = M.neighbourhood_bias(3, 4, sigma=5.0)
    assert omega.shape == (13, 13) and torch.equal(omega, omega.T)
    assert torch.equal(omega.diagonal()[1:], torch.ones(12)) and not omega[0].any()
    assert omega[1, 2] == pytest.approx(math.exp(-1 / 50))  # patches (0, 0) and (0, 1)
    assert omega[1, 6] == pytest.approx(math.exp(-2 / 50))  # patches (0, 0) and (1, 1)
    info = {"name": "tiny-rn", "pretrained": "none", "weights": None, "quick_gelu": False}
    with pytest.raises(M.UserError, match="ResNet"):
        M.ClipTeacher(rn, info, "sclip")
