"""What a training run needs besides its method (train.py): batches in a resumable order, the
teacher's maps (batched and cached), several processes, the optimizer, checkpoints and resume,
validation while training, the log and the phase profile."""
import json
import os
import sys
import time
from collections import deque
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import EvalImages, collate, first_names, test_side, warp
from util.files import UserError, atomic_save
from losses import regions_on_grid
from util.metrics import language_confusion, segmentation_metrics
from model import class_scores, read_checkpoint


def pick_device(name):
    """'auto' (CUDA when present), 'cpu' or 'cuda' -> torch.device; 'cuda' and no GPU: UserError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def batches(data, batch_size, seed, workers, start_step=0, rank=0, world=1):
    """Endless batches of `batch_size` images in a seeded order per epoch; resuming at step s
    starts exactly at batch s. With several processes, each step's global batch of world x
    batch_size images is split by rank."""
    glob = batch_size * world
    per_epoch = len(data) // glob
    if per_epoch == 0:
        raise UserError(f"{len(data)} training images, fewer than {glob} per step")
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        data.set_epoch(epoch)
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(data), generator=g)[offset * glob: per_epoch * glob]
        order = order.view(-1, world, batch_size)[:, rank].flatten().tolist()
        yield from torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=order,
                                               collate_fn=collate, num_workers=workers,
                                               drop_last=True)
        step = (epoch + 1) * per_epoch


class TeacherCache:
    """The teacher's dense map of each training source (docs/method.md, section 9c). The teacher
    sees only the un-augmented source, so an image's map is the same in every epoch: the sources of
    a batch that share a size go through the teacher together, and each map is kept in fp16 on the
    CPU, keyed by image id and source size (the teacher, its CLIP weights and --size are the run's
    own), until `max_mib` MiB are held; later epochs then run no teacher. Maps are rounded to fp16
    with the cache off too (max_mib 0), so a run's results do not depend on it."""

    def __init__(self, teacher, max_mib=4096):
        self.teacher, self.max_bytes, self.bytes, self.maps = teacher, max_mib * 2 ** 20, 0, {}
        self.hits = self.misses = 0

    @torch.no_grad()
    def source_maps(self, batch):
        """One (D, h_t, w_t) fp16 CPU map per source of the batch."""
        keys = [(i, tuple(s.shape[1:])) for i, s in zip(batch["id"], batch["source"])]
        out = [self.maps.get(k) for k in keys]
        todo = {}  # source size -> the batch positions still to run
        for j, (m, k) in enumerate(zip(out, keys)):
            if m is None:
                todo.setdefault(k[1], []).append(j)
        for js in todo.values():
            feats = self.teacher.dense(torch.stack([batch["source"][j] for j in js]))[0]
            for j, m in zip(js, feats.half().cpu()):  # (D, h_t, w_t) each
                out[j] = m.clone()
                if self.bytes + m.nbytes <= self.max_bytes:
                    self.maps[keys[j]] = out[j]
                    self.bytes += m.nbytes
        n_new = sum(len(js) for js in todo.values())
        self.hits, self.misses = self.hits + len(keys) - n_new, self.misses + n_new
        return out

    def __call__(self, batch, size, device):
        """The maps warped onto each source's views: (B*V, D, h, w) fp32, unit."""
        maps = []
        for m, boxes, flips in zip(self.source_maps(batch), batch["boxes"], batch["flips"]):
            m = m.to(device, torch.float32)[None].expand(len(boxes), -1, -1, -1)
            maps.append(warp(m, boxes, flips, size))  # (V, D, h, w)
        return F.normalize(torch.cat(maps), dim=1)


