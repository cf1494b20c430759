"""toy/prepare.py: the offline toy worlds. Procedural scenes with pixel labels and captions
(toy/world.py), a tiny CLIP pretrained on the (image, caption) pairs with open_clip's own model
classes and contrastive loss, and a "toy ImageNet" ResNet-18 (image-level tags on scenes of their
own) to initialise f.

They stand in for what cannot be downloaded here (CLIP's weights, ImageNet weights, Pascal VOC): a
vision-language model that localises concepts imperfectly, images scored per pixel, class names to
hold out. World 0 is the one the toy recipe was tuned on; `--world N` draws an independent one
(other names, looks, shapes, layouts, its own CLIP) to report the same recipe on.

    python toy/prepare.py                  # world 0 in data/toy: scenes, toyclip.*, resnet18_toy.pt
    python toy/prepare.py --world 1 --backbone-steps 0   # untuned world 1 (data/toy1, no ResNet)
    python toy/prepare.py --backbone-only  # only remake resnet18_toy.pt in an existing world
Micro world for the tests (seconds):
    python toy/prepare.py --tiny --out-dir /tmp/toy
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
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: its modules
from data import EvalImages, SegDataset, load_image
from util.files import UserError, atomic_save
from util.metrics import language_confusion, segmentation_metrics
from util.clip_loading import load_clip
from model import IMAGENET_MEAN, IMAGENET_STD, ClipTeacher, class_scores
from toy.world import make_scene, make_world, write_marker, write_world

# ----------------------------------------------------------------------------------------------
# The tiny CLIP: open_clip's own CLIP class from a JSON config, open_clip's contrastive loss
# ----------------------------------------------------------------------------------------------
def toyclip_config(size, tiny=False, pool="avg", layers=4, width=96):
    """A ViT CLIP small enough to pretrain on a CPU in minutes: `layers` vision blocks, `width`
    channels in both towers. It pools by averaging the patch tokens (pool="avg"):
    with the class token (CLIP's choice, pool="tok") a CLIP this small and this briefly trained
    reads out far worse per patch (--pool tok)."""
    w = 64 if tiny else width
    return {"embed_dim": 64, "quick_gelu": False,
            "vision_cfg": {"image_size": size, "layers": 2 if tiny else layers, "width": w,
                           "patch_size": 8, "head_width": 32, "pool_type": pool},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": w, "heads": w // 32,
                         "layers": 2}}


def load_split(root, split):
    """All images of a toy split as one uint8 tensor (N, 3, S, S), labels (N, S, S) and ids."""
    ids = (Path(root) / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
    imgs = np.stack([load_image(Path(root) / "JPEGImages" / f"{i}.png") for i in ids])
    labs = np.stack([np.asarray(Image.open(Path(root) / "SegmentationClass" / f"{i}.png"))
                     for i in ids])
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


def pretrain_clip(clip, name, images, captions, args):
    """Contrastive pretraining on (image, caption) pairs: AdamW, warm-up + cosine, random flips.
    name: the open_clip name of the CLIP (its tokenizer); images (N, 3, S, S) uint8, captions N
    strings. Returns the loss of each step."""
    clip.train().requires_grad_(True)
    tokens = open_clip.get_tokenizer(name)(captions)  # (N, 32)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(clip.parameters(), lr=args.lr, weight_decay=0.1)
    warm, T = max(1, args.steps // 20), args.steps
    lr_at = lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, T) / T))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

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
def tagged_scenes(world, n, size, seed, closeup=0.3, objects=0.2):
    """n scenes of `world` drawn from seeds no train or val scene uses, each with image-level tags
    only (the classes covering >= 1% of it), as ImageNet gives the paper's f labels of whole
    images. Returns images (n, 3, S, S) uint8 and tags (n, K) float in {0, 1}."""
    imgs, tags, K = [], [], len(world.classes)
    for i in tqdm(range(n), desc="toy ImageNet scenes", leave=False):
        rng = np.random.default_rng([seed, world.number, 2, i])
        img, lab, _, _ = make_scene(rng, size, closeup, objects, world)
        imgs.append(img)
        tags.append(np.bincount(lab.reshape(-1), minlength=256)[:K] / lab.size >= 0.01)
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)  # NHWC -> NCHW
    return images, torch.from_numpy(np.stack(tags)).float()


def imagenet_normalise(x):
    """Images in [0, 1] normalised as f normalises its input (model.PixelEmbedder)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def pretrain_backbone(images, tags, args):
    """A torchvision ResNet-18 trained as a multi-label image classifier (one sigmoid per class):
    SGD with momentum, cosine decay, random flips and shifts. The paper's f starts from ImageNet
    weights; this is the toy world's stand-in (train.py --backbone-weights). Returns the trained
    network and the loss of each step."""
    import torchvision
    torch.manual_seed(args.seed)  # the same weights whether or not the toy CLIP was trained first
    net = torchvision.models.resnet18(num_classes=tags.shape[1])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * s / args.backbone_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)

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
def maskclip_miou(teacher, base, size):
    """The teacher's language-driven readout of a toy split (SegDataset) at short side `size`, as
    evaluate.py scores it: per pixel the class of the nearest text prototype. Returns
    metrics.segmentation_metrics' dict."""
    names = base.classes
    protos, owner = teacher.text_prototypes(names, cache_dir=None)
    scores_of = lambda x: class_scores(teacher.dense(x)[0], protos, owner, len(names))
    cm = language_confusion(scores_of, EvalImages(base, size, teacher.stride), len(names))
    return segmentation_metrics(cm, names)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument
    # Data
    arg("--world", type=int, default=0,
        help="0: the tuned world; any other number: an independent world drawn from that seed")
    arg("--out-dir", default=None,
        help="the dataset folder, also --data-root of the other scripts (default data/toy for "
             "world 0, data/toyN for world N)")
    arg("--n-train", type=int, default=3000,
        help="training scenes (CLIP pretraining and CLIP-S4 training)")
    arg("--n-val", type=int, default=300, help="validation scenes (all scores)")
    arg("--size", type=int, default=64, help="scene side in pixels (also the toy CLIP's input)")
    arg("--closeup", type=float, default=0.3,
        help="share of training scenes that are close-ups of one stuff (+ one large thing)")
    arg("--objects", type=float, default=0.2,
        help="share of training scenes that are object photos (one large thing on one stuff)")
    # The toy CLIP
    arg("--steps", type=int, default=450, help="toy CLIP pretraining steps")
    arg("--batch-size", type=int, default=128, help="(image, caption) pairs per step")
    arg("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    arg("--pool", choices=["avg", "tok"], default="avg",
        help="how the toy CLIP pools patch tokens: avg (localises better) or tok (CLIP's class "
             "token)")
    arg("--clip-layers", type=int, default=4, help="the toy CLIP's vision blocks")
    arg("--clip-width", type=int, default=96, help="the toy CLIP's width (text and vision)")
    # The toy ImageNet
    arg("--backbone-steps", type=int, default=400,
        help="steps of ResNet-18 tag pretraining for f's backbone (0: none)")
    arg("--backbone-batch", type=int, default=32, help="images per step")
    arg("--backbone-scenes", type=int, default=4000, help="tagged scenes (+1/8 held out)")
    arg("--backbone-only", action="store_true",
        help="only (re)make resnet18_toy.pt in an existing world")
    arg("--tiny", action="store_true",
        help="micro world for tests: 96 scenes, 2-layer CLIP, 30 steps")
    arg("--seed", type=int, default=0, help="everything deterministic under it and --world")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or ("data/toy" if args.world == 0 else f"data/toy{args.world}")
    if args.tiny:
        args.n_train, args.n_val, args.steps, args.batch_size = 96, 32, 30, 32
        args.backbone_steps, args.backbone_batch, args.backbone_scenes = 4, 4, 32
    return args


