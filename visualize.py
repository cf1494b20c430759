r"""visualize.py: the paper's figures, drawn from our checkpoints on any dataset (supplementary
A.5-A.6). This script computes what each figure shows; util/figures.py draws it.

  1. qualitative.png      image | ground truth | one column per method, segmented with the given
                          names; the legend marks the names not given in training (Fig. 1)
  2. embeddings_umap.png  per class, each method's average pixel embedding and the class's text
                          embedding, projected together with UMAP (Fig. 2)
  3. unknown_classes.png  for each unknown prototype CLIP-S4 learned, a strip of the validation
                          segments assigned to it (Fig. 3)
  4. segment_map.png      segment embeddings projected with UMAP, each drawn as its image patch,
                          framed green for a known class and orange for an unknown one (Fig. 4)

Methods: the teacher alone (--method maskclip) and/or up to three train.py checkpoints:
    python visualize.py --dataset context --method maskclip \
        --checkpoint runs/ctx_mcp/ckpt.pt runs/ctx_f0/ckpt.pt --classes sky grass dog boat
Toy world on a CPU (about a minute; the teacher at 64 px, each run at its own --eval-size):
    python visualize.py --dataset toy --method maskclip --checkpoint runs/toy/ckpt.pt
"""
import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from util import figures

from data import (DATASETS, IGNORE, SegDataset, add_bad_files_arg, first_names, palette,
                  resize_short_side, test_side)
from util.files import UserError
from util.metrics import DISPLAY_NAMES, majority_labels
from util.loop import pick_device
from losses import UnknownPrototypes, image_segments, restore_unknown, segment_means
from util.clip_loading import add_clip_args, load_clip, resolve_clip_args
from model import ClipTeacher, class_embeddings, class_scores, load_run, scale_or_clip

