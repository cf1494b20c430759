"""train.py: train the pixel-embedding network of CLIP-S4 without labels (or a baseline).

Paper setting (one V100 in the paper, about 5 h for 20k iterations):
    python train.py --dataset voc --data-root data/voc --clip ViT-B-16 --out-dir runs/voc_vit16
Class-free Pascal Context (fold 0's names withheld everywhere):
    python train.py --dataset context --data-root data/context --unknown-fold 0 --out-dir runs/ctx_f0
Baselines in the same harness: --method maskclip+ (pseudo-labels, then self-training), --method segsort.
Toy world on a CPU (after `python toy.py`; a few minutes):
    python train.py --dataset toy --clip-config data/toy/toyclip.json --clip-pretrained data/toy/toyclip.pt \
        --size 64 --crop-size 96 --backbone resnet18 --backbone-weights data/toy/resnet18_toy.pt \
        --head-dim 128 --iters 300 --batch-size 8 --lr 0.01 --warmup 20 --unknown-protos 8 --out-dir runs/toy_clips4
Continue a run: the same command with --resume. Several GPUs (or CPU processes, gloo):
    torchrun --nproc_per_node 4 train.py --dataset voc ...      # --batch-size is per process
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import CONTEXT_FOLDS, SegDataset, TwoViews, UserError, atomic_save, collate, warp
from losses import (UnknownPrototypes, embedding_consistency, kmeans_segments, pixel_sample,
                    pixel_segment_contrastive, pseudo_label_loss, regions_on_grid, segment_means,
                    semantic_consistency)
from model import ASPP_RATES, GRID_SHIFT, MaskCLIP, PixelEmbedder, class_embeddings, load_clip


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--clip", default="ViT-B-16", help="open_clip name of the frozen teacher (ViT-B-16 or RN50 in the paper)")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip tag or local weights file")
    p.add_argument("--clip-config", default=None, help="open_clip JSON config for a custom CLIP (the toy CLIP)")
    p.add_argument("--quick-gelu", choices=["auto", "on", "off"], default="auto", help="see README")
    p.add_argument("--size", type=int, default=448, help="short side of the source image the teacher sees [choice]")
    p.add_argument("--backbone", default="resnet101", help="f's trunk: resnet101 (default), resnet50, resnet18")
    p.add_argument("--backbone-weights", default="auto", help="auto (torchvision cache), none, or a file")
    p.add_argument("--head-dim", type=int, default=512, help="channels of f's ASPP and projection head [choice]")
    p.add_argument("--aspp-rates", type=int, nargs=4, default=list(ASPP_RATES),
                   help="dilation rates of f's four ASPP branches (DeepLab-v2's, for 321-513 px crops) [choice]")
    p.add_argument("--grid", choices=["centre", "corner"], default="centre",
                   help="f's cell i looks at the centre of pixels [8i, 8i+8) or at pixel 8i, as runs before "
                        "2026-11-28 did (README)")
    # Data
    p.add_argument("--dataset", default="voc", choices=["voc", "context", "cocostuff", "folder", "toy"])
    p.add_argument("--class-names", default=None, help="a file of class names (one per line) replacing the dataset's")
    p.add_argument("--data-root", default=None, help="dataset folder (default data/<dataset>)")
    p.add_argument("--split", default="train", help="split to train on")
    p.add_argument("--crop-size", type=int, default=336, help="side of each augmented view (paper: 336)")
    p.add_argument("--superpixels", type=int, default=64, help="SLIC regions per image [choice]")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    # Method and losses
    p.add_argument("--method", default="clip-s4", choices=["clip-s4", "maskclip+", "segsort"])
    p.add_argument("--unknown-fold", type=int, default=None, help="class-free Pascal Context: withhold fold K's names")
    p.add_argument("--unknown-classes", nargs="+", default=[], help="class-free on any dataset: withhold these names")
    p.add_argument("--lambda-c", type=float, default=1.0, help="weight of L_c, pixel-segment contrastive")
    p.add_argument("--lambda-e", type=float, default=1.0, help="weight of L_e, embedding consistency [choice]")
    p.add_argument("--lambda-s", type=float, default=1.0, help="weight of L_s, semantic consistency [choice]")
    p.add_argument("--kappa", type=float, default=10.0, help="concentration of L_c (SegSort's value)")
    p.add_argument("--kappa-e", type=float, default=10.0, help="concentration of L_e's InfoNCE [choice]")
    p.add_argument("--kappa-s", type=float, default=0.0, help="logit scale of L_s and MaskCLIP+; 0 = CLIP's own [choice]")
    p.add_argument("--emb-loss", default="nce", choices=["nce", "cos"], help="form of L_e [choice]")
    p.add_argument("--kmeans-grid", type=int, default=4, help="k-means starts from a G x G grid per view [choice]")
    p.add_argument("--kmeans-iters", type=int, default=10, help="k-means iterations per step [choice]")
    p.add_argument("--kmeans-lambda", type=float, default=1.0, help="weight of pixel position in k-means [choice]")
    p.add_argument("--max-pixels", type=int, default=4096, help="pixels per step scored by L_c and L_s [choice]")
    p.add_argument("--unknown-protos", type=int, default=20, help="M unknown prototypes [choice]")
    p.add_argument("--unknown-tau", type=float, default=0.5, help="CLIP confidence below which a segment is unknown [choice]")
    p.add_argument("--unknown-scale", type=float, default=100.0, help="softmax scale of that confidence (method.md: "
                   "100); 0 = CLIP's own logit scale, the same for OpenAI's CLIPs, 15.5 for the toy CLIP [choice]")
    p.add_argument("--self-train-after", type=float, default=0.1, help="maskclip+: share of training on teacher labels")
    # Optim
    p.add_argument("--iters", type=int, default=20000, help="training iterations (paper: 20k)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step, two views each [choice]")
    p.add_argument("--lr", type=float, default=3e-3, help="base learning rate, poly decay; head x10 [choice]")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up iterations [choice]")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-3, help="SGD weight decay (paper: 1e-3)")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    # Output
    p.add_argument("--out-dir", default="runs/clip_s4", help="run folder: ckpt.pt, args.json, log.jsonl")
    p.add_argument("--log-every", type=int, default=20, help="a log line every N steps")
    p.add_argument("--save-every", type=int, default=1000, help="a checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
    p.add_argument("--stop-after", type=int, default=0, help="save and stop after N steps of this invocation (0: run to --iters)")
    p.add_argument("--profile", action="store_true", help="print each phase's time per step (syncs CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def split_names(classes, args):
    """Known and withheld class names (the class-free setting): withheld names appear nowhere in training."""
    withheld = list(args.unknown_classes)
    if args.unknown_fold is not None:
        if args.dataset != "context" or not 0 <= args.unknown_fold < len(CONTEXT_FOLDS):
            raise UserError("--unknown-fold K takes 0-3 with --dataset context; elsewhere use --unknown-classes")
        withheld += CONTEXT_FOLDS[args.unknown_fold]
    first = [c.split(";")[0] for c in classes]
    missing = [n for n in withheld if n not in first]
    if missing:
        raise UserError(f"--unknown-classes {missing}: not class names of {args.dataset} ({', '.join(first[:8])}, ...)")
    return [c for c, n in zip(classes, first) if n not in withheld], withheld


def batches(data, args, start_step, rank=0, world=1):
    """Endless batches in a seeded order per epoch; resuming at step s starts exactly at batch s.
    With several processes, each step's global batch of world x --batch-size images is split by rank."""
    glob = args.batch_size * world
    per_epoch = len(data) // glob
    if per_epoch == 0:
        raise UserError(f"{len(data)} training images, fewer than {glob} per step")
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        data.set_epoch(epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        order = order[offset * glob: per_epoch * glob].view(-1, world, args.batch_size)[:, rank].flatten().tolist()
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=order, collate_fn=collate,
                                             num_workers=args.workers, drop_last=True)
        for batch in loader:
            yield batch
            step += 1