def setup_distributed(device_name="auto"):
    """(world size, rank, device) under torchrun (DistributedDataParallel; gloo on CPU, nccl on
    CUDA), or (1, 0, device) for a single process. device_name: --device (model.pick_device)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = pick_device(device_name)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return world, rank, device


def optimizer_for(f, lr, momentum, weight_decay, warmup, iters, extra=()):
    """SGD with the new layers (ASPP, head) at 10x the learning rate, and the objective's own
    parameters (`extra`: ConceptContrast's codebook) there too, without weight decay [choice];
    the schedule of poly_schedule. Returns (optimizer, scheduler)."""
    head = {id(p) for p in f.head_parameters()}
    groups = [{"params": [p for p in f.parameters() if id(p) not in head], "lr": lr},
              {"params": f.head_parameters(), "lr": 10 * lr}]
    if extra:
        groups.append({"params": list(extra), "lr": 10 * lr, "weight_decay": 0.0})
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return opt, poly_schedule(opt, iters, warmup)


def poly_schedule(opt, iters, warmup=0):
    """The learning rate of step s, a factor of the base rate: linear warm-up over `warmup` steps,
    then poly decay (power 0.9) to zero at `iters` (DeepLab's):
        lr_s = lr min(1, (s + 1) / warmup) (1 - min(s, iters - 1) / iters)^0.9."""
    poly = lambda s: min(1.0, (s + 1) / max(1, warmup)) * (1 - min(s, iters - 1) / iters) ** 0.9
    return torch.optim.lr_scheduler.LambdaLR(opt, poly)


class WeightAverage:
    """--average-from: the uniform average of f's weights over the last steps of the run, its
    BatchNorm statistics included (stochastic weight averaging, Izmailov et al. 2018, over the
    end of the poly schedule; torch's AveragedModel) [beyond the paper]. After step `start`,
    every step's weights join the average:  w_avg = (1 / n) sum_{s = start+1}^{start+n} w_s.
    Where the schedule still moves f late, a class can flip between two names from one step to
    the next, and the last step's weights are a draw; their average is not (docs/results.md,
    "A number that repeats"). f trains on unchanged; validation, the checkpoint's scored weights
    (model.scored_weights) and every script read the average once it holds a step."""

    def __init__(self, f, start):
        self.start = start
        self.avg = torch.optim.swa_utils.AveragedModel(f, use_buffers=True)

    def update(self, f, step):
        """Add f's weights after `step` (counted from 1) when the average has begun."""
        if step > self.start:
            self.avg.update_parameters(f)

    def scored(self, f):
        """The network to score: the average once it holds a step, else f itself."""
        return self.avg.module if int(self.avg.n_averaged) > 0 else f


@contextmanager
def saved_on_interrupt(save, message):
    """Ctrl-C inside the block: save() (None: this process saves nothing), print message() (how
    to continue) and exit with status 130. train.py's loop and knn.py's probe run inside one."""
    try:
        yield
    except KeyboardInterrupt:
        if save is not None:
            save()
        print(message())
        sys.exit(130)


def optimizer_step(loss, opt, sched, scaler, world=1, outside=()):
    """One SGD step on loss: backward (scaled under AMP), the gradients of `outside` parameters
    (those not in DDP's module, e.g. ConceptContrast's codebook) averaged over the processes by
    hand, the step, and the schedule's step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    for p in outside:
        if world > 1 and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
    scaler.step(opt)
    scaler.update()
    sched.step()


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


def restore(ck, state, device, network, out):
    """Load a checkpoint into the run's modules and optimizer state (`state`: name -> object with
    load_state_dict) and the random generators. network: the flags that give the same weight
    shapes but another network ({"aspp_rates": ..., "grid": ...}), which must be the run's own;
    out: the run folder, for the message."""
    for k, v in network.items():
        if ck["args"][k] != v:
            raise UserError(f"{out} was trained with --{k.replace('_', '-')} {ck['args'][k]}: "
                            f"resume with the run's own flags")
    for name, obj in state.items():
        if ck.get(name):
            obj.load_state_dict(ck[name])
    torch.set_rng_state(ck["rng"].cpu())
    if device.type == "cuda" and ck.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), device)


def resume(out, state, device, network, val=None):
    """Continue the run in `out` from its newest readable checkpoint (read_resume, restore), the
    best validation score included; returns its step (0 when there is none yet)."""
    ck = read_resume(out)
    if ck is None:
        return 0
    restore(ck, state, device, network, out)
    if val is not None and ck.get("best"):
        val.best = ck["best"]
    print(f"resumed {out} at step {ck['step']}")
    return ck["step"]


def save_checkpoint(path, previous, state, step, device, run):
    """The run's modules and optimizer state, step and random generators, with `run` (its args,
    CLIP, class names, method: what model.load_run reads back); written atomically, the checkpoint
    before it kept as `previous` until the new one is complete."""
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    atomic_save({**{k: v.state_dict() for k, v in state.items()}, "step": step,
                 "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, **run}, path,
                previous=previous)


def trim_log(path, step):
    """After a resume at `step`, drop the log lines a killed run wrote past its checkpoint."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


