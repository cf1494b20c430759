r"""evaluate.py: language-driven segmentation scores (mIoU, pAcc, mAcc, per-class IoU).

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
from dataclasses import dataclass

import numpy as np
import torch

from data import (CONTEXT_FOLDS, DATASETS, WITH_BACKGROUND, EvalImages, SegDataset,
                  add_bad_files_arg, find_base, first_names)
from util.files import UserError, write_json
from util.metrics import (DISPLAY_NAMES, add_refine_args, language_confusion, mean_std,
                          per_class_line, segmentation_metrics, subset_metrics)
from util.clip_loading import add_clip_args, resolve_clip_args
from util.loop import pick_device
from model import (TEMPLATE_FILES, background_rule, class_scores, key_smoothing, load_embedder,
                   prompt_denoising, read_templates, refiner)
from util.benchmarks import (BG_THRESHOLD, LOGIT_SCALE, PEER_NAMES, PEERS_CROP, PEERS_SHORT_SIDE,
                             PEERS_SIDE, PEERS_STRIDE, PEERS_WINDOW, SUITE, paper_numbers,
                             published_row, suite_line)

# The flags that build a teacher (clip_loading's), read from this command or from a run's args
CLIP_FLAGS = ("clip", "clip_pretrained", "clip_config", "quick_gelu", "teacher")


@dataclass
class Row:
    """One row of the report table: who was scored, on which classes, and how well."""
    method: str  # a run's method ("clip-s4", ...) or the teacher's name
    clip: str  # the CLIP column: the model's name, and the teacher when not MaskCLIP
    run: str  # which run: a checkpoint path, "fold K", "teacher of the first run" or ""
    withheld: list  # the class names reported as unknown
    metrics: dict  # scored()'s: mIoU, pAcc, mAcc, per_class, and known / unknown when withheld


def get_args(argv=None):
    """evaluate.py's flags in groups, as `--help` lists them: what is scored, the protocol, the
    data, the output."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p)
    add_clip_args(p)  # its own group
    for add in (protocol_args, data_args, output_args):
        add(p)
    return resolve_clip_args(p.parse_args(argv))


def model_args(p):
    g = p.add_argument_group("what is scored",
                             "the teacher alone, or trained runs (each brings its CLIP)")
    g.add_argument("--checkpoint", nargs="+", default=[],
                   help="train.py checkpoints (each brings its CLIP); "
                   "several (e.g. the four fold runs) add a mean +- std row")
    g.add_argument("--method", default=None, choices=["maskclip"],
                   help="maskclip: the frozen teacher alone")
    g.add_argument("--with-teacher", action="store_true",
                   help="also score the teacher of the first --checkpoint (same CLIP, same images, "
                   "at --teacher-size) and print the comparison")
    g.add_argument("--teacher-size", type=int, default=None,
                   help="the teacher's test short side (default: the dataset's, 64 for the toy "
                   "CLIP)")
    g.add_argument("--key-smoothing", action="store_true",
                   help="MaskCLIP refinement (teacher only)")
    g.add_argument("--prompt-denoising", action="store_true",
                   help="MaskCLIP refinement (teacher only)")
    add_refine_args(g)  # every row, the teacher's included


def protocol_args(p):
    g = p.add_argument_group("protocol",
                             "the paper's (MaskCLIP's) or the peers' setting, and its parts")
    g.add_argument("--protocol", choices=["maskclip", "peers"], default="maskclip",
                   help="maskclip: the paper's (MaskCLIP's short side, whole image unless --slide, "
                   "85 templates, our class names); peers: SCLIP / ClearCLIP / NACLIP's shared "
                   "setting as NACLIP runs it (short side 336, 560 on cityscapes; slide 224 / "
                   "stride 112, whole image on voc21 and voc; 80 OpenAI templates; their "
                   "classnames/peers_*.txt names). --size, --slide, --window, --window-stride, "
                   "--templates and --class-names override either")
    g.add_argument("--templates", choices=list(TEMPLATE_FILES), default=None,
                   help="prompt templates: maskclip85 (prompts.txt, the paper's) or openai80 "
                   "(prompts_openai80.txt, the peers'); default: the --protocol's")
    g.add_argument("--bg-threshold", type=float, default=None,
                   help="voc21, context60, coco-object only: a pixel whose top class probability "
                   "is under this becomes background (default 0.1 on each, NACLIP's)")
    g.add_argument("--logit-scale", type=float, default=LOGIT_SCALE,
                   help="the background rule's softmax scale on cosines (NACLIP's 40; SCLIP uses "
                   "65 on voc21, 50 on context60 and coco-object; ClearCLIP 50)")
    g.add_argument("--suite", choices=["eight"], default=None,
                   help="eight: score one model on each of the field's eight benchmarks found "
                   "under --data-root (mmsegmentation's layouts), skip the missing ones, print "
                   "one row and the published row of the same teacher")


