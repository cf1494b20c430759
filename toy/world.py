"""toy/world.py: the procedural worlds of toy/prepare.py. A world is a set of class names with their
looks (stuff: a colour and a texture; things: a shape, colours and the stuff they are usually found
on) and a way of laying them out; a scene is one image of it with pixel labels and a caption.

World 0 is the hand-written world the toy recipe was tuned on (sky, grass, ..., ball, box, ...).
Every other world number draws an independent world from its own seed: other names, colours,
textures, shapes, habitats and layout ranges (toy/prepare.py --world N). docs/toy-world.md shows
both.

What makes a toy world a miniature of the real problem (docs/toy-world.md):
- stuff fills space with texture; things are small, solid, shaped blobs a patch-8 CLIP sees in
  2-6 patches, so a dense readout knows them only roughly;
- things share colours with each other (a red ball, a red car), so colour alone confuses them;
- things sit on their habitat most of the time (cars on roads, kites in the sky), so a CLIP learns
  the context with the thing and its dense map bleeds the thing's name into the stuff around it;
- some training images are close-ups (one stuff) and object photos (one large thing), as web photos
  are, which is where a CLIP learns which word goes with which look.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data import IGNORE

COLOURS = {"red": (200, 30, 30), "yellow": (235, 200, 40), "orange": (240, 130, 20),
           "pink": (240, 120, 180), "blue": (40, 70, 200), "white": (240, 240, 240),
           "black": (25, 25, 25), "purple": (130, 50, 170), "brown": (130, 80, 40),
           "green": (30, 110, 40), "cyan": (40, 190, 200), "grey": (128, 128, 128)}
PATTERNS = ("gradient", "speckle", "waves", "grain", "shadows", "line", "bricks", "planks",
            "stripes", "checker", "dots", "blotches")
SHAPES = ("disc", "box", "tree", "car", "diamond", "star", "triangle", "cross", "ring", "hexagon",
          "dome", "lamp")
FRAMES = ["a photo of {}.", "{}.", "an image showing {}.", "a scene with {}.", "there is {} here.",
          "this picture has {}.", "a toy world with {}.", "look at {}!"]
# Names a drawn world takes its classes from (world 0 uses none of them)
STUFF_POOL = ["lava", "moss", "ice", "mud", "cloud", "carpet", "tiles", "gravel", "fog", "marsh",
              "dune", "field", "ocean", "rock", "ceiling", "curtain", "desert", "forest", "lake",
              "meadow"]
THING_POOL = ["apple", "crate", "pine", "bus", "flag", "moon", "cup", "fish", "hat", "lamp",
              "bell", "drum", "shoe", "sign", "leaf", "robot"]


@dataclass
class World:
    """A world's classes and layout. stuff: name -> (rgb, pattern, pattern parameter); things: name
    -> (shape, colour names, habitat stuff names); top: the stuff above an outdoor horizon;
    grounds: what lies below it; indoor: (wall, floor) of indoor scenes."""
    number: int
    stuff: dict
    things: dict
    top: str
    grounds: list
    indoor: tuple
    p_outdoor: float = 0.75
    thing_size: tuple = (0.12, 0.26)  # thing radius, share of the scene side
    p_habitat: float = 0.75  # chance that a thing is placed on its habitat when that is in view
    articles: dict = field(default_factory=dict)

    @property
    def classes(self):
        """Class names in label order: the stuff, then the things."""
        return list(self.stuff) + list(self.things)


WORLD0 = World(
    number=0,
    stuff={"sky": ((110, 170, 235), "gradient", 60), "grass": ((60, 150, 50), "speckle", 30),
           "water": ((40, 90, 170), "waves", 25), "sand": ((215, 190, 130), "grain", 12),
           "snow": ((235, 240, 250), "shadows", 15), "road": ((80, 80, 85), "line", 0.7),
           "wall": ((165, 75, 55), "bricks", 12), "floor": ((150, 105, 60), "planks", 8)},
    things={"ball": ("disc", ["red", "orange"], ["grass", "sand"]),
            "box": ("box", ["brown", "yellow"], ["floor", "road"]),
            "tree": ("tree", ["green"], ["grass", "snow"]),
            "car": ("car", ["blue", "white", "red"], ["road"]),
            "kite": ("diamond", ["pink", "purple"], ["sky"]),
            "star": ("star", ["yellow", "white"], ["sky", "wall"])},
    top="sky", grounds=["grass", "water", "sand", "snow", "road"], indoor=("wall", "floor"),
    articles={"sky": "the", "grass": "some", "water": "the", "sand": "some", "snow": "some",
              "road": "a", "wall": "a", "floor": "the"})


def make_world(number):
    """World `number`: 0 is WORLD0; any other number draws 8 stuff and 6 things from its own seed
    (names from the pools, base colours kept apart, a pattern each, a shape each, 1-2 colours per
    thing, 1-2 habitats per thing, and its own layout ranges)."""
    if number == 0:
        return WORLD0
    rng = np.random.default_rng([1234, number])
    names = [str(n) for n in rng.choice(STUFF_POOL, size=8, replace=False)]
    bases = []
    while len(bases) < 8:  # base colours at least 70 apart, so each stuff has its own look
        c = tuple(int(v) for v in rng.integers(30, 240, 3))
        if all(np.linalg.norm(np.subtract(c, b)) >= 70 for b in bases):
            bases.append(c)
    pats = rng.choice(PATTERNS, size=8, replace=False)
    amp = {"gradient": 60, "speckle": 30, "waves": 25, "grain": 14, "shadows": 15, "line": 0.7,
           "bricks": 12, "planks": 8, "stripes": 25, "checker": 20, "dots": 40, "blotches": 30}
    stuff = {n: (b, str(p), amp[p] * float(rng.uniform(0.7, 1.3)) if p != "line" else
                 float(rng.uniform(0.6, 0.85))) for n, b, p in zip(names, bases, pats)}
    thing_names = [str(n) for n in rng.choice(THING_POOL, size=6, replace=False)]
    shapes = rng.choice(SHAPES, size=6, replace=False)
    colours = list(COLOURS)
    things = {}
    for n, s in zip(thing_names, shapes):
        looks = rng.choice(colours, size=rng.integers(1, 3), replace=False)
        habitats = rng.choice(names, size=rng.integers(1, 3), replace=False)
        things[n] = (str(s), [str(c) for c in looks], [str(h) for h in habitats])
    lo = float(rng.uniform(0.1, 0.14))
    return World(number=number, stuff=stuff, things=things, top=names[0], grounds=names[1:6],
                 indoor=(names[6], names[7]), p_outdoor=float(rng.uniform(0.6, 0.85)),
                 thing_size=(lo, lo + float(rng.uniform(0.1, 0.14))),
                 p_habitat=float(rng.uniform(0.6, 0.85)))


def texture(spec, rng, H, W):
    """An (H, W, 3) float texture of one stuff: spec = (base rgb, pattern, parameter)."""
    base, pattern, a = spec
    y, x = np.mgrid[0:H, 0:W] / max(H, W)
    noise = rng.normal(0, 1, (H, W))
    tint = np.array(base, float) / max(base)  # a pattern in the stuff's own hue
    t = np.ones((H, W, 3)) * np.array(base, float) * rng.uniform(0.85, 1.15)
    if pattern == "gradient":  # brighter towards the bottom (the horizon)
        t += y[..., None] * a + noise[..., None] * 3
    elif pattern == "speckle":
        t += noise[..., None] * a * tint
    elif pattern == "waves":  # horizontal waves
        t += (np.sin(y * 60 + rng.uniform(0, 6) + np.sin(x * 12) * 2) * a)[..., None] * tint
    elif pattern == "grain":
        t += noise[..., None] * a
    elif pattern == "shadows":  # faint diagonal shadows
        t -= (np.abs(np.sin(x * 9 + y * 5)) * a)[..., None] * np.array([1, 0.6, 0])
    elif pattern == "line":  # a dashed line at height a
        line = (np.abs(y - rng.uniform(a - 0.1, a + 0.1)) < 0.02) & (np.sin(x * 40) > 0)
        t[line] = (230, 210, 60)
    elif pattern == "bricks":  # bricks and mortar, a rows
        row = (y * a).astype(int)
        mortar = ((y * a) % 1 < 0.15) | (((x * a / 2) + 0.5 * (row % 2)) % 1 < 0.08)
        t[mortar] = (200, 195, 185)
    elif pattern == "planks":  # wooden planks, grain of height a
        t += (np.sin(x * 80) * a + ((x * 8) % 1 < 0.06) * -60)[..., None]
    elif pattern == "stripes":  # diagonal stripes
        t += ((((x + y) * 10 + rng.uniform(0, 1)) % 1 < 0.5) * a - a / 2)[..., None]
    elif pattern == "checker":
        t += (((x * 8).astype(int) + (y * 8).astype(int)) % 2 * a - a / 2)[..., None]
    elif pattern == "dots":  # light dots
        t[rng.random((H, W)) < 0.06] += a
    else:  # blotches: smooth low-frequency noise
        coarse = Image.fromarray(rng.normal(0, 1, (5, 5)).astype(np.float32))
        blot = np.asarray(coarse.resize((W, H), Image.BILINEAR))
        t += blot[..., None] * a * tint
    return t


def thing_shapes(shape, cx, cy, r, col):
    """The PIL drawing calls of one thing: a list of (method, xy, colour)."""
    dark = tuple(c // 2 for c in col)
    if shape == "disc":
        return [("ellipse", [cx - r, cy - r, cx + r, cy + r], col)]
    if shape == "box":
        return [("rectangle", [cx - r, cy - r, cx + r, cy + r], col),
                ("line", [cx - r, cy - r, cx + r, cy + r], dark)]
    if shape == "tree":
        return [("rectangle", [cx - r / 4, cy, cx + r / 4, cy + r], COLOURS["brown"]),
                ("polygon", [(cx, cy - r), (cx - r * 0.8, cy + r * 0.3),
                             (cx + r * 0.8, cy + r * 0.3)], col)]
    if shape == "car":
        return [("rectangle", [cx - r, cy - r / 2, cx + r, cy + r / 3], col),
                ("ellipse", [cx - r * 0.8, cy + r / 6, cx - r * 0.3, cy + r * 0.6], (20, 20, 20)),
                ("ellipse", [cx + r * 0.3, cy + r / 6, cx + r * 0.8, cy + r * 0.6], (20, 20, 20))]
    if shape == "diamond":
        return [("polygon", [(cx, cy - r), (cx + r * 0.6, cy), (cx, cy + r), (cx - r * 0.6, cy)],
                 col)]
    if shape in ("star", "hexagon"):
        n = 10 if shape == "star" else 6
        rad = lambda i: r if shape == "hexagon" or i % 2 == 0 else r * 0.45
        return [("polygon", [(cx + rad(i) * math.sin(2 * i * math.pi / n),
                              cy - rad(i) * math.cos(2 * i * math.pi / n)) for i in range(n)],
                 col)]
    if shape == "triangle":
        return [("polygon", [(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], col)]
    if shape == "cross":
        return [("rectangle", [cx - r, cy - r / 3, cx + r, cy + r / 3], col),
                ("rectangle", [cx - r / 3, cy - r, cx + r / 3, cy + r], col)]
    if shape == "ring":
        return [("ellipse", [cx - r, cy - r, cx + r, cy + r], col),
                ("ellipse", [cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], dark)]
    if shape == "dome":  # a half disc standing on its flat side
        return [("pieslice", [cx - r, cy - r / 2, cx + r, cy + r * 1.5], col)]
    # lamp: a shade on a stem
    return [("polygon", [(cx - r * 0.4, cy - r), (cx + r * 0.4, cy - r), (cx + r, cy),
                         (cx - r, cy)], col),
            ("rectangle", [cx - r / 6, cy, cx + r / 6, cy + r], dark)]


def draw_thing(world, name, rng, img, lab, k, S, zoom=1.0, where=None):
    """Draw one thing into img (PIL RGB) and lab (PIL L) with label k, its radius a share of S
    (world.thing_size, times zoom), centred at `where` (x, y) if given, else anywhere in view.
    Returns its colour name."""
    shape, colours, _ = world.things[name]
    r = min(rng.uniform(*world.thing_size) * zoom, 0.45) * S
    if where is None:
        cx, cy = rng.uniform(r, S - r), rng.uniform(r, S - r)
    else:
        cx, cy = np.clip(where[0], r, S - r), np.clip(where[1], r, S - r)
    cname = str(rng.choice(colours))
    col = tuple(int(np.clip(c * rng.uniform(0.85, 1.15), 0, 255)) for c in COLOURS[cname])
    di, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)
    for kind, xy, c in thing_shapes(shape, cx, cy, r, col):
        kw = ({"width": max(1, int(r / 5))} if kind == "line" else
              {"start": 180, "end": 360} if kind == "pieslice" else {})
        getattr(di, kind)(xy, fill=c, **kw)
        getattr(dl, kind)(xy, fill=k, **kw)
    return cname


def habitat_spot(world, name, lab, rng):
    """Where a thing goes: with chance world.p_habitat a random pixel (x, y) of one of its
    habitats, if any is in view; else None (anywhere)."""
    if rng.random() >= world.p_habitat:
        return None
    ids = [world.classes.index(h) for h in world.things[name][2]]
    ys, xs = np.nonzero(np.isin(lab, ids))
    if len(ys) == 0:
        return None
    j = rng.integers(len(ys))
    return float(xs[j]), float(ys[j])


def make_scene(rng, S=64, closeup=0.0, objects=0.0, world=WORLD0):
    """One scene of `world`: with chance `closeup` one stuff filling the frame and at most one
    large thing; with chance `objects` an object photo (one thing at 2.5x on one stuff); else a
    full scene (an outdoor horizon over 1-2 grounds, or a wall over a floor, and 1-3 things).
    Returns img (S, S, 3) uint8, label (S, S) uint8 (255 = ignore: the pixels on either side of a
    thing's outline, as VOC marks object borders), a caption and the set of class names it names
    (all present)."""
    classes, kind = world.classes, rng.random()
    near, photo = kind < closeup, closeup <= kind < closeup + objects
    if near or photo:
        top, bottoms = str(rng.choice(list(world.stuff))), []
    elif rng.random() < world.p_outdoor:
        top = world.top
        bottoms = [str(b) for b in rng.choice(world.grounds, size=rng.integers(1, 3),
                                              replace=False)]
    else:
        top, bottoms = world.indoor
        bottoms = [bottoms]
    x = np.arange(S)
    horizon = (rng.uniform(0.3, 0.6) * S
               + np.sin(x / S * rng.uniform(2, 9) + rng.uniform(0, 6)) * rng.uniform(0, 4))
    yy = np.arange(S)[:, None]
    lab = np.full((S, S), classes.index(top), np.uint8)
    img = texture(world.stuff[top], rng, S, S)
    for i, name in enumerate(bottoms):  # ground bands from the horizon down
        mask = yy >= (horizon + i * rng.uniform(0.15, 0.3) * S)[None, :]
        lab[mask] = classes.index(name)
        img[mask] = texture(world.stuff[name], rng, S, S)[mask]
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    thing_lab = Image.new("L", (S, S), 0)
    n = 1 if photo else rng.integers(0, 2) if near else rng.integers(1, 4)
    things = [str(t) for t in rng.choice(list(world.things), size=n, replace=False)]
    colour_of = {}
    for name in things:
        zoom = 2.5 if photo else 2.0 if near else 1.0
        if photo:  # near the middle
            where = (S / 2 + rng.normal(0, S / 10), S / 2 + rng.normal(0, S / 10))
        else:
            where = habitat_spot(world, name, lab, rng)
        colour_of[name] = draw_thing(world, name, rng, img, thing_lab, classes.index(name) + 1,
                                     S, zoom, where)
    tl = np.asarray(thing_lab).astype(np.int32) - 1  # -1 = no thing
    lab[tl >= 0] = tl[tl >= 0]
    edge = np.zeros_like(tl, bool)  # 1-px ignore band where a thing meets anything else
    edge[:-1] |= tl[:-1] != tl[1:]
    edge[1:] |= tl[:-1] != tl[1:]
    edge[:, :-1] |= tl[:, :-1] != tl[:, 1:]
    edge[:, 1:] |= tl[:, :-1] != tl[:, 1:]
    lab[edge] = IGNORE
    caption, named = make_caption(world, rng, lab, colour_of)
    return np.asarray(img), lab, caption, named


def make_caption(world, rng, lab, colour_of):
    """A caption in varied wording naming what is clearly visible: things covering >= 1.5% of the
    image, stuff >= 5% (each stuff named with chance 0.85). Never names an absent class."""
    classes = world.classes
    area = np.bincount(lab.reshape(-1), minlength=256)[: len(classes)] / lab.size
    phrases, named = [], set()
    for k, name in enumerate(classes):
        if name in world.things and area[k] >= 0.015:
            adj = colour_of[name] + " " if rng.random() < 0.5 else ""
            phrases.append(f"{rng.choice(['a', 'the', 'one'])} {adj}{name}")
        elif name in world.stuff and area[k] >= 0.05 and rng.random() < 0.85:
            phrases.append(f"{world.articles.get(name, 'the')} {name}")
        else:
            continue
        named.add(name)
    if not phrases:  # at least the largest region
        k = int(area.argmax())
        phrases, named = [f"{world.articles.get(classes[k], 'a')} {classes[k]}"], {classes[k]}
    rng.shuffle(phrases)
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return rng.choice(FRAMES).format(body), named


# The version of the files toy/prepare.py writes. Raise it with any change to this file or to
# toy/prepare.py that changes those files: a folder made by another version is then remade by
# train.py --dataset toy, never half-used.
WORLD_VERSION = 1
MARKER = "world.json"  # written last, so a folder without it was cut short


def write_marker(root, **about):
    """Mark `root` as a complete world of WORLD_VERSION (toy/prepare.py's last step)."""
    (Path(root) / MARKER).write_text(json.dumps({"version": WORLD_VERSION, **about}, indent=1))


def world_state(root):
    """What `root` holds: "ready" (a complete world of WORLD_VERSION), "missing" (no folder, or an
    empty one), "stale" (a toy world of another version, or one cut short) or "foreign" (files that
    are not a toy world's, which nothing here may overwrite)."""
    root = Path(root)
    if not root.is_dir() or not any(root.iterdir()):
        return "missing"
    try:
        if json.loads((root / MARKER).read_text()).get("version") == WORLD_VERSION:
            return "ready"
    except (OSError, ValueError, AttributeError):
        pass
    ours = ("captions.json", "toyclip.json", "toyclip.pt", "resnet18_toy.pt")
    return "stale" if any((root / n).exists() for n in ours) else "foreign"


def write_world(root, world, n_train, n_val, size, seed, closeup=0.3, objects=0.2, progress=None):
    """Write a world's dataset in VOC layout: JPEGImages/ (PNG files), SegmentationClass/,
    ImageSets/Segmentation/{train,val}.txt, classes.txt, captions.json. Deterministic under
    (world, seed). Train holds close-ups and object photos in the given shares; val full scenes
    only. `progress` wraps an iterable (tqdm). Returns the captions by image id."""
    root, progress = Path(root), progress or (lambda it, **kw: it)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    captions = {}
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{i:04d}" for i in range(n)]
        for i, name in enumerate(progress(ids, desc=f"world {world.number} {split} scenes")):
            rng = np.random.default_rng([seed, world.number, split == "val", i])
            train = split == "train"
            img, lab, cap, _ = make_scene(rng, size, closeup if train else 0.0,
                                          objects if train else 0.0, world)
            Image.fromarray(img).save(root / "JPEGImages" / f"{name}.png")
            Image.fromarray(lab).save(root / "SegmentationClass" / f"{name}.png")
            captions[name] = cap
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(world.classes) + "\n")
    (root / "captions.json").write_text(json.dumps(captions, indent=0))
    return captions