class Validation:
    """Language-driven mIoU and pAcc of f on the first `n` images of `base` (the val split) during
    training, beside the teacher's on the same images (scored once at the dataset's test side).
    f sees them at `eval_size` (None: the same side). The first process runs it alone."""

    def __init__(self, base, n, eval_size, teacher, stride, device):
        side = test_side(base)
        self.n, self.device, self.K = n, device, len(base.classes)
        self.names = first_names(base.classes)
        self.protos, self.owner = teacher.text_prototypes(base.classes)
        self.images = EvalImages(base, eval_size or side, stride)  # f's inputs
        self.teacher = self.score(lambda x: teacher.dense(x)[0],
                                  EvalImages(base, side, teacher.stride))
        share = self.teacher["gt_share"]
        # the small classes (FollowPixels): under half of an even share of the val pixels
        self.small = [j for j, v in enumerate(share) if 0 < v < 50 / self.K]
        self.teacher["small"] = self.small_mean(self.teacher)
        self.best = {"step": None, "mIoU": float("-inf")}
        print(f"val: teacher on the first {self.n} val images | mIoU {self.teacher['mIoU']:.1f} | "
              f"pAcc {self.teacher['pAcc']:.1f}")

    @torch.no_grad()
    def score(self, embed, images):
        scores = lambda x: class_scores(embed(x.to(self.device)).float(),
                                        self.protos, self.owner, self.K)
        cm = language_confusion(scores, images, self.K, self.n)
        m = segmentation_metrics(cm, self.names)
        return {"mIoU": m["mIoU"], "pAcc": m["pAcc"], "per_class": list(m["per_class"].values()),
                "gt_share": (100 * cm.sum(1) / max(1, cm.sum())).tolist()}

    def small_mean(self, r):
        """Mean IoU of the small classes (None where there are none)."""
        v = [r["per_class"][j] for j in self.small if r["per_class"][j] is not None]
        return sum(v) / len(v) if v else None

    def __call__(self, f, step, amp):
        f.eval()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            r = self.score(f, self.images)
        f.train()
        r["small"] = self.small_mean(r)
        if r["mIoU"] > self.best["mIoU"]:
            self.best = {"step": step, "mIoU": r["mIoU"]}
        return r