def data_args(p):
    g = p.add_argument_group("data", "the split scored and the class-free names")
    g.add_argument("--dataset", default="voc", choices=DATASETS)
    g.add_argument("--class-names", default=None,
                   help="a file of class names, one class per line, synonyms separated by ';' "
                   "or ',' (the peers' cls_*.txt), replacing the dataset's")
    add_bad_files_arg(g)
    g.add_argument("--data-root", default=None)
    g.add_argument("--split", default="val")
    g.add_argument("--size", type=int, default=None,
                   help="test short side (default: a checkpoint's --eval-size, else 512; 520 for "
                   "context)")
    g.add_argument("--unknown-fold", type=int, nargs="+", default=[], choices=range(4),
                   help="teacher only: report fold K's classes as unknown (several: a row each, "
                   "and mean +- std)")
    g.add_argument("--unknown-classes", nargs="+", default=[],
                   help="teacher only: report these as unknown")
    g.add_argument("--limit", type=int, default=0, help="score only the first N images (0: all)")
    g.add_argument("--slide", action="store_true",
                   help="score overlapping windows and average (default: whole image)")
    g.add_argument("--window", type=int, default=None,
                   help="--slide: window side in pixels (default: --size)")
    g.add_argument("--window-stride", type=int, default=None,
                   help="--slide: step between windows (default: 2/3 window)")


def output_args(p):
    g = p.add_argument_group("output")
    g.add_argument("--json", default=None, help="write the metrics here")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


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


def load_model(args, device, checkpoint=None, clip_flags=None):
    """model.load_embedder for one row: a trained run (`checkpoint`), or the teacher built from
    this command's CLIP flags or from `clip_flags` (a run's args, for --with-teacher). Only the
    teacher brings its keys, and only for --key-smoothing."""
    if checkpoint:
        return load_embedder(device, checkpoint)
    flags = clip_flags or vars(args)
    return load_embedder(device, **{k: flags[k] for k in CLIP_FLAGS},
                         with_keys=args.key_smoothing)


@torch.no_grad()
def header(args, label, base, side, setting, run):
    """The line that opens a pass: what is scored, on what, under which protocol."""
    slide = (f"slide {setting['window'] or 'short side'}" if setting["window"] is not None
             else "whole image")
    line = (f"evaluate.py | {label} | {base.name} {args.split}: {len(base)} images, "
            f"{len(base.classes)} classes, short side {side} | {args.protocol} protocol: {slide}, "
            f"{setting['templates']} templates")
    if setting["threshold"] is not None:
        line += f", background below p {setting['threshold']} at scale {args.logit_scale:g}"
    if run and run["withheld"]:
        line += f" | unknown: {', '.join(run['withheld'])}"
    if args.refine == "pamr":
        line += f" | refine pamr: {args.pamr_iters} iterations, dilations {args.pamr_dilations}"
    return line


@dataclass
class Pass:
    """One scored pass: the confusion matrix (K, K), the class names, what to call the row (the
    method) and its CLIP column."""
    cm: np.ndarray
    names: list
    label: str
    clip: str


