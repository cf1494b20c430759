"""Images, label maps and datasets for CLIP-S4.

Notation used in shape comments: B images, H x W pixels, K classes.

Public API (errors and safe writes: util/files.py; scores and the k-NN vote: util/metrics.py):
    load_image(path)               -> (H, W, 3) uint8 RGB, EXIF-rotated, any PIL mode
    list_images(paths)             -> the image files among files and folders
    image_tensor(img)              -> (1, 3, H, W) float in [0, 1]
    resize_short_side(img, ...)    -> short side fixed, sides multiples of a stride (any model's
                                      input: the teacher's, f's, the probe's, the figures')
    palette(n), save_label_png()   -> colours and palette PNG label maps
    resize_labels(labels, size)    -> a label map resized (nearest)
    first_names(classes)           -> each class's display name (its first synonym)
    SegDataset(name, root, split)  -> voc, context, cocostuff, folder, toy readers, and the
                                      field's voc21, context60, coco-object, cityscapes, ade20k
                                      (DATASETS; find_base(name, root): where one lies)
    add_bad_files_arg(parser)      -> --bad-files {stop,check,skip} for SegDataset's bad_files
    TwoViews, warp(), superpixels()-> CLIP-S4 training samples and their geometry
    test_side(base), EvalImages    -> the short side a dataset is scored at, evaluation samples
    collate                        -> batching
"""
import math
import os
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from util.files import UserError, atomic_save

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IGNORE = 255  # label value that is never scored


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
    return torch.tensor(img).permute(2, 0, 1)[None].float().div(255.0)  # HWC -> (1, 3, H, W)


def teacher_size(H, W, short_side, stride, max_long_side):
    """The (h, w) an H x W image is resized to: short side `short_side`, long side capped at
    `max_long_side` (very wide images shrink further), both rounded to multiples of `stride`."""
    scale = min(short_side / min(H, W), max_long_side / max(H, W))
    return (max(stride, round(H * scale / stride) * stride),
            max(stride, round(W * scale / stride) * stride))


def resize_short_side(img, short_side, stride, max_long_side):
    """A model's input (the teacher's sources, f's and the probe's images, the figures'): img
    (H, W, 3) uint8 resized with PIL's bicubic filter (antialiased when shrinking, as CLIP's own
    preprocessing) to teacher_size(...). Resizing the uint8 image before any float conversion keeps
    a 6000 x 4000 photo cheap. Returns (3, h, w) float32 in [0, 1]."""
    h, w = teacher_size(img.shape[0], img.shape[1], short_side, stride, max_long_side)
    small = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))
    return image_tensor(small)[0]


# ----------------------------------------------------------------------------------------------
# Label maps and colours
# ----------------------------------------------------------------------------------------------
def palette(n):
    """n distinct RGB colours, (n, 3) uint8: matplotlib's tab20, then golden-ratio hues."""
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


def resize_labels(labels, size):
    """Nearest-neighbour resize of an (h, w) uint8 label map to size = (H, W)."""
    if labels.shape == tuple(size):
        return labels
    return np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))


# ----------------------------------------------------------------------------------------------
# Datasets: class names (MaskCLIP's natural-language spellings) and readers
# ----------------------------------------------------------------------------------------------
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "table", "dog", "horse", "motorbike", "person", "potted plant", "sheep",
               "sofa", "train", "tv monitor"]
# The supplementary's four class-free folds; concatenated they are Pascal Context-59 in label order.
CONTEXT_FOLDS = [
    ["airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
     "building", "bus", "cabinet", "car", "cat"],
    ["ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door", "fence",
     "floor", "flower", "food", "grass", "ground"],
    ["horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
     "potted plant", "road", "rock", "sheep", "shelves", "sidewalk"],
    ["sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tv monitor",
     "wall", "water", "window", "wood"]]
