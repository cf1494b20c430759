"""train.py: train the pixel-embedding network of CLIP-S4 without labels (or a baseline).

The paper's setting (one V100 in the paper, about 5 h for 20k iterations; 1.1 h on an H100):
    python train.py --dataset voc --data-root data/voc
Class-free Pascal Context (fold 0's names withheld everywhere):
    python train.py --dataset context --data-root data/context --unknown-fold 0 \
        --out-dir runs/ctx_f0
The toy world on 2 CPU cores, after `python toy.py` (its preset is printed at start):
    python train.py --dataset toy
Your own small images (folder layout, short side under 224 px: the same small-image recipe):
    python train.py --dataset folder --data-root DIR --clip-config my_clip.json \
        --clip-pretrained my_clip.pt --backbone-weights resnet18.pt --out-dir runs/mine
Baselines in the same harness: --method maskclip+ (pseudo-labels, then self-training), segsort.
A killed or stopped run continues with the same command and --resume. Several GPUs (or CPU
processes with gloo), --batch-size per process:
    torchrun --nproc_per_node 4 train.py --dataset voc
"""
import argparse
import json
import os
import sys
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import (CONTEXT_FOLDS, DATASETS, SMALL_SIDE, EvalImages, SegDataset, TwoViews, UserError,
                  atomic_save, collate, language_confusion, segmentation_metrics, test_side,
                  warp)
from losses import (UnknownPrototypes, clip_s4_objective, kmeans_segments, maskclip_plus_objective,
                    pixel_sample, regions_on_grid, segsort_objective)
from clip_loading import add_clip_args, load_clip, resolve_clip_args, vision_stride
from model import (ASPP_RATES, GRID_SHIFT, MaskCLIP, PixelEmbedder, class_embeddings, class_scores,
                   pick_device, read_checkpoint)

# Per-dataset defaults, printed at start and kept in args.json; a flag given on the command line
# wins. The paper's datasets need none: the flags' own defaults are the paper's setting. Small
# images (a short side under SMALL_SIDE, as the toy world's 64 px or a small dataset of your own in
# the folder layout) get settings that follow from their size and the teacher's patch stride.


