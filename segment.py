r"""segment.py: segment any image with any class names, zero-shot, in CLIP's joint space.

Each pixel takes the class whose text prototype (85 prompt templates, prompts.txt) is closest to the
pixel's dense CLIP embedding (MaskCLIP). Writes <stem>_overlay.png (image, colours, legend) and
<stem>_labels.png (palette PNG at the image's size, value = index of the class in --classes).

Real CLIP (weights fetched by open_clip once, or a local file):
    python segment.py photo.jpg --classes sky grass egg
    python segment.py photos/ --classes "tv monitor;television" sofa --clip RN50
    python segment.py photo.jpg --classes sky grass --clip-pretrained ~/weights/ViT-B-16.pt
A trained CLIP-S4 run instead of the teacher:
    python segment.py photo.jpg --classes sky grass egg --checkpoint runs/voc_vit16/ckpt.pt
Tiny CPU setting, seconds, no downloads (after `python toy/prepare.py`, see README):
    python segment.py data/toy/JPEGImages/val_0011.png --classes sky grass water road \
        --clip-config data/toy/toyclip.json --clip-pretrained data/toy/toyclip.pt --size 64
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import list_images, load_image, palette, resize_short_side, resize_labels, save_label_png
from util.files import UserError, atomic_save
from util.clip_loading import add_clip_args, resolve_clip_args
from util.loop import pick_device
from util.metrics import add_refine_args
from model import (CACHE_DIR, class_scores, key_smoothing, load_embedder, parse_class_names,
                   prompt_denoising, refiner)

TEST_SIDE = 448  # the short side the model sees by default: MaskCLIP's for 224-px CLIPs


def label_shares(labels, num_classes):
    """Fraction of pixels of each class: (H, W) ints -> (K,) float64 summing to 1."""
    counts = np.bincount(labels.reshape(-1), minlength=num_classes)[:num_classes]
    return counts / max(1, counts.sum())


def draw_overlay(img, labels, names, colours, shares=None, alpha=0.55, max_side=1600, min_side=320):
    """The picture a person looks at: the image, the image tinted by its label colours, and a legend
    naming each class (with its share of the image; absent classes greyed), in columns if needed.
    img (H, W, 3) uint8, labels (H, W) ints in [0, K), names K strings, colours (K, 3) uint8,
    shares (K,) fractions or None. Returns a PIL RGB image; small images are enlarged (nearest)."""
    from PIL import ImageDraw, ImageFont
    H, W = labels.shape
    scale = min(max_side / max(H, W), max(1.0, min_side / min(H, W)))
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    resample = Image.NEAREST if scale > 1 else Image.BILINEAR
    img = np.asarray(Image.fromarray(img).resize(size, resample))
    labels = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(size, Image.NEAREST))
    tint = (img * (1 - alpha) + colours[labels] * alpha).astype(np.uint8)  # (h, w, 3), display size
    pics = [Image.fromarray(a) for a in (img, tint)]
    font = ImageFont.load_default(size=16)
    rows = [n + (f"  {100 * s:.1f}%" if shares is not None else "") for n, s in
            zip(names, shares if shares is not None else [None] * len(names))]
    row_h, pad, gap = 24, 8, 6
    per_col = max(1, min(len(rows), (max(size[1], 240) - 2 * pad) // row_h))
    col_w = pad + 18 + pad + max(int(font.getlength(r)) for r in rows)
    n_cols = -(-len(rows) // per_col)
    canvas = Image.new("RGB", (2 * size[0] + gap + n_cols * col_w + pad,
                               max(size[1], 2 * pad + per_col * row_h)), (255, 255, 255))
    canvas.paste(pics[0], (0, 0))
    canvas.paste(pics[1], (size[0] + gap, 0))
    draw = ImageDraw.Draw(canvas)
    for k, r in enumerate(rows):
        x = 2 * size[0] + gap + (k // per_col) * col_w + pad
        y = pad + (k % per_col) * row_h
        absent = shares is not None and shares[k] == 0
        draw.rectangle([x, y + 2, x + 18, y + 20], fill=tuple(int(c) for c in colours[k]),
                       outline=(0, 0, 0))
        draw.text((x + 18 + pad, y + 2), r, fill=(160, 160, 160) if absent else (0, 0, 0),
                  font=font)
    return canvas


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--classes", nargs="*", default=None, required=True,
                   help="class names; ';' joins synonyms scored by their best match "
                   "('tv monitor;television')")
    # Model
    p.add_argument("--checkpoint", default=None,
                   help="a train.py checkpoint (CLIP-S4, MaskCLIP+, SegSort-only); its CLIP comes "
                   "with it")
    add_clip_args(p)
    p.add_argument("--size", type=int, default=None,
                   help="short side the model sees (default 448, MaskCLIP's for 224-px CLIPs; a "
                        "checkpoint's own --eval-size; a tiny CLIP needs its own)")
    p.add_argument("--max-side", type=int, default=1344,
                   help="cap on the teacher's long side, so very wide or huge images cannot blow "
                   "memory")
    p.add_argument("--key-smoothing", action="store_true",
                   help="MaskCLIP refinement: smooth scores by key similarity")
    p.add_argument("--ks-thresh", type=float, default=1.0,
                   help="key smoothing changes pixels whose top prob is below this")
    p.add_argument("--prompt-denoising", action="store_true",
                   help="MaskCLIP refinement: drop classes never confident")
    p.add_argument("--pd-thresh", type=float, default=0.5,
                   help="prompt denoising keeps a class whose peak prob reaches this")
    add_refine_args(p)
    # Output
    p.add_argument("--out-dir", default="out/segment", help="where the PNGs are written")
    p.add_argument("--bad-files", choices=["stop", "skip"], default="stop",
                   help="an unreadable image: stop = stop with one line naming it before "
                   "anything is written; skip = list the unreadable ones once and go on")
    p.add_argument("--cache-dir", default=str(CACHE_DIR),
                   help="text-prototype cache ('' turns it off)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto picks CUDA when present")
    return resolve_clip_args(p.parse_args(argv))


@torch.no_grad()
def segment_image(embed, stride, img, protos, owner, num_classes, size, max_side, pd_thresh=None,
                  ks_thresh=None, refine=None):
    """img (H, W, 3) uint8 -> labels (H, W) uint8, class indices in [0, K).
    embed: images (1, 3, h', w') in [0, 1] -> (unit features (1, D, h, w), keys or None);
    protos, owner: the teacher's text prototypes (S, D) and each row's class (S,);
    size, max_side: the short side the model sees and the cap on its long side;
    pd_thresh, ks_thresh: prompt denoising, key smoothing at that threshold (None: off);
    refine: model.refiner's post-process, (image, scores) -> scores, or None."""
    x = resize_short_side(img, size, stride, max_side)[None]  # (1, 3, h', w')
    feats, keys = embed(x)  # (1, D, h, w)
    scores = class_scores(feats, protos, owner, num_classes)  # (1, K, h, w)
    if pd_thresh is not None:
        scores = prompt_denoising(scores, pd_thresh)
    if ks_thresh is not None:
        scores = key_smoothing(scores, keys, ks_thresh)
    # Upsample the scores to the teacher's input size only, then the labels (not the K score maps)
    # to the original size: a 6000 x 4000 photo never holds K full-size float maps.
    scores = F.interpolate(scores, size=x.shape[2:], mode="bilinear",
                           align_corners=False)  # (1, K, h', w')
    if refine is not None:  # on the teacher's input image, before the labels are resized
        scores = refine(x.to(scores.device), scores)
    labels = scores[0].argmax(dim=0).to(torch.uint8).cpu().numpy()  # (h', w')
    return resize_labels(labels, img.shape[:2])