MAX_SIDE = 2048  # the long side of any image a method sees is capped here (resize_short_side)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Methods
    p.add_argument("--method", default=None, choices=["maskclip"],
                   help="also draw the frozen teacher alone")
    p.add_argument("--checkpoint", nargs="+", default=[],
                   help="up to three train.py checkpoints, drawn in this order")
    p.add_argument("--labels", nargs="+", default=None,
                   help="display names, one per method (default: from the runs)")
    add_clip_args(p)
    # Data
    p.add_argument("--dataset", default="voc", choices=DATASETS)
    add_bad_files_arg(p)
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--size", type=int, default=None,
                   help="short side for the checkpoints (default: each run's --eval-size, "
                   "else the dataset's)")
    p.add_argument("--teacher-size", type=int, default=None,
                   help="short side for the teacher (default: the dataset's test side, 64 for "
                   "the toy CLIP)")
    p.add_argument("--classes", nargs="+", default=None,
                   help="Fig. 1: the names to segment with (default: the dataset's)")
    p.add_argument("--unknown-classes", nargs="+", default=[],
                   help="teacher only: names to mark as unknown")
    # Figures
    p.add_argument("--figures", nargs="+", type=int, default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    p.add_argument("--images", type=int, default=4,
                   help="Fig. 1: number of images (chosen under --seed)")
    p.add_argument("--image-ids", nargs="+", default=None, help="Fig. 1: these image ids instead")
    p.add_argument("--pass-images", type=int, default=200,
                   help="Figs. 2-4: images in the embedding pass (0: all)")
    p.add_argument("--segments", type=int, default=16,
                   help="Figs. 3-4: k-means segments per image [choice]")
    p.add_argument("--strip", type=int, default=8,
                   help="Fig. 3: segments shown per unknown prototype")
    p.add_argument("--map-method", type=int, default=None,
                   help="Fig. 4: index of the method (default: CLIP-S4)")
    p.add_argument("--map-cells", type=int, default=24,
                   help="Fig. 4: at most one patch per cell of a C x C grid")
    p.add_argument("--frame", choices=["model", "truth"], default="model",
                   help="Fig. 4: unknown = assigned to no known name by the method (model), or "
                   "ground truth withheld / unlabelled (truth) [choice: the paper does not say]")
    p.add_argument("--assign", choices=["clip", "student"], default="clip",
                   help="Figs. 3-4, CLIP-S4 runs: which embedding of a segment picks its unknown "
                   "prototype: CLIP's, as in training (clip), or the trained network's (student) "
                   "[choice]")
    p.add_argument("--tau", type=float, default=0.5,
                   help="Fig. 4 --frame model, methods without unknown prototypes: a segment is "
                   "unknown when its softmax (scale 100) over known names is below tau")
    # Output
    p.add_argument("--out-dir", default="out/figures")
    p.add_argument("--dpi", type=int, default=130)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    return resolve_clip_args(p.parse_args(argv))


# ----------------------------------------------------------------------------------------------
# Methods: what each column of the figures is
# ----------------------------------------------------------------------------------------------
@dataclass(eq=False)  # methods compare by identity (main finds the reference run by it)
class Method:
    """One column of the figures.
    label: its title; embed: images (1, 3, h, w) float in [0, 1] -> unit features (1, D, h', w');
    stride: embed's grid stride; size: the short side its images are resized to; teacher: the
    ClipTeacher whose text it is scored against; text (K, D): the dataset's class embeddings;
    known: the names given in training; trained: a train.py run (not the teacher alone);
    unknown: the run's UnknownPrototypes, or None; unknown_text (K', D): the run's own known names,
    the text side of its unknown rule (None without unknown prototypes)."""
    label: str
    embed: Callable
    stride: int
    size: int
    teacher: ClipTeacher
    text: torch.Tensor
    known: list
    trained: bool
    unknown: UnknownPrototypes | None = None
    unknown_text: torch.Tensor | None = None


def teacher_features(teacher):
    """The teacher as a Method's embed: its unit dense features alone (ClipTeacher.dense's keys
    dropped)."""
    return lambda x: teacher.dense(x)[0]


def load_methods(args, device, classes, side):
    """The Methods to draw, in column order: the teacher alone (--method maskclip) first, then each
    --checkpoint. classes: the dataset's names (synonyms joined by ';'); side: its test side
    (data.test_side), the size of the methods that bring none of their own."""
    if not args.method and not args.checkpoint:
        raise UserError("give --method maskclip and/or --checkpoint PATH [PATH ...]")
    if len(args.checkpoint) > 3:
        raise UserError(f"--checkpoint: at most three, got {len(args.checkpoint)}")
    runs = [load_run(path, device) for path in args.checkpoint]  # (f, its teacher, checkpoint)
    defaults = [DISPLAY_NAMES.get(run["method"], run["method"]) for *_, run in runs]
    if args.method:  # the teacher alone: the first run's, else the one the CLIP flags name
        if runs:
            teacher = runs[0][1]
        else:
            clip = load_clip(args.clip, args.clip_pretrained, args.clip_config, args.quick_gelu,
                             device)
            teacher = ClipTeacher(*clip, args.teacher).to(device)
        defaults.insert(0, DISPLAY_NAMES[teacher.info["teacher"]])
    labels = args.labels or defaults
    if len(labels) != len(defaults):
        raise UserError(f"--labels: {len(labels)} names for {len(defaults)} methods")
    # a label that several methods share is numbered: "CLIP-S4 #1", "CLIP-S4 #2"
    labels = iter([label + (f" #{labels[:j].count(label) + 1}" if labels.count(label) > 1 else "")
                   for j, label in enumerate(labels)])
    methods = []
    if args.method:
        methods.append(Method(label=next(labels), embed=teacher_features(teacher),
                              stride=teacher.stride, size=args.teacher_size or side,
                              teacher=teacher, text=class_embeddings(teacher, classes),
                              known=[n for n in first_names(classes)
                                     if n not in args.unknown_classes],
                              trained=False))
    for f, teacher, run in runs:
        a = run["args"]  # the unknown rule of training: its tau, and its scale (0: the CLIP's own)
        unknown = None
        if run["method"] == "clip-s4":
            unknown = restore_unknown(run["unknown"], a["unknown_tau"],
                                      scale_or_clip(a["unknown_scale"], teacher.clip),
                                      a["unknown_rule"])
        # the text side of the modality-gap shift: the run's own known names, as in training
        unknown_text = None if unknown is None else class_embeddings(teacher, run["known"])
        methods.append(Method(label=next(labels), embed=f, stride=f.stride,
                              size=args.size or a["eval_size"] or side, teacher=teacher,
                              text=class_embeddings(teacher, classes),
                              known=first_names(run["known"]), trained=True, unknown=unknown,
                              unknown_text=unknown_text))
    return methods


@torch.no_grad()
def features(m, img):
    """Unit pixel embeddings of one uint8 image (H, W, 3) for Method m: (D, h, w) fp32, CPU."""
    x = resize_short_side(img, m.size, m.stride, MAX_SIDE)[None].to(m.teacher.device)
    return m.embed(x)[0].float().cpu()  # (1, D, h, w) -> (D, h, w)


def assign_unknown(m, p, known_idx, rule, tau, scale=100.0):
    """Which segments Method m leaves to no known name, and the unknown prototype of each (p: its
    EmbeddingPass). CLIP-S4 runs, rule "clip" (training's rule, losses.UnknownPrototypes.targets):
    CLIP's segment embedding c_s is unknown when its softmax over the known names is below the
    run's tau, and goes to its nearest prototype. Rule "student": the network's own segment
    embedding against [known text ; shifted prototypes], as in L_s. Other methods: their segment
    embedding's softmax (at `scale`) over the known names below `tau`.
    Returns unknown (S,) bool, prototype (S,) long (-1 for known), score (S,) for ordering."""
    if m.unknown is None:
        conf = F.softmax(scale * p.emb @ m.text.cpu()[known_idx].T, dim=1).amax(1)  # (S,)
        return conf < tau, torch.full_like(conf, -1, dtype=torch.long), -conf
    u, text = m.unknown, m.unknown_text.cpu()  # the run's own known names, as in training
    if rule == "clip":
        targets, unknown = u.targets(p.cs, text)
        proto = torch.where(unknown, targets - len(text), -1)
        score = (p.cs @ u.protos.T).amax(1)  # (S, M) -> (S,)
    else:
        score, j = (p.emb @ torch.cat([text, u.shifted(text)]).T).max(1)  # (S, K' + M) -> (S,)
        unknown = j >= len(text)
        proto = torch.where(unknown, j - len(text), -1)
    return unknown, proto, score


# ----------------------------------------------------------------------------------------------
# Fig. 1: qualitative comparison
# ----------------------------------------------------------------------------------------------
def qualitative_panels(methods, base, picks, class_names, dataset_names):
    """Each picked image segmented by every method with class_names (argmax of class_scores at the
    label size). Returns rows of (H, W, 3) panels, their column titles and the colours (K + 1, 3):
    one per name, black for ignore and for a ground-truth class not among class_names."""
    K = len(class_names)
    colours = palette(K + 1)
    colours[K] = 0
    remap = np.full(256, K, np.int64)  # dataset index -> index among the given names
    for j, n in enumerate(dataset_names):
        if n in class_names:
            remap[j] = class_names.index(n)
    has_gt = any(n in class_names for n in dataset_names)
    cols = ["image"] + (["ground truth"] if has_gt else []) + [m.label for m in methods]
    text = [m.teacher.text_prototypes(class_names) for m in methods]  # (protos, owner) each
    rows = []
    for i in tqdm(picks, desc="Fig. 1"):
        item = base[i]
        img, (H, W) = item["image"], item["label"].shape
        panels = [img] + ([colours[remap[item["label"]]]] if has_gt else [])
        for m, (protos, owner) in zip(methods, text):
            scores = class_scores(features(m, img)[None].to(protos.device), protos, owner, K)
            scores = F.interpolate(scores, size=(H, W), mode="bilinear", align_corners=False)
            pred = scores[0].argmax(0).cpu()  # (K, H, W) -> (H, W)
            panels.append(colours[pred.numpy()])
        rows.append(panels)
    return rows, cols, colours


# ----------------------------------------------------------------------------------------------
# The embedding pass (Figs. 2-4): class means, segments, patches
# ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class EmbeddingPass:
    """What one method's embedding pass holds. means (K, D): per-class mean pixel embedding, unit
    (zero where a class is absent), counts (K,) its pixels; per segment: emb (S, D) unit embedding,
    gt (S,) long majority ground-truth class (-1: unlabelled), patches (S, 48, 48, 3) uint8, and cs
    (S, D) CLIP's embedding of the segment (runs with unknown prototypes; None for the others)."""
    means: torch.Tensor
    counts: torch.Tensor
    emb: torch.Tensor
    gt: torch.Tensor
    patches: np.ndarray
    cs: torch.Tensor | None


def embedding_pass(methods, base, idx, K, segments, teacher_side):
    """One EmbeddingPass per method over the images `idx` of base (K classes): `segments` k-means
    segments per image (losses.image_segments); CLIP's segment embeddings are read from the teacher
    at short side `teacher_side`."""
    out = []
    for m in methods:
        D = m.text.shape[1]
        sums, counts = torch.zeros(K + 1, D), torch.zeros(K + 1)
        embs, gts, patches, cs = [], [], [], []
        for i in tqdm(idx, desc=f"embeddings: {m.label}"):
            item = base[i]
            feats = features(m, item["image"])  # (D, h, w)
            lab = torch.from_numpy(item["label"]).long()  # (H, W)
            small = F.interpolate(lab[None, None].float(), size=feats.shape[1:], mode="nearest")
            small = small[0, 0].long()  # (h, w)
            small = torch.where(small == IGNORE, K, small).flatten()  # ignore -> row K
            sums.index_add_(0, small, feats.flatten(1).T)
            counts += torch.bincount(small, minlength=K + 1).float()
            seg, emb = image_segments(feats[None], segments)
            if m.unknown is not None:  # CLIP's embedding of the same segments, c_s (training's)
                x = resize_short_side(item["image"], teacher_side, m.teacher.stride, MAX_SIDE)
                clip_map = m.teacher.dense(x[None])[0].float().cpu()  # (1, D, h', w')
                clip_map = F.interpolate(clip_map, size=feats.shape[1:], mode="bilinear",
                                         align_corners=False)  # (1, D, h, w)
                cs.append(segment_means(clip_map, seg))
            gt, ids = majority_labels(seg.ids[0], lab, K, seg.count)
            gts.append(gt)
            embs.append(emb)
            patches += [figures.thumbnail(item["image"], ids.numpy(), s) for s in range(seg.count)]
        out.append(EmbeddingPass(means=F.normalize(sums[:K], dim=1), counts=counts[:K],
                                 emb=torch.cat(embs), gt=torch.cat(gts), patches=np.stack(patches),
                                 cs=torch.cat(cs) if cs else None))
    return out


# ----------------------------------------------------------------------------------------------
# Fig. 3: which segments each unknown prototype holds
# ----------------------------------------------------------------------------------------------
def unknown_rows(m, p, names, assigned, strip):
    """One row per unknown prototype of Method m that validation segments were assigned to
    (assign_unknown; p: m's EmbeddingPass): (text, its best `strip` segments). The text says how
    many segments it holds and the ground-truth class most of them are; the rows with the most
    segments come first."""
    _, proto, score = assigned
    rows = []
    for u in range(len(m.unknown.protos)):
        sel = (proto == u).nonzero().squeeze(1)
        if len(sel):
            sel = sel[score[sel].argsort(descending=True)]
            gt = p.gt[sel]
            gt = gt[gt >= 0]
            top = "unlabelled"
            if len(gt):  # the ground truth most of the prototype's segments hold, and its share
                mode = gt.mode().values
                top = f"{names[int(mode)]} {100 * float((gt == mode).float().mean()):.0f}%"
            rows.append((len(sel), f"u{u}: {len(sel)} segment{'s' * (len(sel) > 1)}\nmost: {top}",
                         sel[:strip]))
    rows.sort(key=lambda r: -r[0])
    return [(text, sel) for _, text, sel in rows]


def figure_1(args, methods, base, names, known, rng):
    """Fig. 1, qualitative results: the picked images (--image-ids, else --images at random), each
    method's segmentation with --classes (default: the dataset's names)."""
    if args.image_ids:
        ids = [it[0] for it in base.items]
        missing = [i for i in args.image_ids if i not in ids]
        if missing:
            raise UserError(f"--image-ids: {missing} not in {args.dataset} {args.split}")
        picks = [ids.index(i) for i in args.image_ids]
    else:
        picks = rng.choice(len(base), min(args.images, len(base)), replace=False)
        picks = sorted(picks.tolist())
    class_names = args.classes or names
    if len(set(class_names)) != len(class_names):
        raise UserError("--classes: a name is given twice")
    rows, cols, colours = qualitative_panels(methods, base, picks, class_names, names)
    return figures.qualitative(rows, cols, [base[i]["id"] for i in picks], colours, class_names,
                               known)


def figure_2(args, methods, passes, names):
    """Fig. 2, the class means of each method's segment embeddings and the text prototypes in one
    UMAP, over the classes present in every method's pass; prints their alignment to the text."""
    counts = torch.stack([p.counts for p in passes]).min(0).values
    present = (counts > 0).nonzero().squeeze(1).tolist()
    fig, align = figures.class_means_umap([m.label for m in methods],
                                          [p.means[present] for p in passes],
                                          methods[0].text.cpu()[present],
                                          [names[k] for k in present], args.seed)
    print("mean cosine of class means to text: "
          + ", ".join(f"{k} {v:.3f}" for k, v in align.items()))
    return fig


def figure_3(args, methods, passes, names, known_idx):
    """Fig. 3, the validation segments each unknown prototype took, a strip per prototype, for the
    first CLIP-S4 run with learned prototypes; None (and a line saying why) when there is none."""
    j = next((j for j, m in enumerate(methods) if m.unknown is not None), None)
    if j is None:
        print("Fig. 3 skipped: no CLIP-S4 checkpoint with learned unknown prototypes among the "
              "methods")
        return None
    assigned = assign_unknown(methods[j], passes[j], known_idx, args.assign, args.tau)
    rows = unknown_rows(methods[j], passes[j], names, assigned, args.strip)
    if not rows:
        print(f"Fig. 3 skipped: no validation segment went to an unknown prototype "
              f"(--assign {args.assign})")
        return None
    return figures.unknown_strips(methods[j].label, rows, passes[j].patches, args.strip)


def figure_4(args, methods, passes, names, known, known_idx, ref):
    """Fig. 4, a 2-D map of one method's segment embeddings, known against unknown (--frame truth:
    by the ground truth's name; else by the method's own assignment)."""
    j = args.map_method if args.map_method is not None else methods.index(ref)
    if not 0 <= j < len(methods):
        raise UserError(f"--map-method {j}: choose 0..{len(methods) - 1}")
    m, p = methods[j], passes[j]
    if args.frame == "truth":
        is_known = np.array([g >= 0 and names[g] in known for g in p.gt.tolist()])
    else:
        is_known = ~assign_unknown(m, p, known_idx, args.assign, args.tau)[0].numpy()
    return figures.segment_map(m.label, p.emb.numpy(), p.patches, is_known, args.map_cells,
                               args.seed)[0]


def main(args):
    import matplotlib
    matplotlib.use("Agg")
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    base = SegDataset(args.dataset, args.data_root, args.split, bad_files=args.bad_files)
    names, side = first_names(base.classes), test_side(base)
    methods = load_methods(args, device, base.classes, side)
    # The run whose training split marks names known / unknown: a CLIP-S4 with unknown prototypes,
    # else the last checkpoint, else the teacher with --unknown-classes.
    trained = [m for m in methods if m.trained]
    ref = next((m for m in methods if m.unknown is not None),
               trained[-1] if trained else methods[0])
    known = set(ref.known)
    known_idx = [k for k, n in enumerate(names) if n in known]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    written = {}

    def save(fig, name):
        import matplotlib.pyplot as plt
        fig.savefig(out / name, dpi=args.dpi)
        written[name] = dict(path=str(out / name), **figures.facts(fig))
        plt.close(fig)
        print(f"wrote {out / name}")

    if 1 in args.figures:
        save(figure_1(args, methods, base, names, known, rng), "qualitative.png")
    if {2, 3, 4} & set(args.figures):
        n = min(args.pass_images or len(base), len(base))
        idx = sorted(np.random.default_rng(args.seed).choice(len(base), n, replace=False).tolist())
        passes = embedding_pass(methods, base, idx, len(names), args.segments,
                                args.teacher_size or side)
        if 2 in args.figures:
            save(figure_2(args, methods, passes, names), "embeddings_umap.png")
        fig = figure_3(args, methods, passes, names, known_idx) if 3 in args.figures else None
        if fig is not None:
            save(fig, "unknown_classes.png")
        if 4 in args.figures:
            save(figure_4(args, methods, passes, names, known, known_idx, ref), "segment_map.png")
    return written


if __name__ == "__main__":
    try:
        main(get_args())
    except UserError as e:
        sys.exit(f"error: {e}")
