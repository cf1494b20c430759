"""evaluate.py: language-driven segmentation scores (mIoU, pAcc, mAcc, per-class IoU).

Each pixel takes the dataset class whose text prototype (85 templates) is nearest to the pixel's
embedding; the scores come from one confusion matrix over the split. A class-free run (trained with
names withheld) also reports known and unknown classes separately.

The teacher alone (MaskCLIP), and trained runs (CLIP-S4, MaskCLIP+, SegSort-only checkpoints):
    python evaluate.py --dataset context --data-root data/context --method maskclip --unknown-fold 0
    python evaluate.py --dataset context --data-root data/context --checkpoint runs/ctx_f0/ckpt.pt
Toy world on a CPU (seconds):
    python evaluate.py --dataset toy --method maskclip --clip-config data/toy/toyclip.json \
        --clip-pretrained data/toy/toyclip.pt --size 64
    python evaluate.py --dataset toy --checkpoint runs/toy_clips4/ckpt.pt --size 128 --json out/toy.json
"""
import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import (CONTEXT_FOLDS, EvalImages, SegDataset, UserError, confusion_matrix, segmentation_metrics,
                  write_json)
from model import class_scores, key_smoothing, load_embedder, pick_device, prompt_denoising


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--checkpoint", default=None, help="a train.py checkpoint (its CLIP comes with it)")
    p.add_argument("--method", default=None, choices=["maskclip"], help="maskclip: the frozen teacher alone")
    p.add_argument("--clip", default="ViT-B-16", help="--method maskclip: open_clip model name")
    p.add_argument("--clip-pretrained", default="openai", help="--method maskclip: tag or weights file")
    p.add_argument("--clip-config", default=None, help="--method maskclip: custom open_clip JSON config")
    p.add_argument("--quick-gelu", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--key-smoothing", action="store_true", help="MaskCLIP refinement (teacher only)")
    p.add_argument("--prompt-denoising", action="store_true", help="MaskCLIP refinement (teacher only)")
    # Data
    p.add_argument("--dataset", default="voc", choices=["voc", "context", "cocostuff", "folder", "toy"])
    p.add_argument("--class-names", default=None, help="a file of class names (one per line) replacing the dataset's")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--size", type=int, default=None, help="test short side (default 512; 520 for context)")
    p.add_argument("--unknown-fold", type=int, default=None, help="teacher only: report fold K's classes as unknown")
    p.add_argument("--unknown-classes", nargs="+", default=[], help="teacher only: report these as unknown")
    p.add_argument("--limit", type=int, default=0, help="score only the first N images (0: all)")
    # Output
    p.add_argument("--json", default=None, help="write the metrics here")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p.parse_args(argv)


def subset_metrics(cm, names, subset):
    """Scores restricted to the classes in `subset` (predictions still range over every class):
    mIoU and mAcc average those classes; pAcc counts pixels whose ground truth is one of them."""
    full = segmentation_metrics(cm, names)
    idx = [names.index(n) for n in subset]
    ious = [full["per_class"][n] for n in subset if full["per_class"][n] is not None]
    gt = cm[idx].sum(1)
    accs = [100 * cm[k, k] / g for k, g in zip(idx, gt) if g > 0]
    return {"mIoU": float(np.mean(ious)) if ious else 0.0, "pAcc": 100 * float(cm[idx, idx].sum() / max(gt.sum(), 1)),
            "mAcc": float(np.mean(accs)) if accs else 0.0, "per_class": {n: full["per_class"][n] for n in subset}}


@torch.no_grad()
def main(args):
    device = pick_device(args.device)
    if bool(args.checkpoint) == bool(args.method):
        raise UserError("give either --checkpoint PATH or --method maskclip")
    # ---- model ----
    embed, stride, teacher, run = load_embedder(args, device, with_keys=args.key_smoothing)
    if run:
        withheld, label = run["withheld"], run["method"]
    else:
        withheld, label = list(args.unknown_classes), "maskclip"
        if args.unknown_fold is not None:
            withheld += CONTEXT_FOLDS[args.unknown_fold]
    # ---- data ----
    base = SegDataset(args.dataset, args.data_root, args.split, class_names=args.class_names)
    data = EvalImages(base, args.size, stride)
    names = [c.split(";")[0] for c in base.classes]
    missing = [n for n in withheld if n not in names]
    if missing:
        raise UserError(f"unknown classes {missing} are not class names of {args.dataset}")
    protos, owner = teacher.text_prototypes(base.classes)
    print(f"evaluate.py | {label} | {args.dataset} {args.split}: {len(base)} images, {len(names)} classes"
          + (f" | unknown: {', '.join(withheld)}" if withheld else ""))
    # ---- loop ----
    K = len(names)
    cm = np.zeros((K, K), np.int64)
    n = min(len(data), args.limit) if args.limit else len(data)
    for i in tqdm(range(n), desc="evaluating"):
        item = data[i]
        feats, keys = embed(item["image"][None])  # (1, D, h, w)
        scores = class_scores(feats.float(), protos, owner, K)  # (1, K, h, w)
        if args.prompt_denoising and not args.checkpoint:
            scores = prompt_denoising(scores)
        if args.key_smoothing and keys is not None:
            scores = key_smoothing(scores, keys)
        scores = F.interpolate(scores, size=item["label"].shape, mode="bilinear", align_corners=False)
        cm += confusion_matrix(scores[0].argmax(0).cpu().numpy(), item["label"].numpy(), K)
    # ---- report ----
    result = segmentation_metrics(cm, names)
    rows = [("all", result)]
    if withheld:
        result["known"] = subset_metrics(cm, names, [n for n in names if n not in withheld])
        result["unknown"] = subset_metrics(cm, names, withheld)
        rows += [("known", result["known"]), ("unknown", result["unknown"])]
    print("\n| method | classes | mIoU | pAcc | mAcc |\n|---|---|---|---|---|")
    for which, m in rows:
        print(f"| {label} | {which} | {m['mIoU']:.1f} | {m['pAcc']:.1f} | {m['mAcc']:.1f} |")
    print("per class IoU: " + ", ".join(f"{k} {v:.1f}" for k, v in result["per_class"].items() if v is not None))
    if args.json:
        write_json(args.json, {"method": label, **result})
    return result


if __name__ == "__main__":
    try:
        main(get_args())
    except UserError as e:
        sys.exit(f"error: {e}")