def teacher_maps(teacher, batch, size, device):
    """CLIP's dense map of each un-augmented source, warped onto both views: (B*V, D, h, w), unit."""
    maps = []
    for src, boxes, flips in zip(batch["source"], batch["boxes"], batch["flips"]):
        feats, _ = teacher.dense(src[None].to(device))  # (1, D, h_t, w_t)
        maps.append(warp(feats.expand(len(boxes), -1, -1, -1), boxes, flips, size))  # (V, D, h, w)
    return F.normalize(torch.cat(maps), dim=1)


def gather(x):
    """Concatenate a tensor whose first dimension differs across processes (the segments of each)."""
    if not dist.is_initialized():
        return x
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    pad = x.new_zeros((int(max(sizes)) - len(x), *x.shape[1:]))
    parts = [x.new_zeros((int(max(sizes)), *x.shape[1:])) for _ in sizes]
    dist.all_gather(parts, torch.cat([x, pad]))
    return torch.cat([p[: int(k)] for p, k in zip(parts, sizes)])


def main(args):
    # Several processes under torchrun (DistributedDataParallel; gloo on CPU, nccl on CUDA).
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    lead = rank == 0  # only the first process writes
    torch.manual_seed(args.seed)
    for k in ("clip_config", "clip_pretrained"):  # the checkpoint must find its CLIP from anywhere
        if getattr(args, k) and os.path.isfile(getattr(args, k)):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    out = Path(args.out_dir)
    ckpt_path = out / "ckpt.pt"
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: add --resume to continue it, or choose another --out-dir")
    if lead:
        print(f"train.py | device {device} x {world} | {json.dumps(vars(args))}")

    # ---- data ----
    base = SegDataset(args.dataset, args.data_root, args.split, class_names=args.class_names)
    known, withheld = split_names(base.classes, args)
    clip, info = load_clip(args.clip, args.clip_pretrained, args.clip_config, args.quick_gelu, device)
    teacher = MaskCLIP(clip, info).to(device)
    data = TwoViews(base, args.crop_size, args.size, teacher.stride, n_segments=args.superpixels,
                    cache_dir=out / "superpixels", seed=args.seed)

    # ---- model: f, the text prototypes of the known names, the unknown prototypes ----
    text = class_embeddings(teacher, known)  # (K, D)
    kappa_s = args.kappa_s or float(clip.logit_scale.exp())
    f = PixelEmbedder(text.shape[1], args.backbone, args.backbone_weights, args.head_dim,
                      args.aspp_rates, GRID_SHIFT[args.grid]).to(device)
    net = torch.nn.parallel.DistributedDataParallel(f) if world > 1 else f  # f stays the unwrapped module
    unknown = UnknownPrototypes(args.unknown_protos if args.method == "clip-s4" else 0, text.shape[1],
                                tau=args.unknown_tau, scale=args.unknown_scale or float(clip.logit_scale.exp())).to(device)

    # ---- optimizer: SGD, head x10, warm-up then poly decay ----
    head = {id(p) for p in f.head_parameters()}
    groups = [{"params": [p for p in f.parameters() if id(p) not in head], "lr": args.lr},
              {"params": f.head_parameters(), "lr": 10 * args.lr}]
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)) * (1 - min(s, args.iters - 1) / args.iters) ** 0.9)
    amp = device.type == "cuda" and not args.no_amp
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    # ---- resume ----
    step = 0
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if list(ck["args"].get("aspp_rates", ASPP_RATES)) != list(args.aspp_rates):  # same shapes, other f
            raise UserError(f"{ckpt_path} was trained with other --aspp-rates: resume with the run's own flags")
        if ck["args"].get("grid", "corner") != args.grid:
            raise UserError(f"{ckpt_path} was trained with --grid {ck['args'].get('grid', 'corner')}: "
                            f"resume with the run's own flags")
        f.load_state_dict(ck["model"])
        unknown.load_state_dict(ck["unknown"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"].cpu())
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), device)
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step = ck["step"]
        print(f"resumed {ckpt_path} at step {step}")
    out.mkdir(parents=True, exist_ok=True)
    if lead:
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))

    def checkpoint():
        return {"model": f.state_dict(), "unknown": unknown.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda"
                else None, "args": vars(args),
                "clip": info, "classes": base.classes, "known": known, "withheld": withheld,
                "dim": text.shape[1], "method": args.method}

    # ---- loop ----
    f.train()
    log = open(out / "log.jsonl", "a") if lead else None
    stream = batches(data, args, step, rank, world)
    t_last = time.perf_counter()
    stop = min(args.iters, step + args.stop_after) if args.stop_after else args.iters
    phases = {}

    def tick(name, t0):
        """Add the time since t0 to a phase of the step (CUDA is synchronised only with --profile)."""
        if args.profile and device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - t0
        return now
    t = time.perf_counter()
    try:
        while step < stop:
            t = tick("log+save", t)
            batch = next(stream)
            t = tick("data", t)
            B, V = batch["views"].shape[:2]
            x = batch["views"].flatten(0, 1).to(device)  # (B, V, 3, S, S) -> (BV, 3, S, S)
            h, w = x.shape[2] // f.stride, x.shape[3] // f.stride
            regions = regions_on_grid(batch["regions"].flatten(0, 1), (h, w), args.grid).to(device)  # (BV, h, w)
            with torch.no_grad():
                clip_map = teacher_maps(teacher, batch, (h, w), device)  # (BV, D, h, w)
            t = tick("teacher", t)
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                z = net(x)  # (BV, D, h, w)
            z = z.float()
            t = tick("forward", t)
            seg = kmeans_segments(z.detach(), regions, V, (args.kmeans_grid,) * 2, args.kmeans_iters,
                                  args.kmeans_lambda)
            pix = pixel_sample(seg, args.max_pixels)
            t = tick("kmeans", t)
            terms = {}
            if args.method in ("clip-s4", "segsort") and args.lambda_c:
                terms["c"] = pixel_segment_contrastive(z, seg, regions, pix, args.kappa, V)
            if args.method == "clip-s4":
                cs = segment_means(clip_map, seg)  # (S, D) CLIP's segment embeddings
                targets, is_unknown = unknown.targets(cs, text)
                if args.lambda_e:
                    terms["e"] = embedding_consistency(segment_means(z, seg), cs, args.kappa_e, args.emb_loss)
                if args.lambda_s:
                    targets_all = torch.cat([text, unknown.shifted(text)]) if unknown.started else text
                    terms["s"] = semantic_consistency(z, seg, pix, targets, targets_all, kappa_s)
                unknown.update(gather(cs), gather(is_unknown))  # every process sees every segment
                unknown_share = is_unknown.float().mean()  # read at log time only: no per-step sync
            if args.method == "maskclip+":
                source = clip_map if step < args.self_train_after * args.iters else z.detach()
                labels = torch.einsum("bdhw,kd->bkhw", source, text).argmax(dim=1)  # (BV, h, w)
                labels[regions < 0] = -1
                terms["p"] = pseudo_label_loss(z, labels, text, kappa_s)
            weights = {"c": args.lambda_c, "e": args.lambda_e, "s": args.lambda_s, "p": 1.0}
            loss = sum(weights[k] * v for k, v in terms.items())
            t = tick("losses", t)
            if not torch.isfinite(loss):
                print(f"step {step}: non-finite loss {({k: v.item() for k, v in terms.items()})}; stopping, "
                      f"the last good checkpoint is {ckpt_path}")
                sys.exit(1)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            t = tick("backward", t)
            step += 1
            if lead and (step % args.log_every == 0 or step == args.iters):
                ms = 1000 * (time.perf_counter() - t_last) / args.log_every
                t_last = time.perf_counter()
                rec = {"step": step, "loss": loss.item(), **{f"L_{k}": v.item() for k, v in terms.items()},
                       "lr": opt.param_groups[0]["lr"], "segments": seg.count, "ms": ms}
                if args.method == "clip-s4":
                    rec["unknown_share"] = unknown_share.item()
                if device.type == "cuda":  # the most GPU memory held at once so far, this process
                    rec["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                rec["phases_ms"] = {k: 1000 * v / args.log_every for k, v in phases.items()}
                phases.clear()
                print(f"step {step}/{args.iters} | loss {rec['loss']:.3f} ("
                      + " ".join(f"{k} {rec['L_' + k]:.3f}" for k in terms)
                      + f") | lr {rec['lr']:.2e} | {seg.count} segments"
                      + (f" | unknown {100 * rec['unknown_share']:.0f}%" if "unknown_share" in rec else "")
                      + (f" | GPU peak {rec['cuda_peak_gib']:.1f} GiB" if "cuda_peak_gib" in rec else "")
                      + f" | {ms:.0f} ms", flush=True)
                if args.profile:
                    print("  phases (ms/step): " + ", ".join(f"{k} {v:.0f}" for k, v in rec["phases_ms"].items()))
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if lead and (step % args.save_every == 0 or step == stop):
                atomic_save(checkpoint(), ckpt_path)
    except KeyboardInterrupt:
        if lead:
            atomic_save(checkpoint(), ckpt_path)
        print(f"interrupted: saved step {step} to {ckpt_path}")
        sys.exit(130)
    if lead:
        print(f"done: {ckpt_path}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(get_args())
    except UserError as e:
        sys.exit(f"error: {e}")
