"""toy.py: the offline toy world. Procedural scenes with pixel labels and captions, and a tiny CLIP
pretrained on the (image, caption) pairs with open_clip's own model classes and contrastive loss.

It stands in for what cannot be downloaded here (CLIP's weights, ImageNet weights, Pascal VOC): a
vision-language model that localises concepts imperfectly, images scored per pixel, class names to
hold out, and a "toy ImageNet" ResNet-18 (image-level tags on scenes of their own) to initialise f.

Default world (5-10 minutes on 2 CPU cores), then the quick start of the README:
    python toy.py                  # data/toy: scenes, labels, captions, toyclip.*, resnet18_toy.pt
    python toy.py --backbone-only  # only remake resnet18_toy.pt in an existing world
    python segment.py data/toy/JPEGImages/val_0000.png --classes sky grass water ball \
        --clip-config data/toy/toyclip.json --clip-pretrained data/toy/toyclip.pt --size 64
Micro world for the tests (seconds):
    python toy.py --tiny --out-dir /tmp/toy
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from data import (IGNORE, UserError, atomic_save, confusion_matrix, load_image,
                  segmentation_metrics)
from clip_loading import load_clip
from model import IMAGENET_MEAN, IMAGENET_STD, MaskCLIP

# ----------------------------------------------------------------------------------------------
# The world: 8 kinds of stuff that fill space, 6 kinds of things with shape and colour
# ----------------------------------------------------------------------------------------------
STUFF = ["sky", "grass", "water", "sand", "snow", "road", "wall", "floor"]
THINGS = ["ball", "box", "tree", "car", "kite", "star"]
CLASSES = STUFF + THINGS  # label id = index here
GROUND = ["grass", "water", "sand", "snow", "road"]  # what lies under an outdoor sky
COLOURS = {
    "red": (200, 30, 30),
    "yellow": (235, 200, 40),
    "orange": (240, 130, 20),
    "pink": (240, 120, 180),
    "blue": (40, 70, 200),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "purple": (130, 50, 170),
    "brown": (130, 80, 40),
    "green": (30, 110, 40),
}
THING_COLOURS = {
    "ball": ["red", "yellow", "orange", "pink", "blue"],
    "box": ["brown", "red", "yellow", "blue"],
    "tree": ["green"],
    "car": ["red", "blue", "white", "black"],
    "kite": ["pink", "purple", "orange", "yellow"],
    "star": ["yellow", "white", "orange"],
}
FRAMES = ["a photo of {}.", "{}.", "an image showing {}.", "a scene with {}.", "there is {} here.",
          "this picture has {}.", "a toy world with {}.", "look at {}!"]
ARTICLE = {"sky": "the", "grass": "some", "water": "the", "sand": "some", "snow": "some",
           "road": "a",
           "wall": "a", "floor": "the"}


def stuff_texture(name, rng, H, W):
    """An (H, W, 3) float texture of a stuff class: a base colour and the pattern that marks it."""
    y, x = np.mgrid[0:H, 0:W] / max(H, W)
    noise = rng.normal(0, 1, (H, W))
    base = {
        "sky": (110, 170, 235),
        "grass": (60, 150, 50),
        "water": (40, 90, 170),
        "sand": (215, 190, 130),
        "snow": (235, 240, 250),
        "road": (80, 80, 85),
        "wall": (165, 75, 55),
        "floor": (150, 105, 60),
    }[name]
    t = np.ones((H, W, 3)) * np.array(base, float) * rng.uniform(0.85, 1.15)
    if name == "sky":  # bright towards the horizon
        t += (y[..., None] * 60) + noise[..., None] * 3
    elif name == "grass":  # strong green speckle
        t += noise[..., None] * np.array([10, 30, 10])
    elif name == "water":  # horizontal waves
        t += (np.sin(y * 60 + rng.uniform(0, 6) + np.sin(x * 12) * 2) * 25)[..., None] * np.array(
            [0.5, 0.7, 1]
        )
    elif name == "sand":  # fine grain
        t += noise[..., None] * 12
    elif name == "snow":  # faint blue shadows
        t -= (np.abs(np.sin(x * 9 + y * 5)) * 15)[..., None] * np.array([1, 0.6, 0])
    elif name == "road":  # dashed centre line
        line = (np.abs(y - rng.uniform(0.6, 0.85)) < 0.02) & (np.sin(x * 40) > 0)
        t[line] = (230, 210, 60)
    elif name == "wall":  # bricks and mortar
        row = (y * 12).astype(int)
        mortar = ((y * 12) % 1 < 0.15) | (((x * 6) + 0.5 * (row % 2)) % 1 < 0.08)
        t[mortar] = (200, 195, 185)
    elif name == "floor":  # wooden planks
        t += (np.sin(x * 80) * 8 + ((x * 8) % 1 < 0.06) * -60)[..., None]
    return t


def draw_thing(name, rng, img, lab, k, S, zoom=1.0):
    """Draw one thing into img (PIL RGB) and lab (PIL L) with label k; size relative to S."""
    r = rng.uniform(0.09, 0.2) * S * zoom
    cx, cy = rng.uniform(r, S - r), rng.uniform(r, S - r)
    cname = rng.choice(THING_COLOURS[name])
    col = tuple(int(np.clip(c * rng.uniform(0.85, 1.15), 0, 255)) for c in COLOURS[cname])
    di, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)
    if name == "ball":
        shapes = [("ellipse", [cx - r, cy - r, cx + r, cy + r], col)]
    elif name == "box":
        shapes = [("rectangle", [cx - r, cy - r, cx + r, cy + r], col),
                  ("line", [cx - r, cy - r, cx + r, cy + r], tuple(c // 2 for c in col))]
    elif name == "tree":
        shapes = [
            ("rectangle", [cx - r / 4, cy, cx + r / 4, cy + r], COLOURS["brown"]),
            (
                "polygon",
                [(cx, cy - r), (cx - r * 0.8, cy + r * 0.3), (cx + r * 0.8, cy + r * 0.3)],
                col,
            ),
        ]
    elif name == "car":
        shapes = [("rectangle", [cx - r, cy - r / 2, cx + r, cy + r / 3], col),
                  ("ellipse", [cx - r * 0.8, cy + r / 6, cx - r * 0.3, cy + r * 0.6], (20, 20, 20)),
                  ("ellipse", [cx + r * 0.3, cy + r / 6, cx + r * 0.8, cy + r * 0.6], (20, 20, 20))]
    elif name == "kite":
        shapes = [("polygon", [(cx, cy - r), (cx + r * 0.6, cy), (cx, cy + r), (cx - r * 0.6, cy)],
                   col)]
    else:  # star: five points
        pts = [
            (
                cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5),
            )
            for i in range(10)
        ]
        shapes = [("polygon", pts, col)]
    for kind, xy, c in shapes:
        kw = {"width": max(1, int(r / 5))} if kind == "line" else {}
        getattr(di, kind)(xy, fill=c, **kw)
        getattr(dl, kind)(xy, fill=k, **kw)
    return cname


def make_scene(rng, S=64, closeup=0.0):
    """One scene; with probability `closeup` a close-up instead: one stuff filling the frame and at
    most one large thing (as web photos often are), which ties words to regions. Returns img (S, S,
    3) uint8, label (S, S) uint8 (255 = ignore: the pixels on either side of a thing's outline, as
    VOC marks object borders), a caption and the set of class names it names (all present)."""
    near = rng.random() < closeup
    if near:
        top, bottoms = rng.choice(STUFF), []
    elif rng.random() < 0.75:
        top, bottoms = "sky", list(rng.choice(GROUND, size=rng.integers(1, 3), replace=False))
    else:
        top, bottoms = "wall", ["floor"]
    x = np.arange(S)
    horizon = rng.uniform(0.3, 0.6) * S + np.sin(
        x / S * rng.uniform(2, 9) + rng.uniform(0, 6)
    ) * rng.uniform(0, 4)
    yy = np.arange(S)[:, None]
    lab = np.full((S, S), CLASSES.index(top), np.uint8)
    img = stuff_texture(top, rng, S, S)
    for i, name in enumerate(bottoms):  # ground bands from the horizon down
        start = horizon + i * rng.uniform(0.15, 0.3) * S
        mask = yy >= start[None, :]
        lab[mask] = CLASSES.index(name)
        img[mask] = stuff_texture(name, rng, S, S)[mask]
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    thing_lab = Image.new("L", (S, S), 0)
    things = list(rng.choice(THINGS, size=rng.integers(0, 2) if near else rng.integers(0, 4),
                             replace=False))
    colour_of = {}
    for name in things:
        colour_of[name] = draw_thing(name, rng, img, thing_lab, CLASSES.index(name) + 1, S,
                                     2.0 if near else 1.0)
    tl = np.asarray(thing_lab).astype(np.int32) - 1  # -1 = no thing
    lab[tl >= 0] = tl[tl >= 0]
    edge = np.zeros_like(tl, bool)  # 1-px ignore band where a thing meets anything else
    edge[:-1] |= tl[:-1] != tl[1:]
    edge[1:] |= tl[:-1] != tl[1:]
    edge[:, :-1] |= tl[:, :-1] != tl[:, 1:]
    edge[:, 1:] |= tl[:, :-1] != tl[:, 1:]
    lab[edge] = IGNORE
    caption, named = make_caption(rng, lab, colour_of)
    return np.asarray(img), lab, caption, named


def make_caption(rng, lab, colour_of):
    """A caption in varied wording naming what is clearly visible: things covering >= 1.5% of the
    image, stuff >= 5% (each stuff named with probability 0.85). Never names an absent class."""
    area = np.bincount(lab.reshape(-1), minlength=256)[: len(CLASSES)] / lab.size
    phrases, named = [], set()
    for k, name in enumerate(CLASSES):
        if name in THINGS and area[k] >= 0.015:
            adj = colour_of[name] + " " if rng.random() < 0.5 else ""
            phrases.append(f"{rng.choice(['a', 'the', 'one'])} {adj}{name}")
        elif name in STUFF and area[k] >= 0.05 and rng.random() < 0.85:
            phrases.append(f"{ARTICLE[name]} {name}")
        else:
            continue
        named.add(name)
    if not phrases:  # at least the largest region
        k = int(area.argmax())
        phrases, named = [f"{ARTICLE.get(CLASSES[k], 'a')} {CLASSES[k]}"], {CLASSES[k]}
    rng.shuffle(phrases)
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return rng.choice(FRAMES).format(body), named


def write_world(root, n_train, n_val, size, seed, closeup=0.3):
    """Write the toy dataset in VOC layout: JPEGImages/ (PNG files), SegmentationClass/,
    ImageSets/Segmentation/{train,val}.txt, classes.txt, captions.json. Deterministic under seed.
    A `closeup` share of the train scenes are close-ups; val holds full scenes only."""
    root = Path(root)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    captions = {}
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{i:04d}" for i in range(n)]
        for i, name in enumerate(tqdm(ids, desc=f"toy {split} scenes", leave=False)):
            rng = np.random.default_rng([seed, split == "val", i])
            img, lab, cap, _ = make_scene(rng, size, closeup if split == "train" else 0.0)
            Image.fromarray(img).save(root / "JPEGImages" / f"{name}.png")
            Image.fromarray(lab).save(root / "SegmentationClass" / f"{name}.png")
            captions[name] = cap
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "captions.json").write_text(json.dumps(captions, indent=0))
    return captions


# ----------------------------------------------------------------------------------------------
# The tiny CLIP: open_clip's own CLIP class from a JSON config, open_clip's contrastive loss
# ----------------------------------------------------------------------------------------------
def toyclip_config(size, tiny=False, pool="avg"):
    """A ViT CLIP small enough to pretrain on a CPU in minutes. It pools by averaging the patch
    tokens (pool="avg"): with the class token (CLIP's choice, pool="tok") a CLIP this small and this
    briefly trained reads out far worse per patch (15 vs 29 mIoU, README)."""
    w = 64 if tiny else 96
    return {"embed_dim": 64, "quick_gelu": False,
            "vision_cfg": {"image_size": size, "layers": 2 if tiny else 4, "width": w,
                           "patch_size": 8,
                           "head_width": 32, "pool_type": pool},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": w, "heads": w // 32,
                         "layers": 2}}


def load_split(root, split):
    """All images of a toy split as one uint8 tensor (N, 3, S, S), labels (N, S, S) and ids."""
    ids = (Path(root) / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
    imgs = np.stack([load_image(Path(root) / "JPEGImages" / f"{i}.png") for i in ids])
    labs = np.stack(
        [np.asarray(Image.open(Path(root) / "SegmentationClass" / f"{i}.png")) for i in ids]
    )
    return torch.from_numpy(imgs).permute(0, 3, 1, 2), torch.from_numpy(labs), ids  # NHWC -> NCHW


def fit(step_loss, images, opt, sched, steps, batch_size, seed, desc):
    """The loop both toy pretrainings share: a random batch of images with random flips per step
    (the captions and tags have no left or right, so flips keep them true), one optimizer step on
    step_loss(x, idx, g), x float in [0, 1], idx the batch's indices. Returns each step's loss."""
    g = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc=desc)
    for _ in bar:
        idx = torch.randperm(len(images), generator=g)[:batch_size]
        x = images[idx].float().div(255)
        flip = torch.rand(len(idx), generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        loss = step_loss(x, idx, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def pretrain_clip(clip, images, captions, args):
    """Contrastive pretraining on (image, caption) pairs: AdamW, warm-up + cosine, random flips.
    images (N, 3, S, S) uint8, captions N strings. Returns the loss of each step."""
    clip.train().requires_grad_(True)
    tokens = open_clip.get_tokenizer(args.clip_name)(captions)  # (N, 32)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(clip.parameters(), lr=args.lr, weight_decay=0.1)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm)
            * 0.5
            * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
        ),
    )

    def clip_loss(x, idx, g):
        img_f, txt_f, scale = clip((x - mean) / std, tokens[idx])[:3]
        return loss_fn(img_f, txt_f, scale)
    losses = fit(clip_loss, images, opt, sched, args.steps, args.batch_size, args.seed,
                 "pretraining toy CLIP")
    clip.eval().requires_grad_(False)
    return losses


# ----------------------------------------------------------------------------------------------
# The toy "ImageNet": image-level tags on scenes of their own, to initialise f's backbone
# ----------------------------------------------------------------------------------------------
def tagged_scenes(n, size, seed, closeup=0.3):
    """n scenes drawn from seeds no train or val scene uses, each with image-level tags only (the
    classes covering >= 1% of it), as ImageNet gives the paper's f labels of whole images.
    Returns images (n, 3, S, S) uint8 and tags (n, K) float in {0, 1}."""
    imgs, tags = [], []
    for i in tqdm(range(n), desc="toy ImageNet scenes", leave=False):
        img, lab, _, _ = make_scene(np.random.default_rng([seed, 2, i]), size, closeup)
        imgs.append(img)
        tags.append(np.bincount(lab.reshape(-1), minlength=256)[: len(CLASSES)] / lab.size >= 0.01)
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1,
                                                    2), torch.from_numpy(np.stack(tags)).float()


def imagenet_normalise(x):
    """Images in [0, 1] normalised as f normalises its input (model.PixelEmbedder)."""
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )


def pretrain_backbone(images, tags, args):
    """A torchvision ResNet-18 trained as a multi-label image classifier (one sigmoid per class):
    SGD with momentum, cosine decay, random flips and shifts. The paper's f starts from ImageNet
    weights; this is the toy world's stand-in (train.py --backbone-weights). Returns the trained
    network and the loss of each step."""
    import torchvision
    torch.manual_seed(args.seed)  # the same weights whether or not the toy CLIP was trained first
    net = torchvision.models.resnet18(num_classes=tags.shape[1])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.backbone_steps))
    )

    def tag_loss(x, idx, g):
        dy, dx = torch.randint(-4, 5, (2,), generator=g).tolist()  # one shift per batch, edges wrap
        x = torch.roll(x, (dy, dx), dims=(2, 3))
        return F.binary_cross_entropy_with_logits(net(imagenet_normalise(x)), tags[idx])
    net.train()
    losses = fit(tag_loss, images, opt, sched, args.backbone_steps, args.backbone_batch, args.seed,
                 "pretraining toy ResNet-18")
    return net.eval(), losses


@torch.no_grad()
def tag_accuracy(net, images, tags):
    """Share of (image, class) tags the classifier gets right at probability 0.5, and the share of
    images whose tags are all right."""
    pred = torch.cat([net(imagenet_normalise(x.float().div(255))) for x in images.split(256)]) > 0
    right = pred == tags.bool()
    return 100.0 * right.float().mean().item(), 100.0 * right.all(dim=1).float().mean().item()


@torch.no_grad()
def retrieval_accuracy(teacher, images, captions):
    """Image -> caption top-1 among the split's captions (a hit: the retrieved text is equal)."""
    clip = teacher.clip
    x = (images.float().div(255).to(teacher.device) - teacher.mean) / teacher.std
    img = F.normalize(torch.cat([clip.encode_image(c) for c in x.split(256)]), dim=-1)
    uniq = sorted(set(captions))
    txt = F.normalize(clip.encode_text(teacher.tokenizer(uniq).to(teacher.device)), dim=-1)
    best = (img @ txt.T).argmax(dim=1).tolist()  # (N, U) -> (N,)
    return 100.0 * float(np.mean([uniq[b] == c for b, c in zip(best, captions)])), 100.0 / len(uniq)


@torch.no_grad()
def maskclip_miou(teacher, images, labels, names, size):
    """Language-driven MaskCLIP readout of toy val: per pixel the nearest class prototype."""
    protos, owner = teacher.text_prototypes(names, cache_dir=None)
    K = len(names)
    cm = np.zeros((K, K), np.int64)
    for x, y in zip(images.split(64), labels.split(64)):
        x = F.interpolate(x.float().div(255), size=(size, size), mode="bilinear",
                          align_corners=False)
        feats, _ = teacher.dense(x)  # (B, D, h, w)
        scores = torch.einsum("bdhw,sd->bshw", feats, protos)  # (B, K, h, w)
        scores = F.interpolate(scores, size=y.shape[1:], mode="bilinear", align_corners=False)
        cm += confusion_matrix(scores.argmax(dim=1).cpu().numpy(), y.numpy(), K)
    return segmentation_metrics(cm, names)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--out-dir", default="data/toy",
                   help="the toy dataset folder (also --data-root of the other scripts)")
    p.add_argument("--n-train", type=int, default=3000,
                   help="training scenes (CLIP pretraining and CLIP-S4 training)")
    p.add_argument("--n-val", type=int, default=300, help="validation scenes (all scores)")
    p.add_argument("--size", type=int, default=64,
                   help="scene side in pixels (also the toy CLIP's input size)")
    # Optim
    p.add_argument("--steps", type=int, default=450, help="toy CLIP pretraining steps")
    p.add_argument("--batch-size", type=int, default=128, help="(image, caption) pairs per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    p.add_argument(
        "--pool",
        choices=["avg", "tok"],
        default="avg",
        help="how the toy CLIP pools patch tokens: avg (default, localises better) or tok "
        "(CLIP's class token)",
    )
    p.add_argument(
        "--closeup",
        type=float,
        default=0.3,
        help="share of training scenes that are close-ups of one stuff (+ one large thing)",
    )
    p.add_argument(
        "--backbone-steps",
        type=int,
        default=400,
        help="toy ImageNet: steps of ResNet-18 tag pretraining for f's backbone (0: skip)",
    )
    p.add_argument("--backbone-batch", type=int, default=32, help="toy ImageNet: images per step")
    p.add_argument("--backbone-scenes", type=int, default=4000,
                   help="toy ImageNet: tagged scenes (+1/8 held out)")
    p.add_argument("--backbone-only", action="store_true",
                   help="only (re)make resnet18_toy.pt in an existing world")
    p.add_argument("--tiny", action="store_true",
                   help="micro world for tests: 96 scenes, 2-layer CLIP, 30 steps")
    p.add_argument("--seed", type=int, default=0, help="everything deterministic under it")
    args = p.parse_args(argv)
    if args.tiny:
        args.n_train, args.n_val, args.steps, args.batch_size = 96, 32, 30, 32
        args.backbone_steps, args.backbone_batch, args.backbone_scenes = 4, 4, 32
    return args


