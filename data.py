"""Images, label maps and datasets for CLIP-S4.

Notation used in shape comments: B images, H x W pixels, K classes.

Public API:
    UserError                      -> an expected failure (bad file, bad flag): scripts print one line
    load_image(path)               -> (H, W, 3) uint8 RGB, EXIF-rotated, any PIL mode
    image_tensor(img)              -> (1, 3, H, W) float in [0, 1]
    resize_for_teacher(x, ...)     -> the teacher's input: short side fixed, multiple of its stride
    palette(n), save_label_png()   -> colours and palette PNG label maps
"""
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IGNORE = 255  # label value that is never scored


class UserError(Exception):
    """An expected failure caused by the input (missing file, bad flag, wrong checkpoint).
    Scripts print its message on one line and exit with status 1, no stack trace."""


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def load_image(path):
    """Read any image PIL can decode into (H, W, 3) uint8 RGB in [0, 255].
    EXIF orientation is applied; grayscale is replicated; alpha is dropped; 16-bit images are
    rescaled to 8 bits (not clipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__})")
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def list_images(paths):
    """Expand files and folders (their images, sorted, not recursive) into a list of image paths."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise UserError(f"{p}: folder holds no images ({', '.join(IMAGE_EXTS)})")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    return out


def image_tensor(img):
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255.0)  # HWC -> (1, 3, H, W)


def teacher_size(H, W, short_side, stride, max_long_side):
    """The (h, w) an H x W image is resized to: short side `short_side`, long side capped at
    `max_long_side` (very wide images shrink further), both rounded to multiples of `stride`."""
    scale = min(short_side / min(H, W), max_long_side / max(H, W))
    return (max(stride, round(H * scale / stride) * stride), max(stride, round(W * scale / stride) * stride))


def resize_for_teacher(x, short_side, stride, max_long_side):
    """x (B, 3, H, W) in [0, 1] -> (B, 3, h, w) bicubic (antialiased when shrinking), clamped to [0, 1]."""
    h, w = teacher_size(x.shape[2], x.shape[3], short_side, stride, max_long_side)
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)


# ----------------------------------------------------------------------------------------------
# Label maps and colours
# ----------------------------------------------------------------------------------------------
def palette(n):
    """n distinct RGB colours, (n, 3) uint8: the 20 of matplotlib's tab20, then golden-ratio hues."""
    base = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
            (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
            (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229)]
    import colorsys
    for i in range(len(base), n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.9)
        base.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.array(base[:n], dtype=np.uint8).reshape(-1, 3)


def save_label_png(path, labels, colours):
    """Write a palette PNG: pixel value = class index, the palette gives the colours.
    labels (H, W) uint8, colours (K, 3) uint8 with K <= 256. Written atomically (temp + rename)."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(colours)] = colours
    img.putpalette(pal.reshape(-1).tolist())
    atomic_save(img, path)


def atomic_save(img, path):
    """Save a PIL image through a temporary file and a rename, so a crash leaves no half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    img.save(tmp)
    os.replace(tmp, path)


def label_shares(labels, num_classes):
    """Fraction of pixels of each class: (H, W) ints -> (K,) float64 summing to 1."""
    counts = np.bincount(labels.reshape(-1), minlength=num_classes)[:num_classes]
    return counts / max(1, counts.sum())


def resize_labels(labels, size):
    """Nearest-neighbour resize of an (h, w) uint8 label map to size = (H, W)."""
    if labels.shape == tuple(size):
        return labels
    return np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))



def draw_overlay(img, labels, names, colours, shares=None, alpha=0.5, max_side=2048):
    """The picture a person looks at: the image tinted by its label colours, with a legend panel
    naming each class (and its share of the image) on the right.
    img (H, W, 3) uint8, labels (H, W) ints in [0, K), names K strings, colours (K, 3) uint8,
    shares (K,) fractions or None. Returns a PIL RGB image, long side at most `max_side`."""
    from PIL import ImageDraw, ImageFont
    tint = (img * (1 - alpha) + colours[labels] * alpha).astype(np.uint8)  # (H, W, 3)
    pic = Image.fromarray(tint)
    scale = min(1.0, max_side / max(pic.size))
    if scale < 1.0:
        pic = pic.resize((max(1, round(pic.width * scale)), max(1, round(pic.height * scale))), Image.BILINEAR)
    font = ImageFont.load_default(size=16)
    rows = [f"{n}" + (f"  {100 * s:.1f}%" if shares is not None else "") for n, s in
            zip(names, shares if shares is not None else [None] * len(names))]
    row_h, pad = 24, 8
    text_w = max(int(font.getlength(r)) for r in rows)
    panel_w = pad * 3 + 18 + text_w
    H = max(pic.height, pad * 2 + row_h * len(rows))
    canvas = Image.new("RGB", (pic.width + panel_w, H), (255, 255, 255))
    canvas.paste(pic, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, r in enumerate(rows):
        x, y = pic.width + pad, pad + k * row_h
        draw.rectangle([x, y + 2, x + 18, y + 20], fill=tuple(int(c) for c in colours[k]), outline=(0, 0, 0))
        draw.text((x + 18 + pad, y + 2), r, fill=(0, 0, 0), font=font)
    return canvas