CONTEXT_CLASSES = [c for fold in CONTEXT_FOLDS for c in fold]
# COCO-Stuff-171 in labelTrainIds order; the stuff names lose their "-other"/"-stuff" suffixes and
# read as phrases ("wall-brick" -> "brick wall"): our spelling choice, overridable by --class-names.
COCOSTUFF_CLASSES = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,"
    "stop sign,parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,"
    "backpack,umbrella,handbag,tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,"
    "baseball glove,skateboard,surfboard,tennis racket,bottle,wine glass,cup,fork,knife,spoon,bowl,"
    "banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,donut,cake,chair,couch,"
    "potted plant,bed,dining table,toilet,tv,laptop,mouse,remote,keyboard,cell phone,microwave,"
    "oven,toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,hair drier,toothbrush,"
    "banner,blanket,branch,bridge,building,bush,cabinet,cage,cardboard,carpet,ceiling,ceiling tile,"
    "cloth,clothes,clouds,counter,cupboard,curtain,desk,dirt,door,fence,marble floor,floor,"
    "stone floor,tile floor,wood floor,flower,fog,food,fruit,furniture,grass,gravel,ground,hill,"
    "house,leaves,light,mat,metal,mirror,moss,mountain,mud,napkin,net,paper,pavement,pillow,plant,"
    "plastic,platform,playingfield,railing,railroad,river,road,rock,roof,rug,salad,sand,sea,shelf,"
    "sky,skyscraper,snow,solid,stairs,stone,straw,structural,table,tent,textile,towel,tree,"
    "vegetable,brick wall,concrete wall,wall,panel wall,stone wall,tile wall,wood wall,water,"
    "waterdrops,window blind,window,wood"
).split(",")
# Cityscapes' 19 evaluated classes in labelTrainIds order, and ADE20K's 150 in annotation order
# (value k + 1), both as mmsegmentation's dataset classes spell them.
CITYSCAPES_CLASSES = (
    "road,sidewalk,building,wall,fence,pole,traffic light,traffic sign,vegetation,terrain,sky,"
    "person,rider,car,truck,bus,train,motorcycle,bicycle"
).split(",")
ADE20K_CLASSES = (
    "wall,building,sky,floor,tree,ceiling,road,bed,windowpane,grass,cabinet,sidewalk,person,earth,"
    "door,table,mountain,plant,curtain,chair,car,water,painting,sofa,shelf,house,sea,mirror,rug,"
    "field,armchair,seat,fence,desk,rock,wardrobe,lamp,bathtub,railing,cushion,base,box,column,"
    "signboard,chest of drawers,counter,sand,sink,skyscraper,fireplace,refrigerator,grandstand,"
    "path,stairs,runway,case,pool table,pillow,screen door,stairway,river,bridge,bookcase,blind,"
    "coffee table,toilet,flower,book,hill,bench,countertop,stove,palm,kitchen island,computer,"
    "swivel chair,boat,bar,arcade machine,hovel,bus,towel,light,truck,tower,chandelier,awning,"
    "streetlight,booth,television receiver,airplane,dirt track,apparel,pole,land,bannister,"
    "escalator,ottoman,bottle,buffet,poster,stage,van,ship,fountain,conveyer belt,canopy,washer,"
    "plaything,swimming pool,stool,barrel,basket,waterfall,tent,bag,minibike,cradle,oven,ball,"
    "food,step,tank,trade name,microwave,pot,animal,bicycle,lake,dishwasher,screen,blanket,"
    "sculpture,hood,sconce,vase,traffic light,tray,ashcan,fan,pier,crt screen,plate,monitor,"
    "bulletin board,shower,radiator,glass,clock,flag"
).split(",")
COCO_THINGS = 80  # COCO-Stuff's labelTrainIds 0-79 are COCO's things, 80-170 its stuff
# The three sets scored with a background class (index 0): its pixels are predicted by the
# background rule (model.background_rule), never by a prototype of their own alone.
WITH_BACKGROUND = ("voc21", "context60", "coco-object")