def confusion(args, model, base, device, size=None):
    """One pass over the split `base` (a SegDataset) for the teacher or one run (model: an
    Embedder). size: the test short side (default: the protocol's, else the run's --eval-size,
    else the dataset's). Returns a Pass."""
    embed, stride, teacher, run = model
    dataset = base.name
    setting = protocol(args, dataset)
    side = size or setting["size"] or (run["args"]["eval_size"] if run else None)
    data = EvalImages(base, side, stride)
    names = first_names(base.classes)
    protos, owner = teacher.text_prototypes(base.classes, read_templates(setting["templates"]))
    K = len(names)
    rule = setting["threshold"] is not None
    if rule:
        names[base.background] = "background"  # a peers' file names it by its stuff words
        if args.prompt_denoising or args.key_smoothing:
            raise UserError(f"--prompt-denoising / --key-smoothing: not with the background rule "
                            f"of {dataset}")

    # (1, 3, h, w) in [0, 1] -> (1, K, h', w') class scores (or smoothed probabilities); with the
    # background rule (1, S, h', w'): the cosine of every synonym row, which the rule needs
    def score(x):
        feats, keys = embed(x)
        if rule:
            return torch.einsum("bdhw,sd->bshw", feats.float(), protos)  # (1, S, h', w')
        s = class_scores(feats.float(), protos, owner, K)
        if args.prompt_denoising and run is None:
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
    print(header(args, label, base, data.side, setting, run))
    cm = language_confusion(image_scores, data, K, args.limit,
                            desc=dataset if args.suite else "evaluating",
                            refine=refiner(args.refine, args.pamr_iters, args.pamr_dilations),
                            decide=decide if rule else None)
    clip = teacher.info["name"]  # the table's CLIP column names a teacher other than MaskCLIP
    clip += f" ({teacher.info['teacher']})" if teacher.info["teacher"] != "maskclip" else ""
    return Pass(cm, names, label, clip)


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


def score_suite(args, device):
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
    model = load_model(args, device, checkpoint)
    teacher = model.teacher.info["teacher"]
    results = {}
    for name, base in bases.items():
        one = confusion(args, model, base, device, args.size)
        results[name] = segmentation_metrics(one.cm, one.names)
    ours = {d: results[d]["mIoU"] if d in results else None for d in SUITE}
    title = (f"{DISPLAY_NAMES.get(one.label, one.label)}, {one.clip}, {args.protocol} protocol"
             + (", pamr" if args.refine == "pamr" else ""))
    print("\n| row | " + " | ".join(SUITE.values()) + " | mean |\n" + "|---" * 10 + "|")
    print(suite_line(title, ours))
    published = published_row(teacher, args.refine, model.teacher.info)
    if published:
        source, values = published
        print(suite_line(f"{DISPLAY_NAMES[teacher]}, ViT-B/16 OpenAI, published ({source})",
                         values))
        both = [d for d in SUITE if ours[d] is not None and values[d] is not None]
        if both and len(both) < 8:
            print(f"over the {len(both)} datasets both rows have: ours "
                  f"{np.mean([ours[d] for d in both]):.1f}, published "
                  f"{np.mean([values[d] for d in both]):.1f}")
    result = {
        "suite": "eight", "method": one.label, "teacher": teacher, "clip": one.clip,
        "protocol": args.protocol, "refine": args.refine, "skipped": skipped,
        **{k: float(np.mean([r[k] for r in results.values()])) for k in ("mIoU", "pAcc", "mAcc")},
        "per_class": {f"{d}/{c}": v for d, r in results.items() for c, v in r["per_class"].items()},
        "datasets": results,
        "published": {"source": published[0], "mIoU": published[1]} if published else None,
    }
    if model.run is not None:
        result["checkpoint"] = checkpoint
    if args.json:
        write_json(args.json, result)
    return result


def main(args):
    device = pick_device(args.device)
    if bool(args.checkpoint) == bool(args.method):
        raise UserError("give either --checkpoint PATH [PATH ...] or --method maskclip")
    if args.suite:
        return score_suite(args, device)
    base = SegDataset(args.dataset, args.data_root, args.split, bad_files=args.bad_files,
                      class_names=protocol(args, args.dataset)["class_names"])
    rows, teacher = score_rows(args, base, device)
    return report(args, rows, teacher)


