"""knn.py: unsupervised evaluation of pixel embeddings by k-NN segment retrieval (supplementary A.1).

Every image is cut into 36 segments by k-means on its embeddings (20 iterations). A training segment
is labelled by the majority ground-truth label of its pixels; a validation segment takes the majority
vote of its 20 nearest training segments (cosine), is painted back, and scored. No class names are
used, so this measures the embeddings themselves (Pascal VOC: 21 classes, background included).

    python knn.py --dataset voc --data-root data/voc --checkpoint runs/voc_vit16/ckpt.pt
    python knn.py --dataset voc --data-root data/voc --method maskclip          # the teacher's features
Toy world on a CPU (about a minute):
    python knn.py --dataset toy --checkpoint runs/toy_clips4/ckpt.pt --size 96
    python knn.py --dataset toy --method maskclip --clip-config data/toy/toyclip.json \
        --clip-pretrained data/toy/toyclip.pt --size 64

The training-segment memory (about 380k x D on VOC trainaug) is written next to --memory-dir and
reused by later runs with the same model, dataset and protocol.
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import (IGNORE, EvalImages, SegDataset, UserError, confusion_matrix, knn_vote, segmentation_metrics,
                  write_json)
from losses import kmeans_segments, segment_means
from model import load_embedder, pick_device


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--checkpoint", default=None, help="a train.py checkpoint")
    p.add_argument("--method", default=None, choices=["maskclip"], help="maskclip: the frozen teacher's dense features")
    p.add_argument("--clip", default="ViT-B-16")
    p.add_argument("--clip-pretrained", default="openai")
    p.add_argument("--clip-config", default=None)
    p.add_argument("--quick-gelu", choices=["auto", "on", "off"], default="auto")
    # Data
    p.add_argument("--dataset", default="voc", choices=["voc", "context", "cocostuff", "folder", "toy"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--size", type=int, default=None, help="short side of the images (default as evaluate.py)")
    p.add_argument("--limit-train", type=int, default=0, help="use only the first N training images (0: all)")
    # Protocol (supplementary A.1)
    p.add_argument("--segments", type=int, default=36, help="k-means segments per image (a 6 x 6 grid start)")
    p.add_argument("--kmeans-iters", type=int, default=20, help="k-means iterations")
    p.add_argument("--k", type=int, default=20, help="nearest training segments that vote")
    p.add_argument("--chunk", type=int, default=4096, help="queries per retrieval matmul")
    # Output
    p.add_argument("--memory-dir", default="out/knn_memory", help="where training-segment memories are kept")
    p.add_argument("--json", default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p.parse_args(argv)


@torch.no_grad()
def image_segments(embed, item, n_segments, iters, num_classes):
    """Segments of one image: unit embeddings (S, D), their majority label (S,) (-1: all ignore), and the
    segment map (H, W) at label size."""
    feats = embed(item["image"][None])  # (1, D, h, w)
    g = int(round(n_segments ** 0.5))
    seg = kmeans_segments(feats, torch.zeros(feats.shape[0], *feats.shape[2:], dtype=torch.long,
                                              device=feats.device), views=1, grid=(g, g), iters=iters, lam=1.0)
    emb = segment_means(feats, seg)  # (S, D)
    ids = F.interpolate(seg.ids[None].float(), size=item["label"].shape, mode="nearest")[0, 0].long().cpu()
    gt = item["label"].long()
    keep = gt != IGNORE
    votes = torch.bincount(ids[keep] * num_classes + gt[keep], minlength=seg.count * num_classes)
    votes = votes.view(seg.count, num_classes)
    labels = torch.where(votes.sum(1) > 0, votes.argmax(1), -1)
    return emb, labels, ids


def main(args):
    device = pick_device(args.device)
    if bool(args.checkpoint) == bool(args.method):
        raise UserError("give either --checkpoint PATH or --method maskclip")
    # ---- model ----
    embed_keys, stride, _, run = load_embedder(args, device)
    embed = lambda x: embed_keys(x)[0]  # noqa: E731  features only: (B, D, h, w)
    label = run["method"] if run else "maskclip"
    ident = [str(Path(args.checkpoint).resolve()), run["step"]] if run else [args.clip, args.clip_pretrained,
                                                                             args.clip_config]
    # ---- data: 21 classes with background on VOC ----
    train = SegDataset(args.dataset, args.data_root, "train", background=True)
    val = SegDataset(args.dataset, args.data_root, "val", background=True)
    names = [c.split(";")[0] for c in val.classes]
    K = len(names)
    n_train = min(len(train), args.limit_train) if args.limit_train else len(train)
    # ---- memory of training segments (cached on disk) ----
    key = hashlib.sha1(json.dumps(ident + [args.dataset, str(args.data_root), args.size, args.segments,
                                           args.kmeans_iters, n_train]).encode()).hexdigest()[:16]
    mem_file = Path(args.memory_dir) / f"{label}_{args.dataset}_{key}.pt"
    if mem_file.is_file():
        memory, mem_labels = torch.load(mem_file, weights_only=True)
        print(f"memory: {len(memory)} segments from {mem_file}")
    else:
        rows, labs = [], []
        data = EvalImages(train, args.size, stride)
        for i in tqdm(range(n_train), desc="training segments"):
            emb, lab, _ = image_segments(embed, data[i], args.segments, args.kmeans_iters, K)
            rows.append(emb[lab >= 0].half().cpu())
            labs.append(lab[lab >= 0])
        memory, mem_labels = torch.cat(rows), torch.cat(labs)
        mem_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save((memory, mem_labels), mem_file)
        print(f"memory: {len(memory)} segments written to {mem_file}")
    memory, mem_labels = memory.to(device).float(), mem_labels.to(device)
    # ---- vote for each validation segment, paint, score ----
    cm = np.zeros((K, K), np.int64)
    data = EvalImages(val, args.size, stride)
    for i in tqdm(range(len(data)), desc="validation segments"):
        item = data[i]
        emb, _, ids = image_segments(embed, item, args.segments, args.kmeans_iters, K)
        pred = knn_vote(emb.float(), memory, mem_labels, args.k, K, args.chunk).cpu()[ids]  # (H, W)
        cm += confusion_matrix(pred.numpy(), item["label"].numpy(), K)
    result = segmentation_metrics(cm, names)
    print(f"\n| method | k-NN mIoU | pAcc | mAcc |\n|---|---|---|---|\n"
          f"| {label} | {result['mIoU']:.1f} | {result['pAcc']:.1f} | {result['mAcc']:.1f} |")
    print("per class IoU: " + ", ".join(f"{k} {v:.1f}" for k, v in result["per_class"].items() if v is not None))
    if args.json:
        write_json(args.json, {"method": label, "protocol": "knn", **result})
    return result


if __name__ == "__main__":
    try:
        main(get_args())
    except UserError as e:
        sys.exit(f"error: {e}")