def main(args):
    print(f"toy.py | {vars(args)}")
    torch.manual_seed(args.seed)
    root = Path(args.out_dir)
    t0 = time.perf_counter()
    result = {} if args.backbone_only else world_and_clip(args, root, t0)
    # ---- the toy ImageNet: weights for f's backbone (train.py --backbone-weights) ----
    if args.backbone_steps:
        n = args.backbone_scenes
        images, tags = tagged_scenes(n + n // 8, args.size, args.seed)
        net, losses = pretrain_backbone(images[:n], tags[:n], args)
        path = root / "resnet18_toy.pt"
        atomic_save({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, path)
        acc, exact = tag_accuracy(net, images[n:], tags[n:])
        print(f"toy ResNet-18: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}, "
              f"held-out tags "
              f"{acc:.1f}% right ({exact:.1f}% of images all right), saved {path}")
        result["backbone"] = {"losses": losses, "tag_accuracy": acc}
    print(f"total {time.perf_counter() - t0:.0f} s")
    return result


def world_and_clip(args, root, t0):
    """Write the scenes, pretrain the toy CLIP on their captions, report its MaskCLIP readout."""
    # ---- data: the scenes ----
    captions = write_world(root, args.n_train, args.n_val, args.size, args.seed, args.closeup)
    train_x, _, train_ids = load_split(root, "train")
    val_x, val_y, val_ids = load_split(root, "val")
    t1 = time.perf_counter()
    print(f"wrote {args.n_train} + {args.n_val} scenes of {len(CLASSES)} classes to {root} in "
          f"{t1 - t0:.0f} s")
    # ---- model: a tiny CLIP from a JSON config, pretrained contrastively ----
    cfg = root / "toyclip.json"
    cfg.write_text(json.dumps(toyclip_config(args.size, args.tiny, args.pool), indent=1))
    clip, _ = load_clip(pretrained="none", config=cfg)
    args.clip_name = cfg.stem
    losses = pretrain_clip(clip, train_x, [captions[i] for i in train_ids], args)
    weights = root / "toyclip.pt"
    atomic_save(clip.state_dict(), weights)
    t2 = time.perf_counter()
    print(f"toy CLIP: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f} in "
          f"{t2 - t1:.0f} s, "
          f"saved {weights}")
    # ---- report: reload through the path every script uses, then score ----
    teacher = MaskCLIP(*load_clip(pretrained=str(weights), config=cfg))
    acc, chance = retrieval_accuracy(teacher, val_x, [captions[i] for i in val_ids])
    m = maskclip_miou(teacher, val_x, val_y, CLASSES, args.size)
    print(f"val image->caption top-1: {acc:.1f}% (chance {chance:.1f}%)")
    print(f"val MaskCLIP (dense readout) mIoU {m['mIoU']:.1f} | pAcc {m['pAcc']:.1f} | mAcc "
          f"{m['mAcc']:.1f} "
          f"(chance mIoU about {100 / len(CLASSES):.1f})")
    print("per class IoU: " + ", ".join(f"{n} {v:.0f}" for n,
                                        v in m["per_class"].items() if v is not None))
    return {"losses": losses, "retrieval": acc, "maskclip": m}


if __name__ == "__main__":
    try:
        main(get_args())
    except UserError as e:
        sys.exit(f"error: {e}")