def main(args):
    print(f"segment.py | {vars(args)}")
    # ---- inputs: every check before any output is written ----
    classes = parse_class_names(args.classes)
    names = [c[0] for c in classes]
    if len(names) > 256:
        raise UserError(f"{len(names)} classes: the label PNG holds at most 256")
    paths, bad = list_images(args.images), []
    for p in paths:
        try:
            load_image(p)  # decode once up front: a bad file stops the run before any output
        except UserError as e:
            if args.bad_files == "stop":
                raise
            bad.append((p, e))
    if bad:
        print(f"--bad-files skip: leaving out {len(bad)} of {len(paths)} images:\n"
              + "\n".join(f"  {e}" for _, e in bad))
        paths = [p for p in paths if p not in {q for q, _ in bad}]
        if not paths:
            raise UserError("no readable image left")
    device = pick_device(args.device)
    print(f"device: {device} | {len(paths)} image(s) | classes: {', '.join(names)}")

    # ---- model: the frozen CLIP teacher, or a trained run with the teacher for the text ----
    t0 = time.perf_counter()
    key_smoothing = args.key_smoothing and not args.checkpoint  # keys: the teacher's, f has none
    embed, stride, teacher, run = load_embedder(device, args.checkpoint, clip=args.clip,
                                                clip_pretrained=args.clip_pretrained,
                                                clip_config=args.clip_config,
                                                quick_gelu=args.quick_gelu, teacher=args.teacher,
                                                with_keys=key_smoothing)
    size = args.size or (run["args"]["eval_size"] if run else None) or TEST_SIDE
    t1 = time.perf_counter()
    protos, owner = teacher.text_prototypes(args.classes, cache_dir=args.cache_dir or None)
    t2 = time.perf_counter()
    print(f"model build {t1 - t0:.1f} s | text prototypes {t2 - t1:.1f} s ({len(protos)} prompts "
          f"rows x 85 templates) | weights: {teacher.info['weights'] or 'random init'}")

    # ---- loop: segment, save, report ----
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colours = palette(len(names))
    refine = refiner(args.refine, args.pamr_iters, args.pamr_dilations)
    for p in paths:
        t = time.perf_counter()
        img = load_image(p)
        labels = segment_image(embed, stride, img, protos, owner, len(names), size, args.max_side,
                               args.pd_thresh if args.prompt_denoising else None,
                               args.ks_thresh if key_smoothing else None, refine)
        shares = label_shares(labels, len(names))
        save_label_png(out / f"{p.stem}_labels.png", labels, colours)
        atomic_save(draw_overlay(img, labels, names, colours, shares),
                    out / f"{p.stem}_overlay.png")
        top = ", ".join(f"{n} {100 * s:.1f}%"
                        for n, s in sorted(zip(names, shares), key=lambda a: -a[1]) if s > 0)
        print(f"{p.name} ({img.shape[1]}x{img.shape[0]}) {1000 * (time.perf_counter() - t):.0f} "
              f"ms | {top}")
    print(f"wrote {2 * len(paths)} PNGs to {out}")


if __name__ == "__main__":
    try:
        main(get_args())
    except UserError as e:
        sys.exit(f"error: {e}")