def score_rows(args, base, device):
    """One pass per model: the teacher (--method; a row per class-free split), each checkpoint,
    and with --with-teacher the first run's own teacher. Returns (rows, teacher row or None)."""
    rows = []
    if args.method:
        splits = [CONTEXT_FOLDS[k] for k in args.unknown_fold] or [[]]
        names = first_names(base.classes)
        # the names are checked before the slow pass
        scored(np.zeros((len(names),) * 2, np.int64), names,
               list(args.unknown_classes) + sum(splits, []))
        model = load_model(args, device)
        one = confusion(args, model, base, device, args.size)
        for fold, extra in zip(args.unknown_fold or [None], splits):
            withheld = list(args.unknown_classes) + list(extra)
            rows.append(Row(one.label, one.clip, f"fold {fold}" if fold is not None else "",
                            withheld, scored(one.cm, one.names, withheld)))
    runs = []
    for path in args.checkpoint:
        model = load_model(args, device, path)
        one = confusion(args, model, base, device, args.size)
        rows.append(Row(one.label, one.clip, path, model.run["withheld"],
                        scored(one.cm, one.names, model.run["withheld"])))
        runs.append(model.run)
    teacher = None
    if args.with_teacher:  # the CLIP the first run was trained with, on the same images
        if not runs:
            raise UserError("--with-teacher compares a --checkpoint with its teacher: give a "
                            "checkpoint")
        model = load_model(args, device, clip_flags=runs[0]["args"])
        one = confusion(args, model, base, device, args.teacher_size)
        withheld = rows[0].withheld
        teacher = Row(one.label, one.clip, "teacher of the first run", withheld,
                      scored(one.cm, one.names, withheld))
    return rows, teacher


def report(args, rows, teacher):
    """One markdown table, the supplementary's numbers beside ours; mean +- std of several runs;
    the teacher -> student line; the per-class line; --json. Returns the first row's metrics (the
    mean, with "std" and "runs", of several)."""
    print("\n| method | CLIP | run | classes | mIoU | pAcc | mAcc | paper pAcc | paper mAcc |\n"
          + "|---" * 9 + "|")
    for row in ([teacher] if teacher else []) + rows:
        paper = paper_numbers(args.dataset, row.method, row.clip, row.withheld)
        for part in ["all"] + (["known", "unknown"] if row.withheld else []):
            m = row.metrics if part == "all" else row.metrics[part]
            p = paper if part == "all" else ("", "")
            print(f"| {row.method} | {row.clip} | {row.run} | {part} | {m['mIoU']:.1f} | "
                  f"{m['pAcc']:.1f} | {m['mAcc']:.1f} | {p[0]} | {p[1]} |")
    result = rows[0].metrics
    if len(rows) > 1:
        mean, std = mean_std([row.metrics for row in rows])
        for part in ["all"] + [k for k in ("known", "unknown") if k in mean]:
            m, s = (mean, std) if part == "all" else (mean[part], std[part])
            print(f"| mean ± std of {len(rows)} | | | {part} | " + " | ".join(
                f"{m[k]:.1f} ± {s[k]:.1f}" for k in ("mIoU", "pAcc", "mAcc")) + " | | |")
        result = {**mean, "std": std,
                  "runs": [{"method": row.method, "run": row.run, **row.metrics} for row in rows]}
    if teacher:
        t = teacher.metrics
        result["teacher"] = t
        print(f"\n{DISPLAY_NAMES[teacher.method]} {t['mIoU']:.1f} -> "
              f"{DISPLAY_NAMES.get(rows[0].method, rows[0].method)} "
              f"{result['mIoU']:.1f} mIoU ({result['mIoU'] - t['mIoU']:+.1f})"
              + (f"; unknown names {t['unknown']['mIoU']:.1f} -> {result['unknown']['mIoU']:.1f}"
                 if "unknown" in t and "unknown" in result else ""))
    print(per_class_line(result["per_class"]))
    if args.json:
        write_json(args.json, {"method": rows[0].method, "refine": args.refine, **result})
    return result


if __name__ == "__main__":
    try:
        main(get_args())
    except UserError as e:
        sys.exit(f"error: {e}")
