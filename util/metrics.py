"""Scores: everything from one confusion matrix (mIoU, pAcc, mAcc, per-class IoU), the scores of
a subset of classes and the mean and std over several runs, the language-driven protocol that
fills the matrix, and the k-NN vote over segments (knn.py, tools/bench.py).

Notation used in shape comments: H x W pixels, K classes, Q queries, N memory rows, D dimension.
"""
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import IGNORE

# How tables and figures name a method or a teacher (a run's method, a teacher's --teacher).
DISPLAY_NAMES = {"maskclip": "MaskCLIP", "maskclip+": "MaskCLIP+", "clip-s4": "CLIP-S4",
                 "segsort": "SegSort-only", "conceptcontrast": "ConceptContrast", "sclip": "SCLIP",
                 "clearclip": "ClearCLIP", "naclip": "NACLIP"}


def add_refine_args(p):
    """--refine and PAMR's settings, shared by evaluate.py and segment.py."""
    p.add_argument("--refine", choices=["none", "pamr"], default="none",
                   help="post-process of any method's scores: pamr = pixel-adaptive mask "
                   "refinement on the input image, as NACLIP reports (beyond the paper)")
    p.add_argument("--pamr-iters", type=int, default=10, help="PAMR iterations (NACLIP's 10)")
    p.add_argument("--pamr-dilations", type=int, nargs="+", default=[8, 16],
                   help="PAMR neighbour rings, in input pixels (NACLIP's 8 16, at VOC's 448 px)")


def confusion_matrix(pred, gt, num_classes, ignore=IGNORE):
    """Rows = ground truth, columns = prediction, pixels labelled `ignore` left out.
    pred, gt: integer arrays of one shape. Returns (K, K) int64."""
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    keep = gt != ignore
    idx = num_classes * gt[keep] + pred[keep]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(cm, names):
    """mIoU, pAcc, mAcc (percent) and per-class IoU from a confusion matrix. A class absent from
    both ground truth and prediction has no IoU (left out of the mean, None per class), not 0."""
    cm = np.asarray(cm, dtype=np.float64)
    tp, gt, pr = np.diag(cm), cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    return {"mIoU": 100 * float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "pAcc": 100 * float(tp.sum() / max(cm.sum(), 1)),
            "mAcc": 100 * float(np.nanmean(acc)) if np.isfinite(acc).any() else 0.0,
            "per_class": {n: (None if np.isnan(v) else 100 * float(v)) for n, v in zip(names, iou)}}


def per_class_line(per_class):
    """'per class IoU: sky 81.2, grass 60.1, ...' (classes without an IoU left out)."""
    return "per class IoU: " + ", ".join(f"{k} {v:.1f}" for k, v in per_class.items()
                                         if v is not None)


def subset_metrics(cm, names, subset):
    """Scores restricted to the classes in `subset` (predictions still range over every class):
    mIoU and mAcc average those classes; pAcc counts pixels whose ground truth is one of them."""
    full = segmentation_metrics(cm, names)
    idx = [names.index(n) for n in subset]
    ious = [full["per_class"][n] for n in subset if full["per_class"][n] is not None]
    gt = cm[idx].sum(1)
    accs = [100 * cm[k, k] / g for k, g in zip(idx, gt) if g > 0]
    return {"mIoU": float(np.mean(ious)) if ious else 0.0,
            "pAcc": 100 * float(cm[idx, idx].sum() / max(gt.sum(), 1)),
            "mAcc": float(np.mean(accs)) if accs else 0.0,
            "per_class": {n: full["per_class"][n] for n in subset}}


def mean_std(results):
    """Mean and std (numpy's, ddof 0; the paper does not say which) of each number over the runs."""
    def walk(items):
        if isinstance(items[0], dict):
            return {k: walk([r[k] for r in items]) for k in items[0] if all(k in r for r in items)}
        vals = [v for v in items if v is not None]
        return (float(np.mean(vals)), float(np.std(vals))) if vals else None

    def pick(tree, j):
        if isinstance(tree, dict):
            return {k: pick(v, j) for k, v in tree.items()}
        return tree[j] if tree else None
    both = walk(results)
    return pick(both, 0), pick(both, 1)


def language_confusion(scores_of, data, num_classes, limit=0, desc=None, refine=None,
                       decide=None):
    """The language-driven protocol over a split: each image's class scores, upsampled (bilinear) to
    its label, argmax per pixel, one confusion matrix. Used by evaluate.py, train.py's validation
    and toy/prepare.py. No random numbers are drawn, so scoring inside training leaves the run
    unchanged.
    Args:
        scores_of: maps an image (1, 3, h, w) float in [0, 1] to class scores (1, K, h', w').
        data: EvalImages; limit: score only the first N images (0: all); desc: a progress-bar title.
        refine: None, or (image (1, 3, h, w), scores (1, K, h, w)) -> scores, run on the scores
            upsampled to the input image (model.pamr).
        decide: None (argmax over the scores), or scores (1, C, H, W) at the label's size ->
            labels (1, H, W) long (evaluate.py's background rule; C may count synonym rows).
    Returns:
        (K, K) int64 confusion matrix, rows = ground truth."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    n = min(len(data), limit) if limit else len(data)
    for i in tqdm(range(n), desc=desc, disable=desc is None, leave=False):
        item = data[i]
        s = scores_of(item["image"][None]).float()  # (1, K, h', w')
        if refine is not None:  # on the scores upsampled to the input image: (1, K, h, w)
            x = item["image"][None].to(s.device)  # (1, 3, h, w)
            s = refine(x, F.interpolate(s, size=x.shape[2:], mode="bilinear", align_corners=False))
        H, W = item["label"].shape
        s = F.interpolate(s, size=(H, W), mode="bilinear", align_corners=False)  # (1, K, H, W)
        pred = s[0].argmax(0) if decide is None else decide(s)[0]  # (H, W)
        cm += confusion_matrix(pred.cpu().numpy(), item["label"].numpy(), num_classes)
    return cm


def majority_labels(ids, gt, num_classes, count):
    """Segments scored against ground truth: the segment map (h, w) at any resolution is resized
    (nearest) to gt's (H, W), and each segment takes the class most of its labelled pixels have.
    ids (h, w) long in [0, count), gt (H, W) long with 255 = ignore ->
    (labels (count,) long, -1 where no pixel is labelled; ids at (H, W))."""
    ids = F.interpolate(ids[None, None].float(), size=gt.shape, mode="nearest")[0, 0].long()
    keep = gt != IGNORE
    votes = torch.bincount(ids[keep] * num_classes + gt[keep], minlength=count * num_classes)
    votes = votes.view(count, num_classes)
    return torch.where(votes.sum(1) > 0, votes.argmax(1), -1), ids


def knn_vote(queries, memory, mem_labels, k, num_classes, chunk=4096):
    """Majority label among the k most cosine-similar memory rows, chunked so that a (chunk, N)
    similarity block is the largest thing held. queries (Q, D), memory (N, D) unit -> (Q,) long."""
    out = []
    for q in queries.split(chunk):
        top = (q @ memory.T).topk(min(k, len(memory)), dim=1).indices  # (chunk, N) -> (chunk, k)
        out.append(F.one_hot(mem_labels[top], num_classes).sum(1).argmax(1))
    return torch.cat(out)
