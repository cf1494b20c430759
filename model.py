"""The frozen CLIP teacher of CLIP-S4 (MaskCLIP dense features, text prototypes) and f.

Notation used in shape comments (defined once, as in docs/method.md):
    B images, D CLIP joint dimension (1024 RN50, 512 ViT-B/16), C trunk channels, Dk key channels,
    H x W pixels, h x w feature grid, N = 1 + h*w ViT tokens (class token first), K classes,
    S prompt rows (one per class synonym), L tokens of a prompt.

Public API (loading a CLIP: util/clip_loading.py):
    ClipTeacher(clip, info)                    -> the teacher: .dense(), .text_prototypes()
    class_scores(), prompt_denoising(), key_smoothing()  -> class scores, MaskCLIP's refinements
    PixelEmbedder(dim, backbone)            -> the pixel-embedding network f
    load_run(path), load_embedder(device, ...) -> a trained run, or what a script scores pixels
                                            with
"""
import os
from collections import namedtuple
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from util.clip_loading import TEACHERS, load_clip
from util.files import UserError, atomic_save, cache_key, read_cache

PROMPTS = Path(__file__).with_name("prompts.txt")
# --templates: MaskCLIP's 85 (the paper's) or the 80 OpenAI ImageNet templates the peers use
# (SCLIP / ClearCLIP / NACLIP prompts/imagenet_template.py)
TEMPLATE_FILES = {"maskclip85": PROMPTS,
                  "openai80": Path(__file__).with_name("prompts_openai80.txt")}
CACHE_DIR = Path(os.environ.get("CLIP_S4_CACHE", "~/.cache/clip_s4")).expanduser()


# ----------------------------------------------------------------------------------------------
# MaskCLIP dense features (docs/method.md section 2)
# ----------------------------------------------------------------------------------------------
def resnet_dense(visual, x, with_keys=False):
    """MaskCLIP on ModifiedResNet: the attention pool's value and output projections applied at
    every position as 1x1 convolutions; no attention, no positional embedding.
    x: (B, 3, H, W) normalised -> (B, D, h, w) raw features (h = H/32), keys (B, C, h, w) | None."""
    pool = visual.attnpool
    x = visual.stem(x.to(visual.conv1.weight.dtype))
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))  # (B, C, h, w)
    v = F.conv2d(x, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias)  # (B, C, h, w)
    feats = F.conv2d(v, pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)  # (B, D, h, w)
    k_proj = pool.k_proj
    keys = F.conv2d(x, k_proj.weight[:, :, None, None], k_proj.bias) if with_keys else None
    return feats, keys


def vit_pos_embed(visual, h, w):
    """The positional embedding for an h x w patch grid: the class token's kept, the grid resized
    bicubically with antialiasing as open_clip does when it loads weights at another image size
    (the identity at the training grid). Returns (1 + h*w, width)."""
    pos = visual.positional_embedding
    gh, gw = visual.grid_size
    if (h, w) == (gh, gw):
        return pos
    grid = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # (1, width, gh, gw)
    grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False,
                         antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(h * w, -1)  # (h*w, width)
    return torch.cat([pos[:1], grid.to(pos.dtype)])


NACLIP_SIGMA = 5.0  # NACLIP's neighbourhood, in patches (its paper's value)