class FollowPixels:
    """Where each class's pixels go in training (--follow-pixels): of the view pixels whose ground
    truth is class c (read here only, never by a loss), the share the teacher's own pixel label
    calls c, the share the method's training target calls c (L_s's segment label y_s(p), or
    MaskCLIP+'s pseudo-label) and the share f predicts as c, summed between two log lines (the
    recall of c), and of the pixels each of the three calls c, the share that are c (its
    precision). A class lost by the targets is lost before f learns; one kept by the targets and
    lost by f is lost in the learning; one named often but in the wrong places has a high recall
    and a low precision. "Small" classes hold under half of an even share of the ground truth, as
    small things do; the log line shows their means, log.jsonl every class's numbers.
    classes: the dataset's names; known: the names f is trained on (withheld ones score 0)."""

    def __init__(self, classes, known):
        self.names = first_names(classes)
        self.col = torch.tensor([known.index(c) if c in known else -1 for c in classes])
        # rows: gt; teacher, target, f right (c called c); teacher, target, f calling c
        self.counts = torch.zeros(7, len(classes), dtype=torch.long)

    @torch.no_grad()
    def add(self, gt, teacher, target, pred):
        """gt (BV, h, w) long ground truth (IGNORE = none); teacher, target, pred (BV, h, w) long
        known-class indices (target >= K: an unknown prototype, -1: no target). The counts stay
        on the maps' device: a step does not wait on the GPU."""
        self.col, self.counts = self.col.to(gt.device), self.counts.to(gt.device)
        gt = gt.flatten()
        keep = gt < len(self.names)
        gt, col = gt[keep], self.col[gt[keep]]
        maps = [m.flatten()[keep] for m in (teacher, target, pred)]
        rows = [torch.ones_like(gt, dtype=torch.bool)] + [(m == col) & (col >= 0) for m in maps]
        for r, hit in enumerate(rows):
            self.counts[r] += torch.bincount(gt[hit], minlength=len(self.names))
        known = (self.col >= 0).nonzero().squeeze(1)  # dataset classes that are known names
        for r, m in enumerate(maps, start=4):  # how many pixels each map calls each known name
            called = torch.bincount(m[(m >= 0) & (m < len(known))], minlength=len(known))
            self.counts[r, known] += called[self.col[known]]

    @torch.no_grad()
    def add_views(self, labels, grid, clip_map, z, text, target):
        """One step's views: labels (BV, S, S) long, the ground truth warped onto the views, read
        on f's grid as the regions are (losses.regions_on_grid); the teacher's and f's own pixel
        labels, the nearest of the known names text (K, D) to clip_map and z (BV, D, h, w);
        target (BV, h, w), what the objective taught (losses.StepLoss.target)."""
        gt = regions_on_grid(labels, z.shape[2:], grid).to(z.device)
        nearest = lambda maps: torch.einsum("bdhw,kd->bkhw", maps, text).argmax(1)  # (BV, h, w)
        self.add(gt, nearest(clip_map), target, nearest(z.detach()))

    def take(self):
        """{"gt_share", "teacher", "target", "f"} (recall) and {"teacher_precision",
        "target_precision", "f_precision"}: per class, in percent (None: no pixels, or none
        called c), and the small classes' means; the counts start again."""
        c, self.counts = self.counts.cpu().double(), torch.zeros_like(self.counts)
        n = c[0].clamp(min=1)
        share = c[0] / c[0].sum().clamp(min=1)
        small = (share > 0) & (share < 0.5 / len(self.names))
        out = {"gt_share": (100 * share).tolist()}
        for r, k in enumerate(("teacher", "target", "f"), start=1):
            pct = 100 * c[r] / n
            out[k] = [v if c[0, j] else None for j, v in enumerate(pct.tolist())]
            out[f"small_{k}"] = float(pct[small].mean()) if small.any() else None
            called = c[r + 3]
            prec = 100 * c[r] / called.clamp(min=1)
            out[f"{k}_precision"] = [v if called[j] else None for j, v in enumerate(prec.tolist())]
            has = small & (called > 0)
            out[f"small_{k}_precision"] = float(prec[has].mean()) if has.any() else None
        return out


def small_line(follow, who):
    """The small classes' recall / precision of one of FollowPixels' maps: "47%/21%"."""
    prec = follow.get(f"small_{who}_precision")
    return f"{follow[f'small_{who}']:.0f}%" + (f"/{prec:.0f}%" if prec is not None else "")


