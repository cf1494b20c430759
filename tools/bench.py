"""tools/bench.py: speed and memory of the stages (docs/benchmarks.md). Numbers are measured, never
asserted.

    python tools/bench.py dense    # MaskCLIP dense features vs encode_image (RN50, ViT-B-16, 448)
    python tools/bench.py text     # text prototypes of 171 COCO-Stuff names (--plain: 21, both)
    python tools/bench.py segment  # segment.py on 512x384 and 6000x4000 images: time, peak memory
    python tools/bench.py data     # training samples/s at 336 crops, 0 and 2 workers; superpixels
    python tools/bench.py train    # train.py at the paper setting, teacher cache off and on
    python tools/bench.py knn      # k-NN retrieval at VOC scale vs scikit-learn's brute force
    python tools/bench.py eval     # evaluate.py per image: teacher (whole, slide) and f (resnet101)
    python tools/bench.py quickstart  # the README's quick start in a fresh folder, per phase

All but quickstart use random CLIP weights (the cost of a forward does not depend on the values)
and print one markdown table row per measurement. `--device cuda` times on a GPU where there is one.
"""
import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent  # the repo: the scripts run from here
sys.path.insert(0, str(ROOT))
from data import COCOSTUFF_CLASSES, VOC_CLASSES, SegDataset, TwoViews, collate, superpixels
from util.metrics import knn_vote
from util.clip_loading import TEACHERS
from model import ClipTeacher, PixelEmbedder, class_scores, encode_text_fast, read_templates