def neighbourhood_bias(h, w, sigma=NACLIP_SIGMA):
    """NACLIP's Omega, (N, N) with N = 1 + h*w: exp(-d_ij^2 / (2 sigma^2)) over the distance d_ij
    between patches i and j on the h x w grid; zero in the class token's row and column."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()  # (h*w, 2)
    omega = torch.zeros(1 + h * w, 1 + h * w)
    omega[1:, 1:] = torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * sigma ** 2))
    return omega


def last_block_attention(last, t, y, h, w, teacher):
    """The last ViT block of the training-free teachers after MaskCLIP, with y = ln_1(t), q, k, v
    from the block's in_proj per head and s = head_dim^-1/2:
        sclip      A = softmax(s q q^T) + softmax(s k k^T); out_proj; residual and MLP kept (SCLIP)
        clearclip  A = softmax(s q q^T); out_proj; no residual, no MLP (ClearCLIP)
        naclip     A = softmax(s k k^T + Omega); out_proj; no residual, no MLP (NACLIP)
    SCLIP's rows sum to 2 and are not renormalised. t, y (B, N, width) -> (B, N, width)."""
    attn = last.attn
    B, N, C = y.shape
    H = attn.num_heads
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3 width)
    heads = lambda t: t.reshape(B, N, H, C // H).transpose(1, 2)  # (B, N, width) -> (B, H, N, c)
    q, k, v = (heads(t) for t in qkv.chunk(3, dim=-1))
    s = (C // H) ** -0.5
    if teacher == "sclip":
        a = (s * q @ q.transpose(-1, -2)).softmax(-1) + (s * k @ k.transpose(-1, -2)).softmax(-1)
    elif teacher == "clearclip":
        a = (s * q @ q.transpose(-1, -2)).softmax(-1)  # (B, H, N, N)
    elif teacher == "naclip":
        omega = neighbourhood_bias(h, w).to(k)
        a = (s * k @ k.transpose(-1, -2) + omega).softmax(-1)
    else:
        raise UserError(f"--teacher {teacher}: choose from {', '.join(TEACHERS)}")
    out = last.ls_1(attn.out_proj((a @ v).transpose(1, 2).reshape(B, N, C)))  # (B, N, width)
    if teacher != "sclip":
        return out
    t = t + out
    return t + last.ls_2(last.mlp(last.ln_2(t)))


def vit_dense(visual, x, with_keys=False, teacher="maskclip"):
    """MaskCLIP on VisionTransformer: every block but the last as usual; in the last block the
    query-key attention is skipped (x -> ln_1 -> value proj -> out_proj, plus the residual), then
    its MLP with residual, ln_post and the projection; the class token is dropped. The other
    `teacher`s change only the last block (last_block_attention).
    x: (B, 3, H, W) normalised -> (B, D, h, w) features (h = H/patch), keys (B, C, h, w) or None."""
    *blocks, last = visual.transformer.resblocks
    if not isinstance(last, ResidualAttentionBlock) or visual.attn_pool is not None:
        raise UserError("MaskCLIP dense features need a plain open_clip ViT (no attentional "
                        "pooler)")
    t = visual.conv1(x.to(visual.conv1.weight.dtype))  # (B, width, h, w)
    B, _, h, w = t.shape
    t = t.flatten(2).transpose(1, 2)  # (B, width, h*w) -> (B, h*w, width)
    cls = visual.class_embedding.to(t.dtype).expand(B, 1, -1)  # (B, 1, width)
    t = torch.cat([cls, t], dim=1) + vit_pos_embed(visual, h, w).to(t.dtype)  # (B, N, width)
    t = visual.ln_pre(t)
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        t = t.transpose(0, 1)  # (B, N, width) -> (N, B, width)
    for blk in blocks:
        t = blk(t)
    if not batch_first:
        t = t.transpose(0, 1)  # (N, B, width) -> (B, N, width)
    y = last.ln_1(t)
    _, w_k, w_v = last.attn.in_proj_weight.chunk(3)
    _, b_k, b_v = last.attn.in_proj_bias.chunk(3)
    if teacher == "maskclip":
        t = t + last.ls_1(last.attn.out_proj(F.linear(y, w_v, b_v)))  # value path: (B, N, width)
        t = t + last.ls_2(last.mlp(last.ln_2(t)))
    else:
        t = last_block_attention(last, t, y, h, w, teacher)
    t = visual.ln_post(t) @ visual.proj  # (B, N, D)
    feats = t[:, 1:].transpose(1, 2).reshape(B, -1, h, w)  # (B, h*w, D) -> (B, D, h, w)
    keys = None
    if with_keys:
        keys = F.linear(y[:, 1:], w_k, b_k).transpose(1, 2).reshape(B, -1, h, w)  # (B, width, h, w)
    return feats, keys


# ----------------------------------------------------------------------------------------------
# Text prototypes (docs/method.md section 3)
# ----------------------------------------------------------------------------------------------
def read_templates(path=PROMPTS):
    """The prompt templates, one per line, each with one '{}' for the name (85 in prompts.txt,
    80 in prompts_openai80.txt). path: a file, or a TEMPLATE_FILES name."""
    path = TEMPLATE_FILES.get(path, path)
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    bad = [ln for ln in lines if ln.count("{}") != 1]
    if bad:
        raise UserError(f"{path}: every template needs exactly one '{{}}', not: {bad[0]!r}")
    return lines


def parse_class_names(names):
    """Class names with optional ';'-separated synonyms ('tv monitor;television') -> list of lists.
    Empty lists, empty names and duplicates are user errors."""
    if not names:
        raise UserError("no class names given (e.g. --classes sky grass 'tv monitor;television')")
    classes = [[s.strip() for s in n.split(";") if s.strip()] for n in names]
    if any(not c for c in classes):
        raise UserError(f"empty class name in {list(names)}")
    seen = {}
    for c in classes:
        key = c[0].lower()
        if key in seen:
            raise UserError(f"duplicate class name '{c[0]}': each class must be named once")
        seen[key] = True
    return classes


@torch.no_grad()
def encode_text_fast(clip, tokens, batch_size=128):
    """clip.encode_text, unnormalised, without the padding work. A causal text transformer never
    lets a token see the ones after it, and CLIP reads the sentence at its end-of-text token, so
    cutting each prompt at its own length gives the same output. Prompts are grouped by length so no
    batch carries padding: about 5x less work than padding every prompt to the 77-token context.
    tokens: (S, 77) long -> (S, D)."""
    tower = clip.text if hasattr(clip, "text") else clip
    pool = getattr(tower, "text_pool_type", "")
    if getattr(tower, "attn_mask", None) is None or pool != "argmax":
        return clip.encode_text(tokens)  # not causal or not EOT-pooled: no shortcut is exact
    lengths = tokens.argmax(dim=-1) + 1  # the EOT token has the largest id
    out = torch.empty(len(tokens),
                      clip.text_projection.shape[-1] if torch.is_tensor(clip.text_projection)
                      else clip.text_projection.out_features, device=tokens.device)
    for n in lengths.unique().tolist():
        idx = (lengths == n).nonzero().squeeze(1)
        for chunk in idx.split(batch_size):
            t = tokens[chunk, :n]  # (b, L)
            x = tower.token_embedding(t) + tower.positional_embedding[:n]  # (b, L, width)
            x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
            x = tower.ln_final(x)[:, -1]  # the EOT token is last: (b, width)
            proj = tower.text_projection
            out[chunk] = (proj(x) if isinstance(proj, nn.Linear) else x @ proj).float()
    return out


# ----------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------
class ClipTeacher(nn.Module):
    """The frozen CLIP teacher: dense features in CLIP's joint space plus text prototypes. Unlike a
    plain CLIP it keeps the spatial map: one unit vector per patch, no global pooling.
    teacher: how the dense map is read, maskclip (the paper's, MaskCLIP's), or sclip, clearclip,
    naclip (ViTs; last_block_attention)."""

    def __init__(self, clip, info, teacher="maskclip"):
        super().__init__()
        if teacher not in TEACHERS:
            raise UserError(f"--teacher {teacher}: choose from {', '.join(TEACHERS)}")
        self.clip, self.info = clip, {**info, "teacher": teacher}
        self.tokenizer = open_clip.get_tokenizer(info["name"])
        visual = clip.visual
        if isinstance(visual, ModifiedResNet):
            if teacher != "maskclip":
                raise UserError(f"--teacher {teacher} changes a ViT's last block; a ResNet CLIP "
                                f"({info['name']}) has only --teacher maskclip")
            self.dense_fn, self.stride = resnet_dense, 32
        elif isinstance(visual, VisionTransformer):
            self.dense_fn = lambda v, x, keys: vit_dense(v, x, keys, teacher)
            self.stride = visual.patch_size[0]
        else:
            raise UserError(f"MaskCLIP needs an open_clip ModifiedResNet or VisionTransformer, "
                            f"not {type(visual).__name__}")
        pre = getattr(visual, "preprocess_cfg", {}) or {}
        mean = pre.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = pre.get("std", open_clip.OPENAI_DATASET_STD)
        on = next(clip.parameters()).device  # where the CLIP already is, so .dense() runs there too
        self.register_buffer("mean", torch.tensor(mean, device=on).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, device=on).view(1, 3, 1, 1), persistent=False)
        self._text_cache = {}

    @property
    def device(self):
        return self.mean.device

    @torch.no_grad()
    def dense(self, images, with_keys=False):
        """images: (B, 3, H, W) float RGB in [0, 1] (H, W multiples of self.stride for exact
        alignment). Returns feats (B, D, h, w) fp32 unit along D, and keys (B, Dk, h, w) or None."""
        x = (images.to(self.device, torch.float32) - self.mean) / self.std
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            feats, keys = self.dense_fn(self.clip.visual, x, with_keys)
        return F.normalize(feats.float(), dim=1), (keys.float() if keys is not None else None)

    @torch.no_grad()
    def text_prototypes(self, class_names, templates=None, cache_dir=CACHE_DIR, batch_size=128):
        """One unit vector per class synonym: the normalised mean of its normalised template
        embeddings (the text encoder's output for each template filled with the synonym).
        Args:
            class_names: list of names, each may hold ';'-separated synonyms.
            templates: list of '{}' templates (default: the 85 of prompts.txt).
            cache_dir: a folder for the on-disk cache keyed by (model, weights, templates,
                names); None = off.
        Returns:
            protos (S, D) fp32 unit norm, owner (S,) long: the class index of each row."""
        classes = parse_class_names(class_names)
        templates = templates or read_templates()
        key = cache_key([self.info["name"], weights_id(self.info), templates, classes])
        file = Path(cache_dir) / f"text_{key}.pt" if cache_dir else None
        if key not in self._text_cache and file is not None:
            cached = read_cache(file, "text prototypes")
            if cached is not None:
                self._text_cache[key] = cached
        if key not in self._text_cache:
            names = [s for c in classes for s in c]
            prompts = [t.format(s) for s in names for t in templates]
            emb = encode_text_fast(self.clip, self.tokenizer(prompts).to(self.device), batch_size)
            emb = F.normalize(emb, dim=-1).view(len(names), len(templates), -1)  # (S, T, D)
            protos = F.normalize(emb.mean(dim=1), dim=-1).cpu()  # (S, D)
            owner = torch.tensor([k for k, c in enumerate(classes) for _ in c])
            self._text_cache[key] = (protos, owner)
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                atomic_save((protos, owner), file)
        protos, owner = self._text_cache[key]
        return protos.to(self.device), owner.to(self.device)


def class_embeddings(teacher, names):
    """One unit text embedding per class, (K, D): the normalised sum of its synonyms' prototypes.
    The fixed classifier of L_s and MaskCLIP+ (train.py) and the class points of visualize.py."""
    protos, owner = teacher.text_prototypes(names)
    sums = torch.zeros(len(names), protos.shape[1], device=protos.device)
    return F.normalize(sums.index_add_(0, owner, protos), dim=1)


def scale_or_clip(value, clip):
    """A scale flag's value (--kappa-s, --unknown-scale), or for 0 the CLIP's own logit scale,
    exp(logit_scale): 100 for OpenAI's CLIPs, the paper's value."""
    return value or float(clip.logit_scale.exp())


def weights_id(info):
    """What identifies loaded weights in a cache key: the tag, or a file's path, size and mtime."""
    w = info.get("weights")
    if w and os.path.isfile(w):
        st = os.stat(w)
        return [os.path.abspath(w), st.st_size, int(st.st_mtime), info["quick_gelu"]]
    return [info.get("pretrained"), info["quick_gelu"]]


def class_scores(feats, protos, owner, num_classes):
    """Cosine of every pixel to every class; a class with synonyms scores its best synonym.
    feats (B, D, h, w) unit, protos (S, D) unit, owner (S,) -> (B, K, h, w)."""
    cos = torch.einsum("bdhw,sd->bshw", feats, protos.to(feats.dtype))  # (B, S, h, w)
    if len(protos) == num_classes:
        return cos
    out = cos.new_full((cos.shape[0], num_classes, *cos.shape[2:]), float("-inf"))
    idx = owner.view(1, -1, 1, 1).expand_as(cos)
    return out.scatter_reduce(1, idx, cos, reduce="amax")  # (B, K, h, w)


def background_rule(rows, owner, num_classes, scale, threshold, background=0):
    """The peers' prediction on a dataset with a background class (SCLIP / NACLIP
    postprocess_result): p = softmax over the S synonym rows of scale x cosine; a class's
    probability is the largest of its rows'; each pixel takes the most probable class, and
    background where that probability is below `threshold` (a pixel exactly at it keeps its class).
    rows (B, S, H, W) cosines, owner (S,) class of each row -> labels (B, H, W) long."""
    p = F.softmax(scale * rows.float(), dim=1)  # (B, S, H, W)
    idx = owner.to(p.device).view(1, -1, 1, 1).expand_as(p)
    prob = p.new_zeros(p.shape[0], num_classes, *p.shape[2:]).scatter_reduce(
        1, idx, p, reduce="amax")  # (B, K, H, W)
    top, labels = prob.max(dim=1)  # (B, H, W) each
    return labels.masked_fill(top < threshold, background)


def prompt_denoising(scores, thresh=0.5, scale=100.0):
    """MaskCLIP's prompt denoising: a class whose highest probability anywhere in the image
    (softmax of scale x cosine over classes) is below `thresh` is removed from that image.
    The image's most confident class is always kept. scores (B, K, h, w) -> (B, K, h, w)."""
    peak = F.softmax(scale * scores, dim=1).amax(dim=(2, 3))  # (B, K)
    keep = (peak >= thresh) | (peak == peak.amax(dim=1, keepdim=True))
    return scores.masked_fill(~keep[:, :, None, None], float("-inf"))


def key_smoothing(scores, keys, thresh=1.0, scale=100.0):
    """MaskCLIP's key smoothing: each pixel's class probabilities become the sum of all pixels'
    probabilities weighted by the cosine of their keys (pixels the last layer would attend alike).
    Only pixels whose top probability is below `thresh` change (1.0: all of them).
    scores (B, K, h, w), keys (B, Dk, h, w) -> smoothed probabilities (B, K, h, w)."""
    B, K, h, w = scores.shape
    prob = F.softmax(scale * scores, dim=1).flatten(2)  # (B, K, h*w)
    k = F.normalize(keys.flatten(2), dim=1)  # (B, Dk, h*w)
    smoothed = prob @ (k.transpose(1, 2) @ k)  # (B, K, h*w) @ (B, h*w, h*w) -> (B, K, h*w)
    low = prob.amax(dim=1, keepdim=True) < thresh  # (B, 1, h*w)
    return torch.where(low, smoothed, prob).view(B, K, h, w)


def refiner(refine="none", iters=10, dilations=(8, 16)):
    """The --refine post-process as evaluate.py and segment.py call it, (image, scores) -> scores,
    or None for "none"."""
    if refine == "none":
        return None
    if iters < 0 or min(dilations) < 1:
        raise UserError(f"--pamr-iters {iters} --pamr-dilations {' '.join(map(str, dilations))}: "
                        f"iterations >= 0, dilations >= 1")
    return lambda image, scores: pamr(image, scores, iters, dilations)


def ring_neighbours(x, dilations):
    """Each pixel's 8 neighbours at each dilation d (offsets -d, 0, d in y and x, the pixel itself
    left out; the border replicated): (B, C, H, W) -> (B, C, 8 * len(dilations), H, W)."""
    H, W = x.shape[2:]
    out = []
    for d in dilations:
        p = F.pad(x, [d] * 4, mode="replicate")
        out += [p[:, :, d + dy:d + dy + H, d + dx:d + dx + W]
                for dy in (-d, 0, d) for dx in (-d, 0, d) if dy or dx]
    return torch.stack(out, 2)


def pamr(image, scores, iters=10, dilations=(8, 16), chunk=16):
    """Pixel-adaptive mask refinement (PAMR; Araslanov and Roth, CVPR 2020), the post-process NACLIP
    and SCLIP report with. Each pixel's scores become an average of its neighbours' (ring_neighbours
    P = 8 per dilation), weighted by how alike their colours are, repeated `iters` times:
        a_ij = softmax_j( -mean_c |I_ic - I_jc| / (0.1 sigma_ic) ),   s_i <- sum_j a_ij s_j,
    sigma_ic: the std of channel c over i's 3 x 3 windows at every dilation (i included). Linear in
    the scores, so cosines and logits give the same argmax. image (B, 3, H, W), any affine colour
    scale per channel (it cancels); scores (B, K, H, W) -> (B, K, H, W); K in chunks (memory)."""
    image = image.float()
    nb = ring_neighbours(image, dilations)  # (B, 3, P, H, W)
    centre = image[:, :, None]
    window = torch.cat([nb, centre.expand(-1, -1, len(dilations), -1, -1)], 2)
    sigma = window.std(2, keepdim=True)  # (B, 3, 1, H, W)
    aff = (-(nb - centre).abs() / (1e-8 + 0.1 * sigma)).mean(1, keepdim=True).softmax(2)
    scores = torch.nan_to_num(scores.float(), neginf=-1e4)  # a removed class stays lowest
    parts = []
    for k in range(0, scores.shape[1], chunk):
        s = scores[:, k:k + chunk]
        for _ in range(iters):
            s = (ring_neighbours(s, dilations) * aff).sum(2)
        parts.append(s)
    return torch.cat(parts, 1)


# ----------------------------------------------------------------------------------------------
# The pixel-embedding network f (docs/method.md section 4)
# ----------------------------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dilated_resnet(name, weights="auto", stages=4):
    """A torchvision ResNet trunk at output stride 8: layer3 and layer4 keep their resolution and
    dilate their 3x3 convolutions by 2 and 4 instead. torchvision's BasicBlock (resnet18) refuses
    `replace_stride_with_dilation`, so there the strides and dilations are set by hand.
    weights: 'auto' = torchvision's ImageNet weights when already in the torch cache (random init
    with a warning otherwise, nothing is downloaded), 'none', or a path to a state dict.
    stages: 4, the whole trunk (DeepLab's), or 3, the trunk up to layer3 (the weights' layer4 is
    dropped): at stride 8 layer4 runs at 16x its usual area and is most of a ResNet-18's cost
    (docs/benchmarks.md). Returns the trunk and its output channels."""
    import warnings
    import torchvision
    ctor = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50,
            "resnet101": torchvision.models.resnet101}
    if name not in ctor:
        raise UserError(f"--backbone {name}: choose from {', '.join(ctor)}")
    bottleneck = name != "resnet18"
    net = ctor[name](weights=None,
                     replace_stride_with_dilation=[False, True, True] if bottleneck else None)
    if not bottleneck:
        for layer, d in ((net.layer3, 2), (net.layer4, 4)):
            for i, block in enumerate(layer):
                if i == 0:
                    block.conv1.stride, block.downsample[0].stride = (1, 1), (1, 1)
                for conv in (block.conv1, block.conv2):
                    conv.dilation, conv.padding = (d, d), (d, d)
    if weights == "auto":
        enum = {"resnet18": torchvision.models.ResNet18_Weights,
                "resnet50": torchvision.models.ResNet50_Weights,
                "resnet101": torchvision.models.ResNet101_Weights}[name].IMAGENET1K_V1
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
        if cached.is_file():
            weights = str(cached)
        else:
            warnings.warn(f"no ImageNet weights for {name} at {cached}: random init "
                          f"(pass --backbone-weights PATH, or download them once with torchvision)")
    if weights not in ("auto", "none", None):
        if not os.path.isfile(weights):
            raise UserError(f"--backbone-weights {weights}: no such file")
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(sd, strict=False)
        if [k for k in missing if not k.startswith("fc.")] or unexpected:
            raise UserError(f"--backbone-weights {weights} does not fit {name}")
    channels = net.fc.in_features  # layer4's; layer3 has half as many
    net.fc = nn.Identity()
    if stages == 3:
        net.layer4 = nn.Identity()
        channels //= 2
    return net, channels


