"""evaluate.py: language-driven segmentation scores (mIoU, pAcc, mAcc, per-class IoU).

Each pixel takes the dataset class whose text prototype (85 templates) is nearest to the pixel's
embedding; the scores come from one confusion matrix over the split. A class-free run (trained with
names withheld) also reports known and unknown classes separately. Several runs at once (the four
Pascal Context fold checkpoints, or the teacher with several --unknown-fold) add a mean +- std row,
and where the supplementary has a number for the row (Tables 1-2: COCO-Stuff, Context with unknown
classes) it is printed beside ours.

The teacher alone (MaskCLIP), and trained runs (CLIP-S4, MaskCLIP+, SegSort-only checkpoints):
    python evaluate.py --dataset context --data-root data/context --method maskclip \
        --unknown-fold 0 1 2 3
    python evaluate.py --dataset context --data-root data/context \
        --checkpoint runs/ctx_f{0,1,2,3}/ckpt.pt
    python evaluate.py --dataset cocostuff --checkpoint runs/coco_vit16/ckpt.pt --slide
Toy world on a CPU (seconds; the toy CLIP is found in data/toy):
    python evaluate.py --dataset toy --method maskclip
    python evaluate.py --dataset toy --checkpoint runs/toy/ckpt.pt --with-teacher --json t.json
The field's eight benchmarks under the peers' protocol (docs/benchmarks-protocol.md), one row
with the published row of the same teacher beside it:
    python evaluate.py --suite eight --data-root data --method maskclip --teacher naclip \
        --protocol peers
    python evaluate.py --suite eight --data-root data --checkpoint runs/voc/ckpt.pt \
        --protocol peers --refine pamr --json out/eight.json
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from data import (CONTEXT_FOLDS, DATASETS, WITH_BACKGROUND, EvalImages, SegDataset, UserError,
                  add_bad_files_arg, find_base, language_confusion, per_class_line,
                  segmentation_metrics, write_json)
from clip_loading import add_clip_args, resolve_clip_args
from model import (DISPLAY_NAMES, TEMPLATE_FILES, add_refine_args, background_rule, class_scores,
                   key_smoothing, load_embedder, pick_device, prompt_denoising, read_templates,
                   refiner)

# The supplementary's numbers (pAcc, mAcc) for the rows it has. Table 1: COCO-Stuff, every name
# known, by CLIP model. Table 2: Pascal Context with one fold unknown, all 59 classes, mean (+- std)
# over the four folds. The main paper's mIoU tables are not in the supplementary, so no mIoU column.
PAPER = {
    ("cocostuff", "maskclip", "RN50"): ("22.0", "26.1"),
    ("cocostuff", "maskclip", "ViT-B-16"): ("27.7", "32.4"),
    ("cocostuff", "maskclip+", "RN50"): ("26.1", "32.2"),
    ("cocostuff", "maskclip+", "ViT-B-16"): ("35.7", "39.9"),
    ("cocostuff", "clip-s4", "RN50"): ("28.6", "36.2"),
    ("cocostuff", "clip-s4", "ViT-B-16"): ("36.8", "43.6"),
    ("context-folds", "maskclip"): ("45.2", "46.4"),
    ("context-folds", "maskclip+"): ("43.1±4.3", "40.3±2.0"),
    ("context-folds", "clip-s4"): ("54.4±1.0", "52.3±0.5"),
}

# ---- the field's eight benchmarks (docs/benchmarks-protocol.md has the source of every value) ----
# In the column order of the peers' tables (NACLIP's paper), with their short titles.
SUITE = {"voc21": "VOC21", "context60": "PC60", "coco-object": "Object", "voc": "VOC20",
         "context": "PC59", "cocostuff": "Stuff", "cityscapes": "City", "ade20k": "ADE"}
# --protocol peers, NACLIP's configs/cfg_*.py and naclip.py: test short side and slide window
# (None: the whole image) per dataset; windows step by PEERS_STRIDE; 80 OpenAI templates.
PEERS_SIDE = {"cityscapes": 560}  # 336 elsewhere
PEERS_WINDOW = {"voc21": None, "voc": None}  # 224 elsewhere
PEERS_SHORT_SIDE, PEERS_CROP, PEERS_STRIDE = 336, 224, 112
PEER_NAMES = Path(__file__).with_name("classnames")  # their cls_*.txt, as peers_<dataset>.txt
# The background rule's threshold per with-background dataset (NACLIP's prob_thd; SCLIP has the
# same, ClearCLIP 0.5 / 0.15 / 0.4) and its softmax scale (NACLIP's logit_scale).
BG_THRESHOLD = {"voc21": 0.1, "context60": 0.1, "coco-object": 0.1}
LOGIT_SCALE = 40.0
# Published mIoU, ViT-B/16 with OpenAI's weights, in SUITE order (None: not in that table), by
# (teacher, --refine): (where it is published, the eight numbers).
PUBLISHED = {
    ("maskclip", "none"): ("ClearCLIP README, assets/results.png",
                           [None, None, None, 74.9, 26.4, 16.4, 12.6, 9.8]),
    ("sclip", "none"): ("SCLIP README", [59.63, 31.74, 33.52, 81.54, 34.46, 22.77, 32.34, 16.45]),
    ("clearclip", "none"): ("ClearCLIP README, assets/results.png",
                            [None, None, None, 80.9, 35.9, 23.9, 30.0, 16.7]),
    ("naclip", "none"): ("NACLIP paper, arXiv:2404.08181",
                         [58.9, 32.2, 33.2, 79.7, 35.2, 23.3, 35.5, 17.4]),
    ("naclip", "pamr"): ("NACLIP README", [64.07, 34.99, 36.19, 83.03, 38.35, 25.69, 38.27, 19.05]),
}



def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--checkpoint", nargs="+", default=[],
                   help="train.py checkpoints (each brings its CLIP); "
                   "several (e.g. the four fold runs) add a mean +- std row")
    p.add_argument("--method", default=None, choices=["maskclip"],
                   help="maskclip: the frozen teacher alone")
    p.add_argument(
        "--with-teacher",
        action="store_true",
        help="also score the teacher of the first --checkpoint (same CLIP, same images, at "
        "--teacher-size) and print the comparison",
    )
    p.add_argument(
        "--teacher-size",
        type=int,
        default=None,
        help="the teacher's test short side (default: the dataset's, 64 for the toy CLIP)",
    )
    add_clip_args(p)
    p.add_argument("--key-smoothing", action="store_true",
                   help="MaskCLIP refinement (teacher only)")
    p.add_argument("--prompt-denoising", action="store_true",
                   help="MaskCLIP refinement (teacher only)")
    add_refine_args(p)  # every row, the teacher's included
    # Protocol
    p.add_argument("--protocol", choices=["maskclip", "peers"], default="maskclip",
                   help="maskclip: the paper's (MaskCLIP's short side, whole image unless --slide, "
                   "85 templates, our class names); peers: SCLIP / ClearCLIP / NACLIP's shared "
                   "setting as NACLIP runs it (short side 336, 560 on cityscapes; slide 224 / "
                   "stride 112, whole image on voc21 and voc; 80 OpenAI templates; their "
                   "classnames/peers_*.txt names). --size, --slide, --window, --window-stride, "
                   "--templates and --class-names override either")
    p.add_argument("--templates", choices=list(TEMPLATE_FILES), default=None,
                   help="prompt templates: maskclip85 (prompts.txt, the paper's) or openai80 "
                   "(prompts_openai80.txt, the peers'); default: the --protocol's")
    p.add_argument("--bg-threshold", type=float, default=None,
                   help="voc21, context60, coco-object only: a pixel whose top class probability "
                   "is under this becomes background (default 0.1 on each, NACLIP's)")
    p.add_argument("--logit-scale", type=float, default=LOGIT_SCALE,
                   help="the background rule's softmax scale on cosines (NACLIP's 40; SCLIP uses "
                   "65 on voc21, 50 on context60 and coco-object; ClearCLIP 50)")
    p.add_argument("--suite", choices=["eight"], default=None,
                   help="eight: score one model on each of the field's eight benchmarks found "
                   "under --data-root (mmsegmentation's layouts), skip the missing ones, print "
                   "one row and the published row of the same teacher")
    # Data
    p.add_argument("--dataset", default="voc", choices=DATASETS)
    p.add_argument("--class-names", default=None,
                   help="a file of class names, one class per line, synonyms separated by ';' "
                   "or ',' (the peers' cls_*.txt), replacing the dataset's")
    add_bad_files_arg(p)
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="val")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="test short side (default: a checkpoint's --eval-size, else 512; 520 for context)",
    )
    p.add_argument(
        "--unknown-fold",
        type=int,
        nargs="+",
        default=[],
        choices=range(4),
        help="teacher only: report fold K's classes as unknown (several: a row each, "
        "and mean +- std)",
    )
    p.add_argument("--unknown-classes", nargs="+", default=[],
                   help="teacher only: report these as unknown")
    p.add_argument("--limit", type=int, default=0, help="score only the first N images (0: all)")
    p.add_argument("--slide", action="store_true",
                   help="score overlapping windows and average (default: whole image)")
    p.add_argument("--window", type=int, default=None,
                   help="--slide: window side in pixels (default: --size)")
    p.add_argument("--window-stride", type=int, default=None,
                   help="--slide: step between windows (default: 2/3 window)")
    # Output
    p.add_argument("--json", default=None, help="write the metrics here")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return resolve_clip_args(p.parse_args(argv))


def subset_metrics(cm, names, subset):
    """Scores restricted to the classes in `subset` (predictions still range over every class):
    mIoU and mAcc average those classes; pAcc counts pixels whose ground truth is one of them."""
    full = segmentation_metrics(cm, names)
    idx = [names.index(n) for n in subset]
    ious = [full["per_class"][n] for n in subset if full["per_class"][n] is not None]
    gt = cm[idx].sum(1)
    accs = [100 * cm[k, k] / g for k, g in zip(idx, gt) if g > 0]
    return {
        "mIoU": float(np.mean(ious)) if ious else 0.0,
        "pAcc": 100 * float(cm[idx, idx].sum() / max(gt.sum(), 1)),
        "mAcc": float(np.mean(accs)) if accs else 0.0,
        "per_class": {n: full["per_class"][n] for n in subset},
    }


def slide_scores(score, x, window, step, stride):
    """Class scores of image x (1, 3, H, W) as the average over overlapping window x window crops
    (MMSegmentation's 'slide' mode, which MaskCLIP uses), at the network's output resolution.
    score maps a crop to (1, K, h, w); window and step are rounded to multiples of `stride`."""
    H, W = x.shape[2:]
    win = max(stride, window // stride * stride)
    step = max(stride, step // stride * stride)
    ys = sorted({min(y, max(H - win, 0)) for y in range(0, max(H - win, 0) + step, step)})
    xs = sorted({min(v, max(W - win, 0)) for v in range(0, max(W - win, 0) + step, step)})
    total = count = None
    for y in ys:
        for x0 in xs:
            s = score(x[:, :, y:y + win, x0:x0 + win])  # (1, K, hw, ww)
            if total is None:
                total = s.new_zeros(1, s.shape[1], H // stride, W // stride)
                count = s.new_zeros(1, 1, H // stride, W // stride)
            total[:, :, y // stride:y // stride + s.shape[2],
                  x0 // stride:x0 // stride + s.shape[3]] += s
            count[:, :, y // stride:y // stride + s.shape[2],
                  x0 // stride:x0 // stride + s.shape[3]] += 1
    return total / count


def protocol(args, dataset):
    """The settings one dataset is scored with: the --protocol's preset, each flag overriding.
    Returns a dict: size (test short side unless --size; None: the run's or the dataset's),
    window and step of the slide in pixels (window None: the whole image; 0: the image's short
    side), templates (a TEMPLATE_FILES name), class_names (a file or None), and threshold (the
    background rule's; None on a dataset without background)."""
    peers = args.protocol == "peers"
    if peers and dataset not in SUITE:
        raise UserError(f"--protocol peers has presets for {', '.join(SUITE)}, not {dataset}")
    if args.bg_threshold is not None and dataset not in WITH_BACKGROUND and not args.suite:
        raise UserError(f"--bg-threshold: {dataset} has no background class (the rule applies to "
                        f"{', '.join(WITH_BACKGROUND)})")
    window = PEERS_WINDOW.get(dataset, PEERS_CROP) if peers else None
    if args.slide:
        window = args.window or window or 0  # 0: the image's short side
    elif peers and args.window:
        window = args.window
    threshold = None
    if dataset in WITH_BACKGROUND:
        threshold = BG_THRESHOLD[dataset] if args.bg_threshold is None else args.bg_threshold
    return {"size": PEERS_SIDE.get(dataset, PEERS_SHORT_SIDE) if peers else None,
            "window": window, "step": args.window_stride or (PEERS_STRIDE if peers else None),
            "templates": args.templates or ("openai80" if peers else "maskclip85"),
            "class_names": args.class_names or (PEER_NAMES / f"peers_{dataset}.txt" if peers
                                                else None),
            "threshold": threshold}


@torch.no_grad()
def confusion(args, checkpoint, device, size=None, loaded=None, base=None):
    """One pass over the split for the teacher (checkpoint None) or one run: the confusion matrix,
    the class names, the run (or None), what to call the row, and the CLIP model's name. size: the
    test short side (default: the protocol's, else the run's --eval-size, else the dataset's).
    loaded: load_embedder's result, to reuse; base: the SegDataset, when already read."""
    embed, stride, teacher, run = loaded or load_embedder(
        argparse.Namespace(**{**vars(args), "checkpoint": checkpoint}),
        device,
        with_keys=args.key_smoothing and not checkpoint,
    )
    setting = protocol(args, args.dataset)
    if base is None:
        base = SegDataset(args.dataset, args.data_root, args.split,
                          class_names=setting["class_names"], bad_files=args.bad_files)
    data = EvalImages(base, size or setting["size"] or (run["args"]["eval_size"] if run else None),
                      stride)
    names = [c.split(";")[0] for c in base.classes]
    protos, owner = teacher.text_prototypes(base.classes, read_templates(setting["templates"]))
    K = len(names)
    rule = setting["threshold"] is not None
    if rule:
        names[base.background] = "background"  # a peers' file names it by its stuff words
        if args.prompt_denoising or args.key_smoothing:
            raise UserError(f"--prompt-denoising / --key-smoothing: not with the background rule "
                            f"of {args.dataset}")

    # (1, 3, h, w) in [0, 1] -> (1, K, h', w') class scores (or smoothed probabilities); with the
    # background rule (1, S, h', w'): the cosine of every synonym row, which the rule needs
    def score(x):
        feats, keys = embed(x)
        if rule:
            return torch.einsum("bdhw,sd->bshw", feats.float(), protos)  # (1, S, h', w')
        s = class_scores(feats.float(), protos, owner, K)
        if args.prompt_denoising and not checkpoint:
            s = prompt_denoising(s)
        if args.key_smoothing and keys is not None:
            s = key_smoothing(s, keys)
        return s

    def image_scores(x):
        x = x.to(device)
        if setting["window"] is None:
            return score(x)  # (1, K, h, w)
        window = setting["window"] or min(x.shape[2:])
        return slide_scores(score, x, window, setting["step"] or 2 * window // 3, stride)

    def decide(s):  # (1, S, H, W) -> (1, H, W)
        return background_rule(s, owner, K, args.logit_scale, setting["threshold"],
                               base.background)

    label = run["method"] if run else teacher.info["teacher"]
    print(
        f"evaluate.py | {label} | {args.dataset} {args.split}: {len(base)} images, {K} classes, "
        f"short side {data.side} | {args.protocol} protocol: "
        + (f"slide {setting['window'] or 'short side'}" if setting["window"] is not None
           else "whole image")
        + f", {setting['templates']} templates"
        + (f", background below p {setting['threshold']} at scale {args.logit_scale:g}"
           if rule else "")
        + (f" | unknown: {', '.join(run['withheld'])}" if run and run["withheld"] else "")
        + (f" | refine pamr: {args.pamr_iters} iterations, dilations {args.pamr_dilations}"
           if args.refine == "pamr" else "")
    )
    cm = language_confusion(image_scores, data, K, args.limit,
                            desc=args.dataset if args.suite else "evaluating",
                            refine=refiner(args), decide=decide if rule else None)
    clip = teacher.info["name"]  # the table's CLIP column names a teacher other than MaskCLIP
    clip += f" ({teacher.info['teacher']})" if teacher.info["teacher"] != "maskclip" else ""
    return cm, names, run, label, clip


def scored(cm, names, withheld):
    """The metrics dict of one row: all classes, plus known and unknown when names were withheld."""
    missing = [n for n in withheld if n not in names]
    if missing:
        raise UserError(f"unknown classes {missing} are not class names of this dataset")
    result = segmentation_metrics(cm, names)
    if withheld:
        result["known"] = subset_metrics(cm, names, [n for n in names if n not in withheld])
        result["unknown"] = subset_metrics(cm, names, withheld)
    return result


def mean_std(results):
    """Mean and std (numpy's, ddof 0; the paper does not say which) of each number over the runs."""
    def walk(items):
        if isinstance(items[0], dict):
            return {k: walk([r[k] for r in items]) for k in items[0] if all(k in r for r in items)}
        vals = [v for v in items if v is not None]
        return (float(np.mean(vals)), float(np.std(vals))) if vals else None
    both = walk(results)

    def pick(tree, j):
        return (
            {k: pick(v, j) for k, v in tree.items()}
            if isinstance(tree, dict)
            else (tree[j] if tree else None)
        )
    return pick(both, 0), pick(both, 1)


def paper_numbers(dataset, label, clip, withheld):
    """The supplementary's (pAcc, mAcc) for this row, or ('', '')."""
    fold_names = [sorted(f) for f in CONTEXT_FOLDS]
    if dataset == "context" and sorted(withheld) in fold_names:
        return PAPER.get(("context-folds", label), ("", ""))
    if dataset == "cocostuff" and not withheld:
        return PAPER.get(("cocostuff", label, clip), ("", ""))
    return "", ""


def published_row(teacher, refine, clip_info):
    """(source, {dataset: mIoU or None}) of the same teacher, published with ViT-B/16 and OpenAI's
    weights, when this CLIP is a ViT-B-16; else None."""
    if clip_info["name"] != "ViT-B-16":
        return None
    if (teacher, refine) not in PUBLISHED:
        return None
    source, values = PUBLISHED[(teacher, refine)]
    return source, dict(zip(SUITE, values))


def suite_line(title, values):
    """One markdown row: the eight numbers (blank where absent) and their mean, '(n/8)' when
    fewer than eight."""
    have = [v for v in values.values() if v is not None]
    mean = f"{np.mean(have):.1f}" + (f" ({len(have)}/8)" if len(have) < 8 else "") if have else ""
    return (f"| {title} | " + " | ".join("" if values.get(d) is None else f"{values[d]:.1f}"
                                        for d in SUITE) + f" | {mean} |")


def suite(args, device):
    """--suite eight: one model (the teacher or one checkpoint) on each of the eight benchmarks
    found under --data-root; one row, the published row of the same teacher under it."""
    if len(args.checkpoint) > 1 or args.with_teacher or args.unknown_fold \
            or args.unknown_classes or args.class_names:
        raise UserError("--suite scores one model with each dataset's own names: one --checkpoint "
                        "or --method maskclip, without --with-teacher, --unknown-*, --class-names")
    checkpoint = args.checkpoint[0] if args.checkpoint else None
    bases, skipped = {}, []
    for name in SUITE:  # the missing ones are named first, before the slow passes
        try:
            find_base(name, args.data_root)
            bases[name] = SegDataset(name, args.data_root, args.split,
                                     class_names=protocol(args, name)["class_names"])
        except UserError as e:
            print(f"suite: skipping {name}: {e}")
            skipped.append(name)
    if not bases:
        raise UserError(f"--suite eight: none of {', '.join(SUITE)} under --data-root "
                        f"{args.data_root}")
    for base in bases.values():
        if args.bad_files != "stop":
            base.check_files(skip=args.bad_files == "skip")
    loaded = load_embedder(argparse.Namespace(**{**vars(args), "checkpoint": checkpoint}), device,
                           with_keys=args.key_smoothing and not checkpoint)
    teacher, run = loaded[2], loaded[3]
    results = {}
    for name, base in bases.items():
        a = argparse.Namespace(**{**vars(args), "dataset": name})
        cm, names, _, label, clip = confusion(a, checkpoint, device, args.size, loaded, base)
        results[name] = segmentation_metrics(cm, names)
    ours = {d: results[d]["mIoU"] if d in results else None for d in SUITE}
    title = (f"{DISPLAY_NAMES.get(label, label)}, {clip}, {args.protocol} protocol"
             + (", pamr" if args.refine == "pamr" else ""))
    print("\n| row | " + " | ".join(SUITE.values()) + " | mean |\n" + "|---" * 10 + "|")
    print(suite_line(title, ours))
    published = published_row(teacher.info["teacher"], args.refine, teacher.info)
    if published:
        source, values = published
        print(suite_line(f"{DISPLAY_NAMES[teacher.info['teacher']]}, ViT-B/16 OpenAI, "
                         f"published ({source})", values))
        both = [d for d in SUITE if ours[d] is not None and values[d] is not None]
        if both and len(both) < 8:
            print(f"over the {len(both)} datasets both rows have: ours "
                  f"{np.mean([ours[d] for d in both]):.1f}, published "
                  f"{np.mean([values[d] for d in both]):.1f}")
    scored_names = list(results)
    result = {
        "suite": "eight", "method": label, "teacher": teacher.info["teacher"], "clip": clip,
        "protocol": args.protocol, "refine": args.refine, "skipped": skipped,
        **{k: float(np.mean([results[d][k] for d in scored_names]))
           for k in ("mIoU", "pAcc", "mAcc")},
        "per_class": {f"{d}/{c}": v for d in scored_names
                      for c, v in results[d]["per_class"].items()},
        "datasets": results,
        "published": ({"source": published[0], "mIoU": published[1]} if published else None),
    }
    if run is not None:
        result["checkpoint"] = checkpoint
    if args.json:
        write_json(args.json, result)
    return result


def main(args):
    device = pick_device(args.device)
    if bool(args.checkpoint) == bool(args.method):
        raise UserError("give either --checkpoint PATH [PATH ...] or --method maskclip")
    if args.suite:
        return suite(args, device)
    base = SegDataset(args.dataset, args.data_root, args.split, bad_files=args.bad_files,
                      class_names=protocol(args, args.dataset)["class_names"])
    rows, results = [], []  # rows: (method, clip, which runs, withheld, result)
    if args.method:
        splits = [CONTEXT_FOLDS[k] for k in args.unknown_fold] or [[]]
        names = [c.split(";")[0] for c in base.classes]
        # the names are checked before the slow pass
        scored(np.zeros((len(names),) * 2, np.int64), names,
               list(args.unknown_classes) + sum(splits, []))
        cm, names, _, label, clip = confusion(args, None, device, args.size, base=base)
        for fold, extra in zip(args.unknown_fold or [None], splits):
            withheld = list(args.unknown_classes) + list(extra)
            results.append(scored(cm, names, withheld))
            rows.append((label, clip, f"fold {fold}" if fold is not None else "", withheld,
                         results[-1]))
    runs = []
    for path in args.checkpoint:
        cm, names, run, label, clip = confusion(args, path, device, args.size, base=base)
        results.append(scored(cm, names, run["withheld"]))
        rows.append((label, clip, path, run["withheld"], results[-1]))
        runs.append(run)
    teacher = None
    if args.with_teacher:  # the CLIP the first run was trained with, on the same images
        if not runs:
            raise UserError("--with-teacher compares a --checkpoint with its teacher: give a "
                            "checkpoint")
        clip_flags = {k: runs[0]["args"][k] for k in ("clip", "clip_pretrained", "clip_config",
                                                      "quick_gelu", "teacher")}
        cm, names, _, label, clip = confusion(argparse.Namespace(**{**vars(args), **clip_flags}),
                                              None,
                                              device, args.teacher_size, base=base)
        teacher = (
            label,
            clip,
            "teacher of the first run",
            rows[0][3],
            scored(cm, names, rows[0][3]),
        )
    # ---- report: one markdown table, the supplementary's numbers beside ours ----
    print("\n| method | CLIP | run | classes | mIoU | pAcc | mAcc | paper pAcc | paper mAcc "
          "|\n" + "|---" * 9 + "|")
    for label, clip, which, withheld, r in ([teacher] if teacher else []) + rows:
        paper = paper_numbers(args.dataset, label, clip, withheld)
        for part in ["all"] + (["known", "unknown"] if withheld else []):
            m = r if part == "all" else r[part]
            p = paper if part == "all" else ("", "")
            print(f"| {label} | {clip} | {which} | {part} | {m['mIoU']:.1f} | {m['pAcc']:.1f} | "
                  f"{m['mAcc']:.1f} "
                  f"| {p[0]} | {p[1]} |")
    result = results[0]
    if len(results) > 1:
        mean, std = mean_std(results)
        for part in ["all"] + [k for k in ("known", "unknown") if k in mean]:
            m, s = (mean, std) if part == "all" else (mean[part], std[part])
            print(f"| mean ± std of {len(results)} | | | {part} | " + " | ".join(
                f"{m[k]:.1f} ± {s[k]:.1f}" for k in ("mIoU", "pAcc", "mAcc")) + " | | |")
        result = {**mean, "std": std, "runs": [{"method": r[0], "run": r[2], **r[4]} for r in rows]}
    if teacher:
        t = teacher[4]
        result["teacher"] = t
        print(f"\n{DISPLAY_NAMES[teacher[0]]} {t['mIoU']:.1f} -> "
              f"{DISPLAY_NAMES.get(rows[0][0], rows[0][0])} "
              f"{result['mIoU']:.1f} mIoU ({result['mIoU'] - t['mIoU']:+.1f})"
              + (f"; unknown names {t['unknown']['mIoU']:.1f} -> {result['unknown']['mIoU']:.1f}"
                 if "unknown" in t and "unknown" in result else ""))
    print(per_class_line(result["per_class"]))
    if args.json:
        write_json(args.json, {"method": rows[0][0], "refine": args.refine, **result})
    return result


if __name__ == "__main__":
    try:
        main(get_args())
    except UserError as e:
        sys.exit(f"error: {e}")