def main(args):
    print(f"toy/prepare.py | {vars(args)}")
    torch.manual_seed(args.seed * 1000 + args.world)  # each world its own CLIP
    root, world = Path(args.out_dir), make_world(args.world)
    t0 = time.perf_counter()
    result = {} if args.backbone_only else world_and_clip(args, world, root, t0)
    # ---- the toy ImageNet: weights for f's backbone (train.py --backbone-weights) ----
    if args.backbone_steps:
        t1, n = time.perf_counter(), args.backbone_scenes
        images, tags = tagged_scenes(world, n + n // 8, args.size, args.seed, args.closeup,
                                     args.objects)
        net, losses = pretrain_backbone(images[:n], tags[:n], args)
        path = root / "resnet18_toy.pt"
        atomic_save({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, path)
        acc, exact = tag_accuracy(net, images[n:], tags[n:])
        print(f"toy ResNet-18: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f} in "
              f"{time.perf_counter() - t1:.0f} s, held-out tags {acc:.1f}% right ({exact:.1f}% of "
              f"images all right), saved {path}")
        result["backbone"] = {"losses": losses, "tag_accuracy": acc}
    if not args.backbone_only:
        write_marker(root, world=args.world, seed=args.seed, tiny=args.tiny,
                     backbone=bool(args.backbone_steps))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return result


def world_and_clip(args, world, root, t0):
    """Write the scenes, pretrain the toy CLIP on their captions, report its MaskCLIP readout."""
    # ---- data: the scenes ----
    captions = write_world(root, world, args.n_train, args.n_val, args.size, args.seed,
                           args.closeup, args.objects, lambda it, **kw: tqdm(it, leave=False, **kw))
    train_x, _, train_ids = load_split(root, "train")
    val_x, _, val_ids = load_split(root, "val")
    t1 = time.perf_counter()
    K = len(world.classes)
    print(f"wrote world {world.number}: {args.n_train} + {args.n_val} scenes of {K} classes "
          f"({', '.join(world.classes)}) to {root} in {t1 - t0:.0f} s")
    # ---- model: a tiny CLIP from a JSON config, pretrained contrastively ----
    cfg = root / "toyclip.json"
    cfg.write_text(json.dumps(toyclip_config(args.size, args.tiny, args.pool, args.clip_layers,
                                             args.clip_width), indent=1))
    clip, info = load_clip(pretrained="none", config=cfg)
    losses = pretrain_clip(clip, info["name"], train_x, [captions[i] for i in train_ids], args)
    weights = root / "toyclip.pt"
    atomic_save(clip.state_dict(), weights)
    t2 = time.perf_counter()
    print(f"toy CLIP: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f} in "
          f"{t2 - t1:.0f} s, saved {weights}")
    # ---- report: reload through the path every script uses, then score ----
    teacher = ClipTeacher(*load_clip(pretrained=str(weights), config=cfg))
    acc, chance = retrieval_accuracy(teacher, val_x, [captions[i] for i in val_ids])
    m = maskclip_miou(teacher, SegDataset("toy", root, "val"), args.size)
    things = [m["per_class"][t] for t in world.things if m["per_class"][t] is not None]
    print(f"val image->caption top-1: {acc:.1f}% (chance {chance:.1f}%)")
    print(f"val MaskCLIP (dense readout) mIoU {m['mIoU']:.1f} | pAcc {m['pAcc']:.1f} | mAcc "
          f"{m['mAcc']:.1f} | things {np.mean(things):.1f} (chance mIoU about {100 / K:.1f})")
    print("per class IoU: " + ", ".join(f"{n} {v:.0f}" for n, v in m["per_class"].items()
                                        if v is not None))
    return {"losses": losses, "retrieval": acc, "maskclip": m}


if __name__ == "__main__":
    try:
        main(get_args())
    except UserError as e:
        sys.exit(f"error: {e}")