def hms(seconds):
    """12s, 3m05s, 1h02m."""
    s = int(seconds)
    if s < 3600:
        return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class RunLog:
    """What a run prints and appends to log.jsonl: a line every `log_every` steps (losses, lr,
    segments, ms per step, ETA from the recent step times), the validation lines (every
    `eval_every` steps, 0: none), a summary; `profile`: each phase's time per step too."""

    def __init__(self, path, iters, log_every, eval_every, profile=False):
        self.file = open(path, "a")
        self.iters, self.log_every, self.eval_every = iters, log_every, eval_every
        self.profile = profile
        self.recent, self.eval_s = deque(maxlen=5), 0.0  # seconds per step of the last intervals
        self.t_start, self.t_last = time.time(), time.perf_counter()

    def write(self, rec):
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def train(self, step, stop, loss, terms, seg, extra):
        now = time.perf_counter()
        self.recent.append((now - self.t_last) / self.log_every)  # s per step
        self.t_last = now
        evals_left = (stop - step) // self.eval_every if self.eval_every else 0
        eta = sum(self.recent) / len(self.recent) * (stop - step) + evals_left * self.eval_s
        rec = {"step": step, "loss": loss.item(), **{f"L_{k}": v.item() for k, v in terms.items()},
               "segments": seg.count, "ms": 1000 * self.recent[-1], "eta_s": eta, **extra}
        print(f"step {step}/{self.iters} | loss {rec['loss']:.3f} ("
              + " ".join(f"{k} {v.item():.3f}" for k, v in terms.items())
              + f") | lr {rec['lr']:.2e} | {seg.count} segments"
              + (f" | unknown {100 * rec['unknown_share']:.0f}%" if "unknown_share" in rec else "")
              + (f" | {rec['codes_used']} codes" if "codes_used" in rec else "")
              + (f" | small classes: teacher {small_line(rec['follow'], 'teacher')} target "
                 f"{small_line(rec['follow'], 'target')} f {small_line(rec['follow'], 'f')}"
                 if rec.get("follow", {}).get("small_f") is not None else "")
              + (f" | GPU peak {rec['cuda_peak_gib']:.1f} GiB" if "cuda_peak_gib" in rec else "")
              + f" | {rec['ms']:.0f} ms | ETA {hms(eta)}", flush=True)
        if self.profile:
            print("  phases (ms/step): " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                      rec["phases_ms"].items()))
        self.write(rec)

    def val(self, step, r, val, seconds):
        self.eval_s = seconds
        self.t_last += seconds  # step times leave validation out
        t = val.teacher
        small = (f" | small classes {r['small']:.1f} (teacher {t['small']:.1f})"
                 if r["small"] is not None and t["small"] is not None else "")
        print(f"step {step}/{self.iters} | val mIoU {r['mIoU']:.1f} (teacher {t['mIoU']:.1f})"
              f" | pAcc {r['pAcc']:.1f} (teacher {t['pAcc']:.1f}){small} | best "
              f"{val.best['mIoU']:.1f} at step {val.best['step']} | {seconds:.1f} s", flush=True)
        self.write({"step": step, "val_mIoU": r["mIoU"], "val_pAcc": r["pAcc"], "val_images": val.n,
                    "val_seconds": seconds,
                    "teacher_mIoU": t["mIoU"], "teacher_pAcc": t["pAcc"],
                    "val_small": r["small"], "teacher_small": t["small"],
                    "val_per_class": r["per_class"], "teacher_per_class": t["per_class"]})

    def done(self, step, val, ckpt_path):
        best = (f" | best val mIoU {val.best['mIoU']:.1f} at step {val.best['step']} (teacher "
                f"{val.teacher['mIoU']:.1f})" if val is not None and val.best["step"] else "")
        print(f"done: step {step}/{self.iters} in {hms(time.time() - self.t_start)}{best} | "
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


def log_extras(opt, phases, log_every, stats, device, cache=None, follow=None):
    """The numbers of a log line besides the losses: lr, the phase times, the method's stats (read
    now, once per --log-every steps), the share of teacher maps read from the cache so far, and on
    CUDA the most GPU memory held at once."""
    extra = {"lr": opt.param_groups[0]["lr"], "phases_ms": phases.take(log_every)}
    for k, v in stats.items():
        extra[k] = v() if callable(v) else v.item()
    if follow is not None:
        extra["follow"] = follow.take()
    if cache is not None:
        extra["teacher_cached"] = cache.hits / max(1, cache.hits + cache.misses)
    if device.type == "cuda":
        extra["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return extra