def small_image_recipe(side, stride):
    """The recipe for images of short side `side` < SMALL_SIDE seen by a teacher of patch `stride`
    (docs/method.md, section 9b), sized to train in about 10 minutes on 2 CPU cores:
      --size       the images' own side rounded to the stride: the teacher sees them as they are;
      --crop-size  and --eval-size 1.5 x side (a multiple of 8): f's stride-8 grid 1.5x finer
                   than the side / 8 and the teacher's side / stride;
      --aspp-rates DeepLab-v2's (6, 12, 18, 24) scaled by f's grid side / 42, the paper's grid
                   (336 / 8), so the branches look at the same share of the view (at least 1);
      --jitter 0 --grayscale 0: no photometric change of the views. A small image's things are
                   known by colour more than by shape, and the teacher's label of a thing (from
                   the untouched source) cannot be read off a grey or hue-shifted view; with
                   SimCLR's jitter the student loses the things (docs/results.md);
      --view-scale 0.5 1: crops of at least half the image, not a quarter: a thing of a few
                   pixels stays near the size it has at test time;
      f            a ResNet-18 with a 128-channel head, 250 steps of 8 images, lr 0.01, warm-up 20,
                   8 unknown prototypes, validation every 50 steps."""
    f_side = max(8, 8 * round(1.5 * side / 8))
    rates = [max(1, round(r * (f_side // 8) / 42)) for r in ASPP_RATES]
    return dict(size=max(stride, stride * round(side / stride)), crop_size=f_side,
                eval_size=f_side, aspp_rates=rates, jitter=0.0, grayscale=0.0,
                view_scale=[0.5, 1.0], backbone="resnet18", head_dim=128, iters=250, batch_size=8,
                lr=0.01, warmup=20, unknown_protos=8, eval_every=50)


def preset_for(first):
    """The preset of a command line (parsed once without it): on --dataset toy the small-image
    recipe of the toy world's images and CLIP, with f from the toy ImageNet weights toy.py wrote
    next to the scenes; on --dataset folder the same recipe when the images are small; none
    otherwise."""
    root = first.data_root or f"data/{first.dataset}"
    if first.dataset not in ("toy", "folder"):
        return {}
    try:
        side = SegDataset(first.dataset, root, first.split).typical_side()
    except UserError:
        side = None
    first = resolve_clip_args(argparse.Namespace(**vars(first)))
    if first.dataset == "toy":
        return {**small_image_recipe(side or 64, vision_stride(first)),
                "backbone_weights": f"{root}/resnet18_toy.pt", "out_dir": "runs/toy"}
    if side is None or side >= SMALL_SIDE:
        return {}
    return small_image_recipe(side, vision_stride(first))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument
    # Model
    add_clip_args(p)
    arg("--size", type=int, default=448, help="short side of the source the teacher sees [choice]")
    arg("--backbone", default="resnet101", help="f's trunk: resnet101, resnet50, resnet18")
    arg("--backbone-weights", default="auto", help="auto (torchvision's cache), none, or a file")
    arg("--head-dim", type=int, default=512, help="channels of f's ASPP and head [choice]")
    arg("--aspp-rates", type=int, nargs=4, default=list(ASPP_RATES),
        help="dilation rates of f's four ASPP branches (DeepLab-v2's) [choice]")
    arg("--grid", choices=list(GRID_SHIFT), default="centre",
        help="f's cell i looks at the middle of pixels [8i, 8i+8), where it is painted, or at "
             "pixel 8i (corner) [choice; model.PixelEmbedder]")
    # Data
    arg("--dataset", default="voc", choices=DATASETS)
    arg("--class-names", default=None, help="a file of class names replacing the dataset's")
    arg("--data-root", default=None, help="dataset folder (default data/<dataset>)")
    arg("--split", default="train", help="split to train on")
    arg("--crop-size", type=int, default=336, help="side of each augmented view (paper: 336)")
    arg("--superpixels", type=int, default=64, help="SLIC regions per image [choice]")
    arg("--view-scale", type=float, nargs=2, default=[0.25, 1.0],
        help="area range of each view's random crop, a share of the source [choice]")
    arg("--jitter", type=float, default=0.4,
        help="colour jitter of the views: brightness, contrast, saturation, hue/4 [choice: "
             "SimCLR's]; 0 = none")
    arg("--grayscale", type=float, default=0.2, help="chance a view is grey [choice: SimCLR's]")
    arg("--workers", type=int, default=2, help="DataLoader worker processes")
    # Method and losses
    arg("--method", default="clip-s4", choices=["clip-s4", "maskclip+", "segsort"])
    arg("--unknown-fold", type=int, default=None,
        help="class-free Pascal Context: withhold fold K's names")
    arg("--unknown-classes", nargs="+", default=[],
        help="class-free on any dataset: withhold these names")
    arg("--lambda-c", type=float, default=1.0, help="weight of L_c, pixel-segment contrastive")
    arg("--lambda-e", type=float, default=1.0, help="weight of L_e, embedding consistency [choice]")
    arg("--lambda-s", type=float, default=1.0, help="weight of L_s, semantic consistency [choice]")
    arg("--kappa", type=float, default=10.0, help="concentration of L_c (SegSort's value)")
    arg("--kappa-e", type=float, default=10.0, help="concentration of L_e's InfoNCE [choice]")
    arg("--kappa-s", type=float, default=0.0,
        help="logit scale of L_s and MaskCLIP+; 0 = CLIP's own [choice]")
    arg("--emb-loss", default="nce", choices=["nce", "cos"], help="form of L_e [choice]")
    arg("--kmeans-grid", type=int, default=4, help="k-means starts from a G x G grid [choice]")
    arg("--kmeans-iters", type=int, default=10, help="k-means iterations per step [choice]")
    arg("--kmeans-lambda", type=float, default=1.0, help="weight of position in k-means [choice]")
    arg("--max-pixels", type=int, default=4096, help="pixels per step scored by L_c, L_s [choice]")
    arg("--unknown-protos", type=int, default=20, help="M unknown prototypes [choice]")
    arg("--unknown-tau", type=float, default=0.5,
        help="CLIP confidence below which a segment is unknown [choice]")
    arg("--unknown-scale", type=float, default=100.0,
        help="softmax scale of that confidence (docs/method.md: 100); 0 = CLIP's own logit "
             "scale, the same for OpenAI's CLIPs, about 16 for the toy CLIPs [choice]")
    arg("--self-train-after", type=float, default=0.1,
        help="maskclip+: share of training on the teacher's labels")
    # Optim
    arg("--iters", type=int, default=20000, help="training iterations (paper: 20k)")
    arg("--batch-size", type=int, default=8, help="images per step, two views each [choice]")
    arg("--lr", type=float, default=3e-3, help="base learning rate, poly decay; head x10 [choice]")
    arg("--warmup", type=int, default=100, help="linear warm-up iterations [choice]")
    arg("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    arg("--weight-decay", type=float, default=1e-3, help="SGD weight decay (paper: 1e-3)")
    arg("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    # Validation while training
    arg("--eval-every", type=int, default=1000,
        help="score f on --eval-images validation images every N steps (0: never)")
    arg("--eval-images", type=int, default=50, help="how many: the first N of the val split")
    arg("--eval-size", type=int, default=None,
        help="their short side for f (default: the dataset's test side; the teacher is scored "
             "once there). evaluate.py, knn.py and visualize.py score the run at this side too")
    # Output
    arg("--out-dir", default="runs/clip_s4", help="run folder: ckpt.pt, ckpt_prev.pt, log.jsonl")
    arg("--log-every", type=int, default=20, help="a log line every N steps")
    arg("--save-every", type=int, default=1000, help="a checkpoint every N steps and at the end")
    arg("--resume", action="store_true", help="continue the run in --out-dir")
    arg("--stop-after", type=int, default=0,
        help="save and stop after N steps of this invocation (0: run to --iters)")
    arg("--profile", action="store_true", help="print each phase's time per step (syncs CUDA)")
    arg("--device", choices=["auto", "cpu", "cuda"], default="auto")
    arg("--seed", type=int, default=0)
    preset = preset_for(p.parse_known_args(argv)[0])
    p.set_defaults(**preset)
    args = resolve_clip_args(p.parse_args(argv))
    args.preset = {k: getattr(args, k) for k in preset if getattr(args, k) == p.get_default(k)}
    return args


def split_names(classes, args):
    """Known and withheld class names (the class-free setting): withheld ones appear nowhere in
    training."""
    withheld = list(args.unknown_classes)
    if args.unknown_fold is not None:
        if args.dataset != "context" or not 0 <= args.unknown_fold < len(CONTEXT_FOLDS):
            raise UserError("--unknown-fold K takes 0-3 with --dataset context; elsewhere use "
                            "--unknown-classes")
        withheld += CONTEXT_FOLDS[args.unknown_fold]
    first = [c.split(";")[0] for c in classes]
    missing = [n for n in withheld if n not in first]
    if missing:
        raise UserError(f"--unknown-classes {missing}: not class names of {args.dataset} "
                        f"({', '.join(first[:8])}, ...)")
    return [c for c, n in zip(classes, first) if n not in withheld], withheld


def batches(data, args, start_step, rank=0, world=1):
    """Endless batches in a seeded order per epoch; resuming at step s starts exactly at batch s.
    With several processes, each step's global batch of world x --batch-size images is split
    by rank."""
    glob = args.batch_size * world
    per_epoch = len(data) // glob
    if per_epoch == 0:
        raise UserError(f"{len(data)} training images, fewer than {glob} per step")
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        data.set_epoch(epoch)
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(len(data), generator=g)[offset * glob: per_epoch * glob]
        order = order.view(-1, world, args.batch_size)[:, rank].flatten().tolist()
        yield from torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=order,
                                               collate_fn=collate, num_workers=args.workers,
                                               drop_last=True)
        step = (epoch + 1) * per_epoch


def teacher_maps(teacher, batch, size, device):
    """CLIP's dense map of each un-augmented source, warped onto its views: (B*V, D, h, w), unit."""
    maps = []
    for src, boxes, flips in zip(batch["source"], batch["boxes"], batch["flips"]):
        feats, _ = teacher.dense(src[None].to(device))  # (1, D, h_t, w_t)
        maps.append(warp(feats.expand(len(boxes), -1, -1, -1), boxes, flips, size))  # (V, D, h, w)
    return F.normalize(torch.cat(maps), dim=1)


def setup_distributed(args):
    """(world size, rank, device) under torchrun (DistributedDataParallel; gloo on CPU, nccl on
    CUDA), or (1, 0, device) for a single process."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = pick_device(args.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return world, rank, device


def gather(x):
    """Concatenate a tensor whose first dimension differs across processes (their segments)."""
    if not dist.is_initialized():
        return x
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    most = int(max(sizes))
    parts = [x.new_zeros((most, *x.shape[1:])) for _ in sizes]
    dist.all_gather(parts, torch.cat([x, x.new_zeros((most - len(x), *x.shape[1:]))]))
    return torch.cat([p[: int(k)] for p, k in zip(parts, sizes)])


def optimizer_for(f, args):
    """SGD with the new layers (ASPP, head) at 10x the learning rate; linear warm-up, then poly
    decay (power 0.9) to zero at --iters."""
    head = {id(p) for p in f.head_parameters()}
    groups = [{"params": [p for p in f.parameters() if id(p) not in head], "lr": args.lr},
              {"params": f.head_parameters(), "lr": 10 * args.lr}]
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay)
    poly = lambda s: (min(1.0, (s + 1) / max(1, args.warmup))
                      * (1 - min(s, args.iters - 1) / args.iters) ** 0.9)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, poly)


def read_resume(out):
    """The newest readable checkpoint of a run folder: ckpt.pt, else ckpt_prev.pt (the one before,
    kept until the next is complete). Returns the checkpoint dict, or None for a new run."""
    paths = [p for p in (out / "ckpt.pt", out / "ckpt_prev.pt") if p.exists()]
    for p in paths:
        try:
            return read_checkpoint(p, "--resume")
        except UserError as e:
            print(f"warning: {e}; trying the checkpoint before it")
    if paths:
        raise UserError(f"--resume: no readable checkpoint in {out} (" + ", ".join(
            p.name for p in paths) + " unreadable); start again with another --out-dir")
    return None


def restore(ck, args, state, device):
    """Load a checkpoint into the run's modules and optimizer state (`state`: name -> object with
    load_state_dict) and the random generators; the network flags must be the run's own."""
    for k in ("aspp_rates", "grid"):  # the same weight shapes, but another network
        if ck["args"][k] != getattr(args, k):
            raise UserError(f"{args.out_dir} was trained with --{k.replace('_', '-')} "
                            f"{ck['args'][k]}: resume with the run's own flags")
    for name, obj in state.items():
        if ck.get(name):
            obj.load_state_dict(ck[name])
    torch.set_rng_state(ck["rng"].cpu())
    if device.type == "cuda" and ck.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), device)


def trim_log(path, step):
    """After a resume at `step`, drop the log lines a killed run wrote past its checkpoint."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


class Validation:
    """Language-driven mIoU and pAcc of f on the first --eval-images val images during training,
    beside the teacher's on the same images (scored once). The first process runs it alone."""

    def __init__(self, args, teacher, stride, device):
        base = SegDataset(args.dataset, args.data_root, "val", class_names=args.class_names)
        side = test_side(base)
        self.n, self.device, self.K = args.eval_images, device, len(base.classes)
        self.names = [c.split(";")[0] for c in base.classes]
        self.protos, self.owner = teacher.text_prototypes(base.classes)
        self.images = EvalImages(base, args.eval_size or side, stride)  # f's inputs
        self.teacher = self.score(lambda x: teacher.dense(x)[0],
                                  EvalImages(base, side, teacher.stride))
        self.best = {"step": None, "mIoU": float("-inf")}

    @torch.no_grad()
    def score(self, embed, images):
        scores = lambda x: class_scores(embed(x.to(self.device)).float(),
                                        self.protos, self.owner, self.K)
        m = segmentation_metrics(language_confusion(scores, images, self.K, self.n), self.names)
        return {"mIoU": m["mIoU"], "pAcc": m["pAcc"]}

    def __call__(self, f, step, amp):
        f.eval()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            r = self.score(f, self.images)
        f.train()
        if r["mIoU"] > self.best["mIoU"]:
            self.best = {"step": step, "mIoU": r["mIoU"]}
        return r


def hms(seconds):
    """12s, 3m05s, 1h02m."""
    s = int(seconds)
    if s < 3600:
        return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class RunLog:
    """What a run prints and appends to log.jsonl: a line every --log-every steps (losses, lr,
    segments, ms per step, ETA from the recent step times), the validation lines, a summary."""

    def __init__(self, path, args):
        self.file, self.args = open(path, "a"), args
        self.recent, self.eval_s = deque(maxlen=5), 0.0  # seconds per step of the last intervals
        self.t_start, self.t_last = time.time(), time.perf_counter()

    def write(self, rec):
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def train(self, step, stop, loss, terms, seg, extra):
        now = time.perf_counter()
        self.recent.append((now - self.t_last) / self.args.log_every)  # s per step
        self.t_last = now
        evals_left = (stop - step) // self.args.eval_every if self.args.eval_every else 0
        eta = sum(self.recent) / len(self.recent) * (stop - step) + evals_left * self.eval_s
        rec = {"step": step, "loss": loss.item(), **{f"L_{k}": v.item() for k, v in terms.items()},
               "segments": seg.count, "ms": 1000 * self.recent[-1], "eta_s": eta, **extra}
        print(f"step {step}/{self.args.iters} | loss {rec['loss']:.3f} ("
              + " ".join(f"{k} {v.item():.3f}" for k, v in terms.items())
              + f") | lr {rec['lr']:.2e} | {seg.count} segments"
              + (f" | unknown {100 * rec['unknown_share']:.0f}%" if "unknown_share" in rec else "")
              + (f" | GPU peak {rec['cuda_peak_gib']:.1f} GiB" if "cuda_peak_gib" in rec else "")
              + f" | {rec['ms']:.0f} ms | ETA {hms(eta)}", flush=True)
        if self.args.profile:
            print("  phases (ms/step): " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                      rec["phases_ms"].items()))
        self.write(rec)

    def val(self, step, r, val, seconds):
        self.eval_s = seconds
        self.t_last += seconds  # step times leave validation out
        t = val.teacher
        print(f"step {step}/{self.args.iters} | val mIoU {r['mIoU']:.1f} (teacher {t['mIoU']:.1f})"
              f" | pAcc {r['pAcc']:.1f} (teacher {t['pAcc']:.1f}) | best {val.best['mIoU']:.1f} "
              f"at step {val.best['step']} | {seconds:.1f} s", flush=True)
        self.write({"step": step, "val_mIoU": r["mIoU"], "val_pAcc": r["pAcc"], "val_images": val.n,
                    "teacher_mIoU": t["mIoU"], "teacher_pAcc": t["pAcc"]})

    def done(self, step, val, ckpt_path):
        best = (f" | best val mIoU {val.best['mIoU']:.1f} at step {val.best['step']} (teacher "
                f"{val.teacher['mIoU']:.1f})" if val is not None and val.best["step"] else "")
        print(f"done: step {step}/{self.args.iters} in {hms(time.time() - self.t_start)}{best} | "
              f"{ckpt_path}")


class Phases:
    """Time per phase of a step for --profile (CUDA is synchronised only then)."""

    def __init__(self, on, device):
        self.on, self.cuda, self.total, self.t = on, device.type == "cuda", {}, time.perf_counter()

    def __call__(self, name):
        if self.on and self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.total[name] = self.total.get(name, 0.0) + now - self.t
        self.t = now

    def take(self, steps):
        out, self.total = {k: 1000 * v / steps for k, v in self.total.items()}, {}
        return out


def main(args):
    world, rank, device = setup_distributed(args)
    lead = rank == 0  # only the first process writes and validates
    torch.manual_seed(args.seed)
    for k in ("clip_config", "clip_pretrained"):  # the checkpoint must find its CLIP from anywhere
        if getattr(args, k) and os.path.isfile(getattr(args, k)):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    out = Path(args.out_dir)
    ckpt_path, prev_path = out / "ckpt.pt", out / "ckpt_prev.pt"
    if (ckpt_path.exists() or prev_path.exists()) and not args.resume:
        raise UserError(f"{ckpt_path} exists: add --resume to continue it, or choose another "
                        f"--out-dir")
    if lead and args.preset:
        print(f"preset {args.dataset}: "
              + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.preset.items()))
    if lead:
        print(f"train.py | device {device} x {world} | {json.dumps(vars(args))}")

    # ---- data ----
    base = SegDataset(args.dataset, args.data_root, args.split, class_names=args.class_names)
    known, withheld = split_names(base.classes, args)
    clip, info = load_clip(args.clip, args.clip_pretrained, args.clip_config, args.quick_gelu,
                           device)
    teacher = MaskCLIP(clip, info, args.teacher).to(device)
    data = TwoViews(base, args.crop_size, args.size, teacher.stride, n_segments=args.superpixels,
                    cache_dir=out / "superpixels", seed=args.seed, scale=args.view_scale,
                    jitter=args.jitter, gray=args.grayscale)

    # ---- model: f, the text prototypes of the known names, the unknown prototypes ----
    text = class_embeddings(teacher, known)  # (K, D)
    kappa_s = args.kappa_s or float(clip.logit_scale.exp())
    f = PixelEmbedder(text.shape[1], args.backbone, args.backbone_weights, args.head_dim,
                      args.aspp_rates, GRID_SHIFT[args.grid]).to(device)
    net = torch.nn.parallel.DistributedDataParallel(f) if world > 1 else f  # f: unwrapped
    M = args.unknown_protos if args.method == "clip-s4" else 0
    scale = args.unknown_scale or float(clip.logit_scale.exp())  # of the known-or-unknown rule
    unknown = UnknownPrototypes(M, text.shape[1], tau=args.unknown_tau, scale=scale).to(device)
    lambdas = {"c": args.lambda_c, "e": args.lambda_e, "s": args.lambda_s}

    # ---- optimizer ----
    opt, sched = optimizer_for(f, args)
    amp = device.type == "cuda" and not args.no_amp
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    state = {"model": f, "unknown": unknown, "optimizer": opt, "scheduler": sched,
             "scaler": scaler}

    # ---- resume: the newest readable checkpoint, with the run's own network flags ----
    val = Validation(args, teacher, f.stride, device) if lead and args.eval_every else None
    step, ck = 0, read_resume(out) if args.resume else None
    if ck is not None:
        restore(ck, args, state, device)
        step = ck["step"]
        if val is not None and ck.get("best"):
            val.best = ck["best"]
        print(f"resumed {out} at step {step}")
    out.mkdir(parents=True, exist_ok=True)
    if lead:
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        trim_log(out / "log.jsonl", step)

    def save():
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        atomic_save({**{k: v.state_dict() for k, v in state.items()}, "step": step,
                     "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "args": vars(args),
                     "clip": info, "classes": base.classes, "known": known, "withheld": withheld,
                     "dim": text.shape[1], "method": args.method,
                     "best": val.best if val is not None else None}, ckpt_path, previous=prev_path)

    # ---- loop: views -> teacher -> f -> segments -> objective -> step ----
    f.train()
    stream, phases = batches(data, args, step, rank, world), Phases(args.profile, device)
    stop = min(args.iters, step + args.stop_after) if args.stop_after else args.iters
    log = RunLog(out / "log.jsonl", args) if lead else None
    if val is not None:
        print(f"val: teacher on the first {val.n} val images | mIoU {val.teacher['mIoU']:.1f} | "
              f"pAcc {val.teacher['pAcc']:.1f}")
    try:
        while step < stop:
            phases("log+save")
            batch = next(stream)
            phases("data")
            B, V = batch["views"].shape[:2]
            x = batch["views"].flatten(0, 1).to(device)  # (B, V, 3, S, S) -> (BV, 3, S, S)
            h, w = x.shape[2] // f.stride, x.shape[3] // f.stride
            regions = regions_on_grid(batch["regions"].flatten(0, 1), (h, w), args.grid)
            regions = regions.to(device)  # (BV, h, w)
            with torch.no_grad():
                clip_map = teacher_maps(teacher, batch, (h, w), device)  # (BV, D, h, w)
            phases("teacher")
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                z = net(x).float()  # (BV, D, h, w)
            phases("forward")
            seg = kmeans_segments(z.detach(), regions, V, (args.kmeans_grid,) * 2,
                                  args.kmeans_iters, args.kmeans_lambda)
            pix = pixel_sample(seg, args.max_pixels)
            phases("kmeans")
            if args.method == "clip-s4":
                loss, terms, cs, is_unknown = clip_s4_objective(
                    z, seg, regions, pix, clip_map, text, unknown, lambdas, args.kappa,
                    args.kappa_e, kappa_s, args.emb_loss, V)
                unknown.update(gather(cs), gather(is_unknown))  # every process's segments
            elif args.method == "segsort":
                loss, terms = segsort_objective(z, seg, regions, pix, args.lambda_c, args.kappa, V)
            else:
                loss, terms = maskclip_plus_objective(z, clip_map, regions, text, kappa_s,
                                                      step >= args.self_train_after * args.iters)
            phases("losses")
            if not torch.isfinite(loss):
                print(f"step {step}: non-finite loss {({k: v.item() for k, v in terms.items()})};"
                      f" stopping, the last good checkpoint is {ckpt_path}")
                sys.exit(1)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            phases("backward")
            step += 1
            if lead and (step % args.log_every == 0 or step == args.iters):
                extra = {"lr": opt.param_groups[0]["lr"], "phases_ms": phases.take(args.log_every)}
                if args.method == "clip-s4":  # read at log time only: no per-step sync
                    extra["unknown_share"] = is_unknown.float().mean().item()
                if device.type == "cuda":  # the most GPU memory held at once so far
                    extra["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                log.train(step, stop, loss, terms, seg, extra)
            due = args.eval_every and (step % args.eval_every == 0 or step == stop)
            if due and val is not None:
                t0 = time.perf_counter()
                r = val(f, step, amp)
                log.val(step, r, val, time.perf_counter() - t0)
            if due and world > 1:
                dist.barrier()  # the other processes wait while the first one validates
            if lead and (step % args.save_every == 0 or step == stop):
                save()
    except KeyboardInterrupt:
        if lead:
            save()
        print(f"interrupted: saved step {step} to {ckpt_path}; add --resume to continue")
        sys.exit(130)
    if lead:
        log.done(step, val, ckpt_path)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(get_args())
    except UserError as e:
        sys.exit(f"error: {e}")
