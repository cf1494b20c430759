r"""knn.py: unsupervised evaluation of pixel embeddings by k-NN segment retrieval and by a linear
probe (supplementary A.1).

Every image is cut into 36 segments by k-means on its embeddings and pixel positions (20 iterations;
the position's weight is --kmeans-lambda, our choice), on the embedding grid or, with --kmeans-at
labels, on the embeddings resized to the label size (edges may then fall inside a cell; our choice
too). A training segment is labelled by the majority ground-truth label of its pixels; a validation
segment takes the majority vote of its 20 nearest training segments (cosine), is painted back, and
scored. No class names are used, so this measures the embeddings themselves (Pascal VOC: 21
classes, background included). A second row, the segment ceiling, paints each validation segment
with its own majority label: how well the segments alone can do, so that a gap between two models
splits into their segments' part and their retrieval's part.

    python knn.py --dataset voc --data-root data/voc --checkpoint runs/voc_vit16/ckpt.pt
    python knn.py --dataset voc --data-root data/voc --method maskclip      # the teacher's features
Toy world on 2 CPU cores (a few minutes: about 4 for a trained run, at its own --eval-size):
    python knn.py --dataset toy --checkpoint runs/toy/ckpt.pt
    python knn.py --dataset toy --method maskclip --size 64

The training-segment memory (about 380k x D on VOC trainaug) is written to --memory-dir and
reused by later runs with the same model, dataset and protocol.

Linear probe (supplementary A.1: a 1x1 linear classifier on the frozen embeddings, 60k iterations,
lr 0.1 with poly decay, 512 crops, batch 16). Running the same command again continues an unfinished
probe from its last save, or scores a finished one:
    python knn.py --dataset voc --data-root data/voc --checkpoint runs/voc_vit16/ckpt.pt --probe
    python knn.py --dataset toy --checkpoint runs/toy/ckpt.pt --probe --probe-iters 500 \
        --crop-size 96
On VOC the supplementary's numbers (Table 3: pAcc, mAcc; Table 4: per-class k-NN IoU) are printed
beside ours.
"""
import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import (DATASETS, IGNORE, EvalImages, SegDataset, add_bad_files_arg, first_names,
                  resize_labels, resize_short_side, test_side)
from util.files import UserError, atomic_save, cache_key, read_cache, write_json
from util.metrics import (confusion_matrix, knn_vote, language_confusion, majority_labels,
                     per_class_line, segmentation_metrics)