# How a dataset sits on disk. bases: the base folders tried under --data-root; images: the image
# folder ("{split}" filled in) or one per split; labels: the label folder per split; lists: the
# split list per split (None: every label file in the folder is an item, LABEL_GLOBS); root: the
# default --data-root.
Layout = namedtuple("Layout", "bases images labels lists root")
LAYOUTS = {
    "voc": Layout(
        ["VOCdevkit/VOC2012", "."],
        "JPEGImages",
        {"train": "SegmentationClassAug", "val": "SegmentationClass"},
        {"train": "ImageSets/Segmentation/train_aug.txt", "val": "ImageSets/Segmentation/val.txt"},
        "data/voc",
    ),
    "context": Layout(
        ["VOCdevkit/VOC2010", "."],
        "JPEGImages",
        {"train": "SegmentationClassContext", "val": "SegmentationClassContext"},
        {"train": "ImageSets/SegmentationContext/train.txt",
         "val": "ImageSets/SegmentationContext/val.txt"},
        "data/context",
    ),
    "cocostuff": Layout(
        ["coco_stuff164k", "."],
        "images/{split}2017",
        {"train": "annotations/train2017", "val": "annotations/val2017"},
        {"train": None, "val": None},
        "data/cocostuff",
    ),
    "folder": Layout(
        ["."],
        "JPEGImages",
        {"train": "SegmentationClass", "val": "SegmentationClass"},
        {"train": "ImageSets/Segmentation/train.txt", "val": "ImageSets/Segmentation/val.txt"},
        None,
    ),
}
LAYOUTS["toy"] = LAYOUTS["folder"]._replace(root="data/toy")
# The field's eight benchmarks (docs/benchmarks-protocol.md): with-background variants of VOC and
# Context read the same files; COCO-Object reads COCO-Stuff's labels and maps them at load time.
LAYOUTS["voc21"] = LAYOUTS["voc"]
LAYOUTS["context60"] = LAYOUTS["context"]
LAYOUTS["coco-object"] = LAYOUTS["cocostuff"]
LAYOUTS["cityscapes"] = Layout(
    ["cityscapes", "."],
    "leftImg8bit/{split}",
    {"train": "gtFine/train", "val": "gtFine/val"},
    {"train": None, "val": None},
    "data/cityscapes",
)
LAYOUTS["ade20k"] = Layout(
    ["ADEChallengeData2016", "."],
    {"train": "images/training", "val": "images/validation"},
    {"train": "annotations/training", "val": "annotations/validation"},
    {"train": None, "val": None},
    "data/ade20k",
)
# Layouts without a split list: every label file matching the pattern (relative to the label
# folder) is an item; (pattern, label suffix, image suffix), the image in the same sub-folder.
LABEL_GLOBS = {
    "cocostuff": ("*_labelTrainIds.png", "_labelTrainIds.png", ".jpg"),
    "coco-object": ("*_labelTrainIds.png", "_labelTrainIds.png", ".jpg"),
    "cityscapes": ("*/*_gtFine_labelTrainIds.png", "_gtFine_labelTrainIds.png", "_leftImg8bit.png"),
    "ade20k": ("*.png", ".png", ".jpg"),
}
DATASETS = list(LAYOUTS)  # the --dataset choices of every script


def first_names(classes):
    """The name each class is shown and looked up by: its first synonym ('tv monitor;television'
    -> 'tv monitor'). classes: names with optional ';'-separated synonyms -> list of str."""
    return [c.split(";")[0] for c in classes]


def image_folder(name, split):
    """The image folder of a layout's split, relative to its base."""
    image_dir = LAYOUTS[name].images
    return image_dir[split] if isinstance(image_dir, dict) else image_dir.format(split=split)


def read_class_file(path):
    """classes.txt: one class per line, line index = label id, optional synonyms separated by ';'
    (ours) or ',' (the peers' cls_*.txt files). Returns one string per class, synonyms joined by
    ';' (model.parse_class_names' form)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such class-name file (one class per line, line index = label "
                        f"id)")
    names = [";".join(s.strip() for s in ln.replace(",", ";").split(";") if s.strip())
             for ln in path.read_text().splitlines() if ln.strip()]
    if not names:
        raise UserError(f"{path}: no class names in it")
    return names


def find_base(name, root):
    """The dataset's base folder under root, or a UserError naming what was expected and found."""
    bases, image_dir = LAYOUTS[name].bases, image_folder(name, "val")
    root = Path(root or LAYOUTS[name].root or ".")
    if not root.is_dir():
        raise UserError(f"--data-root {root}: no such folder (--dataset {name})")
    for b in bases:
        if (root / b / image_dir).is_dir():
            return root / b
    found = sorted(p.name for p in root.iterdir())[:8]
    raise UserError(f"--dataset {name}: expected "
                    f"{' or '.join(str(root / b / image_dir) for b in bases)}, "
                    f"found {found or 'an empty folder'} in {root}")


