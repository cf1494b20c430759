"""Published numbers that evaluate.py prints beside ours, and the peers' protocol behind them.

Two sources, top-down:
- the CLIP-S4 supplementary: pAcc and mAcc for COCO-Stuff by CLIP model (Table 1) and for Pascal
  Context with one fold of classes unknown (Table 2), found by paper_numbers;
- the field's eight benchmarks (SUITE, in the column order of the peers' tables): the shared
  setting SCLIP, ClearCLIP and NACLIP score them under (the PEERS_* presets, the background rule's
  BG_THRESHOLD and LOGIT_SCALE, read by evaluate.protocol), and the published mIoU of each teacher
  (PUBLISHED, found by published_row), printed as one markdown row by suite_line.
docs/benchmarks-protocol.md gives the source of every value.
"""
from pathlib import Path

import numpy as np

from data import CONTEXT_FOLDS

# ---- the supplementary's tables ----
# (pAcc, mAcc) for the rows it has. Table 1: COCO-Stuff, every name known, by CLIP model. Table 2:
# Pascal Context with one fold unknown, all 59 classes, mean (+- std) over the four folds. The main
# paper's mIoU tables are not in the supplementary, so there is no mIoU column.
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


def paper_numbers(dataset, label, clip, withheld):
    """The supplementary's (pAcc, mAcc) strings for one row, or ('', '') where it has none.
    label: the method ("clip-s4", ...); clip: the CLIP model's name; withheld: the class names
    reported as unknown (Table 2's rows: one of data.CONTEXT_FOLDS, in any order)."""
    if dataset == "context" and sorted(withheld) in [sorted(f) for f in CONTEXT_FOLDS]:
        return PAPER.get(("context-folds", label), ("", ""))
    if dataset == "cocostuff" and not withheld:
        return PAPER.get(("cocostuff", label, clip), ("", ""))
    return "", ""


# The supplementary's k-NN numbers on Pascal VOC 2012 (21 classes): Table 3 (pAcc, mAcc) and Table 4
# (per-class IoU, background first, VOC order).
PAPER_VOC = {
    "maskclip": ((91.9, 77.6), [90.5, 69.7, 43.0, 78.4, 59.4, 55.5, 78.3, 77.7, 83.5, 30.9, 77.4,
                                48.3, 80.5, 77.1, 73.1, 79.1, 59.9, 77.9, 39.5, 77.6, 56.2]),
    "maskclip+": ((90.9, 78.6), [89.5, 66.2, 34.1, 75.4, 56.3, 64.4, 84.4, 78.0, 82.9, 25.2, 75.7,
                                 48.5, 77.7, 74.2, 72.8, 74.7, 43.6, 70.8, 37.2, 76.0, 58.6]),
    "clip-s4": ((93.2, 83.0), [92.4, 83.5, 37.6, 85.7, 69.4, 75.3, 89.5, 79.9, 87.9, 28.2, 83.1,
                               57.5, 83.9, 82.4, 76.7, 80.1, 50.6, 80.5, 42.4, 81.4, 63.2]),
    "segsort": ((86.9, None), [87.6, 59.8, 26.4, 58.3, 39.9, 46.2, 64.0, 61.7, 69.5, 9.5, 31.3,
                               30.4, 59.4, 36.2, 52.5, 63.4, 16.5, 42.4, 26.8, 58.9, 52.1]),
    "conceptcontrast": ((89.7, None), [89.5, 71.0, 30.9, 73.6, 53.2, 60.4, 80.5, 73.9, 78.6, 17.4,
                                       47.9, 47.7, 68.5, 51.6, 63.7, 71.8, 36.3, 57.7, 31.7, 72.6,
                                       55.4])}

# ---- the field's eight benchmarks ----
# Dataset name -> short title, in the column order of the peers' tables (NACLIP's paper).
SUITE = {"voc21": "VOC21", "context60": "PC60", "coco-object": "Object", "voc": "VOC20",
         "context": "PC59", "cocostuff": "Stuff", "cityscapes": "City", "ade20k": "ADE"}
# --protocol peers, from NACLIP's configs/cfg_*.py and naclip.py: the test short side and the slide
# window per dataset (None: the whole image); windows step by PEERS_STRIDE; 80 OpenAI templates.
PEERS_SIDE = {"cityscapes": 560}  # PEERS_SHORT_SIDE elsewhere
PEERS_WINDOW = {"voc21": None, "voc": None}  # PEERS_CROP elsewhere
PEERS_SHORT_SIDE, PEERS_CROP, PEERS_STRIDE = 336, 224, 112
# the peers' cls_*.txt, as peers_<dataset>.txt, in the repo's classnames/
PEER_NAMES = Path(__file__).resolve().parent.parent / "classnames"
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


def published_row(teacher, refine, clip_info):
    """(source, {dataset: mIoU or None}) of the same teacher and --refine, published with ViT-B/16
    and OpenAI's weights, when this CLIP (clip_info: the teacher's info dict) is a ViT-B-16;
    else None."""
    if clip_info["name"] != "ViT-B-16" or (teacher, refine) not in PUBLISHED:
        return None
    source, values = PUBLISHED[(teacher, refine)]
    return source, dict(zip(SUITE, values))


def suite_line(title, values):
    """One markdown row: the eight numbers of values ({dataset: mIoU or None}; blank where absent)
    and their mean, with '(n/8)' after it when fewer than eight."""
    have = [v for v in values.values() if v is not None]
    mean = f"{np.mean(have):.1f}" + (f" ({len(have)}/8)" if len(have) < 8 else "") if have else ""
    cells = ["" if values.get(d) is None else f"{values[d]:.1f}" for d in SUITE]
    return f"| {title} | " + " | ".join(cells) + f" | {mean} |"