ASPP_RATES = (6, 12, 18, 24)  # DeepLab-v2's, made for 321-513 px crops; train.py --aspp-rates
GRID_SHIFT = {"centre": 4, "corner": 0}  # train.py --grid -> PixelEmbedder's shift (its docstring)


class PixelEmbedder(nn.Module):
    """f: image -> one unit vector per pixel (stride 8) in CLIP's joint space. DeepLab-v2 style, as
    MaskCLIP+'s target network: dilated ResNet, ASPP (four 3x3 convs, rates 6/12/18/24 unless told,
    summed), then a projection head (1x1 conv, BN, ReLU, 1x1 conv to D) and L2 normalisation. The
    paper shows only "an encoder that maps images to pixel embeddings"; this backbone is our choice
    (--backbone). Grid: every script paints cell i over pixels [8i, 8i+8), as a ViT teacher's patch
    i. A stride-8 ResNet's cell i is centred on pixel 8i instead (each stride-2 layer keeps output j
    over input 2j), so f reads its input moved up and left by `shift` = 4 pixels (the last 4 rows
    and columns repeated) and its cells sit on their blocks. shift=0 is train.py --grid corner.
    stages: the trunk's ResNet stages (dilated_resnet; train.py --trunk-stages)."""

    def __init__(self, dim, backbone="resnet101", weights="auto", hidden=512, rates=ASPP_RATES,
                 shift=GRID_SHIFT["centre"], stages=4):
        super().__init__()
        self.shift = shift
        self.trunk, c = dilated_resnet(backbone, weights, stages)
        self.aspp = nn.ModuleList(nn.Conv2d(c, hidden, 3, padding=r, dilation=r) for r in rates)
        self.head = nn.Sequential(nn.Conv2d(hidden, hidden, 1), nn.BatchNorm2d(hidden),
                                  nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, dim, 1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.stride = 8

    def head_parameters(self):
        """The new layers (ASPP and projection head), trained at 10x the learning rate."""
        return list(self.aspp.parameters()) + list(self.head.parameters())

    def forward(self, images):
        """images (B, 3, H, W) float RGB in [0, 1] -> (B, D, H/8, W/8) unit vectors along D."""
        t = self.trunk
        if self.shift:  # cell i centred on pixels [8i, 8i+8) (class docstring)
            s = self.shift
            images = F.pad(images, (0, s, 0, s), mode="replicate")[..., s:, s:]
        x = (images - self.mean) / self.std
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        x = t.layer4(t.layer3(t.layer2(t.layer1(x))))  # (B, C, H/8, W/8); layer4 may be Identity
        x = sum(conv(x) for conv in self.aspp)  # (B, hidden, H/8, W/8)
        return F.normalize(self.head(x), dim=1)  # (B, D, H/8, W/8)


# ----------------------------------------------------------------------------------------------
# Trained runs: the checkpoint train.py writes, read back by every script
# ----------------------------------------------------------------------------------------------
# Compatibility with older checkpoints lives here and only here: a flag that a run's saved args lack
# takes the value that run was trained with, not today's default.
OLD_RUN_DEFAULTS = {"aspp_rates": list(ASPP_RATES), "grid": "corner", "quick_gelu": "auto",
                    "clip_config": None, "unknown_scale": 100.0, "eval_size": None,
                    "teacher": "maskclip", "unknown_rule": "confidence", "average_from": 1.0,
                    "trunk_stages": 4}
OLD_RUN_NAMES = {"size": "teacher_size"}  # a flag's old name in saved args -> its name now


def read_checkpoint(path, what="--checkpoint"):
    """A train.py checkpoint as a dict, its args renamed by OLD_RUN_NAMES and completed by
    OLD_RUN_DEFAULTS. Anything else (no file, a truncated or foreign file) is a UserError of one
    line."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: no such file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated zip, a text file, a pickle of something else
        raise UserError(f"{what} {path}: cannot read it ({type(e).__name__})")
    if not isinstance(ck, dict) or "model" not in ck or "args" not in ck:
        raise UserError(f"{what} {path}: not a train.py checkpoint")
    a = {OLD_RUN_NAMES.get(k, k): v for k, v in ck["args"].items()}
    ck["args"] = {**OLD_RUN_DEFAULTS, **a}
    return ck


def scored_weights(ck):
    """The weights a checkpoint is scored with: the average of f's last steps when the run kept
    one (train.py --average-from; util.loop.WeightAverage) and it holds a step, else f's last
    weights (ck["model"], which a resumed run continues from)."""
    avg = ck.get("average")
    if avg and int(avg["n_averaged"]) > 0:
        return {k[len("module."):]: v for k, v in avg.items() if k.startswith("module.")}
    return ck["model"]


def load_run(path, device="cpu"):
    """Rebuild a trained run from its checkpoint: (f in eval mode, the frozen teacher it was trained
    with, the checkpoint dict). The checkpoint records its CLIP: no CLIP flags are needed again."""
    ck = read_checkpoint(path)
    a = ck["args"]
    clip, info = load_clip(a["clip"], a["clip_pretrained"], a["clip_config"], a["quick_gelu"],
                           device)
    f = PixelEmbedder(ck["dim"], a["backbone"], "none", a["head_dim"], a["aspp_rates"],
                      GRID_SHIFT[a["grid"]], a["trunk_stages"])
    f.load_state_dict(scored_weights(ck))
    return f.to(device).eval(), ClipTeacher(clip, info, a["teacher"]).to(device), ck


Embedder = namedtuple("Embedder", "embed stride teacher run")
Embedder.__doc__ = """What scores pixels in the scripts (load_embedder): embed maps images (B, 3, H,
W) in [0, 1] to (unit features (B, D, h, w), keys (B, Dk, h, w) or None); stride its grid's; the
teacher always provides the text prototypes; run the checkpoint dict, or None for the teacher."""


def load_embedder(device, checkpoint=None, clip="ViT-B-16", clip_pretrained="openai",
                  clip_config=None, quick_gelu="auto", teacher="maskclip", with_keys=False):
    """A trained run (`checkpoint`: f, with the teacher it was trained with) or the frozen teacher
    alone (the CLIP flags and --teacher), as an Embedder. with_keys: the teacher's keys too (key
    smoothing); a trained f has none."""
    if checkpoint:
        f, run_teacher, run = load_run(checkpoint, device)
        return Embedder(lambda x: (f(x.to(device)), None), f.stride, run_teacher, run)
    t = ClipTeacher(*load_clip(clip, clip_pretrained, clip_config, quick_gelu, device), teacher)
    t = t.to(device)
    return Embedder(lambda x: t.dense(x.to(device), with_keys=with_keys), t.stride, t, None)