def class_map(name, base, background=False):
    """A dataset's class names and the map from its raw label values to class indices (255 =
    ignore). Returns (raw names by label value, lut (256,) uint8, the scored class names)."""
    lut = np.arange(256, dtype=np.uint8)
    if name == "voc":
        raw = ["background"] + VOC_CLASSES
        if not background:
            lut = np.concatenate([[IGNORE], np.arange(255)]).astype(np.uint8)  # 0 -> ignore
    elif name == "context":
        raw = ["background"] + CONTEXT_CLASSES
        lut = np.concatenate([[IGNORE], np.arange(255)]).astype(np.uint8)
    elif name in ("cocostuff", "coco-object"):
        raw = list(COCOSTUFF_CLASSES)
    elif name in ("voc21", "context60"):
        raw = ["background"] + (VOC_CLASSES if name == "voc21" else CONTEXT_CLASSES)
    elif name == "cityscapes":
        raw = list(CITYSCAPES_CLASSES)
    elif name == "ade20k":
        raw = ["other"] + ADE20K_CLASSES
        lut = np.concatenate([[IGNORE], np.arange(255)]).astype(np.uint8)  # 0 -> ignore
    else:
        raw = read_class_file(base / "classes.txt")
    lut[255] = IGNORE
    names = [n for v, n in enumerate(raw) if lut[v] != IGNORE]
    if name == "coco-object":
        # The peers' cvt_coco_object.py on COCO-Stuff's labels: thing t -> t + 1, every stuff
        # class -> 0; its 255 -> 256 is stored in a uint8 PNG as 0 by numpy 1.x (the peers pin
        # 1.26), so unlabelled pixels are background too.
        lut = np.zeros(256, np.uint8)
        lut[:COCO_THINGS] = np.arange(1, COCO_THINGS + 1)
        names = ["background"] + raw[:COCO_THINGS]
    return raw, lut, names