def timed(fn, repeats, device):
    """Median wall time of fn() in ms after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


@torch.no_grad()
def bench_dense(args, device):
    print("| model | teacher | input | encode_image ms | dense ms | dense / encode_image |")
    print("|---|---|---|---|---|---|")
    for name in ("RN50", "ViT-B-16"):
        clip = open_clip.create_model(name, force_image_size=args.size,
                                      pretrained_text=False).eval().to(device)
        info = {"name": name, "pretrained": "none", "weights": None, "quick_gelu": False}
        x = torch.rand(args.dense_batch, 3, args.size, args.size, device=device)
        teachers = ["maskclip"] if name == "RN50" else TEACHERS  # the others change a ViT block
        for which in teachers:
            teacher = ClipTeacher(clip, info, which)
            xn = (x - teacher.mean) / teacher.std
            with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                t_enc = timed(lambda: clip.encode_image(xn), args.repeats, device)
            t_dense = timed(lambda: teacher.dense(x), args.repeats, device)
            shape = f"{args.dense_batch}x{args.size}x{args.size}"
            print(f"| {name} | {which} | {shape} | {t_enc:.0f} | {t_dense:.0f} | "
                  f"{t_dense / t_enc:.2f}x |")


@torch.no_grad()
def bench_text(args, device):
    clip = open_clip.create_model("ViT-B-16", pretrained_text=False).eval().to(device)
    tok = open_clip.get_tokenizer("ViT-B-16")
    templates = read_templates()
    print("| classes | prompts | path | seconds | max abs diff to plain |")
    print("|---|---|---|---|---|")
    # the plain path (--plain) for the 21 VOC names only: it is slow on 171 COCO-Stuff names
    sets = [("VOC", VOC_CLASSES + ["background"], args.plain),
            ("COCO-Stuff", COCOSTUFF_CLASSES, False)]
    for label, names, plain in sets:
        tokens = tok([t.format(c) for c in names for t in templates]).to(device)
        t = time.perf_counter()
        fast = encode_text_fast(clip, tokens)
        t_fast = time.perf_counter() - t
        diff = "-"
        if plain:
            t = time.perf_counter()
            plain = torch.cat([clip.encode_text(c) for c in tokens.split(128)])
            print(f"| {label} {len(names)} | {len(tokens)} | plain encode_text | "
                  f"{time.perf_counter() - t:.1f} | 0 |")
            diff = f"{(fast - plain).abs().max().item():.1e}"
        print(f"| {label} {len(names)} | {len(tokens)} | length-grouped (ours) | {t_fast:.1f} | "
              f"{diff} |")


def bench_segment(args, device):
    """segment.py as a user runs it, in a child process: its printed split, the child's peak RSS."""
    print("| image | model build s | text prototypes s | forward + save ms | peak RSS GiB |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for w, h in ((512, 384), (6000, 4000)):
            f = Path(d) / f"img_{w}x{h}.jpg"
            pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(f)
            cmd = [sys.executable, "segment.py", str(f), "--classes", "sky", "grass", "egg",
                   "--clip-pretrained", "none", "--cache-dir", "", "--out-dir",
                   str(Path(d) / "out"), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 cwd=ROOT).stdout
            build, text = re.search(r"model build ([\d.]+) s \| text prototypes ([\d.]+) s",
                                    out).groups()
            fwd = re.search(rf"{f.name} \(\d+x\d+\) (\d+) ms", out).group(1)
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # KiB -> GiB
            print(f"| {w}x{h} | {build} | {text} | {fwd} | {rss:.2f} |")


def synthetic_folder(root, n):
    """A VOC-layout folder of n smooth random 500 x 375 photos (smooth colour fields + grain)."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    ids = [f"im{i}" for i in range(n)]
    for i in ids:
        field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        small = Image.fromarray(field).resize((500, 375), Image.BICUBIC)
        grain = rng.integers(-12, 12, (375, 500, 3))
        img = np.clip(np.asarray(small, np.int16) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg")
        label = np.zeros((375, 500), np.uint8)
        Image.fromarray(label).save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids))
    (root / "classes.txt").write_text("sky\ngrass\nperson\n")


def bench_data(args, device):
    """The training pipeline on VOC-sized images (500 x 375): superpixels per image, then samples/s
    with 0 and 2 workers, first epoch (SLIC computed) and later epochs (SLIC from the cache)."""
    from torch.utils.data import DataLoader
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "ds"
        synthetic_folder(root, args.images)
        base = SegDataset("folder", root, "train")
        t = time.perf_counter()
        for i in range(len(base)):
            superpixels(base[i]["image"])
        print(f"| SLIC superpixels (64) per 500x375 image | "
              f"{1000 * (time.perf_counter() - t) / len(base):.0f} ms |")
        print("| workers | epoch | samples/s (336 crops, 2 views, teacher source 448) |")
        print("|---|---|---|")
        for workers in (0, 2):
            tv = TwoViews(base, crop_size=336, teacher_side=448, stride=16,
                          cache_dir=Path(d) / f"slic{workers}")
            loader = DataLoader(tv, batch_size=8, num_workers=workers, collate_fn=collate)
            for epoch, label in ((0, "first (SLIC computed)"), (1, "later (SLIC cached)")):
                tv.set_epoch(epoch)
                t = time.perf_counter()
                n = sum(len(b["id"]) for b in loader)
                print(f"| {workers} | {label} | {n / (time.perf_counter() - t):.1f} |")


def bench_knn(args, device):
    """k-NN retrieval at VOC scale (380k training segments, D = 1024): metrics.knn_vote (chunked
    matmul + top-k) on --queries against scikit-learn's brute-force NearestNeighbors (cosine) on the
    first --sk-queries of them (default: the same), both per 1,000 queries and for the protocol's
    52k."""
    from sklearn.neighbors import NearestNeighbors
    g = torch.Generator().manual_seed(0)
    memory = torch.nn.functional.normalize(torch.randn(args.memory, args.dim, generator=g), dim=1)
    labels = torch.randint(0, 21, (args.memory,), generator=g)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=g), dim=1)
    memory_d, labels_d = memory.to(device), labels.to(device)  # it stays there, as in knn.py
    t = time.perf_counter()
    knn_vote(queries.to(device), memory_d, labels_d, 20, 21, chunk=1024).cpu()  # waits for the GPU
    ours = time.perf_counter() - t
    rss_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    nq = min(args.sk_queries or args.queries, args.queries)
    nn_ = NearestNeighbors(n_neighbors=20, algorithm="brute", metric="cosine").fit(memory.numpy())
    t = time.perf_counter()
    nn_.kneighbors(queries[:nq].numpy())
    theirs = time.perf_counter() - t
    rate_o, rate_t = ours / args.queries * 1000, theirs / nq * 1000
    rss_both = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"| memory {args.memory} x {args.dim} | ours: {args.queries} queries in {ours:.1f} s "
          f"({rate_o:.2f} s/1k) | scikit-learn: {nq} queries in {theirs:.1f} s ({rate_t:.2f} "
          f"s/1k) | x{rate_t / rate_o:.1f} | 52k: ours {rate_o * 52 / 60:.1f} min, scikit-learn "
          f"{rate_t * 52 / 60:.1f} min | peak RSS ours {rss_ours:.1f} GiB, both {rss_both:.1f} "
          f"GiB |")


@torch.no_grad()
def bench_eval(args, device):
    """evaluate.py's cost per image (features, cosine to K class prototypes, upsampling to the
    label, argmax) on a 512 x 683 test image (VOC/COCO-Stuff's short side 512), random weights: the
    teacher (ViT-B-16 and RN50, whole image and 512-px slide windows, stride 341), f (resnet101)."""
    K, H, W = 171, 512, 683
    owner = torch.arange(K, device=device)
    print("| method | mode | ms / image | images / s |\n|---|---|---|---|")

    def run(label, mode, feats_of, stride):
        x = torch.rand(1, 3, H // stride * stride, W // stride * stride, device=device)
        D = feats_of(x[:, :, :64, :64]).shape[1]
        protos = torch.nn.functional.normalize(torch.randn(K, D, device=device), dim=1)

        def one():
            if mode == "whole":
                s = class_scores(feats_of(x), protos, owner, K)
            else:  # the windows evaluate.py --slide cuts: 512 wide, 341 apart
                s = [class_scores(feats_of(x[:, :, :, x0:x0 + 512]), protos, owner, K)
                     for x0 in sorted({0, min(341, x.shape[3] - 512), x.shape[3] - 512})]
                s = s[0]
            torch.nn.functional.interpolate(s, size=(H, W), mode="bilinear").argmax(1)
        ms = timed(one, args.repeats, device)
        print(f"| {label} | {mode} | {ms:.0f} | {1000 / ms:.2f} |")
    for name in ("ViT-B-16", "RN50"):
        clip = open_clip.create_model(name, pretrained_text=False).eval().to(device)
        teacher = ClipTeacher(clip, {"name": name, "pretrained": "none", "weights": None,
                                     "quick_gelu": False})
        run(f"MaskCLIP {name}", "whole", lambda x: teacher.dense(x)[0], teacher.stride)
        run(f"MaskCLIP {name}", "slide", lambda x: teacher.dense(x)[0], teacher.stride)
    f = PixelEmbedder(512, "resnet101", "none", 512).eval().to(device)
    with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        run("f (CLIP-S4, MaskCLIP+), resnet101", "whole", lambda x: f(x).float(), f.stride)


def bench_train(args, device):
    """train.py at the paper setting (resnet101, 336 crops, 8 images x 2 views, ViT-B-16 teacher at
    448), random weights, synthetic 500 x 375 photos, with the teacher cache off and on: the last of
    --steps steps (2 x --batch-size images, 2 steps an epoch: from step 3 on every map is in the
    cache), its phases, peak RSS."""
    precision = "fp32" if args.no_amp or device.type == "cpu" else "AMP fp16"
    print("| setting | teacher cache | s/step | teacher ms | peak memory | 20k steps |")
    print("|---|---|---|---|---|---|")
    for cache in ("0", "4096"):
        with tempfile.TemporaryDirectory() as d:
            synthetic_folder(Path(d) / "ds", 2 * args.batch_size)
            cmd = [sys.executable, "train.py", "--dataset", "folder", "--data-root",
                   str(Path(d) / "ds"), "--clip-pretrained", "none", "--backbone", args.backbone,
                   "--backbone-weights", "none", "--iters", str(args.steps), "--log-every", "1",
                   "--profile", "--eval-every", "0", "--out-dir", str(Path(d) / "run"),
                   "--device", args.device, "--unknown-protos", "20", "--teacher-cache", cache,
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
            cmd += ["--no-amp"] if args.no_amp else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 cwd=ROOT).stdout
        lines = [ln for ln in out.splitlines() if ln.startswith(("step", "  phases"))]
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
        ms = float(re.search(r"\| (\d+) ms \|", lines[-2]).group(1))
        teacher = re.search(r"teacher (\d+)", lines[-1]).group(1)
        gpu = re.search(r"GPU peak ([\d.]+) GiB", lines[-2])
        print(f"| {args.backbone}, 336 crops, {args.batch_size} x 2 views, {precision} | "
              f"{'off' if cache == '0' else cache + ' MiB'} | {ms / 1000:.2f} | {teacher} | "
              f"{rss:.1f} GiB RSS (largest child so far)"
              + (f", {gpu.group(1)} GiB GPU" if gpu else "")
              + f" | {ms * 20000 / 3.6e6:.1f} h |", flush=True)


def bench_quickstart(args, device):
    """The README's quick start as a new user runs it: `python train.py --dataset toy` with no toy
    world yet (toy/prepare.py runs first), in a temporary folder, end to end and per phase:
    toy/prepare.py's scenes, toy CLIP and toy ResNet-18 (its own lines), train.py's steps by phase
    (--profile, summed from log.jsonl; "log+save" holds the validations), the final scoring on the
    whole val split, and the rest (start-up, the teacher's val maps, superpixels on first use).
    --tiny: the tests' micro world and 4 steps (seconds). --keep-in DIR: work in DIR and keep it."""
    with tempfile.TemporaryDirectory() as tmp:
        d = args.keep_in or tmp
        run = Path(d) / "run"
        cmd = [sys.executable, "train.py", "--dataset", "toy", "--data-root", str(Path(d) / "toy"),
               "--out-dir", str(run), "--profile", "--device", args.device]
        cmd += (["--toy-prepare=--tiny", "--iters", "4", "--eval-every", "2", "--log-every", "2"]
                if args.tiny else [])
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        total = time.perf_counter() - t0
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        every = json.loads((run / "args.json").read_text())["log_every"]
    seconds = lambda pattern: float(re.search(pattern, out).group(1))
    rows = {"toy/prepare.py: scenes": seconds(r"wrote world \d+: .* in (\d+) s"),
            "toy/prepare.py: toy CLIP": seconds(r"toy CLIP: loss .* in (\d+) s"),
            "toy/prepare.py: toy ResNet-18": seconds(r"toy ResNet-18: loss .* in (\d+) s")}
    for rec in (r for r in log if "phases_ms" in r):
        for k, ms in rec["phases_ms"].items():  # ms per step over the `every` steps before
            rows[f"train.py: {k}"] = rows.get(f"train.py: {k}", 0.0) + ms * every / 1000
    final = next(r for r in log if "final_mIoU" in r)
    rows["train.py: final scoring, whole val split"] = final["final_seconds"]
    rows["the rest: start-up, val maps, superpixels"] = total - sum(rows.values())
    rows["total"] = total
    val = sum(r["val_seconds"] for r in log if "val_seconds" in r)
    print("| phase | seconds | share |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.0f} | {100 * v / total:.0f}% |")
    print(f"(validation inside log+save: {val:.0f} s) | {out.strip().splitlines()[-1]}")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["dense", "text", "segment", "data", "train", "knn", "eval",
                                    "quickstart"])
    p.add_argument("--memory", type=int, default=380000,
                   help="knn: training segments in the memory")
    p.add_argument("--queries", type=int, default=2000,
                   help="knn: validation segments timed (protocol: 52000)")
    p.add_argument("--sk-queries", type=int, default=0,
                   help="knn: time scikit-learn on only the first N (0: all)")
    p.add_argument("--dim", type=int, default=1024, help="knn: embedding dimension")
    p.add_argument("--backbone", default="resnet101", help="train: f's trunk")
    p.add_argument("--steps", type=int, default=3,
                   help="train: steps to run (the last one is reported; 3 on: cached maps)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="train: images per step (8 = the paper setting here)")
    p.add_argument("--workers", type=int, default=2, help="train: DataLoader worker processes")
    p.add_argument("--no-amp", action="store_true",
                   help="train: fp32 on CUDA (default: mixed precision)")
    p.add_argument("--images", type=int, default=48,
                   help="data: synthetic 500x375 images in the pipeline")
    p.add_argument("--size", type=int, default=448, help="dense: input side in pixels")
    p.add_argument("--dense-batch", type=int, default=1, help="dense: images per forward")
    p.add_argument("--repeats", type=int, default=5, help="dense: timed repeats (median reported)")
    p.add_argument("--plain", action="store_true",
                   help="text: also time plain encode_text (slow on CPU)")
    p.add_argument("--keep-in", default=None,
                   help="quickstart: the folder for the world and the run, kept (default: a "
                   "temporary one)")
    p.add_argument("--tiny", action="store_true",
                   help="quickstart: the tests' micro world, 4 steps (checks the bench itself)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"bench {args.what} | {torch.get_num_threads()} threads | device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    {"dense": bench_dense, "text": bench_text, "segment": bench_segment, "data": bench_data,
     "train": bench_train, "knn": bench_knn, "eval": bench_eval,
     "quickstart": bench_quickstart}[args.what](args, device)
    # this process's peak only: train and segment run in a child
    if device.type == "cuda" and torch.cuda.max_memory_allocated():
        print(f"GPU peak memory (this process): {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} "
              f"GiB")


if __name__ == "__main__":
    main()