from losses import image_segments
from util.clip_loading import add_clip_args, resolve_clip_args
from model import load_embedder
from util.benchmarks import PAPER_VOC
from util.loop import pick_device, poly_schedule, saved_on_interrupt

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--checkpoint", default=None, help="a train.py checkpoint")
    p.add_argument("--method", default=None, choices=["maskclip"],
                   help="maskclip: the frozen teacher's dense features")
    add_clip_args(p)
    # Data
    p.add_argument("--dataset", default="voc", choices=DATASETS)
    p.add_argument("--data-root", default=None)
    add_bad_files_arg(p)
    p.add_argument("--size", type=int, default=None,
                   help="short side of the images (default: a checkpoint's --eval-size, else the "
                   "dataset's test side, as evaluate.py)")
    p.add_argument("--limit-train", type=int, default=0,
                   help="use only the first N training images (0: all)")
    # Protocol (supplementary A.1)
    p.add_argument("--segments", type=int, default=36,
                   help="k-means segments per image (a 6 x 6 grid start)")
    p.add_argument("--kmeans-iters", type=int, default=20, help="k-means iterations")
    p.add_argument("--kmeans-lambda", type=float, default=1.0,
                   help="weight of pixel position in that k-means (0: embeddings alone) [choice]")
    p.add_argument("--kmeans-at", choices=["features", "labels"], default="features",
                   help="features: k-means on the h x w embedding grid, segments resized (nearest) "
                   "to the labels; labels: embeddings resized (bilinear) to the label size first, "
                   "as SPML's and HSG's k-NN scripts do [choice]")
    p.add_argument("--k", type=int, default=20, help="nearest training segments that vote")
    p.add_argument("--chunk", type=int, default=4096, help="queries per retrieval matmul")
    # Linear probe (supplementary A.1)
    p.add_argument("--probe", action="store_true",
                   help="train and score a linear probe instead of k-NN")
    p.add_argument("--probe-iters", type=int, default=60000, help="probe iterations (paper: 60k)")
    p.add_argument("--probe-lr", type=float, default=0.1,
                   help="probe learning rate, poly decay (paper: 0.1)")
    p.add_argument("--crop-size", type=int, default=512, help="probe training crops (paper: 512)")
    p.add_argument("--batch-size", type=int, default=16, help="probe batch (paper: 16)")
    p.add_argument("--save-every", type=int, default=1000, help="probe: save every N iterations")
    p.add_argument("--stop-after", type=int, default=0,
                   help="probe: save and stop after N iterations of this call")
    p.add_argument("--workers", type=int, default=2, help="probe: DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    # Output
    p.add_argument("--memory-dir", default="out/knn_memory",
                   help="where training-segment memories and probes are kept")
    p.add_argument("--json", default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return resolve_clip_args(p.parse_args(argv))


@torch.no_grad()
def segments_and_labels(embed, item, n_segments, iters, num_classes, lam=1.0, at="features"):
    """Segments of one image: unit embeddings (S, D), their majority label (S,) (-1: all ignore),
    and the segment map (H, W) at label size. at="labels": k-means on embeddings at (H, W)."""
    feats = embed(item["image"][None])
    if at == "labels":
        feats = F.normalize(F.interpolate(feats.float(), size=item["label"].shape,
                                          mode="bilinear"), dim=1)
    seg, emb = image_segments(feats, n_segments, iters, lam)
    labels, ids = majority_labels(seg.ids[0].cpu(), item["label"].long(), num_classes, seg.count)
    return emb, labels, ids


class ProbeCrops(torch.utils.data.Dataset):
    """Training crops for the probe: the image at short side `side`, a random crop x crop (padded
    with ignore where the image is smaller) and a random flip, drawn from a per-sample seed so that
    any step can be replayed (exact resume, any number of workers).
    Item (i, seed) -> image (3, crop, crop) float in [0, 1], label (crop, crop) long."""

    def __init__(self, base, side, crop, stride):
        self.base, self.side, self.crop, self.stride = base, side, crop, stride

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        i, seed = key
        g = np.random.default_rng(seed)
        item = self.base[i]
        x = resize_short_side(item["image"], self.side, self.stride, 4096)  # (3, h, w)
        y = torch.from_numpy(resize_labels(item["label"], x.shape[1:]).astype(np.int64))
        c = self.crop
        pad = (0, max(0, c - x.shape[2]), 0, max(0, c - x.shape[1]))
        x, y = F.pad(x, pad), F.pad(y, pad, value=IGNORE)
        y0, x0 = g.integers(x.shape[1] - c + 1), g.integers(x.shape[2] - c + 1)
        x, y = x[:, y0:y0 + c, x0:x0 + c], y[y0:y0 + c, x0:x0 + c]
        if g.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


def probe_batches(n_items, batch, seed, start):
    """Step s draws its items and their crop seeds from an RNG seeded by (seed, s)."""
    step = start
    while True:
        g = np.random.default_rng([seed, step])
        yield list(zip(g.integers(n_items, size=batch).tolist(),
                       g.integers(2**31, size=batch).tolist()))
        step += 1


@dataclass
class ProbeOutcome:
    """Where linear_probe stopped: the step reached, whether that is all its iterations, and then
    the val confusion matrix (K, K) int64 (None while unfinished)."""
    step: int
    finished: bool
    confusion: np.ndarray | None


def linear_probe(embed, stride, device, train, val, K, path, *, side, crop, batch, iters, lr,
                 seed, save_every, stop_after, workers):
    """Train the 1x1 classifier on frozen embeddings, continuing from `path` when it holds an
    unfinished one (or reusing a finished one), and score it on val. Ctrl-C saves it and exits
    with status 130.
    embed: images (B, 3, h, w) in [0, 1] -> features (B, D, h/stride, w/stride); train, val:
    SegDatasets with K classes; side: the images' short side; crop, batch, iters, lr, seed: the
    probe's training; save_every: steps between saves; stop_after: save and stop after this many
    steps of this call (0: never); workers: DataLoader processes."""
    D = embed(torch.zeros(1, 3, 4 * stride, 4 * stride, device=device)).shape[1]
    torch.manual_seed(seed)
    clf = torch.nn.Conv2d(D, K, 1).to(device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9)  # momentum: our choice
    sched = poly_schedule(opt, iters)
    step = 0
    ck = read_cache(path, "probe")
    if ck is not None:
        clf.load_state_dict(ck["classifier"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step = ck["step"]
        print(f"probe: continuing {path} at step {step}/{iters}")
    loader = torch.utils.data.DataLoader(ProbeCrops(train, side, crop, stride),
                                         batch_sampler=probe_batches(len(train), batch, seed, step),
                                         num_workers=workers)

    if step < iters:
        stop = min(iters, step + stop_after) if stop_after else iters
        step = train_probe(embed, clf, opt, sched, loader, device, step, stop, iters, path,
                           save_every)
        if step < iters:
            return ProbeOutcome(step, False, None)
    with torch.no_grad():  # the language-driven protocol, the probe in place of the text
        cm = language_confusion(lambda x: clf(embed(x.to(device)).float()),
                                EvalImages(val, side, stride), K, desc="probe on val")
    return ProbeOutcome(step, True, cm)


def train_probe(embed, clf, opt, sched, loader, device, step, stop, iters, path, save_every):
    """The probe's SGD steps from `step` to `stop` on frozen embeddings, saved to `path` every
    save_every steps, at the stop, and on Ctrl-C. Returns the last step."""
    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"classifier": clf.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "step": step}, path)

    bar = tqdm(total=iters, initial=step, desc="linear probe")
    it, t0 = iter(loader), time.perf_counter()
    with saved_on_interrupt(save, lambda: f"interrupted: probe saved at step {step} in {path}; "
                                          "run the same command to continue"):
        while step < stop:
            x, y = next(it)
            with torch.no_grad():
                feats = embed(x.to(device)).float()  # (B, D, h, w), frozen
            logits = F.interpolate(clf(feats), size=y.shape[1:], mode="bilinear",
                                   align_corners=False)  # (B, K, crop, crop)
            loss = F.cross_entropy(logits, y.to(device), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % save_every == 0 or step == stop:
                save()
    bar.close()
    print(f"probe: at step {step}/{iters} after {time.perf_counter() - t0:.0f} s, saved to {path}")
    return step


def main(args):
    device = pick_device(args.device)
    if bool(args.checkpoint) == bool(args.method):
        raise UserError("give either --checkpoint PATH or --method maskclip")
    # ---- model ----
    embed_keys, stride, _, run = load_embedder(device, args.checkpoint, clip=args.clip,
                                               clip_pretrained=args.clip_pretrained,
                                               clip_config=args.clip_config,
                                               quick_gelu=args.quick_gelu, teacher=args.teacher)
    size = args.size or (run["args"]["eval_size"] if run else None)  # a run's own test side
    embed = lambda x: embed_keys(x)[0]  # features only: (B, D, h, w)
    label = run["method"] if run else args.teacher
    ident = ([str(Path(args.checkpoint).resolve()), run["step"]] if run else
             [args.clip, args.clip_pretrained, args.clip_config]
             + ([args.teacher] if args.teacher != "maskclip" else []))  # maskclip keeps its keys
    # ---- data: 21 classes with background on VOC ----
    train = SegDataset(args.dataset, args.data_root, "train", background=True,
                       bad_files=args.bad_files)
    val = SegDataset(args.dataset, args.data_root, "val", background=True,
                     bad_files=args.bad_files)
    names = first_names(val.classes)
    K = len(names)
    n_train = min(len(train), args.limit_train) if args.limit_train else len(train)
    if args.probe:
        key = cache_key(ident + [args.dataset, str(args.data_root), size, args.crop_size,
                                 args.batch_size, args.probe_iters, args.probe_lr, args.seed])
        probe = linear_probe(embed, stride, device, train, val, K,
                             Path(args.memory_dir) / f"probe_{label}_{args.dataset}_{key}.pt",
                             side=size or test_side(train), crop=args.crop_size,
                             batch=args.batch_size, iters=args.probe_iters, lr=args.probe_lr,
                             seed=args.seed, save_every=args.save_every,
                             stop_after=args.stop_after, workers=args.workers)
        if not probe.finished:
            sys.exit(0)  # --stop-after: the same command continues it
        return report(probe.confusion, names, label, "linear probe", args.dataset, args.json)
    # one cut, the same protocol for training and validation images
    cut = lambda item: segments_and_labels(embed, item, args.segments, args.kmeans_iters, K,
                                           args.kmeans_lambda, args.kmeans_at)
    setting = [args.dataset, str(args.data_root), size, args.segments, args.kmeans_iters, n_train]
    if args.kmeans_lambda != 1.0:  # a non-default protocol choice joins the key
        setting.append(args.kmeans_lambda)
    if args.kmeans_at != "features":
        setting.append(args.kmeans_at)
    mem_file = Path(args.memory_dir) / f"{label}_{args.dataset}_{cache_key(ident + setting)}.pt"
    memory, mem_labels = training_memory(cut, EvalImages(train, size, stride), n_train, mem_file)
    memory, mem_labels = memory.to(device).float(), mem_labels.to(device)
    cm, ceiling = vote(cut, EvalImages(val, size, stride), memory, mem_labels, args.k, K,
                       args.chunk)
    return report(cm, names, label, "k-NN", args.dataset, args.json, ceiling)


def training_memory(cut, data, n_train, mem_file):
    """The memory of training segments: each of the first n_train images of `data` cut into
    segments (cut: an item -> embeddings (S, D), labels (S,), ids), the labelled ones kept;
    cached on disk in mem_file. Returns (embeddings (N, D) fp16, labels (N,))."""
    cached = read_cache(mem_file, "memory")
    if cached is not None:
        memory, mem_labels = cached
        print(f"memory: {len(memory)} segments from {mem_file}")
    else:
        rows, labs = [], []
        for i in tqdm(range(n_train), desc="training segments"):
            emb, lab, _ = cut(data[i])
            rows.append(emb[lab >= 0].half().cpu())
            labs.append(lab[lab >= 0])
        memory, mem_labels = torch.cat(rows), torch.cat(labs)
        mem_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_save((memory, mem_labels), mem_file)
        print(f"memory: {len(memory)} segments written to {mem_file}")
    return memory, mem_labels


def vote(cut, data, memory, mem_labels, k, K, chunk):
    """Each validation segment of `data` labelled by the vote of its k nearest training segments,
    painted and scored. Returns the confusion matrix (K, K) and the segment ceiling's: each
    segment painted with its own majority label, the best any vote can do with these segments
    (k-NN below it: retrieval's loss; the ceiling below 100: the segments')."""
    cm, ceiling = np.zeros((K, K), np.int64), np.zeros((K, K), np.int64)
    for i in tqdm(range(len(data)), desc="validation segments"):
        item = data[i]
        emb, own, ids = cut(item)
        pred = knn_vote(emb.float(), memory, mem_labels, k, K, chunk).cpu()[ids]  # (H, W)
        cm += confusion_matrix(pred.numpy(), item["label"].numpy(), K)
        own = own.clamp(min=0)  # -1: a segment without a labelled pixel, so never scored
        ceiling += confusion_matrix(own[ids].numpy(), item["label"].numpy(), K)
    return cm, ceiling


def report(cm, names, label, protocol, dataset, json_path=None, ceiling=None):
    """Print ours (and on VOC the supplementary's k-NN numbers beside them), write json_path.
    protocol: "k-NN" or "linear probe"; ceiling: the confusion of the segment ceiling (k-NN only),
    reported as its mIoU, pAcc and mAcc."""
    result = segmentation_metrics(cm, names)
    if ceiling is not None:
        result["segment_ceiling"] = {k: v for k, v in segmentation_metrics(ceiling, names).items()
                                     if k != "per_class"}
    on_voc = dataset == "voc" and protocol == "k-NN" and len(names) == 21
    paper = PAPER_VOC.get(label) if on_voc else None
    paper_head, paper_rule = (" paper pAcc | paper mAcc |", "---|---|") if paper else ("", "")
    print(f"\n| method | protocol | mIoU | pAcc | mAcc |{paper_head}\n"
          f"|---|---|---|---|---|{paper_rule}")
    print(f"| {label} | {protocol} | {result['mIoU']:.1f} | {result['pAcc']:.1f} | "
          f"{result['mAcc']:.1f} |" + (f" {paper[0][0]} | {paper[0][1] or '-'} |" if paper else ""))
    if ceiling is not None:
        c = result["segment_ceiling"]
        print(f"| {label} | segment ceiling | {c['mIoU']:.1f} | {c['pAcc']:.1f} | {c['mAcc']:.1f} |"
              + (" | |" if paper else ""))
    if paper:
        print("\n| class | IoU | paper IoU (Table 4) |\n|---|---|---|")
        for (n, v), ref in zip(result["per_class"].items(), paper[1]):
            print(f"| {n} | {'-' if v is None else f'{v:.1f}'} | {ref} |")
    else:
        print(per_class_line(result["per_class"]))
    if json_path:
        write_json(json_path, {"method": label,
                               "protocol": "probe" if protocol == "linear probe" else "knn",
                               **result})
    return result


if __name__ == "__main__":
    try:
        main(get_args())
    except UserError as e:
        sys.exit(f"error: {e}")