class SegDataset(torch.utils.data.Dataset):
    """A semantic-segmentation split: item i -> {"image": (H, W, 3) uint8, "label": (H, W) uint8
    indices with 255 = ignore, "id": str}.

    voc: 20 object classes with background ignored (MaskCLIP's language-driven protocol), or 21 with
    `background=True` (the k-NN protocol). context: 59 classes, background ignored. cocostuff: 171.
    folder / toy: any VOC-layout folder with classes.txt. The field's benchmarks: voc21 and
    context60 (20 / 59 classes + background at index 0), coco-object (COCO's 80 things +
    background: every stuff class and unlabelled pixel is background), cityscapes (19), ade20k
    (150; value 0 ignored, k -> k-1). .background: the background class's index, or None.

    A bad file (unreadable image or label, sizes that differ, a label value outside the classes),
    by `bad_files` (the scripts' --bad-files): "stop" raises a UserError naming the file when the
    item is read; "check" reads every item first and stops at the first bad one; "skip" reads
    every item first, prints the bad ones once and leaves them out (.bad lists them)."""

    def __init__(self, name, root=None, split="val", background=False, class_names=None,
                 bad_files="stop"):
        if name not in LAYOUTS:
            raise UserError(f"--dataset {name}: choose from {', '.join(LAYOUTS)}")
        if split not in ("train", "val"):
            raise UserError(f"--split {split}: choose train or val")
        base = find_base(name, root)
        image_dir = base / image_folder(name, split)
        label_dir = base / LAYOUTS[name].labels[split]
        self.name, self.split, self.bad = name, split, []
        raw, self.lut, names = class_map(name, base, background)
        self.num_raw = len(raw)
        self.background = 0 if name in WITH_BACKGROUND else None
        self.classes = read_class_file(class_names) if class_names else names
        if len(self.classes) != len(names):
            raise UserError(f"{class_names}: {len(self.classes)} names, but {name} has "
                            f"{len(names)} classes")
        self.items = self._list_items(name, base, split, image_dir, label_dir)
        if not self.items:
            raise UserError(f"--dataset {name} --split {split}: no items found under {base}")
        if bad_files not in BAD_FILES:
            raise UserError(f"--bad-files {bad_files}: choose from {', '.join(BAD_FILES)}")
        if bad_files != "stop":
            self.check_files(skip=bad_files == "skip")

    def _list_items(self, name, base, split, image_dir, label_dir):
        """The split's items, [(id, image path, label path)]: from its split list, or every label
        file of the folder (LABEL_GLOBS)."""
        if LAYOUTS[name].lists[split] is None:
            if not label_dir.is_dir():
                raise UserError(f"--dataset {name}: expected label folder {label_dir}")
            pattern, label_suffix, image_suffix = LABEL_GLOBS[name]
            items = []
            for lp in sorted(label_dir.glob(pattern)):
                i = lp.name[: -len(label_suffix)]
                sub = lp.parent.relative_to(label_dir)  # Cityscapes' city folders
                items.append((i, image_dir / sub / f"{i}{image_suffix}", lp))
            return items
        lst = base / LAYOUTS[name].lists[split]
        if not lst.is_file():
            raise UserError(f"--dataset {name}: expected split list {lst}")
        ids = lst.read_text().split()
        return [(i, self._image_path(image_dir, i), label_dir / f"{i}.png") for i in ids]

    def check_files(self, skip=False, workers=None):
        """Read every item once (in `workers` processes; default: up to 4 for large splits).
        skip=False: a UserError naming the first bad file. skip=True: the bad items are printed
        once, listed in .bad and left out."""
        if workers is None:
            workers = 0 if len(self) < CHECK_PARALLEL_FROM else min(4, os.cpu_count() or 1)
        loader = torch.utils.data.DataLoader(_CheckedItems(self), batch_size=None,
                                             num_workers=workers)
        problems = []
        for i, problem in enumerate(tqdm(loader, total=len(self), leave=False,
                                         desc=f"checking {self.name} {self.split}")):
            if problem and not skip:
                raise UserError(problem)
            if problem:
                problems.append((i, problem))
        if not problems:
            return
        self.bad += [p for _, p in problems]
        print(f"--bad-files skip: leaving out {len(problems)} of {len(self)} items of {self.name} "
              f"{self.split}:\n" + "\n".join(f"  {p}" for _, p in problems))
        drop = {i for i, _ in problems}
        self.items = [it for i, it in enumerate(self.items) if i not in drop]
        if not self.items:
            raise UserError(f"--dataset {self.name} --split {self.split}: no readable item at all")

    @staticmethod
    def _image_path(folder, i):
        for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".bmp", ".webp"):
            if (folder / f"{i}{ext}").is_file():
                return folder / f"{i}{ext}"
        return folder / f"{i}.jpg"  # missing: load_image names it

    def __len__(self):
        return len(self.items)

    def typical_side(self, n=50):
        """The median short side of the first n images, read from their headers (no decoding);
        None when none can be read."""
        sides = []
        for _, path, _ in self.items[:n]:
            try:
                with Image.open(path) as im:
                    sides.append(min(im.size))
            except (OSError, UnidentifiedImageError, ValueError):
                continue
        return int(np.median(sides)) if sides else None

    def load(self, i):
        """Read item i, checking the label against the image and the class list."""
        sid, ip, lp = self.items[i]
        img = load_image(ip)
        if not lp.is_file():
            raise UserError(f"{lp}: no such label file")
        try:
            raw = np.asarray(Image.open(lp))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"{lp}: not a readable label PNG ({type(e).__name__})")
        if raw.ndim != 2 or raw.shape != img.shape[:2]:
            raise UserError(f"{lp}: label {raw.shape} does not match image {img.shape[:2]}")
        valid = raw[raw != 255]
        if valid.size and int(valid.max()) >= self.num_raw:
            raise UserError(f"{lp}: label value {int(valid.max())}, but {self.name} has "
                            f"{self.num_raw} raw classes")
        return {"image": img, "label": self.lut[raw], "id": sid}

    def __getitem__(self, i):
        return self.load(i)


BAD_FILES = ("stop", "check", "skip")
CHECK_PARALLEL_FROM = 200  # check_files reads smaller splits in the main process


class _CheckedItems(torch.utils.data.Dataset):
    """check_files' pass: item i -> "" when it reads, else the one-line problem."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        try:
            self.base.load(i)
            return ""
        except UserError as e:
            return str(e)


def add_bad_files_arg(p):
    """--bad-files, shared by every script that reads a dataset (SegDataset's bad_files)."""
    p.add_argument("--bad-files", choices=BAD_FILES, default="stop",
                   help="a corrupt image or label, sizes that differ or a label value outside the "
                   "classes: stop = stop with one line naming the file when it is read; check = "
                   "read every file first and stop at the first bad one; skip = read every file "
                   "first, list the bad ones once and go on without them")


# ----------------------------------------------------------------------------------------------
# Training samples (docs/method.md section 5): two augmented views, their geometry, the teacher's
# un-augmented source and superpixel regions. Geometry is a box in normalised source coordinates
# (y0, x0, y1, x1) in [0, 1] plus a flip, so it warps maps of any resolution.
# ----------------------------------------------------------------------------------------------
def random_box(g, aspect, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random-resized-crop box (y0, x0, y1, x1) in [0, 1] for a source of aspect W/H.
    The paper fixes the 336 crop only; the scale and ratio ranges are torchvision's usual ones
    except the smallest scale, 0.25 not 0.08, so a view keeps enough context for CLIP [choice]."""
    for _ in range(10):
        area = float(torch.empty(1).uniform_(*scale, generator=g))
        r = math.exp(float(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                   generator=g)))
        h, w = math.sqrt(area * aspect / r), math.sqrt(area * r / aspect)  # fractions of H and of W
        if h <= 1 and w <= 1:
            y0 = float(torch.rand(1, generator=g)) * (1 - h)
            x0 = float(torch.rand(1, generator=g)) * (1 - w)
            return (y0, x0, y0 + h, x0 + w)
    return (0.0, 0.0, 1.0, 1.0)


def warp(maps, boxes, flips, size, mode="bilinear", pad=0.0):
    """Resample maps computed on the whole source onto views: view pixel (i, j) reads the source at
    the matching point of its box (pixel centres, align_corners=False), mirrored when flipped.
    maps (B, C, h, w) float, boxes (B, 4) (y0, x0, y1, x1) in [0, 1], flips (B,) bool, size (S_h,
    S_w). mode "bilinear" for features, "nearest" for region ids; outside the source reads `pad`.
    Returns (B, C, S_h, S_w)."""
    B = maps.shape[0]
    boxes = torch.as_tensor(boxes, dtype=torch.float32, device=maps.device).view(B, 4)
    y0, x0, y1, x1 = boxes.unbind(1)
    sx = torch.where(torch.as_tensor(flips, device=maps.device).view(B), -(x1 - x0), x1 - x0)
    cx = (x0 + x1) - 1  # box centre in grid units [-1, 1]
    theta = torch.zeros(B, 2, 3, device=maps.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = y1 - y0, (y0 + y1) - 1
    grid = F.affine_grid(theta, (B, maps.shape[1], *size), align_corners=False)  # (B, S_h, S_w, 2)
    out = F.grid_sample(maps - pad, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out + pad


def colour_jitter(x, g, strength=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2):
    """SimCLR-style photometric augmentation of one view, drawn from generator g [choice: SimCLR's
    strengths; the paper does not list its augmentations]. x (3, S, S) in [0, 1]."""
    import torchvision.transforms.v2.functional as TF
    u = torch.rand(7, generator=g)
    if u[0] < p_jitter:
        b, c, s, h = strength
        x = TF.adjust_brightness(x, 1 + b * (2 * float(u[1]) - 1))
        x = TF.adjust_contrast(x, 1 + c * (2 * float(u[2]) - 1))
        x = TF.adjust_saturation(x, 1 + s * (2 * float(u[3]) - 1))
        x = TF.adjust_hue(x, h * (2 * float(u[4]) - 1))
    if u[5] < p_gray:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    return x.clamp(0, 1)


def superpixels(img, n_segments=64, compactness=10.0, cache_file=None):
    """SLIC superpixels of the source (scikit-image) [choice: SLIC, about 64 per image], cached on
    disk as a 16-bit PNG for later epochs. img (H, W, 3) uint8 -> (H, W) int64 ids from 0."""
    if cache_file is not None and Path(cache_file).is_file():
        return np.asarray(Image.open(cache_file)).astype(np.int64)
    from skimage.segmentation import slic
    seg = slic(img, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
    if cache_file is not None:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_save(Image.fromarray(seg.astype(np.uint16)), cache_file)
    return seg.astype(np.int64)


class TwoViews(torch.utils.data.Dataset):
    """Training samples of CLIP-S4 from a SegDataset (labels are never used for training):
        views   (V=2, 3, S, S) float in [0, 1]: random resized crop, flip, colour jitter, grayscale
        boxes   (V, 4) float, flips (V,) bool: each view's geometry in the source
        source  (3, h, w) float in [0, 1]: the un-augmented image for the CLIP teacher, short side
                `teacher_side`, sides multiples of `stride`
        regions (V, S, S) long: superpixel ids warped onto each view (nearest), -1 = outside
        labels  (V, S, S) long: the ground truth warped the same way, IGNORE outside; only the
                pixel-following diagnostic reads it (loop.FollowPixels), no loss does
    Deterministic under `seed`: sample i of epoch e uses its own generator, whatever the workers."""

    def __init__(self, base, crop_size=336, teacher_side=448, stride=16, max_side=1344,
                 n_segments=64, cache_dir=None, seed=0, scale=(0.25, 1.0), jitter=0.4,
                 gray=0.2):
        self.base, self.crop, self.teacher_side = base, crop_size, teacher_side
        self.stride, self.max_side, self.scale = stride, max_side, tuple(scale)
        self.strength, self.gray = (jitter, jitter, jitter, jitter / 4), gray  # SimCLR's ratios
        self.n_segments, self.cache_dir, self.seed, self.epoch = n_segments, cache_dir, seed, 0

    def __len__(self):
        return len(self.base)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) % 2 ** 62)
        item = self.base[i]
        img = item["image"]
        H, W = img.shape[:2]
        slic_file = f"{item['id']}_slic{self.n_segments}.png"
        cache = Path(self.cache_dir) / slic_file if self.cache_dir else None
        seg = torch.from_numpy(superpixels(img, self.n_segments, cache_file=cache))
        seg = seg.float()[None, None]  # (1, 1, H, W)
        src = image_tensor(img)  # (1, 3, H, W)
        boxes = torch.tensor([random_box(g, W / H, self.scale) for _ in range(2)])  # (V, 4)
        flips = torch.rand(2, generator=g) < 0.5
        size = (self.crop, self.crop)
        views = warp(src.expand(2, -1, -1, -1), boxes, flips, size)  # (V, 3, S, S)
        views = torch.stack([colour_jitter(v, g, self.strength, p_gray=self.gray) for v in views])
        regions = warp(seg.expand(2, -1, -1, -1), boxes, flips, size, mode="nearest", pad=-1.0)
        # ground truth on the views, read by the pixel-following diagnostic only, never by a loss
        gt = torch.from_numpy(item["label"]).float()[None, None].expand(2, -1, -1, -1)
        labels = warp(gt, boxes, flips, size, mode="nearest", pad=float(IGNORE))[:, 0].long()
        source = resize_short_side(img, self.teacher_side, self.stride, self.max_side)  # (3, h, w)
        return {"views": views, "boxes": boxes, "flips": flips, "regions": regions[:, 0].long(),
                "labels": labels, "source": source, "id": item["id"]}


# MaskCLIP's test sides; toy: its CLIP's; the with-background variants as their base sets, and
# 512 for Cityscapes and ADE20K (our choice: MaskCLIP's 512 short side). evaluate.py --protocol
# peers uses the peers' sides instead (PEERS_SIDE).
EVAL_SIDE = {"voc": 512, "context": 520, "cocostuff": 512, "toy": 64, "voc21": 512,
             "context60": 520, "coco-object": 512, "cityscapes": 512, "ade20k": 512}
SMALL_SIDE = 224  # images with a shorter side are "small": scored at their own size


def test_side(base):
    """The short side a dataset is scored at by default: MaskCLIP's for the paper's datasets, the
    images' own (median) side for small images of a folder, else 512."""
    if base.name in EVAL_SIDE:
        return EVAL_SIDE[base.name]
    side = base.typical_side()
    return side if side and side < SMALL_SIDE else 512


class EvalImages(torch.utils.data.Dataset):
    """Evaluation samples: the image resized to short side `side` (default test_side(base): 512,
    520 for Context), sides multiples of `stride`, as (3, h, w) float in [0, 1]; the label at
    original size (H, W) long, 255 = ignore."""

    def __init__(self, base, side=None, stride=16, max_side=2048):
        side = side or test_side(base)
        self.base, self.side, self.stride, self.max_side = base, side, stride, max_side

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = self.base[i]
        x = resize_short_side(item["image"], self.side, self.stride, self.max_side)
        return {"image": x, "label": torch.from_numpy(item["label"]).long(), "id": item["id"]}


def collate(items):
    """Batch dicts: tensors of one shape are stacked, anything else (sizes, ids) kept as lists."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        same = all(torch.is_tensor(v) and v.shape == vals[0].shape for v in vals)
        out[k] = torch.stack(vals) if same else vals
    return out
